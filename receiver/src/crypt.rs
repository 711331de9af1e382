//! Encryption at rest of the object store, on the client side, with age (X25519 recipients): the receiver
//! encrypts every object before it leaves the standby with one or more public keys (`--store-encrypt-to
//! age1…`), and only what restores from the store holds the private key (`--store-identity FILE`, an age
//! identity file). Rotation: the receiver encrypts to a new recipient from some moment on; the identity file
//! of restore keeps the old identity beside the new one, and objects under either stay readable.
//!
//! An encrypted object is `walship-age1 <key ids> <length> <CRC-32C>\n` followed by the age file (binary) of
//! the zstd frame. The key id (the first 16 hex digits of the SHA-256 of a recipient's `age1…` string; also in
//! the object's metadata where the store keeps metadata) names the key in errors without revealing it. The
//! length and CRC-32C of the archive file (as the store's metadata already held them) let a receiver that
//! holds only the public key tell a retried upload of the same file from another writer's. Identities are
//! never printed, logged or shown by `Debug`.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use anyhow::{anyhow, bail, Context, Result};

/// The first line of an encrypted object.
pub const MAGIC: &[u8] = b"walship-age1 ";
/// The metadata key of the key ids an object is encrypted for.
pub const KEY_ID_KEY: &str = "walship-key-id";

/// The id of a recipient (public key): 16 hex digits of the SHA-256 of its `age1…` string.
pub fn key_id(recipient: &age::x25519::Recipient) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, recipient.to_string().as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The public keys objects are encrypted to.
#[derive(Clone)]
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
    ids: String,
}

impl fmt::Debug for Recipients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "recipients with key ids {}", self.ids)
    }
}

impl Recipients {
    /// Parses `age1…` public keys (`--store-encrypt-to`).
    pub fn parse(keys: &[String]) -> Result<Option<Recipients>> {
        if keys.is_empty() {
            return Ok(None);
        }
        let keys = keys
            .iter()
            .map(|k| {
                age::x25519::Recipient::from_str(k.trim()).map_err(|e| {
                    anyhow!(
                        "--store-encrypt-to {:?}: not an age X25519 public key (age1…, as `walship-receiver \
                         keygen` prints): {e}",
                        k.trim()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ids = keys.iter().map(key_id).collect::<Vec<_>>().join(",");
        Ok(Some(Recipients { keys, ids }))
    }

    /// The key ids, comma-separated.
    pub fn key_ids(&self) -> &str {
        &self.ids
    }

    /// `plain` encrypted: the header line (naming the archive file's length and CRC-32C, `file`), then the
    /// age file.
    pub fn encrypt(&self, plain: &[u8], file: (u64, u32)) -> Result<Vec<u8>> {
        let encryptor =
            age::Encryptor::with_recipients(self.keys.iter().map(|k| k as &dyn age::Recipient))
                .context("age: no recipient")?;
        let mut out = Vec::with_capacity(plain.len() + 256);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(format!("{} {} {:08x}\n", self.ids, file.0, file.1).as_bytes());
        let mut writer = encryptor.wrap_output(&mut out).context("age: encrypt")?;
        writer.write_all(plain).context("age: encrypt")?;
        writer.finish().context("age: encrypt")?;
        Ok(out)
    }
}

/// The private keys objects are decrypted with: an age identity file (`AGE-SECRET-KEY-1…` lines, `#`
/// comments); several lines form a keyring (rotation).
#[derive(Clone)]
pub struct Identities {
    file: PathBuf,
    keys: Vec<age::x25519::Identity>,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identities from {} (key ids {})",
            self.file.display(),
            self.key_ids()
        )
    }
}

impl Identities {
    /// Reads an identity file. Its lines are never echoed in errors.
    pub fn load(file: &Path) -> Result<Identities> {
        let text = std::fs::read_to_string(file).with_context(|| {
            format!(
                "--store-identity {}: cannot read the identity file",
                file.display()
            )
        })?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match age::x25519::Identity::from_str(line) {
                Ok(k) => keys.push(k),
                Err(_) => bail!(
                    "--store-identity {}: line {} is not an age X25519 identity (AGE-SECRET-KEY-1…, as \
                     `walship-receiver keygen` writes)",
                    file.display(),
                    n + 1
                ),
            }
        }
        if keys.is_empty() {
            bail!(
                "--store-identity {}: no identity in the file (AGE-SECRET-KEY-1… lines)",
                file.display()
            );
        }
        Ok(Identities {
            file: file.to_owned(),
            keys,
        })
    }

    /// The key ids of the identities' public keys, comma-separated.
    pub fn key_ids(&self) -> String {
        self.keys
            .iter()
            .map(|k| key_id(&k.to_public()))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// The header line of an encrypted object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub key_ids: String,
    /// The archive file's length and CRC-32C.
    pub file: Option<(u64, u32)>,
}

/// Whether stored bytes are an encrypted object; then its header and the age file.
pub fn split(stored: &[u8]) -> Option<(Header, &[u8])> {
    let rest = stored.strip_prefix(MAGIC)?;
    let end = rest.iter().take(1024).position(|b| *b == b'\n')?;
    let line = String::from_utf8_lossy(&rest[..end]).into_owned();
    let mut fields = line.split(' ');
    let key_ids = fields.next().unwrap_or_default().to_owned();
    let file = match (fields.next(), fields.next()) {
        (Some(len), Some(crc)) => len.parse().ok().zip(u32::from_str_radix(crc, 16).ok()),
        _ => None,
    };
    Some((Header { key_ids, file }, &rest[end + 1..]))
}

/// Decrypts the stored bytes of `object` (`stored` as [`split`] found them) with `identities`; the errors
/// name the object and the key ids, never a key.
pub fn decrypt(
    object: &str,
    key_ids: &str,
    age_file: &[u8],
    identities: Option<&Identities>,
    limit: u64,
) -> Result<Vec<u8>> {
    let Some(identities) = identities else {
        bail!(
            "{object} is encrypted (key id {key_ids}) and no identity was given: restore, promote, verify and \
             the other readers of an encrypted store need the age identity file (--store-identity FILE, or \
             store-identity in the config file)"
        );
    };
    let decryptor = age::Decryptor::new(age_file)
        .with_context(|| format!("{object}: not a readable age file (damaged?)"))?;
    let mut reader = match decryptor.decrypt(identities.keys.iter().map(|k| k as &dyn age::Identity)) {
        Ok(r) => r,
        Err(age::DecryptError::NoMatchingKeys) => bail!(
            "{object} is encrypted for key id {key_ids}; none of the identities in {} (key ids {}) opens it: \
             a key rotated out? keep the old identity's line in the file beside the new one",
            identities.file.display(),
            identities.key_ids()
        ),
        Err(e) => {
            return Err(anyhow!("{object}: age could not decrypt it (damaged?): {e}"));
        }
    };
    let mut plain = Vec::new();
    (&mut reader)
        .take(limit + 1)
        .read_to_end(&mut plain)
        .with_context(|| {
            format!("{object}: the encrypted content is damaged (its authentication fails)")
        })?;
    if plain.len() as u64 > limit {
        bail!("{object}: more than {limit} bytes once decrypted");
    }
    Ok(plain)
}

/// `walship-receiver keygen`: a new identity, written to `out` (0600, never over an existing file); returns
/// the public key to give the receiver (`--store-encrypt-to`).
pub fn keygen(out: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let identity = age::x25519::Identity::generate();
    let public = identity.to_public();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "create {} (an existing identity file is never overwritten: pick another name)",
                out.display()
            )
        })?;
    let text = format!(
        "# walship object store identity, key id {}\n# public key (the receiver's --store-encrypt-to): {public}\n{}\n",
        key_id(&public),
        identity.to_string().expose_secret()
    );
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", out.display()))?;
    Ok(public.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_rotation_and_the_errors_name_the_key_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (old_file, new_file, both) = (
            dir.path().join("old.key"),
            dir.path().join("new.key"),
            dir.path().join("both.key"),
        );
        let old_public = keygen(&old_file).unwrap();
        let new_public = keygen(&new_file).unwrap();
        assert!(keygen(&old_file).is_err(), "never overwrites an identity");
        std::fs::write(
            &both,
            std::fs::read_to_string(&old_file).unwrap()
                + &std::fs::read_to_string(&new_file).unwrap(),
        )
        .unwrap();
        let old = Recipients::parse(&[old_public]).unwrap().unwrap();
        let new = Recipients::parse(&[new_public]).unwrap().unwrap();
        let plain: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let under_old = old.encrypt(&plain, (9, 9)).unwrap();
        let under_new = new.encrypt(&plain, (9, 9)).unwrap();
        assert!(!under_old.windows(64).any(|w| w == &plain[1000..1064]));
        let keyring = Identities::load(&both).unwrap();
        for stored in [&under_old, &under_new] {
            let (h, age_file) = split(stored).unwrap();
            assert_eq!(h.file, Some((9, 9)));
            assert_eq!(
                decrypt("x", &h.key_ids, age_file, Some(&keyring), 1 << 20).unwrap(),
                plain
            );
        }
        // a rotated-out key missing from the file: named by its id, and the file's ids listed
        let only_new = Identities::load(&new_file).unwrap();
        let (h, age_file) = split(&under_old).unwrap();
        let ids = h.key_ids;
        assert_eq!(ids, old.key_ids());
        let e = format!(
            "{:#}",
            decrypt("obj", &ids, age_file, Some(&only_new), 1 << 20).unwrap_err()
        );
        assert!(
            e.contains(old.key_ids()) && e.contains(new.key_ids()) && e.contains("obj"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            decrypt("obj", &ids, age_file, None, 1 << 20).unwrap_err()
        );
        assert!(
            e.contains("no identity") && e.contains(old.key_ids()),
            "{e}"
        );
        // a damaged object fails its authentication
        let mut damaged = under_new.clone();
        let n = damaged.len();
        damaged[n - 100] ^= 1;
        let (h, age_file) = split(&damaged).unwrap();
        assert!(decrypt("obj", &h.key_ids, age_file, Some(&keyring), 1 << 20).is_err());
        // no secret in Debug or in errors about a bad file
        let secret = std::fs::read_to_string(&new_file).unwrap();
        let secret_line = secret
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .unwrap();
        assert!(!format!("{keyring:?}").contains(secret_line));
        std::fs::write(&both, format!("{secret_line}x\n")).unwrap();
        let e = format!("{:#}", Identities::load(&both).unwrap_err());
        assert!(
            e.contains("line 1") && !e.contains(&secret_line[20..]),
            "{e}"
        );
    }
}
