//! Every documented error code, each answered on a connection that keeps working afterwards,
//! and the token check before the WebSocket upgrade.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{Ws, connect, recv, recv_type, send, start_server};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

async fn expect_error(ws: &mut Ws, code: &str) -> Result<Value> {
    let reply = recv_type(ws, "error", WAIT).await?;
    ensure!(reply["code"] == code, "expected `{code}`, got {reply}");
    ensure!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error explains itself: {reply}"
    );
    Ok(reply)
}

/// The socket still serves requests: a join (or, once joined, an error for a second join).
async fn still_works(ws: &mut Ws) -> Result<()> {
    send(ws, json!({"type": "dance"})).await?;
    expect_error(ws, "unknown_type").await?;
    Ok(())
}

#[tokio::test]
async fn malformed_messages_get_bad_request_or_unknown_type() -> Result<()> {
    let server = start_server(100).await?;
    let mut ws = connect(&server, "ann", "errors").await?;
    for text in [
        "{not json",
        "[1, 2, 3]",
        r#"{"no_type": true}"#,
        r#"{"type": 42}"#,
        r#"{"type": "offer", "peerId": "sfu"}"#,
        r#"{"type": "mute", "trackId": "t", "muted": "yes"}"#,
    ] {
        ws.send(Message::Text(text.into())).await?;
        let reply = expect_error(&mut ws, "bad_request").await?;
        ensure!(!reply["message"].as_str().unwrap_or("").is_empty());
    }
    ws.send(Message::Binary(vec![1, 2, 3].into())).await?;
    expect_error(&mut ws, "bad_request").await?;

    send(&mut ws, json!({"type": "teleport"})).await?;
    let reply = expect_error(&mut ws, "unknown_type").await?;
    ensure!(reply["requestType"] == "teleport", "{reply}");

    // After all that, the socket still joins normally.
    send(&mut ws, json!({"type": "join", "name": "Ann"})).await?;
    let joined = recv_type(&mut ws, "joined", WAIT).await?;
    ensure!(
        joined["mode"] == "sfu" && joined["protocol"] == 1,
        "{joined}"
    );
    // A view outside 1..=16384 pixels is refused; one of an unknown publication changes nothing.
    for (width, height) in [(0, 90), (160, 0), (16_385, 90), (160, 100_000)] {
        send(
            &mut ws,
            json!({"type": "view", "publicationId": "p", "width": width, "height": height}),
        )
        .await?;
        let reply = expect_error(&mut ws, "bad_request").await?;
        ensure!(reply["requestType"] == "view", "{reply}");
    }
    send(
        &mut ws,
        json!({"type": "view", "publicationId": "nobody", "width": 160, "height": 90}),
    )
    .await?;
    still_works(&mut ws).await?;
    // Each refusal is counted by code (and none is logged at the default level).
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await?
        .text()
        .await?;
    for expected in [
        r#"switchboard_signaling_errors_total{code="bad_request"} 11"#,
        r#"switchboard_signaling_errors_total{code="unknown_type"} 2"#,
    ] {
        ensure!(metrics.contains(expected), "{expected} in:\n{metrics}");
    }
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn oversized_messages_get_too_large() -> Result<()> {
    let server = start_server(100).await?;
    let mut ws = connect(&server, "ann", "errors").await?;
    let huge = json!({"type": "join", "name": "x".repeat(100 * 1024)});
    send(&mut ws, huge).await?;
    expect_error(&mut ws, "too_large").await?;
    still_works(&mut ws).await?;

    // Over the 1 MiB the socket reads at all: `too_large`, then close code 1009.
    let beyond = "x".repeat(1024 * 1024 + 1);
    ws.send(Message::Text(beyond.into())).await?;
    expect_error(&mut ws, "too_large").await?;
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(frame) = ws.next().await {
            if let Message::Close(frame) = frame? {
                return Ok::<_, anyhow::Error>(frame);
            }
        }
        Ok(None)
    })
    .await??;
    ensure!(
        closed.as_ref().map(|f| u16::from(f.code)) == Some(1009),
        "closed with {closed:?}"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn out_of_order_messages_get_invalid_state() -> Result<()> {
    let server = start_server(100).await?;
    let mut ws = connect(&server, "ann", "errors").await?;
    send(
        &mut ws,
        json!({"type": "offer", "peerId": "sfu", "transport": "publish", "sdp": "v=0"}),
    )
    .await?;
    let reply = expect_error(&mut ws, "invalid_state").await?;
    ensure!(reply["requestType"] == "offer", "{reply}");
    send(
        &mut ws,
        json!({"type": "mute", "trackId": "t", "muted": true}),
    )
    .await?;
    expect_error(&mut ws, "invalid_state").await?;

    send(&mut ws, json!({"type": "join", "name": "Ann"})).await?;
    recv_type(&mut ws, "joined", WAIT).await?;
    send(&mut ws, json!({"type": "join", "name": "Ann again"})).await?;
    expect_error(&mut ws, "invalid_state").await?;
    // No subscribe offer is outstanding, so an answer is out of order.
    send(
        &mut ws,
        json!({"type": "answer", "peerId": "sfu", "transport": "subscribe", "sdp": "v=0"}),
    )
    .await?;
    expect_error(&mut ws, "invalid_state").await?;
    // Offers on the subscribe connection are the server's to make.
    send(
        &mut ws,
        json!({"type": "offer", "peerId": "sfu", "transport": "subscribe", "sdp": "v=0"}),
    )
    .await?;
    expect_error(&mut ws, "invalid_state").await?;
    still_works(&mut ws).await?;
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn unknown_peers_get_unknown_peer_and_room_members_are_not_addressable_in_sfu_mode()
-> Result<()> {
    let server = start_server(100).await?;
    let mut ann = connect(&server, "ann", "errors").await?;
    send(&mut ann, json!({"type": "join"})).await?;
    recv_type(&mut ann, "joined", WAIT).await?;
    let mut bob = connect(&server, "bob", "errors").await?;
    send(&mut bob, json!({"type": "join"})).await?;
    let bob_joined = recv_type(&mut bob, "joined", WAIT).await?;
    let ann_id = bob_joined["peers"][0]["peerId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    for kind in ["offer", "answer"] {
        send(
            &mut bob,
            json!({"type": kind, "peerId": "p-nobody", "transport": "publish", "sdp": "v=0"}),
        )
        .await?;
        expect_error(&mut bob, "unknown_peer").await?;
    }
    send(&mut bob, json!({"type": "ice-candidate", "peerId": "p-nobody", "transport": "publish", "candidate": null})).await?;
    expect_error(&mut bob, "unknown_peer").await?;
    // A member of the room exists, but in SFU mode media is negotiated with the server.
    send(
        &mut bob,
        json!({"type": "offer", "peerId": ann_id, "transport": "publish", "sdp": "v=0"}),
    )
    .await?;
    expect_error(&mut bob, "invalid_state").await?;
    still_works(&mut bob).await?;
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn unusable_sdp_gets_invalid_sdp() -> Result<()> {
    let server = start_server(100).await?;
    let mut ws = connect(&server, "ann", "errors").await?;
    send(&mut ws, json!({"type": "join"})).await?;
    recv_type(&mut ws, "joined", WAIT).await?;
    let nine_sections = format!(
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n{}",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n".repeat(9)
    );
    for sdp in [
        "",
        "this is not SDP",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n",
        nine_sections.as_str(),
    ] {
        send(
            &mut ws,
            json!({"type": "offer", "peerId": "sfu", "transport": "publish", "sdp": sdp}),
        )
        .await?;
        expect_error(&mut ws, "invalid_sdp").await?;
    }
    still_works(&mut ws).await?;
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn taken_names_and_full_rooms_are_refused_and_the_room_is_unharmed() -> Result<()> {
    let server = start_server(2).await?;
    let mut ann = connect(&server, "ann", "Standup").await?;
    send(&mut ann, json!({"type": "join", "name": "Ann"})).await?;
    recv_type(&mut ann, "joined", WAIT).await?;

    // Same name in another case, in the same room spelled in another case.
    let mut impostor = connect(&server, "ann2", "STANDUP").await?;
    send(&mut impostor, json!({"type": "join", "name": "aNN"})).await?;
    expect_error(&mut impostor, "name_taken").await?;
    // The refused socket may try again with another name.
    send(&mut impostor, json!({"type": "join", "name": "Bob"})).await?;
    let joined = recv_type(&mut impostor, "joined", WAIT).await?;
    ensure!(
        joined["peers"].as_array().map(Vec::len) == Some(1),
        "{joined}"
    );

    let mut third = connect(&server, "cy", "standup").await?;
    send(&mut third, json!({"type": "join", "name": "Cy"})).await?;
    expect_error(&mut third, "room_full").await?;

    let peer_joined = recv_type(&mut ann, "peer_joined", WAIT).await?;
    ensure!(peer_joined["name"] == "Bob", "{peer_joined}");
    let rooms = support::list_rooms(&server).await?;
    let participants = rooms["rooms"][0]["participants"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(participants.len() == 2, "only Ann and Bob are in: {rooms}");
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn the_socket_requires_a_valid_token_before_the_upgrade() -> Result<()> {
    let server = start_server(100).await?;
    let http = reqwest::Client::new();
    for query in [
        "",
        "?token=",
        "?token=garbage",
        "?token=eyJhbGciOiJIUzI1NiJ9.e30.x",
    ] {
        let response = http
            .get(format!("http://{}/ws/signal{query}", server.addr))
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await?;
        ensure!(response.status() == 401, "{query}: {}", response.status());
        let body: Value = response.json().await?;
        ensure!(body["error"]["code"] == "unauthorized", "{body}");
    }
    // A token signed by another server is refused too.
    let other = start_server(100).await?;
    let foreign = support::token(&other, "ann", "r").await?;
    let result =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/signal?token={foreign}", server.addr))
            .await;
    ensure!(result.is_err(), "a foreign token must not open a socket");

    // Bad token requests get bad_request.
    let response = http
        .post(format!("http://{}/auth/token", server.addr))
        .body(r#"{"userId": ""}"#)
        .send()
        .await?;
    ensure!(response.status() == 400);
    let body: Value = response.json().await?;
    ensure!(body["error"]["code"] == "bad_request", "{body}");
    other.shutdown().await?;
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn shutdown_tells_every_participant() -> Result<()> {
    let server = start_server(100).await?;
    let mut ws = connect(&server, "ann", "bye").await?;
    send(&mut ws, json!({"type": "join"})).await?;
    recv_type(&mut ws, "joined", WAIT).await?;
    let stopping = tokio::spawn(server.shutdown());
    let reply = recv(&mut ws, WAIT).await?;
    ensure!(reply["code"] == "server_shutdown", "{reply}");
    stopping.await??;
    Ok(())
}
