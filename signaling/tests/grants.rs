//! A token's `publish` and `subscribe` grants, held by the server: a viewer's offers to publish
//! are refused and it still receives; a participant denied subscribing is offered nothing while
//! others receive; and a mesh, where the server could hold nobody to a grant, is never used while
//! such a participant is in the room.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use support::{TestClient, connect_granting, recv_type, send, start_mesh_server, start_server};

const WAIT: Duration = Duration::from_secs(5);

async fn expect_error(client: &mut TestClient, code: &str, request: &str) -> Result<Value> {
    let reply = client.wait_for("error", WAIT).await?;
    ensure!(
        reply["code"] == code && reply["requestType"] == request,
        "expected `{code}` for `{request}`, got {reply}"
    );
    Ok(reply)
}

#[tokio::test]
async fn publish_and_subscribe_grants_are_held_by_the_server() -> Result<()> {
    let server = start_server(10).await?;
    let mut host = TestClient::join(&server, "town-hall", "host").await?;
    let mut viewer =
        TestClient::join_granted(&server, "town-hall", "viewer", json!({"publish": false})).await?;
    let mut blind =
        TestClient::join_granted(&server, "town-hall", "blind", json!({"subscribe": false}))
            .await?;
    ensure!(
        viewer.joined["grants"]["publish"] == false && viewer.joined["grants"]["subscribe"] == true,
        "joined says what the token allows: {}",
        viewer.joined
    );
    ensure!(host.joined["grants"]["publish"] == true, "{}", host.joined);

    // The viewer may not send: an offer with audio or video on the publish connection and a
    // mute are refused (an offer of the relay data channel alone is allowed: tests/relay.rs).
    viewer.send(json!({
        "type": "offer", "peerId": "sfu", "transport": "publish",
        "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    }))?;
    expect_error(&mut viewer, "not_allowed", "offer").await?;
    viewer.send(json!({"type": "mute", "trackId": "cam", "muted": true}))?;
    expect_error(&mut viewer, "not_allowed", "mute").await?;

    // The host's media reaches the viewer, not the participant denied subscribing.
    host.publish().await?;
    host.audio_until_received(&mut viewer).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let offer = blind.subscribe_offer().await;
    ensure!(
        offer
            .as_deref()
            .is_none_or(|sdp| !sdp.contains("m=audio") && !sdp.contains("m=video")),
        "a participant without `subscribe` was offered media: {offer:?}"
    );
    ensure!(
        blind.media.try_recv().is_err(),
        "a participant without `subscribe` was sent media"
    );
    // It may still publish, and the others receive it.
    blind.publish().await?;
    blind.audio_until_received(&mut host).await?;
    ensure!(
        blind.subscribe_offer().await.is_none(),
        "nothing is offered to it after it publishes either"
    );
    for client in [host, viewer, blind] {
        client.leave().await?;
    }
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_participant_the_mesh_cannot_hold_keeps_the_room_on_the_server() -> Result<()> {
    let server = start_mesh_server(3, 1).await?;
    let mut ann = connect_granting(&server, "ann", "pair", json!({})).await?;
    send(&mut ann, json!({"type": "join", "name": "Ann"})).await?;
    let joined = recv_type(&mut ann, "joined", WAIT).await?;
    ensure!(joined["mode"] == "mesh", "{joined}");
    let ann_id = joined["participantId"].clone();

    let mut viewer = connect_granting(&server, "v", "pair", json!({"publish": false})).await?;
    send(&mut viewer, json!({"type": "join", "name": "Viewer"})).await?;
    let joined = recv_type(&mut viewer, "joined", WAIT).await?;
    ensure!(
        joined["mode"] == "sfu",
        "a room of two with a viewer is an SFU room: {joined}"
    );
    let switch = recv_type(&mut ann, "mode", WAIT).await?;
    ensure!(
        switch["mode"] == "sfu" && switch["phase"] == "switching",
        "{switch}"
    );
    // The viewer cannot reach Ann peer to peer, not even during the switch.
    send(
        &mut viewer,
        json!({"type": "offer", "peerId": ann_id, "sdp": "v=0"}),
    )
    .await?;
    let refused = recv_type(&mut viewer, "error", WAIT).await?;
    ensure!(refused["code"] == "not_allowed", "{refused}");

    // Once the viewer has left, the room of one returns to mesh after the hold (1 s).
    drop(viewer);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let message =
            tokio::time::timeout_at(deadline, recv_type(&mut ann, "mode", WAIT)).await??;
        if message["mode"] == "mesh" && message["phase"] == "settled" {
            break;
        }
    }
    server.shutdown().await?;
    Ok(())
}
