//! `walship-sender`: command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use walship_protocol::Lsn;
use walship_sender::{link, SenderConfig};

/// jemalloc keeps freed pages for reuse; with glibc's malloc, the ~1 MiB message buffers of a catch-up went
/// back to the kernel and were faulted in (and zeroed) again for every message (see the receiver's main).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// walship sender: streams every flushed WAL byte of a PostgreSQL primary to a walship receiver over
/// mutually authenticated TLS. Run it on the primary's host, as the database's OS user (it reads pg_wal).
#[derive(Parser, Debug)]
#[command(name = "walship-sender", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sender daemon.
    Run(RunArgs),
    /// Verify everything `run` needs, one line per check (ok, or FAIL with the fix), then a round trip: a
    /// WAL switch on the primary, shipped until the receiver holds the switched segment complete. Takes
    /// run's flags (and --config file). Exit 0 only when every check passed. A sender already running
    /// reconnects once (the receiver hands the archive to the newest session).
    Check(RunArgs),
}

/// `--compression`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Compression {
    /// zstd for WAL messages of 32 kB and more (a catch-up, a bulk load), the live stream's small messages plain
    Auto,
    /// zstd for every WAL message (a slow or metered link: every byte counts)
    Zstd,
    /// never
    None,
}

#[derive(Parser, Debug, Clone)]
struct RunArgs {
    /// TOML file of defaults for these flags: keys are the long flag names (tls-ca = "/etc/walship/ca.crt").
    /// Flags and WALSHIP_* variables win over it. See contrib/ for a commented example.
    #[arg(long, env = "WALSHIP_CONFIG", value_name = "FILE")]
    #[allow(dead_code)] // read before clap, by walship_daemon::config
    config: Option<PathBuf>,
    /// Connection to the primary, as libpq takes it: keywords ("host=db1 user=walship sslmode=verify-full")
    /// or a postgresql:// URI, with service (pg_service.conf), passfile and sslrootcert/sslcert/sslkey.
    /// What it leaves open comes from PGSERVICE, PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD,
    /// PGPASSFILE, PGSSLMODE, PGSSLROOTCERT (and the other PG* variables), then libpq's defaults (the
    /// Unix socket in /var/run/postgresql, port 5432, the OS user, sslmode=prefer) and dbname=postgres; a
    /// password from ~/.pgpass when none is given. The role needs superuser, or pg_monitor plus
    /// pg_read_all_settings (or pass --wal-dir). Its session shows as application_name "walship-sender".
    #[arg(
        long,
        env = "WALSHIP_PGCONN",
        hide_env_values = true,
        default_value = ""
    )]
    pgconn: String,
    /// The receiver, HOST:PORT.
    #[arg(long, env = "WALSHIP_RECEIVER")]
    receiver: String,
    /// PEM CA certificate that signed the receiver's certificate.
    #[arg(long, env = "WALSHIP_TLS_CA")]
    tls_ca: PathBuf,
    /// PEM client certificate this sender presents.
    #[arg(long, env = "WALSHIP_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "WALSHIP_TLS_KEY")]
    tls_key: PathBuf,
    /// Name the receiver's certificate must carry. Default: the host part of --receiver.
    #[arg(long, env = "WALSHIP_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// WAL directory. Default: data_directory/pg_wal (pg_xlog on 9.6), asked from the server.
    #[arg(long, env = "WALSHIP_WAL_DIR")]
    wal_dir: Option<PathBuf>,
    /// With an empty archive, start at the segment holding this LSN (X/X) instead of the current flush
    /// position. Use the start LSN of the standby's base backup so the archive has everything it needs.
    #[arg(long, env = "WALSHIP_START_LSN")]
    start_lsn: Option<Lsn>,
    /// Keep WAL on the primary with this physical replication slot (created if missing, PostgreSQL 11+),
    /// advanced to what the receiver has made durable: the primary never removes WAL walship still needs.
    /// Monitor it: a slot whose sender is gone keeps WAL forever (max_slot_wal_keep_size bounds it).
    #[arg(long, env = "WALSHIP_SLOT")]
    slot: Option<String>,
    /// Name this sender gives the receiver (logs, status; default: the host name) and the primary: its
    /// replication connection's application_name (default: walship), the name to put in
    /// synchronous_standby_names.
    #[arg(long, env = "WALSHIP_NAME")]
    name: Option<String>,
    /// How the sender learns that the primary flushed WAL it shipped: "replication" streams from the
    /// walsender (pushed the moment PostgreSQL flushed it; the streamed bytes are compared with the shipped
    /// ones; needs a role with REPLICATION and a "replication" line in pg_hba.conf, and takes one of
    /// max_wal_senders); "query" polls pg_current_wal_flush_lsn() (at most every 5 ms while something is
    /// unconfirmed); "auto" uses replication where the primary allows it, else the query.
    #[arg(long, env = "WALSHIP_CONFIRM_BY", value_enum, default_value_t = walship_sender::replication::ConfirmBy::Auto)]
    confirm_by: walship_sender::replication::ConfirmBy,
    /// Be a synchronous standby: report to the primary as flushed exactly what the receiver holds durably,
    /// at once. With this sender's name in the primary's synchronous_standby_names, a commit returns only
    /// once walship's archive holds it (zero loss), and commits WAIT while the receiver is away, as with any
    /// synchronous standby: keep a quorum (ANY 1 (walship, replica1)) or remove walship from the setting to
    /// keep the primary writable. Implies --confirm-by replication.
    #[arg(long, env = "WALSHIP_SYNCHRONOUS")]
    synchronous: bool,
    /// Most WAL bytes in flight without the receiver's acknowledgement, in MiB.
    #[arg(long, env = "WALSHIP_WINDOW_MB", default_value_t = 64)]
    window_mb: u64,
    /// Fallback poll of the flush position, in milliseconds (file-system events wake the sender first).
    #[arg(long, env = "WALSHIP_POLL_MS", default_value_t = 200)]
    poll_ms: u64,
    /// Seconds a send to the receiver may take, and the receiver may stay silent (it acknowledges at least
    /// every second), before the connection counts as stalled and is made anew.
    #[arg(long, env = "WALSHIP_RECEIVER_TIMEOUT", default_value_t = 30)]
    receiver_timeout: u64,
    /// Compress WAL on the wire (zstd, when the receiver allows it; each message on its own). auto spares
    /// the primary's CPU where compression gains least: the live stream's small messages (one or a few
    /// commits) go plain, catch-ups and bulk loads compressed.
    #[arg(long, env = "WALSHIP_COMPRESSION", value_enum, default_value_t = Compression::Auto)]
    compression: Compression,
    /// zstd level of --compression auto|zstd (1 is fast, ~3× on pgbench WAL; higher squeezes more for more CPU).
    #[arg(long, env = "WALSHIP_COMPRESSION_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    compression_level: i32,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9188): positions, lag, sessions,
    /// reconnections, errors, bytes sent. Off by default.
    #[arg(long, env = "WALSHIP_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// At SIGTERM/SIGINT, seconds to wait for the receiver to acknowledge every byte already sent.
    #[arg(long, env = "WALSHIP_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace: u64,
}

async fn run(args: RunArgs) -> Result<()> {
    // a connection string that cannot work is a configuration error: stop now, not retry forever
    // (again at SIGHUP: a new password file, service or PostgreSQL certificate is taken at the next connection)
    let conninfo = args.pgconn.clone();
    let pgconn = walship_daemon::Reloadable::on_sighup(
        "the PostgreSQL connection settings (--pgconn, service and password files, PG* TLS files)",
        move || {
            walship_sender::conninfo::resolve(&conninfo, &walship_sender::conninfo::process_env)
                .map(std::sync::Arc::new)
        },
    )?;
    let shutdown = walship_daemon::shutdown_on_signals()?;
    if let Some(addr) = args.metrics_listen {
        walship_daemon::serve_metrics(addr, walship_sender::metrics::render)?;
    }
    // the CA, certificate and key, read again at SIGHUP (rotation without a restart)
    let (ca, cert, key) = (
        args.tls_ca.clone(),
        args.tls_cert.clone(),
        args.tls_key.clone(),
    );
    let tls =
        walship_daemon::Reloadable::on_sighup("the TLS CA, certificate and key", move || {
            link::client_config(&ca, &cert, &key)
        })?;
    let cfg = sender_config(&args, pgconn, tls);
    walship_daemon::notify_ready(&format!("connecting to the receiver {}", args.receiver));
    walship_sender::run(cfg, shutdown).await?;
    tracing::info!("sender stopped");
    Ok(())
}

/// The sender's configuration from the flags and the (reloadable) connection and TLS settings.
fn sender_config(
    args: &RunArgs,
    pgconn: walship_daemon::Reloadable<walship_sender::conninfo::Conn>,
    tls: walship_daemon::Reloadable<rustls::ClientConfig>,
) -> SenderConfig {
    let server_name = args
        .tls_server_name
        .clone()
        .unwrap_or_else(|| link::host_of(&args.receiver).to_owned());
    let mut cfg = SenderConfig::new(pgconn, args.receiver.clone(), server_name, tls);
    cfg.wal_dir = args.wal_dir.clone();
    cfg.start_lsn = args.start_lsn;
    cfg.slot = args.slot.clone();
    if let Some(name) = &args.name {
        cfg.name = name.clone();
        cfg.standby_name = name.clone();
    }
    cfg.synchronous = args.synchronous;
    cfg.confirm_by = if args.synchronous {
        walship_sender::replication::ConfirmBy::Replication
    } else {
        args.confirm_by
    };
    cfg.window = args.window_mb.max(1) << 20;
    (cfg.compression_level, cfg.compress_min) = match args.compression {
        Compression::Auto => (
            Some(args.compression_level),
            walship_sender::COMPRESS_MIN_AUTO,
        ),
        Compression::Zstd => (Some(args.compression_level), 0),
        Compression::None => (None, 0),
    };
    cfg.poll_interval = std::time::Duration::from_millis(args.poll_ms.max(1));
    cfg.receiver_timeout = std::time::Duration::from_secs(args.receiver_timeout.max(1));
    cfg.shutdown_grace = std::time::Duration::from_secs(args.shutdown_grace);
    cfg
}

async fn check(args: RunArgs) -> bool {
    use walship_sender::check::{check, CheckInput};
    let input = CheckInput {
        pgconn: walship_sender::conninfo::resolve(
            &args.pgconn,
            &walship_sender::conninfo::process_env,
        ),
        tls: link::client_config(&args.tls_ca, &args.tls_cert, &args.tls_key),
        timeout: std::time::Duration::from_secs(60),
        config: Box::new(move |conn, tls| {
            sender_config(
                &args,
                walship_daemon::Reloadable::fixed(std::sync::Arc::new(conn)),
                walship_daemon::Reloadable::fixed(tls),
            )
        }),
    };
    check(input).await
}

fn main() -> ExitCode {
    let cli: Cli = walship_daemon::config::parse();
    // crash and error injection for the fault tests; does nothing unless built with the `failpoints` feature
    let _failpoints = fail::FailScenario::setup();
    // check reports on stdout, one line per check; its sender's own log stays quiet unless WALSHIP_LOG asks
    if matches!(cli.command, Command::Check(_)) && std::env::var_os("WALSHIP_LOG").is_none() {
        walship_daemon::init_logging_with("off");
    } else {
        walship_daemon::init_logging();
    }
    let result = match cli.command {
        // One thread: the loop, the PostgreSQL connection and the TLS link wake each other without crossing
        // threads (a multi-threaded runtime cost two futex hand-offs per position query).
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start runtime")
            .and_then(|rt| rt.block_on(run(args))),
        Command::Check(args) => {
            return match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) if rt.block_on(check(args)) => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // once, on stderr (where the log goes)
            tracing::error!("{e:#}");
            // EX_CONFIG: retrying cannot help (the systemd unit does not restart on it)
            ExitCode::from(78)
        }
    }
}
