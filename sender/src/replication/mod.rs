//! The primary's walsender as the flush signal and, with `--synchronous`, walship as a synchronous standby.
//!
//! A physical replication connection (`replication=true`, `application_name` = the sender's `--name`) streams
//! from the primary's flush position at connect time: the walsender sends only WAL its server has flushed, so
//! the end of what it sent is a flush position pushed the moment PostgreSQL flushed it, with no query. The
//! bytes are not shipped again: [`CrossCheck`] compares them with what the sender read from `pg_wal/` and
//! shipped, and a difference stops the session before anything past it is confirmed. Standby status updates
//! report as written and flushed exactly what the receiver acknowledged as durable in this session (never
//! more): with walship named in `synchronous_standby_names` a commit returns once walship's archive holds it.
//!
//! | file            | what it owns |
//! |-----------------|--------------|
//! | this file       | [`Walsender`]: opening the stream, the reader and status-writer tasks, the events |
//! | `wire`          | the socket, TLS, startup and authentication, the replication commands, the messages |
//! | `crosscheck`    | comparing shipped bytes with streamed ones |

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, Notify};
use walship_protocol::{Lsn, TimelineId};

use crate::conninfo::Conn;

mod crosscheck;
pub(crate) mod wire;

pub use crosscheck::{CrossCheck, CrossCheckError, Side};
pub use wire::ServerError;

/// How the sender learns that the primary flushed WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfirmBy {
    /// The walsender's stream where the role and `pg_hba.conf` allow a replication connection, else the query.
    Auto,
    /// The walsender's stream only: a session that cannot open it fails.
    Replication,
    /// `pg_current_wal_flush_lsn()` polled (at most every 5 ms while something is unconfirmed).
    Query,
}

/// What the stream brings.
#[derive(Debug)]
pub(crate) enum Event {
    /// WAL the primary has flushed, from `start`.
    Wal { start: Lsn, bytes: Bytes },
    /// The stream ended: the server closed it or the connection failed.
    Ended(anyhow::Error),
}

/// The time between two status updates at the least (PostgreSQL's `wal_receiver_status_interval` default).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Without `--synchronous`: at most this often a status update for a durable position that moved.
const ASYNC_GAP: Duration = Duration::from_millis(100);
/// Messages of the stream waiting for the streaming loop (each at most 128 kB, the walsender's largest).
const QUEUE: usize = 64;

/// An open replication stream and its two tasks (aborted, closing the connection, when dropped).
pub(crate) struct Walsender {
    events: mpsc::Receiver<Event>,
    durable: watch::Sender<Lsn>,
    /// Where the stream began: the primary had flushed everything before it.
    pub from: Lsn,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for Walsender {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Walsender {
    /// Opens the stream on `timeline` of the cluster `system_identifier`, from the primary's flush position;
    /// `durable` is what the receiver holds durably of this history (reported at once).
    pub(crate) async fn open(
        conn: &Conn,
        name: &str,
        system_identifier: u64,
        timeline: TimelineId,
        durable: Lsn,
        synchronous: bool,
    ) -> Result<Walsender> {
        let mut io = wire::connect(conn, name)
            .await
            .with_context(|| format!("open a replication connection ({})", conn.describe()))?;
        let (sysid, tli, from) = identify_system(&mut io).await?;
        if sysid != system_identifier {
            return Err(crate::error::Unfixable(format!(
                "the replication connection reached cluster {sysid}, the query connection cluster {system_identifier}: \
                 both come from --pgconn, check that it names one server"
            ))
            .into());
        }
        if tli != timeline {
            return Err(anyhow!(
                "the primary is on timeline {tli}, this session ships timeline {timeline}"
            ));
        }
        let command = format!("START_REPLICATION PHYSICAL {from} TIMELINE {timeline}");
        wire::start_replication(&mut io, &command).await?;
        let (read, write) = tokio::io::split(io);
        let (tx, events) = mpsc::channel(QUEUE);
        let (durable, watch) = watch::channel(durable);
        let reply = Arc::new(Notify::new());
        let reader = tokio::spawn(read_stream(
            BufReader::with_capacity(256 << 10, read),
            tx,
            reply.clone(),
        ));
        let writer = tokio::spawn(write_status(write, watch, reply, synchronous));
        Ok(Walsender {
            events,
            durable,
            from,
            tasks: [reader, writer],
        })
    }

    /// The next event of the stream (cancellation safe).
    pub(crate) async fn next(&mut self) -> Event {
        self.events
            .recv()
            .await
            .unwrap_or_else(|| Event::Ended(anyhow!("the replication stream's reader stopped")))
    }

    /// An event the stream already has, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Event> {
        match self.events.try_recv() {
            Ok(event) => Some(event),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => None,
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => Some(Event::Ended(
                anyhow!("the replication stream's reader stopped"),
            )),
        }
    }

    /// The receiver holds WAL up to `lsn` durably in this session: reported to the walsender (at once with
    /// `--synchronous`), never lower than before.
    pub(crate) fn report_durable(&self, lsn: Lsn) {
        self.durable.send_if_modified(|v| {
            let moved = lsn > *v;
            if moved {
                *v = lsn;
            }
            moved
        });
    }
}

/// What to do when the primary refuses the replication connection for good (the role, `pg_hba.conf`).
pub fn fix_for(e: &anyhow::Error) -> Option<&'static str> {
    let code = e
        .chain()
        .find_map(|c| c.downcast_ref::<ServerError>())?
        .code
        .as_str();
    Some(match code {
        "28P01" => "authentication failed: check the password",
        "28000" => "add a line for database \"replication\" and this role to the primary's pg_hba.conf, then reload it",
        "42501" => "the role needs the REPLICATION attribute: ALTER ROLE ... REPLICATION",
        _ => return None,
    })
}

/// Opens a replication connection and asks `IDENTIFY_SYSTEM` (for `check`): the system identifier, the
/// timeline and the flush position.
pub async fn probe(conn: &Conn, name: &str) -> Result<(u64, TimelineId, Lsn)> {
    let mut io = wire::connect(conn, name)
        .await
        .with_context(|| format!("open a replication connection ({})", conn.describe()))?;
    identify_system(&mut io).await
}

/// `IDENTIFY_SYSTEM`: the system identifier, the timeline and the flush position.
async fn identify_system(io: &mut Box<dyn wire::Io>) -> Result<(u64, TimelineId, Lsn)> {
    let rows = wire::simple_query(io, "IDENTIFY_SYSTEM").await?;
    let row = rows.first().context("IDENTIFY_SYSTEM returned no row")?;
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok((
        col(0).parse().context("IDENTIFY_SYSTEM: systemid")?,
        col(1).parse().context("IDENTIFY_SYSTEM: timeline")?,
        col(2).parse().context("IDENTIFY_SYSTEM: xlogpos")?,
    ))
}

/// Whether `synchronous_standby_names` (`walship`, `FIRST 1 (a, b)`, `ANY 2 (a, "B", c)`, `2 (a, b)`, `*`)
/// names `name`. Names compare as PostgreSQL compares them: case-insensitively unless double-quoted.
pub fn names_standby(setting: &str, name: &str) -> bool {
    let mut list = setting.trim();
    if let Some(open) = list.find('(') {
        list = list[open + 1..].trim_end().trim_end_matches(')');
    }
    list.split(',').map(str::trim).any(|n| {
        if n == "*" {
            return true;
        }
        match n.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\"") == name,
            None => n.eq_ignore_ascii_case(name),
        }
    })
}

/// Reads the walsender's messages: WAL goes to the streaming loop, a keepalive asking for a reply wakes the
/// status writer.
async fn read_stream<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    tx: mpsc::Sender<Event>,
    reply: Arc<Notify>,
) {
    let end = loop {
        let (tag, mut body) = match wire::read_message(&mut r).await {
            Ok(m) => m,
            Err(e) => break anyhow!(e).context("the replication connection failed"),
        };
        match (tag, body.first()) {
            (b'd', Some(b'w')) if body.len() >= 25 => {
                let start = Lsn((&body[1..9]).get_u64());
                body.advance(25);
                #[cfg(feature = "failpoints")]
                if fail::eval("sender-walsender-bytes-differ", |_| ()).is_some() && !body.is_empty() {
                    let mut b = BytesMut::from(&body[..]);
                    b[0] ^= 0xff;
                    body = b.freeze();
                }
                if tx.send(Event::Wal { start, bytes: body }).await.is_err() {
                    return;
                }
            }
            (b'd', Some(b'k')) if body.len() >= 18 && body[17] != 0 => reply.notify_one(),
            (b'd', Some(b'k')) if body.len() >= 18 => {}
            (b'd', _) => break anyhow!("the replication stream sent a message walship does not know"),
            (b'c', _) => {
                break anyhow!(
                    "the primary ended the replication stream (it is shutting down, or left the timeline)"
                )
            }
            (b'E', _) => {
                break anyhow::Error::new(ServerError::parse(&body))
                    .context("the replication stream failed")
            }
            _ => {} // NoticeResponse, ParameterStatus
        }
    };
    let _ = tx.send(Event::Ended(end)).await;
}

/// Sends standby status updates: with `synchronous` as soon as the durable position moves (coalesced while
/// one is being written), else at most every [`ASYNC_GAP`]; always when the walsender asks, and every
/// [`STATUS_INTERVAL`].
async fn write_status<W: tokio::io::AsyncWrite + Unpin>(
    mut w: W,
    mut durable: watch::Receiver<Lsn>,
    reply: Arc<Notify>,
    synchronous: bool,
) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    let mut last = Instant::now();
    let mut dirty = true;
    let mut out = BytesMut::new();
    loop {
        let send = tokio::select! {
            changed = durable.changed() => {
                if changed.is_err() {
                    return;
                }
                dirty = true;
                synchronous || last.elapsed() >= ASYNC_GAP
            }
            _ = reply.notified() => true,
            _ = tick.tick() => true,
            _ = tokio::time::sleep(ASYNC_GAP.saturating_sub(last.elapsed())), if dirty => true,
        };
        if !send {
            continue;
        }
        let lsn = *durable.borrow_and_update();
        out.clear();
        wire::status_update(lsn.0, wire::pg_now(), false, &mut out);
        if w.write_all(&out).await.is_err() || w.flush().await.is_err() {
            return; // the reader sees the connection fail
        }
        dirty = false;
        last = Instant::now();
    }
}
