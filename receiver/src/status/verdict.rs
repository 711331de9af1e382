//! When `status` says warning or critical: lag thresholds and the verdict, as monitoring plugins give it.

use serde::{Deserialize, Serialize};

use super::Report;

/// A lag threshold: bytes behind the primary's flush position, or seconds the archive has been behind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lag {
    Bytes(u64),
    Seconds(f64),
}

impl std::str::FromStr for Lag {
    type Err = String;
    /// `1048576`, `512kB`, `16MB`, `1GB` (bytes, powers of 1024 as in PostgreSQL), or `30s`, `5min`.
    fn from_str(text: &str) -> Result<Lag, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a lag: use bytes (16MB) or seconds (30s)"))?;
        let bytes = |f: f64| Ok(Lag::Bytes((n * f) as u64));
        match unit.trim() {
            "" | "B" => bytes(1.0),
            "kB" => bytes(1024.0),
            "MB" => bytes(1024.0 * 1024.0),
            "GB" => bytes(1024.0 * 1024.0 * 1024.0),
            "s" => Ok(Lag::Seconds(n)),
            "min" => Ok(Lag::Seconds(n * 60.0)),
            other => Err(format!(
                "{text:?}: unknown unit {other:?} (bytes: B, kB, MB, GB; time: s, min)"
            )),
        }
    }
}

/// When `status` says warning or critical.
#[derive(Clone, Debug, Default)]
pub struct Thresholds {
    pub warn_lag: Option<Lag>,
    pub crit_lag: Option<Lag>,
    /// No sender connected for longer than this is critical (shorter: a warning).
    pub crit_no_sender_seconds: f64,
}

/// The verdict of `status`, as monitoring plugins give it: exit code 0 ok, 1 warning, 2 critical.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub code: u8,
    pub level: String,
    pub reasons: Vec<String>,
}

impl Report {
    /// Judges the report against `t` and records the verdict in it.
    pub fn judge(&mut self, t: &Thresholds) -> &Verdict {
        let mut code = 0u8;
        let mut reasons = Vec::new();
        let mut say = |level: u8, why: String| {
            code = code.max(level);
            reasons.push(why);
        };
        if let Some(down) = &self.primary_down {
            let all = self.primary_wal_archived.unwrap_or(false);
            say(
                2,
                format!(
                    "the primary is down (its WAL ends at {}; all of it archived: {})",
                    down.wal_end,
                    if all { "yes" } else { "no" }
                ),
            );
        }
        if !self.receiver_running {
            say(2, "the receiver is not running".into());
        } else if !self.sender_connected {
            let secs = self.no_sender_seconds.unwrap_or(0.0);
            let level = if secs > t.crit_no_sender_seconds {
                2
            } else {
                1
            };
            say(level, format!("no sender connected for {secs:.0} s"));
        }
        let exceeds = |lag: Lag| match lag {
            Lag::Bytes(b) => self.lag_bytes.is_some_and(|l| l > b),
            Lag::Seconds(s) => self.lag_seconds.is_some_and(|l| l > s),
        };
        let lag_text = format!(
            "lag {} bytes, {:.1} s",
            self.lag_bytes.unwrap_or(0),
            self.lag_seconds.unwrap_or(0.0)
        );
        if t.crit_lag.is_some_and(exceeds) {
            say(
                2,
                format!(
                    "{lag_text} (critical above {:?})",
                    t.crit_lag.unwrap_or(Lag::Bytes(0))
                ),
            );
        } else if t.warn_lag.is_some_and(exceeds) {
            say(
                1,
                format!(
                    "{lag_text} (warning above {:?})",
                    t.warn_lag.unwrap_or(Lag::Bytes(0))
                ),
            );
        }
        let level = ["OK", "WARNING", "CRITICAL"][code as usize].to_string();
        if reasons.is_empty() {
            reasons.push(format!("shipping; {lag_text}"));
        }
        self.verdict.insert(Verdict {
            code,
            level,
            reasons,
        })
    }
}
