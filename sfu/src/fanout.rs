//! One task per Publication: reads its RTP, runs one Forwarder per Subscription, asks the
//! publisher for keyframes. The task alone owns this state; everything else talks to it through
//! [`FanoutCommand`]s, applied between packets, so the per-packet path takes no lock.
//!
//! Each published packet's rewritten copies go to the engine in one message, never one
//! task hop per subscriber.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::rtp;
use rtc::shared::marshal::MarshalSize;
use tokio::sync::mpsc;

use crate::SfuEvent;
use crate::admission::{Admission, MediaSender};
use crate::allocation::Grant;
use crate::exchange::{
    Class, ConnId, FeedbackRoute, KeyframeRoute, Outgoing, SubscriberFeedback, SubscriptionId,
    TrackInput,
};
use crate::feedback::KeyframeThrottle;
use crate::forwarder::{
    ALL_TEMPORAL_LAYERS, DropReason, Forwarder, ForwarderParams, PacketCache, Resend,
};
use crate::ids::{MediaKind, ParticipantId, PublicationId};
use crate::layers::{Layers, MAX_LAYERS};
use crate::vp8::Vp8Descriptor;

/// Where one subscription's RTCP from the engine reaches its fanout, as commands.
pub(crate) fn feedback_route(
    commands: mpsc::Sender<FanoutCommand>,
    key: SubscriptionId,
) -> FeedbackRoute {
    FeedbackRoute::new(move |feedback| {
        let command = match feedback {
            SubscriberFeedback::Nack(seqs) => FanoutCommand::Nack { key, seqs },
            SubscriberFeedback::KeyframeRequest => FanoutCommand::KeyframeRequest { key },
        };
        // Advisory: a full queue drops it, and the subscriber asks again.
        let _ = commands.try_send(command);
    })
}

/// Changes to a fanout, sent by subscribe transports.
pub(crate) enum FanoutCommand {
    Add {
        key: SubscriptionId,
        route: Route,
    },
    Configure {
        key: SubscriptionId,
        params: Box<ForwarderParams>,
    },
    Remove {
        key: SubscriptionId,
    },
    /// A subscriber asked for a keyframe (PLI or FIR).
    KeyframeRequest {
        key: SubscriptionId,
    },
    /// A subscriber lost these outgoing sequence numbers.
    Nack {
        key: SubscriptionId,
        seqs: Vec<u16>,
    },
    /// Stop or resume forwarding to one subscription (its video is off screen).
    Pause {
        key: SubscriptionId,
        paused: bool,
    },
    /// The size one subscriber shows this video at (device pixels); `None` for no limit.
    View {
        key: SubscriptionId,
        size: Option<(u16, u16)>,
    },
    /// What the subscriber's bandwidth allows this subscription.
    Grant {
        key: SubscriptionId,
        grant: Grant,
    },
    /// Send a probe cluster of about `bytes` of padding on this subscription (the subscriber
    /// discards it; its feedback shows what its link carries).
    Probe {
        key: SubscriptionId,
        bytes: usize,
    },
    /// The publisher stopped sending on this media section (a re-offer made it inactive): the
    /// publication ends, as when its track ends.
    End,
}

/// Most packets in one probe cluster (a cluster for a fast link is shorter, not bigger).
const MAX_PROBE_PACKETS: usize = 200;

/// Packets a video publication keeps for retransmission: several seconds at camera rates.
pub(crate) const VIDEO_CACHE_PACKETS: usize = 1024;
/// Packets an audio publication keeps: about 5 s at 50 packets per second.
pub(crate) const AUDIO_CACHE_PACKETS: usize = 256;

/// Counters of one publication, written by its fanout and read by metrics.
#[derive(Debug, Default)]
pub struct PublicationStats {
    /// RTP packets received from the publisher.
    pub received_packets: AtomicU64,
    /// RTP packets handed to subscriptions.
    pub forwarded_packets: AtomicU64,
    /// Payload and header bytes handed to subscriptions.
    pub forwarded_bytes: AtomicU64,
    /// Packets dropped for one subscriber whose queue was full.
    pub dropped_packets: AtomicU64,
    /// Keyframe requests (PLI) sent to the publisher.
    pub keyframe_requests: AtomicU64,
    /// Packets sent again because a subscriber NACKed them.
    pub retransmitted_packets: AtomicU64,
    /// NACKed packets no longer in the cache.
    pub nack_misses: AtomicU64,
    /// NACKed packets not sent again because they were first sent too long ago
    /// ([`crate::forwarder::MAX_RESEND_AGE`]): a keyframe is asked for instead.
    pub nack_too_old: AtomicU64,
    /// Times a subscription moved to another simulcast layer.
    pub layer_switches: AtomicU64,
    /// The publication's layers, as the fanout last measured them (for allocation).
    pub layers: LayerStats,
    /// How loud a microphone was over the last 100 ms, from the publisher's audio-level header
    /// extension (RFC 6464): 127 minus the mean level in -dBov, so 0 is silence (or no level)
    /// and 127 the loudest.
    pub loudness: AtomicU32,
}

/// What the fanout knows of a publication's layers, published every 100 ms.
#[derive(Debug, Default)]
pub struct LayerStats {
    count: AtomicU32,
    /// Width and height, packed `width << 16 | height`.
    sizes: [AtomicU32; MAX_LAYERS],
    /// Bits per second, smoothed; the last value measured while the layer flowed.
    bitrates: [AtomicU64; MAX_LAYERS],
    /// Bits per second of each layer's temporal layer 0, when it has temporal layers.
    thinned: [AtomicU64; MAX_LAYERS],
}

impl LayerStats {
    /// Number of layers (at least one).
    pub fn count(&self) -> u8 {
        self.count
            .load(Ordering::Relaxed)
            .clamp(1, MAX_LAYERS as u32) as u8
    }

    /// The picture size of `layer`.
    pub fn size(&self, layer: u8) -> (u16, u16) {
        let packed = self
            .sizes
            .get(usize::from(layer))
            .map_or(0, |size| size.load(Ordering::Relaxed));
        ((packed >> 16) as u16, packed as u16)
    }

    /// The measured bitrates of every layer, lowest first (0: never measured).
    pub fn bitrates(&self) -> Vec<u64> {
        self.bitrates[..usize::from(self.count())]
            .iter()
            .map(|rate| rate.load(Ordering::Relaxed))
            .collect()
    }

    /// The bitrate of every layer at its lowest frame rate, lowest first (0: no temporal
    /// layers, or never measured).
    pub fn thinned(&self) -> Vec<u64> {
        self.thinned[..usize::from(self.count())]
            .iter()
            .map(|rate| rate.load(Ordering::Relaxed))
            .collect()
    }

    /// The smallest layer that covers `view` (see [`Layers::for_view`]).
    pub fn for_view(&self, view: Option<(u16, u16)>) -> u8 {
        crate::layers::layer_for_view(self.count(), |layer| self.size(layer), view)
    }
}

/// Where one subscription's packets go: a sender of a connection in the engine.
pub(crate) struct Route {
    pub(crate) engine: MediaSender,
    pub(crate) conn: ConnId,
    pub(crate) sender: rtc::rtp_transceiver::RTCRtpSenderId,
}

struct Slot {
    key: SubscriptionId,
    forwarder: Forwarder,
    route: Route,
    /// The size the subscriber shows this video at.
    view: Option<(u16, u16)>,
    /// What its bandwidth allows.
    grant: Grant,
    /// The layer last forwarded, to count switches.
    counted_layer: Option<u8>,
    /// Padding packets of a probe waiting for the end of a frame.
    probe_pending: u16,
}

/// A layer nobody needs any more is turned off at the publisher only after this long, so a tile
/// that shrinks and grows back does not make the publisher's encoder flap.
pub(crate) const DYNACAST_OFF_AFTER: Duration = Duration::from_secs(2);

/// Which of a simulcast publication's layers its publisher is asked to send (dynacast): every
/// layer up to the highest one some subscriber needs.
#[derive(Debug)]
pub(crate) struct Dynacast {
    /// Highest layer the publisher was last told to send (all, at first).
    announced: u8,
    /// Since when fewer layers have been needed.
    lower_since: Option<Instant>,
}

impl Dynacast {
    pub(crate) fn new(layers: &Layers) -> Self {
        Self {
            announced: (layers.count() - 1) as u8,
            lower_since: None,
        }
    }

    /// The highest layer to announce now, when it changes: more at once, fewer after
    /// [`DYNACAST_OFF_AFTER`].
    fn update(&mut self, needed: u8, now: Instant) -> Option<u8> {
        if needed >= self.announced {
            self.lower_since = None;
            if needed == self.announced {
                return None;
            }
        } else {
            let since = *self.lower_since.get_or_insert(now);
            if now.saturating_duration_since(since) < DYNACAST_OFF_AFTER {
                return None;
            }
            self.lower_since = None;
        }
        self.announced = needed;
        Some(needed)
    }
}

/// Who a fanout reports to: the publisher's session, for dynacast.
pub(crate) struct FanoutOwner {
    pub(crate) participant: ParticipantId,
    pub(crate) publication: PublicationId,
    pub(crate) track_id: String,
    pub(crate) events: mpsc::UnboundedSender<SfuEvent>,
}

pub(crate) struct Fanout {
    /// The publisher's packets, from the engine.
    pub(crate) track: mpsc::Receiver<TrackInput>,
    /// Where keyframe requests go.
    pub(crate) upstream: KeyframeRoute,
    pub(crate) kind: MediaKind,
    pub(crate) mime: String,
    pub(crate) clock_rate: u32,
    pub(crate) commands: mpsc::Receiver<FanoutCommand>,
    /// One per layer.
    pub(crate) throttles: Vec<KeyframeThrottle>,
    pub(crate) stats: Arc<PublicationStats>,
    /// One per layer: each layer numbers its packets on its own.
    pub(crate) caches: Vec<PacketCache>,
    pub(crate) layers: Layers,
    /// Layers are VP8 simulcast: their keyframes say their picture size.
    pub(crate) read_keyframe_sizes: bool,
    /// The publisher's id for the `rtp-stream-id` extension, to place a simulcast packet whose
    /// stream has not been announced.
    pub(crate) rid_extension_id: Option<u8>,
    pub(crate) dynacast: Dynacast,
    pub(crate) owner: FanoutOwner,
    /// Counted here and published to `stats` on each tick, so the packet path touches no
    /// shared cache line.
    pub(crate) pending: Counts,
    /// Slots whose copy is in the batch being handed over (reused, so no allocation).
    pub(crate) in_batch: Vec<usize>,
    /// RTP timestamp of the last packet forwarded: the frame in progress.
    pub(crate) frame_timestamp: Option<u32>,
    /// The publisher's id for the audio-level extension (RFC 6464), when it sends one.
    pub(crate) audio_level_id: Option<u8>,
}

/// Counters not yet published to [`PublicationStats`].
#[derive(Debug, Default)]
pub(crate) struct Counts {
    received: u64,
    forwarded: u64,
    bytes: u64,
    dropped: u64,
    /// Layer switches.
    switches: u64,
    /// Bytes received per layer.
    layer_bytes: [u64; MAX_LAYERS],
    /// Bytes of each layer's temporal layer 0, and which layers have temporal layers (bit
    /// `1 << layer`).
    thinned_bytes: [u64; MAX_LAYERS],
    temporal: u8,
    /// Sum and number of audio levels (-dBov) read since the last tick.
    level_sum: u32,
    levels: u32,
}

/// Folds 100 ms worth of `bytes` into a bitrate smoothed over about half a second.
fn smooth_into(rate: &AtomicU64, bytes: u64) {
    let now = bytes * 8 * 10;
    let before = rate.load(Ordering::Relaxed);
    let smoothed = if before == 0 {
        now
    } else {
        (before * 4 + now) / 5
    };
    rate.store(smoothed, Ordering::Relaxed);
}

/// Bytes counted beyond the payload when measuring a layer's bitrate: the RTP header, a
/// transport-wide sequence number, and the wire overhead the estimate counts too, so that
/// layer costs and the estimate are the same kind of rate (for audio's small packets the
/// overhead is a third of the cost).
const RTP_HEADER_BYTES: usize = 12 + 8 + crate::estimator::PACKET_OVERHEAD;

/// The keyframe-request bit of `layer`.
fn keyframe_mask(layer: Option<u8>) -> u8 {
    layer.map_or(0, |layer| 1u8 << layer.min(7))
}

impl Fanout {
    /// Runs until the publisher's track ends.
    pub(crate) async fn run(mut self) {
        let mut slots: Vec<Slot> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(FanoutCommand::End) | None => break,
                    Some(command) => self.apply(command, &mut slots).await,
                },
                input = self.track.recv() => match input {
                    Some(TrackInput::Rtp(packet)) => {
                        if let Some(id) = self.audio_level_id {
                            self.read_level(&packet, id);
                        }
                        let Some(layer) = self.layer_of(&packet) else {
                            continue;
                        };
                        let wanted = self.forward(packet, layer, &mut slots);
                        self.request_keyframes(wanted).await;
                    }
                    Some(TrackInput::Open { ssrc, rid }) => {
                        self.layers.open(ssrc, rid.as_deref());
                    }
                    // The track closed, or its connection did.
                    None => break,
                },
                _ = tick.tick() => {
                    self.publish_counts();
                    if self.kind == MediaKind::Video {
                        self.tick_layers(&mut slots).await;
                    }
                }
            }
        }
        self.publish_counts();
        tracing::debug!("fanout ended");
    }

    fn publish_counts(&mut self) {
        let counts = std::mem::take(&mut self.pending);
        let stats = &self.stats;
        let layers = &stats.layers;
        layers
            .count
            .store(self.layers.count() as u32, Ordering::Relaxed);
        for layer in 0..self.layers.count().min(MAX_LAYERS) {
            let (width, height) = self.layers.size(layer as u8);
            layers.sizes[layer].store(
                u32::from(width) << 16 | u32::from(height),
                Ordering::Relaxed,
            );
            let bytes = counts.layer_bytes[layer];
            if bytes > 0 {
                smooth_into(&layers.bitrates[layer], bytes);
            }
            if counts.temporal & (1 << layer) != 0 {
                smooth_into(&layers.thinned[layer], counts.thinned_bytes[layer]);
            }
        }
        stats
            .received_packets
            .fetch_add(counts.received, Ordering::Relaxed);
        stats
            .forwarded_packets
            .fetch_add(counts.forwarded, Ordering::Relaxed);
        stats
            .forwarded_bytes
            .fetch_add(counts.bytes, Ordering::Relaxed);
        stats
            .dropped_packets
            .fetch_add(counts.dropped, Ordering::Relaxed);
        stats
            .layer_switches
            .fetch_add(counts.switches, Ordering::Relaxed);
        if self.audio_level_id.is_some() {
            let loudness = match counts.levels {
                0 => 0,
                n => 127 - (counts.level_sum / n).min(127),
            };
            stats.loudness.store(loudness, Ordering::Relaxed);
        }
    }

    /// Adds the packet's audio level (RFC 6464: one byte, voice-activity bit then the level in
    /// -dBov, 0 the loudest) to this tick's mean.
    fn read_level(&mut self, packet: &rtp::Packet, id: u8) {
        if let Some(value) = packet.header.get_extension(id)
            && let Some(&byte) = value.first()
        {
            self.pending.level_sum += u32::from(byte & 0x7f);
            self.pending.levels += 1;
        }
    }

    async fn apply(&mut self, command: FanoutCommand, slots: &mut Vec<Slot>) {
        match command {
            FanoutCommand::Add { key, route } => {
                let mut forwarder = Forwarder::new(self.kind, &self.mime, self.clock_rate);
                forwarder.set_layered(!self.layers.is_single());
                let mut slot = Slot {
                    key,
                    forwarder,
                    route,
                    view: None,
                    grant: Grant::UpTo(u8::MAX),
                    counted_layer: None,
                    probe_pending: 0,
                };
                slot.forwarder
                    .set_target(self.target_of(&slot, Instant::now()));
                slots.push(slot);
            }
            FanoutCommand::Configure { key, params } => {
                if let Some(slot) = slots.iter_mut().find(|slot| slot.key == key) {
                    slot.forwarder.configure(*params);
                    // A new subscriber must see a picture within a second: ask right away.
                    let wanted = keyframe_mask(slot.forwarder.wanted_keyframe());
                    self.request_keyframes(wanted).await;
                }
            }
            FanoutCommand::Remove { key } => slots.retain(|slot| slot.key != key),
            FanoutCommand::KeyframeRequest { key } => {
                // A subscriber lost a picture: the layer it is forwarded must start again. Only
                // that one: a weak link's losses would otherwise cost every subscriber a
                // keyframe burst on every layer, and the bursts deepen the weak link's losses.
                if let Some(slot) = slots.iter().find(|slot| slot.key == key) {
                    let layer = slot
                        .forwarder
                        .wanted_keyframe()
                        .or(slot.forwarder.current());
                    self.request_keyframes(keyframe_mask(layer).max(1)).await;
                }
            }
            FanoutCommand::Nack { key, seqs } => {
                if let Some(layer) = self.retransmit(key, &seqs, slots) {
                    self.request_keyframes(keyframe_mask(Some(layer))).await;
                }
            }
            FanoutCommand::Pause { key, paused } => {
                if let Some(slot) = slots.iter_mut().find(|slot| slot.key == key) {
                    slot.forwarder.set_paused(paused);
                    if !paused {
                        let wanted = keyframe_mask(slot.forwarder.wanted_keyframe());
                        self.request_keyframes(wanted).await;
                    }
                }
            }
            FanoutCommand::View { key, size } => {
                let now = Instant::now();
                if let Some(slot) = slots.iter_mut().find(|slot| slot.key == key) {
                    slot.view = size;
                    slot.forwarder.set_target(self.target_of(slot, now));
                    let wanted = keyframe_mask(slot.forwarder.wanted_keyframe());
                    self.request_keyframes(wanted).await;
                }
                // A larger view is served at once: the publisher may need to resume a layer.
                self.update_dynacast(slots, now);
            }
            FanoutCommand::Grant { key, grant } => {
                if let Some(slot) = slots.iter_mut().find(|slot| slot.key == key) {
                    slot.grant = grant;
                    slot.forwarder
                        .set_paused_for_bandwidth(grant == Grant::Paused);
                    slot.forwarder.set_max_temporal(match grant {
                        Grant::Thinned(_) => 0,
                        _ => ALL_TEMPORAL_LAYERS,
                    });
                    slot.forwarder
                        .set_target(self.target_of(slot, Instant::now()));
                    let wanted = keyframe_mask(slot.forwarder.wanted_keyframe());
                    self.request_keyframes(wanted).await;
                }
            }
            FanoutCommand::Probe { key, bytes } => self.probe(key, bytes, slots),
            // Ends the run loop before it gets here.
            FanoutCommand::End => {}
        }
    }

    /// How the engine paces this publication's packets.
    fn class(&self) -> Class {
        match self.kind {
            MediaKind::Audio => Class::Audio,
            MediaKind::Video => Class::Video,
        }
    }

    /// Sends a probe cluster of about `bytes` on one subscription: padding-only packets after
    /// the last one sent, now if that ended a frame, else after the next that does (padding
    /// inside a frame would split it). Duplicates of sent packets would not do: SRTP's replay
    /// protection drops them before congestion control counts them.
    fn probe(&mut self, key: SubscriptionId, bytes: usize, slots: &mut [Slot]) {
        let Some(slot) = slots.iter_mut().find(|slot| slot.key == key) else {
            return;
        };
        slot.probe_pending = bytes
            .div_ceil(crate::forwarder::PADDING_PACKET_BYTES)
            .clamp(1, MAX_PROBE_PACKETS) as u16;
        Self::send_probe(slot);
    }

    /// Sends the probe a slot waits to send, when it can go now.
    fn send_probe(slot: &mut Slot) {
        let cluster: Vec<Outgoing> = slot
            .forwarder
            .padding(slot.probe_pending)
            .into_iter()
            .map(|packet| Outgoing {
                conn: slot.route.conn,
                sender: slot.route.sender,
                packet,
                class: Class::Probe,
            })
            .collect();
        if !cluster.is_empty() {
            slot.probe_pending = 0;
            let _ = slot.route.engine.try_forward(cluster);
        }
    }

    /// Answers a NACK from the publication's cache; the layer being forwarded when some packet
    /// was gone, so the subscriber can only recover with a keyframe of it.
    fn retransmit(&mut self, key: SubscriptionId, seqs: &[u16], slots: &mut [Slot]) -> Option<u8> {
        let slot = slots.iter_mut().find(|slot| slot.key == key)?;
        let (mut sent_again, mut missed, mut too_old) = (0u64, 0u64, 0u64);
        let now = Instant::now();
        for &seq in seqs {
            let Some(sent) = slot.forwarder.sent(seq) else {
                missed += 1;
                continue;
            };
            match slot.forwarder.resend(seq, now) {
                Resend::Now => {}
                // Padding, or sent again a moment ago (that copy is on its way).
                Resend::Skip => continue,
                Resend::TooOld => {
                    too_old += 1;
                    continue;
                }
            }
            let cache = self
                .layers
                .index_of(sent.source_ssrc)
                .and_then(|layer| self.caches.get(usize::from(layer)));
            let Some(original) = cache.and_then(|c| c.get(sent.source_ssrc, sent.source_seq))
            else {
                missed += 1;
                continue;
            };
            let mut packet = original.clone();
            if !slot.forwarder.retransmit(&mut packet, sent) {
                missed += 1;
                continue;
            }
            let outgoing = Outgoing {
                conn: slot.route.conn,
                sender: slot.route.sender,
                packet,
                class: match self.kind {
                    MediaKind::Audio => Class::Audio,
                    MediaKind::Video => Class::Resend,
                },
            };
            if slot.route.engine.try_forward(vec![outgoing]).is_ok() {
                sent_again += 1;
            } else {
                missed += 1;
            }
        }
        self.stats
            .retransmitted_packets
            .fetch_add(sent_again, Ordering::Relaxed);
        self.stats.nack_misses.fetch_add(missed, Ordering::Relaxed);
        self.stats
            .nack_too_old
            .fetch_add(too_old, Ordering::Relaxed);
        if missed + too_old > 0 {
            Some(slot.forwarder.current().unwrap_or(0))
        } else {
            None
        }
    }

    /// The layer a packet belongs to: by its SSRC, or for a simulcast stream not yet announced,
    /// by its `rtp-stream-id`. `None` drops it.
    #[inline]
    fn layer_of(&mut self, packet: &rtp::Packet) -> Option<u8> {
        if let Some(layer) = self.layers.index_of(packet.header.ssrc) {
            return Some(layer);
        }
        let rid = packet.header.get_extension(self.rid_extension_id?)?;
        let rid = std::str::from_utf8(&rid).ok()?;
        self.layers.open(packet.header.ssrc, Some(rid));
        self.layers.index_of(packet.header.ssrc)
    }

    /// Every 100 ms: moves each subscription to the layer its view needs among those flowing,
    /// repeats keyframe requests still unanswered, and tells the publisher which layers are
    /// needed.
    async fn tick_layers(&mut self, slots: &mut [Slot]) {
        let now = Instant::now();
        let mut wanted = 0u8;
        for slot in slots.iter_mut() {
            if !self.layers.is_single() {
                slot.forwarder.set_target(self.target_of(slot, now));
            }
            wanted |= keyframe_mask(slot.forwarder.wanted_keyframe());
        }
        // Requests asked for but throttled go out once their interval has passed.
        for layer in 0..self.throttles.len() {
            if self.throttles[layer].poll(now) {
                self.send_pli(layer as u8).await;
            }
        }
        self.request_keyframes(wanted).await;
        self.update_dynacast(slots, now);
    }

    /// The layer a subscription should move to: the smallest that covers its view, no higher
    /// than its bandwidth allows, among those flowing.
    fn target_of(&self, slot: &Slot, now: Instant) -> u8 {
        let wanted = self.layers.for_view(slot.view);
        let allowed = match slot.grant {
            Grant::UpTo(layer) => wanted.min(layer),
            Grant::Thinned(layer) => wanted.min(layer),
            Grant::Paused => wanted,
        };
        self.layers.live_target(allowed, now)
    }

    /// Tells the publisher of a simulcast publication which layers someone needs (what is
    /// watched, whatever any subscriber's bandwidth allows).
    fn update_dynacast(&mut self, slots: &[Slot], now: Instant) {
        if self.layers.is_single() {
            return;
        }
        let needed = slots
            .iter()
            .filter(|slot| !slot.forwarder.is_paused())
            .map(|slot| self.layers.for_view(slot.view))
            .max()
            .unwrap_or(0);
        let Some(top) = self.dynacast.update(needed, now) else {
            return;
        };
        let active: Vec<String> = (0..=top)
            .filter_map(|layer| self.layers.rid(layer).map(str::to_owned))
            .collect();
        tracing::debug!(?active, "layers needed");
        let _ = self.owner.events.send(SfuEvent::LayersWanted {
            participant: self.owner.participant.clone(),
            publication: self.owner.publication.clone(),
            track_id: self.owner.track_id.clone(),
            active,
        });
    }

    /// Forwards one packet of spatial `layer` to every subscription; returns the layers some
    /// subscriber needs a keyframe of (bit `1 << layer`).
    fn forward(&mut self, packet: rtp::Packet, layer: u8, slots: &mut Vec<Slot>) -> u8 {
        let now = Instant::now();
        let mut needs_keyframe = 0u8;
        if !self.layers.is_single() {
            self.layers.saw_packet(layer, now);
            if self.read_keyframe_sizes
                && let Some(descriptor) = Vp8Descriptor::parse(&packet.payload)
            {
                if let Some(size) = descriptor.keyframe_size(&packet.payload) {
                    self.layers.saw_size(layer, size);
                }
                if descriptor.temporal.is_some()
                    && let Some(thinned) = self.pending.thinned_bytes.get_mut(usize::from(layer))
                {
                    self.pending.temporal |= 1 << layer;
                    if descriptor.temporal == Some(0) {
                        *thinned += (packet.payload.len() + RTP_HEADER_BYTES) as u64;
                    }
                }
            }
        }
        let mut batch: Vec<Outgoing> = Vec::with_capacity(slots.len());
        let class = self.class();
        // One message per engine (media thread): the first engine's copies in `batch`, any
        // other engine's in a group of its own, allocated only when there is one.
        let mut engine: Option<&MediaSender> = None;
        self.in_batch.clear();
        let mut others: Vec<(MediaSender, Vec<Outgoing>, Vec<usize>)> = Vec::new();
        let mut probing = Vec::new();
        for (index, slot) in slots.iter_mut().enumerate() {
            match slot.forwarder.forward(&packet, layer, now) {
                Ok(out) => {
                    if slot.probe_pending > 0 {
                        probing.push(index);
                    }
                    if slot.counted_layer != Some(layer) {
                        if slot.counted_layer.is_some() {
                            self.pending.switches += 1;
                        }
                        slot.counted_layer = Some(layer);
                    }
                    let outgoing = Outgoing {
                        conn: slot.route.conn,
                        sender: slot.route.sender,
                        packet: out,
                        class,
                    };
                    let same = engine.is_none_or(|tx| tx.same_engine(&slot.route.engine));
                    if same {
                        engine = Some(&slot.route.engine);
                        batch.push(outgoing);
                        self.in_batch.push(index);
                    } else if let Some((_, copies, indices)) = others
                        .iter_mut()
                        .find(|(tx, _, _)| tx.same_engine(&slot.route.engine))
                    {
                        copies.push(outgoing);
                        indices.push(index);
                    } else {
                        others.push((slot.route.engine.clone(), vec![outgoing], vec![index]));
                    }
                }
                Err(DropReason::WaitingForKeyframe) => {
                    needs_keyframe |= keyframe_mask(slot.forwarder.wanted_keyframe());
                }
                Err(
                    DropReason::NotNegotiated
                    | DropReason::Paused
                    | DropReason::OtherLayer
                    | DropReason::TemporalLayer
                    | DropReason::TooLate,
                ) => {}
            }
        }
        let mut forwarded = 0;
        let mut lost: Vec<usize> = Vec::new();
        let mut closed = false;
        // Slots keep their order, so under overload the same subscriptions keep being served
        // fully and the rest wait for keyframes, rather than everyone in turn. The rest of a
        // video frame whose first packet went out goes out too (a frame cut short costs a
        // keyframe wait); new frames are admitted only within the limit.
        let continues_frame = self.frame_timestamp == Some(packet.header.timestamp);
        let admission = match self.kind {
            MediaKind::Audio => Admission::Priority,
            MediaKind::Video if continues_frame => Admission::FrameRest,
            MediaKind::Video => Admission::Normal,
        };
        if let Some(tx) = engine {
            match tx.try_forward_some(&mut batch, admission) {
                Ok(admitted) => {
                    forwarded = admitted as u64;
                    lost.extend_from_slice(&self.in_batch[admitted..]);
                }
                Err(_) => closed = true,
            }
        }
        for (tx, mut copies, indices) in others {
            match tx.try_forward_some(&mut copies, admission) {
                Ok(admitted) => {
                    forwarded += admitted as u64;
                    lost.extend_from_slice(&indices[admitted..]);
                }
                Err(_) => closed = true,
            }
        }
        for index in lost {
            // The engine is behind: these subscribers lose the packet, and their video
            // restarts at the next keyframe rather than a queue growing without bound.
            slots[index].forwarder.lost_after_forward();
            self.pending.dropped += 1;
            needs_keyframe |= keyframe_mask(slots[index].forwarder.wanted_keyframe());
        }
        // After the frame it ends (a lost packet leaves the forwarder waiting for a keyframe,
        // and it sends no padding then).
        for index in probing {
            if let Some(slot) = slots.get_mut(index) {
                Self::send_probe(slot);
            }
        }
        if closed {
            slots.retain(|slot| !slot.route.engine.is_closed());
        }
        self.frame_timestamp = Some(packet.header.timestamp);
        self.pending.received += 1;
        if let Some(bytes) = self.pending.layer_bytes.get_mut(usize::from(layer)) {
            *bytes += (packet.payload.len() + RTP_HEADER_BYTES) as u64;
        }
        if forwarded > 0 {
            let size = (packet.header.marshal_size() + packet.payload.len()) as u64;
            self.pending.forwarded += forwarded;
            self.pending.bytes += forwarded * size;
        }
        // The original is kept once for every subscriber's NACKs; no copy is made for it.
        if let Some(cache) = self.caches.get_mut(usize::from(layer)) {
            cache.insert(packet);
        }
        needs_keyframe
    }

    /// Asks the publisher for a keyframe on each layer in `layers` (bit `1 << layer`), each
    /// layer throttled on its own and shared by all subscribers.
    async fn request_keyframes(&mut self, layers: u8) {
        if self.kind != MediaKind::Video || layers == 0 {
            return;
        }
        let now = Instant::now();
        for layer in 0..self.throttles.len() as u8 {
            if layers & (1 << layer) != 0 && self.throttles[usize::from(layer)].request(now) {
                self.send_pli(layer).await;
            }
        }
    }

    async fn send_pli(&self, layer: u8) {
        let Some(media_ssrc) = self.layers.ssrc(layer) else {
            return;
        };
        if self.upstream.request(media_ssrc) {
            self.stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynacast_adds_layers_at_once_and_removes_them_after_a_while() {
        let layers = Layers::simulcast(&["q".into(), "h".into(), "f".into()]);
        let mut dynacast = Dynacast::new(&layers);
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(
            dynacast.update(2, at(0)),
            None,
            "everything is sent at first"
        );
        assert_eq!(dynacast.update(0, at(100)), None);
        assert_eq!(dynacast.update(0, at(1_000)), None);
        assert_eq!(dynacast.update(0, at(2_100)), Some(0), "after 2 s");
        assert_eq!(dynacast.update(2, at(2_200)), Some(2), "back at once");
        assert_eq!(dynacast.update(1, at(2_300)), None);
        assert_eq!(dynacast.update(2, at(3_000)), None, "a dip does not count");
        assert_eq!(dynacast.update(1, at(4_400)), None, "the wait starts again");
        assert_eq!(dynacast.update(1, at(6_400)), Some(1));
    }
}
