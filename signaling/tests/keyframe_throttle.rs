//! A subscriber that asks for keyframes 90 times a second must not make the publisher encode
//! 90 keyframes a second: the server passes at most one request per publication every 500 ms
//! (docs/protocol.md, section 4), and still passes them.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail, ensure};
use bytes::Bytes;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use support::{TestClient, start_server, write};
use webrtc::media_stream::track_local::{TrackLocal as _, TrackLocalEvent};

const ASKED_PER_SECOND: u32 = 90;
const ASKING_FOR: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_flooding_keyframe_requests_reaches_the_publisher_twice_a_second() -> Result<()>
{
    let server = start_server(100).await?;
    let mut publisher = TestClient::join(&server, "keyframes", "presenter").await?;
    let mut subscriber = TestClient::join(&server, "keyframes", "viewer").await?;
    publisher.publish().await?;
    let (_, video_pt) = publisher.payload_types().await?;
    let camera = publisher
        .video
        .clone()
        .ok_or_else(|| anyhow!("not publishing"))?;

    // Every keyframe request that reaches the publisher, as its encoder would see it.
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = {
        let (camera, requests) = (camera.clone(), requests.clone());
        tokio::spawn(async move {
            while let Some(event) = camera.poll().await {
                if let TrackLocalEvent::OnRtcpPacket(packets) = event
                    && packets.iter().any(|p| {
                        let any = p.as_any();
                        any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                    })
                {
                    requests.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // Keyframes flow until the subscriber receives the camera.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seq = 0u16;
    let frame = |seq: u16| Bytes::from(vec![0x10, 0x00, (seq % 256) as u8]);
    let received = loop {
        ensure!(Instant::now() < deadline, "no video reached the subscriber");
        write(&camera, video_pt, seq, u32::from(seq) * 3000, frame(seq)).await?;
        seq = seq.wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(video) = std::iter::from_fn(|| subscriber.media.try_recv().ok())
            .find(|r| r.kind == RtpCodecKind::Video)
        {
            break video;
        }
    };
    let media_ssrc = received
        .track
        .ssrcs()
        .await
        .first()
        .copied()
        .ok_or_else(|| anyhow!("the subscribed track has no SSRC"))?;
    // Requests from the subscription's start (the server asks for its first keyframe) settle.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let before = requests.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut asked = 0u32;
    while started.elapsed() < ASKING_FOR {
        let pli = PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc,
        };
        if let Err(err) = received.track.write_rtcp(vec![Box::new(pli)]).await {
            bail!("the subscriber could not send a PLI: {err}");
        }
        asked += 1;
        // Media keeps flowing, as it does in a call.
        if asked % 2 == 0 {
            write(&camera, video_pt, seq, u32::from(seq) * 3000, frame(seq)).await?;
            seq = seq.wrapping_add(1);
        }
        tokio::time::sleep(Duration::from_secs(1) / ASKED_PER_SECOND).await;
    }
    // A request held at the end of the window goes out within the next 500 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let passed = requests.load(Ordering::Relaxed) - before;
    let window = started.elapsed().as_secs_f64();
    counter.abort();
    ensure!(asked > 200, "the subscriber asked only {asked} times");
    // One every 500 ms over the window, and the held one at its end.
    let most = (window / 0.5).ceil() as usize + 1;
    ensure!(
        (3..=most).contains(&passed),
        "{asked} requests in {window:.1} s reached the publisher as {passed} (expected 3 to {most})"
    );
    server.shutdown().await?;
    Ok(())
}
