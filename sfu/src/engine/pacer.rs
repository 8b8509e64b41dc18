//! Each limited subscriber's pacer: video leaves at a multiple of its bandwidth estimate, resends
//! before new video, probes at their own rate; audio goes at once but is counted.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::shared::marshal::MarshalSize;

use super::run::Conn;
use crate::exchange::ConnId;

/// While its allocation is limited, a subscriber's video leaves at most this many times its
/// estimate: the allocation keeps the average under the estimate, and the pacer spreads a
/// keyframe's burst so a shallow router buffer does not overflow (and take audio with it).
pub(super) const PACING_FACTOR: f64 = 1.25;
/// The most a pacer lets leave at once: this long at its rate...
pub(super) const PACER_BURST: Duration = Duration::from_millis(10);
/// ... but at least two full packets.
pub(super) const MIN_PACER_BURST_BYTES: f64 = 2_500.0;
/// Video a pacer holds longer than this at its rate is dropped, oldest first (the subscriber
/// NACKs it, or waits for a keyframe): the allocation lowers layers within a second, and a
/// queue that grows without bound would only delay everything behind it.
pub(super) const MAX_PACER_DELAY: Duration = Duration::from_millis(500);

/// One subscriber's pacer: a budget of bytes refilled at the pace rate, the resends and video
/// waiting for it (resends first), and a probe cluster being sent at its own rate.
#[derive(Default)]
pub(super) struct Pacer {
    /// Bytes that may leave now; negative when audio or a burst overdrew it.
    pub(super) budget: f64,
    pub(super) refilled: Option<Instant>,
    pub(super) resend: VecDeque<(RTCRtpSenderId, rtp::Packet)>,
    pub(super) video: VecDeque<(RTCRtpSenderId, rtp::Packet)>,
    /// Bytes of `resend` and `video`.
    pub(super) queued_bytes: usize,
    pub(super) probe: VecDeque<(RTCRtpSenderId, rtp::Packet)>,
    /// When the next probe packet leaves, and when the cluster's first one left.
    pub(super) probe_next: Option<Instant>,
    pub(super) probe_started: Option<Instant>,
    /// On the engine's list of pacers with something waiting.
    pub(super) listed: bool,
}

impl Pacer {
    pub(super) fn refill(&mut self, now: Instant, rate: f64) {
        let elapsed = self
            .refilled
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        let burst = (rate * PACER_BURST.as_secs_f64()).max(MIN_PACER_BURST_BYTES);
        self.budget = (self.budget + rate * elapsed).min(burst);
        self.refilled = Some(now);
    }

    /// Whether a packet of `bytes` may leave now, at `rate`: nothing waits before it and the
    /// budget has room (which it then takes).
    pub(super) fn admit(&mut self, now: Instant, rate: f64, bytes: usize) -> bool {
        self.refill(now, rate);
        let admitted = self.video.is_empty() && self.resend.is_empty() && self.budget > 0.0;
        if admitted {
            self.budget -= bytes as f64;
        }
        admitted
    }

    pub(super) fn is_idle(&self) -> bool {
        self.video.is_empty() && self.resend.is_empty() && self.probe.is_empty()
    }

    /// The most a pacer holds at `rate`: what leaves in [`MAX_PACER_DELAY`].
    pub(super) fn limit(rate: f64) -> usize {
        (rate * MAX_PACER_DELAY.as_secs_f64()) as usize
    }

    /// Queues a resend behind other resends, ahead of video, when the pacer has room for it;
    /// false when it has not (the packet is dropped).
    pub(super) fn queue_resend(
        &mut self,
        rate: f64,
        sender: RTCRtpSenderId,
        packet: rtp::Packet,
    ) -> bool {
        let bytes = packet_bytes(&packet);
        if self.queued_bytes + bytes > Self::limit(rate) {
            return false;
        }
        self.queued_bytes += bytes;
        self.resend.push_back((sender, packet));
        true
    }

    /// Queues video, then drops the oldest beyond what `rate` sends in [`MAX_PACER_DELAY`];
    /// how many were dropped.
    pub(super) fn queue_video(
        &mut self,
        rate: f64,
        sender: RTCRtpSenderId,
        packet: rtp::Packet,
    ) -> u64 {
        self.queued_bytes += packet_bytes(&packet);
        self.video.push_back((sender, packet));
        let limit = Self::limit(rate);
        let mut dropped = 0;
        while self.queued_bytes > limit
            && let Some((_, packet)) = self.video.pop_front()
        {
            self.queued_bytes -= packet_bytes(&packet);
            dropped += 1;
        }
        dropped
    }

    /// The next packet due, resends first.
    pub(super) fn pop(&mut self) -> Option<(RTCRtpSenderId, rtp::Packet)> {
        let next = self.resend.pop_front().or_else(|| self.video.pop_front());
        if let Some((_, packet)) = &next {
            self.queued_bytes -= packet_bytes(packet);
        }
        next
    }
}

/// A packet's size on the wire, as the estimate counts it.
pub(super) fn packet_bytes(packet: &rtp::Packet) -> usize {
    packet.header.marshal_size() + packet.payload.len() + crate::estimator::PACKET_OVERHEAD
}

/// Puts a connection whose pacer now holds something on the engine's list (once).
pub(super) fn list_pacer(paced: &mut Vec<ConnId>, conn: &mut Conn, id: ConnId) {
    if !conn.pacer.listed {
        conn.pacer.listed = true;
        paced.push(id);
    }
}
