//! `/metrics`: every figure as a row of a table (kind, name, help, value), read from the rooms,
//! the signaling tasks and the media plane at scrape time, and encoded with prometheus-client.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::protocol::ErrorCode;
use crate::room::RoomSnapshot;
use crate::state::AppState;

/// Refusals by error code: every `error` a signaling socket sends, and every HTTP error reply.
/// Nothing is logged per refusal at the default level; these say how many there were.
#[derive(Debug, Default)]
pub struct ErrorCounts {
    counts: [std::sync::atomic::AtomicU64; ErrorCode::ALL.len()],
}

impl ErrorCounts {
    /// Counts one refusal with `code`.
    pub fn add(&self, code: ErrorCode) {
        self.counts[code as usize].fetch_add(1, Relaxed);
    }

    /// How many refusals had `code`.
    pub fn get(&self, code: ErrorCode) -> u64 {
        self.counts[code as usize].load(Relaxed)
    }
}

/// The refusals the server has sent, by where they went.
#[derive(Debug, Default)]
pub struct Refusals {
    /// `error` messages on signaling sockets.
    pub signaling: ErrorCounts,
    /// HTTP error replies (`{"error": {...}}`).
    pub http: ErrorCounts,
}

/// Whether a figure can go down (a gauge) or only up (a counter).
#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// One unlabelled figure.
type Row = (Kind, &'static str, &'static str, u64);

/// The text exposition of every figure, prefixed `switchboard_`.
pub fn render(state: &AppState) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("switchboard");
    let rooms: Vec<RoomSnapshot> = state.rooms.rooms().iter().map(|r| r.snapshot()).collect();
    register_rows(&mut registry, &signaling_rows(state, &rooms));
    register_rows(&mut registry, &media_rows(state));
    register_mode_families(&mut registry, state, &rooms);
    register_error_families(&mut registry, &state.refusals);
    let mut body = String::new();
    encode(&mut body, &registry)?;
    Ok(body)
}

fn register_rows(registry: &mut Registry, rows: &[Row]) {
    for &(kind, name, help, value) in rows {
        match kind {
            Kind::Gauge => {
                let metric: Gauge = Gauge::default();
                metric.set(i64::try_from(value).unwrap_or(i64::MAX));
                registry.register(name, help, metric);
            }
            Kind::Counter => {
                let metric: Counter = Counter::default();
                metric.inc_by(value);
                registry.register(name, help, metric);
            }
        }
    }
}

fn signaling_rows(state: &AppState, rooms: &[RoomSnapshot]) -> Vec<Row> {
    let participants = rooms.iter().map(|r| r.participants.len() as u64).sum();
    vec![
        (Kind::Gauge, "rooms", "Rooms open now", rooms.len() as u64),
        (
            Kind::Gauge,
            "participants",
            "Participants in all rooms now",
            participants,
        ),
        (
            Kind::Gauge,
            "sessions",
            "Signaling sockets served now",
            state.tasks.sessions.load(Relaxed),
        ),
        (
            Kind::Gauge,
            "negotiators",
            "Subscribe negotiator tasks alive",
            state.tasks.negotiators.load(Relaxed),
        ),
        (
            Kind::Gauge,
            "http_connections",
            "HTTP connections and signaling sockets open now",
            state.connections.open() as u64,
        ),
        (
            Kind::Counter,
            "http_connections_refused_at_limit",
            "Connections closed at once: max_connections were open",
            state.connections.refused_total.load(Relaxed),
        ),
        (
            Kind::Counter,
            "http_connections_refused_per_address",
            "Connections closed at once: their address had max_connections_per_address open",
            state.connections.refused_per_address.load(Relaxed),
        ),
        (
            Kind::Counter,
            "signaling_sockets_refused_per_token",
            "Signaling sockets refused: their token had max_sockets_per_token open",
            state.limits.refused_sockets.load(Relaxed),
        ),
        (
            Kind::Counter,
            "joins_rate_limited",
            "Joins refused for coming too fast from one address or into one room",
            state.limits.refused_joins.load(Relaxed),
        ),
        (
            Kind::Counter,
            "http_accept_errors",
            "Failed accepts (most often: no file descriptor left)",
            state.connections.accept_errors.load(Relaxed),
        ),
    ]
}

fn media_rows(state: &AppState) -> Vec<Row> {
    let (fanouts, media_connections) = state.sfu.live_tasks();
    let stats = state.sfu.stats();
    let mut rows = vec![
        (
            Kind::Gauge,
            "fanout_tasks",
            "Fanout tasks alive (one per publication)",
            fanouts,
        ),
        (
            Kind::Gauge,
            "media_connections",
            "Peer connections (publish and subscribe) open in the media engines",
            media_connections,
        ),
        (
            Kind::Gauge,
            "publications",
            "Publications live now",
            stats.publications,
        ),
        (
            Kind::Counter,
            "received_packets",
            "RTP packets received from publishers",
            stats.received_packets,
        ),
        (
            Kind::Counter,
            "forwarded_packets",
            "RTP packets forwarded to subscribers",
            stats.forwarded_packets,
        ),
        (
            Kind::Counter,
            "forwarded_bytes",
            "Bytes forwarded to subscribers",
            stats.forwarded_bytes,
        ),
        (
            Kind::Counter,
            "dropped_packets",
            "Packets dropped for slow subscribers",
            stats.dropped_packets,
        ),
        (
            Kind::Counter,
            "keyframe_requests",
            "Keyframe requests (PLI) sent to publishers",
            stats.keyframe_requests,
        ),
        (
            Kind::Counter,
            "nacks",
            "NACK packets received from subscribers",
            stats.nacks,
        ),
        (
            Kind::Counter,
            "retransmitted_packets",
            "Packets sent again from a publication's cache in answer to NACKs",
            stats.retransmitted_packets,
        ),
        (
            Kind::Counter,
            "nack_misses",
            "NACKed packets no longer in the cache (a keyframe is asked for instead)",
            stats.nack_misses,
        ),
        (
            Kind::Counter,
            "nack_too_old",
            "NACKed packets first sent over a second before or resent twice already (a keyframe is asked for instead)",
            stats.nack_too_old,
        ),
        (
            Kind::Counter,
            "layer_switches",
            "Times a subscription moved to another simulcast layer",
            stats.layer_switches,
        ),
    ];
    if let Some(cluster) = &state.cluster {
        let counters = cluster.counters();
        rows.extend([
            (
                Kind::Gauge,
                "cluster_redis_reachable",
                "1 when the cluster's Redis answered the last command",
                u64::from(cluster.reachable()),
            ),
            (
                Kind::Gauge,
                "cluster_nodes",
                "Live nodes in the cluster, this one included, as of the last heartbeat",
                cluster.nodes().len() as u64,
            ),
            (
                Kind::Gauge,
                "cluster_draining",
                "1 while this node drains",
                u64::from(cluster.draining()),
            ),
            (
                Kind::Counter,
                "cluster_redis_commands",
                "Redis commands, pipelines and scripts sent",
                counters.commands.load(Relaxed),
            ),
            (
                Kind::Counter,
                "cluster_redis_errors",
                "Of them, failed or unanswered within 500 ms",
                counters.errors.load(Relaxed),
            ),
            (
                Kind::Counter,
                "cluster_redirects",
                "Joins answered with `redirect` to the node hosting the room",
                counters.redirects.load(Relaxed),
            ),
            (
                Kind::Counter,
                "cluster_moved",
                "Participants told `moved` (drain, or a room another node took)",
                counters.moved.load(Relaxed),
            ),
            (
                Kind::Counter,
                "cluster_refused_joins",
                "Joins refused: Redis unreachable, or every node full or draining",
                counters.refused.load(Relaxed),
            ),
        ]);
    }
    if let Some(egress) = state.sfu.engine_stats() {
        rows.extend([
            (
                Kind::Counter,
                "egress_datagrams",
                "Datagrams sent on the shared media socket",
                egress.datagrams_sent.load(Relaxed),
            ),
            (
                Kind::Counter,
                "egress_send_calls",
                "sendmsg calls that sent them (fewer where UDP GSO batches)",
                egress.send_calls.load(Relaxed),
            ),
            (
                Kind::Counter,
                "egress_send_errors",
                "Datagrams the kernel refused on the shared media socket",
                egress.send_errors.load(Relaxed),
            ),
            (
                Kind::Counter,
                "egress_write_errors",
                "Forwarded packets a subscribe connection refused (not connected yet, or closed)",
                egress.write_errors.load(Relaxed),
            ),
            (
                Kind::Counter,
                "egress_unrouted_datagrams",
                "Inbound datagrams from an address no connection knows",
                egress.unrouted_datagrams.load(Relaxed),
            ),
            (
                Kind::Counter,
                "egress_unverified_stun",
                "STUN requests from a new address that named a connection but failed its MESSAGE-INTEGRITY",
                egress.unverified_stun.load(Relaxed),
            ),
            (
                Kind::Gauge,
                "egress_routed_addresses",
                "Remote addresses routed to a connection now (at most 8 per connection)",
                egress.routed_addresses.load(Relaxed),
            ),
            (
                Kind::Gauge,
                "egress_backlog",
                "Forwarded copies waiting in the egress engine after its last round",
                egress.backlog.load(Relaxed),
            ),
            (
                Kind::Gauge,
                "egress_backlog_limit",
                "Forwarded copies the egress engine admits at most (40 ms at its recent pace)",
                egress.backlog_limit.load(Relaxed),
            ),
            (
                Kind::Counter,
                "egress_paced_drops",
                "Video packets a subscriber's pacer dropped: held 500 ms, or a NACK resend finding it that full",
                egress.paced_drops.load(Relaxed),
            ),
            (
                Kind::Counter,
                "egress_probes",
                "Probe clusters sent to learn whether a subscriber's link carries more",
                egress.probes_sent.load(Relaxed),
            ),
            (
                Kind::Counter,
                "relay_messages",
                "Messages relayed between participants' relay data channels (files in SFU rooms)",
                egress.relay_messages.load(Relaxed),
            ),
            (
                Kind::Counter,
                "relay_bytes",
                "Bytes of those messages",
                egress.relay_bytes.load(Relaxed),
            ),
            (
                Kind::Counter,
                "relay_drops",
                "Relay messages dropped: malformed, past the sender's in-flight budget or the recipient's buffer",
                egress.relay_drops.load(Relaxed),
            ),
            (
                Kind::Counter,
                "refused_data_channels",
                "Data channels clients opened that the server does not serve, closed",
                egress.refused_channels.load(Relaxed),
            ),
            (
                Kind::Counter,
                "ingress_drops",
                "Publishers' packets dropped because their publication's fanout had not taken the ones before",
                egress.ingress_drops.load(Relaxed),
            ),
        ]);
    }
    rows
}

type Labels = Vec<(String, String)>;

fn register_error_families(registry: &mut Registry, refusals: &Refusals) {
    for (name, help, counts) in [
        (
            "signaling_errors",
            "`error` messages sent on signaling sockets, by code",
            &refusals.signaling,
        ),
        ("http_errors", "HTTP error replies, by code", &refusals.http),
    ] {
        let family: Family<Labels, Counter> = Family::default();
        for code in ErrorCode::ALL {
            family
                .get_or_create(&vec![("code".into(), code.as_str().into())])
                .inc_by(counts.get(code));
        }
        registry.register(name, help, family);
    }
}

/// Figures labelled by mode. No figure is labelled by room: a room's name is its participants'
/// business, and whoever may read `/metrics` need not be allowed to list rooms (`/api/rooms`
/// has them, per room, for an admin).
fn register_mode_families(registry: &mut Registry, state: &AppState, rooms: &[RoomSnapshot]) {
    let by_mode: Family<Labels, Gauge> = Family::default();
    let participants_by_mode: Family<Labels, Gauge> = Family::default();
    for mode in ["mesh", "sfu"] {
        let labels = vec![("mode".into(), mode.into())];
        by_mode.get_or_create(&labels).set(0);
        participants_by_mode.get_or_create(&labels).set(0);
    }
    for room in rooms {
        let labels = vec![("mode".into(), room.mode.into())];
        by_mode.get_or_create(&labels).inc();
        let count = i64::try_from(room.participants.len()).unwrap_or(i64::MAX);
        participants_by_mode.get_or_create(&labels).inc_by(count);
    }
    let switches: Family<Labels, Counter> = Family::default();
    let (to_sfu, to_mesh) = state.rooms.switch_totals();
    for (to, value) in [("sfu", to_sfu), ("mesh", to_mesh)] {
        switches
            .get_or_create(&vec![("to".into(), to.into())])
            .inc_by(value);
    }
    registry.register("rooms_by_mode", "Rooms open now, by mode", by_mode);
    registry.register(
        "participants_by_mode",
        "Participants now, by their room's mode",
        participants_by_mode,
    );
    registry.register(
        "mode_switches",
        "Mode switches of every room since the server started, by the mode switched to",
        switches,
    );
}
