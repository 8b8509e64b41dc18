//! An engine: every peer connection of one media thread, publish and subscribe, driven sans-I/O
//! (the `rtc` core, no webrtc-rs driver task) by one task over one shared UDP socket. There is
//! one engine per media thread ([`crate::SfuConfig::media_threads`]).
//!
//! Why: forwarding through a webrtc-rs driver costs a task hop, a channel, a lock and a full
//! driver-loop turn per packet per subscriber, then one `sendmsg` per datagram. Here a fanout
//! hands the engine one message per published packet (all its subscriptions' rewritten copies);
//! the engine encrypts each copy in its subscriber's connection and sends what has accumulated
//! when its input runs dry, with one UDP GSO `sendmsg` per subscriber where the kernel offers it.
//! A publisher's packets come in on the same socket: the engine decrypts them in the publish
//! connection and hands each to its publication's fanout.
//!
//! One socket serves every connection of the thread, so an operator opens one UDP port per media
//! thread. Inbound datagrams are
//! routed by source address; the first one from an address must be a STUN request whose
//! USERNAME names the connection's ICE ufrag (RFC 8445 7.2.2), which the engine chose itself,
//! signed with the connection's ICE password.
//!
//! Here: the handle others hold ([`Engine`], [`EngineSender`]), its commands and counters. The
//! loop is in `run.rs`, the socket and the routing of datagrams in `socket.rs`, pacing in
//! `pacer.rs`, a publish connection's tracks in `publish.rs`, and how a connection is built in
//! `build.rs`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use quinn_udp::UdpSocketState;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::rtp_transceiver::RTCRtpSenderId;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::admission::{Backlog, MediaSender};
use crate::estimator::ProbeLog;
use crate::exchange::{ConnId, FeedbackRoute, PublishSink, Upstream};
use crate::feedback::TransportFeedback;
use crate::ids::ParticipantId;
use crate::{SfuConfig, SfuError, SfuEvent};

mod build;
mod pacer;
mod publish;
mod run;
mod socket;

use run::EngineLoop;
use socket::announced_addresses;
pub use socket::{stun_integrity_ok, stun_local_ufrag};

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
/// Receive calls (each up to `quinn_udp::BATCH_SIZE` datagrams) in one round, at most...
const MAX_READS_PER_ROUND: usize = 64;
/// ... and for at most this long. Publishers' packets share the socket with every subscriber's
/// feedback: reading only a few batches a round let a busy engine's inbound queue grow to
/// seconds (the publishers' packets waiting behind the feedback in the socket buffer), while a
/// time bound still keeps a storm of DTLS handshakes from holding up forwarding.
const READ_BUDGET: Duration = Duration::from_millis(4);
/// Largest datagram accepted on the shared socket (one MTU with room to spare).
const DATAGRAM_BUFFER: usize = 2048;
/// Every connection's timers are re-read at least this often, so a timer armed by a write (a
/// sender report's first schedule) is never missed for long.
const HOUSEKEEPING: Duration = Duration::from_millis(20);
/// UDP GSO payload limit per `sendmsg`.
const MAX_GSO_BYTES: usize = 65_000;
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
    /// Transport-wide feedback the subscriber sent, waiting for the engine's estimator: the
    /// feedback interceptor puts it here, the engine takes it when it next pumps the
    /// connection (a few times a second per subscriber, never per packet).
    pub(crate) transport_feedback: TransportFeedback,
}

type Reply<T> = oneshot::Sender<Result<T, SfuError>>;

/// A connection's local ICE credentials: the ufrag routes a new address's STUN to
/// it, the password proves the STUN came from its peer.
pub(crate) struct IceCredentials {
    pub(crate) ufrag: String,
    pub(crate) pwd: String,
}

/// Remote addresses one connection is reached from at most (a client's host,
/// server-reflexive and relayed candidates, over IPv4 and IPv6); a new one replaces the oldest.
const MAX_ADDRESSES_PER_CONNECTION: usize = 8;

/// A subscribe offer's SDP and each sender's `mid`.
pub(crate) type OfferReply = (String, Vec<(String, RTCRtpSenderId)>);

/// Commands to the engine (forwarded packets travel on their own queue).
pub(crate) enum EngineInput {
    /// A connection built by the caller (certificate and all), so the engine does no such work.
    Open {
        conn: ConnId,
        pc: Box<RTCPeerConnection>,
        credentials: IceCredentials,
        participant: ParticipantId,
        events: mpsc::UnboundedSender<SfuEvent>,
        /// Present when the connection estimates its bandwidth: its video is then paced.
        bandwidth: Option<Arc<Bandwidth>>,
        /// Present for a publish connection: who starts a publication when a track opens.
        publisher: Option<Arc<dyn PublishSink>>,
        reply: Reply<()>,
    },
    /// Applies a publisher's (re-)offer; replies with the answer, local candidates in it.
    AnswerOffer {
        conn: ConnId,
        sdp: String,
        reply: Reply<String>,
    },
    /// Asks a publisher for a keyframe of the stream `media_ssrc` (a PLI). No reply: a fanout
    /// never waits on the engine.
    RequestKeyframe {
        upstream: Upstream,
        media_ssrc: u32,
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
    /// Relayed data or a notice for a publish connection's relay channel.
    Relay {
        conn: ConnId,
        delivery: crate::relay::Delivery,
    },
}

/// Counters of the engine, read by metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
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
    /// Peer connections (publish and subscribe) open now.
    pub connections: AtomicU64,
    /// Packets from publishers dropped because their publication's fanout had not taken the
    /// ones before (its queue was full).
    pub ingress_drops: AtomicU64,
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
    /// Messages relayed between participants' relay channels (files in SFU rooms), delivered.
    pub relay_messages: AtomicU64,
    /// Their bytes (payload and envelope).
    pub relay_bytes: AtomicU64,
    /// Relay messages dropped: malformed, past the sender's in-flight budget, or past the
    /// recipient's buffer.
    pub relay_drops: AtomicU64,
    /// Data channels a client opened that the server does not serve, closed.
    pub refused_channels: AtomicU64,
}

impl EngineStats {
    /// Adds `other`'s counts to these (the engines' totals).
    pub(crate) fn add(&self, other: &EngineStats) {
        let pairs = [
            (&self.datagrams_sent, &other.datagrams_sent),
            (&self.send_calls, &other.send_calls),
            (&self.send_errors, &other.send_errors),
            (&self.unrouted_datagrams, &other.unrouted_datagrams),
            (&self.unverified_stun, &other.unverified_stun),
            (&self.routed_addresses, &other.routed_addresses),
            (&self.write_errors, &other.write_errors),
            (&self.connections, &other.connections),
            (&self.ingress_drops, &other.ingress_drops),
            (&self.backlog, &other.backlog),
            (&self.backlog_limit, &other.backlog_limit),
            (&self.paced_drops, &other.paced_drops),
            (&self.probes_sent, &other.probes_sent),
            (&self.relay_messages, &other.relay_messages),
            (&self.relay_bytes, &other.relay_bytes),
            (&self.relay_drops, &other.relay_drops),
            (&self.refused_channels, &other.refused_channels),
        ];
        for (total, part) in pairs {
            total.fetch_add(part.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

/// The way into the engine: forwarded media (through admission) and commands.
#[derive(Clone)]
pub(crate) struct EngineSender {
    pub(crate) media: MediaSender,
    control: mpsc::Sender<EngineInput>,
}

impl EngineSender {
    fn new(media: MediaSender, control: mpsc::Sender<EngineInput>) -> Self {
        Self { media, control }
    }

    pub(crate) async fn send(&self, input: EngineInput) -> Result<(), SfuError> {
        self.control
            .send(input)
            .await
            .map_err(|_| SfuError::EngineStopped)
    }

    pub(crate) fn try_send(&self, input: EngineInput) -> bool {
        self.control.try_send(input).is_ok()
    }

    /// Sends without waiting: at once when the command queue has room, else from a task. For
    /// commands whose number something else bounds.
    pub(crate) fn send_soon(&self, input: EngineInput) {
        if let Err(mpsc::error::TrySendError::Full(input)) = self.control.try_send(input)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let control = self.control.clone();
            runtime.spawn(async move {
                let _ = control.send(input).await;
            });
        }
    }
}

/// A handle to the running engine. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Engine {
    pub(crate) input: EngineSender,
    pub(crate) stats: Arc<EngineStats>,
    next_conn: Arc<AtomicU64>,
    pub(crate) local_addr: SocketAddr,
    announced: Arc<Vec<SocketAddr>>,
    config: Arc<SfuConfig>,
    nacks: Arc<AtomicU64>,
}

impl Engine {
    /// Binds media thread `index`'s socket on `port` and starts its engine task. Needs a Tokio
    /// runtime.
    pub(crate) fn start(
        config: &SfuConfig,
        port: u16,
        index: usize,
        nacks: Arc<AtomicU64>,
    ) -> io::Result<Self> {
        let ip = config
            .media_ip
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let std_socket = std::net::UdpSocket::bind(SocketAddr::new(ip, port))?;
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
        let local_addr = std_socket.local_addr()?;
        let announced = announced_addresses(config, local_addr);
        let announced_for_builder = announced.clone();
        tracing::info!(media_thread = index, %local_addr, ?announced, gso = state.max_gso_segments(), "media socket open");
        let (media, media_queue) = mpsc::channel(MEDIA_QUEUE);
        let (control, inputs) = mpsc::channel(CONTROL_QUEUE);
        let backlog = Arc::new(Backlog::default());
        let stats = Arc::new(EngineStats::default());
        let crypto = rtc::crypto::default_provider().map_err(io::Error::other)?;
        let socket = tokio::net::UdpSocket::from_std(std_socket)?;
        let engine = EngineLoop::new(
            socket,
            state,
            ip.is_unspecified(),
            local_addr.port(),
            announced,
            (inputs, media_queue),
            backlog.clone(),
            stats.clone(),
            crypto,
        );
        // A task on the shared runtime, not a thread of its own: measured, an engine thread
        // cost 1.1 µs more per forwarded packet (9.8-9.9 against 8.6-8.8 µs at 300
        // subscribers), in wake-ups across threads. The runtime has a worker per core, so the
        // engines still forward on separate cores.
        tokio::spawn(
            engine
                .run()
                .instrument(tracing::info_span!("engine", media_thread = index)),
        );
        Ok(Self {
            input: EngineSender::new(MediaSender::new(media, backlog), control),
            stats,
            next_conn: Arc::new(AtomicU64::new(1)),
            local_addr,
            announced: Arc::new(announced_for_builder),
            config: Arc::new(config.clone()),
            nacks,
        })
    }

    /// Closes `conn` without waiting, as a dropped handle must: at once when the command queue
    /// has room, else from a task.
    pub(crate) fn close_soon(&self, conn: ConnId) {
        let input = self.input.clone();
        if !input.try_send(EngineInput::Close { conn })
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = input.send(EngineInput::Close { conn }).await;
            });
        }
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends a command and waits for its reply.
    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> EngineInput,
    ) -> Result<T, SfuError> {
        let (reply, answer) = oneshot::channel();
        self.input.send(make(reply)).await?;
        answer.await.map_err(|_| SfuError::EngineStopped)?
    }
}
