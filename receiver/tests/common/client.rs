//! A receiver running in the test's process (the real daemon, [`run`], on a port-0 listener with real TLS)
//! and a client that speaks the wire protocol by hand: what the session tests share.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::SEG;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use walship_protocol::message::{Hello, Wal};
use walship_protocol::{
    Lsn, MessageCodec, ReceiverMessage, RefuseCode, SenderMessage, PROTOCOL_VERSION_MAX,
};
use walship_receiver::run::{run, RunConfig};
use walship_receiver::server::ServerOptions;

/// Longest wait for any answer: generous, the machine may be loaded; a hang fails instead of blocking.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub type Client = Framed<TlsStream<TcpStream>, MessageCodec<ReceiverMessage, SenderMessage>>;

/// A receiver running in this process.
pub struct Receiver {
    _dir: tempfile::TempDir,
    pub archive: PathBuf,
    pub certs: PathBuf,
    pub addr: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    /// The daemon's result, from its thread.
    pub task: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        walship_receiver::certs::write_certificates(
            &certs,
            &["localhost".to_owned()],
            "walship-sender",
            false,
        )
        .unwrap();
        let archive = dir.path().join("archive");
        let tls = walship_receiver::tls::server_config(
            &certs.join("server.crt"),
            &certs.join("server.key"),
            &certs.join("ca.crt"),
        )
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let config = RunConfig {
            archive: archive.clone(),
            tls: walship_daemon::Reloadable::fixed(tls),
            server: ServerOptions {
                takeover_timeout: Duration::from_secs(10),
                ..Default::default()
            },
            store: None,
            partial_upload_interval: Duration::from_secs(60),
            metrics_listen: None,
        };
        // on a thread of its own with a one-thread runtime, as `walship-receiver run` runs it: what blocks the
        // daemon (a slow fsync on its connection task) blocks it alone, never the test's client
        let (done, task) = tokio::sync::oneshot::channel();
        let token = shutdown.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let result = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                run(config, listener, token).await
            });
            let _ = done.send(result);
        });
        Receiver {
            _dir: dir,
            archive,
            certs,
            addr,
            shutdown,
            task,
        }
    }

    pub async fn connect(&self) -> Client {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = walship_daemon::trust_store(&self.certs.join("ca.crt")).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                walship_daemon::certificates(&self.certs.join("client.crt")).unwrap(),
                walship_daemon::private_key(&self.certs.join("client.key")).unwrap(),
            )
            .unwrap();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        Framed::new(
            tls,
            MessageCodec::new(walship_protocol::DEFAULT_MAX_PAYLOAD),
        )
    }

    /// A session of cluster `system_identifier` on timeline 1, welcomed: returns the client and the resume
    /// points.
    pub async fn session(&self, system_identifier: u64) -> (Client, Vec<(u32, Lsn)>) {
        match self.try_session(system_identifier).await {
            Ok(welcomed) => welcomed,
            Err((code, reason)) => panic!("expected Welcome, got Refuse {code:?}: {reason}"),
        }
    }

    /// A session, or the receiver's refusal.
    pub async fn try_session(
        &self,
        system_identifier: u64,
    ) -> Result<(Client, Vec<(u32, Lsn)>), (RefuseCode, String)> {
        let mut c = self.connect().await;
        c.send(hello(system_identifier)).await.unwrap();
        match next(&mut c).await {
            Some(ReceiverMessage::Welcome { resume, .. }) => Ok((c, resume)),
            Some(ReceiverMessage::Refuse { code, reason }) => Err((code, reason)),
            other => panic!("expected Welcome or Refuse, got {other:?}"),
        }
    }

    pub fn partial(&self, segno: u64) -> PathBuf {
        self.archive.join(segment_name(segno) + ".partial")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the receiver stops on shutdown")
            .expect("the receiver's thread ends with a result")
            .expect("the receiver stops cleanly");
    }
}

/// Timeline 1's segment `segno` for 1 MiB segments.
pub fn segment_name(segno: u64) -> String {
    let per_id = 0x1_0000_0000 / SEG;
    format!("00000001{:08X}{:08X}", segno / per_id, segno % per_id)
}

pub fn hello(system_identifier: u64) -> SenderMessage {
    SenderMessage::Hello(Hello {
        version_min: 3,
        version_max: PROTOCOL_VERSION_MAX,
        system_identifier,
        timeline: 1,
        wal_segment_size: SEG as u32,
        pg_version_num: 150004,
        sender_name: "test".to_owned(),
    })
}

pub fn wal_message(start: u64, bytes: &[u8]) -> SenderMessage {
    SenderMessage::Wal(Wal {
        timeline: 1,
        start_lsn: Lsn(start),
        bytes: Bytes::copy_from_slice(bytes),
    })
}

pub fn keepalive(flush: u64) -> SenderMessage {
    SenderMessage::Keepalive {
        primary_flush_lsn: Lsn(flush),
        timeline: 1,
        sent_at_unix_micros: 0,
    }
}

/// The next message from the receiver (`None`: it closed the connection).
pub async fn next(c: &mut Client) -> Option<ReceiverMessage> {
    match tokio::time::timeout(DEADLINE, c.next()).await {
        Ok(Some(Ok(m))) => Some(m),
        Ok(Some(Err(_)) | None) => None,
        Err(_) => panic!("no answer from the receiver within {DEADLINE:?}"),
    }
}

/// Reads acknowledgements until one covers `durable` (and, if given, `confirmed`); the last `Ack`.
pub async fn ack_until(c: &mut Client, durable: u64, confirmed: Option<u64>) -> (Lsn, Option<Lsn>) {
    loop {
        match next(c).await {
            Some(ReceiverMessage::Ack {
                durable_lsn,
                confirmed_lsn,
                ..
            }) => {
                if durable_lsn.0 >= durable
                    && confirmed.is_none_or(|c| confirmed_lsn.is_some_and(|l| l.0 >= c))
                {
                    return (durable_lsn, confirmed_lsn);
                }
            }
            Some(other) => panic!("expected an Ack, got {other:?}"),
            None => panic!(
                "the receiver closed the session before acknowledging {}",
                Lsn(durable)
            ),
        }
    }
}
