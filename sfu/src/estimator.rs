//! What one subscriber's network carries: a send-side bandwidth estimate from its
//! transport-wide congestion control feedback, in the manner of Google congestion control.
//!
//! Arrival groups and the acknowledged-rate window are `rtc`'s; the rest is ours, because an SFU
//! sends differently from an encoder, and `rtc`'s GCC measured badly on shaped links
//! (docs/benchmarks.md):
//! - **Delay** is a trendline (a least-squares slope of the smoothed delay over 20 groups)
//!   against an adaptive threshold, as upstream's; `rtc`'s Kalman filter on single deltas never
//!   declared overuse on a shaped link.
//! - **It never grows past what is proven.** An increase stops at 1.5 times the rate the
//!   subscriber acknowledged, as upstream GCC does: a subscriber receiving 300 kbit/s of paused
//!   video has shown nothing about 5 Mbit/s, and an estimate that climbs without evidence makes
//!   the allocator raise layers into a link that cannot carry them, then pause them again.
//! - **It knows where the link gave way before**, as a mean and spread of the rates at which it
//!   backed off for delay or for loss (a shallow queue overflows before delay shows): it creeps
//!   (additive increase) near that rate, and climbs fast (8 % a second)
//!   once it is clearly past it or far below it. `rtc`'s controller crept forever after its first
//!   back-off, so a link raised from 600 kbit/s to 5 Mbit/s took half a minute to be believed.
//! - **Probes lift it.** Growth limited by what is sent cannot find a faster link on its own, so
//!   the engine sends short probe clusters (padding-only packets which, with the media,
//!   go at twice the estimate)
//!   when the allocation wants more than the estimate; their measured arrival rate sets the
//!   estimate directly, as upstream's probe controller does. Past the known capacity a probe
//!   counts only up to that capacity's spread unless two in a row read half again past it: a
//!   token bucket lets a short probe through at line rate, and one such reading lifted the
//!   estimate on a 600 kbit/s link to 951-985 kbit/s.
//! - **Loss** above 10 % lowers it in proportion; below 2 % the loss limit recovers by 8 % a
//!   second; between, it holds. Only packets the feedback can name count.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::interceptor::{
    ArrivalGroupAccumulator, BandwidthEstimator, EstimatorStats, GCC_DEFAULT_BURST_INTERVAL,
    InterGroupDelay, PacketReport, RateCalculator, Usage,
};

/// Where a subscriber's bandwidth estimate starts, bits per second: enough for audio and low
/// video layers, so nobody starts frozen, and it grows from there.
pub const INITIAL_ESTIMATE: u64 = 1_000_000;
/// The lowest estimate: audio always fits.
pub const MIN_ESTIMATE: u64 = 100_000;
/// The highest estimate: more than any room sends one subscriber.
pub const MAX_ESTIMATE: u64 = 100_000_000;

/// Bytes a packet takes on the wire beyond its RTP size (what feedback reports): the SRTP tag,
/// UDP, IPv4 and Ethernet headers. Rates here are wire rates, which is what a link carries; it
/// matters most for small packets (audio, probe padding).
pub const PACKET_OVERHEAD: usize = 10 + 8 + 20 + 14;

/// Multiplier on the acknowledged rate when the delay signal says the queue grows.
const BACKOFF: f64 = 0.85;
/// Fastest growth, per second, away from the last back-off rate.
const MULTIPLICATIVE_GROWTH: f64 = 1.08;
/// Growth, bits per second per second, near the last back-off rate: about one packet per
/// round trip, as upstream.
const ADDITIVE_GROWTH: f64 = 50_000.0;
/// An increase stops at this multiple of the acknowledged rate, plus [`PROVEN_HEADROOM`].
const PROVEN_FACTOR: f64 = 1.5;
const PROVEN_HEADROOM: f64 = 10_000.0;
/// Changes are at least this far apart, so each is seen in the feedback before the next.
const CHANGE_INTERVAL: Duration = Duration::from_millis(200);
/// Loss fractions at which the loss limit falls, and below which it recovers.
const HIGH_LOSS: f64 = 0.10;
const LOW_LOSS: f64 = 0.02;
/// Packets a loss fraction is taken over.
const LOSS_WINDOW_PACKETS: usize = 30;
/// A probe's result counts only with this many of its packets arrived.
const PROBE_MIN_PACKETS: usize = 10;
/// A probe that lost more than this share of its packets found the link's limit.
const PROBE_MIN_ARRIVED: f64 = 0.8;
/// A probe received slower than this share of its send rate found the link's limit.
const PROBE_SATURATED: f64 = 0.9;
/// What a saturated probe's receive rate is trusted to: a little under it.
const PROBE_UTILIZATION: f64 = 0.95;
/// A probe result this many times the rate of the last back-offs shows a new link.
const PROBE_NEW_LINK: f64 = 1.5;
/// A probe window whose feedback has not come by then is given up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The time windows in which the engine sent probe clusters on one connection, for the
/// estimator to measure them. Locked once per probe and once per feedback batch, never per
/// packet.
#[derive(Debug, Default)]
pub struct ProbeLog {
    windows: Mutex<VecDeque<ProbeWindow>>,
}

/// One probe cluster: every packet sent from `start` to `end` (probe and media alike) is
/// measured together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeWindow {
    /// When the cluster's first packet left.
    pub start: Instant,
    /// When its last packet left.
    pub end: Instant,
}

impl ProbeWindow {
    fn contains(&self, departure: Instant) -> bool {
        departure >= self.start && departure <= self.end
    }
}

impl ProbeLog {
    /// Records a probe cluster sent from `start` to `end`.
    pub fn sent(&self, start: Instant, end: Instant) {
        if let Ok(mut windows) = self.windows.lock() {
            windows.push_back(ProbeWindow { start, end });
        }
    }

    /// Moves the windows recorded since the last call into `measuring`.
    fn take_into(&self, measuring: &mut Vec<ProbeMeasure>) {
        if let Ok(mut windows) = self.windows.lock() {
            measuring.extend(windows.drain(..).map(ProbeMeasure::new));
        }
    }
}

/// The rates at which the delay signal made the estimate back off: a mean and a normalised
/// variance, as upstream's link capacity estimator.
#[derive(Clone, Copy, Debug)]
struct Capacity {
    mean: f64,
    variance: f64,
}

impl Capacity {
    fn new(rate: f64) -> Self {
        Self {
            mean: rate,
            variance: 0.4,
        }
    }

    /// In bits per second; the variance is normalised in kbit/s, as upstream's.
    fn deviation(&self) -> f64 {
        (self.variance * (self.mean / 1000.0).max(1.0)).sqrt() * 1000.0
    }

    fn upper(&self) -> f64 {
        self.mean + 3.0 * self.deviation()
    }

    fn lower(&self) -> f64 {
        self.mean - 3.0 * self.deviation()
    }

    fn update(&mut self, rate: f64) {
        self.mean = 0.95 * self.mean + 0.05 * rate;
        let norm = (self.mean / 1000.0).max(1.0);
        let error = (self.mean - rate) / 1000.0;
        self.variance = (0.95 * self.variance + 0.05 * error * error / norm).clamp(0.4, 2.5);
    }
}

/// Groups a trend is fitted over.
const TREND_WINDOW: usize = 20;
/// Smoothing of the accumulated delay.
const TREND_SMOOTHING: f64 = 0.9;
/// The fitted slope is scaled by the groups seen (up to this many) and [`TREND_GAIN`] before it
/// is compared with the threshold, as upstream does.
const TREND_MAX_DELTAS: f64 = 60.0;
const TREND_GAIN: f64 = 4.0;
/// The adaptive threshold: where it starts, how fast it follows the trend up and down, and its
/// bounds (milliseconds).
const THRESHOLD_INITIAL: f64 = 12.5;
const THRESHOLD_UP: f64 = 0.0087;
const THRESHOLD_DOWN: f64 = 0.039;
const THRESHOLD_MIN: f64 = 6.0;
const THRESHOLD_MAX: f64 = 600.0;
/// Overuse is declared only after the trend has stayed over the threshold this long.
const OVERUSE_TIME_MS: f64 = 10.0;

/// The delay signal: a least-squares slope of the smoothed one-way delay over the last groups
/// of packets, against an adaptive threshold (upstream GCC's trendline estimator). A growing
/// queue shows as a rising delay long before the router drops anything, so the estimate backs
/// off before loss. `rtc`'s Kalman filter on single delay deltas hardly ever crossed its
/// threshold on a shaped link (no overuse in a minute at 50 % over the link's rate).
#[derive(Debug)]
struct Trendline {
    first: Option<Instant>,
    accumulated_ms: f64,
    smoothed_ms: f64,
    /// (milliseconds since the first group, smoothed delay) of the last groups.
    samples: VecDeque<(f64, f64)>,
    deltas: f64,
    threshold: f64,
    last_update: Option<Instant>,
    time_over_ms: f64,
    overuse_count: u32,
    previous_trend: f64,
    usage: Usage,
}

impl Default for Trendline {
    fn default() -> Self {
        Self {
            first: None,
            accumulated_ms: 0.0,
            smoothed_ms: 0.0,
            samples: VecDeque::with_capacity(TREND_WINDOW),
            deltas: 0.0,
            threshold: THRESHOLD_INITIAL,
            last_update: None,
            time_over_ms: -1.0,
            overuse_count: 0,
            previous_trend: 0.0,
            usage: Usage::Normal,
        }
    }
}

impl Trendline {
    fn update(&mut self, delay: &InterGroupDelay) -> Usage {
        let first = *self.first.get_or_insert(delay.at);
        let at_ms = delay.at.saturating_duration_since(first).as_secs_f64() * 1000.0;
        self.deltas = (self.deltas + 1.0).min(TREND_MAX_DELTAS);
        self.accumulated_ms += delay.delta_ms;
        self.smoothed_ms =
            TREND_SMOOTHING * self.smoothed_ms + (1.0 - TREND_SMOOTHING) * self.accumulated_ms;
        if self.samples.len() == TREND_WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((at_ms, self.smoothed_ms));
        if self.samples.len() < TREND_WINDOW {
            return self.usage;
        }
        let n = self.samples.len() as f64;
        let mean_x = self.samples.iter().map(|s| s.0).sum::<f64>() / n;
        let mean_y = self.samples.iter().map(|s| s.1).sum::<f64>() / n;
        let (mut numerator, mut denominator) = (0.0, 0.0);
        for &(x, y) in &self.samples {
            numerator += (x - mean_x) * (y - mean_y);
            denominator += (x - mean_x) * (x - mean_x);
        }
        let trend = if denominator > 0.0 {
            numerator / denominator
        } else {
            self.previous_trend
        };
        self.detect(trend, delay.at)
    }

    fn detect(&mut self, trend: f64, now: Instant) -> Usage {
        let modified = self.deltas * trend * TREND_GAIN;
        let elapsed_ms = self.last_update.map_or(0.0, |last| {
            now.saturating_duration_since(last).as_secs_f64() * 1000.0
        });
        if modified > self.threshold {
            if self.time_over_ms < 0.0 {
                self.time_over_ms = elapsed_ms / 2.0;
            } else {
                self.time_over_ms += elapsed_ms;
            }
            self.overuse_count += 1;
            if self.time_over_ms > OVERUSE_TIME_MS
                && self.overuse_count > 1
                && trend >= self.previous_trend
            {
                self.time_over_ms = 0.0;
                self.overuse_count = 0;
                self.usage = Usage::Over;
            }
        } else if modified < -self.threshold {
            self.time_over_ms = -1.0;
            self.overuse_count = 0;
            self.usage = Usage::Under;
        } else {
            self.time_over_ms = -1.0;
            self.overuse_count = 0;
            self.usage = Usage::Normal;
        }
        self.previous_trend = trend;
        // The threshold follows the trend (slowly up, faster down) so a jittery path is not
        // read as congested forever; a spike far outside it does not move it.
        if modified.abs() <= self.threshold + 15.0 {
            let gain = if modified.abs() < self.threshold {
                THRESHOLD_DOWN
            } else {
                THRESHOLD_UP
            };
            self.threshold += gain * (modified.abs() - self.threshold) * elapsed_ms.min(100.0);
            self.threshold = self.threshold.clamp(THRESHOLD_MIN, THRESHOLD_MAX);
        }
        self.last_update = Some(now);
        self.usage
    }
}

/// A probe window being measured.
#[derive(Clone, Debug)]
struct ProbeMeasure {
    window: ProbeWindow,
    packets: usize,
    sent_bytes: usize,
    first_departure: Option<Instant>,
    last_departure: Option<Instant>,
    last_sent_size: usize,
    /// Arrival time and size of each packet that arrived.
    arrivals: Vec<(Duration, usize)>,
}

impl ProbeMeasure {
    fn new(window: ProbeWindow) -> Self {
        Self {
            window,
            packets: 0,
            sent_bytes: 0,
            first_departure: None,
            last_departure: None,
            last_sent_size: 0,
            arrivals: Vec::new(),
        }
    }

    fn add(&mut self, report: &PacketReport) {
        let size = report.size + PACKET_OVERHEAD;
        self.packets += 1;
        self.sent_bytes += size;
        self.first_departure.get_or_insert(report.departure);
        if self
            .last_departure
            .is_none_or(|last| report.departure >= last)
        {
            self.last_departure = Some(report.departure);
            self.last_sent_size = size;
        }
        if let (true, Some(arrival)) = (report.arrived, report.arrival) {
            self.arrivals.push((arrival, size));
        }
    }

    /// The rate the link showed it carries, bits per second, when the probe says anything.
    ///
    /// The receive rate is taken over the later half of the arrivals: a link's token bucket
    /// (or a radio's aggregation) lets the start of a cluster through at line rate, and that
    /// burst says nothing about the rate the link keeps up.
    fn result(&mut self) -> Option<f64> {
        if self.arrivals.len() < PROBE_MIN_PACKETS {
            return None;
        }
        let send_span = self
            .last_departure?
            .saturating_duration_since(self.first_departure?)
            .as_secs_f64();
        self.arrivals.sort_unstable_by_key(|&(arrival, _)| arrival);
        let later = &self.arrivals[self.arrivals.len() / 2..];
        let (first_arrival, _) = *later.first()?;
        let (last_arrival, _) = *later.last()?;
        let receive_span = last_arrival.saturating_sub(first_arrival).as_secs_f64();
        if send_span < 0.001 || receive_span < 0.001 {
            return None;
        }
        // The first packet sent opens the send interval, and the first packet of the later
        // half opens the receive interval: neither's bytes belong inside it.
        let send_rate = (self.sent_bytes - self.last_sent_size) as f64 * 8.0 / send_span;
        let later_bytes: usize = later.iter().skip(1).map(|&(_, size)| size).sum();
        let receive_rate = later_bytes as f64 * 8.0 / receive_span;
        let lossy = (self.arrivals.len() as f64) < PROBE_MIN_ARRIVED * self.packets as f64;
        Some(if lossy || receive_rate < PROBE_SATURATED * send_rate {
            receive_rate.min(send_rate) * PROBE_UTILIZATION
        } else {
            send_rate.min(receive_rate)
        })
    }
}

/// The send-side bandwidth estimator of one subscribe connection (see the module docs).
pub struct Estimator {
    groups: ArrivalGroupAccumulator,
    trendline: Trendline,
    acked: RateCalculator,
    probes: Arc<ProbeLog>,
    measuring: Vec<ProbeMeasure>,
    /// The delay-based target.
    delay_target: f64,
    /// The loss-based limit (infinite while loss is low and the delay target leads).
    loss_limit: f64,
    capacity: Option<Capacity>,
    last_change: Option<Instant>,
    last_loss_change: Option<Instant>,
    /// The last probe read well past the known capacity: the next must too before the link is
    /// taken to have changed.
    new_link_seen: bool,
    loss_window: (usize, usize),
    last_loss: Option<f64>,
    min: f64,
    max: f64,
}

impl Estimator {
    /// An estimator starting at `initial` bits per second, held within `min..=max`, measuring
    /// the probe clusters recorded in `probes`.
    pub fn new(initial: f64, min: f64, max: f64, probes: Arc<ProbeLog>) -> Self {
        Self {
            groups: ArrivalGroupAccumulator::new(GCC_DEFAULT_BURST_INTERVAL),
            trendline: Trendline::default(),
            acked: RateCalculator::new(Duration::from_millis(500)),
            probes,
            measuring: Vec::new(),
            delay_target: initial.clamp(min, max),
            loss_limit: f64::INFINITY,
            capacity: None,
            last_change: None,
            last_loss_change: None,
            new_link_seen: false,
            loss_window: (0, 0),
            last_loss: None,
            min,
            max,
        }
    }

    fn target(&self) -> f64 {
        self.delay_target
            .min(self.loss_limit)
            .clamp(self.min, self.max)
    }

    fn control_delay(&mut self, now: Instant, usage: Usage, acked: Option<f64>) {
        let since = self
            .last_change
            .map(|last| now.saturating_duration_since(last));
        if since.is_some_and(|since| since < CHANGE_INTERVAL) {
            return;
        }
        let elapsed = since.unwrap_or(CHANGE_INTERVAL).min(Duration::from_secs(1));
        match usage {
            Usage::Over => {
                let Some(acked) = acked else {
                    return;
                };
                if self.capacity.is_some_and(|c| acked < c.lower()) {
                    self.capacity = None;
                }
                match &mut self.capacity {
                    Some(capacity) => capacity.update(acked),
                    None => self.capacity = Some(Capacity::new(acked)),
                }
                self.delay_target = self.delay_target.min(BACKOFF * acked).max(self.min);
                self.last_change = Some(now);
                tracing::debug!(acked, target = self.delay_target, "overuse: backed off");
            }
            // The queue drains: hold until it has.
            Usage::Under => {}
            Usage::Normal => {
                if let (Some(capacity), Some(acked)) = (self.capacity, acked)
                    && acked > capacity.upper()
                {
                    self.capacity = None;
                }
                let grown = match self.capacity {
                    Some(capacity) if self.delay_target > capacity.lower() => {
                        self.delay_target + ADDITIVE_GROWTH * elapsed.as_secs_f64()
                    }
                    _ => self.delay_target * MULTIPLICATIVE_GROWTH.powf(elapsed.as_secs_f64()),
                };
                // Never past what has been shown to arrive (and never lowered by it: a
                // subscriber that receives little for a while keeps its estimate).
                let proven = acked.map_or(self.delay_target, |acked| {
                    PROVEN_FACTOR * acked + PROVEN_HEADROOM
                });
                self.delay_target = grown.min(proven.max(self.delay_target)).min(self.max);
                self.last_change = Some(now);
            }
        }
    }

    fn control_loss(&mut self, now: Instant, reports: &[PacketReport], acked: Option<f64>) {
        // A probe past the link's rate loses packets by design: what it measured says so, and
        // counting its losses here would lower the estimate for probing.
        for report in reports {
            // `rtc` reports a packet without a transport-wide sequence number (a stream that did
            // not negotiate it, as Firefox's audio) as lost: its feedback cannot name it.
            if !report.is_twcc
                || self
                    .measuring
                    .iter()
                    .any(|probe| probe.window.contains(report.departure))
            {
                continue;
            }
            self.loss_window.0 += usize::from(!report.arrived);
            self.loss_window.1 += 1;
        }
        if self.loss_window.1 < LOSS_WINDOW_PACKETS {
            return;
        }
        let loss = self.loss_window.0 as f64 / self.loss_window.1 as f64;
        self.loss_window = (0, 0);
        self.last_loss = Some(loss);
        let since = self
            .last_loss_change
            .map(|last| now.saturating_duration_since(last));
        if loss > HIGH_LOSS {
            if since.is_none_or(|since| since >= CHANGE_INTERVAL) {
                self.loss_limit = self.target() * (1.0 - 0.5 * loss);
                self.last_loss_change = Some(now);
                // What arrived while the link lost this much is where it gives way, as a
                // delay back-off records: a shallow queue overflows before delay shows.
                if let Some(acked) = acked {
                    match &mut self.capacity {
                        Some(capacity) if acked >= capacity.lower() => capacity.update(acked),
                        _ => self.capacity = Some(Capacity::new(acked)),
                    }
                }
                tracing::debug!(loss, limit = self.loss_limit, "loss: limited");
            }
        } else if loss < LOW_LOSS && self.loss_limit.is_finite() {
            let elapsed = since.unwrap_or(CHANGE_INTERVAL).min(Duration::from_secs(1));
            self.loss_limit *= MULTIPLICATIVE_GROWTH.powf(elapsed.as_secs_f64());
            self.last_loss_change = Some(now);
            if self.loss_limit >= self.delay_target {
                self.loss_limit = f64::INFINITY;
            }
        }
    }

    fn measure_probes(&mut self, now: Instant, reports: &[PacketReport]) {
        if self.measuring.is_empty() {
            return;
        }
        let mut newest_departure = None;
        for report in reports {
            newest_departure = newest_departure.max(Some(report.departure));
            for probe in &mut self.measuring {
                if report.is_twcc && probe.window.contains(report.departure) {
                    probe.add(report);
                }
            }
        }
        let mut results = Vec::new();
        self.measuring.retain_mut(|probe| {
            // Reports come in send order: once one left after the window, it is complete.
            let complete = newest_departure.is_some_and(|d| d > probe.window.end);
            let stale = now.saturating_duration_since(probe.window.end) > PROBE_TIMEOUT;
            if complete {
                match probe.result() {
                    Some(result) => results.push(result),
                    None => tracing::debug!(
                        packets = probe.packets,
                        arrived = probe.arrivals.len(),
                        "probe inconclusive"
                    ),
                }
            }
            !(complete || stale)
        });
        for result in results {
            let mut result = result.clamp(self.min, self.max);
            // Past the rate where the link gave way before, a probe is trusted only up to that
            // rate's spread: a token bucket's burst reads as a faster link. Well past it, the
            // link may have changed, but one probe is not enough: on the shaped rig a 160 ms
            // probe's later half read 951-985 kbit/s through a 600 kbit/s link's 4 kB bucket,
            // once in about ten probes, and the layers that followed overflowed the link for
            // two seconds. Two such probes in a row are a new link.
            if let Some(capacity) = self.capacity {
                let new_link = result >= PROBE_NEW_LINK * capacity.mean;
                if !(new_link && self.new_link_seen) {
                    result = result.min(capacity.upper());
                }
                self.new_link_seen = new_link && !self.new_link_seen;
            } else {
                self.new_link_seen = false;
            }
            tracing::debug!(result, before = self.target(), "probe measured");
            if result > self.delay_target {
                self.delay_target = result;
                if self.capacity.is_some_and(|c| result > c.upper()) {
                    self.capacity = None;
                }
            }
            if self.loss_limit.is_finite() {
                self.loss_limit = self.loss_limit.max(result);
                if self.loss_limit >= self.delay_target {
                    self.loss_limit = f64::INFINITY;
                }
            }
        }
    }
}

impl BandwidthEstimator for Estimator {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        if reports.is_empty() {
            return;
        }
        let mut usage = self.trendline.usage;
        for report in reports {
            if report.arrived {
                self.acked.add(now, report.size + PACKET_OVERHEAD);
            }
            if let Some(delay) = self.groups.accumulate(report) {
                usage = self.trendline.update(&delay);
            }
        }
        let acked = self.acked.rate_bits_per_second(now);
        self.probes.take_into(&mut self.measuring);
        self.control_delay(now, usage, acked);
        self.control_loss(now, reports, acked);
        self.measure_probes(now, reports);
    }

    fn target_bitrate(&self) -> f64 {
        self.target()
    }

    fn stats(&self) -> EstimatorStats {
        let mut stats = EstimatorStats::default();
        stats.delay_based_bitrate = Some(self.delay_target);
        stats.loss_based_bitrate = Some(self.loss_limit);
        stats.packet_loss = self.last_loss;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-queue bottleneck: `rate` bits per second, `queue` seconds of buffer (tail drop),
    /// feedback every 50 ms, 20 ms of one-way delay; with a `bucket`, a token bucket of that
    /// many bytes lets a burst through at line rate, as tc's tbf does.
    struct Link {
        rate: f64,
        queue: Duration,
        bucket: f64,
        tokens: f64,
        tokens_at: Duration,
        busy_until: Duration,
        pending: Vec<PacketReport>,
        next_id: u64,
        dropped: usize,
        /// What the simulation's times count from.
        epoch: Instant,
    }

    impl Link {
        fn new(rate: f64) -> Self {
            Self {
                rate,
                queue: Duration::from_millis(100),
                bucket: 0.0,
                tokens: 0.0,
                tokens_at: Duration::ZERO,
                busy_until: Duration::ZERO,
                pending: Vec::new(),
                next_id: 0,
                dropped: 0,
                epoch: Instant::now(),
            }
        }

        fn send(&mut self, epoch: Instant, at: Duration, size: usize) {
            let start = self.busy_until.max(at);
            let refill = start.saturating_sub(self.tokens_at).as_secs_f64() * self.rate / 8.0;
            let tokens = (self.tokens + refill).min(self.bucket);
            // Without tokens enough, the packet waits for them at the link's rate.
            let wait = (size as f64 - tokens).max(0.0) * 8.0 / self.rate;
            let departure = start + Duration::from_secs_f64(wait);
            let arrived = departure - at <= self.queue;
            let arrival = if arrived {
                self.tokens = (tokens + wait * self.rate / 8.0 - size as f64).max(0.0);
                self.tokens_at = departure;
                self.busy_until = departure;
                Some(departure + Duration::from_millis(20))
            } else {
                self.dropped += 1;
                None
            };
            self.next_id += 1;
            self.pending.push(PacketReport {
                ssrc: 1,
                id: self.next_id,
                rtp_sequence_number: self.next_id as u16,
                is_twcc: true,
                twcc_sequence_number: self.next_id as u16,
                size,
                arrived,
                departure: epoch + at,
                arrival,
                ecn: Default::default(),
            });
        }
    }

    /// Runs `seconds` of a sender that sends `fill` times `min(estimate, demand)` in 1200-byte
    /// packets every 5 ms (an allocation in whole layers leaves some of the estimate unused),
    /// probing at twice the estimate for 30 ms every `probe_every` while the demand is above
    /// the estimate; returns the estimate each second.
    /// A probe's padding packets, bytes.
    const PROBE_PACKET: f64 = 100.0;

    #[allow(clippy::too_many_arguments)]
    fn simulate(
        estimator: &mut Estimator,
        probes: &ProbeLog,
        link: &mut Link,
        from: Duration,
        seconds: u64,
        demand: f64,
        probe_every: Option<Duration>,
        fill: f64,
    ) -> Vec<f64> {
        let epoch = link.epoch;
        let tick = Duration::from_millis(5);
        let mut at = from;
        let end = from + Duration::from_secs(seconds);
        let mut credit = 0.0;
        let mut next_feedback = from + Duration::from_millis(50);
        let mut next_probe = from + Duration::from_millis(500);
        let mut out = Vec::new();
        let mut next_second = from + Duration::from_secs(1);
        while at < end {
            let target = estimator.target_bitrate();
            credit += fill * demand.min(target) * tick.as_secs_f64() / 8.0;
            while credit >= 1200.0 {
                link.send(epoch, at, 1200);
                credit -= 1200.0;
            }
            if let Some(every) = probe_every
                && at >= next_probe
                && demand > target
            {
                // As the transport probes: padding up to twice the estimate with what is sent
                // (at least half the estimate), 30 ms of it but at least 6 kB, in small packets.
                let sent = fill * demand.min(target);
                let rate = (2.0 * target - sent).max(target / 2.0);
                let bytes = (rate * 0.03 / 8.0).max(6_000.0);
                let count = (bytes / PROBE_PACKET) as usize;
                let gap = Duration::from_secs_f64(PROBE_PACKET * 8.0 / rate);
                let start = at;
                for i in 0..count {
                    link.send(epoch, start + gap * i as u32, PROBE_PACKET as usize);
                }
                probes.sent(epoch + start, epoch + start + gap * (count as u32 - 1));
                next_probe = at + every;
            }
            if at >= next_feedback {
                let now = epoch + at;
                let (mut ready, later): (Vec<_>, Vec<_>) = link
                    .pending
                    .drain(..)
                    .partition(|r| r.arrival.is_none_or(|a| a <= at) && r.departure <= now);
                link.pending = later;
                ready.sort_by_key(|r| r.departure);
                estimator.on_reports(now, &ready);
                next_feedback = at + Duration::from_millis(50);
            }
            if at >= next_second {
                out.push(estimator.target_bitrate());
                next_second += Duration::from_secs(1);
            }
            at += tick;
        }
        out
    }

    fn estimator(initial: f64) -> (Estimator, Arc<ProbeLog>) {
        let probes = Arc::new(ProbeLog::default());
        (
            Estimator::new(initial, 100_000.0, 100_000_000.0, probes.clone()),
            probes,
        )
    }

    #[test]
    fn a_slow_link_is_found_from_above_and_held_near_its_rate() {
        let (mut estimator, probes) = estimator(1_000_000.0);
        let mut link = Link::new(600_000.0);
        let every = Some(Duration::from_secs(2));
        let estimates = simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::ZERO,
            30,
            5_000_000.0,
            every,
            1.0,
        );
        let settled = &estimates[10..];
        assert!(
            settled.iter().all(|e| (420_000.0..=780_000.0).contains(e)),
            "within 30 % of 600 kbit/s after 10 s: {estimates:?}"
        );
    }

    #[test]
    fn a_token_buckets_burst_does_not_read_as_a_faster_link() {
        // tc's tbf on the shaped rig: 600 kbit/s with a 4 kB bucket, and an allocation in whole
        // layers that leaves the bucket time to fill between frames. A probe that fits in the
        // bucket arrives as fast as it left, and must not read as a faster link.
        let (mut estimator, probes) = estimator(1_000_000.0);
        let mut link = Link::new(600_000.0);
        link.bucket = 4_000.0;
        let estimates = simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::ZERO,
            40,
            5_000_000.0,
            Some(Duration::from_secs(2)),
            0.7,
        );
        let mut settled = estimates[10..].to_vec();
        settled.sort_by(f64::total_cmp);
        let median = settled[settled.len() / 2];
        assert!(
            (420_000.0..=780_000.0).contains(&median),
            "settles within 30 % of the link: {estimates:?}"
        );
        assert!(
            settled.iter().all(|e| *e < 900_000.0),
            "and never jumps to half again the link: {estimates:?}"
        );
    }

    /// Sends a probe cluster at `at` that arrives as fast as it left, `rate` bits per second of
    /// payload (more on the wire), as a token bucket's burst does, and one packet after it
    /// that completes its feedback.
    fn bucket_burst(link: &mut Link, probes: &ProbeLog, at: Duration, rate: f64) {
        let link_rate = link.rate;
        link.rate = rate;
        let gap = Duration::from_secs_f64(PROBE_PACKET * 8.0 / rate);
        for i in 0..=60 {
            link.send(link.epoch, at + gap * i, PROBE_PACKET as usize);
        }
        probes.sent(link.epoch + at, link.epoch + at + gap * 59);
        link.rate = link_rate;
    }

    #[test]
    fn one_probe_well_past_the_known_capacity_does_not_lift_the_estimate_past_it() {
        let (mut estimator, probes) = estimator(1_000_000.0);
        let mut link = Link::new(600_000.0);
        let every = Some(Duration::from_secs(2));
        simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::ZERO,
            20,
            5_000_000.0,
            every,
            0.7,
        );
        let known = estimator.target_bitrate();
        assert!(known <= 780_000.0, "the link is known: {known}");
        let at = Duration::from_millis(20_000);
        bucket_burst(&mut link, &probes, at, 950_000.0);
        // Its feedback, as the next report brings it.
        let now = at + Duration::from_millis(150);
        let mut reports: Vec<PacketReport> = link
            .pending
            .drain(..)
            .filter(|r| r.departure <= link.epoch + now)
            .collect();
        reports.sort_by_key(|r| r.departure);
        estimator.on_reports(link.epoch + now, &reports);
        let after = estimator.target_bitrate();
        assert!(
            after <= 780_000.0,
            "one burst at 950 kbit/s does not make a 600 kbit/s link faster: {after}"
        );
    }

    #[test]
    fn a_deep_buffer_is_seen_by_delay_before_any_loss() {
        let (mut estimator, probes) = estimator(1_000_000.0);
        let mut link = Link::new(600_000.0);
        // Two seconds of buffer: nothing is dropped, only delayed.
        link.queue = Duration::from_secs(2);
        let estimates = simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::ZERO,
            20,
            5_000_000.0,
            None,
            1.0,
        );
        assert_eq!(link.dropped, 0, "the deep buffer dropped nothing");
        assert!(
            estimates[5..].iter().all(|e| *e <= 780_000.0),
            "at most 30 % over 600 kbit/s after 5 s, from delay alone: {estimates:?}"
        );
    }

    #[test]
    fn packets_feedback_cannot_name_are_not_loss() {
        let (mut estimator, _probes) = estimator(1_000_000.0);
        let epoch = Instant::now();
        for round in 0..40u64 {
            let at = epoch + Duration::from_millis(50 * round);
            let reports: Vec<PacketReport> = (0..20u64)
                .map(|i| {
                    let id = round * 20 + i;
                    // Every other packet is of a stream without transport-wide numbers.
                    let is_twcc = i % 2 == 0;
                    let arrival = Duration::from_micros(20_000 + 50_000 * round + 2500 * i);
                    PacketReport {
                        ssrc: 1,
                        id,
                        rtp_sequence_number: id as u16,
                        is_twcc,
                        twcc_sequence_number: id as u16,
                        size: 1200,
                        arrived: is_twcc,
                        departure: at + Duration::from_micros(2500 * i),
                        arrival: is_twcc.then_some(arrival),
                        ecn: Default::default(),
                    }
                })
                .collect();
            estimator.on_reports(at + Duration::from_millis(70), &reports);
        }
        assert!(
            estimator.target_bitrate() >= 1_000_000.0,
            "half the packets unnameable by feedback is no loss: {}",
            estimator.target_bitrate()
        );
    }

    #[test]
    fn a_raised_link_is_found_by_probes_within_seconds() {
        let (mut estimator, probes) = estimator(1_000_000.0);
        let mut link = Link::new(600_000.0);
        let every = Some(Duration::from_secs(1));
        simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::ZERO,
            20,
            5_000_000.0,
            every,
            1.0,
        );
        link.rate = 5_000_000.0;
        let estimates = simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::from_secs(20),
            10,
            4_000_000.0,
            every,
            1.0,
        );
        let reached = estimates.iter().position(|e| *e >= 2_000_000.0);
        assert!(
            reached.is_some_and(|s| s < 8),
            "past 2 Mbit/s within 8 s of the link rising to 5 Mbit/s: {estimates:?}"
        );
    }

    #[test]
    fn without_probes_it_does_not_climb_past_what_arrives() {
        let (mut estimator, probes) = estimator(1_000_000.0);
        let mut link = Link::new(50_000_000.0);
        // The subscriber takes only 300 kbit/s: the estimate may not claim 50 Mbit/s.
        let estimates = simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::ZERO,
            20,
            300_000.0,
            None,
            1.0,
        );
        assert!(
            estimates.iter().all(|e| *e <= 1_000_000.0),
            "never past the start, since only 300 kbit/s was ever shown: {estimates:?}"
        );
    }

    #[test]
    fn a_cut_link_lowers_the_estimate_within_two_seconds() {
        let (mut estimator, probes) = estimator(1_000_000.0);
        let mut link = Link::new(5_000_000.0);
        let every = Some(Duration::from_secs(1));
        simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::ZERO,
            15,
            3_000_000.0,
            every,
            1.0,
        );
        assert!(
            estimator.target_bitrate() >= 2_500_000.0,
            "{}",
            estimator.target_bitrate()
        );
        link.rate = 400_000.0;
        let estimates = simulate(
            &mut estimator,
            &probes,
            &mut link,
            Duration::from_secs(15),
            6,
            3_000_000.0,
            every,
            1.0,
        );
        assert!(
            estimates[1] <= 800_000.0 && estimates[4] >= 280_000.0 && estimates[4] <= 560_000.0,
            "under twice the link 2 s after the cut, near it after 6 s: {estimates:?}"
        );
    }
}
