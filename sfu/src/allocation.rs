//! Splitting one subscriber's bandwidth estimate over its subscriptions: pure, synchronous code
//! with the clock handed in, table-tested.
//!
//! Audio is never paused. Videos are served in priority order: a screen share, then the active
//! speaker, then the largest views first. Each video first gets its lowest layer while the
//! estimate lasts, at its lowest frame rate where it has temporal layers (one that does not fit
//! even so is paused), then each gets its full frame rate, then the videos climb, in the same
//! order, as far as fits and as their view can use: the next layer at its base frame rate, then
//! at its full frame rate. Going down is the same ladder: a video loses frame rate before it loses resolution. A subscription goes down at
//! once and up only [`UPGRADE_HOLD`] after its last change, and that hold doubles (up to
//! [`MAX_UPGRADE_HOLD`]) each time a rise is taken back within it, so layers do not flap.

use std::time::{Duration, Instant};

use crate::ids::{MediaKind, Source};

/// A subscription's layer may rise only this long after it last changed.
pub const UPGRADE_HOLD: Duration = Duration::from_secs(3);
/// The longest a hold grows to, after rises taken back one after another.
pub const MAX_UPGRADE_HOLD: Duration = Duration::from_secs(24);
/// A grant that stands this long has its hold back at [`UPGRADE_HOLD`].
const STEADY_AFTER: Duration = Duration::from_secs(30);
/// For this long after a rise, a grant falls only if the budget falls (by more than a tenth):
/// the rise asks for a keyframe, and that keyframe lifts the layer's measured bitrate for a
/// moment; falling for that alone paused every resumed video half a second later.
pub const RISE_GRACE: Duration = Duration::from_secs(2);

/// The estimate is used as a limit only once it has fallen (the network pushed back): until
/// then it has not been tested, and a subscriber whose network keeps up receives what its
/// views ask for. A fall counts when the estimate drops below this share of its highest value.
const FALL_NUMERATOR: u64 = 9;
const FALL_DENOMINATOR: u64 = 10;

/// Assumed bitrates of a video's layers counted from the top, for layers never measured.
const ASSUMED_FROM_TOP: [u64; 4] = [1_500_000, 500_000, 150_000, 100_000];
/// Assumed bitrate of an audio track never measured.
const ASSUMED_AUDIO: u64 = 40_000;

/// What one subscription may receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Layers up to this one.
    UpTo(u8),
    /// Layers up to this one, at their lowest frame rate (temporal layer 0).
    Thinned(u8),
    /// Nothing: not even the lowest layer fits.
    Paused,
}

/// One subscription, as the allocator sees it.
#[derive(Clone, Debug)]
pub struct Demand {
    /// Audio or video.
    pub kind: MediaKind,
    /// Camera, screen or microphone.
    pub source: Source,
    /// Its publisher speaks now.
    pub speaking: bool,
    /// The view's area in pixels (0 when unknown).
    pub area: u64,
    /// The highest layer its view can use.
    pub wanted: u8,
    /// Measured bitrate of each layer, lowest first (0: not measured).
    pub layer_bitrates: Vec<u64>,
    /// Measured bitrate of each layer's temporal layer 0, lowest first (0: no temporal layers,
    /// or not measured).
    pub thinned_bitrates: Vec<u64>,
    /// The subscriber paused it itself: it costs nothing and gets nothing.
    pub paused: bool,
}

impl Demand {
    /// The bitrate of `layer`: measured, else assumed.
    fn cost(&self, layer: u8) -> u64 {
        let layers = self.layer_bitrates.len().max(1);
        let layer = usize::from(layer).min(layers - 1);
        match self.layer_bitrates.get(layer) {
            Some(&measured) if measured > 0 => measured,
            _ if self.kind == MediaKind::Audio => ASSUMED_AUDIO,
            _ => ASSUMED_FROM_TOP
                .get(layers - 1 - layer)
                .copied()
                .unwrap_or(ASSUMED_FROM_TOP[3]),
        }
    }

    /// The bitrate of `layer` at its base frame rate, when it has temporal layers.
    fn thinned_cost(&self, layer: u8) -> Option<u64> {
        self.thinned_bitrates
            .get(usize::from(layer))
            .copied()
            .filter(|&bps| bps > 0)
    }

    /// What `grant` costs (nothing while the subscriber paused it itself).
    pub fn grant_cost(&self, grant: Grant) -> u64 {
        match grant {
            _ if self.paused => 0,
            Grant::Paused => 0,
            Grant::Thinned(layer) => self.thinned_cost(layer).unwrap_or(self.cost(layer)),
            Grant::UpTo(layer) => self.cost(layer),
        }
    }

    /// The lowest grant that sends something.
    fn lowest(&self) -> Grant {
        match self.thinned_cost(0) {
            Some(_) => Grant::Thinned(0),
            None => Grant::UpTo(0),
        }
    }

    /// The next step up from `grant` its view can use, if any.
    fn step_up(&self, grant: Grant) -> Option<Grant> {
        match grant {
            Grant::Paused => Some(self.lowest()),
            Grant::Thinned(layer) => Some(Grant::UpTo(layer)),
            Grant::UpTo(layer) if layer < self.wanted => Some(match self.thinned_cost(layer + 1) {
                Some(_) => Grant::Thinned(layer + 1),
                None => Grant::UpTo(layer + 1),
            }),
            Grant::UpTo(_) => None,
        }
    }

    /// Serving order: lower first.
    fn rank(&self) -> (u8, std::cmp::Reverse<u64>) {
        let class = match (self.source, self.speaking) {
            (Source::Screen, _) => 0,
            (_, true) => 1,
            _ => 2,
        };
        (class, std::cmp::Reverse(self.area))
    }
}

/// The grants for `demands` within `budget` bits per second, `None` for no limit.
pub fn allocate(budget: Option<u64>, demands: &[Demand]) -> Vec<Grant> {
    let mut grants: Vec<Grant> = demands
        .iter()
        .map(|demand| match demand.kind {
            MediaKind::Audio => Grant::UpTo(0),
            MediaKind::Video => Grant::UpTo(demand.wanted),
        })
        .collect();
    let Some(budget) = budget else {
        return grants;
    };
    let mut left = budget;
    for (demand, _) in demands.iter().zip(&grants) {
        if demand.kind == MediaKind::Audio && !demand.paused {
            left = left.saturating_sub(demand.cost(0));
        }
    }
    let mut order: Vec<usize> = (0..demands.len())
        .filter(|&i| demands[i].kind == MediaKind::Video && !demands[i].paused)
        .collect();
    order.sort_by_key(|&i| demands[i].rank());
    // Everyone's lowest layer first, in order, at the lowest frame rate where there is one.
    for &i in &order {
        let lowest = demands[i].lowest();
        let cost = demands[i].grant_cost(lowest);
        if cost <= left {
            left -= cost;
            grants[i] = lowest;
        } else {
            grants[i] = Grant::Paused;
        }
    }
    // Then each to its full frame rate, in order: a thumbnail at a quarter of its frame rate
    // looks broken, so no video climbs while another stutters.
    for &i in &order {
        if let Grant::Thinned(0) = grants[i] {
            let step = demands[i]
                .cost(0)
                .saturating_sub(demands[i].grant_cost(grants[i]));
            if step <= left {
                left -= step;
                grants[i] = Grant::UpTo(0);
            }
        }
    }
    // Then up, in the same order, a step at a time (the next layer at its base frame rate,
    // then at its full frame rate), as far as the view can use and the budget allows.
    for &i in &order {
        let demand = &demands[i];
        if grants[i] == Grant::Paused {
            continue;
        }
        while let Some(next) = demand.step_up(grants[i]) {
            let step = demand
                .grant_cost(next)
                .saturating_sub(demand.grant_cost(grants[i]));
            if step > left {
                break;
            }
            left -= step;
            grants[i] = next;
        }
    }
    grants
}

/// A subscriber's allocator: the estimate's history and each subscription's last change.
#[derive(Debug, Default)]
pub struct Allocator {
    highest: u64,
    limiting: bool,
}

impl Allocator {
    /// The budget for an `estimate` (bits per second, 0 for none yet), given what the
    /// subscriptions would cost with no limit: `None` while the network has not pushed back, or
    /// once the estimate has grown past that cost again.
    pub fn budget(&mut self, estimate: u64, unlimited_cost: u64) -> Option<u64> {
        if estimate == 0 {
            return None;
        }
        if estimate * FALL_DENOMINATOR < self.highest * FALL_NUMERATOR {
            self.limiting = true;
        }
        self.highest = self.highest.max(estimate);
        if self.limiting && estimate > unlimited_cost + unlimited_cost / 5 {
            self.limiting = false;
            self.highest = estimate;
        }
        self.limiting.then_some(estimate)
    }
}

/// What cost `demands` would have with no limit.
pub fn unlimited_cost(demands: &[Demand]) -> u64 {
    demands
        .iter()
        .filter(|demand| !demand.paused)
        .map(|demand| match demand.kind {
            MediaKind::Audio => demand.cost(0),
            MediaKind::Video => demand.cost(demand.wanted),
        })
        .sum()
}

/// What a subscription has, it keeps while the allocation fits in this multiple of the budget:
/// a layer's measured bitrate jumps for a moment with each keyframe (and a resumed video starts
/// with one), and without this margin that jump paused the video it resumed half a second
/// later. The pacer (1.25 times the estimate) absorbs it; real congestion lowers the estimate
/// itself.
pub const KEEP_NUMERATOR: u64 = 6;
/// See [`KEEP_NUMERATOR`].
pub const KEEP_DENOMINATOR: u64 = 5;

/// A rise must fit in this share of the budget, so that a subscription rises only with room
/// to spare and does not fall straight back (layers would flap at the edge of the estimate).
pub const RISE_NUMERATOR: u64 = 4;
/// See [`RISE_NUMERATOR`].
pub const RISE_DENOMINATOR: u64 = 5;

/// Orders grants: paused lowest, then each layer at its base frame rate below it at its full
/// frame rate.
fn level(grant: Grant) -> i16 {
    match grant {
        Grant::Paused => -1,
        Grant::Thinned(layer) => 2 * i16::from(layer),
        Grant::UpTo(layer) => 2 * i16::from(layer) + 1,
    }
}

/// One subscription's grant over time.
#[derive(Clone, Copy, Debug)]
pub struct Steady {
    grant: Grant,
    changed: Option<Instant>,
    /// The last change was a rise.
    rose: bool,
    /// The budget when it last rose.
    rose_with: u64,
    /// How long after a change the grant may rise.
    hold: Duration,
}

impl Steady {
    /// A subscription starting at `grant`, free to rise.
    pub fn new(grant: Grant) -> Self {
        Self {
            grant,
            changed: None,
            rose: false,
            rose_with: 0,
            hold: UPGRADE_HOLD,
        }
    }

    /// What the subscription may receive now.
    pub fn grant(&self) -> Grant {
        self.grant
    }

    /// The next grant, for a `budget` (bits per second): down at once to `keep` (what the
    /// whole budget allows) when that is lower, except within [`RISE_GRACE`] of a rise while
    /// the budget holds; up to `rise` (what [`RISE_NUMERATOR`] / [`RISE_DENOMINATOR`] of it
    /// allows) only when that is higher and the hold has passed since the last change; else
    /// where it is. A fall within the hold of a rise doubles the hold: the rise did not fit
    /// after all, and trying again as soon means a tile that keeps stopping and starting.
    pub fn settle(&mut self, keep: Grant, rise: Grant, budget: u64, now: Instant) -> Grant {
        let since = self.changed.map(|at| now.saturating_duration_since(at));
        let in_grace = self.rose
            && since.is_some_and(|since| since < RISE_GRACE)
            && budget * 10 >= self.rose_with * 9;
        if level(keep) < level(self.grant) {
            if in_grace {
                return self.grant;
            }
            if self.rose && since.is_some_and(|since| since < self.hold) {
                self.hold = (self.hold * 2).min(MAX_UPGRADE_HOLD);
            }
            self.change(keep, false, now);
        } else if level(rise) > level(self.grant) && since.is_none_or(|since| since >= self.hold) {
            self.change(rise, true, now);
            self.rose_with = budget;
        } else if since.is_some_and(|since| since >= STEADY_AFTER) {
            self.hold = UPGRADE_HOLD;
        }
        self.grant
    }

    /// Sets the grant without a limit to respect (the estimate does not limit now).
    pub fn set(&mut self, grant: Grant, now: Instant) -> Grant {
        if grant != self.grant {
            let rose = level(grant) > level(self.grant);
            self.change(grant, rose, now);
        }
        self.grant
    }

    fn change(&mut self, grant: Grant, rose: bool, now: Instant) {
        self.grant = grant;
        self.changed = Some(now);
        self.rose = rose;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video(source: Source, speaking: bool, area: u64, wanted: u8) -> Demand {
        Demand {
            kind: MediaKind::Video,
            source,
            speaking,
            area,
            wanted,
            layer_bitrates: vec![150_000, 500_000, 1_500_000],
            thinned_bitrates: Vec::new(),
            paused: false,
        }
    }

    fn audio() -> Demand {
        Demand {
            kind: MediaKind::Audio,
            source: Source::Microphone,
            speaking: false,
            area: 0,
            wanted: 0,
            layer_bitrates: vec![40_000],
            thinned_bitrates: Vec::new(),
            paused: false,
        }
    }

    #[test]
    fn the_budget_goes_to_audio_then_each_lowest_layer_then_up_by_priority() {
        let demands = vec![
            audio(),
            audio(),
            video(Source::Camera, false, 320 * 180, 2), // a tile
            video(Source::Camera, true, 320 * 180, 2),  // the speaker
            video(Source::Screen, false, 1280 * 720, 2),
            video(Source::Camera, false, 640 * 360, 2), // a larger tile
        ];
        let grants = |budget| allocate(Some(budget), &demands);
        use Grant::*;
        let cases: &[(u64, [Grant; 6])] = &[
            // Audio alone fits: every video paused.
            (100_000, [UpTo(0), UpTo(0), Paused, Paused, Paused, Paused]),
            // Three lowest layers: screen, speaker, then the larger tile.
            (
                80_000 + 450_000,
                [UpTo(0), UpTo(0), Paused, UpTo(0), UpTo(0), UpTo(0)],
            ),
            // All four low, then the screen climbs first.
            (
                80_000 + 600_000 + 350_000,
                [UpTo(0), UpTo(0), UpTo(0), UpTo(0), UpTo(1), UpTo(0)],
            ),
            (
                80_000 + 600_000 + 1_350_000 + 350_000,
                [UpTo(0), UpTo(0), UpTo(0), UpTo(1), UpTo(2), UpTo(0)],
            ),
            (
                100_000_000,
                [UpTo(0), UpTo(0), UpTo(2), UpTo(2), UpTo(2), UpTo(2)],
            ),
        ];
        for (budget, expected) in cases {
            assert_eq!(grants(*budget), expected.to_vec(), "budget {budget}");
        }
        assert_eq!(
            allocate(None, &demands)[2..],
            [UpTo(2), UpTo(2), UpTo(2), UpTo(2)],
            "no limit: what the views ask for"
        );
    }

    #[test]
    fn a_view_caps_the_climb_and_a_paused_video_costs_nothing() {
        let mut small = video(Source::Camera, false, 160 * 90, 0);
        let mut off = video(Source::Camera, false, 0, 2);
        off.paused = true;
        let large = video(Source::Camera, false, 1280 * 720, 2);
        small.layer_bitrates = vec![0, 0, 0]; // not measured: assumed
        let grants = allocate(Some(2_200_000), &[small, off, large]);
        assert_eq!(grants[0], Grant::UpTo(0));
        assert_eq!(grants[2], Grant::UpTo(2), "150 k + 1.5 M fit in 2.2 M");
    }

    #[test]
    fn a_lower_frame_rate_comes_before_a_lower_layer_and_a_pause() {
        let mut thin = video(Source::Camera, false, 640 * 360, 2);
        thin.thinned_bitrates = vec![60_000, 200_000, 600_000];
        let mut other = thin.clone();
        other.area = 320 * 180;
        other.wanted = 1;
        let demands = [thin, other];
        use Grant::*;
        let cases: &[(u64, [Grant; 2])] = &[
            (50_000, [Paused, Paused]),
            (130_000, [Thinned(0), Thinned(0)]),
            (60_000 + 150_000, [UpTo(0), Thinned(0)]),
            (60_000 + 150_000 + 40_000, [UpTo(0), Thinned(0)]),
            (300_000, [UpTo(0), UpTo(0)]),
            (350_000, [Thinned(1), UpTo(0)]),
            (650_000, [UpTo(1), UpTo(0)]),
            (700_000, [UpTo(1), Thinned(1)]),
            (1_000_000, [Thinned(2), Thinned(1)]),
            (1_100_000, [Thinned(2), UpTo(1)]),
            (2_000_000, [UpTo(2), UpTo(1)]),
        ];
        for (budget, expected) in cases {
            assert_eq!(
                allocate(Some(*budget), &demands),
                expected.to_vec(),
                "budget {budget}"
            );
        }
    }

    #[test]
    fn the_estimate_limits_only_once_it_has_fallen() {
        let mut allocator = Allocator::default();
        assert_eq!(allocator.budget(0, 5_000_000), None, "no estimate yet");
        assert_eq!(
            allocator.budget(1_000_000, 5_000_000),
            None,
            "rising: untested"
        );
        assert_eq!(allocator.budget(1_500_000, 5_000_000), None);
        assert_eq!(
            allocator.budget(700_000, 5_000_000),
            Some(700_000),
            "it fell"
        );
        assert_eq!(allocator.budget(900_000, 5_000_000), Some(900_000));
        assert_eq!(
            allocator.budget(6_100_000, 5_000_000),
            None,
            "well past what everything costs"
        );
    }

    #[test]
    fn falls_pass_at_once_and_rises_need_room_and_time() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        use Grant::*;
        /// Previous (changed at 0 ms unless `None`), keep, rise, now (ms), then the next grant.
        type Case = (Grant, Option<u64>, Grant, Grant, u64, Grant);
        let cases: &[Case] = &[
            (UpTo(0), Some(0), UpTo(2), UpTo(2), 1_000, UpTo(0)), // too soon
            (UpTo(0), Some(0), UpTo(2), UpTo(2), 3_000, UpTo(2)),
            (UpTo(0), Some(0), UpTo(2), UpTo(1), 3_000, UpTo(1)), // as far as the room
            (UpTo(1), None, UpTo(2), UpTo(1), 9_000, UpTo(1)),    // fits, but no room to rise
            (UpTo(2), Some(0), UpTo(0), UpTo(0), 100, UpTo(0)),   // falls at once
            (UpTo(1), Some(0), Paused, Paused, 100, Paused),
            (Paused, Some(0), UpTo(0), UpTo(0), 100, Paused),
            (Paused, None, UpTo(0), UpTo(0), 100, UpTo(0)),
        ];
        for &(previous, changed, keep, rise, now, next) in cases {
            let mut steady = Steady::new(previous);
            if let Some(changed) = changed {
                steady.change(previous, false, at(changed));
            }
            assert_eq!(
                steady.settle(keep, rise, 1_000_000, at(now)),
                next,
                "{previous:?} keep {keep:?} rise {rise:?}"
            );
        }
    }

    #[test]
    fn a_rise_taken_back_soon_waits_twice_as_long_for_the_next() {
        let start = Instant::now();
        let at = |s: f64| start + Duration::from_secs_f64(s);
        use Grant::*;
        const BUDGET: u64 = 600_000;
        const FALLEN: u64 = 500_000;
        let mut steady = Steady::new(Paused);
        steady.change(Paused, false, at(0.0));
        // Resumed at 3 s, and paused again a moment later as the estimate fell.
        assert_eq!(steady.settle(UpTo(0), UpTo(0), BUDGET, at(3.0)), UpTo(0));
        assert_eq!(steady.settle(Paused, Paused, FALLEN, at(3.5)), Paused);
        assert_eq!(
            steady.settle(UpTo(0), UpTo(0), BUDGET, at(6.5)),
            Paused,
            "3 s are no longer enough"
        );
        assert_eq!(
            steady.settle(UpTo(0), UpTo(0), BUDGET, at(9.5)),
            UpTo(0),
            "6 s are"
        );
        // With the budget where it was, a fall waits out the grace (the resume's keyframe).
        assert_eq!(
            steady.settle(Paused, Paused, BUDGET, at(10.0)),
            UpTo(0),
            "still in grace"
        );
        assert_eq!(
            steady.settle(Paused, Paused, BUDGET, at(11.5)),
            Paused,
            "after it"
        );
        assert_eq!(steady.settle(UpTo(0), UpTo(0), BUDGET, at(20.0)), Paused);
        assert_eq!(
            steady.settle(UpTo(0), UpTo(0), BUDGET, at(23.5)),
            UpTo(0),
            "then 12 s"
        );
        // A rise that holds does not lengthen the wait; a grant that stands 30 s shortens it.
        assert_eq!(steady.settle(UpTo(1), UpTo(1), BUDGET, at(40.0)), UpTo(1));
        assert_eq!(steady.settle(UpTo(1), UpTo(1), BUDGET, at(80.0)), UpTo(1));
        assert_eq!(steady.settle(UpTo(0), UpTo(0), FALLEN, at(80.5)), UpTo(0));
        assert_eq!(
            steady.settle(UpTo(1), UpTo(1), BUDGET, at(84.0)),
            UpTo(1),
            "3 s again"
        );
        // Nor does a fall long after a rise.
        assert_eq!(steady.settle(Paused, Paused, FALLEN, at(94.0)), Paused);
        assert_eq!(steady.settle(UpTo(0), UpTo(0), BUDGET, at(97.0)), UpTo(0));
    }
}
