//! Meeting a stranger: a waiting queue, first come first matched. Two people waiting are matched
//! at once into a new room of two (a token each); `next` leaves the partner and queues again,
//! never to be matched at once with the one just left while anyone else waits. A waiting place
//! outlives its socket for [`RESUME_WINDOW`], so a client that reconnects keeps it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::auth::{Grants, TokenAuthority};
use crate::protocol::{QueueLeftReason, ServerMessage};
use crate::room::Outbound;

/// How long a waiting place is kept for a client whose socket dropped.
pub const RESUME_WINDOW: Duration = Duration::from_secs(30);

/// Why the queue refused something.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    #[error("the waiting queue is full ({0} people)")]
    Full(usize),
    #[error("you are waiting already")]
    AlreadyWaiting,
    #[error("you have no partner to leave: send `find_partner`")]
    NoPartner,
}

/// One person in the queue or in a match.
struct Entry {
    name: String,
    user: String,
    grants: Grants,
    /// The socket to tell; none while a dropped client may still come back.
    outbound: Option<Outbound>,
    /// The secret that takes this place back after a reconnect.
    resume: String,
    state: EntryState,
    /// Whom it last left (or was left by): not matched with at once again.
    last_partner: Option<String>,
    /// Bumped on each change of state: a timer armed before it finds it stale.
    epoch: u64,
}

#[derive(Clone, PartialEq, Eq)]
enum EntryState {
    /// In the queue since then.
    Waiting(Instant),
    /// Matched with this entry.
    Matched(String),
    /// Neither (stopped, or its partner left): may find again.
    Idle,
}

#[derive(Default)]
struct QueueState {
    entries: HashMap<String, Entry>,
    /// Waiting entries, first come first.
    order: VecDeque<String>,
}

/// The waiting queue and the matches it made.
pub struct MatchQueue {
    state: Mutex<QueueState>,
    max_waiting: usize,
    wait_timeout: Duration,
}

/// A place in the queue, as its session holds it.
pub struct Place {
    /// The entry's id.
    pub id: String,
}

impl MatchQueue {
    /// An empty queue of at most `max_waiting` people, each waiting at most `wait_timeout`.
    pub fn new(max_waiting: usize, wait_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            max_waiting,
            wait_timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// People waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().order.len()
    }

    /// A new person looks for a partner (or one whose socket dropped takes its place back with
    /// `resume`, for the same user): it is told `waiting`, then `matched` when someone comes.
    pub fn find(
        self: &Arc<Self>,
        name: &str,
        user: &str,
        grants: Grants,
        outbound: Outbound,
        resume: Option<&str>,
        auth: &TokenAuthority,
    ) -> Result<Place, MatchError> {
        let mut state = self.lock();
        let resumed = resume.and_then(|secret| {
            state
                .entries
                .iter()
                .find(|(_, e)| {
                    e.outbound.is_none()
                        && e.user == user
                        && crate::auth::same_secret(&e.resume, secret)
                })
                .map(|(id, _)| id.clone())
        });
        if let Some(id) = resumed {
            let entry = state.entries.get_mut(&id).ok_or(MatchError::NoPartner)?;
            entry.outbound = Some(outbound);
            entry.name = name.to_owned();
            entry.epoch += 1;
            let (resume, position) = (entry.resume.clone(), position(&state, &id));
            if let Some(outbound) = &state.entries[&id].outbound {
                outbound.send(ServerMessage::Waiting { resume, position });
            }
            self.arm_timeout(&state, &id);
            match_waiting(&mut state, auth);
            return Ok(Place { id });
        }
        if state.order.len() >= self.max_waiting {
            return Err(MatchError::Full(self.max_waiting));
        }
        let id = format!("m-{:012x}", rand::random::<u64>() >> 16);
        let resume = format!("{:032x}", rand::random::<u128>());
        outbound.send(ServerMessage::Waiting {
            resume: resume.clone(),
            position: state.order.len(),
        });
        state.entries.insert(
            id.clone(),
            Entry {
                name: name.to_owned(),
                user: user.to_owned(),
                grants,
                outbound: Some(outbound),
                resume,
                state: EntryState::Waiting(Instant::now()),
                last_partner: None,
                epoch: 0,
            },
        );
        state.order.push_back(id.clone());
        self.arm_timeout(&state, &id);
        match_waiting(&mut state, auth);
        Ok(Place { id })
    }

    /// An idle place (stopped, or left by its partner) queues again; a matched one leaves its
    /// partner first, as `next`.
    pub fn find_again(self: &Arc<Self>, id: &str, auth: &TokenAuthority) -> Result<(), MatchError> {
        let mut state = self.lock();
        if state.order.len() >= self.max_waiting {
            return Err(MatchError::Full(self.max_waiting));
        }
        match state.entries.get(id).map(|e| e.state.clone()) {
            None => return Err(MatchError::NoPartner),
            Some(EntryState::Waiting(_)) => return Err(MatchError::AlreadyWaiting),
            Some(EntryState::Matched(partner)) => part(&mut state, id, &partner),
            Some(EntryState::Idle) => {}
        }
        self.requeue(&mut state, id, auth);
        Ok(())
    }

    /// Leaves the partner (who is told `partner_left`) and queues again.
    pub fn next(self: &Arc<Self>, id: &str, auth: &TokenAuthority) -> Result<(), MatchError> {
        let mut state = self.lock();
        let Some(EntryState::Matched(partner)) = state.entries.get(id).map(|e| e.state.clone())
        else {
            return Err(MatchError::NoPartner);
        };
        part(&mut state, id, &partner);
        self.requeue(&mut state, id, auth);
        Ok(())
    }

    /// Puts `id` at the end of the queue, tells it so, and matches.
    fn requeue(self: &Arc<Self>, state: &mut QueueState, id: &str, auth: &TokenAuthority) {
        let Some(entry) = state.entries.get_mut(id) else {
            return;
        };
        entry.state = EntryState::Waiting(Instant::now());
        entry.epoch += 1;
        let resume = entry.resume.clone();
        let position = state.order.len();
        state.order.push_back(id.to_owned());
        tell(state, id, ServerMessage::Waiting { resume, position });
        self.arm_timeout(state, id);
        match_waiting(state, auth);
    }

    /// Stops looking: out of the queue (told `queue_left`, `stopped`), or out of a match (the
    /// partner is told `partner_left`).
    pub fn stop(&self, id: &str) {
        let mut state = self.lock();
        stop_entry(&mut state, id, true);
    }

    /// The session of `id` ended: a waiting place is kept for [`RESUME_WINDOW`], a match ends
    /// (the partner is told), anything else goes.
    pub fn disconnected(self: &Arc<Self>, id: &str) {
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(id) else {
            return;
        };
        match entry.state.clone() {
            EntryState::Waiting(_) => {
                entry.outbound = None;
                entry.epoch += 1;
                let (epoch, queue, id) = (entry.epoch, Arc::downgrade(self), id.to_owned());
                tokio::spawn(async move {
                    tokio::time::sleep(RESUME_WINDOW).await;
                    if let Some(queue) = queue.upgrade() {
                        let mut state = queue.lock();
                        if state.entries.get(&id).is_some_and(|e| e.epoch == epoch) {
                            remove(&mut state, &id);
                        }
                    }
                });
            }
            EntryState::Matched(partner) => {
                part(&mut state, id, &partner);
                remove(&mut state, id);
            }
            EntryState::Idle => remove(&mut state, id),
        }
    }

    /// Ends the wait of `id` after the timeout, unless it changed meanwhile.
    fn arm_timeout(self: &Arc<Self>, state: &QueueState, id: &str) {
        let Some(entry) = state.entries.get(id) else {
            return;
        };
        let (epoch, queue, id, timeout) = (
            entry.epoch,
            Arc::downgrade(self),
            id.to_owned(),
            self.wait_timeout,
        );
        // Bounded: one per waiting place, each ends by the timeout.
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(queue) = Weak::upgrade(&queue) else {
                return;
            };
            let mut state = queue.lock();
            let current = state
                .entries
                .get(&id)
                .is_some_and(|e| e.epoch == epoch && matches!(e.state, EntryState::Waiting(_)));
            if current {
                tell(
                    &state,
                    &id,
                    ServerMessage::QueueLeft {
                        reason: QueueLeftReason::Timeout,
                    },
                );
                stop_entry(&mut state, &id, false);
            }
        });
    }
}

/// Where `id` stands in the queue: how many wait before it.
fn position(state: &QueueState, id: &str) -> usize {
    state.order.iter().position(|w| w == id).unwrap_or(0)
}

fn tell(state: &QueueState, id: &str, message: ServerMessage) {
    if let Some(outbound) = state.entries.get(id).and_then(|e| e.outbound.as_ref()) {
        outbound.send(message);
    }
}

/// Ends `id`'s match with `partner`: the partner is told, and each remembers the other.
fn part(state: &mut QueueState, id: &str, partner: &str) {
    if let Some(other) = state.entries.get_mut(partner) {
        other.state = EntryState::Idle;
        other.last_partner = Some(id.to_owned());
        other.epoch += 1;
    }
    tell(
        state,
        partner,
        ServerMessage::PartnerLeft {
            partner: id.to_owned(),
        },
    );
    if let Some(entry) = state.entries.get_mut(id) {
        entry.state = EntryState::Idle;
        entry.last_partner = Some(partner.to_owned());
        entry.epoch += 1;
    }
}

fn stop_entry(state: &mut QueueState, id: &str, say: bool) {
    let Some(entry) = state.entries.get(id) else {
        return;
    };
    match entry.state.clone() {
        EntryState::Waiting(_) => {
            state.order.retain(|w| w != id);
            if say {
                tell(
                    state,
                    id,
                    ServerMessage::QueueLeft {
                        reason: QueueLeftReason::Stopped,
                    },
                );
            }
        }
        EntryState::Matched(partner) => part(state, id, &partner),
        EntryState::Idle => {}
    }
    if let Some(entry) = state.entries.get_mut(id) {
        entry.state = EntryState::Idle;
        entry.epoch += 1;
    }
}

fn remove(state: &mut QueueState, id: &str) {
    state.order.retain(|w| w != id);
    state.entries.remove(id);
}

/// Matches waiting people, first come first: each with the earliest other connected waiter, not
/// the one it just left while anyone else waits.
fn match_waiting(state: &mut QueueState, auth: &TokenAuthority) {
    loop {
        let connected: Vec<String> = state
            .order
            .iter()
            .filter(|id| state.entries.get(*id).is_some_and(|e| e.outbound.is_some()))
            .cloned()
            .collect();
        let mut pair = None;
        'first: for (i, first) in connected.iter().enumerate() {
            let others = &connected[i + 1..];
            let just_left = |other: &String| {
                let a = state
                    .entries
                    .get(first)
                    .and_then(|e| e.last_partner.as_ref());
                let b = state
                    .entries
                    .get(other)
                    .and_then(|e| e.last_partner.as_ref());
                a == Some(other) || b == Some(first)
            };
            if let Some(other) = others.iter().find(|o| !just_left(o)) {
                pair = Some((first.clone(), other.clone()));
                break 'first;
            }
            // Only the one just left waits besides: matched all the same.
            if connected.len() == 2
                && let Some(other) = others.first()
            {
                pair = Some((first.clone(), other.clone()));
                break 'first;
            }
        }
        let Some((a, b)) = pair else {
            return;
        };
        if !start_match(state, &a, &b, auth) {
            return;
        }
    }
}

/// Puts `a` and `b` in a new room of two and tells both; false when the tokens could not be made.
fn start_match(state: &mut QueueState, a: &str, b: &str, auth: &TokenAuthority) -> bool {
    let room = format!("match-{:032x}", rand::random::<u128>());
    let mut tokens = Vec::with_capacity(2);
    for id in [a, b] {
        let Some(entry) = state.entries.get(id) else {
            return false;
        };
        let grants = Grants {
            publish: entry.grants.publish,
            subscribe: entry.grants.subscribe,
            ..Grants::default()
        };
        match auth.mint(&entry.user, &room, grants) {
            Ok(token) => tokens.push(token),
            Err(err) => {
                tracing::error!(%err, "could not mint a match's tokens");
                return false;
            }
        }
    }
    state.order.retain(|w| w != a && w != b);
    let names = [a, b].map(|id| {
        state
            .entries
            .get(id)
            .map(|e| e.name.clone())
            .unwrap_or_default()
    });
    for (i, (me, other)) in [(a, b), (b, a)].into_iter().enumerate() {
        if let Some(entry) = state.entries.get_mut(me) {
            entry.state = EntryState::Matched(other.to_owned());
            entry.epoch += 1;
        }
        tell(
            state,
            me,
            ServerMessage::Matched {
                partner: other.to_owned(),
                name: names[1 - i].clone(),
                room: room.clone(),
                token: tokens[i].clone(),
            },
        );
    }
    true
}
