//! What a durable small append costs, three ways, on the disk of a given directory (issue 21: "measure
//! whether `sync_file_range` + `fdatasync` or `O_DSYNC` writes into the preallocated file lower the
//! receiver's CPU"). A 16 MB file is zero-filled and fsynced first, as the receiver preallocates its partials;
//! then each round appends `--writes` pieces of `--size` bytes and makes them durable:
//!
//! - `fdatasync`: `pwrite` each piece, one `fdatasync` (what the receiver does);
//! - `dsync`: the pieces as one `pwrite` to a handle opened `O_DSYNC` (durable when it returns);
//! - `sync_file_range`: `pwrite` each piece, `sync_file_range` (wait, write, wait) of the range, `fdatasync`.
//!
//! The modes alternate for `--rounds` rounds of `--appends` appends each; printed: µs of CPU (user and system,
//! the scheduler's count for this thread) and of wall time per durable append, each mode's median round.
//!
//! `cargo run --release -p walship-bench --bin walship-sync-modes -- --dir /var/lib/walship`

// the one call without a safe wrapper in the crates at hand (nix, rustix): sync_file_range
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

const SEGMENT: u64 = 16 * 1024 * 1024;

#[derive(Parser)]
#[command(
    about = "The CPU and time of a durable small append: fdatasync, O_DSYNC, sync_file_range"
)]
struct Args {
    /// A directory on the disk to measure (the file is removed afterwards).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Bytes per piece (a live message of one or a few commits is 0.6-1.6 kB).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Pieces per durable append (the receiver wrote 2.5 per fdatasync at 1000 TPS).
    #[arg(long, default_value_t = 1)]
    writes: usize,
    /// Durable appends per round.
    #[arg(long, default_value_t = 2000)]
    appends: usize,
    /// Rounds per mode, alternated.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Fdatasync,
    Dsync,
    SyncFileRange,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Fdatasync => "pwrite + fdatasync",
            Mode::Dsync => "O_DSYNC pwrite",
            Mode::SyncFileRange => "pwrite + sync_file_range + fdatasync",
        }
    }
}

/// CPU time this thread has run, in seconds (`/proc/thread-self/schedstat`: nanoseconds on a CPU, user and
/// system, the scheduler's own count).
fn cpu_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("read /proc/thread-self/schedstat")?;
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("/proc/thread-self/schedstat holds no run time")?;
    Ok(ns as f64 / 1e9)
}

/// One round of `args.appends` durable appends in `mode` into a fresh zero-filled file: (CPU µs, wall µs)
/// per append.
fn round(args: &Args, mode: Mode) -> Result<(f64, f64)> {
    let path = args.dir.join("walship-sync-modes.tmp");
    {
        let mut f = File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..SEGMENT / (1 << 20) {
            f.write_all(&zeros)
                .with_context(|| format!("zero-fill {}", path.display()))?;
        }
        f.sync_all()
            .with_context(|| format!("fsync {}", path.display()))?;
    }
    let mut open = OpenOptions::new();
    open.write(true);
    if matches!(mode, Mode::Dsync) {
        open.custom_flags(libc::O_DSYNC);
    }
    let f = open
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let piece = vec![7u8; args.size];
    let whole = vec![7u8; args.size * args.writes];
    let append = (args.size * args.writes) as u64;
    let mut at = 0u64;
    let (cpu0, wall0) = (cpu_seconds()?, Instant::now());
    for _ in 0..args.appends {
        if at + append > SEGMENT {
            at = 0;
        }
        match mode {
            Mode::Fdatasync | Mode::SyncFileRange => {
                for k in 0..args.writes {
                    f.write_all_at(&piece, at + (k * args.size) as u64)?;
                }
                if matches!(mode, Mode::SyncFileRange) {
                    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                    // SAFETY: a valid descriptor owned by `f`; no memory is passed.
                    let rc = unsafe {
                        libc::sync_file_range(f.as_raw_fd(), at as i64, append as i64, flags)
                    };
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error())
                            .context(format!("sync_file_range {}", path.display()));
                    }
                }
                f.sync_data()
                    .with_context(|| format!("fdatasync {}", path.display()))?;
            }
            Mode::Dsync => f.write_all_at(&whole, at)?,
        }
        at += append;
    }
    let cpu = cpu_seconds()? - cpu0;
    let wall = wall0.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    let n = args.appends as f64;
    Ok((cpu / n * 1e6, wall / n * 1e6))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let modes = [Mode::Fdatasync, Mode::Dsync, Mode::SyncFileRange];
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    for _ in 0..args.rounds {
        for (i, mode) in modes.iter().enumerate() {
            results[i].push(round(&args, *mode)?);
        }
    }
    println!(
        "durable appends of {} x {} bytes into a preallocated 16 MB file in {} ({} rounds of {}, alternated; median round)",
        args.writes,
        args.size,
        args.dir.display(),
        args.rounds,
        args.appends
    );
    for (i, mode) in modes.iter().enumerate() {
        let mut r = results[i].clone();
        r.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (cpu, wall) = r[r.len() / 2];
        let all: Vec<String> = results[i].iter().map(|(c, _)| format!("{c:.1}")).collect();
        println!(
            "  {:<38} {cpu:>6.1} µs CPU {wall:>7.1} µs wall per append   (CPU per round: {})",
            mode.name(),
            all.join(", ")
        );
    }
    Ok(())
}
