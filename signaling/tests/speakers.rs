//! The server tells the room who speaks, loudest first, from the audio-level header extension
//! (RFC 6464) of each microphone, without decoding; a silent microphone is not listed.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde_json::Value;
use support::{Event, TestClient, start_server};

/// Sends audio at the given levels (-dBov) until `listener` is told `expected` (peer ids, in
/// order); returns the last `speakers` list seen.
async fn speak_until(
    levels: &[(&TestClient, u8)],
    listener: &mut TestClient,
    expected: &[&str],
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    // Only a `speakers` message sent during this call counts.
    let mut last: Option<Vec<Value>> = None;
    loop {
        if let Some(list) = &last {
            let order: Vec<&str> = list.iter().filter_map(|s| s["peerId"].as_str()).collect();
            if order == expected {
                return Ok(list.clone());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "speakers {last:?}, expected {expected:?}"
        );
        for (client, level) in levels {
            client.send_audio_level(*level).await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok(Event::Message(message)) = listener.events.try_recv() {
            if message["type"] == "speakers" {
                last = Some(message["speakers"].as_array().cloned().unwrap_or_default());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loudest_microphone_comes_first_and_a_silent_one_is_not_listed() -> Result<()> {
    let server = start_server(100).await?;
    let mut ann = TestClient::join(&server, "talk", "ann").await?;
    let mut bob = TestClient::join(&server, "talk", "bob").await?;
    let mut cat = TestClient::join(&server, "talk", "cat").await?;
    ann.publish().await?;
    bob.publish().await?;
    let (a, b) = (ann.participant_id.clone(), bob.participant_id.clone());

    // Ann speaks (-10 dBov), Bob is silent (-127 dBov).
    speak_until(&[(&ann, 10), (&bob, 127)], &mut cat, &[&a]).await?;
    // Both speak, Bob louder.
    let both = speak_until(&[(&ann, 30), (&bob, 5)], &mut cat, &[&b, &a]).await?;
    let levels: Vec<f64> = both.iter().filter_map(|s| s["level"].as_f64()).collect();
    ensure!(
        levels.len() == 2
            && levels[0] > levels[1]
            && levels.iter().all(|l| (0.0..=1.0).contains(l)),
        "{both:?}"
    );
    // Everyone falls silent: the list empties.
    speak_until(&[(&ann, 127), (&bob, 127)], &mut cat, &[]).await?;
    server.shutdown().await?;
    Ok(())
}
