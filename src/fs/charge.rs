//! What each stored thing costs a volume: the byte charges behind its usage.
//!
//! A volume's usage (`Usage.bytes`: what the quota admits, what `df` shows as used) is
//! every byte a user can make the store hold for it, not only file data. Each kind of
//! key is charged by a fixed rule, so an operation knows its cost before it writes
//! (quota admission reserves it, the batch merges it into the usage key), and `fsck`
//! recomputes the same total from what is stored:
//!
//! ```text
//! usage.bytes = Σ chunk lengths                        file data (what st_blocks shows)
//!             + CHUNK_CHARGE               per chunk   its chunk-length key, key of the chunk
//!             + inode_charge(ino, record)  per inode   the record (symlink target included),
//!                                                      the orphan marker; the root is free
//!             + dirent_charge(name.len())  per entry   both entry keys; a hard link is an entry
//!             + xattr_charge(name.len(), value.len())  per extended attribute
//! ```
//!
//! Each charge covers the key and value bytes RocksDB stores for that thing plus its
//! per-key overhead (an 8-byte sequence/type trailer per key; for chunks kept in blob
//! files, the blob reference and the blob record header). Not charged, at most
//! [`VOLUME_OVERHEAD_MAX`] bytes per volume: the root directory's record, the volume's
//! configuration, usage, name, inode-counter and mount-generation keys, and the ring of
//! recent answers that replays resent requests (at most [`REPLAY_RING_MAX`]). Versions superseded by an overwrite and deleted
//! keys stay on disk until RocksDB compacts them; that is the store's space
//! amplification, bounded by its compaction, not by the quota.

use crate::store::codec::Ino;
use crate::store::codec::InodeRecord;
use crate::store::ROOT_INO;

/// Per stored chunk, on top of its data bytes: chunk key (20 B) and chunk-length key and
/// value (21 + 4 B), two key trailers (16 B), and for chunks of 1 KiB or more the blob
/// reference (~12 B) and blob record header with its copy of the key (32 + 20 B): 125 B.
pub const CHUNK_CHARGE: u64 = 128;

/// Per inode, on top of a symlink's target: inode key and fixed record (13 + 112 B), the
/// orphan marker it may get while unlinked but open (13 B), two key trailers (16 B): 154 B.
pub const INODE_CHARGE: u64 = 256;

/// Per directory entry, on top of twice its name (the name is in the by-name key and in
/// the by-cookie value): by-name key and value (13 + 17 B), by-cookie key and value
/// (21 + 9 B), two key trailers (16 B): 76 B.
pub const DIRENT_CHARGE: u64 = 128;

/// Per extended attribute, on top of its name and value: the key (13 B) and its trailer
/// (8 B): 21 B.
pub const XATTR_CHARGE: u64 = 64;

/// The most a volume's ring of recent answers stores (`crate::fs::RING_SLOTS` records of a
/// 7-byte key, a 34-byte value and an 8-byte trailer, rounded up to 64 B each): 8 KiB.
pub const REPLAY_RING_MAX: u64 = crate::fs::RING_SLOTS * 64;

/// What a volume stores that no charge covers: the root directory's record (125 B), the
/// configuration (JSON, ~200 B), usage (29 B), name (≤ 72 B), inode-counter (21 B) and
/// mount-generation (21 B) keys, with trailers, within 1 KiB; and the replay ring
/// ([`REPLAY_RING_MAX`]). A fixed bound: nothing a user does grows it.
pub const VOLUME_OVERHEAD_MAX: u64 = 1024 + REPLAY_RING_MAX;

/// The charge of inode `ino` (not counting its chunks and attributes, which are charged
/// on their own): [`INODE_CHARGE`] plus the symlink target; the root directory is free.
pub fn inode_charge(ino: Ino, r: &InodeRecord) -> u64 {
    if ino == ROOT_INO {
        0
    } else {
        INODE_CHARGE + r.target.len() as u64
    }
}

/// The charge of one directory entry (one name of an inode) with a name of `name_len`.
pub fn dirent_charge(name_len: usize) -> u64 {
    DIRENT_CHARGE + 2 * name_len as u64
}

/// The charge of one extended attribute.
pub fn xattr_charge(name_len: usize, value_len: usize) -> u64 {
    XATTR_CHARGE + name_len as u64 + value_len as u64
}

/// The charge of `count` stored chunks holding `data_bytes` bytes of file data.
pub fn chunks_charge(count: u64, data_bytes: u64) -> u64 {
    data_bytes + count * CHUNK_CHARGE
}
