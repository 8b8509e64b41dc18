//! A publisher names its tracks in `tracks`; the server must find each one whatever the SDP
//! says of it. Firefox's `a=msid` track ids are its own (not `MediaStreamTrack.id`), GStreamer
//! puts msid only on `a=ssrc` lines: the `mid` of each entry identifies the media section, and
//! the msid track id is the fallback. Subscribers must see the right source (a screen share as
//! `screen`) and the publisher's mutes must name the publication.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use bytes::Bytes;
use serde_json::{Value, json};
use support::{Event, TestClient, start_server, write};

fn source_of(local_track_id: &str) -> &'static str {
    match local_track_id {
        "mic" => "microphone",
        "screen" => "screen",
        _ => "camera",
    }
}

/// Publishes with `munge` and `declare` (see [`TestClient::publish_described`]), then checks
/// that a subscriber is offered every track under the declared name and source, and that a
/// `mute` of the screen (by its declared name) reaches it with the screen's publication.
async fn publish_and_check(
    room: &str,
    munge: impl Fn(&str) -> String,
    declare: impl Fn(&str, &str) -> Value,
    declared_name: impl Fn(&str) -> String,
) -> Result<()> {
    let server = start_server(100).await?;
    let mut publisher = TestClient::join(&server, room, "presenter").await?;
    let mut subscriber = TestClient::join(&server, room, "viewer").await?;
    publisher.publish_described(munge, declare).await?;
    let (audio_pt, video_pt) = publisher.payload_types().await?;
    let tracks = [
        (publisher.audio.clone(), audio_pt),
        (publisher.video.clone(), video_pt),
        (publisher.screen.clone(), video_pt),
    ];

    // Media makes the publications start; wait until the subscriber is offered all three.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut offered: HashMap<String, Value> = HashMap::new();
    let mut seq = 0u16;
    while offered.len() < 3 {
        ensure!(
            Instant::now() < deadline,
            "offered within 20 s: {:?}",
            offered.values().collect::<Vec<_>>()
        );
        for (track, pt) in &tracks {
            let track = track.as_ref().ok_or_else(|| anyhow!("not publishing"))?;
            let payload = Bytes::from(vec![0x10, 0x00, (seq % 256) as u8]);
            write(track, *pt, seq, u32::from(seq) * 3000, payload).await?;
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok(Event::Message(message)) = subscriber.events.try_recv() {
            if message["type"] == "offer" {
                for sub in message["subscriptions"].as_array().into_iter().flatten() {
                    let source = sub["source"].as_str().unwrap_or_default().to_owned();
                    offered.insert(source, sub.clone());
                }
            }
        }
    }
    for local in ["mic", "cam", "screen"] {
        let source = source_of(local);
        let sub = offered
            .get(source)
            .ok_or_else(|| anyhow!("no `{source}` offered: {offered:?}"))?;
        ensure!(
            sub["trackId"] == declared_name(local).as_str(),
            "`{source}` offered as {sub}, declared as {}",
            declared_name(local)
        );
        ensure!(sub["peerId"] == publisher.participant_id.as_str(), "{sub}");
    }

    publisher.send(json!({"type": "mute", "trackId": declared_name("screen"), "muted": true}))?;
    let mute = subscriber.wait_for("mute", Duration::from_secs(5)).await?;
    ensure!(mute["muted"] == true, "{mute}");
    ensure!(mute["source"] == "screen", "{mute}");
    ensure!(
        mute["publicationId"] == offered["screen"]["publicationId"],
        "{mute} names another publication than the screen's {}",
        offered["screen"]
    );
    server.shutdown().await?;
    Ok(())
}

/// Firefox's shape: `a=msid:{stream uuid} {track uuid}`, on the section and on `a=ssrc` lines
/// alike, while the app names the track by `MediaStreamTrack.id` and its `mid`.
fn firefox_msid(sdp: &str) -> String {
    sdp.replace(
        "test-stream mic",
        "{7d1c4a2e-1f3b-4c5d-9e8f-0a1b2c3d4e5f} {0b8f6a52-3c1d-4e2f-8a9b-1c2d3e4f5a6b}",
    )
    .replace(
        "test-stream cam",
        "{7d1c4a2e-1f3b-4c5d-9e8f-0a1b2c3d4e5f} {5e4d3c2b-1a09-4f8e-b7d6-c5b4a3928170}",
    )
    .replace(
        "test-stream screen",
        "{9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d} {c0ffee00-1234-4abc-9def-0123456789ab}",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracks_whose_msid_differs_from_their_name_are_found_by_mid() -> Result<()> {
    publish_and_check(
        "firefox-shape",
        |sdp| {
            let munged = firefox_msid(sdp);
            assert!(
                !munged.lines().any(|l| l.contains("msid:test-stream")),
                "every msid rewritten: {munged}"
            );
            munged
        },
        |local, mid| json!({"trackId": format!("js-{local}"), "source": source_of(local), "mid": mid}),
        |local| format!("js-{local}"),
    )
    .await
}

/// GStreamer's shape: no `a=msid` line, msid only as `a=ssrc:<ssrc> msid:<stream> <track>`.
fn msid_only_on_ssrc_lines(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        if !line.starts_with("a=msid:") {
            out.push_str(line);
        }
    }
    assert!(out.contains(" msid:test-stream screen"), "ssrc msid kept");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracks_with_msid_only_on_ssrc_lines_are_found_by_mid() -> Result<()> {
    publish_and_check(
        "ssrc-msid-mid",
        msid_only_on_ssrc_lines,
        |local, mid| json!({"trackId": format!("gst-{local}"), "source": source_of(local), "mid": mid}),
        |local| format!("gst-{local}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracks_with_msid_only_on_ssrc_lines_are_found_by_that_msid_without_a_mid() -> Result<()> {
    publish_and_check(
        "ssrc-msid-only",
        msid_only_on_ssrc_lines,
        |local, _mid| json!({"trackId": local, "source": source_of(local)}),
        |local| local.to_owned(),
    )
    .await
}
