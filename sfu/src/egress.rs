//! The egress engine: every subscribe connection's peer connection, driven sans-I/O (the `rtc`
//! core, no webrtc-rs driver task) by one task over one shared UDP socket.
//!
//! Why: forwarding through a webrtc-rs driver costs a task hop, a channel, a lock and a full
//! driver-loop turn per packet per subscriber, then one `sendmsg` per datagram. Here a fanout
//! hands the engine one message per published packet (all its subscriptions' rewritten copies);
//! the engine encrypts each copy in its subscriber's connection and sends what has accumulated
//! when its input runs dry, with one UDP GSO `sendmsg` per subscriber where the kernel offers it.
//!
//! One socket serves every subscribe connection. Inbound datagrams are routed by source address;
//! the first one from an address must be a STUN request whose USERNAME names the connection's
//! ICE ufrag (RFC 8445 7.2.2), which the engine chose itself.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use rtc::interceptor::{
    CongestionControlBuilder, Registry, SenderReportBuilder, Slot, TwccSenderBuilder,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::RTCPeerConnectionBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpHeaderExtensionCapability, RtpCodecKind, TYPE_RTCP_FB_TRANSPORT_CC,
};
use rtc::rtp_transceiver::{RTCRtpSenderId, RTCRtpTransceiverDirection};
use rtc::sansio::Protocol;
use rtc::shared::marshal::MarshalSize;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::admission::{Backlog, MediaBatch, MediaSender, ROUND_COPIES};
use crate::connection::{TransportKind, ice_settings};
use crate::estimator::{Estimator, INITIAL_ESTIMATE, MAX_ESTIMATE, MIN_ESTIMATE, ProbeLog};
use crate::exchange::{Class, ConnId, FeedbackRoute, Outgoing, SubscriberFeedback};
use crate::feedback::FeedbackInterceptor;
use crate::ids::ParticipantId;
use crate::{SfuConfig, SfuError, SfuEvent};

/// Forwarded batches the engine's media queue holds (one per published packet).
const MEDIA_QUEUE: usize = 8192;
/// Commands its control queue holds. A separate queue, so media never waits behind a storm of
/// joins' offers and answers.
const CONTROL_QUEUE: usize = 1024;
/// Forwarded batches taken in one round before the engine writes and sends them.
const MAX_INPUTS_PER_ROUND: usize = 256;
/// Commands (offers, answers, opening and closing connections) handled in one round: each
/// costs up to a millisecond of SDP work, and a storm of joins must not stall forwarding.
const MAX_COMMANDS_PER_ROUND: usize = 4;
/// Receive calls (each up to `quinn_udp::BATCH_SIZE` datagrams) in one round.
const MAX_READS_PER_ROUND: usize = 4;
/// Largest datagram accepted on the shared socket (one MTU with room to spare).
const DATAGRAM_BUFFER: usize = 2048;
/// Every connection's timers are re-read at least this often, so a timer armed by a write (a
/// sender report's first schedule) is never missed for long.
const HOUSEKEEPING: Duration = Duration::from_millis(20);
/// UDP GSO payload limit per `sendmsg`.
const MAX_GSO_BYTES: usize = 65_000;
/// While its allocation is limited, a subscriber's video leaves at most this many times its
/// estimate: the allocation keeps the average under the estimate, and the pacer spreads a
/// keyframe's burst so a shallow router buffer does not overflow (and take audio with it).
const PACING_FACTOR: f64 = 1.25;
/// The most a pacer lets leave at once: this long at its rate...
const PACER_BURST: Duration = Duration::from_millis(10);
/// ... but at least two full packets.
const MIN_PACER_BURST_BYTES: f64 = 2_500.0;
/// Video a pacer holds longer than this at its rate is dropped, oldest first (the subscriber
/// NACKs it, or waits for a keyframe): the allocation lowers layers within a second, and a
/// queue that grows without bound would only delay everything behind it.
const MAX_PACER_DELAY: Duration = Duration::from_millis(500);
/// A probe cluster asks the link to carry this multiple of the estimate: its padding goes at
/// that rate less what the subscriber receives already ([`Bandwidth::probe_rate`]). Padding at
/// twice the estimate on top of the media made every probe about 2.7 times the link, and
/// filled a shallow router queue that audio shares.
pub(crate) const PROBE_FACTOR: u64 = 2;

/// What the engine and the allocation share about one subscriber's bandwidth.
#[derive(Debug, Default)]
pub(crate) struct Bandwidth {
    /// The send-side estimate, bits per second (0: none yet).
    pub(crate) estimate: Arc<AtomicU64>,
    /// The allocation is holding the subscriber's video to the estimate: pace to it.
    pub(crate) limiting: AtomicBool,
    /// The estimate is the subscriber's REMB (it sends no transport-wide feedback).
    pub(crate) from_remb: Arc<AtomicBool>,
    /// The rate of the next probe cluster's padding, bits per second: twice the estimate less
    /// what the allocation sends (0: the estimate).
    pub(crate) probe_rate: AtomicU64,
    /// The lowest estimate of the last two seconds, bits per second (0: none yet): what video
    /// is paced to. A probe can lift the estimate past the link for a moment; pacing to that
    /// let bursts overflow the link's queue (audio and all) before the estimate came down.
    pub(crate) pace_estimate: AtomicU64,
    /// Probe clusters sent, for the estimator to measure.
    pub(crate) probes: Arc<ProbeLog>,
}

type Reply<T> = oneshot::Sender<Result<T, SfuError>>;

/// A subscribe connection's local ICE credentials: the ufrag routes a new address's STUN to
/// it, the password proves the STUN came from its peer.
pub(crate) struct IceCredentials {
    pub(crate) ufrag: String,
    pub(crate) pwd: String,
}

/// Remote addresses one subscribe connection is reached from at most (a client's host,
/// server-reflexive and relayed candidates, over IPv4 and IPv6); a new one replaces the oldest.
const MAX_ADDRESSES_PER_CONNECTION: usize = 8;

/// A subscribe offer's SDP and each sender's `mid`.
pub(crate) type OfferReply = (String, Vec<(String, RTCRtpSenderId)>);

/// Commands to the engine (forwarded packets travel on their own queue).
pub(crate) enum EgressInput {
    /// A connection built by the caller (certificate and all), so the engine does no such work.
    Open {
        conn: ConnId,
        pc: Box<RTCPeerConnection>,
        credentials: IceCredentials,
        participant: ParticipantId,
        events: mpsc::UnboundedSender<SfuEvent>,
        /// Present when the connection estimates its bandwidth: its video is then paced.
        bandwidth: Option<Arc<Bandwidth>>,
        reply: Reply<()>,
    },
    AddTrack {
        conn: ConnId,
        track: Box<MediaStreamTrack>,
        feedback: FeedbackRoute,
        reply: Reply<RTCRtpSenderId>,
    },
    RemoveTrack {
        conn: ConnId,
        sender: RTCRtpSenderId,
        track_id: String,
        reply: Reply<()>,
    },
    CreateOffer {
        conn: ConnId,
        reply: Reply<OfferReply>,
    },
    /// Applies an answer; replies with the payload type negotiated for each `(sender, mime)`.
    ApplyAnswer {
        conn: ConnId,
        sdp: String,
        wanted: Vec<(RTCRtpSenderId, String)>,
        reply: Reply<Vec<Option<u8>>>,
    },
    AddCandidate {
        conn: ConnId,
        candidate: RTCIceCandidateInit,
        reply: Reply<()>,
    },
    Close {
        conn: ConnId,
    },
}

/// Counters of the engine, read by metrics.
#[derive(Debug, Default)]
pub struct EgressStats {
    /// Datagrams sent on the shared socket.
    pub datagrams_sent: AtomicU64,
    /// `sendmsg` calls that sent them (fewer than datagrams where GSO batches).
    pub send_calls: AtomicU64,
    /// Datagrams the kernel refused (buffer full after waiting, or an error).
    pub send_errors: AtomicU64,
    /// Inbound datagrams from an address no connection knows, dropped.
    pub unrouted_datagrams: AtomicU64,
    /// STUN requests from a new address that named a connection's ufrag but failed its
    /// MESSAGE-INTEGRITY check (spoofed, or a stale client), dropped without remembering the
    /// address.
    pub unverified_stun: AtomicU64,
    /// Remote addresses routed to a connection now.
    pub routed_addresses: AtomicU64,
    /// Forwarded packets a subscriber's connection refused (not yet connected, closed).
    pub write_errors: AtomicU64,
    /// Subscribe connections open now.
    pub connections: AtomicU64,
    /// Forwarded copies admitted and not yet written, as of the last round.
    pub backlog: AtomicU64,
    /// How many may be: what the engine can write in its 40 ms budget at its recent pace.
    pub backlog_limit: AtomicU64,
    /// Video packets dropped because a subscriber's pacer held more than it could send in
    /// [`MAX_PACER_DELAY`] (its link is slower than what was allocated, for the moment), and
    /// NACK resends dropped because the pacer already held that much.
    pub paced_drops: AtomicU64,
    /// Probe clusters sent (to find out whether a subscriber's link carries more).
    pub probes_sent: AtomicU64,
}

/// The way into the engine: forwarded media (through admission) and commands.
#[derive(Clone)]
pub(crate) struct EgressSender {
    pub(crate) media: MediaSender,
    control: mpsc::Sender<EgressInput>,
}

impl EgressSender {
    fn new(media: MediaSender, control: mpsc::Sender<EgressInput>) -> Self {
        Self { media, control }
    }

    pub(crate) async fn send(&self, input: EgressInput) -> Result<(), SfuError> {
        self.control
            .send(input)
            .await
            .map_err(|_| SfuError::EngineStopped)
    }

    pub(crate) fn try_send(&self, input: EgressInput) -> bool {
        self.control.try_send(input).is_ok()
    }
}

/// A handle to the running engine. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Egress {
    pub(crate) input: EgressSender,
    pub(crate) stats: Arc<EgressStats>,
    next_conn: Arc<AtomicU64>,
    pub(crate) local_addr: SocketAddr,
    announced: Arc<Vec<SocketAddr>>,
    config: Arc<SfuConfig>,
    nacks: Arc<AtomicU64>,
}

impl Egress {
    /// Binds the shared socket and starts the engine task. Needs a Tokio runtime.
    pub(crate) fn start(config: &SfuConfig, nacks: Arc<AtomicU64>) -> io::Result<Self> {
        let ip = config
            .media_ip
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let std_socket = std::net::UdpSocket::bind(SocketAddr::new(ip, config.udp_port))?;
        std_socket.set_nonblocking(true)?;
        let sock = socket2::SockRef::from(&std_socket);
        // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer still works.
        if let Err(err) = sock.set_recv_buffer_size(config.socket_buffer_bytes) {
            tracing::warn!(%err, "could not set the media socket receive buffer");
        }
        if let Err(err) = sock.set_send_buffer_size(config.socket_buffer_bytes) {
            tracing::warn!(%err, "could not set the media socket send buffer");
        }
        let state = UdpSocketState::new((&std_socket).into())?;
        let socket = tokio::net::UdpSocket::from_std(std_socket)?;
        let local_addr = socket.local_addr()?;
        let announced = announced_addresses(config, local_addr);
        let announced_for_builder = announced.clone();
        tracing::info!(%local_addr, ?announced, gso = state.max_gso_segments(), "subscribe media socket open");
        let (media, media_queue) = mpsc::channel(MEDIA_QUEUE);
        let (control, inputs) = mpsc::channel(CONTROL_QUEUE);
        let backlog = Arc::new(Backlog::default());
        let stats = Arc::new(EgressStats::default());
        let crypto = rtc::crypto::default_provider().map_err(io::Error::other)?;
        let engine = Engine {
            socket,
            state,
            wildcard: ip.is_unspecified(),
            port: local_addr.port(),
            announced,
            inputs,
            media: media_queue,
            conns: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            pending: Vec::new(),
            queued: Vec::new(),
            queued_frame_rest: 0,
            paced: Vec::new(),
            next_paced: None,
            backlog: backlog.clone(),
            pace: 0.0,
            scratch: Vec::with_capacity(MAX_GSO_BYTES),
            stats: stats.clone(),
            crypto,
        };
        tokio::spawn(engine.run().instrument(tracing::info_span!("egress")));
        Ok(Self {
            input: EgressSender::new(MediaSender::new(media, backlog), control),
            stats,
            next_conn: Arc::new(AtomicU64::new(1)),
            local_addr,
            announced: Arc::new(announced_for_builder),
            config: Arc::new(config.clone()),
            nacks,
        })
    }

    /// Builds a subscribe connection for this engine: its ICE ufrag (returned too, for routing),
    /// its certificate and a host candidate on the shared socket for every announced address;
    /// also where its bandwidth estimate (bits per second, 0 until the first one) is kept.
    /// Runs in the caller's task, so key generation never holds up forwarding.
    pub(crate) fn build_connection(
        &self,
    ) -> Result<(RTCPeerConnection, IceCredentials, Option<Arc<Bandwidth>>), SfuError> {
        let credentials = IceCredentials {
            ufrag: random_token(16),
            pwd: random_token(32),
        };
        let mut engine = MediaEngine::default();
        engine.register_default_codecs().map_err(SfuError::WebRtc)?;
        let bandwidth = Arc::new(Bandwidth::default());
        // Sender reports (the server receives nothing here, so it has nothing to report on,
        // and every interceptor is a copy of each packet); NACKs are answered by the fanout
        // from one cache per publication, through the feedback interceptor.
        let mut registry = Registry::new()
            .with(Slot::SenderReport, SenderReportBuilder::new().build())
            .with(
                Slot::from(14_000),
                FeedbackInterceptor::new(self.nacks.clone())
                    .with_estimate(bandwidth.estimate.clone())
                    .with_remb_flag(bandwidth.from_remb.clone()),
            );
        if self.config.bandwidth_estimation {
            // Transport-wide congestion control feedback (TWCC) from the subscriber, for the
            // estimate of what its network carries: transport-wide sequence numbers on what
            // leaves, and our estimator on the feedback (crate::estimator), without rtc's pacer:
            // the engine paces each subscriber itself. The feedback interceptor keeps the
            // estimate.
            for kind in [RtpCodecKind::Audio, RtpCodecKind::Video] {
                engine.register_feedback(
                    RTCPFeedback {
                        typ: TYPE_RTCP_FB_TRANSPORT_CC.to_owned(),
                        parameter: String::new(),
                    },
                    kind,
                );
                engine
                    .register_header_extension(
                        RTCRtpHeaderExtensionCapability {
                            uri: crate::forwarder::TRANSPORT_SCOPED_EXTENSIONS[0].to_owned(),
                        },
                        kind,
                        None,
                    )
                    .map_err(SfuError::WebRtc)?;
            }
            registry = registry
                .with(Slot::TwccSender, TwccSenderBuilder::new().build())
                .with(
                    Slot::CongestionControl,
                    CongestionControlBuilder::new(Estimator::new(
                        INITIAL_ESTIMATE as f64,
                        MIN_ESTIMATE as f64,
                        MAX_ESTIMATE as f64,
                        bandwidth.probes.clone(),
                    ))
                    .build(),
                );
        }
        let settings = ice_settings(&self.config)
            .with_ice_credentials(credentials.ufrag.clone(), credentials.pwd.clone())
            .build();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(engine)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .build(Instant::now())
            .map_err(SfuError::WebRtc)?;
        for addr in self.announced.iter() {
            let candidate = CandidateHostConfig {
                base_config: CandidateConfig {
                    network: "udp".to_owned(),
                    address: addr.ip().to_string(),
                    port: addr.port(),
                    component: 1,
                    ..Default::default()
                },
                ..Default::default()
            }
            .new_candidate_host()
            .map_err(|err| SfuError::LocalCandidate(err.to_string()))?;
            let init = RTCIceCandidate::from(&candidate)
                .to_json()
                .map_err(SfuError::WebRtc)?;
            pc.add_local_candidate(init).map_err(SfuError::WebRtc)?;
        }
        let bandwidth = self.config.bandwidth_estimation.then_some(bandwidth);
        Ok((pc, credentials, bandwidth))
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends a command and waits for its reply.
    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> EgressInput,
    ) -> Result<T, SfuError> {
        let (reply, answer) = oneshot::channel();
        self.input.send(make(reply)).await?;
        answer.await.map_err(|_| SfuError::EngineStopped)?
    }
}

/// The addresses put in host candidates: the public ones (NAT 1:1) when configured, else the
/// bound address, else (wildcard) every usable interface.
fn announced_addresses(config: &SfuConfig, local: SocketAddr) -> Vec<SocketAddr> {
    let port = local.port();
    let public: Vec<SocketAddr> = config
        .public_ips
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    if !public.is_empty() {
        return public;
    }
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let mut out = Vec::new();
    if let Ok(interfaces) = rtc::shared::ifaces::ifaces() {
        for interface in interfaces {
            let Some(addr) = interface.addr else { continue };
            let ip = addr.ip();
            let link_local = match ip {
                IpAddr::V4(v4) => v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
            };
            if ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified() && !link_local {
                let addr = SocketAddr::new(ip, port);
                if !out.contains(&addr) {
                    out.push(addr);
                }
            }
        }
    }
    if out.is_empty() {
        out.push(SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port,
        ));
    }
    out
}

struct Conn {
    pc: RTCPeerConnection,
    participant: ParticipantId,
    events: mpsc::UnboundedSender<SfuEvent>,
    ufrag: String,
    /// The local ICE password: a STUN request from a new address must be signed with it before
    /// the address is routed here.
    ice_pwd: String,
    /// Subscriber RTCP routes, by the local track id (the publication id).
    feedback: HashMap<String, FeedbackRoute>,
    /// Remote addresses routed to this connection.
    addrs: Vec<SocketAddr>,
    deadline: Option<Instant>,
    failed: bool,
    /// DTLS is up: before that, and once the connection is lost, forwarded media cannot be
    /// protected and is dropped here rather than run through the pipeline to fail there.
    connected: bool,
    /// The client's first answer has been applied: until then the connection has no remote ICE
    /// credentials, and the client's early connectivity checks (it retransmits them) are dropped.
    answered: bool,
    bandwidth: Option<Arc<Bandwidth>>,
    pacer: Pacer,
    span: tracing::Span,
}

impl Conn {
    /// Bytes per second this subscriber's video may leave at now, when it is paced.
    fn pace(&self) -> Option<f64> {
        let bandwidth = self.bandwidth.as_ref()?;
        if !bandwidth.limiting.load(Ordering::Relaxed) {
            return None;
        }
        let estimate = match bandwidth.pace_estimate.load(Ordering::Relaxed) {
            0 => bandwidth.estimate.load(Ordering::Relaxed),
            // A fall shows at once, a rise once it has lasted.
            lowest => lowest.min(bandwidth.estimate.load(Ordering::Relaxed)),
        };
        (estimate > 0).then(|| estimate as f64 * PACING_FACTOR / 8.0)
    }

    /// Bytes per second a probe cluster leaves at.
    fn probe_rate(&self) -> Option<f64> {
        let bandwidth = self.bandwidth.as_ref()?;
        let estimate = bandwidth.estimate.load(Ordering::Relaxed);
        let rate = match bandwidth.probe_rate.load(Ordering::Relaxed) {
            0 => estimate,
            rate => rate,
        };
        (rate > 0).then(|| rate as f64 / 8.0)
    }

    /// Hands one packet to the connection (interceptors, SRTP) and queues what it writes.
    fn write(
        &mut self,
        sender: RTCRtpSenderId,
        packet: rtp::Packet,
        now: Instant,
        out: &mut Outbox<'_>,
    ) -> bool {
        let written = match self.pc.rtp_sender(sender) {
            Some(mut sender) => sender.write_rtp(now, packet).is_ok(),
            None => false,
        };
        while let Some(write) = self.pc.poll_write() {
            push_pending(out.pending, out.by_addr, out.wildcard, write);
        }
        written
    }
}

/// Where a connection's writes go: the engine's pending datagrams.
struct Outbox<'a> {
    pending: &'a mut Vec<Pending>,
    by_addr: &'a HashMap<SocketAddr, (ConnId, IpAddr)>,
    wildcard: bool,
}

/// One subscriber's pacer: a budget of bytes refilled at the pace rate, the resends and video
/// waiting for it (resends first), and a probe cluster being sent at its own rate.
#[derive(Default)]
struct Pacer {
    /// Bytes that may leave now; negative when audio or a burst overdrew it.
    budget: f64,
    refilled: Option<Instant>,
    resend: VecDeque<(RTCRtpSenderId, rtp::Packet)>,
    video: VecDeque<(RTCRtpSenderId, rtp::Packet)>,
    /// Bytes of `resend` and `video`.
    queued_bytes: usize,
    probe: VecDeque<(RTCRtpSenderId, rtp::Packet)>,
    /// When the next probe packet leaves, and when the cluster's first one left.
    probe_next: Option<Instant>,
    probe_started: Option<Instant>,
    /// On the engine's list of pacers with something waiting.
    listed: bool,
}

impl Pacer {
    fn refill(&mut self, now: Instant, rate: f64) {
        let elapsed = self
            .refilled
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        let burst = (rate * PACER_BURST.as_secs_f64()).max(MIN_PACER_BURST_BYTES);
        self.budget = (self.budget + rate * elapsed).min(burst);
        self.refilled = Some(now);
    }

    /// Whether a packet of `bytes` may leave now, at `rate`: nothing waits before it and the
    /// budget has room (which it then takes).
    fn admit(&mut self, now: Instant, rate: f64, bytes: usize) -> bool {
        self.refill(now, rate);
        let admitted = self.video.is_empty() && self.resend.is_empty() && self.budget > 0.0;
        if admitted {
            self.budget -= bytes as f64;
        }
        admitted
    }

    fn is_idle(&self) -> bool {
        self.video.is_empty() && self.resend.is_empty() && self.probe.is_empty()
    }

    /// The most a pacer holds at `rate`: what leaves in [`MAX_PACER_DELAY`].
    fn limit(rate: f64) -> usize {
        (rate * MAX_PACER_DELAY.as_secs_f64()) as usize
    }

    /// Queues a resend behind other resends, ahead of video, when the pacer has room for it;
    /// false when it has not (the packet is dropped).
    fn queue_resend(&mut self, rate: f64, sender: RTCRtpSenderId, packet: rtp::Packet) -> bool {
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
    fn queue_video(&mut self, rate: f64, sender: RTCRtpSenderId, packet: rtp::Packet) -> u64 {
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
    fn pop(&mut self) -> Option<(RTCRtpSenderId, rtp::Packet)> {
        let next = self.resend.pop_front().or_else(|| self.video.pop_front());
        if let Some((_, packet)) = &next {
            self.queued_bytes -= packet_bytes(packet);
        }
        next
    }
}

/// A packet's size on the wire, as the estimate counts it.
fn packet_bytes(packet: &rtp::Packet) -> usize {
    packet.header.marshal_size() + packet.payload.len() + crate::estimator::PACKET_OVERHEAD
}

/// A datagram waiting for the next flush.
struct Pending {
    destination: SocketAddr,
    src_ip: Option<IpAddr>,
    datagram: BytesMut,
}

struct Engine {
    socket: tokio::net::UdpSocket,
    /// Checks MESSAGE-INTEGRITY of STUN from new addresses.
    crypto: Arc<dyn rtc::crypto::RTCCryptoProvider>,
    state: UdpSocketState,
    wildcard: bool,
    port: u16,
    announced: Vec<SocketAddr>,
    inputs: mpsc::Receiver<EgressInput>,
    media: mpsc::Receiver<MediaBatch>,
    conns: HashMap<ConnId, Conn>,
    by_ufrag: HashMap<String, ConnId>,
    /// Remote address -> (connection, the local IP it reached us on).
    by_addr: HashMap<SocketAddr, (ConnId, IpAddr)>,
    pending: Vec<Pending>,
    /// Forwarded copies received and not yet written.
    queued: Vec<Outgoing>,
    /// Of those, the rest of admitted frames.
    queued_frame_rest: usize,
    /// Connections whose pacer holds something, and when the first of them is due.
    paced: Vec<ConnId>,
    next_paced: Option<Instant>,
    /// Copies handed over by fanouts and not yet written, and the limit on them.
    backlog: Arc<Backlog>,
    /// Recent seconds per written copy.
    pace: f64,
    scratch: Vec<u8>,
    stats: Arc<EgressStats>,
}

impl Engine {
    async fn run(mut self) {
        let batch = quinn_udp::BATCH_SIZE.max(1);
        let gro = self.state.gro_segments().max(1);
        let mut buffers: Vec<Vec<u8>> = (0..batch)
            .map(|_| vec![0u8; DATAGRAM_BUFFER * gro])
            .collect();
        let mut meta = vec![RecvMeta::default(); batch];
        let mut next_housekeeping = Instant::now();
        loop {
            // Everything already waiting, then the forwarded copies subscriber by subscriber,
            // each subscriber's sent as soon as they are encrypted: under load many published
            // packets' copies leave together, GSO-batched per subscriber, and the first
            // subscribers need not wait for the last one's encryption.
            let mut batches = 0;
            while batches < MAX_INPUTS_PER_ROUND && self.queued.len() < ROUND_COPIES {
                match self.media.try_recv() {
                    Ok(batch) => {
                        self.take(batch);
                        batches += 1;
                    }
                    Err(_) => break,
                }
            }
            let mut commands = 0;
            while commands < MAX_COMMANDS_PER_ROUND {
                match self.inputs.try_recv() {
                    Ok(input) => {
                        self.handle_input(input);
                        commands += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.close_all();
                        return;
                    }
                }
            }
            let full_round = batches == MAX_INPUTS_PER_ROUND
                || commands == MAX_COMMANDS_PER_ROUND
                || self.queued.len() >= ROUND_COPIES;
            self.forward_queued().await;
            let more_to_read = self.read_socket(&mut buffers, &mut meta);
            let full_round = full_round || more_to_read;
            // Timers run here, every round, not only when the queue is idle: a busy engine that
            // skipped them would stop its ICE keepalives and lose every subscriber at once.
            let now = Instant::now();
            if now >= next_housekeeping {
                for conn in self.conns.values_mut() {
                    conn.deadline = conn.pc.poll_timeout();
                }
                next_housekeeping = now + HOUSEKEEPING;
            }
            self.handle_timeouts();
            self.release_paced(now);
            self.flush().await;
            if full_round {
                tokio::task::yield_now().await;
                continue;
            }
            let next = self
                .conns
                .values()
                .filter_map(|conn| conn.deadline)
                .min()
                .unwrap_or(next_housekeeping)
                .min(next_housekeeping)
                .min(self.next_paced.unwrap_or(next_housekeeping));
            tokio::select! {
                biased;
                batch = self.media.recv() => {
                    if let Some(batch) = batch {
                        self.take(batch);
                    }
                }
                input = self.inputs.recv() => match input {
                    Some(input) => self.handle_input(input),
                    None => {
                        self.close_all();
                        return;
                    }
                },
                ready = self.socket.readable() => {
                    if let Err(err) = ready {
                        tracing::error!(%err, "media socket failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                _ = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    fn handle_timeouts(&mut self) {
        let now = Instant::now();
        let due: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(conn) = self.conns.get_mut(&id)
                && let Err(err) = conn.pc.handle_timeout(now)
            {
                tracing::debug!(parent: &conn.span, %err, "timeout handling failed");
            }
            self.pump(id);
        }
    }

    fn handle_input(&mut self, input: EgressInput) {
        match input {
            EgressInput::Open {
                conn,
                pc,
                credentials,
                participant,
                events,
                bandwidth,
                reply,
            } => {
                self.open(conn, *pc, credentials, participant, events, bandwidth);
                let _ = reply.send(Ok(()));
            }
            EgressInput::AddTrack {
                conn,
                track,
                feedback,
                reply,
            } => {
                let result = self.with_conn(conn, |c| {
                    let track_id = track.track_id().to_string();
                    let sender = c.pc.add_track(*track).map_err(SfuError::WebRtc)?;
                    // `add_track` makes the section `sendrecv` (W3C addTrack); the server only
                    // sends on it, and says so. A removed one then goes `inactive`.
                    let ids: Vec<_> = c.pc.get_transceivers().collect();
                    for id in ids {
                        if let Some(mut transceiver) = c.pc.rtp_transceiver(id)
                            && transceiver.sender() == Some(sender)
                        {
                            transceiver.set_direction(RTCRtpTransceiverDirection::Sendonly);
                        }
                    }
                    c.feedback.insert(track_id, feedback);
                    Ok(sender)
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EgressInput::RemoveTrack {
                conn,
                sender,
                track_id,
                reply,
            } => {
                let result = self.with_conn(conn, |c| {
                    c.feedback.remove(&track_id);
                    c.pc.remove_track(sender).map_err(SfuError::WebRtc)
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EgressInput::CreateOffer { conn, reply } => {
                let result = self.with_conn(conn, |c| {
                    let offer = c.pc.create_offer(None).map_err(SfuError::WebRtc)?;
                    c.pc.set_local_description(Instant::now(), offer)
                        .map_err(SfuError::WebRtc)?;
                    let sdp =
                        c.pc.local_description()
                            .map(|desc| desc.sdp)
                            .ok_or(SfuError::NoLocalDescription)?;
                    let ids: Vec<_> = c.pc.get_transceivers().collect();
                    let mut mids = Vec::new();
                    for id in ids {
                        if let Some(transceiver) = c.pc.rtp_transceiver(id)
                            && let (Some(mid), Some(sender)) =
                                (transceiver.mid().clone(), transceiver.sender())
                        {
                            mids.push((mid, sender));
                        }
                    }
                    Ok((sdp, mids))
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EgressInput::ApplyAnswer {
                conn,
                sdp,
                wanted,
                reply,
            } => {
                let result = self.with_conn(conn, |c| {
                    let answer = RTCSessionDescription::answer(sdp).map_err(SfuError::WebRtc)?;
                    c.pc.set_remote_description(Instant::now(), answer)
                        .map_err(SfuError::WebRtc)?;
                    c.answered = true;
                    let mut types = Vec::with_capacity(wanted.len());
                    for (sender, mime) in wanted {
                        let payload_type = c.pc.rtp_sender(sender).and_then(|mut sender| {
                            sender
                                .get_parameters()
                                .rtp_parameters
                                .codecs
                                .iter()
                                .find(|codec| codec.rtp_codec.mime_type.eq_ignore_ascii_case(&mime))
                                .map(|codec| codec.payload_type)
                        });
                        types.push(payload_type);
                    }
                    Ok(types)
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EgressInput::AddCandidate {
                conn,
                candidate,
                reply,
            } => {
                let result = self.with_conn(conn, |c| {
                    c.pc.add_remote_candidate(candidate)
                        .map_err(SfuError::WebRtc)
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EgressInput::Close { conn } => self.close(conn),
        }
    }

    fn with_conn<T>(
        &mut self,
        conn: ConnId,
        f: impl FnOnce(&mut Conn) -> Result<T, SfuError>,
    ) -> Result<T, SfuError> {
        match self.conns.get_mut(&conn) {
            Some(c) => f(c),
            None => Err(SfuError::ConnectionClosed),
        }
    }

    fn open(
        &mut self,
        id: ConnId,
        pc: RTCPeerConnection,
        credentials: IceCredentials,
        participant: ParticipantId,
        events: mpsc::UnboundedSender<SfuEvent>,
        bandwidth: Option<Arc<Bandwidth>>,
    ) {
        let span = tracing::info_span!("subscribe", participant = %participant);
        let IceCredentials { ufrag, pwd } = credentials;
        self.by_ufrag.insert(ufrag.clone(), id);
        self.conns.insert(
            id,
            Conn {
                pc,
                participant,
                events,
                ufrag,
                ice_pwd: pwd,
                feedback: HashMap::new(),
                addrs: Vec::new(),
                deadline: None,
                failed: false,
                connected: false,
                answered: false,
                bandwidth,
                pacer: Pacer::default(),
                span,
            },
        );
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.pump(id);
    }

    fn close(&mut self, id: ConnId) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        if let Err(err) = conn.pc.close() {
            tracing::debug!(parent: &conn.span, %err, "closing subscribe connection");
        }
        // Whatever closing produced (a DTLS close_notify) still goes out.
        while let Some(write) = conn.pc.poll_write() {
            self.queue_write(write);
        }
        self.by_ufrag.remove(&conn.ufrag);
        for addr in &conn.addrs {
            self.by_addr.remove(addr);
        }
        self.stats
            .routed_addresses
            .fetch_sub(conn.addrs.len() as u64, Ordering::Relaxed);
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(parent: &conn.span, "subscribe connection closed");
    }

    fn close_all(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }

    /// The per-packet path: the queued copies, grouped by subscriber (stable, so each keeps its
    /// order), go through their subscriber's connection (interceptors, SRTP) and out.
    /// Queues a batch a fanout handed over.
    fn take(&mut self, mut batch: MediaBatch) {
        if batch.frame_rest {
            self.queued_frame_rest += batch.copies.len();
        }
        self.queued.append(&mut batch.copies);
    }

    async fn forward_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut queued = std::mem::take(&mut self.queued);
        let copies = queued.len();
        queued.sort_by_key(|outgoing| outgoing.conn);
        let now = Instant::now();
        let mut errors = 0;
        let mut current = None;
        let mut pace = None;
        for Outgoing {
            conn,
            sender,
            packet,
            class,
        } in queued.drain(..)
        {
            if current != Some(conn) {
                self.flush().await;
                current = Some(conn);
                pace = self.conns.get(&conn).and_then(Conn::pace);
            }
            let Some(c) = self.conns.get_mut(&conn).filter(|c| c.connected) else {
                errors += 1;
                continue;
            };
            let mut out = Outbox {
                pending: &mut self.pending,
                by_addr: &self.by_addr,
                wildcard: self.wildcard,
            };
            let send_now = match (class, pace) {
                (Class::Probe, _) => {
                    if c.probe_rate().is_some() {
                        c.pacer.probe.push_back((sender, packet));
                        c.pacer.probe_next.get_or_insert(now);
                        list_pacer(&mut self.paced, c, conn);
                        continue;
                    }
                    false
                }
                (_, None) => true,
                (Class::Resend, Some(rate)) => {
                    if c.pacer.admit(now, rate, packet_bytes(&packet)) {
                        true
                    } else {
                        if c.pacer.queue_resend(rate, sender, packet) {
                            list_pacer(&mut self.paced, c, conn);
                        } else {
                            self.stats.paced_drops.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                }
                (Class::Audio, Some(rate)) => {
                    // Audio never waits, but takes its share, so video makes room for it.
                    c.pacer.refill(now, rate);
                    c.pacer.budget -= packet_bytes(&packet) as f64;
                    true
                }
                (Class::Video, Some(rate)) => {
                    if c.pacer.admit(now, rate, packet_bytes(&packet)) {
                        true
                    } else {
                        let dropped = c.pacer.queue_video(rate, sender, packet);
                        if dropped > 0 {
                            self.stats.paced_drops.fetch_add(dropped, Ordering::Relaxed);
                        }
                        list_pacer(&mut self.paced, c, conn);
                        continue;
                    }
                }
            };
            if send_now && !c.write(sender, packet, now, &mut out) {
                errors += 1;
            }
        }
        self.flush().await;
        let left = self
            .backlog
            .processed(copies, std::mem::take(&mut self.queued_frame_rest));
        self.backlog
            .measured(copies, started.elapsed(), &mut self.pace);
        self.stats.backlog.store(left as u64, Ordering::Relaxed);
        self.stats.backlog_limit.store(
            self.backlog.limit.load(Ordering::Relaxed) as u64,
            Ordering::Relaxed,
        );
        // Keep the allocation for the next round.
        self.queued = queued;
        if errors > 0 {
            self.stats.write_errors.fetch_add(errors, Ordering::Relaxed);
        }
    }

    /// Sends what pacers hold and is due: video within each budget, probe packets at their
    /// cluster's rate. Notes when the next is due.
    fn release_paced(&mut self, now: Instant) {
        self.next_paced = None;
        if self.paced.is_empty() {
            return;
        }
        let mut paced = std::mem::take(&mut self.paced);
        let mut out = Outbox {
            pending: &mut self.pending,
            by_addr: &self.by_addr,
            wildcard: self.wildcard,
        };
        let mut next: Option<Instant> = None;
        paced.retain(|id| {
            let Some(c) = self.conns.get_mut(id) else {
                return false;
            };
            match c.pace() {
                Some(rate) => {
                    c.pacer.refill(now, rate);
                    while c.pacer.budget > 0.0
                        && let Some((sender, packet)) = c.pacer.pop()
                    {
                        c.pacer.budget -= packet_bytes(&packet) as f64;
                        c.write(sender, packet, now, &mut out);
                    }
                    if c.pacer.queued_bytes > 0 {
                        let wait = (1.0 - c.pacer.budget) / rate;
                        let due = now + Duration::from_secs_f64(wait.clamp(0.0, 1.0));
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                }
                // No longer limited: whatever waits leaves now.
                None => {
                    while let Some((sender, packet)) = c.pacer.pop() {
                        c.write(sender, packet, now, &mut out);
                    }
                }
            }
            if let Some(rate) = c.probe_rate() {
                while c.pacer.probe_next.is_some_and(|at| at <= now)
                    && let Some((sender, packet)) = c.pacer.probe.pop_front()
                {
                    let bytes = packet_bytes(&packet);
                    let started = *c.pacer.probe_started.get_or_insert(now);
                    c.write(sender, packet, now, &mut out);
                    if c.pacer.probe.is_empty() {
                        if let Some(bandwidth) = &c.bandwidth {
                            bandwidth.probes.sent(started, now);
                        }
                        self.stats.probes_sent.fetch_add(1, Ordering::Relaxed);
                        c.pacer.probe_next = None;
                        c.pacer.probe_started = None;
                    } else {
                        let gap = Duration::from_secs_f64(bytes as f64 / rate);
                        c.pacer.probe_next = c.pacer.probe_next.map(|at| at + gap);
                    }
                }
                if let Some(due) = c.pacer.probe_next {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            } else {
                c.pacer.probe.clear();
                c.pacer.probe_next = None;
                c.pacer.probe_started = None;
            }
            c.pacer.listed = !c.pacer.is_idle();
            c.pacer.listed
        });
        self.paced = paced;
        self.next_paced = next;
    }

    fn queue_write(&mut self, write: TaggedBytesMut) {
        push_pending(&mut self.pending, &self.by_addr, self.wildcard, write);
    }

    /// Drains a connection's writes, events and inbound RTCP, and re-reads its timer.
    fn pump(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut writes = Vec::new();
        while let Some(write) = conn.pc.poll_write() {
            writes.push(write);
        }
        while let Some(event) = conn.pc.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) = event {
                tracing::debug!(parent: &conn.span, %state, "subscribe connection state");
                match state {
                    RTCPeerConnectionState::Connected => conn.connected = true,
                    // Disconnected may pass (ICE keeps checking): keep sending meanwhile.
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        conn.connected = false
                    }
                    _ => {}
                }
                if state == RTCPeerConnectionState::Failed && !conn.failed {
                    conn.failed = true;
                    let _ = conn.events.send(SfuEvent::TransportFailed {
                        participant: conn.participant.clone(),
                        kind: TransportKind::Subscribe,
                    });
                }
            }
        }
        while let Some(message) = conn.pc.poll_read() {
            if let RTCMessage::RtcpPacket(track_id, packets) = message.message
                && let Some(route) = conn.feedback.get(&track_id)
            {
                route_feedback(route, &packets);
            }
        }
        conn.deadline = conn.pc.poll_timeout();
        for write in writes {
            self.queue_write(write);
        }
    }

    /// Reads the datagrams waiting on the socket (at most [`MAX_READS_PER_ROUND`] batches) and
    /// hands each to its connection; true when it stopped at that bound with more waiting. The
    /// bound keeps a burst of joins (DTLS handshakes cost milliseconds each) from holding up
    /// forwarding for everyone already connected.
    fn read_socket(&mut self, buffers: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> bool {
        for _ in 0..MAX_READS_PER_ROUND {
            let mut slices: Vec<IoSliceMut<'_>> = buffers
                .iter_mut()
                .map(|b| IoSliceMut::new(b.as_mut_slice()))
                .collect();
            let received = self.socket.try_io(tokio::io::Interest::READABLE, || {
                self.state.recv((&self.socket).into(), &mut slices, meta)
            });
            let count = match received {
                Ok(count) => count,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return false,
                Err(err) => {
                    // ICMP errors for one peer surface here; the socket itself is fine.
                    tracing::trace!(%err, "media socket receive error");
                    continue;
                }
            };
            drop(slices);
            let now = Instant::now();
            let mut touched: Vec<ConnId> = Vec::new();
            for (buffer, meta) in buffers.iter().zip(meta.iter()).take(count) {
                let stride = meta.stride.max(1);
                for datagram in buffer[..meta.len].chunks(stride) {
                    if let Some(id) = self.deliver(datagram, meta, now)
                        && !touched.contains(&id)
                    {
                        touched.push(id);
                    }
                }
            }
            for id in touched {
                self.pump(id);
            }
        }
        true
    }

    fn deliver(&mut self, datagram: &[u8], meta: &RecvMeta, now: Instant) -> Option<ConnId> {
        let peer = meta.addr;
        let local_ip = meta.dst_ip.unwrap_or_else(|| self.socket_ip());
        let id = match self.by_addr.get(&peer) {
            Some((id, _)) => *id,
            None => {
                let Some(id) = stun_local_ufrag(datagram).and_then(|u| self.by_ufrag.get(u)) else {
                    self.stats
                        .unrouted_datagrams
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                let id = *id;
                let conn = self.conns.get_mut(&id)?;
                // STUN first, state after: anyone who learns a ufrag (it is in the SDP) could
                // otherwise make the engine remember any number of spoofed addresses.
                if !stun_integrity_ok(datagram, &conn.ice_pwd, self.crypto.crypto()) {
                    self.stats.unverified_stun.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                if conn.addrs.len() >= MAX_ADDRESSES_PER_CONNECTION {
                    // The oldest address is the likeliest to be dead (the client moved on).
                    let oldest = conn.addrs.remove(0);
                    self.by_addr.remove(&oldest);
                } else {
                    self.stats.routed_addresses.fetch_add(1, Ordering::Relaxed);
                }
                conn.addrs.push(peer);
                self.by_addr.insert(peer, (id, local_ip));
                id
            }
        };
        let local_addr = self.local_addr_for(local_ip);
        let conn = self.conns.get_mut(&id)?;
        if !conn.answered {
            tracing::trace!(parent: &conn.span, %peer, "datagram before the answer dropped");
            return Some(id);
        }
        let read = conn.pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr,
                peer_addr: peer,
                transport_protocol: TransportProtocol::UDP,
                ecn: None,
            },
            message: BytesMut::from(datagram),
        });
        if let Err(err) = read {
            tracing::trace!(parent: &conn.span, %err, "inbound datagram refused");
        }
        Some(id)
    }

    fn socket_ip(&self) -> IpAddr {
        self.announced
            .first()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    /// The local candidate address a datagram that reached `ip` belongs to, as the ICE agent
    /// knows it (the public address under NAT 1:1).
    fn local_addr_for(&self, ip: IpAddr) -> SocketAddr {
        self.announced
            .iter()
            .find(|a| a.ip() == ip)
            .or_else(|| self.announced.iter().find(|a| a.is_ipv4() == ip.is_ipv4()))
            .copied()
            .unwrap_or(SocketAddr::new(ip, self.port))
    }

    /// Sends every pending datagram: one GSO `sendmsg` per run of equal-sized datagrams to one
    /// destination, otherwise one `sendmsg` each.
    async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        // Stable: each destination keeps its own order.
        pending.sort_by_key(|p| p.destination);
        let max_segments = self.state.max_gso_segments().max(1);
        let (mut datagrams, mut calls, mut errors) = (0u64, 0u64, 0u64);
        let mut i = 0;
        while i < pending.len() {
            let first = &pending[i];
            let segment = first.datagram.len();
            let mut end = i + 1;
            let mut total = segment;
            if max_segments > 1 && segment > 0 {
                while end < pending.len()
                    && end - i < max_segments
                    && pending[end].destination == first.destination
                    && pending[end].src_ip == first.src_ip
                {
                    let len = pending[end].datagram.len();
                    if len == 0 || len > segment || total + len > MAX_GSO_BYTES {
                        break;
                    }
                    total += len;
                    end += 1;
                    if len < segment {
                        break; // A shorter datagram may only end a GSO run.
                    }
                }
            }
            let (contents, segment_size): (&[u8], Option<usize>) = if end - i > 1 {
                self.scratch.clear();
                for p in &pending[i..end] {
                    self.scratch.extend_from_slice(&p.datagram);
                }
                (&self.scratch, Some(segment))
            } else {
                (&first.datagram, None)
            };
            let transmit = Transmit {
                destination: first.destination,
                ecn: None,
                contents,
                segment_size,
                src_ip: first.src_ip,
            };
            calls += 1;
            datagrams += (end - i) as u64;
            if send_now(&self.socket, &self.state, &transmit)
                .await
                .is_err()
            {
                errors += (end - i) as u64;
            }
            i = end;
        }
        pending.clear();
        // Keep the allocation for the next flush.
        self.pending = pending;
        let stats = &self.stats;
        stats.datagrams_sent.fetch_add(datagrams, Ordering::Relaxed);
        stats.send_calls.fetch_add(calls, Ordering::Relaxed);
        if errors > 0 {
            stats.send_errors.fetch_add(errors, Ordering::Relaxed);
        }
    }
}

/// Puts a connection whose pacer now holds something on the engine's list (once).
fn list_pacer(paced: &mut Vec<ConnId>, conn: &mut Conn, id: ConnId) {
    if !conn.pacer.listed {
        conn.pacer.listed = true;
        paced.push(id);
    }
}

/// Queues one encrypted datagram for the next flush. On a wildcard socket it leaves from the
/// local IP its peer reached us on, so a multi-homed host answers from the right address.
fn push_pending(
    pending: &mut Vec<Pending>,
    by_addr: &HashMap<SocketAddr, (ConnId, IpAddr)>,
    wildcard: bool,
    write: TaggedBytesMut,
) {
    let destination = write.transport.peer_addr;
    let src_ip = if wildcard {
        by_addr.get(&destination).map(|(_, ip)| *ip)
    } else {
        None
    };
    pending.push(Pending {
        destination,
        src_ip,
        datagram: write.message,
    });
}

/// One `sendmsg`; waits (briefly) for room in the socket buffer rather than dropping at once.
async fn send_now(
    socket: &tokio::net::UdpSocket,
    state: &UdpSocketState,
    transmit: &Transmit<'_>,
) -> io::Result<()> {
    for _ in 0..3 {
        match socket.try_io(tokio::io::Interest::WRITABLE, || {
            state.send(socket.into(), transmit)
        }) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if tokio::time::timeout(Duration::from_millis(5), socket.writable())
                    .await
                    .is_err()
                {
                    return Err(err);
                }
            }
            other => return other,
        }
    }
    Err(io::ErrorKind::WouldBlock.into())
}

/// Passes a subscriber's keyframe requests and NACKs to the publication's fanout (advisory:
/// the engine never waits on a fanout).
fn route_feedback(route: &FeedbackRoute, packets: &[Box<dyn rtc::rtcp::Packet>]) {
    let mut seqs = Vec::new();
    let mut keyframe = false;
    for packet in packets {
        let any = packet.as_any();
        if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
            seqs.extend(nack.nacks.iter().flat_map(|pair| pair.packet_list()));
        } else if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
            keyframe = true;
        }
    }
    if !seqs.is_empty() {
        route.send(SubscriberFeedback::Nack(seqs));
    }
    if keyframe {
        route.send(SubscriberFeedback::KeyframeRequest);
    }
}

/// The local ufrag a STUN request names (`USERNAME` is `local:remote` as the receiver sees it),
/// or `None` when the datagram is not a STUN message with one.
pub fn stun_local_ufrag(datagram: &[u8]) -> Option<&str> {
    const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
    const USERNAME: u16 = 0x0006;
    if datagram.len() < 20 || datagram[0] & 0xC0 != 0 || datagram[4..8] != MAGIC_COOKIE {
        return None;
    }
    let length = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    let body = datagram.get(20..20 + length)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let value = body.get(at + 4..at + 4 + len)?;
        if kind == USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// Whether a STUN message carries a MESSAGE-INTEGRITY made with `pwd` (the short-term
/// credential of RFC 8489 9.1). Runs only for datagrams from addresses not yet routed.
pub fn stun_integrity_ok(datagram: &[u8], pwd: &str, crypto: &dyn rtc::crypto::RTCCrypto) -> bool {
    let mut message = rtc::stun::message::Message::new();
    if message.unmarshal_binary(datagram).is_err() {
        return false;
    }
    rtc::stun::integrity::MessageIntegrity::check(&mut message, pwd.as_bytes(), crypto).is_ok()
}

/// ICE ufrag and password characters (RFC 8839: ice-char is ALPHA / DIGIT / "+" / "/").
fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        // A PRIORITY attribute first, so the walk must skip one.
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        attrs.extend_from_slice(&0x0006u16.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut msg = vec![0x00, 0x01];
        msg.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        msg.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        msg.extend_from_slice(&[7; 12]);
        msg.extend_from_slice(&attrs);
        msg
    }

    fn signed_binding_request(username: &str, pwd: &str) -> Vec<u8> {
        use rtc::stun::attributes::ATTR_USERNAME;
        use rtc::stun::fingerprint::FINGERPRINT;
        use rtc::stun::integrity::MessageIntegrity;
        use rtc::stun::message::{BINDING_REQUEST, Message, TransactionId};
        use rtc::stun::textattrs::TextAttribute;
        let provider = rtc::crypto::default_provider().expect("crypto");
        let mut message = Message::new();
        message
            .build(&[
                Box::new(BINDING_REQUEST),
                Box::new(TransactionId::new()),
                Box::new(TextAttribute::new(ATTR_USERNAME, username.to_owned())),
                Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                    pwd.to_owned(),
                    provider.crypto(),
                )),
                Box::new(FINGERPRINT),
            ])
            .expect("build");
        message.raw
    }

    #[test]
    fn only_stun_signed_with_the_connection_s_password_passes() {
        let provider = rtc::crypto::default_provider().expect("crypto");
        let crypto = provider.crypto();
        let signed = signed_binding_request("server:client", "the-right-password");
        assert_eq!(stun_local_ufrag(&signed), Some("server"));
        assert!(stun_integrity_ok(&signed, "the-right-password", crypto));
        assert!(!stun_integrity_ok(&signed, "a-wrong-password", crypto));
        // Named correctly but unsigned (what a spoofer who read the SDP can send).
        assert!(!stun_integrity_ok(
            &binding_request("server:client"),
            "the-right-password",
            crypto
        ));
        assert!(!stun_integrity_ok(
            &[0x80; 40],
            "the-right-password",
            crypto
        ));
        let mut tampered = signed.clone();
        let last = tampered.len() - 13;
        tampered[last] ^= 1;
        assert!(!stun_integrity_ok(&tampered, "the-right-password", crypto));
    }

    #[test]
    fn the_local_ufrag_is_read_from_a_binding_request() {
        assert_eq!(
            stun_local_ufrag(&binding_request("serverUfrag:clientUfrag")),
            Some("serverUfrag")
        );
    }

    #[test]
    fn non_stun_and_truncated_datagrams_name_no_ufrag() {
        // An RTP packet (version 2) and a DTLS record are not STUN.
        assert_eq!(stun_local_ufrag(&[0x80; 40]), None);
        assert_eq!(stun_local_ufrag(&[22, 254, 253, 0, 0, 0, 0, 0]), None);
        let mut truncated = binding_request("a:b");
        truncated.truncate(26);
        assert_eq!(stun_local_ufrag(&truncated), None);
        let mut lying = binding_request("a:b");
        lying[3] = 200; // Claims more attributes than there are.
        assert_eq!(stun_local_ufrag(&lying), None);
    }
}
