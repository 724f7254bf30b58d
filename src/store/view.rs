//! Reads of one volume: typed lookups and scans over its keys.
//!
//! Owns: every read of a volume's keys, decoded with [`super::codec`], for the filesystem
//! core (point lookups, readdir, chunk reads from one snapshot) and for `fsck` (a pass
//! over each kind of key). Callers never see a key or a column family. It must not
//! write (writes go through [`super::VolumeTxn`]), except that a replicated volume's read
//! that one copy fails is served from another and repaired there ([`super::replica`]).

use rocksdb::{ReadOptions, Snapshot};

use super::codec::{
    self, decode_chunk_len, CookieValue, DirentValue, Ino, InodeRecord, RecordError, ReplayRecord,
    Usage, VolumeId,
};
use super::crypt::Sealer;
use super::replica::{is_media_error, Cf, Copy, ReplicaSet};
use super::{Compression, Error, Result, Store, ROOT_INO};

/// Reads of one volume (see the module doc). Cheap: a store, a volume id, where the
/// volume's chunks live and how its values are sealed; for a replicated volume, its
/// copies and which one this view reads.
#[derive(Clone, Copy)]
pub struct VolumeView<'a> {
    store: &'a Store,
    vid: VolumeId,
    compression: Compression,
    seal: Sealer<'a>,
    rep: Option<Replicated<'a>>,
}

/// The copies of a replicated volume, and the one a view reads.
#[derive(Clone, Copy)]
struct Replicated<'a> {
    copies: &'a [Copy],
    set: &'a ReplicaSet,
    at: usize,
}

impl<'a> VolumeView<'a> {
    /// Reads of copy `at` of `copies` (which must exist).
    pub(super) fn new(copies: &'a [Copy], set: Option<&'a ReplicaSet>, at: usize) -> Self {
        let c = &copies[at];
        VolumeView {
            store: &c.store,
            vid: c.vol.id,
            compression: c.vol.compression,
            seal: Sealer(c.vol.cipher.as_deref()),
            rep: set.map(|set| Replicated { copies, set, at }),
        }
    }

    /// Reads of volume `vid` of `store` that open nothing sealed (no key) and fail over to
    /// no other copy.
    pub(super) fn plain(store: &'a Store, vid: VolumeId, compression: Compression) -> Self {
        VolumeView {
            store,
            vid,
            compression,
            seal: Sealer(None),
            rep: None,
        }
    }

    /// The value under `key` in `cf`: from this view's copy, or when it cannot read it,
    /// from another copy of a replicated volume.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match (
            self.store.get_raw(cf.of(self.store, self.compression), key),
            self.rep,
        ) {
            (Err(e), Some(r)) => r
                .set
                .failover_get(r.copies, r.at, (cf, self.compression), key, e),
            (result, _) => result,
        }
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(Cf::Meta, key)
    }

    /// Calls `f(key, value)` for keys in `[from, to)` of `cf`, until it returns false. A
    /// replicated volume's scan that one copy fails goes on from the next key in another.
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let Some(r) = self.rep else {
            return self
                .store
                .scan(cf.of(self.store, self.compression), from, to, f);
        };
        let (mut start, mut at, mut last) = (from.to_vec(), r.at, Vec::new());
        for _ in 0..r.copies.len() {
            let store = &r.copies[at].store;
            let (mut seen, mut failed) = (false, None);
            let scanned = store.scan(cf.of(store, self.compression), &start, to, |k, v| {
                match f(k, v) {
                    Ok(go) => {
                        last.clear();
                        last.extend_from_slice(k);
                        seen = true;
                        Ok(go)
                    }
                    Err(e) => {
                        failed = Some(e);
                        Ok(false)
                    }
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
            match scanned {
                Err(e) if is_media_error(&e) => {
                    let Some(next) = (1..r.copies.len())
                        .map(|d| (at + d) % r.copies.len())
                        .find(|i| r.set.healthy(*i))
                    else {
                        return Err(e);
                    };
                    r.set.scan_failover(at, &e);
                    if seen {
                        // The next key after the last one given: that key and a 0 byte.
                        start.clone_from(&last);
                        start.push(0);
                    }
                    at = next;
                }
                result => return result,
            }
        }
        Err(Error::Corrupt(
            "no copy of the volume could read a scan".into(),
        ))
    }

    fn scan_meta(&self, prefix: &[u8], f: impl FnMut(&[u8], &[u8]) -> Result<bool>) -> Result<()> {
        self.scan(Cf::Meta, prefix, &codec::prefix_end(prefix), f)
    }

    /// The volume's id (its keys' prefix).
    pub fn id(&self) -> VolumeId {
        self.vid
    }

    /// Calls `f(key, value)` for every meta key of the volume with tag `tag`, in order,
    /// until it returns false.
    fn scan_tag(&self, tag: u8, f: impl FnMut(&[u8], &[u8]) -> Result<bool>) -> Result<()> {
        self.scan_meta(&codec::tag_prefix(self.vid, tag), f)
    }

    // ----- inodes -----

    /// Inode `ino`'s record, if it exists.
    pub fn inode(&self, ino: Ino) -> Result<Option<InodeRecord>> {
        match self.get_meta(&codec::inode_key(self.vid, ino))? {
            Some(raw) => Ok(Some(open_inode(self.seal, self.vid, ino, &raw)?)),
            None => Ok(None),
        }
    }

    /// The highest inode number in use (the root's if no other).
    pub fn max_ino(&self) -> Result<Ino> {
        let v = self.vid;
        let mut max = ROOT_INO;
        let prefix = codec::tag_prefix(v, codec::TAG_INODE);
        let mut it = self.store.db().raw_iterator_cf(self.store.meta());
        it.seek_for_prev(codec::inode_key(v, u64::MAX));
        if let Some(k) = it.key() {
            if k.starts_with(&prefix) {
                max = max.max(codec::parse_inode_key(v, k)?);
            }
        }
        it.status()?;
        Ok(max)
    }

    /// The volume's inode-number counter: `None` for a volume made before it existed.
    pub fn next_ino(&self) -> Result<Option<Ino>> {
        match self.get_meta(&codec::next_ino_key(self.vid))? {
            None => Ok(None),
            Some(raw) => Ok(Some(codec::decode_counter("next inode number", &raw)?)),
        }
    }

    /// The inodes marked as unlinked while open, in order.
    pub fn orphans(&self) -> Result<Vec<Ino>> {
        let v = self.vid;
        let mut out = Vec::new();
        self.scan_tag(codec::TAG_ORPHAN, |k, _| {
            out.push(codec::parse_orphan_key(v, k)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Pass over every inode record, in inode order (unreadable ones as errors).
    pub fn each_inode(
        &self,
        mut f: impl FnMut(Ino, Result<InodeRecord, RecordError>),
    ) -> Result<()> {
        let (v, seal) = (self.vid, self.seal);
        self.scan_tag(codec::TAG_INODE, |k, val| {
            let ino = codec::parse_inode_key(v, k)?;
            f(ino, open_inode(seal, v, ino, val));
            Ok(true)
        })
    }

    // ----- directory entries -----

    /// Entry `name` of directory `parent`, if any.
    pub fn dirent(&self, parent: Ino, name: &[u8]) -> Result<Option<DirentValue>> {
        let name = self.seal.name(&codec::dirent_name_context(parent), name);
        match self.get_meta(&codec::dirent_key(self.vid, parent, &name))? {
            Some(raw) => Ok(Some(DirentValue::decode(&raw)?)),
            None => Ok(None),
        }
    }

    /// Whether directory `dir` has no entries.
    pub fn dir_is_empty(&self, dir: Ino) -> Result<bool> {
        let mut empty = true;
        self.scan_meta(&codec::dirent_prefix(self.vid, dir), |_, _| {
            empty = false;
            Ok(false)
        })?;
        Ok(empty)
    }

    /// Up to `limit` entries of `dir` from readdir position `from` on, in cookie order:
    /// `(cookie, entry)`.
    pub fn readdir(&self, dir: Ino, from: u64, limit: usize) -> Result<Vec<(u64, CookieValue)>> {
        let (v, seal) = (self.vid, self.seal);
        let ctx = codec::dirent_name_context(dir);
        let start = codec::cookie_key(v, dir, from);
        let end = codec::prefix_end(&codec::cookie_prefix(v, dir));
        let mut out = Vec::new();
        self.scan(Cf::Meta, &start, &end, |k, val| {
            if out.len() >= limit {
                return Ok(false);
            }
            let (_, cookie) = codec::parse_cookie_key(v, k)?;
            let mut entry = CookieValue::decode(val)?;
            entry.name = seal.open_name(&ctx, entry.name)?;
            out.push((cookie, entry));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Pass over every by-name entry of the volume: `f(parent, name, entry)`.
    ///
    /// The name is `Err(stored bytes)` when a sealed name does not open (damaged, or
    /// sealed under another key): the pass goes on, and a repair can remove the entry by
    /// its stored name ([`super::VolumeTxn::remove_dirent_stored_name`]).
    pub fn each_dirent(
        &self,
        mut f: impl FnMut(Ino, std::result::Result<Vec<u8>, Vec<u8>>, Result<DirentValue, RecordError>),
    ) -> Result<()> {
        let (v, seal) = (self.vid, self.seal);
        self.scan_tag(codec::TAG_DIRENT, |k, val| {
            let (parent, stored) = codec::parse_dirent_key(v, k)?;
            let name = seal
                .open_name(&codec::dirent_name_context(parent), stored.clone())
                .map_err(|_| stored);
            f(parent, name, DirentValue::decode(val));
            Ok(true)
        })
    }

    /// Pass over every readdir entry of the volume: `f(parent, cookie, entry)`.
    pub fn each_cookie(
        &self,
        mut f: impl FnMut(Ino, u64, Result<CookieValue, RecordError>),
    ) -> Result<()> {
        let (v, seal) = (self.vid, self.seal);
        self.scan_tag(codec::TAG_DIRENT_COOKIE, |k, val| {
            let (parent, cookie) = codec::parse_cookie_key(v, k)?;
            let entry = CookieValue::decode(val).and_then(|mut e| {
                let ctx = codec::dirent_name_context(parent);
                e.name = seal.open_name(&ctx, e.name).map_err(|_| RecordError {
                    what: "sealed name of a dirent cookie",
                    len: val.len(),
                })?;
                Ok(e)
            });
            f(parent, cookie, entry);
            Ok(true)
        })
    }

    // ----- chunks -----

    /// Stored lengths of the chunks `first..=last` of `ino` that exist, in order.
    pub fn chunk_lens(&self, ino: Ino, first: u64, last: u64) -> Result<Vec<(u64, u64)>> {
        let v = self.vid;
        if first == last {
            // One chunk (every write of at most a chunk that does not straddle two):
            // a point lookup is several times cheaper than an iterator.
            return Ok(match self.get_meta(&codec::chunk_len_key(v, ino, first))? {
                Some(val) => vec![(first, decode_chunk_len(&val)?)],
                None => Vec::new(),
            });
        }
        let from = codec::chunk_len_key(v, ino, first);
        let to = match last.checked_add(1) {
            Some(n) => codec::chunk_len_key(v, ino, n),
            None => codec::prefix_end(&codec::chunk_len_prefix(v, ino)),
        };
        let mut out = Vec::new();
        self.scan(Cf::Meta, &from, &to, |k, val| {
            let (_, idx) = codec::parse_chunk_len_key(v, k)?;
            out.push((idx, decode_chunk_len(val)?));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The bytes of chunk `idx` of `ino` (empty if none are stored).
    /// (An encrypted volume's chunk reads as whole blocks: bytes past its stored length
    /// are zeros, as they read for any chunk.)
    pub fn chunk(&self, ino: Ino, idx: u64) -> Result<Vec<u8>> {
        let key = codec::chunk_key(self.vid, ino, idx);
        match self.get(Cf::Chunks, &key)? {
            Some(stored) if self.seal.is_sealing() => {
                Ok(self.seal.open_chunk(&key, &stored, None)?.into_owned())
            }
            Some(stored) => Ok(stored),
            None => Ok(Vec::new()),
        }
    }

    /// How writes into part of a chunk must be aligned to be staged as patches
    /// ([`super::VolumeTxn::patch_chunk`]): whole sealed blocks for an encrypted volume,
    /// any byte for others.
    pub fn chunk_granule(&self) -> u64 {
        self.seal.chunk_granule() as u64
    }

    /// Bytes `lo..hi` of chunk `idx` of `ino`, whole sealed blocks (for the head and tail
    /// of a write into an encrypted chunk): zeros where nothing is stored.
    pub fn chunk_range(&self, ino: Ino, idx: u64, lo: u64, hi: u64) -> Result<Vec<u8>> {
        let key = codec::chunk_key(self.vid, ino, idx);
        let (lo, hi) = (lo as usize, hi as usize);
        let mut out = vec![0u8; hi - lo];
        if let Some(stored) = self.get(Cf::Chunks, &key)? {
            let plain = self.seal.open_chunk(&key, &stored, Some((lo, hi)))?;
            let end = hi.min(plain.len());
            if end > lo {
                out[..end - lo].copy_from_slice(&plain[lo..end]);
            }
        }
        Ok(out)
    }

    /// Pass over every chunk length of the volume: `f(ino, idx, length)`.
    pub fn each_chunk_len(&self, mut f: impl FnMut(Ino, u64, Result<u64>)) -> Result<()> {
        let v = self.vid;
        self.scan_tag(codec::TAG_CHUNK_LEN, |k, val| {
            let (ino, idx) = codec::parse_chunk_len_key(v, k)?;
            f(ino, idx, decode_chunk_len(val));
            Ok(true)
        })
    }

    /// Pass over every stored chunk of the volume: `f(ino, idx, bytes stored)` (of file
    /// data: for an encrypted chunk its whole blocks, salts and tags not counted).
    pub fn each_chunk_size(&self, mut f: impl FnMut(Ino, u64, u64)) -> Result<()> {
        let (v, seal) = (self.vid, self.seal);
        self.scan(
            Cf::Chunks,
            &codec::volume_start(v),
            &codec::volume_end(v),
            |k, val| {
                let (_, ino, idx) = codec::parse_chunk_key(k)?;
                f(ino, idx, seal.chunk_plain_len(val.len()) as u64);
                Ok(true)
            },
        )
    }

    /// A consistent view of the volume as of now (see [`VolumeSnapshot`]).
    pub fn snapshot(&self) -> VolumeSnapshot<'a> {
        VolumeSnapshot {
            store: self.store,
            vid: self.vid,
            chunk_cf: self.store.chunks_for(self.compression),
            seal: self.seal,
            snap: self.store.db().snapshot(),
            view: *self,
        }
    }

    /// [`VolumeView::snapshot`] for a read of `ino` from chunk `chunk` on: of a replicated
    /// volume, from the copy whose turn that stretch of the file is (reads of a file take
    /// turns over the copies, a stretch of [`READ_STRIPE_CHUNKS`] chunks each).
    pub fn snapshot_for(&self, ino: Ino, chunk: u64) -> VolumeSnapshot<'a> {
        match self.rep {
            Some(r) => {
                let at = r
                    .set
                    .read_copy(ino.wrapping_add(chunk / READ_STRIPE_CHUNKS));
                VolumeView::new(r.copies, Some(r.set), at).snapshot()
            }
            None => self.snapshot(),
        }
    }

    // ----- extended attributes -----

    /// The value of xattr `name` of `ino`, if set.
    pub fn xattr(&self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let name = self.seal.name(&codec::xattr_name_context(ino), name);
        let key = codec::xattr_key(self.vid, ino, &name);
        match self.get_meta(&key)? {
            Some(stored) if self.seal.is_sealing() => {
                Ok(Some(self.seal.open(&key, &stored)?.into_owned()))
            }
            other => Ok(other),
        }
    }

    /// Calls `f(name, value)` for every xattr of `ino`, in name order (of the stored
    /// names: for an encrypted volume, an order that tells nothing of the names).
    pub fn xattrs(&self, ino: Ino, mut f: impl FnMut(&[u8], &[u8])) -> Result<()> {
        let prefix = codec::xattr_prefix(self.vid, ino);
        let (seal, ctx) = (self.seal, codec::xattr_name_context(ino));
        self.scan_meta(&prefix, |k, val| {
            let name = seal.open_name(&ctx, k[prefix.len()..].to_vec())?;
            f(&name, &seal.open(k, val)?);
            Ok(true)
        })
    }

    /// Calls `f(name, value length)` for every xattr of `ino` (values not opened).
    pub fn xattr_sizes(&self, ino: Ino, mut f: impl FnMut(&[u8], usize)) -> Result<()> {
        let prefix = codec::xattr_prefix(self.vid, ino);
        let (seal, ctx) = (self.seal, codec::xattr_name_context(ino));
        self.scan_meta(&prefix, |k, val| {
            let name = seal.open_name(&ctx, k[prefix.len()..].to_vec())?;
            f(&name, seal.plain_len(val.len()));
            Ok(true)
        })
    }

    /// Pass over every xattr of the volume: `f(ino, name, value length)`.
    pub fn each_xattr(&self, mut f: impl FnMut(Ino, Vec<u8>, usize)) -> Result<()> {
        let (v, seal) = (self.vid, self.seal);
        self.scan_tag(codec::TAG_XATTR, |k, val| {
            let (ino, name) = codec::parse_xattr_key(v, k)?;
            let name = seal.open_name(&codec::xattr_name_context(ino), name)?;
            f(ino, name, seal.plain_len(val.len()));
            Ok(true)
        })
    }

    // ----- counters, the ring of recent answers -----

    /// The volume's usage counters as stored (`None`: no key).
    pub fn usage(&self) -> Result<Option<Result<Usage, RecordError>>> {
        Ok(self
            .get_meta(&codec::usage_key(self.vid))?
            .map(|raw| Usage::decode(&raw)))
    }

    /// The volume's mount generation as stored (`None`: never mounted since it existed).
    pub fn mount_generation(&self) -> Result<Option<Result<u64, RecordError>>> {
        Ok(self
            .get_meta(&codec::mount_gen_key(self.vid))?
            .map(|raw| codec::decode_counter("mount generation", &raw)))
    }

    /// The record in slot `slot` of the ring of recent answers, if any.
    pub fn replay(&self, slot: u16) -> Result<Option<Result<ReplayRecord, RecordError>>> {
        Ok(self
            .get_meta(&codec::replay_key(self.vid, slot))?
            .map(|raw| ReplayRecord::decode(&raw)))
    }

    /// Pass over the ring of recent answers: `f(slot, record)`.
    pub fn each_replay(
        &self,
        mut f: impl FnMut(u16, Result<ReplayRecord, RecordError>),
    ) -> Result<()> {
        let v = self.vid;
        self.scan_tag(codec::TAG_REPLAY, |k, val| {
            f(codec::parse_replay_key(v, k)?, ReplayRecord::decode(val));
            Ok(true)
        })
    }
}

/// How many chunks of a file one copy of a replicated volume serves before reads of the
/// next ones go to the next copy (64 MiB at the default chunk size): long, so that a
/// sequential read keeps the kernel's read-ahead in one copy's files going (stretches of
/// 1 MiB halved cold sequential reads: read-ahead starts again at every switch); a large
/// file's random reads still spread over the disks, and different files go to different
/// copies.
const READ_STRIPE_CHUNKS: u64 = 1024;

/// Reads of one volume as of one moment (a RocksDB snapshot): a file read never sees half
/// of a concurrent write. For a replicated volume, a value this snapshot's copy cannot
/// read is read from another copy as it is now (see [`super::replica`]).
pub struct VolumeSnapshot<'a> {
    store: &'a Store,
    vid: VolumeId,
    chunk_cf: &'a rocksdb::ColumnFamily,
    seal: Sealer<'a>,
    snap: Snapshot<'a>,
    /// The view it was taken of (its copy), for reads that fail over.
    view: VolumeView<'a>,
}

impl VolumeSnapshot<'_> {
    /// The value under `key` in `cf` as of the snapshot, or, when its copy cannot read it,
    /// as another copy of a replicated volume holds it now.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let handle = cf.of(self.store, self.view.compression);
        match (self.snap.get_cf(handle, key), self.view.rep) {
            (Ok(v), _) => Ok(v),
            (Err(e), Some(r)) => {
                r.set
                    .failover_get(r.copies, r.at, (cf, self.view.compression), key, e.into())
            }
            (Err(e), None) => Err(e.into()),
        }
    }

    /// Inode `ino`'s record, if it exists.
    pub fn inode(&self, ino: Ino) -> Result<Option<InodeRecord>> {
        match self.get(Cf::Meta, &codec::inode_key(self.vid, ino))? {
            Some(raw) => Ok(Some(open_inode(self.seal, self.vid, ino, &raw)?)),
            None => Ok(None),
        }
    }

    /// Calls `f(idx, bytes)` for each stored chunk `first..=last` of `ino`, in order.
    pub fn chunks(&self, ino: Ino, first: u64, last: u64, f: impl FnMut(u64, &[u8])) -> Result<()> {
        self.chunks_in(ino, first, last, None, f)
    }

    /// [`VolumeSnapshot::chunks`] for a read of the file's bytes `lo..hi` (`window`:
    /// `(lo, hi, chunk size)`): of an encrypted chunk only the blocks holding them are
    /// opened (the others read as zeros in `bytes`).
    pub fn chunks_in(
        &self,
        ino: Ino,
        first: u64,
        last: u64,
        window: Option<(u64, u64, u64)>,
        mut f: impl FnMut(u64, &[u8]),
    ) -> Result<()> {
        let (v, chunks, seal) = (self.vid, self.chunk_cf, self.seal);
        // The bytes of chunk `idx` the window covers.
        let range = |idx: u64| {
            window.map(|(lo, hi, cs)| {
                let start = idx * cs;
                let a = lo.clamp(start, start + cs) - start;
                let b = hi.clamp(start, start + cs) - start;
                (a as usize, b as usize)
            })
        };
        if first == last {
            // One chunk: a point lookup, without copying the value.
            let key = codec::chunk_key(v, ino, first);
            match self.snap.get_pinned_cf(chunks, &key) {
                Ok(Some(bytes)) => f(first, &seal.open_chunk(&key, &bytes, range(first))?),
                Ok(None) => {}
                Err(e) if self.view.rep.is_some() => {
                    drop(e);
                    return self.chunks_one_by_one(ino, first, last, range, f);
                }
                Err(e) => return Err(e.into()),
            }
            return Ok(());
        }
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&self.snap);
        ro.set_iterate_upper_bound(codec::chunk_key(v, ino, last + 1));
        let mut it = self.store.db().raw_iterator_cf_opt(chunks, ro);
        it.seek(codec::chunk_key(v, ino, first));
        let mut next = first;
        while let (Some(k), Some(val)) = (it.key(), it.value()) {
            let (_, _, idx) = codec::parse_chunk_key(k)?;
            f(idx, &seal.open_chunk(k, val, range(idx))?);
            next = idx + 1;
            it.next();
        }
        match it.status() {
            Ok(()) => Ok(()),
            // The rest chunk by chunk, each read failing over on its own.
            Err(_) if self.view.rep.is_some() && next <= last => {
                self.chunks_one_by_one(ino, next, last, range, f)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// [`VolumeSnapshot::chunks_in`] by point reads that fail over to another copy (after
    /// this copy failed a read of a replicated volume).
    fn chunks_one_by_one(
        &self,
        ino: Ino,
        first: u64,
        last: u64,
        range: impl Fn(u64) -> Option<(usize, usize)>,
        mut f: impl FnMut(u64, &[u8]),
    ) -> Result<()> {
        for idx in first..=last {
            let key = codec::chunk_key(self.vid, ino, idx);
            if let Some(bytes) = self.get(Cf::Chunks, &key)? {
                f(idx, &self.seal.open_chunk(&key, &bytes, range(idx))?);
            }
        }
        Ok(())
    }
}

/// Decodes inode `ino`'s stored record, opening a sealed symlink target.
fn open_inode(
    seal: Sealer<'_>,
    vid: VolumeId,
    ino: Ino,
    raw: &[u8],
) -> Result<InodeRecord, RecordError> {
    let mut r = InodeRecord::decode(raw)?;
    if seal.is_sealing() && !r.target.is_empty() {
        let key = codec::inode_key(vid, ino);
        r.target = seal
            .open(&key, &r.target)
            .map_err(|_| RecordError {
                what: "sealed symlink target",
                len: raw.len(),
            })?
            .into_owned();
    }
    Ok(r)
}
