//! The lobby and the waiting queue under load (`--scenario matchmaking`): N people go online at
//! once (how long each waits for `lobby_joined`), one more arrives while they are all there (how
//! long until each of them sees it), then N others look for a partner at once (how long until
//! each is matched). Signaling only: no media.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::SinkExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Ws, recv};

/// Longest any one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Latencies of one step, in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Latencies {
    pub done: usize,
    pub failed: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Latencies {
    fn of(mut ms: Vec<f64>, failed: usize) -> Self {
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        Self {
            done: ms.len(),
            failed,
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            max_ms: ms.last().copied(),
        }
    }
}

/// What `--scenario matchmaking` measured.
#[derive(Debug, Default, Serialize)]
pub struct SocialReport {
    pub people: u32,
    /// From opening the socket to `lobby_joined`, everyone arriving at once.
    pub enter: Latencies,
    /// From one more person's `lobby` to each of the N seeing it `online`.
    pub presence: Latencies,
    /// From `find_partner` to `matched`, everyone looking at once.
    pub matched: Latencies,
    /// Seconds from the first `find_partner` until everyone was matched.
    pub all_matched_after_s: Option<f64>,
    pub server_rss_idle_mib: Option<f64>,
    pub server_rss_online_mib: Option<f64>,
    pub server_rss_matched_mib: Option<f64>,
    pub server_cpu_seconds: Option<f64>,
}

async fn token(http: &reqwest::Client, base: &str, user: &str) -> Result<String> {
    let body: Value = crate::client::token_request(http, base)
        .json(&json!({"userId": user, "room": "lobby", "grants": {"lobby": true}}))
        .send()
        .await?
        .json()
        .await?;
    body["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no token: {body}"))
}

async fn open(base: &str, token: &str) -> Result<Ws> {
    let ws_base = base.replacen("http", "ws", 1);
    let (ws, _) = tokio_tungstenite::connect_async(format!("{ws_base}/ws/signal?token={token}"))
        .await
        .context("opening a signaling socket")?;
    Ok(ws)
}

/// Waits for a message of `kind`, failing on an `error`.
async fn until(ws: &mut Ws, kind: &str) -> Result<Value> {
    loop {
        let message = recv(ws).await?;
        if message["type"] == kind {
            return Ok(message);
        }
        if message["type"] == "error" {
            bail!("refused: {message}");
        }
    }
}

/// Where each online person reports.
#[derive(Clone)]
struct Watch {
    /// When the newcomer sent `lobby`.
    sent_at: Arc<Mutex<Option<Instant>>>,
    /// How long after that each person saw it `online`, in ms.
    seen: Arc<Mutex<Vec<f64>>>,
    /// Turns true when the run is over.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Someone online: enters (saying how long it took), then reads its socket as a browser does
/// until the run is over, noting when the newcomer came online.
async fn online_person(
    base: String,
    http: reqwest::Client,
    index: u32,
    entered: tokio::sync::mpsc::Sender<Result<f64>>,
    mut watch: Watch,
) {
    let enter = async {
        let token = token(&http, &base, &format!("online-{index}")).await?;
        let started = Instant::now();
        let mut ws = open(&base, &token).await?;
        let name = format!("Person {index}");
        ws.send(Message::Text(
            json!({"type": "lobby", "name": name}).to_string().into(),
        ))
        .await?;
        until(&mut ws, "lobby_joined").await?;
        Ok((started.elapsed().as_secs_f64() * 1000.0, ws))
    };
    let mut ws = match enter.await {
        Ok((ms, ws)) => {
            let _ = entered.send(Ok(ms)).await;
            ws
        }
        Err(err) => {
            let _ = entered.send(Err(err)).await;
            return;
        }
    };
    loop {
        tokio::select! {
            message = recv(&mut ws) => {
                let Ok(message) = message else { return };
                if message["type"] == "online" && message["name"] == "Newcomer" {
                    let at = watch.sent_at.lock().ok().and_then(|s| *s);
                    if let (Some(at), Ok(mut seen)) = (at, watch.seen.lock()) {
                        seen.push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
            _ = watch.stop.changed() => break,
        }
    }
    let _ = ws.close(None).await;
}

/// Runs the scenario against `base` with `people` people; `sample` reads the server's memory.
pub async fn matchmaking(
    base: &str,
    people: u32,
    sample: impl Fn() -> Option<f64>,
) -> Result<SocialReport> {
    let http = reqwest::Client::new();
    let mut report = SocialReport {
        people,
        server_rss_idle_mib: sample(),
        ..SocialReport::default()
    };

    // Everyone goes online at once.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let watch = Watch {
        sent_at: Arc::default(),
        seen: Arc::default(),
        stop,
    };
    let (entered_tx, mut entered_rx) = tokio::sync::mpsc::channel(people as usize);
    let mut tasks = Vec::new();
    for index in 0..people {
        tasks.push(tokio::spawn(online_person(
            base.to_owned(),
            http.clone(),
            index,
            entered_tx.clone(),
            watch.clone(),
        )));
    }
    drop(entered_tx);
    let (mut enter_ms, mut failed) = (Vec::new(), 0);
    // Each person reports once (and keeps its sender while it stays online).
    for _ in 0..people {
        let Some(result) = tokio::time::timeout(STEP_TIMEOUT, entered_rx.recv())
            .await
            .context("going online took too long")?
        else {
            break;
        };
        match result {
            Ok(ms) => enter_ms.push(ms),
            Err(err) => {
                failed += 1;
                eprintln!("a person could not go online: {err:#}");
            }
        }
    }
    report.enter = Latencies::of(enter_ms, failed);

    // Let the arrivals' own `online` messages drain, then one more arrives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.server_rss_online_mib = sample();
    let mut newcomer = open(base, &token(&http, base, "newcomer").await?).await?;
    if let Ok(mut at) = watch.sent_at.lock() {
        *at = Some(Instant::now());
    }
    newcomer
        .send(Message::Text(
            json!({"type": "lobby", "name": "Newcomer"})
                .to_string()
                .into(),
        ))
        .await?;
    until(&mut newcomer, "lobby_joined").await?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while watch.seen.lock().map(|s| s.len()).unwrap_or(0) < report.enter.done
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = watch.seen.lock().map(|s| s.clone()).unwrap_or_default();
    let missed = report.enter.done.saturating_sub(seen.len());
    report.presence = Latencies::of(seen, missed);

    // Then as many others look for a partner at once.
    let started = Instant::now();
    let mut finders = Vec::new();
    for index in 0..people {
        let (base, http) = (base.to_owned(), http.clone());
        finders.push(tokio::spawn(async move {
            let token = token(&http, &base, &format!("stranger-{index}")).await?;
            let mut ws = open(&base, &token).await?;
            let sent = Instant::now();
            ws.send(Message::Text(
                json!({"type": "find_partner", "name": format!("Stranger {index}")})
                    .to_string()
                    .into(),
            ))
            .await?;
            until(&mut ws, "matched").await?;
            anyhow::Ok((sent.elapsed().as_secs_f64() * 1000.0, ws))
        }));
    }
    let (mut match_ms, mut failed, mut matched) = (Vec::new(), 0, Vec::new());
    for finder in finders {
        match tokio::time::timeout(STEP_TIMEOUT, finder).await {
            Ok(Ok(Ok((ms, ws)))) => {
                match_ms.push(ms);
                matched.push(ws);
            }
            _ => failed += 1,
        }
    }
    if failed == 0 {
        report.all_matched_after_s = Some(started.elapsed().as_secs_f64());
    }
    report.matched = Latencies::of(match_ms, failed);
    report.server_rss_matched_mib = sample();
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    for mut ws in matched.into_iter().chain([newcomer]) {
        let _ = ws.close(None).await;
    }
    Ok(report)
}

/// A Markdown summary.
pub fn markdown(report: &SocialReport) -> String {
    let row = |what: &str, l: &Latencies| {
        let ms = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1} ms"));
        format!(
            "| {what} | {} / {} | {} / {} / {} |\n",
            l.done,
            l.failed,
            ms(l.p50_ms),
            ms(l.p99_ms),
            ms(l.max_ms)
        )
    };
    let mib = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.0} MiB"));
    let mut out = format!(
        "# Switchboard matchmaking\n\n{} people online at once, one more arriving, then {} others looking for a partner at once.\n\n| step | done / failed | p50 / p99 / max |\n|---|---|---|\n",
        report.people, report.people
    );
    out += &row("going online (socket to `lobby_joined`)", &report.enter);
    out += &row(
        "everyone sees one more come online (`lobby` to `online`)",
        &report.presence,
    );
    out += &row("matched (`find_partner` to `matched`)", &report.matched);
    out += &format!(
        "\nEveryone matched after {}. Server memory: {} idle, {} with everyone online, {} after the matches. Server CPU: {}.\n",
        report
            .all_matched_after_s
            .map_or("–".to_owned(), |s| format!("{s:.2} s")),
        mib(report.server_rss_idle_mib),
        mib(report.server_rss_online_mib),
        mib(report.server_rss_matched_mib),
        report
            .server_cpu_seconds
            .map_or("–".to_owned(), |s| format!("{s:.2} s")),
    );
    out
}

/// Writes `matchmaking.json` and `matchmaking.md` into `dir`.
pub fn write(report: &SocialReport, dir: &std::path::Path) -> Result<()> {
    std::fs::write(
        dir.join("matchmaking.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("matchmaking.md"), markdown(report))?;
    Ok(())
}
