//! The `switchboard` binary: configuration, logging, serving, graceful shutdown.

use anyhow::Context;
use clap::Parser;
use signaling::config::{Cli, Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli).context("configuration")?;
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
    wait_for_signal().await?;
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
