//! A real Azure Blob Storage emulator for the object-store tests: Azurite (the Azure SDK team's emulator, from
//! the npm registry), started per test on a free port with its data in the test directory. The harness
//! installs a pinned version with npm into the workspace's `target/tools/azurite` on first use (one install at
//! a time across test processes), so `cargo test --workspace` needs nothing installed by hand beyond Node.js
//! and npm (which the version matrix needs too); a failed install stops with the command to run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use crate::{Daemon, TestDir};

/// The Azurite release the tests run against.
const AZURITE_VERSION: &str = "3.37.0";
/// Azurite's well-known development account and key (public, in Microsoft's documentation).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The container the tests use.
pub const CONTAINER: &str = "wal";

/// Azurite's blob service script: `WALSHIP_AZURITE` (a checkout or install whose
/// `node_modules/azurite/dist/src/blob/main.js` exists), else the one the harness installs.
fn script() -> PathBuf {
    let root = std::env::var_os("WALSHIP_AZURITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| install(&crate::s3::tools_dir().join("azurite")));
    root.join("node_modules/azurite/dist/src/blob/main.js")
}

fn install(root: &Path) -> PathBuf {
    let main = root.join("node_modules/azurite/dist/src/blob/main.js");
    std::fs::create_dir_all(root).expect("create target/tools/azurite");
    let lock = std::fs::File::create(root.join(".install.lock")).expect("create the install lock");
    lock.lock().expect("take the install lock");
    if !main.is_file() {
        println!(
            "installing azurite {AZURITE_VERSION} into {} (once)",
            root.display()
        );
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(root)
            .arg(format!("azurite@{AZURITE_VERSION}"))
            .status();
        let ok = matches!(status, Ok(s) if s.success());
        assert!(
            ok && main.is_file(),
            "the Azure tests need the Azurite emulator, and installing it with npm failed ({status:?}): install \
             Node.js and npm, then run `npm install --prefix {} azurite@{AZURITE_VERSION}`, or set WALSHIP_AZURITE \
             to a directory where azurite is installed",
            root.display()
        );
    }
    root.to_owned()
}

/// A running Azurite blob service with the container [`CONTAINER`].
pub struct Azurite {
    pub port: u16,
    daemon: Option<Daemon>,
    script: PathBuf,
    data: PathBuf,
}

impl Azurite {
    pub fn start(dir: &TestDir, name: &str) -> Azurite {
        let script = script();
        let data = dir.subdir(name);
        crate::env::chown_to_db_user(&data);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut a = Azurite {
            port,
            daemon: None,
            script,
            data,
        };
        a.resume(dir);
        a.create_container();
        a
    }

    /// Starts the emulator (again), on the same port and data; waits until it accepts connections.
    pub fn resume(&mut self, dir: &TestDir) {
        let mut cmd = Command::new("node");
        cmd.arg(&self.script)
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &self.port.to_string(),
            ])
            .arg("--location")
            .arg(&self.data)
            .args(["--silent", "--skipApiVersionCheck"]);
        self.daemon = Some(Daemon::spawn(dir, "azurite", cmd));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "azurite did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `az://wal/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("az://{CONTAINER}/{prefix}")
    }

    /// The client settings for walship (`--object-store-option`).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_ACCOUNT_NAME".into(), ACCOUNT.into()),
            ("AZURE_STORAGE_ACCOUNT_KEY".into(), ACCOUNT_KEY.into()),
            (
                "AZURE_STORAGE_ENDPOINT".into(),
                format!("http://127.0.0.1:{}/{ACCOUNT}", self.port),
            ),
            ("AZURE_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// Creates the container: one REST call signed with the account's shared key (object_store creates no
    /// containers).
    fn create_container(&self) {
        use base64::Engine;
        let date = httpdate::fmt_http_date(SystemTime::now());
        let version = "2021-08-06";
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{CONTAINER}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(ACCOUNT_KEY)
            .expect("the account key");
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            string_to_sign.as_bytes(),
        );
        let signature = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
        let request = format!(
            "PUT /{ACCOUNT}/{CONTAINER}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\n\
             x-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            port = self.port
        );
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to azurite");
        stream.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 201"),
            "azurite did not create the container: {}",
            answer.lines().next().unwrap_or_default()
        );
    }
}
