//! Whether the primary's server is down: only positive evidence (it refuses connections, it says it is
//! starting or shutting down) counts; a missing `postmaster.pid` alone proves nothing (another PID or mount
//! namespace).

use super::*;

/// What the sender can tell of the primary's server after its connection failed.
pub(crate) enum ServerState {
    /// A new connection works.
    Up,
    /// The server refuses connections: nothing listens, its socket is gone, or it is starting up, in
    /// crash recovery or shutting down.
    Down(String),
    /// Neither (yet).
    Unknown(String),
}

/// What `postmaster.pid` in `data_dir` says of the postmaster.
pub(crate) enum Postmaster {
    /// Running (a server that is up, shutting down or restarting).
    Running,
    /// The file is gone (a clean shutdown), or its process is gone or a zombie waiting to be reaped.
    Gone(String),
    /// No data directory, or the file cannot be read.
    Unknown,
}

pub(crate) fn postmaster(data_dir: Option<&std::path::Path>) -> Postmaster {
    let Some(dir) = data_dir else {
        return Postmaster::Unknown;
    };
    let text = match std::fs::read_to_string(dir.join("postmaster.pid")) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Postmaster::Gone("postmaster.pid is gone".into())
        }
        Err(_) => return Postmaster::Unknown,
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return Postmaster::Unknown;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if stat.is_empty() || state == Some("Z") || state == Some("X") {
        Postmaster::Gone(format!("its postmaster (pid {pid}) is gone"))
    } else {
        Postmaster::Running
    }
}

/// Whether the postmaster still runs (a server shutting down or restarting).
pub(crate) fn postmaster_running(data_dir: Option<&std::path::Path>) -> bool {
    matches!(postmaster(data_dir), Postmaster::Running)
}

/// Only positive evidence counts as "down": the server refusing connections (nothing listens, its socket is
/// gone, or it says it is starting up, in recovery or shutting down). A missing `postmaster.pid` or an
/// unreadable `/proc/PID` alone proves nothing (a sender in another PID or mount namespace, a container
/// sidecar, `--wal-dir` without the data directory), so a working connection always means "up".
pub(crate) async fn server_state(
    data_dir: Option<&std::path::Path>,
    pgconn: &conninfo::Conn,
) -> ServerState {
    let postmaster = match postmaster(data_dir) {
        Postmaster::Gone(why) => format!("{why}; "),
        _ => String::new(),
    };
    match tokio::time::timeout(Duration::from_secs(2), Primary::connect(pgconn)).await {
        Ok(Ok(_)) => ServerState::Up,
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            let down = [
                "starting up",
                "shutting down",
                "in recovery mode",
                "not yet accepting connections",
                "Connection refused",
                "No such file or directory",
            ];
            if down.iter().any(|p| text.contains(p)) {
                ServerState::Down(format!("{postmaster}it refuses connections: {text}"))
            } else {
                ServerState::Unknown(format!("{postmaster}{text}"))
            }
        }
        Err(_) => ServerState::Unknown(format!("{postmaster}a connection attempt timed out")),
    }
}
