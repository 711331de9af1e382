//! Prometheus metrics of the receiver (`--metrics-listen`). Positions and lag are computed at each scrape
//! by the same code as `status` ([`crate::status::report`]), so the two always agree; counters and the fsync
//! histogram are kept as the receiver works.

use std::path::Path;
use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use walship_protocol::Lsn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

/// What the receiver counts while it works.
pub struct Metrics {
    /// Seconds per fdatasync of the open `.partial` (the wait every acknowledgement includes).
    pub fsync_seconds: Histogram,
    pub segments_completed: Counter,
    pub wal_bytes_received: Counter,
    /// What the WAL took on the wire (compressed, when it was).
    pub wire_wal_bytes: Counter,
    /// Sessions accepted (a sender authenticated and its cluster accepted).
    pub sessions: Counter,
    /// Complete segments uploaded to the object store.
    pub store_segments_uploaded: Counter,
    /// Connections ended by an error: `tls` (handshake), `session` (an authenticated session), `archive`
    /// (a write or fsync that stops the receiver).
    pub errors: Family<Kind, Counter>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    // 50 µs .. ~1.6 s
    fsync_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
    segments_completed: Counter::default(),
    wal_bytes_received: Counter::default(),
    wire_wal_bytes: Counter::default(),
    store_segments_uploaded: Counter::default(),
    sessions: Counter::default(),
    errors: Family::default(),
});

fn gauge(registry: &mut Registry, name: &str, help: &str, value: Option<i64>) {
    if let Some(v) = value {
        let g: Gauge = Gauge::default();
        g.set(v);
        registry.register(name, help, g);
    }
}

fn gauge_f64(registry: &mut Registry, name: &str, help: &str, value: Option<f64>) {
    if let Some(v) = value {
        let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        g.set(v);
        registry.register(name, help, g);
    }
}

fn lsn(text: &Option<String>) -> Option<i64> {
    text.as_deref()
        .and_then(|t| t.parse::<Lsn>().ok())
        .map(|l| l.0 as i64)
}

/// The metrics text for the archive in `dir`.
pub fn render(dir: &Path) -> String {
    let mut registry = Registry::with_prefix("walship_receiver");
    let m = &*METRICS;
    registry.register(
        "fsync_seconds",
        "Time of each fdatasync of the open partial segment",
        m.fsync_seconds.clone(),
    );
    registry.register(
        "segments_completed",
        "WAL segments completed and given their final name",
        m.segments_completed.clone(),
    );
    registry.register(
        "wal_bytes_received",
        "WAL bytes received from senders",
        m.wal_bytes_received.clone(),
    );
    registry.register(
        "wire_wal_bytes",
        "Bytes the WAL took on the wire (zstd-compressed when the sender compressed it)",
        m.wire_wal_bytes.clone(),
    );
    registry.register(
        "store_segments_uploaded",
        "Complete segments uploaded to the object store",
        m.store_segments_uploaded.clone(),
    );
    registry.register("sessions", "Sender sessions accepted", m.sessions.clone());
    registry.register(
        "errors",
        "Connections ended by an error, by kind (tls, session, archive)",
        m.errors.clone(),
    );
    match crate::status::report(dir) {
        Ok(mut r) => {
            // status's default thresholds: critical after 60 s without a sender
            r.judge(&crate::status::Thresholds {
                crit_no_sender_seconds: 60.0,
                ..Default::default()
            });
            gauge(
                &mut registry,
                "timeline",
                "Timeline of the archive's end",
                r.timeline.map(i64::from),
            );
            gauge(
                &mut registry,
                "durable_lsn",
                "End of the WAL the archive holds durably (fsynced), as a byte position",
                lsn(&r.archived_lsn),
            );
            gauge(
                &mut registry,
                "confirmed_lsn",
                "End of the WAL the primary has flushed too (confirmed), as a byte position",
                lsn(&r.confirmed_lsn),
            );
            gauge(
                &mut registry,
                "primary_flush_lsn",
                "The primary's flush position as the sender last reported it",
                lsn(&r.primary_flush_lsn),
            );
            gauge(
                &mut registry,
                "lag_bytes",
                "WAL flushed on the primary and not yet durable in the archive",
                r.lag_bytes.map(|b| b as i64),
            );
            gauge_f64(
                &mut registry,
                "lag_seconds",
                "Since when the archive has been behind the primary's flush position (0 when caught up)",
                r.lag_seconds,
            );
            gauge(
                &mut registry,
                "sender_connected",
                "1 while a sender is connected",
                Some(i64::from(r.sender_connected)),
            );
            gauge_f64(
                &mut registry,
                "no_sender_seconds",
                "Seconds since a sender was last connected (0 while one is)",
                r.no_sender_seconds,
            );
            gauge(
                &mut registry,
                "complete_segments",
                "Complete segments in the archive",
                Some(r.complete_segments as i64),
            );
            gauge(
                &mut registry,
                "store_waiting_segments",
                "Complete segments not yet in the object store",
                r.store_waiting_segments.map(|n| n as i64),
            );
            if let Some(v) = &r.verdict {
                gauge(
                    &mut registry,
                    "status_code",
                    "The status verdict: 0 ok, 1 warning, 2 critical",
                    Some(i64::from(v.code)),
                );
            }
        }
        Err(e) => tracing::warn!("metrics: cannot read the archive: {e:#}"),
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::warn!("metrics: encoding failed: {e}");
    }
    text
}
