//! A session under injected faults (failpoints are process-wide, so these tests live in a binary of their own
//! and hold `FailScenario`, which runs them one at a time).

mod common;

use std::time::{Duration, Instant};

use common::client::*;
use common::{assert_partial, wal, SEG};
use futures::SinkExt;
use walship_protocol::Lsn;

/// Bytes the kernel still holds for `c`'s peer (sent but not acknowledged by its TCP, or not sent yet): the
/// `tx_queue` column of `/proc/net/tcp` for the connection's local address.
fn unsent(c: &Client) -> usize {
    let local = c.get_ref().get_ref().0.local_addr().unwrap();
    let std::net::SocketAddr::V4(v4) = local else {
        panic!("an IPv4 connection was made: {local}")
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        .unwrap_or_else(|| panic!("{want} ({local}) is not in /proc/net/tcp"));
    let queues = line.split_whitespace().nth(4).unwrap();
    let tx = queues.split(':').next().unwrap();
    usize::from_str_radix(tx, 16).unwrap()
}

/// The primary's host dies while the receiver is busy: the sender's last messages are in the receiver's
/// socket buffer, and its connection is reset. The receiver's next acknowledgement fails; what the sender sent
/// before is still archived (it may be the newest WAL anywhere), made durable, never acknowledged. Before, the
/// failed acknowledgement ended the session and dropped it: the host-death bench lost acknowledged commits
/// that had reached the standby host.
#[tokio::test]
async fn wal_already_received_from_a_sender_that_died_is_archived() {
    let scenario = fail::FailScenario::setup();
    let r = Receiver::start().await;
    let (mut c, _) = r.session(7).await;
    let bytes = wal(1, SEG, 48 * 1024);
    let piece = 8192;
    c.send(wal_message(SEG, &bytes[..piece])).await.unwrap();
    ack_until(&mut c, SEG + piece as u64, None).await;

    // the next message comes alone: the session appends it and, on its own task, fsyncs it — and the fsync
    // hangs (a busy disk) until the sender is gone: the session reads nothing meanwhile
    fail::cfg("session-live-sync", "pause").unwrap();
    c.send(wal_message(SEG + piece as u64, &bytes[piece..2 * piece]))
        .await
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !std::fs::read(r.partial(1)).is_ok_and(|f| f.starts_with(&bytes[..2 * piece])) {
        assert!(
            Instant::now() < deadline,
            "the receiver did not append the second message"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // (little enough for the socket buffers: the receiver reads none of it before the reset)
    for at in (2 * piece..bytes.len()).step_by(piece) {
        let msg = wal_message(SEG + at as u64, &bytes[at..at + piece]);
        tokio::time::timeout(DEADLINE, c.send(msg))
            .await
            .expect("the socket buffers take the WAL")
            .unwrap();
    }
    tokio::time::timeout(DEADLINE, c.send(keepalive(SEG + bytes.len() as u64)))
        .await
        .expect("the socket buffers take the keepalive")
        .unwrap();
    // everything is in the receiver's socket buffer, then the sender's host dies: a reset, not a close
    let deadline = Instant::now() + DEADLINE;
    while unsent(&c) > 0 {
        assert!(
            Instant::now() < deadline,
            "the receiver's host did not take the WAL"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SO_LINGER 0: the close resets the connection (no thread blocks on it)
    #[allow(deprecated)]
    c.get_ref()
        .get_ref()
        .0
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    // the reset has arrived (the kernel answers nothing else): the fsync completes, the acknowledgement fails
    fail::remove("session-live-sync");

    // the receiver archives all of it, confirmed as the last keepalive said
    let end = Lsn(SEG + bytes.len() as u64);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let p = walship_receiver::archive::read_positions(&r.archive);
        if p.is_some_and(|p| p.durable == end && p.confirmed == end) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the WAL in the receiver's socket buffer was not archived: walship.position says {p:?}, \
             expected {end} durable and confirmed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_partial(&r.partial(1), &bytes);
    // and the next sender resumes after it
    let deadline = Instant::now() + DEADLINE;
    let resume = loop {
        match r.try_session(7).await {
            Ok((_c, resume)) => break resume,
            Err((code, reason)) => assert!(
                Instant::now() < deadline,
                "the next session was refused: {code:?}: {reason}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(resume, vec![(1, end)]);
    r.stop().await;
    scenario.teardown();
}
