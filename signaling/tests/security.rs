//! The two postures and what a stranger may do in each: a server reachable from other machines
//! refuses to start without API keys; with keys, minting, room listing and metrics need
//! credentials, pages from other origins are refused, and a token opens a few sockets at most;
//! joins and rooms are limited in every posture.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Ws, recv, recv_type, send};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const KEY: &str = "backend";
const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes";
const METRICS_TOKEN: &str = "scraper-token";

fn keyed_config() -> Result<signaling::Config> {
    Ok(signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        api_keys: BTreeMap::from([(KEY.to_owned(), SECRET.to_owned())]),
        metrics_token: Some(METRICS_TOKEN.into()),
        allowed_origins: vec!["https://app.example".into()],
        mesh_max: 3,
        log_level: "warn".into(),
        ..signaling::Config::default()
    })
}

async fn mint(server: &signaling::Server, grants: Value) -> Result<String> {
    let body: Value = reqwest::Client::new()
        .post(format!("http://{}/auth/token", server.addr))
        .basic_auth(KEY, Some(SECRET))
        .json(&json!({"userId": "ann", "room": "Standup", "grants": grants}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    body["token"]
        .as_str()
        .map(str::to_owned)
        .context("no token")
}

async fn open_socket(
    server: &signaling::Server,
    token: &str,
    origin: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{}/ws/signal?token={token}", server.addr)
        .into_client_request()
        .map_err(|e| tokio_tungstenite::tungstenite::Error::Io(std::io::Error::other(e)))?;
    if let Some(origin) = origin {
        request.headers_mut().insert(
            "origin",
            HeaderValue::from_str(origin)
                .map_err(|e| tokio_tungstenite::tungstenite::Error::Io(std::io::Error::other(e)))?,
        );
    }
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

/// The status of a GET with an optional `Authorization` header.
async fn get_status(
    http: &reqwest::Client,
    url: String,
    authorization: Option<String>,
) -> Result<StatusCode> {
    let mut request = http.get(url);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    Ok(request.send().await?.status())
}

fn refused_with(result: Result<Ws, tokio_tungstenite::tungstenite::Error>, status: u16) -> bool {
    matches!(result, Err(tokio_tungstenite::tungstenite::Error::Http(response)) if response.status().as_u16() == status)
}

#[tokio::test]
async fn a_server_reachable_from_other_machines_needs_api_keys() -> Result<()> {
    let open = signaling::Config {
        bind: "0.0.0.0:0".parse()?,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    let Err(err) = signaling::Server::start(open.clone()).await else {
        bail!("a server on 0.0.0.0 without API keys started");
    };
    ensure!(err.to_string().contains("api_keys"), "{err}");

    let short = signaling::Config {
        api_keys: BTreeMap::from([(KEY.to_owned(), "short".to_owned())]),
        ..open
    };
    let Err(err) = signaling::Server::start(short).await else {
        bail!("a 5-byte secret was accepted");
    };
    ensure!(err.to_string().contains("shorter than 32"), "{err}");
    Ok(())
}

#[tokio::test]
async fn with_api_keys_minting_listing_and_metrics_need_credentials() -> Result<()> {
    let server = signaling::Server::start(keyed_config()?).await?;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let request = json!({"userId": "ann", "room": "Standup"});

    let anonymous = http
        .post(format!("{base}/auth/token"))
        .json(&request)
        .send()
        .await?;
    ensure!(anonymous.status() == StatusCode::UNAUTHORIZED);
    let body: Value = anonymous.json().await?;
    ensure!(body["error"]["code"] == "unauthorized", "{body}");
    let wrong = http
        .post(format!("{base}/auth/token"))
        .basic_auth(KEY, Some("a-wrong-secret-of-thirty-two-bytes!!"))
        .json(&request)
        .send()
        .await?;
    ensure!(wrong.status() == StatusCode::UNAUTHORIZED);

    // Listing rooms: not for a plain token, nor for nobody; for a roomList grant or a key.
    let plain = mint(&server, json!({})).await?;
    let lister = mint(&server, json!({"roomList": true})).await?;
    let list = |auth: Option<String>| get_status(&http, format!("{base}/api/rooms"), auth);
    ensure!(list(None).await? == StatusCode::UNAUTHORIZED);
    ensure!(list(Some(format!("Bearer {plain}"))).await? == StatusCode::UNAUTHORIZED);
    // The scheme is case-insensitive.
    ensure!(list(Some(format!("bearer {lister}"))).await? == StatusCode::OK);
    let basic = http
        .get(format!("{base}/api/rooms"))
        .basic_auth(KEY, Some(SECRET))
        .send()
        .await?;
    ensure!(basic.status() == StatusCode::OK);

    // Metrics: the metrics token or a key.
    let metrics = |auth: Option<String>| get_status(&http, format!("{base}/metrics"), auth);
    ensure!(metrics(None).await? == StatusCode::UNAUTHORIZED);
    ensure!(metrics(Some(format!("Bearer {plain}"))).await? == StatusCode::UNAUTHORIZED);
    ensure!(metrics(Some(format!("Bearer {METRICS_TOKEN}"))).await? == StatusCode::OK);
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn pages_from_other_origins_and_a_token_s_fifth_socket_are_refused() -> Result<()> {
    let server = signaling::Server::start(keyed_config()?).await?;
    let token = mint(&server, json!({})).await?;
    ensure!(
        refused_with(
            open_socket(&server, &token, Some("https://evil.example")).await,
            403
        ),
        "a page from an origin not allowed opened a socket"
    );
    let own = format!("http://{}", server.addr);
    let mut sockets = vec![
        open_socket(&server, &token, Some("https://app.example")).await?,
        open_socket(&server, &token, Some(&own)).await?,
        open_socket(&server, &token, None).await?,
    ];
    sockets.push(open_socket(&server, &token, None).await?);
    ensure!(
        refused_with(open_socket(&server, &token, None).await, 429),
        "a fifth socket with one token"
    );
    // A token a backend signs itself, with the documented claims, joins.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(KEY.into());
    let own_token = jsonwebtoken::encode(
        &header,
        &json!({"sub": "bob", "room": "Standup", "iat": now, "exp": now + 60}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let mut bob = open_socket(&server, &own_token, None).await?;
    send(&mut bob, json!({"type": "join", "name": "Bob"})).await?;
    recv_type(&mut bob, "joined", Duration::from_secs(5)).await?;
    drop(sockets);
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn metrics_bind_serves_metrics_alone_without_credentials() -> Result<()> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    let metrics_addr = probe.local_addr()?;
    drop(probe);
    let server = signaling::Server::start(signaling::Config {
        metrics_bind: Some(metrics_addr),
        ..keyed_config()?
    })
    .await?;
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics")).await?;
    ensure!(metrics.status() == StatusCode::OK);
    ensure!(metrics.text().await?.contains("switchboard_rooms"));
    let rooms = reqwest::get(format!("http://{metrics_addr}/api/rooms")).await?;
    ensure!(
        rooms.status() == StatusCode::NOT_FOUND,
        "only metrics there"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn the_token_command_signs_with_a_configured_key() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("switchboard-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("keys.toml");
    std::fs::write(&file, format!("[api_keys]\n{KEY} = \"{SECRET}\"\n"))?;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--user", "ops", "--room", "any", "--room-list"])
        .arg("--config")
        .arg(&file)
        .output()?;
    std::fs::remove_dir_all(&dir)?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout)?.trim().to_owned();
    let server = signaling::Server::start(keyed_config()?).await?;
    let listed = reqwest::Client::new()
        .get(format!("http://{}/api/rooms", server.addr))
        .bearer_auth(&token)
        .send()
        .await?;
    ensure!(listed.status() == StatusCode::OK, "{}", listed.status());

    let without_keys = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--user", "ops", "--room", "any"])
        .env_remove("SWITCHBOARD_API_KEYS")
        .output()?;
    ensure!(!without_keys.status.success());
    ensure!(String::from_utf8_lossy(&without_keys.stderr).contains("no API keys"));
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn joins_are_rate_limited_per_room_and_rooms_are_capped() -> Result<()> {
    let server = signaling::Server::start(signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        mesh_max: 100,
        // A burst of five joins into one room, then one a second.
        max_joins_per_second_per_room: 1.0,
        max_rooms: 2,
        log_level: "warn".into(),
        ..signaling::Config::default()
    })
    .await?;
    let mut members = Vec::new();
    for i in 0..5 {
        let mut ws = support::connect(&server, &format!("u{i}"), "crowded").await?;
        send(&mut ws, json!({"type": "join", "name": format!("P{i}")})).await?;
        recv_type(&mut ws, "joined", Duration::from_secs(5)).await?;
        members.push(ws);
    }
    let mut late = support::connect(&server, "late", "crowded").await?;
    send(&mut late, json!({"type": "join", "name": "Late"})).await?;
    let refused = recv(&mut late, Duration::from_secs(5)).await?;
    ensure!(
        refused["type"] == "error" && refused["code"] == "rate_limited",
        "{refused}"
    );
    // The socket stays: a second later the same join goes through.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(&mut late, json!({"type": "join", "name": "Late"})).await?;
    recv_type(&mut late, "joined", Duration::from_secs(5)).await?;

    // A second room opens; a third does not while two are open.
    let mut second = support::connect(&server, "x", "second").await?;
    send(&mut second, json!({"type": "join", "name": "X"})).await?;
    recv_type(&mut second, "joined", Duration::from_secs(5)).await?;
    let mut third = support::connect(&server, "y", "third").await?;
    send(&mut third, json!({"type": "join", "name": "Y"})).await?;
    let refused = recv(&mut third, Duration::from_secs(5)).await?;
    ensure!(
        refused["type"] == "error" && refused["code"] == "server_full",
        "{refused}"
    );
    server.shutdown().await?;
    Ok(())
}

/// Reads until the socket closes; the last `error` before the close and the close code.
async fn until_closed(ws: &mut Ws) -> Result<(Option<Value>, Option<u16>)> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await? {
            Some(Ok(Message::Text(text))) => {
                let message: Value = serde_json::from_str(&text)?;
                if message["type"] == "error" {
                    error = Some(message);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Ok((error, frame.map(|f| u16::from(f.code))));
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return Ok((error, None)),
        }
    }
}

#[tokio::test]
async fn an_admin_removes_a_participant_and_ends_a_room() -> Result<()> {
    let server = signaling::Server::start(keyed_config()?).await?;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let mut members = Vec::new();
    for name in ["Ann", "Bob", "Cat"] {
        let token = mint(&server, json!({})).await?;
        let mut ws = open_socket(&server, &token, None).await?;
        send(&mut ws, json!({"type": "join", "name": name})).await?;
        let joined = recv_type(&mut ws, "joined", Duration::from_secs(5)).await?;
        let id = joined["participantId"].as_str().context("id")?.to_owned();
        members.push((ws, id));
    }
    let bob_id = members[1].1.clone();
    let remove = format!("{base}/api/rooms/standup/participants/{bob_id}");

    // Nobody, a plain participant, and an admin of another room may not.
    let plain = mint(&server, json!({})).await?;
    for auth in [None, Some(plain)] {
        let mut request = http.delete(&remove);
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        ensure!(request.send().await?.status() == StatusCode::UNAUTHORIZED);
    }
    let body: Value = http
        .post(format!("{base}/auth/token"))
        .basic_auth(KEY, Some(SECRET))
        .json(&json!({"userId": "host", "room": "Elsewhere", "grants": {"roomAdmin": true}}))
        .send()
        .await?
        .json()
        .await?;
    let elsewhere = body["token"].as_str().context("token")?.to_owned();
    ensure!(
        http.delete(&remove)
            .bearer_auth(&elsewhere)
            .send()
            .await?
            .status()
            == StatusCode::UNAUTHORIZED,
        "an admin of another room removed someone here"
    );

    // The room's admin mutes Bob's microphone: everyone hears of it, Bob too (his client turns
    // it off). Nobody else may; an empty track id is refused.
    let admin = mint(&server, json!({"roomAdmin": true})).await?;
    let mute = format!("{remove}/mute");
    let body = json!({"trackId": "bob-mic"});
    ensure!(
        http.post(&mute).json(&body).send().await?.status() == StatusCode::UNAUTHORIZED,
        "muted without credentials"
    );
    ensure!(
        http.post(&mute)
            .bearer_auth(&admin)
            .json(&json!({"trackId": ""}))
            .send()
            .await?
            .status()
            == StatusCode::BAD_REQUEST
    );
    let muted = http
        .post(&mute)
        .bearer_auth(&admin)
        .json(&body)
        .send()
        .await?;
    ensure!(
        muted.status() == StatusCode::NO_CONTENT,
        "{}",
        muted.status()
    );
    for index in [0, 1] {
        let told = recv_type(&mut members[index].0, "mute", Duration::from_secs(5)).await?;
        ensure!(
            told["peerId"] == bob_id.as_str()
                && told["trackId"] == "bob-mic"
                && told["muted"] == true,
            "member {index} was told {told}"
        );
    }

    // The room's admin removes Bob: Bob is told and closed; the others see him leave.
    let removed = http.delete(&remove).bearer_auth(&admin).send().await?;
    ensure!(
        removed.status() == StatusCode::NO_CONTENT,
        "{}",
        removed.status()
    );
    let (error, code) = until_closed(&mut members[1].0).await?;
    ensure!(
        error.as_ref().is_some_and(|e| e["code"] == "removed") && code == Some(1000),
        "Bob got {error:?} and close {code:?}"
    );
    let left = recv_type(&mut members[0].0, "peer_left", Duration::from_secs(5)).await?;
    ensure!(left["peerId"] == bob_id.as_str(), "{left}");
    let again = http.delete(&remove).bearer_auth(&admin).send().await?;
    ensure!(again.status() == StatusCode::NOT_FOUND);
    let body: Value = again.json().await?;
    ensure!(body["error"]["code"] == "unknown_room", "{body}");

    // An API key ends the room: everyone left is told and closed, and the room is gone.
    let ended = http
        .delete(format!("{base}/api/rooms/Standup"))
        .basic_auth(KEY, Some(SECRET))
        .send()
        .await?;
    ensure!(ended.status() == StatusCode::NO_CONTENT);
    for index in [0, 2] {
        let (error, code) = until_closed(&mut members[index].0).await?;
        ensure!(
            error.as_ref().is_some_and(|e| e["code"] == "room_ended") && code == Some(1000),
            "member {index} got {error:?} and close {code:?}"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !server.state().rooms.rooms().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        server.state().rooms.rooms().is_empty(),
        "the ended room is still open"
    );
    server.shutdown().await?;
    Ok(())
}

/// A request body past the limit gets a clear error, and the server goes on serving.
#[tokio::test]
async fn an_oversized_request_body_is_refused_with_too_large() -> Result<()> {
    let server = support::start_server(10).await?;
    let url = format!("http://{}/auth/token", server.addr);
    let http = reqwest::Client::new();
    let oversized =
        json!({"userId": "x".repeat(signaling::http::MAX_REQUEST_BODY_BYTES), "room": "r"});
    let refused = http.post(&url).json(&oversized).send().await?;
    ensure!(
        refused.status() == StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        refused.status()
    );
    let body: Value = refused.json().await?;
    ensure!(body["error"]["code"] == "too_large", "{body}");
    let served = http
        .post(&url)
        .json(&json!({"userId": "ann", "room": "r"}))
        .send()
        .await?;
    ensure!(served.status().is_success(), "{}", served.status());
    // Counted, not logged: an operator sees how many were refused.
    let metrics = http
        .get(format!("http://{}/metrics", server.addr))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains(r#"switchboard_http_errors_total{code="too_large"} 1"#),
        "{metrics}"
    );
    Ok(())
}
