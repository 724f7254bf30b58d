//! The chunk store: one RocksDB database in a data directory, holding many volumes.
//!
//! Owns: the on-disk directory (marker file, lock file, RocksDB), the RocksDB options
//! (memory budget, BlobDB for chunks), the volume registry (create, list, resize, delete)
//! and each open volume's in-memory counters used for quota admission, and every byte of
//! the database: the RocksDB handles never leave this module. The key layout and every
//! value encoding are in [`codec`]; an open volume ([`OpenVolume`], closed when dropped)
//! is read through a [`VolumeView`] and written through a [`VolumeTxn`], one `WriteBatch`
//! per operation, the one point every write of a volume passes through (quota admission
//! there). It knows nothing of POSIX semantics: that is the filesystem core's
//! ([`crate::fs`]), and `fsck`'s checks are passes over a [`VolumeView`].
//!
//! Layout of a data directory:
//! ```text
//! DIR/FUSEVOL        marker: format version and chunk size (text)
//! DIR/fusevol.lock   flock held by the process that owns the store
//! DIR/control.sock   control socket of the owning process (see crate::control)
//! DIR/db/            the RocksDB database (column families "meta", "chunks", and
//!                    "chunks-lz4", "chunks-zstd" for compressed volumes)
//! ```

pub mod codec;
mod crypt;
mod health;
mod memory;
mod replica;
mod txn;
mod view;

pub use health::{StoreHealth, WeakStore};
use memory::MemoryPlan;
pub use memory::{DEFAULT_MEMORY_BUDGET, MIN_MEMORY_BUDGET};
use replica::Copy;
pub use replica::{
    create_replicated, open_replicated, scrub_open, CopyInfo, CopyState, ReplicaSet, ReplicasInfo,
    ScrubReport,
};
pub use txn::VolumeTxn;
pub use view::{VolumeSnapshot, VolumeView};

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use parking_lot::Mutex;
use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamily, ColumnFamilyDescriptor,
    CompactOptions, DBCompressionType, Options, WriteBatch, WriteBufferManager, WriteOptions, DB,
};
use serde::Serialize;

use codec::{
    decode_config, encode_config, Ino, InodeRecord, Kind, Timestamp, Usage, VolumeConfig, VolumeId,
};
pub use codec::{Compression, Encryption};
use crypt::VolumeCipher;
pub use crypt::{CryptError, MasterKey};

pub const CF_META: &str = "meta";
pub const CF_CHUNKS: &str = "chunks";
pub const CF_CHUNKS_LZ4: &str = "chunks-lz4";
pub const CF_CHUNKS_ZSTD: &str = "chunks-zstd";
/// Every column family, the metadata first.
const ALL_CFS: [&str; 4] = [CF_META, CF_CHUNKS, CF_CHUNKS_LZ4, CF_CHUNKS_ZSTD];

/// The column family holding the chunks of volumes with compression `c`.
fn chunk_cf_name(c: Compression) -> &'static str {
    match c {
        Compression::None => CF_CHUNKS,
        Compression::Lz4 => CF_CHUNKS_LZ4,
        Compression::Zstd => CF_CHUNKS_ZSTD,
    }
}
pub const MARKER_FILE: &str = "FUSEVOL";
/// Where the store's servers last handed their FUSE connections (see
/// [`Store::record_holder`]).
pub const HOLDER_FILE: &str = "fdstore-socket";
pub const LOCK_FILE: &str = "fusevol.lock";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const DB_DIR: &str = "db";
/// The newest store format this build reads. Format 1 is every store's at creation;
/// format 2 ([`FORMAT_ENCRYPTION`]) is set when the store's first encrypted volume is
/// created, so that a fusevol without encryption refuses the store instead of serving
/// sealed bytes as if they were plain; format 3 ([`FORMAT_REPLICAS`]) when it first takes a
/// copy of a replicated volume, so that a fusevol that does not keep copies level (see
/// [`replica`]) never writes one alone.
pub const FORMAT_VERSION: u32 = 3;
/// The format of a new store.
const FORMAT_BASE: u32 = 1;
/// The format from which a store may hold encrypted volumes.
const FORMAT_ENCRYPTION: u32 = 2;
/// The format from which a store may hold copies of replicated volumes.
const FORMAT_REPLICAS: u32 = 3;
/// Default chunk size: see the README's "Chunk size" section for the measurements.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Root directory inode of every volume.
pub const ROOT_INO: Ino = 1;
/// Quota value meaning "no quota".
pub const UNLIMITED: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not a fusevol store (it holds other files and no {MARKER_FILE} marker)")]
    NotAStore(PathBuf),
    #[error("{0} is not a fusevol store: {1}")]
    BadMarker(PathBuf, String),
    #[error("store {0} is already opened by another process")]
    Locked(PathBuf),
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store is corrupted: {0}")]
    Corrupt(String),
    #[error("RocksDB: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("volume {0:?} does not exist")]
    VolumeNotFound(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("invalid volume name {0:?}: use 1-63 characters a-z, 0-9, '.', '_' or '-'")]
    InvalidVolumeName(String),
    #[error("volume {name:?} uses {used} bytes; a quota of {quota} bytes is below that")]
    QuotaBelowUsage { name: String, used: u64, quota: u64 },
    #[error("volume {name:?} uses {used} inodes; an inode limit of {limit} is below that")]
    InodeLimitBelowUsage { name: String, used: u64, limit: u64 },
    #[error("invalid chunk size {0}: use a power of two from 4Ki to 4Mi")]
    InvalidChunkSize(u64),
    #[error("volume {0:?} is mounted; unmount it first")]
    VolumeBusy(String),
    #[error("no room for the change ({0:?}: quota, inode limit or the disk's free-space floor)")]
    Exhausted(Exhausted),
    #[error("volume {name:?} belongs to {owner}, not {claimant}: refusing to serve another tenant's data under the same name")]
    OwnerMismatch {
        name: String,
        owner: String,
        claimant: String,
    },
    #[error("volume {0:?} is encrypted: its key is needed to open it (--key-file; in Kubernetes the Secret its StorageClass names)")]
    KeyRequired(String),
    #[error("volume {0:?}: wrong key (its data key does not open with the key given)")]
    WrongKey(String),
    #[error("encryption: {0}")]
    Crypt(#[from] CryptError),
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    /// The kind of error as a stable, machine-readable name: `fusevol ... --json` reports
    /// it as `error` (part of the CLI's contract: a kind is never renamed).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotAStore(_) | Error::BadMarker(..) => "not_a_store",
            Error::Locked(_) => "store_busy",
            Error::Io { .. } => "io",
            Error::Corrupt(_) => "corrupt",
            Error::Db(_) if self.is_out_of_space() => "no_space",
            Error::Db(_) => "database",
            Error::VolumeNotFound(_) => "volume_not_found",
            Error::VolumeExists(_) => "volume_exists",
            Error::InvalidVolumeName(_) | Error::InvalidChunkSize(_) => "invalid_argument",
            Error::QuotaBelowUsage { .. } | Error::InodeLimitBelowUsage { .. } => "below_usage",
            Error::VolumeBusy(_) => "volume_busy",
            Error::Exhausted(_) => "no_space",
            Error::OwnerMismatch { .. } => "owner_mismatch",
            Error::KeyRequired(_) => "key_required",
            Error::WrongKey(_) => "wrong_key",
            Error::Crypt(CryptError::BadKey(_) | CryptError::KeyFile { .. }) => "bad_key",
            Error::Crypt(CryptError::WrongKey) => "wrong_key",
            Error::Crypt(CryptError::Tampered(_)) => "corrupt",
            Error::Crypt(CryptError::Random(_)) => "io",
            Error::Unsupported(_) => "invalid_argument",
        }
    }

    /// RocksDB itself ran out of disk space (the disk filled below the free-space floor,
    /// e.g. by another process). RocksDB then refuses writes until its error handler sees
    /// free space again and resumes by itself (seen: ~6 s after space was freed); callers
    /// see ENOSPC, as on a full disk, not EIO.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, Error::Db(e) if e.kind() == rocksdb::ErrorKind::IOError
            && e.to_string().contains("No space left on device"))
    }
}

impl From<codec::KeyError> for Error {
    fn from(e: codec::KeyError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl From<codec::RecordError> for Error {
    fn from(e: codec::RecordError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A method of [`Store`] that hands out RocksDB handles or takes raw keys: private to this
/// module (its submodules [`VolumeTxn`] and [`VolumeView`] are how everything else reads
/// and writes a volume), and `pub(crate)` only for the crate's own unit tests, which
/// corrupt stores on purpose.
macro_rules! raw_access {
    ($(#[$m:meta])* fn $($rest:tt)*) => {
        $(#[$m])* #[cfg(not(test))] fn $($rest)*
        $(#[$m])* #[cfg(test)] pub(crate) fn $($rest)*
    };
}

/// What `volume list/inspect` report about a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub quota_bytes: Option<u64>,
    pub inode_limit: Option<u64>,
    pub used_bytes: u64,
    pub inodes: u64,
    pub chunks: u64,
    pub mounted: bool,
    /// How the volume's chunk data is stored (older servers did not report it: none).
    #[serde(default)]
    pub compression: CompressionInfo,
    /// Encryption at rest of the volume (older servers did not report it: none).
    #[serde(default)]
    pub encryption: EncryptionInfo,
    /// A replicated volume's copies (older servers did not report it: one copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicasInfo>,
}

/// What `volume inspect` reports of a volume's encryption.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EncryptionInfo {
    pub algorithm: Encryption,
}

/// What `volume inspect` reports of a volume's compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CompressionInfo {
    pub algorithm: Compression,
    /// Bytes of file data stored (chunk lengths: holes not counted), before compression.
    /// Measured by `inspect` only (a pass over the volume's chunk index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_bytes: Option<u64>,
    /// What that data takes in the store's table files after compression, as RocksDB
    /// estimates it for the volume's key range. Measured by `inspect` of a compressed
    /// volume only (uncompressed chunks live in blob files, which RocksDB does not
    /// attribute to key ranges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
}

/// The settings of a new volume ([`Store::create_volume_with`]).
#[derive(Debug, Clone, Default)]
pub struct NewVolume {
    /// Quota in bytes; `None`: unlimited.
    pub quota: Option<u64>,
    /// Inode limit; `None`: unlimited.
    pub inode_limit: Option<u64>,
    pub compression: Compression,
    /// `Some`: the volume is encrypted ([`Encryption::Aes256Gcm`]) under this master key,
    /// which the store also keeps for opening it (see [`Store::unlock`]).
    pub encryption: Option<MasterKey>,
}

/// An open volume: its id and the live counters that quota admission works on.
///
/// The counters are the authoritative in-memory copy of the volume's `Usage` key; every
/// change is reserved here first (so concurrent writers can never pass the quota) and
/// persisted as a merge in the same `WriteBatch` as the data it accounts for.
#[derive(Debug)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    /// Where its chunks live (see [`Compression`]).
    pub compression: Compression,
    /// Encrypted volumes: the cipher every value passes through (see [`crypt`]).
    cipher: Option<Arc<VolumeCipher>>,
    disk: Arc<DiskSpace>,
    /// A replicated volume being served: the set of its copies (see [`replica`]).
    replica: std::sync::OnceLock<Arc<ReplicaSet>>,
    quota: AtomicU64,
    inode_limit: AtomicU64,
    used_bytes: AtomicU64,
    inodes: AtomicU64,
    chunks: AtomicU64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Bytes,
    Inodes,
    /// The store's disk is down to its free-space floor.
    Disk,
}

impl Volume {
    pub fn quota(&self) -> u64 {
        self.quota.load(Ordering::Acquire)
    }
    pub fn inode_limit(&self) -> u64 {
        self.inode_limit.load(Ordering::Acquire)
    }
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Acquire)
    }
    pub fn inodes(&self) -> u64 {
        self.inodes.load(Ordering::Acquire)
    }
    pub fn chunks(&self) -> u64 {
        self.chunks.load(Ordering::Acquire)
    }

    /// Whether the volume is encrypted: its chunks are sealed whole, so a partial write
    /// reads, patches and rewrites its chunk instead of storing a patch.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// A fingerprint of names (the ring of recent answers of `crate::fs::replay`) as the
    /// store keeps it: for an encrypted volume keyed with a subkey of its data key, so that
    /// the disk holds nothing to test guessed names against.
    pub fn keyed_fingerprint(&self, fp: u64) -> u64 {
        crypt::Sealer(self.cipher.as_deref()).fingerprint(fp)
    }

    /// For a compressed volume, what its chunks take in the table files of their column
    /// family as RocksDB estimates it (data still in the memtables not counted: see
    /// [`Store::inspect_volume_measured`], which flushes first); `None` for an
    /// uncompressed volume or when the estimate fails.
    pub fn stored_bytes(&self) -> Option<u64> {
        if self.compression.is_none() {
            return None;
        }
        let db = &self.disk.db;
        let cf = db.cf_handle(chunk_cf_name(self.compression))?;
        let (lo, hi) = (codec::volume_start(self.id), codec::volume_end(self.id));
        db.get_approximate_sizes_cf(&cf, &[rocksdb::Range::new(&lo, &hi)])
            .first()
            .copied()
    }

    fn reserve_one(counter: &AtomicU64, limit: u64, delta: u64) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(delta).filter(|n| *n <= limit)
            })
            .is_ok()
    }

    /// Below this many bytes, a batch that does not grow usage (a chmod, a timestamp) is
    /// admitted even at the free-space floor; the floor's room covers such updates.
    pub const SMALL_WRITE: u64 = 4096;

    /// [`Volume::reserve`] for a batch of `physical` bytes. The quota judges the usage
    /// change; the disk's free-space floor judges what the batch really writes: an
    /// overwrite changes no usage yet writes a new copy of its chunks (an LSM store frees
    /// the old one only at compaction), so at the floor it is refused like growth. Changes
    /// that free usage (deletes, truncates) and small metadata updates always pass.
    pub fn reserve_write(&self, delta: Usage, physical: u64) -> Result<Reservation, Exhausted> {
        let r = self.reserve_usage(delta)?;
        if !self.admit_write(delta, physical) {
            self.release(r);
            return Err(Exhausted::Disk);
        }
        Ok(r)
    }

    /// The disk's part of [`Volume::reserve_write`]: whether this volume's disk takes a
    /// batch of `physical` bytes changing usage by `delta`.
    fn admit_write(&self, delta: Usage, physical: u64) -> bool {
        let frees = delta.bytes < 0;
        let small = delta.bytes <= 0 && physical < Self::SMALL_WRITE;
        let cost = if delta.bytes > 0 {
            physical.max(delta.bytes as u64)
        } else {
            physical
        };
        frees || small || self.disk.admit(cost)
    }

    /// Applies a usage change this volume's counters did not admit (another copy of a
    /// replicated volume did), so that every copy's counters stay the same.
    fn apply(&self, delta: Usage) {
        let add = |c: &AtomicU64, n: i64| {
            if n > 0 {
                c.fetch_add(n as u64, Ordering::AcqRel);
            }
        };
        add(&self.used_bytes, delta.bytes);
        add(&self.inodes, delta.inodes);
        self.settle(Reservation { delta });
    }

    /// Admits a usage change (quota and inode limit, and the disk's floor for the bytes it
    /// adds). See [`Volume::reserve_write`] for a write batch.
    pub fn reserve(&self, delta: Usage) -> Result<Reservation, Exhausted> {
        let grow = delta.bytes.max(0) as u64;
        let r = self.reserve_usage(delta)?;
        if !self.disk.admit(grow) {
            self.release(r);
            return Err(Exhausted::Disk);
        }
        Ok(r)
    }

    /// Growth is checked against the quota and inode limit atomically; shrinkage is
    /// applied by [`Volume::settle`] after the write succeeds. Returns the reservation to
    /// settle or release.
    fn reserve_usage(&self, delta: Usage) -> Result<Reservation, Exhausted> {
        let grow_bytes = delta.bytes.max(0) as u64;
        let grow_inodes = delta.inodes.max(0) as u64;
        if grow_bytes > 0 && !Self::reserve_one(&self.used_bytes, self.quota(), grow_bytes) {
            return Err(Exhausted::Bytes);
        }
        if grow_inodes > 0 && !Self::reserve_one(&self.inodes, self.inode_limit(), grow_inodes) {
            self.used_bytes.fetch_sub(grow_bytes, Ordering::AcqRel);
            return Err(Exhausted::Inodes);
        }
        Ok(Reservation { delta })
    }

    /// Applies the rest of a reservation after its batch was written. Shrinking saturates
    /// at zero: counters that were wrong (a bug, a damaged store) must not wrap around
    /// and refuse every later write.
    pub fn settle(&self, r: Reservation) {
        let d = r.delta;
        let sub = |c: &AtomicU64, n: u64| {
            let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_sub(n))
            });
        };
        if d.bytes < 0 {
            sub(&self.used_bytes, d.bytes.unsigned_abs());
            self.disk
                .freed_since_reclaim
                .fetch_add(d.bytes.unsigned_abs(), Ordering::AcqRel);
        }
        if d.inodes < 0 {
            sub(&self.inodes, d.inodes.unsigned_abs());
        }
        if d.chunks >= 0 {
            self.chunks.fetch_add(d.chunks as u64, Ordering::AcqRel);
        } else {
            sub(&self.chunks, d.chunks.unsigned_abs());
        }
    }

    /// Gives back a reservation whose batch was not written.
    pub fn release(&self, r: Reservation) {
        let d = r.delta;
        if d.bytes > 0 {
            self.used_bytes.fetch_sub(d.bytes as u64, Ordering::AcqRel);
        }
        if d.inodes > 0 {
            self.inodes.fetch_sub(d.inodes as u64, Ordering::AcqRel);
        }
    }
}

/// The default free-space floor for a filesystem of `size` bytes: 5% of it, at least
/// 8 MiB and at most 256 MiB. What it keeps free is room for RocksDB's own writes
/// (flushes, compactions, the manifest) when volumes have used everything else: RocksDB
/// that hits ENOSPC in a flush stops taking writes for every volume of the store.
pub fn default_free_space_floor(size: u64) -> u64 {
    (size / 20).clamp(8 << 20, 256 << 20)
}

/// How much more the store's filesystem can take before its free-space floor: admission
/// for every change that stores more bytes (checked in [`Volume::reserve`]).
///
/// `headroom` is free space, less the floor, less what the memtables hold (already in the
/// WAL, written again by their flush), as of the last measurement, less twice the bytes
/// admitted since (a stored byte reaches the disk twice: WAL, then the blob or table file
/// a flush writes). It is measured again when it runs out or is a second old, so space
/// freed by deletes (once compaction has dropped their data) is seen again.
struct DiskSpace {
    dir: PathBuf,
    db: Arc<DB>,
    floor: u64,
    headroom: std::sync::atomic::AtomicI64,
    /// When `headroom` was measured (ms since `epoch`).
    measured_ms: AtomicU64,
    epoch: std::time::Instant,
    /// A refused change asks for a compaction to give deleted data's space back.
    reclaim_wanted: std::sync::atomic::AtomicBool,
    /// When that compaction last ran (ms since `epoch`; 0: never).
    reclaimed_ms: AtomicU64,
    /// Bytes credited back (deletes, truncates) since that compaction: what it can free.
    freed_since_reclaim: AtomicU64,
    /// That compaction is running (on its own thread).
    reclaiming: std::sync::atomic::AtomicBool,
    /// Blob garbage collection is turned off (near the floor).
    gc_off: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for DiskSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSpace")
            .field("dir", &self.dir)
            .field("floor", &self.floor)
            .finish()
    }
}

impl DiskSpace {
    const REMEASURE_MS: u64 = 1000;

    fn new(dir: &Path, floor: Option<u64>, db: Arc<DB>) -> DiskSpace {
        let floor = floor
            .unwrap_or_else(|| default_free_space_floor(fs_space(dir).map_or(0, |(size, _)| size)));
        let d = DiskSpace {
            dir: dir.to_path_buf(),
            db,
            floor,
            headroom: std::sync::atomic::AtomicI64::new(0),
            measured_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            reclaim_wanted: std::sync::atomic::AtomicBool::new(false),
            reclaimed_ms: AtomicU64::new(0),
            freed_since_reclaim: AtomicU64::new(0),
            reclaiming: std::sync::atomic::AtomicBool::new(false),
            gc_off: std::sync::atomic::AtomicBool::new(false),
        };
        d.measure();
        d
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes in the memtables (mutable and waiting for flush) of every column family.
    fn memtable_bytes(&self) -> u64 {
        ALL_CFS
            .iter()
            .filter_map(|name| self.db.cf_handle(name))
            .filter_map(|cf| {
                self.db
                    .property_int_value_cf(cf, "rocksdb.size-all-mem-tables")
                    .ok()
                    .flatten()
            })
            .fold(0, u64::saturating_add)
    }

    fn measure(&self) -> i64 {
        let avail = fs_space(&self.dir).map_or(0, |(_, avail)| avail);
        let pending = avail.saturating_sub(self.memtable_bytes());
        let h = i64::try_from(pending).unwrap_or(i64::MAX)
            - i64::try_from(self.floor).unwrap_or(i64::MAX);
        self.headroom.store(h, Ordering::Release);
        self.measured_ms.store(self.now_ms(), Ordering::Release);
        if self.gc_off.load(Ordering::Acquire) && h > i64::try_from(self.floor).unwrap_or(i64::MAX)
        {
            self.set_blob_gc(true);
        }
        h
    }

    /// Turns blob garbage collection of the chunks on or off (a dynamic RocksDB option).
    fn set_blob_gc(&self, on: bool) {
        let Some(cf) = self.db.cf_handle(CF_CHUNKS) else {
            return;
        };
        let value = if on { "true" } else { "false" };
        match self
            .db
            .set_options_cf(cf, &[("enable_blob_garbage_collection", value)])
        {
            Ok(()) => {
                self.gc_off.store(!on, Ordering::Release);
                tracing::info!(dir = %self.dir.display(), on, "blob garbage collection");
            }
            Err(e) => tracing::warn!(error = %e, "cannot change blob garbage collection"),
        }
    }

    /// Admits `bytes` more stored bytes, or refuses them (the floor would be crossed).
    fn admit(&self, bytes: u64) -> bool {
        if self.floor == 0 || bytes == 0 {
            return true;
        }
        let cost = i64::try_from(bytes.saturating_mul(2)).unwrap_or(i64::MAX);
        let stale = self
            .now_ms()
            .saturating_sub(self.measured_ms.load(Ordering::Acquire))
            >= Self::REMEASURE_MS;
        if !stale && self.headroom.fetch_sub(cost, Ordering::AcqRel) >= cost {
            return true;
        }
        if !stale {
            self.headroom.fetch_add(cost, Ordering::AcqRel);
        }
        if self.measure() >= cost {
            self.headroom.fetch_sub(cost, Ordering::AcqRel);
            return true;
        }
        self.reclaim_wanted.store(true, Ordering::Release);
        false
    }
}

/// (size, bytes available to unprivileged users) of the filesystem holding `dir`.
fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let frsize = st.fragment_size() as u64;
    Some((
        (st.blocks() as u64).saturating_mul(frsize),
        (st.blocks_available() as u64).saturating_mul(frsize),
    ))
}

/// A volume opened with [`Store::open_volume`] (or, replicated, [`open_replicated`]);
/// dropping it closes the volume. Whoever serves the volume owns it (the filesystem core
/// of its FUSE session), so "closed" means that nothing can reach the volume's keys any
/// more.
#[derive(Debug)]
pub struct OpenVolume {
    /// Its copies: one, or those of a replicated volume being served (the first's
    /// counters admit changes: see [`VolumeTxn::commit`]).
    copies: Vec<Copy>,
    set: Option<Arc<ReplicaSet>>,
}

impl OpenVolume {
    /// The live volume (its counters are shared with the store's view of it).
    pub fn volume(&self) -> &Arc<Volume> {
        &self.copies[0].vol
    }

    /// The store of the volume's first copy.
    pub fn store(&self) -> &Store {
        &self.copies[0].store
    }

    /// A new transaction on the volume: stages changes, commits them as one batch (in
    /// every copy).
    pub fn txn(&self) -> VolumeTxn<'_> {
        VolumeTxn::new(&self.copies, self.set.as_deref())
    }

    /// Reads of the volume (from one copy, others when it fails).
    pub fn view(&self) -> VolumeView<'_> {
        let at = self.set.as_ref().map_or(0, |s| s.first_healthy());
        VolumeView::new(&self.copies, self.set.as_deref(), at)
    }

    /// Makes every change committed so far durable (in every healthy copy).
    pub fn sync(&self) -> Result<()> {
        match &self.set {
            Some(set) => set.sync(&self.copies),
            None => self.store().sync(),
        }
    }

    /// The store directories of the volume's healthy copies (the one copy's if it is not
    /// replicated).
    pub fn healthy_dirs(&self) -> Vec<&Path> {
        self.copies
            .iter()
            .enumerate()
            .filter(|(i, _)| self.set.as_ref().is_none_or(|s| s.healthy(*i)))
            .map(|(_, c)| c.store.dir())
            .collect()
    }

    /// A replicated volume's copies and their state.
    pub fn replicas(&self) -> Option<ReplicasInfo> {
        self.set.as_ref().map(|s| s.info())
    }

    /// Changes the quota and/or inode limit of the volume in every copy at once (one
    /// commit: a copy that misses it is behind). `Some(None)` removes a limit; lowering
    /// below current usage is refused. For a replicated volume (others change through
    /// [`Store::resize_volume`]), before it is served.
    pub fn set_limits(
        &self,
        quota: Option<Option<u64>>,
        inodes: Option<Option<u64>>,
    ) -> Result<()> {
        let first = &self.copies[0];
        let (vol, name) = (&first.vol, first.vol.name.clone());
        let mut cfg = first.store.config(vol.id)?;
        if let Some(q) = quota {
            if let Some(q) = q.filter(|q| *q < vol.used_bytes()) {
                return Err(Error::QuotaBelowUsage {
                    name,
                    used: vol.used_bytes(),
                    quota: q,
                });
            }
            cfg.quota_bytes = q;
        }
        if let Some(l) = inodes {
            if let Some(l) = l.filter(|l| *l < vol.inodes()) {
                return Err(Error::InodeLimitBelowUsage {
                    name,
                    used: vol.inodes(),
                    limit: l,
                });
            }
            cfg.inode_limit = l;
        }
        let mut t = self.txn();
        t.put_config(&cfg)?;
        t.commit_unaccounted()?;
        for c in &self.copies {
            let (q, l) = (cfg.quota_bytes, cfg.inode_limit);
            c.vol.quota.store(q.unwrap_or(UNLIMITED), Ordering::Release);
            c.vol
                .inode_limit
                .store(l.unwrap_or(UNLIMITED), Ordering::Release);
        }
        self.sync()
    }

    /// Compares the copies of a replicated volume key by key and rewrites in each what
    /// differs from the first healthy copy that reads it (see [`replica`]); `progress` sees
    /// the report as it goes. Writes go on meanwhile (each stretch of keys is compared
    /// under the commit lock).
    pub fn scrub(&self, progress: &mut dyn FnMut(&ScrubReport)) -> Result<ScrubReport> {
        match &self.set {
            Some(set) => set.scrub(&self.copies, progress),
            None => Err(Error::Unsupported(format!(
                "volume {:?} keeps one copy: there is nothing to compare (fsck checks it)",
                self.copies[0].vol.name
            ))),
        }
    }

    /// Takes over the copies of `other` (assembling a replicated volume).
    fn take_copies(&mut self, mut other: OpenVolume) {
        self.copies.append(&mut other.copies);
    }
}

impl std::ops::Deref for OpenVolume {
    type Target = Volume;
    fn deref(&self) -> &Volume {
        &self.copies[0].vol
    }
}

impl Drop for OpenVolume {
    fn drop(&mut self) {
        if let Some(set) = &self.set {
            set.leave_failed_behind(&self.copies);
        }
        for c in &self.copies {
            let mut open = c.store.inner.open_volumes.lock();
            if open
                .get(&c.vol.name)
                .is_some_and(|v| Arc::ptr_eq(v, &c.vol))
            {
                open.remove(&c.vol.name);
            }
        }
    }
}

/// What [`Store::footprint`] measured of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Bytes of the volume's keys and values.
    pub logical: u64,
    /// Bytes of the store's live table and blob files, after compacting the volume.
    pub disk: u64,
}

/// A usage change admitted by [`Volume::reserve`].
#[derive(Debug)]
#[must_use]
pub struct Reservation {
    delta: Usage,
}

/// Format parameters read from the marker file.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub version: u32,
    pub chunk_size: u32,
}

impl Format {
    fn render(&self) -> String {
        format!(
            "fusevol store\nformat={}\nchunk_size={}\n",
            self.version, self.chunk_size
        )
    }

    fn parse(text: &str) -> Result<Format, String> {
        let mut lines = text.lines();
        if lines.next() != Some("fusevol store") {
            return Err("marker file has no fusevol header".into());
        }
        let (mut version, mut chunk_size) = (None, None);
        for line in lines {
            match line.split_once('=') {
                Some(("format", v)) => version = v.trim().parse::<u32>().ok(),
                Some(("chunk_size", v)) => chunk_size = v.trim().parse::<u32>().ok(),
                _ => return Err(format!("unexpected marker line {line:?}")),
            }
        }
        let version = version.ok_or("marker file lacks a valid format=")?;
        if !(FORMAT_BASE..=FORMAT_VERSION).contains(&version) {
            return Err(format!(
                "store format {version} is not supported (this fusevol reads formats {FORMAT_BASE} to {FORMAT_VERSION}): upgrade fusevol"
            ));
        }
        let chunk_size = chunk_size
            .filter(|c| c.is_power_of_two() && (4096..=(4 << 20)).contains(c))
            .ok_or("marker file lacks a valid chunk_size=")?;
        Ok(Format {
            version,
            chunk_size,
        })
    }
}

/// Options for creating a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Chunk size for a new store (ignored when opening an existing one).
    pub chunk_size: u32,
    /// Memory for RocksDB's block cache and memtables together, shared by every volume
    /// of the store (see [`memory`]); at least [`MIN_MEMORY_BUDGET`].
    pub memory_budget: u64,
    /// Free bytes to keep on the store's filesystem: below it, changes that store more
    /// fail with ENOSPC (deletes and truncates always work). `None`: the default,
    /// [`default_free_space_floor`] of the filesystem's size. `Some(0)` disables it.
    pub free_space_floor: Option<u64>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            free_space_floor: None,
        }
    }
}

/// Keys and values, in key order.
type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// An open store. Cheap to clone; all clones share the database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    dir: PathBuf,
    format: Format,
    db: Arc<DB>,
    open_volumes: Mutex<HashMap<String, Arc<Volume>>>,
    /// Master keys of encrypted volumes, by volume name, given by [`Store::unlock`] or at
    /// creation; in memory only.
    keys: Mutex<HashMap<String, MasterKey>>,
    /// Batches written since the last idle check (see [`Store::flush_if_idle`]).
    writes: AtomicU64,
    /// Serializes registry changes (create/delete/resize) within this process.
    registry: Mutex<()>,
    /// Admission against the disk's free-space floor, shared by every volume.
    disk: Arc<DiskSpace>,
    _lock: Flock<File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the marker file of the store in `dir` atomically and durably (a temporary file,
/// synced, renamed over it, the directory synced).
fn write_marker(dir: &Path, format: &Format) -> Result<()> {
    let (tmp, marker) = (dir.join(".FUSEVOL.tmp"), dir.join(MARKER_FILE));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(format.render().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &marker).map_err(io_err(&marker))?;
    // The rename is durable only once the directory is synced.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// `create_dir_all` whose result survives a power cut: each directory it creates is
/// made durable in its parent (an fsync of the parent after the mkdir; an fsync inside
/// the new directory does not make its own name durable).
pub fn create_dir_all_durable(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Volume names: what a Kubernetes PV name can hold, and safe as a path component.
pub fn validate_volume_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidVolumeName(name.to_string()))
    }
}

/// Compactions run at the lowest CPU priority: on a small node they otherwise take every
/// core from the FUSE workers for seconds after a burst of writes (creates after 1 GiB of
/// 4 KiB random writes: 3.6k/s with compactions at normal priority). Flushes keep their
/// priority: a stalled flush stalls writes. Compaction still gets all idle CPU, and a
/// write stall makes writers wait for it as before.
fn background_env(db: &mut Options) {
    match rocksdb::Env::new() {
        Ok(mut env) => {
            env.lower_thread_pool_cpu_priority();
            db.set_env(&env);
        }
        Err(e) => tracing::warn!(error = %e, "cannot lower the priority of compactions"),
    }
}

fn db_options(plan: &MemoryPlan, cache: &Cache) -> (Options, Vec<ColumnFamilyDescriptor>) {
    let mut db = Options::default();
    db.create_if_missing(true);
    db.create_missing_column_families(true);
    db.set_max_background_jobs(4);
    background_env(&mut db);
    db.set_bytes_per_sync(1 << 20);
    // Memtables are charged to the block cache and stall writes at their share: one
    // bound for both (see [`memory`]).
    db.set_write_buffer_manager(&WriteBufferManager::new_write_buffer_manager_with_cache(
        plan.write_buffer_bytes,
        true,
        cache.clone(),
    ));
    db.set_max_total_wal_size(64 << 20);
    db.set_keep_log_file_num(2);
    db.set_max_log_file_size(8 << 20);
    db.set_avoid_unnecessary_blocking_io(true);
    db.set_paranoid_checks(true);
    // Reuse finished WAL files: appending to a recycled file overwrites blocks that are
    // already allocated, so the fdatasync behind every fsync() commits data only, not a
    // size change through the filesystem journal.
    db.set_recycle_log_file_num(4);
    // Let the kernel read ahead in blob files: a sequential read of a file walks its
    // chunks in key order, which is blob-file order for data written sequentially
    // (cold 1 MiB reads went from ~0.5x to ~0.9x of native with this).
    db.set_advise_random_on_open(false);

    let mut meta_table = BlockBasedOptions::default();
    meta_table.set_block_cache(cache);
    meta_table.set_bloom_filter(10.0, false);
    meta_table.set_cache_index_and_filter_blocks(true);
    let mut meta = Options::default();
    meta.set_block_based_table_factory(&meta_table);
    meta.set_write_buffer_size(plan.meta_memtable_bytes);
    meta.set_max_write_buffer_number(2);
    meta.set_compression_type(DBCompressionType::Lz4);
    meta.set_level_compaction_dynamic_level_bytes(true);
    meta.set_merge_operator_associative("fusevol-usage", codec::merge_usage);

    let mut chunks = chunk_options(plan, cache, DBCompressionType::None);
    // Key-value separation: chunk bytes go to blob files, so compaction moves only keys.
    chunks.set_enable_blob_files(true);
    chunks.set_min_blob_size(1024);
    chunks.set_blob_file_size(256 << 20);
    chunks.set_blob_compression_type(DBCompressionType::None);
    chunks.set_enable_blob_gc(true);
    chunks.set_blob_gc_age_cutoff(0.5);

    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_META, meta),
        ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
        ColumnFamilyDescriptor::new(
            CF_CHUNKS_LZ4,
            chunk_options(plan, cache, DBCompressionType::Lz4),
        ),
        ColumnFamilyDescriptor::new(
            CF_CHUNKS_ZSTD,
            chunk_options(plan, cache, DBCompressionType::Zstd),
        ),
    ];
    (db, cfs)
}

/// Table file size of the compressed chunks' column families (see [`chunk_options`]).
const COMPRESSED_TABLE_FILE_BYTES: u64 = 8 << 20;

/// Options of a chunks column family whose table files are compressed with `compression`
/// (one block per chunk: a chunk is larger than the block size). Compressed chunks stay
/// in the table files, not blob files: RocksDB then compresses them, and estimates per key
/// range what they take on disk ([`Store::inspect_volume_measured`]); the price is that
/// compaction rewrites them, as any compressed LSM store does.
fn chunk_options(plan: &MemoryPlan, cache: &Cache, compression: DBCompressionType) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    let mut chunks = Options::default();
    chunks.set_block_based_table_factory(&table);
    chunks.set_write_buffer_size(plan.chunk_memtable_bytes);
    chunks.set_max_write_buffer_number(4);
    chunks.set_compression_type(compression);
    chunks.set_level_compaction_dynamic_level_bytes(true);
    if compression != DBCompressionType::None {
        // Compaction rewrites compressed chunks (they are not in blob files): small table
        // files and compactions bound what one compaction writes before it frees its
        // inputs (RocksDB's default allows ~1.6 GiB), so that compacting near the
        // free-space floor cannot fill the disk.
        chunks.set_target_file_size_base(COMPRESSED_TABLE_FILE_BYTES);
        chunks.set_max_compaction_bytes(4 * COMPRESSED_TABLE_FILE_BYTES);
    }
    chunks.set_merge_operator(
        "fusevol-chunk-patch",
        codec::merge_chunk,
        codec::merge_chunk_partial,
    );
    chunks
}

impl Store {
    /// Opens the store in `dir`, creating it (and the directory) when the directory is
    /// missing or empty. A non-empty directory without a marker is refused untouched.
    pub fn open_or_create(dir: &Path, opts: &StoreOptions) -> Result<Store> {
        Self::open_inner(dir, opts, true)
    }

    /// Opens an existing store; never creates anything.
    pub fn open_existing(dir: &Path, opts: &StoreOptions) -> Result<Store> {
        Self::open_inner(dir, opts, false)
    }

    fn open_inner(dir: &Path, opts: &StoreOptions, create: bool) -> Result<Store> {
        let marker = dir.join(MARKER_FILE);
        let format = match std::fs::read(&marker) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::BadMarker(dir.into(), "marker file is not text".into()))?;
                Format::parse(&text).map_err(|m| Error::BadMarker(dir.into(), m))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let empty = match std::fs::read_dir(dir) {
                    Ok(mut it) => it.next().is_none(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => return Err(io_err(dir)(e)),
                };
                if !create {
                    return Err(if empty {
                        Error::Io {
                            path: dir.into(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "no fusevol store here",
                            ),
                        }
                    } else {
                        Error::NotAStore(dir.into())
                    });
                }
                if !empty {
                    return Err(Error::NotAStore(dir.into()));
                }
                create_dir_all_durable(dir).map_err(io_err(dir))?;
                let format = Format {
                    version: FORMAT_BASE,
                    chunk_size: opts.chunk_size,
                };
                // Written last-to-first so a crash leaves either nothing or a store: the
                // marker goes in via rename once the lock is held and the db exists.
                let lock = Self::lock(dir)?;
                let db = Self::open_db(dir, opts)?;
                write_marker(dir, &format)?;
                return Ok(Self::finish(dir, format, db, lock, opts));
            }
            Err(e) => return Err(io_err(&marker)(e)),
        };
        let lock = Self::lock(dir)?;
        if !dir.join(DB_DIR).join("CURRENT").exists() {
            return Err(Error::Corrupt(format!(
                "{} has a marker but no database (missing {}/CURRENT)",
                dir.display(),
                DB_DIR
            )));
        }
        let db = Self::open_db(dir, opts)?;
        Ok(Self::finish(dir, format, db, lock, opts))
    }

    /// Raises the store's format to at least `version` (rewriting its marker durably), for
    /// a change older builds must not see. Under the registry lock.
    fn require_format(&self, version: u32) -> Result<()> {
        let dir = &self.inner.dir;
        let marker = dir.join(MARKER_FILE);
        let text = std::fs::read_to_string(&marker).map_err(io_err(&marker))?;
        let mut format = Format::parse(&text).map_err(|m| Error::BadMarker(dir.clone(), m))?;
        if format.version < version {
            format.version = version;
            write_marker(dir, &format)?;
        }
        Ok(())
    }

    fn finish(dir: &Path, format: Format, db: DB, lock: Flock<File>, opts: &StoreOptions) -> Store {
        let db = Arc::new(db);
        let disk = Arc::new(DiskSpace::new(dir, opts.free_space_floor, db.clone()));
        Store {
            inner: Arc::new(StoreInner {
                dir: dir.to_path_buf(),
                format,
                db,
                open_volumes: Mutex::new(HashMap::new()),
                keys: Mutex::new(HashMap::new()),
                writes: AtomicU64::new(0),
                registry: Mutex::new(()),
                disk,
                _lock: lock,
            }),
        }
    }

    fn lock(dir: &Path) -> Result<Flock<File>> {
        let path = dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => Error::Locked(dir.to_path_buf()),
            e => io_err(&path)(std::io::Error::from(e)),
        })
    }

    fn open_db(dir: &Path, opts: &StoreOptions) -> Result<DB> {
        let plan = MemoryPlan::new(opts.memory_budget);
        let cache = Cache::new_lru_cache(plan.cache_bytes);
        let (o, cfs) = db_options(&plan, &cache);
        let path = dir.join(DB_DIR);
        DB::open_cf_descriptors(&o, &path, cfs).map_err(|e| match e.kind() {
            rocksdb::ErrorKind::Corruption => Error::Corrupt(e.to_string()),
            _ => Error::Db(e),
        })
    }

    /// Is there a store (marker file) in `dir`?
    pub fn exists(dir: &Path) -> bool {
        dir.join(MARKER_FILE).exists()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Notes in the store's directory the fd holder (`fusevol fdstore`) its servers hand
    /// their FUSE connections to, so that commands run while no server does (`volume
    /// delete`, `fsck --repair`) can ask it whether a volume is still mounted.
    pub fn record_holder(&self, socket: &Path) -> std::io::Result<()> {
        let path = self.inner.dir.join(HOLDER_FILE);
        let text = socket.as_os_str().as_encoded_bytes();
        if std::fs::read(&path).is_ok_and(|old| old == text) {
            return Ok(());
        }
        let tmp = self.inner.dir.join(format!("{HOLDER_FILE}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)
    }

    /// The fd holder socket [`Store::record_holder`] noted in `dir`, if any.
    pub fn recorded_holder(dir: &Path) -> Option<PathBuf> {
        let bytes = std::fs::read(dir.join(HOLDER_FILE)).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        (!text.is_empty()).then(|| PathBuf::from(text))
    }

    pub fn chunk_size(&self) -> u32 {
        self.inner.format.chunk_size
    }

    raw_access! {
        fn db(&self) -> &DB {
            &self.inner.db
        }
    }

    raw_access! {
        fn meta(&self) -> &ColumnFamily {
            // Both column families are opened in `open_db`; their absence is impossible.
            self.cf(CF_META)
        }
    }

    /// The chunks of uncompressed volumes (for the crate's unit tests, which corrupt
    /// stores on purpose).
    #[cfg(test)]
    pub(crate) fn chunks(&self) -> &ColumnFamily {
        self.cf(CF_CHUNKS)
    }

    raw_access! {
        /// The chunks of volumes with compression `c`.
        fn chunks_for(&self, c: Compression) -> &ColumnFamily {
            self.cf(chunk_cf_name(c))
        }
    }

    raw_access! {
        /// Every column family: the metadata, then the chunks of each compression.
        fn all_cfs(&self) -> [&ColumnFamily; 4] {
            ALL_CFS.map(|name| self.cf(name))
        }
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        match self.inner.db.cf_handle(name) {
            Some(cf) => cf,
            None => unreachable!("column family {name} is created at open"),
        }
    }

    raw_access! {
        /// Commits one operation's batch (WAL on, not synced: see [`Store::sync`]).
        fn write(&self, batch: WriteBatch) -> Result<()> {
            let mut wo = WriteOptions::default();
            wo.set_sync(false);
            self.inner.db.write_opt(batch, &wo)?;
            self.inner.writes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Flushes the memtables when nothing was written since the previous call and they
    /// hold more than `min_bytes`: an idle store gives its write buffers back instead of
    /// keeping the last burst in memory. Call it periodically.
    pub fn flush_if_idle(&self, min_bytes: u64) -> Result<bool> {
        if self.inner.writes.swap(0, Ordering::Relaxed) > 0 {
            return Ok(false);
        }
        let db = &self.inner.db;
        let mut held = 0;
        for cf in self.all_cfs() {
            held += db
                .property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")?
                .unwrap_or(0);
        }
        if held < min_bytes {
            return Ok(false);
        }
        for cf in self.all_cfs() {
            db.flush_cf(cf)?;
        }
        Ok(true)
    }

    /// When a change was refused at the free-space floor, compacts the whole store (a
    /// second after deletes, else at most every 30 s) so that space of deleted data goes
    /// back to the disk: RocksDB
    /// frees it only when compaction drops the deleted keys and the blob files they
    /// referenced. Call it periodically; cheap when nothing was refused.
    pub fn reclaim_if_wanted(&self) {
        let disk = &self.inner.disk;
        if !disk.reclaim_wanted.load(Ordering::Acquire) {
            return;
        }
        // Soon after deletes (they are what a compaction can free), rarely otherwise.
        let last = disk.reclaimed_ms.load(Ordering::Acquire);
        let wait_ms = if disk.freed_since_reclaim.load(Ordering::Acquire) > 0 {
            1_000
        } else {
            30_000
        };
        if last != 0 && disk.now_ms().saturating_sub(last) < wait_ms {
            return;
        }
        if disk.reclaiming.swap(true, Ordering::AcqRel) {
            return;
        }
        disk.freed_since_reclaim.store(0, Ordering::Release);
        disk.reclaim_wanted.store(false, Ordering::Release);
        disk.reclaimed_ms
            .store(disk.now_ms().max(1), Ordering::Release);
        tracing::warn!(dir = %self.inner.dir.display(), floor = disk.floor, "disk at its free-space floor; compacting (blob GC off) to give deleted data's space back");
        // Off the caller's thread (the agent's volume loop, the mount's signal loop).
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("fusevol-reclaim".into())
            .spawn(move || {
                store.reclaim_at_floor();
                store.inner.disk.reclaiming.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the compaction at the free-space floor");
            disk.reclaiming.store(false, Ordering::Release);
        }
    }

    /// The compaction at the floor: blob GC off first (it relocates live blobs, writing
    /// new files before old ones go, which a full disk cannot take), then every level
    /// compacted down, except the bottommost level on its own, so deleted keys meet their
    /// tombstones and blob files that only they referenced are deleted. GC comes back on
    /// once the disk has twice its floor free (see `DiskSpace::measure`).
    fn reclaim_at_floor(&self) {
        let disk = &self.inner.disk;
        disk.set_blob_gc(false);
        let db = &self.inner.db;
        let mut co = CompactOptions::default();
        co.set_bottommost_level_compaction(BottommostLevelCompaction::Skip);
        co.set_exclusive_manual_compaction(false);
        for cf in self.all_cfs() {
            if let Err(e) = db.flush_cf(cf) {
                tracing::error!(error = %e, "flush at the free-space floor failed");
            }
            db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &co);
        }
        disk.measure();
    }

    /// The free-space floor of the store's disk (bytes), and whether changes are being
    /// refused at it right now.
    pub fn free_space_floor(&self) -> (u64, bool) {
        let disk = &self.inner.disk;
        (disk.floor, disk.headroom.load(Ordering::Acquire) < 0)
    }

    /// Makes every committed batch durable (fsync of the WAL).
    pub fn sync(&self) -> Result<()> {
        self.inner.db.flush_wal(true)?;
        Ok(())
    }

    raw_access! {
        fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
            Ok(self.inner.db.get_cf(self.meta(), key)?)
        }
    }

    raw_access! {
        /// The value under `key` in `cf`, as stored.
        fn get_raw(&self, cf: &ColumnFamily, key: &[u8]) -> Result<Option<Vec<u8>>> {
            Ok(self.inner.db.get_cf(cf, key)?)
        }
    }

    raw_access! {
        /// Up to `max` (keys, bytes) of `cf` in `[from, to)`, in order, read without
        /// filling the block cache, and the key the next window starts at (`None`: `to`
        /// was reached).
        fn read_window(
            &self,
            cf: &ColumnFamily,
            from: &[u8],
            to: &[u8],
            (max_keys, max_bytes): (usize, usize),
        ) -> Result<(Entries, Option<Vec<u8>>)> {
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_iterate_upper_bound(to.to_vec());
            ro.fill_cache(false);
            let mut it = self.inner.db.raw_iterator_cf_opt(cf, ro);
            it.seek(from);
            let (mut out, mut bytes) = (Vec::new(), 0usize);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if out.len() >= max_keys || bytes >= max_bytes {
                    return Ok((out, Some(k.to_vec())));
                }
                bytes += k.len() + v.len();
                out.push((k.to_vec(), v.to_vec()));
                it.next();
            }
            it.status()?;
            Ok((out, None))
        }
    }

    /// The write generation of replicated volume `vid`'s copy here (0: none; see
    /// [`replica`]).
    fn write_gen(&self, vid: VolumeId) -> Result<u64> {
        Ok(self.write_gen_opt(vid)?.unwrap_or(0))
    }

    /// The write generation of volume `vid` here, `None` when it has none (one copy).
    fn write_gen_opt(&self, vid: VolumeId) -> Result<Option<u64>> {
        match self.get_meta(&codec::write_gen_key(vid))? {
            None => Ok(None),
            Some(raw) => Ok(Some(codec::decode_counter("write generation", &raw)?)),
        }
    }

    /// The history of replicated volume `vid`'s copy here (see [`replica`]).
    fn replica_history(&self, vid: VolumeId) -> Result<Vec<(u64, u64)>> {
        match self.get_meta(&codec::history_key(vid))? {
            None => Ok(Vec::new()),
            Some(raw) => Ok(codec::decode_history(&raw)?),
        }
    }

    /// The persisted inode-number counter of volume `vid` ([`codec::next_ino_key`]):
    /// `None` for a volume made before the counter existed.
    pub fn next_ino(&self, vid: VolumeId) -> Result<Option<Ino>> {
        match self.get_meta(&codec::next_ino_key(vid))? {
            None => Ok(None),
            Some(raw) => Ok(Some(codec::decode_counter("next inode number", &raw)?)),
        }
    }

    fn volume_id(&self, name: &str) -> Result<Option<VolumeId>> {
        match self.get_meta(&codec::volume_name_key(name))? {
            None => Ok(None),
            Some(v) => match codec::decode_volume_id(&v) {
                Some(id) => Ok(Some(id)),
                None => Err(Error::Corrupt(format!(
                    "volume id of {name:?} has {} bytes",
                    v.len()
                ))),
            },
        }
    }

    /// The id of volume `name`, which must exist.
    fn existing_id(&self, name: &str) -> Result<VolumeId> {
        self.volume_id(name)?
            .ok_or_else(|| Error::VolumeNotFound(name.to_string()))
    }

    fn config(&self, id: VolumeId) -> Result<VolumeConfig> {
        let raw = self
            .get_meta(&codec::config_key(id))?
            .ok_or_else(|| Error::Corrupt(format!("volume {id} has no config")))?;
        decode_config(id, &raw)
    }

    fn usage(&self, id: VolumeId) -> Result<Usage> {
        match self.get_meta(&codec::usage_key(id))? {
            None => Ok(Usage::default()),
            Some(raw) => Ok(Usage::decode(&raw)?),
        }
    }

    /// Names of all volumes, sorted.
    pub fn volume_names(&self) -> Result<Vec<String>> {
        let prefix = codec::tag_prefix(codec::STORE_VOLUME, codec::TAG_VOLUME_NAME);
        let mut names = Vec::new();
        self.scan_meta(&prefix, |k, _| {
            names.push(codec::parse_volume_name_key(k)?);
            Ok(true)
        })?;
        Ok(names)
    }

    raw_access! {
        /// Calls `f(key, value)` for every meta key with `prefix`, in order, until it returns false.
        fn scan_meta(
            &self,
            prefix: &[u8],
            f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
        ) -> Result<()> {
            self.scan(self.meta(), prefix, &codec::prefix_end(prefix), f)
        }
    }

    raw_access! {
        /// Calls `f(key, value)` for keys in `[from, to)` of `cf`, until it returns false.
        fn scan(
            &self,
            cf: &ColumnFamily,
            from: &[u8],
            to: &[u8],
            mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
        ) -> Result<()> {
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_iterate_upper_bound(to.to_vec());
            let mut it = self.inner.db.raw_iterator_cf_opt(cf, ro);
            it.seek(from);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !f(k, v)? {
                    return Ok(());
                }
                it.next();
            }
            it.status()?;
            Ok(())
        }
    }

    /// Creates an uncompressed volume with an empty root directory. Fails if it exists.
    pub fn create_volume(
        &self,
        name: &str,
        quota: Option<u64>,
        inode_limit: Option<u64>,
    ) -> Result<VolumeInfo> {
        self.create_volume_with(
            name,
            &NewVolume {
                quota,
                inode_limit,
                compression: Compression::None,
                encryption: None,
            },
        )
    }

    /// Creates a volume with an empty root directory and settings `new`. Fails if it
    /// exists.
    pub fn create_volume_with(&self, name: &str, new: &NewVolume) -> Result<VolumeInfo> {
        let id = {
            let _g = self.inner.registry.lock();
            self.next_volume_id()?
        };
        self.create_volume_as(name, new, id, None)
    }

    /// [`Store::create_volume_with`] under id `id` (free, checked again under the
    /// registry lock), and for a replicated volume its first copy (see
    /// [`create_replicated`]).
    fn create_volume_as(
        &self,
        name: &str,
        new: &NewVolume,
        id: VolumeId,
        replicas: Option<codec::ReplicaConfig>,
    ) -> Result<VolumeInfo> {
        let NewVolume {
            quota,
            inode_limit,
            compression,
            ref encryption,
        } = *new;
        validate_volume_name(name)?;
        if encryption.is_some() && !compression.is_none() {
            return Err(Error::Unsupported(format!(
                "volume {name:?}: compression {compression} and encryption together are not supported yet (encrypted chunks do not compress): choose one"
            )));
        }
        let _g = self.inner.registry.lock();
        if self.volume_id(name)?.is_some() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        if inode_limit == Some(0) {
            return Err(Error::InodeLimitBelowUsage {
                name: name.into(),
                used: 1,
                limit: 0,
            });
        }
        if id < self.next_volume_id()? {
            return Err(Error::Corrupt(format!(
                "volume id {id} was given out in {} already",
                self.inner.dir.display()
            )));
        }
        if replicas.is_some() {
            self.require_format(FORMAT_REPLICAS)?;
        }
        let sealed_key = match encryption {
            Some(master) => {
                self.require_format(FORMAT_ENCRYPTION)?;
                Some(codec::to_hex(&master.new_volume_key()?.1))
            }
            None => None,
        };
        let cfg = VolumeConfig {
            name: name.to_string(),
            quota_bytes: quota,
            inode_limit,
            created: Timestamp::now().secs,
            owner: None,
            accounting: codec::ACCOUNTING_VERSION,
            compression,
            encryption: if sealed_key.is_some() {
                Encryption::Aes256Gcm
            } else {
                Encryption::None
            },
            sealed_key,
            replicas: replicas.clone(),
        };
        let now = Timestamp::now();
        let mut root = InodeRecord::new(Kind::Dir, 0o755, 0, 0, now);
        root.parent = ROOT_INO;
        let usage = Usage {
            bytes: 0,
            inodes: 1,
            chunks: 0,
        };
        let meta = self.meta();
        let mut b = WriteBatch::default();
        // Clear any leftovers of an earlier volume with this id (a crash mid-delete).
        b.delete_range_cf(meta, codec::volume_start(id), codec::volume_end(id));
        for c in Compression::ALL {
            b.delete_range_cf(
                self.chunks_for(c),
                codec::volume_start(id),
                codec::volume_end(id),
            );
        }
        b.put_cf(
            meta,
            codec::volume_name_key(name),
            codec::encode_volume_id(id),
        );
        b.put_cf(
            meta,
            codec::next_volume_id_key(),
            codec::encode_volume_id(id.checked_add(1).unwrap_or(id)),
        );
        b.put_cf(meta, codec::config_key(id), encode_config(&cfg)?);
        b.put_cf(meta, codec::usage_key(id), usage.encode());
        b.put_cf(meta, codec::inode_key(id, ROOT_INO), root.encode());
        b.put_cf(
            meta,
            codec::next_ino_key(id),
            codec::encode_counter(ROOT_INO + 1),
        );
        if replicas.is_some() {
            let history = [(crypt::random_u64()?, 1)];
            b.put_cf(meta, codec::write_gen_key(id), codec::encode_counter(1));
            b.put_cf(
                meta,
                codec::history_key(id),
                codec::encode_history(&history),
            );
        }
        self.write(b)?;
        self.sync()?;
        if let Some(master) = encryption {
            self.inner
                .keys
                .lock()
                .insert(name.to_string(), master.clone());
        }
        self.inspect_volume(name)
    }

    /// Gives the store the master key of encrypted volume `name`, for [`Store::open_volume`]
    /// (kept in memory, by name, until the store closes). Fails with
    /// [`Error::WrongKey`] if it does not open the volume's data key; a volume that is not
    /// encrypted takes no key, which is an error too, so a key is never silently ignored.
    pub fn unlock(&self, name: &str, key: &MasterKey) -> Result<()> {
        let id = self.existing_id(name)?;
        let cfg = self.config(id)?;
        if cfg.encryption.is_none() {
            return Err(Error::Unsupported(format!(
                "volume {name:?} is not encrypted: it takes no key"
            )));
        }
        self.volume_cipher(name, &cfg, key)?;
        self.inner.keys.lock().insert(name.to_string(), key.clone());
        Ok(())
    }

    /// The cipher of encrypted volume `name` (configuration `cfg`) under master key `key`.
    fn volume_cipher(
        &self,
        name: &str,
        cfg: &VolumeConfig,
        key: &MasterKey,
    ) -> Result<VolumeCipher> {
        let sealed = cfg
            .sealed_key
            .as_deref()
            .and_then(codec::from_hex)
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "volume {name:?}: encrypted, but its sealed key is missing or not hex"
                ))
            })?;
        key.open_volume_key(&sealed).map_err(|e| match e {
            CryptError::WrongKey => Error::WrongKey(name.to_string()),
            e => Error::Crypt(e),
        })
    }

    /// The id for a new volume: the persisted counter, and never below one past the
    /// highest id in use (stores made before the counter existed have none). An id is
    /// never given out twice, so a FUSE session or snapshot that outlived its volume can
    /// never reach the keys of a later one.
    fn next_volume_id(&self) -> Result<VolumeId> {
        let counter = match self.get_meta(&codec::next_volume_id_key())? {
            None => 1,
            Some(v) => match codec::decode_volume_id(&v) {
                Some(id) => id,
                None => {
                    return Err(Error::Corrupt(format!(
                        "next volume id has {} bytes",
                        v.len()
                    )))
                }
            },
        };
        let mut next = counter.max(1);
        for n in &self.volume_names()? {
            if let Some(id) = self.volume_id(n)? {
                next = next.max(id.saturating_add(1));
            }
        }
        if next == u32::MAX {
            return Err(Error::Corrupt("volume ids exhausted".into()));
        }
        Ok(next)
    }

    /// Opens a volume for serving: at most once per process (and the store's lock makes
    /// it one process), so one volume never has two serving instances. The volume counts
    /// as open until the returned guard is dropped, which the FUSE session does only
    /// when its last worker thread has ended; while it is open it cannot be deleted.
    ///
    /// A replicated volume is refused: written through one copy alone, its copies would
    /// differ (see [`open_replicated`]).
    pub fn open_volume(&self, name: &str) -> Result<OpenVolume> {
        self.open_copy(name, false)
    }

    /// [`Store::open_volume`], taking one copy of a replicated volume alone too: for reads
    /// only (`fsck`'s check), or for [`open_replicated`].
    pub fn open_volume_copy(&self, name: &str) -> Result<OpenVolume> {
        self.open_copy(name, true)
    }

    fn open_copy(&self, name: &str, copy_alone: bool) -> Result<OpenVolume> {
        let _g = self.inner.registry.lock();
        let mut open = self.inner.open_volumes.lock();
        if open.contains_key(name) {
            return Err(Error::VolumeBusy(name.to_string()));
        }
        let id = self.existing_id(name)?;
        let cfg = self.config(id)?;
        if let (Some(rc), false) = (&cfg.replicas, copy_alone) {
            return Err(Error::Unsupported(format!(
                "volume {name:?} keeps {} copies: serve it from its stores together (fusevol mount --data DIR1 --data DIR2 ...), not from {} alone",
                rc.copies,
                self.inner.dir.display()
            )));
        }
        let usage = self.usage(id)?;
        if usage.bytes < 0 || usage.inodes < 0 || usage.chunks < 0 {
            return Err(Error::Corrupt(format!(
                "volume {name:?} has negative usage counters {usage:?}; run fsck --repair"
            )));
        }
        let cipher = match cfg.encryption {
            Encryption::None => None,
            Encryption::Aes256Gcm => {
                let key = self.inner.keys.lock().get(name).cloned();
                let key = key.ok_or_else(|| Error::KeyRequired(name.to_string()))?;
                Some(Arc::new(self.volume_cipher(name, &cfg, &key)?))
            }
        };
        let v = Arc::new(Volume {
            id,
            name: name.to_string(),
            compression: cfg.compression,
            cipher,
            disk: self.inner.disk.clone(),
            replica: std::sync::OnceLock::new(),
            quota: AtomicU64::new(cfg.quota_bytes.unwrap_or(UNLIMITED)),
            inode_limit: AtomicU64::new(cfg.inode_limit.unwrap_or(UNLIMITED)),
            used_bytes: AtomicU64::new(usage.bytes as u64),
            inodes: AtomicU64::new(usage.inodes as u64),
            chunks: AtomicU64::new(usage.chunks as u64),
        });
        open.insert(name.to_string(), v.clone());
        Ok(OpenVolume {
            copies: vec![Copy {
                store: self.clone(),
                vol: v,
            }],
            set: None,
        })
    }

    pub fn is_open(&self, name: &str) -> bool {
        self.inner.open_volumes.lock().contains_key(name)
    }

    pub fn inspect_volume(&self, name: &str) -> Result<VolumeInfo> {
        let id = self.existing_id(name)?;
        let cfg = self.config(id)?;
        let open = self.inner.open_volumes.lock().get(name).cloned();
        let (used, inodes, chunks) = match &open {
            Some(v) => (v.used_bytes(), v.inodes(), v.chunks()),
            None => {
                let u = self.usage(id)?;
                (
                    u.bytes.max(0) as u64,
                    u.inodes.max(0) as u64,
                    u.chunks.max(0) as u64,
                )
            }
        };
        Ok(VolumeInfo {
            name: name.to_string(),
            quota_bytes: cfg.quota_bytes,
            inode_limit: cfg.inode_limit,
            used_bytes: used,
            inodes,
            chunks,
            mounted: open.is_some(),
            compression: CompressionInfo {
                algorithm: cfg.compression,
                ..CompressionInfo::default()
            },
            encryption: EncryptionInfo {
                algorithm: cfg.encryption,
            },
            replicas: match (&cfg.replicas, open.as_ref().and_then(|v| v.replica.get())) {
                (_, Some(set)) => Some(set.info()),
                (Some(rc), None) => Some(ReplicasInfo {
                    wanted: rc.copies,
                    copies: Vec::new(),
                    degraded: false,
                    failovers: 0,
                    repairs: 0,
                }),
                (None, None) => None,
            },
        })
    }

    /// [`Store::inspect_volume`] with the volume's data measured: the bytes of file data
    /// it stores, and for a compressed volume what they take on disk (see
    /// [`CompressionInfo`]). Costs a pass over the volume's chunk index, and a flush of
    /// its chunks' column family when that holds unflushed writes (RocksDB estimates the
    /// size of table files only); the stored bytes include old versions of overwritten
    /// chunks until compaction drops them.
    pub fn inspect_volume_measured(&self, name: &str) -> Result<VolumeInfo> {
        let mut info = self.inspect_volume(name)?;
        let id = self.existing_id(name)?;
        let algorithm = info.compression.algorithm;
        let mut logical = 0u64;
        let mut bad = None;
        VolumeView::plain(self, id, algorithm).each_chunk_len(|ino, idx, len| match len {
            Ok(len) => logical = logical.saturating_add(len),
            Err(e) => bad = Some(format!("chunk {idx} of inode {ino}: {e}; run fsck")),
        })?;
        if let Some(message) = bad {
            return Err(Error::Corrupt(message));
        }
        info.compression.logical_bytes = Some(logical);
        if !algorithm.is_none() {
            info.compression.stored_bytes = Some(self.stored_chunk_bytes(id, algorithm)?);
        }
        Ok(info)
    }

    raw_access! {
        /// What the chunks of volume `id` take in the table files of their column family.
        fn stored_chunk_bytes(&self, id: VolumeId, algorithm: Compression) -> Result<u64> {
            let (db, cf) = (&self.inner.db, self.chunks_for(algorithm));
            let unflushed = db
                .property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")?
                .unwrap_or(0);
            if unflushed > 0 {
                db.flush_cf(cf)?;
            }
            let (lo, hi) = (codec::volume_start(id), codec::volume_end(id));
            let sizes = db.get_approximate_sizes_cf(cf, &[rocksdb::Range::new(&lo, &hi)]);
            Ok(sizes.first().copied().unwrap_or(0))
        }
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        self.volume_names()?
            .iter()
            .map(|n| self.inspect_volume(n))
            .collect()
    }

    /// Changes a volume's quota and/or inode limit, also while it is being served.
    /// `Some(None)` removes a limit. Lowering below current usage is refused.
    pub fn resize_volume(
        &self,
        name: &str,
        quota: Option<Option<u64>>,
        inode_limit: Option<Option<u64>>,
    ) -> Result<VolumeInfo> {
        let _g = self.inner.registry.lock();
        let id = self.existing_id(name)?;
        let mut cfg = self.config(id)?;
        let open = self.inner.open_volumes.lock().get(name).cloned();
        if let Some(rc) = &cfg.replicas {
            return Err(Error::Unsupported(format!(
                "volume {name:?} keeps {} copies: its limits change in every copy at once, with fusevol mount --quota / --inodes and all its --data directories{}",
                rc.copies,
                if open.is_some() { " (stop the mount first)" } else { "" }
            )));
        }
        let current = self.inspect_volume(name)?;
        if let Some(q) = quota {
            if let Some(q) = q {
                if q < current.used_bytes {
                    return Err(Error::QuotaBelowUsage {
                        name: name.into(),
                        used: current.used_bytes,
                        quota: q,
                    });
                }
            }
            cfg.quota_bytes = q;
        }
        if let Some(l) = inode_limit {
            if let Some(l) = l {
                if l < current.inodes {
                    return Err(Error::InodeLimitBelowUsage {
                        name: name.into(),
                        used: current.inodes,
                        limit: l,
                    });
                }
            }
            cfg.inode_limit = l;
        }
        if let Some(v) = &open {
            let new_quota = cfg.quota_bytes.unwrap_or(UNLIMITED);
            let old_quota = v.quota.swap(new_quota, Ordering::AcqRel);
            // A writer may have grown usage between the check and the swap: re-check.
            if v.used_bytes() > new_quota {
                v.quota.store(old_quota, Ordering::Release);
                return Err(Error::QuotaBelowUsage {
                    name: name.into(),
                    used: v.used_bytes(),
                    quota: new_quota,
                });
            }
            let new_limit = cfg.inode_limit.unwrap_or(UNLIMITED);
            let old_limit = v.inode_limit.swap(new_limit, Ordering::AcqRel);
            // The same for a create between the check and the swap.
            if v.inodes() > new_limit {
                v.inode_limit.store(old_limit, Ordering::Release);
                v.quota.store(old_quota, Ordering::Release);
                return Err(Error::InodeLimitBelowUsage {
                    name: name.into(),
                    used: v.inodes(),
                    limit: new_limit,
                });
            }
        }
        let mut b = WriteBatch::default();
        b.put_cf(self.meta(), codec::config_key(id), encode_config(&cfg)?);
        self.write(b)?;
        self.sync()?;
        drop(_g);
        self.inspect_volume(name)
    }

    /// Whether volume `name` counts usage by an older rule and must be recounted (with
    /// [`Store::set_recounted_usage`]) before it is served.
    pub fn needs_recount(&self, name: &str) -> Result<bool> {
        let id = self.existing_id(name)?;
        Ok(self.config(id)?.accounting < codec::ACCOUNTING_VERSION)
    }

    /// Replaces the usage counters of a closed volume with `usage` (recounted from what
    /// it stores) and marks it as counted by the current rule.
    pub fn set_recounted_usage(&self, name: &str, usage: Usage) -> Result<()> {
        let _g = self.inner.registry.lock();
        if self.is_open(name) {
            return Err(Error::VolumeBusy(name.to_string()));
        }
        let id = self.existing_id(name)?;
        let mut cfg = self.config(id)?;
        cfg.accounting = codec::ACCOUNTING_VERSION;
        let mut b = WriteBatch::default();
        b.put_cf(self.meta(), codec::usage_key(id), usage.encode());
        b.put_cf(self.meta(), codec::config_key(id), encode_config(&cfg)?);
        self.write(b)?;
        self.sync()
    }

    /// Makes sure volume `name` belongs to `owner` (a PV's UID): records it if the volume
    /// has no owner yet, refuses with [`Error::OwnerMismatch`] if it has another one. A
    /// name that is reused (a static PV published again under its old name) thus never
    /// reaches the data that an earlier object of that name left behind.
    pub fn claim_volume(&self, name: &str, owner: &str) -> Result<()> {
        let _g = self.inner.registry.lock();
        let id = self.existing_id(name)?;
        let mut cfg = self.config(id)?;
        match &cfg.owner {
            Some(o) if o == owner => return Ok(()),
            Some(o) => {
                return Err(Error::OwnerMismatch {
                    name: name.into(),
                    owner: o.clone(),
                    claimant: owner.into(),
                })
            }
            None => cfg.owner = Some(owner.to_string()),
        }
        let mut b = WriteBatch::default();
        b.put_cf(self.meta(), codec::config_key(id), encode_config(&cfg)?);
        self.write(b)?;
        self.sync()
    }

    /// Deletes a volume and all its data, and compacts its key ranges so the space goes
    /// back to the disk. Refused while the volume is being served.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let _g = self.inner.registry.lock();
        if self.is_open(name) {
            return Err(Error::VolumeBusy(name.to_string()));
        }
        let id = self.existing_id(name)?;
        let (lo, hi) = (codec::volume_start(id), codec::volume_end(id));
        let mut b = WriteBatch::default();
        b.delete_cf(self.meta(), codec::volume_name_key(name));
        b.delete_range_cf(self.meta(), &lo, &hi);
        for c in Compression::ALL {
            b.delete_range_cf(self.chunks_for(c), &lo, &hi);
        }
        self.write(b)?;
        self.sync()?;
        // A later volume of that name has its own data key (and maybe another master key).
        self.inner.keys.lock().remove(name);
        self.reclaim_range(&lo, &hi)
    }

    /// What the store holds for volume `name`, measured the slow way (tests and
    /// diagnostics): the bytes of its keys and values, and, after its key range is
    /// compacted, the bytes of the store's live table and blob files (the volume's own
    /// when it is the store's only one).
    pub fn footprint(&self, name: &str) -> Result<Footprint> {
        let id = self.existing_id(name)?;
        let (lo, hi) = (codec::volume_start(id), codec::volume_end(id));
        let mut logical = 0;
        for cf in self.all_cfs() {
            self.scan(cf, &lo, &hi, |k, v| {
                logical += (k.len() + v.len()) as u64;
                Ok(true)
            })?;
        }
        self.reclaim_range(&lo, &hi)?;
        let db = &self.inner.db;
        let prop = |cf, name: &str| -> Result<u64> {
            Ok(db.property_int_value_cf(cf, name)?.unwrap_or(0))
        };
        let mut disk = 0;
        for cf in self.all_cfs() {
            disk += prop(cf, "rocksdb.live-sst-files-size")?
                + prop(cf, "rocksdb.live-blob-file-size")?
                    .saturating_sub(prop(cf, "rocksdb.live-blob-file-garbage-size")?);
        }
        Ok(Footprint { logical, disk })
    }

    raw_access! {
        /// Compacts `[lo, hi)` in both column families so deleted data leaves the disk
        /// (including blob files whose chunks are all garbage).
        fn reclaim_range(&self, lo: &[u8], hi: &[u8]) -> Result<()> {
            let db = &self.inner.db;
            let mut co = CompactOptions::default();
            co.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
            co.set_exclusive_manual_compaction(false);
            for cf in self.all_cfs() {
                db.flush_cf(cf)?;
                db.compact_range_cf_opt(cf, Some(lo), Some(hi), &co);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_or_create(&dir.path().join("s"), &StoreOptions::default()).unwrap();
        (dir, s)
    }

    #[test]
    fn the_memory_budget_sizes_the_cache_and_writes_beyond_it_still_land() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            memory_budget: MIN_MEMORY_BUDGET,
            ..Default::default()
        };
        let s = Store::open_or_create(&dir.path().join("s"), &opts).unwrap();
        let db = &s.inner.db;
        let cap = db
            .property_int_value_cf(s.chunks(), "rocksdb.block-cache-capacity")
            .unwrap();
        assert_eq!(cap, Some(MIN_MEMORY_BUDGET));
        // Four times the budget through the memtables: writes stall and resume at each
        // flush instead of growing memory or failing.
        let value = vec![7u8; 64 << 10];
        for i in 0u32..1024 {
            let mut b = WriteBatch::default();
            b.put_cf(s.chunks(), i.to_be_bytes(), &value);
            s.write(b).unwrap();
        }
        let held = db
            .property_int_value_cf(s.chunks(), "rocksdb.cur-size-all-mem-tables")
            .unwrap()
            .unwrap();
        assert!(held <= MIN_MEMORY_BUDGET / 2, "memtables hold {held} bytes");
        let got = db.get_cf(s.chunks(), 1023u32.to_be_bytes()).unwrap();
        assert_eq!(got.as_deref(), Some(&value[..]));
    }

    #[test]
    fn volumes_are_created_listed_resized_and_deleted() {
        let (_d, s) = store();
        s.create_volume("a", Some(1000), None).unwrap();
        s.create_volume("b", None, Some(10)).unwrap();
        assert!(matches!(
            s.create_volume("a", None, None),
            Err(Error::VolumeExists(_))
        ));
        let names: Vec<_> = s
            .list_volumes()
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, vec!["a", "b"]);
        let info = s.resize_volume("a", Some(Some(5000)), None).unwrap();
        assert_eq!(info.quota_bytes, Some(5000));
        assert_eq!(info.inodes, 1, "the root directory counts as an inode");
        s.delete_volume("a").unwrap();
        assert!(matches!(
            s.inspect_volume("a"),
            Err(Error::VolumeNotFound(_))
        ));
        assert_eq!(s.volume_names().unwrap(), vec!["b"]);
    }

    #[test]
    fn reservations_never_pass_the_quota() {
        let (_d, s) = store();
        s.create_volume("v", Some(100), Some(3)).unwrap();
        let v = s.open_volume("v").unwrap();
        let r = v
            .reserve(Usage {
                bytes: 60,
                inodes: 1,
                chunks: 1,
            })
            .unwrap();
        v.settle(r);
        assert_eq!(
            v.reserve(Usage {
                bytes: 41,
                inodes: 0,
                chunks: 0
            })
            .err(),
            Some(Exhausted::Bytes)
        );
        assert_eq!(v.used_bytes(), 60, "a refused reservation changes nothing");
        assert_eq!(
            v.reserve(Usage {
                bytes: 1,
                inodes: 2,
                chunks: 0
            })
            .err(),
            Some(Exhausted::Inodes)
        );
        assert_eq!((v.used_bytes(), v.inodes()), (60, 2));
        let r = v
            .reserve(Usage {
                bytes: 40,
                inodes: 0,
                chunks: 0,
            })
            .unwrap();
        v.release(r);
        assert_eq!(v.used_bytes(), 60);
    }

    #[test]
    fn lowering_quota_below_usage_is_refused() {
        let (_d, s) = store();
        s.create_volume("v", Some(100), None).unwrap();
        let v = s.open_volume("v").unwrap();
        v.settle(
            v.reserve(Usage {
                bytes: 80,
                inodes: 0,
                chunks: 0,
            })
            .unwrap(),
        );
        assert!(matches!(
            s.resize_volume("v", Some(Some(50)), None),
            Err(Error::QuotaBelowUsage {
                used: 80,
                quota: 50,
                ..
            })
        ));
        assert_eq!(v.quota(), 100);
        s.resize_volume("v", Some(Some(200)), None).unwrap();
        assert_eq!(v.quota(), 200);
        assert!(matches!(s.delete_volume("v"), Err(Error::VolumeBusy(_))));
    }

    #[test]
    fn volume_ids_are_never_reused_even_after_a_reopen() {
        let (d, s) = store();
        s.create_volume("a", None, None).unwrap();
        s.create_volume("b", None, None).unwrap();
        let id_b = s.volume_id("b").unwrap().unwrap();
        s.delete_volume("b").unwrap();
        s.create_volume("c", None, None).unwrap();
        let id_c = s.volume_id("c").unwrap().unwrap();
        assert!(id_c > id_b, "c got {id_c}, the deleted b had {id_b}");
        s.delete_volume("c").unwrap();
        drop(s);
        let s = Store::open_existing(&d.path().join("s"), &StoreOptions::default()).unwrap();
        s.create_volume("d", None, None).unwrap();
        assert!(s.volume_id("d").unwrap().unwrap() > id_c);
    }

    #[test]
    fn an_open_volume_is_one_instance_and_cannot_be_deleted_until_its_guard_drops() {
        let (_d, s) = store();
        s.create_volume("v", None, None).unwrap();
        let guard = s.open_volume("v").unwrap();
        assert!(matches!(s.open_volume("v"), Err(Error::VolumeBusy(_))));
        assert!(matches!(s.delete_volume("v"), Err(Error::VolumeBusy(_))));
        assert!(s.inspect_volume("v").unwrap().mounted);
        drop(guard);
        assert!(!s.is_open("v"));
        s.delete_volume("v").unwrap();
    }

    #[test]
    fn a_volume_serves_only_the_owner_it_first_recorded() {
        let (_d, s) = store();
        s.create_volume("static-1", None, None).unwrap();
        s.claim_volume("static-1", "uid-a").unwrap();
        s.claim_volume("static-1", "uid-a").unwrap();
        let err = s.claim_volume("static-1", "uid-b").unwrap_err();
        assert!(matches!(err, Error::OwnerMismatch { .. }), "{err}");
        s.resize_volume("static-1", Some(Some(10)), None).unwrap();
        assert!(
            s.claim_volume("static-1", "uid-b").is_err(),
            "a resize keeps the owner"
        );
    }

    #[test]
    fn a_directory_with_other_files_is_not_a_store_and_stays_untouched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
        let err = Store::open_or_create(dir.path(), &StoreOptions::default()).unwrap_err();
        assert!(matches!(err, Error::NotAStore(_)), "{err}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("notes.txt")]);
    }

    #[test]
    fn a_second_open_of_the_same_store_is_refused() {
        let (d, _s) = store();
        let err = Store::open_existing(&d.path().join("s"), &StoreOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Locked(_)), "{err}");
    }

    #[test]
    fn a_junk_marker_is_an_error() {
        let (d, s) = store();
        drop(s);
        std::fs::write(d.path().join("s").join(MARKER_FILE), b"\x00\x01junk").unwrap();
        let err = Store::open_existing(&d.path().join("s"), &StoreOptions::default()).unwrap_err();
        assert!(matches!(err, Error::BadMarker(..)), "{err}");
    }

    #[test]
    fn volume_names_are_validated() {
        for bad in ["", "A", "a/b", "..", ".x", &"x".repeat(64)] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
        for good in ["default", "pvc-1234-abcd", "a.b_c"] {
            validate_volume_name(good).unwrap();
        }
    }
}
