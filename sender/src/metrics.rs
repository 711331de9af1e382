//! Prometheus metrics of the sender (`--metrics-listen`): positions as the sender knows them, kept up to
//! date as it works, and counters of sessions, reconnections, errors and bytes.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

pub struct Metrics {
    pub timeline: Gauge,
    pub primary_flush_lsn: Gauge,
    pub sent_lsn: Gauge,
    pub durable_lsn: Gauge,
    pub confirmed_lsn: Gauge,
    pub sessions: Counter,
    pub reconnects: Counter,
    pub errors: Family<Kind, Counter>,
    pub wal_bytes_sent: Counter,
    /// What the WAL took on the wire (compressed, when it was).
    pub wire_wal_bytes: Counter,
    pub shipped_on_write_bytes: Counter,
    /// Shipped WAL that differed from what the walsender streamed.
    pub cross_check_mismatches: Counter,
    /// Shipped bytes compared with the walsender's.
    pub cross_checked_bytes: Counter,
    /// 1 while the primary's walsender streams to this sender (the flush signal), 0 while it polls.
    pub replication_stream: Gauge,
    /// With --synchronous: when the primary's flush moved ahead of what the receiver acknowledged durable,
    /// in microseconds since the epoch (0: not behind).
    pub synchronous_behind_since: Gauge,
    /// The primary's pg_stat_replication row of this sender: 1 when its sync_state is sync or quorum.
    pub primary_sees_synchronous: Gauge,
    /// The same row's flush_lag, in milliseconds (-1 when the primary shows none).
    pub primary_flush_lag_ms: Gauge,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    timeline: Gauge::default(),
    primary_flush_lsn: Gauge::default(),
    sent_lsn: Gauge::default(),
    durable_lsn: Gauge::default(),
    confirmed_lsn: Gauge::default(),
    sessions: Counter::default(),
    reconnects: Counter::default(),
    errors: Family::default(),
    wal_bytes_sent: Counter::default(),
    wire_wal_bytes: Counter::default(),
    shipped_on_write_bytes: Counter::default(),
    cross_check_mismatches: Counter::default(),
    cross_checked_bytes: Counter::default(),
    replication_stream: Gauge::default(),
    synchronous_behind_since: Gauge::default(),
    primary_sees_synchronous: Gauge::default(),
    primary_flush_lag_ms: Gauge::default(),
});

/// The metrics text.
pub fn render() -> String {
    let m = &*METRICS;
    let mut registry = Registry::with_prefix("walship_sender");
    registry.register("timeline", "Timeline being shipped", m.timeline.clone());
    registry.register(
        "primary_flush_lsn",
        "The primary's flush position, as a byte position",
        m.primary_flush_lsn.clone(),
    );
    registry.register(
        "sent_lsn",
        "End of the WAL sent to the receiver",
        m.sent_lsn.clone(),
    );
    registry.register(
        "durable_lsn",
        "End of the WAL the receiver acknowledged as durable (fsynced)",
        m.durable_lsn.clone(),
    );
    registry.register(
        "confirmed_lsn",
        "End of the durable WAL the primary has flushed too",
        m.confirmed_lsn.clone(),
    );
    let lag: Gauge = Gauge::default();
    let (flush, durable) = (m.primary_flush_lsn.get(), m.durable_lsn.get());
    if flush > 0 && durable > 0 {
        lag.set((flush - durable).max(0));
        registry.register(
            "lag_bytes",
            "WAL flushed on the primary and not yet durable at the receiver",
            lag,
        );
    }
    registry.register(
        "sessions",
        "Sessions started with the receiver",
        m.sessions.clone(),
    );
    registry.register(
        "reconnects",
        "Sessions ended by an error and made anew",
        m.reconnects.clone(),
    );
    registry.register(
        "errors",
        "Sessions ended by an error, by what failed (postgres, receiver, wal, other)",
        m.errors.clone(),
    );
    registry.register("wal_bytes_sent", "WAL bytes sent", m.wal_bytes_sent.clone());
    registry.register(
        "wire_wal_bytes",
        "Bytes the WAL took on the wire (zstd-compressed when the receiver allows it)",
        m.wire_wal_bytes.clone(),
    );
    registry.register(
        "shipped_on_write_bytes",
        "WAL bytes sent before the primary had flushed them (confirmed later)",
        m.shipped_on_write_bytes.clone(),
    );
    registry.register(
        "cross_check_mismatches",
        "Times the WAL read from pg_wal differed from what the primary's walsender streamed as flushed (the session restarted, nothing past it confirmed)",
        m.cross_check_mismatches.clone(),
    );
    registry.register(
        "cross_checked_bytes",
        "Shipped WAL bytes compared equal with what the primary's walsender streamed",
        m.cross_checked_bytes.clone(),
    );
    registry.register(
        "replication_stream",
        "1 while the primary's walsender streams flushed WAL to the sender (the flush signal), 0 while it polls the flush position",
        m.replication_stream.clone(),
    );
    let behind: Gauge = Gauge::default();
    let since = m.synchronous_behind_since.get();
    if since > 0 {
        behind.set(((crate::now_micros() as i64 - since).max(0)) / 1000);
    }
    registry.register(
        "synchronous_behind_ms",
        "With --synchronous: how long WAL the primary flushed has waited for the receiver's durable acknowledgement (commits wait at most that long; counting on while no session streams), 0 when none waits",
        behind,
    );
    registry.register(
        "primary_sees_synchronous",
        "1 when the primary's pg_stat_replication shows this sender as a synchronous standby (sync_state sync or quorum)",
        m.primary_sees_synchronous.clone(),
    );
    registry.register(
        "primary_flush_lag_ms",
        "flush_lag of this sender in the primary's pg_stat_replication, in milliseconds (-1 when it shows none)",
        m.primary_flush_lag_ms.clone(),
    );
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::warn!("metrics: encoding failed: {e}");
    }
    text
}
