//! Participants who leave without `leave`: a closed socket, or a silent one, is removed and its
//! subscriptions torn down on every other participant within 10 seconds.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use support::{TestClient, start_server};

async fn publications_live(server: &signaling::Server) -> u64 {
    server.state().sfu.stats().publications
}

async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("condition not met within {limit:?}")
}

async fn room_with_publisher(
    server: &signaling::Server,
    room: &str,
) -> Result<(TestClient, TestClient)> {
    let mut publisher = TestClient::join(server, room, "pub").await?;
    let mut watcher = TestClient::join(server, room, "watcher").await?;
    publisher.publish().await?;
    // Media must flow before the departure, so that there is something to tear down.
    publisher.audio_until_received(&mut watcher).await?;
    watcher.wait_for("offer", Duration::from_secs(1)).await.ok();
    Ok((publisher, watcher))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_tab_is_removed_at_once() -> Result<()> {
    let server = start_server(100).await?;
    let (publisher, mut watcher) = room_with_publisher(&server, "closed-tab").await?;
    let publisher_id = publisher.participant_id.clone();
    ensure!(
        publications_live(&server).await == 1,
        "the audio publication is live"
    );
    let gone_at = Instant::now();
    publisher.vanish().await;
    let left = watcher
        .wait_for("peer_left", Duration::from_secs(10))
        .await?;
    ensure!(left["peerId"] == publisher_id.as_str(), "{left}");
    // Its publications end and the watcher's subscriptions go in a new offer.
    let offer = watcher.wait_for("offer", Duration::from_secs(10)).await?;
    ensure!(
        offer["subscriptions"].as_array().is_some_and(Vec::is_empty),
        "{offer}"
    );
    wait_until(Duration::from_secs(10), || async {
        publications_live(&server).await == 0
    })
    .await?;
    ensure!(
        gone_at.elapsed() < Duration::from_secs(10),
        "took {:?}",
        gone_at.elapsed()
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_participant_is_removed_within_ten_seconds() -> Result<()> {
    let server = start_server(100).await?;
    let (publisher, mut watcher) = room_with_publisher(&server, "silent").await?;
    let publisher_id = publisher.participant_id.clone();
    let silent_at = Instant::now();
    publisher.freeze()?;
    let left = watcher
        .wait_for("peer_left", Duration::from_secs(12))
        .await?;
    let took = silent_at.elapsed();
    ensure!(left["peerId"] == publisher_id.as_str(), "{left}");
    ensure!(took < Duration::from_secs(10), "removed after {took:?}");
    wait_until(Duration::from_secs(5), || async {
        publications_live(&server).await == 0
    })
    .await?;
    let rooms = server.state().rooms.rooms();
    ensure!(rooms.len() == 1 && rooms[0].snapshot().participants.len() == 1);
    server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_whose_media_path_dies_is_removed_within_ten_seconds() -> Result<()> {
    let server = start_server(100).await?;
    let (mut publisher, _) = room_with_publisher(&server, "ice-failed").await?;
    // The newcomer's signaling socket stays healthy; only its media path will die.
    let lossless = Some((
        u64::MAX,
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    ));
    let mut viewer = TestClient::join_lossy(&server, "ice-failed", "viewer", lossless).await?;
    let viewer_id = viewer.participant_id.clone();
    publisher.audio_until_received(&mut viewer).await?;
    let cut_at = Instant::now();
    viewer.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    loop {
        let left = publisher
            .wait_for("peer_left", Duration::from_secs(11))
            .await?;
        if left["peerId"] == viewer_id.as_str() {
            break;
        }
    }
    let took = cut_at.elapsed();
    ensure!(took < Duration::from_secs(10), "removed after {took:?}");
    // It is told why, then its socket is closed by the server.
    let told = viewer.wait_for("error", Duration::from_secs(3)).await?;
    ensure!(
        told["code"] == "internal"
            && told["message"]
                .as_str()
                .is_some_and(|m| m.contains("media connection")),
        "{told}"
    );
    let closed = viewer.wait_for("never-sent", Duration::from_secs(3)).await;
    ensure!(
        closed.is_err_and(|e| e.to_string().contains("closed")),
        "the removed participant's socket stays open"
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_media_address_that_cannot_be_bound_stops_the_start_with_a_clear_error() -> Result<()> {
    // 192.0.2.1 (TEST-NET-1) is on no interface here, so the shared media socket cannot bind:
    // the server must say so at start rather than fail every join later.
    let config = signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("192.0.2.1".parse()?),
        mesh_max: 0,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    match signaling::Server::start(config).await {
        Ok(server) => {
            server.shutdown().await?;
            bail!("the server started on a media address it cannot bind");
        }
        Err(err) => {
            let message = err.to_string();
            ensure!(
                message.contains("media socket") && message.contains("port 0"),
                "unclear start error: {message}"
            );
        }
    }
    Ok(())
}
