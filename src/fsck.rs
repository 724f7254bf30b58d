//! Offline consistency check and repair of a store's volumes.
//!
//! Checks, per volume: every directory entry names an existing inode of the right kind
//! in an existing directory, and has exactly one matching readdir (cookie) entry;
//! directories have one name; link counts equal the entries that name each inode;
//! inodes no entry names (orphans of files unlinked while open, then crashed) are found;
//! chunk lengths and chunk bytes agree, no chunk lies past end of file; each inode's
//! stored bytes and chunk count, and the volume's usage counters, equal what is stored.
//! The inode-number counter is past every inode; the records of recent answers (replay
//! ring) and the mount generation are readable.
//! With `repair`, all fixes go into one `WriteBatch`: orphans with no links are deleted,
//! unreachable inodes that still have links are re-attached under `/lost+found`.
//!
//! Each check is a pass over the volume's [`VolumeView`] (one kind of key), in the order
//! of [`Checker::run`]; what the passes learn is kept in one `Found`, and their fixes are
//! staged in one [`VolumeTxn`]. This module reads and writes no key itself.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::fs::charge::{chunks_charge, dirent_charge, inode_charge, xattr_charge};
use crate::fs::RING_SLOTS;
use crate::store::codec::{
    self as keys, CookieValue, DirentValue, Ino, InodeRecord, Kind, Timestamp, Usage,
};
use crate::store::{self, OpenVolume, Store, VolumeTxn, VolumeView, ROOT_INO};

/// What fsck found in one volume.
#[derive(Debug, Default, Serialize)]
pub struct VolumeReport {
    pub volume: String,
    pub inodes: u64,
    pub problems: Vec<String>,
    /// Not problems: orphans of files unlinked while open, which the next mount reclaims.
    pub pending: Vec<String>,
    pub repaired: bool,
    /// The usage recounted from what the volume stores (what its counters should say).
    #[serde(skip)]
    pub stored: Usage,
}

/// Recounts the usage of a volume made before metadata was charged (from its metadata
/// keys only), so that its counters count what the current rule charges. Call it before the
/// volume is opened for serving; cheap for a volume that needs nothing.
pub fn recount_if_needed(store: &Store, name: &str) -> Result<(), store::Error> {
    if !store.needs_recount(name)? {
        return Ok(());
    }
    let vol = store.open_volume(name)?;
    let usage = recount_from_meta(vol.view())?;
    drop(vol);
    tracing::warn!(
        volume = name,
        bytes = usage.bytes,
        "volume counted file data only; recounted its usage with metadata charges"
    );
    store.set_recounted_usage(name, usage)
}

/// The usage of a volume by the charge rules, from its metadata keys alone (inodes,
/// directory entries, xattrs, chunk lengths): no chunk is read, so a recount of a large
/// volume reads megabytes, not its data. Assumes a consistent volume (fsck checks that).
fn recount_from_meta(view: VolumeView) -> Result<Usage, store::Error> {
    let mut u = Usage::default();
    let mut add = |bytes: u64| u.bytes = u.bytes.saturating_add(bytes as i64);
    let mut inodes = 0i64;
    let mut unreadable: Option<store::Error> = None;
    view.each_inode(|ino, r| match r {
        Ok(r) => {
            add(inode_charge(ino, &r));
            inodes += 1;
        }
        Err(e) => {
            unreadable.get_or_insert(e.into());
        }
    })?;
    // An entry whose sealed name does not open is not counted: fsck removes it.
    view.each_dirent(|_, name, _| {
        if let Ok(name) = name {
            add(dirent_charge(name.len()))
        }
    })?;
    view.each_xattr(|_, name, value_len| add(xattr_charge(name.len(), value_len)))?;
    let mut chunks = 0i64;
    view.each_chunk_len(|_, _, len| match len {
        Ok(len) => {
            add(chunks_charge(1, len));
            chunks += 1;
        }
        Err(e) => {
            unreadable.get_or_insert(e);
        }
    })?;
    if let Some(e) = unreadable {
        return Err(e);
    }
    u.inodes = inodes;
    u.chunks = chunks;
    Ok(u)
}

/// Checks (and with `repair`, fixes) volume `name`.
pub fn check_volume(store: &Store, name: &str, repair: bool) -> Result<VolumeReport, store::Error> {
    let info = store.inspect_volume(name)?;
    if repair && info.replicas.is_some() {
        return Err(store::Error::Unsupported(format!(
            "volume {name:?} is replicated: fsck checks one copy but does not repair it alone (its copies would differ); a damaged value is read from another copy and repaired while the volume is served"
        )));
    }
    let vol = store.open_volume_copy(name)?;
    let result = Checker::new(store, &vol, name, repair).run();
    drop(vol);
    let mut report = result?;
    report.volume = info.name;
    Ok(report)
}

/// What the passes have learnt of a volume so far: each pass reads what the earlier ones
/// found, fixes it in place and stages the fixes in the checker's transaction.
#[derive(Default)]
struct Found {
    /// The readable inode records, fixed in place (the `dirty` ones are written back).
    inodes: BTreeMap<Ino, InodeRecord>,
    /// Inodes whose record a fix changed.
    dirty: HashSet<Ino>,
    /// Number of entries naming each inode.
    links: HashMap<Ino, u32>,
    /// Number of subdirectories of each directory.
    subdirs: HashMap<Ino, u32>,
    /// Usage charged for the kept entries (see crate::fs::charge).
    dirent_bytes: u64,
    /// Inodes marked as unlinked while open.
    orphan_marks: HashSet<Ino>,
    /// Charges of each inode's extended attributes.
    xattr_bytes: HashMap<Ino, u64>,
    /// Stored length of each chunk.
    lens: BTreeMap<(Ino, u64), u64>,
    /// Bytes each chunk's value holds.
    chunk_vals: HashMap<(Ino, u64), u64>,
    /// Usage of orphans that --repair reclaims (still counted until then).
    pending_usage: Usage,
}

impl Found {
    /// Forgets inode `ino` and its chunks (deleted by a fix).
    fn forget(&mut self, ino: Ino) {
        self.inodes.remove(&ino);
        self.lens.retain(|(i, _), _| *i != ino);
        self.chunk_vals.retain(|(i, _), _| *i != ino);
    }
}

/// One check of one volume: passes over its [`VolumeView`], in order (see [`Checker::run`]).
struct Checker<'a> {
    store: &'a Store,
    view: VolumeView<'a>,
    problems: Vec<String>,
    pending: Vec<String>,
    /// The fixes, written only with `repair`.
    txn: VolumeTxn<'a>,
    name: &'a str,
    /// Whether the fixes staged in `txn` will be written.
    repair: bool,
    /// Charges of the directory entries `attach` adds (lost+found and what goes into it).
    attached_bytes: u64,
    /// The first inode number never given out (for a new `/lost+found`).
    next_ino: Ino,
    found: Found,
}

impl<'a> Checker<'a> {
    fn new(store: &'a Store, vol: &'a OpenVolume, name: &'a str, repair: bool) -> Self {
        Checker {
            store,
            view: vol.view(),
            problems: Vec::new(),
            pending: Vec::new(),
            txn: vol.txn(),
            name,
            repair,
            attached_bytes: 0,
            next_ino: ROOT_INO + 1,
            found: Found::default(),
        }
    }

    /// Records a problem. `msg` is "what is wrong; what the fix does" (the fix in the
    /// past tense): without `--repair` nothing is changed, so the fix is reported as what
    /// `--repair` would do.
    fn problem(&mut self, msg: String) {
        let msg = match msg.rsplit_once("; ") {
            Some((what, fix)) if !self.repair => format!("{what} (--repair: {fix})"),
            _ => msg,
        };
        self.problems.push(msg);
    }

    /// The passes, in order; with `repair`, their fixes are written as one batch.
    fn run(mut self) -> Result<VolumeReport, store::Error> {
        self.inode_pass()?;
        self.check_next_ino()?;
        self.check_replay_ring()?;
        self.entry_pass()?;
        self.found.orphan_marks = self.view.orphans()?.into_iter().collect();
        self.xattr_pass()?;
        self.chunk_index_pass()?;
        self.reachability_pass()?;
        self.link_count_pass();
        let per_inode = self.chunk_pass()?;
        let total = self.usage_pass(&per_inode)?;
        self.finish(total)
    }

    /// Inodes: unreadable records are removed; a missing root is recreated.
    fn inode_pass(&mut self) -> Result<(), store::Error> {
        let mut inodes: BTreeMap<Ino, InodeRecord> = BTreeMap::new();
        let mut bad_inodes = Vec::new();
        self.view.each_inode(|ino, r| match r {
            Ok(r) => {
                inodes.insert(ino, r);
            }
            Err(e) => bad_inodes.push((ino, e.to_string())),
        })?;
        for (ino, e) in bad_inodes {
            self.problem(format!("inode {ino}: unreadable record ({e}); removed"));
            self.txn.delete_inode(ino);
        }
        if !inodes.get(&ROOT_INO).is_some_and(|r| r.kind == Kind::Dir) {
            self.problem("root directory is missing or not a directory; recreated".into());
            let mut root = InodeRecord::new(Kind::Dir, 0o755, 0, 0, Timestamp::now());
            root.parent = ROOT_INO;
            root.next_cookie = u64::MAX / 2;
            inodes.insert(ROOT_INO, root);
        }
        self.found.inodes = inodes;
        Ok(())
    }

    /// Checks that the inode-number counter is past every inode (a number is never given
    /// out twice); remembers the first free number. A volume made before the counter has
    /// none: not a problem.
    fn check_next_ino(&mut self) -> Result<(), store::Error> {
        let highest = (self.found.inodes.keys().next_back().copied()).unwrap_or(ROOT_INO);
        let counter = self.view.next_ino()?;
        self.next_ino = counter.unwrap_or(0).max(highest + 1);
        if counter.is_some_and(|next| next <= highest) {
            self.problem(format!(
                "next inode number {} is not past inode {highest}; raised",
                counter.unwrap_or(0)
            ));
            self.stage_next_ino();
        }
        Ok(())
    }

    /// Checks the records of recent answers (see `crate::fs::Answering`): an unreadable
    /// one is dropped (only the replay of one request is lost); an unreadable mount
    /// generation is dropped with every record, as the next mount would count again from
    /// the start and could match them.
    fn check_replay_ring(&mut self) -> Result<(), store::Error> {
        if let Some(Err(_)) = self.view.mount_generation()? {
            self.problem("unreadable mount generation; removed with the replay records".into());
            self.txn.delete_mount_generation();
            self.txn.delete_replay_ring();
            return Ok(());
        }
        let mut bad = Vec::new();
        self.view.each_replay(|slot, record| {
            if u64::from(slot) >= RING_SLOTS || record.is_err() {
                bad.push(slot);
            }
        })?;
        for slot in bad {
            self.problem(format!("replay record {slot}: unreadable; removed"));
            self.txn.delete_replay(slot);
        }
        Ok(())
    }

    fn stage_next_ino(&mut self) {
        self.txn.set_next_ino(self.next_ino);
    }

    /// Directory entries: each by-name entry names an existing inode of its kind in an
    /// existing directory and has its one readdir entry; a directory has one name.
    /// Counts links, subdirectories and the entries' charges.
    fn entry_pass(&mut self) -> Result<(), store::Error> {
        let v = self.view.id();
        let mut entries: Vec<(Ino, Vec<u8>, DirentValue)> = Vec::new();
        let mut bad_entries = Vec::new();
        let mut sealed_names = Vec::new();
        self.view.each_dirent(|parent, name, d| match (name, d) {
            (Ok(name), Ok(d)) => entries.push((parent, name, d)),
            (Ok(name), Err(_)) => bad_entries.push((parent, name)),
            (Err(stored), _) => sealed_names.push((parent, stored)),
        })?;
        for (parent, name) in bad_entries {
            let k = keys::dirent_key(v, parent, &name);
            self.problem(format!("unreadable directory entry {k:02x?}; removed"));
            self.txn.remove_dirent_name(parent, &name);
        }
        for (parent, stored) in sealed_names {
            // Its inode, if nothing else names it, goes to lost+found (reachability pass).
            self.problem(format!(
                "directory entry in directory {parent} whose sealed name does not open (damaged); removed"
            ));
            self.txn.remove_dirent_stored_name(parent, &stored);
        }
        let mut cookies: HashMap<(Ino, u64), CookieValue> = HashMap::new();
        let mut bad_cookies = Vec::new();
        self.view.each_cookie(|parent, cookie, c| match c {
            Ok(c) => {
                cookies.insert((parent, cookie), c);
            }
            Err(_) => bad_cookies.push((parent, cookie)),
        })?;
        for (parent, cookie) in bad_cookies {
            let k = keys::cookie_key(v, parent, cookie);
            self.problem(format!("unreadable readdir entry {k:02x?}; removed"));
            self.txn.remove_dirent_cookie(parent, cookie);
        }

        let mut dir_named: HashSet<Ino> = HashSet::new();
        let mut used_cookies: HashSet<(Ino, u64)> = HashSet::new();
        for (parent, name, d) in entries {
            let shown = String::from_utf8_lossy(&name).into_owned();
            let inodes = &self.found.inodes;
            let parent_ok = inodes.get(&parent).is_some_and(|p| p.kind == Kind::Dir);
            let target = inodes.get(&d.ino).map(|r| r.kind);
            let duplicate_dir = target == Some(Kind::Dir) && dir_named.contains(&d.ino);
            if !parent_ok || target.is_none() || duplicate_dir {
                let why = if !parent_ok {
                    "its directory does not exist"
                } else if target.is_none() {
                    "it names a missing inode"
                } else {
                    "it is a second name of a directory"
                };
                self.problem(format!(
                    "entry {shown:?} in directory {parent}: {why}; removed"
                ));
                if cookies
                    .get(&(parent, d.cookie))
                    .is_some_and(|c| c.name == name)
                {
                    self.txn.remove_dirent(parent, &name, d.cookie);
                    used_cookies.insert((parent, d.cookie));
                } else {
                    // Its readdir position belongs to another name (or to none): only
                    // the by-name half goes.
                    self.txn.remove_dirent_name(parent, &name);
                }
                continue;
            }
            let kind = target.unwrap_or(d.kind);
            if kind != d.kind {
                self.problem(format!(
                    "entry {shown:?} in directory {parent}: kind differs from its inode; fixed"
                ));
            }
            let expected = CookieValue {
                ino: d.ino,
                kind,
                name: name.clone(),
            };
            let mut cookie = d.cookie;
            match cookies.get(&(parent, cookie)) {
                Some(c) if *c == expected => {}
                Some(c) if c.name != name => {
                    // The cookie is taken by another name: give this entry a fresh cookie.
                    self.problem(format!(
                        "entry {shown:?} in directory {parent}: readdir position shared; fixed"
                    ));
                    if let Some(p) = self.found.inodes.get_mut(&parent) {
                        cookie = p.next_cookie;
                        p.next_cookie += 1;
                        self.found.dirty.insert(parent);
                    }
                }
                _ => {
                    if kind == d.kind {
                        self.problem(format!("entry {shown:?} in directory {parent}: readdir entry missing or wrong; fixed"));
                    }
                }
            }
            if cookie != d.cookie
                || kind != d.kind
                || cookies.get(&(parent, cookie)) != Some(&expected)
            {
                let entry = DirentValue {
                    ino: d.ino,
                    kind,
                    cookie,
                };
                self.txn.put_dirent(parent, &name, entry);
            }
            used_cookies.insert((parent, cookie));
            let found = &mut self.found;
            if let Some(p) = found.inodes.get_mut(&parent) {
                if cookie >= p.next_cookie {
                    p.next_cookie = cookie + 1;
                    found.dirty.insert(parent);
                }
            }
            *found.links.entry(d.ino).or_default() += 1;
            found.dirent_bytes += dirent_charge(name.len());
            if kind == Kind::Dir {
                dir_named.insert(d.ino);
                *found.subdirs.entry(parent).or_default() += 1;
                if let Some(r) = found.inodes.get_mut(&d.ino) {
                    if r.parent != parent {
                        r.parent = parent;
                        found.dirty.insert(d.ino);
                    }
                }
            }
        }
        let mut stale_cookies: Vec<(Ino, u64)> = cookies
            .keys()
            .filter(|k| !used_cookies.contains(k))
            .copied()
            .collect();
        stale_cookies.sort_unstable();
        for (parent, cookie) in stale_cookies {
            self.problem(format!("readdir entry {cookie} in directory {parent} has no name entry (duplicate); removed"));
            self.txn.remove_dirent_cookie(parent, cookie);
        }
        Ok(())
    }

    /// Extended attributes: charged to their inode; those of a missing inode are stale.
    fn xattr_pass(&mut self) -> Result<(), store::Error> {
        let (inodes, xattr_bytes) = (&self.found.inodes, &mut self.found.xattr_bytes);
        let mut stale_xattrs = Vec::new();
        self.view.each_xattr(|ino, name, value_len| {
            if inodes.contains_key(&ino) {
                *xattr_bytes.entry(ino).or_default() += xattr_charge(name.len(), value_len);
            } else {
                stale_xattrs.push((ino, name));
            }
        })?;
        for (ino, name) in stale_xattrs {
            let shown = String::from_utf8_lossy(&name).into_owned();
            self.problem(format!(
                "extended attribute {shown:?} of missing inode {ino}; removed"
            ));
            self.txn.delete_xattr(ino, &name);
        }
        Ok(())
    }

    /// Chunks: the lengths index (unreadable lengths go with their chunk), then what
    /// each chunk's value holds.
    fn chunk_index_pass(&mut self) -> Result<(), store::Error> {
        let lens = &mut self.found.lens;
        let mut bad_lens = Vec::new();
        self.view.each_chunk_len(|ino, idx, len| match len {
            Ok(l) => {
                lens.insert((ino, idx), l);
            }
            Err(_) => bad_lens.push((ino, idx)),
        })?;
        for (ino, idx) in bad_lens {
            self.problem(format!(
                "inode {ino} chunk {idx}: unreadable length; chunk removed"
            ));
            self.txn.delete_chunk_len(ino, idx);
            self.txn.delete_chunk(ino, idx);
        }
        let chunk_vals = &mut self.found.chunk_vals;
        self.view.each_chunk_size(|ino, idx, stored| {
            chunk_vals.insert((ino, idx), stored);
        })?;
        Ok(())
    }

    /// Reachability: an inode no entry names is an orphan of a file unlinked while open
    /// (pending: the next mount reclaims it), an orphan left behind (reclaimed), or
    /// linked but unreachable (moved to `/lost+found`). Stale orphan markers go.
    fn reachability_pass(&mut self) -> Result<(), store::Error> {
        let unreachable: Vec<Ino> = (self.found.inodes.keys())
            .filter(|i| **i != ROOT_INO && !self.found.links.contains_key(i))
            .copied()
            .collect();
        let mut lost_found: Option<Ino> = None;
        for ino in unreachable {
            let Some(r) = self.found.inodes.get(&ino).cloned() else {
                continue;
            };
            let marked = self.found.orphan_marks.contains(&ino);
            if r.nlink == 0 && marked {
                // Expected after a crash: the next mount reclaims it (so does --repair).
                self.pending.push(format!(
                    "inode {ino}: unlinked while open; reclaimed at next mount"
                ));
                let charged = chunks_charge(r.chunk_count, r.stored_bytes)
                    + inode_charge(ino, &r)
                    + self.found.xattr_bytes.get(&ino).copied().unwrap_or(0);
                let pending = &mut self.found.pending_usage;
                pending.bytes += charged as i64;
                pending.chunks += r.chunk_count as i64;
                pending.inodes += 1;
                if self.repair {
                    self.delete_inode(ino);
                    self.found.forget(ino);
                }
                continue;
            }
            if r.nlink == 0 || marked || r.kind == Kind::Dir && r.nlink <= 1 {
                self.problem(format!(
                    "inode {ino}: orphan (unlinked, no longer open); reclaimed"
                ));
                self.delete_inode(ino);
                self.found.forget(ino);
                continue;
            }
            let lf = match lost_found {
                Some(lf) => lf,
                None => {
                    let lf = self.lost_and_found()?;
                    self.found.dirty.insert(ROOT_INO);
                    lost_found = Some(lf);
                    lf
                }
            };
            let name = format!("#{ino}").into_bytes();
            self.problem(format!(
                "inode {ino}: linked but unreachable; moved to /lost+found/#{ino}"
            ));
            let kind = r.kind;
            self.attach(lf, &name, ino, kind);
            let found = &mut self.found;
            *found.links.entry(ino).or_default() += 1;
            if kind == Kind::Dir {
                *found.subdirs.entry(lf).or_default() += 1;
                if let Some(rec) = found.inodes.get_mut(&ino) {
                    rec.parent = lf;
                }
            }
            found.dirty.insert(ino);
            found.dirty.insert(lf);
        }
        for ino in &self.found.orphan_marks {
            // Markers of inodes that are gone or linked again are stale.
            if !self.found.inodes.contains_key(ino) || self.found.links.contains_key(ino) {
                self.txn.delete_orphan(*ino);
            }
        }
        Ok(())
    }

    /// Link counts: a directory has 2 plus its subdirectories, anything else its entries.
    fn link_count_pass(&mut self) {
        let inos: Vec<Ino> = self.found.inodes.keys().copied().collect();
        for ino in &inos {
            let found = &mut self.found;
            let Some(r) = found.inodes.get_mut(ino) else {
                continue;
            };
            let expected = if r.kind == Kind::Dir {
                2 + found.subdirs.get(ino).copied().unwrap_or(0)
            } else {
                found.links.get(ino).copied().unwrap_or(0)
            };
            if r.nlink != expected {
                let msg = format!(
                    "inode {ino}: link count {} but {expected} entries; fixed",
                    r.nlink
                );
                r.nlink = expected;
                found.dirty.insert(*ino);
                self.problem(msg);
            }
        }
    }

    /// Chunk lengths and chunk bytes agree, no chunk of a file lies past its end, every
    /// chunk has a length; returns the (bytes, chunks) stored per inode.
    fn chunk_pass(&mut self) -> Result<HashMap<Ino, (u64, u64)>, store::Error> {
        let cs = u64::from(self.store.chunk_size());
        let mut per_inode: HashMap<Ino, (u64, u64)> = HashMap::new();
        let lens: Vec<((Ino, u64), u64)> = self.found.lens.iter().map(|(k, l)| (*k, *l)).collect();
        for ((ino, idx), len) in lens {
            let Some(r) = self.found.inodes.get(&ino) else {
                self.problem(format!("chunk {idx} of missing inode {ino}; removed"));
                self.txn.delete_chunk_len(ino, idx);
                self.txn.delete_chunk(ino, idx);
                continue;
            };
            // Lengths past the end of a file are space that `fallocate(KEEP_SIZE)`
            // reserved (it reads as zeros once the file grows over it), as ext4 keeps
            // preallocated blocks past EOF: counted, not a problem.
            if r.kind != Kind::File || len == 0 || len > cs {
                self.problem(format!(
                    "inode {ino} chunk {idx}: invalid length {len}; removed"
                ));
                self.txn.delete_chunk_len(ino, idx);
                self.txn.delete_chunk(ino, idx);
                continue;
            }
            let size = r.size;
            if let Some(&stored) = self.found.chunk_vals.get(&(ino, idx)) {
                // Preallocation stores a length only: bytes of a chunk that lies wholly
                // past the end of file would show up again if the file grew over them.
                if idx.saturating_mul(cs) >= size {
                    self.problem(format!(
                        "inode {ino} chunk {idx}: {stored} bytes stored past end of file; removed (the space stays reserved)"
                    ));
                    self.txn.delete_chunk(ino, idx);
                    let e = per_inode.entry(ino).or_default();
                    e.0 += len;
                    e.1 += 1;
                    continue;
                }
                // An encrypted chunk stores whole blocks (the last one padded with zeros).
                if stored > len.next_multiple_of(self.view.chunk_granule()) {
                    self.problem(format!("inode {ino} chunk {idx}: {stored} bytes stored beyond its length {len}; trimmed"));
                    let bytes = self.view.chunk(ino, idx)?;
                    self.txn.put_chunk(ino, idx, &bytes[..len as usize]);
                }
            }
            let e = per_inode.entry(ino).or_default();
            e.0 += len;
            e.1 += 1;
        }
        let mut orphan_chunks: Vec<(Ino, u64)> = (self.found.chunk_vals.keys())
            .filter(|k| !self.found.lens.contains_key(k))
            .copied()
            .collect();
        orphan_chunks.sort_unstable();
        for (ino, idx) in orphan_chunks {
            self.problem(format!(
                "inode {ino} chunk {idx}: data without a length entry; removed"
            ));
            self.txn.delete_chunk(ino, idx);
        }
        Ok(per_inode)
    }

    /// Each inode's stored bytes and chunk count, and the volume's usage counters, equal
    /// what is stored; returns the usage recounted.
    fn usage_pass(&mut self, per_inode: &HashMap<Ino, (u64, u64)>) -> Result<Usage, store::Error> {
        let mut total = Usage::default();
        let inos: Vec<Ino> = self.found.inodes.keys().copied().collect();
        for ino in &inos {
            let found = &mut self.found;
            let Some(r) = found.inodes.get_mut(ino) else {
                continue;
            };
            let (bytes, count) = per_inode.get(ino).copied().unwrap_or((0, 0));
            let mut msg = None;
            if r.stored_bytes != bytes || r.chunk_count != count {
                msg = Some(format!(
                    "inode {ino}: records {} bytes in {} chunks, stores {bytes} in {count}; fixed",
                    r.stored_bytes, r.chunk_count
                ));
                r.stored_bytes = bytes;
                r.chunk_count = count;
                found.dirty.insert(*ino);
            }
            let charged = chunks_charge(count, bytes)
                + inode_charge(*ino, r)
                + found.xattr_bytes.get(ino).copied().unwrap_or(0);
            total.bytes += charged as i64;
            total.chunks += count as i64;
            total.inodes += 1;
            if let Some(msg) = msg {
                self.problem(msg);
            }
        }
        total.bytes += (self.found.dirent_bytes + self.attached_bytes) as i64;
        let recorded = match self.view.usage()? {
            Some(stored) => stored.unwrap_or(Usage {
                bytes: -1,
                inodes: -1,
                chunks: -1,
            }),
            None => Usage::default(),
        };
        let pending_usage = self.found.pending_usage;
        let mut expected = total;
        if self.repair {
            expected.add(&pending_usage);
        }
        if self.repair && !pending_usage.is_zero() {
            self.txn.set_usage(total);
        }
        if recorded != expected {
            self.problem(format!(
                "usage counters say {} bytes, {} inodes, {} chunks; stored: {} bytes, {} inodes, {} chunks; fixed",
                recorded.bytes, recorded.inodes, recorded.chunks, total.bytes, total.inodes, total.chunks
            ));
            self.txn.set_usage(total);
        }
        Ok(total)
    }

    /// Writes the fixed records back and, with `repair`, commits every fix as one batch.
    fn finish(mut self, total: Usage) -> Result<VolumeReport, store::Error> {
        for ino in &self.found.dirty {
            if let Some(r) = self.found.inodes.get(ino) {
                self.txn.put_inode(*ino, r);
            }
        }
        let repaired = self.repair && !(self.problems.is_empty() && self.pending.is_empty());
        if repaired {
            self.txn.commit_unaccounted()?;
            self.store.sync()?;
        }
        Ok(VolumeReport {
            volume: self.name.to_string(),
            inodes: total.inodes as u64,
            problems: self.problems,
            pending: self.pending,
            repaired,
            stored: total,
        })
    }

    fn delete_inode(&mut self, ino: Ino) {
        self.txn.delete_inode(ino);
        self.txn.delete_orphan(ino);
        self.txn.delete_all_xattrs(ino);
        self.txn.delete_all_chunks(ino);
    }

    /// Adds entry `name` of `dir` for `ino` at the directory's next readdir position.
    fn attach(&mut self, dir: Ino, name: &[u8], ino: Ino, kind: Kind) {
        let Some(d) = self.found.inodes.get_mut(&dir) else {
            return;
        };
        let cookie = d.next_cookie;
        d.next_cookie += 1;
        self.attached_bytes += dirent_charge(name.len());
        self.txn
            .put_dirent(dir, name, DirentValue { ino, kind, cookie });
    }

    /// Finds or creates `/lost+found`.
    fn lost_and_found(&mut self) -> Result<Ino, store::Error> {
        if let Some(d) = self.view.dirent(ROOT_INO, b"lost+found")? {
            if d.kind == Kind::Dir && self.found.inodes.contains_key(&d.ino) {
                return Ok(d.ino);
            }
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.stage_next_ino();
        let mut r = InodeRecord::new(Kind::Dir, 0o700, 0, 0, Timestamp::now());
        r.parent = ROOT_INO;
        self.found.inodes.insert(ino, r);
        self.attach(ROOT_INO, b"lost+found", ino, Kind::Dir);
        self.found.links.insert(ino, 1);
        *self.found.subdirs.entry(ROOT_INO).or_default() += 1;
        Ok(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::data::FALLOC_FL_KEEP_SIZE;
    use crate::fs::{Caller, Fs};
    use crate::store::codec::encode_counter;
    use crate::store::StoreOptions;
    use rocksdb::WriteBatch;

    const ME: Caller = Caller { uid: 0, gid: 0 };

    fn store_with_file() -> (tempfile::TempDir, Store, Ino) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("s"), &StoreOptions::default()).unwrap();
        store.create_volume("v", None, None).unwrap();
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        let ino = fs
            .create_node(ME, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, None)
            .unwrap()
            .ino;
        fs.write(ino, 0, b"hello", false).unwrap();
        (dir, store, ino)
    }

    #[test]
    fn space_preallocated_past_the_end_of_file_is_clean() {
        let (_d, store, ino) = store_with_file();
        {
            let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
            fs.fallocate(ino, 0, 4 << 20, FALLOC_FL_KEEP_SIZE).unwrap();
            assert_eq!(fs.getattr(ino).unwrap().size, 5);
        }
        let r = check_volume(&store, "v", false).unwrap();
        assert_eq!(r.problems, Vec::<String>::new());
        let r = check_volume(&store, "v", true).unwrap();
        assert!(r.problems.is_empty() && !r.repaired, "{r:?}");
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        assert_eq!(
            fs.volume().used_bytes(),
            chunks_charge(64, 4 << 20) + crate::fs::charge::INODE_CHARGE + dirent_charge(1),
            "--repair kept the preallocation"
        );
    }

    #[test]
    fn without_repair_fsck_says_what_it_would_do_and_changes_nothing() {
        let (_d, store, ino) = store_with_file();
        // Corrupt: the file's inode is gone, its directory entry dangles.
        let id = store.open_volume("v").unwrap().id;
        let mut b = WriteBatch::default();
        b.delete_cf(store.meta(), keys::inode_key(id, ino));
        store.write(b).unwrap();
        let first = check_volume(&store, "v", false).unwrap();
        assert!(!first.problems.is_empty() && !first.repaired);
        for p in &first.problems {
            assert!(p.contains("(--repair: "), "reported as done: {p}");
        }
        let again = check_volume(&store, "v", false).unwrap();
        assert_eq!(again.problems, first.problems, "a check changed the store");
        let fixed = check_volume(&store, "v", true).unwrap();
        assert!(fixed.repaired);
        assert!(fixed.problems.iter().all(|p| !p.contains("--repair")));
        assert_eq!(
            check_volume(&store, "v", false).unwrap().problems,
            Vec::<String>::new()
        );
    }

    #[test]
    fn lost_and_found_takes_a_number_never_given_out() {
        let (_d, store, f) = store_with_file();
        let id = store.open_volume("v").unwrap().id;
        let gone = {
            let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
            let g = fs.create_node(ME, ROOT_INO, b"g", libc::S_IFREG, 0, None);
            fs.unlink(ROOT_INO, b"g").unwrap();
            g.unwrap().ino
        };
        assert!(gone > f);
        // Corrupt: f's name is gone, so f is unreachable and goes to /lost+found.
        let mut b = WriteBatch::default();
        b.delete_cf(store.meta(), keys::dirent_key(id, ROOT_INO, b"f"));
        store.write(b).unwrap();
        assert!(check_volume(&store, "v", true).unwrap().repaired);
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        let lf = fs.lookup(ROOT_INO, b"lost+found").unwrap().ino;
        assert!(
            lf > gone,
            "lost+found got {lf}; {gone} was given out before"
        );
        let next = fs.create_node(ME, ROOT_INO, b"n", libc::S_IFREG, 0, None);
        assert!(next.unwrap().ino > lf, "numbering goes on past lost+found");
        drop(fs);
        assert_eq!(
            check_volume(&store, "v", false).unwrap().problems,
            Vec::<String>::new()
        );
    }

    /// An entry of an encrypted volume whose sealed name no longer opens (a damaged key
    /// on disk) is reported and removed, the check goes on, and the file it named is not
    /// lost: it is attached under /lost+found with its data.
    #[test]
    fn a_damaged_sealed_name_is_reported_and_its_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("s"), &StoreOptions::default()).unwrap();
        let key = crate::store::MasterKey::generate().unwrap();
        let new = crate::store::NewVolume {
            encryption: Some(key),
            ..Default::default()
        };
        store.create_volume_with("v", &new).unwrap();
        let ino = {
            let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
            let ino = fs
                .create_node(ME, ROOT_INO, b"precious", libc::S_IFREG | 0o644, 0, None)
                .unwrap()
                .ino;
            fs.write(ino, 0, b"keep me", false).unwrap();
            ino
        };
        let id = store.open_volume("v").unwrap().id;
        // Flip a bit of the sealed name inside the entry's key.
        let mut found = Vec::new();
        store
            .scan_meta(&keys::dirent_prefix(id, ROOT_INO), |k, v| {
                found.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
        assert_eq!(found.len(), 1, "one entry in the root");
        let (k, v) = found.remove(0);
        let mut damaged = k.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x40;
        let mut b = WriteBatch::default();
        b.delete_cf(store.meta(), &k);
        b.put_cf(store.meta(), &damaged, &v);
        store.write(b).unwrap();

        let r = check_volume(&store, "v", false).unwrap();
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains("sealed name does not open")),
            "{:?}",
            r.problems
        );
        assert_eq!(
            store.get_meta(&damaged).unwrap(),
            Some(v.clone()),
            "nothing changed without --repair"
        );
        let r = check_volume(&store, "v", true).unwrap();
        assert!(r.repaired);
        assert_eq!(store.get_meta(&damaged).unwrap(), None);
        assert_eq!(
            check_volume(&store, "v", false).unwrap().problems,
            Vec::<String>::new()
        );
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        let lf = fs.lookup(ROOT_INO, b"lost+found").unwrap();
        let names: Vec<Vec<u8>> = fs
            .readdir(lf.ino, 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n != b"." && n != b"..")
            .collect();
        assert_eq!(names.len(), 1, "the file is in lost+found: {names:?}");
        let moved = fs.lookup(lf.ino, &names[0]).unwrap();
        assert_eq!(moved.ino, ino);
        assert_eq!(fs.read(ino, 0, 100).unwrap(), b"keep me");
    }

    #[test]
    fn unreadable_replay_records_and_mount_generations_are_removed() {
        let (_d, store, _) = store_with_file();
        let id = store.open_volume("v").unwrap().id;
        {
            let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
            let a = fs.answering(crate::fs::Unique(2));
            a.create_node(ME, ROOT_INO, b"d", libc::S_IFDIR | 0o755, 0, None)
                .unwrap();
        }
        let mut b = WriteBatch::default();
        b.put_cf(store.meta(), keys::replay_key(id, 7), b"junk");
        store.write(b).unwrap();
        let r = check_volume(&store, "v", true).unwrap();
        assert_eq!(r.problems, vec!["replay record 7: unreadable; removed"]);
        assert_eq!(store.get_meta(&keys::replay_key(id, 7)).unwrap(), None);
        assert!(store.get_meta(&keys::replay_key(id, 1)).unwrap().is_some());

        let mut b = WriteBatch::default();
        b.put_cf(store.meta(), keys::mount_gen_key(id), b"junk");
        store.write(b).unwrap();
        assert!(check_volume(&store, "v", true).unwrap().repaired);
        assert_eq!(store.get_meta(&keys::mount_gen_key(id)).unwrap(), None);
        assert_eq!(store.get_meta(&keys::replay_key(id, 1)).unwrap(), None);
        assert_eq!(
            check_volume(&store, "v", false).unwrap().problems,
            Vec::<String>::new()
        );
    }

    #[test]
    fn an_inode_number_counter_behind_an_inode_is_raised() {
        let (_d, store, f) = store_with_file();
        let id = store.open_volume("v").unwrap().id;
        let mut b = WriteBatch::default();
        b.put_cf(store.meta(), keys::next_ino_key(id), encode_counter(f));
        store.write(b).unwrap();
        let r = check_volume(&store, "v", false).unwrap();
        assert!(
            r.problems.iter().any(|p| p.contains("next inode number")),
            "{r:?}"
        );
        assert!(check_volume(&store, "v", true).unwrap().repaired);
        assert_eq!(store.next_ino(id).unwrap(), Some(f + 1));
        assert_eq!(
            check_volume(&store, "v", false).unwrap().problems,
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_volume_counted_by_the_old_rule_is_recounted_before_it_is_served() {
        let (_d, store, ino) = store_with_file();
        {
            let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
            fs.setxattr(ino, b"user.k", b"value", 0).unwrap();
        }
        let id = store.open_volume("v").unwrap().id;
        // What a volume of the old rule holds: accounting 0, usage of file data only.
        let mut cfg: crate::store::codec::VolumeConfig =
            serde_json::from_slice(&store.get_meta(&keys::config_key(id)).unwrap().unwrap())
                .unwrap();
        cfg.accounting = 0;
        let mut b = WriteBatch::default();
        b.put_cf(
            store.meta(),
            keys::config_key(id),
            serde_json::to_vec(&cfg).unwrap(),
        );
        let legacy = Usage {
            bytes: 5,
            inodes: 2,
            chunks: 1,
        };
        b.put_cf(store.meta(), keys::usage_key(id), legacy.encode());
        store.write(b).unwrap();
        assert!(!check_volume(&store, "v", false)
            .unwrap()
            .problems
            .is_empty());

        recount_if_needed(&store, "v").unwrap();
        assert!(!store.needs_recount("v").unwrap());
        assert_eq!(
            store.inspect_volume("v").unwrap().used_bytes as i64,
            check_volume(&store, "v", false).unwrap().stored.bytes,
            "the metadata-only recount agrees with fsck's full one"
        );
        let r = check_volume(&store, "v", false).unwrap();
        assert_eq!(r.problems, Vec::<String>::new());
        assert!(r.stored.bytes > 5, "metadata is charged: {:?}", r.stored);
        // Deleting everything brings the counters back to the root alone, never below.
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        fs.unlink(ROOT_INO, b"f").unwrap();
        assert_eq!(fs.volume().used_bytes(), 0);
        assert_eq!(fs.volume().inodes(), 1);
    }
}
