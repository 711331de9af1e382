//! What a negotiated protocol version allows. Both daemons ask [`Features`] instead of comparing version
//! numbers, so each feature is named once, with the version that brought it.

use crate::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};

/// The features of one session's protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    version: u16,
}

impl Features {
    /// The highest version both sides speak, given the sender's offered range; `None` when the ranges do
    /// not meet.
    pub fn negotiate(offered_min: u16, offered_max: u16) -> Option<Features> {
        let version = PROTOCOL_VERSION_MAX.min(offered_max);
        (version >= PROTOCOL_VERSION_MIN.max(offered_min)).then_some(Features { version })
    }

    /// The features of `version` as the receiver named it in `Welcome`.
    pub fn of(version: u16) -> Features {
        Features { version }
    }

    /// The version number on the wire.
    pub fn version(self) -> u16 {
        self.version
    }

    /// Version 2: the sender reports a stopped primary with `PrimaryDown`.
    pub fn primary_down(self) -> bool {
        self.version >= 2
    }

    /// Version 3: the sender ships WAL the primary has written but not flushed (provisional), its
    /// `Keepalive`s confirm WAL up to the primary's flush position, and `Ack` carries the confirmed position.
    /// Before it a sender sends only flushed WAL, which is confirmed as it arrives.
    pub fn ship_on_write(self) -> bool {
        self.version >= 3
    }

    /// Version 4: `Welcome` says whether the sender may send `WalZstd`.
    pub fn wire_compression(self) -> bool {
        self.version >= 4
    }

    /// Version 5: the sender reports how the primary counts it as a synchronous standby (`SyncState`).
    pub fn sync_state(self) -> bool {
        self.version >= 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_the_highest_common_version() {
        let f = Features::negotiate(1, u16::MAX).unwrap();
        assert_eq!(f.version(), PROTOCOL_VERSION_MAX);
        assert!(f.primary_down() && f.ship_on_write() && f.wire_compression());
        let old = Features::negotiate(1, 2).unwrap();
        assert!(old.primary_down() && !old.ship_on_write() && !old.wire_compression());
        assert_eq!(
            Features::negotiate(PROTOCOL_VERSION_MAX + 1, u16::MAX),
            None
        );
    }
}
