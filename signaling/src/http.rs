//! The HTTP surface: tokens, the signaling socket, health, room listing, metrics, web client.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rust_embed::RustEmbed;
use serde::Deserialize;
use tokio::sync::watch;
use tower_http::cors::{Any, CorsLayer};

use crate::auth::TokenAuthority;
use crate::config::Config;
use crate::protocol::{ErrorCode, MAX_MESSAGE_BYTES};
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

#[derive(RustEmbed)]
#[folder = "../web-client/"]
#[include = "index.html"]
#[include = "*.css"]
#[include = "src/**"]
#[include = "app/**"]
struct WebClient;

/// The router with every endpoint.
pub fn router(state: AppState) -> Router {
    // Any page may import the SDK (/src/*) and, while minting is open (no API key), ask for a
    // token: docs/sdk.md. Nothing else is readable cross-origin (/api/rooms and /metrics list
    // rooms and names), and no credentials or Authorization header ever are: an API key
    // belongs on a backend, never in a page.
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE]);
    let mint = if state.config.api_key.is_none() {
        post(mint_token).layer(cors.clone())
    } else {
        post(mint_token)
    };
    Router::new()
        .route("/auth/token", mint)
        .route("/src/{*path}", get(web_client).layer(cors))
        .route("/ws/signal", get(signal))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/rooms", get(list_rooms))
        .route("/metrics", get(metrics))
        .fallback(get(web_client))
        .with_state(state)
}

fn error_response(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    (status, axum::Json(body)).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequest {
    user_id: String,
    room: String,
}

fn valid_label(value: &str) -> bool {
    !value.trim().is_empty() && value.chars().count() <= 64
}

async fn mint_token(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(key) = &state.config.api_key {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(key.as_str()) {
            return error_response(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "this server requires `Authorization: Bearer <api key>` to mint tokens",
            );
        }
    }
    let request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("expected {{\"userId\": string, \"room\": string}}: {err}"),
            );
        }
    };
    if !valid_label(&request.user_id) || !valid_label(&request.room) {
        return error_response(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "userId and room are 1 to 64 characters, not only spaces",
        );
    }
    match state.auth.mint(request.user_id.trim(), request.room.trim()) {
        Ok(token) => axum::Json(serde_json::json!({ "token": token })).into_response(),
        Err(err) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            err.to_string(),
        ),
    }
}

async fn signal(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(token) = query.get("token") else {
        return error_response(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing ?token=",
        );
    };
    let claims = match state.auth.verify(token) {
        Ok(claims) => claims,
        Err(err) => {
            return error_response(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                err.to_string(),
            );
        }
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    // Frames up to 1 MiB are read so that anything over the protocol's 64 KiB gets a
    // `too_large` reply instead of a dropped connection.
    upgrade
        .max_message_size(16 * MAX_MESSAGE_BYTES)
        .max_frame_size(16 * MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| crate::ws::serve(socket, state, claims))
}

async fn list_rooms(State(state): State<AppState>) -> Response {
    let rooms: Vec<_> = state.rooms.rooms().iter().map(|r| r.snapshot()).collect();
    axum::Json(serde_json::json!({ "rooms": rooms })).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut registry = Registry::with_prefix("switchboard");
    let rooms = state.rooms.rooms();
    let snapshots: Vec<_> = rooms.iter().map(|r| r.snapshot()).collect();
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let metric: Gauge = Gauge::default();
        metric.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, metric);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let metric: Counter = Counter::default();
        metric.inc_by(value);
        registry.register(name, help, metric);
    };
    gauge(
        &mut registry,
        "rooms",
        "Rooms open now",
        snapshots.len() as u64,
    );
    gauge(
        &mut registry,
        "participants",
        "Participants in all rooms now",
        snapshots.iter().map(|r| r.participants.len() as u64).sum(),
    );
    let by_mode: Family<Vec<(String, String)>, Gauge> = Family::default();
    let room_participants: Family<Vec<(String, String)>, Gauge> = Family::default();
    let room_switches: Family<Vec<(String, String)>, Counter> = Family::default();
    for mode in ["mesh", "sfu"] {
        by_mode
            .get_or_create(&vec![("mode".into(), mode.into())])
            .set(0);
    }
    for room in &snapshots {
        by_mode
            .get_or_create(&vec![("mode".into(), room.mode.into())])
            .inc();
        let count = i64::try_from(room.participants.len()).unwrap_or(i64::MAX);
        room_participants
            .get_or_create(&vec![
                ("room".into(), room.name.clone()),
                ("mode".into(), room.mode.into()),
            ])
            .set(count);
        for (to, value) in [
            ("sfu", room.switches_to_sfu),
            ("mesh", room.switches_to_mesh),
        ] {
            room_switches
                .get_or_create(&vec![
                    ("room".into(), room.name.clone()),
                    ("to".into(), to.into()),
                ])
                .inc_by(value);
        }
    }
    registry.register("rooms_by_mode", "Rooms open now, by mode", by_mode);
    registry.register(
        "room_participants",
        "Participants in each room now, labelled with the room's mode",
        room_participants,
    );
    registry.register(
        "room_mode_switches",
        "Mode switches of each open room so far, by the mode switched to",
        room_switches,
    );
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let (fanouts, subscribe_connections) = state.sfu.live_tasks();
    for (name, help, value) in [
        (
            "sessions",
            "Signaling sockets served now",
            state.tasks.sessions.load(relaxed),
        ),
        (
            "negotiators",
            "Subscribe negotiator tasks alive",
            state.tasks.negotiators.load(relaxed),
        ),
        (
            "fanout_tasks",
            "Fanout tasks alive (one per publication)",
            fanouts,
        ),
        (
            "subscribe_connections",
            "Subscribe connections open in the egress engine",
            subscribe_connections,
        ),
    ] {
        gauge(&mut registry, name, help, value);
    }
    let stats = state.sfu.stats();
    gauge(
        &mut registry,
        "publications",
        "Publications live now",
        stats.publications,
    );
    counter(
        &mut registry,
        "received_packets",
        "RTP packets received from publishers",
        stats.received_packets,
    );
    counter(
        &mut registry,
        "forwarded_packets",
        "RTP packets forwarded to subscribers",
        stats.forwarded_packets,
    );
    counter(
        &mut registry,
        "forwarded_bytes",
        "Bytes forwarded to subscribers",
        stats.forwarded_bytes,
    );
    counter(
        &mut registry,
        "dropped_packets",
        "Packets dropped for slow subscribers",
        stats.dropped_packets,
    );
    counter(
        &mut registry,
        "keyframe_requests",
        "Keyframe requests (PLI) sent to publishers",
        stats.keyframe_requests,
    );
    counter(
        &mut registry,
        "nacks",
        "NACK packets received from subscribers",
        stats.nacks,
    );
    if let Some(egress) = state.sfu.egress_stats() {
        for (name, help, value) in [
            (
                "egress_datagrams",
                "Datagrams sent on the shared subscribe socket",
                &egress.datagrams_sent,
            ),
            (
                "egress_send_calls",
                "sendmsg calls that sent them (fewer where UDP GSO batches)",
                &egress.send_calls,
            ),
            (
                "egress_send_errors",
                "Datagrams the kernel refused on the shared subscribe socket",
                &egress.send_errors,
            ),
            (
                "egress_write_errors",
                "Forwarded packets a subscribe connection refused (not connected yet, or closed)",
                &egress.write_errors,
            ),
            (
                "egress_unrouted_datagrams",
                "Inbound datagrams from an address no subscribe connection knows",
                &egress.unrouted_datagrams,
            ),
        ] {
            counter(&mut registry, name, help, value.load(relaxed));
        }
        gauge(
            &mut registry,
            "egress_backlog",
            "Forwarded copies waiting in the egress engine after its last round",
            egress.backlog.load(relaxed),
        );
        gauge(
            &mut registry,
            "egress_backlog_limit",
            "Forwarded copies the egress engine admits at most (40 ms at its recent pace)",
            egress.backlog_limit.load(relaxed),
        );
    }
    let mut body = String::new();
    if let Err(err) = encode(&mut body, &registry) {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            err.to_string(),
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn web_client(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    match WebClient::get(path) {
        Some(file) => (
            [(header::CONTENT_TYPE, file.metadata.mimetype().to_owned())],
            file.data,
        )
            .into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::BadRequest,
            format!("no such page: /{path}"),
        ),
    }
}
