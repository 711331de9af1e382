//! PostgreSQL's own recovery TAP tests (`src/test/recovery/t`), to run them with walship as the archive.
//!
//! The test scripts come from the Debian source package of the installed server: the harness fetches its
//! `.dsc` and upstream tarball from the Debian archive once (into the workspace's `target/tools`, under a
//! file lock), checks the tarball against the `.dsc`'s SHA-256 and keeps only the recovery tests. The
//! TAP modules (`PostgreSQL::Test::Cluster`) come with Debian's `postgresql-client-NN`; IPC::Run, which they
//! need, is Debian's `libipc-run-perl`, unpacked into `target/tools` when perl lacks it. Anything missing
//! stops the test with the fix.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::pg_bin;

/// What running the suite needs.
pub struct RecoverySuite {
    /// The server's bin directory.
    pub bin: PathBuf,
    /// The directory holding the suite's `*.pl` scripts.
    pub tests: PathBuf,
    /// Perl library directories: the TAP modules, and IPC::Run when perl lacks it.
    pub perl_lib: Vec<PathBuf>,
    /// `pg_regress`, which `PostgreSQL::Test::Cluster` calls.
    pub pg_regress: PathBuf,
    /// The Debian package version of the server, e.g. `15.18-0+deb12u1`.
    pub version: String,
}

/// Where the Debian archive keeps source packages (security updates first).
const POOLS: &[&str] = &[
    "http://deb.debian.org/debian-security/pool/updates/main",
    "http://deb.debian.org/debian/pool/main",
];

/// Finds or fetches everything the recovery suite of the installed server needs.
pub fn recovery_suite() -> RecoverySuite {
    let bin = pg_bin();
    let root = bin
        .parent()
        .expect("PostgreSQL's bin has a parent")
        .to_path_buf();
    let major = root
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| {
            panic!(
                "{} is not a Debian PostgreSQL installation (/usr/lib/postgresql/NN/bin): PostgreSQL's recovery suite \
                 runs against Debian's server. Fix: apt-get install -y postgresql, and leave WALSHIP_PG_BIN unset",
                bin.display()
            )
        });
    let modules = root.join("lib/pgxs/src/test/perl");
    let pg_regress = root.join("lib/pgxs/src/test/regress/pg_regress");
    assert!(
        modules.join("PostgreSQL/Test/Cluster.pm").is_file() && pg_regress.is_file(),
        "PostgreSQL's TAP modules are not in {}: they come with Debian's postgresql-client-{major}. \
         Fix: apt-get install -y postgresql-client-{major}",
        modules.display()
    );
    let version = package_version(major);
    let tools = crate::s3::tools_dir();
    std::fs::create_dir_all(&tools).expect("create target/tools");
    let lock = std::fs::File::create(tools.join(".pg-source.lock")).expect("create the fetch lock");
    lock.lock().expect("take the fetch lock");
    let tests = tools.join(format!("pg-recovery-tests-{version}"));
    if !tests.join("002_archiving.pl").is_file() {
        fetch_tests(major, &version, &tools, &tests);
    }
    let mut perl_lib = vec![modules];
    if let Some(ipc_run) = ipc_run(&tools) {
        perl_lib.push(ipc_run);
    }
    RecoverySuite {
        bin,
        tests,
        perl_lib,
        pg_regress,
        version,
    }
}

/// The installed version of Debian's `postgresql-NN`.
fn package_version(major: u32) -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", &format!("postgresql-{major}")])
        .output()
        .expect("run dpkg-query");
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && !v.is_empty(),
        "Debian's postgresql-{major} is not installed (dpkg-query: {}): the recovery suite comes from its source package. \
         Fix: apt-get install -y postgresql-{major}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    v
}

/// `curl -fsS url -o to`; whether it succeeded.
fn download(url: &str, to: &Path) -> bool {
    Command::new("curl")
        .args(["-fsSL", "--retry", "3", "-o"])
        .arg(to)
        .arg(url)
        .status()
        .unwrap_or_else(|e| panic!("run curl (apt-get install -y curl): {e}"))
        .success()
}

/// Fetches the source package's `.dsc` and upstream tarball, checks it, and unpacks the recovery tests
/// into `dest`.
fn fetch_tests(major: u32, version: &str, tools: &Path, dest: &Path) {
    let package = format!("postgresql-{major}");
    let unepoched = version.split_once(':').map_or(version, |(_, v)| v);
    let dsc_name = format!("{package}_{unepoched}.dsc");
    let dsc_path = tools.join(&dsc_name);
    println!("fetching PostgreSQL's recovery tests from the Debian source package {package} {version} (once)");
    let pool = POOLS
        .iter()
        .find(|pool| download(&format!("{pool}/p/{package}/{dsc_name}"), &dsc_path))
        .unwrap_or_else(|| {
            panic!(
                "the Debian source package {dsc_name} is in none of {POOLS:?}: PostgreSQL's recovery suite comes from it. \
                 Fix: make deb.debian.org reachable, or upgrade postgresql-{major} to a version the archive still holds"
            )
        });
    let dsc = std::fs::read_to_string(&dsc_path).expect("read the .dsc");
    // "Checksums-Sha256:" then " <sha256> <size> <name>" lines
    let (sha, tarball) = dsc
        .split("Checksums-Sha256:")
        .nth(1)
        .and_then(|rest| {
            rest.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[2].contains(".orig.tar."))
                    .then(|| (f[0].to_owned(), f[2].to_owned()))
            })
        })
        .unwrap_or_else(|| panic!("{dsc_name} names no upstream tarball with a SHA-256"));
    let tar_path = tools.join(&tarball);
    assert!(
        download(&format!("{pool}/p/{package}/{tarball}"), &tar_path),
        "download {tarball} from {pool}"
    );
    let out = Command::new("sha256sum")
        .arg(&tar_path)
        .output()
        .expect("run sha256sum");
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.split_whitespace().next() == Some(sha.as_str()),
        "{tarball}: SHA-256 {got} differs from {sha} in {dsc_name}: a damaged download; run the tests again"
    );
    let unpack = tools.join(format!(".unpack-{version}"));
    let _ = std::fs::remove_dir_all(&unpack);
    std::fs::create_dir_all(&unpack).expect("create the unpack directory");
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&tar_path)
        .arg("-C")
        .arg(&unpack)
        .args([
            "--strip-components=5",
            "--wildcards",
            "*/src/test/recovery/t/*.pl",
        ])
        .status()
        .expect("run tar");
    assert!(status.success(), "unpack the recovery tests from {tarball}");
    std::fs::rename(&unpack, dest).expect("move the recovery tests into place");
    let _ = std::fs::remove_file(&tar_path);
    let _ = std::fs::remove_file(&dsc_path);
}

/// A directory holding IPC::Run when the system perl lacks it (Debian's `libipc-run-perl`, unpacked).
fn ipc_run(tools: &Path) -> Option<PathBuf> {
    let has = Command::new("perl")
        .args(["-MIPC::Run", "-e", "1"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run perl (apt-get install -y perl): {e}"))
        .success();
    if has {
        return None;
    }
    let root = tools.join("perl-ipc-run");
    let lib = root.join("usr/share/perl5");
    if lib.join("IPC/Run.pm").is_file() {
        return Some(lib);
    }
    println!(
        "unpacking Debian's libipc-run-perl into {} (once)",
        root.display()
    );
    let download = tools.join(".ipc-run");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).expect("create the download directory");
    let ok = Command::new("apt-get")
        .args(["download", "libipc-run-perl"])
        .current_dir(&download)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let deb = std::fs::read_dir(&download).ok().and_then(|d| {
        d.flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
    });
    let deb = deb.filter(|_| ok).unwrap_or_else(|| {
        panic!(
            "PostgreSQL's TAP modules need IPC::Run, and `apt-get download libipc-run-perl` failed. \
             Fix: apt-get install -y libipc-run-perl"
        )
    });
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .expect("run dpkg-deb");
    assert!(status.success(), "unpack {}", deb.display());
    let _ = std::fs::remove_dir_all(&download);
    Some(lib)
}
