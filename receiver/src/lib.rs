//! walship receiver: accepts walship senders over mutually authenticated TLS and keeps their WAL in an archive
//! directory, durably, one `.partial` per segment being received.
//!
//! | module      | what it owns |
//! |-------------|--------------|
//! | [`run`]       | the daemon (`run`) as a library: archive, uploader, status writer, metrics, server, ordered stop |
//! | [`server`]    | the TLS listener and the sessions (network task → bounded channel → disk writer task) |
//! | [`archive`]   | the archive's WAL files: identity, lock, partial/complete segments, history files, positions, failover state |
//! | [`durable`]   | the only crash-safe file writing: atomic replace, fsync of files and directories |
//! | [`socket`]    | the sessions' read buffer (small until a peer has authenticated) |
//! | [`tls`]       | rustls configuration (TLS 1.3, client certificates required) |
//! | [`certs`]     | `certs`: a CA and certificates for a quick start |
//! | [`status`]    | what the receiver is doing, for `status` (kept in memory, written to `walship.status`) |
//! | [`metrics`]   | Prometheus metrics (`--metrics-listen`) |
//! | [`store`]     | the archive's copy in object storage (`--object-store`) |
//! | [`upload`]    | the uploader: complete segments and history files in order, the partial periodically |
//! | [`restore`]   | `restore_command`: complete segments, history files, the zero-padded last partial at failover |
//! | [`prefetch`]  | the background fetcher of the next segments from the store while recovery replays |
//! | [`promote`]   | failover: trigger, wait for the handover, `pg_ctl promote` |
//! | [`cleanup`]   | `archive_cleanup_command` (and the store's retention) |
//! | [`check`]     | `check`: the archive, the TLS files, the standby's recovery settings |
#![forbid(unsafe_code)]

pub mod archive;
pub mod certs;
pub mod check;
pub mod cleanup;
pub mod crypt;
pub mod durable;
pub mod metrics;
pub mod prefetch;
pub mod promote;
pub mod restore;
pub mod run;
pub mod server;
pub mod socket;
pub mod status;
pub mod store;
pub mod tls;
pub mod upload;
pub mod verify;

pub use walship_daemon::{init_logging, shutdown_on_signals};
