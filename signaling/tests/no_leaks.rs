//! Participants coming and going leave nothing behind: no task, no UDP socket, no room.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use support::{TestClient, start_server, write};

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
        let (audio_pt, _) = publisher.payload_types().await?;
        let audio = publisher.audio.clone().expect("publishing");
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seq = 0u16;
        while watcher.media.try_recv().is_err() {
            if Instant::now() > deadline {
                bail!("round {round}: no media");
            }
            write(
                &audio,
                audio_pt,
                seq,
                u32::from(seq) * 960,
                Bytes::from_static(b"\xF8x"),
            )
            .await?;
            seq += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // One leaves without a word, the other politely.
        publisher.vanish().await;
        watcher
            .wait_for("peer_left", Duration::from_secs(10))
            .await?;
        watcher.leave().await?;
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (sockets, tasks, rooms) = (
            udp_sockets(),
            alive_tasks(),
            server.state().rooms.rooms().len(),
        );
        if sockets <= baseline_sockets && tasks <= baseline_tasks && rooms == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after every departure: {sockets} UDP sockets (baseline {baseline_sockets}), \
                 {tasks} tasks (baseline {baseline_tasks}), {rooms} rooms"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await?;
    Ok(())
}
