//! WAL positions.

use std::fmt;
use std::str::FromStr;

use crate::error::LsnParseError;

/// A position in the WAL stream (PostgreSQL's `XLogRecPtr`), printed and parsed as `X/X` in upper-case hex
/// like `pg_current_wal_flush_lsn()` prints it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position, `0/0`.
    pub const INVALID: Lsn = Lsn(0);

    /// `self + n`, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }

    /// Bytes from `other` up to `self` (zero when `other` is ahead).
    pub fn saturating_sub(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let part = |p: &str| -> Result<u64, LsnParseError> {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(p, 16).map_err(|_| err())
        };
        Ok(Lsn((part(hi)? << 32) | part(lo)?))
    }
}

/// In JSON, TOML and every other serde format an LSN is its `X/X` text, as PostgreSQL prints it.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_uses_the_text_form() {
        let lsn = Lsn((1 << 32) | 0x16B_3748);
        assert_eq!(serde_json::to_string(&lsn).unwrap(), "\"1/16B3748\"");
        assert_eq!(serde_json::from_str::<Lsn>("\"1/16B3748\"").unwrap(), lsn);
        let err = serde_json::from_str::<Lsn>("\"16B3748\"").unwrap_err();
        assert!(err.to_string().contains("not a WAL position"), "{err}");
    }

    #[test]
    fn parse_and_print() {
        for (text, value) in [
            ("0/0", 0u64),
            ("0/16B3748", 0x16B_3748),
            ("1/0", 1 << 32),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn, Lsn(value));
            assert_eq!(lsn.to_string(), text);
        }
        // lower case is accepted (PostgreSQL's pg_lsn input is case-insensitive), printing is upper case
        assert_eq!("a/b".parse::<Lsn>().unwrap().to_string(), "A/B");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "/",
            "0",
            "0/",
            "/0",
            "x/0",
            "0/0/0",
            "123456789/0",
            "0/-1",
            " 0/0",
            "+1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }
}
