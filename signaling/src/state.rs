//! What every handler and socket task shares: the rooms, the media plane, the token authority,
//! the configuration and the shutdown signal. Both the HTTP layer and the socket tasks use it;
//! it uses neither.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::TokenAuthority;
use crate::config::Config;
use crate::room::{RoomPolicy, RoomRegistry, SWITCH_TIMEOUT};

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Every room.
    pub rooms: Arc<RoomRegistry>,
    /// The media plane.
    pub sfu: sfu::Sfu,
    /// Mints and checks tokens.
    pub auth: TokenAuthority,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Turns true when the server is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Signaling tasks alive now.
    pub tasks: Arc<LiveTasks>,
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
                mesh_max: config.mesh_max,
                mesh_hold: Duration::from_secs(config.mesh_hold_secs),
                switch_timeout: SWITCH_TIMEOUT,
            })),
            sfu: sfu::Sfu::new(config.sfu_config()),
            auth: TokenAuthority::new(config.jwt_secret.as_deref(), config.token_ttl_secs),
            config: Arc::new(config),
            shutdown,
            tasks: Arc::default(),
        }
    }
}
