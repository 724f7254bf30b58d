//! The whole RocksDB key layout of a fusevol store, in one place.
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
//!   <vol u32> 'R' <slot u16>                   -> ReplayRecord                answers of recent requests
//!   <vol u32> 'I' <ino u64>                    -> InodeRecord                  attributes
//!   <vol u32> 'D' <parent u64> <name bytes>    -> DirentByName                 lookup by name
//!   <vol u32> 'd' <parent u64> <cookie u64>    -> DirentByCookie               readdir order
//!   <vol u32> 'L' <ino u64> <chunk u64>        -> stored length of the chunk (u32 BE)
//!   <vol u32> 'O' <ino u64>                    -> (empty)                      unlinked while open
//!   <vol u32> 'X' <ino u64> <name bytes>       -> xattr value
//!
//! column family "chunks" (large values; BlobDB)
//!   <vol u32> <ino u64> <chunk u64>            -> chunk bytes (at most chunk_size; a short
//!                                                 value reads as zeros up to chunk_size)
//! ```
//!
//! Volume id 0 is reserved for store-wide keys, so every key of volume `v` lies in
//! `[v, v+1)` in both column families: deleting, exporting or copying a volume to another
//! disk (a later tier/replica feature) is one contiguous range per column family.
//!
//! Adding a key kind: pick an unused tag byte, add an encoder and a checked parser here,
//! and make `fsck` (which walks every tag) aware of it.

use std::fmt;

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

pub fn config_key(vol: VolumeId) -> Vec<u8> {
    with_tag(vol, TAG_CONFIG, 0)
}

pub fn usage_key(vol: VolumeId) -> Vec<u8> {
    with_tag(vol, TAG_USAGE, 0)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
}
