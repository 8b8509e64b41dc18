//! The `switchboard` binary: configuration, logging, serving, graceful shutdown.

/// jemalloc rather than glibc's malloc: glibc keeps what a burst of connections freed in its
/// per-thread arenas, so the server's memory stayed at its peak after they closed; jemalloc
/// returns freed pages to the system within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use anyhow::Context;
use clap::Parser;
use signaling::auth::{Grants, TokenAuthority};
use signaling::config::{Cli, Command, Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli).context("configuration")?;
    if let Some(Command::Token {
        user,
        room,
        key,
        ttl_secs,
        no_publish,
        no_subscribe,
        room_admin,
        room_list,
        lobby,
    }) = &cli.command
    {
        return print_token(
            &config,
            user,
            room,
            key.as_deref(),
            *ttl_secs,
            Grants {
                publish: !*no_publish,
                subscribe: !*no_subscribe,
                room_admin: *room_admin,
                room_list: *room_list,
                lobby: *lobby,
            },
        );
    }
    let filter = EnvFilter::try_new(&config.log_level)
        .with_context(|| format!("log_level `{}`", config.log_level))?;
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match config.log_format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }
    // Every socket and media connection is a file descriptor; the usual soft limit of 1024
    // would turn joins away at a few hundred participants while the hard limit allows more.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open files"),
        Err(err) => tracing::warn!(%err, "cannot raise the open-file limit"),
    }
    let server = signaling::Server::start(config.clone())
        .await
        .with_context(|| format!("listening on {}", config.bind))?;
    tracing::info!(
        "switchboard listening on http://{} (media on {})",
        server.addr,
        server
            .state()
            .sfu
            .config()
            .media_ip
            .map_or_else(|| "every interface".to_owned(), |ip| ip.to_string())
    );
    // A node of a cluster drains on a signal (or when an admin asks) and exits once drained:
    // it first hands its rooms to the other nodes. A second signal, or the drain deadline,
    // stops it anyway.
    tokio::select! {
        result = wait_for_signal() => {
            result?;
            if server.drain().await {
                tokio::select! {
                    () = server.drained() => {}
                    result = wait_for_signal() => result?,
                }
            }
        }
        () = server.drained() => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await.context("shutdown")?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("SIGINT handler")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// `switchboard token`: a token signed with a configured API key, on stdout.
fn print_token(
    config: &Config,
    user: &str,
    room: &str,
    key: Option<&str>,
    ttl_secs: Option<u64>,
    grants: Grants,
) -> anyhow::Result<()> {
    if config.api_keys.is_empty() {
        anyhow::bail!(
            "no API keys configured: a token signed now would be valid nowhere (set api_keys in the configuration file or SWITCHBOARD_API_KEYS)"
        );
    }
    config.posture().context("configuration")?;
    let authority = TokenAuthority::new(&config.api_keys, config.token_ttl_secs);
    let key = match key {
        Some(key) => key.to_owned(),
        None => config.api_keys.keys().next().cloned().unwrap_or_default(),
    };
    let token = authority.mint_with(
        &key,
        user,
        room,
        grants,
        ttl_secs.unwrap_or(config.token_ttl_secs),
    )?;
    println!("{token}");
    Ok(())
}
