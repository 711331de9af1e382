//! walship's test harness: real PostgreSQL clusters, the walship daemons as child processes, and helpers
//! that compare an archive with a primary's `pg_wal`.
//!
//! In the spirit of neon's `wal_craft`: binaries are found (or the test fails loudly with the fix), every
//! test gets its own temp directory and `initdb`, servers listen on a Unix socket only, everything is stopped
//! on drop, and logs are printed when a test fails. When the tests run as root, servers and walship daemons
//! run as the `postgres` user, as in production, where both run as the database's OS user.

pub mod archive;
pub mod azurite;
pub mod cluster;
pub mod daemon;
pub mod env;
pub mod ledger;
pub mod metrics;
pub mod pgsource;
pub mod proxy;
pub mod s3;
pub mod scenario;
pub mod versions;
pub mod wire;

use std::time::{Duration, Instant};

pub use cluster::{Cluster, InitOptions};
pub use daemon::{Daemon, Walship};
pub use env::TestDir;

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`. The waiting between polls is
/// an interval tick, not synchronisation: the condition is what the test waits for.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

/// A tiny deterministic generator for random moments in tests (print the seed, so a failure can be replayed).
pub struct Lcg(pub u64);

impl Lcg {
    /// Seeded from the clock.
    pub fn from_clock() -> Lcg {
        Lcg(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1))
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}
