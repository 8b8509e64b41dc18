//! RTCP sender reports for a subscriber's streams, kept by the engine as it writes each packet.
//!
//! A subscriber needs them to line up each stream's RTP timestamps with one wall clock (audio
//! and video in sync) and to count what was sent. `rtc`'s sender-report interceptor did this
//! too, but as one more queue every packet moves through and a SipHash lookup per packet; here
//! it is a lookup by SSRC (random already, so it is its own hash) where the engine writes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::shared::time::SystemInstant;

/// How often each stream is reported (RFC 3550 allows 5 s; browsers report every second).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A stream that sent nothing for this long is forgotten, and reported again only once it
/// sends (a paused video layer, a removed track).
const IDLE: Duration = Duration::from_secs(5);

/// SSRCs are chosen at random (RFC 3550 8.1), so the value is as good as a hash.
#[derive(Default)]
struct SsrcHasher(u64);

impl Hasher for SsrcHasher {
    fn finish(&self) -> u64 {
        // Spread the bits over the whole word: the map takes its bucket from the top bits.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8) | u64::from(byte);
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.0 = u64::from(value);
    }
}

/// One stream's counters and its latest RTP timestamp with the instant it was sent at.
#[derive(Clone, Copy, Debug)]
struct Stream {
    sender: RTCRtpSenderId,
    clock_rate: u32,
    last_sequence_number: u16,
    last_timestamp: u32,
    /// When the first packet with `last_timestamp` left: a frame's later packets do not move
    /// the mapping, so how long a large frame takes to write does not skew it.
    last_timestamp_at: Instant,
    last_sent: Instant,
    packets: u32,
    octets: u32,
}

/// One subscribe connection's sender reports.
pub struct SenderReports {
    streams: HashMap<u32, Stream, BuildHasherDefault<SsrcHasher>>,
    /// The wall clock read once: every stream's report maps from the same one, so they agree.
    clock: SystemInstant,
    next_due: Option<Instant>,
}

impl SenderReports {
    /// No streams yet; `now` is paired with the wall clock.
    pub fn new(now: Instant) -> Self {
        Self {
            streams: HashMap::default(),
            clock: SystemInstant::now(now),
            next_due: None,
        }
    }

    /// Counts a packet written on `sender`. `clock_rate` is asked only for a stream's first
    /// packet (0 or `None`: the stream is not reported).
    pub fn on_sent(
        &mut self,
        sender: RTCRtpSenderId,
        packet: &rtp::Packet,
        now: Instant,
        clock_rate: impl FnOnce() -> Option<u32>,
    ) {
        let header = &packet.header;
        let stream = match self.streams.get_mut(&header.ssrc) {
            Some(stream) => stream,
            None => {
                let Some(clock_rate) = clock_rate().filter(|rate| *rate > 0) else {
                    return;
                };
                self.next_due.get_or_insert(now + REPORT_INTERVAL);
                self.streams.entry(header.ssrc).or_insert(Stream {
                    sender,
                    clock_rate,
                    last_sequence_number: header.sequence_number,
                    last_timestamp: header.timestamp,
                    last_timestamp_at: now,
                    last_sent: now,
                    packets: 0,
                    octets: 0,
                })
            }
        };
        let ahead = header
            .sequence_number
            .wrapping_sub(stream.last_sequence_number);
        // A resend carries an old timestamp: only packets newer than the last move the mapping.
        if ahead > 0 && ahead < 1 << 15 {
            stream.last_sequence_number = header.sequence_number;
            if header.timestamp != stream.last_timestamp {
                stream.last_timestamp = header.timestamp;
                stream.last_timestamp_at = now;
            }
        }
        stream.last_sent = now;
        stream.packets = stream.packets.wrapping_add(1);
        stream.octets = stream.octets.wrapping_add(packet.payload.len() as u32);
    }

    /// When the next reports are due, if any stream has sent.
    pub fn due(&self) -> Option<Instant> {
        self.next_due
    }

    /// The reports due at `now`, each with the sender to write it on; forgets idle streams.
    pub fn take_due(&mut self, now: Instant, out: &mut Vec<(RTCRtpSenderId, SenderReport)>) {
        out.clear();
        if self.next_due.is_none_or(|due| now < due) {
            return;
        }
        self.streams
            .retain(|_, stream| now.saturating_duration_since(stream.last_sent) < IDLE);
        for (&ssrc, stream) in &self.streams {
            let elapsed = now.saturating_duration_since(stream.last_timestamp_at);
            let ticks = (elapsed.as_secs_f64() * f64::from(stream.clock_rate)).round() as u32;
            out.push((
                stream.sender,
                SenderReport {
                    ssrc,
                    ntp_time: self.clock.ntp(now),
                    rtp_time: stream.last_timestamp.wrapping_add(ticks),
                    packet_count: stream.packets,
                    octet_count: stream.octets,
                    ..Default::default()
                },
            ));
        }
        self.next_due = (!self.streams.is_empty()).then(|| now + REPORT_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(ssrc: u32, sequence_number: u16, timestamp: u32, len: usize) -> rtp::Packet {
        rtp::Packet {
            header: rtp::Header {
                version: 2,
                ssrc,
                sequence_number,
                timestamp,
                ..Default::default()
            },
            payload: bytes::Bytes::from(vec![0u8; len]),
        }
    }

    #[test]
    fn a_report_maps_the_wall_clock_to_the_latest_timestamp_and_counts_what_was_sent() {
        let start = Instant::now();
        let sender = RTCRtpSenderId::default();
        let mut reports = SenderReports::new(start);
        let mut out = Vec::new();
        let ms = |n| start + Duration::from_millis(n);
        // Video at 90 kHz: a two-packet frame, a resend of an old packet, the next frame.
        reports.on_sent(sender, &packet(7, 10, 90_000, 1000), ms(0), || Some(90_000));
        reports.on_sent(sender, &packet(7, 11, 90_000, 800), ms(5), || None);
        reports.on_sent(sender, &packet(7, 3, 80_000, 1000), ms(20), || None);
        reports.on_sent(sender, &packet(7, 12, 93_000, 500), ms(33), || None);
        // Audio at 48 kHz on the same connection.
        reports.on_sent(sender, &packet(9, 1, 480, 100), ms(40), || Some(48_000));
        reports.on_sent(sender, &packet(5, 1, 0, 100), ms(40), || None);

        reports.take_due(ms(999), &mut out);
        assert!(out.is_empty(), "nothing before a second has passed");
        assert_eq!(reports.due(), Some(ms(1000)));
        reports.take_due(ms(1000), &mut out);
        out.sort_by_key(|(_, report)| report.ssrc);
        assert_eq!(
            out.len(),
            2,
            "the stream with no clock rate is not reported"
        );
        let (video, audio) = (&out[0].1, &out[1].1);
        assert_eq!((video.ssrc, audio.ssrc), (7, 9));
        // 967 ms after frame 93,000 left, at 90 kHz: 87,030 ticks later.
        assert_eq!(video.rtp_time, 93_000 + 87_030);
        assert_eq!((video.packet_count, video.octet_count), (4, 3300));
        assert_eq!(audio.rtp_time, 480 + 46_080);
        assert_eq!(
            video.ntp_time, audio.ntp_time,
            "one wall clock for every stream"
        );
        let wall = SystemInstant::now(start).ntp(ms(1000));
        let apart = (video.ntp_time as i64 - wall as i64).unsigned_abs() >> 32;
        assert_eq!(apart, 0, "the NTP time is the wall clock's");
        assert_eq!(reports.due(), Some(ms(2000)));
    }

    #[test]
    fn a_stream_that_stopped_sending_is_no_longer_reported() {
        let start = Instant::now();
        let sender = RTCRtpSenderId::default();
        let mut reports = SenderReports::new(start);
        let mut out = Vec::new();
        reports.on_sent(sender, &packet(7, 1, 0, 10), start, || Some(90_000));
        reports.take_due(start + Duration::from_secs(1), &mut out);
        assert_eq!(out.len(), 1);
        reports.take_due(start + IDLE + Duration::from_secs(1), &mut out);
        assert!(out.is_empty());
        assert_eq!(reports.due(), None, "no timer for nothing to report");
        reports.on_sent(sender, &packet(7, 2, 3000, 10), start + IDLE * 2, || {
            Some(90_000)
        });
        assert_eq!(reports.due(), Some(start + IDLE * 2 + REPORT_INTERVAL));
    }
}
