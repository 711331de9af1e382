//! `walship-receiver`: command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use walship_receiver::run::RunConfig;
use walship_receiver::store::{block_on, Store, StoreSpec};
use walship_receiver::{archive, certs, cleanup, promote, restore, server, status, tls, verify};

/// jemalloc keeps freed pages for reuse: with glibc's malloc, the ~1 MiB frame buffers of a catch-up were
/// handed back to the kernel and faulted in (and zeroed) again for every frame, 16 % of the receiver's CPU.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    ///
    /// With --object-store, the archive is copied to object storage: complete segments and history files go up
    /// zstd-compressed once durable locally, in order, and the partial's durable part every
    /// --partial-upload-interval; cleanup never removes a segment the store does not hold yet. One prefix per
    /// cluster.
    Run(RunArgs),
    /// Write a CA, a server certificate and a client certificate for a quick start.
    Certs(CertsArgs),
    /// restore_command: hand a WAL file from the archive to recovery (exit 0), or say it is missing (exit 1).
    ///
    /// recovery.conf (PostgreSQL 10, 11) or postgresql.conf (12+):
    ///   restore_command = 'walship-receiver restore --archive /var/lib/walship/archive %f %p'
    /// Add --wait for archive recovery (recovery.signal, or recovery.conf without standby_mode), --live for a
    /// hot standby that replays the partial segment as it grows. With --object-store, what the local archive
    /// lacks is fetched from the store (decompressed and checked), the partial at failover included, and the
    /// next segments are prefetched while recovery replays.
    Restore(RestoreArgs),
    /// Fail over: make recovery take the end of the archive (the last partial segment, zero-padded), then
    /// promote the standby and print where its new timeline starts. With --object-store (a standby restoring
    /// from the store), the end of the archive may be in the store only.
    Promote(PromoteArgs),
    /// archive_cleanup_command: remove complete segments older than %r. With --object-store, also delete from
    /// the store the segments older than %r stored more than --keep-days ago (history files are kept).
    Cleanup(CleanupArgs),
    /// Show the archive's cluster, position, current partial, connected sender and lag. With --object-store,
    /// also what the store holds.
    Status(StatusArgs),
    /// Verify the archive (exists, writable, its cluster, its lock), the TLS files when given, and with
    /// --pgdata the standby: restore_command reads this archive, archive_mode is not always, the recovery
    /// files fit its version, same cluster. One line per check (ok, or FAIL with the fix); exit 0 only when
    /// all pass.
    Check(CheckArgs),
    /// Prove what the archive can restore: walk every record of every timeline it holds as recovery reads
    /// it (page headers, the xl_prev chain across segments, each record's CRC-32C, continuation and switch
    /// records), follow the history files (each branch point against the parent's WAL), compare the partial
    /// with what the receiver acknowledged as durable, and with --object-store download, decompress and check
    /// every object and compare it with the local file. Prints per timeline the ranges of WAL that replay
    /// without a break and each problem with its file and LSN. Reads only; exit 0 without a problem, 2 with
    /// one, 3 when the archive cannot be read (as status, for a nightly check).
    Verify(VerifyArgs),
    /// Write a new age identity for encrypting the object store (mode 0600, never over an existing file)
    /// and print its public key: give the key to the receiver (`run --store-encrypt-to age1…`), keep the
    /// file where the store is read (restore, promote, verify: --store-identity FILE), and a copy offline.
    Keygen(KeygenArgs),
    /// Started by restore in the background: fetch the segments after --after from the object store into
    /// <archive>/prefetch/.
    #[command(hide = true)]
    Prefetch(PrefetchArgs),
}

/// `--config FILE` of the commands that restore_command, archive_cleanup_command and operators run.
#[derive(clap::Args, Debug)]
struct ConfigFile {
    /// TOML file of defaults (the receiver's config file: archive, object-store and object-store-option are
    /// taken from it).
    #[arg(long, env = "WALSHIP_CONFIG", value_name = "FILE")]
    #[allow(dead_code)] // read before clap, by walship_daemon::config
    config: Option<PathBuf>,
}

/// Where the archive's object store is and how to reach it.
#[derive(clap::Args, Debug)]
struct StoreArgs {
    /// The archive's object store (s3://bucket/prefix or az://container/prefix, as given to `run`).
    /// Credentials and endpoint come from the AWS_* (S3) or AZURE_* (Azure) variables of the environment, or
    /// from --object-store-option.
    #[arg(long, env = "WALSHIP_OBJECT_STORE", value_name = "URL")]
    object_store: Option<String>,
    /// A setting of the object-store client, as AWS_ACCESS_KEY_ID=…, AWS_SECRET_ACCESS_KEY=…, AWS_REGION=…,
    /// AWS_ENDPOINT_URL=…, AWS_ALLOW_HTTP=true, or for Azure AZURE_STORAGE_ACCOUNT_NAME=…,
    /// AZURE_STORAGE_ACCOUNT_KEY=…, AZURE_STORAGE_ENDPOINT=… (repeatable; in the config file:
    /// object-store-option = […], so the secret stays in a 0600 file instead of the environment or
    /// restore_command). Overrides the environment.
    #[arg(
        long = "object-store-option",
        value_name = "NAME=VALUE",
        hide_default_value = true
    )]
    object_store_option: Vec<String>,
    /// Encrypt every object `run` stores (segments, partials, history files, walship.id) to this age public
    /// key (age1…, as `walship-receiver keygen` prints) before it leaves the standby; repeatable, each
    /// key's identity decrypts. To rotate, encrypt to the new key from now on and keep the old identity in
    /// the readers' identity file.
    #[arg(
        long = "store-encrypt-to",
        env = "WALSHIP_STORE_ENCRYPT_TO",
        value_delimiter = ',',
        value_name = "AGE_PUBLIC_KEY"
    )]
    store_encrypt_to: Vec<String>,
    /// The age identity file (AGE-SECRET-KEY-1… lines, mode 0600) that decrypts an encrypted store: for
    /// restore, promote, verify, status, cleanup (and run, only to adopt an encrypted store's identity into
    /// a new archive). Several lines form a keyring: keep rotated-out identities in it.
    #[arg(
        long = "store-identity",
        env = "WALSHIP_STORE_IDENTITY",
        value_name = "FILE"
    )]
    store_identity: Option<PathBuf>,
}

#[derive(Parser, Debug)]
struct CheckArgs {
    /// TOML file of defaults (the receiver's config file: archive and TLS files are taken from it).
    #[arg(long, env = "WALSHIP_CONFIG", value_name = "FILE")]
    #[allow(dead_code)] // read before clap, by walship_daemon::config
    config: Option<PathBuf>,
    /// Archive directory.
    #[arg(long, env = "WALSHIP_ARCHIVE")]
    archive: PathBuf,
    /// The standby's data directory: check that its recovery reads this archive.
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
    /// Check the TLS files `run` would use (with --tls-key and --tls-client-ca).
    #[arg(long, env = "WALSHIP_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "WALSHIP_TLS_KEY", hide = true)]
    tls_key: Option<PathBuf>,
    #[arg(long, env = "WALSHIP_TLS_CLIENT_CA", hide = true)]
    tls_client_ca: Option<PathBuf>,
}

#[derive(Parser, Debug)]
struct RestoreArgs {
    #[command(flatten)]
    config: ConfigFile,
    /// Archive directory.
    #[arg(long, env = "WALSHIP_ARCHIVE")]
    archive: PathBuf,
    /// Wait for a segment that has not arrived yet, or for failover (archive recovery, like pg_standby).
    /// Without it, a missing segment is answered at once (standby mode: PostgreSQL retries by itself).
    #[arg(long, env = "WALSHIP_RESTORE_WAIT")]
    wait: bool,
    /// Also hand over the confirmed part of the current partial segment (WAL the primary has flushed),
    /// zero-padded, before any failover, so that a standby in standby mode replays shipped WAL continuously
    /// (set wal_retrieve_retry_interval low, e.g. 100ms). Provisional WAL reaches recovery only at failover.
    #[arg(long, env = "WALSHIP_RESTORE_LIVE")]
    live: bool,
    /// A file whose existence triggers failover (for HA tools), besides `walship-receiver promote`.
    #[arg(long, env = "WALSHIP_TRIGGER")]
    trigger: Option<PathBuf>,
    /// Hand over zero-padded partial segments even when the standby runs archive_mode = always (it would
    /// archive them under their real names).
    #[arg(long, env = "WALSHIP_ALLOW_ARCHIVE_MODE_ALWAYS")]
    allow_archive_mode_always: bool,
    #[command(flatten)]
    store: StoreArgs,
    /// With --object-store: segments fetched ahead in the background (into <archive>/prefetch/) while
    /// recovery replays, so that restoring from the store keeps up with replay; 0 turns it off.
    #[arg(
        long,
        env = "WALSHIP_PREFETCH",
        default_value_t = 8,
        value_name = "SEGMENTS"
    )]
    prefetch: usize,
    /// %f: the file recovery wants.
    file: String,
    /// %p: where to put it.
    path: PathBuf,
    /// %r: the oldest file still needed (accepted, unused).
    restartpoint: Option<String>,
}

#[derive(Parser, Debug)]
struct PromoteArgs {
    #[command(flatten)]
    config: ConfigFile,
    /// Archive directory the standby's restore_command reads.
    #[arg(long, env = "WALSHIP_ARCHIVE")]
    archive: PathBuf,
    /// Data directory of the standby to promote.
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
    /// Directory holding pg_ctl. Default: the running server's.
    #[arg(long, env = "WALSHIP_PROMOTE_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// Seconds to wait for recovery to take the end of the archive and for promotion.
    #[arg(long, env = "WALSHIP_PROMOTE_TIMEOUT", default_value_t = 120)]
    timeout: u64,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Parser, Debug)]
struct CleanupArgs {
    #[command(flatten)]
    config: ConfigFile,
    /// Archive directory.
    #[arg(long, env = "WALSHIP_ARCHIVE")]
    archive: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// With --object-store: keep segments in the store for this many days even when the standby no longer
    /// needs them (the window for point-in-time recovery).
    #[arg(
        long,
        env = "WALSHIP_KEEP_DAYS",
        default_value_t = 7,
        value_name = "DAYS"
    )]
    keep_days: u64,
    /// %r: the oldest segment still needed; older complete segments are removed.
    restartpoint: String,
}

#[derive(Parser, Debug)]
struct KeygenArgs {
    /// The identity file to create.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Parser, Debug)]
struct PrefetchArgs {
    #[arg(long)]
    archive: PathBuf,
    #[arg(long, value_name = "URL")]
    object_store: String,
    /// The segment recovery took last.
    #[arg(long)]
    after: String,
    #[arg(long, default_value_t = 8)]
    count: usize,
}

#[derive(Parser, Debug)]
struct StatusArgs {
    #[command(flatten)]
    config: ConfigFile,
    /// Archive directory.
    #[arg(long, env = "WALSHIP_ARCHIVE")]
    archive: PathBuf,
    /// Print JSON.
    #[arg(long, env = "WALSHIP_STATUS_JSON")]
    json: bool,
    /// Lag above which the verdict is WARNING (exit 1): bytes behind the primary's flush position (16MB,
    /// 1GB, plain bytes) or seconds behind (30s, 5min).
    #[arg(long)]
    warn_lag: Option<status::Lag>,
    /// Lag above which the verdict is CRITICAL (exit 2), as --warn-lag.
    #[arg(long)]
    crit_lag: Option<status::Lag>,
    /// No sender connected for longer than this many seconds is CRITICAL (shorter: WARNING).
    #[arg(long, default_value_t = 60.0)]
    crit_no_sender: f64,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Parser, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    config: ConfigFile,
    /// Archive directory (with --object-store and a standby restoring from the store alone: the directory
    /// whose walship.id names the cluster, or an empty one).
    #[arg(long, env = "WALSHIP_ARCHIVE")]
    archive: PathBuf,
    /// Start at this segment (a file name, 000000010000000000000003) or LSN (0/3000000) instead of the
    /// oldest the archive holds.
    #[arg(long, value_name = "SEGMENT|LSN")]
    from: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// A switch.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// TOML file of defaults for these flags: keys are the long flag names (tls-ca = "/etc/walship/ca.crt").
    /// Flags and WALSHIP_* variables win over it. See contrib/ for a commented example.
    #[arg(long, env = "WALSHIP_CONFIG", value_name = "FILE")]
    #[allow(dead_code)] // read before clap, by walship_daemon::config
    config: Option<PathBuf>,
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
    /// Close a session that sent nothing for this many seconds (senders send keepalives every second).
    #[arg(long, env = "WALSHIP_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
    /// Only senders whose client certificate has this name (its CN or a DNS subject alternative name, as
    /// `certs --add-client NAME` issues it) may ship into the archive; repeat for several, or list them in
    /// the config file (allow-sender = ["db1", "db2"]). Without it, any certificate of --tls-client-ca may.
    /// A certificate not named is closed without a word about the archive.
    #[arg(
        long = "allow-sender",
        env = "WALSHIP_ALLOW_SENDER",
        value_name = "NAME",
        value_delimiter = ','
    )]
    allow_sender: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Seconds between uploads of the partial segment's durable part (and one at shutdown).
    #[arg(long, env = "WALSHIP_PARTIAL_UPLOAD_INTERVAL", default_value_t = 60)]
    partial_upload_interval: u64,
    /// Let senders compress WAL on the wire with zstd (protocol 4), or not.
    #[arg(long, env = "WALSHIP_WIRE_COMPRESSION", value_enum, default_value_t = OnOff::On)]
    wire_compression: OnOff,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9187): positions, lag, fsync
    /// latency, segments, sessions, errors. Off by default.
    #[arg(long, env = "WALSHIP_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
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
    #[arg(long, env = "WALSHIP_CERTS_FORCE")]
    force: bool,
    /// Issue one more sender certificate, NAME.crt and NAME.key, from the CA kept in --out (ca.crt, ca.key),
    /// for a second sender or a renewal; nothing else is touched.
    #[arg(long, value_name = "NAME")]
    add_client: Option<String>,
}

impl StoreArgs {
    /// The store these flags name, if any; the settings are checked either way.
    fn spec(&self) -> Result<Option<StoreSpec>> {
        let spec = StoreSpec::new(
            self.object_store.as_deref().unwrap_or_default(),
            &self.object_store_option,
        )?
        .with_encryption(self.store_encrypt_to.clone(), self.store_identity.clone());
        Ok(self.object_store.is_some().then_some(spec))
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let shutdown = walship_receiver::shutdown_on_signals()?;
    // the certificate, its key and the client CA, read again at SIGHUP (rotation without a restart)
    let (cert, key, client_ca) = (args.tls_cert, args.tls_key, args.tls_client_ca);
    let tls = walship_daemon::Reloadable::on_sighup(
        "the TLS certificate, key and client CA",
        move || tls::server_config(&cert, &key, &client_ca),
    )?;
    let config = RunConfig {
        archive: args.archive,
        tls,
        server: server::ServerOptions {
            idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
            wire_compression: matches!(args.wire_compression, OnOff::On),
            allowed_senders: args.allow_sender,
            ..Default::default()
        },
        store: args.store.spec()?,
        partial_upload_interval: Duration::from_secs(args.partial_upload_interval),
        metrics_listen: args.metrics_listen,
    };
    let listener = server::bind(args.listen).await?;
    walship_receiver::run::run(config, listener, shutdown).await
}

fn certs(args: CertsArgs) -> Result<()> {
    if let Some(name) = args.add_client {
        let files = certs::add_client(&args.out, &name, args.force)?;
        println!(
            "wrote {} to {}: give them to the sender (--tls-cert, --tls-key) with ca.crt (--tls-ca)",
            files.join(" and "),
            args.out.display()
        );
        return Ok(());
    }
    let names = if args.server_names.is_empty() {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        args.server_names
    };
    certs::write_certificates(&args.out, &names, &args.client_name, args.force)?;
    println!(
        "wrote {} to {}",
        certs::FILES.join(", "),
        args.out.display()
    );
    println!(
        "ca.key issues certificates every receiver of this CA trusts: keep it offline (move it off this host; \
         bring it back for `certs --add-client NAME`)"
    );
    Ok(())
}

fn check(args: CheckArgs) -> ExitCode {
    let tls = match (args.tls_cert, args.tls_key, args.tls_client_ca) {
        (Some(c), Some(k), Some(ca)) => Some((c, k, ca)),
        _ => None,
    };
    let opts = walship_receiver::check::CheckOptions {
        archive: args.archive,
        pgdata: args.pgdata,
        tls,
    };
    if walship_receiver::check::check(&opts) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn restore(args: RestoreArgs) -> ExitCode {
    let Ok(object_store) = args.store.spec() else {
        return ExitCode::from(78); // checked in main
    };
    let opts = restore::RestoreOptions {
        archive: args.archive,
        wait: args.wait,
        live: args.live,
        trigger: args.trigger,
        allow_archive_mode_always: args.allow_archive_mode_always,
        wanted: args.file,
        dest: args.path,
        data_dir: std::env::current_dir().unwrap_or_default(),
        object_store,
        prefetch: args.prefetch,
    };
    // exit 0: restored; 1: missing.
    ExitCode::from(restore::restore(&opts).exit_code())
}

fn promote(args: PromoteArgs) -> Result<()> {
    let opts = promote::PromoteOptions {
        archive: args.archive,
        pgdata: args.pgdata,
        pg_bin: args.pg_bin,
        timeout: Duration::from_secs(args.timeout.max(1)),
        object_store: args.store.spec()?,
    };
    let r = promote::promote(&opts)?;
    println!(
        "promoted: timeline {} starts at {}; recovery took {} bytes of the partial segment {} (WAL up to {})",
        r.timeline, r.start_lsn, r.handover.partial_bytes, r.handover.segment, r.handover.end_lsn
    );
    Ok(())
}

fn cleanup(args: CleanupArgs) -> Result<()> {
    let removed = cleanup::cleanup(&args.archive, &args.restartpoint)?;
    if let (Some(first), Some(last)) = (removed.first(), removed.last()) {
        tracing::info!(count = removed.len(), %first, %last, "removed segments older than {}", args.restartpoint);
    }
    let Some(spec) = args.store.spec()? else {
        return Ok(());
    };
    let seg = archive::ensure_archive(&args.archive)?.wal_segment_size;
    let store = Store::open(&spec)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let deleted = block_on(cleanup::cleanup_store(
        &args.archive,
        &store,
        seg,
        &args.restartpoint,
        args.keep_days,
        now,
    ))??;
    if let (Some(first), Some(last)) = (deleted.first(), deleted.last()) {
        tracing::info!(count = deleted.len(), %first, %last, "deleted from the object store: older than {} and than {} days", args.restartpoint, args.keep_days);
    }
    Ok(())
}

fn prefetch(args: PrefetchArgs) -> Result<()> {
    // the store's settings come as this process's environment (restore passes them so)
    let store = Store::open(&StoreSpec::new(&args.object_store, &[])?.with_encryption(
        Vec::new(),
        std::env::var_os("WALSHIP_STORE_IDENTITY").map(PathBuf::from),
    ))?;
    let fetched = block_on(walship_receiver::prefetch::run(
        &args.archive,
        &store,
        &args.after,
        args.count,
    ))??;
    tracing::debug!(fetched, "prefetched after {}", args.after);
    Ok(())
}

/// Like a monitoring plugin: 0 ok, 1 warning, 2 critical; an error (not an archive) is 3.
fn status(args: StatusArgs) -> ExitCode {
    let thresholds = status::Thresholds {
        warn_lag: args.warn_lag,
        crit_lag: args.crit_lag,
        crit_no_sender_seconds: args.crit_no_sender,
    };
    let printed = status::report(&args.archive).and_then(|mut r| {
        if let Some(spec) = args.store.spec()? {
            let store = Store::open(&spec)?;
            let seg = archive::Identity::load(&args.archive)?
                .map_or(walship_protocol::WalSegSize::DEFAULT, |id| {
                    id.wal_segment_size
                });
            r.store_contents = Some(block_on(status::StoreContents::list(&store, seg))?);
        }
        let code = r.judge(&thresholds).code;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print!("{r}");
        }
        Ok(code)
    });
    match printed {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(3)
        }
    }
}

fn verify(args: VerifyArgs) -> ExitCode {
    let done = (|| -> Result<u8> {
        let store = match args.store.spec()? {
            Some(spec) => Some(Store::open(&spec)?),
            None => None,
        };
        let from = match &args.from {
            Some(text) => Some(verify::parse_from(
                text,
                &verify::identity(&args.archive, store.as_ref())?,
            )?),
            None => None,
        };
        let report = verify::verify(&verify::Options {
            archive: &args.archive,
            store: store.as_ref(),
            from,
            progress: !args.json,
        })?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{report}");
        }
        Ok(report.exit_code())
    })();
    match done {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(3)
        }
    }
}

fn main() -> ExitCode {
    let cli: Cli = walship_daemon::config::parse();
    // the object store's settings are checked before anything is done (EX_CONFIG: restore_command's
    // recovery retries rather than aborting)
    let store = match &cli.command {
        Command::Run(a) => Some(&a.store),
        Command::Restore(a) => Some(&a.store),
        Command::Promote(a) => Some(&a.store),
        Command::Cleanup(a) => Some(&a.store),
        Command::Status(a) => Some(&a.store),
        Command::Verify(a) => Some(&a.store),
        _ => None,
    };
    if let Some(Err(e)) = store.map(StoreArgs::spec) {
        eprintln!("walship-receiver: {e:#}");
        return ExitCode::from(78);
    }
    // crash and error injection for the fault tests; does nothing unless built with the `failpoints` feature
    let _failpoints = fail::FailScenario::setup();
    walship_receiver::init_logging();
    let result = match cli.command {
        // One thread: a session's live path runs on its connection task (an append, its fdatasync, the
        // acknowledgement); the catch-up writer, the fsync thread and the uploads' encoding have threads of their
        // own. A second worker only woke up to find nothing to steal: 8 % more CPU per transaction and 9 % fewer
        // of the primary's transactions under load (BENCHMARKS.md, issue 21 fifth step).
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start runtime")
            .and_then(|rt| rt.block_on(run(args))),
        Command::Certs(args) => certs(args),
        Command::Check(args) => return check(args),
        Command::Restore(args) => return restore(args),
        Command::Promote(args) => promote(args),
        Command::Cleanup(args) => cleanup(args),
        Command::Prefetch(args) => prefetch(args),
        Command::Keygen(args) => walship_receiver::crypt::keygen(&args.out).map(|public| {
            println!("{public}");
            eprintln!(
                "wrote the identity to {}; encrypt with: walship-receiver run --store-encrypt-to {public} …; \
                 decrypt with: --store-identity {}",
                args.out.display(),
                args.out.display()
            );
        }),
        Command::Status(args) => return status(args),
        Command::Verify(args) => return verify(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // once, on stderr (where the log goes; PostgreSQL's log for restore)
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
