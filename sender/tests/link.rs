//! The sender's link against a real receiver in this process (port 0, real TLS): the handshake, WAL
//! within the window, acknowledgements only of what is durable, confirmation by keepalives, the graceful
//! close, and what `check` and the logs follow through the published state.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use walship_protocol::message::Hello;
use walship_protocol::{Lsn, ReceiverMessage, SenderMessage, PROTOCOL_VERSION_MAX};
use walship_receiver::run::{run, RunConfig};
use walship_sender::link::{self, Link};
use walship_sender::state::StatePublisher;

const SEG: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(30);

struct Receiver {
    dir: tempfile::TempDir,
    addr: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Receiver {
    /// The bytes of the archive's partial of segment 1 (timeline 1).
    fn first_partial(&self) -> Vec<u8> {
        std::fs::read(
            self.dir
                .path()
                .join("archive/000000010000000000000001.partial"),
        )
        .unwrap()
    }
}

async fn receiver() -> Receiver {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    walship_receiver::certs::write_certificates(&certs, &["localhost".into()], "sender", false)
        .unwrap();
    let tls = walship_receiver::tls::server_config(
        &certs.join("server.crt"),
        &certs.join("server.key"),
        &certs.join("ca.crt"),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let config = RunConfig {
        archive: dir.path().join("archive"),
        tls: walship_daemon::Reloadable::fixed(tls),
        server: Default::default(),
        store: None,
        partial_upload_interval: Duration::from_secs(60),
        metrics_listen: None,
    };
    let task = tokio::spawn(run(config, listener, shutdown.clone()));
    Receiver {
        dir,
        addr,
        shutdown,
        task,
    }
}

/// Connects and completes the handshake as a sender of cluster 7 on timeline 1.
async fn open(r: &Receiver, window: u64, state: StatePublisher) -> Link {
    let certs = r.dir.path().join("certs");
    let tls = link::client_config(
        &certs.join("ca.crt"),
        &certs.join("client.crt"),
        &certs.join("client.key"),
    )
    .unwrap();
    let stream = link::connect(&r.addr, "localhost", tls, DEADLINE)
        .await
        .unwrap();
    let (mut rx, mut tx) = Link::frame(stream);
    tx.send(SenderMessage::Hello(Hello {
        version_min: 3,
        version_max: PROTOCOL_VERSION_MAX,
        system_identifier: 7,
        timeline: 1,
        wal_segment_size: SEG as u32,
        pg_version_num: 150004,
        sender_name: "link-test".into(),
    }))
    .await
    .unwrap();
    match tokio::time::timeout(DEADLINE, rx.next()).await.unwrap() {
        Some(Ok(ReceiverMessage::Welcome { resume, .. })) => {
            assert!(resume.is_empty(), "{resume:?}")
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    Link::new(rx, tx, (1, Lsn(SEG)), window, DEADLINE, state)
}

#[tokio::test]
async fn wal_flows_within_the_window_and_the_close_waits_for_the_last_acknowledgement() {
    let r = receiver().await;
    let (state, mut watch) = StatePublisher::new();
    let window = 64 * 1024;
    let mut link = open(&r, window, state).await;
    let wal: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 253) as u8).collect();
    let mut at = Lsn(SEG);
    for chunk in wal.chunks(8192) {
        while !link.has_room() {
            link.flush().await.unwrap();
            tokio::time::timeout(DEADLINE, link.recv())
                .await
                .unwrap()
                .unwrap();
        }
        assert!(
            link.sent().0 - link.acked().0 < window,
            "the window bounds what is in flight"
        );
        link.feed_wal(at, Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
        at = Lsn(at.0 + chunk.len() as u64);
        assert!(link.acked() <= link.sent());
    }
    // the primary flushed the first half: the keepalive confirms it
    let half = Lsn(SEG + wal.len() as u64 / 2);
    link.keepalive(half, 0).await.unwrap();
    link.flush().await.unwrap();
    let end = link.close_when_acknowledged(DEADLINE).await;
    assert_eq!(
        end, at,
        "the close waited until everything sent was acknowledged"
    );
    // what the published state says is what the receiver said
    let seen = tokio::time::timeout(
        DEADLINE,
        watch.wait_for(|s| s.durable == end && s.confirmed >= half),
    )
    .await
    .expect("the state follows the acknowledgements")
    .unwrap()
    .clone();
    assert_eq!(
        seen.confirmed, half,
        "confirmed stops at the primary's flush position"
    );
    // acknowledged means in the archive, byte for byte
    // (preallocated: the WAL, then zeros to the segment's end)
    let held = r.first_partial();
    assert!(held.len() >= wal.len() && held[..wal.len()] == wal[..]);
    assert!(held[wal.len()..].iter().all(|b| *b == 0));
    r.shutdown.cancel();
    tokio::time::timeout(DEADLINE, r.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_refused_certificate_is_an_error_naming_the_tls_session() {
    let r = receiver().await;
    // a certificate of another CA
    let other = tempfile::tempdir().unwrap();
    walship_receiver::certs::write_certificates(other.path(), &["localhost".into()], "x", false)
        .unwrap();
    let certs = r.dir.path().join("certs");
    let tls = link::client_config(
        &certs.join("ca.crt"),
        &other.path().join("client.crt"),
        &other.path().join("client.key"),
    )
    .unwrap();
    let outcome: anyhow::Result<()> = async {
        let stream = link::connect(&r.addr, "localhost", tls, DEADLINE).await?;
        let (mut rx, mut tx) = Link::frame(stream);
        tx.send(SenderMessage::Keepalive {
            primary_flush_lsn: Lsn(0),
            timeline: 1,
            sent_at_unix_micros: 0,
        })
        .await?;
        match tokio::time::timeout(DEADLINE, rx.next()).await? {
            Some(Ok(m)) => anyhow::bail!("the receiver answered {m:?}"),
            Some(Err(e)) => Err(e.into()),
            None => anyhow::bail!("closed without a word"),
        }
    }
    .await;
    let e = outcome.expect_err("a stranger's certificate gets no session");
    let text = format!("{e:#}");
    assert!(
        text.contains("certificate") || text.contains("closed") || text.contains("alert"),
        "{text}"
    );
    assert!(
        !r.dir.path().join("archive/walship.id").exists(),
        "nothing was written"
    );
    r.shutdown.cancel();
}

#[tokio::test]
async fn auto_compression_sends_small_messages_plain_and_large_ones_compressed() {
    let r = receiver().await;
    let (state, _watch) = StatePublisher::new();
    let mut link = open(&r, 16 << 20, state).await;
    link.compress_with(Some(1), walship_sender::COMPRESS_MIN_AUTO);
    // compressible WAL-like bytes
    let wal: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 61) as u8).collect();
    let small = 4096;
    link.feed_wal(Lsn(SEG), Bytes::copy_from_slice(&wal[..small]))
        .await
        .unwrap();
    link.flush().await.unwrap();
    assert_eq!(
        link.wire_wal_bytes(),
        small as u64,
        "a message below the threshold goes plain"
    );
    link.feed_wal(
        Lsn(SEG + small as u64),
        Bytes::copy_from_slice(&wal[small..]),
    )
    .await
    .unwrap();
    link.flush().await.unwrap();
    let large = (wal.len() - small) as u64;
    assert!(
        link.wire_wal_bytes() < small as u64 + large / 4,
        "a large message goes compressed: {} bytes on the wire for {large}",
        link.wire_wal_bytes() - small as u64
    );
    let end = link.close_when_acknowledged(DEADLINE).await;
    assert_eq!(end, Lsn(SEG + wal.len() as u64));
    // both ways, the archive holds the bytes as sent
    let held = r.first_partial();
    assert_eq!(held[..wal.len()], wal[..]);
    r.shutdown.cancel();
    tokio::time::timeout(DEADLINE, r.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
