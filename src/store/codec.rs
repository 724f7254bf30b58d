//! The whole RocksDB layout of a fusevol store, in one place: every key and the encoding
//! of the value stored under it, side by side.
//!
//! A store is one RocksDB database on one disk with two column families. Every id is
//! big-endian and fixed-width, so byte order equals numeric order and a prefix scan
//! visits ids in ascending order.
//!
//! ```text
//! column family "meta" (small values; bloom filters; point lookups and short scans)
//!   00000000 'N' <volume name bytes>           -> volume id (u32 BE)          volume name index
//!   00000000 'V'                               -> next volume id (u32 BE)     ids are never reused
//!   <vol u32> 'C'                              -> VolumeConfig (JSON)          quota, inode limit
//!   <vol u32> 'U'                              -> Usage (3 x i64 BE, merge)    bytes, inodes, chunks
//!   <vol u32> 'H'                              -> next inode number (u64 BE)  numbers are never reused
//!   <vol u32> 'G'                              -> mount generation (u64 BE)   one more per fresh mount
//!   <vol u32> 'W'                              -> write generation (u64 BE)   replicated volumes: one more per commit
//!   <vol u32> 'E'                              -> history ((u64, u64 BE)...)  replicated volumes: epochs and where each began
//!   <vol u32> 'R' <slot u16>                   -> ReplayRecord                answers of recent requests
//!   <vol u32> 'I' <ino u64>                    -> InodeRecord                  attributes
//!   <vol u32> 'D' <parent u64> <name bytes>    -> DirentValue                  lookup by name
//!   <vol u32> 'd' <parent u64> <cookie u64>    -> CookieValue                  readdir order
//!   <vol u32> 'L' <ino u64> <chunk u64>        -> stored length of the chunk (u32 BE)
//!   <vol u32> 'O' <ino u64>                    -> (empty)                      unlinked while open
//!   <vol u32> 'X' <ino u64> <name bytes>       -> xattr value (as is)
//!
//! column family "chunks" (large values; BlobDB)
//!   <vol u32> <ino u64> <chunk u64>            -> chunk bytes (at most chunk_size; a short
//!                                                 value reads as zeros up to chunk_size),
//!                                                 or patches (merge operands) over them
//!
//! column families "chunks-lz4", "chunks-zstd" (the chunks of volumes created with that
//! compression: the same keys and values, in table files RocksDB compresses block by block)
//! ```
//!
//! Volume id 0 is reserved for store-wide keys, so every key of volume `v` lies in
//! `[v, v+1)` in both column families: deleting, exporting or copying a volume to another
//! disk (a later tier/replica feature) is one contiguous range per column family.
//!
//! Values: binary layouts are fixed-width big-endian, the larger ones with a version byte
//! so a later format can be told apart; the configuration is JSON so fields can be added
//! compatibly. Every key parser checks length and prefix and returns [`KeyError`]; every
//! value decoder checks lengths and returns [`RecordError`] (or the store's `Corrupt`) on
//! malformed input instead of panicking. The sections below follow the table: each key
//! with the encoding of its value.
//!
//! Adding a key kind: pick an unused tag byte, add its key encoder and checked parser and
//! its value's encoder and checked decoder here, a round-trip test for both, and make
//! `fsck` (which walks every tag) aware of it.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

// ----- ids, errors, ranges -----

/// Volume id inside one store. 0 is reserved for store-wide keys.
pub type VolumeId = u32;
/// Inode number inside one volume. 1 is the root directory.
pub type Ino = u64;

pub const STORE_VOLUME: VolumeId = 0;
pub const TAG_VOLUME_NAME: u8 = b'N';
pub const TAG_NEXT_VOLUME_ID: u8 = b'V';
pub const TAG_CONFIG: u8 = b'C';
pub const TAG_USAGE: u8 = b'U';
pub const TAG_INODE: u8 = b'I';
pub const TAG_DIRENT: u8 = b'D';
pub const TAG_DIRENT_COOKIE: u8 = b'd';
pub const TAG_CHUNK_LEN: u8 = b'L';
pub const TAG_ORPHAN: u8 = b'O';
pub const TAG_XATTR: u8 = b'X';
pub const TAG_NEXT_INO: u8 = b'H';
pub const TAG_MOUNT_GEN: u8 = b'G';
pub const TAG_REPLAY: u8 = b'R';
pub const TAG_WRITE_GEN: u8 = b'W';
pub const TAG_HISTORY: u8 = b'E';

/// A key that failed to parse: wrong length or wrong prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub what: &'static str,
    pub key: Vec<u8>,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed {} key {:02x?}", self.what, self.key)
    }
}

impl std::error::Error for KeyError {}

fn err<T>(what: &'static str, key: &[u8]) -> Result<T, KeyError> {
    Err(KeyError {
        what,
        key: key.to_vec(),
    })
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// `<vol>`: the first key of a volume's range (in either column family).
pub fn volume_start(vol: VolumeId) -> Vec<u8> {
    vol.to_be_bytes().to_vec()
}

/// The first key after a volume's range (exclusive upper bound).
pub fn volume_end(vol: VolumeId) -> Vec<u8> {
    match vol.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 5],
    }
}

fn with_tag(vol: VolumeId, tag: u8, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + extra);
    k.extend_from_slice(&vol.to_be_bytes());
    k.push(tag);
    k
}

/// Prefix of all keys of one tag in a volume.
pub fn tag_prefix(vol: VolumeId, tag: u8) -> Vec<u8> {
    with_tag(vol, tag, 0)
}

/// Exclusive upper bound of a prefix (the prefix with its last byte incremented, carrying).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} record ({len} bytes)")]
pub struct RecordError {
    pub what: &'static str,
    pub len: usize,
}

/// Reads fixed-width big-endian fields; callers check the total length first.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[self.pos..self.pos + N]);
        self.pos += N;
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
}

// ----- store-wide keys: volume names and the volume-id counter -----

pub fn volume_name_key(name: &str) -> Vec<u8> {
    let mut k = with_tag(STORE_VOLUME, TAG_VOLUME_NAME, name.len());
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn parse_volume_name_key(key: &[u8]) -> Result<String, KeyError> {
    if key.len() < 5 || key[..5] != tag_prefix(STORE_VOLUME, TAG_VOLUME_NAME)[..] {
        return err("volume name", key);
    }
    match std::str::from_utf8(&key[5..]) {
        Ok(s) => Ok(s.to_string()),
        Err(_) => err("volume name", key),
    }
}

/// The store-wide counter of volume ids: one past the highest id ever given out, so the
/// id (and with it the key range) of a deleted volume is never given to another one.
pub fn next_volume_id_key() -> Vec<u8> {
    with_tag(STORE_VOLUME, TAG_NEXT_VOLUME_ID, 0)
}

/// The value of a volume name key and of the volume-id counter: a volume id (u32 BE).
pub fn encode_volume_id(id: VolumeId) -> [u8; 4] {
    id.to_be_bytes()
}

/// Decodes a volume id value; `None` if it is not 4 bytes.
pub fn decode_volume_id(v: &[u8]) -> Option<VolumeId> {
    <[u8; 4]>::try_from(v).ok().map(u32::from_be_bytes)
}

// ----- volume configuration -----

pub fn config_key(vol: VolumeId) -> Vec<u8> {
    with_tag(vol, TAG_CONFIG, 0)
}

/// A volume's configuration (JSON, so fields can be added compatibly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    pub name: String,
    /// Quota in bytes of file data; `None` means unlimited.
    pub quota_bytes: Option<u64>,
    /// Maximum number of inodes; `None` means unlimited.
    pub inode_limit: Option<u64>,
    /// Seconds since the epoch at creation.
    pub created: i64,
    /// The UID of the object the volume belongs to (the agent: its PersistentVolume),
    /// once recorded; a volume is never served for another one of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// What the usage counters count: 0 (volumes made before metadata was charged) file
    /// data only; [`ACCOUNTING_VERSION`] every charge of `crate::fs::charge`. A volume of
    /// an older version is recounted before it is served.
    #[serde(default)]
    pub accounting: u32,
    /// How the volume's chunk data is compressed on disk (chosen at creation, fixed).
    #[serde(default, skip_serializing_if = "Compression::is_none")]
    pub compression: Compression,
    /// Encryption at rest of the volume's contents and names (chosen at creation, fixed).
    #[serde(default, skip_serializing_if = "Encryption::is_none")]
    pub encryption: Encryption,
    /// The volume's data key sealed by its master key, in hex (encrypted volumes only;
    /// see [`super::crypt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<String>,
    /// A replicated volume: the copies it keeps and the set they belong to (the same in
    /// every copy; see `super::replica`). Absent: one copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaConfig>,
}

/// What every copy of a replicated volume records of the set it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaConfig {
    /// How many copies the volume keeps (on as many disks).
    pub copies: u32,
    /// The set's id, random at creation: a volume of the same name on another disk that
    /// is not a copy of this one is never taken for one.
    pub set: String,
}

/// Encryption at rest of a volume (see [`super::crypt`]): chunk data, file names, symlink
/// targets, xattr names and values sealed with a per-volume data key, itself sealed by a
/// master key the user holds (a key file; in Kubernetes a Secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Encryption {
    #[default]
    #[serde(rename = "none")]
    None,
    /// AES-256-GCM (RustCrypto's `aes-gcm`).
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
}

impl Encryption {
    pub const ALL: [Encryption; 2] = [Encryption::None, Encryption::Aes256Gcm];

    pub fn is_none(&self) -> bool {
        *self == Encryption::None
    }

    pub fn name(self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Aes256Gcm => "aes-256-gcm",
        }
    }
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Encryption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Encryption::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown encryption {s:?}: use none or aes-256-gcm"))
    }
}

/// Lower-case hex of `b` (how a volume's sealed data key is kept in its JSON config).
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of lower- or upper-case hex `s`; `None` if it is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The context a directory entry's name is sealed in: its directory.
pub fn dirent_name_context(parent: Ino) -> [u8; 9] {
    let mut c = [b'd'; 9];
    c[1..].copy_from_slice(&parent.to_be_bytes());
    c
}

/// The context an xattr's name is sealed in: its inode.
pub fn xattr_name_context(ino: Ino) -> [u8; 9] {
    let mut c = [b'x'; 9];
    c[1..].copy_from_slice(&ino.to_be_bytes());
    c
}

/// Compression of a volume's chunk data on disk. The quota and every usage counter count
/// the bytes before compression (what `du` shows), so a volume always holds its quota
/// whatever the data; what compression saves shows in the stored bytes `inspect` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Chunks stored as they are, in blob files (key-value separation: compaction moves
    /// only keys).
    #[default]
    None,
    /// LZ4: fast, a moderate ratio.
    Lz4,
    /// Zstandard: a better ratio for more CPU.
    Zstd,
}

impl Compression {
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

    pub fn is_none(&self) -> bool {
        *self == Compression::None
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown compression {s:?}: use none, lz4 or zstd"))
    }
}

/// The accounting of volumes created now (see [`VolumeConfig::accounting`]).
pub const ACCOUNTING_VERSION: u32 = 1;

/// Encodes a volume's configuration (JSON).
pub fn encode_config(cfg: &VolumeConfig) -> Result<Vec<u8>, super::Error> {
    serde_json::to_vec(cfg).map_err(|e| super::Error::Corrupt(e.to_string()))
}

/// Decodes the configuration of volume `vol`.
pub fn decode_config(vol: VolumeId, raw: &[u8]) -> Result<VolumeConfig, super::Error> {
    serde_json::from_slice(raw)
        .map_err(|e| super::Error::Corrupt(format!("volume {vol} config: {e}")))
}

// ----- usage counters -----

pub fn usage_key(vol: VolumeId) -> Vec<u8> {
    with_tag(vol, TAG_USAGE, 0)
}

/// Per-volume usage counters. Stored as a merge value: each operation merges its
/// deltas, so concurrent operations never overwrite each other's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: i64,
    pub inodes: i64,
    pub chunks: i64,
}

impl Usage {
    pub fn encode(&self) -> [u8; 24] {
        let mut v = [0u8; 24];
        v[0..8].copy_from_slice(&self.bytes.to_be_bytes());
        v[8..16].copy_from_slice(&self.inodes.to_be_bytes());
        v[16..24].copy_from_slice(&self.chunks.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Usage, RecordError> {
        if b.len() != 24 {
            return Err(RecordError {
                what: "usage",
                len: b.len(),
            });
        }
        let mut r = Reader { b, pos: 0 };
        Ok(Usage {
            bytes: r.u64() as i64,
            inodes: r.u64() as i64,
            chunks: r.u64() as i64,
        })
    }

    pub fn add(&mut self, o: &Usage) {
        self.bytes = self.bytes.wrapping_add(o.bytes);
        self.inodes = self.inodes.wrapping_add(o.inodes);
        self.chunks = self.chunks.wrapping_add(o.chunks);
    }

    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }
}

/// RocksDB associative merge for [`Usage`]: sums the operands. A malformed operand is
/// kept out of the sum (it can only come from corruption, which `fsck` reports).
pub fn merge_usage(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut total = existing
        .and_then(|b| Usage::decode(b).ok())
        .unwrap_or_default();
    for op in operands {
        if let Ok(u) = Usage::decode(op) {
            total.add(&u);
        }
    }
    Some(total.encode().to_vec())
}

// ----- counters: inode numbers, mount generations -----

/// The volume's inode-number counter: one past the highest number ever given out (written
/// in the batch of every create), so the number of a deleted inode, which a kernel that
/// outlived its server may still cache, is never given to another one.
pub fn next_ino_key(vol: VolumeId) -> Vec<u8> {
    with_tag(vol, TAG_NEXT_INO, 0)
}

/// The volume's mount generation: one more at each fresh mount (a new FUSE connection,
/// whose request numbers start again), so records of one connection's requests never
/// answer another's (see `crate::fs::replay`).
pub fn mount_gen_key(vol: VolumeId) -> Vec<u8> {
    with_tag(vol, TAG_MOUNT_GEN, 0)
}

/// A replicated volume's write generation: every commit writes one more into all its
/// copies in the same batch, so the copy with the highest is the newest (see
/// `super::replica`).
pub fn write_gen_key(vol: VolumeId) -> Vec<u8> {
    with_tag(vol, TAG_WRITE_GEN, 0)
}

/// A replicated volume's history: the epochs its copy went through, each with the write
/// generation it began at (see `super::replica`).
pub fn history_key(vol: VolumeId) -> Vec<u8> {
    with_tag(vol, TAG_HISTORY, 0)
}

/// A history as 16 bytes per epoch: epoch, first generation (u64 BE each).
pub fn encode_history(h: &[(u64, u64)]) -> Vec<u8> {
    h.iter()
        .flat_map(|(e, g)| e.to_be_bytes().into_iter().chain(g.to_be_bytes()))
        .collect()
}

pub fn decode_history(b: &[u8]) -> Result<Vec<(u64, u64)>, RecordError> {
    if !b.len().is_multiple_of(16) {
        return Err(RecordError {
            what: "replica history",
            len: b.len(),
        });
    }
    Ok(b.chunks_exact(16)
        .map(|c| {
            let (e, g) = c.split_at(8);
            let n = |x: &[u8]| u64::from_be_bytes(<[u8; 8]>::try_from(x).unwrap_or_default());
            (n(e), n(g))
        })
        .collect())
}

/// A counter stored as one u64 BE (the next inode number, the mount generation, the
/// write generation).
pub fn encode_counter(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn decode_counter(what: &'static str, b: &[u8]) -> Result<u64, RecordError> {
    <[u8; 8]>::try_from(b)
        .map(u64::from_be_bytes)
        .map_err(|_| RecordError { what, len: b.len() })
}

// ----- ring of recent answers (replay) -----

/// Slot `slot` of the volume's ring of recent answers (see `crate::fs::replay`).
pub fn replay_key(vol: VolumeId, slot: u16) -> Vec<u8> {
    let mut k = with_tag(vol, TAG_REPLAY, 2);
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

pub fn parse_replay_key(vol: VolumeId, key: &[u8]) -> Result<u16, KeyError> {
    if key.len() != 7 || key[..5] != tag_prefix(vol, TAG_REPLAY)[..] {
        return err("replay", key);
    }
    Ok(u16::from_be_bytes([key[5], key[6]]))
}

/// What a request that is not idempotent answered, kept in a slot of the volume's ring
/// so that the request, sent again after a server restart, is answered without running
/// twice (see `crate::fs::replay`): `[version 1][generation u64][unique u64][op u8]
/// [fingerprint u64][ino u64]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayRecord {
    /// The mount generation of the connection the request came on.
    pub generation: u64,
    /// The request's unique id (bit 63, the kernel's "resent" mark, clear).
    pub unique: u64,
    /// Which operation it was.
    pub op: u8,
    /// A hash of the operation's arguments.
    pub fingerprint: u64,
    /// The inode an operation that makes an entry answered with (0: none).
    pub ino: Ino,
}

const REPLAY_VERSION: u8 = 1;
const REPLAY_LEN: usize = 34;

impl ReplayRecord {
    pub fn encode(&self) -> [u8; REPLAY_LEN] {
        let mut v = [0u8; REPLAY_LEN];
        v[0] = REPLAY_VERSION;
        v[1..9].copy_from_slice(&self.generation.to_be_bytes());
        v[9..17].copy_from_slice(&self.unique.to_be_bytes());
        v[17] = self.op;
        v[18..26].copy_from_slice(&self.fingerprint.to_be_bytes());
        v[26..34].copy_from_slice(&self.ino.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<ReplayRecord, RecordError> {
        if b.len() != REPLAY_LEN || b[0] != REPLAY_VERSION {
            return Err(RecordError {
                what: "replay",
                len: b.len(),
            });
        }
        let mut r = Reader { b, pos: 1 };
        let generation = r.u64();
        let unique = r.u64();
        r.pos += 1;
        Ok(ReplayRecord {
            generation,
            unique,
            op: b[17],
            fingerprint: r.u64(),
            ino: r.u64(),
        })
    }
}

// ----- inodes -----

pub fn inode_key(vol: VolumeId, ino: Ino) -> Vec<u8> {
    let mut k = with_tag(vol, TAG_INODE, 8);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn parse_inode_key(vol: VolumeId, key: &[u8]) -> Result<Ino, KeyError> {
    if key.len() != 13 || key[..5] != tag_prefix(vol, TAG_INODE)[..] {
        return err("inode", key);
    }
    Ok(be_u64(&key[5..13]))
}

/// The kind of an inode, as stored (one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDev => 6,
            Kind::BlockDev => 7,
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// A timestamp as seconds and nanoseconds since the epoch (may be negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from_system(SystemTime::now())
    }

    /// The time `t` as seconds and nanoseconds since 1970 (nanoseconds always count
    /// forward, also before 1970). Saturates at the ends of the `i64` range: no time a
    /// caller can pass (`utimensat` takes any `tv_sec`) panics.
    pub fn from_system(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let Some(secs) = 0i64.checked_sub_unsigned(d.as_secs()) else {
                    return Timestamp::MIN;
                };
                match d.subsec_nanos() {
                    0 => Timestamp { secs, nanos: 0 },
                    n => match secs.checked_sub(1) {
                        Some(secs) => Timestamp {
                            secs,
                            nanos: 1_000_000_000 - n,
                        },
                        None => Timestamp::MIN,
                    },
                }
            }
        }
    }

    /// The earliest time a timestamp holds.
    pub const MIN: Timestamp = Timestamp {
        secs: i64::MIN,
        nanos: 0,
    };

    /// The time as a `SystemTime` (which holds every `i64` second on Linux); saturates
    /// rather than panicking on a corrupt record.
    pub fn to_system(self) -> SystemTime {
        let base = if self.secs >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_secs(self.secs.unsigned_abs()))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_secs(self.secs.unsigned_abs()))
        };
        let nanos = Duration::from_nanos(u64::from(self.nanos.min(999_999_999)));
        base.and_then(|t| t.checked_add(nanos))
            .or(base)
            .unwrap_or(UNIX_EPOCH)
    }
}

/// One inode's attributes. For symlinks `target` holds the link target; for directories
/// `parent` is the containing directory and `next_cookie` the next readdir cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeRecord {
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub rdev: u32,
    pub flags: u32,
    /// Bytes of file data stored in chunks (what the quota counts).
    pub stored_bytes: u64,
    /// Number of stored chunks.
    pub chunk_count: u64,
    /// Directories: next readdir cookie to hand out.
    pub next_cookie: u64,
    /// Directories: the parent directory (the root is its own parent).
    pub parent: Ino,
    pub target: Vec<u8>,
}

const INODE_VERSION: u8 = 1;
const INODE_FIXED_LEN: usize = 1 + 1 + 2 + 4 + 4 + 4 + 8 + 4 * 12 + 4 + 4 + 8 + 8 + 8 + 8;

/// First cookie handed out for real entries; 1 and 2 are `.` and `..`.
pub const FIRST_COOKIE: u64 = 3;

impl InodeRecord {
    pub fn new(kind: Kind, perm: u16, uid: u32, gid: u32, now: Timestamp) -> InodeRecord {
        InodeRecord {
            kind,
            perm,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            flags: 0,
            stored_bytes: 0,
            chunk_count: 0,
            next_cookie: FIRST_COOKIE,
            parent: 0,
            target: Vec::new(),
        }
    }

    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | u32::from(self.perm)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(INODE_FIXED_LEN + self.target.len());
        v.push(INODE_VERSION);
        v.push(self.kind.to_byte());
        v.extend_from_slice(&self.perm.to_be_bytes());
        v.extend_from_slice(&self.uid.to_be_bytes());
        v.extend_from_slice(&self.gid.to_be_bytes());
        v.extend_from_slice(&self.nlink.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            v.extend_from_slice(&t.secs.to_be_bytes());
            v.extend_from_slice(&t.nanos.to_be_bytes());
        }
        v.extend_from_slice(&self.rdev.to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.extend_from_slice(&self.stored_bytes.to_be_bytes());
        v.extend_from_slice(&self.chunk_count.to_be_bytes());
        v.extend_from_slice(&self.next_cookie.to_be_bytes());
        v.extend_from_slice(&self.parent.to_be_bytes());
        v.extend_from_slice(&self.target);
        v
    }

    pub fn decode(b: &[u8]) -> Result<InodeRecord, RecordError> {
        let bad = RecordError {
            what: "inode",
            len: b.len(),
        };
        if b.len() < INODE_FIXED_LEN || b[0] != INODE_VERSION {
            return Err(bad);
        }
        let mut r = Reader { b, pos: 2 };
        let kind = Kind::from_byte(b[1]).ok_or(bad)?;
        let perm = r.u16();
        let uid = r.u32();
        let gid = r.u32();
        let nlink = r.u32();
        let size = r.u64();
        let mut ts = [Timestamp::default(); 4];
        for t in ts.iter_mut() {
            *t = Timestamp {
                secs: r.u64() as i64,
                nanos: r.u32(),
            };
        }
        Ok(InodeRecord {
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            atime: ts[0],
            mtime: ts[1],
            ctime: ts[2],
            crtime: ts[3],
            rdev: r.u32(),
            flags: r.u32(),
            stored_bytes: r.u64(),
            chunk_count: r.u64(),
            next_cookie: r.u64(),
            parent: r.u64(),
            target: b[INODE_FIXED_LEN..].to_vec(),
        })
    }
}

// ----- directory entries: by name and by readdir cookie -----

/// Prefix of the directory entries (by name) of `parent`.
pub fn dirent_prefix(vol: VolumeId, parent: Ino) -> Vec<u8> {
    let mut k = with_tag(vol, TAG_DIRENT, 8);
    k.extend_from_slice(&parent.to_be_bytes());
    k
}

pub fn dirent_key(vol: VolumeId, parent: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = dirent_prefix(vol, parent);
    k.extend_from_slice(name);
    k
}

/// Parses a by-name directory entry key into (parent, name).
pub fn parse_dirent_key(vol: VolumeId, key: &[u8]) -> Result<(Ino, Vec<u8>), KeyError> {
    if key.len() < 14 || key[..5] != tag_prefix(vol, TAG_DIRENT)[..] {
        return err("dirent", key);
    }
    Ok((be_u64(&key[5..13]), key[13..].to_vec()))
}

/// Value of a by-name directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirentValue {
    pub ino: Ino,
    pub kind: Kind,
    pub cookie: u64,
}

impl DirentValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17);
        v.extend_from_slice(&self.ino.to_be_bytes());
        v.push(self.kind.to_byte());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<DirentValue, RecordError> {
        let bad = RecordError {
            what: "dirent",
            len: b.len(),
        };
        if b.len() != 17 {
            return Err(bad);
        }
        let mut r = Reader { b, pos: 0 };
        let ino = r.u64();
        let kind = Kind::from_byte(b[8]).ok_or(bad)?;
        r.pos = 9;
        Ok(DirentValue {
            ino,
            kind,
            cookie: r.u64(),
        })
    }
}

pub fn cookie_prefix(vol: VolumeId, parent: Ino) -> Vec<u8> {
    let mut k = with_tag(vol, TAG_DIRENT_COOKIE, 16);
    k.extend_from_slice(&parent.to_be_bytes());
    k
}

pub fn cookie_key(vol: VolumeId, parent: Ino, cookie: u64) -> Vec<u8> {
    let mut k = cookie_prefix(vol, parent);
    k.extend_from_slice(&cookie.to_be_bytes());
    k
}

/// Parses a by-cookie directory entry key into (parent, cookie).
pub fn parse_cookie_key(vol: VolumeId, key: &[u8]) -> Result<(Ino, u64), KeyError> {
    if key.len() != 21 || key[..5] != tag_prefix(vol, TAG_DIRENT_COOKIE)[..] {
        return err("dirent cookie", key);
    }
    Ok((be_u64(&key[5..13]), be_u64(&key[13..21])))
}

/// Value of a by-cookie directory entry: the inode, its kind and the entry's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieValue {
    pub ino: Ino,
    pub kind: Kind,
    pub name: Vec<u8>,
}

impl CookieValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + self.name.len());
        v.extend_from_slice(&self.ino.to_be_bytes());
        v.push(self.kind.to_byte());
        v.extend_from_slice(&self.name);
        v
    }

    pub fn decode(b: &[u8]) -> Result<CookieValue, RecordError> {
        let bad = RecordError {
            what: "dirent cookie",
            len: b.len(),
        };
        if b.len() < 10 {
            return Err(bad);
        }
        let mut r = Reader { b, pos: 0 };
        let ino = r.u64();
        let kind = Kind::from_byte(b[8]).ok_or(bad)?;
        Ok(CookieValue {
            ino,
            kind,
            name: b[9..].to_vec(),
        })
    }
}

// ----- chunk lengths -----

/// Prefix of the chunk-length index of one inode.
pub fn chunk_len_prefix(vol: VolumeId, ino: Ino) -> Vec<u8> {
    let mut k = with_tag(vol, TAG_CHUNK_LEN, 16);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn chunk_len_key(vol: VolumeId, ino: Ino, chunk: u64) -> Vec<u8> {
    let mut k = chunk_len_prefix(vol, ino);
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

pub fn parse_chunk_len_key(vol: VolumeId, key: &[u8]) -> Result<(Ino, u64), KeyError> {
    if key.len() != 21 || key[..5] != tag_prefix(vol, TAG_CHUNK_LEN)[..] {
        return err("chunk length", key);
    }
    Ok((be_u64(&key[5..13]), be_u64(&key[13..21])))
}

/// The value of a chunk-length key: the chunk's stored length (u32 BE; at most a chunk).
pub fn encode_chunk_len(len: u64) -> [u8; 4] {
    (len as u32).to_be_bytes()
}

/// Decodes a chunk-length value (u32 big-endian).
pub fn decode_chunk_len(v: &[u8]) -> Result<u64, super::Error> {
    match <[u8; 4]>::try_from(v) {
        Ok(b) => Ok(u64::from(u32::from_be_bytes(b))),
        Err(_) => Err(super::Error::Corrupt(format!(
            "chunk length of {} bytes",
            v.len()
        ))),
    }
}

// ----- orphans (unlinked while open): the value is empty -----

pub fn orphan_key(vol: VolumeId, ino: Ino) -> Vec<u8> {
    let mut k = with_tag(vol, TAG_ORPHAN, 8);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn parse_orphan_key(vol: VolumeId, key: &[u8]) -> Result<Ino, KeyError> {
    if key.len() != 13 || key[..5] != tag_prefix(vol, TAG_ORPHAN)[..] {
        return err("orphan", key);
    }
    Ok(be_u64(&key[5..13]))
}

// ----- extended attributes: the value is stored as is -----

pub fn xattr_prefix(vol: VolumeId, ino: Ino) -> Vec<u8> {
    let mut k = with_tag(vol, TAG_XATTR, 8);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn xattr_key(vol: VolumeId, ino: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = xattr_prefix(vol, ino);
    k.extend_from_slice(name);
    k
}

pub fn parse_xattr_key(vol: VolumeId, key: &[u8]) -> Result<(Ino, Vec<u8>), KeyError> {
    if key.len() < 14 || key[..5] != tag_prefix(vol, TAG_XATTR)[..] {
        return err("xattr", key);
    }
    Ok((be_u64(&key[5..13]), key[13..].to_vec()))
}

// ----- chunks (column family "chunks"): bytes, and patches merged over them -----

/// Prefix of all chunks of one inode (chunks column family).
pub fn chunk_prefix(vol: VolumeId, ino: Ino) -> Vec<u8> {
    let mut k = Vec::with_capacity(20);
    k.extend_from_slice(&vol.to_be_bytes());
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn chunk_key(vol: VolumeId, ino: Ino, chunk: u64) -> Vec<u8> {
    let mut k = chunk_prefix(vol, ino);
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

/// Parses a chunk key into (volume, inode, chunk index).
pub fn parse_chunk_key(key: &[u8]) -> Result<(VolumeId, Ino, u64), KeyError> {
    if key.len() != 20 {
        return err("chunk", key);
    }
    Ok((
        be_u32(&key[0..4]),
        be_u64(&key[4..12]),
        be_u64(&key[12..20]),
    ))
}

/// Tag byte of a chunk patch operand.
const PATCH_TAG: u8 = 1;
/// Largest chunk a patch may grow (the largest chunk size a store can have).
pub const MAX_CHUNK_BYTES: usize = 16 << 20;

/// A partial overwrite of a chunk, stored as a RocksDB merge operand so a small write
/// into a large chunk costs its own bytes, not a read and rewrite of the whole chunk:
/// `[tag 1][offset u32][bytes]`. Applied by [`merge_chunk`] when the chunk is read or
/// compacted: the chunk grows with zeros to `offset`, then `bytes` replace its content.
pub fn encode_chunk_patch(offset: u32, bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + bytes.len());
    v.push(PATCH_TAG);
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(bytes);
    v
}

/// Splits a chunk patch operand into offset and bytes.
pub fn decode_chunk_patch(v: &[u8]) -> Result<(usize, &[u8]), RecordError> {
    let err = RecordError {
        what: "chunk patch",
        len: v.len(),
    };
    match v {
        [PATCH_TAG, a, b, c, d, rest @ ..] => {
            let off = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
            if off + rest.len() > MAX_CHUNK_BYTES {
                return Err(err);
            }
            Ok((off, rest))
        }
        _ => Err(err),
    }
}

/// Merge operator of the chunk column family: applies patches in order to the chunk's
/// bytes (none: an empty chunk). A malformed operand fails the merge, which RocksDB
/// reports as corruption to the reader instead of returning wrong bytes.
pub fn merge_chunk(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut chunk = existing.map(<[u8]>::to_vec).unwrap_or_default();
    for op in operands {
        let (off, bytes) = decode_chunk_patch(op).ok()?;
        let end = off + bytes.len();
        if chunk.len() < end {
            chunk.resize(end, 0);
        }
        chunk[off..end].copy_from_slice(bytes);
    }
    Some(chunk)
}

/// Partial merge of chunk patches: declined, so RocksDB keeps the operands and applies
/// them to the base value in [`merge_chunk`] (patches with gaps cannot be combined
/// without the base).
pub fn merge_chunk_partial(
    _key: &[u8],
    _existing: Option<&[u8]>,
    _operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ----- keys -----

    proptest! {
        #[test]
        fn inode_key_round_trips_and_orders(vol in 1u32.., a in any::<u64>(), b in any::<u64>()) {
            let (ka, kb) = (inode_key(vol, a), inode_key(vol, b));
            prop_assert_eq!(parse_inode_key(vol, &ka), Ok(a));
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
            prop_assert!(ka >= volume_start(vol) && ka < volume_end(vol));
        }

        #[test]
        fn chunk_key_round_trips_and_orders(vol in any::<u32>(), ino in any::<u64>(), a in any::<u64>(), b in any::<u64>()) {
            let (ka, kb) = (chunk_key(vol, ino, a), chunk_key(vol, ino, b));
            prop_assert_eq!(parse_chunk_key(&ka), Ok((vol, ino, a)));
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
            prop_assert!(ka.starts_with(&chunk_prefix(vol, ino)));
        }

        #[test]
        fn chunk_len_and_cookie_keys_round_trip_and_order(vol in 1u32.., ino in any::<u64>(), a in any::<u64>(), b in any::<u64>()) {
            let (ka, kb) = (chunk_len_key(vol, ino, a), chunk_len_key(vol, ino, b));
            prop_assert_eq!(parse_chunk_len_key(vol, &ka), Ok((ino, a)));
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
            let (ca, cb) = (cookie_key(vol, ino, a), cookie_key(vol, ino, b));
            prop_assert_eq!(parse_cookie_key(vol, &ca), Ok((ino, a)));
            prop_assert_eq!(a.cmp(&b), ca.cmp(&cb));
        }

        #[test]
        fn dirent_and_xattr_keys_round_trip(vol in 1u32.., parent in any::<u64>(), name in proptest::collection::vec(1u8.., 1..255)) {
            let k = dirent_key(vol, parent, &name);
            prop_assert_eq!(parse_dirent_key(vol, &k), Ok((parent, name.clone())));
            prop_assert!(k.starts_with(&dirent_prefix(vol, parent)));
            let x = xattr_key(vol, parent, &name);
            prop_assert_eq!(parse_xattr_key(vol, &x), Ok((parent, name)));
        }

        #[test]
        fn different_parents_never_share_a_dirent_prefix(vol in 1u32.., p in any::<u64>(), q in any::<u64>(), name in proptest::collection::vec(any::<u8>(), 1..64)) {
            prop_assume!(p != q);
            prop_assert!(!dirent_key(vol, p, &name).starts_with(&dirent_prefix(vol, q)));
        }

        #[test]
        fn every_volume_key_sorts_inside_its_volume_range(vol in 1u32..u32::MAX, ino in any::<u64>(), name in proptest::collection::vec(any::<u8>(), 1..32)) {
            let (lo, hi) = (volume_start(vol), volume_end(vol));
            for k in [config_key(vol), usage_key(vol), next_ino_key(vol), mount_gen_key(vol),
                      replay_key(vol, ino as u16), inode_key(vol, ino), dirent_key(vol, ino, &name),
                      cookie_key(vol, ino, 7), chunk_len_key(vol, ino, 3), orphan_key(vol, ino),
                      xattr_key(vol, ino, &name), chunk_key(vol, ino, 9)] {
                prop_assert!(k >= lo && k < hi, "{:?} outside volume {}", k, vol);
            }
        }

        #[test]
        fn replay_key_round_trips_and_orders(vol in 1u32.., a in any::<u16>(), b in any::<u16>()) {
            let (ka, kb) = (replay_key(vol, a), replay_key(vol, b));
            prop_assert_eq!(parse_replay_key(vol, &ka), Ok(a));
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
            prop_assert!(ka.starts_with(&tag_prefix(vol, TAG_REPLAY)));
        }

        #[test]
        fn volume_name_key_round_trips(name in "[a-z0-9-]{1,63}") {
            prop_assert_eq!(parse_volume_name_key(&volume_name_key(&name)), Ok(name));
        }
    }

    #[test]
    fn parsers_reject_wrong_length_and_prefix() {
        assert!(parse_inode_key(1, &inode_key(2, 5)).is_err());
        assert!(parse_inode_key(1, &inode_key(1, 5)[..12]).is_err());
        assert!(parse_chunk_key(&[0; 19]).is_err());
        assert!(parse_cookie_key(1, &dirent_key(1, 1, b"abcdefgh")).is_err());
        assert!(parse_dirent_key(1, &dirent_prefix(1, 1)).is_err());
        assert!(parse_orphan_key(1, &inode_key(1, 1)).is_err());
        assert!(parse_replay_key(1, &replay_key(2, 1)).is_err());
        assert!(parse_replay_key(1, &mount_gen_key(1)).is_err());
        assert!(parse_volume_name_key(&config_key(0)).is_err());
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(&[1, 2, 0xff]), vec![1, 3]);
        assert_eq!(prefix_end(&[0xff, 0xff]), vec![0xff, 0xff, 0xff]);
        assert_eq!(volume_end(u32::MAX), vec![0xff; 5]);
    }

    // ----- values -----

    #[test]
    fn timestamps_at_the_ends_of_the_range_convert_without_panicking() {
        for secs in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX] {
            for nanos in [0, 1, 999_999_999] {
                let t = Timestamp { secs, nanos };
                let back = Timestamp::from_system(t.to_system());
                if secs == i64::MIN || (secs == i64::MAX && nanos > 0) {
                    continue; // saturated: representable only approximately
                }
                assert_eq!(back, t);
            }
        }
        let min = UNIX_EPOCH - Duration::from_secs(1 << 63);
        assert_eq!(Timestamp::from_system(min), Timestamp::MIN);
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(
            Timestamp::from_system(t),
            Timestamp {
                secs: -2,
                nanos: 500_000_000
            }
        );
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::File),
            Just(Kind::Dir),
            Just(Kind::Symlink),
            Just(Kind::Fifo),
            Just(Kind::Socket),
            Just(Kind::CharDev),
            Just(Kind::BlockDev)
        ]
    }

    #[test]
    fn chunk_patches_round_trip_and_malformed_ones_are_refused() {
        let p = encode_chunk_patch(65_000, b"abc");
        assert_eq!(decode_chunk_patch(&p), Ok((65_000, &b"abc"[..])));
        assert!(decode_chunk_patch(&p[..4]).is_err(), "too short");
        let mut wrong_tag = p.clone();
        wrong_tag[0] = 9;
        assert!(decode_chunk_patch(&wrong_tag).is_err());
        let past_any_chunk = encode_chunk_patch(MAX_CHUNK_BYTES as u32, b"x");
        assert!(decode_chunk_patch(&past_any_chunk).is_err());
    }

    proptest! {
        #[test]
        fn inode_record_round_trips(kind in kind(), perm in 0u16..0o7777, uid in any::<u32>(), size in any::<u64>(),
                                    secs in any::<i64>(), nanos in 0u32..1_000_000_000, target in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut r = InodeRecord::new(kind, perm, uid, uid ^ 5, Timestamp { secs, nanos });
            r.size = size;
            r.stored_bytes = size / 3;
            r.target = target;
            prop_assert_eq!(InodeRecord::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn truncated_inode_record_is_an_error(cut in 0usize..INODE_FIXED_LEN) {
            let r = InodeRecord::new(Kind::File, 0o644, 0, 0, Timestamp::now());
            prop_assert!(InodeRecord::decode(&r.encode()[..cut]).is_err());
        }

        #[test]
        fn dirent_values_round_trip(ino in any::<u64>(), kind in kind(), cookie in any::<u64>(), name in proptest::collection::vec(any::<u8>(), 1..255)) {
            let d = DirentValue { ino, kind, cookie };
            prop_assert_eq!(DirentValue::decode(&d.encode()), Ok(d));
            let c = CookieValue { ino, kind, name };
            prop_assert_eq!(CookieValue::decode(&c.encode()), Ok(c));
        }

        #[test]
        fn replay_records_round_trip(generation in any::<u64>(), unique in any::<u64>(), op in any::<u8>(), fingerprint in any::<u64>(), ino in any::<u64>()) {
            let r = ReplayRecord { generation, unique, op, fingerprint, ino };
            prop_assert_eq!(ReplayRecord::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn a_truncated_or_unknown_replay_record_is_an_error(cut in 0usize..34, version in 2u8..) {
            let mut v = ReplayRecord { generation: 1, unique: 2, op: 3, fingerprint: 4, ino: 5 }.encode();
            prop_assert!(ReplayRecord::decode(&v[..cut]).is_err());
            v[0] = version;
            prop_assert!(ReplayRecord::decode(&v).is_err());
        }

        #[test]
        fn timestamps_round_trip_through_system_time(secs in -4_000_000_000i64..4_000_000_000, nanos in 0u32..1_000_000_000) {
            let t = Timestamp { secs, nanos };
            prop_assert_eq!(Timestamp::from_system(t.to_system()), t);
        }
    }

    #[test]
    fn counters_round_trip_and_a_wrong_length_is_an_error() {
        assert_eq!(
            decode_counter("c", &encode_counter(u64::MAX - 3)),
            Ok(u64::MAX - 3)
        );
        assert!(decode_counter("c", &[0; 7]).is_err());
        assert!(decode_counter("c", &[0; 9]).is_err());
    }

    #[test]
    fn usage_decode_rejects_bad_length() {
        assert!(Usage::decode(&[0; 23]).is_err());
        let u = Usage {
            bytes: -5,
            inodes: 3,
            chunks: 9,
        };
        assert_eq!(Usage::decode(&u.encode()), Ok(u));
    }

    proptest! {
        #[test]
        fn volume_ids_round_trip(id in any::<u32>()) {
            prop_assert_eq!(decode_volume_id(&encode_volume_id(id)), Some(id));
        }

        #[test]
        fn chunk_lengths_round_trip(len in 0u64..=u64::from(u32::MAX)) {
            prop_assert_eq!(decode_chunk_len(&encode_chunk_len(len)).ok(), Some(len));
        }

        #[test]
        fn usage_round_trips(bytes in any::<i64>(), inodes in any::<i64>(), chunks in any::<i64>()) {
            let u = Usage { bytes, inodes, chunks };
            prop_assert_eq!(Usage::decode(&u.encode()), Ok(u));
        }

        #[test]
        fn configs_round_trip(vol in 1u32.., quota in proptest::option::of(any::<u64>()), limit in proptest::option::of(any::<u64>()),
                              created in any::<i64>(), owner in proptest::option::of("[a-z0-9-]{1,36}"), accounting in 0u32..3,
                              compression in proptest::sample::select(Compression::ALL.to_vec()),
                              encryption in proptest::sample::select(Encryption::ALL.to_vec()),
                              sealed_key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80))) {
            let sealed_key = sealed_key.map(|k| to_hex(&k));
            let cfg = VolumeConfig { name: "v".into(), quota_bytes: quota, inode_limit: limit, created, owner, accounting, compression, encryption, sealed_key, replicas: None };
            prop_assert_eq!(decode_config(vol, &encode_config(&cfg).unwrap()).ok(), Some(cfg));
        }

        #[test]
        fn chunk_patches_round_trip(offset in 0u32..(1 << 20), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let p = encode_chunk_patch(offset, &bytes);
            prop_assert_eq!(decode_chunk_patch(&p), Ok((offset as usize, &bytes[..])));
        }
    }

    #[test]
    fn configs_without_compression_read_as_none_and_none_is_not_written() {
        let old =
            br#"{"name":"v","quota_bytes":null,"inode_limit":null,"created":1,"accounting":1}"#;
        let cfg = decode_config(1, old).unwrap();
        assert_eq!(cfg.compression, Compression::None);
        let text = String::from_utf8(encode_config(&cfg).unwrap()).unwrap();
        assert!(!text.contains("compression"), "{text}");
        let lz4 = VolumeConfig {
            compression: Compression::Lz4,
            ..cfg
        };
        let text = String::from_utf8(encode_config(&lz4).unwrap()).unwrap();
        assert!(text.contains(r#""compression":"lz4""#), "{text}");
    }

    #[test]
    fn a_history_round_trips_and_a_torn_one_is_an_error() {
        let h = vec![(1, 1), (u64::MAX, 77), (0x0102_0304_0506_0708, 1 << 40)];
        assert_eq!(decode_history(&encode_history(&h)).unwrap(), h);
        assert_eq!(decode_history(&[]).unwrap(), vec![]);
        assert!(decode_history(&encode_history(&h)[..20]).is_err());
    }

    #[test]
    fn hex_round_trips_and_rejects_what_is_not_hex() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&b)), Some(b));
        assert_eq!(from_hex("0aFF"), Some(vec![10, 255]));
        for bad in ["0", "zz", "0g", "é0"] {
            assert_eq!(from_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn encryption_names_parse_print_and_are_not_written_when_none() {
        for e in Encryption::ALL {
            assert_eq!(e.to_string().parse::<Encryption>(), Ok(e));
        }
        assert!("aes"
            .parse::<Encryption>()
            .unwrap_err()
            .contains("aes-256-gcm"));
        let old = br#"{"name":"v","quota_bytes":null,"inode_limit":null,"created":1}"#;
        let cfg = decode_config(1, old).unwrap();
        assert_eq!(
            (cfg.encryption, cfg.sealed_key.as_deref()),
            (Encryption::None, None)
        );
        let text = String::from_utf8(encode_config(&cfg).unwrap()).unwrap();
        assert!(
            !text.contains("encryption") && !text.contains("sealed"),
            "{text}"
        );
        let enc = VolumeConfig {
            encryption: Encryption::Aes256Gcm,
            sealed_key: Some("00ff".into()),
            ..cfg
        };
        let text = String::from_utf8(encode_config(&enc).unwrap()).unwrap();
        assert!(
            text.contains(r#""encryption":"aes-256-gcm","sealed_key":"00ff""#),
            "{text}"
        );
    }

    #[test]
    fn compression_names_parse_and_print() {
        for c in Compression::ALL {
            assert_eq!(c.to_string().parse::<Compression>(), Ok(c));
        }
        assert_eq!(
            "gzip".parse::<Compression>(),
            Err("unknown compression \"gzip\": use none, lz4 or zstd".to_string())
        );
    }

    #[test]
    fn malformed_small_values_are_errors() {
        assert_eq!(decode_volume_id(&[0; 3]), None);
        assert_eq!(decode_volume_id(&[0; 5]), None);
        assert!(decode_chunk_len(&[0; 3]).is_err());
        assert!(decode_chunk_len(&[0; 8]).is_err());
        assert!(decode_config(1, b"{").is_err());
    }

    #[test]
    fn kinds_round_trip_through_their_byte_and_their_mode() {
        for k in [
            Kind::File,
            Kind::Dir,
            Kind::Symlink,
            Kind::Fifo,
            Kind::Socket,
            Kind::CharDev,
            Kind::BlockDev,
        ] {
            assert_eq!(Kind::from_byte(k.to_byte()), Some(k));
            assert_eq!(Kind::from_mode(k.mode_bits() | 0o644), Some(k));
        }
        assert_eq!(Kind::from_byte(0), None);
        assert_eq!(Kind::from_byte(8), None);
    }
}
