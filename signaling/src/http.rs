//! The HTTP surface: tokens, the signaling socket, health, room listing, metrics, web client.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rust_embed::RustEmbed;
use serde::Deserialize;
use tower_http::cors::{Any, CorsLayer};

use crate::protocol::{ErrorCode, MAX_FRAME_BYTES};
use crate::state::AppState;

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
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| crate::ws::serve(socket, state, claims))
}

async fn list_rooms(State(state): State<AppState>) -> Response {
    let rooms: Vec<_> = state.rooms.rooms().iter().map(|r| r.snapshot()).collect();
    axum::Json(serde_json::json!({ "rooms": rooms })).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
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
