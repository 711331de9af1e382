//! `walship-receiver`: command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use walship_receiver::{archive, certs, server, status, tls};

/// walship receiver: archives the WAL that walship senders stream from PostgreSQL primaries, and hands it to
/// recovery on the standby.
#[derive(Parser, Debug)]
#[command(name = "walship-receiver", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the receiver daemon: accept senders over TLS and append their WAL to the archive.
    Run(RunArgs),
    /// Write a CA, a server certificate and a client certificate for a quick start.
    Certs(CertsArgs),
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// Address to listen on for senders.
    #[arg(long, env = "WALSHIP_LISTEN", default_value = "0.0.0.0:7433")]
    listen: SocketAddr,
    /// Archive directory (created 0700 if missing). One receiver and one cluster per archive.
    #[arg(long, env = "WALSHIP_ARCHIVE")]
    archive: PathBuf,
    /// PEM certificate (chain) this receiver presents to senders.
    #[arg(long, env = "WALSHIP_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "WALSHIP_TLS_KEY")]
    tls_key: PathBuf,
    /// PEM CA certificate(s): senders must present a client certificate signed by one of them.
    #[arg(long, env = "WALSHIP_TLS_CLIENT_CA")]
    tls_client_ca: PathBuf,
    /// Close a session that sent nothing for this many seconds (senders send keepalives every 5 s).
    #[arg(long, env = "WALSHIP_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
}

#[derive(Parser, Debug)]
struct CertsArgs {
    /// Directory for ca.crt, server.crt, server.key, client.crt and client.key (created 0700; files 0600).
    #[arg(long, env = "WALSHIP_CERTS_OUT")]
    out: PathBuf,
    /// A DNS name or IP address senders use to reach the receiver (repeat for several).
    /// Default: localhost and 127.0.0.1.
    #[arg(
        long = "server-name",
        env = "WALSHIP_SERVER_NAMES",
        value_delimiter = ','
    )]
    server_names: Vec<String>,
    /// Common name of the client (sender) certificate.
    #[arg(long, env = "WALSHIP_CLIENT_NAME", default_value = "walship-sender")]
    client_name: String,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

async fn run(args: RunArgs) -> Result<()> {
    let shutdown = walship_receiver::shutdown_on_signals()?;
    let config = tls::server_config(&args.tls_cert, &args.tls_key, &args.tls_client_ca)?;
    let dir = args.archive.clone();
    let archive = tokio::task::spawn_blocking(move || archive::Archive::open(&dir)).await??;
    tracing::info!(archive = %args.archive.display(), resume = ?archive.resume_points(), "archive opened");
    let listener = server::bind(args.listen).await?;
    tracing::info!(
        "listening on {}",
        listener.local_addr().context("local address")?
    );
    let board = status::StatusBoard::default();
    let writer = tokio::spawn(board.clone().run_writer(
        args.archive.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    let opts = server::ServerOptions {
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        ..Default::default()
    };
    server::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(config),
        archive,
        opts,
        board,
        shutdown,
    )
    .await?;
    let _ = writer.await;
    tracing::info!("receiver stopped");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    walship_receiver::init_logging();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Runtime::new()
            .context("start runtime")
            .and_then(|rt| rt.block_on(run(args))),
        Command::Certs(args) => {
            let names = if args.server_names.is_empty() {
                vec!["localhost".to_string(), "127.0.0.1".to_string()]
            } else {
                args.server_names
            };
            certs::write_certificates(&args.out, &names, &args.client_name, args.force).map(|()| {
                println!(
                    "wrote {} to {}",
                    certs::FILES.join(", "),
                    args.out.display()
                );
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("walship-receiver: {e:#}");
            ExitCode::FAILURE
        }
    }
}
