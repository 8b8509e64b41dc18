//! The HTTP surface: tokens, the signaling socket, health, room listing, metrics, web client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::Path;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Router};
use rust_embed::RustEmbed;
use serde::Deserialize;
use tower_http::cors::{Any, CorsLayer};

use crate::auth::{Claims, Grants, Presented, same_secret};
use crate::config::Posture;
use crate::listener::ConnectionSlot;
use crate::protocol::{ErrorCode, MAX_FRAME_BYTES, MAX_TRACK_ID_BYTES};
use crate::state::AppState;

#[derive(RustEmbed)]
#[folder = "../web-client/"]
#[include = "index.html"]
#[include = "*.css"]
#[include = "src/**"]
#[include = "app/**"]
struct WebClient;

/// Bytes a signaling socket reads at a time (tungstenite's default is 128 KiB).
const WS_READ_BUFFER_BYTES: usize = 8 * 1024;
/// Bytes of messages gathered before they are written to the socket (a burst goes out in a few
/// writes, not one per message; each burst ends with a flush).
const WS_WRITE_BATCH_BYTES: usize = 8 * 1024;
/// Bytes queued toward a client that does not read before the socket fails: a few of the
/// largest messages (a subscribe offer for a room of 100 is about 200 KiB).
const WS_MAX_WRITE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Bytes a request body may have: a token request or a mute is well under 1 KiB.
pub const MAX_REQUEST_BODY_BYTES: usize = 16 * 1024;

/// The router with every endpoint.
pub fn router(state: AppState) -> Router {
    // Any page may import the SDK (/src/*) and, in the development posture, ask for a token:
    // docs/sdk.md. Nothing else is readable cross-origin (/api/rooms and /metrics list rooms
    // and names), and no credentials or Authorization header ever are: an API key belongs on a
    // backend, never in a page.
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE]);
    let mint = match state.posture {
        Posture::Development => post(mint_token).layer(cors.clone()),
        Posture::Production => post(mint_token),
    };
    Router::new()
        .route("/auth/token", mint)
        .route("/src/{*path}", get(web_client).layer(cors))
        .route("/ws/signal", get(signal))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/rooms", get(list_rooms))
        .route("/api/rooms/{room}", delete(end_room))
        .route(
            "/api/rooms/{room}/participants/{participant}",
            delete(remove_participant),
        )
        .route(
            "/api/rooms/{room}/participants/{participant}/mute",
            post(mute_participant),
        )
        .route("/api/nodes", get(list_nodes))
        .route("/api/nodes/{node}/drain", post(drain_node))
        .route("/metrics", get(metrics))
        .fallback(get(web_client))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            count_errors,
        ))
        .with_state(state)
}

/// Why a request's body could not be read: `too_large` past [`MAX_REQUEST_BODY_BYTES`].
fn body_error(rejection: BytesRejection) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("a request body may have at most {MAX_REQUEST_BODY_BYTES} bytes"),
        )
    } else {
        error_response(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            rejection.body_text(),
        )
    }
}

/// The router of `metrics_bind`: `/metrics` alone, without credentials.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

/// Who a request says it is.
enum Credential {
    /// A configured API key.
    ApiKey,
    /// A valid token.
    Token(Claims),
    /// `metrics_token`.
    MetricsToken,
}

fn credential(state: &AppState, headers: &HeaderMap) -> Option<Credential> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    match Presented::parse(value)? {
        Presented::ApiKey { key, secret } => state
            .auth
            .check_api_key(&key, &secret)
            .then_some(Credential::ApiKey),
        Presented::Bearer(bearer) => {
            if let Some(metrics_token) = &state.config.metrics_token
                && same_secret(metrics_token, &bearer)
            {
                return Some(Credential::MetricsToken);
            }
            state.auth.verify(&bearer).ok().map(Credential::Token)
        }
    }
}

fn unauthorized(message: impl Into<String>) -> Response {
    error_response(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
}

/// Whether a page from the request's `Origin` may open a signaling socket. Clients that are not
/// browsers send no `Origin`; a browser always does, and cannot forge it.
fn origin_allowed(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let allowed = &state.config.allowed_origins;
    if allowed.is_empty() && state.posture == Posture::Development {
        return true;
    }
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    // The server's own pages.
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| host.is_some_and(|h| h.eq_ignore_ascii_case(authority)))
}

fn error_response(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    // The code rides along for `count_errors`, which sees every reply.
    (status, Extension(code), axum::Json(body)).into_response()
}

/// Counts each error reply by its code, for `/metrics`.
async fn count_errors(State(state): State<AppState>, response: Response) -> Response {
    if let Some(code) = response.extensions().get::<ErrorCode>() {
        state.refusals.http.add(*code);
    }
    response
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequest {
    user_id: String,
    room: String,
    #[serde(default)]
    grants: Grants,
}

fn valid_label(value: &str) -> bool {
    !value.trim().is_empty() && value.chars().count() <= 64
}

async fn mint_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if state.posture == Posture::Production
        && !matches!(credential(&state, &headers), Some(Credential::ApiKey))
    {
        return unauthorized(
            "this server mints tokens only for an API key: `Authorization: Basic base64(key:secret)`",
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(rejection),
    };
    let request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!(
                    "expected {{\"userId\": string, \"room\": string, \"grants\"?: {{\"roomAdmin\"?: bool, \"roomList\"?: bool, \"lobby\"?: bool, \"publish\"?: bool, \"subscribe\"?: bool}}}}: {err}"
                ),
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
    match state
        .auth
        .mint(request.user_id.trim(), request.room.trim(), request.grants)
    {
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
    headers: HeaderMap,
    slot: Option<Extension<Arc<ConnectionSlot>>>,
    connect_info: Option<Extension<ConnectInfo<SocketAddr>>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !origin_allowed(&state, &headers) {
        return error_response(
            StatusCode::FORBIDDEN,
            ErrorCode::ForbiddenOrigin,
            "pages from this origin may not use this server (allowed_origins)",
        );
    }
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
    let Some(token_socket) = state.limits.open_socket(token) else {
        return error_response(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!(
                "this token has {} signaling sockets open already",
                state.config.max_sockets_per_token
            ),
        );
    };
    let peer = connect_info.map(|Extension(ConnectInfo(addr))| addr.ip());
    // Frames up to 1 MiB are read so that anything over the protocol's 64 KiB gets a
    // `too_large` reply instead of a dropped connection.
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        // Small buffers: an idle socket costs what it holds, and a stranger may open many.
        // A larger frame grows the read buffer; writes gather a burst, then flush.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BATCH_BYTES)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            // The socket keeps its connection's and its token's places for as long as it lives.
            let _places = (slot, token_socket);
            crate::ws::serve(socket, state, claims, peer).await
        })
}

async fn list_rooms(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match credential(&state, &headers) {
        Some(Credential::ApiKey) => {}
        Some(Credential::Token(claims)) if claims.grants.room_list => {}
        _ => {
            return unauthorized(
                "listing rooms needs an API key (Basic) or a token with the roomList grant (Bearer)",
            );
        }
    }
    let mut rooms: Vec<serde_json::Value> = state
        .rooms
        .rooms()
        .iter()
        .map(|room| serde_json::to_value(room.snapshot()).unwrap_or_default())
        .collect();
    let Some(cluster) = &state.cluster else {
        return axum::Json(serde_json::json!({ "rooms": rooms })).into_response();
    };
    for room in &mut rooms {
        if let Some(fields) = room.as_object_mut() {
            fields.insert("node".into(), cluster.node_id().into());
        }
    }
    // The others' rooms as their last heartbeat wrote them (at most a second old); without
    // Redis, this node's alone, and `partial` says so.
    let partial = match cluster.remote_rooms().await {
        Ok(remote) => {
            rooms.extend(remote);
            false
        }
        Err(_) => true,
    };
    axum::Json(serde_json::json!({ "rooms": rooms, "partial": partial })).into_response()
}

/// `GET /api/nodes` (API key): the cluster's live nodes and their load, as of the last
/// heartbeat; a node alone lists itself.
async fn list_nodes(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !matches!(credential(&state, &headers), Some(Credential::ApiKey)) {
        return unauthorized("listing nodes needs an API key (Basic)");
    }
    let Some(cluster) = &state.cluster else {
        return axum::Json(serde_json::json!({ "nodes": [], "cluster": false })).into_response();
    };
    axum::Json(serde_json::json!({
        "cluster": true,
        "node": cluster.node_id(),
        "redis": cluster.reachable(),
        "nodes": cluster.nodes(),
    }))
    .into_response()
}

/// `POST /api/nodes/{node}/drain` (API key), on any node: that node takes no new rooms, asks
/// its participants to move to other nodes, and exits when they have or at
/// `drain_timeout_secs`.
async fn drain_node(
    State(state): State<AppState>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !matches!(credential(&state, &headers), Some(Credential::ApiKey)) {
        return unauthorized("draining a node needs an API key (Basic)");
    }
    let Some(cluster) = &state.cluster else {
        return error_response(
            StatusCode::CONFLICT,
            ErrorCode::InvalidState,
            "this server is in no cluster (redis_url): stop it with SIGTERM instead",
        );
    };
    if node == cluster.node_id() {
        cluster.drain().await;
        tracing::info!(%node, "drain asked by an admin");
        return StatusCode::ACCEPTED.into_response();
    }
    match cluster.request_drain(&node).await {
        Ok(true) => {
            tracing::info!(%node, "drain of another node asked by an admin");
            StatusCode::ACCEPTED.into_response()
        }
        Ok(false) => error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownRoom,
            format!("no live node {node:?} in the cluster"),
        ),
        Err(err) => cluster_unavailable(err),
    }
}

fn cluster_unavailable(err: crate::cluster::PlacementError) -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ClusterUnavailable,
        err.to_string(),
    )
}

/// An admin request about `room` that this node does not host, answered by the node that does
/// (in a cluster); `None` when it is for this node to answer.
async fn forward_to_host(
    state: &AppState,
    room: &str,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Option<Response> {
    let cluster = state.cluster.as_ref()?;
    if state.rooms.contains(room) || headers.contains_key(crate::cluster::FORWARDED_HEADER) {
        return None;
    }
    let (node, url) = match cluster.owner(room).await {
        Ok(Some(owner)) => owner,
        Ok(None) => return None,
        Err(err) => return Some(cluster_unavailable(err)),
    };
    if node == cluster.node_id() {
        return None;
    }
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    Some(
        match cluster.forward(&url, method, path, headers, body).await {
            Ok((status, content_type, body)) => {
                let mut response = (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    body,
                )
                    .into_response();
                if let Some(value) = content_type.and_then(|v| v.parse().ok()) {
                    response.headers_mut().insert(header::CONTENT_TYPE, value);
                }
                response
            }
            Err(err) => error_response(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Internal,
                format!("the node hosting room {room:?} ({node}) did not answer: {err}"),
            ),
        },
    )
}

/// Whether the request may administer `room`: an API key, or a token for that room with the
/// `roomAdmin` grant.
fn may_administer(state: &AppState, headers: &HeaderMap, room: &str) -> bool {
    match credential(state, headers) {
        Some(Credential::ApiKey) => true,
        Some(Credential::Token(claims)) => {
            claims.grants.room_admin && claims.room.to_lowercase() == room.to_lowercase()
        }
        _ => false,
    }
}

fn not_admin() -> Response {
    unauthorized(
        "administering a room needs an API key (Basic) or a token for that room with the roomAdmin grant (Bearer)",
    )
}

fn unknown(message: String) -> Response {
    error_response(StatusCode::NOT_FOUND, ErrorCode::UnknownRoom, message)
}

/// `DELETE /api/rooms/{room}`: everyone in the room is told `room_ended` and disconnected.
async fn end_room(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if !may_administer(&state, &headers, &room) {
        return not_admin();
    }
    if let Some(answer) =
        forward_to_host(&state, &room, Method::DELETE, &uri, &headers, Bytes::new()).await
    {
        return answer;
    }
    if !state.rooms.end_room(&room) {
        return unknown(format!("no room {room:?} is open"));
    }
    tracing::info!(%room, "room ended by an admin");
    StatusCode::NO_CONTENT.into_response()
}

/// `DELETE /api/rooms/{room}/participants/{participant}`: that participant is told `removed` and
/// disconnected.
async fn remove_participant(
    State(state): State<AppState>,
    Path((room, participant)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if !may_administer(&state, &headers, &room) {
        return not_admin();
    }
    if let Some(answer) =
        forward_to_host(&state, &room, Method::DELETE, &uri, &headers, Bytes::new()).await
    {
        return answer;
    }
    if !state.rooms.remove_participant(&room, &participant) {
        return unknown(format!("no participant {participant:?} in room {room:?}"));
    }
    tracing::info!(%room, %participant, "participant removed by an admin");
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MuteRequest {
    track_id: String,
}

/// `POST /api/rooms/{room}/participants/{participant}/mute` `{"trackId": ...}`: the track is
/// muted for everyone and its publisher is asked to turn it off (it may turn it on again; nobody
/// can turn on someone else's microphone).
async fn mute_participant(
    State(state): State<AppState>,
    Path((room, participant)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !may_administer(&state, &headers, &room) {
        return not_admin();
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(rejection),
    };
    if let Some(answer) =
        forward_to_host(&state, &room, Method::POST, &uri, &headers, body.clone()).await
    {
        return answer;
    }
    let request = match serde_json::from_slice::<MuteRequest>(&body) {
        Ok(request)
            if !request.track_id.is_empty() && request.track_id.len() <= MAX_TRACK_ID_BYTES =>
        {
            request
        }
        Ok(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("trackId is 1 to {MAX_TRACK_ID_BYTES} bytes"),
            );
        }
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("expected {{\"trackId\": string}}: {err}"),
            );
        }
    };
    if !state
        .rooms
        .mute_by_admin(&room, &participant, &request.track_id)
    {
        return unknown(format!("no participant {participant:?} in room {room:?}"));
    }
    tracing::info!(%room, %participant, track = %request.track_id, "track muted by an admin");
    StatusCode::NO_CONTENT.into_response()
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.posture == Posture::Production
        && !matches!(
            credential(&state, &headers),
            Some(Credential::ApiKey | Credential::MetricsToken)
        )
    {
        return unauthorized(
            "metrics need `Authorization: Bearer <metrics_token>` or an API key, or metrics_bind",
        );
    }
    render_metrics(State(state)).await
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    match crate::metrics::render(&state) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            err.to_string(),
        ),
    }
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
