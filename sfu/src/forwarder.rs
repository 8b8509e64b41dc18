//! One Subscription's rewrite state: plain synchronous code with no I/O, clock reads or locks.
//!
//! The fanout task calls [`Forwarder::forward`] for every packet of its publication and every
//! subscription; the forwarder decides (send with a rewritten header, or drop with a reason) and
//! the task acts on the decision.

use std::time::Instant;

use rtc::rtp;

use crate::ids::MediaKind;
use crate::keyframe::VideoCodec;
use crate::vp8::{self, Vp8Descriptor, Vp8Munger};

/// Header-extension URIs never forwarded: their values belong to the publisher's transport or
/// m-section, and a subscriber would misroute or mis-measure packets carrying them.
pub const TRANSPORT_SCOPED_EXTENSIONS: [&str; 4] = [
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "urn:ietf:params:rtp-hdrext:sdes:mid",
    "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
    "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
];

/// Why a forwarder held a packet back from its subscriber. (A packet the forwarder passed but
/// the subscriber's full queue refused is counted by the fanout as a dropped packet.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The subscriber has not yet answered the offer that carries this subscription.
    NotNegotiated,
    /// Video waits for a keyframe after the subscription starts or after a loss.
    WaitingForKeyframe,
    /// The subscriber paused this subscription (its video is off screen).
    Paused,
    /// Another simulcast layer than the one this subscription receives.
    OtherLayer,
    /// A temporal layer above the subscription's target.
    TemporalLayer,
    /// It arrived after its place in the outgoing sequence was closed (it was skipped, or is
    /// older than the numbers remembered).
    TooLate,
}

/// What the subscriber negotiated for this subscription.
#[derive(Clone, Debug)]
pub struct ForwarderParams {
    /// SSRC the subscriber expects.
    pub ssrc: u32,
    /// Payload type the subscriber negotiated for the publication's codec.
    pub payload_type: u8,
    /// Publisher extension id -> subscriber extension id; 0 drops the extension.
    pub extension_ids: [u8; 256],
}

impl ForwarderParams {
    /// Builds the extension map from both sides' `(uri, id)` lists.
    pub fn new(
        ssrc: u32,
        payload_type: u8,
        publisher_extensions: &[(String, u16)],
        subscriber_extensions: &[(String, u16)],
    ) -> Self {
        let mut extension_ids = [0u8; 256];
        for (uri, publisher_id) in publisher_extensions {
            if TRANSPORT_SCOPED_EXTENSIONS.contains(&uri.as_str()) {
                continue;
            }
            let subscriber_id = subscriber_extensions
                .iter()
                .find(|(candidate, _)| candidate == uri)
                .map(|(_, id)| *id);
            if let (Ok(from), Some(Ok(to))) =
                (u8::try_from(*publisher_id), subscriber_id.map(u8::try_from))
            {
                extension_ids[usize::from(from)] = to;
            }
        }
        Self {
            ssrc,
            payload_type,
            extension_ids,
        }
    }
}

/// Maps a publisher's sequence numbers and timestamps onto one continuous outgoing stream, even
/// when the publisher's source restarts with a new SSRC or packets are dropped for a subscriber.
///
/// The offset between the two changes (a packet skipped, padding reserved, a new source), so a
/// packet that arrives late is given the number it was due when its place went by, remembered per
/// source sequence number; one whose place is not remembered, or was skipped, is dropped rather
/// than given a number another packet already has (found by fuzzing: a late packet after
/// padding took a padding packet's number).
#[derive(Clone, Debug, Default)]
pub struct SeqTsMap {
    state: Option<SeqTsState>,
}

/// Source sequence numbers whose outgoing number is remembered, for packets arriving late.
const SEQ_HISTORY: usize = 512;

/// What became of one source sequence number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum SeqFate {
    #[default]
    Unknown,
    /// Sent, or its place held (it has not arrived yet): this outgoing number is its own.
    Numbered(u16),
    /// Dropped for this subscriber: the outgoing sequence closed over it.
    Skipped,
}

#[derive(Clone, Debug)]
struct SeqTsState {
    source_ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
    highest_in_seq: u16,
    last_out_seq: u16,
    last_out_ts: u32,
    last_out_at: Instant,
    /// By source sequence number modulo [`SEQ_HISTORY`]: the number and its fate.
    history: Box<[(u16, SeqFate)]>,
}

/// True when `a` comes after `b` in 16-bit serial number arithmetic (RFC 1982).
fn seq_newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

impl SeqTsState {
    fn new(ssrc: u32, seq: u16, ts: u32, now: Instant) -> Self {
        Self {
            source_ssrc: ssrc,
            seq_offset: 0,
            ts_offset: 0,
            highest_in_seq: seq.wrapping_sub(1),
            last_out_seq: seq.wrapping_sub(1),
            last_out_ts: ts,
            last_out_at: now,
            history: vec![(0, SeqFate::Unknown); SEQ_HISTORY].into_boxed_slice(),
        }
    }

    fn remember(&mut self, seq: u16, fate: SeqFate) {
        self.history[usize::from(seq) % SEQ_HISTORY] = (seq, fate);
    }

    fn fate(&self, seq: u16) -> SeqFate {
        match self.history[usize::from(seq) % SEQ_HISTORY] {
            (remembered, fate) if remembered == seq => fate,
            _ => SeqFate::Unknown,
        }
    }

    /// `seq` is the newest yet: the numbers it jumps over keep their places at today's offset.
    fn advance_to(&mut self, seq: u16) {
        let gap = seq.wrapping_sub(self.highest_in_seq).wrapping_sub(1);
        let held = usize::from(gap).min(SEQ_HISTORY - 1) as u16;
        for back in 1..=held {
            let missing = seq.wrapping_sub(back);
            self.remember(
                missing,
                SeqFate::Numbered(missing.wrapping_add(self.seq_offset)),
            );
        }
        self.highest_in_seq = seq;
    }
}

impl SeqTsMap {
    /// Rewrites one packet's numbers, or `None` when the packet came too late to have one (its
    /// place was skipped or is no longer remembered). `clock_rate` (Hz) turns the silence across
    /// a source change into a timestamp step, so the subscriber's jitter buffer sees real time
    /// pass.
    pub fn map(
        &mut self,
        ssrc: u32,
        seq: u16,
        ts: u32,
        now: Instant,
        clock_rate: u32,
    ) -> Option<(u16, u32)> {
        let state = match &mut self.state {
            Some(state) if state.source_ssrc == ssrc => state,
            Some(state) => {
                // The publisher's source changed: continue right after what was last sent.
                let elapsed = now.saturating_duration_since(state.last_out_at);
                let ticks = (elapsed.as_micros() * u128::from(clock_rate) / 1_000_000).max(1);
                let ts_step = u32::try_from(ticks).unwrap_or(u32::MAX / 2);
                state.source_ssrc = ssrc;
                state.seq_offset = state.last_out_seq.wrapping_add(1).wrapping_sub(seq);
                state.ts_offset = state.last_out_ts.wrapping_add(ts_step).wrapping_sub(ts);
                state.highest_in_seq = seq.wrapping_sub(1);
                // The old source's numbers mean nothing for the new one (no allocation here).
                state.history.fill((0, SeqFate::Unknown));
                state
            }
            None => self.state.insert(SeqTsState::new(ssrc, seq, ts, now)),
        };
        let out_seq = if seq_newer(seq, state.highest_in_seq) {
            state.advance_to(seq);
            let out_seq = seq.wrapping_add(state.seq_offset);
            state.remember(seq, SeqFate::Numbered(out_seq));
            out_seq
        } else {
            // Late, or a duplicate: only the number its place was given.
            match state.fate(seq) {
                SeqFate::Numbered(out_seq) => out_seq,
                SeqFate::Skipped | SeqFate::Unknown => return None,
            }
        };
        let out_ts = ts.wrapping_add(state.ts_offset);
        if seq_newer(out_seq, state.last_out_seq) {
            state.last_out_seq = out_seq;
            state.last_out_ts = out_ts;
            state.last_out_at = now;
        }
        Some((out_seq, out_ts))
    }

    /// Takes the next `count` outgoing sequence numbers for packets of our own (padding), so
    /// what is forwarded next continues after them: the first, and the timestamp to give them
    /// (the last one sent). `None` before anything was sent, or while a reordered packet could
    /// still take one of those numbers.
    pub fn reserve(&mut self, count: u16) -> Option<(u16, u32)> {
        let state = self.state.as_mut()?;
        if state.highest_in_seq.wrapping_add(state.seq_offset) != state.last_out_seq {
            return None;
        }
        let first = state.last_out_seq.wrapping_add(1);
        state.seq_offset = state.seq_offset.wrapping_add(count);
        state.last_out_seq = state.last_out_seq.wrapping_add(count);
        Some((first, state.last_out_ts))
    }

    /// Records that the newest packet `seq` of `ssrc` was dropped for this subscriber, so the
    /// outgoing sequence shows no hole the subscriber would NACK in vain.
    pub fn skip(&mut self, ssrc: u32, seq: u16) {
        if let Some(state) = &mut self.state
            && state.source_ssrc == ssrc
            && seq_newer(seq, state.highest_in_seq)
        {
            state.advance_to(seq);
            state.remember(seq, SeqFate::Skipped);
            state.seq_offset = state.seq_offset.wrapping_sub(1);
        }
    }
}

/// A padding packet on the wire: RTP header, the transport-wide sequence number extension,
/// 4 bytes of padding, and [`PACKET_OVERHEAD`](crate::estimator::PACKET_OVERHEAD).
pub const PADDING_PACKET_BYTES: usize = 12 + 8 + 4 + crate::estimator::PACKET_OVERHEAD;

/// How many recently sent packets a forwarder remembers, to map a subscriber's NACK back to
/// the publisher's packet. Matches the publication cache for video.
pub const SENT_HISTORY: usize = 1024;

/// What was sent under one outgoing sequence number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SentPacket {
    /// The publisher's SSRC.
    pub source_ssrc: u32,
    /// The publisher's sequence number.
    pub source_seq: u16,
    /// The outgoing sequence number.
    pub seq: u16,
    /// Added to the publisher's timestamp.
    pub ts_offset: u32,
    /// Added to the publisher's VP8 picture id and TL0PICIDX.
    pub vp8_offsets: (u16, u8),
    /// A padding packet of a probe: nothing to resend, nothing lost if it never arrives.
    pub padding: bool,
    /// When it was first sent.
    pub sent_at: Option<Instant>,
    /// When it was last sent again for a NACK.
    pub resent_at: Option<Instant>,
    /// How many times it was sent again.
    pub resends: u8,
}

/// What to do with a NACKed packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resend {
    /// Send it again.
    Now,
    /// Not now: it is padding, or a copy is already on its way ([`RESEND_INTERVAL`]).
    Skip,
    /// Never: it is older than [`MAX_RESEND_AGE`], or still missing after [`MAX_RESENDS`]
    /// copies, and only a keyframe repairs the picture.
    TooOld,
}

/// A packet first sent longer ago than this is not sent again. The receiver's jitter buffer
/// has moved on by then; on a congested link its NACK list grows with every lost packet and
/// is repeated every round trip, and answering all of it multiplied the load many times over
/// (measured: 18 Mbit/s of resends offered to a 600 kbit/s subscriber). As mediasoup does.
pub const MAX_RESEND_AGE: std::time::Duration = std::time::Duration::from_millis(1000);

/// A packet is sent again at most this many times: on a link that drops it twice more, more
/// copies only crowd out what comes next (a receiver that NACKs every missing packet every
/// round trip, as webrtc-rs's does, otherwise turned a 600 kbit/s link into mostly resends).
pub const MAX_RESENDS: u8 = 2;

/// A packet is sent again for a NACK at most this often: a receiver repeats its NACK every
/// round trip until the packet comes, and on a congested link the first resend is still
/// queued when the next NACK arrives (every copy would deepen the congestion).
pub const RESEND_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Every temporal layer: the default target.
pub const ALL_TEMPORAL_LAYERS: u8 = u8::MAX;

/// One subscription's forwarding state.
#[derive(Debug)]
pub struct Forwarder {
    kind: MediaKind,
    codec: VideoCodec,
    clock_rate: u32,
    params: Option<Box<ForwarderParams>>,
    waiting_for_keyframe: bool,
    paused: bool,
    /// Held back because the subscriber's bandwidth does not fit even its lowest layer.
    paused_for_bandwidth: bool,
    /// The spatial layer being forwarded, once one has started.
    current: Option<u8>,
    /// The spatial layer to move to, at its next keyframe.
    target: u8,
    /// Highest temporal layer forwarded (VP8 TID).
    max_temporal: u8,
    /// A higher one to go to at the next base-layer picture, where the decoder can follow.
    raise_temporal_to: Option<u8>,
    /// The publication has several spatial layers: VP8 numbers are tracked for switches.
    layered: bool,
    vp8: Vp8Munger,
    numbers: SeqTsMap,
    sent: Box<[Option<SentPacket>]>,
    /// The last packet sent ended a frame (every audio packet does): padding may follow it
    /// without splitting a frame's sequence numbers.
    at_frame_end: bool,
}

impl Forwarder {
    /// A forwarder for a publication of `kind` with codec `mime` at `clock_rate` Hz. It forwards
    /// nothing until [`Forwarder::configure`] gives it what the subscriber negotiated.
    pub fn new(kind: MediaKind, mime: &str, clock_rate: u32) -> Self {
        Self {
            kind,
            codec: VideoCodec::from_mime(mime),
            clock_rate,
            params: None,
            waiting_for_keyframe: kind == MediaKind::Video,
            paused: false,
            paused_for_bandwidth: false,
            current: None,
            target: 0,
            max_temporal: ALL_TEMPORAL_LAYERS,
            raise_temporal_to: None,
            layered: false,
            vp8: Vp8Munger::default(),
            numbers: SeqTsMap::default(),
            sent: vec![None; SENT_HISTORY].into_boxed_slice(),
            at_frame_end: false,
        }
    }

    /// Up to `count` padding-only packets to send after what was last sent (probe packets the
    /// receiver counts for congestion control and otherwise discards), numbered in sequence so
    /// nothing forwarded later is taken for lost. None while the subscription is not sending
    /// or is inside a frame.
    pub fn padding(&mut self, count: u16) -> Vec<rtp::Packet> {
        let Some(params) = self.params.as_deref() else {
            return Vec::new();
        };
        // A video paused for bandwidth carries probes too: when every video is paused and there
        // is no microphone, it is the only way to learn that the link got faster. Nothing of it
        // is being shown, so a frame it cut short does not matter.
        let sending = !self.held() && !self.waiting_for_keyframe && self.at_frame_end;
        if count == 0 || self.paused || !(sending || self.paused_for_bandwidth) {
            return Vec::new();
        }
        let Some((first, timestamp)) = self.numbers.reserve(count) else {
            return Vec::new();
        };
        (0..count)
            .map(|i| {
                let seq = first.wrapping_add(i);
                self.sent[usize::from(seq) % SENT_HISTORY] = Some(SentPacket {
                    seq,
                    padding: true,
                    ..Default::default()
                });
                rtp::Packet {
                    header: rtp::Header {
                        version: 2,
                        // `rtp` writes only the padding that aligns the payload (4 bytes
                        // here), so probe packets are small and many.
                        padding: true,
                        payload_type: params.payload_type,
                        sequence_number: seq,
                        timestamp,
                        ssrc: params.ssrc,
                        ..Default::default()
                    },
                    payload: Default::default(),
                }
            })
            .collect()
    }

    /// What was sent as outgoing `seq`, if it is still remembered.
    pub fn sent(&self, seq: u16) -> Option<SentPacket> {
        self.sent[usize::from(seq) % SENT_HISTORY].filter(|sent| sent.seq == seq)
    }

    /// Whether outgoing `seq`, NACKed now, is sent again; records it when it is.
    pub fn resend(&mut self, seq: u16, now: Instant) -> Resend {
        let Some(sent) = self.sent[usize::from(seq) % SENT_HISTORY]
            .as_mut()
            .filter(|sent| sent.seq == seq && !sent.padding)
        else {
            return Resend::Skip;
        };
        if sent
            .sent_at
            .is_some_and(|at| now.saturating_duration_since(at) > MAX_RESEND_AGE)
        {
            return Resend::TooOld;
        }
        if sent
            .resent_at
            .is_some_and(|at| now.saturating_duration_since(at) < RESEND_INTERVAL)
        {
            return Resend::Skip;
        }
        // Asked for again after every copy had time to arrive: the link keeps losing it, and
        // waiting for it to be a second old before asking for a keyframe froze the picture
        // for longer than that (measured on the shaped rig: 1.3 s).
        if sent.resends >= MAX_RESENDS {
            return Resend::TooOld;
        }
        sent.resent_at = Some(now);
        sent.resends += 1;
        Resend::Now
    }

    /// Rewrites a copy of the publisher's packet into the retransmission of `sent`: the same
    /// outgoing numbers as the first time.
    pub fn retransmit(&self, packet: &mut rtp::Packet, sent: SentPacket) -> bool {
        let Some(params) = self.params.as_deref() else {
            return false;
        };
        let header = &mut packet.header;
        if header.ssrc != sent.source_ssrc || header.sequence_number != sent.source_seq {
            return false;
        }
        header.sequence_number = sent.seq;
        header.timestamp = header.timestamp.wrapping_add(sent.ts_offset);
        rewrite_header(header, params);
        if self.codec == VideoCodec::Vp8
            && let Some(descriptor) = Vp8Descriptor::parse(&packet.payload)
        {
            packet.payload = vp8::with_offsets(&packet.payload, &descriptor, sent.vp8_offsets);
        }
        true
    }

    /// Applies what the subscriber negotiated. Video then starts at a keyframe.
    pub fn configure(&mut self, params: ForwarderParams) {
        self.params = Some(Box::new(params));
        self.waiting_for_keyframe = self.kind == MediaKind::Video;
    }

    /// True while video is held back until the next keyframe.
    pub fn waiting_for_keyframe(&self) -> bool {
        self.waiting_for_keyframe
    }

    /// True while the subscriber has paused this subscription.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops or resumes forwarding. Paused packets leave no hole in the outgoing sequence, and
    /// resumed video starts at a keyframe.
    pub fn set_paused(&mut self, paused: bool) {
        let held = self.held();
        self.paused = paused;
        self.after_hold_change(held);
    }

    /// Stops or resumes forwarding for bandwidth, apart from the subscriber's own pause.
    pub fn set_paused_for_bandwidth(&mut self, paused: bool) {
        let held = self.held();
        self.paused_for_bandwidth = paused;
        self.after_hold_change(held);
    }

    fn held(&self) -> bool {
        self.paused || self.paused_for_bandwidth
    }

    /// Resumed video starts at a keyframe.
    fn after_hold_change(&mut self, was_held: bool) {
        if was_held && !self.held() && self.kind == MediaKind::Video {
            self.waiting_for_keyframe = true;
        }
    }

    /// Marks that a packet this forwarder accepted was then lost on the way out (queue full):
    /// video must restart at a keyframe.
    pub fn lost_after_forward(&mut self) {
        if self.kind == MediaKind::Video {
            self.waiting_for_keyframe = true;
        }
    }

    /// Says that the publication has several spatial layers (simulcast), so VP8 picture ids are
    /// tracked for seamless switches. Without it, the per-packet path reads no descriptor.
    pub fn set_layered(&mut self, layered: bool) {
        self.layered = layered;
    }

    /// Sets the spatial layer to forward. The switch happens at that layer's next keyframe;
    /// until then the current layer goes on, so going down never waits on a keyframe.
    pub fn set_target(&mut self, layer: u8) {
        self.target = layer;
    }

    /// The spatial layer this subscription is moving to (or stays on).
    pub fn target(&self) -> u8 {
        self.target
    }

    /// The spatial layer being forwarded, if any.
    pub fn current(&self) -> Option<u8> {
        self.current
    }

    /// Forwards temporal layers up to `layer` only (VP8 with TID): lowers the frame rate before
    /// the resolution.
    pub fn set_max_temporal(&mut self, layer: u8) {
        if layer > self.max_temporal {
            // Upper-layer pictures refer to ones that were dropped: wait for a base picture.
            self.raise_temporal_to = Some(layer);
        } else {
            self.max_temporal = layer;
            self.raise_temporal_to = None;
        }
    }

    /// The layer whose keyframe this subscription waits for, if it waits for one.
    pub fn wanted_keyframe(&self) -> Option<u8> {
        if self.kind != MediaKind::Video || self.params.is_none() || self.held() {
            return None;
        }
        (self.waiting_for_keyframe || self.current != Some(self.target)).then_some(self.target)
    }

    /// True when a keyframe on `layer` may start it: any layer up to the target while nothing
    /// is decodable, else one between the current layer and the target.
    fn may_switch_to(&self, layer: u8) -> bool {
        match self.current {
            _ if self.waiting_for_keyframe => layer <= self.target,
            None => layer <= self.target,
            Some(current) if self.target > current => layer > current && layer <= self.target,
            Some(current) if self.target < current => layer >= self.target && layer < current,
            Some(_) => false,
        }
    }

    /// Decides about one packet of spatial `layer` and, when it is to be sent, returns this
    /// subscriber's copy: the header rewritten, the payload shared with the publisher's packet
    /// (copied only when VP8 numbers must change after a layer switch). Nothing is copied for a
    /// packet that is dropped.
    pub fn forward(
        &mut self,
        packet: &rtp::Packet,
        layer: u8,
        now: Instant,
    ) -> Result<rtp::Packet, DropReason> {
        let Some(params) = self.params.as_deref() else {
            return Err(DropReason::NotNegotiated);
        };
        let source = &packet.header;
        let on_current = self.current == Some(layer);
        if self.held() {
            self.numbers.skip(source.ssrc, source.sequence_number);
            return Err(DropReason::Paused);
        }
        let descriptor = match self.codec {
            VideoCodec::Vp8
                if self.layered
                    || self.max_temporal != ALL_TEMPORAL_LAYERS
                    || self.raise_temporal_to.is_some()
                    || self.vp8.offsets() != (0, 0) =>
            {
                Vp8Descriptor::parse(&packet.payload)
            }
            _ => None,
        };
        if !on_current || self.waiting_for_keyframe {
            let keyframe = match &descriptor {
                Some(descriptor) => descriptor.is_keyframe_start(&packet.payload),
                None => self.codec.is_keyframe_start(&packet.payload),
            };
            if keyframe && self.may_switch_to(layer) {
                if !on_current && let Some(descriptor) = &descriptor {
                    self.vp8.switch_to(descriptor);
                }
                self.current = Some(layer);
                self.waiting_for_keyframe = false;
            } else if on_current {
                self.numbers.skip(source.ssrc, source.sequence_number);
                return Err(DropReason::WaitingForKeyframe);
            } else if self.waiting_for_keyframe {
                return Err(DropReason::WaitingForKeyframe);
            } else {
                return Err(DropReason::OtherLayer);
            }
        }
        if let (Some(raise), Some(descriptor)) = (self.raise_temporal_to, &descriptor)
            && descriptor.picture_start
            && descriptor.temporal.is_none_or(|tid| tid == 0)
        {
            self.max_temporal = raise;
            self.raise_temporal_to = None;
        }
        if let Some(descriptor) = &descriptor
            && descriptor
                .temporal
                .is_some_and(|tid| tid > self.max_temporal)
        {
            self.numbers.skip(source.ssrc, source.sequence_number);
            self.vp8.drop_picture(descriptor);
            return Err(DropReason::TemporalLayer);
        }
        let Some((seq, ts)) = self.numbers.map(
            source.ssrc,
            source.sequence_number,
            source.timestamp,
            now,
            self.clock_rate,
        ) else {
            return Err(DropReason::TooLate);
        };
        let payload = match &descriptor {
            Some(descriptor) => self.vp8.munge(&packet.payload, descriptor),
            None => packet.payload.clone(),
        };
        self.sent[usize::from(seq) % SENT_HISTORY] = Some(SentPacket {
            source_ssrc: source.ssrc,
            source_seq: source.sequence_number,
            seq,
            ts_offset: ts.wrapping_sub(source.timestamp),
            vp8_offsets: self.vp8.offsets(),
            padding: false,
            sent_at: Some(now),
            resent_at: None,
            resends: 0,
        });
        let mut out = rtp::Packet {
            header: packet.header.clone(),
            payload,
        };
        out.header.sequence_number = seq;
        out.header.timestamp = ts;
        rewrite_header(&mut out.header, params);
        self.at_frame_end = self.kind == MediaKind::Audio || out.header.marker;
        Ok(out)
    }
}

/// The per-subscriber part of a header: SSRC, payload type, extension ids.
fn rewrite_header(header: &mut rtp::Header, params: &ForwarderParams) {
    header.ssrc = params.ssrc;
    header.payload_type = params.payload_type;
    if header.extension {
        header.extensions.retain_mut(|extension| {
            let id = params.extension_ids[usize::from(extension.id)];
            extension.id = id;
            id != 0
        });
        if header.extensions.is_empty() {
            header.extension = false;
            header.extension_profile = 0;
            header.extensions_padding = 0;
        } else {
            // Marshalling sizes the block from this padding: it must match what is left, or
            // an extension added further down (transport-wide sequence numbers) is written
            // into a block of the wrong size.
            header.extensions_padding = (4 - header.get_extension_payload_len() % 4) % 4;
        }
    }
}

/// The last packets of one publication, by the publisher's sequence number, so that every
/// subscriber's NACK is answered from one copy rather than one per subscriber.
#[derive(Debug)]
pub struct PacketCache {
    slots: Box<[Option<rtp::Packet>]>,
}

impl PacketCache {
    /// A cache of `capacity` packets (a power of two is best).
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: vec![None; capacity.max(1)].into_boxed_slice(),
        }
    }

    /// Keeps `packet`, replacing the oldest one in its slot.
    pub fn insert(&mut self, packet: rtp::Packet) {
        let slot = usize::from(packet.header.sequence_number) % self.slots.len();
        self.slots[slot] = Some(packet);
    }

    /// The packet `seq` of `ssrc`, if still kept.
    pub fn get(&self, ssrc: u32, seq: u16) -> Option<&rtp::Packet> {
        self.slots[usize::from(seq) % self.slots.len()]
            .as_ref()
            .filter(|p| p.header.sequence_number == seq && p.header.ssrc == ssrc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mapped(map: &mut SeqTsMap, rows: &[(u32, u16, u32, u64)]) -> Vec<(u16, u32)> {
        let start = Instant::now();
        rows.iter()
            .filter_map(|&(ssrc, seq, ts, at_ms)| {
                map.map(ssrc, seq, ts, start + Duration::from_millis(at_ms), 90_000)
            })
            .collect()
    }

    #[test]
    fn numbers_pass_through_and_wrap() {
        let mut map = SeqTsMap::default();
        let out = mapped(
            &mut map,
            &[
                (1, 65_534, u32::MAX - 3000, 0),
                (1, 65_535, u32::MAX, 33),
                (1, 0, 2_999, 66),
                (1, 1, 5_999, 99),
            ],
        );
        assert_eq!(
            out,
            vec![
                (65_534, u32::MAX - 3000),
                (65_535, u32::MAX),
                (0, 2_999),
                (1, 5_999)
            ]
        );
    }

    #[test]
    fn a_replaced_source_continues_the_sequence() {
        let mut map = SeqTsMap::default();
        let out = mapped(
            &mut map,
            &[
                (1, 100, 1_000, 0),
                (1, 101, 4_000, 33),
                // New SSRC with unrelated numbers, 100 ms after the last packet.
                (2, 40_000, 7_777_777, 133),
                (2, 40_001, 7_780_777, 166),
            ],
        );
        assert_eq!(out[2], (102, 4_000 + 9_000));
        assert_eq!(out[3], (103, 4_000 + 9_000 + 3_000));
    }

    #[test]
    fn reordered_packets_keep_their_place() {
        let mut map = SeqTsMap::default();
        let out = mapped(
            &mut map,
            &[
                (1, 10, 0, 0),
                (1, 12, 6000, 66),
                (1, 11, 3000, 70),
                (1, 13, 9000, 99),
            ],
        );
        assert_eq!(
            out.iter().map(|o| o.0).collect::<Vec<_>>(),
            vec![10, 12, 11, 13]
        );
    }

    #[test]
    fn skipped_packets_leave_no_hole() {
        let mut map = SeqTsMap::default();
        let now = Instant::now();
        let out = |map: &mut SeqTsMap, seq| map.map(1, seq, 9000, now, 90_000).map(|o| o.0);
        assert_eq!(out(&mut map, 500), Some(500));
        map.skip(1, 501);
        map.skip(1, 502);
        assert_eq!(out(&mut map, 503), Some(501));
        assert_eq!(out(&mut map, 504), Some(502));
        // A skipped packet that comes again has no number left: it must not take 503's.
        assert_eq!(out(&mut map, 502), None);
    }

    #[test]
    fn a_late_packet_keeps_its_place_across_skips_and_padding() {
        let mut map = SeqTsMap::default();
        let now = Instant::now();
        let out = |map: &mut SeqTsMap, seq| map.map(1, seq, 0, now, 90_000).map(|o| o.0);
        assert_eq!(out(&mut map, 10), Some(10));
        // 11 is late; 12 arrives and holds 11's place.
        assert_eq!(out(&mut map, 12), Some(12));
        map.skip(1, 13);
        assert_eq!(out(&mut map, 14), Some(13));
        // 11 arrives: its own place, not 12 (what today's offset would give it).
        assert_eq!(out(&mut map, 11), Some(11));
        // A duplicate keeps its number.
        assert_eq!(out(&mut map, 14), Some(13));
        // Padding takes 14..=16; a late duplicate of 12 still gets 12, never a padding number.
        assert_eq!(map.reserve(3).map(|r| r.0), Some(14));
        assert_eq!(out(&mut map, 12), Some(12));
        assert_eq!(out(&mut map, 15), Some(17));
    }

    #[test]
    fn a_late_packet_of_a_replaced_source_is_dropped() {
        let mut map = SeqTsMap::default();
        let now = Instant::now();
        let out = |map: &mut SeqTsMap, ssrc, seq| map.map(ssrc, seq, 0, now, 90_000).map(|o| o.0);
        assert_eq!(out(&mut map, 1, 7), Some(7));
        assert_eq!(map.reserve(14).map(|r| r.0), Some(8));
        assert_eq!(out(&mut map, 2, 8), Some(22));
        // Older than the new source's first packet: its place would be a padding number.
        assert_eq!(out(&mut map, 2, 0), None);
        // And nothing older than the history is numbered again.
        for seq in 9..1000 {
            out(&mut map, 2, seq);
        }
        assert_eq!(out(&mut map, 2, 100), None);
    }

    fn packet(ssrc: u32, seq: u16, payload: &'static [u8]) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: 96,
                sequence_number: seq,
                timestamp: 1000,
                ssrc,
                extension: true,
                extension_profile: 0xBEDE,
                extensions: vec![
                    rtp::header::Extension {
                        id: 3,
                        payload: bytes::Bytes::from_static(&[1, 2]),
                    },
                    rtp::header::Extension {
                        id: 4,
                        payload: bytes::Bytes::from_static(&[9]),
                    },
                ],
                ..Default::default()
            },
            payload: bytes::Bytes::from_static(payload),
        }
    }

    #[test]
    fn video_waits_for_a_keyframe_then_rewrites_the_header() {
        let mut forwarder = Forwarder::new(MediaKind::Video, "video/VP8", 90_000);
        let now = Instant::now();
        let first = packet(7, 10, &[0x10, 0x01]);
        assert_eq!(
            forwarder.forward(&first, 0, now).err(),
            Some(DropReason::NotNegotiated)
        );
        forwarder.configure(ForwarderParams::new(
            0xABCD,
            100,
            &[
                ("urn:3gpp:video-orientation".into(), 3),
                (TRANSPORT_SCOPED_EXTENSIONS[0].into(), 4),
            ],
            &[
                ("urn:3gpp:video-orientation".into(), 11),
                (TRANSPORT_SCOPED_EXTENSIONS[0].into(), 5),
            ],
        ));
        let delta = packet(7, 11, &[0x10, 0x01]);
        assert_eq!(
            forwarder.forward(&delta, 0, now).err(),
            Some(DropReason::WaitingForKeyframe)
        );
        let key = forwarder
            .forward(&packet(7, 12, &[0x10, 0x00, 0xAA]), 0, now)
            .expect("a keyframe opens the gate");
        assert_eq!(key.header.ssrc, 0xABCD);
        assert_eq!(key.header.payload_type, 100);
        assert_eq!(key.header.extensions.len(), 1);
        assert_eq!(key.header.extensions[0].id, 11);
        assert_eq!(&key.payload[..], &[0x10, 0x00, 0xAA]);
        let next = forwarder
            .forward(&packet(7, 13, &[0x10, 0x01]), 0, now)
            .expect("then everything passes");
        assert_eq!(next.header.sequence_number, key.header.sequence_number + 1);
    }

    #[test]
    fn probe_padding_goes_between_frames_and_what_follows_continues_after_it() {
        use rtc::shared::marshal::{Marshal, Unmarshal};
        let mut forwarder = Forwarder::new(MediaKind::Video, "video/VP8", 90_000);
        forwarder.configure(ForwarderParams::new(0xABCD, 100, &[], &[]));
        let now = Instant::now();
        forwarder
            .forward(&packet(7, 1, &[0x10, 0x00, 0xAA]), 0, now)
            .expect("a keyframe starts it");
        assert!(forwarder.padding(3).is_empty(), "no padding inside a frame");
        let mut last = packet(7, 2, &[0x00, 0xBB]);
        last.header.marker = true;
        let end = forwarder.forward(&last, 0, now).expect("the frame's end");
        let padding = forwarder.padding(3);
        let seqs: Vec<u16> = padding.iter().map(|p| p.header.sequence_number).collect();
        let after = end.header.sequence_number;
        assert_eq!(seqs, [after + 1, after + 2, after + 3]);
        for p in &padding {
            assert_eq!((p.header.ssrc, p.header.payload_type), (0xABCD, 100));
            assert_eq!(p.header.timestamp, end.header.timestamp);
            let wire = p.marshal().expect("marshals");
            let parsed = rtp::Packet::unmarshal(&mut wire.clone()).expect("parses");
            assert!(
                parsed.header.padding && parsed.payload.is_empty(),
                "padding only"
            );
        }
        let next = forwarder
            .forward(&packet(7, 3, &[0x10, 0x01]), 0, now)
            .expect("the next frame");
        assert_eq!(
            next.header.sequence_number,
            after + 4,
            "no hole after the padding"
        );
        assert_eq!(
            forwarder.resend(after + 1, now),
            Resend::Skip,
            "a NACK for padding is not answered"
        );
        // Paused for bandwidth, even inside a frame: the probe still goes.
        forwarder
            .forward(&packet(7, 4, &[0x00, 0xCC]), 0, now)
            .expect("inside a frame");
        assert!(forwarder.padding(3).is_empty(), "no padding inside a frame");
        forwarder.set_paused_for_bandwidth(true);
        assert_eq!(forwarder.padding(3).len(), 3, "a paused video can probe");
        forwarder.set_paused(true);
        assert!(
            forwarder.padding(3).is_empty(),
            "but not one its subscriber paused"
        );
        assert_eq!(
            forwarder.resend(after, now),
            Resend::Now,
            "a real packet is sent again"
        );
        assert_eq!(
            forwarder.resend(after, now + RESEND_INTERVAL / 2),
            Resend::Skip,
            "but not again while that copy is on its way"
        );
        assert_eq!(forwarder.resend(after, now + RESEND_INTERVAL), Resend::Now);
        assert_eq!(
            forwarder.resend(after, now + RESEND_INTERVAL + RESEND_INTERVAL / 2),
            Resend::Skip,
            "the second copy is on its way"
        );
        assert_eq!(
            forwarder.resend(after, now + RESEND_INTERVAL * 2),
            Resend::TooOld,
            "missing after two copies: not a third, a keyframe repairs it"
        );
        assert_eq!(
            forwarder.resend(after, now + MAX_RESEND_AGE * 2),
            Resend::TooOld,
            "and never once the receiver has moved on"
        );
    }

    #[test]
    fn a_paused_subscription_resumes_at_a_keyframe_without_a_hole() {
        let mut forwarder = Forwarder::new(MediaKind::Video, "video/VP8", 90_000);
        forwarder.configure(ForwarderParams::new(0xABCD, 100, &[], &[]));
        let now = Instant::now();
        let key = forwarder
            .forward(&packet(7, 1, &[0x10, 0x00, 0xAA]), 0, now)
            .expect("keyframe");
        forwarder.set_paused(true);
        for seq in 2..50 {
            assert_eq!(
                forwarder
                    .forward(&packet(7, seq, &[0x10, 0x00]), 0, now)
                    .err(),
                Some(DropReason::Paused),
                "even keyframes wait while paused"
            );
        }
        forwarder.set_paused(false);
        assert_eq!(
            forwarder
                .forward(&packet(7, 50, &[0x10, 0x01]), 0, now)
                .err(),
            Some(DropReason::WaitingForKeyframe)
        );
        let resumed = forwarder
            .forward(&packet(7, 51, &[0x10, 0x00, 0xBB]), 0, now)
            .expect("a keyframe resumes it");
        assert_eq!(
            resumed.header.sequence_number,
            key.header.sequence_number + 1,
            "the subscriber sees no gap to NACK"
        );
    }

    #[test]
    fn a_nacked_packet_is_rebuilt_exactly_as_first_sent() {
        let mut forwarder = Forwarder::new(MediaKind::Video, "video/VP8", 90_000);
        forwarder.configure(ForwarderParams::new(0xABCD, 100, &[], &[]));
        let mut cache = PacketCache::new(8);
        let now = Instant::now();
        let mut first_sent = Vec::new();
        for seq in 40..46u16 {
            let original = packet(7, seq, &[0x10, 0x00, 0x55]);
            first_sent.push(forwarder.forward(&original, 0, now).expect("forwarded"));
            cache.insert(original);
        }
        let lost = &first_sent[3];
        let sent = forwarder
            .sent(lost.header.sequence_number)
            .expect("remembered");
        let mut again = cache
            .get(sent.source_ssrc, sent.source_seq)
            .expect("cached")
            .clone();
        assert!(forwarder.retransmit(&mut again, sent));
        assert_eq!(again.header, lost.header);
        assert_eq!(again.payload, lost.payload);
        assert!(
            forwarder
                .sent(lost.header.sequence_number.wrapping_add(500))
                .is_none()
        );
        for seq in 46..60u16 {
            cache.insert(packet(7, seq, &[0x10, 0x01]));
        }
        assert!(cache.get(7, 43).is_none(), "evicted by newer packets");
    }

    #[test]
    fn a_rewritten_header_marshals_to_its_size_even_with_an_extension_added() {
        use rtc::shared::marshal::{Marshal, MarshalSize};
        let mut forwarder = Forwarder::new(MediaKind::Audio, "audio/opus", 48_000);
        // The publisher's ids 3 and 4; only 3 is kept, and the subscriber's chain then adds
        // its own (transport-wide sequence numbers, 2 bytes) as id 5.
        forwarder.configure(ForwarderParams::new(
            5,
            111,
            &[("urn:a".into(), 3), ("urn:b".into(), 4)],
            &[("urn:a".into(), 7)],
        ));
        for kept in 1..=8usize {
            for dropped in 1..=8usize {
                let mut original = packet(9, 1, &[0xff]);
                original.header.extensions = vec![
                    rtp::header::Extension {
                        id: 3,
                        payload: bytes::Bytes::from(vec![1; kept]),
                    },
                    rtp::header::Extension {
                        id: 4,
                        payload: bytes::Bytes::from(vec![2; dropped]),
                    },
                ];
                // As parsed from the wire: padding to a 32-bit word.
                original.header.extensions_padding = (4 - (kept + 1 + dropped + 1) % 4) % 4;
                let mut out = forwarder
                    .forward(&original, 0, Instant::now())
                    .expect("audio passes");
                out.header
                    .set_extension(5, bytes::Bytes::from_static(&[0, 1]))
                    .expect("set");
                let size = out.header.marshal_size();
                let mut buf = vec![0u8; size + 16];
                let written = out.header.marshal_to(&mut buf).expect("marshals");
                assert_eq!(written, size, "kept {kept} bytes, dropped {dropped}");
            }
        }
    }

    #[test]
    fn audio_is_never_held_back() {
        let mut forwarder = Forwarder::new(MediaKind::Audio, "audio/opus", 48_000);
        forwarder.configure(ForwarderParams::new(5, 111, &[], &[]));
        let pkt = forwarder
            .forward(&packet(9, 1, &[0xff]), 0, Instant::now())
            .expect("audio passes");
        assert!(!pkt.header.extension, "unmapped extensions are removed");
        forwarder.lost_after_forward();
        assert!(!forwarder.waiting_for_keyframe());
    }
}

#[cfg(test)]
mod simulcast_tests {
    use super::*;
    use crate::vp8::Vp8Descriptor;
    use bytes::Bytes;

    /// A VP8 packet of layer `ssrc` with a 15-bit picture id, TL0PICIDX and TID.
    fn vp8(ssrc: u32, seq: u16, picture_id: u16, tid: u8, keyframe: bool) -> rtp::Packet {
        let [high, low] = picture_id.to_be_bytes();
        let payload = vec![
            0x90,
            0xe0,
            0x80 | high,
            low,
            (picture_id / 4) as u8,
            tid << 6,
            u8::from(!keyframe),
            0xAB,
        ];
        rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: 96,
                sequence_number: seq,
                timestamp: u32::from(picture_id) * 3000,
                ssrc,
                ..Default::default()
            },
            payload: Bytes::from(payload),
        }
    }

    fn picture_id(packet: &rtp::Packet) -> u16 {
        Vp8Descriptor::parse(&packet.payload)
            .and_then(|d| d.picture_id)
            .expect("picture id")
            .0
    }

    std::thread_local! {
        /// Each layer's last sequence number: a publisher's numbers run on across `run` calls.
        static SEQS: std::cell::Cell<[u16; 3]> = const { std::cell::Cell::new([1000, 20_000, 40_000]) };
    }

    fn configured() -> Forwarder {
        SEQS.set([1000, 20_000, 40_000]);
        let mut forwarder = Forwarder::new(MediaKind::Video, "video/VP8", 90_000);
        forwarder.set_layered(true);
        forwarder.configure(ForwarderParams::new(0xABCD, 100, &[], &[]));
        forwarder
    }

    /// Feeds `(layer, picture id, tid, keyframe)` rows, each layer on SSRC 10 + layer with its
    /// own sequence numbers and picture ids far apart; returns what was sent, as
    /// `(layer, outgoing seq, outgoing picture id)`.
    fn run(forwarder: &mut Forwarder, rows: &[(u8, u16, u8, bool)]) -> Vec<(u8, u16, u16)> {
        let now = Instant::now();
        rows.iter()
            .filter_map(|&(layer, picture, tid, key)| {
                let mut seqs = SEQS.get();
                seqs[usize::from(layer)] += 1;
                SEQS.set(seqs);
                let packet = vp8(
                    10 + u32::from(layer),
                    seqs[usize::from(layer)],
                    picture + 5000 * u16::from(layer),
                    tid,
                    key,
                );
                let out = forwarder.forward(&packet, layer, now).ok()?;
                Some((layer, out.header.sequence_number, picture_id(&out)))
            })
            .collect()
    }

    #[test]
    fn a_subscription_starts_low_and_climbs_to_its_target_at_keyframes() {
        let mut forwarder = configured();
        forwarder.set_target(2);
        let sent = run(
            &mut forwarder,
            &[
                (2, 1, 0, false), // no keyframe yet
                (0, 1, 0, true),  // the low layer's keyframe comes first: start there
                (2, 2, 0, false),
                (0, 2, 0, false),
                (1, 3, 0, true), // a step up on the way
                (0, 3, 0, false),
                (1, 4, 0, false),
                (2, 5, 0, true), // the target
                (1, 5, 0, false),
                (2, 6, 0, false),
            ],
        );
        let layers: Vec<u8> = sent.iter().map(|s| s.0).collect();
        assert_eq!(layers, vec![0, 0, 1, 1, 2, 2]);
        for pair in sent.windows(2) {
            assert_eq!(
                pair[1].1,
                pair[0].1.wrapping_add(1),
                "sequence continuous: {sent:?}"
            );
            assert_eq!(
                pair[1].2,
                (pair[0].2 + 1) & 0x7fff,
                "picture id continuous: {sent:?}"
            );
        }
        assert_eq!(forwarder.current(), Some(2));
        assert_eq!(forwarder.wanted_keyframe(), None);
    }

    #[test]
    fn going_down_keeps_the_current_layer_until_the_lower_keyframe() {
        let mut forwarder = configured();
        forwarder.set_target(2);
        run(&mut forwarder, &[(2, 1, 0, true)]);
        forwarder.set_target(0);
        assert_eq!(forwarder.wanted_keyframe(), Some(0));
        let sent = run(
            &mut forwarder,
            &[
                (0, 2, 0, false),
                (2, 2, 0, false), // still served: no freeze while the keyframe is awaited
                (2, 3, 0, false),
                (0, 4, 0, true),
                (2, 4, 0, false), // no longer
                (0, 5, 0, false),
            ],
        );
        let layers: Vec<u8> = sent.iter().map(|s| s.0).collect();
        assert_eq!(layers, vec![2, 2, 0, 0]);
        assert_eq!(forwarder.wanted_keyframe(), None);
    }

    #[test]
    fn temporal_layers_above_the_target_are_dropped_without_gaps() {
        let mut forwarder = configured();
        forwarder.set_max_temporal(0);
        // L1T3 pattern: TID 0, 2, 1, 2, 0 ...
        let sent = run(
            &mut forwarder,
            &[
                (0, 1, 0, true),
                (0, 2, 2, false),
                (0, 3, 1, false),
                (0, 4, 2, false),
                (0, 5, 0, false),
                (0, 6, 2, false),
                (0, 7, 1, false),
                (0, 8, 2, false),
                (0, 9, 0, false),
            ],
        );
        let numbers: Vec<(u16, u16)> = sent.iter().map(|s| (s.1, s.2)).collect();
        assert_eq!(numbers, vec![(1001, 1), (1002, 2), (1003, 3)]);
        forwarder.set_max_temporal(ALL_TEMPORAL_LAYERS);
        let sent = run(
            &mut forwarder,
            &[
                (0, 10, 2, false),
                (0, 11, 1, false),
                (0, 12, 0, false),
                (0, 13, 2, false),
            ],
        );
        let pictures: Vec<u16> = sent.iter().map(|s| s.2).collect();
        assert_eq!(
            pictures,
            vec![4, 5],
            "upper layers come back at the next base picture, numbered on without a gap"
        );
    }

    #[test]
    fn a_retransmission_after_a_switch_carries_the_rewritten_picture_id() {
        let mut forwarder = configured();
        forwarder.set_target(0);
        let now = Instant::now();
        let first = vp8(10, 1, 7000, 0, true);
        forwarder.forward(&first, 0, now).expect("keyframe");
        forwarder.set_target(1);
        let switched = vp8(11, 500, 90, 0, true);
        let sent = forwarder.forward(&switched, 1, now).expect("switched");
        assert_eq!(picture_id(&sent), 7001);
        let record = forwarder
            .sent(sent.header.sequence_number)
            .expect("remembered");
        let mut again = switched.clone();
        assert!(forwarder.retransmit(&mut again, record));
        assert_eq!(again.payload, sent.payload);
        assert_eq!(again.header, sent.header);
    }

    #[test]
    fn one_layer_follows_a_new_ssrc_as_before() {
        let mut forwarder = configured();
        let now = Instant::now();
        forwarder
            .forward(&vp8(10, 1, 1, 0, true), 0, now)
            .expect("keyframe");
        let next = forwarder
            .forward(&vp8(99, 7000, 1, 0, false), 0, now)
            .expect("the same layer on a new SSRC goes on");
        assert_eq!(next.header.sequence_number, 2);
    }
}

#[cfg(test)]
mod h264_tests {
    use super::*;
    use bytes::Bytes;

    fn h264(ssrc: u32, seq: u16, idr: bool) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: 102,
                sequence_number: seq,
                timestamp: u32::from(seq) * 3000,
                ssrc,
                ..Default::default()
            },
            // NAL header: 5 is an IDR slice, 1 a non-IDR one.
            payload: Bytes::from(vec![if idr { 0x65 } else { 0x41 }, 0x88, 0x80]),
        }
    }

    #[test]
    fn h264_layers_switch_at_an_idr_with_continuous_numbers() {
        let mut forwarder = Forwarder::new(MediaKind::Video, "video/H264", 90_000);
        forwarder.set_layered(true);
        forwarder.configure(ForwarderParams::new(0xABCD, 102, &[], &[]));
        forwarder.set_target(0);
        let now = Instant::now();
        let first = forwarder
            .forward(&h264(10, 100, true), 0, now)
            .expect("IDR starts it");
        forwarder.set_target(1);
        assert_eq!(
            forwarder.forward(&h264(11, 7000, false), 1, now).err(),
            Some(DropReason::OtherLayer),
            "no switch without an IDR"
        );
        let kept = forwarder
            .forward(&h264(10, 101, false), 0, now)
            .expect("layer 0 goes on");
        let switched = forwarder
            .forward(&h264(11, 7001, true), 1, now)
            .expect("IDR switches");
        assert_eq!(
            kept.header.sequence_number,
            first.header.sequence_number + 1
        );
        assert_eq!(
            switched.header.sequence_number,
            kept.header.sequence_number + 1
        );
        assert_eq!(
            &switched.payload[..],
            &[0x65, 0x88, 0x80],
            "payload untouched"
        );
        assert_eq!(forwarder.current(), Some(1));
    }
}
