//! Ship on write, confirm on flush (protocol 3), against a real receiver: a sender speaking the protocol
//! directly feeds it WAL beyond the primary's flush position (provisional), confirms part of it, and after a
//! reconnection resends a tail that differs, as a primary whose operating system lost unflushed WAL and then
//! wrote other WAL at the same positions would. The receiver replaces the provisional bytes and says so; a
//! difference in confirmed bytes is refused and changes nothing.

use std::path::Path;

use futures::{SinkExt, StreamExt};
use walship_protocol::message::{Hello, Wal};
use walship_protocol::wal::{page_magic_for_version, PageExpectation};
use walship_protocol::walker::WalBuilder;
use walship_protocol::{Lsn, ReceiverMessage, SenderMessage, WalSegSize};
use walship_tests::cluster::WAIT;
use walship_tests::{wait_for, TestDir, Walship};

const SYSID: u64 = 7_300_000_000_000_000_001;
const PG: u32 = 150_004;

fn exp() -> PageExpectation {
    PageExpectation {
        magic: page_magic_for_version(PG).unwrap(),
        system_identifier: SYSID,
        seg_size: WalSegSize::DEFAULT,
        timeline: 1,
    }
}

/// Valid WAL from the start of segment 1: records of `sizes`.
fn wal(sizes: &[usize]) -> Vec<u8> {
    let mut b = WalBuilder::new(exp(), WalSegSize::DEFAULT.segment_start(1));
    for n in sizes {
        b.record(*n, 10, 0);
    }
    b.bytes
}

/// A session of a protocol-3 sender: Hello, and the Welcome's resume point of timeline 1.
struct Session {
    rx: walship_sender::link::Rx,
    tx: walship_sender::link::Tx,
    resume: Option<Lsn>,
}

impl Session {
    /// A session, or why the receiver did not accept one now (e.g. `Busy` while the previous session hands the
    /// archive over): the caller retries.
    async fn open(port: u16, certs: &Path) -> Result<Session, String> {
        let hello = Hello {
            version_min: 3,
            version_max: 3,
            system_identifier: SYSID,
            timeline: 1,
            wal_segment_size: WalSegSize::DEFAULT.bytes(),
            pg_version_num: PG,
            sender_name: "provisional-test".into(),
        };
        let s = walship_tests::wire::open(port, certs, hello).await?;
        assert_eq!(s.protocol_version, 3);
        let resume = s.resume.iter().find(|(t, _)| *t == 1).map(|(_, l)| *l);
        Ok(Session {
            rx: s.rx,
            tx: s.tx,
            resume,
        })
    }

    async fn wal(&mut self, bytes: &[u8], from: Lsn, to: Lsn) {
        let base = WalSegSize::DEFAULT.segment_start(1).0;
        let part = bytes[(from.0 - base) as usize..(to.0 - base) as usize].to_vec();
        self.tx
            .send(SenderMessage::Wal(Wal {
                timeline: 1,
                start_lsn: from,
                bytes: part.into(),
            }))
            .await
            .unwrap();
    }

    async fn confirm(&mut self, flush: Lsn) {
        self.tx
            .send(SenderMessage::Keepalive {
                primary_flush_lsn: flush,
                timeline: 1,
                sent_at_unix_micros: 0,
            })
            .await
            .unwrap();
    }

    /// Waits for an Ack with at least `durable` and `confirmed`; returns the receiver's Error if one comes.
    async fn acked(&mut self, durable: Lsn, confirmed: Lsn) -> Result<(), String> {
        let wait = async {
            loop {
                match self.rx.next().await {
                    Some(Ok(ReceiverMessage::Ack {
                        durable_lsn,
                        confirmed_lsn,
                        ..
                    })) => {
                        let c =
                            confirmed_lsn.expect("protocol 3 acks carry the confirmed position");
                        assert!(
                            c <= durable_lsn,
                            "confirmed {c} beyond durable {durable_lsn}"
                        );
                        if durable_lsn >= durable && c >= confirmed {
                            return Ok(());
                        }
                    }
                    Some(Ok(ReceiverMessage::Error { reason })) => return Err(reason),
                    other => panic!("unexpected {other:?}"),
                }
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .expect("an answer from the receiver")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_divergent_provisional_tail_is_replaced_and_confirmed_bytes_never_change() {
    let dir = TestDir::new("provisional");
    let walship = Walship::install(&dir);
    let certs = walship.certs(&dir, "certs");
    let archive = dir.path().join("archive");
    let receiver = walship.receiver(&dir, &archive, &certs, 0);
    let at = |off: u64| Lsn(WalSegSize::DEFAULT.segment_start(1).0 + off);
    let partial = archive.join("000000010000000000000001.partial");

    // the primary's WAL before its OS crashed, and after: the same records up to the 12th, then others
    let common: Vec<usize> = [
        120, 3000, 50, 9000, 400, 20_000, 64, 64, 5000, 700, 300, 8000,
    ]
    .to_vec();
    let before = wal(&[common.clone(), vec![10_000, 200, 30_000, 100, 4000]].concat());
    let after = wal(&[common.clone(), vec![333, 25_000, 90, 6000, 12_000, 777]].concat());
    let first_difference = before.iter().zip(&after).position(|(a, b)| a != b).unwrap() as u64;
    let shipped = 75_000u64;
    let flushed = 40_000u64;
    assert!(flushed < first_difference && first_difference < shipped);

    // session 1: WAL shipped as written, the primary confirms part of it
    let mut s = wait_for("the receiver to accept a session", WAIT, || async {
        Session::open(receiver.port, &certs).await.ok()
    })
    .await;
    assert_eq!(s.resume, None);
    s.wal(&before, at(0), at(shipped)).await;
    s.confirm(at(flushed)).await;
    s.acked(at(shipped), at(flushed)).await.unwrap();
    drop(s);

    // session 2: resumes at the confirmed end; the resent WAL differs from the provisional tail
    let mut s = wait_for("the receiver to accept a new session", WAIT, || async {
        let s = Session::open(receiver.port, &certs).await.ok()?;
        (s.resume == Some(at(flushed))).then_some(s)
    })
    .await;
    let upto = 90_000u64;
    s.wal(&after, at(flushed), at(upto)).await;
    s.confirm(at(upto)).await;
    s.acked(at(upto), at(upto)).await.unwrap();
    let log = receiver.log_text();
    assert!(log.contains("replacing provisional WAL"), "{log}");
    assert!(log.contains(&at(first_difference).to_string()), "{log}");
    assert_partial(&partial, &after[..upto as usize]);
    drop(s);

    // session 3: a resend that differs where the archive holds confirmed WAL is refused
    let mut s = wait_for("the receiver to accept a new session", WAIT, || async {
        let s = Session::open(receiver.port, &certs).await.ok()?;
        (s.resume == Some(at(upto))).then_some(s)
    })
    .await;
    let mut other = after.clone();
    other[85_000] ^= 0x40;
    s.wal(&other, at(80_000), at(91_000)).await;
    let reason = s.acked(at(91_000), at(0)).await.unwrap_err();
    assert!(reason.contains("confirmed"), "{reason}");
    assert_partial(&partial, &after[..upto as usize]);
}

/// The preallocated partial holds `wal`, then zeros to the segment's end.
fn assert_partial(partial: &std::path::Path, wal: &[u8]) {
    let held = std::fs::read(partial).unwrap();
    assert_eq!(
        held.len() as u64,
        WalSegSize::DEFAULT.as_u64(),
        "a preallocated partial"
    );
    assert!(held[..wal.len()] == wal[..], "the partial's WAL differs");
    assert!(
        held[wal.len()..].iter().all(|b| *b == 0),
        "bytes after the partial's WAL"
    );
}
