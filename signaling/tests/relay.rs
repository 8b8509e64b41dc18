//! Data relayed through the server (files in SFU rooms): each participant's relay data channel
//! on its publish connection, webrtc-rs clients on both ends, through the real signaling and
//! media plane on two media threads.

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::{BufMut, BytesMut};
use serde_json::{Value, json};
use support::{TestClient, start_server};
use webrtc::data_channel::{DataChannel, DataChannelEvent};

/// What one side reads from its relay channel.
#[derive(Debug)]
enum Read {
    Data { from: String, payload: Vec<u8> },
    Notice(Value),
}

fn envelope(to: &str, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(to.len() as u8);
    out.put_slice(to.as_bytes());
    out.put_slice(payload);
    out
}

async fn read(channel: &Arc<dyn DataChannel>) -> Result<Read> {
    let next = async {
        while let Some(event) = channel.poll().await {
            let DataChannelEvent::OnMessage(message) = event else {
                continue;
            };
            if message.is_string {
                return Ok(Read::Notice(serde_json::from_slice(&message.data)?));
            }
            let (&length, rest) = message.data.split_first().context("empty message")?;
            let (from, payload) = rest.split_at(usize::from(length));
            return Ok(Read::Data {
                from: String::from_utf8(from.to_vec())?,
                payload: payload.to_vec(),
            });
        }
        bail!("the relay channel closed")
    };
    tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .context("nothing came on the relay channel")?
}

async fn metric(server: &signaling::Server, name: &str) -> Result<u64> {
    let text = reqwest::get(format!("http://{}/metrics", server.addr))
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("switchboard_{name}_total ")))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("{name} in /metrics"))
}

const FILE_BYTES: usize = 3 * 1024 * 1024 + 1234;
const CHUNK: usize = 16 * 1024;
/// The receiver acknowledges every this many bytes, and the sender keeps at most
/// `WINDOW` unacknowledged, as the SDK does.
const ACK_EVERY: usize = 256 * 1024;
const WINDOW: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_crosses_an_sfu_room_byte_for_byte_and_stays_in_its_room() -> Result<()> {
    let server = start_server(100).await?;
    let mut alice = TestClient::join(&server, "relay", "alice").await?;
    // Bob may not publish: his publish connection carries the relay channel alone.
    let mut bob = TestClient::join_granted(
        &server,
        "relay",
        "bob",
        json!({"publish": false, "subscribe": true}),
    )
    .await?;
    let carol = TestClient::join(&server, "relay", "carol").await?;
    let mut eve = TestClient::join(&server, "elsewhere", "eve").await?;
    let to_alice = alice.open_relay().await?;
    let to_bob = bob.open_relay().await?;
    let to_eve = eve.open_relay().await?;

    // Alice sends Bob a file in chunks, within a window Bob's acknowledgements open.
    let file: Vec<u8> = (0..FILE_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    let bob_id = bob.participant_id.clone();
    let alice_id = alice.participant_id.clone();
    let receiver = {
        let to_bob = to_bob.clone();
        let alice_id = alice_id.clone();
        tokio::spawn(async move {
            let mut got = Vec::with_capacity(FILE_BYTES);
            let mut acked = 0;
            while got.len() < FILE_BYTES {
                match read(&to_bob).await? {
                    Read::Data { from, payload } => {
                        ensure!(from == alice_id, "data from {from}, not Alice");
                        got.extend_from_slice(&payload);
                    }
                    Read::Notice(notice) => bail!("Bob was told {notice}"),
                }
                if got.len() - acked >= ACK_EVERY || got.len() == FILE_BYTES {
                    acked = got.len();
                    let ack = (acked as u64).to_be_bytes();
                    to_bob.send(envelope(&alice_id, &ack)).await?;
                }
            }
            anyhow::Ok(got)
        })
    };
    let started = std::time::Instant::now();
    let mut acked = 0usize;
    for (index, chunk) in file.chunks(CHUNK).enumerate() {
        while index * CHUNK - acked >= WINDOW {
            match read(&to_alice).await? {
                Read::Data { from, payload } => {
                    ensure!(from == bob_id, "an acknowledgement from {from}");
                    acked = u64::from_be_bytes(payload.as_slice().try_into()?) as usize;
                }
                Read::Notice(notice) => bail!("Alice was told {notice}"),
            }
        }
        to_alice.send(envelope(&bob_id, chunk)).await?;
    }
    let got = receiver.await??;
    let took = started.elapsed();
    ensure!(got == file, "Bob's bytes differ from Alice's file");
    println!(
        "relayed {FILE_BYTES} bytes in {took:?}: {:.1} MB/s",
        FILE_BYTES as f64 / took.as_secs_f64() / 1e6
    );
    ensure!(
        metric(&server, "relay_drops").await? == 0,
        "nothing dropped"
    );
    ensure!(
        metric(&server, "relay_bytes").await? >= FILE_BYTES as u64,
        "the relayed bytes are counted"
    );

    // Nobody outside the room, nobody without a relay channel and nobody unknown is reached:
    // the sender is told, and nothing arrives.
    for to in [
        eve.participant_id.as_str(),
        carol.participant_id.as_str(),
        "p-nobody",
    ] {
        to_alice.send(envelope(to, b"hello")).await?;
        loop {
            match read(&to_alice).await? {
                // The last acknowledgement may still be on its way.
                Read::Data { from, .. } if from == bob_id => continue,
                Read::Notice(notice) => {
                    ensure!(
                        notice == json!({"type": "undeliverable", "to": to}),
                        "for {to}: {notice}"
                    );
                    break;
                }
                other => bail!("for {to}: {other:?}"),
            }
        }
    }
    ensure!(
        tokio::time::timeout(Duration::from_millis(500), read(&to_eve))
            .await
            .is_err(),
        "Eve, in another room, got something"
    );

    // Text, a malformed envelope and a message to oneself are dropped and counted.
    let drops = metric(&server, "relay_drops").await?;
    to_alice.send_text("hello").await?;
    to_alice.send(BytesMut::from(&[0u8, 1, 2][..])).await?;
    to_alice.send(BytesMut::from(&[200u8, b'p'][..])).await?;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(&server, "relay_drops").await? < drops + 3 {
        ensure!(tokio::time::Instant::now() < until, "drops not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A channel the server does not serve is closed at once, and counted.
    let other = alice
        .publish_connection()
        .context("alice's publish connection")?
        .create_data_channel("something-else", None)
        .await?;
    let closed = async {
        while let Some(event) = other.poll().await {
            if matches!(event, DataChannelEvent::OnClose) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .context("the unknown channel stayed open")?;
    ensure!(metric(&server, "refused_data_channels").await? >= 1);
    drop(carol);
    server.shutdown().await?;
    Ok(())
}

/// A sender that ignores every window floods a recipient: whatever the server drops to keep
/// within its budgets is announced (`over_budget` to the sender, `dropped` to the recipient)
/// and counted, never lost in silence, and what arrives arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_cut_to_budget_and_every_drop_is_announced() -> Result<()> {
    const CHUNKS: u32 = 320;
    const FLOOD_CHUNK: usize = 32 * 1024;
    let server = start_server(100).await?;
    let mut alice = TestClient::join(&server, "flood", "alice").await?;
    let mut bob = TestClient::join(&server, "flood", "bob").await?;
    let to_alice = alice.open_relay().await?;
    let to_bob = bob.open_relay().await?;
    let bob_id = bob.participant_id.clone();
    for n in 0..CHUNKS {
        let mut chunk = vec![0u8; FLOOD_CHUNK];
        chunk[..4].copy_from_slice(&n.to_be_bytes());
        to_alice.send(envelope(&bob_id, &chunk)).await?;
    }
    let mut received: Vec<u32> = Vec::new();
    let mut dropped_notices = 0u64;
    while let Ok(Ok(read)) = tokio::time::timeout(Duration::from_secs(3), read(&to_bob)).await {
        match read {
            Read::Data { payload, .. } => {
                received.push(u32::from_be_bytes(payload[..4].try_into()?));
            }
            Read::Notice(notice) => {
                ensure!(
                    notice == json!({"type": "dropped", "from": alice.participant_id}),
                    "Bob was told {notice}"
                );
                dropped_notices += 1;
            }
        }
    }
    let mut over_budget = 0u64;
    while let Ok(Ok(read)) = tokio::time::timeout(Duration::from_millis(500), read(&to_alice)).await
    {
        match read {
            Read::Notice(notice) if notice == json!({"type": "over_budget"}) => over_budget += 1,
            other => bail!("Alice got {other:?}"),
        }
    }
    ensure!(
        received.windows(2).all(|pair| pair[0] < pair[1]),
        "out of order: {received:?}"
    );
    let missing = u64::from(CHUNKS) - received.len() as u64;
    let drops = metric(&server, "relay_drops").await?;
    ensure!(
        missing == drops && missing == over_budget + dropped_notices,
        "{missing} missing, {drops} drops counted, {over_budget} over_budget, \
         {dropped_notices} dropped notices"
    );
    println!(
        "flood: {missing} of {CHUNKS} dropped ({over_budget} over budget, {dropped_notices} past Bob's buffer)"
    );
    server.shutdown().await?;
    Ok(())
}
