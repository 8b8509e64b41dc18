//! The results of a run: JSON for tools, Markdown for people, SVG charts for both.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

/// What was run.
#[derive(Debug, Serialize)]
pub struct Config {
    pub url: String,
    pub spawned: bool,
    pub publishers: u16,
    /// Receivers of each publisher.
    pub subscribers: u32,
    /// Every participant publishes and receives all the others.
    pub large_room: bool,
    pub duration_s: u64,
    pub bitrate: u64,
    pub fps: u32,
    pub cores: usize,
    /// Publishers send three simulcast layers.
    pub simulcast: bool,
    /// The size subscribers show every video at (`view`), if they say.
    pub tile: Option<(u32, u32)>,
    /// The size of the one video shown on a stage, if any.
    pub stage: Option<(u32, u32)>,
    /// Subscribers let the kernel coalesce received datagrams (no browser does).
    pub gro: bool,
    /// The SRTP protection profile subscribers offered.
    pub srtp: crate::client::Srtp,
    /// When publishers sent keyframes.
    pub publisher_keyframes: crate::client::Keyframes,
}

/// One second of the run.
#[derive(Debug, Serialize)]
pub struct Second {
    pub second: u64,
    pub received_pps: f64,
    pub forwarded_pps: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_mib: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Totals {
    pub sent_packets: u64,
    pub expected_packets: u64,
    /// Distinct probes of the window received (per subscriber and stream).
    pub received_packets: u64,
    /// Expected less received, not clamped.
    pub lost_packets: i64,
    pub loss_percent: f64,
    /// Probes missing between those received in each stream (sequence gaps), the measure
    /// where a subscriber receives only some of what is sent (simulcast).
    pub gap_lost_packets: u64,
    /// Copies of probes received more than once (resends whose original came, duplicates).
    pub duplicate_packets: u64,
    pub forwarded_pps: Option<f64>,
    pub received_mbps: f64,
    /// Payload received per receiving participant (its downlink).
    pub received_kbps_per_receiver: f64,
    /// Payload sent per publisher, every layer (its uplink).
    pub sent_kbps_per_publisher: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub join_p50_ms: Option<f64>,
    pub join_p99_ms: Option<f64>,
    pub time_to_media_s: f64,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_mib: Option<f64>,
    pub server_cpu_us_per_forwarded_packet: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
    pub generator_cpu_us_per_received_packet: Option<f64>,
    /// The generator used over 80 % of a core: the server may not be what limited the run.
    pub generator_saturated: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub config: Config,
    pub totals: Totals,
    pub seconds: Vec<Second>,
    /// One row per subscriber, when some were shaped (`--subscriber-rate`).
    pub subscribers: Vec<SubscriberRow>,
}

/// What one subscriber got over the measured window.
#[derive(Debug, Serialize)]
pub struct SubscriberRow {
    pub index: u32,
    /// Its link, bits per second; `None` when unshaped.
    pub link_bps: Option<u64>,
    /// The server's last estimate for it, bits per second (0: none sent).
    pub estimate_bps: u64,
    /// RTP payload delivered, bits per second.
    pub delivered_bps: u64,
    /// Probes missing in the streams it received.
    pub loss_percent: f64,
    /// Datagrams its link dropped (its queue was full).
    pub link_drops: u64,
    /// Times a stream's picture waited for a keyframe (a loss no resend repaired in 300 ms),
    /// and for how long in all.
    pub keyframe_waits: u64,
    pub frozen_s: f64,
    /// Videos the server pauses and lowers for its link at the end.
    pub paused: u64,
    pub lowered: u64,
}

fn opt(value: Option<f64>, unit: &str) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.1}{unit}"))
}

/// A Markdown summary.
pub fn markdown(report: &Report) -> String {
    let c = &report.config;
    let t = &report.totals;
    let mut out = String::new();
    let who = if c.large_room {
        format!(
            "a room of {} participants, each publishing and receiving the {} others",
            c.publishers, c.subscribers
        )
    } else {
        format!(
            "{} publisher(s), {} subscriber(s)",
            c.publishers, c.subscribers
        )
    };
    let size = |s: Option<(u32, u32)>| s.map_or("-".to_owned(), |(w, h)| format!("{w}x{h}"));
    let layers = if c.simulcast {
        format!(
            " in three simulcast layers, shown in tiles of {} with a stage of {}",
            size(c.tile),
            size(c.stage)
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "# Switchboard forwarding benchmark\n\n{who}; video of {} kbit/s at {} fps{layers}, {} s, {} cores, server {}.\n",
        c.bitrate / 1000,
        c.fps,
        c.duration_s,
        c.cores,
        if c.spawned {
            "spawned (pinned to core 0 when taskset exists)"
        } else {
            c.url.as_str()
        },
    );
    let _ = writeln!(out, "| measure | value |\n|---|---|");
    let rows = [
        (
            "forwarded packets/s (server counter)",
            opt(t.forwarded_pps, ""),
        ),
        (
            "received Mbit/s (all subscribers)",
            format!("{:.1}", t.received_mbps),
        ),
        (
            "downlink per receiver / uplink per publisher",
            format!(
                "{:.0} / {:.0} kbit/s",
                t.received_kbps_per_receiver, t.sent_kbps_per_publisher
            ),
        ),
        (
            "loss",
            format!(
                "{:.3} % ({} of {} packets; {} in sequence gaps, {} duplicates)",
                t.loss_percent,
                t.lost_packets,
                t.expected_packets,
                t.gap_lost_packets,
                t.duplicate_packets
            ),
        ),
        (
            "latency p50 / p95 / p99",
            format!(
                "{} / {} / {}",
                opt(t.latency_p50_ms, " ms"),
                opt(t.latency_p95_ms, " ms"),
                opt(t.latency_p99_ms, " ms")
            ),
        ),
        (
            "join time p50 / p99",
            format!(
                "{} / {}",
                opt(t.join_p50_ms, " ms"),
                opt(t.join_p99_ms, " ms")
            ),
        ),
        (
            "all subscriptions receiving after",
            format!("{:.2} s", t.time_to_media_s),
        ),
        (
            "server CPU (one core = 100 %)",
            opt(t.server_cpu_percent, " %"),
        ),
        ("server RSS", opt(t.server_rss_mib, " MiB")),
        (
            "server CPU per forwarded packet",
            opt(t.server_cpu_us_per_forwarded_packet, " µs"),
        ),
        ("generator CPU", opt(t.generator_cpu_percent, " %")),
        (
            "generator CPU per received packet",
            opt(t.generator_cpu_us_per_received_packet, " µs"),
        ),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    if t.generator_saturated {
        let _ = writeln!(
            out,
            "\n**The load generator used more than 80 % of a core: it, not the server, may have limited this run.**"
        );
    }
    if !report.subscribers.is_empty() {
        let _ = writeln!(
            out,
            "\n## Per subscriber\n\n| subscriber | link | estimate | delivered | loss | link drops | keyframe waits | videos paused / lowered |\n|---|---|---|---|---|---|---|---|"
        );
        let kbps = |bps: u64| format!("{} kbit/s", bps / 1000);
        for row in &report.subscribers {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.2} % | {} | {} ({:.1} s) | {} / {} |",
                row.index,
                row.link_bps.map_or("unshaped".into(), kbps),
                if row.estimate_bps > 0 {
                    kbps(row.estimate_bps)
                } else {
                    "none sent".into()
                },
                kbps(row.delivered_bps),
                row.loss_percent,
                row.link_drops,
                row.keyframe_waits,
                row.frozen_s,
                row.paused,
                row.lowered,
            );
        }
    }
    out
}

/// One line of a chart: its name, its colour, and its (second, value) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart of per-second series, as a standalone SVG.
fn chart(title: &str, unit: &str, x_label: &str, series: &[Series<'_>]) -> String {
    let (width, height, left, bottom, top, right) = (640.0, 320.0, 56.0, 36.0, 32.0, 16.0);
    let points = series.iter().flat_map(|(_, _, p)| p.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    let x = |v: f64| left + v / x_max * (width - left - right);
    let y = |v: f64| height - bottom - v / y_max * (height - bottom - top);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="14">{title}</text>
<line x1="{left}" y1="{y0}" x2="{xr}" y2="{y0}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{y0}" stroke="black"/>
<text x="{xr}" y="{xl}" text-anchor="end">{x_label}</text>
<text x="4" y="{top}">{ymax:.1} {unit}</text>
<text x="4" y="{y0}">0</text>
"#,
        y0 = height - bottom,
        xr = width - right,
        xl = height - 8.0,
        ymax = y_max,
    );
    for (i, (name, color, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>
<text x="{}" y="{}" fill="{color}">{name}</text>"#,
            path.join(" "),
            width - right - 150.0,
            top + 16.0 * (i as f64 + 1.0),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn series(report: &Report, pick: impl Fn(&Second) -> Option<f64>) -> Vec<(f64, f64)> {
    report
        .seconds
        .iter()
        .filter_map(|s| pick(s).map(|v| (s.second as f64, v)))
        .collect()
}

/// One step of a ramp.
#[derive(Debug, Serialize)]
pub struct Step {
    pub subscribers: u32,
    pub live_subscriptions: u64,
    pub forwarded_pps: Option<f64>,
    pub loss_percent: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
}

/// A ramp: subscribers added until loss or latency passed their limits.
#[derive(Debug, Serialize)]
pub struct RampReport {
    pub publishers: u16,
    pub bitrate: u64,
    pub fps: u32,
    pub step_seconds: u64,
    pub max_loss_percent: f64,
    pub max_p99_ms: f64,
    /// The most subscribers held within both limits.
    pub largest_held: Option<u32>,
    pub ended_because: String,
    pub steps: Vec<Step>,
}

/// A Markdown summary of a ramp.
pub fn ramp_markdown(report: &RampReport) -> String {
    let mut out = format!(
        "# Switchboard ramp\n\n{} publisher(s) of {} kbit/s at {} fps; subscribers added until loss > {} % or p99 > {} ms ({} s per step).\n\n**Largest load held: {}** (ended {}).\n\n| subscribers | forwarded packets/s | loss | p50 / p99 | server CPU | generator CPU |\n|---|---|---|---|---|---|\n",
        report.publishers,
        report.bitrate / 1000,
        report.fps,
        report.max_loss_percent,
        report.max_p99_ms,
        report.step_seconds,
        report
            .largest_held
            .map_or("none".into(), |n| format!("{n} subscribers")),
        report.ended_because,
    );
    for s in &report.steps {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} % | {} / {} | {} | {} |",
            s.subscribers,
            opt(s.forwarded_pps, ""),
            s.loss_percent,
            opt(s.latency_p50_ms, " ms"),
            opt(s.latency_p99_ms, " ms"),
            opt(s.server_cpu_percent, " %"),
            opt(s.generator_cpu_percent, " %"),
        );
    }
    out
}

/// Writes ramp.json, ramp.md and ramp-latency.svg, ramp-loss.svg and ramp-cpu.svg (each
/// against the number of subscribers).
pub fn write_ramp(report: &RampReport, dir: &Path) -> Result<()> {
    std::fs::write(dir.join("ramp.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(dir.join("ramp.md"), ramp_markdown(report))?;
    let by = |pick: &dyn Fn(&Step) -> Option<f64>| -> Vec<(f64, f64)> {
        report
            .steps
            .iter()
            .filter_map(|s| pick(s).map(|v| (f64::from(s.subscribers), v)))
            .collect()
    };
    let files: [(&str, &str, &str, Vec<Series<'_>>); 3] = [
        (
            "ramp-latency.svg",
            "One-way latency against subscribers",
            "ms",
            vec![
                ("p50", "#1f77b4", by(&|s| s.latency_p50_ms)),
                ("p99", "#d62728", by(&|s| s.latency_p99_ms)),
            ],
        ),
        (
            "ramp-loss.svg",
            "Loss against subscribers",
            "%",
            vec![("loss", "#9467bd", by(&|s| Some(s.loss_percent)))],
        ),
        (
            "ramp-cpu.svg",
            "CPU against subscribers (100 % = one core)",
            "%",
            vec![
                ("server", "#2ca02c", by(&|s| s.server_cpu_percent)),
                ("generator", "#ff7f0e", by(&|s| s.generator_cpu_percent)),
            ],
        ),
    ];
    for (name, title, unit, series) in files {
        std::fs::write(dir.join(name), chart(title, unit, "subscribers", &series))?;
    }
    Ok(())
}

/// Reads back what [`write_all`] wrote: the JSON must parse to a report with totals, the
/// Markdown must hold the table, and each SVG must be well-formed XML.
pub fn verify_files(dir: &Path) -> Result<()> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?;
    anyhow::ensure!(
        json["totals"]["received_packets"].as_u64().is_some() && json["seconds"].is_array(),
        "report.json lacks totals or seconds"
    );
    let md = std::fs::read_to_string(dir.join("report.md"))?;
    anyhow::ensure!(md.contains("| loss |"), "report.md lacks the results table");
    for name in ["latency.svg", "cpu.svg"] {
        let text = std::fs::read_to_string(dir.join(name))?;
        let mut reader = quick_xml::Reader::from_str(&text);
        let mut polylines = 0;
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(quick_xml::events::Event::Empty(e) | quick_xml::events::Event::Start(e))
                    if e.name().as_ref() == b"polyline" =>
                {
                    polylines += 1;
                }
                Ok(_) => {}
                Err(err) => anyhow::bail!("{name} is not well-formed XML: {err}"),
            }
        }
        anyhow::ensure!(polylines > 0, "{name} draws no series");
    }
    Ok(())
}

/// Writes report.json, report.md, latency.svg and cpu.svg into `dir`.
pub fn write_all(report: &Report, dir: &Path) -> Result<()> {
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("report.md"), markdown(report))?;
    std::fs::write(
        dir.join("latency.svg"),
        chart(
            "One-way latency per second",
            "ms",
            "seconds",
            &[
                ("p50", "#1f77b4", series(report, |s| s.latency_p50_ms)),
                ("p99", "#d62728", series(report, |s| s.latency_p99_ms)),
            ],
        ),
    )?;
    std::fs::write(
        dir.join("cpu.svg"),
        chart(
            "CPU per second (100 % = one core)",
            "%",
            "seconds",
            &[
                (
                    "server",
                    "#2ca02c",
                    series(report, |s| s.server_cpu_percent),
                ),
                (
                    "generator",
                    "#ff7f0e",
                    series(report, |s| s.generator_cpu_percent),
                ),
            ],
        ),
    )?;
    Ok(())
}

/// Incumbents' media over one window of a join storm.
#[derive(Debug, Serialize)]
pub struct StormWindow {
    pub seconds: f64,
    pub loss_percent: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
}

/// A join storm: many participants join a room at once while others receive media in it.
#[derive(Debug, Serialize)]
pub struct StormReport {
    pub publishers: u16,
    pub incumbents: u32,
    pub storm: u32,
    pub joined: usize,
    pub failed: usize,
    pub join_p50_ms: Option<f64>,
    pub join_p99_ms: Option<f64>,
    pub join_max_ms: Option<f64>,
    /// From the storm's start until every newcomer received every publisher.
    pub all_receiving_after_s: Option<f64>,
    pub before: StormWindow,
    pub during: StormWindow,
}

/// A Markdown summary of a join storm.
pub fn storm_markdown(report: &StormReport) -> String {
    let mut out = format!(
        "# Switchboard join storm\n\n{} publisher(s), {} subscribers already receiving, then {} joining at once.\n\n| measure | value |\n|---|---|\n",
        report.publishers, report.incumbents, report.storm
    );
    let _ = writeln!(
        out,
        "| joined / failed | {} / {} |",
        report.joined, report.failed
    );
    let _ = writeln!(
        out,
        "| join time p50 / p99 / max | {} / {} / {} |",
        opt(report.join_p50_ms, " ms"),
        opt(report.join_p99_ms, " ms"),
        opt(report.join_max_ms, " ms")
    );
    let _ = writeln!(
        out,
        "| every newcomer receiving after | {} |",
        opt(report.all_receiving_after_s, " s")
    );
    for (name, w) in [("before", &report.before), ("during", &report.during)] {
        let _ = writeln!(
            out,
            "| incumbents {name} the storm ({:.1} s): loss, p50 / p99; server CPU, generator CPU | {:.3} %, {} / {}; {}, {} |",
            w.seconds,
            w.loss_percent,
            opt(w.latency_p50_ms, " ms"),
            opt(w.latency_p99_ms, " ms"),
            opt(w.server_cpu_percent, " %"),
            opt(w.generator_cpu_percent, " %"),
        );
    }
    out
}

/// Writes storm.json and storm.md.
pub fn write_storm(report: &StormReport, dir: &Path) -> Result<()> {
    std::fs::write(
        dir.join("storm.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("storm.md"), storm_markdown(report))?;
    Ok(())
}
