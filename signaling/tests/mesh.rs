//! The Mode policy over the wire: mesh rooms relay signaling between participants, a fourth
//! participant switches the room to SFU (make before break, settled by `ready`), and a room that
//! stays small for the hold time returns to mesh. Media in both modes is tested with Chromium
//! (web-client/tests/mesh.mjs); these tests pin the protocol.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use futures_util::SinkExt;
use serde_json::{Value, json};
use support::{Ws, connect, recv, recv_type, send, start_mesh_server};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

struct Peer {
    ws: Ws,
    id: String,
}

async fn join(server: &signaling::Server, room: &str, name: &str) -> Result<(Peer, Value)> {
    let mut ws = connect(server, name, room).await?;
    send(&mut ws, json!({"type": "join", "name": name})).await?;
    let joined = recv_type(&mut ws, "joined", WAIT).await?;
    let id = joined["participantId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok((Peer { ws, id }, joined))
}

async fn expect_error(ws: &mut Ws, code: &str, request_type: &str) -> Result<()> {
    let reply = recv_type(ws, "error", WAIT).await?;
    ensure!(
        reply["code"] == code && reply["requestType"] == request_type,
        "expected `{code}` for `{request_type}`, got {reply}"
    );
    Ok(())
}

async fn expect_mode(peer: &mut Peer, mode: &str, phase: &str, timeout: Duration) -> Result<()> {
    let message = recv_type(&mut peer.ws, "mode", timeout).await?;
    ensure!(
        message["mode"] == mode && message["phase"] == phase,
        "expected mode {mode}/{phase}, got {message}"
    );
    Ok(())
}

/// Messages that arrive within `window`, of any type.
async fn drain(ws: &mut Ws, window: Duration) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + window;
    while let Ok(message) = recv(ws, deadline.saturating_duration_since(Instant::now())).await {
        seen.push(message);
    }
    seen
}

/// Keeps a socket alive (the server drops clients silent for 7 s) until the task is aborted.
fn keep_alive(mut ws: Ws) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = recv(&mut ws, Duration::from_secs(1)).await;
            if ws.send(Message::Ping(Default::default())).await.is_err() {
                return;
            }
        }
    })
}

/// Like [`expect_mode`], pinging while it waits longer than a silent client may stay.
async fn expect_mode_patiently(
    peer: &mut Peer,
    mode: &str,
    phase: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match recv(&mut peer.ws, Duration::from_secs(1)).await {
            Ok(message) if message["type"] == "mode" => {
                ensure!(
                    message["mode"] == mode && message["phase"] == phase,
                    "expected mode {mode}/{phase}, got {message}"
                );
                return Ok(());
            }
            Ok(_) => {}
            Err(_) => peer.ws.send(Message::Ping(Default::default())).await?,
        }
    }
    anyhow::bail!("no mode {mode}/{phase} within {timeout:?}")
}

async fn room_json(server: &signaling::Server, room: &str) -> Result<Value> {
    let rooms = support::list_rooms(server).await?;
    rooms["rooms"]
        .as_array()
        .and_then(|list| list.iter().find(|r| r["name"] == room).cloned())
        .ok_or_else(|| anyhow::anyhow!("room {room} not in {rooms}"))
}

#[tokio::test]
async fn mesh_rooms_relay_offers_answers_and_candidates_by_peer_id() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let (mut ann, joined) = join(&server, "mesh", "ann").await?;
    ensure!(joined["mode"] == "mesh", "{joined}");
    let (mut bob, joined) = join(&server, "mesh", "bob").await?;
    ensure!(joined["mode"] == "mesh", "{joined}");

    let tracks = json!([{"trackId": "t-cam", "source": "camera", "mid": "1"}]);
    send(
        &mut ann.ws,
        json!({"type": "offer", "peerId": bob.id, "sdp": "v=0 from ann", "tracks": tracks}),
    )
    .await?;
    let offer = recv_type(&mut bob.ws, "offer", WAIT).await?;
    ensure!(
        offer["peerId"] == ann.id.as_str()
            && offer["sdp"] == "v=0 from ann"
            && offer["tracks"] == tracks,
        "bob gets ann's offer, from ann, tracks intact: {offer}"
    );
    ensure!(
        offer.get("transport").is_none() && offer.get("subscriptions").is_none(),
        "{offer}"
    );
    send(
        &mut bob.ws,
        json!({"type": "answer", "peerId": ann.id, "sdp": "v=0 from bob", "tracks": []}),
    )
    .await?;
    let answer = recv_type(&mut ann.ws, "answer", WAIT).await?;
    ensure!(
        answer["peerId"] == bob.id.as_str() && answer["sdp"] == "v=0 from bob",
        "{answer}"
    );
    let candidate = json!({"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0});
    send(
        &mut bob.ws,
        json!({"type": "ice-candidate", "peerId": ann.id, "candidate": candidate}),
    )
    .await?;
    let relayed = recv_type(&mut ann.ws, "ice-candidate", WAIT).await?;
    ensure!(
        relayed["peerId"] == bob.id.as_str()
            && relayed["candidate"]["candidate"] == candidate["candidate"],
        "{relayed}"
    );

    // Mute in mesh names the track: there is no publication on the server.
    send(
        &mut ann.ws,
        json!({"type": "mute", "trackId": "t-cam", "muted": true}),
    )
    .await?;
    let mute = recv_type(&mut bob.ws, "mute", WAIT).await?;
    ensure!(
        mute["peerId"] == ann.id.as_str() && mute["trackId"] == "t-cam" && mute["muted"] == true,
        "{mute}"
    );

    let room = room_json(&server, "mesh").await?;
    ensure!(
        room["mode"] == "mesh" && room["forwardedPackets"] == 0,
        "{room}"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn relay_errors_are_documented_codes_and_change_nothing() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let (mut ann, _) = join(&server, "one", "ann").await?;
    let (mut bob, _) = join(&server, "one", "bob").await?;
    let (other, _) = join(&server, "two", "cat").await?;

    // A participant of another room is nobody here.
    send(
        &mut ann.ws,
        json!({"type": "offer", "peerId": other.id, "sdp": "v=0"}),
    )
    .await?;
    expect_error(&mut ann.ws, "unknown_peer", "offer").await?;
    send(
        &mut ann.ws,
        json!({"type": "answer", "peerId": "p-nobody", "sdp": "v=0"}),
    )
    .await?;
    expect_error(&mut ann.ws, "unknown_peer", "answer").await?;
    send(
        &mut ann.ws,
        json!({"type": "ice-candidate", "peerId": ann.id, "candidate": null}),
    )
    .await?;
    expect_error(&mut ann.ws, "invalid_state", "ice-candidate").await?;
    // The server takes no media in a settled mesh.
    send(
        &mut ann.ws,
        json!({"type": "offer", "peerId": "sfu", "transport": "publish", "sdp": "v=0"}),
    )
    .await?;
    expect_error(&mut ann.ws, "invalid_state", "offer").await?;
    send(
        &mut ann.ws,
        json!({"type": "offer", "peerId": bob.id, "sdp": "v=0", "tracks": [{"trackId": "x", "source": "hologram"}]}),
    )
    .await?;
    expect_error(&mut ann.ws, "bad_request", "offer").await?;

    // Nothing of that reached bob, and the room still relays.
    send(
        &mut ann.ws,
        json!({"type": "offer", "peerId": bob.id, "sdp": "v=0 real"}),
    )
    .await?;
    let offer = recv(&mut bob.ws, WAIT).await?;
    ensure!(
        offer["type"] == "offer" && offer["sdp"] == "v=0 real",
        "bob's next message: {offer}"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn relaying_is_rate_limited_per_participant() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let (mut ann, _) = join(&server, "flood", "ann").await?;
    let (mut bob, _) = join(&server, "flood", "bob").await?;
    for i in 0..150 {
        let candidate = json!({"candidate": format!("candidate:{i} 1 udp 1 127.0.0.1 {} typ host", 40000 + i), "sdpMid": "0"});
        send(
            &mut ann.ws,
            json!({"type": "ice-candidate", "peerId": bob.id, "candidate": candidate}),
        )
        .await?;
    }
    let refused = drain(&mut ann.ws, Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|m| m["type"] == "error" && m["code"] == "rate_limited")
        .count();
    let relayed = drain(&mut bob.ws, Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|m| m["type"] == "ice-candidate")
        .count();
    ensure!(
        relayed + refused == 150,
        "every message relayed or refused: {relayed} + {refused}"
    );
    ensure!(
        (100..=110).contains(&relayed),
        "a burst of 100 passes, the rest is refused: {relayed} relayed"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_fourth_participant_switches_to_sfu_and_the_room_returns_to_mesh_after_the_hold()
-> Result<()> {
    let server = start_mesh_server(3, 1).await?;
    let mut peers = Vec::new();
    for name in ["ann", "bob", "cat"] {
        let (peer, joined) = join(&server, "grow", name).await?;
        ensure!(joined["mode"] == "mesh", "{name}: {joined}");
        peers.push(peer);
    }
    let (mut dan, joined) = join(&server, "grow", "dan").await?;
    ensure!(
        joined["mode"] == "sfu",
        "the fourth goes straight to sfu: {joined}"
    );
    for peer in &mut peers {
        // The switch comes before the newcomer's arrival: nobody offers it a mesh connection.
        loop {
            let message = recv(&mut peer.ws, WAIT).await?;
            ensure!(
                message["peerId"] != dan.id.as_str(),
                "dan announced before the switch: {message}"
            );
            if message["type"] == "mode" {
                ensure!(
                    message["mode"] == "sfu" && message["phase"] == "switching",
                    "{message}"
                );
                break;
            }
        }
        let arrival = recv(&mut peer.ws, WAIT).await?;
        ensure!(
            arrival["type"] == "peer_joined" && arrival["peerId"] == dan.id.as_str(),
            "{arrival}"
        );
    }
    // While switching, both paths work: mesh relaying and the server's connections.
    let bob_id = peers[1].id.clone();
    send(
        &mut peers[0].ws,
        json!({"type": "offer", "peerId": bob_id, "sdp": "v=0 renegotiate"}),
    )
    .await?;
    let offer = recv_type(&mut peers[1].ws, "offer", WAIT).await?;
    ensure!(offer["sdp"] == "v=0 renegotiate", "{offer}");

    // The switch settles when the three who were in the mesh receive everyone through the SFU.
    for peer in peers.iter_mut().take(2) {
        send(&mut peer.ws, json!({"type": "ready", "mode": "sfu"})).await?;
    }
    let early = drain(&mut dan.ws, Duration::from_millis(300)).await;
    ensure!(
        !early
            .iter()
            .any(|m| m["type"] == "mode" && m["phase"] == "settled"),
        "no settle before the last ready: {early:?}"
    );
    send(&mut peers[2].ws, json!({"type": "ready", "mode": "sfu"})).await?;
    for peer in &mut peers {
        expect_mode(peer, "sfu", "settled", WAIT).await?;
    }
    expect_mode(&mut dan, "sfu", "settled", WAIT).await?;
    let room = room_json(&server, "grow").await?;
    ensure!(
        room["mode"] == "sfu" && room["switching"] == false && room["switchesToSfu"] == 1,
        "{room}"
    );
    // Settled in sfu: peers no longer negotiate with each other.
    send(
        &mut peers[0].ws,
        json!({"type": "offer", "peerId": bob_id, "sdp": "v=0"}),
    )
    .await?;
    expect_error(&mut peers[0].ws, "invalid_state", "offer").await?;

    // The fourth leaves (its socket closes): after the hold (1 s) the room switches back.
    drop(dan);
    let left_at = Instant::now();
    for peer in &mut peers {
        recv_type(&mut peer.ws, "peer_left", WAIT).await?;
    }
    for peer in &mut peers {
        expect_mode(peer, "mesh", "switching", WAIT).await?;
    }
    let held = left_at.elapsed();
    ensure!(
        held >= Duration::from_millis(900),
        "mesh again only after the hold: {held:?}"
    );
    for peer in &mut peers {
        send(&mut peer.ws, json!({"type": "ready", "mode": "mesh"})).await?;
    }
    for peer in &mut peers {
        expect_mode(peer, "mesh", "settled", WAIT).await?;
    }
    let room = room_json(&server, "grow").await?;
    ensure!(
        room["mode"] == "mesh" && room["switchesToSfu"] == 1 && room["switchesToMesh"] == 1,
        "{room}"
    );
    // Settled in mesh, the server's connections are gone: `sfu` is refused again.
    send(
        &mut peers[0].ws,
        json!({"type": "offer", "peerId": "sfu", "transport": "publish", "sdp": "v=0"}),
    )
    .await?;
    expect_error(&mut peers[0].ws, "invalid_state", "offer").await?;
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains(r#"switchboard_mode_switches_total{to="sfu"} 1"#)
            && metrics.contains(r#"switchboard_mode_switches_total{to="mesh"} 1"#)
            && !metrics.contains("grow")
            && metrics.contains(r#"switchboard_rooms_by_mode{mode="mesh"} 1"#),
        "metrics show the room's mode and switches, not its name:\n{metrics}"
    );
    // The totals outlive the room.
    drop(peers);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.state().rooms.rooms().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        server.state().rooms.switch_totals() == (1, 1),
        "switch totals of a closed room"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn leaving_and_rejoining_within_the_hold_switches_nothing() -> Result<()> {
    let server = start_mesh_server(3, 3).await?;
    let mut peers = Vec::new();
    for name in ["ann", "bob", "cat", "dan"] {
        peers.push(join(&server, "flap", name).await?.0);
    }
    for peer in peers.iter_mut().take(3) {
        send(&mut peer.ws, json!({"type": "ready", "mode": "sfu"})).await?;
    }
    expect_mode(&mut peers[0], "sfu", "switching", WAIT).await?;
    expect_mode(&mut peers[0], "sfu", "settled", WAIT).await?;
    for round in 0..3 {
        let dan = peers.pop().expect("dan");
        drop(dan);
        peers.push(join(&server, "flap", "dan").await?.0);
        let seen = drain(&mut peers[0].ws, Duration::from_millis(300)).await;
        ensure!(
            !seen.iter().any(|m| m["type"] == "mode"),
            "round {round}: no mode change: {seen:?}"
        );
    }
    // Past the first leave's hold time: still sfu, with four in the room.
    let seen = drain(&mut peers[0].ws, Duration::from_secs(3)).await;
    ensure!(!seen.iter().any(|m| m["type"] == "mode"), "{seen:?}");
    let room = room_json(&server, "flap").await?;
    ensure!(
        room["mode"] == "sfu" && room["switchesToSfu"] == 1 && room["switchesToMesh"] == 0,
        "{room}"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_participant_that_never_reports_ready_delays_the_switch_by_the_timeout_only() -> Result<()>
{
    let server = start_mesh_server(1, 10).await?;
    let (mut ann, joined) = join(&server, "stuck", "ann").await?;
    ensure!(joined["mode"] == "mesh", "{joined}");
    let started = Instant::now();
    let (bob, joined) = join(&server, "stuck", "bob").await?;
    ensure!(joined["mode"] == "sfu", "{joined}");
    let bob = keep_alive(bob.ws);
    expect_mode(&mut ann, "sfu", "switching", WAIT).await?;
    // ann never says `ready`.
    expect_mode_patiently(&mut ann, "sfu", "settled", Duration::from_secs(15)).await?;
    bob.abort();
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(13),
        "settled by the 10 s timeout: {waited:?}"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_failed_mesh_moves_the_room_to_sfu_for_good() -> Result<()> {
    let server = start_mesh_server(3, 1).await?;
    let (mut ann, _) = join(&server, "nat", "ann").await?;
    let (mut bob, _) = join(&server, "nat", "bob").await?;
    send(
        &mut ann.ws,
        json!({"type": "mesh_failed", "peerId": bob.id}),
    )
    .await?;
    for peer in [&mut ann, &mut bob] {
        expect_mode(peer, "sfu", "switching", WAIT).await?;
        send(&mut peer.ws, json!({"type": "ready", "mode": "sfu"})).await?;
    }
    expect_mode(&mut ann, "sfu", "settled", WAIT).await?;
    // Two participants, hold 1 s: a room that could mesh, but will not try again.
    let seen = drain(&mut ann.ws, Duration::from_secs(2)).await;
    ensure!(!seen.iter().any(|m| m["type"] == "mode"), "{seen:?}");
    let room = room_json(&server, "nat").await?;
    ensure!(
        room["mode"] == "sfu" && room["meshBlocked"] == true,
        "{room}"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_mesh_link_given_up_while_the_room_is_in_sfu_blocks_nothing() -> Result<()> {
    let server = start_mesh_server(2, 1).await?;
    let (mut ann, _) = join(&server, "late", "ann").await?;
    let (mut bob, _) = join(&server, "late", "bob").await?;
    let (cat, _) = join(&server, "late", "cat").await?;
    // During the switch to SFU, then once settled: a mesh link left over from before the switch
    // times out on ann's side. Neither report may pin the room to SFU.
    expect_mode(&mut ann, "sfu", "switching", WAIT).await?;
    send(
        &mut ann.ws,
        json!({"type": "mesh_failed", "peerId": bob.id}),
    )
    .await?;
    for peer in [&mut ann, &mut bob] {
        send(&mut peer.ws, json!({"type": "ready", "mode": "sfu"})).await?;
    }
    expect_mode(&mut ann, "sfu", "settled", WAIT).await?;
    send(
        &mut ann.ws,
        json!({"type": "mesh_failed", "peerId": bob.id}),
    )
    .await?;
    let room = room_json(&server, "late").await?;
    ensure!(room["meshBlocked"] == false, "{room}");
    let bob_alive = keep_alive(bob.ws);
    drop(cat);
    // The hold (1 s) passes and the room returns to mesh as usual.
    expect_mode_patiently(&mut ann, "mesh", "switching", Duration::from_secs(5)).await?;
    bob_alive.abort();
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_ready_that_names_another_switch_is_not_counted() -> Result<()> {
    let server = start_mesh_server(1, 10).await?;
    let (mut ann, _) = join(&server, "numbered", "ann").await?;
    let (_bob, joined) = join(&server, "numbered", "bob").await?;
    ensure!(joined["mode"] == "sfu", "{joined}");
    let switching = recv_type(&mut ann.ws, "mode", WAIT).await?;
    ensure!(switching["phase"] == "switching", "{switching}");
    let number = switching["switch"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("`mode` without a switch number: {switching}"))?;
    // A `ready` left over from an earlier switch to the same mode: not this switch's.
    send(
        &mut ann.ws,
        json!({"type": "ready", "mode": "sfu", "switch": number - 1}),
    )
    .await?;
    let seen = drain(&mut ann.ws, Duration::from_millis(500)).await;
    ensure!(
        !seen.iter().any(|m| m["type"] == "mode"),
        "settled on a stale ready: {seen:?}"
    );
    send(
        &mut ann.ws,
        json!({"type": "ready", "mode": "sfu", "switch": number}),
    )
    .await?;
    let settled = recv_type(&mut ann.ws, "mode", WAIT).await?;
    ensure!(
        settled["phase"] == "settled" && settled["switch"] == number,
        "{settled}"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_switch_to_mesh_nobody_confirms_goes_back_to_sfu() -> Result<()> {
    let server = start_mesh_server(2, 1).await?;
    let (mut ann, _) = join(&server, "unreachable", "ann").await?;
    let (mut bob, _) = join(&server, "unreachable", "bob").await?;
    let (cat, _) = join(&server, "unreachable", "cat").await?;
    for peer in [&mut ann, &mut bob] {
        expect_mode(peer, "sfu", "switching", WAIT).await?;
        send(&mut peer.ws, json!({"type": "ready", "mode": "sfu"})).await?;
    }
    expect_mode(&mut ann, "sfu", "settled", WAIT).await?;
    // Bob stays alive and confirms SFU switches only, as a client whose mesh never connects.
    let mut bob_ws = bob.ws;
    let bob = tokio::spawn(async move {
        loop {
            match recv(&mut bob_ws, Duration::from_secs(1)).await {
                Ok(m) if m["type"] == "mode" && m["mode"] == "sfu" && m["phase"] == "switching" => {
                    let _ = send(&mut bob_ws, json!({"type": "ready", "mode": "sfu"})).await;
                }
                Ok(_) => {}
                Err(_) => {
                    if bob_ws
                        .send(Message::Ping(Default::default()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    drop(cat);
    expect_mode_patiently(&mut ann, "mesh", "switching", Duration::from_secs(5)).await?;
    // Nobody reports `ready` for mesh: after the 10 s timeout the room returns to SFU.
    expect_mode_patiently(&mut ann, "sfu", "switching", Duration::from_secs(13)).await?;
    send(&mut ann.ws, json!({"type": "ready", "mode": "sfu"})).await?;
    expect_mode(&mut ann, "sfu", "settled", WAIT).await?;
    let room = room_json(&server, "unreachable").await?;
    ensure!(
        room["mode"] == "sfu" && room["meshBlocked"] == true && room["switchesToMesh"] == 1,
        "{room}"
    );
    bob.abort();
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn relayed_bytes_are_limited_too() -> Result<()> {
    let server = start_mesh_server(3, 10).await?;
    let (mut ann, _) = join(&server, "bytes", "ann").await?;
    let (bob, _) = join(&server, "bytes", "bob").await?;
    let bob_id = bob.id.clone();
    let bob = keep_alive(bob.ws);
    let sdp = "a".repeat(60_000);
    for _ in 0..12 {
        send(
            &mut ann.ws,
            json!({"type": "offer", "peerId": bob_id, "sdp": sdp}),
        )
        .await?;
    }
    let refused = drain(&mut ann.ws, Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|m| m["code"] == "rate_limited")
        .count();
    // 512 KiB in a burst: eight 60 KB offers pass, the rest is refused.
    ensure!(refused == 4, "{refused} of 12 large offers refused");
    bob.abort();
    server.shutdown().await?;
    Ok(())
}
