//! Server configuration: embedded defaults, then an optional TOML file, then `SWITCHBOARD_*`
//! environment variables, then command-line flags, each overriding the one before.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::protocol::IceServer;

/// Our crates at `info`; webrtc-rs only when something is wrong (at `info` it logs every state
/// change of every connection, and a harmless DTLS warning per connection). Its packet handlers
/// warn once per datagram they cannot use: junk sent at a media port would flood the log, so
/// they speak only at `error` (junk at the shared port is counted in `/metrics` instead).
pub const DEFAULT_LOG_LEVEL: &str = "info,rtc=warn,rtc::peer_connection::handler=error,rtc_ice=error,rtc_dtls=error,rtc_sctp=warn,webrtc=warn";

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything an operator can set. docs/operations.md lists each key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP and WebSocket listen address. Default `127.0.0.1:8080`.
    pub bind: SocketAddr,
    /// Local IP the media sockets bind to. Default: the IP of `bind` when it is a specific
    /// address, otherwise every interface.
    pub media_ip: Option<IpAddr>,
    /// Public IP announced in ICE instead of the local one (NAT 1:1). Default: none.
    pub public_ip: Option<String>,
    /// UDP port of the first media thread; thread `i` uses `udp_port + i`, and every
    /// connection shares its thread's port. 0 lets the system choose each. Default 0.
    pub udp_port: u16,
    /// Media threads, each with its own UDP port. 0: one per CPU. Default 0.
    pub media_threads: usize,
    /// ICE servers handed to clients. Default: none.
    pub ice_servers: Vec<IceServer>,
    /// TURN URLs handed to clients with short-lived credentials signed with `turn_secret`
    /// (`turn:host:3478?transport=udp`, `...?transport=tcp`, `turns:host:443?transport=tcp`).
    /// Default: none.
    pub turn_urls: Vec<String>,
    /// The secret shared with the TURN server (coturn's `static-auth-secret`). Default: none.
    pub turn_secret: Option<String>,
    /// How long a TURN credential stays valid, in seconds. Default 86,400.
    pub turn_ttl_secs: u64,
    /// Participants a room admits. Default 100.
    pub max_participants: usize,
    /// Highest video bitrate a publisher is asked to send, in bits per second. Default 2,500,000.
    pub max_video_bitrate: u64,
    /// Estimate each subscriber's downlink and fit what it receives to it. Costs about 1.4 µs of
    /// CPU per forwarded packet (docs/benchmarks.md). Default true.
    pub bandwidth_estimation: bool,
    /// Rooms of at most this many participants run as a peer-to-peer mesh; larger rooms use the
    /// SFU. 0 means always SFU. Default 3.
    pub mesh_max: usize,
    /// Seconds a room in SFU mode must stay at `mesh_max` or fewer before it returns to mesh.
    /// Default 10.
    pub mesh_hold_secs: u64,
    /// Seconds a signaling socket may stay open without joining a room; then it is closed
    /// (close code 1008). Default 10.
    pub join_timeout_secs: u64,
    /// Open HTTP connections and signaling sockets in all; more are closed at once. Held to
    /// half the open-file limit, so that media sockets always have room. Default 10,000.
    pub max_connections: usize,
    /// Open HTTP connections and signaling sockets from one address (one /64 for IPv6).
    /// Default 256.
    pub max_connections_per_address: usize,
    /// Seconds a client has to send a request's headers; then the connection is closed.
    /// Default 10.
    pub header_read_timeout_secs: u64,
    /// Signaling sockets one token may hold open at once. Default 4.
    pub max_sockets_per_token: usize,
    /// Joins per second from one address, after a burst of five seconds' worth. Default 10.
    pub max_joins_per_second_per_address: f64,
    /// Joins per second into one room, after a burst of five seconds' worth. Default 10.
    pub max_joins_per_second_per_room: f64,
    /// Rooms open at once; a join that would open another is refused (`server_full`).
    /// Default 1,000.
    pub max_rooms: usize,
    /// People online in the lobby at once; more are refused (`room_full`). Everyone online is
    /// told of each arrival and departure. Default 1,000.
    pub max_lobby_members: usize,
    /// Seconds a call rings before it ends unanswered (`timeout`). Default 30.
    pub call_timeout_secs: u64,
    /// People waiting for a partner at once; more are refused (`room_full`). Default 1,000.
    pub max_waiting: usize,
    /// Seconds someone waits for a partner before leaving the queue (`timeout`). Default 300.
    pub match_timeout_secs: u64,
    /// API keys, name to secret (at least 32 bytes). They sign tokens, and a caller presenting
    /// one (HTTP Basic) may mint tokens and administer rooms. Without any, the server runs in the
    /// development posture and binds loopback only. Default: none.
    pub api_keys: BTreeMap<String, String>,
    /// A bearer token that reads `/metrics` (an API key does too). Default: none.
    pub metrics_token: Option<String>,
    /// A second address serving only `/metrics`, without credentials (an internal network).
    /// Default: none.
    pub metrics_bind: Option<SocketAddr>,
    /// Origins whose pages may open signaling sockets (`https://app.example.com`; `*` for any).
    /// Empty: any origin in the development posture, the server's own origin otherwise.
    /// Default: empty.
    pub allowed_origins: Vec<String>,
    /// Token lifetime in seconds. Default 86,400.
    pub token_ttl_secs: u64,
    /// The Redis of a cluster (`redis://10.0.0.5:6379/0`). Unset: this node is alone and needs
    /// no Redis. Default: none.
    pub redis_url: Option<String>,
    /// This node's name in the cluster. Default: a random one at each start.
    pub node_id: Option<String>,
    /// The base URL clients reach this node at (`https://node-2.example.com`), sent to clients
    /// that must go there (`redirect`, `moved`). Needed with `redis_url`. Default: none.
    pub public_url: Option<String>,
    /// Participants this node holds before the cluster places no new room on it. Default 1000.
    pub max_node_participants: usize,
    /// Seconds a draining node waits for its participants to move before it exits anyway.
    /// Default 300.
    pub drain_timeout_secs: u64,
    /// `tracing` filter, e.g. `info` or `signaling=debug,sfu=debug`. Default
    /// [`DEFAULT_LOG_LEVEL`].
    pub log_level: String,
    /// `text` or `json`. Default `text`.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            media_ip: None,
            public_ip: None,
            udp_port: 0,
            media_threads: 0,
            ice_servers: Vec::new(),
            turn_urls: Vec::new(),
            turn_secret: None,
            turn_ttl_secs: 86_400,
            max_participants: 100,
            max_video_bitrate: 2_500_000,
            bandwidth_estimation: true,
            mesh_max: 3,
            mesh_hold_secs: 10,
            join_timeout_secs: 10,
            max_connections: 10_000,
            max_connections_per_address: 256,
            header_read_timeout_secs: 10,
            max_sockets_per_token: 4,
            max_joins_per_second_per_address: 10.0,
            max_joins_per_second_per_room: 10.0,
            max_rooms: 1000,
            max_lobby_members: 1000,
            call_timeout_secs: 30,
            max_waiting: 1000,
            match_timeout_secs: 300,
            api_keys: BTreeMap::new(),
            metrics_token: None,
            metrics_bind: None,
            allowed_origins: Vec::new(),
            token_ttl_secs: 86_400,
            redis_url: None,
            node_id: None,
            public_url: None,
            max_node_participants: 1000,
            drain_timeout_secs: 300,
            log_level: DEFAULT_LOG_LEVEL.into(),
            log_format: LogFormat::Text,
        }
    }
}

/// Command-line flags; each also reads its `SWITCHBOARD_*` variable through the config layers.
#[derive(Debug, Default, clap::Parser, Serialize)]
#[command(name = "switchboard", version, about = "Switchboard SFU media server")]
pub struct Cli {
    /// What to do instead of serving.
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, short, env = "SWITCHBOARD_CONFIG", global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HTTP and WebSocket listen address [default: 127.0.0.1:8080].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
    /// Local IP for media sockets.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_ip: Option<IpAddr>,
    /// Public IP announced in ICE (NAT 1:1).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// UDP port of the first media thread (thread i uses udp_port + i); 0 = chosen by the
    /// system [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_port: Option<u16>,
    /// Media threads, each with its own UDP port; 0 = one per CPU [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_threads: Option<usize>,
    /// A STUN or TURN URL handed to clients (repeatable; TURN credentials go in the TOML file).
    #[arg(long = "ice-server")]
    #[serde(skip)]
    pub ice_server_urls: Vec<String>,
    /// Participants a room admits [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_participants: Option<usize>,
    /// Highest video bitrate, bits per second [default: 2500000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_video_bitrate: Option<u64>,
    /// Estimate each subscriber's downlink and fit what it receives to it [default: true].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_estimation: Option<bool>,
    /// Largest room run as a peer-to-peer mesh; 0 means always SFU [default: 3].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_max: Option<usize>,
    /// Seconds at or under mesh-max before an SFU room returns to mesh [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_hold_secs: Option<u64>,
    /// Seconds a signaling socket may stay open without joining [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_timeout_secs: Option<u64>,
    /// Log filter [default: info, with webrtc-rs at warn].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// Commands besides serving.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Prints a token signed with one of the configured API keys, for scripts and tests.
    Token {
        /// The userId.
        #[arg(long)]
        user: String,
        /// The room.
        #[arg(long)]
        room: String,
        /// The API key that signs it [default: the first by name].
        #[arg(long)]
        key: Option<String>,
        /// Seconds it stays valid [default: token_ttl_secs].
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// Deny sending media (a viewer).
        #[arg(long)]
        no_publish: bool,
        /// Deny receiving the others' media.
        #[arg(long)]
        no_subscribe: bool,
        /// Grant administering the room.
        #[arg(long)]
        room_admin: bool,
        /// Grant listing every room.
        #[arg(long)]
        room_list: bool,
        /// Grant entering the lobby (being seen online, calling others).
        #[arg(long)]
        lobby: bool,
    },
}

/// How open the server is, decided by its bind address and API keys (docs/operations.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posture {
    /// No API keys, loopback only: anyone on this machine may mint tokens and read `/metrics`.
    Development,
    /// API keys configured: minting, room listing, administration and `/metrics` need
    /// credentials.
    Production,
}

/// Why a configuration cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum PostureError {
    #[error(
        "binding {0} (reachable from other machines) needs API keys: set api_keys (name = secret) in the configuration file or SWITCHBOARD_API_KEYS, or bind a loopback address for development"
    )]
    NoKeys(SocketAddr),
    #[error("API key {0:?} has a secret shorter than {min} bytes", min = crate::auth::MIN_SECRET_BYTES)]
    ShortSecret(String),
    #[error("turn_urls and turn_secret go together: set both, or neither")]
    TurnHalfConfigured,
    #[error(
        "a cluster (redis_url) needs api_keys, the same on every node: a token minted on one node is checked on another"
    )]
    ClusterWithoutKeys,
    #[error(
        "a cluster (redis_url) needs public_url, the http(s) base URL clients reach this node at"
    )]
    ClusterWithoutUrl,
}

impl Config {
    /// The posture this configuration runs in, or why it may not run at all.
    pub fn posture(&self) -> Result<Posture, PostureError> {
        if let Some((name, _)) = self
            .api_keys
            .iter()
            .find(|(_, secret)| secret.len() < crate::auth::MIN_SECRET_BYTES)
        {
            return Err(PostureError::ShortSecret(name.clone()));
        }
        if self.turn_urls.is_empty() != self.turn_secret.is_none() {
            return Err(PostureError::TurnHalfConfigured);
        }
        if self.redis_url.is_some() {
            if self.api_keys.is_empty() {
                return Err(PostureError::ClusterWithoutKeys);
            }
            if !self
                .public_url
                .as_deref()
                .is_some_and(|url| url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(PostureError::ClusterWithoutUrl);
            }
        }
        if !self.api_keys.is_empty() {
            return Ok(Posture::Production);
        }
        if !self.bind.ip().is_loopback() {
            return Err(PostureError::NoKeys(self.bind));
        }
        Ok(Posture::Development)
    }

    /// Layers defaults < TOML file < environment < flags.
    pub fn load(cli: &Cli) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &cli.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        let keys = Self::keys();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut config: Config = figment
            .merge(Env::prefixed("SWITCHBOARD_").only(&keys))
            .merge(Serialized::defaults(cli))
            .extract()
            .map_err(Box::new)?;
        if !cli.ice_server_urls.is_empty() {
            config.ice_servers.push(IceServer {
                urls: cli.ice_server_urls.clone(),
                username: None,
                credential: None,
            });
        }
        Ok(config)
    }

    /// Every configuration key. Only these are read from `SWITCHBOARD_*` variables, so that
    /// other tools' variables with the same prefix are not mistaken for settings.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The media-plane settings this configuration implies.
    pub fn sfu_config(&self) -> sfu::SfuConfig {
        let bind_ip = self.bind.ip();
        sfu::SfuConfig {
            media_ip: self
                .media_ip
                .or((!bind_ip.is_unspecified()).then_some(bind_ip)),
            public_ips: self.public_ip.iter().cloned().collect(),
            udp_port: self.udp_port,
            media_threads: match self.media_threads {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                threads => threads,
            },
            max_video_bitrate: self.max_video_bitrate,
            bandwidth_estimation: self.bandwidth_estimation,
            ..sfu::SfuConfig::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error by design.
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../switchboard.example.toml");
        let cli = Cli {
            config: Some(path.into()),
            ..Cli::default()
        };
        figment::Jail::expect_with(|_| {
            let loaded = Config::load(&cli).map_err(|e| e.to_string())?;
            assert_eq!(loaded, Config::default());
            Ok(())
        });
    }

    #[test]
    fn flags_beat_environment_beats_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "s.toml",
                "max_participants = 7\nlog_level = \"debug\"\nbind = \"127.0.0.1:9000\"\n",
            )?;
            jail.set_env("SWITCHBOARD_MAX_PARTICIPANTS", "8");
            jail.set_env("SWITCHBOARD_BIN", "/not/a/setting");
            let cli = Cli::parse_from([
                "switchboard",
                "--config",
                "s.toml",
                "--bind",
                "127.0.0.1:9001",
            ]);
            let config = Config::load(&cli).map_err(|e| e.to_string())?;
            assert_eq!(config.max_participants, 8, "env over file");
            assert_eq!(config.log_level, "debug", "file over defaults");
            assert_eq!(config.bind.port(), 9001, "flag over file");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "max_participant = 7\n")?;
            let cli = Cli::parse_from(["switchboard", "--config", "bad.toml"]);
            let err = Config::load(&cli).expect_err("typo must be refused");
            assert!(err.to_string().contains("max_participant"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn turn_urls_and_secret_come_from_the_environment_and_only_together() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "SWITCHBOARD_TURN_URLS",
                r#"["turn:127.0.0.1:3478?transport=udp"]"#,
            );
            let cli = Cli::parse_from(["switchboard"]);
            let config = Config::load(&cli).map_err(|e| e.to_string())?;
            assert_eq!(config.turn_urls, ["turn:127.0.0.1:3478?transport=udp"]);
            assert!(matches!(
                config.posture(),
                Err(PostureError::TurnHalfConfigured)
            ));
            jail.set_env("SWITCHBOARD_TURN_SECRET", "shared");
            let config = Config::load(&cli).map_err(|e| e.to_string())?;
            assert!(config.posture().is_ok());
            Ok(())
        });
    }
}
