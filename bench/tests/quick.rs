//! The benchmark's one-minute smoke run: every scenario, walship and the references, against a real server.
//! It proves the bench works; the figures of a debug build prove nothing and are not asserted.

use std::process::Command;

#[test]
fn quick_bench_runs_every_scenario_for_every_tool() {
    let exe = env!("CARGO_BIN_EXE_walship-bench");
    let bin_dir = std::path::Path::new(exe).parent().unwrap();
    let json =
        std::env::temp_dir().join(format!("walship-bench-quick-{}.json", std::process::id()));
    let out = Command::new(exe)
        .args(["--quick", "--sync-rate", "50", "--json"])
        .arg(&json)
        .env("WALSHIP_BIN_DIR", bin_dir)
        .output()
        .expect("run walship-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walship-bench --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);

    let lag = report["lag"].as_array().unwrap();
    for target in [
        "walship",
        "pg_receivewal",
        "pg_receivewal --synchronous",
        "pg_receivewal --synchronous (TLS)",
    ] {
        for profile in ["unthrottled", "rate 20 tps"] {
            let r = lag
                .iter()
                .find(|r| r["target"] == target && r["profile"] == profile)
                .unwrap_or_else(|| panic!("no lag result for {target} / {profile}"));
            assert!(
                r["probe_ms"]["n"].as_u64().unwrap() > 0,
                "{target} {profile}: no probe"
            );
            assert!(
                r["probe_ms"]["max"].as_f64().unwrap() < 60_000.0,
                "{target} {profile}: a probe never arrived"
            );
        }
    }
    assert!(lag
        .iter()
        .any(|r| r["target"].as_str().unwrap().starts_with("archive_command")));
    let catchup = report["catchup"].as_array().unwrap();
    assert_eq!(catchup.len(), 2);
    for c in catchup {
        assert!(c["mb_per_s"].as_f64().unwrap() > 0.0, "{c}");
    }
    assert!(report["ceilings"]["write_fsync_mb_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["overhead"]["walship_ratio"].as_f64().unwrap() > 0.0);
    let crash = report["crash"].as_array().unwrap();
    assert_eq!(crash.len(), 2);
    for t in crash {
        assert!(t["acknowledged"].as_u64().unwrap() > 0, "{t}");
        assert_eq!(
            t["walship_possibly_lost"].as_u64(),
            Some(0),
            "walship lost commits: {t}"
        );
    }
    // synchronous standbys: both measured; a host death with both synchronous loses nothing in either
    let sync = &report["synchronous"];
    for k in [
        "walship_sync_tps",
        "receivewal_sync_tps",
        "walship_async_tps",
        // --sync-rate: the medians of the steady-rate runs, from pgbench's transaction logs
        "walship_sync_p50_at_rate_ms",
        "receivewal_sync_p50_at_rate_ms",
    ] {
        assert!(sync[k].as_f64().unwrap() > 0.0, "{k}: {sync}");
    }
    if std::path::Path::new("/dev/shm").is_dir() {
        for k in [
            "walship_sync_in_memory_tps",
            "receivewal_sync_in_memory_tps",
            "walship_sync_p50_at_rate_in_memory_ms",
        ] {
            assert!(sync[k].as_f64().unwrap() > 0.0, "{k}: {sync}");
        }
    }
    let deaths = report["sync_host_death"].as_array().unwrap();
    assert_eq!(deaths.len(), 2);
    for t in deaths {
        assert!(t["acknowledged"].as_u64().unwrap() > 0, "{t}");
        assert_eq!(
            t["walship_lost"].as_u64(),
            Some(0),
            "walship --synchronous lost commits: {t}"
        );
        assert_eq!(t["receivewal_lost"].as_u64(), Some(0), "{t}");
    }
    let compression = &report["compression"];
    let wire = compression["wire"].as_array().unwrap();
    assert!(wire.len() >= 2, "{compression}");
    for w in wire {
        assert!(w["wal_mb"].as_f64().unwrap() > 0.0, "{w}");
        if w["compression"] == "zstd" {
            assert!(w["ratio"].as_f64().unwrap() > 1.0, "{w}");
        } else {
            assert!((w["ratio"].as_f64().unwrap() - 1.0).abs() < 0.01, "{w}");
        }
    }
    let restore = compression["restore"].as_array().unwrap();
    assert_eq!(restore.len(), 4, "{compression}");
    for r in restore {
        assert!(r["segments_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    // verify read every record of the primary's WAL without a problem, as pg_waldump did
    let verify = &report["verify"];
    assert!(verify["segments"].as_u64().unwrap() > 0, "{verify}");
    assert!(verify["records"].as_u64().unwrap() > 0, "{verify}");
    for k in [
        "walship_verify_seconds",
        "pg_waldump_seconds",
        "upload_zstd_age_s_per_gb",
        "restore_age_zstd_s_per_gb",
    ] {
        assert!(verify[k].as_f64().unwrap() > 0.0, "{k}: {verify}");
    }
}
