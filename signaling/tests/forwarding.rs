//! One webrtc-rs publisher and three webrtc-rs subscribers in a room, through the real
//! signaling and media plane, their connections spread over two media threads: every subscriber gets the publisher's payloads byte for byte and
//! in order, knows whose they are, and stops receiving after the publisher leaves.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use bytes::Bytes;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use support::{Received, TestClient, start_server, write};

const SUBSCRIBERS: usize = 3;
const MEASURED: u16 = 150;

/// Payload of numbered packet `n`: recognisable and different for every packet.
fn payload(kind: &str, n: u16) -> Bytes {
    let mut bytes = match kind {
        // A VP8 keyframe start (S=1, PID=0, P=0), so the forwarder's keyframe gate opens.
        "video" => vec![0x10, 0x00],
        _ => vec![0xF8],
    };
    bytes.extend_from_slice(format!("{kind}-{n:05}-").as_bytes());
    bytes.extend((0..(n % 200)).map(|i| (i as u8).wrapping_mul(7)));
    Bytes::from(bytes)
}

/// Drains what a subscriber received so far.
fn drain(client: &mut TestClient, into: &mut Vec<Received>) {
    while let Ok(received) = client.media.try_recv() {
        into.push(received);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_reaches_every_subscriber_byte_for_byte() -> Result<()> {
    let server = start_server(100).await?;
    let mut publisher = TestClient::join(&server, "forwarding", "publisher").await?;
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        subscribers.push(TestClient::join(&server, "forwarding", &format!("sub{i}")).await?);
    }
    publisher.publish().await?;
    // Both media threads hold connections: some subscribers receive from another thread's
    // publisher.
    let spread = server.state().sfu.connections_per_thread();
    ensure!(
        spread.len() == 2 && spread.iter().all(|&connections| connections > 0),
        "connections per media thread: {spread:?}"
    );
    let (audio_pt, video_pt) = publisher.payload_types().await?;
    let audio = publisher.audio.clone().expect("publishing");
    let video = publisher.video.clone().expect("publishing");

    // Warm up until every subscriber receives both publications: the server only forwards once
    // the subscriber has answered the offer carrying them.
    let mut received: Vec<Vec<Received>> = vec![Vec::new(); SUBSCRIBERS];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut warmup = 0u16;
    loop {
        write(
            &audio,
            audio_pt,
            warmup,
            u32::from(warmup) * 960,
            Bytes::from_static(b"\xF8warmup"),
        )
        .await?;
        write(
            &video,
            video_pt,
            warmup,
            u32::from(warmup) * 3000,
            Bytes::from_static(b"\x10\x00warmup"),
        )
        .await?;
        warmup += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (client, into) in subscribers.iter_mut().zip(received.iter_mut()) {
            drain(client, into);
        }
        let ready = received.iter().all(|r| {
            r.iter().any(|p| p.kind == RtpCodecKind::Audio)
                && r.iter().any(|p| p.kind == RtpCodecKind::Video)
        });
        if ready {
            break;
        }
        if Instant::now() > deadline {
            let counts: Vec<usize> = received.iter().map(Vec::len).collect();
            bail!("subscribers did not all start receiving within 20 s: {counts:?}");
        }
    }

    // The measured run: numbered packets on both tracks.
    for n in 0..MEASURED {
        let seq = warmup + n;
        write(
            &audio,
            audio_pt,
            seq,
            u32::from(seq) * 960,
            payload("audio", n),
        )
        .await?;
        write(
            &video,
            video_pt,
            seq,
            u32::from(seq) * 3000,
            payload("video", n),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (client, into) in subscribers.iter_mut().zip(received.iter_mut()) {
            drain(client, into);
        }
        let last_audio = payload("audio", MEASURED - 1);
        let last_video = payload("video", MEASURED - 1);
        let done = received.iter().all(|r| {
            r.iter().any(|p| p.payload == last_audio) && r.iter().any(|p| p.payload == last_video)
        });
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Every subscriber: the measured payloads, all of them, in order, attributed to the publisher.
    let mut publication_of_kind: HashMap<&str, String> = HashMap::new();
    for (i, packets) in received.iter().enumerate() {
        for (kind, codec_kind) in [
            ("audio", RtpCodecKind::Audio),
            ("video", RtpCodecKind::Video),
        ] {
            let measured: Vec<&Received> = packets
                .iter()
                .filter(|p| p.kind == codec_kind && !p.payload.ends_with(b"warmup"))
                .collect();
            let expected: Vec<Bytes> = (0..MEASURED).map(|n| payload(kind, n)).collect();
            let got: Vec<Bytes> = measured.iter().map(|p| p.payload.clone()).collect();
            ensure!(
                got == expected,
                "sub{i} {kind}: got {} payloads, first mismatch at {:?}",
                got.len(),
                got.iter().zip(&expected).position(|(a, b)| a != b)
            );
            for packet in &measured {
                ensure!(
                    packet.stream_id == publisher.participant_id,
                    "sub{i} {kind} attributed to {} instead of {}",
                    packet.stream_id,
                    publisher.participant_id
                );
            }
            let publication = publication_of_kind
                .entry(kind)
                .or_insert_with(|| measured[0].publication_id.clone());
            ensure!(
                &measured[0].publication_id == publication,
                "one publication id per track for everyone"
            );
        }
    }

    // The last subscribe offer each subscriber saw names the publisher and the sources.
    for (i, client) in subscribers.iter_mut().enumerate() {
        let mut last_offer = None;
        while let Ok(support::Event::Message(message)) = client.events.try_recv() {
            if message["type"] == "offer" {
                last_offer = Some(message);
            }
        }
        let offer = last_offer.ok_or_else(|| anyhow::anyhow!("sub{i} saw no offer"))?;
        let subscriptions = offer["subscriptions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut sources: Vec<&str> = subscriptions
            .iter()
            .filter(|s| s["peerId"] == publisher.participant_id.as_str())
            .filter_map(|s| s["source"].as_str())
            .collect();
        sources.sort();
        ensure!(
            sources == ["camera", "microphone"],
            "sub{i} subscriptions: {subscriptions:?}"
        );
    }

    // Nobody receives their own media.
    ensure!(
        publisher.media.try_recv().is_err(),
        "the publisher received its own media"
    );

    // The publisher leaves: everyone is told, and media from it stops.
    let publisher_id = publisher.participant_id.clone();
    publisher.leave().await?;
    let left_at = Instant::now();
    for (i, client) in subscribers.iter_mut().enumerate() {
        let left = client
            .wait_for("peer_left", Duration::from_secs(10))
            .await?;
        ensure!(left["peerId"] == publisher_id.as_str(), "sub{i}: {left}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (client, into) in subscribers.iter_mut().zip(received.iter_mut()) {
        drain(client, into);
        into.clear();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, (client, into)) in subscribers.iter_mut().zip(received.iter_mut()).enumerate() {
        drain(client, into);
        ensure!(
            into.is_empty(),
            "sub{i} still received {} packets after the publisher left",
            into.len()
        );
    }
    ensure!(left_at.elapsed() < Duration::from_secs(10));

    let stats = server.state().sfu.stats();
    ensure!(
        stats.forwarded_packets >= u64::from(MEASURED) * 2 * SUBSCRIBERS as u64,
        "{stats:?}"
    );
    for client in subscribers {
        client.leave().await?;
    }
    server.shutdown().await?;
    Ok(())
}
