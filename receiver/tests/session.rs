//! The receiver's sessions in-process, the way mini-redis tests its server: the real daemon ([`run`]) on a
//! port-0 listener with real TLS, and a client that speaks the wire protocol by hand. What a sender does
//! wrong or a network does to it is played here message by message; the end-to-end tests with PostgreSQL
//! stay beside these.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::client::*;
use common::{assert_partial, wal, SEG};
use futures::SinkExt;
use walship_protocol::message::CompressedWal;
use walship_protocol::{Lsn, ReceiverMessage, RefuseCode, SenderMessage};

#[tokio::test]
async fn wal_is_acknowledged_once_durable_and_the_archive_holds_the_same_bytes() {
    let r = Receiver::start().await;
    let (mut c, resume) = r.session(7).await;
    assert!(
        resume.is_empty(),
        "a new archive resumes nowhere: {resume:?}"
    );
    let bytes = wal(1, SEG, 64 * 1024);
    c.send(wal_message(SEG, &bytes[..40_000])).await.unwrap();
    c.send(wal_message(SEG + 40_000, &bytes[40_000..]))
        .await
        .unwrap();
    c.send(keepalive(SEG + 40_000)).await.unwrap();
    let (durable, confirmed) =
        ack_until(&mut c, SEG + bytes.len() as u64, Some(SEG + 40_000)).await;
    assert_eq!(durable, Lsn(SEG + bytes.len() as u64));
    assert_eq!(
        confirmed,
        Some(Lsn(SEG + 40_000)),
        "confirmed stops at the primary's flush position"
    );
    // acknowledged means on disk: the partial holds exactly what was sent
    assert_partial(&r.partial(1), &bytes);
    drop(c);
    r.stop().await;
}

/// A confirmation is acknowledged for what is durable: never past the durable end, never past the WAL sent
/// before the flush position was reported (DESIGN.md §1), never backwards, and only once the archive records
/// it (walship.position): a receiver killed right after the acknowledgement resumes no lower than it said.
/// (An acknowledgement sent before the record made the crash-point test see "lost acknowledged WAL".)
#[tokio::test]
async fn a_confirmation_is_acknowledged_for_what_is_durable_and_never_past_it() {
    let r = Receiver::start().await;
    let (mut c, _) = r.session(7).await;
    let bytes = wal(1, SEG, 64 * 1024);
    c.send(wal_message(SEG, &bytes[..40_000])).await.unwrap();
    ack_until(&mut c, SEG + 40_000, None).await;
    // the primary flushed past what was sent: confirmed stops at what was sent (and durable)
    c.send(keepalive(SEG + 60_000)).await.unwrap();
    let (durable, confirmed) = ack_until(&mut c, SEG + 40_000, Some(SEG + 40_000)).await;
    assert_eq!(durable, Lsn(SEG + 40_000));
    assert_eq!(confirmed, Some(Lsn(SEG + 40_000)), "never past durable");
    // the rest arrives: WAL sent after a flush report is confirmed only by the next report
    c.send(wal_message(SEG + 40_000, &bytes[40_000..]))
        .await
        .unwrap();
    ack_until(&mut c, SEG + bytes.len() as u64, None).await;
    c.send(keepalive(SEG + 50_000)).await.unwrap();
    loop {
        match next(&mut c).await {
            Some(ReceiverMessage::Ack {
                durable_lsn,
                confirmed_lsn: Some(confirmed),
                ..
            }) => {
                assert!(confirmed <= durable_lsn, "{confirmed} past {durable_lsn}");
                assert!(confirmed >= Lsn(SEG + 40_000), "confirmed went back");
                assert!(
                    confirmed <= Lsn(SEG + 50_000),
                    "{confirmed} confirmed unreported WAL"
                );
                // recorded before it was acknowledged
                let recorded = walship_receiver::archive::read_positions(&r.archive).unwrap();
                assert!(
                    recorded.durable >= durable_lsn && recorded.confirmed >= confirmed,
                    "acknowledged {durable_lsn} / {confirmed}, walship.position says {recorded:?}"
                );
                if confirmed == Lsn(SEG + 50_000) {
                    break;
                }
            }
            other => panic!("expected an Ack with a confirmed position, got {other:?}"),
        }
    }
    drop(c);
    r.stop().await;
}

/// The two write paths of a session in turn: a message that comes alone is written, synced and acknowledged by
/// the connection task (the live path), a burst that arrives in one write goes to the writer and its syncer.
/// Whichever takes what, the archive holds the bytes in order, every acknowledgement is monotonic, never past
/// what was sent, and recorded in walship.position before the sender sees it.
#[tokio::test]
async fn single_messages_and_bursts_take_both_write_paths_in_order() {
    let r = Receiver::start().await;
    let (mut c, _) = r.session(7).await;
    let bytes = wal(1, SEG, 256 * 1024);
    const STEP: usize = 1000;
    let mut at = 0usize;
    let mut last = (Lsn(0), Lsn(0));
    for round in 0..8 {
        // alone: acknowledged before the next one goes
        c.send(wal_message(SEG + at as u64, &bytes[at..at + STEP]))
            .await
            .unwrap();
        at += STEP;
        let (durable, _) = ack_until(&mut c, SEG + at as u64, None).await;
        assert!(durable >= last.0, "durable went back in round {round}");
        last.0 = durable;
        // a burst in one write, a confirmation of part of it behind it
        for _ in 0..20 {
            c.feed(wal_message(SEG + at as u64, &bytes[at..at + STEP]))
                .await
                .unwrap();
            at += STEP;
        }
        c.feed(keepalive(SEG + (at - 5 * STEP) as u64))
            .await
            .unwrap();
        c.flush().await.unwrap();
        loop {
            match next(&mut c).await {
                Some(ReceiverMessage::Ack {
                    durable_lsn,
                    confirmed_lsn,
                    ..
                }) => {
                    let confirmed = confirmed_lsn.unwrap_or(Lsn(0));
                    assert!(
                        durable_lsn <= Lsn(SEG + at as u64),
                        "{durable_lsn} past what was sent"
                    );
                    assert!(confirmed <= durable_lsn, "{confirmed} past {durable_lsn}");
                    assert!(
                        durable_lsn >= last.0 && confirmed >= last.1,
                        "an acknowledgement went back"
                    );
                    let recorded = walship_receiver::archive::read_positions(&r.archive).unwrap();
                    assert!(
                        recorded.durable >= durable_lsn && recorded.confirmed >= confirmed,
                        "acknowledged {durable_lsn} / {confirmed}, walship.position says {recorded:?}"
                    );
                    last = (durable_lsn, confirmed);
                    if durable_lsn == Lsn(SEG + at as u64)
                        && confirmed == Lsn(SEG + (at - 5 * STEP) as u64)
                    {
                        break;
                    }
                }
                other => panic!("expected an Ack, got {other:?}"),
            }
        }
    }
    assert_partial(&r.partial(1), &bytes[..at]);
    drop(c);
    r.stop().await;
}

#[tokio::test]
async fn compressed_wal_is_archived_as_the_bytes_it_stands_for() {
    let r = Receiver::start().await;
    let (mut c, _) = r.session(7).await;
    let bytes = wal(1, SEG, 32 * 1024);
    c.send(SenderMessage::WalZstd(CompressedWal {
        timeline: 1,
        start_lsn: Lsn(SEG),
        raw_len: bytes.len() as u32,
        data: Bytes::from(zstd::encode_all(&bytes[..], 3).unwrap()),
    }))
    .await
    .unwrap();
    ack_until(&mut c, SEG + bytes.len() as u64, None).await;
    assert_partial(&r.partial(1), &bytes);
    drop(c);
    r.stop().await;
}

#[tokio::test]
async fn a_foreign_cluster_is_refused_without_disturbing_the_live_session() {
    let r = Receiver::start().await;
    let (mut live, _) = r.session(7).await;
    let bytes = wal(1, SEG, 16 * 1024);
    live.send(wal_message(SEG, &bytes[..8192])).await.unwrap();
    ack_until(&mut live, SEG + 8192, None).await;

    let mut foreign = r.connect().await;
    foreign.send(hello(8)).await.unwrap();
    match next(&mut foreign).await {
        Some(ReceiverMessage::Refuse { code, reason }) => {
            assert_eq!(code, RefuseCode::ForeignCluster, "{reason}");
            // it names the sender's cluster, never the archive's (the peer may be a stranger)
            assert!(
                reason.contains("system identifier 8") && !reason.contains('7'),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // the live session goes on as if nothing happened
    live.send(wal_message(SEG + 8192, &bytes[8192..]))
        .await
        .unwrap();
    ack_until(&mut live, SEG + bytes.len() as u64, None).await;
    assert_partial(&r.partial(1), &bytes);
    drop(live);
    r.stop().await;
}

#[tokio::test]
async fn a_reconnecting_sender_takes_over_and_resumes_where_the_archive_is_confirmed() {
    let r = Receiver::start().await;
    let (mut old, _) = r.session(7).await;
    let bytes = wal(1, SEG, 24 * 1024);
    old.send(wal_message(SEG, &bytes[..16384])).await.unwrap();
    old.send(keepalive(SEG + 16384)).await.unwrap();
    ack_until(&mut old, SEG + 16384, Some(SEG + 16384)).await;

    // the old connection is never closed by its peer (a network cut). While it was heard from recently,
    // another session is refused (it could be a second primary); once it has been silent a few seconds,
    // the new session takes over.
    match r.try_session(7).await {
        Err((RefuseCode::Busy, _)) => {}
        Err((code, reason)) => panic!("expected Busy, got {code:?}: {reason}"),
        Ok(_) => panic!("a second session got in while the first one was live"),
    }
    let started = tokio::time::Instant::now();
    let (mut new, resume) = loop {
        match r.try_session(7).await {
            Ok(welcomed) => break welcomed,
            Err((RefuseCode::Busy, _)) if started.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err((code, reason)) => panic!("no takeover: {code:?}: {reason}"),
        }
    };
    assert_eq!(
        resume,
        vec![(1, Lsn(SEG + 16384))],
        "resumes where WAL is confirmed"
    );
    // a resend of what the archive holds is compared and accepted, the rest appended
    new.send(wal_message(SEG + 8192, &bytes[8192..]))
        .await
        .unwrap();
    ack_until(&mut new, SEG + bytes.len() as u64, None).await;
    assert_partial(&r.partial(1), &bytes);
    // the old session was ended
    loop {
        match next(&mut old).await {
            None | Some(ReceiverMessage::Error { .. }) => break,
            Some(ReceiverMessage::Ack { .. }) => continue,
            Some(other) => panic!("the old session got {other:?}"),
        }
    }
    drop(new);
    r.stop().await;
}

/// DESIGN.md §1 on a new archive: WAL acknowledged as durable but never confirmed (the sender lost its
/// connection before the primary's flush position came) is resent from the start of the timeline and
/// compared, never skipped.
#[tokio::test]
async fn unconfirmed_wal_of_a_new_timeline_is_resent_after_a_reconnect() {
    let r = Receiver::start().await;
    let (mut c, _) = r.session(7).await;
    let bytes = wal(1, SEG, 16 * 1024);
    c.send(wal_message(SEG, &bytes)).await.unwrap();
    let (_, confirmed) = ack_until(&mut c, SEG + bytes.len() as u64, None).await;
    assert_eq!(confirmed, Some(Lsn(SEG)), "durable, nothing confirmed");
    drop(c);
    let (_c, resume) = r.session(7).await;
    assert_eq!(
        resume,
        vec![(1, Lsn(SEG))],
        "the sender resends the provisional WAL"
    );
    r.stop().await;
}

#[tokio::test]
async fn provisional_wal_is_replaced_confirmed_wal_never() {
    let r = Receiver::start().await;
    let (mut c, _) = r.session(7).await;
    let bytes = wal(1, SEG, 32 * 1024);
    c.send(wal_message(SEG, &bytes)).await.unwrap();
    c.send(keepalive(SEG + 16384)).await.unwrap();
    ack_until(&mut c, SEG + bytes.len() as u64, Some(SEG + 16384)).await;
    drop(c);

    // a primary whose OS lost its unflushed WAL resends other bytes past the confirmed position: accepted
    let mut other = bytes.clone();
    other[20_000] ^= 0x55;
    let (mut c, resume) = r.session(7).await;
    assert_eq!(
        resume,
        vec![(1, Lsn(SEG + 16384))],
        "a sender resumes at the confirmed position"
    );
    c.send(wal_message(SEG + 16384, &other[16384..24576]))
        .await
        .unwrap();
    ack_until(&mut c, SEG + 24576, None).await;
    // the provisional tail was replaced by the new bytes
    assert_partial(&r.partial(1), &other[..24576]);
    drop(c);

    // but confirmed bytes that differ are never overwritten: the session ends with an error
    let mut rogue = other.clone();
    rogue[100] ^= 0x55;
    let (mut c, _) = r.session(7).await;
    c.send(wal_message(SEG, &rogue[..24576])).await.unwrap();
    match next(&mut c).await {
        None | Some(ReceiverMessage::Error { .. }) => {}
        Some(m) => panic!("differing confirmed WAL must end the session, got {m:?}"),
    }
    // confirmed WAL is untouched
    assert_partial(&r.partial(1), &other[..24576]);
    r.stop().await;
}

#[tokio::test]
async fn a_malformed_frame_ends_the_session_and_nothing_acknowledged_is_lost() {
    use tokio::io::AsyncWriteExt;
    let r = Receiver::start().await;
    let (mut c, _) = r.session(7).await;
    let bytes = wal(1, SEG, 8192);
    c.send(wal_message(SEG, &bytes)).await.unwrap();
    c.send(keepalive(SEG + 8192)).await.unwrap();
    ack_until(&mut c, SEG + 8192, Some(SEG + 8192)).await;
    // a frame whose header announces a message type that does not exist
    let mut tls = c.into_inner();
    tls.write_all(&[0xFF; 64]).await.unwrap();
    tls.flush().await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut rest),
    )
    .await;
    assert!(
        closed.is_ok(),
        "the receiver closes a session that sent garbage"
    );
    assert_partial(&r.partial(1), &bytes);
    // and the next sender is served
    let (_c, resume) = r.session(7).await;
    assert_eq!(resume, vec![(1, Lsn(SEG + 8192))]);
    r.stop().await;
}
