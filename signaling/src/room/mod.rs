//! Rooms: who is in, what each publishes, which Mode the room is in, and who must be told.
//! Rooms make decisions and send messages; they never touch packets. The registry lock is taken
//! only on join and leave.
//!
//! The Mode policy ([`mode::ModeSwitch`], a pure state machine): a room of at most `mesh_max`
//! participants is a mesh (the server only relays signaling), a larger one uses the SFU. A change
//! is announced as `mode`/`switching`; every participant who was in the room then brings up the
//! new connections while the old ones keep playing and reports `ready` once it receives everyone
//! through them; then `mode`/`settled` tells everyone to close the old connections (make before
//! break). Going back to mesh waits until the room has stayed small for the hold time, so a quick
//! leave and rejoin switches nothing. Each room has one timer task, which wakes the machine at its
//! next deadline and ends with the room.

pub mod mode;
mod negotiator;
mod snapshot;

pub use negotiator::{NegotiatorCommand, run_negotiator};
pub use snapshot::{ParticipantSnapshot, PublicationSnapshot, RoomSnapshot};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use sfu::{ParticipantId, Publication, PublicationId};
use tokio::sync::{Notify, mpsc, watch};

use self::mode::{ModeChange, ModePolicy, ModeSwitch};
use crate::auth::{Grants, same_secret};
use crate::protocol::{
    ChatMessage, ErrorCode, Mode, ModePhase, PeerInfo, ServerMessage, SpeakerInfo,
};

/// Chat messages a room keeps for those who join later.
pub const CHAT_HISTORY: usize = 100;
/// Chat messages a whole room may send in a burst, and per second after it.
pub const ROOM_CHAT_BURST: f64 = 30.0;
/// See [`ROOM_CHAT_BURST`].
pub const ROOM_CHAT_PER_SECOND: f64 = 5.0;

/// A microphone this loud or louder speaks: 127 minus 50 -dBov (speech is about -20 to -40
/// dBov, a quiet room about -60).
pub const SPEAKING_LOUDNESS: u32 = 127 - 50;
/// How often rooms work out who is speaking.
pub const SPEAKERS_INTERVAL: Duration = Duration::from_millis(300);

/// A switch whose participants have not all reported `ready` by then settles anyway, so that one
/// broken client cannot keep a room on two paths forever.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How rooms are sized and when they change Mode.
#[derive(Clone, Copy, Debug)]
pub struct RoomPolicy {
    /// Participants a room admits.
    pub max_participants: usize,
    /// Rooms the server hosts at once.
    pub max_rooms: usize,
    /// Largest mesh room; 0 means always SFU.
    pub mesh_max: usize,
    /// How long an SFU room must stay at `mesh_max` or fewer before it returns to mesh.
    pub mesh_hold: Duration,
    /// How long a switch waits for every `ready`.
    pub switch_timeout: Duration,
}

/// Which of a participant's successive sets of SFU connections a server `offer` or `answer`
/// belongs to. A session that closes its SFU connections (the room settled in mesh) and opens new
/// ones (the room switched back) drops, on the way out, a message for the old set that was still
/// being computed: applied to the new connections it would break them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SfuLinkId(pub u64);

/// What a room, a negotiator or the session itself asks of one participant's socket task. The
/// wire types stay exactly the protocol; what only the server needs to know rides here.
#[derive(Clone, Debug)]
pub enum ToSession {
    /// Send this message.
    Send(ServerMessage),
    /// The room's mode changes: open or close the participant's SFU connections, then tell the
    /// client (its next message may rely on them).
    Mode {
        /// The mode switched to or settled in.
        mode: Mode,
        /// Switching or settled.
        phase: ModePhase,
        /// The switch's number.
        switch: u64,
    },
    /// A server `offer` or `answer` made for SFU connections `link`: sent only while they are
    /// the participant's current ones.
    Sfu {
        /// The connections it was made for.
        link: SfuLinkId,
        /// The offer or answer.
        message: ServerMessage,
    },
}

/// Whether two names are the same to the eye: case does not count, nor which spaces or how
/// many.
pub fn same_name(a: &str, b: &str) -> bool {
    a.split_whitespace()
        .map(str::to_lowercase)
        .eq(b.split_whitespace().map(str::to_lowercase))
}

/// A character that shows nothing, or moves what follows: control characters, zero-width
/// spaces and joiners, direction marks and overrides, the soft hyphen, the byte-order mark.
pub fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// Messages queued toward one participant's socket. A participant whose queue overflows is
/// stuck (its socket is not being drained): it is kicked rather than silently missing messages,
/// which would break the protocol's ordering guarantees.
#[derive(Clone, Debug)]
pub struct Outbound {
    tx: mpsc::Sender<ToSession>,
    kick: Arc<Notify>,
    /// Why the session is being ended, for its close frame (the first reason given wins).
    kick_reason: Arc<Mutex<Option<Kick>>>,
}

/// Why a participant's session is ended from outside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    /// It does not read its socket: its queue of server messages is full.
    NotReading,
    /// A resumed join of the same client took its place.
    Replaced,
    /// An admin removed it from the room.
    Removed,
    /// An admin ended the room.
    RoomEnded,
}

impl Kick {
    /// The WebSocket close code (RFC 6455) and reason.
    pub fn close(self) -> (u16, &'static str) {
        match self {
            Kick::NotReading => (1008, "not reading: too many messages queued"),
            Kick::Replaced => (1000, "replaced by a resumed session"),
            Kick::Removed => (1000, "removed from the room"),
            Kick::RoomEnded => (1000, "the room was ended"),
        }
    }

    /// The `error` the client is sent before the close.
    pub fn error(self) -> (ErrorCode, &'static str) {
        match self {
            Kick::NotReading => (
                ErrorCode::RateLimited,
                "more than 1024 server messages were waiting unread: disconnected",
            ),
            Kick::Replaced => (
                ErrorCode::Replaced,
                "a newer connection of yours resumed this session",
            ),
            Kick::Removed => (ErrorCode::Removed, "an admin removed you from the room"),
            Kick::RoomEnded => (ErrorCode::RoomEnded, "an admin ended the room"),
        }
    }
}

impl Outbound {
    /// A queue of `capacity` entries and its receiving end.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<ToSession>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Self {
                tx,
                kick: Arc::new(Notify::new()),
                kick_reason: Arc::default(),
            },
            rx,
        )
    }

    /// Queues `message` for the client; false (and the participant kicked) when the queue is full.
    pub fn send(&self, message: ServerMessage) -> bool {
        self.queue(ToSession::Send(message))
    }

    /// Queues an entry; false (and the participant kicked) when the queue is full.
    pub fn queue(&self, entry: ToSession) -> bool {
        match self.tx.try_send(entry) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("a participant's signaling queue is full: disconnecting it");
                self.end(Kick::NotReading);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the participant's session to end (it was replaced by a resumed one).
    pub fn disconnect(&self) {
        self.end(Kick::Replaced);
    }

    /// Asks the participant's session to end, saying why.
    pub fn end(&self, why: Kick) {
        if let Ok(mut reason) = self.kick_reason.lock() {
            reason.get_or_insert(why);
        }
        self.kick.notify_one();
    }

    /// Completes when the participant must be disconnected, with the reason.
    pub async fn kicked(&self) -> Kick {
        self.kick.notified().await;
        self.kick_reason
            .lock()
            .ok()
            .and_then(|reason| *reason)
            .unwrap_or(Kick::NotReading)
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
    /// Its relay data channel, while it has SFU connections: where data others relay to it goes.
    data_relay: Option<sfu::relay::DataRelay>,
    published: Vec<Published>,
    /// Track id -> muted, as last told by the participant (also before its media arrives).
    muted: HashMap<String, bool>,
    /// What its token allows: one denied subscribing is never subscribed to anything.
    grants: Grants,
}

struct RoomState {
    members: Vec<Member>,
    mode: ModeSwitch,
    /// The last `speakers` list sent, in order.
    speakers: Vec<ParticipantId>,
    /// The latest chat messages, oldest first, at most [`CHAT_HISTORY`].
    chat: VecDeque<ChatMessage>,
    /// What the whole room may chat: every message goes to every member, so one budget per
    /// sender alone would let a large room fill everyone's signaling queue.
    chat_budget: crate::budget::Budget,
    chat_sent: u64,
}

/// One named group of participants.
pub struct Room {
    name: String,
    state: Mutex<RoomState>,
    /// The mode machine's next deadline, for the room's timer task (which ends when this
    /// sender is dropped with the room).
    deadline: watch::Sender<Option<Instant>>,
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
    /// What its token allows.
    pub grants: Grants,
}

/// Why a join was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinError {
    /// Someone in the room has this name (case-insensitively).
    NameTaken,
    /// The room is at its limit.
    RoomFull(usize),
    /// The server hosts its limit of rooms and this one is not open.
    TooManyRooms(usize),
}

/// What a new participant needs to know.
pub struct Joined {
    /// The room.
    pub room: Arc<Room>,
    /// Its mode when the participant entered.
    pub mode: Mode,
}

/// Wakes the room's mode machine at each deadline it names; ends when the room is dropped.
async fn run_timer(room: Weak<Room>, mut deadlines: watch::Receiver<Option<Instant>>) {
    loop {
        let next = *deadlines.borrow_and_update();
        let changed = match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {
                        let Some(room) = room.upgrade() else { return };
                        room.tick(Instant::now());
                        continue;
                    }
                    changed = deadlines.changed() => changed,
                }
            }
            None => deadlines.changed().await,
        };
        if changed.is_err() {
            return; // The room is gone.
        }
    }
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
    /// A new, empty room, with its timer task.
    fn new(name: &str, policy: RoomPolicy) -> Arc<Self> {
        let (deadline, deadlines) = watch::channel(None);
        let room = Arc::new(Room {
            name: name.to_owned(),
            state: Mutex::new(RoomState {
                members: Vec::new(),
                speakers: Vec::new(),
                mode: ModeSwitch::new(ModePolicy {
                    mesh_max: policy.mesh_max,
                    mesh_hold: policy.mesh_hold,
                    switch_timeout: policy.switch_timeout,
                }),
                chat: VecDeque::new(),
                chat_budget: crate::budget::Budget::new(ROOM_CHAT_BURST, ROOM_CHAT_PER_SECOND),
                chat_sent: 0,
            }),
            deadline,
        });
        tokio::spawn(run_timer(Arc::downgrade(&room), deadlines));
        room
    }

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
        self.lock().mode.mode()
    }

    /// Everyone in the room, for the mode machine.
    fn member_ids(state: &RoomState) -> Vec<ParticipantId> {
        state.members.iter().map(|m| m.id.clone()).collect()
    }

    /// Tells every member about each change of mode, and sets the timer to the machine's next
    /// deadline.
    fn announce(&self, state: &RoomState, changes: Vec<ModeChange>) {
        for change in changes {
            let (mode, phase, switch) = match change {
                ModeChange::Switching { mode, switch } => {
                    tracing::info!(room = %self.name, mode = mode.as_str(), participants = state.members.len(), "mode switching");
                    (mode, ModePhase::Switching, switch)
                }
                ModeChange::Settled { mode, switch } => {
                    tracing::info!(room = %self.name, mode = mode.as_str(), "mode settled");
                    (mode, ModePhase::Settled, switch)
                }
            };
            for member in &state.members {
                member.outbound.queue(ToSession::Mode {
                    mode,
                    phase,
                    switch,
                });
            }
        }
        let next = state.mode.next_deadline();
        self.deadline.send_if_modified(|deadline| {
            let changed = *deadline != next;
            *deadline = next;
            changed
        });
    }

    /// The room's timer reached a deadline of the mode machine.
    fn tick(&self, now: Instant) {
        let mut state = self.lock();
        if state.mode.switch_overdue(now) {
            tracing::warn!(room = %self.name, mode = state.mode.mode().as_str(), "mode switch timed out waiting for `ready`");
        }
        let members = Self::member_ids(&state);
        let changes = state.mode.tick(&members, now);
        self.announce(&state, changes);
    }

    /// Registers the participant's SFU connections; returns what the others publish now, which
    /// its negotiator must subscribe to (later publications arrive as [`RoomCommand`]s).
    pub fn attach_sfu(
        &self,
        participant: &ParticipantId,
        negotiator: mpsc::UnboundedSender<RoomCommand>,
        data_relay: sfu::relay::DataRelay,
    ) -> Vec<Publication> {
        let mut state = self.lock();
        let Some(member) = state.members.iter_mut().find(|m| &m.id == participant) else {
            return Vec::new();
        };
        member.negotiator = Some(negotiator);
        member.data_relay = Some(data_relay);
        if !member.grants.subscribe {
            return Vec::new();
        }
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
        member.data_relay = None;
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

    /// Hands data one member relayed (files in an SFU room) to the member it names, when that
    /// one is in this room, is not the sender and has SFU connections; gives it back otherwise.
    /// `sender` is the sender's own relay, for notices.
    #[allow(clippy::result_large_err)]
    pub fn relay_data(
        &self,
        data: sfu::relay::RelayedData,
        sender: &sfu::relay::DataRelay,
    ) -> Result<(), sfu::relay::RelayedData> {
        let relay = {
            let state = self.lock();
            state
                .members
                .iter()
                .find(|m| m.id.as_str() == data.to && m.id != data.from)
                .and_then(|m| m.data_relay.clone())
        };
        match relay {
            Some(relay) => {
                relay.deliver(data, sender.clone());
                Ok(())
            }
            None => Err(data),
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
            } else if member.grants.subscribe {
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
        self.mute_and_tell(participant.as_str(), track_id, muted, false);
    }

    /// An admin mutes a participant's track: everyone is told, the participant too (its client
    /// turns the track off, and its user may turn it on again). False when there is no such
    /// participant.
    pub fn mute_by_admin(&self, participant: &str, track_id: &str) -> bool {
        self.mute_and_tell(participant, track_id, true, true)
    }

    fn mute_and_tell(&self, participant: &str, track_id: &str, muted: bool, to_self: bool) -> bool {
        let mut state = self.lock();
        let Some(member) = state
            .members
            .iter_mut()
            .find(|m| m.id.as_str() == participant)
        else {
            return false;
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
            return false; // A client naming ever new tracks must not grow this map without bound.
        }
        member.muted.insert(track_id.to_owned(), muted);
        let message = ServerMessage::Mute {
            peer_id: participant.to_owned(),
            track_id: track_id.to_owned(),
            source: published.as_ref().map(|p| p.1),
            publication_id: published.map(|p| p.0),
            muted,
        };
        for other in state
            .members
            .iter()
            .filter(|m| to_self || m.id.as_str() != participant)
        {
            send(&other.outbound, message.clone());
        }
        true
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
        let members = Self::member_ids(state);
        let changes = state.mode.left(&members, Instant::now());
        self.announce(state, changes);
    }

    /// Works out who is speaking from the microphones' loudness and tells everyone when the
    /// list (who, in which order) changed since the last time.
    pub fn update_speakers(&self) {
        let mut state = self.lock();
        let mut speaking: Vec<(ParticipantId, u32)> = state
            .members
            .iter()
            .flat_map(|member| {
                member
                    .published
                    .iter()
                    .filter(|p| p.publication.source == sfu::Source::Microphone)
                    .filter(|p| !member.muted.get(&p.track_id).copied().unwrap_or(false))
                    .map(|p| {
                        (
                            member.id.clone(),
                            p.publication.stats.loudness.load(Ordering::Relaxed),
                        )
                    })
            })
            .filter(|(_, loudness)| *loudness >= SPEAKING_LOUDNESS)
            .collect();
        speaking.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        speaking.dedup_by(|a, b| a.0 == b.0);
        let order: Vec<ParticipantId> = speaking.iter().map(|(id, _)| id.clone()).collect();
        if order == state.speakers {
            return;
        }
        state.speakers = order;
        let message = ServerMessage::Speakers {
            speakers: speaking
                .into_iter()
                .map(|(id, loudness)| SpeakerInfo {
                    peer_id: id.to_string(),
                    level: (loudness - SPEAKING_LOUDNESS) as f32 / (127 - SPEAKING_LOUDNESS) as f32,
                })
                .collect(),
        };
        for member in &state.members {
            send(&member.outbound, message.clone());
        }
    }

    /// Who speaks loudest now, if anyone.
    pub fn top_speaker(&self) -> Option<ParticipantId> {
        self.lock().speakers.first().cloned()
    }

    /// How many participants are in the room now.
    pub fn member_count(&self) -> usize {
        self.lock().members.len()
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
        if state.mode.mode() == Mode::Sfu && !state.mode.switching() {
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
        let members = Self::member_ids(&state);
        let changes = state.mode.ready(&members, participant, mode, switch);
        self.announce(&state, changes);
    }

    /// A participant's mesh connection cannot connect: the room switches to SFU and stays there.
    /// Only while the room is a mesh (or switching to one): a mesh link left over from before a
    /// switch to SFU (an offer its peer dropped on switching) says nothing about the network.
    pub fn mesh_failed(&self, participant: &ParticipantId, peer: Option<&str>) {
        let mut state = self.lock();
        if !state.members.iter().any(|m| &m.id == participant) {
            return;
        }
        let members = Self::member_ids(&state);
        match state.mode.mesh_failed(&members, Instant::now()) {
            None => {
                tracing::debug!(room = %self.name, %participant, peer, "mesh_failed outside mesh mode ignored");
            }
            Some(changes) => {
                if !changes.is_empty() {
                    tracing::warn!(room = %self.name, %participant, peer, "a mesh connection failed: the room uses the SFU from now on");
                }
                self.announce(&state, changes);
            }
        }
    }
}

/// Every room, by case-folded name.
pub struct RoomRegistry {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    policy: RoomPolicy,
    /// Mode switches (to SFU, to mesh) of rooms that have closed: with the open rooms' own, the
    /// server's totals. Changed only under `rooms`' lock, so a total read under it is whole.
    closed_switches: [AtomicU64; 2],
}

impl RoomRegistry {
    /// An empty registry whose rooms follow `policy`.
    pub fn new(policy: RoomPolicy) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            policy,
            closed_switches: Default::default(),
        }
    }

    /// The mode a participant with `grants` joining `room_name` now would find. A guess (others
    /// may join or leave meanwhile), used to open SFU connections before joining when they will
    /// be needed.
    pub fn mode_for_join(&self, room_name: &str, grants: Grants) -> Mode {
        let mesh_max = self.policy.mesh_max;
        if mesh_max == 0 {
            return Mode::Sfu;
        }
        let rooms = self.lock();
        match rooms.get(&room_name.to_lowercase()) {
            Some(room) => {
                let state = room.lock();
                state
                    .mode
                    .mode_for_newcomer(state.members.len(), grants.needs_sfu())
            }
            None if grants.needs_sfu() => Mode::Sfu,
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
            grants,
        } = joiner;
        let mut rooms = self.lock();
        let policy = self.policy;
        let key = room_name.to_lowercase();
        if !rooms.contains_key(&key) && rooms.len() >= policy.max_rooms {
            return Err(JoinError::TooManyRooms(policy.max_rooms));
        }
        let room = rooms
            .entry(room_name.to_lowercase())
            .or_insert_with(|| Room::new(room_name, policy))
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
        let refused = if others().any(|m| same_name(&m.name, name)) {
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
        let mode = state
            .mode
            .mode_for_newcomer(state.members.len(), grants.needs_sfu());
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
            data_relay: None,
            published: Vec::new(),
            muted: HashMap::new(),
            grants,
        });
        // A switch is announced before the newcomer, so that nobody opens a mesh connection to
        // a participant of an SFU room.
        let members = Room::member_ids(&state);
        let changes = state
            .mode
            .joined(&members, id, grants.needs_sfu(), Instant::now());
        room.announce(&state, changes);
        debug_assert_eq!(state.mode.mode(), mode);
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
            let (to_sfu, to_mesh) = state.mode.switch_counts();
            drop(state);
            let key = room.name.to_lowercase();
            if rooms.get(&key).is_some_and(|r| Arc::ptr_eq(r, room)) {
                rooms.remove(&key);
                self.closed_switches[0].fetch_add(to_sfu, Ordering::Relaxed);
                self.closed_switches[1].fetch_add(to_mesh, Ordering::Relaxed);
            }
        }
    }

    /// Mode switches since the server started, to SFU and to mesh, of every room open or closed.
    pub fn switch_totals(&self) -> (u64, u64) {
        let rooms = self.lock();
        rooms.values().fold(
            (
                self.closed_switches[0].load(Ordering::Relaxed),
                self.closed_switches[1].load(Ordering::Relaxed),
            ),
            |(to_sfu, to_mesh), room| {
                let (sfu, mesh) = room.lock().mode.switch_counts();
                (to_sfu + sfu, to_mesh + mesh)
            },
        )
    }

    /// Ends every session in `room_name` (an admin action); false when there is no such room.
    /// Each member leaves as its session closes.
    pub fn end_room(&self, room_name: &str) -> bool {
        let Some(room) = self.lock().get(&room_name.to_lowercase()).cloned() else {
            return false;
        };
        for member in &room.lock().members {
            member.outbound.end(Kick::RoomEnded);
        }
        true
    }

    /// Ends the session of participant `id` in `room_name` (an admin action); false when the
    /// room has no such participant.
    pub fn remove_participant(&self, room_name: &str, id: &str) -> bool {
        let Some(room) = self.lock().get(&room_name.to_lowercase()).cloned() else {
            return false;
        };
        let state = room.lock();
        let Some(member) = state.members.iter().find(|m| m.id.as_str() == id) else {
            return false;
        };
        member.outbound.end(Kick::Removed);
        true
    }

    /// Mutes a participant's track in `room_name` (an admin action); false when the room has no
    /// such participant.
    pub fn mute_by_admin(&self, room_name: &str, participant: &str, track_id: &str) -> bool {
        let Some(room) = self.lock().get(&room_name.to_lowercase()).cloned() else {
            return false;
        };
        room.mute_by_admin(participant, track_id)
    }

    /// Whether a participant of `user` (the token's user id) is in `room_name` now.
    pub fn has_user(&self, room_name: &str, user: &str) -> bool {
        let Some(room) = self.lock().get(&room_name.to_lowercase()).cloned() else {
            return false;
        };
        room.lock().members.iter().any(|m| m.user == user)
    }

    /// Whether `room_name` is open here.
    pub fn contains(&self, room_name: &str) -> bool {
        self.lock().contains_key(&room_name.to_lowercase())
    }

    /// Participants in every room here.
    pub fn participant_count(&self) -> usize {
        self.rooms().iter().map(|room| room.member_count()).sum()
    }

    /// Tells everyone in `room_name` to rejoin at `url` (another node of the cluster); how many
    /// were told. They stay until they leave: a client that ignores it keeps its call here.
    pub fn move_room(&self, room_name: &str, url: &str) -> usize {
        let Some(room) = self.lock().get(&room_name.to_lowercase()).cloned() else {
            return 0;
        };
        let state = room.lock();
        for member in &state.members {
            member.outbound.send(ServerMessage::Moved {
                url: url.to_owned(),
            });
        }
        state.members.len()
    }

    /// Every room, for `/api/rooms` and `/metrics`.
    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn names_that_look_alike_are_the_same_and_invisible_characters_are_found() {
        assert!(same_name("Alice", "alice"));
        assert!(same_name("Alice  Smith", "alice\u{00A0}smith"));
        assert!(same_name(" Ann\u{3000}Lee ", "ann lee"));
        assert!(!same_name("Al ice", "Alice"));
        assert!(!same_name("Alice", "Alicia"));
        for c in [
            '\u{200B}', '\u{202E}', '\u{FEFF}', '\u{0007}', '\u{2066}', '\u{00AD}',
        ] {
            assert!(invisible(c), "{:?}", c);
        }
        assert!(!"Zoë Ørsted 李".chars().any(invisible));
    }
}
