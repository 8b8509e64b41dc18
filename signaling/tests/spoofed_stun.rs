//! STUN first, state after: a stranger who knows a subscribe connection's ufrag (it is in the
//! SDP) sends binding requests from thousands of addresses. None of them is remembered, and the
//! subscriber keeps receiving.

mod support;

use std::sync::atomic::Ordering::Relaxed;

use anyhow::{Context, Result, ensure};
use support::{TestClient, start_server};

const SPOOFED_ADDRESSES: usize = 2000;

/// A binding request naming `username`, with a MESSAGE-INTEGRITY that no password made.
fn forged_binding_request(username: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&0x0006u16.to_be_bytes());
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    attrs.extend_from_slice(&0x0008u16.to_be_bytes());
    attrs.extend_from_slice(&20u16.to_be_bytes());
    attrs.extend_from_slice(&[0xAB; 20]);
    let mut message = vec![0x00, 0x01];
    message.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    message.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    message.extend_from_slice(&rand::random::<[u8; 12]>());
    message.extend_from_slice(&attrs);
    message
}

#[tokio::test]
async fn spoofed_stun_from_many_addresses_is_not_remembered() -> Result<()> {
    let server = start_server(10).await?;
    let mut ann = TestClient::join(&server, "stun", "Ann").await?;
    let mut bob = TestClient::join(&server, "stun", "Bob").await?;
    ann.publish().await?;
    ann.audio_until_received(&mut bob).await?;

    let offer = bob.subscribe_offer().await.context("no offer")?;
    let ufrag = offer
        .lines()
        .find_map(|line| line.strip_prefix("a=ice-ufrag:"))
        .context("no ufrag in the offer")?
        .trim()
        .to_owned();
    // The port of the media thread Bob's subscribe connection is on, from its candidate.
    let port: u16 = offer
        .lines()
        .find_map(|line| line.strip_prefix("a=candidate:"))
        .and_then(|candidate| candidate.split_whitespace().nth(5))
        .and_then(|port| port.parse().ok())
        .context("no candidate port in the offer")?;
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stats = || server.state().sfu.engine_stats().context("no engine");
    let routed_before = stats()?.routed_addresses.load(Relaxed);

    for _ in 0..SPOOFED_ADDRESSES {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        socket
            .send_to(&forged_binding_request(&format!("{ufrag}:spoof")), target)
            .await?;
    }
    // The engine reads them all.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while stats()?.unverified_stun.load(Relaxed) < SPOOFED_ADDRESSES as u64
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let unverified = stats()?.unverified_stun.load(Relaxed);
    ensure!(
        unverified >= SPOOFED_ADDRESSES as u64,
        "{unverified} of {SPOOFED_ADDRESSES} forged requests counted"
    );
    let routed = stats()?.routed_addresses.load(Relaxed);
    ensure!(
        routed == routed_before,
        "routed addresses went from {routed_before} to {routed}"
    );
    // Bob's own path still works.
    while bob.media.try_recv().is_ok() {}
    ann.audio_until_received(&mut bob).await?;
    server.shutdown().await?;
    Ok(())
}
