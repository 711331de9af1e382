//! The TLS link to the receiver: connecting, the framed message stream with a deadline on every send, the
//! window of unacknowledged WAL, the graceful close that waits for the last acknowledgement, and the backoff
//! between reconnection attempts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::warn;
use walship_protocol::message::Wal;
use walship_protocol::{Lsn, MessageCodec, ReceiverMessage, SenderMessage, TimelineId};

use crate::state::StatePublisher;

use anyhow::{Context, Result};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// TLS 1.3 client configuration: trust `ca`, authenticate with `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = walship_daemon::trust_store(ca)?;
    let key = walship_daemon::private_key(key)?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_client_auth_cert(walship_daemon::certificates(cert)?, key)
        .with_context(|| {
            format!(
                "client certificate {} does not match its key",
                cert.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Connects to `addr` and completes the TLS handshake within `timeout`.
pub async fn connect(
    addr: &str,
    server_name: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_owned()).with_context(|| {
        format!("{server_name:?} is not a valid TLS server name (use --tls-server-name)")
    })?;
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to receiver {addr}"))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .with_context(|| {
                format!("TLS handshake with receiver {addr} (server name {server_name})")
            })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("connecting to receiver {addr} timed out"))?
}

pub type Tls = TlsStream<TcpStream>;
pub type Rx = FramedRead<ReadHalf<Tls>, MessageCodec<ReceiverMessage, SenderMessage>>;
pub type Tx = FramedWrite<WriteHalf<Tls>, MessageCodec<ReceiverMessage, SenderMessage>>;

/// Why the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The receiver did not take a message, or did not answer, within the deadline (a stalled peer).
    #[error("the receiver stalled: {what} did not complete within {deadline:?}")]
    Stalled {
        what: &'static str,
        deadline: Duration,
    },
    /// The connection failed or closed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: walship_protocol::FrameError,
    },
    #[error("the receiver closed the connection")]
    Closed,
    /// The receiver broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The receiver ended the session and said why.
    #[error("the receiver closed the session: {0}")]
    Receiver(String),
}

/// A handshaken session with the receiver, streaming WAL of one timeline.
///
/// Invariant: `acked <= sent`; `sent - acked` never exceeds the window by more than one message.
pub struct Link {
    rx: Rx,
    tx: Tx,
    /// Where `check` and the logs follow the acknowledgements.
    state: StatePublisher,
    timeline: TimelineId,
    /// Everything before this was handed to the connection.
    sent: Lsn,
    /// Everything before this is durable in the archive (the receiver's last `Ack`).
    acked: Lsn,
    /// How much of `acked` the receiver counts as confirmed (protocol 3; before, all of it).
    confirmed: Lsn,
    window: u64,
    /// Deadline for each send and for the receiver's silence.
    timeout: Duration,
    last_heard: Instant,
    /// Compresses WAL messages (zstd, one context for the session), when the receiver allowed compression.
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// The smallest WAL message the compressor takes.
    compress_min: usize,
    /// WAL bytes this link put on the wire (compressed or not).
    wire_wal_bytes: u64,
}

impl Link {
    /// Splits a TLS stream into the framed halves used for the handshake.
    pub fn frame(tls: Tls) -> (Rx, Tx) {
        let (rd, wr) = tokio::io::split(tls);
        (
            FramedRead::new(rd, MessageCodec::default()),
            FramedWrite::new(wr, MessageCodec::default()),
        )
    }

    /// The streaming phase, starting at `start` (what the receiver already holds).
    pub fn new(
        rx: Rx,
        tx: Tx,
        (timeline, start): (TimelineId, Lsn),
        window: u64,
        timeout: Duration,
        state: StatePublisher,
    ) -> Link {
        for g in [
            &crate::metrics::METRICS.sent_lsn,
            &crate::metrics::METRICS.durable_lsn,
            &crate::metrics::METRICS.confirmed_lsn,
        ] {
            g.set(start.0 as i64);
        }
        Link {
            rx,
            tx,
            state,
            timeline,
            sent: start,
            acked: start,
            confirmed: start,
            window,
            timeout,
            last_heard: Instant::now(),
            compressor: None,
            compress_min: 0,
            wire_wal_bytes: 0,
        }
    }

    /// Sends WAL messages of at least `min` bytes compressed with zstd at `level` from now on (`None`: all
    /// plain).
    pub fn compress_with(&mut self, level: Option<i32>, min: usize) {
        self.compress_min = min;
        self.compressor = level.and_then(|l| match zstd::bulk::Compressor::new(l) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(level = l, "no zstd context ({e}): WAL goes uncompressed");
                None
            }
        });
    }

    /// WAL bytes this link put on the wire, compressed or not.
    pub fn wire_wal_bytes(&self) -> u64 {
        self.wire_wal_bytes
    }

    pub fn sent(&self) -> Lsn {
        self.sent
    }

    pub fn acked(&self) -> Lsn {
        self.acked
    }

    /// The position up to which the receiver holds WAL durably and counts it confirmed: what it will
    /// resume from after a reconnection.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Whether the window has room for more WAL.
    pub fn has_room(&self) -> bool {
        self.sent.0 - self.acked.0 < self.window
    }

    /// Queues WAL `[start, start + bytes.len())`, which must continue what was sent. Sends once the codec's
    /// buffer is large; [`Link::flush`] sends the rest.
    pub async fn feed_wal(&mut self, start: Lsn, bytes: bytes::Bytes) -> Result<(), LinkError> {
        if start != self.sent {
            return Err(LinkError::Protocol(format!(
                "internal: WAL from {start} does not continue what was sent ({})",
                self.sent
            )));
        }
        let end = Lsn(start.0 + bytes.len() as u64);
        let wal = Wal {
            timeline: self.timeline,
            start_lsn: start,
            bytes,
        };
        let len = end.0 - start.0;
        let compressor = self
            .compressor
            .as_mut()
            .filter(|_| wal.bytes.len() >= self.compress_min);
        let (msg, wire) = match compressor.and_then(|c| wal.compress_with(c)) {
            Some(z) => {
                let wire = z.data.len() as u64;
                (SenderMessage::WalZstd(z), wire)
            }
            None => (SenderMessage::Wal(wal), len),
        };
        crate::metrics::METRICS.wire_wal_bytes.inc_by(wire);
        self.wire_wal_bytes += wire;
        deadline(self.timeout, "sending WAL", self.tx.feed(msg)).await?;
        self.sent = end;
        crate::metrics::METRICS.sent_lsn.set(end.0 as i64);
        crate::metrics::METRICS.wal_bytes_sent.inc_by(len);
        Ok(())
    }

    /// Sends everything queued.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        deadline(self.timeout, "sending WAL", self.tx.flush()).await
    }

    /// Sends any other message (history files, keepalives).
    pub async fn send(&mut self, msg: SenderMessage, what: &'static str) -> Result<(), LinkError> {
        deadline(self.timeout, what, self.tx.send(msg)).await
    }

    /// Sends a keepalive, or fails if the receiver has been silent for longer than the timeout.
    pub async fn keepalive(
        &mut self,
        primary_flush: Lsn,
        now_micros: u64,
    ) -> Result<(), LinkError> {
        self.feed_keepalive(primary_flush, now_micros).await?;
        self.flush().await
    }

    /// Queues a keepalive behind what is queued (one write to the socket carries both on the next
    /// [`Link::flush`]), or fails if the receiver has been silent for longer than the timeout.
    pub async fn feed_keepalive(
        &mut self,
        primary_flush: Lsn,
        now_micros: u64,
    ) -> Result<(), LinkError> {
        if self.last_heard.elapsed() > self.timeout {
            return Err(LinkError::Stalled {
                what: "an answer from the receiver",
                deadline: self.timeout,
            });
        }
        let msg = SenderMessage::Keepalive {
            primary_flush_lsn: primary_flush,
            timeline: self.timeline,
            sent_at_unix_micros: now_micros,
        };
        deadline(self.timeout, "sending a keepalive", self.tx.feed(msg)).await
    }

    /// Waits for the next message from the receiver and applies it. Cancellation safe. Returns whether the
    /// acknowledged position moved.
    pub async fn recv(&mut self) -> Result<bool, LinkError> {
        let msg = self.rx.next().await;
        self.apply(msg)
    }

    /// Applies every message already received, without waiting. Returns whether the acknowledged position
    /// moved.
    pub fn poll_received(&mut self) -> Result<bool, LinkError> {
        let mut moved = false;
        while let Some(msg) = self.rx.next().now_or_never() {
            moved |= self.apply(msg)?;
        }
        Ok(moved)
    }

    fn apply(
        &mut self,
        msg: Option<Result<ReceiverMessage, walship_protocol::FrameError>>,
    ) -> Result<bool, LinkError> {
        self.last_heard = Instant::now();
        match msg {
            Some(Ok(ReceiverMessage::Ack {
                timeline,
                durable_lsn,
                confirmed_lsn,
            })) => {
                if timeline != self.timeline {
                    return Ok(false);
                }
                let confirmed = confirmed_lsn.unwrap_or(durable_lsn).min(durable_lsn);
                if confirmed > self.confirmed && confirmed <= self.sent {
                    self.confirmed = confirmed;
                    crate::metrics::METRICS
                        .confirmed_lsn
                        .set(confirmed.0 as i64);
                }
                if durable_lsn <= self.acked {
                    return Ok(false);
                }
                if durable_lsn > self.sent {
                    return Err(LinkError::Protocol(format!(
                        "ack of {durable_lsn} beyond what was sent ({})",
                        self.sent
                    )));
                }
                self.acked = durable_lsn;
                crate::metrics::METRICS
                    .durable_lsn
                    .set(durable_lsn.0 as i64);
                self.state.acknowledged(self.acked, self.confirmed);
                Ok(true)
            }
            Some(Ok(ReceiverMessage::Error { reason })) => Err(LinkError::Receiver(reason)),
            Some(Ok(other)) => Err(LinkError::Protocol(format!(
                "unexpected {other:?} from the receiver"
            ))),
            Some(Err(source)) => Err(LinkError::Io {
                what: "bad frame from the receiver",
                source,
            }),
            None => Err(LinkError::Closed),
        }
    }

    /// A graceful stop: sends what is queued, waits until the receiver has acknowledged everything sent (or
    /// `grace` runs out), then closes the TLS session. Without the wait, a close with acknowledgements still
    /// unread in the socket makes Linux reset the connection and drop what was still in flight.
    /// Returns the acknowledged position.
    pub async fn close_when_acknowledged(mut self, grace: Duration) -> Lsn {
        let until = tokio::time::Instant::now() + grace;
        let settled = tokio::time::timeout_at(until, async {
            self.tx.flush().await.map_err(|source| LinkError::Io {
                what: "sending WAL",
                source,
            })?;
            while self.acked < self.sent {
                self.recv().await?;
            }
            Ok::<(), LinkError>(())
        })
        .await;
        match settled {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(sent = %self.sent, acked = %self.acked, "stopping without the last acknowledgement: {e}")
            }
            Err(_) => {
                warn!(sent = %self.sent, acked = %self.acked, "stopping: the receiver did not acknowledge everything within {grace:?}")
            }
        }
        // close_notify, then keep reading until the receiver closes too, so no unread data turns the close
        // into a reset
        let _ = tokio::time::timeout_at(until + Duration::from_secs(1), async {
            let _ = self.tx.close().await;
            while let Some(msg) = self.rx.next().await {
                if let Ok(ReceiverMessage::Ack {
                    timeline,
                    durable_lsn,
                    confirmed_lsn,
                }) = msg
                {
                    if timeline == self.timeline
                        && durable_lsn > self.acked
                        && durable_lsn <= self.sent
                    {
                        self.acked = durable_lsn;
                        let confirmed = confirmed_lsn.unwrap_or(durable_lsn).min(durable_lsn);
                        self.confirmed = self.confirmed.max(confirmed);
                    }
                }
            }
        })
        .await;
        self.acked
    }
}

async fn deadline<F, T>(limit: Duration, what: &'static str, fut: F) -> Result<T, LinkError>
where
    F: std::future::Future<Output = Result<T, walship_protocol::FrameError>>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|source| LinkError::Io { what, source }),
        Err(_) => Err(LinkError::Stalled {
            what,
            deadline: limit,
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts() {
        assert_eq!(super::host_of("db2.example.com:7433"), "db2.example.com");
        assert_eq!(super::host_of("[::1]:7433"), "::1");
        assert_eq!(super::host_of("127.0.0.1:1"), "127.0.0.1");
    }
}
