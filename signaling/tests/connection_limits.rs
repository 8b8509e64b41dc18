//! What one address can hold of the HTTP listener: connections that send half a request's headers
//! and wait are closed at the header-read timeout, one address gets no more than its share of
//! connections, and a real client on another address joins throughout.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use support::{connect, recv_type, send, token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const PER_ADDRESS: usize = 40;
const ATTACKERS: usize = 150;

async fn server() -> Result<signaling::Server> {
    let config = signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        max_connections_per_address: PER_ADDRESS,
        header_read_timeout_secs: 1,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    Ok(signaling::Server::start(config).await?)
}

/// A connection from 127.0.0.2 that sends half a request and waits.
async fn half_open(server: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind("127.0.0.2:0".parse()?)?;
    let mut stream = socket.connect(server).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: switchboard\r\n")
        .await?;
    Ok(stream)
}

/// Whether the server has closed `stream` (a read ends) within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before the close is fine: read on.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn half_open_connections_are_closed_and_do_not_keep_a_client_out() -> Result<()> {
    let server = server().await?;
    let opened = Instant::now();
    let mut attackers = Vec::with_capacity(ATTACKERS);
    for _ in 0..ATTACKERS {
        attackers.push(half_open(server.addr).await?);
    }
    // A real client, from another address, joins while they are held.
    let mut ann = connect(&server, "ann", "busy").await?;
    send(&mut ann, json!({"type": "join", "name": "Ann"})).await?;
    let joined = recv_type(&mut ann, "joined", Duration::from_secs(5)).await?;
    ensure!(joined["name"] == "Ann", "{joined}");

    // Past the address's share, connections were closed at once.
    let connections = &server.state().connections;
    let refused = connections
        .refused_per_address
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        refused as usize >= ATTACKERS - PER_ADDRESS,
        "{refused} of {ATTACKERS} refused, with {PER_ADDRESS} allowed"
    );
    // The rest are closed at the header-read timeout (1 s), not held forever.
    let mut still_open = 0;
    for stream in &mut attackers {
        let left = Duration::from_secs(4).saturating_sub(opened.elapsed());
        if !closed_within(stream, left.max(Duration::from_millis(10))).await {
            still_open += 1;
        }
    }
    ensure!(
        still_open == 0,
        "{still_open} half-open connections still open after 4 s"
    );
    // Ann's socket keeps its place; the attackers' places (and Ann's token request's) are free.
    let open = open_settles_at(&server, 1).await;
    ensure!(open == 1, "{open} connections counted open, expected Ann's");
    let again = half_open(server.addr).await;
    ensure!(again.is_ok(), "the address may connect again");

    // Ann is still there and answered.
    send(&mut ann, json!({"type": "leave"})).await?;
    server.shutdown().await.context("shutdown")?;
    Ok(())
}

/// The count of open connections once it reaches `expected` (or after 3 s).
async fn open_settles_at(server: &signaling::Server, expected: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let open = server.state().connections.open();
        if open == expected || Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn socket(server: &signaling::Server, token: &str) -> Result<support::Ws> {
    let url = format!("ws://{}/ws/signal?token={token}", server.addr);
    Ok(tokio_tungstenite::connect_async(url).await?.0)
}

#[tokio::test]
async fn a_signaling_socket_counts_against_its_address_for_as_long_as_it_lives() -> Result<()> {
    let config = signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        max_connections_per_address: 2,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    let server = signaling::Server::start(config).await?;
    let mut tokens = Vec::new();
    for user in ["a", "b", "c"] {
        tokens.push(token(&server, user, "r").await?);
        ensure!(
            open_settles_at(&server, 0).await == 0,
            "token request left open"
        );
    }
    let first = socket(&server, &tokens[0]).await?;
    let second = socket(&server, &tokens[1]).await?;
    ensure!(
        socket(&server, &tokens[2]).await.is_err(),
        "a third connection from the address was served"
    );
    drop(first);
    ensure!(
        open_settles_at(&server, 1).await == 1,
        "the closed socket still counts"
    );
    ensure!(
        socket(&server, &tokens[2]).await.is_ok(),
        "a closed socket's place came back"
    );
    drop(second);
    server.shutdown().await.context("shutdown")?;
    Ok(())
}
