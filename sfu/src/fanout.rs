//! One task per Publication: reads its RTP, runs one Forwarder per Subscription, asks the
//! publisher for keyframes. The task alone owns this state; everything else talks to it through
//! [`FanoutCommand`]s, applied between packets, so the per-packet path takes no lock.
//!
//! Each published packet's rewritten copies go to the egress engine in one message, never one
//! task hop per subscriber.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::shared::marshal::MarshalSize;
use tokio::sync::mpsc;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use crate::egress::{Admission, ConnId, EgressSender, Outgoing, Refused};
use crate::feedback::KeyframeThrottle;
use crate::forwarder::{DropReason, Forwarder, ForwarderParams, PacketCache};
use crate::ids::MediaKind;

/// Key of one subscription inside its fanout.
pub(crate) type SubscriptionKey = u64;

/// Changes to a fanout, sent by subscribe transports.
pub(crate) enum FanoutCommand {
    Add {
        key: SubscriptionKey,
        route: Route,
    },
    Configure {
        key: SubscriptionKey,
        params: Box<ForwarderParams>,
    },
    Remove {
        key: SubscriptionKey,
    },
    KeyframeRequest,
    /// A subscriber lost these outgoing sequence numbers.
    Nack {
        key: SubscriptionKey,
        seqs: Vec<u16>,
    },
    /// Stop or resume forwarding to one subscription (its video is off screen).
    Pause {
        key: SubscriptionKey,
        paused: bool,
    },
    /// The publisher stopped sending on this media section (a re-offer made it inactive): the
    /// publication ends, as when its track ends.
    End,
}

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
    /// How loud a microphone was over the last 100 ms, from the publisher's audio-level header
    /// extension (RFC 6464): 127 minus the mean level in -dBov, so 0 is silence (or no level)
    /// and 127 the loudest.
    pub loudness: AtomicU32,
}

/// Where one subscription's packets go: a sender of a connection in the egress engine.
pub(crate) struct Route {
    pub(crate) egress: EgressSender,
    pub(crate) conn: ConnId,
    pub(crate) sender: rtc::rtp_transceiver::RTCRtpSenderId,
}

struct Slot {
    key: SubscriptionKey,
    forwarder: Forwarder,
    route: Route,
}

pub(crate) struct Fanout {
    pub(crate) track: Arc<dyn TrackRemote>,
    pub(crate) media_ssrc: u32,
    pub(crate) kind: MediaKind,
    pub(crate) mime: String,
    pub(crate) clock_rate: u32,
    pub(crate) commands: mpsc::Receiver<FanoutCommand>,
    pub(crate) throttle: KeyframeThrottle,
    pub(crate) stats: Arc<PublicationStats>,
    pub(crate) cache: PacketCache,
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
    /// Sum and number of audio levels (-dBov) read since the last tick.
    level_sum: u32,
    levels: u32,
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
                event = self.track.poll() => match event {
                    Some(TrackRemoteEvent::OnRtpPacket(packet)) => {
                        if let Some(id) = self.audio_level_id {
                            self.read_level(&packet, id);
                        }
                        if self.forward(packet, &mut slots) {
                            self.request_keyframe().await;
                        }
                    }
                    Some(TrackRemoteEvent::OnEnded) | None => break,
                    Some(_) => {}
                },
                _ = tick.tick() => {
                    self.publish_counts();
                    if self.kind == MediaKind::Video && self.throttle.poll(Instant::now()) {
                        self.send_pli().await;
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
            FanoutCommand::Add { key, route } => slots.push(Slot {
                key,
                forwarder: Forwarder::new(self.kind, &self.mime, self.clock_rate),
                route,
            }),
            FanoutCommand::Configure { key, params } => {
                if let Some(slot) = slots.iter_mut().find(|slot| slot.key == key) {
                    slot.forwarder.configure(*params);
                    // A new subscriber must see a picture within a second: ask right away.
                    if slot.forwarder.waiting_for_keyframe() {
                        self.request_keyframe().await;
                    }
                }
            }
            FanoutCommand::Remove { key } => slots.retain(|slot| slot.key != key),
            FanoutCommand::KeyframeRequest => self.request_keyframe().await,
            FanoutCommand::Nack { key, seqs } => {
                if self.retransmit(key, &seqs, slots) {
                    self.request_keyframe().await;
                }
            }
            FanoutCommand::Pause { key, paused } => {
                if let Some(slot) = slots.iter_mut().find(|slot| slot.key == key) {
                    slot.forwarder.set_paused(paused);
                    if !paused && slot.forwarder.waiting_for_keyframe() {
                        self.request_keyframe().await;
                    }
                }
            }
            // Ends the run loop before it gets here.
            FanoutCommand::End => {}
        }
    }

    /// Answers a NACK from the publication's cache; true when some packet was gone, so the
    /// subscriber can only recover with a keyframe.
    fn retransmit(&mut self, key: SubscriptionKey, seqs: &[u16], slots: &mut [Slot]) -> bool {
        let Some(slot) = slots.iter_mut().find(|slot| slot.key == key) else {
            return false;
        };
        let (mut sent_again, mut missed) = (0u64, 0u64);
        for &seq in seqs {
            let Some(sent) = slot.forwarder.sent(seq) else {
                missed += 1;
                continue;
            };
            let Some(original) = self.cache.get(sent.source_ssrc, sent.source_seq) else {
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
            };
            if slot.route.egress.try_forward(vec![outgoing]).is_ok() {
                sent_again += 1;
            } else {
                missed += 1;
            }
        }
        self.stats
            .retransmitted_packets
            .fetch_add(sent_again, Ordering::Relaxed);
        self.stats.nack_misses.fetch_add(missed, Ordering::Relaxed);
        missed > 0
    }

    /// Forwards one packet to every subscription; true when some subscriber needs a keyframe.
    fn forward(&mut self, packet: rtp::Packet, slots: &mut Vec<Slot>) -> bool {
        let now = Instant::now();
        let mut needs_keyframe = false;
        let mut batch: Vec<Outgoing> = Vec::with_capacity(slots.len());
        // Every slot shares one engine today; a slot of another engine gets its own message.
        let mut egress: Option<&EgressSender> = None;
        self.in_batch.clear();
        let mut others = Vec::new();
        for (index, slot) in slots.iter_mut().enumerate() {
            match slot.forwarder.forward(&packet, now) {
                Ok(out) => {
                    let outgoing = Outgoing {
                        conn: slot.route.conn,
                        sender: slot.route.sender,
                        packet: out,
                    };
                    let same = egress.is_none_or(|tx| tx.same_engine(&slot.route.egress));
                    if same {
                        egress = Some(&slot.route.egress);
                        batch.push(outgoing);
                        self.in_batch.push(index);
                    } else {
                        others.push((index, outgoing));
                    }
                }
                Err(DropReason::WaitingForKeyframe) => needs_keyframe = true,
                Err(DropReason::NotNegotiated | DropReason::Paused) => {}
            }
        }
        let mut forwarded = 0;
        let mut lost: Vec<usize> = Vec::new();
        let mut closed = false;
        if let Some(tx) = egress {
            // Slots keep their order, so under overload the same subscriptions keep being
            // served fully and the rest wait for keyframes, rather than everyone in turn.
            // The rest of a video frame whose first packet went out goes out too (a frame cut
            // short costs a keyframe wait); new frames are admitted only within the limit.
            let continues_frame = self.frame_timestamp == Some(packet.header.timestamp);
            let admission = match self.kind {
                MediaKind::Audio => Admission::Priority,
                MediaKind::Video if continues_frame => Admission::Priority,
                MediaKind::Video => Admission::Normal,
            };
            match tx.try_forward_some(&mut batch, admission) {
                Ok(admitted) => {
                    forwarded = admitted as u64;
                    lost.extend_from_slice(&self.in_batch[admitted..]);
                }
                Err(_) => closed = true,
            }
        }
        for (index, outgoing) in others {
            match slots[index].route.egress.try_forward(vec![outgoing]) {
                Ok(()) => forwarded += 1,
                Err(Refused::Overloaded) => lost.push(index),
                Err(Refused::Closed) => closed = true,
            }
        }
        for index in lost {
            // The engine is behind: these subscribers lose the packet, and their video
            // restarts at the next keyframe rather than a queue growing without bound.
            slots[index].forwarder.lost_after_forward();
            self.pending.dropped += 1;
            needs_keyframe |= self.kind == MediaKind::Video;
        }
        if closed {
            slots.retain(|slot| !slot.route.egress.is_closed());
        }
        self.frame_timestamp = Some(packet.header.timestamp);
        self.pending.received += 1;
        if forwarded > 0 {
            let size = (packet.header.marshal_size() + packet.payload.len()) as u64;
            self.pending.forwarded += forwarded;
            self.pending.bytes += forwarded * size;
        }
        // The original is kept once for every subscriber's NACKs; no copy is made for it.
        self.cache.insert(packet);
        needs_keyframe
    }

    async fn request_keyframe(&mut self) {
        if self.kind == MediaKind::Video && self.throttle.request(Instant::now()) {
            self.send_pli().await;
        }
    }

    async fn send_pli(&self) {
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc: self.media_ssrc,
        };
        match self.track.write_rtcp(vec![Box::new(pli)]).await {
            Ok(()) => {
                self.stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => tracing::debug!(%err, "keyframe request not sent"),
        }
    }
}
