//! A publisher adds a screen share by re-offering its publish connection: every subscriber gets
//! a re-offer naming the new publication as `screen`, and receives its packets.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use bytes::Bytes;
use support::{TestClient, start_server, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_screen_share_added_later_reaches_every_subscriber_as_screen() -> Result<()> {
    let server = start_server(100).await?;
    let mut publisher = TestClient::join(&server, "screens", "presenter").await?;
    let mut subscribers = [
        TestClient::join(&server, "screens", "a").await?,
        TestClient::join(&server, "screens", "b").await?,
    ];
    publisher.publish().await?;
    publisher.publish_screen().await?;
    let (_, video_pt) = publisher.payload_types().await?;
    let screen = publisher.screen.clone().expect("sharing");
    let camera = publisher.video.clone().expect("publishing");

    // Send on the camera and the screen until every subscriber sees the screen publication.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seq = 0u16;
    let mut screen_publication: Vec<Option<String>> = vec![None; subscribers.len()];
    let mut screen_packets = vec![0usize; subscribers.len()];
    while screen_packets.iter().any(|n| *n < 20) {
        ensure!(
            Instant::now() < deadline,
            "screen packets per subscriber: {screen_packets:?}"
        );
        let frame = Bytes::from(vec![0x10, 0x00, (seq % 256) as u8]);
        write(&camera, video_pt, seq, u32::from(seq) * 3000, frame.clone()).await?;
        write(&screen, video_pt, seq, u32::from(seq) * 3000, frame).await?;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (i, client) in subscribers.iter_mut().enumerate() {
            while let Ok(support::Event::Message(message)) = client.events.try_recv() {
                if message["type"] != "offer" {
                    continue;
                }
                let subscriptions = message["subscriptions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if let Some(sub) = subscriptions.iter().find(|s| s["source"] == "screen") {
                    ensure!(sub["peerId"] == publisher.participant_id.as_str(), "{sub}");
                    ensure!(sub["kind"] == "video", "{sub}");
                    screen_publication[i] = sub["publicationId"].as_str().map(str::to_owned);
                }
            }
            while let Ok(packet) = client.media.try_recv() {
                if screen_publication[i].as_deref() == Some(packet.publication_id.as_str()) {
                    screen_packets[i] += 1;
                }
            }
        }
    }
    let rooms = server.state().rooms.rooms();
    let snapshot = rooms.first().ok_or_else(|| anyhow!("no room"))?.snapshot();
    let presenter = snapshot
        .participants
        .iter()
        .find(|p| p.participant_id == publisher.participant_id)
        .ok_or_else(|| anyhow!("presenter missing"))?;
    let mut sources: Vec<&str> = presenter.publications.iter().map(|p| p.source).collect();
    sources.sort();
    ensure!(sources == ["camera", "screen"], "{sources:?}");
    server.shutdown().await?;
    Ok(())
}
