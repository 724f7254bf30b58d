//! Value encodings of the store: inode records, directory entries, usage counters, the
//! records of recent answers (replay ring) and the volume configuration. Binary layouts
//! are fixed-width big-endian with a version byte so a later format can be told apart;
//! every decoder checks lengths and returns [`RecordError`] on malformed input instead
//! of panicking.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::key_codec::Ino;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} record ({len} bytes)")]
pub struct RecordError {
    pub what: &'static str,
    pub len: usize,
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

/// A counter stored as one u64 BE (the next inode number, the mount generation).
pub fn encode_counter(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn decode_counter(what: &'static str, b: &[u8]) -> Result<u64, RecordError> {
    <[u8; 8]>::try_from(b)
        .map(u64::from_be_bytes)
        .map_err(|_| RecordError { what, len: b.len() })
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
}

/// The accounting of volumes created now (see [`VolumeConfig::accounting`]).
pub const ACCOUNTING_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
}
