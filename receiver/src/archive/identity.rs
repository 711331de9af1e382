//! `walship.id`: the cluster an archive is pinned to (system identifier, segment size, major version), and
//! why a sender of another one is refused.

use super::*;

/// Which cluster an archive belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub system_identifier: u64,
    pub wal_segment_size: WalSegSize,
    /// `server_version_num` of the first sender (only its major version is compared).
    pub pg_version_num: u32,
}

impl Identity {
    /// The PostgreSQL major version, e.g. 15 or 906 for 9.6.
    pub fn pg_major(&self) -> u32 {
        pg_major(self.pg_version_num)
    }

    /// The page checks for segments of `timeline`.
    pub fn page_expectation(&self, timeline: TimelineId) -> Option<PageExpectation> {
        Some(PageExpectation {
            magic: page_magic_for_version(self.pg_version_num)?,
            system_identifier: self.system_identifier,
            seg_size: self.wal_segment_size,
            timeline,
        })
    }

    /// Whether a sender of the `offered` cluster may write to an archive pinned to this identity.
    pub fn admits(&self, offered: &Identity) -> std::result::Result<(), IdentityMismatch> {
        if self.system_identifier != offered.system_identifier {
            return Err(IdentityMismatch::ForeignCluster {
                archive: self.system_identifier,
                sender: offered.system_identifier,
                archive_seg: self.wal_segment_size,
                sender_seg: offered.wal_segment_size,
            });
        }
        if self.wal_segment_size != offered.wal_segment_size {
            return Err(IdentityMismatch::SegmentSize {
                archive: self.wal_segment_size,
                sender: offered.wal_segment_size,
            });
        }
        if self.pg_major() != offered.pg_major() {
            return Err(IdentityMismatch::MajorVersion {
                archive: self.pg_major(),
                sender: offered.pg_major(),
            });
        }
        Ok(())
    }

    /// The content of `walship.id` (also the identity object of an object store).
    pub fn render(&self) -> String {
        format!(
            "# walship archive identity: written on first contact, never changed.\n\
             # Senders of any other cluster are refused.\n\
             system_identifier={}\nwal_segment_size={}\npg_version_num={}\n",
            self.system_identifier,
            self.wal_segment_size.bytes(),
            self.pg_version_num
        )
    }

    /// Reads [`Identity::render`]'s text.
    pub fn parse(text: &str) -> Option<Identity> {
        let mut sysid = None;
        let mut seg = None;
        let mut ver = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=')?;
            match k.trim() {
                "system_identifier" => sysid = v.trim().parse::<u64>().ok(),
                "wal_segment_size" => {
                    seg = v
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .and_then(|s| WalSegSize::new(s).ok())
                }
                "pg_version_num" => ver = v.trim().parse::<u32>().ok(),
                _ => {}
            }
        }
        Some(Identity {
            system_identifier: sysid?,
            wal_segment_size: seg?,
            pg_version_num: ver?,
        })
    }

    /// Reads the identity of the archive in `dir`, if it was pinned.
    pub fn load(dir: &Path) -> Result<Option<Identity>> {
        let path = dir.join(ID_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Identity::parse(&text)
                .map(Some)
                .with_context(|| format!("{} is damaged: it must hold system_identifier, wal_segment_size and pg_version_num", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }
}

/// The major version of a `server_version_num`.
pub fn pg_major(version_num: u32) -> u32 {
    if version_num >= 100_000 {
        version_num / 10_000
    } else {
        version_num / 100
    }
}

/// Why an archive refuses a sender's identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityMismatch {
    #[error("this archive belongs to the cluster with system identifier {archive} ({archive_seg} segments), the sender's cluster is {sender} ({sender_seg} segments): a walship archive holds the WAL of one cluster only; give this cluster its own archive directory")]
    ForeignCluster {
        archive: u64,
        sender: u64,
        archive_seg: WalSegSize,
        sender_seg: WalSegSize,
    },
    #[error("this archive holds {archive} WAL segments, the sender's cluster uses {sender}")]
    SegmentSize {
        archive: WalSegSize,
        sender: WalSegSize,
    },
    #[error(
        "this archive holds WAL of PostgreSQL major version {archive}, the sender runs {sender}"
    )]
    MajorVersion { archive: u32, sender: u32 },
}

impl IdentityMismatch {
    /// What the refused sender is told: its own side only, nothing about the archive's cluster (the
    /// receiver's log has the whole message).
    pub fn for_peer(&self) -> String {
        match self {
            IdentityMismatch::ForeignCluster { sender, sender_seg, .. } => format!(
                "this archive belongs to another cluster than this server's (system identifier {sender}, {sender_seg} segments): \
                 a walship archive holds the WAL of one cluster only; give this cluster its own archive directory (the receiver's \
                 log names the archive's cluster)"
            ),
            IdentityMismatch::SegmentSize { sender, .. } => format!(
                "this archive holds WAL segments of another size than this cluster's {sender}: give this cluster its own archive directory"
            ),
            IdentityMismatch::MajorVersion { sender, .. } => format!(
                "this archive holds WAL of another PostgreSQL major version than this server's {sender}: after a major upgrade, start a new archive directory"
            ),
        }
    }
}

/// Whether `dir` is a walship archive (it has `walship.id`); the error says what to fix.
pub fn ensure_archive(dir: &Path) -> Result<Identity> {
    if !dir.is_dir() {
        bail!(
            "archive directory {} does not exist: check --archive (the receiver's --archive directory)",
            dir.display()
        );
    }
    Identity::load(dir)?.with_context(|| {
        format!(
            "{} is not a walship archive (no {ID_FILE}): check --archive; a receiver writes {ID_FILE} when the first sender connects",
            dir.display()
        )
    })
}
