//! A sender with a valid certificate claiming a new timeline (issue 19, point 4): a new timeline is accepted
//! only with a history file whose branch point the archive holds. A claim of timeline 2 that branches beyond
//! the archive's WAL, names no switch from the archive's timeline, or comes without any history file is
//! refused; the archive keeps no trace of it, and a legitimate timeline 2 is accepted afterwards.

use std::path::Path;

use futures::{SinkExt, StreamExt};
use walship_protocol::message::{Hello, Wal};
use walship_protocol::wal::{page_magic_for_version, PageExpectation};
use walship_protocol::walker::WalBuilder;
use walship_protocol::{Lsn, ReceiverMessage, SenderMessage, TimelineId, WalSegSize};
use walship_sender::link::{Rx, Tx};
use walship_tests::archive::snapshot;
use walship_tests::cluster::WAIT;
use walship_tests::{wait_for, TestDir, Walship};

const SYSID: u64 = 7_300_000_000_000_000_002;
const PG: u32 = 150_004;

fn seg() -> WalSegSize {
    WalSegSize::DEFAULT
}

/// Valid WAL of `timeline` from the start of segment `segno`: `n` records of 1000 bytes.
fn wal(timeline: TimelineId, segno: u64, n: usize) -> (Lsn, Vec<u8>) {
    let exp = PageExpectation {
        magic: page_magic_for_version(PG).unwrap(),
        system_identifier: SYSID,
        seg_size: seg(),
        timeline,
    };
    let start = seg().segment_start(segno);
    let mut b = WalBuilder::new(exp, start);
    for _ in 0..n {
        b.record(1000, 10, 0);
    }
    (start, b.bytes)
}

/// A session for `timeline`, or the receiver's answer instead of `Welcome`.
async fn open(port: u16, certs: &Path, timeline: TimelineId) -> Result<(Rx, Tx), String> {
    let hello = Hello {
        version_min: 3,
        version_max: 3,
        system_identifier: SYSID,
        timeline,
        wal_segment_size: seg().bytes(),
        pg_version_num: PG,
        sender_name: "timeline-test".into(),
    };
    walship_tests::wire::open(port, certs, hello)
        .await
        .map(|s| (s.rx, s.tx))
}

/// Sends `messages`, then a keepalive confirming `flush`; returns the receiver's Error, or None once it
/// acknowledged `flush` as durable and confirmed.
async fn ship(
    rx: &mut Rx,
    tx: &mut Tx,
    timeline: TimelineId,
    messages: Vec<SenderMessage>,
    flush: Lsn,
) -> Option<String> {
    for m in messages {
        if tx.send(m).await.is_err() {
            break;
        }
    }
    let _ = tx
        .send(SenderMessage::Keepalive {
            primary_flush_lsn: flush,
            timeline,
            sent_at_unix_micros: 0,
        })
        .await;
    let wait = async {
        loop {
            match rx.next().await {
                Some(Ok(ReceiverMessage::Ack {
                    durable_lsn,
                    confirmed_lsn,
                    ..
                })) => {
                    if durable_lsn >= flush && confirmed_lsn.is_some_and(|c| c >= flush) {
                        return None;
                    }
                }
                Some(Ok(ReceiverMessage::Error { reason })) => return Some(reason),
                None => return Some("connection closed".into()),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait).await.expect("an answer")
}

fn history(parent: TimelineId, switchpoint: Lsn) -> SenderMessage {
    SenderMessage::History {
        timeline: 2,
        content: format!("{parent}\t{switchpoint}\tno recovery target specified\n")
            .into_bytes()
            .into(),
    }
}

fn wal_message(timeline: TimelineId, start: Lsn, bytes: Vec<u8>) -> SenderMessage {
    SenderMessage::Wal(Wal {
        timeline,
        start_lsn: start,
        bytes: bytes.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_timeline_needs_a_history_that_branches_from_the_archive() {
    let dir = TestDir::new("rogue-timeline");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    let archive = dir.path().join("archive");
    let receiver = walship.receiver(&dir, &archive, &certs, 0);

    // timeline 1: 100 records from segment 1, confirmed
    let (start, bytes) = wal(1, 1, 100);
    let end = Lsn(start.0 + bytes.len() as u64);
    let (mut rx, mut tx) = wait_for("a session", WAIT, || async {
        open(receiver.port, &certs, 1).await.ok()
    })
    .await;
    assert_eq!(
        ship(&mut rx, &mut tx, 1, vec![wal_message(1, start, bytes)], end).await,
        None
    );
    drop((rx, tx));
    let before = snapshot(&archive);

    let (t2_start, t2_bytes) = wal(2, 1, 10);
    let t2_end = Lsn(t2_start.0 + t2_bytes.len() as u64);
    let claims: Vec<(&str, Vec<SenderMessage>)> = vec![
        (
            "beyond the archive's WAL",
            vec![
                history(1, Lsn(end.0 + (1 << 20))),
                wal_message(2, t2_start, t2_bytes.clone()),
            ],
        ),
        (
            "from a timeline the archive does not hold",
            vec![
                history(7, Lsn(start.0 + 100)),
                wal_message(2, t2_start, t2_bytes.clone()),
            ],
        ),
        (
            "without a history file",
            vec![wal_message(2, t2_start, t2_bytes.clone())],
        ),
    ];
    for (what, messages) in claims {
        let (mut rx, mut tx) = wait_for("a session", WAIT, || async {
            open(receiver.port, &certs, 2).await.ok()
        })
        .await;
        let refused = ship(&mut rx, &mut tx, 2, messages, t2_end).await;
        println!("timeline 2 {what}: {refused:?}");
        assert!(refused.is_some(), "timeline 2 {what} must be refused");
        drop((rx, tx));
        let after = snapshot(&archive);
        let wal_of = |s: &std::collections::BTreeMap<String, Vec<u8>>| {
            s.iter()
                .filter(|(n, _)| !n.starts_with("walship."))
                .map(|(n, b)| (n.clone(), b.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            wal_of(&after),
            wal_of(&before),
            "timeline 2 {what} left a trace in the archive"
        );
    }

    // a timeline 2 that branched from WAL the archive holds is accepted
    let (mut rx, mut tx) = wait_for("a session", WAIT, || async {
        open(receiver.port, &certs, 2).await.ok()
    })
    .await;
    let accepted = ship(
        &mut rx,
        &mut tx,
        2,
        vec![
            history(1, Lsn(end.0 - 500)),
            wal_message(2, t2_start, t2_bytes),
        ],
        t2_end,
    )
    .await;
    assert_eq!(accepted, None, "a legitimate timeline 2 is accepted");
    assert!(archive.join("00000002.history").exists());
}
