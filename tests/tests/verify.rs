//! `walship-receiver verify` on archives built by real PostgreSQL: a clean one (exit 0, its replayable range
//! ending where PostgreSQL's own reader, pg_waldump, finds the end of the WAL), and copies damaged on
//! purpose (a missing segment, a bit flip inside a record, a truncated partial, a history file whose branch
//! point lies past its parent's WAL), each found and named, nothing modified.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use walship_protocol::wal::segment_file_name;
use walship_protocol::walker::Walker;
use walship_protocol::Lsn;
use walship_tests::archive::{page_expectation, snapshot, wait_archived};
use walship_tests::cluster::run_ok;
use walship_tests::env::{as_db_user, chown_to_db_user};
use walship_tests::scenario::shipping;
use walship_tests::{InitOptions, Walship};

fn verify(walship: &Walship, archive: &Path) -> (Output, serde_json::Value) {
    let before = snapshot(archive);
    let out = as_db_user(
        Command::new(walship.path(Walship::RECEIVER))
            .args(["verify", "--json", "--archive"])
            .arg(archive),
    )
    .output()
    .expect("run verify");
    assert_eq!(
        snapshot(archive),
        before,
        "verify modified {}",
        archive.display()
    );
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

fn problems(json: &serde_json::Value) -> Vec<(String, String, Option<Lsn>)> {
    json["timelines"]
        .as_array()
        .expect("timelines")
        .iter()
        .flat_map(|t| t["problems"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            (
                p["kind"].as_str().unwrap_or_default().to_owned(),
                p["file"].as_str().unwrap_or_default().to_owned(),
                p["lsn"].as_str().and_then(|l| l.parse().ok()),
            )
        })
        .collect()
}

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an LSN: {v}"))
}

/// A copy of `from` at `to` (files only, as the archive is flat).
fn copy_archive(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("list").flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
    chown_to_db_user(to);
    for e in std::fs::read_dir(to).expect("list").flatten() {
        chown_to_db_user(&e.path());
    }
    to.to_owned()
}

/// Where PostgreSQL's own WAL reader finds the end of the archive's WAL from `from`: pg_waldump over the
/// complete segments and the partial (under its segment name), to its "invalid record" at the end.
fn pg_waldump_end(bin: &Path, archive: &Path, work: &Path, from: Lsn) -> Lsn {
    std::fs::create_dir_all(work).expect("mkdir");
    for e in std::fs::read_dir(archive).expect("list").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let target = name.strip_suffix(".partial").unwrap_or(&name);
        if target.len() == 24 && target.bytes().all(|b| b.is_ascii_hexdigit()) {
            std::fs::copy(e.path(), work.join(target)).expect("copy");
        }
    }
    let out = Command::new(bin.join("pg_waldump"))
        .arg("--quiet")
        .arg("--path")
        .arg(work)
        .args(["--timeline", "1", "--start"])
        .arg(from.to_string())
        .output()
        .expect("run pg_waldump");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // "error in WAL record at X/X: invalid record length at Y/Y: expected at least 24, got 0"
    let tail = err
        .rsplit_once(" at ")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("pg_waldump said: {err}"));
    tail.split(|c: char| c == ':' || c.is_whitespace())
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no end LSN in pg_waldump's {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_proves_a_real_archive_and_names_each_damage() {
    let opts = InitOptions {
        wal_segsize_mb: Some(1),
        ..Default::default()
    };
    let mut s = shipping("verify", &opts).await;
    let client = s.primary.connect().await;
    run_ok(&mut s.primary.pgbench(&["-i", "-s", "1", "-q"]));
    run_ok(
        &mut s
            .primary
            .pgbench(&["-c", "2", "-j", "2", "-t", "200", "-n"]),
    );
    s.primary.switch_wal(&client).await;
    client
        .batch_execute(
            "CREATE TABLE t AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 2000) g",
        )
        .await
        .expect("rows");
    let flushed = s.primary.flush_lsn(&client).await;
    wait_archived(&s.archive, s.seg, flushed).await;
    s.sender.stop_sender_of(&s.receiver);
    s.receiver.terminate(std::time::Duration::from_secs(10));
    let pristine = copy_archive(&s.archive, &s.dir.path().join("verify-pristine"));

    // clean: exit 0, one range on timeline 1, ending where pg_waldump ends
    let (out, json) = verify(&s.walship, &pristine);
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    assert!(problems(&json).is_empty(), "{json:#}");
    let t1 = &json["timelines"][0];
    assert_eq!(t1["timeline"], 1);
    let ranges = t1["replayable"].as_array().expect("ranges");
    assert_eq!(ranges.len(), 1, "{json:#}");
    let (from, to) = (lsn(&ranges[0]["from"]), lsn(&ranges[0]["to"]));
    assert!(
        to >= flushed,
        "the range ends at {to}, before the flushed {flushed}"
    );
    let bin = s.primary.bin.clone();
    let waldump_end = pg_waldump_end(&bin, &pristine, &s.dir.path().join("waldump"), from);
    assert_eq!(
        to, waldump_end,
        "verify and pg_waldump disagree on where the WAL ends"
    );
    assert_eq!(lsn(&t1["valid_end"]), to);
    // the text form says the same
    let text = as_db_user(
        Command::new(s.walship.path(Walship::RECEIVER))
            .args(["verify", "--archive"])
            .arg(&pristine),
    )
    .output()
    .expect("verify");
    let text = String::from_utf8_lossy(&text.stdout);
    println!("{text}");
    assert!(
        text.contains(&format!("recovers to any point up to {to}")) && text.contains("OK: "),
        "{text}"
    );

    // the segments, oldest to newest; the partial is the last
    let mut segments: Vec<String> = std::fs::read_dir(&pristine)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    segments.sort();
    assert!(segments.len() >= 4, "{segments:?}");

    // a missing segment: a gap named by its file
    let gap = copy_archive(&pristine, &s.dir.path().join("verify-gap"));
    let removed = &segments[segments.len() / 2];
    std::fs::remove_file(gap.join(removed)).expect("remove");
    let (out, json) = verify(&s.walship, &gap);
    assert_eq!(out.status.code(), Some(2), "{json:#}");
    let found = problems(&json);
    assert_eq!(found.len(), 1, "{json:#}");
    assert_eq!(
        (found[0].0.as_str(), found[0].1.as_str()),
        ("gap", removed.as_str())
    );
    assert_eq!(
        json["timelines"][0]["replayable"].as_array().map(Vec::len),
        Some(2)
    );

    // a bit flip inside a record of a complete segment: the record, its file and LSN
    let flipped = copy_archive(&pristine, &s.dir.path().join("verify-flip"));
    let victim_file = &segments[1];
    let segno = s
        .seg
        .segno(Lsn(u64::from_str_radix(&victim_file[8..16], 16).unwrap()
            * 0x1_0000_0000
            + u64::from_str_radix(&victim_file[16..24], 16).unwrap()
                * s.seg.as_u64()));
    assert_eq!(&segment_file_name(1, segno, s.seg), victim_file);
    let start = s.seg.segment_start(segno);
    let mut bytes = std::fs::read(flipped.join(victim_file)).expect("read");
    let exp = page_expectation(&s.archive, s.seg, 1).expect("expectation");
    let mut walker = Walker::resync(exp, &bytes, start).expect("a record");
    let mut victim = None;
    walker.walk(&bytes, start, |r| {
        let off = r.start.0 % 8192;
        if victim.is_none()
            && r.tot_len > 100
            && off > 64
            && off < 8000
            && r.start.0 > start.0 + 200_000
        {
            victim = Some(*r);
        }
    });
    let victim = victim.expect("a record to damage");
    bytes[(victim.start.0 - start.0 + 60) as usize] ^= 0x01;
    std::fs::write(flipped.join(victim_file), &bytes).expect("write");
    let (out, json) = verify(&s.walship, &flipped);
    assert_eq!(out.status.code(), Some(2), "{json:#}");
    let found = problems(&json);
    assert_eq!(found.len(), 1, "{json:#}");
    assert_eq!(
        found[0],
        (
            "damaged_record".to_owned(),
            victim_file.clone(),
            Some(victim.start)
        ),
        "{json:#}"
    );

    // a truncated partial: less WAL than the receiver acknowledged as durable
    let truncated = copy_archive(&pristine, &s.dir.path().join("verify-truncated"));
    let partial = std::fs::read_dir(&truncated)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".partial"))
        .expect("a partial");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&partial)
        .expect("open");
    f.set_len(8192).expect("truncate");
    drop(f);
    let (out, json) = verify(&s.walship, &truncated);
    assert_eq!(out.status.code(), Some(2), "{json:#}");
    let found = problems(&json);
    assert!(
        found
            .iter()
            .any(|p| p.0 == "truncated_partial" && partial.to_string_lossy().ends_with(&p.1)),
        "{json:#}"
    );

    // a history file whose branch point lies past the parent's WAL
    let branch = copy_archive(&pristine, &s.dir.path().join("verify-branch"));
    let past = Lsn(to.0 + 64 * s.seg.as_u64());
    std::fs::write(
        branch.join("00000002.history"),
        format!("1\t{past}\tno recovery target specified\n"),
    )
    .expect("history");
    chown_to_db_user(&branch.join("00000002.history"));
    let (out, json) = verify(&s.walship, &branch);
    assert_eq!(out.status.code(), Some(2), "{json:#}");
    let found = problems(&json);
    assert_eq!(
        found,
        vec![(
            "branch".to_owned(),
            "00000002.history".to_owned(),
            Some(past)
        )],
        "{json:#}"
    );
}
