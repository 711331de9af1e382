//! Prometheus metrics of the receiver (`--metrics-listen`): counters and the fsync histogram kept as the
//! receiver works ([`METRICS`]), and gauges of positions and lag read at each scrape from the function
//! given to [`registry`] (the daemon gives it the in-memory status report, the same code as `status`, so
//! the two always agree). One registry, built once. A leaf: it knows nothing of the archive or the status.

use std::sync::LazyLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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

/// The gauges of one scrape; `None` leaves a gauge out (not known yet).
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    pub timeline: Option<i64>,
    pub durable_lsn: Option<i64>,
    pub confirmed_lsn: Option<i64>,
    pub primary_flush_lsn: Option<i64>,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub sender_connected: Option<i64>,
    pub no_sender_seconds: Option<f64>,
    pub complete_segments: Option<i64>,
    pub store_waiting_segments: Option<i64>,
    pub status_code: Option<i64>,
}

/// Reads the gauges at each scrape.
struct GaugeSource(Box<dyn Fn() -> Option<Gauges> + Send + Sync>);

impl std::fmt::Debug for GaugeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GaugeSource")
    }
}

fn gauge<N>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: Option<N>,
) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let Some(v) = value else { return Ok(()) };
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for GaugeSource {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some(g) = (self.0)() else { return Ok(()) };
        gauge(
            &mut e,
            "timeline",
            "Timeline of the archive's end",
            g.timeline,
        )?;
        gauge(
            &mut e,
            "durable_lsn",
            "End of the WAL the archive holds durably (fsynced), as a byte position",
            g.durable_lsn,
        )?;
        gauge(
            &mut e,
            "confirmed_lsn",
            "End of the WAL the primary has flushed too (confirmed), as a byte position",
            g.confirmed_lsn,
        )?;
        gauge(
            &mut e,
            "primary_flush_lsn",
            "The primary's flush position as the sender last reported it",
            g.primary_flush_lsn,
        )?;
        gauge(
            &mut e,
            "lag_bytes",
            "WAL flushed on the primary and not yet durable in the archive",
            g.lag_bytes,
        )?;
        gauge(
            &mut e,
            "lag_seconds",
            "Since when the archive has been behind the primary's flush position (0 when caught up)",
            g.lag_seconds,
        )?;
        gauge(
            &mut e,
            "sender_connected",
            "1 while a sender is connected",
            g.sender_connected,
        )?;
        gauge(
            &mut e,
            "no_sender_seconds",
            "Seconds since a sender was last connected (0 while one is)",
            g.no_sender_seconds,
        )?;
        gauge(
            &mut e,
            "complete_segments",
            "Complete segments in the archive",
            g.complete_segments,
        )?;
        gauge(
            &mut e,
            "store_waiting_segments",
            "Complete segments not yet in the object store",
            g.store_waiting_segments,
        )?;
        gauge(
            &mut e,
            "status_code",
            "The status verdict: 0 ok, 1 warning, 2 critical",
            g.status_code,
        )
    }
}

/// The receiver's registry: the counters of [`METRICS`] and the gauges `gauges` returns at each scrape.
pub fn registry(gauges: impl Fn() -> Option<Gauges> + Send + Sync + 'static) -> Registry {
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
    registry.register_collector(Box::new(GaugeSource(Box::new(gauges))));
    registry
}

/// The metrics text of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!("metrics: encoding failed: {e}");
    }
    text
}
