//! Writes to one volume: the changes of one operation, staged and committed as one
//! `WriteBatch`.
//!
//! Owns: the point every change of a volume's keys passes through, so that what must
//! happen to each write (quota admission today; checksums, replication and encryption
//! later) happens in one place. A [`VolumeTxn`] stages typed changes (inodes, directory
//! entries, chunks and their patches and lengths, xattrs, orphan markers, counters, replay
//! records) with the encodings of [`super::codec`]; [`VolumeTxn::commit`] admits the usage
//! change it accounts for against the volume's quota and the disk's free-space floor,
//! writes its one batch, and settles the reservation. It knows nothing of POSIX: what a
//! change means and what it is charged is the filesystem core's business
//! ([`crate::fs`]); it must not read (reads go through [`super::VolumeView`]).

use rocksdb::WriteBatch;

use super::codec::{self, CookieValue, DirentValue, Ino, InodeRecord, ReplayRecord, Usage};
use super::crypt::{CryptError, Sealer};
use super::replica::{Cf, Copy, ReplicaSet};
use super::{Error, Exhausted, Result, Volume};

/// The staged changes of one operation on one volume (see the module doc). Dropping it
/// without [`VolumeTxn::commit`] writes nothing.
#[must_use = "a transaction writes nothing until it is committed"]
pub struct VolumeTxn<'a> {
    /// The volume's copies (one unless it is replicated); the first one's counters admit.
    copies: &'a [Copy],
    set: Option<&'a ReplicaSet>,
    vol: &'a Volume,
    /// One batch per copy, the same changes in each.
    batches: Vec<WriteBatch>,
    /// A change that could not be staged (sealing failed): the commit fails with it.
    failed: Option<Error>,
    /// The volume's usage change this transaction accounts for: merged into the usage key
    /// in the same batch and admitted against the quota at [`VolumeTxn::commit`].
    pub usage: Usage,
}

impl<'a> VolumeTxn<'a> {
    pub(super) fn new(copies: &'a [Copy], set: Option<&'a ReplicaSet>) -> Self {
        VolumeTxn {
            copies,
            set,
            vol: &copies[0].vol,
            batches: copies.iter().map(|_| WriteBatch::default()).collect(),
            failed: None,
            usage: Usage::default(),
        }
    }

    // ----- staging into every copy's batch -----

    fn put(&mut self, cf: Cf, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value, c) = (key.as_ref(), value.as_ref(), self.vol.compression);
        for (copy, b) in self.copies.iter().zip(&mut self.batches) {
            b.put_cf(cf.of(&copy.store, c), key, value);
        }
    }

    fn delete(&mut self, cf: Cf, key: impl AsRef<[u8]>) {
        let (key, c) = (key.as_ref(), self.vol.compression);
        for (copy, b) in self.copies.iter().zip(&mut self.batches) {
            b.delete_cf(cf.of(&copy.store, c), key);
        }
    }

    fn delete_range(&mut self, cf: Cf, from: impl AsRef<[u8]>, to: impl AsRef<[u8]>) {
        let (from, to, c) = (from.as_ref(), to.as_ref(), self.vol.compression);
        for (copy, b) in self.copies.iter().zip(&mut self.batches) {
            b.delete_range_cf(cf.of(&copy.store, c), from, to);
        }
    }

    fn merge(&mut self, cf: Cf, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value, c) = (key.as_ref(), value.as_ref(), self.vol.compression);
        for (copy, b) in self.copies.iter().zip(&mut self.batches) {
            b.merge_cf(cf.of(&copy.store, c), key, value);
        }
    }

    fn vid(&self) -> codec::VolumeId {
        self.vol.id
    }

    /// How the volume's names and contents are stored (sealed if it is encrypted).
    fn seal(&self) -> Sealer<'a> {
        Sealer(self.vol.cipher.as_deref())
    }

    /// Contents `plain` as stored under `key`; a failure is kept for the commit.
    fn sealed<'p>(&mut self, key: &[u8], plain: &'p [u8]) -> std::borrow::Cow<'p, [u8]> {
        match self.seal().seal(key, plain) {
            Ok(v) => v,
            Err(e) => {
                self.failed.get_or_insert(Error::Crypt(e));
                std::borrow::Cow::Borrowed(&[])
            }
        }
    }

    // ----- inodes -----

    /// Stages inode `ino`'s record.
    pub fn put_inode(&mut self, ino: Ino, r: &InodeRecord) {
        let key = codec::inode_key(self.vid(), ino);
        let value = if self.seal().is_sealing() && !r.target.is_empty() {
            let mut sealed = r.clone();
            sealed.target = self.sealed(&key, &r.target).into_owned();
            sealed.encode()
        } else {
            r.encode()
        };
        self.put(Cf::Meta, &key, value);
    }

    /// Stages the removal of inode `ino`'s record (its chunks, lengths and xattrs have
    /// their own removals).
    pub fn delete_inode(&mut self, ino: Ino) {
        let key = codec::inode_key(self.vid(), ino);
        self.delete(Cf::Meta, &key);
    }

    /// Marks `ino` as unlinked while open (reclaimed at the next mount).
    pub fn put_orphan(&mut self, ino: Ino) {
        let key = codec::orphan_key(self.vid(), ino);
        self.put(Cf::Meta, &key, []);
    }

    pub fn delete_orphan(&mut self, ino: Ino) {
        let key = codec::orphan_key(self.vid(), ino);
        self.delete(Cf::Meta, &key);
    }

    /// Stages the volume's inode-number counter: `next` is the first number never given
    /// out.
    pub fn set_next_ino(&mut self, next: Ino) {
        let key = codec::next_ino_key(self.vid());
        self.put(Cf::Meta, &key, codec::encode_counter(next));
    }

    // ----- directory entries -----

    /// Stages directory entry `name` of directory `parent`: its by-name key (lookup) and
    /// its readdir key at `entry.cookie`, always together. The one place that writes a
    /// directory entry; an existing entry of that name and cookie is replaced (both keys).
    pub fn put_dirent(&mut self, parent: Ino, name: &[u8], entry: DirentValue) {
        let v = self.vid();
        let name = self.seal().name(&codec::dirent_name_context(parent), name);
        self.put(
            Cf::Meta,
            codec::dirent_key(v, parent, &name),
            entry.encode(),
        );
        let cookie = CookieValue {
            ino: entry.ino,
            kind: entry.kind,
            name: name.to_vec(),
        };
        self.put(
            Cf::Meta,
            codec::cookie_key(v, parent, entry.cookie),
            cookie.encode(),
        );
    }

    /// Stages the removal of directory entry `name` of `parent` whose readdir position
    /// is `cookie`: both its keys. The one place that removes a directory entry.
    pub fn remove_dirent(&mut self, parent: Ino, name: &[u8], cookie: u64) {
        let v = self.vid();
        let name = self.seal().name(&codec::dirent_name_context(parent), name);
        self.delete(Cf::Meta, codec::dirent_key(v, parent, &name));
        self.delete(Cf::Meta, codec::cookie_key(v, parent, cookie));
    }

    /// Repair of a broken entry: removes only its by-name key (its readdir position
    /// belongs to another name, or to none).
    pub fn remove_dirent_name(&mut self, parent: Ino, name: &[u8]) {
        let name = self.seal().name(&codec::dirent_name_context(parent), name);
        let key = codec::dirent_key(self.vid(), parent, &name);
        self.delete(Cf::Meta, &key);
    }

    /// Repair of an entry whose name cannot be read (a sealed name that does not open):
    /// removes its by-name key as stored.
    pub fn remove_dirent_stored_name(&mut self, parent: Ino, stored: &[u8]) {
        let key = codec::dirent_key(self.vid(), parent, stored);
        self.delete(Cf::Meta, &key);
    }

    /// Repair of a broken entry: removes only a readdir key (no name refers to it).
    pub fn remove_dirent_cookie(&mut self, parent: Ino, cookie: u64) {
        let key = codec::cookie_key(self.vid(), parent, cookie);
        self.delete(Cf::Meta, &key);
    }

    // ----- chunks -----

    /// Stages chunk `idx` of `ino` as `bytes` (replacing what it held).
    pub fn put_chunk(&mut self, ino: Ino, idx: u64, bytes: &[u8]) {
        let key = codec::chunk_key(self.vid(), ino, idx);
        let value = match self.seal().seal_chunk(&key, 0, bytes) {
            Ok(v) => v,
            Err(e) => return self.fail(Error::Crypt(e)),
        };
        self.put(Cf::Chunks, &key, value);
    }

    /// Stages `bytes` at `offset` inside chunk `idx` without reading it (a merge operand,
    /// see [`codec::merge_chunk`]). For an encrypted volume `offset` and the length must
    /// be whole sealed blocks ([`VolumeView::chunk_granule`](super::VolumeView::chunk_granule):
    /// a short last block is padded with zeros): the patch is their sealed slots.
    pub fn patch_chunk(&mut self, ino: Ino, idx: u64, offset: u32, bytes: &[u8]) {
        let key = codec::chunk_key(self.vid(), ino, idx);
        let seal = self.seal();
        let granule = seal.chunk_granule();
        if !(offset as usize).is_multiple_of(granule) {
            return self.fail(Error::Crypt(CryptError::Tampered(
                "a patch of a sealed chunk not on a block boundary (a bug)",
            )));
        }
        let first = (offset as usize / granule) as u32;
        let value = match seal.seal_chunk(&key, if seal.is_sealing() { first } else { 0 }, bytes) {
            Ok(v) => v,
            Err(e) => return self.fail(Error::Crypt(e)),
        };
        let at = seal.stored_offset(offset as usize) as u32;
        self.merge(Cf::Chunks, &key, codec::encode_chunk_patch(at, &value));
    }

    /// Keeps the first failure of staging for the commit.
    fn fail(&mut self, e: Error) {
        self.failed.get_or_insert(e);
    }

    /// Stages the removal of chunk `idx`'s bytes (not its length).
    pub fn delete_chunk(&mut self, ino: Ino, idx: u64) {
        let key = codec::chunk_key(self.vid(), ino, idx);
        self.delete(Cf::Chunks, &key);
    }

    /// Stages the stored length of chunk `idx`.
    pub fn put_chunk_len(&mut self, ino: Ino, idx: u64, len: u64) {
        let key = codec::chunk_len_key(self.vid(), ino, idx);
        self.put(Cf::Meta, &key, codec::encode_chunk_len(len));
    }

    pub fn delete_chunk_len(&mut self, ino: Ino, idx: u64) {
        let key = codec::chunk_len_key(self.vid(), ino, idx);
        self.delete(Cf::Meta, &key);
    }

    /// Stages the removal of every chunk of `ino` and its length, with one range
    /// tombstone per column family (for files of many chunks: see `crate::fs`).
    pub fn delete_all_chunks(&mut self, ino: Ino) {
        let v = self.vid();
        let lp = codec::chunk_len_prefix(v, ino);
        self.delete_range(Cf::Meta, &lp, codec::prefix_end(&lp));
        let cp = codec::chunk_prefix(v, ino);
        self.delete_range(Cf::Chunks, &cp, codec::prefix_end(&cp));
    }

    // ----- extended attributes -----

    pub fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) {
        let name = self.seal().name(&codec::xattr_name_context(ino), name);
        let key = codec::xattr_key(self.vid(), ino, &name);
        let value = self.sealed(&key, value);
        self.put(Cf::Meta, &key, value);
    }

    pub fn delete_xattr(&mut self, ino: Ino, name: &[u8]) {
        let name = self.seal().name(&codec::xattr_name_context(ino), name);
        let key = codec::xattr_key(self.vid(), ino, &name);
        self.delete(Cf::Meta, &key);
    }

    /// Stages the removal of every xattr of `ino` (one range tombstone).
    pub fn delete_all_xattrs(&mut self, ino: Ino) {
        let p = codec::xattr_prefix(self.vid(), ino);
        self.delete_range(Cf::Meta, &p, codec::prefix_end(&p));
    }

    // ----- the ring of recent answers, the mount generation -----

    /// Stages `record` into slot `slot` of the volume's ring of recent answers.
    pub fn put_replay(&mut self, slot: u16, record: &ReplayRecord) {
        let key = codec::replay_key(self.vid(), slot);
        self.put(Cf::Meta, &key, record.encode());
    }

    pub fn delete_replay(&mut self, slot: u16) {
        let key = codec::replay_key(self.vid(), slot);
        self.delete(Cf::Meta, &key);
    }

    /// Stages the removal of the whole ring of recent answers.
    pub fn delete_replay_ring(&mut self) {
        let ring = codec::tag_prefix(self.vid(), codec::TAG_REPLAY);
        self.delete_range(Cf::Meta, &ring, codec::prefix_end(&ring));
    }

    pub fn set_mount_generation(&mut self, generation: u64) {
        let key = codec::mount_gen_key(self.vid());
        self.put(Cf::Meta, &key, codec::encode_counter(generation));
    }

    pub fn delete_mount_generation(&mut self) {
        let key = codec::mount_gen_key(self.vid());
        self.delete(Cf::Meta, &key);
    }

    /// Stages the volume's configuration (its limits; see [`super::OpenVolume::set_limits`]).
    pub(super) fn put_config(&mut self, cfg: &codec::VolumeConfig) -> Result<()> {
        let value = codec::encode_config(cfg)?;
        self.put(Cf::Meta, codec::config_key(self.vid()), value);
        Ok(())
    }

    /// Repair: sets the volume's usage counters outright (see
    /// [`VolumeTxn::commit_unaccounted`]).
    pub fn set_usage(&mut self, usage: Usage) {
        let key = codec::usage_key(self.vid());
        self.put(Cf::Meta, &key, usage.encode());
    }

    // ----- commit -----

    /// Admits the change's usage against the quota (and what the batch writes against the
    /// disk's free-space floor, see [`Volume::reserve_write`]), writes its batch with the
    /// usage merged into the volume's counters, and settles. Refused with
    /// [`Error::Exhausted`], having written nothing.
    pub fn commit(mut self) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if !self.usage.is_zero() {
            let key = codec::usage_key(self.vid());
            self.merge(Cf::Meta, &key, self.usage.encode());
        }
        let physical = self.batches[0].size_in_bytes() as u64;
        if let Some(set) = self.set {
            return self.commit_replicated(set, physical);
        }
        let reservation = self
            .vol
            .reserve_write(self.usage, physical)
            .map_err(Error::Exhausted)?;
        let batch = self.batches.pop().unwrap_or_default();
        match self.copies[0].store.write(batch) {
            Ok(()) => {
                self.vol.settle(reservation);
                Ok(())
            }
            Err(e) => {
                self.vol.release(reservation);
                Err(e)
            }
        }
    }

    /// [`VolumeTxn::commit`] of a replicated volume: the quota admits once (the first
    /// copy's counters), each healthy copy's disk admits what it will write, and the
    /// batches go into every healthy copy under the set's commit lock (see
    /// [`super::replica`]); every copy's counters then take the change.
    fn commit_replicated(self, set: &ReplicaSet, physical: u64) -> Result<()> {
        let reservation = self
            .vol
            .reserve_usage(self.usage)
            .map_err(Error::Exhausted)?;
        let disks_admit = self
            .copies
            .iter()
            .enumerate()
            .all(|(i, c)| !set.healthy(i) || c.vol.admit_write(self.usage, physical));
        if !disks_admit {
            self.vol.release(reservation);
            return Err(Error::Exhausted(Exhausted::Disk));
        }
        match set.write(self.copies, self.vol.id, self.batches) {
            Ok(()) => {
                for c in &self.copies[1..] {
                    c.vol.apply(self.usage);
                }
                self.vol.settle(reservation);
                Ok(())
            }
            Err(e) => {
                self.vol.release(reservation);
                Err(e)
            }
        }
    }

    /// Writes the batch as it is: no usage merged, nothing admitted or settled. For
    /// repairs (`fsck`), which set the counters outright on a volume nobody serves (one
    /// copy: `fsck` does not repair a replicated volume's copies).
    pub fn commit_unaccounted(mut self) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        match self.set {
            Some(set) => set.write(self.copies, self.vol.id, self.batches),
            None => {
                let batch = self.batches.pop().unwrap_or_default();
                self.copies[0].store.write(batch)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::codec::{DirentValue, InodeRecord, Kind, Timestamp};
    use crate::store::{Error, Exhausted, OpenVolume, Store, StoreOptions, ROOT_INO};

    fn volume(quota: Option<u64>) -> (tempfile::TempDir, Store, OpenVolume) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_or_create(&dir.path().join("s"), &StoreOptions::default()).unwrap();
        s.create_volume("v", quota, None).unwrap();
        let vol = s.open_volume("v").unwrap();
        (dir, s, vol)
    }

    #[test]
    fn a_directory_entry_is_written_and_removed_with_both_its_keys() {
        let (_d, _s, vol) = volume(None);
        let entry = DirentValue {
            ino: 7,
            kind: Kind::File,
            cookie: 3,
        };
        let mut t = vol.txn();
        t.put_dirent(ROOT_INO, b"a", entry);
        t.commit().unwrap();
        let view = vol.view();
        assert_eq!(view.dirent(ROOT_INO, b"a").unwrap(), Some(entry));
        let listed = view.readdir(ROOT_INO, 0, usize::MAX).unwrap();
        assert_eq!(listed.len(), 1);
        let (cookie, c) = &listed[0];
        assert_eq!(
            (*cookie, c.ino, c.kind, &c.name[..]),
            (3, 7, Kind::File, &b"a"[..])
        );
        assert!(!view.dir_is_empty(ROOT_INO).unwrap());

        let mut t = vol.txn();
        t.remove_dirent(ROOT_INO, b"a", 3);
        t.commit().unwrap();
        assert_eq!(view.dirent(ROOT_INO, b"a").unwrap(), None);
        assert!(view.readdir(ROOT_INO, 0, usize::MAX).unwrap().is_empty());
        assert!(view.dir_is_empty(ROOT_INO).unwrap());
    }

    #[test]
    fn a_refused_commit_writes_nothing_and_a_committed_one_counts_its_usage() {
        let (_d, _s, vol) = volume(Some(1000));
        let mut t = vol.txn();
        t.put_xattr(ROOT_INO, b"user.k", b"v");
        t.usage.bytes = 2000;
        let err = t.commit().unwrap_err();
        assert!(matches!(err, Error::Exhausted(Exhausted::Bytes)), "{err}");
        assert_eq!(vol.view().xattr(ROOT_INO, b"user.k").unwrap(), None);
        assert_eq!(vol.used_bytes(), 0);

        let mut t = vol.txn();
        t.put_xattr(ROOT_INO, b"user.k", b"v");
        t.usage.bytes = 100;
        t.commit().unwrap();
        assert_eq!(
            vol.view().xattr(ROOT_INO, b"user.k").unwrap(),
            Some(b"v".to_vec())
        );
        assert_eq!(vol.used_bytes(), 100);
        let stored = vol.view().usage().unwrap().unwrap().unwrap();
        assert_eq!((stored.bytes, stored.inodes), (100, 1));
    }

    #[test]
    fn a_snapshot_reads_chunks_and_patches_as_of_its_moment() {
        let (_d, _s, vol) = volume(None);
        let ino = 5;
        let mut t = vol.txn();
        t.put_inode(
            ino,
            &InodeRecord::new(Kind::File, 0o644, 0, 0, Timestamp::now()),
        );
        t.put_chunk(ino, 0, b"hello");
        t.put_chunk(ino, 1, b"world");
        t.patch_chunk(ino, 0, 1, b"E");
        t.put_chunk_len(ino, 0, 5);
        t.put_chunk_len(ino, 1, 5);
        t.commit().unwrap();
        let view = vol.view();
        let snap = view.snapshot();
        let mut t = vol.txn();
        t.put_chunk(ino, 0, b"HELLO");
        t.delete_inode(ino);
        t.commit().unwrap();

        assert!(snap.inode(ino).unwrap().is_some());
        let mut got = Vec::new();
        snap.chunks(ino, 0, 1, |idx, bytes| got.push((idx, bytes.to_vec())))
            .unwrap();
        assert_eq!(got, vec![(0, b"hEllo".to_vec()), (1, b"world".to_vec())]);
        let mut one = Vec::new();
        snap.chunks(ino, 1, 1, |idx, bytes| one.push((idx, bytes.to_vec())))
            .unwrap();
        assert_eq!(one, vec![(1, b"world".to_vec())]);

        assert!(view.inode(ino).unwrap().is_none());
        assert_eq!(view.chunk(ino, 0).unwrap(), b"HELLO");
        assert_eq!(
            view.chunk_lens(ino, 0, u64::MAX).unwrap(),
            vec![(0, 5), (1, 5)]
        );
        assert_eq!(view.chunk_lens(ino, 1, 1).unwrap(), vec![(1, 5)]);
    }
}
