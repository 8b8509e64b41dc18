//! The lobby and calls (docs/protocol.md, section 12): who is online, live; a call accepted
//! becomes a room of two that both join with the tokens they are given, and either may invite a
//! third person into it; declined, cancelled, busy, unavailable and unanswered calls end with
//! that reason on both sides; and what is not theirs to do gets a clear error.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use support::{Ws, connect, connect_granting, recv_type, send};

const WAIT: Duration = Duration::from_secs(5);

async fn server(call_timeout_secs: u64) -> Result<signaling::Server> {
    let config = signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        call_timeout_secs,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    Ok(signaling::Server::start(config).await?)
}

/// A socket in the lobby as `name`, and its lobby id.
async fn online(server: &signaling::Server, name: &str) -> Result<(Ws, String, Value)> {
    let mut ws = connect_granting(server, name, "lobby", json!({"lobby": true})).await?;
    send(&mut ws, json!({"type": "lobby", "name": name})).await?;
    let joined = recv_type(&mut ws, "lobby_joined", WAIT).await?;
    let id = joined["peerId"].as_str().unwrap_or_default().to_owned();
    ensure!(id.starts_with("l-"), "no lobby id in {joined}");
    Ok((ws, id, joined))
}

async fn expect_error(ws: &mut Ws, code: &str, request: &str) -> Result<Value> {
    let reply = recv_type(ws, "error", WAIT).await?;
    ensure!(
        reply["code"] == code && reply["requestType"] == request,
        "expected `{code}` for `{request}`, got {reply}"
    );
    Ok(reply)
}

/// `caller` calls `callee_id`: the call's id, once the callee hears it ring from `caller_name`.
async fn ring(
    caller: &mut Ws,
    callee: &mut Ws,
    callee_id: &str,
    caller_name: &str,
) -> Result<String> {
    send(caller, json!({"type": "call", "peerId": callee_id})).await?;
    let calling = recv_type(caller, "calling", WAIT).await?;
    let incoming = recv_type(callee, "incoming_call", WAIT).await?;
    ensure!(
        calling["callId"] == incoming["callId"] && incoming["name"] == caller_name,
        "calling {calling} and incoming {incoming} disagree"
    );
    Ok(calling["callId"].as_str().unwrap_or_default().to_owned())
}

async fn ended(ws: &mut Ws, call: &str, reason: &str) -> Result<()> {
    let end = recv_type(ws, "call_ended", WAIT).await?;
    ensure!(
        end["callId"] == call && end["reason"] == reason,
        "expected call {call} to end `{reason}`, got {end}"
    );
    Ok(())
}

/// Joins `room` with a token from `call_accepted`.
async fn join_call(server: &signaling::Server, token: &str, name: &str) -> Result<(Ws, Value)> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/signal?token={token}", server.addr))
            .await?;
    send(&mut ws, json!({"type": "join", "name": name})).await?;
    let joined = recv_type(&mut ws, "joined", WAIT).await?;
    Ok((ws, joined))
}

#[tokio::test]
async fn who_is_online_is_seen_live() -> Result<()> {
    let server = server(30).await?;
    let (mut alice, alice_id, joined) = online(&server, "Alice").await?;
    ensure!(joined["online"] == json!([]), "nobody else yet: {joined}");
    let (mut bob, bob_id, joined) = online(&server, "Bob").await?;
    ensure!(
        joined["online"] == json!([{"peerId": alice_id, "name": "Alice"}]),
        "Bob sees Alice: {joined}"
    );
    let came = recv_type(&mut alice, "online", WAIT).await?;
    ensure!(
        came["peerId"] == bob_id && came["name"] == "Bob",
        "Alice sees Bob come: {came}"
    );
    // Names are unique in the lobby, whatever their case.
    let mut other = connect_granting(&server, "bob2", "lobby", json!({"lobby": true})).await?;
    send(&mut other, json!({"type": "lobby", "name": "BOB"})).await?;
    expect_error(&mut other, "name_taken", "lobby").await?;
    send(&mut bob, json!({"type": "leave"})).await?;
    let gone = recv_type(&mut alice, "offline", WAIT).await?;
    ensure!(gone["peerId"] == bob_id, "Alice sees Bob go: {gone}");
    // A socket that drops goes offline too.
    let (carol, carol_id, _) = online(&server, "Carol").await?;
    recv_type(&mut alice, "online", WAIT).await?;
    drop(carol);
    let gone = recv_type(&mut alice, "offline", WAIT).await?;
    ensure!(gone["peerId"] == carol_id, "Alice sees Carol drop: {gone}");
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn the_lobby_needs_its_grant_and_calls_need_the_lobby() -> Result<()> {
    let server = server(30).await?;
    let mut plain = connect(&server, "mallory", "lobby").await?;
    send(&mut plain, json!({"type": "lobby", "name": "Mallory"})).await?;
    expect_error(&mut plain, "not_allowed", "lobby").await?;
    send(
        &mut plain,
        json!({"type": "call", "peerId": "l-000000000000"}),
    )
    .await?;
    expect_error(&mut plain, "invalid_state", "call").await?;
    let (mut alice, alice_id, _) = online(&server, "Alice").await?;
    send(&mut alice, json!({"type": "call", "peerId": alice_id})).await?;
    expect_error(&mut alice, "invalid_state", "call").await?;
    send(
        &mut alice,
        json!({"type": "call", "peerId": "l-000000000000"}),
    )
    .await?;
    expect_error(&mut alice, "unknown_peer", "call").await?;
    let long = "x".repeat(65);
    send(&mut alice, json!({"type": "call", "peerId": long})).await?;
    expect_error(&mut alice, "bad_request", "call").await?;
    send(&mut alice, json!({"type": "accept_call", "callId": "c-1"})).await?;
    expect_error(&mut alice, "invalid_state", "accept_call").await?;
    // In the lobby, a socket is not in a room.
    send(&mut alice, json!({"type": "join", "name": "Alice"})).await?;
    expect_error(&mut alice, "invalid_state", "join").await?;
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn an_accepted_call_is_a_room_of_two_and_a_third_can_be_invited() -> Result<()> {
    let server = server(30).await?;
    let (mut alice, _, _) = online(&server, "Alice").await?;
    let (mut bob, bob_id, _) = online(&server, "Bob").await?;
    let (mut carol, carol_id, _) = online(&server, "Carol").await?;
    let call = ring(&mut alice, &mut bob, &bob_id, "Alice").await?;
    // Only the callee answers.
    send(&mut alice, json!({"type": "accept_call", "callId": call})).await?;
    expect_error(&mut alice, "invalid_state", "accept_call").await?;
    send(&mut bob, json!({"type": "accept_call", "callId": call})).await?;
    let for_alice = recv_type(&mut alice, "call_accepted", WAIT).await?;
    let for_bob = recv_type(&mut bob, "call_accepted", WAIT).await?;
    ensure!(
        for_alice["room"] == for_bob["room"] && for_alice["token"] != for_bob["token"],
        "one room, a token each: {for_alice} {for_bob}"
    );
    let room = for_alice["room"].as_str().unwrap_or_default().to_owned();
    let (mut alice_call, joined) = join_call(
        &server,
        for_alice["token"].as_str().unwrap_or_default(),
        "Alice",
    )
    .await?;
    ensure!(
        joined["room"] == room && joined["mode"] == "mesh",
        "{joined}"
    );
    let (_bob_call, joined) = join_call(
        &server,
        for_bob["token"].as_str().unwrap_or_default(),
        "Bob",
    )
    .await?;
    ensure!(
        joined["mode"] == "mesh" && joined["peers"][0]["name"] == "Alice",
        "Bob meets Alice in a mesh of two: {joined}"
    );
    // Bob is in a call now: Carol's call to him ends `busy` at once.
    send(&mut carol, json!({"type": "call", "peerId": bob_id})).await?;
    let calling = recv_type(&mut carol, "calling", WAIT).await?;
    let busy = calling["callId"].as_str().unwrap_or_default().to_owned();
    ended(&mut carol, &busy, "busy").await?;
    // Only a call's room can be invited into: not an ordinary room, even one the caller is in.
    let mut standup = connect_granting(&server, "Carol", "standup", json!({})).await?;
    send(&mut standup, json!({"type": "join", "name": "Carol"})).await?;
    recv_type(&mut standup, "joined", WAIT).await?;
    send(
        &mut carol,
        json!({"type": "call", "peerId": bob_id, "room": "standup"}),
    )
    .await?;
    expect_error(&mut carol, "not_allowed", "call").await?;
    // Carol cannot invite into a room she is not in.
    send(
        &mut carol,
        json!({"type": "call", "peerId": bob_id, "room": room}),
    )
    .await?;
    expect_error(&mut carol, "not_allowed", "call").await?;
    // Alice invites Carol into the call.
    send(
        &mut alice,
        json!({"type": "call", "peerId": carol_id, "room": room}),
    )
    .await?;
    let calling = recv_type(&mut alice, "calling", WAIT).await?;
    let incoming = recv_type(&mut carol, "incoming_call", WAIT).await?;
    ensure!(
        calling["callId"] == incoming["callId"],
        "{calling} {incoming}"
    );
    send(
        &mut carol,
        json!({"type": "accept_call", "callId": incoming["callId"]}),
    )
    .await?;
    let for_carol = recv_type(&mut carol, "call_accepted", WAIT).await?;
    ensure!(
        for_carol["room"] == room,
        "Carol is invited into the call: {for_carol}"
    );
    let (_carol_call, joined) = join_call(
        &server,
        for_carol["token"].as_str().unwrap_or_default(),
        "Carol",
    )
    .await?;
    ensure!(
        joined["peers"].as_array().map(Vec::len) == Some(2),
        "Carol meets both: {joined}"
    );
    let arrived = recv_type(&mut alice_call, "peer_joined", WAIT).await?;
    ensure!(arrived["name"] == "Bob", "{arrived}");
    let arrived = recv_type(&mut alice_call, "peer_joined", WAIT).await?;
    ensure!(arrived["name"] == "Carol", "{arrived}");
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn calls_end_declined_cancelled_busy_unavailable_or_unanswered() -> Result<()> {
    let server = server(1).await?;
    let (mut alice, _, _) = online(&server, "Alice").await?;
    let (mut bob, bob_id, _) = online(&server, "Bob").await?;
    let (mut carol, _, _) = online(&server, "Carol").await?;

    let call = ring(&mut alice, &mut bob, &bob_id, "Alice").await?;
    send(&mut bob, json!({"type": "decline_call", "callId": call})).await?;
    ended(&mut alice, &call, "declined").await?;
    ended(&mut bob, &call, "declined").await?;

    let call = ring(&mut alice, &mut bob, &bob_id, "Alice").await?;
    // One ringing call at a time: Alice cannot call again, and Bob, ringing, is busy.
    send(&mut alice, json!({"type": "call", "peerId": bob_id})).await?;
    expect_error(&mut alice, "invalid_state", "call").await?;
    send(&mut carol, json!({"type": "call", "peerId": bob_id})).await?;
    let calling = recv_type(&mut carol, "calling", WAIT).await?;
    let busy = calling["callId"].as_str().unwrap_or_default().to_owned();
    ended(&mut carol, &busy, "busy").await?;
    // Only the caller cancels.
    send(&mut bob, json!({"type": "cancel_call", "callId": call})).await?;
    expect_error(&mut bob, "invalid_state", "cancel_call").await?;
    send(&mut alice, json!({"type": "cancel_call", "callId": call})).await?;
    ended(&mut alice, &call, "cancelled").await?;
    ended(&mut bob, &call, "cancelled").await?;

    // Nobody answers: both hear `timeout` after call_timeout_secs (1 s here).
    let call = ring(&mut alice, &mut bob, &bob_id, "Alice").await?;
    ended(&mut alice, &call, "timeout").await?;
    ended(&mut bob, &call, "timeout").await?;
    send(&mut bob, json!({"type": "accept_call", "callId": call})).await?;
    expect_error(&mut bob, "invalid_state", "accept_call").await?;

    // A fourth call to Bob within the minute: Bob is not rung again.
    send(&mut alice, json!({"type": "call", "peerId": bob_id})).await?;
    expect_error(&mut alice, "rate_limited", "call").await?;

    // The callee goes offline while it rings: `unavailable` for the caller.
    let call = ring(&mut carol, &mut bob, &bob_id, "Carol").await?;
    drop(bob);
    ended(&mut carol, &call, "unavailable").await?;
    server.shutdown().await?;
    Ok(())
}
