//! Room features beyond media: chat through signaling (to everyone in the room, kept for later
//! joiners, length- and rate-limited with the documented errors) and resuming a lost connection.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use support::{Ws, connect, recv, recv_type, send, start_mesh_server};

const WAIT: Duration = Duration::from_secs(5);

async fn join(server: &signaling::Server, room: &str, name: &str) -> Result<(Ws, Value)> {
    let mut ws = connect(server, name, room).await?;
    send(&mut ws, json!({"type": "join", "name": name})).await?;
    let joined = recv_type(&mut ws, "joined", WAIT).await?;
    Ok((ws, joined))
}

#[tokio::test]
async fn chat_reaches_everyone_and_late_joiners_get_the_history() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let (mut ann, joined) = join(&server, "talk", "ann").await?;
    ensure!(joined["chat"] == json!([]), "{joined}");
    let (mut bob, _) = join(&server, "talk", "bob").await?;
    let (mut other_room, _) = join(&server, "elsewhere", "cat").await?;

    let text = "<b>hello</b> & \"quotes\" – ünïcödé";
    send(&mut ann, json!({"type": "chat", "text": text})).await?;
    for ws in [&mut ann, &mut bob] {
        let message = recv_type(ws, "chat", WAIT).await?;
        ensure!(
            message["text"] == text && message["name"] == "ann" && message["id"] == 1,
            "the text arrives exactly as sent, to the sender too: {message}"
        );
        ensure!(
            message["at"]
                .as_u64()
                .is_some_and(|at| at > 1_700_000_000_000),
            "{message}"
        );
    }
    send(&mut bob, json!({"type": "chat", "text": "hi ann"})).await?;
    recv_type(&mut ann, "chat", WAIT).await?;

    let (_dan, joined) = join(&server, "talk", "dan").await?;
    let history: Vec<&str> = joined["chat"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["text"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        history == [text, "hi ann"],
        "a late joiner gets the history: {joined}"
    );

    ensure!(
        recv(&mut other_room, Duration::from_millis(300))
            .await
            .is_err(),
        "another room hears nothing"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn chat_is_length_and_rate_limited() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let (mut ann, _) = join(&server, "limits", "ann").await?;
    for text in [String::new(), "   ".into(), "x".repeat(1001)] {
        send(&mut ann, json!({"type": "chat", "text": text})).await?;
        let error = recv_type(&mut ann, "error", WAIT).await?;
        ensure!(
            error["code"] == "bad_request" && error["requestType"] == "chat",
            "{error}"
        );
    }
    send(&mut ann, json!({"type": "chat", "text": "y".repeat(1000)})).await?;
    ensure!(
        recv_type(&mut ann, "chat", WAIT).await?["text"]
            .as_str()
            .map(str::len)
            == Some(1000)
    );

    // The burst of 10 includes the message above; the 11th in a row is refused.
    for i in 0..12 {
        send(
            &mut ann,
            json!({"type": "chat", "text": format!("spam {i}")}),
        )
        .await?;
    }
    let mut delivered = 0;
    let mut refused = 0;
    while let Ok(message) = recv(&mut ann, Duration::from_millis(500)).await {
        match message["type"].as_str() {
            Some("chat") => delivered += 1,
            Some("error") if message["code"] == "rate_limited" => refused += 1,
            _ => {}
        }
    }
    ensure!(
        delivered == 9 && refused == 3,
        "{delivered} delivered, {refused} refused"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_resumed_join_replaces_the_lost_connection_at_once() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let (mut ann, joined) = join(&server, "resume", "ann").await?;
    let old_id = joined["participantId"].clone();
    let token = joined["resumeToken"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(token.len() == 32, "a resume token: {joined}");
    let (mut bob, _) = join(&server, "resume", "bob").await?;

    // A wrong token resumes nothing: the name is still taken.
    let mut impostor = connect(&server, "ann", "resume").await?;
    send(
        &mut impostor,
        json!({"type": "join", "name": "ann", "resume": "0".repeat(32)}),
    )
    .await?;
    let refused = recv_type(&mut impostor, "error", WAIT).await?;
    ensure!(refused["code"] == "name_taken", "{refused}");

    // The right token from another user resumes nothing either.
    let mut other_user = connect(&server, "mallory", "resume").await?;
    send(
        &mut other_user,
        json!({"type": "join", "name": "ann", "resume": token}),
    )
    .await?;
    let refused = recv_type(&mut other_user, "error", WAIT).await?;
    ensure!(
        refused["code"] == "name_taken",
        "a token is bound to its user: {refused}"
    );

    // Ann's client lost its socket (not yet noticed by the server) and comes back.
    let mut again = connect(&server, "ann", "resume").await?;
    send(
        &mut again,
        json!({"type": "join", "name": "ann", "resume": token}),
    )
    .await?;
    let joined = recv_type(&mut again, "joined", WAIT).await?;
    ensure!(joined["participantId"] != old_id, "{joined}");
    ensure!(
        joined["peers"].as_array().map(Vec::len) == Some(1),
        "only bob is there: {joined}"
    );
    let left = recv_type(&mut bob, "peer_left", WAIT).await?;
    ensure!(left["peerId"] == old_id, "{left}");
    let arrived = recv_type(&mut bob, "peer_joined", WAIT).await?;
    ensure!(arrived["peerId"] == joined["participantId"], "{arrived}");
    // The old socket is closed by the server, saying why.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        ensure!(
            std::time::Instant::now() < deadline,
            "the old socket stays open"
        );
        if let Err(err) = recv(&mut ann, Duration::from_millis(200)).await
            && err.to_string().contains("closed")
        {
            let err = err.to_string();
            ensure!(err.contains("replaced by a resumed session"), "{err}");
            break;
        }
    }
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn only_the_sdk_and_open_token_minting_are_readable_from_other_origins() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let client = reqwest::Client::new();
    let base = format!("http://{}", server.addr);
    let allowed = |path: &'static str| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let res = client
                .get(format!("{base}{path}"))
                .header("Origin", "https://embedder.example")
                .send()
                .await?;
            anyhow::Ok(res.headers().get("access-control-allow-origin").is_some())
        }
    };
    ensure!(
        allowed("/src/client.js").await?,
        "the SDK can be imported from any page"
    );
    ensure!(
        !allowed("/api/rooms").await?,
        "room and participant names stay private"
    );
    ensure!(!allowed("/metrics").await?, "metrics stay private");
    let preflight = client
        .request(reqwest::Method::OPTIONS, format!("{base}/auth/token"))
        .header("Origin", "https://embedder.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await?;
    ensure!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .is_some(),
        "open token minting answers a preflight"
    );
    server.shutdown().await?;

    let keyed = signaling::Server::start(signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        api_keys: [(
            "backend".to_owned(),
            "a-secret-of-at-least-thirty-two-bytes".to_owned(),
        )]
        .into(),
        log_level: "warn".into(),
        ..signaling::Config::default()
    })
    .await?;
    let preflight = client
        .request(
            reqwest::Method::OPTIONS,
            format!("http://{}/auth/token", keyed.addr),
        )
        .header("Origin", "https://embedder.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .await?;
    ensure!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "with an API key, tokens are minted by a backend, never by a page"
    );
    keyed.shutdown().await?;
    Ok(())
}

/// A name that looks like one taken (another case, other spaces) is taken; one with invisible
/// characters is refused outright, so that nobody can pass for someone else.
#[tokio::test]
async fn names_that_look_alike_cannot_both_be_in_a_room() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let (_ann, _) = join(&server, "lookalike", "Ann Lee").await?;
    for (name, code) in [
        ("ann  lee", "name_taken"),
        ("Ann\u{00A0}Lee", "name_taken"),
        ("Ann\u{200B} Lee", "bad_request"),
        ("\u{202E}eeL nnA", "bad_request"),
    ] {
        let mut ws = connect(&server, "someone", "lookalike").await?;
        send(&mut ws, json!({"type": "join", "name": name})).await?;
        let refused = recv_type(&mut ws, "error", WAIT).await?;
        ensure!(refused["code"] == code, "{name:?}: {refused}");
    }
    let (_other, joined) = join(&server, "lookalike", "Ann Leeds").await?;
    ensure!(joined["name"] == "Ann Leeds", "{joined}");
    server.shutdown().await?;
    Ok(())
}
