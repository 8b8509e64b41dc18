//! Meeting a stranger: a waiting queue, first come first matched. Two people waiting are matched
//! at once into a new room of two (a token each); `next` leaves the partner and queues again,
//! never to be matched at once with the one just left while anyone else waits. A waiting place
//! outlives its socket for [`RESUME_WINDOW`], so a client that reconnects keeps it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;

use crate::auth::{Grants, TokenAuthority};
use crate::protocol::{QueueLeftReason, ServerMessage};
use crate::room::{Kick, Outbound};

/// How long a waiting place is kept for a client whose socket dropped.
pub const RESUME_WINDOW: Duration = Duration::from_secs(30);

/// Why the queue refused something.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    #[error("the waiting queue is full ({0} people)")]
    Full(usize),
    #[error("you are waiting already")]
    AlreadyWaiting,
    #[error("you have no place in the queue: send `find_partner`")]
    NoPlace,
}

/// One person in the queue or in a match.
struct Entry {
    name: String,
    user: String,
    grants: Grants,
    /// The socket to tell; none while a dropped client may still come back.
    outbound: Option<Outbound>,
    /// Which session holds it: bumped when a reconnect takes it over, so the old session's
    /// end does not end it.
    owner: u64,
    /// The secret that takes this place back after a reconnect.
    resume: String,
    state: EntryState,
    /// Whom it last left (or was left by): not matched with at once again.
    last_partner: Option<String>,
    /// Bumped on each change of state: a timer that fires after one finds itself stale.
    epoch: u64,
    /// The wait's timeout, or the end of a dropped client's resume window; aborted when
    /// replaced, so there is at most one per place.
    timer: Option<AbortHandle>,
    /// The `position` its socket was last told, so that it is told again when it moves up.
    told_position: Option<usize>,
}

impl Entry {
    fn set_timer(&mut self, timer: Option<AbortHandle>) {
        if let Some(old) = std::mem::replace(&mut self.timer, timer) {
            old.abort();
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.set_timer(None);
    }
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
    /// The session's claim on it.
    pub owner: u64,
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

    /// People in the queue's care now: waiting, or matched and not yet gone.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when nobody is in the queue's care.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new person looks for a partner: it is told `waiting`, then `matched` when someone
    /// comes. With `resume` (a `waiting.resume` of the same user) it takes that place back: the
    /// socket that held it, if the server still counts it alive, is told `replaced` and closed.
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
                .find(|(_, e)| e.user == user && crate::auth::same_secret(&e.resume, secret))
                .map(|(id, _)| id.clone())
        });
        if let Some(id) = resumed {
            let Some(entry) = state.entries.get_mut(&id) else {
                return Err(MatchError::NoPlace);
            };
            if let Some(old) = entry.outbound.replace(outbound) {
                old.end(Kick::Replaced);
            }
            entry.owner += 1;
            entry.name = name.to_owned();
            let (owner, current) = (entry.owner, entry.state.clone());
            match current {
                EntryState::Waiting(_) => {
                    if let Some(entry) = state.entries.get_mut(&id) {
                        entry.epoch += 1;
                    }
                    tell_waiting(&mut state, &id);
                    self.arm_timeout(&mut state, &id);
                    match_waiting(&mut state, auth);
                }
                // A match or a stop the old socket was in ends; it looks again from the back.
                EntryState::Matched(partner) => {
                    part(&mut state, &id, &partner);
                    self.requeue(&mut state, &id, auth);
                }
                EntryState::Idle => self.requeue(&mut state, &id, auth),
            }
            return Ok(Place { id, owner });
        }
        if state.order.len() >= self.max_waiting {
            return Err(MatchError::Full(self.max_waiting));
        }
        let id = format!("m-{:012x}", rand::random::<u64>() >> 16);
        let resume = format!("{:032x}", rand::random::<u128>());
        state.entries.insert(
            id.clone(),
            Entry {
                name: name.to_owned(),
                user: user.to_owned(),
                grants,
                outbound: Some(outbound),
                owner: 0,
                resume,
                state: EntryState::Waiting(Instant::now()),
                last_partner: None,
                epoch: 0,
                timer: None,
                told_position: None,
            },
        );
        state.order.push_back(id.clone());
        tell_waiting(&mut state, &id);
        self.arm_timeout(&mut state, &id);
        match_waiting(&mut state, auth);
        Ok(Place { id, owner: 0 })
    }

    /// Looks again: a matched place leaves its partner first (as `next`), an idle one (stopped,
    /// or left by its partner) queues again.
    pub fn find_again(self: &Arc<Self>, id: &str, auth: &TokenAuthority) -> Result<(), MatchError> {
        let mut state = self.lock();
        match state.entries.get(id).map(|e| e.state.clone()) {
            None => Err(MatchError::NoPlace),
            Some(EntryState::Waiting(_)) => Err(MatchError::AlreadyWaiting),
            Some(_) => self.leave_and_requeue(&mut state, id, auth),
        }
    }

    /// Leaves the partner (who is told `partner_left`) and queues again; from an idle place (its
    /// partner left first), queues again; while waiting, nothing.
    pub fn next(self: &Arc<Self>, id: &str, auth: &TokenAuthority) -> Result<(), MatchError> {
        let mut state = self.lock();
        match state.entries.get(id).map(|e| e.state.clone()) {
            None => Err(MatchError::NoPlace),
            Some(EntryState::Waiting(_)) => Ok(()),
            Some(_) => self.leave_and_requeue(&mut state, id, auth),
        }
    }

    fn leave_and_requeue(
        self: &Arc<Self>,
        state: &mut QueueState,
        id: &str,
        auth: &TokenAuthority,
    ) -> Result<(), MatchError> {
        if state.order.len() >= self.max_waiting {
            return Err(MatchError::Full(self.max_waiting));
        }
        if let Some(EntryState::Matched(partner)) = state.entries.get(id).map(|e| e.state.clone()) {
            part(state, id, &partner);
        }
        self.requeue(state, id, auth);
        Ok(())
    }

    /// Puts `id` at the end of the queue, tells it so, and matches.
    fn requeue(self: &Arc<Self>, state: &mut QueueState, id: &str, auth: &TokenAuthority) {
        let Some(entry) = state.entries.get_mut(id) else {
            return;
        };
        entry.state = EntryState::Waiting(Instant::now());
        entry.epoch += 1;
        state.order.push_back(id.to_owned());
        tell_waiting(state, id);
        self.arm_timeout(state, id);
        match_waiting(state, auth);
    }

    /// Stops looking: out of the queue or out of a match (the partner is told `partner_left`);
    /// either way the place is told `queue_left`, `stopped` (so a `matched` crossing the `stop`
    /// on the wire is known stale).
    pub fn stop(&self, id: &str) {
        let mut state = self.lock();
        stop_entry(&mut state, id);
        tell(
            &state,
            id,
            ServerMessage::QueueLeft {
                reason: QueueLeftReason::Stopped,
            },
        );
    }

    /// The session `owner` of `id` ended: a waiting place is kept for [`RESUME_WINDOW`], a match
    /// ends (the partner is told), anything else goes. Nothing, if another session took it over.
    pub fn disconnected(self: &Arc<Self>, place: &Place) {
        let mut state = self.lock();
        let id = place.id.as_str();
        let Some(entry) = state.entries.get_mut(id) else {
            return;
        };
        if entry.owner != place.owner {
            return;
        }
        match entry.state.clone() {
            EntryState::Waiting(_) => {
                entry.outbound = None;
                entry.epoch += 1;
                let (epoch, queue, id) = (entry.epoch, Arc::downgrade(self), id.to_owned());
                let timer = tokio::spawn(async move {
                    tokio::time::sleep(RESUME_WINDOW).await;
                    if let Some(queue) = queue.upgrade() {
                        let mut state = queue.lock();
                        if state.entries.get(&id).is_some_and(|e| e.epoch == epoch) {
                            remove(&mut state, &id);
                        }
                    }
                });
                entry.set_timer(Some(timer.abort_handle()));
            }
            EntryState::Matched(partner) => {
                part(&mut state, id, &partner);
                remove(&mut state, id);
            }
            EntryState::Idle => remove(&mut state, id),
        }
    }

    /// Ends the wait of `id` after the timeout, unless it changed meanwhile.
    fn arm_timeout(self: &Arc<Self>, state: &mut QueueState, id: &str) {
        let Some(entry) = state.entries.get_mut(id) else {
            return;
        };
        let (epoch, queue, owned_id, timeout) = (
            entry.epoch,
            Arc::downgrade(self),
            id.to_owned(),
            self.wait_timeout,
        );
        let timer = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(queue) = Weak::upgrade(&queue) else {
                return;
            };
            let mut state = queue.lock();
            let current = state
                .entries
                .get(&owned_id)
                .is_some_and(|e| e.epoch == epoch && matches!(e.state, EntryState::Waiting(_)));
            if current {
                tell(
                    &state,
                    &owned_id,
                    ServerMessage::QueueLeft {
                        reason: QueueLeftReason::Timeout,
                    },
                );
                stop_entry(&mut state, &owned_id);
            }
        });
        entry.set_timer(Some(timer.abort_handle()));
    }
}

/// Tells `id` where it stands in the queue (how many wait before it) and with what it takes its
/// place back.
fn tell_waiting(state: &mut QueueState, id: &str) {
    let position = state.order.iter().position(|w| w == id).unwrap_or(0);
    let Some(entry) = state.entries.get_mut(id) else {
        return;
    };
    entry.told_position = Some(position);
    let resume = entry.resume.clone();
    tell(state, id, ServerMessage::Waiting { resume, position });
}

/// Tells everyone still waiting whose place moved up (someone before them was matched or left)
/// where they stand now.
fn refresh_positions(state: &mut QueueState) {
    let moved: Vec<String> = state
        .order
        .iter()
        .enumerate()
        .filter(|(position, id)| {
            state.entries.get(*id).is_some_and(|e| {
                e.outbound.is_some() && e.told_position.is_some_and(|told| told != *position)
            })
        })
        .map(|(_, id)| id.clone())
        .collect();
    for id in moved {
        tell_waiting(state, &id);
    }
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

/// Takes `id` out of the queue or its match (telling the partner); it stays, idle.
fn stop_entry(state: &mut QueueState, id: &str) {
    let Some(entry) = state.entries.get(id) else {
        return;
    };
    match entry.state.clone() {
        EntryState::Waiting(_) => state.order.retain(|w| w != id),
        EntryState::Matched(partner) => part(state, id, &partner),
        EntryState::Idle => {}
    }
    if let Some(entry) = state.entries.get_mut(id) {
        entry.state = EntryState::Idle;
        entry.epoch += 1;
        entry.set_timer(None);
        entry.told_position = None;
    }
    refresh_positions(state);
}

fn remove(state: &mut QueueState, id: &str) {
    state.order.retain(|w| w != id);
    state.entries.remove(id);
    refresh_positions(state);
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
            break;
        };
        if !start_match(state, &a, &b, auth) {
            break;
        }
    }
    refresh_positions(state);
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
            entry.set_timer(None);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::room::ToSession;

    fn positions(rx: &mut tokio::sync::mpsc::Receiver<ToSession>) -> Vec<usize> {
        let mut out = Vec::new();
        while let Ok(message) = rx.try_recv() {
            if let ToSession::Send(ServerMessage::Waiting { position, .. }) = message {
                out.push(position);
            }
        }
        out
    }

    /// Someone waiting behind a dropped client is told when the dropped one's place goes and
    /// theirs moves up.
    #[tokio::test(start_paused = true)]
    async fn a_place_that_moves_up_is_told_so() {
        let queue = MatchQueue::new(10, Duration::from_secs(300));
        let auth = TokenAuthority::new(&BTreeMap::new(), 60);
        let grants = Grants::default();
        let (xo, mut xr) = Outbound::new(16);
        let x = queue
            .find("X", "x", grants, xo, None, &auth)
            .expect("a place for X");
        assert_eq!(positions(&mut xr), vec![0]);
        queue.disconnected(&x);
        let (yo, mut yr) = Outbound::new(16);
        queue
            .find("Y", "y", grants, yo, None, &auth)
            .expect("a place for Y");
        assert_eq!(positions(&mut yr), vec![1], "behind X, who may come back");
        tokio::time::sleep(RESUME_WINDOW + Duration::from_secs(1)).await;
        assert_eq!(
            queue.waiting(),
            1,
            "X's place went at the end of its window"
        );
        assert_eq!(positions(&mut yr), vec![0], "Y is told it moved up");
    }
}
