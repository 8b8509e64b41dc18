//! Limits on what a stranger can make the signaling server hold or send: a socket that never
//! joins is closed at the join deadline; a `trackId` may not be a 64 KiB payload; a `mute`
//! costs its bytes once per member it goes to, so it cannot amplify past the relay budget.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use futures_util::StreamExt;
use serde_json::json;
use support::{connect, recv, recv_type, send};
use tokio_tungstenite::tungstenite::Message;

async fn server(join_timeout_secs: u64, mesh_max: usize) -> Result<signaling::Server> {
    let config = signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        // Large meshes: the members need no media connections to the server.
        mesh_max,
        join_timeout_secs,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    Ok(signaling::Server::start(config).await?)
}

#[tokio::test]
async fn a_socket_that_never_joins_is_told_and_closed_at_the_join_deadline() -> Result<()> {
    let server = server(1, 3).await?;
    let mut idle = connect(&server, "idle", "limits").await?;
    let opened = Instant::now();
    let error = recv(&mut idle, Duration::from_secs(5)).await?;
    ensure!(
        error["type"] == "error" && error["code"] == "invalid_state",
        "{error}"
    );
    ensure!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("join"),
        "{error}"
    );
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), idle.next()).await? {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => bail!("expected a close frame, got {other:?}"),
        }
    };
    let code = close.map(|f| u16::from(f.code));
    ensure!(code == Some(1008), "close code {code:?}");
    let took = opened.elapsed();
    ensure!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    // One that joins in time stays.
    let mut joined = connect(&server, "ann", "limits").await?;
    send(&mut joined, json!({"type": "join", "name": "Ann"})).await?;
    recv_type(&mut joined, "joined", Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    send(&mut joined, json!({"type": "chat", "text": "still here"})).await?;
    let chat = recv_type(&mut joined, "chat", Duration::from_secs(5)).await?;
    ensure!(chat["text"] == "still here", "{chat}");
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_huge_track_id_is_refused_and_relayed_to_nobody() -> Result<()> {
    let server = server(10, 50).await?;
    let mut ann = connect(&server, "ann", "limits").await?;
    send(&mut ann, json!({"type": "join", "name": "Ann"})).await?;
    recv_type(&mut ann, "joined", Duration::from_secs(5)).await?;
    let mut bob = connect(&server, "bob", "limits").await?;
    send(&mut bob, json!({"type": "join", "name": "Bob"})).await?;
    let joined = recv_type(&mut bob, "joined", Duration::from_secs(5)).await?;
    let bob_id = joined["participantId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    recv_type(&mut ann, "peer_joined", Duration::from_secs(5)).await?;

    let huge = "x".repeat(60 * 1024);
    send(
        &mut ann,
        json!({"type": "mute", "trackId": huge, "muted": true}),
    )
    .await?;
    let error = recv_type(&mut ann, "error", Duration::from_secs(5)).await?;
    ensure!(error["code"] == "bad_request", "{error}");
    send(
        &mut ann,
        json!({"type": "offer", "peerId": bob_id, "sdp": "v=0", "tracks": [{"trackId": huge, "source": "camera"}]}),
    )
    .await?;
    let error = recv_type(&mut ann, "error", Duration::from_secs(5)).await?;
    ensure!(error["code"] == "bad_request", "{error}");
    // Bob got neither: the next thing he hears is a normal mute.
    send(
        &mut ann,
        json!({"type": "mute", "trackId": "cam", "muted": true}),
    )
    .await?;
    let next = recv(&mut bob, Duration::from_secs(5)).await?;
    ensure!(next["type"] == "mute" && next["trackId"] == "cam", "{next}");
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn mutes_to_a_large_room_are_held_to_the_relay_byte_budget() -> Result<()> {
    const MEMBERS: usize = 30;
    let server = server(10, 100).await?;
    let mut sender = connect(&server, "sender", "crowd").await?;
    send(&mut sender, json!({"type": "join", "name": "Sender"})).await?;
    recv_type(&mut sender, "joined", Duration::from_secs(5)).await?;
    let mut readers = Vec::new();
    for i in 1..MEMBERS {
        let mut ws = connect(&server, &format!("reader{i}"), "crowd").await?;
        send(
            &mut ws,
            json!({"type": "join", "name": format!("Reader {i}")}),
        )
        .await?;
        recv_type(&mut ws, "joined", Duration::from_secs(5)).await?;
        readers.push(ws);
    }
    // Each mute of a 256-byte track id goes to 29 readers: about 15 KiB relayed. The byte
    // budget (a burst of 512 KiB) must stop the sender long before the message budget (100).
    let track_id = "t".repeat(256);
    for n in 0..100 {
        send(
            &mut sender,
            json!({"type": "mute", "trackId": track_id, "muted": n % 2 == 0}),
        )
        .await?;
    }
    let mut refused = 0;
    while let Ok(message) = recv(&mut sender, Duration::from_millis(500)).await {
        if message["type"] == "error" {
            ensure!(message["code"] == "rate_limited", "{message}");
            refused += 1;
        }
    }
    let mut delivered = 0;
    while let Ok(message) = recv(&mut readers[0], Duration::from_millis(300)).await {
        if message["type"] == "mute" {
            delivered += 1;
        }
    }
    ensure!(
        refused + delivered == 100 && (30..=45).contains(&delivered),
        "of 100 mutes to {MEMBERS} members, {delivered} delivered and {refused} refused \
         (the byte budget allows about 512 KiB / (29 x 512 B) = 35)"
    );
    server.shutdown().await?;
    Ok(())
}
