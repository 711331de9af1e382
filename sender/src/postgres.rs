//! Talking to the primary: version detection, identity, segment size, WAL directory, and the flush position.
//!
//! Names of the WAL functions and directory changed in PostgreSQL 10 (`xlog` → `wal`, `location` → `lsn`);
//! [`Dialect`] holds both, chosen from `server_version_num`. Segment names and offsets are computed by walship
//! from the LSN, never taken from `pg_walfile_name_offset` (whose answer at a segment boundary changed in 17).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, NoTls, Statement};

use crate::conninfo::Conn;
use walship_protocol::wal::page_magic_for_version;
use walship_protocol::{Lsn, SyncState, TimelineId, WalSegSize};

pub use crate::error::Unfixable;

/// The SQL and paths of one PostgreSQL generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dialect {
    /// Flushed position, insert position (WAL reserved, maybe not yet written), and the name of the segment file of the flushed position (its
    /// first 8 hex digits are the current timeline).
    pub position_sql: &'static str,
    /// The WAL directory inside the data directory.
    pub wal_dir: &'static str,
}

impl Dialect {
    pub fn for_version(server_version_num: u32) -> Result<Dialect> {
        if page_magic_for_version(server_version_num).is_none() {
            return Err(Unfixable(format!("PostgreSQL server_version_num {server_version_num} is not supported: walship supports 9.6 to 18")).into());
        }
        Ok(if server_version_num >= 100_000 {
            Dialect {
                position_sql:
                    "SELECT pg_current_wal_flush_lsn()::text, pg_current_wal_insert_lsn()::text, \
                               pg_walfile_name(pg_current_wal_flush_lsn())",
                wal_dir: "pg_wal",
            }
        } else {
            Dialect {
                position_sql: "SELECT pg_current_xlog_flush_location()::text, pg_current_xlog_insert_location()::text, \
                               pg_xlogfile_name(pg_current_xlog_flush_location())",
                wal_dir: "pg_xlog",
            }
        })
    }
}

/// `wal_segment_size` from `pg_settings`: in 8 kB blocks up to 10, in bytes from 11; `unit` says which.
pub fn segment_size_from_setting(setting: &str, unit: Option<&str>) -> Result<WalSegSize> {
    let n: u64 = setting
        .trim()
        .parse()
        .with_context(|| format!("wal_segment_size setting {setting:?} is not a number"))?;
    let factor = match unit.map(str::trim) {
        None | Some("") | Some("B") => 1,
        Some("8kB") => 8192,
        Some("kB") => 1024,
        Some("MB") => 1 << 20,
        Some(other) => bail!("wal_segment_size has an unknown unit {other:?}"),
    };
    Ok(WalSegSize::new(n * factor)?)
}

/// What the sender learns once per connection.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub version_num: u32,
    pub system_identifier: u64,
    pub seg: WalSegSize,
    pub magic: u16,
    /// `data_directory`, when this role may read it.
    pub data_directory: Option<PathBuf>,
    pub dialect: Dialect,
}

/// Where WAL ends on the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Flushed to disk: the sender never ships beyond it.
    pub flush: Lsn,
    /// Inserted (reserved by a backend; maybe not yet written or flushed): while it is ahead of `flush`, a flush is coming.
    pub insert: Lsn,
    pub timeline: TimelineId,
}

/// `application_name` of the sender's session unless its connection string sets one.
pub const APPLICATION_NAME: &str = "walship-sender";

/// A connection to the primary with the position query prepared.
pub struct Primary {
    client: Client,
    /// Cancelled when the connection ends (the server closed it, or it failed).
    closed: tokio_util::sync::CancellationToken,
    position: Statement,
    pub info: ServerInfo,
}

impl Primary {
    /// Connects as `conn` says (resolved the libpq way, see [`crate::conninfo`]) and reads the server's facts.
    pub async fn connect(conn: &Conn) -> Result<Primary> {
        let mut config = conn.config.clone();
        // How a DBA finds walship's session in pg_stat_activity (unless the connection string names one).
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        let (client, closed) = open_client(conn, config).await?;
        let info = server_info(&client).await?;
        let position = client
            .prepare(info.dialect.position_sql)
            .await
            .context("prepare the WAL position query")?;
        Ok(Primary {
            client,
            closed,
            position,
            info,
        })
    }

    /// The current flush and write positions and timeline (one cheap prepared query).
    pub async fn position(&self) -> Result<Position> {
        let row = self
            .client
            .query_one(&self.position, &[])
            .await
            .context("query the WAL flush position")?;
        let flush: Lsn = row.get::<_, String>(0).parse()?;
        let insert: Lsn = row.get::<_, String>(1).parse()?;
        let name: String = row.get(2);
        let timeline = name
            .get(0..8)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .filter(|t| *t > 0)
            .with_context(|| format!("cannot read a timeline from WAL file name {name:?}"))?;
        Ok(Position {
            flush,
            insert,
            timeline,
        })
    }

    /// Makes sure the physical replication slot `name` exists (created reserving WAL at once), so that the
    /// primary keeps every segment the receiver has not acknowledged. Needs PostgreSQL 11+
    /// (`pg_replication_slot_advance`).
    pub async fn ensure_slot(&self, name: &str) -> Result<()> {
        if self.info.version_num < 110_000 {
            return Err(Unfixable("--slot needs PostgreSQL 11 or later (pg_replication_slot_advance); keep WAL with wal_keep_segments instead".into()).into());
        }
        let row = self
            .client
            .query_opt(
                "SELECT slot_type, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .with_context(|| format!("look up replication slot {name}"))?;
        match row {
            Some(r) if r.get::<_, String>(0) != "physical" => {
                Err(Unfixable(format!("replication slot {name} exists but is not a physical slot: drop it, or name another with --slot")).into())
            }
            Some(_) => Ok(()),
            None => {
                self.client
                    .execute(
                        "SELECT pg_create_physical_replication_slot($1, true)",
                        &[&name],
                    )
                    .await
                    .with_context(|| format!("create physical replication slot {name}"))?;
                tracing::info!(
                    slot = name,
                    "created a physical replication slot to keep WAL until walship has it"
                );
                Ok(())
            }
        }
    }

    /// Moves the slot to `lsn` (what the receiver made durable), releasing older WAL.
    pub async fn advance_slot(&self, name: &str, lsn: Lsn) -> Result<()> {
        self.client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&name, &lsn.to_string()],
            )
            .await
            .with_context(|| format!("advance replication slot {name} to {lsn}"))?;
        Ok(())
    }

    /// The primary's `pg_stat_replication` row of the walsender named `name` (the newest): how it counts it
    /// for synchronous replication, and its `flush_lag` in milliseconds (-1 when none is shown).
    pub async fn replication_view(&self, name: &str) -> Result<(SyncState, i64)> {
        let row = self
            .client
            .query_opt(
                "SELECT sync_state, \
                        coalesce((extract(epoch FROM flush_lag) * 1000)::bigint, -1) \
                 FROM pg_stat_replication WHERE application_name = $1 ORDER BY backend_start DESC LIMIT 1",
                &[&name],
            )
            .await
            .context("read pg_stat_replication")?;
        Ok(row.map_or((SyncState::Async, -1), |r| {
            let state: Option<String> = r.get(0);
            (SyncState::from_pg(state.as_deref().unwrap_or("")), r.get(1))
        }))
    }

    /// The session, for `check`'s own questions.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Resolves when the connection has ended (cancellation safe).
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }
}

/// The first column of the first row of `sql` (simple protocol), as text.
pub(crate) async fn scalar(client: &Client, sql: &str) -> Result<String> {
    for msg in client
        .simple_query(sql)
        .await
        .with_context(|| format!("run {sql}"))?
    {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = msg {
            return row
                .get(0)
                .map(str::to_owned)
                .with_context(|| format!("{sql} returned NULL"));
        }
    }
    bail!("{sql} returned no row")
}

/// Whether a failure to connect or to read the server's facts is one that retrying cannot fix (wrong
/// password, no `pg_hba.conf` entry, a missing database or role, missing privileges), with what to do.
pub fn fatal_cause(e: &anyhow::Error) -> Option<&'static str> {
    use tokio_postgres::error::SqlState;
    // the primary's TLS certificate refused (sslmode=verify-ca/verify-full), or no TLS where it is required
    for cause in e.chain() {
        let tls = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(_)) = tls {
            return Some(
                "the primary's TLS certificate was not accepted: check sslrootcert (the CA that signed it) and, \
                 with sslmode=verify-full, that host names a name the certificate carries",
            );
        }
        if cause.to_string().contains("server does not support TLS") {
            return Some(
                "the primary does not offer TLS but sslmode requires it: set ssl = on in its postgresql.conf, \
                 or use sslmode=prefer",
            );
        }
    }
    let code = e
        .chain()
        .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| e.code())?;
    Some(if *code == SqlState::INVALID_PASSWORD {
        "authentication failed: check the password (--pgconn, PGPASSWORD or the password file) and the role"
    } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        "PostgreSQL refused this role or host: check pg_hba.conf on the primary and that the role exists and may log in"
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        "the database in --pgconn does not exist: connect to an existing one (dbname=postgres)"
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        "the role lacks a privilege walship needs: use a superuser, or grant pg_monitor and pg_read_all_settings (and EXECUTE on pg_replication_slot_advance with --slot)"
    } else {
        return None;
    })
}

/// A client connected as `conn` says, in plain text or TLS; its connection runs as a task of its own, which
/// cancels the token it returns when the connection ends.
async fn open_client(
    conn: &Conn,
    config: tokio_postgres::Config,
) -> Result<(Client, tokio_util::sync::CancellationToken)> {
    let what = || format!("connect to PostgreSQL ({})", conn.describe());
    let closed = tokio_util::sync::CancellationToken::new();
    let client = match &conn.tls {
        None => {
            let (client, connection) = config.connect(NoTls).await.with_context(what)?;
            tokio::spawn(watch_connection(connection, closed.clone()));
            client
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
            let (client, connection) = config.connect(tls).await.with_context(what)?;
            tokio::spawn(watch_connection(connection, closed.clone()));
            client
        }
    };
    Ok((client, closed))
}

async fn watch_connection<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(
    connection: F,
    closed: tokio_util::sync::CancellationToken,
) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %e, "PostgreSQL connection closed");
    }
    closed.cancel();
}

/// The facts walship needs of a primary (not a standby: that is unfixable by reconnecting).
async fn server_info(client: &Client) -> Result<ServerInfo> {
    let version_num: u32 = scalar(client, "SHOW server_version_num")
        .await?
        .parse()
        .context("server_version_num")?;
    let dialect = Dialect::for_version(version_num)?;
    if client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .context("SELECT pg_is_in_recovery()")?
        .get::<_, bool>(0)
    {
        return Err(Unfixable(
            "the server is in recovery (a standby): run walship-sender against the primary".into(),
        )
        .into());
    }
    let sysid: i64 = scalar(
        client,
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .await
    .context("read the system identifier (pg_control_system() needs superuser or pg_monitor)")?
    .parse()
    .context("system identifier")?;
    let row = client
        .query_one(
            "SELECT setting, unit FROM pg_settings WHERE name = 'wal_segment_size'",
            &[],
        )
        .await
        .context("read wal_segment_size")?;
    let seg = segment_size_from_setting(row.get(0), row.get(1))?;
    let data_directory = client
        .query_opt(
            "SELECT setting FROM pg_settings WHERE name = 'data_directory'",
            &[],
        )
        .await
        .context("read data_directory")?
        .and_then(|r| r.get::<_, Option<String>>(0))
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let magic = page_magic_for_version(version_num).context("page magic")?;
    Ok(ServerInfo {
        version_num,
        system_identifier: sysid as u64,
        seg,
        magic,
        data_directory,
        dialect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects() {
        let d96 = Dialect::for_version(90624).unwrap();
        assert_eq!(d96.wal_dir, "pg_xlog");
        assert!(d96
            .position_sql
            .contains("pg_current_xlog_flush_location()"));
        assert!(d96
            .position_sql
            .contains("pg_current_xlog_insert_location()"));
        assert!(d96.position_sql.contains("pg_xlogfile_name("));
        assert!(!d96.position_sql.contains("_wal_"));
        for v in [100020, 110022, 150018, 180004] {
            let d = Dialect::for_version(v).unwrap();
            assert_eq!(d.wal_dir, "pg_wal");
            assert!(d.position_sql.contains("pg_current_wal_flush_lsn()"));
            assert!(d.position_sql.contains("pg_walfile_name("));
        }
        assert!(Dialect::for_version(90500).is_err());
        assert!(Dialect::for_version(190000).is_err());
    }

    #[test]
    fn segment_size_units() {
        // PostgreSQL 10 reports 8 kB blocks, 11+ bytes
        assert_eq!(
            segment_size_from_setting("2048", Some("8kB"))
                .unwrap()
                .bytes(),
            16 << 20
        );
        assert_eq!(
            segment_size_from_setting("16777216", Some("B"))
                .unwrap()
                .bytes(),
            16 << 20
        );
        assert_eq!(
            segment_size_from_setting("1048576", None).unwrap().bytes(),
            1 << 20
        );
        assert!(segment_size_from_setting("3", Some("B")).is_err());
        assert!(segment_size_from_setting("x", Some("B")).is_err());
        assert!(segment_size_from_setting("1", Some("GB")).is_err());
    }
}
