//! The lobby: who is online, and calls between them. A participant whose token grants `lobby`
//! enters it by name, sees everyone else there (live), and may call one of them; the callee
//! accepts or declines, the caller may cancel, and a call nobody answers ends after
//! `call_timeout_secs`. An accepted call is a room of two (a mesh, as every small room) that
//! both sides join with a token the server mints for them; from the lobby, either may invite a
//! third person into it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use tokio::task::AbortHandle;

use crate::auth::{Grants, TokenAuthority};
use crate::protocol::{CallEndReason, PROTOCOL_VERSION, PeerInfo, ServerMessage};
use crate::room::{Outbound, RoomRegistry};

/// What names a call's room: `call-`, 16 random hex digits, and 16 of an HMAC of them keyed with
/// the lobby's secret, so only rooms this lobby made can be invited into.
const CALL_ROOM_PREFIX: &str = "call-";

/// Why the lobby refused something.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LobbyError {
    #[error("the name `{0}` is taken in the lobby")]
    NameTaken(String),
    #[error("the lobby is full ({0} people)")]
    Full(usize),
    #[error("nobody `{0}` is online")]
    UnknownPeer(String),
    #[error("you cannot call yourself")]
    CallSelf,
    #[error("you are in a ringing call already: cancel, answer or decline it first")]
    AlreadyRinging,
    #[error("no ringing call `{0}` of yours")]
    UnknownCall(String),
    #[error("only the caller cancels a call, and only the callee accepts or declines it")]
    WrongSide,
    #[error("you can invite only into a call you are in")]
    NotInRoom,
    #[error(
        "you called them {CALLS_PER_CALLEE} times in the last minute: wait before calling again"
    )]
    CallingTooOften,
    #[error("could not mint the call's tokens: {0}")]
    Token(String),
}

/// Calls one person may make to one other within [`CALL_WINDOW`]: a ringing dialog that keeps
/// coming back after each decline is harassment, whatever the relay cap allows.
pub const CALLS_PER_CALLEE: usize = 3;
/// The window of [`CALLS_PER_CALLEE`].
pub const CALL_WINDOW: Duration = Duration::from_secs(60);

/// One person online.
struct Member {
    name: String,
    /// The token's user id: call tokens are minted for it.
    user: String,
    grants: Grants,
    outbound: Outbound,
    /// The ringing call it makes or receives (at most one).
    ringing: Option<String>,
    /// The room of its last accepted call: while it is in that room, it is busy.
    in_call: Option<String>,
    /// Whom it called lately, and when, oldest first (within [`CALL_WINDOW`]).
    recent_calls: VecDeque<(String, Instant)>,
}

/// A ringing call.
struct Call {
    caller: String,
    callee: String,
    /// The room the caller invites to (a call in progress), or none for a new room of two.
    room: Option<String>,
    /// Ends it unanswered; aborted when it ends otherwise.
    timeout: Option<AbortHandle>,
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(timeout) = self.timeout.take() {
            timeout.abort();
        }
    }
}

#[derive(Default)]
struct LobbyState {
    /// Online people by lobby peer id.
    members: HashMap<String, Member>,
    /// Ringing calls by call id.
    calls: HashMap<String, Call>,
}

/// Who is online, and their ringing calls.
pub struct Lobby {
    state: Mutex<LobbyState>,
    max_members: usize,
    call_timeout: Duration,
    /// Signs the names of the rooms calls make.
    room_key: [u8; 32],
}

/// Someone who entered the lobby (and was sent `lobby_joined`).
pub struct Entered {
    /// Its peer id in the lobby.
    pub peer_id: String,
}

impl Lobby {
    /// An empty lobby for at most `max_members` people, whose calls ring for `call_timeout`.
    pub fn new(max_members: usize, call_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            max_members,
            call_timeout,
            room_key: rand::random(),
        })
    }

    /// The signature half of a call room's name.
    fn room_tag(&self, nonce: &str) -> String {
        let mut mac = match Hmac::<sha1::Sha1>::new_from_slice(&self.room_key) {
            Ok(mac) => mac,
            // HMAC takes a key of any length.
            Err(_) => return String::new(),
        };
        mac.update(nonce.as_bytes());
        let tag = mac.finalize().into_bytes();
        tag.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// A new call room's name: unguessable, and signed.
    fn new_call_room(&self) -> String {
        let nonce = format!("{:016x}", rand::random::<u64>());
        format!("{CALL_ROOM_PREFIX}{nonce}{}", self.room_tag(&nonce))
    }

    /// Whether `room` is a call room this lobby made.
    fn is_call_room(&self, room: &str) -> bool {
        let Some(rest) = room.strip_prefix(CALL_ROOM_PREFIX) else {
            return false;
        };
        let (nonce, tag) = rest.split_at(rest.len().min(16));
        nonce.len() == 16 && !tag.is_empty() && crate::auth::same_secret(tag, &self.room_tag(nonce))
    }

    fn lock(&self) -> MutexGuard<'_, LobbyState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// People online now.
    pub fn len(&self) -> usize {
        self.lock().members.len()
    }

    /// True when nobody is online.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts `name` online (unique, case-insensitively), sends it `lobby_joined` and tells
    /// everyone else.
    pub fn enter(
        &self,
        name: &str,
        user: &str,
        grants: Grants,
        outbound: Outbound,
    ) -> Result<Entered, LobbyError> {
        let mut state = self.lock();
        if state
            .members
            .values()
            .any(|m| crate::room::same_name(&m.name, name))
        {
            return Err(LobbyError::NameTaken(name.to_owned()));
        }
        if state.members.len() >= self.max_members {
            return Err(LobbyError::Full(self.max_members));
        }
        let peer_id = format!("l-{:012x}", rand::random::<u64>() >> 16);
        let online = state
            .members
            .iter()
            .map(|(id, m)| PeerInfo {
                peer_id: id.clone(),
                name: m.name.clone(),
            })
            .collect();
        // Queued under the lock: no `online` or `offline` can reach it before this list.
        outbound.send(ServerMessage::LobbyJoined {
            peer_id: peer_id.clone(),
            name: name.to_owned(),
            online,
            protocol: PROTOCOL_VERSION,
        });
        for member in state.members.values() {
            member.outbound.send(ServerMessage::Online {
                peer_id: peer_id.clone(),
                name: name.to_owned(),
            });
        }
        state.members.insert(
            peer_id.clone(),
            Member {
                name: name.to_owned(),
                user: user.to_owned(),
                grants,
                outbound,
                ringing: None,
                recent_calls: VecDeque::new(),
                in_call: None,
            },
        );
        Ok(Entered { peer_id })
    }

    /// Takes `peer` offline: its ringing call ends (for the other side, `cancelled` when the
    /// caller left, `unavailable` when the callee did) and everyone else is told.
    pub fn leave(&self, peer: &str) {
        let mut state = self.lock();
        let Some(member) = state.members.remove(peer) else {
            return;
        };
        if let Some(call_id) = member.ringing {
            let reason = match state.calls.get(&call_id) {
                Some(call) if call.caller == peer => CallEndReason::Cancelled,
                _ => CallEndReason::Unavailable,
            };
            end_call(&mut state, &call_id, reason);
        }
        for other in state.members.values() {
            other.outbound.send(ServerMessage::Offline {
                peer_id: peer.to_owned(),
            });
        }
    }

    /// `caller` calls `callee` (into `room`, a call the caller is in, when given). The caller is
    /// told `calling` with the call's id; a busy callee ends the call at once (`busy`), anyone
    /// else hears it ring until it is answered, cancelled or times out.
    pub fn call(
        self: &Arc<Self>,
        caller: &str,
        callee: &str,
        room: Option<&str>,
        rooms: &RoomRegistry,
    ) -> Result<String, LobbyError> {
        let mut state = self.lock();
        let (caller_user, caller_name, caller_ringing) = match state.members.get(caller) {
            Some(m) => (m.user.clone(), m.name.clone(), m.ringing.is_some()),
            None => return Err(LobbyError::UnknownPeer(caller.to_owned())),
        };
        if caller == callee {
            return Err(LobbyError::CallSelf);
        }
        if caller_ringing {
            return Err(LobbyError::AlreadyRinging);
        }
        if let Some(room) = room
            && !(self.is_call_room(room) && rooms.has_user(room, &caller_user))
        {
            return Err(LobbyError::NotInRoom);
        }
        if !state.members.contains_key(callee) {
            return Err(LobbyError::UnknownPeer(callee.to_owned()));
        }
        if let Some(member) = state.members.get_mut(caller) {
            let now = Instant::now();
            while member
                .recent_calls
                .front()
                .is_some_and(|(_, at)| now.duration_since(*at) > CALL_WINDOW)
            {
                member.recent_calls.pop_front();
            }
            let to_callee = member
                .recent_calls
                .iter()
                .filter(|(c, _)| c == callee)
                .count();
            if to_callee >= CALLS_PER_CALLEE {
                return Err(LobbyError::CallingTooOften);
            }
            member.recent_calls.push_back((callee.to_owned(), now));
        }
        let Some(callee_member) = state.members.get(callee) else {
            return Err(LobbyError::UnknownPeer(callee.to_owned()));
        };
        let busy = callee_member.ringing.is_some()
            || callee_member
                .in_call
                .as_deref()
                .is_some_and(|room| rooms.has_user(room, &callee_member.user));
        let call_id = format!("c-{:012x}", rand::random::<u64>() >> 16);
        let caller_outbound = state.members.get(caller).map(|m| m.outbound.clone());
        if let Some(outbound) = &caller_outbound {
            outbound.send(ServerMessage::Calling {
                call_id: call_id.clone(),
                peer_id: callee.to_owned(),
            });
        }
        if busy {
            if let Some(outbound) = caller_outbound {
                outbound.send(ServerMessage::CallEnded {
                    call_id: call_id.clone(),
                    reason: CallEndReason::Busy,
                });
            }
            return Ok(call_id);
        }
        if let Some(member) = state.members.get_mut(callee) {
            member.ringing = Some(call_id.clone());
            member.outbound.send(ServerMessage::IncomingCall {
                call_id: call_id.clone(),
                peer_id: caller.to_owned(),
                name: caller_name,
            });
        }
        if let Some(member) = state.members.get_mut(caller) {
            member.ringing = Some(call_id.clone());
        }
        // One per ringing call: aborted when the call ends otherwise (dropped with it).
        let lobby: Weak<Self> = Arc::downgrade(self);
        let (expiring, timeout) = (call_id.clone(), self.call_timeout);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(lobby) = lobby.upgrade() {
                let mut state = lobby.lock();
                end_call(&mut state, &expiring, CallEndReason::Timeout);
            }
        });
        state.calls.insert(
            call_id.clone(),
            Call {
                caller: caller.to_owned(),
                callee: callee.to_owned(),
                room: room.map(str::to_owned),
                timeout: Some(timer.abort_handle()),
            },
        );
        Ok(call_id)
    }

    /// The caller cancels its ringing call.
    pub fn cancel(&self, peer: &str, call_id: &str) -> Result<(), LobbyError> {
        let mut state = self.lock();
        ringing(&state, call_id, peer, Side::Caller)?;
        end_call(&mut state, call_id, CallEndReason::Cancelled);
        Ok(())
    }

    /// The callee declines a call ringing for it.
    pub fn decline(&self, peer: &str, call_id: &str) -> Result<(), LobbyError> {
        let mut state = self.lock();
        ringing(&state, call_id, peer, Side::Callee)?;
        end_call(&mut state, call_id, CallEndReason::Declined);
        Ok(())
    }

    /// The callee accepts: both are told `call_accepted` with the room and a token for it,
    /// minted for each one's user id with its lobby token's publish and subscribe grants.
    pub fn accept(
        &self,
        peer: &str,
        call_id: &str,
        auth: &TokenAuthority,
        rooms: &RoomRegistry,
    ) -> Result<(), LobbyError> {
        let mut state = self.lock();
        let call = ringing(&state, call_id, peer, Side::Callee)?;
        let (caller, callee, invite) =
            (call.caller.clone(), call.callee.clone(), call.room.clone());
        // An invite holds only while its caller is still in the call.
        if let Some(room) = &invite {
            let caller_user = state.members.get(&caller).map(|m| m.user.clone());
            if !caller_user.is_some_and(|user| rooms.has_user(room, &user)) {
                end_call(&mut state, call_id, CallEndReason::Unavailable);
                return Ok(());
            }
        }
        // A new room's name is unguessable (it is the call's link) and signed.
        let room = invite.unwrap_or_else(|| self.new_call_room());
        // Both tokens first: a failure leaves the call ringing, nobody told half of it.
        let mut tokens = Vec::with_capacity(2);
        for (me, other) in [(&caller, &callee), (&callee, &caller)] {
            let Some(member) = state.members.get(me) else {
                return Err(LobbyError::UnknownPeer(me.clone()));
            };
            let grants = Grants {
                publish: member.grants.publish,
                subscribe: member.grants.subscribe,
                ..Grants::default()
            };
            let token = auth
                .mint(&member.user, &room, grants)
                .map_err(|err| LobbyError::Token(err.to_string()))?;
            tokens.push((me.clone(), other.clone(), token));
        }
        state.calls.remove(call_id);
        for (me, other, token) in tokens {
            if let Some(member) = state.members.get_mut(&me) {
                member.ringing = None;
                member.in_call = Some(room.clone());
                member.outbound.send(ServerMessage::CallAccepted {
                    call_id: call_id.to_owned(),
                    peer_id: other,
                    room: room.clone(),
                    token,
                });
            }
        }
        Ok(())
    }
}

/// Which end of a call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Caller,
    Callee,
}

/// The ringing call `call_id`, when `peer` is on `side` of it.
fn ringing<'a>(
    state: &'a LobbyState,
    call_id: &str,
    peer: &str,
    side: Side,
) -> Result<&'a Call, LobbyError> {
    let unknown = || LobbyError::UnknownCall(call_id.to_owned());
    let call = state.calls.get(call_id).ok_or_else(unknown)?;
    let (mine, other) = match side {
        Side::Caller => (&call.caller, &call.callee),
        Side::Callee => (&call.callee, &call.caller),
    };
    if mine == peer {
        Ok(call)
    } else if other == peer {
        Err(LobbyError::WrongSide)
    } else {
        Err(unknown())
    }
}

/// Ends a ringing call, if it still rings, telling both sides why.
fn end_call(state: &mut LobbyState, call_id: &str, reason: CallEndReason) {
    let Some(call) = state.calls.remove(call_id) else {
        return;
    };
    for peer in [&call.caller, &call.callee] {
        if let Some(member) = state.members.get_mut(peer) {
            if member.ringing.as_deref() == Some(call_id) {
                member.ringing = None;
            }
            member.outbound.send(ServerMessage::CallEnded {
                call_id: call_id.to_owned(),
                reason,
            });
        }
    }
}
