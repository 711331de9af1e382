//! walship receiver: accepts walship senders over mutually authenticated TLS and keeps their WAL in an archive
//! directory, durably, one `.partial` per segment being received.
//!
//! | module    | what it owns |
//! |-----------|--------------|
//! | [`archive`] | every archive file: identity, lock, partial/complete segments, history files, fsync order |
//! | [`server`]  | the TLS listener and the sessions (network task → bounded channel → disk writer task) |
//! | [`tls`]     | rustls configuration (TLS 1.3, client certificates required) |
//! | [`certs`]   | `certs`: a CA and certificates for a quick start |
//! | [`status`]  | what the receiver is doing, for `status` |
//! | [`restore`] | `restore_command`: complete segments, history files, the zero-padded last partial at failover |
//! | [`promote`] | failover: trigger, wait for the handover, `pg_ctl promote` |
//! | [`cleanup`] | `archive_cleanup_command` |
#![forbid(unsafe_code)]

pub mod archive;
pub mod certs;
pub mod cleanup;
pub mod promote;
pub mod restore;
pub mod server;
pub mod status;
pub mod tls;

/// Sets up `tracing` logs on stderr; `WALSHIP_LOG` (or `RUST_LOG`) filters them, `info` by default.
pub fn init_logging() {
    let filter = std::env::var("WALSHIP_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A token cancelled by the first SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> anyhow::Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = tokio_util::sync::CancellationToken::new();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        t.cancel();
    });
    Ok(token)
}
