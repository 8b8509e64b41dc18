//! A room's Mode and the switches between mesh and SFU, as a pure state machine: it is told what
//! happened (a join, a leave, a `ready`, a mesh failure, the clock passing a deadline) with the
//! time as an argument, and answers with what to announce. It starts no task and reads no clock,
//! so hold times and switch timeouts are tested with hand-built instants; the room owns one timer
//! that calls [`ModeSwitch::tick`] at [`ModeSwitch::next_deadline`].
//!
//! The policy: a room of at most `mesh_max` participants is a mesh, a larger one uses the SFU.
//! A join that makes the room outgrow the mesh switches it at once; going back to mesh waits until
//! the room has stayed small for the hold time. A switch waits for a `ready` from everyone who was
//! in the room when it began (not the newcomer who caused it), at most `switch_timeout`: a switch
//! to SFU then settles anyway; a switch to mesh that timed out means the mesh cannot connect, so
//! the room returns to SFU and stays there, as it does after a `mesh_failed`. A participant whose
//! token denies publishing or subscribing keeps the room in SFU mode while it is there: only the
//! server can hold it to that.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sfu::ParticipantId;

use crate::protocol::Mode;

/// When a room changes Mode.
#[derive(Clone, Copy, Debug)]
pub struct ModePolicy {
    /// Largest mesh room; 0 means always SFU.
    pub mesh_max: usize,
    /// How long an SFU room must stay at `mesh_max` or fewer before it returns to mesh.
    pub mesh_hold: Duration,
    /// How long a switch waits for every `ready`.
    pub switch_timeout: Duration,
}

/// What the room must announce to every member, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeChange {
    /// `mode`/`switching`: bring up `mode`'s connections beside the old ones.
    Switching {
        /// The mode switched to.
        mode: Mode,
        /// The switch's number.
        switch: u64,
    },
    /// `mode`/`settled`: close the other mode's connections.
    Settled {
        /// The mode settled in.
        mode: Mode,
        /// The number of the switch that settled.
        switch: u64,
    },
}

/// A switch in progress.
#[derive(Debug)]
struct PendingSwitch {
    /// Participants who were in the room when it began and have not reported `ready`.
    waiting: HashSet<ParticipantId>,
    /// When it stops waiting.
    deadline: Instant,
}

/// One room's Mode, its switch in progress and its pending return to mesh.
#[derive(Debug)]
pub struct ModeSwitch {
    policy: ModePolicy,
    mode: Mode,
    switch: Option<PendingSwitch>,
    /// Numbers the switches, so that a `ready` for a replaced one counts for none.
    generation: u64,
    /// When the room returns to mesh, if it stays small until then.
    hold_until: Option<Instant>,
    /// A mesh could not connect: the room stays in SFU mode for as long as it exists.
    mesh_blocked: bool,
    /// Members the mesh cannot hold to their grants: while any is in, the room uses the SFU.
    sfu_only: HashSet<ParticipantId>,
    switches_to_sfu: u64,
    switches_to_mesh: u64,
}

impl ModeSwitch {
    /// A new, empty room's state: a mesh, unless `mesh_max` is 0.
    pub fn new(policy: ModePolicy) -> Self {
        Self {
            policy,
            mode: if policy.mesh_max == 0 {
                Mode::Sfu
            } else {
                Mode::Mesh
            },
            switch: None,
            generation: 0,
            hold_until: None,
            mesh_blocked: false,
            sfu_only: HashSet::new(),
            switches_to_sfu: 0,
            switches_to_mesh: 0,
        }
    }

    /// The mode now (the one being switched to, during a switch).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// True while a switch waits for `ready` reports.
    pub fn switching(&self) -> bool {
        self.switch.is_some()
    }

    /// True once a mesh failed here.
    pub fn mesh_blocked(&self) -> bool {
        self.mesh_blocked
    }

    /// Switches to SFU and to mesh so far.
    pub fn switch_counts(&self) -> (u64, u64) {
        (self.switches_to_sfu, self.switches_to_mesh)
    }

    /// The mode someone joining a room of `members` participants enters in; `needs_sfu` when
    /// its grants keep the room in SFU mode.
    pub fn mode_for_newcomer(&self, members: usize, needs_sfu: bool) -> Mode {
        let mesh_max = self.policy.mesh_max;
        if self.mode == Mode::Mesh && mesh_max > 0 && (members >= mesh_max || needs_sfu) {
            Mode::Sfu // This join makes the room outgrow mesh.
        } else {
            self.mode
        }
    }

    /// True when the room's size and members allow a mesh.
    fn mesh_fits(&self, members: usize) -> bool {
        members <= self.policy.mesh_max && self.sfu_only.is_empty()
    }

    /// True when a switch has waited past its deadline for someone's `ready`.
    pub fn switch_overdue(&self, now: Instant) -> bool {
        self.switch.as_ref().is_some_and(|s| s.deadline <= now)
    }

    /// When [`ModeSwitch::tick`] has something to do next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let switch = self.switch.as_ref().map(|s| s.deadline);
        match (switch, self.hold_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// `newcomer` joined; `members` is everyone in the room now, the newcomer included;
    /// `needs_sfu` when its grants keep the room in SFU mode.
    pub fn joined(
        &mut self,
        members: &[ParticipantId],
        newcomer: &ParticipantId,
        needs_sfu: bool,
        now: Instant,
    ) -> Vec<ModeChange> {
        let mut out = Vec::new();
        if needs_sfu {
            self.sfu_only.insert(newcomer.clone());
        }
        if self.policy.mesh_max == 0 || self.mesh_fits(members.len()) {
            return out;
        }
        self.hold_until = None;
        if self.mode == Mode::Mesh {
            self.begin(Mode::Sfu, members, Some(newcomer), now, &mut out);
        }
        out
    }

    /// Someone left; `members` is everyone still in the room.
    pub fn left(&mut self, members: &[ParticipantId], now: Instant) -> Vec<ModeChange> {
        let mut out = Vec::new();
        self.sfu_only.retain(|id| members.contains(id));
        self.settle_if_done(members, &mut out);
        let count = members.len();
        if self.mode == Mode::Sfu
            && self.policy.mesh_max > 0
            && !self.mesh_blocked
            && count > 0
            && self.mesh_fits(count)
            && self.hold_until.is_none()
        {
            self.hold_until = Some(now + self.policy.mesh_hold);
        }
        out
    }

    /// `participant` receives everyone through `mode`'s connections. A report for another mode,
    /// or naming a switch since replaced, counts for nothing.
    pub fn ready(
        &mut self,
        members: &[ParticipantId],
        participant: &ParticipantId,
        mode: Mode,
        switch: Option<u64>,
    ) -> Vec<ModeChange> {
        let mut out = Vec::new();
        if self.mode != mode || switch.is_some_and(|n| n != self.generation) {
            return out;
        }
        if let Some(pending) = &mut self.switch {
            pending.waiting.remove(participant);
        }
        self.settle_if_done(members, &mut out);
        out
    }

    /// A participant's mesh connection cannot connect: the room uses the SFU from now on. Only
    /// while the room is a mesh (or switching to one); `None` when ignored for that reason.
    pub fn mesh_failed(
        &mut self,
        members: &[ParticipantId],
        now: Instant,
    ) -> Option<Vec<ModeChange>> {
        let mut out = Vec::new();
        if self.mesh_blocked {
            return Some(out);
        }
        if self.mode != Mode::Mesh {
            return None;
        }
        self.mesh_blocked = true;
        self.hold_until = None;
        self.begin(Mode::Sfu, members, None, now, &mut out);
        Some(out)
    }

    /// The clock reached `now`: a switch that waited too long, or a hold that ran out.
    pub fn tick(&mut self, members: &[ParticipantId], now: Instant) -> Vec<ModeChange> {
        let mut out = Vec::new();
        // Each deadline is handled once; handling one may set the other anew, for later.
        let switch_due = self.switch_overdue(now);
        let hold_due = self.hold_until.is_some_and(|at| at <= now);
        if switch_due {
            if self.mode == Mode::Mesh {
                // The mesh did not come up (peers without a route to each other): the SFU
                // connections still work, so go back to them and stay there.
                self.mesh_blocked = true;
                self.begin(Mode::Sfu, members, None, now, &mut out);
            } else {
                self.settle(&mut out);
            }
        }
        if hold_due && self.hold_until.is_some_and(|at| at <= now) {
            self.hold_until = None;
            let count = members.len();
            if self.mode == Mode::Sfu && !self.mesh_blocked && count > 0 && self.mesh_fits(count) {
                self.begin(Mode::Mesh, members, None, now, &mut out);
            }
        }
        out
    }

    fn begin(
        &mut self,
        to: Mode,
        members: &[ParticipantId],
        newcomer: Option<&ParticipantId>,
        now: Instant,
        out: &mut Vec<ModeChange>,
    ) {
        self.mode = to;
        self.generation += 1;
        match to {
            Mode::Sfu => self.switches_to_sfu += 1,
            Mode::Mesh => self.switches_to_mesh += 1,
        }
        self.switch = Some(PendingSwitch {
            waiting: members
                .iter()
                .filter(|id| Some(*id) != newcomer)
                .cloned()
                .collect(),
            deadline: now + self.policy.switch_timeout,
        });
        out.push(ModeChange::Switching {
            mode: to,
            switch: self.generation,
        });
        self.settle_if_done(members, out);
    }

    fn settle_if_done(&mut self, members: &[ParticipantId], out: &mut Vec<ModeChange>) {
        let done = self.switch.as_ref().is_some_and(|pending| {
            // Someone alone has no connections to move.
            members.len() <= 1 || !members.iter().any(|id| pending.waiting.contains(id))
        });
        if done {
            self.settle(out);
        }
    }

    fn settle(&mut self, out: &mut Vec<ModeChange>) {
        self.switch = None;
        out.push(ModeChange::Settled {
            mode: self.mode,
            switch: self.generation,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(10);
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn policy(mesh_max: usize) -> ModePolicy {
        ModePolicy {
            mesh_max,
            mesh_hold: HOLD,
            switch_timeout: TIMEOUT,
        }
    }

    fn ids(n: usize) -> Vec<ParticipantId> {
        (1..=n)
            .map(|i| ParticipantId::from(format!("p-{i}").as_str()))
            .collect()
    }

    fn switching(mode: Mode, switch: u64) -> ModeChange {
        ModeChange::Switching { mode, switch }
    }

    fn settled(mode: Mode, switch: u64) -> ModeChange {
        ModeChange::Settled { mode, switch }
    }

    /// A mesh of `n` that grew one by one from empty, at `t0`.
    fn mesh_of(n: usize, t0: Instant) -> (ModeSwitch, Vec<ParticipantId>) {
        let mut room = ModeSwitch::new(policy(3));
        let all = ids(n);
        for i in 0..n {
            assert!(room.joined(&all[..=i], &all[i], false, t0).is_empty());
        }
        (room, all)
    }

    /// A mesh of three that a fourth made switch to SFU at `t0`, still switching.
    fn switching_up(t0: Instant) -> (ModeSwitch, Vec<ParticipantId>) {
        let (mut room, _) = mesh_of(3, t0);
        let all = ids(4);
        room.joined(&all, &all[3], false, t0);
        (room, all)
    }

    /// [`switching_up`], settled by its timeout.
    fn settled_sfu_of_four(t0: Instant) -> (ModeSwitch, Vec<ParticipantId>) {
        let (mut room, all) = switching_up(t0);
        room.tick(&all, t0 + TIMEOUT);
        (room, all)
    }

    #[test]
    fn a_room_is_a_mesh_up_to_mesh_max_and_always_sfu_with_mesh_max_zero() {
        let t0 = Instant::now();
        let (room, _) = mesh_of(3, t0);
        assert_eq!(room.mode(), Mode::Mesh);
        assert_eq!(room.mode_for_newcomer(3, false), Mode::Sfu);
        let mut sfu = ModeSwitch::new(policy(0));
        let all = ids(5);
        for i in 0..5 {
            assert!(sfu.joined(&all[..=i], &all[i], false, t0).is_empty());
        }
        assert!(sfu.left(&all[..1], t0).is_empty());
        assert_eq!(
            sfu.next_deadline(),
            None,
            "no return to mesh is ever planned"
        );
        assert_eq!(sfu.mode(), Mode::Sfu);
    }

    #[test]
    fn the_fourth_join_switches_to_sfu_and_waits_for_the_three_before_it() {
        let t0 = Instant::now();
        let (mut room, _) = mesh_of(3, t0);
        let all = ids(4);
        assert_eq!(
            room.joined(&all, &all[3], false, t0),
            [switching(Mode::Sfu, 1)]
        );
        assert!(room.switching());
        assert_eq!(room.next_deadline(), Some(t0 + TIMEOUT));
        // The newcomer is not waited for; its ready changes nothing.
        assert!(room.ready(&all, &all[3], Mode::Sfu, Some(1)).is_empty());
        assert!(room.ready(&all, &all[0], Mode::Sfu, Some(1)).is_empty());
        assert!(room.ready(&all, &all[1], Mode::Sfu, None).is_empty());
        assert_eq!(
            room.ready(&all, &all[2], Mode::Sfu, Some(1)),
            [settled(Mode::Sfu, 1)]
        );
        assert!(!room.switching());
        assert_eq!(room.switch_counts(), (1, 0));
    }

    #[test]
    fn a_ready_for_another_mode_or_a_replaced_switch_counts_for_nothing() {
        let t0 = Instant::now();
        let (mut room, all) = switching_up(t0);
        assert!(room.ready(&all, &all[0], Mode::Mesh, None).is_empty());
        assert!(room.ready(&all, &all[1], Mode::Sfu, Some(7)).is_empty());
        // The two were not counted: the switch still waits for three.
        room.ready(&all, &all[2], Mode::Sfu, Some(1));
        assert!(room.switching());
    }

    #[test]
    fn a_switch_to_sfu_still_waiting_at_its_deadline_settles_anyway() {
        let t0 = Instant::now();
        let (mut room, all) = switching_up(t0);
        assert!(
            room.tick(&all, t0 + TIMEOUT - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(room.tick(&all, t0 + TIMEOUT), [settled(Mode::Sfu, 1)]);
        assert_eq!(room.next_deadline(), None);
    }

    #[test]
    fn a_switch_waiting_only_for_those_who_left_settles_when_they_leave() {
        let t0 = Instant::now();
        let (mut room, all) = switching_up(t0);
        room.ready(&all, &all[0], Mode::Sfu, Some(1));
        room.ready(&all, &all[1], Mode::Sfu, Some(1));
        let remaining = [all[0].clone(), all[1].clone(), all[3].clone()];
        let changes = room.left(&remaining, t0);
        assert_eq!(changes, [settled(Mode::Sfu, 1)]);
    }

    #[test]
    fn a_small_sfu_room_returns_to_mesh_after_the_hold_time_and_waits_for_everyone() {
        let t0 = Instant::now();
        let (mut room, all) = settled_sfu_of_four(t0);
        let t1 = t0 + Duration::from_secs(20);
        let three = &all[..3];
        assert!(room.left(three, t1).is_empty());
        assert_eq!(room.next_deadline(), Some(t1 + HOLD));
        assert!(
            room.tick(three, t1 + HOLD - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(room.tick(three, t1 + HOLD), [switching(Mode::Mesh, 2)]);
        room.ready(three, &all[0], Mode::Mesh, Some(2));
        room.ready(three, &all[1], Mode::Mesh, Some(2));
        assert_eq!(
            room.ready(three, &all[2], Mode::Mesh, Some(2)),
            [settled(Mode::Mesh, 2)]
        );
        assert_eq!(room.switch_counts(), (1, 1));
    }

    #[test]
    fn a_join_during_the_hold_time_cancels_the_return_to_mesh() {
        let t0 = Instant::now();
        let (mut room, all) = settled_sfu_of_four(t0);
        let t1 = t0 + Duration::from_secs(20);
        room.left(&all[..3], t1);
        // Someone leaves and rejoins (as a new participant id) within the hold time.
        let back = [
            all[0].clone(),
            all[1].clone(),
            all[2].clone(),
            ids(5)[4].clone(),
        ];
        assert!(
            room.joined(&back, &back[3], false, t1 + HOLD / 2)
                .is_empty()
        );
        assert_eq!(room.next_deadline(), None);
        assert!(room.tick(&back, t1 + HOLD).is_empty());
        assert_eq!(room.mode(), Mode::Sfu);
    }

    #[test]
    fn a_switch_to_mesh_that_times_out_returns_to_sfu_for_good() {
        let t0 = Instant::now();
        let (mut room, all) = settled_sfu_of_four(t0);
        let three = &all[..3];
        let t1 = t0 + Duration::from_secs(20);
        room.left(three, t1);
        room.tick(three, t1 + HOLD);
        room.ready(three, &all[0], Mode::Mesh, Some(2));
        let timed_out = t1 + HOLD + TIMEOUT;
        assert_eq!(room.tick(three, timed_out), [switching(Mode::Sfu, 3)]);
        assert!(room.mesh_blocked());
        // It waits for everyone again, then never plans another return.
        for id in three {
            room.ready(three, id, Mode::Sfu, Some(3));
        }
        assert!(!room.switching());
        assert!(room.left(&all[..2], timed_out).is_empty());
        assert_eq!(room.next_deadline(), None);
    }

    #[test]
    fn mesh_failed_moves_a_mesh_to_sfu_for_good_and_is_ignored_outside_mesh() {
        let t0 = Instant::now();
        let (mut room, all) = mesh_of(3, t0);
        assert_eq!(
            room.mesh_failed(&all, t0),
            Some(vec![switching(Mode::Sfu, 1)])
        );
        assert!(room.mesh_blocked());
        assert_eq!(room.mesh_failed(&all, t0), Some(vec![]), "already blocked");

        // In an SFU room (a link left waiting by a switch to SFU) it says nothing.
        let (mut grown, _) = mesh_of(3, t0);
        let four = ids(4);
        grown.joined(&four, &four[3], false, t0);
        assert_eq!(grown.mesh_failed(&four, t0), None);
        assert!(!grown.mesh_blocked());
    }

    #[test]
    fn someone_alone_has_nothing_to_wait_for() {
        let t0 = Instant::now();
        let (mut room, all) = settled_sfu_of_four(t0);
        let t1 = t0 + Duration::from_secs(30);
        let one = &all[..1];
        room.left(one, t1);
        assert_eq!(
            room.tick(one, t1 + HOLD),
            [switching(Mode::Mesh, 2), settled(Mode::Mesh, 2)]
        );
    }

    #[test]
    fn a_participant_the_mesh_cannot_hold_to_its_grants_keeps_the_room_in_sfu_while_there() {
        let t0 = Instant::now();
        let (mut room, two) = mesh_of(2, t0);
        let all = ids(3);
        let viewer = &all[2];
        assert_eq!(room.mode_for_newcomer(2, true), Mode::Sfu);
        assert_eq!(
            room.joined(&all, viewer, true, t0),
            [switching(Mode::Sfu, 1)],
            "a room of three with a viewer switches to SFU"
        );
        for id in &two {
            room.ready(&all, id, Mode::Sfu, Some(1));
        }
        assert!(!room.switching());
        // Someone else leaving does not bring the mesh back while the viewer is in.
        let (viewer_and_one, t1) = (vec![two[0].clone(), viewer.clone()], t0 + HOLD);
        assert!(room.left(&viewer_and_one, t1).is_empty());
        assert_eq!(room.next_deadline(), None, "no return to mesh planned");
        // Once the viewer has gone, the room returns to mesh after the hold.
        let t2 = t1 + Duration::from_secs(1);
        room.left(&two[..1], t2);
        assert_eq!(room.next_deadline(), Some(t2 + HOLD));
        assert_eq!(
            room.tick(&two[..1], t2 + HOLD),
            [switching(Mode::Mesh, 2), settled(Mode::Mesh, 2)]
        );
    }
}
