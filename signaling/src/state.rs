//! What every handler and socket task shares: the rooms, the media plane, the token authority,
//! the configuration and the shutdown signal. Both the HTTP layer and the socket tasks use it;
//! it uses neither.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::TokenAuthority;
use crate::cluster::Cluster;
use crate::config::{Config, Posture};
use crate::limits::SignalingLimits;
use crate::listener::{ConnectionLimits, Connections};
use crate::lobby::Lobby;
use crate::matching::MatchQueue;
use crate::metrics::Refusals;
use crate::room::{RoomPolicy, RoomRegistry, SWITCH_TIMEOUT};

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Every room.
    pub rooms: Arc<RoomRegistry>,
    /// Who is online, and their calls.
    pub lobby: Arc<Lobby>,
    /// Who waits for a partner, and the matches made.
    pub matching: Arc<MatchQueue>,
    /// The media plane.
    pub sfu: sfu::Sfu,
    /// Mints and checks tokens.
    pub auth: TokenAuthority,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// How open the server is.
    pub posture: Posture,
    /// Turns true when the server is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Signaling tasks alive now.
    pub tasks: Arc<LiveTasks>,
    /// Open HTTP connections and signaling sockets, within their limits.
    pub connections: Arc<Connections>,
    /// Sockets per token and joins per address and per room.
    pub limits: Arc<SignalingLimits>,
    /// Refusals sent, by code, for `/metrics`.
    pub refusals: Arc<Refusals>,
    /// The cluster this node belongs to, if any (`redis_url`).
    pub cluster: Option<Cluster>,
}

/// Signaling tasks alive now, by kind: what a leak would show first.
#[derive(Debug, Default)]
pub struct LiveTasks {
    /// One per signaling socket.
    pub sessions: std::sync::atomic::AtomicU64,
    /// One per joined participant.
    pub negotiators: std::sync::atomic::AtomicU64,
}

impl AppState {
    /// State for `config`, with a media plane built from it.
    pub fn new(config: Config, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            rooms: Arc::new(RoomRegistry::new(RoomPolicy {
                max_participants: config.max_participants,
                max_rooms: config.max_rooms,
                mesh_max: config.mesh_max,
                mesh_hold: Duration::from_secs(config.mesh_hold_secs),
                switch_timeout: SWITCH_TIMEOUT,
            })),
            lobby: Lobby::new(
                config.max_lobby_members,
                Duration::from_secs(config.call_timeout_secs.max(1)),
            ),
            matching: MatchQueue::new(
                config.max_waiting,
                Duration::from_secs(config.match_timeout_secs.max(1)),
            ),
            sfu: sfu::Sfu::new(config.sfu_config()),
            auth: TokenAuthority::new(&config.api_keys, config.token_ttl_secs),
            limits: Arc::new(SignalingLimits::new(&config)),
            connections: Arc::new(Connections::new(ConnectionLimits {
                max_connections: connection_cap(config.max_connections),
                max_per_address: config.max_connections_per_address.max(1),
                header_read_timeout: Duration::from_secs(config.header_read_timeout_secs.max(1)),
            })),
            // `Server::start` refuses a configuration without a posture; anything else that
            // builds state from one gets the closed one.
            posture: config.posture().unwrap_or(Posture::Production),
            config: Arc::new(config),
            shutdown,
            tasks: Arc::default(),
            refusals: Arc::default(),
            cluster: None,
        }
    }
}

/// `wanted`, held to half the open-file limit: past that, accepting more connections would
/// starve media sockets (and the accept loop) of descriptors.
fn connection_cap(wanted: usize) -> usize {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) => wanted
            .min(usize::try_from(soft / 2).unwrap_or(usize::MAX))
            .max(1),
        Err(_) => wanted,
    }
}
