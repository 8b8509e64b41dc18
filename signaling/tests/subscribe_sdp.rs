//! The subscribe connection as docs/protocol.md describes it: a newcomer's first offer carries
//! everything already published; each live section is `sendonly` from the server with its msid
//! and SSRC, and no header extension is negotiated; an ended publication's section goes
//! `inactive`, with no SSRC, and leaves `subscriptions`.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use bytes::Bytes;
use serde_json::Value;
use support::{Event, TestClient, start_server, write};

/// The media section whose `a=mid` is `mid`, as lines.
fn section<'a>(sdp: &'a str, mid: &str) -> Option<Vec<&'a str>> {
    let mut sections: Vec<Vec<&str>> = Vec::new();
    for line in sdp.lines() {
        if line.starts_with("m=") {
            sections.push(Vec::new());
        }
        if let Some(current) = sections.last_mut() {
            current.push(line.trim_end());
        }
    }
    let wanted = format!("a=mid:{mid}");
    sections.into_iter().find(|s| s.contains(&wanted.as_str()))
}

/// The next subscribe offer the client received.
async fn next_offer(client: &mut TestClient, timeout: Duration) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, client.events.recv()).await {
            Err(_) => anyhow::bail!("no subscribe offer within {timeout:?}"),
            Ok(None) | Ok(Some(Event::Closed)) => anyhow::bail!("socket closed"),
            Ok(Some(Event::Message(m))) if m["type"] == "offer" => return Ok(m),
            Ok(Some(Event::Message(_))) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_gets_everything_published_in_its_first_offer_as_documented() -> Result<()> {
    let server = start_server(100).await?;
    let mut publishers = [
        TestClient::join(&server, "sdp", "ann").await?,
        TestClient::join(&server, "sdp", "bob").await?,
    ];
    // Someone already in the room, so that the publications are forwarded somewhere.
    let _watcher = TestClient::join(&server, "sdp", "watcher").await?;
    for publisher in &mut publishers {
        publisher.publish().await?;
    }
    // Media makes the publications start: send on every track until all four have.
    let mut payload_types = Vec::new();
    for publisher in &publishers {
        payload_types.push(publisher.payload_types().await?);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seq = 0u16;
    loop {
        for (publisher, (audio_pt, video_pt)) in publishers.iter().zip(&payload_types) {
            let audio = publisher
                .audio
                .as_ref()
                .ok_or_else(|| anyhow!("no audio"))?;
            let video = publisher
                .video
                .as_ref()
                .ok_or_else(|| anyhow!("no video"))?;
            let frame = Bytes::from(vec![0x10, 0x00, (seq % 256) as u8]);
            write(
                audio,
                *audio_pt,
                seq,
                u32::from(seq) * 960,
                Bytes::from_static(b"\xF8x"),
            )
            .await?;
            write(video, *video_pt, seq, u32::from(seq) * 3000, frame).await?;
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let published: usize = server
            .state()
            .rooms
            .rooms()
            .first()
            .ok_or_else(|| anyhow!("no room"))?
            .snapshot()
            .participants
            .iter()
            .map(|p| p.publications.len())
            .sum();
        if published == 4 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{published} of 4 publications started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut newcomer = TestClient::join(&server, "sdp", "newcomer").await?;
    let offer = next_offer(&mut newcomer, Duration::from_secs(10)).await?;
    let subscriptions = offer["subscriptions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let peers: HashSet<&str> = subscriptions
        .iter()
        .filter_map(|s| s["peerId"].as_str())
        .collect();
    ensure!(
        subscriptions.len() == 4 && peers.len() == 2,
        "first offer carries {} subscriptions from {peers:?}, not all 4",
        subscriptions.len()
    );
    let sdp = offer["sdp"].as_str().unwrap_or_default();
    for sub in &subscriptions {
        let mid = sub["mid"]
            .as_str()
            .ok_or_else(|| anyhow!("no mid: {sub}"))?;
        let lines = section(sdp, mid).ok_or_else(|| anyhow!("no section {mid} in {sdp}"))?;
        ensure!(
            lines.contains(&"a=sendonly"),
            "a live section is sendonly: {lines:?}"
        );
        let msid = format!(
            "a=msid:{} {}",
            sub["peerId"].as_str().unwrap_or_default(),
            sub["publicationId"].as_str().unwrap_or_default()
        );
        ensure!(lines.contains(&msid.as_str()), "{msid} in {lines:?}");
        ensure!(
            lines.iter().any(|l| l.starts_with("a=ssrc:")),
            "a live section names its SSRC: {lines:?}"
        );
    }

    // The one header extension negotiated is transport-wide sequence numbers, with its
    // feedback, for the subscriber's bandwidth estimate; no `sdes:mid`: clients route by SSRC.
    let extensions: Vec<&str> = sdp
        .lines()
        .filter_map(|line| line.strip_prefix("a=extmap:"))
        .filter_map(|rest| rest.split_whitespace().nth(1))
        .collect();
    ensure!(
        !extensions.is_empty()
            && extensions.iter().all(|uri| *uri
                == "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"),
        "the subscribe offer negotiates transport-wide-cc only: {extensions:?}"
    );
    ensure!(
        sdp.contains(" transport-cc"),
        "with its feedback (a=rtcp-fb ... transport-cc): {sdp}"
    );

    // Ann leaves: her sections go inactive, without SSRC, and leave `subscriptions`.
    let [ann, _bob] = publishers;
    let ann_id = ann.participant_id.clone();
    let ann_mids: Vec<String> = subscriptions
        .iter()
        .filter(|s| s["peerId"] == ann_id.as_str())
        .filter_map(|s| s["mid"].as_str().map(str::to_owned))
        .collect();
    ann.leave().await?;
    let offer = next_offer(&mut newcomer, Duration::from_secs(10)).await?;
    let remaining = offer["subscriptions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        remaining.len() == 2 && remaining.iter().all(|s| s["peerId"] != ann_id.as_str()),
        "after Ann left: {remaining:?}"
    );
    let sdp = offer["sdp"].as_str().unwrap_or_default();
    for mid in &ann_mids {
        let lines = section(sdp, mid).ok_or_else(|| anyhow!("section {mid} gone: {sdp}"))?;
        ensure!(
            lines.contains(&"a=inactive"),
            "an ended section is inactive: {lines:?}"
        );
        ensure!(
            !lines.iter().any(|l| l.starts_with("a=ssrc:")),
            "an ended section names no SSRC: {lines:?}"
        );
    }
    server.shutdown().await?;
    Ok(())
}
