//! Three `switchboard` processes sharing a real `redis-server`: rooms placed by load, a room
//! reached through a node that does not host it, a node killed mid-call and its call back on
//! another node, a node drained without losing its call, and Redis going away and coming back.
//! Needs `redis-server` on the PATH (scripts/test installs it).

mod support;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde_json::{Value, json};
use support::{CongestionFeedback, Event, TestClient, Ws, recv, send};

const SECRET: &str = "cluster-test-secret-0123456789abcdef";

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(port: u16) -> Result<Proc> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("redis-server must be installed (scripts/test installs it)")?;
    Ok(Proc(child))
}

struct Node {
    id: String,
    addr: SocketAddr,
    url: String,
    process: Proc,
}

fn start_node(index: usize, redis_port: u16) -> Result<Node> {
    let port = free_tcp_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let url = format!("http://{addr}");
    let id = format!("node-{index}");
    let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .env("SWITCHBOARD_BIND", addr.to_string())
        .env("SWITCHBOARD_UDP_PORT", free_udp_port()?.to_string())
        .env("SWITCHBOARD_MEDIA_THREADS", "1")
        .env("SWITCHBOARD_MESH_MAX", "0")
        .env("SWITCHBOARD_API_KEYS", format!("{{backend=\"{SECRET}\"}}"))
        .env(
            "SWITCHBOARD_REDIS_URL",
            format!("redis://127.0.0.1:{redis_port}"),
        )
        .env("SWITCHBOARD_PUBLIC_URL", &url)
        .env("SWITCHBOARD_NODE_ID", &id)
        .env("SWITCHBOARD_DRAIN_TIMEOUT_SECS", "20")
        .env("SWITCHBOARD_LOG_LEVEL", "warn")
        .env("SWITCHBOARD_MAX_JOINS_PER_SECOND_PER_ADDRESS", "1000")
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Node {
        id,
        addr,
        url,
        process: Proc(child),
    })
}

fn cluster_heartbeat() -> Duration {
    signaling::cluster::HEARTBEAT
}

fn basic() -> String {
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("backend:{SECRET}"));
    format!("Basic {credentials}")
}

async fn token(addr: SocketAddr, user: &str, room: &str) -> Result<String> {
    token_granting(addr, user, room, json!({})).await
}

async fn token_granting(addr: SocketAddr, user: &str, room: &str, grants: Value) -> Result<String> {
    let reply: Value = reqwest::Client::new()
        .post(format!("http://{addr}/auth/token"))
        .header("authorization", basic())
        .json(&json!({"userId": user, "room": room, "grants": grants}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    reply["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no token in {reply}"))
}

/// Waits until every node answers and sees all `count` nodes in the cluster.
async fn until_cluster_of(nodes: &[&Node], count: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    'wait: loop {
        if Instant::now() > deadline {
            bail!("the nodes did not see a cluster of {count} within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for node in nodes {
            let Ok(list) = get_json(node.addr, "/api/nodes").await else {
                continue 'wait;
            };
            if list["nodes"].as_array().map_or(0, Vec::len) != count {
                continue 'wait;
            }
        }
        return Ok(());
    }
}

async fn get_json(addr: SocketAddr, path: &str) -> Result<Value> {
    Ok(reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .header("authorization", basic())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Where a client landed: the socket that got the awaited reply, the reply, the node's URL and
/// the redirects followed to get there.
struct Landed {
    ws: Ws,
    joined: Value,
    url: String,
    redirects: usize,
}

/// What a client does: opens a socket at `entry`, joins, and follows `redirect` (3 hops at most).
async fn join_via(entry: &str, token: &str, name: &str) -> Result<Landed> {
    enter_via(
        entry,
        token,
        json!({"type": "join", "name": name}),
        "joined",
    )
    .await
}

/// Sends `first` (`join`, `lobby` or `find_partner`) through `entry`, following `redirect` (3
/// hops at most), until the reply is `expect`.
async fn enter_via(entry: &str, token: &str, first: Value, expect: &str) -> Result<Landed> {
    let mut url = entry.to_owned();
    for redirects in 0..4 {
        let ws_url = format!("{}/ws/signal?token={token}", url.replacen("http", "ws", 1));
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(ws_url),
        )
        .await
        .context("connecting")??;
        send(&mut ws, first.clone()).await?;
        let reply = recv(&mut ws, Duration::from_secs(5)).await?;
        if reply["type"] == expect {
            return Ok(Landed {
                ws,
                joined: reply,
                url,
                redirects,
            });
        }
        if reply["type"] != "redirect" {
            bail!("refused: {reply}");
        }
        url = reply["url"]
            .as_str()
            .ok_or_else(|| anyhow!("redirect without url: {reply}"))?
            .to_owned();
    }
    bail!("more than 3 redirects")
}

/// Joins through `entry` again and again (as the SDK reconnects) until it is in.
async fn rejoin_via(entry: &str, token: &str, name: &str, within: Duration) -> Result<Landed> {
    let deadline = Instant::now() + within;
    let mut last = anyhow!("never tried");
    while Instant::now() < deadline {
        match join_via(entry, token, name).await {
            Ok(landed) => return Ok(landed),
            Err(err) => last = err,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last.context(format!("{name} could not rejoin within {within:?}")))
}

async fn media_client(landed: Landed) -> Result<TestClient> {
    let mut client =
        TestClient::from_joined(landed.ws, landed.joined, None, CongestionFeedback::Twcc).await?;
    client.publish().await?;
    Ok(client)
}

/// Both hear each other.
async fn media_both_ways(a: &mut TestClient, b: &mut TestClient) -> Result<()> {
    a.audio_until_received(b).await?;
    b.audio_until_received(a).await?;
    Ok(())
}

async fn until_closed(client: &mut TestClient, within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, client.events.recv()).await {
            Err(_) => bail!("the socket stayed open"),
            Ok(None | Some(Event::Closed)) => return Ok(()),
            Ok(Some(Event::Message(_))) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_place_rooms_by_load_survive_a_crash_and_drain() -> Result<()> {
    let redis_port = free_tcp_port()?;
    let _redis = start_redis(redis_port)?;
    let mut nodes = vec![
        start_node(0, redis_port)?,
        start_node(1, redis_port)?,
        start_node(2, redis_port)?,
    ];
    until_cluster_of(&nodes.iter().collect::<Vec<_>>(), 3).await?;

    // 30 rooms, one person each, everyone entering through node-0 (as behind a load balancer
    // that happens to pick it): placement goes by load, not by entry.
    let mut sockets = Vec::new();
    let mut redirected = 0;
    for i in 0..30 {
        let entry = &nodes[0];
        let room = format!("room-{i}");
        let token = token(entry.addr, &format!("user-{i}"), &room).await?;
        let landed = join_via(&entry.url, &token, &format!("Person {i}")).await?;
        redirected += landed.redirects;
        sockets.push(landed.ws);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listed = get_json(nodes[0].addr, "/api/rooms").await?;
    let rooms = listed["rooms"].as_array().cloned().unwrap_or_default();
    assert_eq!(rooms.len(), 30, "every room listed on any node: {listed}");
    let per_node: Vec<usize> = nodes
        .iter()
        .map(|node| {
            rooms
                .iter()
                .filter(|r| r["node"] == node.id.as_str())
                .count()
        })
        .collect();
    println!("30 rooms placed: {per_node:?} per node; {redirected} joins redirected");
    assert!(
        per_node.iter().all(|&n| (8..=12).contains(&n)),
        "rooms spread by load: {per_node:?}"
    );
    assert_eq!(
        redirected,
        30 - per_node[0],
        "joins reached rooms on other nodes through node-0"
    );
    drop(sockets);

    // An admin ends a room through a node that does not host it.
    let hosted_elsewhere = rooms
        .iter()
        .find(|r| r["node"] != nodes[0].id.as_str())
        .ok_or_else(|| anyhow!("no room off node-0"))?;
    let status = reqwest::Client::new()
        .delete(format!(
            "http://{}/api/rooms/{}",
            nodes[0].addr,
            hosted_elsewhere["name"].as_str().unwrap_or_default()
        ))
        .header("authorization", basic())
        .send()
        .await?
        .status();
    // Its one socket was dropped above: the room may be closing already (404) or ended (204).
    assert!(
        status == 204 || status == 404,
        "admin action forwarded: {status}"
    );

    // A call of two, reached through a node that does not host it.
    let room = "crash";
    let first = token(nodes[0].addr, "ann", room).await?;
    let landed = join_via(&nodes[0].url, &first, "Ann").await?;
    let host = nodes
        .iter()
        .position(|n| n.url == landed.url)
        .ok_or_else(|| anyhow!("unknown node"))?;
    let entry = nodes[(host + 1) % 3].url.clone();
    let mut ann = media_client(landed).await?;
    let second = token(nodes[0].addr, "ben", room).await?;
    let landed = join_via(&entry, &second, "Ben").await?;
    assert_eq!(landed.url, nodes[host].url, "Ben joins Ann's node");
    assert_eq!(
        landed.redirects, 1,
        "through a node that does not host the room"
    );
    let mut ben = media_client(landed).await?;
    media_both_ways(&mut ann, &mut ben).await?;

    // The host dies mid-call.
    let killed = Instant::now();
    let mut dead = nodes.remove(host);
    dead.process.0.kill()?;
    let _ = dead.process.0.wait();
    until_closed(&mut ann, Duration::from_secs(5)).await?;
    until_closed(&mut ben, Duration::from_secs(5)).await?;
    ann.vanish().await;
    ben.vanish().await;
    let (a, b) = tokio::join!(
        rejoin_via(&entry, &first, "Ann", Duration::from_secs(20)),
        rejoin_via(&entry, &second, "Ben", Duration::from_secs(20)),
    );
    let (a, b) = (a?, b?);
    assert_eq!(a.url, b.url, "both back on the same node");
    assert_ne!(a.url, dead.url, "on a live node");
    let rejoined = killed.elapsed();
    let call_url = a.url.clone();
    let mut ann = media_client(a).await?;
    let mut ben = media_client(b).await?;
    media_both_ways(&mut ann, &mut ben).await?;
    let failover = killed.elapsed();
    println!(
        "failover: rejoined {:.1} s and media both ways {:.1} s after SIGKILL",
        rejoined.as_secs_f64(),
        failover.as_secs_f64()
    );
    assert!(
        failover < Duration::from_secs(10),
        "media back within 10 s: {failover:?}"
    );

    // The node now hosting the call drains, asked through the other node.
    let host = nodes
        .iter()
        .position(|n| n.url == call_url)
        .ok_or_else(|| anyhow!("unknown node"))?;
    let other = 1 - host;
    let asked = Instant::now();
    let status = reqwest::Client::new()
        .post(format!(
            "http://{}/api/nodes/{}/drain",
            nodes[other].addr, nodes[host].id
        ))
        .header("authorization", basic())
        .send()
        .await?
        .status();
    assert_eq!(status, 202, "drain accepted");
    let moved_ann = ann.wait_for("moved", Duration::from_secs(5)).await?;
    let moved_ben = ben.wait_for("moved", Duration::from_secs(5)).await?;
    let target = moved_ann["url"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        target, nodes[other].url,
        "moved to the node left: {moved_ann}"
    );
    assert_eq!(moved_ben["url"], moved_ann["url"]);
    ann.leave().await?;
    ben.leave().await?;
    let (a, b) = tokio::join!(
        join_via(&target, &first, "Ann"),
        join_via(&target, &second, "Ben")
    );
    let (a, b) = (a?, b?);
    assert_eq!((a.redirects, b.redirects), (0, 0));
    let mut ann = media_client(a).await?;
    let mut ben = media_client(b).await?;
    media_both_ways(&mut ann, &mut ben).await?;
    let moved = asked.elapsed();
    // Empty, the drained node exits on its own.
    let mut draining = nodes.remove(host);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = draining.process.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the drained node did not exit");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "drain: call moved with media both ways {:.1} s after the drain was asked; the node exited ({status}) {:.1} s after",
        moved.as_secs_f64(),
        asked.elapsed().as_secs_f64()
    );
    assert!(status.success());
    // Its registration went with it, not at expiry: the next heartbeat of the last node sees
    // itself alone.
    tokio::time::sleep(cluster_heartbeat() + Duration::from_millis(200)).await;
    let left = get_json(nodes[0].addr, "/api/nodes").await?;
    assert_eq!(
        left["nodes"].as_array().map_or(0, Vec::len),
        1,
        "the drained node left the cluster: {left}"
    );
    drop((ann, ben));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_a_node_keeps_its_rooms_refuses_new_ones_and_recovers() -> Result<()> {
    let redis_port = free_tcp_port()?;
    let redis = start_redis(redis_port)?;
    let nodes = [start_node(0, redis_port)?, start_node(1, redis_port)?];
    until_cluster_of(&nodes.iter().collect::<Vec<_>>(), 2).await?;
    let ann_token = token(nodes[0].addr, "ann", "kept").await?;
    let ann = join_via(&nodes[0].url, &ann_token, "Ann").await?;
    let host = ann.url.clone();
    let mut ann = media_client(ann).await?;

    drop(redis);
    // A heartbeat finds it gone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ben_token = token(nodes[0].addr, "ben", "kept").await?;
    let ben = join_via(&host, &ben_token, "Ben").await?;
    let mut ben = media_client(ben).await?;
    media_both_ways(&mut ann, &mut ben).await?;
    let new_token = token(nodes[0].addr, "cid", "new-room").await?;
    let refused = join_via(&host, &new_token, "Cid").await;
    let refusal = format!(
        "{:#}",
        refused.err().ok_or_else(|| anyhow!("a new room opened"))?
    );
    assert!(refusal.contains("cluster_unavailable"), "{refusal}");
    println!("without Redis: {refusal}");

    let restarted = Instant::now();
    let _redis = start_redis(redis_port)?;
    let cid = rejoin_via(&nodes[1].url, &new_token, "Cid", Duration::from_secs(10)).await?;
    println!(
        "Redis back: a new room opened {:.1} s after it restarted",
        restarted.elapsed().as_secs_f64()
    );
    drop(cid);
    // The room that lived through it is claimed again by its node: a join through the other
    // node is sent there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dee_token = token(nodes[0].addr, "dee", "kept").await?;
    let other = if nodes[0].url == host {
        &nodes[1]
    } else {
        &nodes[0]
    };
    let dee = join_via(&other.url, &dee_token, "Dee").await?;
    assert_eq!(dee.url, host, "the surviving room is found where it lives");
    assert_eq!(dee.redirects, 1);
    media_both_ways(&mut ann, &mut ben).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lobby_and_the_waiting_queue_are_one_for_the_whole_cluster() -> Result<()> {
    let redis_port = free_tcp_port()?;
    let _redis = start_redis(redis_port)?;
    let nodes = [start_node(0, redis_port)?, start_node(1, redis_port)?];
    until_cluster_of(&nodes.iter().collect::<Vec<_>>(), 2).await?;
    let lobby = json!({"lobby": true});

    // Ann goes online through node-0, Ben through node-1: one lobby, so Ben sees Ann.
    let ann_token = token_granting(nodes[0].addr, "ann", "lobby", lobby.clone()).await?;
    // The sockets stay bound: dropping one would take its person offline.
    let Landed {
        ws: _ann,
        url: ann_node,
        ..
    } = enter_via(
        &nodes[0].url,
        &ann_token,
        json!({"type": "lobby", "name": "Ann"}),
        "lobby_joined",
    )
    .await?;
    let ben_token = token_granting(nodes[0].addr, "ben", "lobby", lobby.clone()).await?;
    let Landed {
        ws: _ben,
        joined: ben_joined,
        url: ben_node,
        ..
    } = enter_via(
        &nodes[1].url,
        &ben_token,
        json!({"type": "lobby", "name": "Ben"}),
        "lobby_joined",
    )
    .await?;
    assert_eq!(ann_node, ben_node, "one node hosts the lobby");
    let online: Vec<&str> = ben_joined["online"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(online, ["Ann"], "Ben sees Ann online: {ben_joined}");

    // Two strangers looking through different nodes are matched.
    let cid_token = token_granting(nodes[0].addr, "cid", "strangers", lobby.clone()).await?;
    let Landed {
        ws: mut cid,
        url: cid_node,
        ..
    } = enter_via(
        &nodes[1].url,
        &cid_token,
        json!({"type": "find_partner", "name": "Cid"}),
        "waiting",
    )
    .await?;
    let dee_token = token_granting(nodes[0].addr, "dee", "strangers", lobby).await?;
    let Landed {
        ws: mut dee,
        url: dee_node,
        ..
    } = enter_via(
        &nodes[0].url,
        &dee_token,
        json!({"type": "find_partner", "name": "Dee"}),
        "waiting",
    )
    .await?;
    assert_eq!(cid_node, dee_node, "one node hosts the queue");
    let matched = support::recv_type(&mut cid, "matched", Duration::from_secs(5)).await?;
    assert_eq!(matched["name"], "Dee");
    let matched = support::recv_type(&mut dee, "matched", Duration::from_secs(5)).await?;
    assert_eq!(matched["name"], "Cid");
    Ok(())
}
