//! # Switchboard media plane
//!
//! Receives each publisher's RTP once and forwards it to every subscriber, without decoding.
//! It knows nothing of HTTP, JSON, rooms or tokens: the signaling service drives it through
//! [`Sfu`], [`PublishTransport`] and [`SubscribeTransport`] and hears back through [`SfuEvent`]s.
//!
//! ## Tasks and ownership
//! - Every transport, publish and subscribe, is a sans-I/O `rtc` peer connection owned by the
//!   engine: one task and one UDP socket ([`SfuConfig::udp_port`], with 4 MiB buffers, see
//!   [`SfuConfig::socket_buffer_bytes`]) for all of them. It hands each packet a publisher sends
//!   to the publication's fanout through a bounded queue.
//! - Each [`Publication`] has one fanout task. It alone owns the publication's forwarders (one
//!   per subscription) and counters; subscribe transports change them only through commands
//!   applied between packets, so no lock is taken per packet.
//! - A fanout hands the engine each published packet's copies in one bounded-queue message
//!   (`try_send`: when the engine is behind, the packet is dropped for those subscribers, who
//!   restart at a keyframe); the engine encrypts them and sends them with UDP GSO batches.
//!
//! ## Panics
//! Nothing a peer sends can make this crate panic: malformed SDP, RTP and RTCP are errors or
//! drops.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod admission;
pub mod allocation;
mod config;
mod connection;
mod engine;
pub mod estimator;
mod exchange;
mod fanout;
mod feedback;
pub mod forwarder;
mod ids;
pub mod keyframe;
pub mod layers;
pub mod relay;
mod sender_reports;
mod transport;
mod transport_cc;
pub mod vp8;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use tokio::sync::mpsc;

pub use config::SfuConfig;

/// What the fuzz targets in `fuzz/` drive directly: parsers of what strangers send (STUN on the
/// shared port, SDP). Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::engine::{stun_integrity_ok, stun_local_ufrag};
    pub use crate::transport::{
        extmap, sections_not_sending, simulcast_rids, with_video_bandwidth,
    };
}
pub use connection::TransportKind;
pub use engine::EngineStats;
pub use fanout::{LayerStats, PublicationStats};
pub use feedback::{FeedbackInterceptor, KeyframeThrottle};
pub use ids::{MediaKind, ParticipantId, PublicationId, Source};
pub use rtc::peer_connection::transport::RTCIceCandidateInit;
pub use transport::{
    AUDIO_LEVEL_URI, Allocation, AllocationChange, DeclaredTrack, MAX_PUBLISH_SECTIONS,
    OfferedSubscription, PublishTransport, SubscribeTransport,
};

/// Errors of the media plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SfuError {
    /// The SDP could not be parsed or applied.
    #[error("invalid SDP: {0}")]
    InvalidSdp(#[source] rtc::shared::error::Error),
    /// A publish offer with more media sections than [`MAX_PUBLISH_SECTIONS`].
    #[error("at most {max} media sections per publish connection, not {got}", max = MAX_PUBLISH_SECTIONS)]
    TooManySections {
        /// How many the offer has.
        got: usize,
    },
    /// The engine could not open its UDP socket.
    #[error("cannot open the media socket on port {port}: {source}")]
    MediaSocket {
        /// The configured port (0: any).
        port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine has stopped (the server is shutting down).
    #[error("the media engine has stopped")]
    EngineStopped,
    /// A connection that the engine no longer has.
    #[error("the connection is closed")]
    ConnectionClosed,
    /// A local candidate for the shared media socket could not be made.
    #[error("local candidate: {0}")]
    LocalCandidate(String),
    /// The publication ended while it was being subscribed to.
    #[error("the publication has ended")]
    PublicationEnded,
    /// An offer for a connection that does not publish (a bug in the caller).
    #[error("not a publish connection")]
    NotPublishing,
    /// The connection produced no local description.
    #[error("no local description")]
    NoLocalDescription,
    /// webrtc-rs refused an operation.
    #[error("webrtc: {0}")]
    WebRtc(#[from] rtc::shared::error::Error),
}

/// What the media plane tells its owner.
#[derive(Debug)]
pub enum SfuEvent {
    /// A publisher's track started to arrive.
    PublicationStarted(Publication),
    /// A publisher's track ended (removed by renegotiation, or its connection closed).
    PublicationEnded {
        /// Who published it.
        participant: ParticipantId,
        /// Which publication.
        publication: PublicationId,
    },
    /// Which simulcast layers of a publication some subscriber needs (dynacast): the publisher
    /// should send these rids and pause the others.
    LayersWanted {
        /// Who publishes it.
        participant: ParticipantId,
        /// Which publication.
        publication: PublicationId,
        /// The track id the publisher declared for it.
        track_id: String,
        /// The rids to send, lowest first.
        active: Vec<String>,
    },
    /// A participant sent a message through its relay data channel, for another participant
    /// (see [`relay`]): the caller decides whether the recipient may have it, and hands it to
    /// the recipient's [`relay::DataRelay`].
    Relayed(relay::RelayedData),
    /// A connection failed (ICE or DTLS): the participant is gone.
    TransportFailed {
        /// Whose connection.
        participant: ParticipantId,
        /// Which of the two.
        kind: TransportKind,
    },
}

/// A handle to one publication: what it is, and the way to its fanout. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Publication {
    /// Its id.
    pub id: PublicationId,
    /// Who publishes it.
    pub participant: ParticipantId,
    /// Audio or video.
    pub kind: MediaKind,
    /// Microphone, camera or screen.
    pub source: Source,
    /// The publisher's name for the track (the `trackId` it declared for this media section;
    /// without one, the track id of its msid), which its `mute` messages carry.
    pub track_id: String,
    /// The codec the publisher sends.
    pub codec: RTCRtpCodec,
    /// The publisher's negotiated header extensions, `(uri, id)`.
    pub publisher_extensions: Arc<Vec<(String, u16)>>,
    pub(crate) commands: mpsc::Sender<fanout::FanoutCommand>,
    /// Its counters.
    pub stats: Arc<PublicationStats>,
}

impl std::fmt::Debug for fanout::FanoutCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FanoutCommand")
    }
}

/// Tasks of the media plane alive now, by kind: what a leak would show first.
#[derive(Debug, Default)]
pub struct LiveTasks {
    /// One per publication.
    pub fanouts: AtomicU64,
}

/// Counts one live task of a kind for as long as it is held.
pub struct TaskGuard<'a>(&'a AtomicU64);

impl<'a> TaskGuard<'a> {
    /// Counts one more task on `counter` until dropped.
    pub fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for TaskGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Totals over every publication since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SfuStats {
    /// Publications currently live.
    pub publications: u64,
    /// RTP packets received from publishers.
    pub received_packets: u64,
    /// RTP packets handed to subscriptions.
    pub forwarded_packets: u64,
    /// Bytes handed to subscriptions.
    pub forwarded_bytes: u64,
    /// Packets dropped for slow subscribers.
    pub dropped_packets: u64,
    /// Keyframe requests sent to publishers.
    pub keyframe_requests: u64,
    /// NACK packets received from subscribers.
    pub nacks: u64,
    /// Packets sent again from a publication's cache in answer to NACKs.
    pub retransmitted_packets: u64,
    /// NACKed packets that were no longer cached.
    pub nack_misses: u64,
    /// NACKed packets first sent too long ago to be sent again.
    pub nack_too_old: u64,
    /// Times a subscription moved to another simulcast layer.
    pub layer_switches: u64,
}

impl SfuStats {
    fn add(&mut self, stats: &PublicationStats) {
        self.received_packets += stats.received_packets.load(Ordering::Relaxed);
        self.forwarded_packets += stats.forwarded_packets.load(Ordering::Relaxed);
        self.forwarded_bytes += stats.forwarded_bytes.load(Ordering::Relaxed);
        self.dropped_packets += stats.dropped_packets.load(Ordering::Relaxed);
        self.keyframe_requests += stats.keyframe_requests.load(Ordering::Relaxed);
        self.retransmitted_packets += stats.retransmitted_packets.load(Ordering::Relaxed);
        self.nack_misses += stats.nack_misses.load(Ordering::Relaxed);
        self.nack_too_old += stats.nack_too_old.load(Ordering::Relaxed);
        self.layer_switches += stats.layer_switches.load(Ordering::Relaxed);
    }
}

pub(crate) struct Shared {
    pub(crate) config: SfuConfig,
    pub(crate) nacks: Arc<AtomicU64>,
    pub(crate) tasks: LiveTasks,
    live: Mutex<HashMap<PublicationId, Arc<PublicationStats>>>,
    retired: Mutex<SfuStats>,
    /// One engine per media thread, started by the first transport (they need the Tokio
    /// runtime).
    engines: Mutex<Vec<engine::Engine>>,
}

impl Shared {
    /// The engines, started on first use.
    fn engines(&self) -> Result<Vec<engine::Engine>, SfuError> {
        // A panic while holding this lock is a bug; the slot itself is still sound.
        let mut engines = self
            .engines
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if engines.is_empty() {
            let threads = self.config.media_threads.max(1);
            let mut started = Vec::with_capacity(threads);
            for index in 0..threads {
                let port = match self.config.udp_port {
                    0 => Some(0),
                    first => u16::try_from(index)
                        .ok()
                        .and_then(|index| first.checked_add(index)),
                };
                let port = port.ok_or(SfuError::MediaSocket {
                    port: self.config.udp_port,
                    source: std::io::Error::other("udp_port + media_threads passes 65535"),
                })?;
                let engine = engine::Engine::start(&self.config, port, index, self.nacks.clone())
                    .map_err(|source| SfuError::MediaSocket { port, source })?;
                started.push(engine);
            }
            *engines = started;
        }
        Ok(engines.clone())
    }

    /// The engine a new connection goes to: the one with the fewest connections.
    pub(crate) fn engine(&self) -> Result<engine::Engine, SfuError> {
        self.engines()?
            .into_iter()
            .min_by_key(|engine| engine.stats.connections.load(Ordering::Relaxed))
            .ok_or(SfuError::EngineStopped)
    }

    fn started_engines(&self) -> Vec<engine::Engine> {
        self.engines
            .lock()
            .map(|engines| engines.clone())
            .unwrap_or_default()
    }

    pub(crate) fn register_publication(&self, id: &PublicationId, stats: Arc<PublicationStats>) {
        if let Ok(mut live) = self.live.lock() {
            live.insert(id.clone(), stats);
        }
    }

    pub(crate) fn retire_publication(&self, id: &PublicationId, stats: &PublicationStats) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(id);
        }
        if let Ok(mut retired) = self.retired.lock() {
            retired.add(stats);
        }
    }
}

/// The media plane. Cheap to clone; every clone drives the same server.
#[derive(Clone)]
pub struct Sfu {
    shared: Arc<Shared>,
}

impl Sfu {
    /// A media plane with `config`. Its one socket is opened by the first transport (or
    /// [`Sfu::start_engines`]), not here.
    pub fn new(config: SfuConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                nacks: Arc::new(AtomicU64::new(0)),
                tasks: LiveTasks::default(),
                live: Mutex::new(HashMap::new()),
                retired: Mutex::new(SfuStats::default()),
                engines: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &SfuConfig {
        &self.shared.config
    }

    /// Opens a publish transport for `participant`; its events go to `events`.
    pub async fn publish_transport(
        &self,
        participant: ParticipantId,
        events: mpsc::UnboundedSender<SfuEvent>,
    ) -> Result<PublishTransport, SfuError> {
        PublishTransport::new(self.shared.clone(), participant, events).await
    }

    /// Opens a subscribe transport for `participant`; its events go to `events`.
    pub async fn subscribe_transport(
        &self,
        participant: ParticipantId,
        events: mpsc::UnboundedSender<SfuEvent>,
    ) -> Result<SubscribeTransport, SfuError> {
        SubscribeTransport::new(self.shared.clone(), participant, events).await
    }

    /// Media-plane tasks and connections alive now: `(fanout tasks, peer connections)`.
    pub fn live_tasks(&self) -> (u64, u64) {
        let connections = self
            .engine_stats()
            .map_or(0, |stats| stats.connections.load(Ordering::Relaxed));
        (
            self.shared.tasks.fanouts.load(Ordering::Relaxed),
            connections,
        )
    }

    /// Opens the media sockets and starts the engines now, rather than at the first
    /// transport; returns the sockets' addresses, one per media thread. Needs a Tokio runtime.
    pub fn start_engines(&self) -> Result<Vec<std::net::SocketAddr>, SfuError> {
        Ok(self
            .shared
            .engines()?
            .iter()
            .map(|engine| engine.local_addr)
            .collect())
    }

    /// The engines' counters, summed over media threads, once they have started.
    pub fn engine_stats(&self) -> Option<EngineStats> {
        let engines = self.shared.started_engines();
        if engines.is_empty() {
            return None;
        }
        let total = EngineStats::default();
        for engine in &engines {
            total.add(&engine.stats);
        }
        Some(total)
    }

    /// Connections open on each media thread now (empty before the engines start).
    pub fn connections_per_thread(&self) -> Vec<u64> {
        self.shared
            .started_engines()
            .iter()
            .map(|engine| engine.stats.connections.load(Ordering::Relaxed))
            .collect()
    }

    /// The media sockets' addresses, one per media thread, once the engines have started.
    pub fn media_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.shared
            .started_engines()
            .iter()
            .map(|engine| engine.local_addr)
            .collect()
    }

    /// Totals since start.
    pub fn stats(&self) -> SfuStats {
        let mut total = self.shared.retired.lock().map(|r| *r).unwrap_or_default();
        if let Ok(live) = self.shared.live.lock() {
            total.publications = live.len() as u64;
            for stats in live.values() {
                total.add(stats);
            }
        }
        total.nacks = self.shared.nacks.load(Ordering::Relaxed);
        total
    }
}
