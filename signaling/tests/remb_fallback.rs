//! A subscriber whose client sends REMB and no transport-wide feedback (an older or minimal
//! WebRTC stack) still gets an estimate, and with it an allocation: its REMB is the estimate.
//! docs/protocol.md, section 4, *Bandwidth*.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use bytes::Bytes;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use serde_json::Value;
use support::{CongestionFeedback, Received, TestClient, start_server, write};
use tokio::sync::watch;

/// Sends `bitrate` as the subscriber's REMB for the video it receives, every 100 ms, for `for_`.
async fn send_remb(video: &Received, bitrate: f32, for_: Duration) -> Result<()> {
    let ssrcs = video.track.ssrcs().await;
    let until = Instant::now() + for_;
    while Instant::now() < until {
        let remb = ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 1,
            bitrate,
            ssrcs: ssrcs.clone(),
        };
        video
            .track
            .write_rtcp(vec![Box::new(remb)])
            .await
            .map_err(|err| anyhow!("the subscriber could not send REMB: {err}"))?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The next `allocation` for `publication`, skipping others, sending REMB meanwhile.
async fn next_allocation(
    client: &mut TestClient,
    publication: &str,
    video: &Received,
    bitrate: f32,
    timeout: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        ensure!(
            Instant::now() < deadline,
            "no allocation for {publication} within {timeout:?} at a REMB of {bitrate} bit/s"
        );
        send_remb(video, bitrate, Duration::from_millis(200)).await?;
        while let Ok(support::Event::Message(message)) = client.events.try_recv() {
            if message["type"] == "allocation" && message["publicationId"] == publication {
                return Ok(message);
            }
        }
    }
}

/// Video packets received in `window`.
async fn video_packets_in(client: &mut TestClient, window: Duration) -> usize {
    while client.media.try_recv().is_ok() {}
    tokio::time::sleep(window).await;
    std::iter::from_fn(|| client.media.try_recv().ok())
        .filter(|r| r.kind == RtpCodecKind::Video)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sending_only_remb_is_allocated_by_it() -> Result<()> {
    let server = start_server(100).await?;
    let mut publisher = TestClient::join(&server, "remb", "presenter").await?;
    let mut viewer =
        TestClient::join_with_feedback(&server, "remb", "viewer", CongestionFeedback::RembOnly)
            .await?;
    publisher.publish().await?;
    let (_, video_pt) = publisher.payload_types().await?;
    let camera = publisher
        .video
        .clone()
        .ok_or_else(|| anyhow!("not publishing"))?;

    // The camera sends 50 frames a second of 1,000 bytes (about 400 kbit/s), every one a
    // keyframe, so a resumed video starts at once.
    let (stop, stopped) = watch::channel(false);
    let sender = tokio::spawn(async move {
        let mut seq = 0u16;
        while !*stopped.borrow() {
            let mut frame = vec![0x10, 0x00];
            frame.resize(1_000, (seq % 251) as u8);
            let _ = write(
                &camera,
                video_pt,
                seq,
                u32::from(seq) * 1800,
                Bytes::from(frame),
            )
            .await;
            seq = seq.wrapping_add(1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let deadline = Instant::now() + Duration::from_secs(15);
    let video = loop {
        ensure!(Instant::now() < deadline, "no video reached the viewer");
        if let Ok(received) = viewer.media.try_recv()
            && received.kind == RtpCodecKind::Video
        {
            break received;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let answer = viewer.subscribe_answer().await.unwrap_or_default();
    ensure!(
        !answer.contains("transport-cc") && answer.contains("goog-remb"),
        "the viewer should negotiate REMB and no transport-wide feedback:\n{answer}"
    );
    let publication = video.publication_id.clone();

    // A REMB well above the camera: the estimate follows it, nothing is limited.
    send_remb(&video, 3_000_000.0, Duration::from_secs(1)).await?;
    let bandwidth = viewer.wait_for("bandwidth", Duration::from_secs(5)).await?;
    let estimate = bandwidth["estimate"].as_u64().unwrap_or_default();
    ensure!(
        (2_900_000..=3_100_000).contains(&estimate),
        "the estimate should be the REMB's 3 Mbit/s: {bandwidth}"
    );

    // The REMB falls below what the video needs: the video is paused for the viewer's link,
    // and stops arriving.
    let paused = next_allocation(
        &mut viewer,
        &publication,
        &video,
        50_000.0,
        Duration::from_secs(5),
    )
    .await?;
    ensure!(paused["state"] == "paused", "expected paused: {paused}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let while_paused = video_packets_in(&mut viewer, Duration::from_secs(1)).await;
    ensure!(
        while_paused == 0,
        "{while_paused} video packets arrived while the video was paused"
    );

    // Room again: the video comes back, in full.
    let resumed = next_allocation(
        &mut viewer,
        &publication,
        &video,
        5_000_000.0,
        Duration::from_secs(10),
    )
    .await?;
    ensure!(resumed["state"] == "full", "expected full: {resumed}");
    let after = video_packets_in(&mut viewer, Duration::from_secs(1)).await;
    ensure!(
        after > 20,
        "only {after} video packets a second after it resumed"
    );

    let _ = stop.send(true);
    sender.await?;
    server.shutdown().await?;
    Ok(())
}
