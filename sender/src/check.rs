//! `walship-sender check`: everything `run` needs, verified once, one line per check (`ok: …` or
//! `FAIL: … fix: …`), like `pgbackrest check`; then a round trip: a WAL switch on the primary, shipped until
//! the receiver holds the switched segment complete.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use walship_protocol::wal::segment_file_name;
use walship_protocol::Lsn;

use crate::conninfo::Conn;
use crate::postgres::Primary;
use crate::SenderConfig;

/// What `check` is given: `run`'s configuration, or why a part of it could not be built.
pub struct CheckInput {
    pub pgconn: Result<Conn>,
    pub tls: Result<std::sync::Arc<rustls::ClientConfig>>,
    /// Builds the sender's configuration from the two above.
    pub config: Box<dyn Fn(Conn, std::sync::Arc<rustls::ClientConfig>) -> SenderConfig>,
    /// How long the round trip may take.
    pub timeout: Duration,
}

/// Prints each check as it is made and counts the failures.
struct Lines {
    failed: usize,
}

impl Lines {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("ok: {what}: {detail}");
    }

    fn warn(&mut self, what: &str, problem: impl std::fmt::Display, fix: &str) {
        println!("WARNING: {what}: {problem}; fix: {fix}");
    }

    fn fail(&mut self, what: &str, problem: impl std::fmt::Display, fix: &str) {
        self.failed += 1;
        println!("FAIL: {what}: {problem}; fix: {fix}");
    }
}

/// Runs the checks; returns whether all passed.
pub async fn check(input: CheckInput) -> bool {
    let mut out = Lines { failed: 0 };
    let (conn, tls) = settings(&mut out, input.pgconn, input.tls);
    let Some(conn) = conn else {
        return finish(out);
    };
    let Some(pg) = connect(&mut out, &conn).await else {
        return finish(out);
    };
    let info = pg.info.clone();
    server_facts(&mut out, &pg, &info).await;
    let cfg_probe = (input.config)(conn.clone(), tls.clone().unwrap_or_else(dummy_tls));
    wal_directory(&mut out, &pg, &info, cfg_probe.wal_dir.as_ref()).await;
    if let Some(slot) = &cfg_probe.slot {
        replication_slot(&mut out, &pg, slot).await;
    }
    flush_signal(&mut out, &pg, &info, &conn, &cfg_probe).await;
    let Some(tls) = tls else {
        return finish(out);
    };
    // the receiver: run the sender itself until it streams, then a WAL switch travels the whole way
    let mut cfg = (input.config)(conn, tls);
    cfg.slot = None; // check never creates a slot
    receiver_and_round_trip(&mut out, cfg, &pg, &info, input.timeout).await;
    finish(out)
}

/// The connection settings and the TLS files, as far as they could be built.
fn settings(
    out: &mut Lines,
    pgconn: Result<Conn>,
    tls: Result<std::sync::Arc<rustls::ClientConfig>>,
) -> (Option<Conn>, Option<std::sync::Arc<rustls::ClientConfig>>) {
    let conn = match pgconn {
        Ok(c) => {
            out.ok("connection settings", c.describe());
            Some(c)
        }
        Err(e) => {
            out.fail(
                "connection settings",
                format!("{e:#}"),
                "correct --pgconn (libpq keywords or a postgresql:// URI) or the PG* variables",
            );
            None
        }
    };
    let tls = match tls {
        Ok(t) => {
            out.ok("TLS files", "CA, certificate and key load and fit together");
            Some(t)
        }
        Err(e) => {
            out.fail(
                "TLS files",
                format!("{e:#}"),
                "give --tls-ca (the receiver's ca.crt), --tls-cert and --tls-key (a sender certificate of that CA)",
            );
            None
        }
    };
    (conn, tls)
}

/// The primary, reached within 15 s.
async fn connect(out: &mut Lines, conn: &Conn) -> Option<Primary> {
    let pg = match tokio::time::timeout(Duration::from_secs(15), Primary::connect(conn)).await {
        Ok(Ok(pg)) => pg,
        Ok(Err(e)) => {
            let fix = crate::postgres::fatal_cause(&e).unwrap_or(
                "is PostgreSQL running, and does --pgconn (host, port) reach it? See the error",
            );
            out.fail("PostgreSQL", format!("{e:#}"), fix);
            return None;
        }
        Err(_) => {
            out.fail(
                "PostgreSQL",
                "no connection within 15 s",
                "check host and port in --pgconn, and the firewall",
            );
            return None;
        }
    };
    Some(pg)
}

/// Its version, the role's privileges, `wal_level`.
async fn server_facts(out: &mut Lines, pg: &Primary, info: &crate::postgres::ServerInfo) {
    let version = scalar(pg, "SHOW server_version").await.unwrap_or_default();
    out.ok(
        "PostgreSQL",
        format!(
            "{version} (server_version_num {}), a primary, system identifier {}, WAL segments of {}",
            info.version_num, info.system_identifier, info.seg
        ),
    );
    let superuser = scalar(
        pg,
        "SELECT rolsuper::text FROM pg_roles WHERE rolname = current_user",
    )
    .await
    .is_some_and(|v| v == "true");
    out.ok(
        "privileges",
        if superuser {
            "superuser"
        } else {
            "reads pg_control_system() and the settings walship needs"
        },
    );
    match scalar(pg, "SHOW wal_level").await.as_deref() {
        Some("minimal") => out.fail(
            "wal_level",
            "wal_level is minimal: WAL cannot rebuild a standby",
            "set wal_level = replica in postgresql.conf and restart PostgreSQL",
        ),
        Some(level) => out.ok("wal_level", level),
        None => out.fail(
            "wal_level",
            "cannot read it",
            "connect as a role that may SHOW wal_level",
        ),
    }
}

/// The replication connection (`--confirm-by`, `--synchronous`): the role, `max_wal_senders`, `pg_hba.conf`,
/// and whether `synchronous_standby_names` names this sender.
async fn flush_signal(
    out: &mut Lines,
    pg: &Primary,
    info: &crate::postgres::ServerInfo,
    conn: &Conn,
    cfg: &SenderConfig,
) {
    use crate::replication::{names_standby, probe, ConfirmBy};
    let name = &cfg.standby_name;
    let named = scalar(pg, "SHOW synchronous_standby_names")
        .await
        .filter(|s| names_standby(s, name));
    match (&named, cfg.synchronous) {
        (Some(s), true) => out.ok(
            "synchronous",
            format!("synchronous_standby_names = '{s}' names {name}: a commit returns once walship's archive holds it; commits wait while the receiver is away"),
        ),
        (None, true) => out.fail(
            "synchronous",
            format!("--synchronous is set but synchronous_standby_names does not name {name}: commits do not wait for walship"),
            &format!("ALTER SYSTEM SET synchronous_standby_names = '{name}' (or ANY 1 ({name}, other_standby) to stay writable while one is away); SELECT pg_reload_conf()"),
        ),
        (Some(s), false) => out.warn(
            "synchronous",
            format!("synchronous_standby_names = '{s}' names {name} but the sender runs without --synchronous: commits then wait up to 100 ms longer for it"),
            "add --synchronous, or take walship out of synchronous_standby_names",
        ),
        (None, false) => {}
    }
    if cfg.confirm_by == ConfirmBy::Query {
        out.ok("flush signal", "the flush query (--confirm-by query)");
        return;
    }
    let senders = scalar(pg, "SHOW max_wal_senders").await.unwrap_or_default();
    let replication = scalar(
        pg,
        "SELECT (rolreplication OR rolsuper)::text FROM pg_roles WHERE rolname = current_user",
    )
    .await
    .is_some_and(|v| v == "true");
    let required = cfg.confirm_by == ConfirmBy::Replication;
    let refused = |out: &mut Lines, problem: String, fix: &str| {
        if required {
            out.fail("replication connection", problem, fix)
        } else {
            out.warn(
                "replication connection",
                format!("{problem}; the sender polls the flush position instead"),
                fix,
            )
        }
    };
    if !replication {
        return refused(
            out,
            "the role has neither REPLICATION nor superuser".into(),
            "ALTER ROLE ... REPLICATION",
        );
    }
    if senders == "0" {
        return refused(
            out,
            "max_wal_senders = 0".into(),
            "set max_wal_senders (10 is the default) in postgresql.conf and restart PostgreSQL",
        );
    }
    match tokio::time::timeout(Duration::from_secs(15), probe(conn, name)).await {
        Ok(Ok((sysid, timeline, flush))) if sysid == info.system_identifier => out.ok(
            "replication connection",
            format!("application_name {name}, timeline {timeline}, flushed up to {flush} (max_wal_senders {senders}): the walsender confirms shipped WAL"),
        ),
        Ok(Ok((sysid, ..))) => out.fail(
            "replication connection",
            format!("it reached cluster {sysid}, not {}", info.system_identifier),
            "--pgconn must name one server",
        ),
        Ok(Err(e)) => {
            let fix = crate::replication::fix_for(&e)
                .unwrap_or("see the error; max_wal_senders may be used up by other standbys");
            refused(out, format!("{e:#}"), fix)
        }
        Err(_) => refused(out, "no answer within 15 s".into(), "check the primary"),
    }
}

/// `pg_wal`: readable, and the server's own (its first page names this system identifier).
async fn wal_directory(
    out: &mut Lines,
    pg: &Primary,
    info: &crate::postgres::ServerInfo,
    wal_dir: Option<&std::path::PathBuf>,
) {
    let wal_dir = match (wal_dir, &info.data_directory) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(data)) => Some(data.join(info.dialect.wal_dir)),
        (None, None) => None,
    };
    let position = pg.position().await;
    match (&wal_dir, &position) {
        (None, _) => out.fail(
            "WAL directory",
            "this role cannot read data_directory",
            "pass --wal-dir, or grant pg_read_all_settings",
        ),
        (Some(_), Err(e)) => out.fail(
            "WAL directory",
            format!("cannot ask for the flush position: {e:#}"),
            "grant pg_monitor to the role",
        ),
        (Some(dir), Ok(pos)) => {
            let name = segment_file_name(pos.timeline, info.seg.segno(pos.flush), info.seg);
            let path = dir.join(&name);
            let mut page = [0u8; 32];
            match std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut page)) {
                Err(e) => out.fail(
                    "WAL directory",
                    format!("cannot read {}: {e}", path.display()),
                    "run walship-sender as the database's OS user (postgres), or pass the right --wal-dir",
                ),
                Ok(()) => {
                    let magic = u16::from_le_bytes([page[0], page[1]]);
                    let sysid = u64::from_le_bytes(page[24..32].try_into().expect("8 bytes"));
                    if magic != info.magic || sysid != info.system_identifier {
                        out.fail(
                            "WAL directory",
                            format!(
                                "{} is not this server's WAL (page magic {magic:#06x}, system identifier {sysid})",
                                path.display()
                            ),
                            "--wal-dir must be the pg_wal of the server --pgconn reaches",
                        )
                    } else {
                        out.ok("WAL directory", format!("{} ({name} readable)", dir.display()));
                    }
                }
            }
        }
    }
}

/// The slot `--slot` names: physical, and the role may create or advance it.
async fn replication_slot(out: &mut Lines, pg: &Primary, slot: &str) {
    let exists = pg
        .client()
        .query_opt(
            "SELECT slot_type FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    let may = scalar(
        pg,
        "SELECT (rolsuper OR rolreplication)::text FROM pg_roles WHERE rolname = current_user",
    )
    .await
    .is_some_and(|v| v == "true");
    match exists {
        Ok(Some(row)) if row.get::<_, String>(0) != "physical" => out.fail(
            "replication slot",
            format!("{slot} exists but is not a physical slot"),
            "choose another --slot name",
        ),
        Ok(_) if !may => out.fail(
            "replication slot",
            format!("the role may not create or advance slot {slot}"),
            "ALTER ROLE ... REPLICATION, or connect as a superuser",
        ),
        Ok(Some(_)) => out.ok("replication slot", format!("{slot} exists")),
        Ok(None) => out.ok(
            "replication slot",
            format!("{slot} will be created when the sender starts"),
        ),
        Err(e) => out.fail(
            "replication slot",
            format!("{e:#}"),
            "grant pg_monitor to the role",
        ),
    }
}

/// The sender itself, run until the receiver accepts a session, then a WAL switch shipped until the receiver
/// holds the switched segment.
async fn receiver_and_round_trip(
    out: &mut Lines,
    cfg: SenderConfig,
    pg: &Primary,
    info: &crate::postgres::ServerInfo,
    timeout: Duration,
) {
    let receiver = cfg.receiver.clone();
    let token = CancellationToken::new();
    let (mut task, mut state) = crate::start(cfg, token.clone());
    let started = Instant::now();
    let deadline = started + timeout;
    // three failed attempts in a row (about a second of backoff) say enough
    let wait = state.wait_for(|s| s.sessions > 0 || s.reconnects >= 3);
    let mut sender_gone = false;
    let ended = tokio::select! {
        biased;
        ended = &mut task => Some(ended),
        waited = tokio::time::timeout_at(deadline.into(), wait) => {
            // the state's channel closes when the sender stops (a fatal error): its result says why
            sender_gone = matches!(waited, Ok(Err(_)));
            None
        }
    };
    let ended = match ended {
        None if sender_gone => Some((&mut task).await),
        ended => ended,
    };
    let seen = state.borrow().clone();
    use crate::error::ReceiverTrouble;
    let refused = match ended {
        Some(Ok(Ok(()))) => Some((
            anyhow::anyhow!("the sender stopped"),
            ReceiverTrouble::Other,
        )),
        Some(Ok(Err(e))) => {
            let trouble = ReceiverTrouble::of(&e);
            Some((e, trouble))
        }
        Some(Err(e)) => Some((
            anyhow::anyhow!("the sender task failed: {e}"),
            ReceiverTrouble::Other,
        )),
        None if seen.sessions > 0 => None,
        None => {
            token.cancel();
            let e = anyhow::anyhow!(
                "no session after {:.1} s: {}",
                started.elapsed().as_secs_f64(),
                seen.last_error.as_deref().unwrap_or("no answer")
            );
            Some((e, seen.last_trouble.unwrap_or(ReceiverTrouble::Other)))
        }
    };
    if let Some((e, trouble)) = refused {
        out.fail("receiver", format!("{receiver}: {e:#}"), trouble.fix());
        token.cancel();
        if !task.is_finished() {
            let _ = task.await;
        }
        return;
    }
    out.ok(
        "receiver",
        format!("{receiver} accepts this sender and this cluster"),
    );
    match round_trip(pg, info, &mut state, deadline).await {
        Ok((segment, took)) => out.ok(
            "round trip",
            format!(
                "switched WAL; the receiver holds {segment} complete after {:.1} s",
                took.as_secs_f64()
            ),
        ),
        Err((problem, fix)) => out.fail("round trip", problem, fix),
    }
    token.cancel();
    if !task.is_finished() {
        let _ = task.await;
    }
}

fn finish(out: Lines) -> bool {
    if out.failed == 0 {
        println!("all checks passed");
    } else {
        println!("{} check(s) failed", out.failed);
    }
    out.failed == 0
}

/// Some WAL, a switch, and the wait until the receiver acknowledged the switched segment's end.
async fn round_trip(
    pg: &Primary,
    info: &crate::postgres::ServerInfo,
    state: &mut tokio::sync::watch::Receiver<crate::SenderState>,
    deadline: Instant,
) -> std::result::Result<(String, Duration), (String, &'static str)> {
    let started = Instant::now();
    let switch = if info.version_num >= 100_000 {
        "SELECT pg_switch_wal()::text"
    } else {
        "SELECT pg_switch_xlog()::text"
    };
    let _ = pg.client().simple_query("SELECT txid_current()").await;
    let end: Lsn = match crate::postgres::scalar(pg.client(), switch).await {
        Ok(text) => match text.parse() {
            Ok(l) => l,
            Err(e) => return Err((format!("{switch} answered {text:?}: {e}"), "report this")),
        },
        Err(e) => return Err((
            format!("{switch}: {e:#}"),
            "run check as a superuser, or GRANT EXECUTE ON FUNCTION pg_switch_wal() to the role",
        )),
    };
    // the switched segment ends where the next begins
    let segno = info.seg.segno(Lsn(end.0.saturating_sub(1)));
    let seg_end = info.seg.segment_start(segno + 1);
    let timeline = state.borrow().timeline.unwrap_or(1);
    let name = segment_file_name(timeline, segno, info.seg);
    let acked = tokio::time::timeout_at(deadline.into(), state.wait_for(|s| s.durable >= seg_end))
        .await
        .is_ok_and(|r| r.is_ok());
    if acked {
        return Ok((name, started.elapsed()));
    }
    Err((
        format!(
            "the receiver did not acknowledge {seg_end} (the end of {name}) in time; it holds up to {}",
            state.borrow().durable
        ),
        "look at the receiver's log (a full disk? a slow fsync?)",
    ))
}

async fn scalar(pg: &Primary, sql: &str) -> Option<String> {
    crate::postgres::scalar(pg.client(), sql).await.ok()
}

/// Only for reading the non-TLS parts of the configuration when the TLS files failed.
fn dummy_tls() -> std::sync::Arc<rustls::ClientConfig> {
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    )
}
