//! Reading the daemons' Prometheus endpoints (`--metrics-listen`).

use std::io::{Read, Write};

use crate::cluster::WAIT;
use crate::Daemon;

/// GET /metrics from 127.0.0.1:`port`.
pub fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("send request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read metrics");
    assert!(
        text.starts_with("HTTP/1.") && text.contains(" 200 "),
        "{text}"
    );
    text
}

/// The value of the sample `name` (no labels).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// The port of a daemon started with `--metrics-listen 127.0.0.1:0` (from its log).
pub fn metrics_port(d: &mut Daemon) -> u16 {
    let l = d.wait_for_log("metrics at http://", WAIT);
    l.split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {l:?}"))
}
