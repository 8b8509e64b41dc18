//! Several nodes sharing one Redis: which nodes are alive and how loaded, and which node hosts
//! each room. docs/architecture.md ("The cluster") has the keys, their lifetimes and what
//! happens when a node or Redis fails.
//!
//! Without `redis_url` there is no cluster: every room is placed here, and nothing in this
//! module talks to anyone.
//!
//! A room lives on one node. The first `join` anywhere claims it, atomically, for the
//! least-loaded live node; a `join` reaching another node is answered with `redirect` to it.
//! Each node renews its claims and its own registration every [`HEARTBEAT`]; a node that stops
//! (crash, partition) is forgotten after [`NODE_TTL`], and its rooms are claimed afresh by the
//! next join, so clients reconnecting through any node are placed on a live one.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::lobby::Lobby;
use crate::matching::MatchQueue;
use crate::room::{Room, RoomRegistry};

/// How often a node renews its registration and its claims, and reads the others'.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a node's registration outlives its last heartbeat: after this, its rooms may be
/// placed elsewhere.
pub const NODE_TTL: Duration = Duration::from_secs(3);
/// How long a room's claim outlives its last renewal. A claim of a node that is gone counts for
/// nothing already (the claim script checks the node), so this only bounds claims made for a
/// node that never opened the room.
pub const CLAIM_TTL: Duration = Duration::from_secs(10);
/// A Redis command slower than this counts as a failure: a join waits for at most this.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How long an admin request forwarded to another node may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Marks a request forwarded by a node, so that it is never forwarded again.
pub const FORWARDED_HEADER: &str = "x-switchboard-forwarded";
/// Every key starts with this.
const PREFIX: &str = "switchboard:";

/// `KEYS[1]` the room's claim, `KEYS[2]` the placement set. `ARGV[1]` the claim's lifetime in ms,
/// `ARGV[2]` the prefix of node keys, `ARGV[3]` a node never to place on (a draining one) or "".
/// Returns `{node, url}` of the room's node: its live owner, or else the least-loaded live node
/// (which now owns it, one participant heavier); nil when no node can take it.
const CLAIM_SCRIPT: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[3] then
  local info = redis.call('GET', ARGV[2] .. owner)
  if info then return {owner, cjson.decode(info).url} end
end
for _, node in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if node ~= ARGV[3] then
    local info = redis.call('GET', ARGV[2] .. node)
    if info then
      redis.call('SET', KEYS[1], node, 'PX', ARGV[1])
      redis.call('ZINCRBY', KEYS[2], 1, node)
      return {node, cjson.decode(info).url}
    end
    redis.call('ZREM', KEYS[2], node)
  end
end
return false
";

/// `KEYS` the claims of the rooms this node hosts. `ARGV[1]` this node, `ARGV[2]` the lifetime
/// in ms, `ARGV[3]` the prefix of node keys. Renews this node's claims and takes back the ones
/// Redis lost (a restart); returns `{index, url}` pairs (1-based) of rooms another live node
/// owns now.
const RENEW_SCRIPT: &str = r"
local lost = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    local info = owner and redis.call('GET', ARGV[3] .. owner)
    if info then
      table.insert(lost, i)
      table.insert(lost, cjson.decode(info).url)
    else
      redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    end
  end
end
return lost
";

/// `KEYS` claims of rooms that closed here; `ARGV[1]` this node. Deletes the ones still ours.
const RELEASE_SCRIPT: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
";

/// `KEYS[1]` a room's claim, `ARGV[1]` the prefix of node keys: `{node, url}` of its live
/// owner, or nil.
const OWNER_SCRIPT: &str = r"
local owner = redis.call('GET', KEYS[1])
if not owner then return false end
local info = redis.call('GET', ARGV[1] .. owner)
if not info then return false end
return {owner, cjson.decode(info).url}
";

/// A node as the others see it (`switchboard:node:{id}`, JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// `node_id`.
    pub id: String,
    /// `public_url`.
    pub url: String,
    /// Participants in its rooms.
    pub participants: usize,
    /// Rooms it hosts.
    pub rooms: usize,
    /// Cores' worth of CPU the process used over the last heartbeat (1.0 = one core busy).
    pub cpu: f64,
    /// Forwarded packets admitted and not yet written by its media engines.
    pub backlog: u64,
    /// Leaving: takes no new rooms, moves its participants away.
    pub draining: bool,
    /// At `max_node_participants` or `max_rooms`: takes no new rooms.
    pub full: bool,
}

/// Where a `join` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// This node hosts the room (or will, with this join).
    Here,
    /// Another node does: the client is redirected to `url`.
    Elsewhere {
        /// That node's `node_id`.
        node: String,
        /// Its `public_url`.
        url: String,
    },
}

/// Why a room cannot be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Redis does not answer.
    #[error(
        "this node cannot reach the cluster's store (Redis), so it cannot open a room it does not host: try again shortly"
    )]
    Unavailable,
    /// Every node is full or draining.
    #[error("every node of the cluster is full or draining: no node can take a new room")]
    NoNode,
}

/// What the cluster did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Redis commands and scripts sent.
    pub commands: AtomicU64,
    /// Of them, failed or timed out.
    pub errors: AtomicU64,
    /// Joins answered with `redirect`.
    pub redirects: AtomicU64,
    /// Participants told `moved` (drain, or a room lost to another node).
    pub moved: AtomicU64,
    /// Joins refused because no node could take the room or Redis did not answer.
    pub refused: AtomicU64,
}

/// This node's membership of a cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: String,
    /// This node's rooms.
    rooms: Arc<RoomRegistry>,
    /// This node's lobby and waiting queue: in a cluster, one node hosts each.
    lobby: Arc<Lobby>,
    matching: Arc<MatchQueue>,
    /// This node's media plane, for its load.
    sfu: sfu::Sfu,
    /// `max_node_participants` and `max_rooms`: past either, the node is full.
    max_participants: usize,
    max_rooms: usize,
    drain_timeout: Duration,
    public_url: String,
    client: redis::Client,
    /// The connection, once made; `None` until Redis first answers.
    connection: Mutex<Option<ConnectionManager>>,
    /// Whether the last command reached Redis.
    reachable: AtomicBool,
    /// When draining began.
    draining: Mutex<Option<Instant>>,
    /// Claims (keys) renewed at the last heartbeat: the ones not held since are released.
    held: Mutex<HashSet<String>>,
    /// The cluster as the last heartbeat read it.
    nodes: Mutex<Vec<NodeInfo>>,
    counters: ClusterCounters,
    claim: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    owner: redis::Script,
    /// Forwards admin requests to the node that hosts the room.
    http: reqwest::Client,
}

fn node_key(id: &str) -> String {
    format!("{PREFIX}node:{id}")
}

fn rooms_key(id: &str) -> String {
    format!("{PREFIX}node:{id}:rooms")
}

fn drain_key(id: &str) -> String {
    format!("{PREFIX}node:{id}:drain")
}

/// What besides rooms lives on one node of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// Who is online, and their calls (docs/protocol.md, section 12).
    Lobby,
    /// The waiting queue of strangers (section 13).
    Queue,
}

impl Service {
    fn key(self) -> &'static str {
        match self {
            Service::Lobby => "switchboard:service:lobby",
            Service::Queue => "switchboard:service:queue",
        }
    }
}

fn room_key(room: &str) -> String {
    format!("{PREFIX}room:{}", room.to_lowercase())
}

const NODES_KEY: &str = "switchboard:nodes";
const PLACEMENT_KEY: &str = "switchboard:placement";
const NODE_PREFIX: &str = "switchboard:node:";

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Cluster {
    /// The cluster `config` names, or `None` for a node alone.
    pub fn from_config(
        config: &Config,
        rooms: Arc<RoomRegistry>,
        lobby: Arc<Lobby>,
        matching: Arc<MatchQueue>,
        sfu: sfu::Sfu,
    ) -> Result<Option<Self>, redis::RedisError> {
        let Some(url) = &config.redis_url else {
            return Ok(None);
        };
        let client = redis::Client::open(url.as_str())?;
        let node_id = config.node_id.clone().unwrap_or_else(|| {
            let random: u32 = rand::random();
            format!("node-{random:08x}")
        });
        Ok(Some(Self {
            inner: Arc::new(Inner {
                node_id,
                rooms,
                lobby,
                matching,
                sfu,
                max_participants: config.max_node_participants,
                max_rooms: config.max_rooms,
                drain_timeout: Duration::from_secs(config.drain_timeout_secs),
                public_url: config
                    .public_url
                    .clone()
                    .unwrap_or_default()
                    .trim_end_matches('/')
                    .to_owned(),
                client,
                connection: Mutex::new(None),
                reachable: AtomicBool::new(false),
                draining: Mutex::new(None),
                held: Mutex::default(),
                nodes: Mutex::default(),
                counters: ClusterCounters::default(),
                claim: redis::Script::new(CLAIM_SCRIPT),
                renew: redis::Script::new(RENEW_SCRIPT),
                release: redis::Script::new(RELEASE_SCRIPT),
                owner: redis::Script::new(OWNER_SCRIPT),
                http: reqwest::Client::builder()
                    .timeout(FORWARD_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|err| {
                        redis::RedisError::from((
                            redis::ErrorKind::ClientError,
                            "HTTP client",
                            err.to_string(),
                        ))
                    })?,
            }),
        }))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Whether Redis answered the last command.
    pub fn reachable(&self) -> bool {
        self.inner.reachable.load(Ordering::Relaxed)
    }

    /// Whether this node is draining.
    pub fn draining(&self) -> bool {
        lock(&self.inner.draining).is_some()
    }

    /// The counters, for `/metrics`.
    pub fn counters(&self) -> &ClusterCounters {
        &self.inner.counters
    }

    /// Every live node as the last heartbeat saw it, this one included.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        lock(&self.inner.nodes).clone()
    }

    fn connection(&self) -> Option<ConnectionManager> {
        lock(&self.inner.connection).clone()
    }

    /// Runs one Redis request with the timeout, counting it and noting whether Redis answered.
    async fn run<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let counters = &self.inner.counters;
        counters.commands.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(REDIS_TIMEOUT, request).await {
            Ok(Ok(value)) => {
                self.set_reachable(true, None);
                Some(value)
            }
            Ok(Err(err)) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                self.set_reachable(false, Some(&err.to_string()));
                None
            }
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                self.set_reachable(false, Some("no answer in time"));
                None
            }
        }
    }

    /// Logs changes only: a Redis that stays down is one line, not one per heartbeat.
    fn set_reachable(&self, reachable: bool, why: Option<&str>) {
        let before = self.inner.reachable.swap(reachable, Ordering::Relaxed);
        if before && !reachable {
            tracing::warn!(
                why = why.unwrap_or(""),
                "Redis unreachable: serving the rooms here, refusing rooms hosted elsewhere or new"
            );
        } else if !before && reachable {
            tracing::info!(node = %self.inner.node_id, "Redis reachable: in the cluster");
        }
    }

    /// Where a `join` of `room` goes. `open_here` says whether the room is open on this node:
    /// then it stays here, without asking Redis (the heartbeat finds out if another node took
    /// it meanwhile). Otherwise one script claims it: for its live owner, or else for the
    /// least-loaded node.
    pub async fn place(&self, room: &str, open_here: bool) -> Result<Placement, PlacementError> {
        self.place_key(room_key(room), open_here).await
    }

    /// Where the lobby or the waiting queue is (`lobby`, `find_partner`): as for a room, with
    /// `open_here` when someone is in it on this node.
    pub async fn place_service(
        &self,
        service: Service,
        open_here: bool,
    ) -> Result<Placement, PlacementError> {
        self.place_key(service.key().to_owned(), open_here).await
    }

    async fn place_key(&self, key: String, open_here: bool) -> Result<Placement, PlacementError> {
        let draining = self.draining();
        if open_here && !draining {
            return Ok(Placement::Here);
        }
        let placed = self.claim(key, draining).await;
        let counters = &self.inner.counters;
        match placed {
            Ok(Some((node, _))) if node == self.inner.node_id => Ok(Placement::Here),
            Ok(Some((node, url))) => {
                counters.redirects.fetch_add(1, Ordering::Relaxed);
                Ok(Placement::Elsewhere { node, url })
            }
            Ok(None) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                Err(PlacementError::NoNode)
            }
            Err(err) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    /// Claims the room or service at `key` (or finds its live owner); never for this node when
    /// `away` is set.
    async fn claim(
        &self,
        key: String,
        away: bool,
    ) -> Result<Option<(String, String)>, PlacementError> {
        let Some(mut connection) = self.connection() else {
            return Err(PlacementError::Unavailable);
        };
        let excluded = if away {
            self.inner.node_id.as_str()
        } else {
            ""
        };
        let mut invocation = self.inner.claim.prepare_invoke();
        invocation
            .key(key)
            .key(PLACEMENT_KEY)
            .arg(CLAIM_TTL.as_millis() as u64)
            .arg(NODE_PREFIX)
            .arg(excluded);
        self.run(invocation.invoke_async::<Option<(String, String)>>(&mut connection))
            .await
            .ok_or(PlacementError::Unavailable)
    }

    /// The node that hosts `room`, if a live one does (another node than this one, or this one).
    pub async fn owner(&self, room: &str) -> Result<Option<(String, String)>, PlacementError> {
        let Some(mut connection) = self.connection() else {
            return Err(PlacementError::Unavailable);
        };
        let mut invocation = self.inner.owner.prepare_invoke();
        invocation.key(room_key(room)).arg(NODE_PREFIX);
        self.run(invocation.invoke_async::<Option<(String, String)>>(&mut connection))
            .await
            .ok_or(PlacementError::Unavailable)
    }

    /// Sends an admin request on to the node at `url` (same method, path, credentials and
    /// body) and returns its answer.
    pub async fn forward(
        &self,
        url: &str,
        method: axum::http::Method,
        path: &str,
        headers: &axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> Result<(u16, Option<String>, axum::body::Bytes), reqwest::Error> {
        let mut request = self
            .inner
            .http
            .request(method, format!("{url}{path}"))
            .header(FORWARDED_HEADER, self.inner.node_id.as_str())
            .body(body);
        for name in [
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ] {
            if let Some(value) = headers.get(&name) {
                request = request.header(name, value);
            }
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((status, content_type, response.bytes().await?))
    }

    /// The rooms of the other live nodes as their last heartbeat wrote them, each with `node`.
    pub async fn remote_rooms(&self) -> Result<Vec<serde_json::Value>, PlacementError> {
        let Some(mut connection) = self.connection() else {
            return Err(PlacementError::Unavailable);
        };
        let others: Vec<String> = self
            .nodes()
            .into_iter()
            .map(|node| node.id)
            .filter(|id| *id != self.inner.node_id)
            .collect();
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = others.iter().map(|id| rooms_key(id)).collect();
        let values = self
            .run(
                redis::cmd("MGET")
                    .arg(&keys)
                    .query_async::<Vec<Option<String>>>(&mut connection),
            )
            .await
            .ok_or(PlacementError::Unavailable)?;
        let mut rooms = Vec::new();
        for (id, value) in others.iter().zip(values) {
            let Some(list) =
                value.and_then(|json| serde_json::from_str::<Vec<serde_json::Value>>(&json).ok())
            else {
                continue;
            };
            for mut room in list {
                if let Some(fields) = room.as_object_mut() {
                    fields.insert("node".into(), id.clone().into());
                }
                rooms.push(room);
            }
        }
        Ok(rooms)
    }

    /// Asks node `id` to drain, through Redis: it starts at its next heartbeat. False when no
    /// such node is alive.
    pub async fn request_drain(&self, id: &str) -> Result<bool, PlacementError> {
        let Some(mut connection) = self.connection() else {
            return Err(PlacementError::Unavailable);
        };
        let alive: Option<bool> = self
            .run(
                redis::cmd("EXISTS")
                    .arg(node_key(id))
                    .query_async(&mut connection),
            )
            .await;
        if !alive.ok_or(PlacementError::Unavailable)? {
            return Ok(false);
        }
        let _: () = self
            .run(
                redis::cmd("SET")
                    .arg(drain_key(id))
                    .arg(1)
                    .arg("PX")
                    .arg(NODE_TTL.as_millis() as u64 * 10)
                    .query_async(&mut connection),
            )
            .await
            .ok_or(PlacementError::Unavailable)?;
        Ok(true)
    }

    /// Starts draining: no room is placed here any more, and every participant is told to move
    /// to the node each room is placed on instead. Ends in [`run`] when the rooms are empty or
    /// at `drain_timeout_secs`.
    pub async fn drain(&self) {
        {
            let mut draining = lock(&self.inner.draining);
            if draining.is_some() {
                return;
            }
            *draining = Some(Instant::now());
        }
        tracing::info!(node = %self.inner.node_id, "draining: moving every room to other nodes");
        if let Some(mut connection) = self.connection() {
            let _: Option<()> = self
                .run(
                    redis::cmd("ZREM")
                        .arg(PLACEMENT_KEY)
                        .arg(&self.inner.node_id)
                        .query_async(&mut connection),
                )
                .await;
        }
        self.move_rooms().await;
    }

    /// Tells everyone in `room` to rejoin at `url`, counting them.
    fn move_room(&self, room: &str, url: &str) {
        let told = self.inner.rooms.move_room(room, url);
        self.inner
            .counters
            .moved
            .fetch_add(told as u64, Ordering::Relaxed);
    }

    /// Tells the participants of each room here where it is placed now (draining).
    async fn move_rooms(&self) {
        for room in self.inner.rooms.rooms() {
            if room.member_count() == 0 {
                continue;
            }
            match self.claim(room_key(room.name()), true).await {
                Ok(Some((_, url))) => self.move_room(room.name(), &url),
                Ok(None) => tracing::debug!(room = room.name(), "no other node takes the room"),
                Err(_) => return,
            }
        }
    }

    /// One heartbeat: register this node with its load, renew (or release) its claims, read
    /// the other nodes.
    async fn heartbeat(&self, cpu: &mut CpuClock) {
        let Some(mut connection) = self.connect().await else {
            return;
        };
        let rooms = self.inner.rooms.rooms();
        let participants: usize = rooms.iter().map(|room| room.member_count()).sum();
        let draining = self.draining();
        let full =
            participants >= self.inner.max_participants || rooms.len() >= self.inner.max_rooms;
        let me = NodeInfo {
            id: self.inner.node_id.clone(),
            url: self.inner.public_url.clone(),
            participants,
            rooms: rooms.len(),
            cpu: cpu.cores_used(),
            backlog: self
                .inner
                .sfu
                .engine_stats()
                .map_or(0, |stats| stats.backlog.load(Ordering::Relaxed)),
            draining,
            full,
        };
        let snapshots: Vec<_> = rooms.iter().map(|room| room.snapshot()).collect();
        let ttl = NODE_TTL.as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(node_key(&me.id))
            .arg(serde_json::to_string(&me).unwrap_or_default())
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("SET")
            .arg(rooms_key(&me.id))
            .arg(serde_json::to_string(&snapshots).unwrap_or_default())
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("SADD")
            .arg(NODES_KEY)
            .arg(&me.id)
            .ignore();
        if draining || full {
            pipe.cmd("ZREM").arg(PLACEMENT_KEY).arg(&me.id).ignore();
        } else {
            // The load placement goes by: participants now (claims since add one each).
            pipe.cmd("ZADD")
                .arg(PLACEMENT_KEY)
                .arg(participants)
                .arg(&me.id)
                .ignore();
        }
        pipe.cmd("SMEMBERS").arg(NODES_KEY);
        pipe.cmd("GETDEL").arg(drain_key(&me.id));
        let Some((members, drain_asked)) = self
            .run(pipe.query_async::<(Vec<String>, Option<String>)>(&mut connection))
            .await
        else {
            return;
        };
        self.read_nodes(&mut connection, members).await;
        if drain_asked.is_some() && !draining {
            self.drain().await;
            return;
        }
        if draining {
            self.move_rooms().await;
        } else {
            self.renew(&mut connection, &rooms).await;
        }
    }

    /// Reads every registered node; forgets the ones whose registration expired.
    async fn read_nodes(&self, connection: &mut ConnectionManager, members: Vec<String>) {
        if members.is_empty() {
            return;
        }
        let keys: Vec<String> = members.iter().map(|id| node_key(id)).collect();
        let Some(values) = self
            .run(
                redis::cmd("MGET")
                    .arg(&keys)
                    .query_async::<Vec<Option<String>>>(connection),
            )
            .await
        else {
            return;
        };
        let mut nodes = Vec::new();
        let mut gone = Vec::new();
        for (id, value) in members.into_iter().zip(values) {
            match value.and_then(|json| serde_json::from_str::<NodeInfo>(&json).ok()) {
                Some(node) => nodes.push(node),
                None => gone.push(id),
            }
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        *lock(&self.inner.nodes) = nodes;
        if !gone.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("SREM").arg(NODES_KEY).arg(&gone).ignore();
            pipe.cmd("ZREM").arg(PLACEMENT_KEY).arg(&gone).ignore();
            let _: Option<()> = self.run(pipe.query_async(connection)).await;
        }
    }

    /// Renews the claims of the rooms (and the lobby or queue) here, releases the ones closed
    /// since the last heartbeat, and moves the participants of rooms another node owns now.
    async fn renew(&self, connection: &mut ConnectionManager, rooms: &[Arc<Room>]) {
        // Each claim held now, with the room it is for (none for a service).
        let mut claims: Vec<(String, Option<&Arc<Room>>)> = rooms
            .iter()
            .map(|room| (room_key(room.name()), Some(room)))
            .collect();
        if !self.inner.lobby.is_empty() {
            claims.push((Service::Lobby.key().to_owned(), None));
        }
        if !self.inner.matching.is_empty() {
            claims.push((Service::Queue.key().to_owned(), None));
        }
        let keys: HashSet<String> = claims.iter().map(|(key, _)| key.clone()).collect();
        let closed: Vec<String> = lock(&self.inner.held).difference(&keys).cloned().collect();
        if !closed.is_empty() {
            let mut invocation = self.inner.release.prepare_invoke();
            for key in &closed {
                invocation.key(key);
            }
            invocation.arg(&self.inner.node_id);
            let _: Option<i64> = self.run(invocation.invoke_async(connection)).await;
        }
        if !claims.is_empty() {
            let mut invocation = self.inner.renew.prepare_invoke();
            for (key, _) in &claims {
                invocation.key(key);
            }
            invocation
                .arg(&self.inner.node_id)
                .arg(CLAIM_TTL.as_millis() as u64)
                .arg(NODE_PREFIX);
            let Some(lost) = self
                .run(invocation.invoke_async::<Vec<redis::Value>>(connection))
                .await
            else {
                return;
            };
            for pair in lost.chunks(2) {
                let [index, url] = pair else { continue };
                let (Ok(index), Ok(url)) = (
                    redis::from_redis_value::<usize>(index),
                    redis::from_redis_value::<String>(url),
                ) else {
                    continue;
                };
                match index.checked_sub(1).and_then(|i| claims.get(i)) {
                    Some((_, Some(room))) => {
                        tracing::warn!(room = room.name(), %url, "another node owns this room now: moving its participants there");
                        self.move_room(room.name(), &url);
                    }
                    // Two lobbies (or queues) until this one empties: people here reconnect
                    // to the other when they next come back.
                    Some((key, None)) => {
                        tracing::warn!(%key, %url, "another node hosts this service now")
                    }
                    None => {}
                }
            }
        }
        *lock(&self.inner.held) = keys;
    }

    /// The connection, made now if there is none yet.
    async fn connect(&self) -> Option<ConnectionManager> {
        if let Some(connection) = self.connection() {
            return Some(connection);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1);
        let made = self
            .run(ConnectionManager::new_with_config(
                self.inner.client.clone(),
                config,
            ))
            .await?;
        *lock(&self.inner.connection) = Some(made.clone());
        Some(made)
    }

    /// Leaves the cluster at shutdown: the registration and claims go at once, not at expiry.
    async fn deregister(&self) {
        let Some(mut connection) = self.connection() else {
            return;
        };
        let id = &self.inner.node_id;
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(node_key(id))
            .arg(rooms_key(id))
            .ignore();
        pipe.cmd("SREM").arg(NODES_KEY).arg(id).ignore();
        pipe.cmd("ZREM").arg(PLACEMENT_KEY).arg(id).ignore();
        let _: Option<()> = self.run(pipe.query_async(&mut connection)).await;
        let mut invocation = self.inner.release.prepare_invoke();
        let mut keys: HashSet<String> = lock(&self.inner.held).clone();
        keys.extend(self.inner.rooms.rooms().iter().map(|r| room_key(r.name())));
        keys.extend([
            Service::Lobby.key().to_owned(),
            Service::Queue.key().to_owned(),
        ]);
        for key in &keys {
            invocation.key(key);
        }
        invocation.arg(id);
        let _: Option<i64> = self.run(invocation.invoke_async(&mut connection)).await;
    }
}

/// The process's CPU time between two heartbeats, from `/proc/self/stat` (Linux; 0 elsewhere).
#[derive(Default)]
struct CpuClock {
    last: Option<(Instant, f64)>,
}

impl CpuClock {
    fn cores_used(&mut self) -> f64 {
        let Some(busy) = process_cpu_seconds() else {
            return 0.0;
        };
        let now = Instant::now();
        let used = match self.last {
            Some((then, before)) => {
                let wall = now.duration_since(then).as_secs_f64();
                if wall > 0.0 {
                    ((busy - before) / wall).max(0.0)
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, busy));
        (used * 100.0).round() / 100.0
    }
}

/// User plus system CPU seconds of this process.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may hold spaces) start past its closing parenthesis;
    // utime and stime are the 14th and 15th fields of the line.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    // Clock ticks: 100 per second on every Linux this runs on (USER_HZ).
    Some((user + system) / 100.0)
}

/// The node's life in the cluster: a heartbeat every [`HEARTBEAT`] until shutdown, the end of
/// a drain (rooms empty, or the deadline) signalled on `drained`, and deregistration at the end.
pub async fn run(
    cluster: Cluster,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    drained: tokio::sync::watch::Sender<bool>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cpu = CpuClock::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                cluster.heartbeat(&mut cpu).await;
                let began = *lock(&cluster.inner.draining);
                if let Some(began) = began {
                    let empty = cluster.inner.rooms.participant_count() == 0;
                    if empty || began.elapsed() >= cluster.inner.drain_timeout {
                        tracing::info!(empty, "drained");
                        drained.send_replace(true);
                    }
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    cluster.deregister().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_cpu_time_is_read() {
        let first = process_cpu_seconds().expect("/proc/self/stat");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let second = process_cpu_seconds().expect("/proc/self/stat");
        assert!(second >= first, "{first} then {second}");
    }

    #[test]
    fn room_claims_ignore_case() {
        assert_eq!(room_key("Standup"), room_key("standup"));
        assert_eq!(room_key("Standup"), "switchboard:room:standup");
    }
}
