//! Rooms: who is in, what each publishes, which Mode the room is in, and who must be told.
//! Rooms make decisions and send messages; they never touch packets. The registry lock is taken
//! only on join and leave.
//!
//! The Mode policy: a room of at most `mesh_max` participants is a mesh (the server only relays
//! signaling), a larger one uses the SFU. A change is announced as `mode`/`switching`; every
//! participant who was in the room then brings up the new connections while the old ones keep
//! playing and reports `ready` once it receives everyone through them; then `mode`/`settled` tells
//! everyone to close the old connections (make before break). Going back to mesh waits until the
//! room has stayed small for the hold time, so a quick leave and rejoin switches nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::Serialize;
use sfu::{ParticipantId, Publication, PublicationId, SubscribeTransport};
use sfu::{RTCIceCandidateInit, SfuError};
use tokio::sync::{Notify, mpsc};

use crate::protocol::{
    ChatMessage, ErrorCode, Mode, ModePhase, PeerInfo, ServerMessage, SfuLinkId, SubscriptionInfo,
    TransportName,
};

/// Chat messages a room keeps for those who join later.
pub const CHAT_HISTORY: usize = 100;
/// Chat messages a whole room may send in a burst, and per second after it.
pub const ROOM_CHAT_BURST: f64 = 30.0;
/// See [`ROOM_CHAT_BURST`].
pub const ROOM_CHAT_PER_SECOND: f64 = 5.0;

/// A switch whose participants have not all reported `ready` by then settles anyway, so that one
/// broken client cannot keep a room on two paths forever.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How rooms are sized and when they change Mode.
#[derive(Clone, Copy, Debug)]
pub struct RoomPolicy {
    /// Participants a room admits.
    pub max_participants: usize,
    /// Largest mesh room; 0 means always SFU.
    pub mesh_max: usize,
    /// How long an SFU room must stay at `mesh_max` or fewer before it returns to mesh.
    pub mesh_hold: Duration,
    /// How long a switch waits for every `ready`.
    pub switch_timeout: Duration,
}

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

    /// Asks the participant's session to end (it was replaced by a resumed one).
    pub fn disconnect(&self) {
        self.kick.notify_one();
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
    /// Stop or resume forwarding one publication to the participant.
    Pause(PublicationId, bool),
}

struct Published {
    publication: Publication,
    track_id: String,
}

struct Member {
    id: ParticipantId,
    name: String,
    /// The secret with which a reconnecting client replaces this member.
    resume_token: String,
    /// The token's user id: only the same user may resume this member.
    user: String,
    outbound: Outbound,
    /// Set while the participant has SFU connections.
    negotiator: Option<mpsc::UnboundedSender<RoomCommand>>,
    published: Vec<Published>,
    /// Track id -> muted, as last told by the participant (also before its media arrives).
    muted: HashMap<String, bool>,
}

struct RoomState {
    members: Vec<Member>,
    mode: Mode,
    /// Present while a switch to `mode` waits for `ready` reports.
    switch: Option<Switch>,
    /// Bumped by every switch, so that a stale timeout settles nothing.
    switch_generation: u64,
    /// Bumped whenever a pending return to mesh is cancelled or scheduled.
    hold_generation: u64,
    hold_pending: bool,
    switches_to_sfu: u64,
    switches_to_mesh: u64,
    /// Set when a mesh could not connect: the room stays in SFU mode for as long as it exists.
    mesh_blocked: bool,
    /// The latest chat messages, oldest first, at most [`CHAT_HISTORY`].
    chat: VecDeque<ChatMessage>,
    /// What the whole room may chat: every message goes to every member, so one budget per
    /// sender alone would let a large room fill everyone's signaling queue.
    chat_budget: crate::budget::Budget,
    chat_sent: u64,
}

/// A switch in progress.
struct Switch {
    /// Participants who were in the room when it began and have not reported `ready`.
    waiting: HashSet<ParticipantId>,
}

/// One named group of participants.
pub struct Room {
    name: String,
    policy: RoomPolicy,
    /// For the timers the room starts; they must not keep it alive.
    this: Weak<Room>,
    state: Mutex<RoomState>,
}

/// Why a message could not be relayed to another participant.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayError {
    /// The room is settled in SFU mode: media is negotiated with `sfu`.
    SfuMode,
    /// Nobody with this id is in the room.
    UnknownPeer,
    /// The sender named itself.
    ToSelf,
}
/// Who is joining.
#[derive(Clone, Copy, Debug)]
pub struct Joiner<'a> {
    /// The new participant's id.
    pub id: &'a ParticipantId,
    /// Its display name.
    pub name: &'a str,
    /// The token's user id.
    pub user: &'a str,
    /// The `resumeToken` it presented, if any.
    pub resume: Option<&'a str>,
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
    /// Its mode when the participant entered.
    pub mode: Mode,
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn send(outbound: &Outbound, message: ServerMessage) {
    outbound.send(message);
}

impl Member {
    fn command(&self, command: RoomCommand) {
        if let Some(negotiator) = &self.negotiator {
            let _ = negotiator.send(command);
        }
    }
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

    /// The room's mode now (the one it is switching to during a switch).
    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// Registers the participant's SFU connections; returns what the others publish now, which
    /// its negotiator must subscribe to (later publications arrive as [`RoomCommand`]s).
    pub fn attach_sfu(
        &self,
        participant: &ParticipantId,
        negotiator: mpsc::UnboundedSender<RoomCommand>,
    ) -> Vec<Publication> {
        let mut state = self.lock();
        let Some(member) = state.members.iter_mut().find(|m| &m.id == participant) else {
            return Vec::new();
        };
        member.negotiator = Some(negotiator);
        state
            .members
            .iter()
            .filter(|m| &m.id != participant)
            .flat_map(|m| m.published.iter().map(|p| p.publication.clone()))
            .collect()
    }

    /// Forgets the participant's SFU connections and unsubscribes the others from what it
    /// published through them.
    pub fn detach_sfu(&self, participant: &ParticipantId) {
        let mut state = self.lock();
        let Some(member) = state.members.iter_mut().find(|m| &m.id == participant) else {
            return;
        };
        member.negotiator = None;
        let ended: Vec<PublicationId> = member
            .published
            .drain(..)
            .map(|p| p.publication.id)
            .collect();
        for other in state.members.iter().filter(|m| &m.id != participant) {
            for publication in &ended {
                other.command(RoomCommand::Unsubscribe(publication.clone()));
            }
        }
    }

    /// Records a publication that started and subscribes every other member to it.
    pub fn add_publication(&self, participant: &ParticipantId, publication: Publication) {
        let mut state = self.lock();
        if !state.members.iter().any(|m| &m.id == participant) {
            return; // A replaced or departed member's late event.
        }
        let mut notify = Vec::new();
        for member in &mut state.members {
            if &member.id == participant {
                if member.negotiator.is_none() {
                    return; // From SFU connections already closed: it is ending.
                }
                let track_id = publication.track_id.clone();
                member.published.push(Published {
                    publication: publication.clone(),
                    track_id,
                });
            } else {
                notify.extend(member.negotiator.clone());
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
                notify.extend(member.negotiator.clone());
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
        let published = member
            .published
            .iter()
            .find(|p| p.track_id == track_id)
            .map(|p| (p.publication.id.to_string(), p.publication.source.as_str()));
        if published.is_none()
            && !member.muted.contains_key(track_id)
            && member.muted.len() >= MAX_UNPUBLISHED_MUTES
        {
            return; // A client naming ever new tracks must not grow this map without bound.
        }
        member.muted.insert(track_id.to_owned(), muted);
        let message = ServerMessage::Mute {
            peer_id: participant.to_string(),
            track_id: track_id.to_owned(),
            source: published.as_ref().map(|p| p.1),
            publication_id: published.map(|p| p.0),
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

    /// Sends `text` from `participant` to everyone in the room and keeps it for later joiners;
    /// false when the room's chat budget is spent.
    pub fn chat(&self, participant: &ParticipantId, text: String) -> bool {
        let mut state = self.lock();
        let Some(name) = state
            .members
            .iter()
            .find(|m| &m.id == participant)
            .map(|m| m.name.clone())
        else {
            return true;
        };
        if !state.chat_budget.take() {
            return false;
        }
        state.chat_sent += 1;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let message = ChatMessage {
            id: state.chat_sent,
            peer_id: participant.to_string(),
            name,
            text,
            at,
        };
        if state.chat.len() == CHAT_HISTORY {
            state.chat.pop_front();
        }
        state.chat.push_back(message.clone());
        for member in &state.members {
            send(&member.outbound, ServerMessage::Chat(message.clone()));
        }
        true
    }

    /// Takes `id` out and tells the others.
    fn remove_member(&self, state: &mut RoomState, id: &ParticipantId) {
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
                other.command(RoomCommand::Unsubscribe(published.publication.id.clone()));
            }
        }
        self.shrank(state);
    }

    /// True when `peer` is a member of this room.
    pub fn has_member(&self, peer: &str) -> bool {
        self.lock().members.iter().any(|m| m.id.as_str() == peer)
    }

    /// Hands `message` to participant `to`, when the room's peers negotiate with each other:
    /// in mesh mode, and during any switch (the mesh connections are still up).
    pub fn relay(
        &self,
        from: &ParticipantId,
        to: &str,
        message: ServerMessage,
    ) -> Result<(), RelayError> {
        if to == from.as_str() {
            return Err(RelayError::ToSelf);
        }
        let state = self.lock();
        if !state.members.iter().any(|m| &m.id == from) {
            return Err(RelayError::UnknownPeer); // The sender was replaced by a resumed join.
        }
        let target = state
            .members
            .iter()
            .find(|m| m.id.as_str() == to)
            .ok_or(RelayError::UnknownPeer)?;
        if state.mode == Mode::Sfu && state.switch.is_none() {
            return Err(RelayError::SfuMode);
        }
        send(&target.outbound, message);
        Ok(())
    }

    /// Records that `participant` receives everyone through `mode`; settles the switch when it
    /// was the last one awaited. A report for another mode or, when it names one, another switch
    /// (a switch since replaced) is stale and ignored.
    pub fn ready(&self, participant: &ParticipantId, mode: Mode, switch: Option<u64>) {
        let mut state = self.lock();
        if state.mode != mode || switch.is_some_and(|n| n != state.switch_generation) {
            return;
        }
        if let Some(switch) = &mut state.switch {
            switch.waiting.remove(participant);
        }
        self.settle_if_done(&mut state);
    }

    /// Starts a switch to `to`; `newcomer` (whose join caused it) has no old connections and is
    /// not waited for.
    fn begin_switch(&self, state: &mut RoomState, to: Mode, newcomer: Option<&ParticipantId>) {
        state.mode = to;
        state.switch_generation += 1;
        match to {
            Mode::Sfu => state.switches_to_sfu += 1,
            Mode::Mesh => state.switches_to_mesh += 1,
        }
        state.switch = Some(Switch {
            waiting: state
                .members
                .iter()
                .map(|m| m.id.clone())
                .filter(|id| Some(id) != newcomer)
                .collect(),
        });
        tracing::info!(room = %self.name, mode = to.as_str(), participants = state.members.len(), "mode switching");
        let message = ServerMessage::Mode {
            mode: to,
            phase: ModePhase::Switching,
            switch: state.switch_generation,
        };
        for member in &state.members {
            send(&member.outbound, message.clone());
        }
        let generation = state.switch_generation;
        let room = self.this.clone();
        let timeout = self.policy.switch_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(room) = room.upgrade() {
                let mut state = room.lock();
                if state.switch_generation == generation && state.switch.is_some() {
                    tracing::warn!(room = %room.name, mode = state.mode.as_str(), "mode switch timed out waiting for `ready`");
                    if state.mode == Mode::Mesh {
                        // The mesh did not come up (peers without a route to each other): the
                        // SFU connections still work, so go back to them and stay there.
                        state.mesh_blocked = true;
                        room.begin_switch(&mut state, Mode::Sfu, None);
                    } else {
                        room.settle(&mut state);
                    }
                }
            }
        });
        self.settle_if_done(state);
    }

    fn settle_if_done(&self, state: &mut RoomState) {
        let done = match &state.switch {
            Some(switch) => {
                // Someone alone has no connections to move.
                state.members.len() <= 1
                    || !state.members.iter().any(|m| switch.waiting.contains(&m.id))
            }
            None => false,
        };
        if done {
            self.settle(state);
        }
    }

    fn settle(&self, state: &mut RoomState) {
        state.switch = None;
        tracing::info!(room = %self.name, mode = state.mode.as_str(), "mode settled");
        let message = ServerMessage::Mode {
            mode: state.mode,
            phase: ModePhase::Settled,
            switch: state.switch_generation,
        };
        for member in &state.members {
            send(&member.outbound, message.clone());
        }
    }

    /// A participant's mesh connection cannot connect: the room switches to SFU and stays there.
    /// Only while the room is a mesh (or switching to one): a mesh link left over from before a
    /// switch to SFU (an offer its peer dropped on switching) says nothing about the network.
    pub fn mesh_failed(&self, participant: &ParticipantId, peer: Option<&str>) {
        let mut state = self.lock();
        if !state.members.iter().any(|m| &m.id == participant) || state.mesh_blocked {
            return;
        }
        if state.mode != Mode::Mesh {
            tracing::debug!(room = %self.name, %participant, peer, "mesh_failed outside mesh mode ignored");
            return;
        }
        tracing::warn!(room = %self.name, %participant, peer, "a mesh connection failed: the room uses the SFU from now on");
        state.mesh_blocked = true;
        if state.hold_pending {
            state.hold_pending = false;
            state.hold_generation += 1;
        }
        self.begin_switch(&mut state, Mode::Sfu, None);
    }

    /// After the room grew: switches to SFU when it outgrew mesh, and cancels a pending return
    /// to mesh.
    fn grew(&self, state: &mut RoomState, newcomer: &ParticipantId) {
        let mesh_max = self.policy.mesh_max;
        if mesh_max == 0 || state.members.len() <= mesh_max {
            return;
        }
        if state.hold_pending {
            state.hold_pending = false;
            state.hold_generation += 1;
        }
        if state.mode == Mode::Mesh {
            self.begin_switch(state, Mode::Sfu, Some(newcomer));
        }
    }

    /// After the room shrank: settles a switch that waited only for those who left, and starts
    /// the hold time of a return to mesh.
    fn shrank(&self, state: &mut RoomState) {
        self.settle_if_done(state);
        let count = state.members.len();
        let mesh_max = self.policy.mesh_max;
        if state.mode != Mode::Sfu
            || mesh_max == 0
            || state.mesh_blocked
            || count == 0
            || count > mesh_max
            || state.hold_pending
        {
            return;
        }
        state.hold_pending = true;
        state.hold_generation += 1;
        let generation = state.hold_generation;
        let room = self.this.clone();
        let hold = self.policy.mesh_hold;
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            let Some(room) = room.upgrade() else {
                return;
            };
            let mut state = room.lock();
            if state.hold_generation != generation || !state.hold_pending {
                return;
            }
            state.hold_pending = false;
            let count = state.members.len();
            if state.mode == Mode::Sfu
                && !state.mesh_blocked
                && count > 0
                && count <= room.policy.mesh_max
            {
                room.begin_switch(&mut state, Mode::Mesh, None);
            }
        });
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
            mode: state.mode.as_str(),
            switching: state.switch.is_some(),
            mesh_blocked: state.mesh_blocked,
            switches_to_sfu: state.switches_to_sfu,
            switches_to_mesh: state.switches_to_mesh,
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
    /// `mesh` or `sfu` (the mode it is switching to, during a switch).
    pub mode: &'static str,
    /// A switch waits for participants' `ready`.
    pub switching: bool,
    /// A mesh failed here: the room stays in SFU mode.
    pub mesh_blocked: bool,
    /// Switches from mesh to SFU so far.
    pub switches_to_sfu: u64,
    /// Switches from SFU to mesh so far.
    pub switches_to_mesh: u64,
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
    policy: RoomPolicy,
}

impl RoomRegistry {
    /// An empty registry whose rooms follow `policy`.
    pub fn new(policy: RoomPolicy) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            policy,
        }
    }

    /// The mode a participant joining `room_name` now would find. A guess (others may join or
    /// leave meanwhile), used to open SFU connections before joining when they will be needed.
    pub fn mode_for_join(&self, room_name: &str) -> Mode {
        let mesh_max = self.policy.mesh_max;
        if mesh_max == 0 {
            return Mode::Sfu;
        }
        let rooms = self.lock();
        match rooms.get(&room_name.to_lowercase()) {
            Some(room) => {
                let state = room.lock();
                if state.mode == Mode::Sfu || state.members.len() >= mesh_max {
                    Mode::Sfu
                } else {
                    Mode::Mesh
                }
            }
            None => Mode::Mesh,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Room>>> {
        self.rooms
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Adds a participant, creating the room on first join, and tells the others. `joined`
    /// builds the participant's `joined` message from the room's name, its mode once the
    /// participant is in, and the others; it is queued before anything else about the room can
    /// reach the participant.
    pub fn join(
        &self,
        room_name: &str,
        joiner: Joiner<'_>,
        outbound: Outbound,
        joined: impl FnOnce(&str, Mode, Vec<PeerInfo>, Vec<ChatMessage>, &str) -> ServerMessage,
    ) -> Result<Joined, JoinError> {
        let Joiner {
            id,
            name,
            user,
            resume,
        } = joiner;
        let mut rooms = self.lock();
        let policy = self.policy;
        let room = rooms
            .entry(room_name.to_lowercase())
            .or_insert_with(|| {
                Arc::new_cyclic(|this| Room {
                    name: room_name.to_owned(),
                    policy,
                    this: this.clone(),
                    state: Mutex::new(RoomState {
                        members: Vec::new(),
                        mode: if policy.mesh_max == 0 {
                            Mode::Sfu
                        } else {
                            Mode::Mesh
                        },
                        switch: None,
                        switch_generation: 0,
                        hold_generation: 0,
                        hold_pending: false,
                        switches_to_sfu: 0,
                        switches_to_mesh: 0,
                        mesh_blocked: false,
                        chat: VecDeque::new(),
                        chat_budget: crate::budget::Budget::new(
                            ROOM_CHAT_BURST,
                            ROOM_CHAT_PER_SECOND,
                        ),
                        chat_sent: 0,
                    }),
                })
            })
            .clone();
        let mut state = room.lock();
        // The same client, back before its old connection was noticed as gone.
        let ghost = resume.filter(|t| !t.is_empty()).and_then(|token| {
            state
                .members
                .iter()
                .find(|m| m.user == user && same_secret(&m.resume_token, token))
                .map(|m| m.id.clone())
        });
        let others = || {
            state
                .members
                .iter()
                .filter(|m| Some(&m.id) != ghost.as_ref())
        };
        let refused = if others().any(|m| m.name.to_lowercase() == name.to_lowercase()) {
            Some(JoinError::NameTaken)
        } else if others().count() >= policy.max_participants {
            Some(JoinError::RoomFull(policy.max_participants))
        } else {
            None
        };
        if refused.is_none()
            && let Some(ghost) = &ghost
        {
            tracing::info!(participant = %ghost, "replaced by a resumed join");
            if let Some(member) = state.members.iter().find(|m| &m.id == ghost) {
                member.outbound.disconnect();
            }
            room.remove_member(&mut state, ghost);
        }
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
        let mesh_max = policy.mesh_max;
        let mode = if state.mode == Mode::Mesh && mesh_max > 0 && state.members.len() >= mesh_max {
            Mode::Sfu // This join makes the room outgrow mesh.
        } else {
            state.mode
        };
        let chat = state.chat.iter().cloned().collect();
        let resume_token = format!("{:032x}", rand::random::<u128>());
        send(
            &outbound,
            joined(&room.name, mode, peers, chat, &resume_token),
        );
        state.members.push(Member {
            id: id.clone(),
            name: name.to_owned(),
            resume_token,
            user: user.to_owned(),
            outbound,
            negotiator: None,
            published: Vec::new(),
            muted: HashMap::new(),
        });
        // A switch is announced before the newcomer, so that nobody opens a mesh connection to
        // a participant of an SFU room.
        room.grew(&mut state, id);
        debug_assert_eq!(state.mode, mode);
        let announcement = ServerMessage::PeerJoined {
            peer_id: id.to_string(),
            name: name.to_owned(),
        };
        for member in state.members.iter().filter(|m| &m.id != id) {
            send(&member.outbound, announcement.clone());
        }
        drop(state);
        Ok(Joined { room, mode })
    }

    /// Removes a participant, tells the others, and removes the room when it is empty.
    pub fn leave(&self, room: &Arc<Room>, id: &ParticipantId) {
        let mut rooms = self.lock();
        let mut state = room.lock();
        room.remove_member(&mut state, id);
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
/// participant's socket task drops its command sender, and closes the transport. Its offers
/// carry `link`, so that one still being made when the transport closed is never sent.
pub async fn run_negotiator(
    link: SfuLinkId,
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
                            track_id: o.publication.track_id.clone(),
                            mid: o.mid,
                            publication_id: o.publication.id.to_string(),
                            peer_id: o.publication.participant.to_string(),
                            kind: o.publication.kind.as_str(),
                            source: o.publication.source.as_str(),
                        })
                        .collect();
                    let offer = ServerMessage::Offer {
                        peer_id: crate::protocol::SFU_PEER.to_owned(),
                        transport: Some(TransportName::Subscribe),
                        sdp,
                        subscriptions: Some(subscriptions),
                        tracks: None,
                        link: Some(link),
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
            // Commands first: once they are closed (the SFU connections closed), no new offer.
            biased;
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
                Some(NegotiatorCommand::Pause(publication, paused)) => {
                    // A publication that just ended has nothing left to pause: nothing to say.
                    transport.set_paused(&publication, paused).await;
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
