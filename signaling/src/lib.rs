//! # Switchboard signaling
//!
//! The HTTP and WebSocket server of Switchboard: tokens, rooms, the signaling protocol of
//! docs/protocol.md, and the operational endpoints. It decides; the `sfu` crate forwards media.
//!
//! One task serves each signaling socket ([`ws`]); one task per participant owns its subscribe
//! transport and serialises offers ([`room::run_negotiator`]); rooms are plain data behind a
//! short-held mutex ([`room`]).

pub mod auth;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod limits;
pub mod listener;
pub mod lobby;
pub mod matching;
pub mod metrics;
pub mod protocol;
pub mod room;
pub mod state;
pub mod turn;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
pub use state::{AppState, LiveTasks};

/// A running server: its address and the way to stop it.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    state: AppState,
    /// Turns true when a drain has ended (rooms empty, or its deadline).
    drained: watch::Receiver<bool>,
    cluster_task: Option<tokio::task::JoinHandle<()>>,
}

/// Every few hundred milliseconds, each room works out who speaks; ends with the server.
async fn announce_speakers(state: AppState) {
    let mut tick = tokio::time::interval(room::SPEAKERS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for room in state.rooms.rooms() {
                    room.update_speakers();
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

impl Server {
    /// Binds `config.bind` and serves until [`Server::shutdown`].
    pub async fn start(config: Config) -> std::io::Result<Self> {
        let posture = config
            .posture()
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        if posture == config::Posture::Development {
            tracing::warn!(
                "development posture: no API keys, so anyone who can reach {} may mint tokens, list rooms with them and read /metrics; set api_keys before binding a public address",
                config.bind
            );
        }
        let listener = TcpListener::bind(config.bind).await?;
        let metrics_listener = match config.metrics_bind {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut state = AppState::new(config, shutdown_rx.clone());
        state.cluster = cluster::Cluster::from_config(
            &state.config,
            state.rooms.clone(),
            state.lobby.clone(),
            state.matching.clone(),
            state.sfu.clone(),
        )
        .map_err(|err| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("redis_url: {err}"),
            )
        })?;
        // The shared media socket opens now, so a taken UDP port stops the start with a clear
        // error rather than failing every later join.
        state.sfu.start_engines().map_err(std::io::Error::other)?;
        let limits = state.connections.limits();
        tracing::info!(
            max_connections = limits.max_connections,
            per_address = limits.max_per_address,
            header_read_timeout = ?limits.header_read_timeout,
            "connection limits"
        );
        let app = http::router(state.clone());
        tokio::spawn(announce_speakers(state.clone()));
        let (drained_tx, drained) = watch::channel(false);
        let cluster_task = state.cluster.clone().map(|cluster| {
            tracing::info!(node = cluster.node_id(), "in a cluster");
            tokio::spawn(cluster::run(cluster, shutdown_rx.clone(), drained_tx))
        });
        if let Some(metrics_listener) = metrics_listener {
            tracing::info!(addr = %metrics_listener.local_addr()?, "metrics listening");
            let connections = Arc::new(listener::Connections::new(listener::ConnectionLimits {
                max_connections: 64,
                max_per_address: 16,
                header_read_timeout: Duration::from_secs(10),
            }));
            tokio::spawn(listener::serve(
                metrics_listener,
                http::metrics_router(state.clone()),
                connections,
                shutdown_rx.clone(),
            ));
        }
        let task = tokio::spawn(listener::serve(
            listener,
            app,
            state.connections.clone(),
            shutdown_rx,
        ));
        Ok(Self {
            addr,
            shutdown,
            task,
            state,
            drained,
            cluster_task,
        })
    }

    /// Starts draining this node of its cluster (no new rooms, participants asked to move);
    /// false when it is in no cluster.
    pub async fn drain(&self) -> bool {
        match &self.state.cluster {
            Some(cluster) => {
                cluster.drain().await;
                true
            }
            None => false,
        }
    }

    /// Completes when a drain has ended: every participant moved, or the drain deadline passed.
    /// Never outside a cluster.
    pub async fn drained(&self) {
        let mut drained = self.drained.clone();
        if self.state.cluster.is_none() || drained.wait_for(|done| *done).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The shared state (rooms, media plane), for tests and metrics.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Tells every participant, closes every socket and waits (at most 5 s) for rooms to empty.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.state.rooms.rooms().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(cluster_task) = self.cluster_task {
            // It leaves the cluster (registration and claims deleted) before the process ends.
            let _ = tokio::time::timeout_at(deadline, cluster_task).await;
        }
        match tokio::time::timeout_at(deadline, self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(std::io::Error::other(join)),
            Err(_) => Ok(()),
        }
    }
}
