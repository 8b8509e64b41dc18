//! Transport-wide congestion control on the send side, done by the engine itself: it numbers
//! every packet it writes to a subscriber with the transport-wide sequence number extension,
//! remembers when each left in a flat ring, and turns the subscriber's feedback into
//! [`PacketReport`]s for the [`Estimator`](crate::estimator::Estimator).
//!
//! Why not `rtc`'s TWCC sender and congestion-control interceptors: each is a queue every
//! packet is moved through, and the congestion-control history keeps three hash maps updated per
//! packet. Measured on a 20-person call, that plumbing cost 1.2-1.4 µs per forwarded packet
//! (docs/benchmarks.md); the engine already touches each packet's header, so numbering it there
//! and recording it in a ring indexed by that number costs a fraction of that.

use std::time::{Duration, Instant};

use rtc::interceptor::{BandwidthEstimator, PacketReport, convert_twcc};
use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtp;
use rtc::shared::marshal::MarshalSize;

use crate::estimator::Estimator;

/// The RTP header extension (draft-holmer-rmcat-transport-wide-cc-extensions-01) that carries
/// the transport-wide sequence number.
pub const TRANSPORT_CC_URI: &str = crate::forwarder::TRANSPORT_SCOPED_EXTENSIONS[0];

/// Packets the send history remembers: at 5,000 packets a second to one subscriber (more than
/// any room sends it) that is 1.6 s, longer than feedback ever takes to come back.
const HISTORY: usize = 8192;

/// A packet unacknowledged for this long is written off, never reported: feedback that late
/// names a path that has stopped reporting (as `rtc`'s history prunes after 2 s).
const WRITE_OFF: Duration = Duration::from_secs(2);

/// One sent packet.
#[derive(Clone, Copy, Debug)]
struct Sent {
    /// Its transport-wide number, unwrapped; `u64::MAX` for a slot never used.
    id: u64,
    ssrc: u32,
    rtp_sequence_number: u16,
    size: u32,
    departure: Instant,
    arrived: bool,
    arrival: Option<Duration>,
}

/// What left, by transport-wide sequence number, in a ring: recording a packet is one store,
/// and feedback finds a packet by its number without a lookup structure.
#[derive(Debug)]
pub struct SendHistory {
    slots: Box<[Sent]>,
    /// The next packet's unwrapped number.
    next_id: u64,
    /// The first packet not yet reported.
    next_to_report: u64,
    /// The highest packet reported as arrived, if any since the start.
    highest_arrived: Option<u64>,
}

impl SendHistory {
    /// An empty history; `now` fills the unused slots.
    pub fn new(now: Instant) -> Self {
        let empty = Sent {
            id: u64::MAX,
            ssrc: 0,
            rtp_sequence_number: 0,
            size: 0,
            departure: now,
            arrived: false,
            arrival: None,
        };
        Self {
            slots: vec![empty; HISTORY].into_boxed_slice(),
            next_id: 0,
            next_to_report: 0,
            highest_arrived: None,
        }
    }

    /// Records a packet leaving now; returns the transport-wide sequence number it carries.
    pub fn record(
        &mut self,
        ssrc: u32,
        rtp_sequence_number: u16,
        size: usize,
        now: Instant,
    ) -> u16 {
        let id = self.next_id;
        self.next_id += 1;
        self.slots[id as usize % HISTORY] = Sent {
            id,
            ssrc,
            rtp_sequence_number,
            size: size as u32,
            departure: now,
            arrived: false,
            arrival: None,
        };
        id as u16
    }

    /// The unwrapped number of the latest packet sent with the 16-bit `sequence_number`, if
    /// the ring still holds it.
    fn find(&self, sequence_number: u16) -> Option<u64> {
        let latest = self.next_id.checked_sub(1)?;
        let back = u64::from((latest as u16).wrapping_sub(sequence_number));
        let id = latest.checked_sub(back)?;
        let slot = &self.slots[id as usize % HISTORY];
        (slot.id == id).then_some(id)
    }

    /// Applies one feedback packet.
    pub fn on_feedback(&mut self, feedback: &TransportLayerCc) {
        for acknowledgement in convert_twcc(feedback) {
            let Some(id) = self.find(acknowledgement.sequence_number) else {
                continue;
            };
            let slot = &mut self.slots[id as usize % HISTORY];
            slot.arrived = acknowledgement.arrived;
            slot.arrival = acknowledgement.arrival;
            if acknowledgement.arrived {
                self.highest_arrived = Some(self.highest_arrived.map_or(id, |h| h.max(id)));
            }
        }
    }

    /// Moves into `reports`, in send order, every packet up to the highest reported as arrived
    /// that has not been reported yet: those not reported as arrived count as lost, except
    /// packets written off (unacknowledged for [`WRITE_OFF`]) or no longer in the ring.
    pub fn take_reports(&mut self, now: Instant, reports: &mut Vec<PacketReport>) {
        reports.clear();
        let Some(highest) = self.highest_arrived else {
            return;
        };
        let oldest_held = self.next_id.saturating_sub(HISTORY as u64);
        let cutoff = now.checked_sub(WRITE_OFF);
        for id in self.next_to_report.max(oldest_held)..=highest {
            let sent = self.slots[id as usize % HISTORY];
            if sent.id != id || (!sent.arrived && cutoff.is_some_and(|c| sent.departure < c)) {
                continue;
            }
            reports.push(PacketReport {
                ssrc: sent.ssrc,
                id,
                rtp_sequence_number: sent.rtp_sequence_number,
                is_twcc: true,
                twcc_sequence_number: id as u16,
                size: sent.size as usize,
                arrived: sent.arrived,
                departure: sent.departure,
                arrival: sent.arrival,
                ecn: Ecn::NotEct,
            });
        }
        self.next_to_report = self.next_to_report.max(highest + 1);
    }
}

/// One subscribe connection's send side: numbering, history, estimator.
pub struct TransportCc {
    /// The extension's id in the subscriber's answer; 0 while it negotiated none (nothing is
    /// numbered, and the estimate comes from REMB if it sends any).
    extension_id: u8,
    history: SendHistory,
    estimator: Estimator,
    reports: Vec<PacketReport>,
}

impl TransportCc {
    /// A send side feeding `estimator`, numbering nothing until [`TransportCc::negotiated`].
    pub fn new(estimator: Estimator, now: Instant) -> Self {
        Self {
            extension_id: 0,
            history: SendHistory::new(now),
            estimator,
            reports: Vec::new(),
        }
    }

    /// Sets the extension id the subscriber negotiated (0: none, or not for every stream).
    pub fn negotiated(&mut self, extension_id: u8) {
        self.extension_id = extension_id;
    }

    /// Numbers a packet about to leave and records it (its size as the feedback will count
    /// it: the RTP packet with the number in).
    pub fn stamp(&mut self, packet: &mut rtp::Packet, now: Instant) {
        if self.extension_id == 0 {
            return;
        }
        let number = self.history.next_id as u16;
        let value = bytes::Bytes::copy_from_slice(&number.to_be_bytes());
        if packet
            .header
            .set_extension(self.extension_id, value)
            .is_err()
        {
            return;
        }
        let size = MarshalSize::marshal_size(packet);
        let header = &packet.header;
        self.history
            .record(header.ssrc, header.sequence_number, size, now);
    }

    /// Applies the subscriber's feedback; returns the estimate, bits per second, when it said
    /// anything about packets this side sent.
    pub fn on_feedback(&mut self, feedback: &TransportLayerCc, now: Instant) -> Option<u64> {
        self.history.on_feedback(feedback);
        self.history.take_reports(now, &mut self.reports);
        if self.reports.is_empty() {
            return None;
        }
        self.estimator.on_reports(now, &self.reports);
        Some(self.estimator.target_bitrate() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::History;
    use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
        PacketStatusChunk, RecvDelta, RunLengthChunk, StatusChunkTypeTcc, SymbolTypeTcc,
    };

    /// Feedback from `base` on: `Some(µs)` arrived that long after the one before, `None` lost.
    fn feedback(base: u16, statuses: &[Option<i64>]) -> TransportLayerCc {
        let symbol = |s: &Option<i64>| match s {
            Some(_) => SymbolTypeTcc::PacketReceivedSmallDelta,
            None => SymbolTypeTcc::PacketNotReceived,
        };
        TransportLayerCc {
            sender_ssrc: 1,
            media_ssrc: 2,
            base_sequence_number: base,
            packet_status_count: statuses.len() as u16,
            reference_time: 10,
            fb_pkt_count: 0,
            packet_chunks: statuses
                .iter()
                .map(|s| {
                    PacketStatusChunk::RunLengthChunk(RunLengthChunk {
                        type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                        packet_status_symbol: symbol(s),
                        run_length: 1,
                    })
                })
                .collect(),
            recv_deltas: statuses
                .iter()
                .flatten()
                .map(|&delta| RecvDelta {
                    type_tcc_packet: SymbolTypeTcc::PacketReceivedSmallDelta,
                    delta,
                })
                .collect(),
        }
    }

    fn summary(reports: &[PacketReport]) -> Vec<(u16, u16, usize, bool, Option<Duration>)> {
        reports
            .iter()
            .map(|r| {
                (
                    r.twcc_sequence_number,
                    r.rtp_sequence_number,
                    r.size,
                    r.arrived,
                    r.arrival,
                )
            })
            .collect()
    }

    #[test]
    fn reports_what_rtcs_history_reports_across_the_sequence_wrap() {
        let start = Instant::now();
        let mut ours = SendHistory::new(start);
        let mut theirs = History::new();
        let mut reports = Vec::new();
        // Start just short of the wrap, so the feedback names 65,534 .. 1.
        ours.next_id = 65_534;
        for round in 0..3u16 {
            let base = 65_534u16.wrapping_add(round * 4);
            for i in 0..4u16 {
                let at = start + Duration::from_millis(u64::from(round * 4 + i) * 5);
                let number = ours.record(7, 100 + round * 4 + i, 1_000 + usize::from(i), at);
                assert_eq!(number, base.wrapping_add(i));
                theirs.add_outgoing(
                    7,
                    100 + round * 4 + i,
                    true,
                    number,
                    1_000 + usize::from(i),
                    at,
                );
            }
            // The third of each four is lost.
            let fb = feedback(base, &[Some(5_000), Some(5_000), None, Some(4_000)]);
            let now = start + Duration::from_millis(u64::from(round) * 20 + 30);
            ours.on_feedback(&fb);
            for acknowledgement in convert_twcc(&fb) {
                theirs.on_twcc_feedback(now, acknowledgement);
            }
            ours.take_reports(now, &mut reports);
            let expected = theirs.take_reports();
            assert_eq!(reports.len(), 4, "round {round}");
            assert_eq!(summary(&reports), summary(&expected), "round {round}");
            assert!(!reports[2].arrived && reports[3].arrived);
        }
    }

    #[test]
    fn a_packet_unacknowledged_for_two_seconds_is_written_off_and_old_feedback_is_ignored() {
        let start = Instant::now();
        let mut history = SendHistory::new(start);
        let mut reports = Vec::new();
        history.record(1, 1, 500, start);
        history.record(1, 2, 500, start + Duration::from_secs(3));
        history.on_feedback(&feedback(1, &[Some(1_000)]));
        history.take_reports(start + Duration::from_secs(3), &mut reports);
        assert_eq!(
            summary(&reports).len(),
            1,
            "the first packet is written off, not lost"
        );
        assert!(reports[0].arrived);

        // Feedback naming a number the ring no longer holds changes nothing.
        for i in 0..HISTORY as u16 {
            history.record(1, i, 500, start + Duration::from_secs(4));
        }
        history.on_feedback(&feedback(1, &[Some(1_000)]));
        history.take_reports(start + Duration::from_secs(4), &mut reports);
        assert!(reports.is_empty());
    }

    #[test]
    fn stamping_writes_the_number_under_the_negotiated_id_and_counts_it_in_the_size() {
        let start = Instant::now();
        let probes = std::sync::Arc::new(crate::estimator::ProbeLog::default());
        let estimator = Estimator::new(1e6, 1e5, 1e8, probes);
        let mut side = TransportCc::new(estimator, start);
        let mut packet = rtp::Packet {
            header: rtp::Header {
                version: 2,
                ssrc: 9,
                sequence_number: 40,
                ..Default::default()
            },
            payload: bytes::Bytes::from_static(&[0u8; 100]),
        };
        side.stamp(&mut packet, start);
        assert!(
            packet.header.get_extension(3).is_none(),
            "nothing before negotiation"
        );
        side.negotiated(3);
        for expected in 0..2u16 {
            let mut packet = packet.clone();
            side.stamp(&mut packet, start);
            let value = packet.header.get_extension(3).expect("numbered");
            assert_eq!(value.as_ref(), expected.to_be_bytes());
            // 12 header + 4 extension block + 1 id/len byte, 2 value, 1 padding + 100.
            assert_eq!(MarshalSize::marshal_size(&packet), 120);
        }
        let mut reports = Vec::new();
        side.history
            .on_feedback(&feedback(0, &[Some(1_000), Some(1_000)]));
        side.history.take_reports(start, &mut reports);
        assert_eq!(
            summary(&reports),
            vec![
                (0, 40, 120, true, reports[0].arrival),
                (1, 40, 120, true, reports[1].arrival)
            ]
        );
    }
}
