//! Server-side peer connections: the async handles through which signaling drives the
//! connections the engine owns.
//!
//! A participant has a publish transport (the client offers, the server answers and receives)
//! and a subscribe transport (the server offers and sends). Offers on each are made by one side
//! only, so they never collide.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::allocation::{
    Allocator, Demand, Grant, KEEP_DENOMINATOR, KEEP_NUMERATOR, RISE_DENOMINATOR, RISE_NUMERATOR,
    Steady, allocate, unlimited_cost,
};
pub use crate::connection::AUDIO_LEVEL_URI;
use crate::engine::{Bandwidth, Engine, EngineInput, PROBE_FACTOR};
use crate::exchange::{
    ConnId, KeyframeRoute, OpenedTrack, PublishSink, SubscriptionId, TrackInput, Upstream,
};
use crate::fanout::{
    AUDIO_CACHE_PACKETS, Counts, Dynacast, Fanout, FanoutCommand, FanoutOwner, PublicationStats,
    Route, VIDEO_CACHE_PACKETS, feedback_route,
};
use crate::feedback::KeyframeThrottle;
use crate::forwarder::{ForwarderParams, PacketCache};
use crate::ids::{MediaKind, ParticipantId, PublicationId, Source};
use crate::keyframe::VideoCodec;
use crate::layers::Layers;
use crate::{Publication, SfuError, SfuEvent, Shared};

/// Media sections a publish connection may carry: microphone, camera, screen and its audio, with
/// room to spare. Every section costs a fanout here and a section in every subscriber's
/// connection, so a peer may not ask for unbounded numbers of them.
pub const MAX_PUBLISH_SECTIONS: usize = 8;

/// `(uri, id)` of every `a=extmap` line in an SDP. BUNDLE requires one id per URI across the
/// whole session, so a session-wide list is exact.
pub fn extmap(sdp: &str) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for line in sdp.lines() {
        let Some(rest) = line.trim_end().strip_prefix("a=extmap:") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(id), Some(uri)) = (parts.next(), parts.next()) else {
            continue;
        };
        let id = id.split('/').next().and_then(|id| id.parse::<u16>().ok());
        if let Some(id) = id
            && !out.iter().any(|(known, _)| known == uri)
        {
            out.push((uri.to_owned(), id));
        }
    }
    out
}

/// Caps the publisher's video bitrate: `b=TIAS` (bps, RFC 3890) and `b=AS` (kbps, for older
/// stacks) in every video section of the answer sent to it. Only the copy sent to the client
/// carries them; the bandwidth lines limit what the remote sends, not what we do. A simulcast
/// section gets half as much again, for its lower layers.
pub fn with_video_bandwidth(sdp: &str, bits_per_second: u64) -> String {
    let mut out = String::with_capacity(sdp.len() + 64);
    let mut in_video = false;
    let mut cap = bits_per_second;
    let lines: Vec<&str> = sdp.split_inclusive('\n').collect();
    for (index, line) in lines.iter().enumerate() {
        let bare = line.trim_end();
        if bare.starts_with("m=") {
            in_video = bare.starts_with("m=video");
            let simulcast = lines[index + 1..]
                .iter()
                .take_while(|next| !next.starts_with("m="))
                .any(|next| next.starts_with("a=simulcast:"));
            cap = if simulcast {
                bits_per_second.saturating_mul(3) / 2
            } else {
                bits_per_second
            };
        } else if in_video && bare.starts_with("b=") {
            continue; // Replaced below, after `c=`.
        }
        out.push_str(line);
        if in_video && bare.starts_with("c=") {
            out.push_str(&format!("b=AS:{}\r\nb=TIAS:{cap}\r\n", cap.div_ceil(1000)));
        }
    }
    out
}

/// The RTP stream id extension (RFC 8852): which simulcast encoding a packet belongs to.
const RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";

/// Packets of one publication waiting for its fanout. A fanout takes each in microseconds; this
/// covers a stall of a few frames of a simulcast camera before packets are dropped (counted).
const TRACK_QUEUE: usize = 512;

// ---------------------------------------------------------------------------------------------
// Publish

pub(crate) struct PublishShared {
    shared: Arc<Shared>,
    participant: ParticipantId,
    events: mpsc::UnboundedSender<SfuEvent>,
    /// The engine, for keyframe requests.
    engine: Engine,
    /// What the publisher says each track of its latest offer is.
    declared: Mutex<Vec<DeclaredTrack>>,
    extensions: Mutex<Vec<(String, u16)>>,
    /// The rids each section of the latest offer sends in simulcast, by `mid`.
    simulcast: Mutex<Vec<(String, Vec<String>)>>,
    /// Running publications by the `mid` of their section, to end them when a re-offer stops
    /// that section.
    running: Mutex<Vec<(String, PublicationId, mpsc::Sender<FanoutCommand>)>>,
    span: tracing::Span,
}

/// What a publisher says one of the tracks it sends is. The `mid` (its media section) is what
/// every WebRTC stack knows for sure; the msid track id differs from the browser's
/// `MediaStreamTrack.id` in Firefox, and some stacks put it only on `a=ssrc` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredTrack {
    /// The publisher's name for the track: `mute` messages carry it.
    pub track_id: String,
    /// Microphone, camera or screen.
    pub source: Source,
    /// The media section that carries it, when the publisher said.
    pub mid: Option<String>,
}

/// The rids each media section of an offer sends as simulcast (`a=simulcast:send`, RFC 8853), by
/// `mid`, in the offer's order. Of alternatives (`a,b`) the first is taken; paused streams
/// (`~a`) count too, as they may be resumed.
pub fn simulcast_rids(sdp: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut mid: Option<String> = None;
    let mut rids: Option<Vec<String>> = None;
    let mut finish = |mid: &mut Option<String>, rids: &mut Option<Vec<String>>| {
        if let (Some(mid), Some(rids)) = (mid.take(), rids.take()) {
            out.push((mid, rids));
        }
    };
    for line in sdp.lines().map(str::trim_end) {
        if line.starts_with("m=") {
            finish(&mut mid, &mut rids);
        } else if let Some(value) = line.strip_prefix("a=mid:") {
            mid = Some(value.to_owned());
        } else if let Some(value) = line.strip_prefix("a=simulcast:") {
            let mut words = value.split_whitespace();
            while let (Some(direction), Some(streams)) = (words.next(), words.next()) {
                if direction == "send" {
                    rids = Some(
                        streams
                            .split(';')
                            .filter_map(|stream| stream.split(',').next())
                            .map(|rid| rid.trim_start_matches('~').to_owned())
                            .filter(|rid| !rid.is_empty())
                            .collect(),
                    );
                }
            }
        }
    }
    finish(&mut mid, &mut rids);
    out
}

/// The `mid`s of an offer's sections on which its sender sends nothing: rejected (port 0),
/// `a=inactive` or `a=recvonly`.
pub fn sections_not_sending(sdp: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<(bool, Option<String>)> = None;
    let mut finish = |section: Option<(bool, Option<String>)>| {
        if let Some((true, Some(mid))) = section {
            out.push(mid);
        }
    };
    for line in sdp.lines().map(str::trim_end) {
        if let Some(media) = line.strip_prefix("m=") {
            finish(current.take());
            let rejected = media.split_whitespace().nth(1) == Some("0");
            current = Some((rejected, None));
        } else if let Some((stopped, mid)) = current.as_mut() {
            if let Some(value) = line.strip_prefix("a=mid:") {
                *mid = Some(value.to_owned());
            } else if line == "a=inactive" || line == "a=recvonly" {
                *stopped = true;
            }
        }
    }
    finish(current.take());
    out
}

/// The declaration for a track received on section `mid` whose SDP names it `msid_track_id`:
/// by `mid` first, then by msid track id (for publishers that name no section).
pub(crate) fn find_declared<'a>(
    declared: &'a [DeclaredTrack],
    mid: Option<&str>,
    msid_track_id: &str,
) -> Option<&'a DeclaredTrack> {
    mid.and_then(|mid| declared.iter().find(|d| d.mid.as_deref() == Some(mid)))
        .or_else(|| {
            declared
                .iter()
                .find(|d| !msid_track_id.is_empty() && d.track_id == msid_track_id)
        })
}

/// What the engine holds of a publish transport: it starts publications.
struct Publisher(Arc<PublishShared>);

impl PublishSink for Publisher {
    fn track_opened(&self, track: OpenedTrack) -> Option<mpsc::Sender<TrackInput>> {
        Some(self.0.start_publication(track))
    }
}

impl PublishShared {
    fn start_publication(self: &Arc<Self>, track: OpenedTrack) -> mpsc::Sender<TrackInput> {
        let OpenedTrack {
            conn,
            receiver,
            mid,
            msid_track_id,
            kind,
            codec,
            ssrc: media_ssrc,
        } = track;
        let kind = match kind {
            RtpCodecKind::Audio => MediaKind::Audio,
            _ => MediaKind::Video,
        };
        let declared =
            self.declared.lock().ok().and_then(|declared| {
                find_declared(&declared, mid.as_deref(), &msid_track_id).cloned()
            });
        let (source, track_id) = match declared {
            Some(declared) => (declared.source, declared.track_id),
            None => (
                match kind {
                    MediaKind::Audio => Source::Microphone,
                    MediaKind::Video => Source::Camera,
                },
                msid_track_id,
            ),
        };
        let publisher_extensions = self
            .extensions
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        let rids = mid.as_deref().and_then(|mid| {
            let simulcast = self.simulcast.lock().ok()?;
            simulcast
                .iter()
                .find(|(section, _)| section == mid)
                .map(|(_, rids)| rids.clone())
        });
        let mut layers = match (kind, rids) {
            (MediaKind::Video, Some(rids)) => Layers::simulcast(&rids),
            _ => Layers::single(),
        };
        if layers.is_single() {
            layers.open(media_ssrc, None);
        }
        let extension_id = |uri: &str| {
            publisher_extensions
                .iter()
                .find(|(known, _)| known == uri)
                .and_then(|(_, id)| u8::try_from(*id).ok())
        };
        let rid_extension_id = extension_id(RID_URI);
        let audio_level_id = match kind {
            MediaKind::Audio => extension_id(AUDIO_LEVEL_URI),
            MediaKind::Video => None,
        };
        let id = PublicationId::random();
        let (commands_tx, commands_rx) = mpsc::channel(256);
        let stats = Arc::new(PublicationStats::default());
        let publication = Publication {
            id: id.clone(),
            participant: self.participant.clone(),
            kind,
            source,
            track_id: track_id.clone(),
            codec: codec.clone(),
            publisher_extensions: Arc::new(publisher_extensions),
            commands: commands_tx,
            stats: stats.clone(),
        };
        let span = tracing::info_span!(parent: &self.span, "fanout", publication = %id, kind = kind.as_str(), source = source.as_str(), mid = mid.as_deref().unwrap_or(""), codec = %codec.mime_type, layers = layers.count());
        tracing::info!(parent: &span, "publication started");
        let layer_count = layers.count();
        let (queue, track) = mpsc::channel(TRACK_QUEUE);
        let engine = self.engine.input.clone();
        let upstream = Upstream { conn, receiver };
        let fanout = Fanout {
            track,
            upstream: KeyframeRoute::new(move |media_ssrc| {
                engine.try_send(EngineInput::RequestKeyframe {
                    upstream,
                    media_ssrc,
                })
            }),
            kind,
            mime: codec.mime_type.clone(),
            clock_rate: codec.clock_rate,
            commands: commands_rx,
            throttles: (0..layer_count)
                .map(|_| KeyframeThrottle::new(self.shared.config.keyframe_request_interval))
                .collect(),
            stats: stats.clone(),
            caches: (0..layer_count)
                .map(|_| {
                    PacketCache::new(match kind {
                        MediaKind::Audio => AUDIO_CACHE_PACKETS,
                        MediaKind::Video => VIDEO_CACHE_PACKETS,
                    })
                })
                .collect(),
            dynacast: Dynacast::new(&layers),
            read_keyframe_sizes: !layers.is_single()
                && VideoCodec::from_mime(&codec.mime_type) == VideoCodec::Vp8,
            layers,
            rid_extension_id,
            owner: FanoutOwner {
                participant: self.participant.clone(),
                publication: id.clone(),
                track_id: track_id.clone(),
                events: self.events.clone(),
            },
            pending: Counts::default(),
            in_batch: Vec::new(),
            frame_timestamp: None,
            audio_level_id,
        };
        self.shared.register_publication(&id, stats.clone());
        if let (Some(mid), Ok(mut running)) = (mid, self.running.lock()) {
            running.push((mid, id.clone(), publication.commands.clone()));
        }
        let _ = self.events.send(SfuEvent::PublicationStarted(publication));
        let this = self.clone();
        tokio::spawn(
            async move {
                let _alive = crate::TaskGuard::new(&this.shared.tasks.fanouts);
                fanout.run().await;
                if let Ok(mut running) = this.running.lock() {
                    running.retain(|(_, publication, _)| publication != &id);
                }
                this.shared.retire_publication(&id, &stats);
                tracing::info!("publication ended");
                let _ = this.events.send(SfuEvent::PublicationEnded {
                    participant: this.participant.clone(),
                    publication: id,
                });
            }
            .instrument(span),
        );
        queue
    }
}

/// The connection a participant publishes on, driven by the engine over the shared media
/// socket. The publisher makes every offer on it. Cheap to clone; the connection closes on
/// [`PublishTransport::close`], or when the last clone is dropped.
#[derive(Clone)]
pub struct PublishTransport {
    shared: Arc<PublishShared>,
    conn: Arc<PublishConn>,
}

/// The publish connection in the engine, closed when the last handle goes.
struct PublishConn {
    engine: Engine,
    conn: ConnId,
}

impl Drop for PublishConn {
    fn drop(&mut self) {
        self.engine.close_soon(self.conn);
    }
}

impl PublishTransport {
    pub(crate) async fn new(
        shared: Arc<Shared>,
        participant: ParticipantId,
        events: mpsc::UnboundedSender<SfuEvent>,
    ) -> Result<Self, SfuError> {
        let engine = shared.engine()?;
        let conn = engine.next_conn_id();
        let span = tracing::info_span!("publish", participant = %participant);
        let publish = Arc::new(PublishShared {
            shared: shared.clone(),
            participant: participant.clone(),
            events: events.clone(),
            engine: engine.clone(),
            declared: Mutex::new(Vec::new()),
            extensions: Mutex::new(Vec::new()),
            simulcast: Mutex::new(Vec::new()),
            running: Mutex::new(Vec::new()),
            span,
        });
        // The certificate is made here, in the caller's task, never in the engine's.
        let (pc, credentials) = engine.build_publish_connection()?;
        let publisher: Arc<dyn PublishSink> = Arc::new(Publisher(publish.clone()));
        engine
            .call(|reply| EngineInput::Open {
                conn,
                pc: Box::new(pc),
                credentials,
                participant,
                events,
                bandwidth: None,
                publisher: Some(publisher),
                reply,
            })
            .await?;
        Ok(Self {
            shared: publish,
            conn: Arc::new(PublishConn { engine, conn }),
        })
    }

    /// Applies the publisher's (re-)offer and returns the answer. `declared` says what each
    /// track is (matched by `mid`, else by msid track id); a track not named is a microphone if
    /// audio and a camera if video.
    pub async fn answer(
        &self,
        offer_sdp: String,
        declared: Vec<DeclaredTrack>,
    ) -> Result<String, SfuError> {
        let sections = offer_sdp.lines().filter(|l| l.starts_with("m=")).count();
        if sections > MAX_PUBLISH_SECTIONS {
            return Err(SfuError::TooManySections { got: sections });
        }
        if let Ok(mut known) = self.shared.declared.lock() {
            // Replaced, not extended: what the publisher no longer sends is forgotten.
            *known = declared;
        }
        if let Ok(mut extensions) = self.shared.extensions.lock() {
            *extensions = extmap(&offer_sdp);
        }
        if let Ok(mut simulcast) = self.shared.simulcast.lock() {
            *simulcast = simulcast_rids(&offer_sdp);
        }
        let stopped = sections_not_sending(&offer_sdp);
        let conn = self.conn.conn;
        let sdp = self
            .conn
            .engine
            .call(|reply| EngineInput::AnswerOffer {
                conn,
                sdp: offer_sdp,
                reply,
            })
            .await?;
        self.end_publications_on(&stopped).await;
        Ok(with_video_bandwidth(
            &sdp,
            self.shared.shared.config.max_video_bitrate,
        ))
    }

    /// Ends the publications on sections `stopped` (which an applied re-offer no longer sends
    /// on). A stack that keeps the section's `a=ssrc` lines (Firefox, with port 0 and
    /// `a=inactive`) never ends the track in webrtc-rs; the publication must end all the same.
    /// (Such a section is stopped for good; a new share comes on a new section.)
    async fn end_publications_on(&self, stopped: &[String]) {
        let ending: Vec<mpsc::Sender<FanoutCommand>> = match self.shared.running.lock() {
            Ok(mut running) => {
                let (ending, kept) = std::mem::take(&mut *running)
                    .into_iter()
                    .partition(|(mid, _, _)| stopped.contains(mid));
                *running = kept;
                ending
                    .into_iter()
                    .map(|(_, _, commands)| commands)
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for commands in ending {
            let _ = commands.send(FanoutCommand::End).await;
        }
    }

    /// Adds a candidate the publisher trickled.
    pub async fn add_ice_candidate(&self, candidate: RTCIceCandidateInit) -> Result<(), SfuError> {
        let conn = self.conn.conn;
        self.conn
            .engine
            .call(|reply| EngineInput::AddCandidate {
                conn,
                candidate,
                reply,
            })
            .await
    }

    /// The way to this participant's relay data channel, for data others send it
    /// ([`crate::relay`]).
    pub fn data_relay(&self) -> crate::relay::DataRelay {
        crate::relay::DataRelay {
            engine: self.conn.engine.clone(),
            conn: self.conn.conn,
        }
    }

    /// Closes the connection; every publication on it ends.
    pub async fn close(&self) {
        let _ = self
            .conn
            .engine
            .input
            .send(EngineInput::Close {
                conn: self.conn.conn,
            })
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Subscribe

struct SubscriptionState {
    key: SubscriptionId,
    publication: Publication,
    sender: RTCRtpSenderId,
    ssrc: u32,
    /// Carried by the last offer sent.
    offered: bool,
    /// Forwarding configured from an answer (once: later answers change nothing for it).
    configured: bool,
    /// The size the subscriber shows it at.
    view: Option<(u16, u16)>,
    /// Paused by the subscriber.
    paused: bool,
    /// What its bandwidth allows, as last sent to the fanout, and when it may change.
    steady: Steady,
    /// What the subscriber was last told.
    reported: Allocation,
}

/// How a video subscription is served, given the subscriber's bandwidth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// At the layer its view needs.
    Full,
    /// At a lower layer than its view needs.
    Lowered,
    /// Not at all: even its lowest layer does not fit.
    Paused,
}

impl Allocation {
    /// The protocol's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Allocation::Full => "full",
            Allocation::Lowered => "lowered",
            Allocation::Paused => "paused",
        }
    }
}

/// A video subscription whose allocation changed.
#[derive(Clone, Debug)]
pub struct AllocationChange {
    /// The publication.
    pub publication: PublicationId,
    /// How it is served now.
    pub allocation: Allocation,
}

/// One media section of a subscribe offer.
#[derive(Clone, Debug)]
pub struct OfferedSubscription {
    /// The section's `mid`.
    pub mid: String,
    /// The publication it carries.
    pub publication: Publication,
}

/// The connection a participant receives on, driven by the engine over the shared media
/// socket. The server makes every offer on it; the caller must not call
/// [`SubscribeTransport::create_offer`] again before the previous answer was applied. Dropping
/// it closes it.
pub struct SubscribeTransport {
    engine: Engine,
    conn: ConnId,
    participant: ParticipantId,
    /// The connection's bandwidth estimate and pacing, when it estimates.
    bandwidth: Option<Arc<Bandwidth>>,
    allocator: Allocator,
    /// When the next probe cluster may go, and the estimate when the last one went.
    next_probe: Option<Instant>,
    probe_interval: Duration,
    estimate_at_probe: u64,
    /// The estimates of the last allocations: a rise needs the lowest of them to allow it.
    recent_estimates: VecDeque<u64>,
    subscriptions: HashMap<PublicationId, SubscriptionState>,
    span: tracing::Span,
    closed: bool,
}

/// A subscription rises only when the estimates of this many allocations in a row (about two
/// seconds) allow it: a probe that overshoots for a moment does not raise layers that the next
/// back-off pauses again.
const RISE_EVIDENCE: usize = 4;

/// How long a probe cluster lasts at its rate (about that: it is made of whole packets).
const PROBE_DURATION: Duration = Duration::from_millis(30);
/// The least a probe cluster carries: enough padding packets to measure a rate.
const MIN_PROBE_BYTES: usize = 6_000;
/// Probes while they raise the estimate go this often...
const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// ... and at least this often while they do not.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(3);

impl SubscribeTransport {
    pub(crate) async fn new(
        shared: Arc<Shared>,
        participant: ParticipantId,
        events: mpsc::UnboundedSender<SfuEvent>,
    ) -> Result<Self, SfuError> {
        let engine = shared.engine()?;
        let conn = engine.next_conn_id();
        let owner = participant.clone();
        let (pc, credentials, bandwidth) = engine.build_connection()?;
        engine
            .call(|reply| EngineInput::Open {
                conn,
                pc: Box::new(pc),
                credentials,
                participant: owner,
                events,
                bandwidth: bandwidth.clone(),
                publisher: None,
                reply,
            })
            .await?;
        let span = tracing::info_span!("subscribe", participant = %participant);
        Ok(Self {
            engine,
            conn,
            participant,
            bandwidth,
            allocator: Allocator::default(),
            next_probe: None,
            probe_interval: MIN_PROBE_INTERVAL,
            estimate_at_probe: 0,
            recent_estimates: VecDeque::with_capacity(RISE_EVIDENCE),
            subscriptions: HashMap::new(),
            span,
            closed: false,
        })
    }

    /// The participant this transport belongs to.
    pub fn participant(&self) -> &ParticipantId {
        &self.participant
    }

    /// True when this transport forwards `publication`.
    pub fn is_subscribed(&self, publication: &PublicationId) -> bool {
        self.subscriptions.contains_key(publication)
    }

    /// Adds a subscription; it is offered by the next [`SubscribeTransport::create_offer`].
    pub async fn subscribe(&mut self, publication: &Publication) -> Result<(), SfuError> {
        if self.subscriptions.contains_key(&publication.id) {
            return Ok(());
        }
        if publication.commands.is_closed() {
            return Err(SfuError::PublicationEnded);
        }
        let ssrc = rand::random::<u32>();
        let kind = match publication.kind {
            MediaKind::Audio => RtpCodecKind::Audio,
            MediaKind::Video => RtpCodecKind::Video,
        };
        let codec = RTCRtpCodec {
            rtcp_feedback: Vec::new(),
            ..publication.codec.clone()
        };
        // msid = "<participant> <publication>": a browser's ontrack then names the publisher.
        let track = MediaStreamTrack::new(
            publication.participant.to_string(),
            publication.id.to_string(),
            format!(
                "{}-{}",
                publication.participant,
                publication.source.as_str()
            ),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec,
                ..Default::default()
            }],
        );
        let key = SubscriptionId::next();
        let conn = self.conn;
        let feedback = feedback_route(publication.commands.clone(), key);
        let sender = self
            .engine
            .call(|reply| EngineInput::AddTrack {
                conn,
                track: Box::new(track),
                feedback,
                reply,
            })
            .await?;
        let added = publication
            .commands
            .send(FanoutCommand::Add {
                key,
                route: Route {
                    engine: self.engine.input.media.clone(),
                    conn,
                    sender,
                },
            })
            .await;
        if added.is_err() {
            // The publication ended meanwhile: leave no section behind for it.
            self.remove_track(sender, &publication.id).await?;
            return Err(SfuError::PublicationEnded);
        }
        tracing::debug!(parent: &self.span, publication = %publication.id, "subscription added");
        self.subscriptions.insert(
            publication.id.clone(),
            SubscriptionState {
                key,
                publication: publication.clone(),
                sender,
                ssrc,
                offered: false,
                configured: false,
                view: None,
                paused: false,
                steady: Steady::new(Grant::UpTo(u8::MAX)),
                reported: Allocation::Full,
            },
        );
        Ok(())
    }

    async fn remove_track(
        &self,
        sender: RTCRtpSenderId,
        publication: &PublicationId,
    ) -> Result<(), SfuError> {
        let conn = self.conn;
        let track_id = publication.to_string();
        self.engine
            .call(|reply| EngineInput::RemoveTrack {
                conn,
                sender,
                track_id,
                reply,
            })
            .await
    }

    /// Stops or resumes forwarding `publication` to this participant (its video is off screen),
    /// keeping the subscription and its media section; false when there is no such subscription.
    pub async fn set_paused(&mut self, publication: &PublicationId, paused: bool) -> bool {
        let Some(state) = self.subscriptions.get_mut(publication) else {
            return false;
        };
        state.paused = paused;
        state
            .publication
            .commands
            .send(FanoutCommand::Pause {
                key: state.key,
                paused,
            })
            .await
            .is_ok()
    }

    /// Sets the size (device pixels) at which this participant shows `publication`: the
    /// subscription gets the smallest simulcast layer that covers it. `None` lifts the limit.
    /// False when there is no such subscription.
    pub async fn set_view(
        &mut self,
        publication: &PublicationId,
        size: Option<(u16, u16)>,
    ) -> bool {
        let Some(state) = self.subscriptions.get_mut(publication) else {
            return false;
        };
        state.view = size;
        state
            .publication
            .commands
            .send(FanoutCommand::View {
                key: state.key,
                size,
            })
            .await
            .is_ok()
    }

    /// The connection's send-side bandwidth estimate in bits per second (from the subscriber's
    /// transport-wide congestion control feedback), once there is one.
    pub fn estimate(&self) -> Option<u64> {
        Some(self.current_estimate()).filter(|&bps| bps > 0)
    }

    fn current_estimate(&self) -> u64 {
        self.bandwidth
            .as_ref()
            .map_or(0, |bandwidth| bandwidth.estimate.load(Ordering::Relaxed))
    }

    /// Splits the bandwidth estimate over the subscriptions (docs/architecture.md, *Bandwidth*):
    /// tells each fanout what its subscription may receive, and returns the video subscriptions
    /// whose allocation changed, for the subscriber to be told. `speaker` is the participant
    /// who speaks now, whose videos come before others. Call it about twice a second.
    pub async fn allocate(&mut self, speaker: Option<&ParticipantId>) -> Vec<AllocationChange> {
        let now = Instant::now();
        // Oldest subscription first, so that equal demands are served in the same order every
        // time (a map's order could swap them and flap both).
        let mut ids: Vec<(SubscriptionId, PublicationId)> = self
            .subscriptions
            .iter()
            .filter(|(_, state)| state.configured)
            .map(|(id, state)| (state.key, id.clone()))
            .collect();
        ids.sort_unstable_by_key(|(key, _)| *key);
        let ids: Vec<PublicationId> = ids.into_iter().map(|(_, id)| id).collect();
        let demands: Vec<Demand> = ids
            .iter()
            .filter_map(|id| self.subscriptions.get(id))
            .map(|state| {
                let publication = &state.publication;
                let layers = &publication.stats.layers;
                Demand {
                    kind: publication.kind,
                    source: publication.source,
                    speaking: speaker == Some(&publication.participant),
                    area: state.view.map_or(0, |(w, h)| u64::from(w) * u64::from(h)),
                    wanted: match publication.kind {
                        MediaKind::Audio => 0,
                        MediaKind::Video => layers.for_view(state.view),
                    },
                    layer_bitrates: layers.bitrates(),
                    thinned_bitrates: layers.thinned(),
                    paused: state.paused,
                }
            })
            .collect();
        let estimate = self.current_estimate();
        let unlimited = unlimited_cost(&demands);
        let budget = self.allocator.budget(estimate, unlimited);
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth
                .limiting
                .store(budget.is_some(), Ordering::Relaxed);
        }
        let from_remb = self
            .bandwidth
            .as_ref()
            .is_some_and(|bandwidth| bandwidth.from_remb.load(Ordering::Relaxed));
        if budget.is_some() && unlimited > estimate && !from_remb {
            // What the subscriber receives now, so that padding and media together probe at
            // twice the estimate: with every video paused the padding is all of it.
            let sending: u64 = ids
                .iter()
                .zip(&demands)
                .filter_map(|(id, demand)| {
                    let grant = self.subscriptions.get(id)?.steady.grant();
                    Some(demand.grant_cost(grant))
                })
                .sum();
            self.probe(estimate, sending, now).await;
        }
        if self.recent_estimates.len() == RISE_EVIDENCE {
            self.recent_estimates.pop_front();
        }
        self.recent_estimates.push_back(estimate);
        let lowest_recent = self
            .recent_estimates
            .iter()
            .copied()
            .min()
            .unwrap_or(estimate);
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth
                .pace_estimate
                .store(lowest_recent, Ordering::Relaxed);
        }
        let keeps = allocate(
            budget.map(|bps| bps * KEEP_NUMERATOR / KEEP_DENOMINATOR),
            &demands,
        );
        let rises = allocate(
            budget.map(|bps| bps.min(lowest_recent) * RISE_NUMERATOR / RISE_DENOMINATOR),
            &demands,
        );
        let mut changes = Vec::new();
        for (((id, demand), keep), rise) in ids.iter().zip(&demands).zip(keeps).zip(rises) {
            let Some(state) = self.subscriptions.get_mut(id) else {
                continue;
            };
            // All the view asks for is no limit at all: a view that grows later is served at
            // once, not at the next allocation.
            let unlimited = |grant| match grant {
                Grant::UpTo(layer) if layer >= demand.wanted => Grant::UpTo(u8::MAX),
                other => other,
            };
            let previous = state.steady.grant();
            let next = match budget {
                Some(budget) => state
                    .steady
                    .settle(unlimited(keep), unlimited(rise), budget, now),
                None => state.steady.set(unlimited(keep), now),
            };
            if next != previous {
                let _ = state
                    .publication
                    .commands
                    .send(FanoutCommand::Grant {
                        key: state.key,
                        grant: next,
                    })
                    .await;
            }
            if demand.kind != MediaKind::Video {
                continue;
            }
            let allocation = match next {
                Grant::Paused => Allocation::Paused,
                Grant::Thinned(_) => Allocation::Lowered,
                Grant::UpTo(layer) if layer < demand.wanted => Allocation::Lowered,
                Grant::UpTo(_) => Allocation::Full,
            };
            if allocation != state.reported {
                state.reported = allocation;
                tracing::debug!(parent: &self.span, publication = %id, allocation = allocation.as_str(), estimate, "allocation changed");
                changes.push(AllocationChange {
                    publication: id.clone(),
                    allocation,
                });
            }
        }
        changes
    }

    /// Sends a probe cluster on one subscription when one is due: the allocation wants
    /// more than the estimate, and only a rate the link has shown raises it. Probes go every
    /// second while they raise the estimate, less often (up to [`MAX_PROBE_INTERVAL`]) while
    /// they do not.
    async fn probe(&mut self, estimate: u64, sending: u64, now: Instant) {
        if self.next_probe.is_some_and(|at| now < at) {
            return;
        }
        self.probe_interval =
            if self.next_probe.is_none() || estimate * 10 > self.estimate_at_probe * 11 {
                MIN_PROBE_INTERVAL
            } else {
                (self.probe_interval * 2).min(MAX_PROBE_INTERVAL)
            };
        self.next_probe = Some(now + self.probe_interval);
        self.estimate_at_probe = estimate;
        // Padding follows a video's frame or any audio packet: a video being sent is best (its
        // frames come often), a microphone when every video is paused.
        let Some(state) = self
            .subscriptions
            .values()
            .filter(|state| state.configured)
            .min_by_key(|state| {
                let video = state.publication.kind == MediaKind::Video;
                (
                    !video || state.steady.grant() == Grant::Paused || state.paused,
                    !video,
                )
            })
        else {
            return;
        };
        let padding_bps = (estimate * PROBE_FACTOR)
            .saturating_sub(sending)
            .max(estimate / 2);
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth.probe_rate.store(padding_bps, Ordering::Relaxed);
        }
        let bytes = (padding_bps as f64 * PROBE_DURATION.as_secs_f64() / 8.0) as usize;
        let _ = state.publication.commands.try_send(FanoutCommand::Probe {
            key: state.key,
            bytes: bytes.max(MIN_PROBE_BYTES),
        });
    }

    /// Removes a subscription; its section goes inactive in the next offer.
    pub async fn unsubscribe(&mut self, publication: &PublicationId) -> Result<(), SfuError> {
        let Some(state) = self.subscriptions.remove(publication) else {
            return Ok(());
        };
        let _ = state
            .publication
            .commands
            .send(FanoutCommand::Remove { key: state.key })
            .await;
        self.remove_track(state.sender, publication).await
    }

    /// Creates and applies the next offer; returns its SDP and what each section carries.
    pub async fn create_offer(&mut self) -> Result<(String, Vec<OfferedSubscription>), SfuError> {
        let conn = self.conn;
        let (sdp, mids) = self
            .engine
            .call(|reply| EngineInput::CreateOffer { conn, reply })
            .await?;
        let mut offered = Vec::new();
        for (mid, sender) in mids {
            if let Some(state) = self
                .subscriptions
                .values_mut()
                .find(|state| state.sender == sender)
            {
                state.offered = true;
                offered.push(OfferedSubscription {
                    mid,
                    publication: state.publication.clone(),
                });
            }
        }
        Ok((sdp, offered))
    }

    /// Applies the subscriber's answer and starts forwarding what it accepted.
    pub async fn apply_answer(&mut self, answer_sdp: String) -> Result<(), SfuError> {
        let subscriber_extensions = extmap(&answer_sdp);
        // Only subscriptions this answer negotiated: one added after the offer waits for the
        // next answer, so its keyframe is asked for when it can be delivered.
        let pending: Vec<PublicationId> = self
            .subscriptions
            .iter()
            .filter(|(_, state)| state.offered && !state.configured)
            .map(|(id, _)| id.clone())
            .collect();
        let wanted: Vec<(RTCRtpSenderId, String)> = pending
            .iter()
            .filter_map(|id| self.subscriptions.get(id))
            .map(|state| (state.sender, state.publication.codec.mime_type.clone()))
            .collect();
        let conn = self.conn;
        let payload_types = self
            .engine
            .call(|reply| EngineInput::ApplyAnswer {
                conn,
                sdp: answer_sdp,
                wanted,
                reply,
            })
            .await
            .map_err(|err| match err {
                SfuError::WebRtc(err) => SfuError::InvalidSdp(err),
                other => other,
            })?;
        let span = self.span.clone();
        for (id, payload_type) in pending.iter().zip(payload_types) {
            let Some(state) = self.subscriptions.get_mut(id) else {
                continue;
            };
            let Some(payload_type) = payload_type else {
                let mime = &state.publication.codec.mime_type;
                tracing::warn!(parent: &span, publication = %id, %mime, "subscriber did not accept the publication's codec");
                continue;
            };
            let params = Box::new(ForwarderParams::new(
                state.ssrc,
                payload_type,
                &state.publication.publisher_extensions,
                &subscriber_extensions,
            ));
            let _ = state
                .publication
                .commands
                .send(FanoutCommand::Configure {
                    key: state.key,
                    params,
                })
                .await;
            state.configured = true;
        }
        Ok(())
    }

    /// Adds a candidate the subscriber trickled.
    pub async fn add_ice_candidate(&self, candidate: RTCIceCandidateInit) -> Result<(), SfuError> {
        let conn = self.conn;
        self.engine
            .call(|reply| EngineInput::AddCandidate {
                conn,
                candidate,
                reply,
            })
            .await
    }

    /// Ends every subscription and closes the connection.
    pub async fn close(&mut self) {
        for (_, state) in self.subscriptions.drain() {
            let _ = state
                .publication
                .commands
                .send(FanoutCommand::Remove { key: state.key })
                .await;
        }
        if !self.closed {
            self.closed = true;
            let _ = self
                .engine
                .input
                .send(EngineInput::Close { conn: self.conn })
                .await;
        }
    }
}

impl Drop for SubscribeTransport {
    fn drop(&mut self) {
        // A transport dropped without `close` (its session ended abruptly) must not leave a
        // connection in the engine or a slot in a fanout.
        for (_, state) in self.subscriptions.drain() {
            let _ = state
                .publication
                .commands
                .try_send(FanoutCommand::Remove { key: state.key });
        }
        if !self.closed {
            self.engine.close_soon(self.conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        DeclaredTrack, extmap, find_declared, sections_not_sending, simulcast_rids,
        with_video_bandwidth,
    };
    use crate::ids::Source;

    fn declared(track_id: &str, source: Source, mid: Option<&str>) -> DeclaredTrack {
        DeclaredTrack {
            track_id: track_id.into(),
            source,
            mid: mid.map(Into::into),
        }
    }

    #[test]
    fn sections_a_reoffer_stopped_are_found_whatever_their_ssrc_lines_say() {
        // Firefox after removeTrack of a screen share: port 0, inactive, ssrc lines kept.
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 109\r\na=sendrecv\r\na=mid:0\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 120\r\na=sendonly\r\na=mid:1\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 120\r\na=inactive\r\na=mid:2\r\na=ssrc:31 cname:x\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 120\r\na=mid:3\r\na=recvonly\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 120\r\na=mid:4\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 109\r\na=mid:5\r\n";
        assert_eq!(sections_not_sending(sdp), ["2", "3", "4"]);
    }

    #[test]
    fn a_declared_track_is_found_by_mid_before_msid() {
        let list = [
            declared("cam-js", Source::Camera, Some("1")),
            declared("{ff-screen}", Source::Screen, Some("2")),
        ];
        // Firefox: the msid track id is not the declared one; the mid finds it.
        let found = find_declared(&list, Some("2"), "{other}").map(|d| d.source);
        assert_eq!(found, Some(Source::Screen));
        // A mid outranks an msid that happens to name another entry.
        let found = find_declared(&list, Some("1"), "{ff-screen}").map(|d| d.source);
        assert_eq!(found, Some(Source::Camera));
    }

    #[test]
    fn without_a_matching_mid_the_msid_track_id_decides() {
        let list = [declared("screen", Source::Screen, None)];
        assert_eq!(
            find_declared(&list, Some("3"), "screen").map(|d| d.source),
            Some(Source::Screen)
        );
        assert_eq!(
            find_declared(&list, None, "screen").map(|d| d.source),
            Some(Source::Screen)
        );
        assert!(find_declared(&list, Some("3"), "camera").is_none());
        // A stack that writes no msid at all names no track by it.
        assert!(find_declared(&[declared("", Source::Screen, None)], None, "").is_none());
    }

    #[test]
    fn video_sections_get_a_bandwidth_cap_and_audio_does_not() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\nb=AS:30\r\na=mid:1\r\n";
        assert_eq!(
            with_video_bandwidth(sdp, 2_500_000),
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\nb=AS:2500\r\nb=TIAS:2500000\r\na=mid:1\r\n"
        );
        let simulcast = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=simulcast:recv q;h;f\r\n";
        assert!(
            with_video_bandwidth(simulcast, 2_000_000).contains("b=TIAS:3000000\r\n"),
            "a simulcast section has room for its lower layers"
        );
    }

    #[test]
    fn extmap_reads_ids_and_uris_once() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\na=extmap:4/sendonly urn:ietf:params:rtp-hdrext:sdes:mid\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=extmap:13 urn:3gpp:video-orientation\r\n";
        assert_eq!(
            extmap(sdp),
            vec![
                ("urn:ietf:params:rtp-hdrext:ssrc-audio-level".to_owned(), 1),
                ("urn:ietf:params:rtp-hdrext:sdes:mid".to_owned(), 4),
                ("urn:3gpp:video-orientation".to_owned(), 13),
            ]
        );
    }

    #[test]
    fn simulcast_rids_are_read_per_section() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=rid:q send\r\n\
                   a=simulcast:send q;h;~f\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\n\
                   a=simulcast:recv x send a,b;c\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\n";
        assert_eq!(
            simulcast_rids(sdp),
            vec![
                ("1".to_owned(), vec!["q".into(), "h".into(), "f".into()]),
                ("2".to_owned(), vec!["a".into(), "c".into()]),
            ]
        );
    }
}
