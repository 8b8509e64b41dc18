//! Meeting a stranger (docs/protocol.md, section 13): the waiting queue is fair (first come,
//! first matched), a match is a room of two both join, `next` never rematches at once with the
//! one just left while someone else waits, `stop` and the timeout are said, and a client whose
//! socket dropped takes its place back within the resume window.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use support::{Ws, connect, connect_granting, recv_type, send};

const WAIT: Duration = Duration::from_secs(5);

async fn server(match_timeout_secs: u64) -> Result<signaling::Server> {
    let config = signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        match_timeout_secs,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    Ok(signaling::Server::start(config).await?)
}

/// A socket that sent `find_partner` as `name`, and its `waiting`.
async fn find(server: &signaling::Server, name: &str) -> Result<(Ws, Value)> {
    let mut ws = connect_granting(server, name, "strangers", json!({"lobby": true})).await?;
    send(&mut ws, json!({"type": "find_partner", "name": name})).await?;
    let waiting = recv_type(&mut ws, "waiting", WAIT).await?;
    Ok((ws, waiting))
}

async fn matched_with(ws: &mut Ws, name: &str) -> Result<Value> {
    let matched = recv_type(ws, "matched", WAIT).await?;
    ensure!(
        matched["name"] == name,
        "expected a match with {name}, got {matched}"
    );
    Ok(matched)
}

async fn expect_error(ws: &mut Ws, code: &str, request: &str) -> Result<()> {
    let reply = recv_type(ws, "error", WAIT).await?;
    ensure!(
        reply["code"] == code && reply["requestType"] == request,
        "expected `{code}` for `{request}`, got {reply}"
    );
    Ok(())
}

#[tokio::test]
async fn first_come_first_matched_and_next_finds_someone_else() -> Result<()> {
    let server = server(300).await?;
    let (mut ann, waiting) = find(&server, "Ann").await?;
    ensure!(waiting["position"] == 0, "Ann is first: {waiting}");
    let (mut ben, _) = find(&server, "Ben").await?;
    let for_ann = matched_with(&mut ann, "Ben").await?;
    let for_ben = matched_with(&mut ben, "Ann").await?;
    ensure!(
        for_ann["room"] == for_ben["room"] && for_ann["token"] != for_ben["token"],
        "one room, a token each: {for_ann} {for_ben}"
    );
    let (mut cat, waiting) = find(&server, "Cat").await?;
    ensure!(waiting["position"] == 0, "Cat waits alone: {waiting}");

    // The match is a room of two: both join it, peer to peer.
    for (matched, name) in [(&for_ann, "Ann"), (&for_ben, "Ben")] {
        let token = matched["token"].as_str().unwrap_or_default();
        let (mut room, _) = tokio_tungstenite::connect_async(format!(
            "ws://{}/ws/signal?token={token}",
            server.addr
        ))
        .await?;
        send(&mut room, json!({"type": "join", "name": name})).await?;
        let joined = recv_type(&mut room, "joined", WAIT).await?;
        ensure!(
            joined["room"] == matched["room"] && joined["mode"] == "mesh",
            "{joined}"
        );
    }

    // Ann presses Next: Ben is told, and Ann meets Cat, who waited, not Ben again.
    send(&mut ann, json!({"type": "next"})).await?;
    let left = recv_type(&mut ben, "partner_left", WAIT).await?;
    ensure!(left["partner"].is_string(), "{left}");
    matched_with(&mut ann, "Cat").await?;
    matched_with(&mut cat, "Ann").await?;
    // Ben looks again and waits: everyone else is taken.
    send(&mut ben, json!({"type": "find_partner"})).await?;
    let waiting = recv_type(&mut ben, "waiting", WAIT).await?;
    ensure!(waiting["position"] == 0, "{waiting}");
    // Cat presses Next: Ben waits, and is not the one Cat just left.
    send(&mut cat, json!({"type": "next"})).await?;
    matched_with(&mut cat, "Ben").await?;
    matched_with(&mut ben, "Cat").await?;
    recv_type(&mut ann, "partner_left", WAIT).await?;
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn stop_timeout_and_mistakes_are_said() -> Result<()> {
    let server = server(1).await?;
    let mut plain = connect(&server, "mallory", "strangers").await?;
    send(&mut plain, json!({"type": "find_partner"})).await?;
    expect_error(&mut plain, "not_allowed", "find_partner").await?;
    send(&mut plain, json!({"type": "next"})).await?;
    expect_error(&mut plain, "invalid_state", "next").await?;

    let (mut dee, _) = find(&server, "Dee").await?;
    send(&mut dee, json!({"type": "find_partner"})).await?;
    expect_error(&mut dee, "invalid_state", "find_partner").await?;
    send(&mut dee, json!({"type": "stop"})).await?;
    let left = recv_type(&mut dee, "queue_left", WAIT).await?;
    ensure!(left["reason"] == "stopped", "{left}");
    // Nobody comes within match_timeout_secs (1 s here).
    send(&mut dee, json!({"type": "find_partner"})).await?;
    recv_type(&mut dee, "waiting", WAIT).await?;
    let left = recv_type(&mut dee, "queue_left", WAIT).await?;
    ensure!(left["reason"] == "timeout", "{left}");

    // Stopping a match: the partner is told, and so is the one who stopped (a `matched` that
    // crossed the `stop` is then known to be stale).
    send(&mut dee, json!({"type": "find_partner"})).await?;
    let (mut eli, _) = find(&server, "Eli").await?;
    recv_type(&mut dee, "matched", WAIT).await?;
    recv_type(&mut eli, "matched", WAIT).await?;
    send(&mut eli, json!({"type": "stop"})).await?;
    let left = recv_type(&mut eli, "queue_left", WAIT).await?;
    ensure!(left["reason"] == "stopped", "{left}");
    recv_type(&mut dee, "partner_left", WAIT).await?;
    // Both pressing Next at once: the second finds itself left already and simply looks again.
    send(&mut dee, json!({"type": "next"})).await?;
    let waiting = recv_type(&mut dee, "waiting", WAIT).await?;
    ensure!(waiting["position"] == 0, "{waiting}");
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_dropped_client_takes_its_place_back() -> Result<()> {
    let server = server(300).await?;
    let (eve, waiting) = find(&server, "Eve").await?;
    let resume = waiting["resume"].as_str().unwrap_or_default().to_owned();
    drop(eve);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Fay comes while Eve is away: nobody to match yet.
    let (mut fay, waiting) = find(&server, "Fay").await?;
    ensure!(
        waiting["position"] == 1,
        "Eve's place is kept ahead: {waiting}"
    );
    // Someone else cannot take Eve's place with her secret.
    let mut thief =
        connect_granting(&server, "mallory", "strangers", json!({"lobby": true})).await?;
    send(
        &mut thief,
        json!({"type": "find_partner", "name": "Mallory", "resume": resume}),
    )
    .await?;
    let waiting = recv_type(&mut thief, "waiting", WAIT).await?;
    ensure!(
        waiting["resume"] != resume.as_str(),
        "a new place: {waiting}"
    );
    // Eve, away, is passed over: Fay meets the newcomer.
    matched_with(&mut fay, "Mallory").await?;
    drop(thief);
    // Eve reconnects with her secret: her place is hers again, first in line.
    let mut eve = connect_granting(&server, "Eve", "strangers", json!({"lobby": true})).await?;
    send(
        &mut eve,
        json!({"type": "find_partner", "name": "Eve", "resume": resume}),
    )
    .await?;
    let waiting = recv_type(&mut eve, "waiting", WAIT).await?;
    ensure!(
        waiting["resume"] == resume.as_str() && waiting["position"] == 0,
        "{waiting}"
    );
    let (mut gus, _) = find(&server, "Gus").await?;
    matched_with(&mut gus, "Eve").await?;
    matched_with(&mut eve, "Gus").await?;
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_reconnect_takes_over_a_place_the_server_still_thinks_alive() -> Result<()> {
    let server = server(300).await?;
    let (mut old, waiting) = find(&server, "Ivy").await?;
    let resume = waiting["resume"].as_str().unwrap_or_default().to_owned();
    // The old socket is alive as far as the server knows; the client reconnects anyway.
    let mut new = connect_granting(&server, "Ivy", "strangers", json!({"lobby": true})).await?;
    send(
        &mut new,
        json!({"type": "find_partner", "name": "Ivy", "resume": resume}),
    )
    .await?;
    let waiting = recv_type(&mut new, "waiting", WAIT).await?;
    ensure!(
        waiting["resume"] == resume.as_str() && waiting["position"] == 0,
        "the place is taken back: {waiting}"
    );
    let replaced = recv_type(&mut old, "error", WAIT).await?;
    ensure!(
        replaced["code"] == "replaced",
        "the old socket is told: {replaced}"
    );
    // The old socket's end does not end the place: a newcomer meets Ivy on the new one.
    drop(old);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut jon, _) = find(&server, "Jon").await?;
    matched_with(&mut jon, "Ivy").await?;
    matched_with(&mut new, "Jon").await?;
    server.shutdown().await?;
    Ok(())
}
