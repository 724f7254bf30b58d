//! The filesystem core: POSIX semantics of one volume over the store.
//!
//! Owns: inode and directory-entry semantics (create, link, unlink, rename with its flags,
//! readdir cookies), attribute and timestamp rules, open-file tracking for unlinked-but-open
//! files, quota admission for every change, and the chunked data path (in [`data`]) and
//! extended attributes (in [`xattr`]). Every operation stages all its changes in one
//! transaction of the store ([`VolumeTxn`], one `WriteBatch`), so a crash never leaves
//! half an operation, and reads through a [`VolumeView`]; it never sees a key. It returns plain
//! `Result<_, FsError>` values and knows nothing of FUSE: the adapter in [`crate::fuse`]
//! translates requests and errno values, which lets this layer be tested without a mount.
//!
//! Quota: every byte a user can make the store hold is charged to the volume's usage
//! (file data, and by the rules of [`charge`] chunk keys, inodes, symlink targets,
//! directory entries, xattrs), reserved before the batch is written and merged into the
//! usage key in the same batch; removing a thing credits exactly what it was charged.
//!
//! Locking: `ns` serializes operations that change the namespace (entries and link
//! counts); per-inode striped locks serialize changes to one inode's record and chunks,
//! and its open-handle count (so `open` and the last unlink or release agree on whether
//! the inode lives). The namespace lock is always taken first, then inode locks in
//! ascending stripe order, then the `open` table.

pub mod charge;
pub mod data;
pub mod error;
mod replay;
pub mod xattr;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use crate::store::codec::{DirentValue, Ino, InodeRecord};
pub use crate::store::codec::{Kind, Timestamp};
use crate::store::{OpenVolume, Store, Volume, VolumeTxn, VolumeView, ROOT_INO, UNLIMITED};
pub use error::{FsError, Result};
use replay::Req;
pub use replay::{Answering, Unique, RESENT, RING_SLOTS};

/// Longest name of a directory entry, as on ext4.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, as on ext4 with 4 KiB blocks.
pub const SYMLINK_MAX: usize = 4095;
/// Largest file size, as on ext4 with 4 KiB blocks (16 TiB - 4 KiB).
pub const MAX_FILE_SIZE: u64 = (1 << 44) - 4096;
/// Inode flag: the inode has a `security.capability` attribute.
pub const FLAG_HAS_CAPS: u32 = 1;
/// How far past the highest inode number in use a server that took over a live
/// connection starts numbering a volume made before the persisted counter
/// ([`crate::store::codec::next_ino_key`]) existed: numbers above it may have been given out and deleted.
const LEGACY_ADOPT_INO_GAP: u64 = 1 << 32;
/// Block size reported to `stat` and `statfs`.
pub const BLOCK_SIZE: u32 = 4096;

/// Attributes of an inode as callers see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks of stored data.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub rdev: u32,
}

impl Attr {
    fn from_record(ino: Ino, r: &InodeRecord) -> Attr {
        Attr {
            ino,
            kind: r.kind,
            perm: r.perm,
            nlink: r.nlink,
            uid: r.uid,
            gid: r.gid,
            size: r.size,
            blocks: r.stored_bytes.div_ceil(512),
            atime: r.atime,
            mtime: r.mtime,
            ctime: r.ctime,
            crtime: r.crtime,
            rdev: r.rdev,
        }
    }
}

/// Who is asking: used for ownership of new inodes.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time given to `setattr`.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(Timestamp),
}

/// Attribute changes requested by `setattr`; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Timestamp>,
    /// Clear set-user-id/set-group-id bits and file capabilities (a truncate by an
    /// unprivileged caller, under FUSE_HANDLE_KILLPRIV_V2).
    pub kill_privs: bool,
}

/// One directory entry returned by [`Fs::readdir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    /// Resume point: pass it back to continue after this entry.
    pub cookie: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
}

/// Volume figures for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

const LOCK_STRIPES: usize = 256;
/// Files with more chunks than this are deleted with range tombstones, smaller ones
/// with point deletes (see `Fs::stage_delete_inode`).
const RANGE_DELETE_MIN_CHUNKS: u64 = 4096;

/// One end of a rename: a directory and a name in it.
#[derive(Clone, Copy)]
struct Place<'a> {
    dir: Ino,
    name: &'a [u8],
}

/// Striped per-inode locks.
struct InodeLocks {
    stripes: Vec<Mutex<()>>,
}

impl InodeLocks {
    fn new() -> Self {
        InodeLocks {
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    fn stripe(ino: Ino) -> usize {
        (ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize % LOCK_STRIPES
    }

    /// Locks the stripes of `inos` in ascending order (duplicates collapse).
    fn lock(&self, inos: &[Ino]) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = inos.iter().map(|i| Self::stripe(*i)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.stripes[i].lock()).collect()
    }
}

/// One volume's filesystem.
pub struct Fs {
    store: Store,
    /// The open volume; dropping the `Fs` closes it (see [`OpenVolume`]).
    vol: OpenVolume,
    chunk_size: u64,
    ns: Mutex<()>,
    locks: InodeLocks,
    /// Open handles per inode, for unlinked-but-open files. Changed and read only under
    /// the inode's lock.
    open: Mutex<HashMap<Ino, u32>>,
    next_ino: AtomicU64,
    /// This server took over a live FUSE connection from one that died or handed it over
    /// ([`Fs::adopt`]): files opened before that are open in the kernel but not in `open`.
    adopted: bool,
    /// The mount generation of the connection served, which tells its requests' records
    /// apart from another connection's (see [`replay`]); `None`: unknown, nothing recorded.
    generation: Option<u64>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("volume", &self.vol.name)
            .finish()
    }
}

/// The changes of one operation, staged in one transaction of the store; its `usage` is
/// the volume's usage change: data and every metadata charge (see [`charge`]).
struct Change<'a> {
    txn: VolumeTxn<'a>,
    /// The change of file data bytes alone (the `stored_bytes` of the file written).
    data: i64,
}

pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

impl Fs {
    /// Serves volume `vol` of `store` on a fresh mount (a new FUSE connection: it takes
    /// the volume's next mount generation). Reclaims the inodes of files that were
    /// unlinked while open when the previous server stopped.
    pub fn new(store: Store, vol: OpenVolume) -> Result<Fs> {
        let generation = replay::next_mount_generation(&vol)?;
        let fs = Self::with(store, vol, false, Some(generation))?;
        fs.reclaim_orphans()?;
        Ok(fs)
    }

    /// Serves volume `vol` on a live FUSE connection taken over from a previous server
    /// (which died or handed it over): the kernel's node ids, lookup counts and open files
    /// carry on, but which inodes are open is unknown here. So nothing unlinked is deleted
    /// on the strength of this server's own open count: an inode whose last link goes
    /// stays (as an orphan) until the kernel forgets it ([`Fs::forget`]: no dentry and no
    /// open file refers to it any more), or until the next fresh mount reclaims it.
    ///
    /// `generation` is the connection's mount generation (the one
    /// [`Fs::mount_generation`] gave the server that mounted it): requests the kernel
    /// sends again are answered from what was recorded on this connection. `None`
    /// (unknown): nothing is recorded or answered from records.
    pub fn adopt(store: Store, vol: OpenVolume, generation: Option<u64>) -> Result<Fs> {
        Self::with(store, vol, true, generation)
    }

    fn with(store: Store, vol: OpenVolume, adopted: bool, generation: Option<u64>) -> Result<Fs> {
        let chunk_size = u64::from(store.chunk_size());
        let fs = Fs {
            store,
            vol,
            chunk_size,
            ns: Mutex::new(()),
            locks: InodeLocks::new(),
            open: Mutex::new(HashMap::new()),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            adopted,
            generation,
        };
        fs.next_ino.store(fs.first_free_ino()?, Ordering::Release);
        Ok(fs)
    }

    /// The first inode number never given out: the persisted counter. A kernel that
    /// outlived a server (taken over) may still know node ids of inodes that server
    /// deleted (a removed directory someone is in, an O_PATH fd), and a number is never
    /// given out twice in a volume's life, so they never name another inode.
    fn first_free_ino(&self) -> Result<Ino> {
        let past_highest = self.max_ino()? + 1;
        Ok(match self.view().next_ino()? {
            Some(next) => next.max(past_highest),
            None if self.adopted => past_highest + LEGACY_ADOPT_INO_GAP,
            None => past_highest,
        })
    }

    pub fn volume(&self) -> &Arc<Volume> {
        self.vol.volume()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    #[cfg(test)]
    fn vid(&self) -> u32 {
        self.vol.id
    }

    /// Reads of the volume.
    fn view(&self) -> VolumeView<'_> {
        self.vol.view()
    }

    /// A new change: a transaction on the volume.
    fn change(&self) -> Change<'_> {
        Change {
            txn: self.vol.txn(),
            data: 0,
        }
    }

    fn max_ino(&self) -> Result<Ino> {
        Ok(self.view().max_ino()?)
    }

    /// Deletes the inodes left in the orphan list (unlinked while open, then the server
    /// stopped). Called at mount.
    pub fn reclaim_orphans(&self) -> Result<usize> {
        let orphans = self.view().orphans()?;
        for ino in &orphans {
            let _g = self.locks.lock(&[*ino]);
            let mut c = self.change();
            match self.load_opt(*ino)? {
                Some(rec) if rec.nlink == 0 => self.stage_delete_inode(&mut c, *ino, &rec)?,
                // Linked again or already gone: only the marker is stale.
                _ => {}
            }
            c.txn.delete_orphan(*ino);
            self.commit(c)?;
        }
        if !orphans.is_empty() {
            tracing::info!(volume = %self.vol.name, count = orphans.len(), "reclaimed orphaned inodes");
        }
        Ok(orphans.len())
    }

    // ----- record access -----

    fn load_opt(&self, ino: Ino) -> Result<Option<InodeRecord>> {
        Ok(self.view().inode(ino)?)
    }

    fn load(&self, ino: Ino) -> Result<InodeRecord> {
        self.load_opt(ino)?.ok_or(FsError::NotFound)
    }

    fn load_dir(&self, ino: Ino) -> Result<InodeRecord> {
        let r = self.load(ino)?;
        if r.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(r)
    }

    fn stage_inode(&self, c: &mut Change, ino: Ino, r: &InodeRecord) {
        c.txn.put_inode(ino, r);
    }

    fn get_dirent(&self, parent: Ino, name: &[u8]) -> Result<Option<DirentValue>> {
        Ok(self.view().dirent(parent, name)?)
    }

    fn stage_add_dirent(
        &self,
        c: &mut Change,
        parent: Ino,
        parent_rec: &mut InodeRecord,
        name: &[u8],
        ino: Ino,
        kind: Kind,
    ) {
        let cookie = parent_rec.next_cookie;
        parent_rec.next_cookie += 1;
        c.txn.usage.bytes += charge::dirent_charge(name.len()) as i64;
        c.txn
            .put_dirent(parent, name, DirentValue { ino, kind, cookie });
    }

    fn stage_remove_dirent(&self, c: &mut Change, parent: Ino, name: &[u8], d: &DirentValue) {
        c.txn.usage.bytes -= charge::dirent_charge(name.len()) as i64;
        c.txn.remove_dirent(parent, name, d.cookie);
    }

    /// Stages the removal of an inode with all its chunks and xattrs, crediting all they
    /// were charged.
    ///
    /// Point deletes, except for files of more than [`RANGE_DELETE_MIN_CHUNKS`] chunks:
    /// every range tombstone in a memtable is re-fragmented by each later read, so
    /// deleting thousands of small files with one range tombstone each made every
    /// lookup and unlink slower than the last.
    fn stage_delete_inode(&self, c: &mut Change, ino: Ino, r: &InodeRecord) -> Result<()> {
        c.txn.delete_inode(ino);
        let txn = &mut c.txn;
        let mut xattrs = 0;
        self.view().xattr_sizes(ino, |name, len| {
            txn.delete_xattr(ino, name);
            xattrs += charge::xattr_charge(name.len(), len);
        })?;
        if r.chunk_count > RANGE_DELETE_MIN_CHUNKS {
            c.txn.delete_all_chunks(ino);
        } else if r.chunk_count > 0 || r.stored_bytes > 0 {
            for (idx, _) in self.chunk_lens(ino, 0, u64::MAX)? {
                c.txn.delete_chunk_len(ino, idx);
                c.txn.delete_chunk(ino, idx);
            }
        }
        let charged = charge::chunks_charge(r.chunk_count, r.stored_bytes)
            + charge::inode_charge(ino, r)
            + xattrs;
        c.txn.usage.bytes -= charged as i64;
        c.txn.usage.chunks -= r.chunk_count as i64;
        c.txn.usage.inodes -= 1;
        Ok(())
    }

    /// Admits the change's usage against the quota, writes its batch, and settles (see
    /// [`VolumeTxn::commit`]); a refusal is `NoSpace`.
    fn commit(&self, c: Change) -> Result<()> {
        c.txn.commit().map_err(|e| match e {
            crate::store::Error::Exhausted(_) => FsError::NoSpace,
            e => FsError::Store(e),
        })
    }

    // ----- attributes -----

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        Ok(Attr::from_record(ino, &self.load(ino)?))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        let d = self.get_dirent(parent, name)?.ok_or_else(|| {
            // Distinguish "parent is not a directory" from "no such entry".
            match self.load_opt(parent) {
                Ok(Some(p)) if p.kind != Kind::Dir => FsError::NotDir,
                _ => FsError::NotFound,
            }
        })?;
        let rec = self.load_opt(d.ino)?.ok_or_else(|| {
            FsError::Store(crate::store::Error::Corrupt(format!(
                "directory entry {:?} in {parent} names missing inode {}",
                String::from_utf8_lossy(name),
                d.ino
            )))
        })?;
        Ok(Attr::from_record(d.ino, &rec))
    }

    pub fn setattr(&self, ino: Ino, s: SetAttr) -> Result<Attr> {
        let _g = self.locks.lock(&[ino]);
        let mut r = self.load(ino)?;
        let now = Timestamp::now();
        let mut c = self.change();
        let mut changed = false;
        if let Some(mode) = s.mode {
            r.perm = (mode & 0o7777) as u16;
            changed = true;
        }
        if let Some(uid) = s.uid {
            r.uid = uid;
            changed = true;
        }
        if let Some(gid) = s.gid {
            r.gid = gid;
            changed = true;
        }
        // chown of a non-directory drops set-id bits and capabilities, as on ext4.
        let chown = (s.uid.is_some() || s.gid.is_some()) && r.kind != Kind::Dir;
        if (chown || s.kill_privs) && s.mode.is_none() {
            self.stage_kill_privs(&mut c, ino, &mut r)?;
        }
        if let Some(size) = s.size {
            match r.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
            if size > MAX_FILE_SIZE {
                return Err(FsError::FileTooBig);
            }
            self.stage_truncate(&mut c, ino, &mut r, size)?;
            if s.mtime.is_none() {
                r.mtime = now;
            }
            changed = true;
        }
        let resolve = |t: SetTime| match t {
            SetTime::Now => now,
            SetTime::At(t) => t,
        };
        if let Some(t) = s.atime {
            r.atime = resolve(t);
            changed = true;
        }
        if let Some(t) = s.mtime {
            r.mtime = resolve(t);
            changed = true;
        }
        if changed {
            r.ctime = s.ctime.unwrap_or(now);
        } else if let Some(ct) = s.ctime {
            r.ctime = ct;
        }
        self.stage_inode(&mut c, ino, &r);
        self.commit(c)?;
        Ok(Attr::from_record(ino, &r))
    }

    /// Clears S_ISUID, S_ISGID (when group-executable) and `security.capability`, as the
    /// kernel does on ext4 when an unprivileged user writes, truncates or chowns a file.
    fn stage_kill_privs(&self, c: &mut Change, ino: Ino, r: &mut InodeRecord) -> Result<()> {
        r.perm &= !(libc::S_ISUID as u16);
        if r.perm & (libc::S_IXGRP as u16) != 0 {
            r.perm &= !(libc::S_ISGID as u16);
        }
        if r.flags & FLAG_HAS_CAPS != 0 {
            r.flags &= !FLAG_HAS_CAPS;
            if let Some(v) = self.view().xattr(ino, xattr::SECURITY_CAPABILITY)? {
                c.txn.usage.bytes -=
                    charge::xattr_charge(xattr::SECURITY_CAPABILITY.len(), v.len()) as i64;
                c.txn.delete_xattr(ino, xattr::SECURITY_CAPABILITY);
            }
        }
        Ok(())
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let r = self.load(ino)?;
        if r.kind != Kind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(r.target)
    }

    // ----- namespace -----

    /// A new inode number. Under the namespace lock, like the commit that records it
    /// ([`Fs::stage_next_ino`]): the persisted counter only grows.
    fn alloc_ino(&self) -> Ino {
        self.next_ino.fetch_add(1, Ordering::AcqRel)
    }

    /// Stages the counter past `ino` (a small put in the create's own batch: no extra
    /// write, no sync), so a restart, even after a crash, numbers on past it.
    fn stage_next_ino(&self, c: &mut Change, ino: Ino) {
        c.txn.set_next_ino(ino + 1);
    }

    /// Creates a file, directory, symlink or special file named `name` in `parent`.
    /// `mode` carries the type bits and the permission bits (umask already applied).
    pub fn create_node(
        &self,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        self.create_node_as(None, caller, parent, name, mode, rdev, target)
    }

    /// [`Fs::create_node`] as the answer to `req` (recorded with it).
    #[allow(clippy::too_many_arguments)]
    fn create_node_as(
        &self,
        req: Option<Req>,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        check_name(name)?;
        let kind = if target.is_some() {
            Kind::Symlink
        } else {
            Kind::from_mode(mode).ok_or(FsError::Invalid)?
        };
        if let Some(t) = target {
            if t.is_empty() {
                return Err(FsError::NotFound);
            }
            if t.len() > SYMLINK_MAX {
                return Err(FsError::NameTooLong);
            }
        }
        let _ns = self.ns.lock();
        let _g = self.locks.lock(&[parent]);
        let mut p = self.load_dir(parent)?;
        if p.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if self.get_dirent(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let now = Timestamp::now();
        let mut perm = if kind == Kind::Symlink {
            0o777
        } else {
            (mode & 0o7777) as u16
        };
        let mut gid = caller.gid;
        if p.perm & (libc::S_ISGID as u16) != 0 {
            // BSD group semantics of a setgid directory, as ext4.
            gid = p.gid;
            if kind == Kind::Dir {
                perm |= libc::S_ISGID as u16;
            }
        }
        let ino = self.alloc_ino();
        let mut r = InodeRecord::new(kind, perm, caller.uid, gid, now);
        r.rdev = rdev;
        if kind == Kind::Dir {
            r.parent = parent;
        }
        if let Some(t) = target {
            r.target = t.to_vec();
            r.size = t.len() as u64;
        }
        let mut c = self.change();
        self.stage_next_ino(&mut c, ino);
        c.txn.usage.inodes = 1;
        c.txn.usage.bytes = charge::inode_charge(ino, &r) as i64;
        self.stage_add_dirent(&mut c, parent, &mut p, name, ino, kind);
        if kind == Kind::Dir {
            p.nlink = p.nlink.saturating_add(1);
        }
        p.mtime = now;
        p.ctime = now;
        self.stage_inode(&mut c, ino, &r);
        self.stage_inode(&mut c, parent, &p);
        self.stage_answer(&mut c, req, ino);
        self.commit(c)?;
        Ok(Attr::from_record(ino, &r))
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.link_as(None, ino, parent, name)
    }

    fn link_as(&self, req: Option<Req>, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        let _ns = self.ns.lock();
        let _g = self.locks.lock(&[ino, parent]);
        let mut r = self.load(ino)?;
        if r.kind == Kind::Dir {
            return Err(FsError::Perm);
        }
        if r.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if r.nlink >= 65000 {
            return Err(FsError::TooManyLinks);
        }
        let mut p = self.load_dir(parent)?;
        if self.get_dirent(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let now = Timestamp::now();
        let mut c = self.change();
        self.stage_add_dirent(&mut c, parent, &mut p, name, ino, r.kind);
        r.nlink += 1;
        r.ctime = now;
        p.mtime = now;
        p.ctime = now;
        self.stage_inode(&mut c, ino, &r);
        self.stage_inode(&mut c, parent, &p);
        self.stage_answer(&mut c, req, ino);
        self.commit(c)?;
        Ok(Attr::from_record(ino, &r))
    }

    /// Drops one link of `r` (already removed from its directory). Deletes the inode
    /// when no link and no open handle is left; keeps it as an orphan while open.
    fn stage_unlink_inode(
        &self,
        c: &mut Change,
        ino: Ino,
        r: &mut InodeRecord,
        now: Timestamp,
    ) -> Result<()> {
        if r.kind == Kind::Dir {
            r.nlink = 0;
        } else {
            r.nlink = r.nlink.saturating_sub(1);
        }
        r.ctime = now;
        if r.nlink > 0 {
            self.stage_inode(c, ino, r);
            return Ok(());
        }
        let open = self.open.lock().get(&ino).copied().unwrap_or(0);
        // Taken over: the kernel may hold it open from before; it goes at `forget`.
        if open > 0 || self.adopted {
            self.stage_inode(c, ino, r);
            c.txn.put_orphan(ino);
        } else {
            self.stage_delete_inode(c, ino, r)?;
        }
        Ok(())
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.unlink_as(None, parent, name)
    }

    fn unlink_as(&self, req: Option<Req>, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        let _ns = self.ns.lock();
        let d = self.get_dirent(parent, name)?.ok_or(FsError::NotFound)?;
        let _g = self.locks.lock(&[parent, d.ino]);
        let mut r = self.load(d.ino)?;
        if r.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let mut p = self.load_dir(parent)?;
        let now = Timestamp::now();
        let mut c = self.change();
        self.stage_remove_dirent(&mut c, parent, name, &d);
        p.mtime = now;
        p.ctime = now;
        self.stage_inode(&mut c, parent, &p);
        self.stage_unlink_inode(&mut c, d.ino, &mut r, now)?;
        self.stage_answer(&mut c, req, 0);
        self.commit(c)
    }

    fn dir_is_empty(&self, ino: Ino) -> Result<bool> {
        Ok(self.view().dir_is_empty(ino)?)
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.rmdir_as(None, parent, name)
    }

    fn rmdir_as(&self, req: Option<Req>, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        if name == b"." {
            return Err(FsError::Invalid);
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        let _ns = self.ns.lock();
        let d = self.get_dirent(parent, name)?.ok_or(FsError::NotFound)?;
        let _g = self.locks.lock(&[parent, d.ino]);
        let mut r = self.load(d.ino)?;
        if r.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if !self.dir_is_empty(d.ino)? {
            return Err(FsError::NotEmpty);
        }
        let mut p = self.load_dir(parent)?;
        let now = Timestamp::now();
        let mut c = self.change();
        self.stage_remove_dirent(&mut c, parent, name, &d);
        p.nlink = p.nlink.saturating_sub(1);
        p.mtime = now;
        p.ctime = now;
        self.stage_inode(&mut c, parent, &p);
        self.stage_unlink_inode(&mut c, d.ino, &mut r, now)?;
        self.stage_answer(&mut c, req, 0);
        self.commit(c)
    }

    /// Is `ancestor` equal to `ino` or one of its ancestors? Walks the parent pointers.
    fn is_ancestor(&self, ancestor: Ino, mut ino: Ino) -> Result<bool> {
        for _ in 0..4096 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            ino = self.load(ino)?.parent;
        }
        Err(FsError::Store(crate::store::Error::Corrupt(
            "directory parent chain does not reach the root".into(),
        )))
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        let from = Place { dir: parent, name };
        let to = Place {
            dir: new_parent,
            name: new_name,
        };
        self.rename_as(None, from, to, flags)
    }

    fn rename_as(&self, req: Option<Req>, from: Place, to: Place, flags: u32) -> Result<()> {
        check_name(from.name)?;
        check_name(to.name)?;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(FsError::Invalid);
        }
        let _ns = self.ns.lock();
        let src = self
            .get_dirent(from.dir, from.name)?
            .ok_or(FsError::NotFound)?;
        let dst = self.get_dirent(to.dir, to.name)?;
        let mut lock_inos = vec![from.dir, to.dir, src.ino];
        if let Some(d) = &dst {
            lock_inos.push(d.ino);
        }
        let _g = self.locks.lock(&lock_inos);
        let mut c = self.change();
        let changed = match dst {
            Some(dst) if exchange => self.stage_exchange(&mut c, (from, &src), (to, &dst))?,
            None if exchange => return Err(FsError::NotFound),
            Some(_) if noreplace => return Err(FsError::Exists),
            dst => self.stage_replace(&mut c, (from, &src), (to, dst.as_ref()))?,
        };
        if !changed {
            return Ok(());
        }
        self.stage_answer(&mut c, req, 0);
        self.commit(c)
    }

    /// Stages a `RENAME_EXCHANGE` of the entries `src` and `dst`; false if they name the
    /// same inode (nothing to do).
    fn stage_exchange(
        &self,
        c: &mut Change,
        (from, src): (Place, &DirentValue),
        (to, dst): (Place, &DirentValue),
    ) -> Result<bool> {
        if src.ino == dst.ino {
            return Ok(false);
        }
        // Neither may become its own ancestor.
        if src.kind == Kind::Dir && self.is_ancestor(src.ino, to.dir)? {
            return Err(FsError::Invalid);
        }
        if dst.kind == Kind::Dir && self.is_ancestor(dst.ino, from.dir)? {
            return Err(FsError::Invalid);
        }
        let now = Timestamp::now();
        let mut a = self.load(src.ino)?;
        let mut b = self.load(dst.ino)?;
        let mut p1 = self.load_dir(from.dir)?;
        let mut p2 = if from.dir == to.dir {
            None
        } else {
            Some(self.load_dir(to.dir)?)
        };
        // Replace each entry in place (same cookies: readdir position is kept).
        self.stage_put_dirent(c, from, src.cookie, dst.ino, dst.kind);
        self.stage_put_dirent(c, to, dst.cookie, src.ino, src.kind);
        if let Some(p2) = p2.as_mut() {
            let a_dir = a.kind == Kind::Dir;
            let b_dir = b.kind == Kind::Dir;
            if a_dir {
                a.parent = to.dir;
            }
            if b_dir {
                b.parent = from.dir;
            }
            // Saturating: a corrupted link count must not panic a FUSE worker.
            if a_dir && !b_dir {
                p1.nlink = p1.nlink.saturating_sub(1);
                p2.nlink = p2.nlink.saturating_add(1);
            } else if b_dir && !a_dir {
                p1.nlink = p1.nlink.saturating_add(1);
                p2.nlink = p2.nlink.saturating_sub(1);
            }
            p2.mtime = now;
            p2.ctime = now;
            self.stage_inode(c, to.dir, p2);
        }
        p1.mtime = now;
        p1.ctime = now;
        a.ctime = now;
        b.ctime = now;
        self.stage_inode(c, from.dir, &p1);
        self.stage_inode(c, src.ino, &a);
        self.stage_inode(c, dst.ino, &b);
        Ok(true)
    }

    /// Points the existing entry `at` (both its keys, cookie kept) at `ino`.
    fn stage_put_dirent(&self, c: &mut Change, at: Place, cookie: u64, ino: Ino, kind: Kind) {
        c.txn
            .put_dirent(at.dir, at.name, DirentValue { ino, kind, cookie });
    }

    /// Stages a plain rename of entry `src` to `to`, replacing `dst` there if any; false
    /// if both name the same inode (POSIX: do nothing).
    fn stage_replace(
        &self,
        c: &mut Change,
        (from, src): (Place, &DirentValue),
        (to, dst): (Place, Option<&DirentValue>),
    ) -> Result<bool> {
        if let Some(d) = dst {
            if d.ino == src.ino {
                return Ok(false);
            }
            self.check_replaceable(src, d)?;
        }
        if src.kind == Kind::Dir && self.is_ancestor(src.ino, to.dir)? {
            return Err(FsError::Invalid);
        }
        let now = Timestamp::now();
        let mut moved = self.load(src.ino)?;
        let same = from.dir == to.dir;
        let mut p1 = self.load_dir(from.dir)?;
        let mut p2 = if same {
            None
        } else {
            Some(self.load_dir(to.dir)?)
        };
        self.stage_remove_dirent(c, from.dir, from.name, src);
        if let Some(d) = dst {
            self.stage_remove_dirent(c, to.dir, to.name, d);
            let mut victim = self.load(d.ino)?;
            if victim.kind == Kind::Dir {
                // The replaced directory's ".." no longer counts toward its parent.
                match p2.as_mut() {
                    Some(p2) => p2.nlink = p2.nlink.saturating_sub(1),
                    None => p1.nlink = p1.nlink.saturating_sub(1),
                }
            }
            self.stage_unlink_inode(c, d.ino, &mut victim, now)?;
        }
        {
            let target = p2.as_mut().unwrap_or(&mut p1);
            self.stage_add_dirent(c, to.dir, target, to.name, src.ino, src.kind);
        }
        if moved.kind == Kind::Dir && !same {
            moved.parent = to.dir;
            p1.nlink = p1.nlink.saturating_sub(1);
            if let Some(p2) = p2.as_mut() {
                p2.nlink = p2.nlink.saturating_add(1);
            }
        }
        moved.ctime = now;
        p1.mtime = now;
        p1.ctime = now;
        if let Some(p2) = p2.as_mut() {
            p2.mtime = now;
            p2.ctime = now;
            self.stage_inode(c, to.dir, p2);
        }
        self.stage_inode(c, from.dir, &p1);
        self.stage_inode(c, src.ino, &moved);
        Ok(true)
    }

    /// May entry `src` replace entry `dst` (another inode)? A directory replaces only an
    /// empty directory, a non-directory only a non-directory.
    fn check_replaceable(&self, src: &DirentValue, dst: &DirentValue) -> Result<()> {
        match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
            (true, false) => Err(FsError::NotDir),
            (false, true) => Err(FsError::IsDir),
            (true, true) if !self.dir_is_empty(dst.ino)? => Err(FsError::NotEmpty),
            _ => Ok(()),
        }
    }

    // ----- open files -----

    /// Records an open handle (keeps an unlinked inode alive until released).
    ///
    /// Under the inode's lock, like the last unlink (which deletes the inode unless it
    /// is open) and the last release: an `open` racing them either comes first, and the
    /// inode stays as an orphan until released, or comes after and fails with
    /// `NotFound`; it never holds a handle to a deleted inode.
    pub fn open(&self, ino: Ino) -> Result<()> {
        let _g = self.locks.lock(&[ino]);
        let r = self.load(ino)?;
        let mut open = self.open.lock();
        // Unlinked and no longer open: its deletion is committed or under way. (Taken
        // over, an unlinked inode still exists only while the kernel refers to it.)
        if r.nlink == 0 && !open.contains_key(&ino) && !self.adopted {
            return Err(FsError::NotFound);
        }
        *open.entry(ino).or_insert(0) += 1;
        Ok(())
    }

    /// Releases an open handle; the last release of an unlinked inode deletes it.
    pub fn release(&self, ino: Ino) -> Result<()> {
        let _g = self.locks.lock(&[ino]);
        {
            let mut open = self.open.lock();
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return Ok(());
                }
                Some(_) => {
                    open.remove(&ino);
                }
                None => return Ok(()),
            }
        }
        if self.adopted {
            // Other handles may be open from before the take-over: `forget` decides.
            return Ok(());
        }
        self.delete_if_unlinked(ino)
    }

    /// The kernel dropped its last reference to `ino` (no dentry, no open file). Taken
    /// over, this is when an unlinked inode goes (see [`Fs::adopt`]); otherwise the last
    /// release did that already.
    pub fn forget(&self, ino: Ino) -> Result<()> {
        if !self.adopted || ino == ROOT_INO {
            return Ok(());
        }
        let _g = self.locks.lock(&[ino]);
        if self.open.lock().get(&ino).is_some_and(|n| *n > 0) {
            return Ok(());
        }
        self.delete_if_unlinked(ino)
    }

    /// Deletes `ino` and its orphan marker if it has no link left. Under its lock.
    fn delete_if_unlinked(&self, ino: Ino) -> Result<()> {
        match self.load_opt(ino)? {
            Some(r) if r.nlink == 0 => {
                let mut c = self.change();
                self.stage_delete_inode(&mut c, ino, &r)?;
                c.txn.delete_orphan(ino);
                self.commit(c)
            }
            _ => Ok(()),
        }
    }

    /// Makes every change so far durable.
    pub fn fsync(&self) -> Result<()> {
        Ok(self.vol.sync()?)
    }

    // ----- directories -----

    /// Lists `dir` after resume point `offset` (0 = from the start): `.` (cookie 1),
    /// `..` (cookie 2), then entries in creation order. Entries added or removed during a
    /// listing may or may not appear; all others appear exactly once.
    pub fn readdir(&self, dir: Ino, offset: u64, max: usize) -> Result<Vec<DirEntry>> {
        let r = self.load_dir(dir)?;
        let mut out = Vec::new();
        if offset < 1 {
            out.push(DirEntry {
                ino: dir,
                cookie: 1,
                kind: Kind::Dir,
                name: b".".to_vec(),
            });
        }
        if offset < 2 {
            out.push(DirEntry {
                ino: r.parent.max(ROOT_INO),
                cookie: 2,
                kind: Kind::Dir,
                name: b"..".to_vec(),
            });
        }
        let limit = max.saturating_sub(out.len());
        for (cookie, cv) in self.view().readdir(dir, offset.max(2) + 1, limit)? {
            out.push(DirEntry {
                ino: cv.ino,
                cookie,
                kind: cv.kind,
                name: cv.name,
            });
        }
        Ok(out)
    }

    // ----- volume -----

    pub fn statfs(&self) -> Result<StatFs> {
        let bs = u64::from(BLOCK_SIZE);
        let used = self.vol.used_bytes();
        let quota = self.vol.quota();
        let (total, free) = if quota == UNLIMITED {
            // The disk of each healthy copy: the volume grows as far as the fullest lets it.
            let mut best: Option<(u64, u64)> = None;
            let mut err = None;
            for dir in self.vol.healthy_dirs() {
                match nix::sys::statvfs::statvfs(dir) {
                    Ok(disk) => {
                        let frsize = disk.fragment_size();
                        let avail = disk.blocks_available() * frsize;
                        let size = disk.blocks() * frsize;
                        if best.is_none_or(|(_, a)| avail < a) {
                            best = Some((size, avail));
                        }
                    }
                    Err(e) => {
                        err.get_or_insert((dir.to_path_buf(), e));
                    }
                }
            }
            match (best, err) {
                (Some(b), _) => b,
                (None, Some((path, e))) => {
                    return Err(FsError::Store(crate::store::Error::Io {
                        path,
                        source: e.into(),
                    }))
                }
                (None, None) => (0, 0),
            }
        } else {
            (quota, quota.saturating_sub(used))
        };
        let inodes = self.vol.inodes();
        let limit = self.vol.inode_limit();
        let files = if limit == UNLIMITED {
            inodes + (1 << 32)
        } else {
            limit
        };
        Ok(StatFs {
            blocks: total / bs,
            bfree: free / bs,
            bavail: free / bs,
            files,
            ffree: files.saturating_sub(inodes),
            bsize: BLOCK_SIZE,
            namelen: NAME_MAX as u32,
        })
    }
}

#[cfg(test)]
mod tests;
