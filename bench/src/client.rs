//! Synthetic participants speaking the public protocol: an HTTP token, WebSocket signaling and
//! real WebRTC (webrtc-rs), so the server does in a benchmark exactly what it does in a call.
//! Subscribers keep webrtc-rs's default interceptors (receiver reports, NACKs, TWCC feedback),
//! as browsers do.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCSessionDescription, Registry,
    SettingEngineBuilder, SrtpProtectionProfile, configure_nack, configure_rtcp_reports,
    configure_simulcast_extension_headers, register_default_interceptors,
};

use crate::shaping::ClientRuntime;

/// A signaling socket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Marks a payload as a probe of this tool.
const MAGIC: u16 = 0x5B0A;
/// Bytes of a probe header after the two VP8 bytes: magic, publisher, packet number, send time.
const PROBE_BYTES: usize = 2 + 2 + 8 + 8;
/// Largest RTP payload sent: a browser's packets are about this size.
pub const MAX_PAYLOAD: usize = 1100;

/// What a publisher sends.
#[derive(Clone, Copy, Debug)]
pub struct VideoShape {
    /// Bits per second (of the top layer, with simulcast).
    pub bitrate: u64,
    /// Frames per second.
    pub fps: u32,
    /// Seconds between keyframes.
    pub keyframe_interval: Duration,
    /// Three simulcast layers, `q`, `h` and `f`, as a browser sends a camera.
    pub simulcast: bool,
    /// When keyframes are sent.
    pub keyframes: Keyframes,
}

/// When a synthetic publisher sends a keyframe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keyframes {
    /// At its interval, and when the server asks (at most every 300 ms), as browsers do.
    #[default]
    OnRequest,
    /// Only at its interval, as some encoders do: a subscriber that lost a packet waits.
    Interval,
}

/// The SRTP protection profile a subscriber offers (the server uses what is offered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Srtp {
    /// AEAD_AES_128_GCM, what Chromium and Firefox negotiate.
    #[default]
    AesGcm,
    /// AES_CM_128_HMAC_SHA1_80, the profile every WebRTC endpoint must offer.
    AesCm,
}

impl Srtp {
    fn profile(self) -> SrtpProtectionProfile {
        match self {
            Self::AesGcm => SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
            Self::AesCm => SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
        }
    }
}

/// How the bench's subscribers receive.
#[derive(Clone, Copy, Debug, Default)]
pub struct Receiving {
    /// Let the kernel coalesce datagrams (UDP GRO), which no browser does.
    pub gro: bool,
    pub srtp: Srtp,
}

/// Simulcast layers: rid and share of the top layer's bitrate (a browser's camera sends about
/// 150 k, 500 k and 1.5-2.5 M).
const LAYERS: [(&str, u64, u64); 3] = [("q", 1, 10), ("h", 1, 3), ("f", 1, 1)];

/// The size at which subscribers show the videos they receive (sent as `view`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Viewing {
    /// Every video's tile, in pixels; none sends no `view` (the server sends the top layer).
    pub tile: Option<(u32, u32)>,
    /// One video (the publisher whose id sorts first, the same for everyone) shown on a stage
    /// of this size instead.
    pub stage: Option<(u32, u32)>,
}

/// Latency histogram: 100 µs buckets up to 2 s, then one overflow bucket. Atomic, so that
/// recording a packet allocates nothing and takes no lock.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

const BUCKET_US: u64 = 100;
const BUCKETS: usize = 20_000;

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn record(&self, micros: u64) {
        let index = usize::try_from(micros / BUCKET_US)
            .unwrap_or(BUCKETS)
            .min(BUCKETS);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts since the last call, and a fresh start.
    pub fn take(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect()
    }
}

/// The latency (ms) below which `quantile` of the samples in `counts` fall.
pub fn quantile_ms(counts: &[u64], quantile: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let target = (total as f64 * quantile).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (index, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= target {
            return Some((index as u64 + 1) as f64 * BUCKET_US as f64 / 1000.0);
        }
    }
    None
}

/// Where a run stands. Clients send while `Running`; at `Quiet` they stop sending but stay, so
/// what is in flight still arrives and is counted; at `Leave` they go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    Quiet,
    Leave,
}

/// Counters every synthetic participant writes to.
pub struct Tally {
    /// RTP packets publishers handed to their connection.
    pub sent: AtomicU64,
    /// Probe packets subscribers received.
    pub received: AtomicU64,
    /// Probe bytes subscribers received.
    pub received_bytes: AtomicU64,
    /// Payload bytes publishers sent (every layer).
    pub sent_bytes: AtomicU64,
    /// Probes missing inside a received stream (a gap in one layer's packet numbers), for
    /// simulcast, where a subscriber receives only some of what is sent.
    pub gaps: AtomicU64,
    /// Subscribed tracks that have delivered a packet.
    pub live_tracks: AtomicU64,
    /// One-way latency of received probes.
    pub latency: Histogram,
    /// The measured window as probe send times (microseconds since the epoch), so senders and
    /// receivers agree on which probes it holds: from `window_from` (0 until it opens) until
    /// `window_to`.
    window_from: AtomicU64,
    window_to: AtomicU64,
    /// Probes sent in the window.
    pub window_sent: AtomicU64,
    /// Distinct probes of the window received, per subscriber and stream: a resend or a
    /// duplicate of one that arrived counts once.
    pub window_received: AtomicU64,
    /// Copies received of probes that had arrived already (resends whose original came too,
    /// duplicates).
    pub duplicates: AtomicU64,
}

impl Tally {
    /// Zeroed counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            live_tracks: AtomicU64::new(0),
            latency: Histogram::new(),
            window_from: AtomicU64::new(0),
            window_to: AtomicU64::new(u64::MAX),
            window_sent: AtomicU64::new(0),
            window_received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        })
    }

    /// Starts the measured window: probes sent from now on count.
    pub fn open_window(&self) {
        self.window_from
            .store(now_micros().max(1), Ordering::Relaxed);
    }

    /// Ends the measured window: probes sent from now on do not count.
    pub fn close_window(&self) {
        self.window_to.store(now_micros(), Ordering::Relaxed);
    }

    /// Whether a probe sent at `sent_at` belongs to the measured window.
    fn in_window(&self, sent_at: u64) -> bool {
        let from = self.window_from.load(Ordering::Relaxed);
        from != 0 && sent_at >= from && sent_at < self.window_to.load(Ordering::Relaxed)
    }
}

/// How many probe numbers back [`Seen`] remembers: resends come within a second (the server
/// answers NACKs only for younger packets), and a stream sends a few hundred a second.
const SEEN_SPAN: u64 = 4096;

/// The probe numbers of one received stream seen lately, so each counts once.
struct Seen {
    highest: Option<u64>,
    bits: Box<[u64; (SEEN_SPAN / 64) as usize]>,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            highest: None,
            bits: Box::new([0; (SEEN_SPAN / 64) as usize]),
        }
    }
}

impl Seen {
    /// True the first time `number` arrives. One more than [`SEEN_SPAN`] behind the newest is
    /// not counted (it cannot be told from a duplicate, and loss is not to be flattered).
    fn first(&mut self, number: u64) -> bool {
        let bit = |n: u64| ((n % SEEN_SPAN) / 64) as usize;
        let mask = |n: u64| 1u64 << (n % 64);
        match self.highest {
            Some(highest) if number > highest => {
                // The slots the window moves over held numbers it no longer covers.
                if number - highest >= SEEN_SPAN {
                    self.bits.fill(0);
                } else {
                    for n in highest + 1..number {
                        self.bits[bit(n)] &= !mask(n);
                    }
                }
                self.highest = Some(number);
            }
            Some(highest) if highest - number >= SEEN_SPAN => return false,
            Some(_) => {
                if self.bits[bit(number)] & mask(number) != 0 {
                    return false;
                }
            }
            None => self.highest = Some(number),
        }
        self.bits[bit(number)] |= mask(number);
        true
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(0))
        .unwrap_or(0)
}

/// A signaling socket that has joined, and how long joining took.
struct Joined {
    ws: Ws,
    took: Duration,
}

/// The API key (`name:secret`) tokens are minted with, for a server in its production posture
/// (a cluster); without one, tokens are asked for openly (the development posture).
static API_KEY: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// Mints every later token with the API key `name:secret`.
pub fn use_api_key(key: &str) -> Result<()> {
    let (name, secret) = key
        .split_once(':')
        .ok_or_else(|| anyhow!("an API key is name:secret"))?;
    API_KEY
        .set((name.to_owned(), secret.to_owned()))
        .map_err(|_| anyhow!("the API key is set already"))
}

/// The API key set with [`use_api_key`].
pub fn api_key() -> Option<&'static (String, String)> {
    API_KEY.get()
}

/// `POST {base}/auth/token`, with the API key when there is one.
pub fn token_request(http: &reqwest::Client, base: &str) -> reqwest::RequestBuilder {
    let request = http.post(format!("{base}/auth/token"));
    match API_KEY.get() {
        Some((name, secret)) => request.basic_auth(name, Some(secret)),
        None => request,
    }
}

/// Joins through `base`; in a cluster, follows `redirect` to the room's node (3 hops at most).
async fn join(base: &str, room: &str, name: &str) -> Result<Joined> {
    let started = Instant::now();
    let body: Value = token_request(&reqwest::Client::new(), base)
        .json(&json!({"userId": name, "room": room}))
        .send()
        .await?
        .json()
        .await?;
    let token = body["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token: {body}"))?;
    let mut node = base.to_owned();
    for _ in 0..4 {
        let ws_base = node.replacen("http", "ws", 1);
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("{ws_base}/ws/signal?token={token}")).await?;
        send(&mut ws, json!({"type": "join", "name": name})).await?;
        loop {
            let message = recv(&mut ws).await?;
            match message["type"].as_str() {
                Some("joined") => {
                    return Ok(Joined {
                        ws,
                        took: started.elapsed(),
                    });
                }
                Some("redirect") => {
                    node = message["url"]
                        .as_str()
                        .ok_or_else(|| anyhow!("redirect without url: {message}"))?
                        .trim_end_matches('/')
                        .to_owned();
                    break;
                }
                Some("error") => bail!("join refused: {message}"),
                _ => {}
            }
        }
    }
    bail!("more than 3 redirects")
}

async fn send(ws: &mut Ws, message: Value) -> Result<()> {
    ws.send(Message::Text(message.to_string().into())).await?;
    Ok(())
}

/// The next JSON message; pongs to the server's pings go out with it.
pub async fn recv(ws: &mut Ws) -> Result<Value> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("signaling went quiet")?
            .ok_or_else(|| anyhow!("socket closed"))??;
        // Tungstenite queues the pong for a ping: flushing sends it, or the server would take
        // this participant for gone.
        ws.flush().await?;
        match frame {
            Message::Text(text) => return Ok(serde_json::from_str(&text)?),
            Message::Close(frame) => bail!("socket closed: {frame:?}"),
            _ => {}
        }
    }
}

/// What one subscriber received, for the per-subscriber report (`--subscriber-rate`).
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Probe packets received.
    pub received: AtomicU64,
    /// Probe payload bytes received.
    pub received_bytes: AtomicU64,
    /// Probes missing inside a received stream.
    pub gaps: AtomicU64,
    /// The server's last `bandwidth` estimate for it, bits per second.
    pub estimate: AtomicU64,
    /// Videos the server says it pauses, and lowers, for this subscriber's link now.
    pub paused: AtomicU64,
    pub lowered: AtomicU64,
    /// Keyframe waits: a stream lost a packet that no resend brought within [`RESEND_WAIT`], and
    /// its picture stood still until the next keyframe.
    pub keyframe_waits: AtomicU64,
    /// Their total length, microseconds.
    pub frozen_micros: AtomicU64,
    /// Datagrams its shaped link dropped.
    pub link_drops: Arc<AtomicU64>,
}

/// How long a lost packet may take to come back as a resend before its picture counts as
/// frozen (a receiver's jitter buffer waits about this long).
pub const RESEND_WAIT: Duration = Duration::from_millis(300);

/// One received stream's picture: whether it waits for a keyframe.
#[derive(Default)]
struct Picture {
    /// Probes missing since the first unfilled gap, and when it opened.
    missing: u64,
    gap_since: Option<Instant>,
    /// Frozen since: a gap was never filled.
    frozen_since: Option<Instant>,
    /// When the last packet came.
    last_at: Option<Instant>,
}

/// A stream silent this long was paused by the server (for the subscriber's link), and a
/// paused video is not a frozen one: the app says so on its tile.
const PAUSED_AFTER: Duration = Duration::from_secs(1);

impl Picture {
    /// Notes a packet: `gap` probes just went missing before it, or it `filled` one; returns
    /// a finished keyframe wait.
    fn packet(&mut self, gap: u64, filled: bool, keyframe: bool, now: Instant) -> Option<Duration> {
        let previous = self.last_at.replace(now);
        // A freeze that ran into a pause ended when the pause began.
        let frozen_until = match previous {
            Some(at) if now.duration_since(at) > PAUSED_AFTER => at,
            _ => now,
        };
        if gap > 0 {
            self.missing += gap;
            self.gap_since.get_or_insert(now);
        }
        if filled {
            self.missing = self.missing.saturating_sub(1);
            if self.missing == 0 {
                self.gap_since = None;
            }
        }
        if self.frozen_since.is_none()
            && self
                .gap_since
                .is_some_and(|since| now.duration_since(since) > RESEND_WAIT)
        {
            self.frozen_since = self.gap_since;
        }
        if keyframe {
            self.missing = 0;
            self.gap_since = None;
            return self
                .frozen_since
                .take()
                .map(|since| frozen_until.saturating_duration_since(since));
        }
        None
    }
}

struct Handler {
    gathered: watch::Sender<bool>,
    tally: Option<Arc<Tally>>,
    own: Option<Arc<SubscriberStats>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let Some(tally) = self.tally.clone() else {
            return;
        };
        let own = self.own.clone();
        tokio::spawn(async move {
            let mut live = false;
            // The stream (publisher and layer) and number of the last probe.
            let mut last: Option<(u16, u64)> = None;
            let mut picture = Picture::default();
            // Per stream (a simulcast track's layers are streams of their own).
            let mut seen: Vec<(u16, Seen)> = Vec::new();
            while let Some(event) = track.poll().await {
                let TrackRemoteEvent::OnRtpPacket(packet) = event else {
                    continue;
                };
                let payload = &packet.payload;
                if payload.len() < 2 + PROBE_BYTES
                    || u16::from_be_bytes([payload[2], payload[3]]) != MAGIC
                {
                    continue;
                }
                let stream = u16::from_be_bytes([payload[4], payload[5]]);
                let number = u64::from_be_bytes(payload[6..14].try_into().unwrap_or([0; 8]));
                // A frame's first packet (S bit) of a keyframe (P bit 0): see send_video.
                let keyframe = payload[0] & 0x10 != 0 && payload[1] & 0x01 == 0;
                let mut gap = 0;
                let mut filled = false;
                if let Some((last_stream, last_number)) = last
                    && last_stream == stream
                    // A stream the server paused (for the subscriber's link) resumes at a
                    // keyframe: what it skipped meanwhile was never sent, not lost.
                    && !keyframe
                {
                    gap = number.saturating_sub(last_number + 1);
                    filled = number < last_number;
                }
                if gap > 0 {
                    tally.gaps.fetch_add(gap, Ordering::Relaxed);
                }
                if let Some(own) = &own {
                    if let Some(wait) = picture.packet(gap, filled, keyframe, Instant::now()) {
                        own.keyframe_waits.fetch_add(1, Ordering::Relaxed);
                        own.frozen_micros
                            .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
                    }
                    own.gaps.fetch_add(gap, Ordering::Relaxed);
                    own.received.fetch_add(1, Ordering::Relaxed);
                    own.received_bytes
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                }
                if last.is_none_or(|(s, n)| s != stream || number > n) {
                    last = Some((stream, number));
                }
                let sent_at = u64::from_be_bytes(payload[14..22].try_into().unwrap_or([0; 8]));
                let first = match seen.iter_mut().find(|(s, _)| *s == stream) {
                    Some((_, numbers)) => numbers.first(number),
                    None => {
                        let mut numbers = Seen::default();
                        numbers.first(number);
                        seen.push((stream, numbers));
                        true
                    }
                };
                if !first {
                    tally.duplicates.fetch_add(1, Ordering::Relaxed);
                } else if tally.in_window(sent_at) {
                    tally.window_received.fetch_add(1, Ordering::Relaxed);
                }
                tally.latency.record(now_micros().saturating_sub(sent_at));
                tally.received.fetch_add(1, Ordering::Relaxed);
                tally
                    .received_bytes
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                if !live {
                    live = true;
                    tally.live_tracks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

async fn peer_connection(
    tally: Option<Arc<Tally>>,
) -> Result<(Arc<dyn PeerConnection>, watch::Receiver<bool>)> {
    peer_connection_for(tally, None, None, Srtp::default()).await
}

/// A peer connection tallying into `tally` and `own`, its sockets from `runtime`, offering
/// `srtp`.
async fn peer_connection_for(
    tally: Option<Arc<Tally>>,
    own: Option<Arc<SubscriberStats>>,
    runtime: Option<Arc<dyn webrtc::runtime::Runtime>>,
    srtp: Srtp,
) -> Result<(Arc<dyn PeerConnection>, watch::Receiver<bool>)> {
    let (gathered, gathered_rx) = watch::channel(false);
    let handler = Arc::new(Handler {
        gathered,
        tally,
        own,
    });
    let pc =
        loopback_peer_connection_with(handler, runtime, CongestionFeedback::Twcc, srtp).await?;
    Ok((pc, gathered_rx))
}

/// What congestion control feedback a peer connection negotiates and sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CongestionFeedback {
    /// Transport-wide feedback (TWCC), as browsers do by default.
    #[default]
    Twcc,
    /// No transport-wide feedback: only `goog-remb` is negotiated (on video, among the default
    /// codecs' feedback), and the application sends REMB itself, as an older client would.
    RembOnly,
}

/// A webrtc-rs peer connection on 127.0.0.1 with the default codecs and interceptors (what a
/// browser negotiates and sends as feedback), events to `handler`, sockets from `runtime`
/// (Tokio when `None`).
pub async fn loopback_peer_connection(
    handler: Arc<dyn PeerConnectionEventHandler>,
    runtime: Option<Arc<dyn webrtc::runtime::Runtime>>,
) -> Result<Arc<dyn PeerConnection>> {
    loopback_peer_connection_with(handler, runtime, CongestionFeedback::Twcc, Srtp::default()).await
}

/// [`loopback_peer_connection`], with the congestion control feedback and the SRTP profile
/// chosen.
pub async fn loopback_peer_connection_with(
    handler: Arc<dyn PeerConnectionEventHandler>,
    runtime: Option<Arc<dyn webrtc::runtime::Runtime>>,
    feedback: CongestionFeedback,
    srtp: Srtp,
) -> Result<Arc<dyn PeerConnection>> {
    let mut engine = MediaEngine::default();
    engine.register_default_codecs()?;
    // Audio levels, as browsers send them (the server tells who speaks from them).
    engine.register_header_extension(
        rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability {
            uri: sfu::AUDIO_LEVEL_URI.to_owned(),
        },
        RtpCodecKind::Audio,
        None,
    )?;
    // Keyframe requests reach the application only through an interceptor that marks them:
    // publishers answer them with a keyframe, as a browser's encoder does.
    let registry = match feedback {
        CongestionFeedback::Twcc => register_default_interceptors(Registry::new(), &mut engine)?,
        CongestionFeedback::RembOnly => {
            configure_simulcast_extension_headers(&mut engine)?;
            configure_rtcp_reports(configure_nack(Registry::new(), &mut engine))
        }
    }
    .with(
        rtc::interceptor::Slot::from(14_000),
        sfu::FeedbackInterceptor::new(Arc::default()),
    );
    let mut builder = PeerConnectionBuilder::new();
    if let Some(runtime) = runtime {
        builder = builder.with_runtime(runtime);
    }
    let pc = builder
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_include_loopback_candidate(true)
                .with_srtp_protection_profiles(vec![srtp.profile()])
                .build(),
        )
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await?;
    Ok(Arc::new(pc))
}

/// Applies `desc` and returns the local SDP once ICE gathering has completed.
pub async fn local_sdp(
    pc: &Arc<dyn PeerConnection>,
    gathered: &mut watch::Receiver<bool>,
    desc: RTCSessionDescription,
) -> Result<String> {
    pc.set_local_description(desc).await?;
    tokio::time::timeout(Duration::from_secs(10), gathered.wait_for(|g| *g)).await??;
    Ok(pc
        .local_description()
        .await
        .ok_or_else(|| anyhow!("no local description"))?
        .sdp)
}

/// A VP8 track: one encoding, or with `simulcast` one per layer of [`LAYERS`], each with its
/// rid and SSRC.
fn vp8_track(index: u16, simulcast: bool) -> Arc<TrackLocalStaticRTP> {
    let rids: Vec<&str> = if simulcast {
        LAYERS.iter().map(|(rid, _, _)| *rid).collect()
    } else {
        vec![""]
    };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("bench-{index}"),
        "cam".into(),
        "cam".into(),
        RtpCodecKind::Video,
        rids.into_iter()
            .map(|rid| RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    rid: rid.to_owned(),
                    ssrc: Some(rand::random::<u32>()),
                    ..Default::default()
                },
                codec: RTCRtpCodec {
                    mime_type: "video/VP8".into(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: String::new(),
                    rtcp_feedback: vec![],
                },
                ..Default::default()
            })
            .collect(),
    )))
}

/// A publish connection with one VP8 track, its offer made.
struct Publishing {
    pc: Arc<dyn PeerConnection>,
    track: Arc<TrackLocalStaticRTP>,
    /// The simulcast layers to send (bit `1 << layer`), as the server's `layers` says.
    active: Arc<AtomicU8>,
}

/// Every layer: what a publisher sends until the server says otherwise.
const ALL_LAYERS: u8 = 0b111;

impl Publishing {
    /// Applies the server's `layers` message (dynacast), as the browser SDK does.
    fn apply_layers(&self, message: &Value) {
        Self::mask_from(message, &self.active);
    }

    fn mask_from(message: &Value, into: &AtomicU8) {
        let Some(active) = message["active"].as_array() else {
            return;
        };
        let mask = LAYERS
            .iter()
            .enumerate()
            .filter(|(_, (rid, _, _))| active.iter().any(|a| a.as_str() == Some(rid)))
            .fold(0u8, |mask, (layer, _)| mask | (1 << layer));
        into.store(mask, Ordering::Relaxed);
    }
}

async fn offer_publish(ws: &mut Ws, index: u16, simulcast: bool) -> Result<Publishing> {
    let (pc, mut gathered) = peer_connection(None).await?;
    let track = vp8_track(index, simulcast);
    pc.add_track(track.clone() as Arc<dyn TrackLocal>).await?;
    let offer = pc.create_offer(None).await?;
    let sdp = local_sdp(&pc, &mut gathered, offer).await?;
    send(
        ws,
        json!({"type": "offer", "peerId": "sfu", "transport": "publish", "sdp": sdp,
               "tracks": [{"trackId": "cam", "source": "camera"}]}),
    )
    .await?;
    Ok(Publishing {
        pc,
        track,
        active: Arc::new(AtomicU8::new(ALL_LAYERS)),
    })
}

impl Publishing {
    /// Applies the server's answer and starts sending video until `stop`.
    async fn start(
        &self,
        answer_sdp: String,
        index: u16,
        shape: VideoShape,
        tally: Arc<Tally>,
        stop: watch::Receiver<Phase>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        self.pc
            .set_remote_description(RTCSessionDescription::answer(answer_sdp.clone())?)
            .await?;
        let payload_type = payload_type(&self.pc).await?;
        let ssrcs = self.track.ssrcs().await;
        if ssrcs.is_empty() {
            bail!("no ssrc");
        }
        // Each simulcast layer's packets say their section and rid, as a browser's do.
        let extensions = if shape.simulcast {
            let mid = match self.pc.get_transceivers().await.first() {
                Some(transceiver) => transceiver.mid().await.ok().flatten().unwrap_or_default(),
                None => String::new(),
            };
            let ids = extension_ids(&answer_sdp);
            let id = |uri: &str| {
                ids.iter()
                    .find(|(known, _)| known == uri)
                    .map(|(_, id)| *id)
            };
            match (id(MID_URI), id(RID_URI)) {
                (Some(mid_id), Some(rid_id)) => Some(StreamExtensions {
                    mid_id,
                    rid_id,
                    mid,
                }),
                _ => bail!("the server's answer negotiated no mid and rid extensions"),
            }
        } else {
            None
        };
        let track = self.track.clone();
        Ok(tokio::spawn(send_video(
            track,
            payload_type,
            ssrcs,
            extensions,
            self.active.clone(),
            index,
            shape,
            tally,
            stop,
        )))
    }
}

/// Answers a subscribe offer on `pc`, then tells the server at what size each video is shown.
async fn answer_subscribe(
    ws: &mut Ws,
    pc: &Arc<dyn PeerConnection>,
    gathered: &mut watch::Receiver<bool>,
    message: &Value,
    viewing: Viewing,
) -> Result<()> {
    let sdp = message["sdp"].as_str().unwrap_or_default().to_owned();
    pc.set_remote_description(RTCSessionDescription::offer(sdp)?)
        .await?;
    let answer = pc.create_answer(None).await?;
    let sdp = local_sdp(pc, gathered, answer).await?;
    send(
        ws,
        json!({"type": "answer", "peerId": "sfu", "transport": "subscribe", "sdp": sdp}),
    )
    .await?;
    let Some(tile) = viewing.tile else {
        return Ok(());
    };
    let videos: Vec<&Value> = message["subscriptions"]
        .as_array()
        .map(|all| all.iter().filter(|s| s["kind"] == "video").collect())
        .unwrap_or_default();
    let staged = videos
        .iter()
        .filter_map(|s| s["peerId"].as_str())
        .min()
        .filter(|_| viewing.stage.is_some());
    for video in videos {
        let (width, height) = match viewing.stage {
            Some(stage) if video["peerId"].as_str() == staged => stage,
            _ => tile,
        };
        send(
            ws,
            json!({"type": "view", "publicationId": video["publicationId"], "width": width, "height": height}),
        )
        .await?;
    }
    Ok(())
}

/// Joins `room` and publishes one VP8 video track of `shape` until `stop` turns true. Reports
/// the time joining took through `started` once media flows.
pub async fn publisher(
    base: String,
    room: String,
    index: u16,
    shape: VideoShape,
    tally: Arc<Tally>,
    started: tokio::sync::oneshot::Sender<Duration>,
    mut stop: watch::Receiver<Phase>,
) -> Result<()> {
    let Joined { mut ws, took } = join(&base, &room, &format!("publisher-{index}")).await?;
    let publishing = offer_publish(&mut ws, index, shape.simulcast).await?;
    let answer = loop {
        let message = recv(&mut ws).await?;
        if message["type"] == "answer" {
            break message["sdp"].as_str().unwrap_or_default().to_owned();
        }
        if message["type"] == "error" {
            bail!("publish refused: {message}");
        }
    };
    let sending = publishing
        .start(answer, index, shape, tally, stop.clone())
        .await?;
    let _ = started.send(took);
    // Signaling stays read (pings answered, `layers` obeyed) while media flows.
    let active = publishing.active.clone();
    let keepalive = tokio::spawn(async move {
        while let Ok(message) = recv(&mut ws).await {
            if message["type"] == "layers" {
                Publishing::mask_from(&message, &active);
            }
        }
    });
    let _ = sending.await;
    // Closing at once could drop what is still queued to leave: stay until told to leave.
    let _ = stop.wait_for(|phase| *phase == Phase::Leave).await;
    keepalive.abort();
    let _ = publishing.pc.close().await;
    Ok(())
}

/// Joins `room`, publishes one VP8 track and receives everyone else, as a participant of a
/// call does, until `stop` turns true.
#[allow(clippy::too_many_arguments)]
pub async fn participant(
    base: String,
    room: String,
    index: u16,
    shape: VideoShape,
    viewing: Viewing,
    receiving: Receiving,
    tally: Arc<Tally>,
    joined: tokio::sync::oneshot::Sender<Duration>,
    mut stop: watch::Receiver<Phase>,
) -> Result<()> {
    let Joined { mut ws, took } = join(&base, &room, &format!("participant-{index}")).await?;
    let _ = joined.send(took);
    let (subscribe, mut gathered) = peer_connection_for(
        Some(tally.clone()),
        None,
        Some(Arc::new(ClientRuntime::unshaped(receiving.gro))),
        receiving.srtp,
    )
    .await?;
    let publishing = offer_publish(&mut ws, index, shape.simulcast).await?;
    let mut sending = None;
    loop {
        let message = tokio::select! {
            message = recv(&mut ws) => message?,
            _ = stop.wait_for(|phase| *phase == Phase::Leave) => break,
        };
        match (message["type"].as_str(), message["transport"].as_str()) {
            (Some("answer"), Some("publish")) => {
                let answer = message["sdp"].as_str().unwrap_or_default().to_owned();
                sending = Some(
                    publishing
                        .start(answer, index, shape, tally.clone(), stop.clone())
                        .await?,
                );
            }
            (Some("offer"), Some("subscribe")) => {
                answer_subscribe(&mut ws, &subscribe, &mut gathered, &message, viewing).await?;
            }
            (Some("layers"), _) => publishing.apply_layers(&message),
            (Some("error"), _) => bail!("refused: {message}"),
            _ => {}
        }
    }
    if let Some(sending) = sending {
        // Done already when the run went quiet first; a run that failed leaves at once.
        sending.abort();
        let _ = sending.await;
    }
    let _ = ws
        .send(Message::Text(json!({"type": "leave"}).to_string().into()))
        .await;
    let _ = publishing.pc.close().await;
    let _ = subscribe.close().await;
    Ok(())
}

const MID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";

/// `(uri, id)` of each `a=extmap` line.
fn extension_ids(sdp: &str) -> Vec<(String, u8)> {
    sdp.lines()
        .filter_map(|line| line.trim_end().strip_prefix("a=extmap:"))
        .filter_map(|rest| {
            let mut parts = rest.split_whitespace();
            let id = parts.next()?.split('/').next()?.parse().ok()?;
            Some((parts.next()?.to_owned(), id))
        })
        .collect()
}

/// The header extensions a simulcast layer's packets carry.
struct StreamExtensions {
    mid_id: u8,
    rid_id: u8,
    mid: String,
}

/// One stream being sent: a simulcast layer, or the only encoding.
struct Stream {
    ssrc: u32,
    rid: &'static str,
    frame_bytes: usize,
    seq: u16,
    /// Probe numbers, per stream, so receivers see gaps within what they receive.
    number: u64,
    /// Probe stream id: publisher index, layer in the top bits.
    id: u16,
}

/// Sends frames of `shape` as MTU-sized VP8 packets carrying probes, on each of `ssrcs` (one per
/// simulcast layer, lowest first), until `stop`.
#[allow(clippy::too_many_arguments)]
async fn send_video(
    track: Arc<TrackLocalStaticRTP>,
    payload_type: u8,
    ssrcs: Vec<u32>,
    extensions: Option<StreamExtensions>,
    active: Arc<AtomicU8>,
    index: u16,
    shape: VideoShape,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<Phase>,
) {
    let top_frame_bytes = usize::try_from(shape.bitrate / 8 / u64::from(shape.fps.max(1)))
        .unwrap_or(MAX_PAYLOAD)
        .max(PROBE_BYTES + 2);
    let mut streams: Vec<Stream> = ssrcs
        .iter()
        .enumerate()
        .map(|(layer, &ssrc)| {
            let (rid, numerator, denominator) = match extensions {
                Some(_) => LAYERS[layer.min(LAYERS.len() - 1)],
                None => ("", 1, 1),
            };
            Stream {
                ssrc,
                rid,
                frame_bytes: (top_frame_bytes * numerator as usize / denominator as usize)
                    .max(PROBE_BYTES + 2),
                seq: rand::random::<u16>() >> 1,
                number: 0,
                id: index | ((layer as u16) << 12),
            }
        })
        .collect();
    let keyframe_every =
        (shape.keyframe_interval.as_secs_f64() * f64::from(shape.fps)).max(1.0) as u64;
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / shape.fps.max(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Like a browser's encoder, answer the server's keyframe requests (PLI/FIR) with the next
    // frame, at most every 300 ms; otherwise every `keyframe_interval`. (Every layer at once:
    // simpler than a browser, which answers per layer.)
    let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feedback = {
        let (track, requested) = (track.clone(), requested.clone());
        tokio::spawn(async move {
            while let Some(TrackLocalEvent::OnRtcpPacket(packets)) = track.poll().await {
                if packets.iter().any(|p| {
                    let any = p.as_any();
                    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                }) {
                    requested.store(true, Ordering::Relaxed);
                }
            }
        })
    };
    let mut last_keyframe: Option<tokio::time::Instant> = None;
    let mut frame = 0u64;
    let filler = Bytes::from(vec![0xA5u8; MAX_PAYLOAD]);
    let mut buf = BytesMut::with_capacity(MAX_PAYLOAD * 64);
    'frames: while *stop.borrow() == Phase::Running {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        let now = tokio::time::Instant::now();
        let answer_request = shape.keyframes == Keyframes::OnRequest
            && requested.load(Ordering::Relaxed)
            && last_keyframe.is_none_or(|last| now - last >= Duration::from_millis(300));
        let keyframe = frame % keyframe_every == 0 || answer_request;
        if keyframe {
            requested.store(false, Ordering::Relaxed);
            last_keyframe = Some(now);
        }
        let timestamp =
            u32::try_from((frame * 90_000 / u64::from(shape.fps)) % (1 << 32)).unwrap_or(0);
        let active = active.load(Ordering::Relaxed);
        for (layer, stream) in streams.iter_mut().enumerate() {
            if extensions.is_some() && active & (1 << layer) == 0 {
                continue;
            }
            let packets = stream.frame_bytes.div_ceil(MAX_PAYLOAD);
            let mut left = stream.frame_bytes;
            for i in 0..packets {
                let size = left.clamp(2 + PROBE_BYTES, MAX_PAYLOAD);
                left = left.saturating_sub(size);
                // VP8 payload descriptor (S bit on a frame's first packet), then for that packet
                // the first byte of the VP8 header, whose P bit is 0 on a keyframe.
                buf.put_u8(if i == 0 { 0x10 } else { 0x00 });
                buf.put_u8(if keyframe { 0x00 } else { 0x01 });
                buf.put_u16(MAGIC);
                buf.put_u16(stream.id);
                buf.put_u64(stream.number);
                let sent_at = now_micros();
                buf.put_u64(sent_at);
                buf.extend_from_slice(&filler[..size - 2 - PROBE_BYTES]);
                let mut header = rtp::Header {
                    version: 2,
                    marker: i + 1 == packets,
                    payload_type,
                    sequence_number: stream.seq,
                    timestamp,
                    ssrc: stream.ssrc,
                    ..Default::default()
                };
                if let Some(ext) = &extensions {
                    let _ = header.set_extension(ext.mid_id, Bytes::from(ext.mid.clone()));
                    let _ =
                        header.set_extension(ext.rid_id, Bytes::from_static(stream.rid.as_bytes()));
                }
                let packet = rtp::Packet {
                    header,
                    payload: buf.split().freeze(),
                };
                stream.seq = stream.seq.wrapping_add(1);
                stream.number += 1;
                if track.write_rtp(packet).await.is_err() {
                    break 'frames;
                }
                tally.sent.fetch_add(1, Ordering::Relaxed);
                tally.sent_bytes.fetch_add(size as u64, Ordering::Relaxed);
                if tally.in_window(sent_at) {
                    tally.window_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        frame += 1;
    }
    feedback.abort();
}

async fn payload_type(pc: &Arc<dyn PeerConnection>) -> Result<u8> {
    for sender in pc.get_senders().await {
        for codec in &sender.get_parameters().await?.rtp_parameters.codecs {
            if codec.rtp_codec.mime_type.eq_ignore_ascii_case("video/vp8") {
                return Ok(codec.payload_type);
            }
        }
    }
    bail!("VP8 not negotiated")
}

/// Joins `room` and receives everything the server offers until `stop` turns true, through a
/// link of `link_rate` bits per second when set ([`crate::shaping`]), counting what it
/// receives into `tally` and `own`.
#[allow(clippy::too_many_arguments)]
pub async fn subscriber(
    base: String,
    room: String,
    index: u32,
    viewing: Viewing,
    receiving: Receiving,
    tally: Arc<Tally>,
    own: Arc<SubscriberStats>,
    link_rate: Option<u64>,
    joined: tokio::sync::oneshot::Sender<Duration>,
    mut stop: watch::Receiver<Phase>,
) -> Result<()> {
    let Joined { mut ws, took } = join(&base, &room, &format!("subscriber-{index}")).await?;
    let _ = joined.send(took);
    let runtime = match link_rate {
        Some(rate) => ClientRuntime::shaped(rate, own.link_drops.clone()),
        None => ClientRuntime::unshaped(receiving.gro),
    };
    let (pc, mut gathered) = peer_connection_for(
        Some(tally),
        Some(own.clone()),
        Some(Arc::new(runtime)),
        receiving.srtp,
    )
    .await?;
    // How the server serves each video for this subscriber's link.
    let mut allocations: std::collections::HashMap<String, String> = Default::default();
    loop {
        let message = tokio::select! {
            message = recv(&mut ws) => message?,
            _ = stop.wait_for(|phase| *phase == Phase::Leave) => break,
        };
        if message["type"] == "offer" && message["transport"] == "subscribe" {
            answer_subscribe(&mut ws, &pc, &mut gathered, &message, viewing).await?;
        } else if message["type"] == "bandwidth" {
            own.estimate.store(
                message["estimate"].as_u64().unwrap_or_default(),
                Ordering::Relaxed,
            );
        } else if message["type"] == "allocation" {
            let id = message["publicationId"].as_str().unwrap_or_default();
            let state = message["state"].as_str().unwrap_or_default();
            allocations.insert(id.to_owned(), state.to_owned());
            let count = |wanted: &str| allocations.values().filter(|s| *s == wanted).count();
            own.paused.store(count("paused") as u64, Ordering::Relaxed);
            own.lowered
                .store(count("lowered") as u64, Ordering::Relaxed);
            own.estimate.store(
                message["estimate"].as_u64().unwrap_or_default(),
                Ordering::Relaxed,
            );
        }
    }
    let _ = ws
        .send(Message::Text(json!({"type": "leave"}).to_string().into()))
        .await;
    let _ = pc.close().await;
    Ok(())
}

use webrtc::media_stream::Track as _;

#[cfg(test)]
mod tests {
    use super::*;

    /// A resend or duplicate of a probe that arrived counts once; one that fills a gap counts;
    /// one too far behind the newest cannot be told apart and does not count.
    #[test]
    fn each_probe_number_counts_once() {
        let mut seen = Seen::default();
        let firsts: Vec<bool> = [1, 2, 2, 5, 3, 4, 3, 5]
            .into_iter()
            .map(|n| seen.first(n))
            .collect();
        assert_eq!(firsts, [true, true, false, true, true, true, false, false]);
        // Most of a span ahead: 3's slot now stands for SEEN_SPAN + 3, which has not come.
        assert!(seen.first(SEEN_SPAN + 4));
        assert!(seen.first(SEEN_SPAN + 3), "a gap filled late counts");
        assert!(!seen.first(SEEN_SPAN + 3));
        assert!(!seen.first(3), "too old to tell from a duplicate");
        // Far ahead: everything before is forgotten.
        assert!(seen.first(10 * SEEN_SPAN));
        assert!(seen.first(10 * SEEN_SPAN - 1));
    }
}
