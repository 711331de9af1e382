//! The ledger workload: numbered rows inserted in autocommit; after each acknowledged commit the id and the
//! primary's flush LSN read right after it are recorded. After a failover the check is exact: every row whose
//! recorded LSN is at or below what the archive held must be on the promoted standby.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use walship_protocol::Lsn;

use crate::Cluster;

/// A running ledger client.
pub struct Ledger {
    rows: Arc<Mutex<Vec<(i64, Lsn)>>>,
    task: JoinHandle<()>,
}

impl Ledger {
    /// Creates the table and starts inserting. Stops by itself when the primary goes away.
    pub async fn start(primary: &Cluster) -> Ledger {
        let client = primary.connect().await;
        client.batch_execute("CREATE TABLE IF NOT EXISTS ledger (id bigint PRIMARY KEY, at timestamptz DEFAULT now())").await.expect("create ledger");
        let flush_sql = if primary.major >= 10 {
            "SELECT pg_current_wal_flush_lsn()::text"
        } else {
            "SELECT pg_current_xlog_flush_location()::text"
        };
        let rows = Arc::new(Mutex::new(Vec::new()));
        let r = rows.clone();
        let task = tokio::spawn(async move { run(client, flush_sql, r).await });
        Ledger { rows, task }
    }

    /// The acknowledged rows so far.
    pub fn acknowledged(&self) -> Vec<(i64, Lsn)> {
        self.rows.lock().expect("ledger lock").clone()
    }

    /// Stops inserting (the primary stays up).
    pub async fn stop(self) -> Vec<(i64, Lsn)> {
        self.task.abort();
        let _ = self.task.await;
        self.rows.lock().expect("ledger lock").clone()
    }

    /// Waits until the client stopped (after the primary died).
    pub async fn finish(self) -> Vec<(i64, Lsn)> {
        let _ = self.task.await;
        self.rows.lock().expect("ledger lock").clone()
    }
}

async fn run(client: Client, flush_sql: &'static str, rows: Arc<Mutex<Vec<(i64, Lsn)>>>) {
    let Ok(insert) = client.prepare("INSERT INTO ledger (id) VALUES ($1)").await else {
        return;
    };
    let Ok(flush) = client.prepare(flush_sql).await else {
        return;
    };
    // after a crash and restart the ledger goes on where it stopped
    let Ok(first) = client
        .query_one("SELECT coalesce(max(id), 0) + 1 FROM ledger", &[])
        .await
    else {
        return;
    };
    let first: i64 = first.get(0);
    for id in first.. {
        if client.execute(&insert, &[&id]).await.is_err() {
            return;
        }
        // the commit is acknowledged; what the primary has flushed right after it:
        let Ok(row) = client.query_one(&flush, &[]).await else {
            return;
        };
        let Ok(lsn) = row.get::<_, String>(0).parse::<Lsn>() else {
            return;
        };
        rows.lock().expect("ledger lock").push((id, lsn));
    }
}

/// The outcome of the ledger check.
#[derive(Debug)]
pub struct Verdict {
    pub acknowledged: usize,
    pub covered: usize,
    pub present: usize,
    /// Covered rows (LSN ≤ archived end) that are missing: must be zero.
    pub missing_covered: Vec<i64>,
    /// Acknowledged rows beyond the archived end that did not survive.
    pub lost_beyond: usize,
}

impl Verdict {
    /// Fails unless every acknowledged row that `target` held (LSN at or before its end) is present.
    pub fn assert_none_missing(&self, target: &str) {
        assert!(
            self.missing_covered.is_empty(),
            "acknowledged rows {target} held are missing: {:?}",
            self.missing_covered
        );
    }
}

/// Compares the ledger with the ids present on the promoted standby. A standby without the ledger table is
/// a verdict too: every acknowledged row is missing (the check then says how many the archive covered).
pub async fn verdict(rows: &[(i64, Lsn)], archived_end: Lsn, promoted: &Client) -> Verdict {
    let present: BTreeSet<i64> = match promoted.query("SELECT id FROM ledger", &[]).await {
        Ok(found) => found.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            eprintln!(
                "the ledger table cannot be read on the promoted standby ({e}); the archive ends at {archived_end}, \
                 the first acknowledged row was at {:?}",
                rows.first().map(|(_, l)| l.to_string())
            );
            BTreeSet::new()
        }
    };
    let covered: Vec<i64> = rows
        .iter()
        .filter(|(_, l)| *l <= archived_end)
        .map(|(i, _)| *i)
        .collect();
    Verdict {
        acknowledged: rows.len(),
        covered: covered.len(),
        present: rows.iter().filter(|(i, _)| present.contains(i)).count(),
        missing_covered: covered
            .iter()
            .copied()
            .filter(|i| !present.contains(i))
            .collect(),
        lost_beyond: rows
            .iter()
            .filter(|(i, l)| *l > archived_end && !present.contains(i))
            .count(),
    }
}

/// (lost for certain, possibly lost) among `rows` for a target whose WAL ends at `end`. A commit's end is not
/// known to the client: it lies after the previous row's recorded flush position and at or before its own.
/// So a row is lost for certain when even the previous row's position is at or beyond `end`, and possibly
/// lost when its own is beyond it.
pub fn losses(rows: &[(i64, Lsn)], end: Lsn) -> (usize, usize) {
    let (mut certain, mut possible) = (0, 0);
    let mut prev = Lsn(0);
    for (_, lsn) in rows {
        certain += usize::from(prev >= end);
        possible += usize::from(*lsn > end);
        prev = *lsn;
    }
    (certain, possible)
}

/// The crash workload: the ledger plus `pgbench -c 2 -j 2` (for up to ten minutes), returned once the ledger
/// has acknowledged some rows.
pub async fn under_load(primary: &Cluster) -> (Ledger, std::process::Child) {
    let ledger = Ledger::start(primary).await;
    let bench = primary
        .pgbench(&["-c", "2", "-j", "2", "-T", "600", "-n"])
        .spawn()
        .expect("start pgbench");
    crate::wait_for("ledger rows", crate::cluster::WAIT, || async {
        (ledger.acknowledged().len() > 50).then_some(())
    })
    .await;
    (ledger, bench)
}
