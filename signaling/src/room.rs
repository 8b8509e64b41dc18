//! Rooms: who is in, what each publishes, and who must be told. Rooms make decisions and send
//! messages; they never touch packets. The registry lock is taken only on join and leave.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use sfu::{ParticipantId, Publication, PublicationId, SubscribeTransport};
use sfu::{RTCIceCandidateInit, SfuError};
use tokio::sync::{Notify, mpsc};

use crate::protocol::{ErrorCode, PeerInfo, ServerMessage, SubscriptionInfo, TransportName};

/// Messages queued toward one participant's socket. A participant whose queue overflows is
/// stuck (its socket is not being drained): it is kicked rather than silently missing messages,
/// which would break the protocol's ordering guarantees.
#[derive(Clone, Debug)]
pub struct Outbound {
    tx: mpsc::Sender<ServerMessage>,
    kick: Arc<Notify>,
}

impl Outbound {
    /// A queue of `capacity` messages and its receiving end.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<ServerMessage>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Self {
                tx,
                kick: Arc::new(Notify::new()),
            },
            rx,
        )
    }

    /// Queues `message`; false (and the participant kicked) when the queue is full.
    pub fn send(&self, message: ServerMessage) -> bool {
        match self.tx.try_send(message) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("a participant's signaling queue is full: disconnecting it");
                self.kick.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Completes when the participant must be disconnected.
    pub async fn kicked(&self) {
        self.kick.notified().await
    }
}

/// Mute states remembered for tracks that are not (yet) published, at most.
const MAX_UNPUBLISHED_MUTES: usize = 16;

/// Changes the room asks of a participant's subscribe transport. Sent on an unbounded channel:
/// there are never more than the room's publications, and losing one would leave a subscriber
/// with a dead or missing media section.
#[derive(Debug)]
pub enum RoomCommand {
    /// Forward this publication to the participant.
    Subscribe(Publication),
    /// Stop forwarding it.
    Unsubscribe(PublicationId),
}

/// What the participant's own socket asks of its subscribe transport.
#[derive(Debug)]
pub enum NegotiatorCommand {
    /// The participant's answer to the outstanding offer.
    Answer(String),
    /// A candidate the participant trickled for its subscribe connection.
    Candidate(RTCIceCandidateInit),
}

struct Published {
    publication: Publication,
    track_id: String,
}

struct Member {
    id: ParticipantId,
    name: String,
    outbound: Outbound,
    negotiator: mpsc::UnboundedSender<RoomCommand>,
    published: Vec<Published>,
    /// Track id -> muted, as last told by the participant (also before its media arrives).
    muted: HashMap<String, bool>,
}

#[derive(Default)]
struct RoomState {
    members: Vec<Member>,
}

/// One named group of participants.
pub struct Room {
    name: String,
    state: Mutex<RoomState>,
}

/// Why a join was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinError {
    /// Someone in the room has this name (case-insensitively).
    NameTaken,
    /// The room is at its limit.
    RoomFull(usize),
}

/// What a new participant needs to know.
pub struct Joined {
    /// The room.
    pub room: Arc<Room>,
    /// Everything the others publish now.
    pub publications: Vec<Publication>,
}

fn send(outbound: &Outbound, message: ServerMessage) {
    outbound.send(message);
}

impl Room {
    fn lock(&self) -> MutexGuard<'_, RoomState> {
        // A panic while holding this lock is a bug; the state is still consistent enough to use.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The room's name as first created.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records a publication that started and subscribes every other member to it.
    pub fn add_publication(&self, participant: &ParticipantId, publication: Publication) {
        let mut state = self.lock();
        let mut notify = Vec::new();
        for member in &mut state.members {
            if &member.id == participant {
                let track_id = publication.track_id.clone();
                member.published.push(Published {
                    publication: publication.clone(),
                    track_id,
                });
            } else {
                notify.push(member.negotiator.clone());
            }
        }
        drop(state);
        for negotiator in notify {
            let _ = negotiator.send(RoomCommand::Subscribe(publication.clone()));
        }
    }

    /// Forgets a publication that ended and unsubscribes every other member from it.
    pub fn remove_publication(&self, participant: &ParticipantId, publication: &PublicationId) {
        let mut state = self.lock();
        let mut notify = Vec::new();
        for member in &mut state.members {
            if &member.id == participant {
                member
                    .published
                    .retain(|p| &p.publication.id != publication);
            } else {
                notify.push(member.negotiator.clone());
            }
        }
        drop(state);
        for negotiator in notify {
            let _ = negotiator.send(RoomCommand::Unsubscribe(publication.clone()));
        }
    }

    /// Records a mute change and tells the others when the track is being published.
    pub fn set_muted(&self, participant: &ParticipantId, track_id: &str, muted: bool) {
        let mut state = self.lock();
        let Some(member) = state.members.iter_mut().find(|m| &m.id == participant) else {
            return;
        };
        let published = member.published.iter().find(|p| p.track_id == track_id);
        if published.is_none()
            && !member.muted.contains_key(track_id)
            && member.muted.len() >= MAX_UNPUBLISHED_MUTES
        {
            return; // A client naming ever new tracks must not grow this map without bound.
        }
        member.muted.insert(track_id.to_owned(), muted);
        let Some(published) = member.published.iter().find(|p| p.track_id == track_id) else {
            return;
        };
        let message = ServerMessage::Mute {
            peer_id: participant.to_string(),
            publication_id: published.publication.id.to_string(),
            source: published.publication.source.as_str(),
            muted,
        };
        for other in state.members.iter().filter(|m| &m.id != participant) {
            send(&other.outbound, message.clone());
        }
    }

    fn is_muted(&self, publication: &Publication) -> bool {
        let state = self.lock();
        state
            .members
            .iter()
            .find(|m| m.id == publication.participant)
            .and_then(|m| m.muted.get(&publication.track_id).copied())
            .unwrap_or(false)
    }

    /// True when `peer` is a member of this room.
    pub fn has_member(&self, peer: &str) -> bool {
        self.lock().members.iter().any(|m| m.id.as_str() == peer)
    }

    /// A snapshot for `/api/rooms`.
    pub fn snapshot(&self) -> RoomSnapshot {
        let state = self.lock();
        let participants: Vec<ParticipantSnapshot> = state
            .members
            .iter()
            .map(|member| ParticipantSnapshot {
                participant_id: member.id.to_string(),
                name: member.name.clone(),
                publications: member
                    .published
                    .iter()
                    .map(|p| {
                        let stats = &p.publication.stats;
                        PublicationSnapshot {
                            publication_id: p.publication.id.to_string(),
                            kind: p.publication.kind.as_str(),
                            source: p.publication.source.as_str(),
                            codec: p.publication.codec.mime_type.clone(),
                            muted: member.muted.get(&p.track_id).copied().unwrap_or(false),
                            received_packets: stats.received_packets.load(RELAXED),
                            forwarded_packets: stats.forwarded_packets.load(RELAXED),
                            forwarded_bytes: stats.forwarded_bytes.load(RELAXED),
                            dropped_packets: stats.dropped_packets.load(RELAXED),
                        }
                    })
                    .collect(),
            })
            .collect();
        let (forwarded_packets, forwarded_bytes) = participants
            .iter()
            .flat_map(|p| &p.publications)
            .fold((0, 0), |(packets, bytes), p| {
                (packets + p.forwarded_packets, bytes + p.forwarded_bytes)
            });
        RoomSnapshot {
            name: self.name.clone(),
            mode: "sfu",
            participants,
            forwarded_packets,
            forwarded_bytes,
        }
    }
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

/// A room as `/api/rooms` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomSnapshot {
    /// Its name.
    pub name: String,
    /// `sfu`.
    pub mode: &'static str,
    /// Who is in.
    pub participants: Vec<ParticipantSnapshot>,
    /// Packets forwarded for the room's live publications.
    pub forwarded_packets: u64,
    /// Bytes forwarded for the room's live publications.
    pub forwarded_bytes: u64,
}

/// A participant as `/api/rooms` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantSnapshot {
    /// Its id.
    pub participant_id: String,
    /// Its display name.
    pub name: String,
    /// What it publishes.
    pub publications: Vec<PublicationSnapshot>,
}

/// A publication as `/api/rooms` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublicationSnapshot {
    /// Its id.
    pub publication_id: String,
    /// `audio` or `video`.
    pub kind: &'static str,
    /// `microphone`, `camera` or `screen`.
    pub source: &'static str,
    /// MIME type of its codec.
    pub codec: String,
    /// Muted by its publisher.
    pub muted: bool,
    /// Packets received from the publisher.
    pub received_packets: u64,
    /// Packets handed to subscribers.
    pub forwarded_packets: u64,
    /// Bytes handed to subscribers.
    pub forwarded_bytes: u64,
    /// Packets dropped for slow subscribers.
    pub dropped_packets: u64,
}

/// Every room, by case-folded name.
pub struct RoomRegistry {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    max_participants: usize,
}

impl RoomRegistry {
    /// An empty registry whose rooms admit `max_participants` each.
    pub fn new(max_participants: usize) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            max_participants,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Room>>> {
        self.rooms
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Adds a participant, creating the room on first join, and tells the others. `joined`
    /// builds the participant's `joined` message from the room's name and the others; it is
    /// queued before anything else about the room can reach the participant.
    pub fn join(
        &self,
        room_name: &str,
        id: &ParticipantId,
        name: &str,
        outbound: Outbound,
        negotiator: mpsc::UnboundedSender<RoomCommand>,
        joined: impl FnOnce(&str, Vec<PeerInfo>) -> ServerMessage,
    ) -> Result<Joined, JoinError> {
        let mut rooms = self.lock();
        let room = rooms
            .entry(room_name.to_lowercase())
            .or_insert_with(|| {
                Arc::new(Room {
                    name: room_name.to_owned(),
                    state: Mutex::new(RoomState::default()),
                })
            })
            .clone();
        let mut state = room.lock();
        let refused = if state
            .members
            .iter()
            .any(|m| m.name.to_lowercase() == name.to_lowercase())
        {
            Some(JoinError::NameTaken)
        } else if state.members.len() >= self.max_participants {
            Some(JoinError::RoomFull(self.max_participants))
        } else {
            None
        };
        if let Some(refused) = refused {
            if state.members.is_empty() {
                drop(state);
                rooms.remove(&room_name.to_lowercase());
            }
            return Err(refused);
        }
        let peers = state
            .members
            .iter()
            .map(|m| PeerInfo {
                peer_id: m.id.to_string(),
                name: m.name.clone(),
            })
            .collect();
        send(&outbound, joined(&room.name, peers));
        let publications = state
            .members
            .iter()
            .flat_map(|m| m.published.iter().map(|p| p.publication.clone()))
            .collect();
        let announcement = ServerMessage::PeerJoined {
            peer_id: id.to_string(),
            name: name.to_owned(),
        };
        for member in &state.members {
            send(&member.outbound, announcement.clone());
        }
        state.members.push(Member {
            id: id.clone(),
            name: name.to_owned(),
            outbound,
            negotiator,
            published: Vec::new(),
            muted: HashMap::new(),
        });
        drop(state);
        Ok(Joined { room, publications })
    }

    /// Removes a participant, tells the others, and removes the room when it is empty.
    pub fn leave(&self, room: &Arc<Room>, id: &ParticipantId) {
        let mut rooms = self.lock();
        let mut state = room.lock();
        let Some(index) = state.members.iter().position(|m| &m.id == id) else {
            return;
        };
        let member = state.members.remove(index);
        let announcement = ServerMessage::PeerLeft {
            peer_id: id.to_string(),
        };
        for other in &state.members {
            send(&other.outbound, announcement.clone());
            for published in &member.published {
                let _ = other
                    .negotiator
                    .send(RoomCommand::Unsubscribe(published.publication.id.clone()));
            }
        }
        if state.members.is_empty() {
            drop(state);
            let key = room.name.to_lowercase();
            if rooms.get(&key).is_some_and(|r| Arc::ptr_eq(r, room)) {
                rooms.remove(&key);
            }
        }
    }

    /// Every room, for `/api/rooms` and `/metrics`.
    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.lock().values().cloned().collect()
    }
}

/// Owns one participant's subscribe transport and serialises its offers: one offer at a time,
/// changes that arrive while an answer is awaited go into the next offer. Ends when the
/// participant's socket task drops its command sender, and closes the transport.
pub async fn run_negotiator(
    mut transport: SubscribeTransport,
    mut commands: mpsc::Receiver<NegotiatorCommand>,
    mut room_commands: mpsc::UnboundedReceiver<RoomCommand>,
    initial: Vec<Publication>,
    outbound: Outbound,
    room: Arc<Room>,
) {
    let mut awaiting_answer = false;
    let mut dirty = false;
    for publication in initial {
        dirty |= subscribe(&mut transport, &publication).await;
    }
    loop {
        if dirty && !awaiting_answer {
            match transport.create_offer().await {
                Ok((sdp, offered)) => {
                    let subscriptions = offered
                        .into_iter()
                        .map(|o| SubscriptionInfo {
                            muted: room.is_muted(&o.publication),
                            mid: o.mid,
                            publication_id: o.publication.id.to_string(),
                            peer_id: o.publication.participant.to_string(),
                            kind: o.publication.kind.as_str(),
                            source: o.publication.source.as_str(),
                        })
                        .collect();
                    let offer = ServerMessage::Offer {
                        peer_id: crate::protocol::SFU_PEER,
                        transport: TransportName::Subscribe,
                        sdp,
                        subscriptions,
                    };
                    // Not sent means the participant is being disconnected.
                    if outbound.send(offer) {
                        awaiting_answer = true;
                        dirty = false;
                    }
                }
                Err(err) => tracing::error!(%err, "subscribe offer failed"),
            }
        }
        tokio::select! {
            command = commands.recv() => match command {
                Some(NegotiatorCommand::Answer(sdp)) => {
                    if !awaiting_answer {
                        send(
                            &outbound,
                            ServerMessage::error(
                                ErrorCode::InvalidState,
                                "no subscribe offer is waiting for an answer",
                                Some("answer"),
                            ),
                        );
                        continue;
                    }
                    match transport.apply_answer(sdp).await {
                        Ok(()) => awaiting_answer = false,
                        Err(err) => send(
                            &outbound,
                            ServerMessage::error(ErrorCode::InvalidSdp, err.to_string(), Some("answer")),
                        ),
                    }
                }
                Some(NegotiatorCommand::Candidate(candidate)) => {
                    if let Err(err) = transport.add_ice_candidate(candidate).await {
                        send(
                            &outbound,
                            ServerMessage::error(
                                ErrorCode::BadRequest,
                                format!("candidate refused: {err}"),
                                Some("ice-candidate"),
                            ),
                        );
                    }
                }
                None => break,
            },
            Some(first) = room_commands.recv() => {
                // Fold everything already queued into the next offer.
                let mut next = Some(first);
                while let Some(command) = next.take().or_else(|| room_commands.try_recv().ok()) {
                    match command {
                        RoomCommand::Subscribe(publication) => {
                            dirty |= subscribe(&mut transport, &publication).await;
                        }
                        RoomCommand::Unsubscribe(publication) => {
                            if transport.is_subscribed(&publication) {
                                if let Err(err) = transport.unsubscribe(&publication).await {
                                    tracing::warn!(%err, %publication, "unsubscribe failed");
                                }
                                dirty = true;
                            }
                        }
                    }
                }
            }
        }
    }
    transport.close().await;
}

/// Subscribes to `publication`; true when the transport changed.
async fn subscribe(transport: &mut SubscribeTransport, publication: &Publication) -> bool {
    match transport.subscribe(publication).await {
        Ok(()) => true,
        Err(SfuError::PublicationEnded) => false,
        Err(err) => {
            tracing::warn!(%err, publication = %publication.id, "subscribe failed");
            false
        }
    }
}
