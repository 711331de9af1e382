//! The version matrix: shipping and failover (archive recovery and standby mode) against a real server of
//! every supported major version, 10 to 18, plus non-default segment sizes. Servers are installed on demand
//! (tests/pg-install); WALSHIP_PG_VERSIONS=10,15 limits the run to some majors. Each case writes its row of
//! the summary table that .ci/run prints to target/tmp/walship-matrix/.

use std::path::PathBuf;
use std::time::Instant;

use walship_tests::scenario::{crash_and_fail_over, ship_and_compare, Mode};
use walship_tests::versions::{selected, server_bin};
use walship_tests::InitOptions;

fn rows_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("walship-matrix");
    std::fs::create_dir_all(&d).expect("create matrix summary dir");
    d
}

/// Writes FAIL for the case unless it finished.
struct Row {
    name: String,
    done: bool,
}

impl Drop for Row {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::write(
                rows_dir().join(format!("{}.row", self.name)),
                format!("{}\tFAIL\t-\t-\t-\t-\n", self.name),
            );
        }
    }
}

async fn case(name: &str, major: u32, segsize_mb: Option<u32>) {
    if !selected(major) {
        println!("{name}: not in WALSHIP_PG_VERSIONS");
        let _ = std::fs::write(
            rows_dir().join(format!("{name}.row")),
            format!("{name}\tnot selected\t-\t-\t-\t-\n"),
        );
        return;
    }
    let mut row = Row {
        name: name.to_owned(),
        done: false,
    };
    let started = Instant::now();
    let opts = InitOptions {
        bin: Some(server_bin(major)),
        wal_segsize_mb: segsize_mb,
        ..Default::default()
    };
    let shipped = ship_and_compare(name, &opts).await;
    let archive = crash_and_fail_over(&format!("{name}-archive"), &opts, Mode::Archive).await;
    let standby = crash_and_fail_over(&format!("{name}-standby"), &opts, Mode::Standby).await;
    let line = format!(
        "{name}\tPASS\t{} segments identical\tarchive recovery: {}/{} rows, {} lost, drained in {} ms\tstandby mode: {}/{} rows, {} lost, drained in {} ms\t{:.0} s\n",
        shipped.complete_segments,
        archive.present,
        archive.acknowledged,
        archive.lost_beyond,
        archive.drain_ms,
        standby.present,
        standby.acknowledged,
        standby.lost_beyond,
        standby.drain_ms,
        started.elapsed().as_secs_f64()
    );
    std::fs::write(rows_dir().join(format!("{name}.row")), &line).expect("write summary row");
    println!("{line}");
    row.done = true;
}

macro_rules! matrix {
    ($($name:ident => $major:expr, $seg:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                case(stringify!($name), $major, $seg).await;
            }
        )*
    };
}

matrix! {
    pg10 => 10, None;
    pg11 => 11, None;
    pg12 => 12, None;
    pg13 => 13, None;
    pg14 => 14, None;
    pg15 => 15, None;
    pg16 => 16, None;
    pg17 => 17, None;
    pg18 => 18, None;
    pg11_wal_segsize_1mb => 11, Some(1);
    pg17_wal_segsize_64mb => 17, Some(64);
}
