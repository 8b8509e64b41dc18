//! Losses between the server and its subscribers are repaired: each subscriber's NACKs are
//! answered from the publication's packet cache, so every video packet still arrives.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use bytes::Bytes;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use support::{TestClient, start_server, write};

const SUBSCRIBERS: usize = 3;
const MEASURED: u16 = 300;
/// One RTP datagram in this many is lost on the way to each subscriber.
const LOSE_ONE_IN: u64 = 15;

fn payload(n: u16) -> Bytes {
    // A VP8 keyframe start, so that the keyframe gate never holds a packet back.
    let mut bytes = vec![0x10, 0x00];
    bytes.extend_from_slice(format!("video-{n:05}").as_bytes());
    bytes.resize(600, (n % 251) as u8);
    Bytes::from(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losses_toward_subscribers_are_repaired_from_the_publication_cache() -> Result<()> {
    let server = start_server(100).await?;
    let mut publisher = TestClient::join(&server, "lossy", "publisher").await?;
    let lost = Arc::new(AtomicU64::new(0));
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let loss = Some((LOSE_ONE_IN, lost.clone()));
        subscribers.push(TestClient::join_lossy(&server, "lossy", &format!("sub{i}"), loss).await?);
    }
    publisher.publish().await?;
    let (_, video_pt) = publisher.payload_types().await?;
    let video = publisher.video.clone().expect("publishing");

    let mut seq = 0u16;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = [false; SUBSCRIBERS];
    while !ready.iter().all(|r| *r) {
        write(
            &video,
            video_pt,
            seq,
            u32::from(seq) * 3000,
            Bytes::from_static(b"\x10\x00warmup"),
        )
        .await?;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (client, ready) in subscribers.iter_mut().zip(ready.iter_mut()) {
            while let Ok(packet) = client.media.try_recv() {
                *ready |= packet.kind == RtpCodecKind::Video;
            }
        }
        if Instant::now() > deadline {
            bail!("subscribers did not start receiving: {ready:?}");
        }
    }

    for n in 0..MEASURED {
        write(&video, video_pt, seq, u32::from(seq) * 3000, payload(n)).await?;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    let expected: BTreeSet<Bytes> = (0..MEASURED).map(payload).collect();
    let mut got: Vec<BTreeSet<Bytes>> = vec![BTreeSet::new(); SUBSCRIBERS];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && got.iter().any(|g| g.len() < expected.len()) {
        for (client, got) in subscribers.iter_mut().zip(got.iter_mut()) {
            while let Ok(packet) = client.media.try_recv() {
                if expected.contains(&packet.payload) {
                    got.insert(packet.payload);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = lost.load(Ordering::Relaxed);
    let stats = server.state().sfu.stats();
    ensure!(
        lost >= u64::from(MEASURED) / LOSE_ONE_IN,
        "the lossy sockets lost only {lost}"
    );
    for (i, got) in got.iter().enumerate() {
        ensure!(
            got.len() == expected.len(),
            "sub{i} has {} of {} packets ({lost} lost on the way, {stats:?})",
            got.len(),
            expected.len()
        );
    }
    ensure!(
        stats.retransmitted_packets >= lost / 2,
        "{stats:?}, {lost} lost"
    );
    ensure!(stats.nacks > 0, "{stats:?}");
    server.shutdown().await?;
    Ok(())
}
