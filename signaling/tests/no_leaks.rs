//! Participants coming and going leave nothing behind: no server task (sessions, negotiators,
//! fanouts, subscribe connections), no UDP socket, no room.
//!
//! The server's own tasks are counted by the server's task gauges. The runtime's total task
//! count is also shown, but not asserted: the test clients and their webrtc-rs connections share
//! this runtime, and a client-side task occasionally outlives its connection by seconds.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use support::{TestClient, start_server};

/// UDP sockets open in this network namespace (the server's and the test clients').
fn udp_sockets() -> usize {
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| table.lines().count().saturating_sub(1))
        .sum()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_departures_leak_no_task_and_no_socket() -> Result<()> {
    let server = start_server(100).await?;
    let baseline_sockets = udp_sockets();
    let baseline_tasks = alive_tasks();

    for round in 0..3 {
        let room = format!("leaks-{round}");
        let mut publisher = TestClient::join(&server, &room, "pub").await?;
        let mut watcher = TestClient::join(&server, &room, "watcher").await?;
        publisher.publish().await?;
        publisher.audio_until_received(&mut watcher).await?;
        // One leaves without a word, the other politely.
        publisher.vanish().await;
        watcher
            .wait_for("peer_left", Duration::from_secs(10))
            .await?;
        watcher.leave().await?;
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = server.state();
        let (fanouts, media_connections) = state.sfu.live_tasks();
        let signaling = &state.tasks;
        let server_tasks = fanouts
            + media_connections
            + signaling.sessions.load(Ordering::Relaxed)
            + signaling.negotiators.load(Ordering::Relaxed);
        let (sockets, rooms) = (udp_sockets(), state.rooms.rooms().len());
        if sockets <= baseline_sockets && server_tasks == 0 && rooms == 0 {
            println!(
                "runtime tasks: {} now, {baseline_tasks} before the rounds",
                alive_tasks()
            );
            break;
        }
        let tasks = alive_tasks();
        if Instant::now() > deadline {
            bail!(
                "after every departure: {sockets} UDP sockets (baseline {baseline_sockets}), \
                 {tasks} tasks (baseline {baseline_tasks}), {rooms} rooms; media-plane tasks \
                 (fanouts, subscribe connections): {:?}; signaling tasks: {:?}",
                server.state().sfu.live_tasks(),
                server.state().tasks
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await?;
    Ok(())
}
