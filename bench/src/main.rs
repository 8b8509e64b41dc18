//! `switchboard-bench`: measures how much a Switchboard server forwards, with what loss and
//! latency, at what CPU cost, with synthetic publishers and subscribers speaking the real
//! protocol. docs/benchmarks.md explains every figure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use switchboard_bench::client::{self, Tally, VideoShape, Viewing};
use switchboard_bench::report;
use tokio::sync::{oneshot, watch};

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// P publishers and S subscribers in one room for T seconds.
    Fixed,
    /// P publishers; subscribers added `--step` at a time (each step measured for
    /// `--step-seconds`) until loss passes 1 % or p99 latency passes 50 ms.
    Ramp,
    /// `--participants` N, each publishing one video and receiving all the others, for T
    /// seconds: a 7-20 person call.
    LargeRoom,
    /// P publishers and S subscribers receiving, then `--storm` N more subscribers join at
    /// once: their join times and failures, and what the S lost meanwhile.
    JoinStorm,
    /// `--participants` N people go online in the lobby at once, one more arrives, then N
    /// others look for a partner at once: how long each waited (signaling only, no media).
    Matchmaking,
}

/// Measures a Switchboard server with synthetic participants speaking the real protocol.
#[derive(Debug, Parser)]
#[command(name = "switchboard-bench", version, about)]
struct Cli {
    /// `fixed`, `ramp`, `large-room`, `join-storm` or `matchmaking`.
    #[arg(long, value_enum, default_value_t = Scenario::Fixed)]
    scenario: Scenario,
    /// Large room: participants, each publishing and subscribing.
    #[arg(long, default_value_t = 10)]
    participants: u16,
    /// Join storm: participants joining at once.
    #[arg(long, default_value_t = 100)]
    storm: u32,
    /// Ramp: subscribers added per step.
    #[arg(long, default_value_t = 50)]
    step: u32,
    /// Ramp: seconds measured per step.
    #[arg(long, default_value_t = 5)]
    step_seconds: u64,
    /// Ramp: stop at this many subscribers.
    #[arg(long, default_value_t = 1000)]
    max_subscribers: u32,
    /// A running server (its rooms must use the SFU: start it with --mesh-max 0).
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080",
        conflicts_with = "spawn"
    )]
    url: String,
    /// An API key, `name:secret`, to mint tokens with: for a server with api_keys (a cluster).
    /// With it, the report ends with each node's load (`GET /api/nodes`, also in nodes.json).
    #[arg(long)]
    api_key: Option<String>,
    /// Start the server binary on a free port instead, pinned to core 0 with taskset.
    #[arg(long)]
    spawn: bool,
    /// The server binary for --spawn.
    #[arg(long, default_value = "target/release/switchboard")]
    server_bin: PathBuf,
    /// The server's process id (for its CPU and memory) when it was not spawned.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Publishers, each sending one video track.
    #[arg(long, default_value_t = 1)]
    publishers: u16,
    /// Subscribers, each receiving every publisher.
    #[arg(long, default_value_t = 10)]
    subscribers: u32,
    /// Seconds of measurement (after everyone receives).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Video bits per second per publisher.
    #[arg(long, default_value_t = 1_500_000)]
    bitrate: u64,
    /// Video frames per second.
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Room name.
    #[arg(long, default_value = "bench")]
    room: String,
    /// Where report.json, report.md and the SVG charts go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// CI smoke run: exit with an error unless every packet arrived and the written files parse
    /// back (JSON, and the SVG charts as XML).
    #[arg(long)]
    smoke: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Publish every video in three simulcast layers (q, h, f at a tenth, a third and all of
    /// --bitrate), as the browser SDK does.
    #[arg(long)]
    simulcast: bool,
    /// Subscribers show every video in a tile of this size (`WIDTHxHEIGHT`, device pixels) and
    /// tell the server (`view`); without it they send no size and get the top layer.
    #[arg(long, value_parser = parse_size)]
    tile: Option<(u32, u32)>,
    /// With --tile: one video (the same publisher for everyone) is shown on a stage of this
    /// size instead.
    #[arg(long, value_parser = parse_size, requires = "tile")]
    stage: Option<(u32, u32)>,
    /// Fixed scenario: shape each subscriber's downlink to this rate (bits per second, with k
    /// or M: `600k`, `5M`) in the generator's own socket layer, a queue of at most 100 ms as a
    /// router's; the report then has a row per subscriber (estimate, delivered bitrate, loss,
    /// keyframe waits), measured from 5 s after every subscription delivers.
    #[arg(long, value_parser = parse_rate)]
    subscriber_rate: Option<u64>,
    /// With --subscriber-rate: shape only the first N subscribers (the rest are the unshaped
    /// ones to compare with).
    #[arg(long, requires = "subscriber_rate")]
    shaped_subscribers: Option<u32>,
    /// Subscribers let the kernel coalesce received datagrams (UDP GRO). No browser does:
    /// with it a whole GSO batch is one read, and the server looks cheaper than it is.
    #[arg(long)]
    gro: bool,
    /// The SRTP protection profile subscribers offer.
    #[arg(long, value_enum, default_value_t)]
    srtp: client::Srtp,
    /// When publishers send keyframes: at their 2 s interval and when the server asks, or at
    /// the interval only (as some encoders do).
    #[arg(long, value_enum, default_value_t)]
    publisher_keyframes: client::Keyframes,
}

/// With --subscriber-rate, measuring starts this long after every subscription delivers.
const SHAPED_SETTLE: Duration = Duration::from_secs(5);

/// A rate in bits per second: `600000`, `600k`, `5M`.
fn parse_rate(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.strip_suffix(['k', 'K']) {
        Some(digits) => (digits, 1_000),
        None => match text.strip_suffix('M') {
            Some(digits) => (digits, 1_000_000),
            None => (text, 1),
        },
    };
    digits
        .parse::<f64>()
        .ok()
        .map(|value| (value * unit as f64) as u64)
        .filter(|bps| (10_000..=10_000_000_000).contains(bps))
        .ok_or_else(|| format!("`{text}` is not a rate from 10k to 10000M bits per second"))
}

/// `WIDTHxHEIGHT`, e.g. `320x180`.
fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let (width, height) = text
        .split_once('x')
        .ok_or_else(|| format!("`{text}` is not WIDTHxHEIGHT"))?;
    let parse = |v: &str| {
        v.parse::<u32>()
            .ok()
            .filter(|n| (1..=16_384).contains(n))
            .ok_or_else(|| format!("`{v}` is not a size from 1 to 16384"))
    };
    Ok((parse(width)?, parse(height)?))
}

impl Cli {
    fn shape(&self) -> VideoShape {
        VideoShape {
            bitrate: self.bitrate,
            fps: self.fps,
            keyframe_interval: Duration::from_secs(2),
            simulcast: self.simulcast,
            keyframes: self.publisher_keyframes,
        }
    }

    fn receiving(&self) -> client::Receiving {
        client::Receiving {
            gro: self.gro,
            srtp: self.srtp,
        }
    }

    fn viewing(&self) -> Viewing {
        Viewing {
            tile: self.tile,
            stage: self.stage,
        }
    }
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Resident memory of a process in MiB, from /proc.
fn rss_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The server's forwarded-packet counter, from /metrics.
async fn forwarded_packets(base: &str) -> Option<u64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("switchboard_forwarded_packets_total "))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        // SIGTERM first: the server then closes every session cleanly.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        for _ in 0..50 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
    }
}

async fn spawn_server(bin: &PathBuf) -> Result<(String, Spawned)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let args = [
        "--bind".to_owned(),
        format!("127.0.0.1:{port}"),
        "--mesh-max".into(),
        "0".into(),
        "--max-participants".into(),
        "100000".into(),
        "--log-level".into(),
        "warn".into(),
    ];
    let taskset = Command::new("taskset").arg("--version").output().is_ok();
    let mut command = if taskset {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    // Every simulated client comes from this one address, in storms: the server's limits per
    // address and per room (meant for strangers) would turn most of them away.
    for (key, value) in [
        ("SWITCHBOARD_MAX_CONNECTIONS", "1000000"),
        ("SWITCHBOARD_MAX_CONNECTIONS_PER_ADDRESS", "1000000"),
        ("SWITCHBOARD_MAX_JOINS_PER_SECOND_PER_ADDRESS", "1000000"),
        ("SWITCHBOARD_MAX_JOINS_PER_SECOND_PER_ROOM", "1000000"),
        ("SWITCHBOARD_MAX_LOBBY_MEMBERS", "1000000"),
        ("SWITCHBOARD_MAX_WAITING", "1000000"),
    ] {
        command.env(key, value);
    }
    let child = command
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let spawned = Spawned(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if reqwest::get(format!("{base}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok((base, spawned));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the spawned server did not answer /healthz within 20 s")
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // Hundreds of clients, each with sockets of its own: the usual 1024 descriptors run out.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("could not raise the open-file limit: {err}");
    }
    if let Some(key) = &cli.api_key {
        client::use_api_key(key)?;
    }
    let (base, spawned) = if cli.spawn {
        let (base, spawned) = spawn_server(&cli.server_bin).await?;
        (base, Some(spawned))
    } else {
        (cli.url.trim_end_matches('/').to_owned(), None)
    };
    let server_pid = spawned
        .as_ref()
        .map(|s| {
            // With taskset, the child execs the server in place: same pid.
            s.0.id()
        })
        .or(cli.server_pid)
        .map(|p| p.to_string());
    if cli.scenario == Scenario::Ramp {
        let result = ramp(&cli, &base, server_pid.as_deref()).await;
        drop(spawned);
        return publish(&cli, &result?, report::write_ramp, report::ramp_markdown);
    }
    if cli.scenario == Scenario::Matchmaking {
        let pid = server_pid.clone();
        let cpu_before = pid.as_deref().and_then(cpu_seconds);
        let result = switchboard_bench::social::matchmaking(&base, cli.participants.into(), || {
            pid.as_deref().and_then(rss_mib)
        })
        .await;
        let cpu_after = pid.as_deref().and_then(cpu_seconds);
        drop(spawned);
        let mut report = result?;
        report.server_cpu_seconds = cpu_before.zip(cpu_after).map(|(a, b)| b - a);
        return publish(
            &cli,
            &report,
            switchboard_bench::social::write,
            switchboard_bench::social::markdown,
        );
    }
    if cli.scenario == Scenario::JoinStorm {
        let result = storm(&cli, &base, server_pid.as_deref()).await;
        drop(spawned);
        return publish(&cli, &result?, report::write_storm, report::storm_markdown);
    }
    let result = run(&cli, &base, server_pid.as_deref()).await;
    let nodes = node_load(&base).await;
    drop(spawned);
    let report = result?;
    publish(&cli, &report, report::write_all, report::markdown)?;
    if let Some(nodes) = nodes {
        report_nodes(&cli, &nodes)?;
    }
    if cli.smoke {
        if report.totals.lost_packets != 0 || report.totals.received_packets == 0 {
            bail!(
                "smoke run: {} of {} packets lost, expected none",
                report.totals.lost_packets,
                report.totals.expected_packets
            );
        }
        report::verify_files(&cli.out)?;
        println!("smoke run: no loss, report files well-formed");
    }
    Ok(())
}

/// Each node's load at the end of the run (`GET /api/nodes`), when an API key allows asking.
async fn node_load(base: &str) -> Option<serde_json::Value> {
    let (name, secret) = client::api_key()?;
    let reply = reqwest::Client::new()
        .get(format!("{base}/api/nodes"))
        .basic_auth(name, Some(secret))
        .send()
        .await
        .ok()?;
    let nodes: serde_json::Value = reply.json().await.ok()?;
    nodes["cluster"].as_bool()?.then_some(nodes)
}

/// Prints the nodes' load and writes it to nodes.json.
fn report_nodes(cli: &Cli, nodes: &serde_json::Value) -> Result<()> {
    std::fs::write(
        cli.out.join("nodes.json"),
        serde_json::to_string_pretty(nodes)?,
    )?;
    println!("| node | participants | rooms | CPU (cores) | backlog | draining |");
    println!("|---|---|---|---|---|---|");
    for node in nodes["nodes"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            node["id"].as_str().unwrap_or("?"),
            node["participants"],
            node["rooms"],
            node["cpu"],
            node["backlog"],
            node["draining"]
        );
    }
    Ok(())
}

/// Writes a report's files to `--out` and prints its Markdown summary.
fn publish<R>(
    cli: &Cli,
    report: &R,
    write: fn(&R, &std::path::Path) -> Result<()>,
    markdown: fn(&R) -> String,
) -> Result<()> {
    std::fs::create_dir_all(&cli.out)?;
    write(report, &cli.out)?;
    println!("{}", markdown(report));
    println!("written to {}", cli.out.display());
    Ok(())
}

/// Starts `--publishers` publishers into `tally`, each sending until `stop`.
fn spawn_publishers(
    cli: &Cli,
    base: &str,
    tally: &std::sync::Arc<Tally>,
    stop: &watch::Receiver<client::Phase>,
) -> Vec<tokio::task::JoinHandle<Result<()>>> {
    let shape = cli.shape();
    (0..cli.publishers)
        .map(|index| {
            let (tx, _rx) = oneshot::channel();
            tokio::spawn(client::publisher(
                base.to_owned(),
                cli.room.clone(),
                index,
                shape,
                tally.clone(),
                tx,
                stop.clone(),
            ))
        })
        .collect()
}

/// Loss above this ends a ramp.
const RAMP_MAX_LOSS_PERCENT: f64 = 1.0;
/// p99 latency above this ends a ramp.
const RAMP_MAX_P99_MS: f64 = 50.0;

async fn ramp(cli: &Cli, base: &str, server_pid: Option<&str>) -> Result<report::RampReport> {
    let tally = Tally::new();
    let (stop_tx, stop) = watch::channel(client::Phase::Running);
    let mut tasks = spawn_publishers(cli, base, &tally, &stop);
    let own_pid = std::process::id().to_string();
    let bar = if cli.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(u64::from(cli.max_subscribers))
    };
    let mut steps = Vec::new();
    let mut subscribers = 0u32;
    let mut largest_held = None;
    let mut ended_because = format!("reached --max-subscribers {}", cli.max_subscribers);
    while subscribers < cli.max_subscribers {
        let add = cli.step.min(cli.max_subscribers - subscribers);
        for index in subscribers..subscribers + add {
            let (tx, _rx) = oneshot::channel();
            tasks.push(tokio::spawn(client::subscriber(
                base.to_owned(),
                cli.room.clone(),
                index,
                cli.viewing(),
                cli.receiving(),
                tally.clone(),
                Arc::default(),
                None,
                tx,
                stop.clone(),
            )));
        }
        subscribers += add;
        let expected_tracks = u64::from(cli.publishers) * u64::from(subscribers);
        let warmup = Instant::now();
        while tally.live_tracks.load(Ordering::Relaxed) < expected_tracks
            && warmup.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let live = tally.live_tracks.load(Ordering::Relaxed);
        // Settle: joining costs CPU that is not forwarding.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (sent0, received0) = (
            tally.sent.load(Ordering::Relaxed),
            tally.received.load(Ordering::Relaxed),
        );
        let forwarded0 = forwarded_packets(base).await;
        let (server0, own0) = (server_pid.and_then(cpu_seconds), cpu_seconds(&own_pid));
        tally.latency.take();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(cli.step_seconds)).await;
        let sent = tally.sent.load(Ordering::Relaxed) - sent0;
        let forwarded1 = forwarded_packets(base).await;
        let (server1, own1) = (server_pid.and_then(cpu_seconds), cpu_seconds(&own_pid));
        let elapsed = started.elapsed().as_secs_f64();
        // What was sent in the window has had 300 ms to arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let received = tally.received.load(Ordering::Relaxed) - received0;
        let latency = tally.latency.take();
        let expected = sent * u64::from(subscribers);
        let loss = if expected > 0 {
            expected.saturating_sub(received) as f64 * 100.0 / expected as f64
        } else {
            0.0
        };
        let step = report::Step {
            subscribers,
            live_subscriptions: live,
            forwarded_pps: match (forwarded1, forwarded0) {
                (Some(b), Some(a)) => Some(b.saturating_sub(a) as f64 / elapsed),
                _ => None,
            },
            loss_percent: loss,
            latency_p50_ms: client::quantile_ms(&latency, 0.50),
            latency_p99_ms: client::quantile_ms(&latency, 0.99),
            server_cpu_percent: match (server1, server0) {
                (Some(b), Some(a)) => Some((b - a) / elapsed * 100.0),
                _ => None,
            },
            generator_cpu_percent: match (own1, own0) {
                (Some(b), Some(a)) => Some((b - a) / elapsed * 100.0),
                _ => None,
            },
        };
        bar.set_position(u64::from(subscribers));
        bar.set_message(format!(
            "loss {loss:.2} %, p99 {:?} ms",
            step.latency_p99_ms
        ));
        let p99 = step.latency_p99_ms.unwrap_or(f64::INFINITY);
        let held =
            live == expected_tracks && loss <= RAMP_MAX_LOSS_PERCENT && p99 <= RAMP_MAX_P99_MS;
        steps.push(step);
        if !held {
            ended_because = format!(
                "at {subscribers} subscribers: loss {loss:.2} %, p99 {p99:.1} ms, {live} of {expected_tracks} subscriptions live"
            );
            break;
        }
        largest_held = Some(subscribers);
    }
    bar.finish_and_clear();
    let _ = stop_tx.send(client::Phase::Leave);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(report::RampReport {
        publishers: cli.publishers,
        bitrate: cli.bitrate,
        fps: cli.fps,
        step_seconds: cli.step_seconds,
        max_loss_percent: RAMP_MAX_LOSS_PERCENT,
        max_p99_ms: RAMP_MAX_P99_MS,
        largest_held,
        ended_because,
        steps,
    })
}

/// What the incumbents received over a window that started at `sent0`/`received0`.
struct Window {
    started: Instant,
    sent0: u64,
    received0: u64,
    server0: Option<f64>,
    own0: Option<f64>,
}

impl Window {
    fn open(publishers: &Tally, incumbents: &Tally, server_pid: Option<&str>) -> Self {
        incumbents.latency.take();
        Self {
            started: Instant::now(),
            sent0: publishers.sent.load(Ordering::Relaxed),
            received0: incumbents.received.load(Ordering::Relaxed),
            server0: server_pid.and_then(cpu_seconds),
            own0: cpu_seconds(&std::process::id().to_string()),
        }
    }

    /// Closes the window; what was sent in it gets 300 ms more to arrive.
    async fn close(
        self,
        publishers: &Tally,
        incumbents: &Tally,
        count: u32,
        server_pid: Option<&str>,
    ) -> report::StormWindow {
        let sent = publishers.sent.load(Ordering::Relaxed) - self.sent0;
        let seconds = self.started.elapsed().as_secs_f64();
        let server1 = server_pid.and_then(cpu_seconds);
        let own1 = cpu_seconds(&std::process::id().to_string());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let received = incumbents.received.load(Ordering::Relaxed) - self.received0;
        let latency = incumbents.latency.take();
        let expected = sent * u64::from(count);
        report::StormWindow {
            seconds,
            loss_percent: if expected > 0 {
                expected.saturating_sub(received) as f64 * 100.0 / expected as f64
            } else {
                0.0
            },
            latency_p50_ms: client::quantile_ms(&latency, 0.50),
            latency_p99_ms: client::quantile_ms(&latency, 0.99),
            server_cpu_percent: match (server1, self.server0) {
                (Some(b), Some(a)) => Some((b - a) / seconds * 100.0),
                _ => None,
            },
            generator_cpu_percent: match (own1, self.own0) {
                (Some(b), Some(a)) => Some((b - a) / seconds * 100.0),
                _ => None,
            },
        }
    }
}

/// Waits (at most 30 s) until `tally` has `tracks` live subscriptions.
async fn wait_live(tally: &Tally, tracks: u64) -> bool {
    let started = Instant::now();
    while tally.live_tracks.load(Ordering::Relaxed) < tracks {
        if started.elapsed() > Duration::from_secs(30) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

async fn storm(cli: &Cli, base: &str, server_pid: Option<&str>) -> Result<report::StormReport> {
    // Publishers count what they send, incumbents and newcomers what they receive, apart.
    let (publishing, incumbents, newcomers) = (Tally::new(), Tally::new(), Tally::new());
    let (stop_tx, stop) = watch::channel(client::Phase::Running);
    let mut tasks = spawn_publishers(cli, base, &publishing, &stop);
    for index in 0..cli.subscribers {
        let (tx, _rx) = oneshot::channel();
        tasks.push(tokio::spawn(client::subscriber(
            base.to_owned(),
            cli.room.clone(),
            index,
            cli.viewing(),
            cli.receiving(),
            incumbents.clone(),
            Arc::default(),
            None,
            tx,
            stop.clone(),
        )));
    }
    let publishers = u64::from(cli.publishers);
    if !wait_live(&incumbents, publishers * u64::from(cli.subscribers)).await {
        bail!("the incumbents did not all receive within 30 s");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = Window::open(&publishing, &incumbents, server_pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = window
        .close(&publishing, &incumbents, cli.subscribers, server_pid)
        .await;

    let window = Window::open(&publishing, &incumbents, server_pid);
    let started = Instant::now();
    let mut joins = Vec::new();
    for index in 0..cli.storm {
        let (tx, rx) = oneshot::channel();
        joins.push(rx);
        tasks.push(tokio::spawn(client::subscriber(
            base.to_owned(),
            cli.room.clone(),
            cli.subscribers + index,
            cli.viewing(),
            cli.receiving(),
            newcomers.clone(),
            Arc::default(),
            None,
            tx,
            stop.clone(),
        )));
    }
    let mut join_ms = Vec::new();
    let mut failed = 0;
    for rx in joins {
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(took)) => join_ms.push(took.as_secs_f64() * 1000.0),
            _ => failed += 1,
        }
    }
    let all_receiving = wait_live(&newcomers, publishers * u64::from(cli.storm))
        .await
        .then(|| started.elapsed().as_secs_f64());
    // A second more, so the window covers the newcomers' first keyframes too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = window
        .close(&publishing, &incumbents, cli.subscribers, server_pid)
        .await;
    let _ = stop_tx.send(client::Phase::Leave);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    join_ms.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        join_ms
            .get(((join_ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    Ok(report::StormReport {
        publishers: cli.publishers,
        incumbents: cli.subscribers,
        storm: cli.storm,
        joined: join_ms.len(),
        failed,
        join_p50_ms: pick(0.50),
        join_p99_ms: pick(0.99),
        join_max_ms: join_ms.last().copied(),
        all_receiving_after_s: all_receiving,
        before,
        during,
    })
}

async fn run(cli: &Cli, base: &str, server_pid: Option<&str>) -> Result<report::Report> {
    let tally = Tally::new();
    let (stop_tx, stop) = watch::channel(client::Phase::Running);
    let shape = cli.shape();
    let mut tasks = Vec::new();
    let mut joins = Vec::new();
    let large_room = cli.scenario == Scenario::LargeRoom;
    // Who publishes, and how many receivers each published packet has.
    let (publishers, receivers) = if large_room {
        (
            cli.participants,
            u64::from(cli.participants.saturating_sub(1)),
        )
    } else {
        (cli.publishers, u64::from(cli.subscribers))
    };
    for index in 0..publishers {
        let (tx, rx) = oneshot::channel();
        joins.push(rx);
        let task = if large_room {
            tokio::spawn(client::participant(
                base.to_owned(),
                cli.room.clone(),
                index,
                shape,
                cli.viewing(),
                cli.receiving(),
                tally.clone(),
                tx,
                stop.clone(),
            ))
        } else {
            tokio::spawn(client::publisher(
                base.to_owned(),
                cli.room.clone(),
                index,
                shape,
                tally.clone(),
                tx,
                stop.clone(),
            ))
        };
        tasks.push(task);
    }
    let mut per_subscriber = Vec::new();
    for index in 0..if large_room { 0 } else { cli.subscribers } {
        let (tx, rx) = oneshot::channel();
        joins.push(rx);
        let own = Arc::new(client::SubscriberStats::default());
        let link = cli
            .subscriber_rate
            .filter(|_| cli.shaped_subscribers.is_none_or(|n| index < n));
        per_subscriber.push((index, link, own.clone()));
        tasks.push(tokio::spawn(client::subscriber(
            base.to_owned(),
            cli.room.clone(),
            index,
            cli.viewing(),
            cli.receiving(),
            tally.clone(),
            own,
            link,
            tx,
            stop.clone(),
        )));
    }
    let mut join_ms = Vec::new();
    for rx in joins {
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(took)) => join_ms.push(took.as_secs_f64() * 1000.0),
            _ => {
                let _ = stop_tx.send(client::Phase::Leave);
                let failed = tasks.into_iter().find(|t| t.is_finished());
                let why = match failed {
                    Some(task) => format!("{:?}", task.await),
                    None => "timed out".into(),
                };
                bail!("a participant did not join within 60 s: {why}");
            }
        }
    }
    // Measure only once every subscriber receives every publisher.
    let expected_tracks = u64::from(publishers) * receivers;
    let warmup = Instant::now();
    while tally.live_tracks.load(Ordering::Relaxed) < expected_tracks {
        if warmup.elapsed() > Duration::from_secs(60) {
            let _ = stop_tx.send(client::Phase::Leave);
            bail!(
                "only {} of {expected_tracks} subscriptions delivered media within 60 s",
                tally.live_tracks.load(Ordering::Relaxed)
            );
        }
        if let Some(failed) = tasks.iter().position(|t| t.is_finished()) {
            let _ = stop_tx.send(client::Phase::Leave);
            let task = tasks.swap_remove(failed);
            let outcome = task.await;
            bail!("a participant stopped during warm-up: {outcome:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let time_to_media = warmup.elapsed();
    if cli.subscriber_rate.is_some() {
        // A shaped subscriber's first seconds are its estimate finding the link (everything
        // is sent until the network pushes back): measure it settled, as the browser rig does.
        tokio::time::sleep(SHAPED_SETTLE).await;
    }

    let bar = if cli.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cli.duration)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let own_pid = std::process::id().to_string();
    tally.open_window();
    let start_duplicates = tally.duplicates.load(Ordering::Relaxed);
    let start_received = tally.received.load(Ordering::Relaxed);
    let start_bytes = tally.received_bytes.load(Ordering::Relaxed);
    let start_sent_bytes = tally.sent_bytes.load(Ordering::Relaxed);
    let start_gaps = tally.gaps.load(Ordering::Relaxed);
    let snapshot = |own: &client::SubscriberStats| {
        [
            own.received.load(Ordering::Relaxed),
            own.received_bytes.load(Ordering::Relaxed),
            own.gaps.load(Ordering::Relaxed),
            own.keyframe_waits.load(Ordering::Relaxed),
            own.frozen_micros.load(Ordering::Relaxed),
            own.link_drops.load(Ordering::Relaxed),
        ]
    };
    let subscribers_at_start: Vec<[u64; 6]> = per_subscriber
        .iter()
        .map(|(_, _, own)| snapshot(own))
        .collect();
    let start_forwarded = forwarded_packets(base).await;
    let start_server_cpu = server_pid.and_then(cpu_seconds);
    let start_own_cpu = cpu_seconds(&own_pid);
    tally.latency.take();
    let mut all_latency = vec![0u64; 20_001];
    let mut seconds = Vec::new();
    let started = Instant::now();
    let (mut prev_received, mut prev_forwarded) = (start_received, start_forwarded);
    let (mut prev_server_cpu, mut prev_own_cpu) = (start_server_cpu, start_own_cpu);
    let mut prev_at = started;
    for second in 1..=cli.duration {
        tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
        let now = Instant::now();
        let elapsed = now.duration_since(prev_at).as_secs_f64();
        prev_at = now;
        let received = tally.received.load(Ordering::Relaxed);
        let forwarded = forwarded_packets(base).await;
        let server_cpu = server_pid.and_then(cpu_seconds);
        let own_cpu = cpu_seconds(&own_pid);
        let latency = tally.latency.take();
        for (total, count) in all_latency.iter_mut().zip(&latency) {
            *total += count;
        }
        let row = report::Second {
            second,
            received_pps: (received - prev_received) as f64 / elapsed,
            forwarded_pps: match (forwarded, prev_forwarded) {
                (Some(now), Some(before)) => Some(now.saturating_sub(before) as f64 / elapsed),
                _ => None,
            },
            latency_p50_ms: client::quantile_ms(&latency, 0.50),
            latency_p99_ms: client::quantile_ms(&latency, 0.99),
            server_cpu_percent: match (server_cpu, prev_server_cpu) {
                (Some(now), Some(before)) => Some((now - before) / elapsed * 100.0),
                _ => None,
            },
            server_rss_mib: server_pid.and_then(rss_mib),
            generator_cpu_percent: match (own_cpu, prev_own_cpu) {
                (Some(now), Some(before)) => Some((now - before) / elapsed * 100.0),
                _ => None,
            },
        };
        bar.set_message(format!(
            "{:.0} pkt/s received, p99 {}, server CPU {}",
            row.received_pps,
            row.latency_p99_ms
                .map_or("-".into(), |v| format!("{v:.1} ms")),
            row.server_cpu_percent
                .map_or("-".into(), |v| format!("{v:.0} %")),
        ));
        bar.inc(1);
        seconds.push(row);
        prev_received = received;
        prev_forwarded = forwarded;
        prev_server_cpu = server_cpu;
        prev_own_cpu = own_cpu;
    }
    bar.finish_and_clear();
    let measured = started.elapsed().as_secs_f64();
    let end_forwarded = forwarded_packets(base).await;
    let end_server_cpu = server_pid.and_then(cpu_seconds);
    let end_own_cpu = cpu_seconds(&own_pid);
    // Stop sending, then let what is in flight arrive before counting losses: everyone stays
    // connected meanwhile (a subscriber gone at once would lose the last packets in flight).
    tally.close_window();
    let _ = stop_tx.send(client::Phase::Quiet);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Probes sent in the window, and the distinct ones of them each subscriber received.
    let sent = tally.window_sent.load(Ordering::Relaxed);
    let received = tally.window_received.load(Ordering::Relaxed);
    let duplicates = tally.duplicates.load(Ordering::Relaxed) - start_duplicates;
    let received_bytes = tally.received_bytes.load(Ordering::Relaxed) - start_bytes;
    let sent_bytes = tally.sent_bytes.load(Ordering::Relaxed) - start_sent_bytes;
    let gaps = tally.gaps.load(Ordering::Relaxed) - start_gaps;
    let subscribers = if cli.subscriber_rate.is_some() {
        per_subscriber
            .iter()
            .zip(&subscribers_at_start)
            .map(|((index, link, own), start)| {
                let end = snapshot(own);
                let [received, bytes, gaps, waits, frozen, drops]: [u64; 6] =
                    std::array::from_fn(|i| end[i].saturating_sub(start[i]));
                report::SubscriberRow {
                    index: *index,
                    link_bps: *link,
                    estimate_bps: own.estimate.load(Ordering::Relaxed),
                    delivered_bps: (bytes as f64 * 8.0 / measured) as u64,
                    loss_percent: if received + gaps > 0 {
                        gaps as f64 * 100.0 / (received + gaps) as f64
                    } else {
                        0.0
                    },
                    link_drops: drops,
                    keyframe_waits: waits,
                    frozen_s: frozen as f64 / 1e6,
                    paused: own.paused.load(Ordering::Relaxed),
                    lowered: own.lowered.load(Ordering::Relaxed),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let _ = stop_tx.send(client::Phase::Leave);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    // With simulcast a subscriber receives one layer of what is sent: losses are the gaps in
    // what it receives.
    let expected = if cli.simulcast {
        received + gaps
    } else {
        sent * receivers
    };
    // Not clamped: more distinct probes received than sent would be a counting error to see.
    let lost = expected as i64 - received as i64;
    // Who receives: every participant but the publisher itself in a large room.
    let receiving_clients = if large_room {
        u64::from(publishers)
    } else {
        u64::from(cli.subscribers)
    };
    let forwarded = match (end_forwarded, start_forwarded) {
        (Some(end), Some(start)) => Some(end.saturating_sub(start)),
        _ => None,
    };
    let server_cpu = match (end_server_cpu, start_server_cpu) {
        (Some(end), Some(start)) => Some(end - start),
        _ => None,
    };
    let own_cpu = match (end_own_cpu, start_own_cpu) {
        (Some(end), Some(start)) => Some(end - start),
        _ => None,
    };
    join_ms.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        join_ms
            .get(((join_ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    let generator_cpu_percent = own_cpu.map(|c| c / measured * 100.0);
    Ok(report::Report {
        config: report::Config {
            url: base.to_owned(),
            spawned: cli.spawn,
            publishers,
            subscribers: u32::try_from(receivers).unwrap_or(u32::MAX),
            large_room,
            duration_s: cli.duration,
            bitrate: cli.bitrate,
            fps: cli.fps,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            simulcast: cli.simulcast,
            tile: cli.tile,
            stage: cli.stage,
            gro: cli.gro,
            srtp: cli.srtp,
            publisher_keyframes: cli.publisher_keyframes,
        },
        totals: report::Totals {
            sent_packets: sent,
            expected_packets: expected,
            received_packets: received,
            lost_packets: lost,
            loss_percent: if expected > 0 {
                lost as f64 * 100.0 / expected as f64
            } else {
                0.0
            },
            gap_lost_packets: gaps,
            duplicate_packets: duplicates,
            forwarded_pps: forwarded.map(|f| f as f64 / measured),
            received_mbps: received_bytes as f64 * 8.0 / measured / 1e6,
            received_kbps_per_receiver: received_bytes as f64 * 8.0
                / measured
                / 1e3
                / receiving_clients.max(1) as f64,
            sent_kbps_per_publisher: sent_bytes as f64 * 8.0
                / measured
                / 1e3
                / f64::from(publishers.max(1)),
            latency_p50_ms: client::quantile_ms(&all_latency, 0.50),
            latency_p95_ms: client::quantile_ms(&all_latency, 0.95),
            latency_p99_ms: client::quantile_ms(&all_latency, 0.99),
            join_p50_ms: pick(0.50),
            join_p99_ms: pick(0.99),
            time_to_media_s: time_to_media.as_secs_f64(),
            server_cpu_percent: server_cpu.map(|c| c / measured * 100.0),
            server_rss_mib: seconds.last().and_then(|s| s.server_rss_mib),
            server_cpu_us_per_forwarded_packet: match (server_cpu, forwarded) {
                (Some(cpu), Some(f)) if f > 0 => Some(cpu * 1e6 / f as f64),
                _ => None,
            },
            generator_cpu_percent,
            generator_cpu_us_per_received_packet: own_cpu
                .filter(|_| received > 0)
                .map(|c| c * 1e6 / received as f64),
            generator_saturated: generator_cpu_percent.is_some_and(|p| p > 80.0),
        },
        seconds,
        subscribers,
    })
}
