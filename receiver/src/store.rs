//! The archive's copy in object storage (`--object-store URL`): `s3://bucket/prefix` with credentials and
//! endpoint from the conventional environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
//! AWS_ENDPOINT_URL, AWS_ALLOW_HTTP), or whatever else the `object_store` crate reads (`file://` …).
//!
//! Each file is stored zstd-compressed as `<prefix>/<name>.zst`, with the zstd frame's own checksum of the
//! content and the CRC-32C of the uncompressed bytes in the object's metadata (`walship-crc32c`). The
//! archive's identity is `<prefix>/walship.id`, as in the local archive: a prefix holds one cluster's WAL.
//! A complete segment or history file is never overwritten: an object already there with other content is an
//! error. Only the partial segment's object is replaced as it grows.
//!
//! With `--store-encrypt-to` every object, the identity included, is encrypted on the client side before it
//! leaves the standby ([`crate::crypt`]); readers decrypt with `--store-identity`. Objects stored before
//! encryption was turned on stay readable.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use crate::archive::Identity;

/// The metadata key of the uncompressed bytes' CRC-32C.
const CRC_KEY: &str = "walship-crc32c";
/// URL schemes of Azure Blob Storage.
const AZURE_SCHEMES: [&str; 4] = ["az", "azure", "abfs", "abfss"];
/// The metadata key of an encrypted identity's digest.
const ID_DIGEST_KEY: &str = "walship-identity-sha256";
/// zstd level of stored files: they are written once and read rarely, and WAL compresses well.
const LEVEL: i32 = 3;

/// An archive's prefix in an object store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: StorePath,
    url: String,
    /// Whether objects carry metadata (not in a local directory: the zstd checksum covers the content there),
    /// and how its keys are spelled.
    metadata: Metadata,
    /// Encrypt what is stored to these public keys.
    recipients: Option<crate::crypt::Recipients>,
    /// Decrypt what is read with these private keys.
    identities: Option<Arc<crate::crypt::Identities>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Where the archive's object store is and how to reach it: `--object-store URL` and its
/// `--object-store-option NAME=VALUE` settings (AWS_* or AZURE_*), which go to the store's client builder directly (and to
/// the prefetcher, a child, as its environment), never into this process's environment. The values are
/// never printed (`Debug` shows the names only).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StoreSpec {
    pub url: String,
    options: Vec<(String, String)>,
    /// `--store-encrypt-to`: age public keys (`age1…`).
    pub encrypt_to: Vec<String>,
    /// `--store-identity`: the age identity file that decrypts.
    pub identity_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.options.iter().map(|(n, _)| n.as_str()).collect();
        write!(f, "{} {names:?}", self.url)?;
        if !self.encrypt_to.is_empty() {
            write!(f, " encrypted to {} key(s)", self.encrypt_to.len())?;
        }
        if let Some(file) = &self.identity_file {
            write!(f, " identities in {}", file.display())?;
        }
        Ok(())
    }
}

impl StoreSpec {
    /// The store at `url` with `--object-store-option` settings (`NAME=VALUE`). Only AWS_* and AZURE_*
    /// names: they override the environment.
    pub fn new(url: &str, options: &[String]) -> Result<StoreSpec> {
        let mut parsed = Vec::with_capacity(options.len());
        for option in options {
            let Some((name, value)) = option.split_once('=') else {
                bail!(
                    "--object-store-option {:?}: expected NAME=VALUE",
                    option.split('=').next().unwrap_or("")
                );
            };
            let name = name.trim().to_ascii_uppercase();
            let prefixed = ["AWS_", "AZURE_"]
                .iter()
                .any(|p| name.starts_with(p) && name.len() > p.len());
            if !prefixed || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!(
                    "--object-store-option {name}: not an AWS_* or AZURE_* setting (AWS_ACCESS_KEY_ID, \
                     AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, …; \
                     AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_ENDPOINT, …)"
                );
            }
            parsed.push((name, value.trim().to_owned()));
        }
        Ok(StoreSpec {
            url: url.to_owned(),
            options: parsed,
            encrypt_to: Vec::new(),
            identity_file: None,
        })
    }

    /// Encryption at rest: objects written are encrypted to `encrypt_to` (age public keys), objects read are
    /// decrypted with the identities in `identity_file`.
    pub fn with_encryption(
        mut self,
        encrypt_to: Vec<String>,
        identity_file: Option<std::path::PathBuf>,
    ) -> StoreSpec {
        self.encrypt_to = encrypt_to;
        self.identity_file = identity_file;
        self
    }

    /// The settings as environment variables, for a child process (the prefetcher).
    pub fn environment(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// Runs `f` on a runtime of its own: the one-shot commands (restore, promote, cleanup, status, prefetch) reach
/// the store from synchronous code.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start a runtime for the object store")?;
    Ok(rt.block_on(f))
}

/// One archive file in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFile {
    /// The archive file's name (`000000010000000000000003`, `…03.partial`, `00000002.history`).
    pub name: String,
    /// Compressed size.
    pub size: u64,
    /// When it was stored (seconds since the epoch).
    pub modified_unix: i64,
}

/// What [`Store::put_once`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Put {
    Written,
    /// The same content was there already (a retry after an upload whose answer was lost).
    AlreadyThere,
}

impl Store {
    /// Opens `url` (`s3://bucket/prefix`, `file:///dir` …). Nothing is contacted yet.
    pub fn open(spec: &StoreSpec) -> Result<Store> {
        let url = spec.url.as_str();
        let parsed = url::Url::parse(url).with_context(|| {
            format!("--object-store {url:?} is not a URL (e.g. s3://bucket/walship)")
        })?;
        // s3://bucket/prefix, az://container/prefix: the prefix is the URL's path
        let cloud_prefix = || {
            StorePath::parse(parsed.path().trim_matches('/'))
                .with_context(|| format!("--object-store {url}: the prefix is not a valid path"))
        };
        let (inner, prefix): (Arc<dyn ObjectStore>, StorePath) = match parsed.scheme() {
            "s3" | "s3a" => {
                // one crypto provider in the process: ring, as for the senders' TLS (reqwest is built
                // without one of its own); a second call finds it installed
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut builder = object_store::aws::AmazonS3Builder::from_env();
                for (name, value) in &spec.options {
                    let key: object_store::aws::AmazonS3ConfigKey =
                        name.to_ascii_lowercase().parse().map_err(|_| {
                            anyhow!("--object-store-option {name}: not a setting of the S3 client")
                        })?;
                    builder = builder.with_config(key, value);
                }
                let store = builder
                    .with_url(url)
                    .build()
                    .with_context(|| {
                        format!(
                            "--object-store {url}: set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and \
                             AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true for a plain-HTTP self-hosted server)"
                        )
                    })?;
                (Arc::new(store), cloud_prefix()?)
            }
            scheme if AZURE_SCHEMES.contains(&scheme) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env();
                for (name, value) in &spec.options {
                    let key: object_store::azure::AzureConfigKey =
                        name.to_ascii_lowercase().parse().map_err(|_| {
                            anyhow!(
                                "--object-store-option {name}: not a setting of the Azure client"
                            )
                        })?;
                    builder = builder.with_config(key, value);
                }
                let store = builder.with_url(url).build().with_context(|| {
                    format!(
                        "--object-store {url}: set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or \
                         another Azure credential; AZURE_STORAGE_ENDPOINT and AZURE_ALLOW_HTTP=true for an \
                         emulator or a private endpoint)"
                    )
                })?;
                (Arc::new(store), cloud_prefix()?)
            }
            _ => {
                let options = spec
                    .options
                    .iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()));
                let (store, prefix) =
                    object_store::parse_url_opts(&parsed, options).with_context(|| {
                        format!("--object-store {url}: not a store walship can use")
                    })?;
                (Arc::from(store), prefix)
            }
        };
        let recipients = crate::crypt::Recipients::parse(&spec.encrypt_to)?;
        let identities = match &spec.identity_file {
            Some(file) => Some(Arc::new(crate::crypt::Identities::load(file)?)),
            None => None,
        };
        Ok(Store {
            inner,
            prefix,
            url: url.to_owned(),
            metadata: match parsed.scheme() {
                "file" | "memory" => Metadata::None,
                // Azure's metadata names are C# identifiers: no '-'
                scheme if AZURE_SCHEMES.contains(&scheme) => Metadata::Underscores,
                _ => Metadata::Dashes,
            },
            recipients,
            identities,
        })
    }

    /// Whether objects are encrypted when written.
    pub fn encrypts(&self) -> bool {
        self.recipients.is_some()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> StorePath {
        self.prefix.clone().join(name)
    }

    /// The object name of a file of the archive.
    pub fn object_name(file: &str) -> String {
        format!("{file}.zst")
    }

    /// The cluster whose WAL the prefix holds, if any.
    pub async fn identity(&self) -> Result<Option<Identity>> {
        let Some((bytes, _)) = self.identity_object().await? else {
            return Ok(None);
        };
        let object = format!("{}/{}", self.url, crate::archive::ID_FILE);
        let text = match crate::crypt::split(&bytes) {
            Some((h, age_file)) => crate::crypt::decrypt(
                &object,
                &h.key_ids,
                age_file,
                self.identities.as_deref(),
                1 << 16,
            )?,
            None => bytes.to_vec(),
        };
        Identity::parse(&String::from_utf8_lossy(&text))
            .map(Some)
            .ok_or_else(|| anyhow!("{object} is not a walship identity"))
    }

    /// Whether the store's identity is `id` (None: it holds none). An encrypted identity is compared
    /// without decrypting it where the store kept its digest (a receiver holds the public key only).
    pub async fn identity_is(&self, id: &Identity) -> Result<Option<bool>> {
        let Some((bytes, digest)) = self.identity_object().await? else {
            return Ok(None);
        };
        if crate::crypt::split(&bytes).is_some() && self.identities.is_none() {
            if let Some(digest) = digest {
                return Ok(Some(digest == identity_digest(id)));
            }
        }
        Ok(self.identity().await?.map(|theirs| theirs == *id))
    }

    /// The stored bytes of walship.id and the identity digest of its metadata.
    async fn identity_object(&self) -> Result<Option<(Bytes, Option<String>)>> {
        match self.inner.get(&self.path(crate::archive::ID_FILE)).await {
            Ok(r) => {
                let digest = r
                    .attributes
                    .get(&self.metadata.attr(ID_DIGEST_KEY))
                    .map(|v| v.as_ref().to_owned());
                let bytes = r.bytes().await.context("read the store's walship.id")?;
                Ok(Some((bytes, digest)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("read {}/walship.id", self.url))),
        }
    }

    /// Pins the prefix to `id` (if no one else did first); an identity already there must be `id`.
    pub async fn pin(&self, id: &Identity) -> Result<()> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let path = self.path(crate::archive::ID_FILE);
        let mut opts = opts;
        let content = match &self.recipients {
            Some(r) => {
                if self.metadata != Metadata::None {
                    opts.attributes.insert(
                        self.metadata.attr(ID_DIGEST_KEY),
                        identity_digest(id).into(),
                    );
                    opts.attributes.insert(
                        self.metadata.attr(crate::crypt::KEY_ID_KEY),
                        r.key_ids().to_owned().into(),
                    );
                }
                let text = id.render();
                r.encrypt(
                    text.as_bytes(),
                    (text.len() as u64, crc32c::crc32c(text.as_bytes())),
                )?
            }
            None => id.render().into_bytes(),
        };
        match self
            .inner
            .put_opts(&path, PutPayload::from(content), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => self.check_identity(id).await,
            Err(e) => Err(anyhow::Error::new(e).context(format!("write {}/walship.id", self.url))),
        }
    }

    /// Fails unless the store holds no identity or `id`.
    pub async fn check_identity(&self, id: &Identity) -> Result<()> {
        if self.identity_is(id).await? != Some(false) {
            return Ok(());
        }
        match self.identity().await {
            Ok(Some(theirs)) => bail!(
                "the object store {} holds the WAL of the cluster with system identifier {} ({} segments), this \
                 archive belongs to {} ({} segments): one prefix per cluster; give this archive its own prefix",
                self.url,
                theirs.system_identifier,
                theirs.wal_segment_size,
                id.system_identifier,
                id.wal_segment_size
            ),
            // encrypted, compared by its digest: another cluster's, whose details need the key
            _ => bail!(
                "the object store {} holds another cluster's walship.id (encrypted; its digest differs from this \
                 archive's, system identifier {}): one prefix per cluster; give this archive its own prefix",
                self.url,
                id.system_identifier
            ),
        }
    }

    /// Stores `raw` (the content of archive file `file`) compressed, once: an object already there is
    /// compared, never overwritten.
    pub async fn put_once(&self, file: &str, raw: &[u8]) -> Result<Put> {
        let path = self.path(&Self::object_name(file));
        let (payload, attributes) =
            encode_aside(raw, self.metadata, self.recipients.clone()).await?;
        let opts = PutOptions {
            mode: PutMode::Create,
            attributes,
            ..Default::default()
        };
        match self.inner.put_opts(&path, payload, opts).await {
            Ok(_) => Ok(Put::Written),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                if self.recipients.is_some() && self.identities.is_none() {
                    // encrypted, and this receiver holds only the public key: the same content has the
                    // same stored size (zstd and age are deterministic in length) and the same CRC-32C
                    return self.same_encrypted(file, raw).await;
                }
                match self.get(file).await? {
                    Some(there) if there == raw => Ok(Put::AlreadyThere),
                    Some(_) => bail!(
                        "{}/{} exists with other content: walship never overwrites an archived file; find out \
                         who wrote it (another receiver on this prefix?)",
                        self.url,
                        Self::object_name(file)
                    ),
                    None => bail!("{}/{} vanished while being compared", self.url, Self::object_name(file)),
                }
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!(
                "upload {}/{}",
                self.url,
                Self::object_name(file)
            ))),
        }
    }

    /// [`Store::put_once`] found an encrypted object there: compares what can be compared without the key.
    async fn same_encrypted(&self, file: &str, raw: &[u8]) -> Result<Put> {
        let path = self.path(&Self::object_name(file));
        let there = self
            .inner
            .get(&path)
            .await
            .with_context(|| format!("read {}/{}", self.url, Self::object_name(file)))?
            .bytes()
            .await
            .with_context(|| format!("read {}/{}", self.url, Self::object_name(file)))?;
        let same = crate::crypt::split(&there)
            .and_then(|(h, _)| h.file)
            .is_some_and(|f| f == (raw.len() as u64, crc32c::crc32c(raw)));
        if same {
            Ok(Put::AlreadyThere)
        } else {
            bail!(
                "{}/{} exists with other content: walship never overwrites an archived file; find out who \
                 wrote it (another receiver on this prefix?)",
                self.url,
                Self::object_name(file)
            )
        }
    }

    /// Stores `raw` as `file`, replacing what is there (the partial segment as it grows).
    pub async fn put_replace(&self, file: &str, raw: &[u8]) -> Result<()> {
        let path = self.path(&Self::object_name(file));
        let (payload, attributes) =
            encode_aside(raw, self.metadata, self.recipients.clone()).await?;
        let opts = PutOptions {
            attributes,
            ..Default::default()
        };
        self.inner
            .put_opts(&path, payload, opts)
            .await
            .with_context(|| format!("upload {}/{}", self.url, Self::object_name(file)))?;
        Ok(())
    }

    /// The archive files in the store whose names sort after `after` (all of them for ""), in name order,
    /// without the `.zst` of their objects. Objects that are not archive files are left out.
    pub async fn list(&self, after: &str) -> Result<Vec<StoredFile>> {
        let mut files: Vec<StoredFile> =
            self.metas(after)
                .await?
                .into_iter()
                .filter_map(|m| {
                    let name = m.location.filename()?.strip_suffix(".zst")?.to_owned();
                    // only objects directly under the prefix
                    (m.location == self.path(&Self::object_name(&name)) && name.as_str() > after)
                        .then(|| StoredFile {
                            name,
                            size: m.size,
                            modified_unix: m.last_modified.timestamp(),
                        })
                })
                .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    /// The newest timeline of which the store holds a segment or partial.
    pub async fn newest_timeline(
        &self,
        seg: walship_protocol::WalSegSize,
    ) -> Result<Option<walship_protocol::TimelineId>> {
        Ok(self
            .list("")
            .await?
            .iter()
            .filter_map(|f| crate::archive::ArchivedSegment::from_name(&f.name, seg, 0))
            .map(|s| s.timeline)
            .max())
    }

    /// The local directory's identity; a directory without one (a new standby's) takes the store's.
    pub async fn adopt_identity(&self, dir: &std::path::Path) -> Result<Option<Identity>> {
        if let Some(id) = Identity::load(dir)? {
            return Ok(Some(id));
        }
        let Some(id) = self.identity().await? else {
            return Ok(None);
        };
        crate::durable::replace(dir, crate::archive::ID_FILE, id.render().as_bytes())?;
        tracing::info!(
            system_identifier = id.system_identifier,
            "the archive {} takes the identity of the object store {}",
            dir.display(),
            self.url
        );
        Ok(Some(id))
    }

    /// The names of every object directly under the prefix (`….zst`, `walship.id`), sorted: for tests and
    /// diagnostics that look at what is stored, not at the archive files it holds.
    pub async fn object_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .metas("")
            .await?
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_owned();
                (m.location == self.path(&name)).then_some(name)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every object under the prefix (subdirectories included), after the object named `after` when given.
    async fn metas(&self, after: &str) -> Result<Vec<object_store::ObjectMeta>> {
        use futures::TryStreamExt;
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listing = if after.is_empty() {
            self.inner.list(prefix)
        } else {
            self.inner.list_with_offset(prefix, &self.path(after))
        };
        listing
            .try_collect()
            .await
            .with_context(|| format!("list {}", self.url))
    }

    /// An object's stored bytes as they are (compressed, encrypted), `None` when it is not there.
    pub async fn object_bytes(&self, object: &str) -> Result<Option<Bytes>> {
        match self.inner.get(&self.path(object)).await {
            Ok(r) => {
                Ok(Some(r.bytes().await.with_context(|| {
                    format!("download {}/{object}", self.url)
                })?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("download {}/{object}", self.url))),
        }
    }

    pub async fn delete(&self, file: &str) -> Result<()> {
        match self
            .inner
            .delete(&self.path(&Self::object_name(file)))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!(
                "delete {}/{}",
                self.url,
                Self::object_name(file)
            ))),
        }
    }

    /// The content of archive file `file`, decompressed and checked (zstd's checksum, and the CRC-32C of the
    /// metadata when the store kept it); `None` when it is not there.
    pub async fn get(&self, file: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(&Self::object_name(file));
        let result = match self.inner.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "download {}/{}",
                    self.url,
                    Self::object_name(file)
                )))
            }
        };
        let crc = result
            .attributes
            .get(&self.metadata.attr(CRC_KEY))
            .and_then(|v| u32::from_str_radix(v.as_ref(), 16).ok());
        let stored = result
            .bytes()
            .await
            .with_context(|| format!("download {}/{}", self.url, Self::object_name(file)))?;
        let decrypted;
        let compressed: &[u8] = match crate::crypt::split(&stored) {
            Some((h, age_file)) => {
                let object = format!("{}/{}", self.url, Self::object_name(file));
                decrypted = crate::crypt::decrypt(
                    &object,
                    &h.key_ids,
                    age_file,
                    self.identities.as_deref(),
                    1 << 31,
                )?;
                &decrypted
            }
            None => &stored,
        };
        let raw = decode(compressed).with_context(|| {
            format!(
                "{}/{} does not decompress",
                self.url,
                Self::object_name(file)
            )
        })?;
        if let Some(crc) = crc {
            let actual = crc32c::crc32c(&raw);
            if actual != crc {
                bail!(
                    "{}/{}: CRC-32C {actual:08x} of the content, {crc:08x} in its metadata: the object is damaged",
                    self.url,
                    Self::object_name(file)
                );
            }
        }
        Ok(Some(raw))
    }
}

/// [`encode`] on a blocking thread: compressing a segment takes tens of milliseconds, which the runtime's
/// worker (the one that also serves the sender's session) must not spend.
async fn encode_aside(
    raw: &[u8],
    metadata: Metadata,
    recipients: Option<crate::crypt::Recipients>,
) -> Result<(PutPayload, Attributes)> {
    let raw = raw.to_vec();
    tokio::task::spawn_blocking(move || encode(&raw, metadata, recipients.as_ref()))
        .await
        .context("the compression task")?
}

/// zstd with the frame checksum on, then encrypted when there are recipients; the CRC-32C of the raw bytes
/// (and the key ids) as metadata when the store keeps it.
fn encode(
    raw: &[u8],
    metadata: Metadata,
    recipients: Option<&crate::crypt::Recipients>,
) -> Result<(PutPayload, Attributes)> {
    let mut encoder = zstd::bulk::Compressor::new(LEVEL).context("zstd")?;
    encoder
        .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .context("zstd checksum")?;
    let mut stored = encoder.compress(raw).context("compress")?;
    let mut attributes = Attributes::new();
    if let Some(r) = recipients {
        stored = r.encrypt(&stored, (raw.len() as u64, crc32c::crc32c(raw)))?;
        if metadata != Metadata::None {
            attributes.insert(
                metadata.attr(crate::crypt::KEY_ID_KEY),
                r.key_ids().to_owned().into(),
            );
        }
    }
    if metadata != Metadata::None {
        attributes.insert(
            metadata.attr(CRC_KEY),
            format!("{:08x}", crc32c::crc32c(raw)).into(),
        );
    }
    Ok((PutPayload::from(Bytes::from(stored)), attributes))
}

/// Whether a store keeps objects' metadata, and how it spells the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metadata {
    None,
    /// `walship-crc32c` (S3 and the like).
    Dashes,
    /// `walship_crc32c` (Azure: metadata names are C# identifiers).
    Underscores,
}

impl Metadata {
    fn attr(self, key: &'static str) -> Attribute {
        match self {
            Metadata::Underscores => Attribute::Metadata(key.replace('-', "_").into()),
            _ => Attribute::Metadata(key.into()),
        }
    }
}

/// The digest of an identity kept in the metadata of an encrypted walship.id, so that a receiver holding
/// only the public key can compare it.
fn identity_digest(id: &Identity) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, id.render().as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Decompresses one stored file (at most 1 GB, the largest WAL segment).
fn decode(compressed: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut decoder = zstd::stream::read::Decoder::new(compressed).context("zstd")?;
    use std::io::Read;
    (&mut decoder)
        .take(1 << 30 | 1)
        .read_to_end(&mut out)
        .context("zstd")?;
    if out.len() > 1 << 30 {
        bail!("more than 1 GB once decompressed");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn encrypted_objects_are_not_readable_without_the_key_and_come_back_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("store.key");
        let public = crate::crypt::keygen(&key).unwrap();
        let url = format!("file://{}", dir.path().join("store").display());
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let spec = StoreSpec::new(&url, &[]).unwrap();
        // the receiver: the public key only
        let writer =
            Store::open(&spec.clone().with_encryption(vec![public.clone()], None)).unwrap();
        let raw: Vec<u8> = (0..200_000u32).map(|i| (i / 7 % 251) as u8).collect();
        let name = "000000010000000000000001";
        assert_eq!(writer.put_once(name, &raw).await.unwrap(), Put::Written);
        // a retry of the same content is recognised without the key; other content is refused
        assert_eq!(
            writer.put_once(name, &raw).await.unwrap(),
            Put::AlreadyThere
        );
        let mut other = raw.clone();
        other.truncate(150_000);
        assert!(writer.put_once(name, &other).await.is_err());
        let id = Identity {
            system_identifier: 7,
            wal_segment_size: walship_protocol::WalSegSize::DEFAULT,
            pg_version_num: 150_000,
        };
        writer.pin(&id).await.unwrap();
        // neither the object nor the identity is readable as WAL, zstd or text
        let stored = std::fs::read(dir.path().join("store").join(format!("{name}.zst"))).unwrap();
        assert!(stored.starts_with(crate::crypt::MAGIC));
        assert!(!stored.windows(4).any(|w| w == [0x28, 0xB5, 0x2F, 0xFD]));
        let id_object = std::fs::read(dir.path().join("store").join("walship.id")).unwrap();
        assert!(!String::from_utf8_lossy(&id_object).contains("system_identifier"));
        // without the identity file: a clear error naming the object and the key id
        let e = format!("{:#}", writer.get(name).await.unwrap_err());
        assert!(e.contains(name) && e.contains("--store-identity"), "{e}");
        // with it: the same bytes, and the identity
        let reader = Store::open(&spec.with_encryption(Vec::new(), Some(key))).unwrap();
        assert_eq!(reader.get(name).await.unwrap().unwrap(), raw);
        assert_eq!(reader.identity().await.unwrap(), Some(id));
        reader.check_identity(&id).await.unwrap();

        // rotation: new uploads under a new key; a keyring with both reads old and new objects, one with
        // the new key only names the old object's key id
        let new_key = dir.path().join("new.key");
        let new_public = crate::crypt::keygen(&new_key).unwrap();
        let rotated = Store::open(
            &StoreSpec::new(&url, &[])
                .unwrap()
                .with_encryption(vec![new_public], None),
        )
        .unwrap();
        let newer = "000000010000000000000002";
        rotated.put_once(newer, &raw[..1000]).await.unwrap();
        let keyring = dir.path().join("keyring");
        std::fs::write(
            &keyring,
            std::fs::read_to_string(dir.path().join("store.key")).unwrap()
                + &std::fs::read_to_string(&new_key).unwrap(),
        )
        .unwrap();
        let both = Store::open(
            &StoreSpec::new(&url, &[])
                .unwrap()
                .with_encryption(Vec::new(), Some(keyring)),
        )
        .unwrap();
        assert_eq!(both.get(name).await.unwrap().unwrap(), raw);
        assert_eq!(both.get(newer).await.unwrap().unwrap(), &raw[..1000]);
        let only_new = Store::open(
            &StoreSpec::new(&url, &[])
                .unwrap()
                .with_encryption(Vec::new(), Some(new_key)),
        )
        .unwrap();
        assert_eq!(only_new.get(newer).await.unwrap().unwrap(), &raw[..1000]);
        let e = format!("{:#}", only_new.get(name).await.unwrap_err());
        assert!(
            e.contains("none of the identities") && e.contains(name),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_file_is_stored_once_and_comes_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = Store::open(&StoreSpec::new(&url, &[]).unwrap()).unwrap();
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 97) as u8).collect();
        assert_eq!(
            store
                .put_once("000000010000000000000001", &raw)
                .await
                .unwrap(),
            Put::Written
        );
        // a retry with the same bytes is fine, other bytes are refused and the object is unchanged
        assert_eq!(
            store
                .put_once("000000010000000000000001", &raw)
                .await
                .unwrap(),
            Put::AlreadyThere
        );
        let mut other = raw.clone();
        other[5] ^= 1;
        let e = store
            .put_once("000000010000000000000001", &other)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("never overwrites"), "{e:#}");
        assert_eq!(
            store
                .get("000000010000000000000001")
                .await
                .unwrap()
                .unwrap(),
            raw
        );
        assert_eq!(store.get("000000010000000000000002").await.unwrap(), None);
        store
            .put_once("000000010000000000000003", &raw)
            .await
            .unwrap();
        store
            .put_replace("000000010000000000000004.partial", &raw)
            .await
            .unwrap();
        let names = |files: Vec<StoredFile>| files.into_iter().map(|f| f.name).collect::<Vec<_>>();
        assert_eq!(
            names(store.list("").await.unwrap()),
            [
                "000000010000000000000001",
                "000000010000000000000003",
                "000000010000000000000004.partial"
            ]
        );
        assert_eq!(
            names(store.list("000000010000000000000003").await.unwrap()),
            ["000000010000000000000004.partial"]
        );
        // a damaged object is an error, not WAL
        let object = dir.path().join("000000010000000000000001.zst");
        let mut bytes = std::fs::read(&object).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xFF;
        std::fs::write(&object, bytes).unwrap();
        assert!(store.get("000000010000000000000001").await.is_err());
        // the identity: pinned once, another one refused
        let id = Identity {
            system_identifier: 7,
            wal_segment_size: walship_protocol::WalSegSize::DEFAULT,
            pg_version_num: 150_000,
        };
        store.pin(&id).await.unwrap();
        store.pin(&id).await.unwrap();
        let theirs = Identity {
            system_identifier: 8,
            ..id
        };
        let e = store.pin(&theirs).await.unwrap_err();
        assert!(format!("{e:#}").contains("one prefix per cluster"), "{e:#}");
    }
}
