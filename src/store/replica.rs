//! Replicated volumes: one volume kept as N full copies in N stores, one per disk.
//!
//! Owns: creating a replicated volume in several stores, finding its copies and bringing
//! them level when it is opened (assembly), the state of each copy while the volume is
//! served, the commit lock that writes every transaction into every healthy copy in one
//! order, and reading past a copy that cannot read a value (failover, with the value
//! repaired in place).
//!
//! - Every copy has the same volume id in its store, so every key, and every sealed value
//!   (whose associated data is its key), is the same bytes in every copy: copying a
//!   volume is copying its key ranges.
//! - Each commit writes one more *write generation* ([`codec::write_gen_key`]) into every
//!   copy, in the same batch as its changes, under one lock: copies that took the same
//!   commits hold the same generation and the same keys; a copy that missed commits (its
//!   disk failed, was absent, or the process died between two copies' writes) holds a lower
//!   one. At assembly the copy with the highest generation is the newest, and every other
//!   copy (or a disk given that has none) is rewritten from it before the volume is
//!   served; a copy being rewritten holds generation 0 until its last batch, so one
//!   interrupted is rewritten again.
//! - A copy whose write or sync fails is marked failed: no longer written or read until
//!   the next assembly, which rewrites it if its disk works again. A write or fsync is
//!   acknowledged when every healthy copy has it, so it fails only when no copy took it.
//! - A read that fails on one copy (RocksDB's block and blob checksums, an I/O error) is
//!   served from another; a point read also writes the good value back into the copy that
//!   failed (under the commit lock, so no commit can come between). Counted and logged.
//!
//! - Each copy keeps a history: the epochs it went through, each with the generation it
//!   began at. A new epoch begins whenever the volume is served by fewer copies than it
//!   keeps, so copies served apart (each disk mounted alone, both written) end in
//!   epochs of their own and are refused at assembly instead of one silently losing its
//!   writes (see [`how_far`]).
//! - Limits change through one commit in every copy ([`OpenVolume::set_limits`]).
//! - `scrub` compares every key of every healthy copy, a window at a time under the
//!   commit lock, and rewrites what differs from the first copy that reads it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use rocksdb::{ColumnFamily, WriteBatch};
use serde::Serialize;

use super::codec::{self, ReplicaConfig, VolumeId};
use super::{
    Compression, Error, NewVolume, OpenVolume, Result, Store, Volume, VolumeInfo, WeakStore,
};

/// Where a key lives: the metadata, or the volume's chunks (column family by compression).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cf {
    Meta,
    Chunks,
}

impl Cf {
    pub(super) fn of(self, store: &Store, compression: Compression) -> &ColumnFamily {
        match self {
            Cf::Meta => store.meta(),
            Cf::Chunks => store.chunks_for(compression),
        }
    }
}

/// One copy of an open volume: its store and the store's record of the open volume.
#[derive(Debug)]
pub(super) struct Copy {
    pub(super) store: Store,
    pub(super) vol: Arc<Volume>,
}

/// The state of a copy, as `volume inspect` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    Healthy,
    /// A write or sync failed: not used again until the next assembly. (A value it
    /// cannot read is read from another copy and repaired; the copy stays in use.)
    Failed,
}

/// What `volume inspect` reports of a replicated volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReplicasInfo {
    /// Copies the volume keeps.
    pub wanted: u32,
    /// The copies being served (empty when the volume is not mounted).
    #[serde(default)]
    pub copies: Vec<CopyInfo>,
    /// Fewer healthy copies are served than the volume keeps.
    #[serde(default)]
    pub degraded: bool,
    /// Values read from another copy because one could not read them.
    #[serde(default)]
    pub failovers: u64,
    /// Of those, values written back into the copy that could not read them.
    #[serde(default)]
    pub repairs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CopyInfo {
    /// The store (data directory) holding the copy.
    pub disk: PathBuf,
    pub state: CopyState,
}

/// The shared state of an open replicated volume (see the module doc); every copy's
/// [`Volume`] points to it, so `inspect` through any of its stores reports it.
#[derive(Debug)]
pub struct ReplicaSet {
    wanted: u32,
    disks: Vec<PathBuf>,
    failed: Vec<AtomicBool>,
    /// The last write generation committed; held for the whole of a commit or repair.
    gen: Mutex<u64>,
    failovers: AtomicU64,
    repairs: AtomicU64,
    /// The copies, for a scrub asked through a store's control socket (weak: the open
    /// volume owns them).
    members: Vec<(WeakStore, Weak<Volume>)>,
}

/// What [`OpenVolume::scrub`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ScrubReport {
    pub volume: String,
    /// Healthy copies compared.
    pub copies: usize,
    /// Fewer healthy copies than the volume keeps (a copy missing or failed): those are
    /// not compared.
    #[serde(default)]
    pub degraded: bool,
    /// Keys compared (metadata and chunks), and their bytes, in the reference copy.
    pub keys: u64,
    pub bytes: u64,
    /// Values rewritten in a copy that held another value, none, or one it could not read.
    pub repaired: u64,
    /// Stretches of keys a copy could not read (each then compared key by key).
    pub unreadable: u64,
}

/// Most keys and bytes a scrub compares under the commit lock at once (writers wait that
/// long: a few milliseconds).
const SCRUB_WINDOW_KEYS: usize = 512;
const SCRUB_WINDOW_BYTES: usize = 1 << 20;

impl ReplicaSet {
    pub(super) fn healthy(&self, i: usize) -> bool {
        self.failed
            .get(i)
            .is_some_and(|f| !f.load(Ordering::Acquire))
    }

    fn healthy_count(&self) -> usize {
        (0..self.failed.len()).filter(|i| self.healthy(*i)).count()
    }

    /// Marks copy `i` failed after `error` (logged once).
    pub(super) fn fail(&self, i: usize, what: &str, error: &Error) {
        if let Some(f) = self.failed.get(i) {
            if !f.swap(true, Ordering::AcqRel) {
                tracing::error!(disk = %self.disk(i).display(), %error, what,
                    healthy = self.healthy_count(), wanted = self.wanted,
                    "a copy of a replicated volume failed: serving from the others (degraded until it is assembled again)");
            }
        }
    }

    fn disk(&self, i: usize) -> &Path {
        self.disks.get(i).map_or(Path::new("?"), |p| p.as_path())
    }

    /// The first healthy copy (0 if none is).
    pub(super) fn first_healthy(&self) -> usize {
        (0..self.failed.len())
            .find(|i| self.healthy(*i))
            .unwrap_or(0)
    }

    /// The healthy copy whose turn a read with `hint` is (the same hint, the same copy
    /// while the same copies are healthy).
    pub(super) fn read_copy(&self, hint: u64) -> usize {
        let n = self.healthy_count();
        if n == 0 {
            return 0;
        }
        let k = (hint % n as u64) as usize;
        (0..self.failed.len())
            .filter(|i| self.healthy(*i))
            .nth(k)
            .unwrap_or(0)
    }

    pub fn info(&self) -> ReplicasInfo {
        let copies: Vec<CopyInfo> = (0..self.failed.len())
            .map(|i| CopyInfo {
                disk: self.disk(i).to_path_buf(),
                state: if self.healthy(i) {
                    CopyState::Healthy
                } else {
                    CopyState::Failed
                },
            })
            .collect();
        ReplicasInfo {
            wanted: self.wanted,
            degraded: self.healthy_count() < self.wanted as usize,
            copies,
            failovers: self.failovers.load(Ordering::Relaxed),
            repairs: self.repairs.load(Ordering::Relaxed),
        }
    }

    /// Writes one transaction's batches (one per copy, in copy order) into every healthy
    /// copy with the next write generation. `Ok` when at least one copy took it; a copy
    /// whose write fails is marked failed, unless no copy had taken the batch yet and the
    /// failure is a full disk (then nothing differs between copies and the caller gets
    /// ENOSPC).
    pub(super) fn write(
        &self,
        copies: &[Copy],
        vid: VolumeId,
        batches: Vec<WriteBatch>,
    ) -> Result<()> {
        let mut gen = self.gen.lock();
        let next = gen
            .checked_add(1)
            .ok_or_else(|| Error::Corrupt("write generation exhausted".into()))?;
        let mut results: Vec<(usize, Result<()>)> = Vec::new();
        for (i, (c, mut b)) in copies.iter().zip(batches).enumerate() {
            if !self.healthy(i) {
                continue;
            }
            b.put_cf(
                c.store.meta(),
                codec::write_gen_key(vid),
                codec::encode_counter(next),
            );
            match c.store.write(b) {
                // No copy has it yet: nothing differs, the caller gets ENOSPC.
                Err(e) if !results.iter().any(|(_, r)| r.is_ok()) && e.is_out_of_space() => {
                    return Err(e)
                }
                r => results.push((i, r)),
            }
        }
        self.settle(results, "write")?;
        *gen = next;
        Ok(())
    }

    /// At close: when a copy failed, one more commit (nothing but the write generation)
    /// into the healthy ones, made durable, so that the failed copy is behind them at the
    /// next assembly and rewritten, even if nothing was written after it failed.
    pub(super) fn leave_failed_behind(&self, copies: &[Copy]) {
        let healthy = self.healthy_count();
        if healthy == 0 || healthy == copies.len() {
            return;
        }
        let batches = copies.iter().map(|_| WriteBatch::default()).collect();
        let done = self
            .write(copies, copies[0].vol.id, batches)
            .and_then(|()| self.sync(copies));
        if let Err(e) = done {
            tracing::error!(error = %e, "cannot mark the failed copy as behind: the next assembly may serve it as level; scrub then");
        }
    }

    fn none_healthy(&self) -> Error {
        Error::Corrupt(format!(
            "no healthy copy of the volume is left (of {} on {:?})",
            self.wanted, self.disks
        ))
    }

    /// Makes every healthy copy's committed batches durable, the copies' WAL syncs at once
    /// (each disk's own wait, not the sum); a copy whose sync fails is marked failed.
    /// Fails only when no copy synced.
    pub(super) fn sync(&self, copies: &[Copy]) -> Result<()> {
        let healthy: Vec<usize> = (0..copies.len()).filter(|i| self.healthy(*i)).collect();
        let Some((&first, rest)) = healthy.split_first() else {
            return Err(self.none_healthy());
        };
        let results: Vec<(usize, Result<()>)> = std::thread::scope(|scope| {
            let others: Vec<_> = rest
                .iter()
                .map(|&i| (i, scope.spawn(move || copies[i].store.sync())))
                .collect();
            let mut results = vec![(first, copies[first].store.sync())];
            for (i, h) in others {
                let r = h.join().unwrap_or_else(|_| {
                    Err(Error::Corrupt("a copy's sync thread panicked".into()))
                });
                results.push((i, r));
            }
            results
        });
        self.settle(results, "sync")
    }

    /// The outcome of doing `what` in each healthy copy (`results`, by copy): copies that
    /// failed are marked failed; an error only when no copy succeeded.
    fn settle(&self, results: Vec<(usize, Result<()>)>, what: &str) -> Result<()> {
        let (mut done, mut first_err) = (0usize, None);
        for (i, r) in results {
            match r {
                Ok(()) => done += 1,
                Err(e) => {
                    self.fail(i, what, &e);
                    first_err.get_or_insert(e);
                }
            }
        }
        if done == 0 {
            return Err(first_err.unwrap_or_else(|| self.none_healthy()));
        }
        Ok(())
    }

    /// The value under `key` read from a copy other than `bad`, which failed with `err`;
    /// the value is written back into `bad` (see the module doc). `err` again when no
    /// other copy reads it.
    pub(super) fn failover_get(
        &self,
        copies: &[Copy],
        bad: usize,
        (cf, compression): (Cf, Compression),
        key: &[u8],
        err: Error,
    ) -> Result<Option<Vec<u8>>> {
        if !is_media_error(&err) {
            return Err(err);
        }
        for (good, c) in copies.iter().enumerate() {
            if good == bad || !self.healthy(good) {
                continue;
            }
            let Ok(value) = c.store.get_raw(cf.of(&c.store, compression), key) else {
                continue;
            };
            self.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(disk = %self.disk(bad).display(), from = %self.disk(good).display(),
                error = %err, "a copy could not read a value: read from another copy");
            self.repair(copies, (bad, good), (cf, compression), key);
            return Ok(value);
        }
        Err(err)
    }

    /// Counts a scan that went on from another copy after copy `bad` failed with `err`.
    pub(super) fn scan_failover(&self, bad: usize, err: &Error) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(disk = %self.disk(bad).display(), error = %err,
            "a copy could not read part of a scan: went on from another copy");
    }

    /// Writes the value of `key` in copy `good` into copy `bad`, under the commit lock
    /// (so it is the value every copy holds now).
    fn repair(
        &self,
        copies: &[Copy],
        (bad, good): (usize, usize),
        (cf, c): (Cf, Compression),
        key: &[u8],
    ) {
        let _gen = self.gen.lock();
        if !self.healthy(bad) {
            return;
        }
        let (from, to) = (&copies[good].store, &copies[bad].store);
        let Ok(value) = from.get_raw(cf.of(from, c), key) else {
            return;
        };
        let mut b = WriteBatch::default();
        match value {
            Some(v) => b.put_cf(cf.of(to, c), key, v),
            None => b.delete_cf(cf.of(to, c), key),
        }
        match to.write(b) {
            Ok(()) => {
                self.repairs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(disk = %self.disk(bad).display(), "repaired a value from another copy");
            }
            Err(e) => self.fail(bad, "repair", &e),
        }
    }
}

impl ReplicaSet {
    /// The copies of the open volume, while it is open.
    fn copies(&self) -> Option<Vec<Copy>> {
        self.members
            .iter()
            .map(|(s, v)| {
                Some(Copy {
                    store: s.upgrade()?,
                    vol: v.upgrade()?,
                })
            })
            .collect()
    }

    /// Compares every key of the volume in every healthy copy with the first healthy copy
    /// that reads it, window by window under the commit lock, and rewrites what differs or
    /// cannot be read; `progress` sees the report after each window.
    pub(super) fn scrub(
        &self,
        copies: &[Copy],
        progress: &mut dyn FnMut(&ScrubReport),
    ) -> Result<ScrubReport> {
        let vol = &copies[0].vol;
        let mut report = ScrubReport {
            volume: vol.name.clone(),
            copies: self.healthy_count(),
            degraded: self.healthy_count() < self.wanted as usize,
            ..ScrubReport::default()
        };
        let (lo, hi) = (codec::volume_start(vol.id), codec::volume_end(vol.id));
        for cf in [Cf::Meta, Cf::Chunks] {
            let mut start = lo.clone();
            loop {
                let next =
                    self.scrub_window(copies, (cf, vol.compression), &start, &hi, &mut report)?;
                progress(&report);
                match next {
                    Some(n) => start = n,
                    None => break,
                }
            }
        }
        Ok(report)
    }

    /// One window of [`ReplicaSet::scrub`], from `start`: the start of the next one, `None`
    /// at the end of `[start, hi)`.
    fn scrub_window(
        &self,
        copies: &[Copy],
        (cf, c): (Cf, Compression),
        start: &[u8],
        hi: &[u8],
        report: &mut ScrubReport,
    ) -> Result<Option<Vec<u8>>> {
        let _gen = self.gen.lock();
        let healthy: Vec<usize> = (0..copies.len()).filter(|i| self.healthy(*i)).collect();
        let mut reference = None;
        for &i in &healthy {
            let s = &copies[i].store;
            match s.read_window(
                cf.of(s, c),
                start,
                hi,
                (SCRUB_WINDOW_KEYS, SCRUB_WINDOW_BYTES),
            ) {
                Ok(w) => {
                    reference = Some((i, w));
                    break;
                }
                Err(e) if is_media_error(&e) => {
                    report.unreadable += 1;
                    tracing::warn!(disk = %self.disk(i).display(), error = %e, "scrub: a copy cannot read a stretch of keys");
                }
                Err(e) => return Err(e),
            }
        }
        let Some((r, (window, next))) = reference else {
            return Err(Error::Corrupt(format!(
                "scrub: no copy of volume {:?} reads the keys from {}",
                copies[0].vol.name,
                codec::to_hex(start)
            )));
        };
        // The other copies' keys of the same stretch: up to the reference's last one.
        let end = next.clone().unwrap_or_else(|| hi.to_vec());
        for &j in healthy.iter().filter(|j| **j != r) {
            let s = &copies[j].store;
            let fixes = match s.read_window(cf.of(s, c), start, &end, (usize::MAX, usize::MAX)) {
                Ok((theirs, _)) => differences(&window, &theirs),
                Err(e) if is_media_error(&e) => {
                    report.unreadable += 1;
                    // Key by key: what reads differently (or not at all) is rewritten.
                    window
                        .iter()
                        .filter(
                            |(k, v)| !matches!(s.get_raw(cf.of(s, c), k), Ok(Some(x)) if x == *v),
                        )
                        .map(|(k, v)| (k.clone(), Some(v.clone())))
                        .collect()
                }
                Err(e) => return Err(e),
            };
            if fixes.is_empty() {
                continue;
            }
            let mut b = WriteBatch::default();
            for (k, v) in &fixes {
                match v {
                    Some(v) => b.put_cf(cf.of(s, c), k, v),
                    None => b.delete_cf(cf.of(s, c), k),
                }
            }
            match s.write(b) {
                Ok(()) => {
                    report.repaired += fixes.len() as u64;
                    self.repairs
                        .fetch_add(fixes.len() as u64, Ordering::Relaxed);
                    tracing::warn!(disk = %self.disk(j).display(), values = fixes.len(), "scrub: rewrote values that differed from another copy");
                }
                Err(e) => self.fail(j, "scrub repair", &e),
            }
        }
        report.keys += window.len() as u64;
        report.bytes += window
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum::<u64>();
        Ok(next)
    }
}

/// The changes that make sorted key-value list `theirs` equal to `ours`: `Some(value)` to
/// put, `None` to delete.
fn differences(
    ours: &[(Vec<u8>, Vec<u8>)],
    theirs: &[(Vec<u8>, Vec<u8>)],
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let (mut a, mut b) = (ours.iter().peekable(), theirs.iter().peekable());
    let mut out = Vec::new();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((k, v)), None) => {
                out.push((k.clone(), Some(v.clone())));
                a.next();
            }
            (None, Some((k, _))) => {
                out.push((k.clone(), None));
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((ka.clone(), Some(va.clone())));
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((kb.clone(), None));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        out.push((ka.clone(), Some(va.clone())));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// Scrubs replicated volume `name`, open in this process through `store` (see
/// [`OpenVolume::scrub`]): for a scrub asked through a control socket.
pub fn scrub_open(
    store: &Store,
    name: &str,
    progress: &mut dyn FnMut(&ScrubReport),
) -> Result<ScrubReport> {
    let vol = store.inner.open_volumes.lock().get(name).cloned();
    let Some(vol) = vol else {
        return Err(Error::Unsupported(format!(
            "volume {name:?} is not mounted by the process that owns {}: scrub it with every --data of its copies",
            store.dir().display()
        )));
    };
    let Some(set) = vol.replica.get().cloned() else {
        return Err(Error::Unsupported(format!(
            "volume {name:?} keeps one copy: there is nothing to compare (fsck checks it)"
        )));
    };
    let copies = set
        .copies()
        .ok_or_else(|| Error::VolumeNotFound(name.to_string()))?;
    set.scrub(&copies, progress)
}

/// Errors of a copy's disk or files (worth reading another copy for), as opposed to
/// missing keys, malformed requests or refusals.
pub(super) fn is_media_error(e: &Error) -> bool {
    matches!(e, Error::Db(_) | Error::Corrupt(_) | Error::Io { .. }) && !e.is_out_of_space()
}

/// Creates volume `name` with `copies` copies, one in each of the first `copies` stores.
pub fn create_replicated(
    stores: &[Store],
    name: &str,
    new: &NewVolume,
    copies: u32,
) -> Result<VolumeInfo> {
    super::validate_volume_name(name)?;
    let n = copies as usize;
    if copies < 2 || stores.len() < n {
        return Err(Error::Unsupported(format!(
            "volume {name:?}: {copies} copies need {copies} stores on distinct disks ({} given)",
            stores.len()
        )));
    }
    let stores = &stores[..n];
    same_chunk_size(stores)?;
    for s in stores {
        if s.volume_id(name)?.is_some() {
            return Err(Error::VolumeExists(name.to_string()));
        }
    }
    warn_shared_filesystems(stores);
    // One id free in every store (each store's next id is above all it has used).
    let mut id = 1;
    for s in stores {
        id = id.max(s.next_volume_id()?);
    }
    let replicas = ReplicaConfig {
        copies,
        set: new_set_id()?,
    };
    stores[0].create_volume_as(name, new, id, Some(replicas))?;
    for s in &stores[1..] {
        copy_volume(&stores[0], s, name, id)?;
        if let Some(key) = &new.encryption {
            s.inner.keys.lock().insert(name.to_string(), key.clone());
        }
    }
    stores[0].inspect_volume(name)
}

/// Copies are key for key the same: their stores must cut files into chunks alike.
fn same_chunk_size(stores: &[Store]) -> Result<()> {
    let first = stores.first().map(Store::chunk_size);
    match stores.iter().find(|s| Some(s.chunk_size()) != first) {
        Some(other) => Err(Error::Unsupported(format!(
            "{} has chunks of {} bytes and {} of {}: copies of a volume need stores of one chunk size",
            stores[0].dir().display(),
            stores[0].chunk_size(),
            other.dir().display(),
            other.chunk_size()
        ))),
        None => Ok(()),
    }
}

fn new_set_id() -> Result<String> {
    Ok(codec::to_hex(&super::crypt::random_u64()?.to_be_bytes()))
}

/// Copies that share a filesystem do not survive the loss of its disk: said in the log
/// (allowed, for trying it out on one disk).
fn warn_shared_filesystems(stores: &[Store]) {
    use std::os::unix::fs::MetadataExt;
    let devs: Vec<Option<u64>> = stores
        .iter()
        .map(|s| std::fs::metadata(s.dir()).ok().map(|m| m.dev()))
        .collect();
    for (i, d) in devs.iter().enumerate() {
        if d.is_some() && devs[..i].contains(d) {
            tracing::warn!(disk = %stores[i].dir().display(),
                "two copies of a replicated volume on one filesystem: losing that disk loses both");
        }
    }
}

/// Rewrites the copy of volume `name` (id `vid`) in `to` from the one in `from`: every key
/// of the volume's range in the metadata and its chunks, and the name; the write
/// generation last (0 until then, so an interrupted copy is behind every complete one).
fn copy_volume(from: &Store, to: &Store, name: &str, vid: VolumeId) -> Result<()> {
    let _g = to.inner.registry.lock();
    for other in to.volume_names()? {
        if other != name && to.volume_id(&other)? == Some(vid) {
            return Err(Error::Unsupported(format!(
                "{} holds volume {other:?} under the id of {name:?} ({vid}): it cannot take a copy of it",
                to.dir().display()
            )));
        }
    }
    if to.volume_id(name)?.is_some_and(|id| id != vid) {
        return Err(Error::Unsupported(format!(
            "{} holds another volume named {name:?}: it cannot take a copy of this one",
            to.dir().display()
        )));
    }
    to.require_format(super::FORMAT_REPLICAS)?;
    let cfg = from.config(vid)?;
    let (lo, hi) = (codec::volume_start(vid), codec::volume_end(vid));
    let gen_key = codec::write_gen_key(vid);
    let mut b = WriteBatch::default();
    for cf in to.all_cfs() {
        b.delete_range_cf(cf, &lo, &hi);
    }
    b.put_cf(
        to.meta(),
        codec::volume_name_key(name),
        codec::encode_volume_id(vid),
    );
    let next = to.next_volume_id()?.max(vid.saturating_add(1));
    b.put_cf(
        to.meta(),
        codec::next_volume_id_key(),
        codec::encode_volume_id(next),
    );
    b.put_cf(to.meta(), &gen_key, codec::encode_counter(0));
    to.write(b)?;
    const BATCH_BYTES: usize = 4 << 20;
    for cf in [Cf::Meta, Cf::Chunks] {
        let mut b = WriteBatch::default();
        from.scan(cf.of(from, cfg.compression), &lo, &hi, |k, v| {
            if k != gen_key.as_slice() {
                b.put_cf(cf.of(to, cfg.compression), k, v);
            }
            if b.size_in_bytes() >= BATCH_BYTES {
                to.write(std::mem::take(&mut b))?;
            }
            Ok(true)
        })?;
        to.write(b)?;
    }
    let mut b = WriteBatch::default();
    b.put_cf(
        to.meta(),
        &gen_key,
        codec::encode_counter(from.write_gen(vid)?),
    );
    to.write(b)?;
    to.sync()
}

/// What store `store` (number `i`) holds of volume `name` (id `vid`) at assembly:
/// - a replicated copy (its configuration, a generation above 0 and its history);
/// - a volume of one copy (no generation);
/// - an incomplete copy, whose rewrite stopped half-way (generation 0): rewritten;
/// - an error otherwise (a configuration that cannot be read may not be a copy of this
///   volume at all: the store is left out, never rewritten).
fn inspect_copy(store: &Store, i: usize, vid: VolumeId, name: &str) -> Result<Found> {
    let gen = store.write_gen_opt(vid)?;
    let found = |replicas, gen, history, complete| Found {
        store: i,
        vid,
        replicas,
        gen,
        history,
        complete,
    };
    match (store.config(vid), gen) {
        (_, Some(0)) => Ok(found(None, 0, Vec::new(), false)),
        (Ok(cfg), Some(gen)) if cfg.replicas.is_some() => {
            let mut history = store.replica_history(vid)?;
            if history.is_empty() {
                // Made before copies kept histories: one epoch from the start.
                history.push((0, 1));
            }
            Ok(found(cfg.replicas, gen, history, true))
        }
        (Ok(cfg), None) if cfg.replicas.is_none() => Ok(found(None, 0, Vec::new(), true)),
        (Ok(_), _) => Err(Error::Corrupt(format!(
            "{}: volume {name:?} has a write generation and no copies, or copies and no write generation",
            store.dir().display()
        ))),
        (Err(e), _) => Err(Error::Corrupt(format!(
            "{}: the configuration of volume {name:?} cannot be read ({e})",
            store.dir().display()
        ))),
    }
}

/// What one store holds of a replicated volume at assembly.
struct Found {
    store: usize,
    vid: VolumeId,
    replicas: Option<ReplicaConfig>,
    gen: u64,
    /// The copy's history: (epoch, first generation) of every stretch of commits made by
    /// one set of copies (see [`how_far`]).
    history: Vec<(u64, u64)>,
    /// Its configuration is there (not a rewrite stopped half-way).
    complete: bool,
}

/// How copy `x` stands to copy `newest`: `Some(true)` level (the same commits),
/// `Some(false)` behind (a prefix of its commits), `None` apart (commits the other does
/// not have: written while the other was away).
///
/// A copy's history lists the epochs it went through, each with the generation it began
/// at; a new epoch begins whenever the volume is served by fewer copies than it keeps, so
/// two copies each served alone after they parted end in different epochs. `x` is a
/// prefix of `newest` when its last epoch is in `newest`'s history and `x` stopped before
/// `newest` left that epoch.
fn how_far(x: &Found, newest: &Found) -> Option<bool> {
    // An epoch that begins after a copy's last commit holds none of its commits (begun,
    // then nothing written): not where the copy stopped.
    let (epoch, _) = x.history.iter().rev().find(|(_, start)| *start <= x.gen)?;
    let at = newest.history.iter().position(|(e, _)| e == epoch)?;
    let left_at = newest
        .history
        .get(at + 1)
        .map_or(u64::MAX, |(_, start)| *start);
    (x.gen < left_at && x.gen <= newest.gen).then_some(x.gen == newest.gen)
}

/// At most this many epochs are kept in a copy's history (the oldest go): a copy last
/// served more than that many degraded mounts ago counts as apart.
const HISTORY_LEN: usize = 64;

/// Opens volume `name` from its copies in `stores` (see the module doc): every store given
/// that lacks a copy, or holds one behind the newest, is rewritten from the newest first,
/// up to the copies the volume keeps. A store whose copy cannot be read or rewritten is
/// left out (served degraded); copies written apart are refused. Served by fewer copies
/// than it keeps, the volume begins a new epoch. One store and a volume of one copy: the
/// plain [`Store::open_volume`].
pub fn open_replicated(stores: &[Store], name: &str) -> Result<OpenVolume> {
    let (found, unusable) = survey(stores, name)?;
    // Of copies at one generation, the one with the longest history (a new epoch may have
    // reached some copies only, before a crash): the others are prefixes of it.
    let newest = found
        .iter()
        .filter(|f| f.complete)
        .max_by_key(|f| (f.gen, f.history.len()));
    let Some(newest) = newest else {
        return Err(Error::Corrupt(format!(
            "no copy of volume {name:?} is complete (each was being rewritten)"
        )));
    };
    let Some(rc) = newest.replicas.clone() else {
        if stores.len() == 1 {
            return stores[0].open_volume(name);
        }
        return Err(Error::Unsupported(format!(
            "volume {name:?} keeps one copy, in {}: it is served from that store alone",
            stores[newest.store].dir().display()
        )));
    };
    if rc.copies == 0 {
        return Err(Error::Corrupt(format!("volume {name:?} keeps 0 copies")));
    }
    check_copies(stores, name, &found, newest, &rc)?;
    let (vid, gen, from) = (newest.vid, newest.gen, newest.store);
    // The copies to serve: those present first (newest first), then stores without one.
    let mut order: Vec<usize> = found.iter().map(|f| f.store).collect();
    order.sort_by_key(|i| std::cmp::Reverse(found.iter().find(|f| f.store == *i).map(|f| f.gen)));
    order.extend(
        (0..stores.len()).filter(|i| !found.iter().any(|f| f.store == *i) && !unusable.contains(i)),
    );
    order.truncate(rc.copies as usize);
    if stores.len() > rc.copies as usize {
        tracing::warn!(
            volume = name,
            copies = rc.copies,
            given = stores.len(),
            "more stores given than the volume keeps copies: the extra ones are not used"
        );
    }
    let (mut serve, mut rewritten) = (Vec::new(), false);
    for i in order {
        let level = found
            .iter()
            .find(|f| f.store == i)
            .is_some_and(|f| f.gen == gen && f.complete);
        if level {
            serve.push(i);
        } else if rewrite(stores, (from, i), name, vid) {
            serve.push(i);
            rewritten = true;
        }
    }
    // A new epoch whenever the copies served are not the ones that made the newest's
    // last commits: fewer than the volume keeps, or one given its copy just now (a copy
    // away meanwhile must not count as behind this set's later commits).
    let new_epoch = rewritten || serve.len() < rc.copies as usize;
    settle_history(stores, &serve, &newest.history, new_epoch, (vid, gen))?;
    open_copies(stores, &serve, name, rc.copies, gen)
}

/// What each store holds of `name`, and the stores that cannot be read (left out).
fn survey(stores: &[Store], name: &str) -> Result<(Vec<Found>, Vec<usize>)> {
    let (mut found, mut unusable) = (Vec::new(), Vec::new());
    for (i, s) in stores.iter().enumerate() {
        let copy = s
            .volume_id(name)
            .and_then(|vid| vid.map(|vid| inspect_copy(s, i, vid, name)).transpose());
        match copy {
            Ok(Some(f)) => found.push(f),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(volume = name, disk = %s.dir().display(), error = %e,
                    "cannot read the copy in this store: leaving the store out");
                unusable.push(i);
            }
        }
    }
    if found.is_empty() {
        return Err(match unusable.is_empty() {
            true => Error::VolumeNotFound(name.to_string()),
            false => Error::Corrupt(format!("no store given can read volume {name:?}")),
        });
    }
    Ok((found, unusable))
}

/// Refuses copies that are not of this volume's set, and copies written apart from the
/// newest (each served without the other: merging them would lose one side's writes).
fn check_copies(
    stores: &[Store],
    name: &str,
    found: &[Found],
    newest: &Found,
    rc: &ReplicaConfig,
) -> Result<()> {
    let dir = |f: &Found| stores[f.store].dir().display().to_string();
    for f in found.iter().filter(|f| f.complete) {
        if f.vid != newest.vid || f.replicas.as_ref().map(|r| &r.set) != Some(&rc.set) {
            return Err(Error::Unsupported(format!(
                "{} holds a volume named {name:?} that is not a copy of the one in {}",
                dir(f),
                dir(newest)
            )));
        }
        if how_far(f, newest).is_none() {
            return Err(Error::Unsupported(format!(
                "the copies of volume {name:?} in {} and {} were written apart (each served while the other was away): one's changes would be lost. Choose the copy to keep: delete the other (fusevol volume delete --data DIR {name}) and mount with both directories to copy it again",
                dir(f),
                dir(newest)
            )));
        }
    }
    Ok(())
}

/// Rewrites the copy in `stores[to]` from `stores[from]` (logged); false when it cannot be
/// (the volume is then served without it).
fn rewrite(stores: &[Store], (from, to): (usize, usize), name: &str, vid: VolumeId) -> bool {
    tracing::warn!(volume = name, disk = %stores[to].dir().display(),
        from = %stores[from].dir().display(), "copy missing or behind: rewriting it from the newest");
    let copied = same_chunk_size(&[stores[from].clone(), stores[to].clone()])
        .and_then(|()| copy_volume(&stores[from], &stores[to], name, vid));
    if let Err(e) = copied {
        tracing::error!(volume = name, disk = %stores[to].dir().display(), error = %e,
            "cannot rewrite the copy: serving without it (degraded)");
        return false;
    }
    // An encrypted volume's key, for opening the new copy.
    let key = stores[from].inner.keys.lock().get(name).cloned();
    if let Some(key) = key {
        stores[to].inner.keys.lock().insert(name.to_string(), key);
    }
    true
}

/// Gives every copy served (`serve`) the newest copy's history, and, when the volume is
/// served by fewer copies than it keeps (`new_epoch`), a new epoch from generation
/// `gen + 1` on (see [`how_far`]). Level copies whose histories differ (a new epoch
/// written into some of them before a crash) then agree again.
fn settle_history(
    stores: &[Store],
    serve: &[usize],
    newest: &[(u64, u64)],
    new_epoch: bool,
    (vid, gen): (VolumeId, u64),
) -> Result<()> {
    let mut history = newest.to_vec();
    if new_epoch {
        history.push((super::crypt::random_u64()?, gen.saturating_add(1)));
    }
    let history = &history[history.len().saturating_sub(HISTORY_LEN)..];
    let value = codec::encode_history(history);
    for &i in serve {
        let s = &stores[i];
        if s.replica_history(vid)? == history {
            continue;
        }
        let mut b = WriteBatch::default();
        b.put_cf(s.meta(), codec::history_key(vid), &value);
        s.write(b)?;
        s.sync()?;
    }
    Ok(())
}

/// Opens the level copies `serve` of `name` in `stores` as one volume.
fn open_copies(
    stores: &[Store],
    serve: &[usize],
    name: &str,
    wanted: u32,
    gen: u64,
) -> Result<OpenVolume> {
    let mut ov = OpenVolume {
        copies: Vec::new(),
        set: None,
    };
    for &i in serve {
        ov.take_copies(stores[i].open_volume_copy(name)?);
    }
    let copies = &ov.copies;
    let set = Arc::new(ReplicaSet {
        members: copies
            .iter()
            .map(|c| (c.store.downgrade(), Arc::downgrade(&c.vol)))
            .collect(),
        wanted,
        disks: copies.iter().map(|c| c.store.dir().to_path_buf()).collect(),
        failed: copies.iter().map(|_| AtomicBool::new(false)).collect(),
        gen: Mutex::new(gen),
        failovers: AtomicU64::new(0),
        repairs: AtomicU64::new(0),
    });
    for c in copies {
        let _ = c.vol.replica.set(set.clone());
    }
    if copies.len() < wanted as usize {
        tracing::warn!(
            volume = name,
            copies = copies.len(),
            wanted,
            "replicated volume served degraded"
        );
    }
    ov.set = Some(set);
    Ok(ov)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::store::codec::{InodeRecord, Kind, Timestamp};
    use crate::store::{MasterKey, StoreOptions, VolumeView, ROOT_INO};

    fn stores(root: &Path, names: &[&str]) -> Vec<Store> {
        names
            .iter()
            .map(|n| Store::open_or_create(&root.join(n), &StoreOptions::default()).unwrap())
            .collect()
    }

    fn chunk_bytes(idx: u64) -> Vec<u8> {
        let mut x = idx.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    const INO: u64 = 5;

    /// A file of `n` chunks of `chunk_bytes`, committed through `vol`.
    fn write_file(vol: &OpenVolume, n: u64) {
        let mut t = vol.txn();
        t.put_inode(
            INO,
            &InodeRecord::new(Kind::File, 0o644, 0, 0, Timestamp::now()),
        );
        for idx in 0..n {
            t.put_chunk(INO, idx, &chunk_bytes(idx));
            t.put_chunk_len(INO, idx, 64 * 1024);
        }
        t.usage.bytes = (n * 64 * 1024) as i64;
        t.commit().unwrap();
    }

    /// Every key and value of volume `name` in `store`, both column families.
    fn contents(store: &Store, name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let vid = store.existing_id(name).unwrap();
        let (lo, hi) = (codec::volume_start(vid), codec::volume_end(vid));
        let mut out = Vec::new();
        for cf in store.all_cfs() {
            store
                .scan(cf, &lo, &hi, |k, v| {
                    out.push((k.to_vec(), v.to_vec()));
                    Ok(true)
                })
                .unwrap();
        }
        out
    }

    fn flush(store: &Store) {
        for cf in store.all_cfs() {
            store.db().flush_cf(cf).unwrap();
        }
    }

    #[test]
    fn every_commit_is_in_every_copy_with_the_same_keys() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        let vol = open_replicated(&s, "v").unwrap();
        write_file(&vol, 3);
        let info = vol.replicas().unwrap();
        assert_eq!(
            (info.wanted, info.degraded, info.copies.len()),
            (2, false, 2)
        );
        assert_eq!(vol.used_bytes(), 3 * 64 * 1024);
        drop(vol);
        let (a, b) = (contents(&s[0], "v"), contents(&s[1], "v"));
        assert!(a.len() > 6, "{}", a.len());
        assert_eq!(a, b);
        // Both stores report the copy, and its counters, alike.
        let (ia, ib) = (
            s[0].inspect_volume("v").unwrap(),
            s[1].inspect_volume("v").unwrap(),
        );
        assert_eq!(
            (ia.used_bytes, ia.replicas.unwrap().wanted),
            (3 * 64 * 1024, 2)
        );
        assert_eq!(ib.used_bytes, 3 * 64 * 1024);
    }

    #[test]
    fn a_chunk_one_copy_cannot_read_is_read_from_the_other_and_repaired_there() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        let vol = open_replicated(&s, "v").unwrap();
        write_file(&vol, 4);
        drop(vol);
        s.iter().for_each(flush);
        drop(s);
        // Damage copy a's chunk data on disk: one byte in the middle of each blob file.
        let mut damaged = 0;
        for e in std::fs::read_dir(d.path().join("a/db")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "blob") {
                let mut bytes = std::fs::read(&p).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x55;
                std::fs::write(&p, bytes).unwrap();
                damaged += 1;
            }
        }
        assert!(damaged > 0, "no blob file to damage");
        let s = stores(d.path(), &["a", "b"]);
        {
            // Copy a alone cannot read the damaged chunk (RocksDB's blob checksum).
            let a = s[0].open_volume_copy("v").unwrap();
            let unreadable = (0..4).filter(|i| a.view().chunk(INO, *i).is_err()).count();
            assert_eq!(unreadable, 1);
        }
        let vol = open_replicated(&s, "v").unwrap();
        let view = vol.view();
        for idx in 0..4 {
            assert_eq!(
                view.chunk(INO, idx).unwrap(),
                chunk_bytes(idx),
                "chunk {idx}"
            );
        }
        let info = vol.replicas().unwrap();
        assert_eq!((info.failovers, info.repairs, info.degraded), (1, 1, false));
        drop(vol);
        // The repair is in copy a itself.
        let a = s[0].open_volume_copy("v").unwrap();
        for idx in 0..4 {
            assert_eq!(
                a.view().chunk(INO, idx).unwrap(),
                chunk_bytes(idx),
                "chunk {idx}"
            );
        }
    }

    #[test]
    fn a_file_read_fails_over_from_a_snapshot_of_a_damaged_copy() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        let vol = open_replicated(&s, "v").unwrap();
        write_file(&vol, 4);
        drop(vol);
        s.iter().for_each(flush);
        drop(s);
        for e in std::fs::read_dir(d.path().join("b/db")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "blob") {
                let mut bytes = std::fs::read(&p).unwrap();
                let at = bytes.len() / 3;
                bytes[at] ^= 0xff;
                std::fs::write(&p, bytes).unwrap();
            }
        }
        let s = stores(d.path(), &["a", "b"]);
        let vol = open_replicated(&s, "v").unwrap();
        // Reads of every stretch of the file, from whichever copy's turn it is, through
        // both the one-chunk and the several-chunk paths.
        for snap in [
            vol.view().snapshot(),
            VolumeView::new(&vol.copies, vol.set.as_deref(), 1).snapshot(),
        ] {
            let mut got = Vec::new();
            snap.chunks(INO, 0, 3, |idx, b| got.push((idx, b.to_vec())))
                .unwrap();
            let want: Vec<_> = (0..4).map(|i| (i, chunk_bytes(i))).collect();
            assert_eq!(got, want);
            for idx in 0..4 {
                let mut one = Vec::new();
                snap.chunks(INO, idx, idx, |_, b| one.extend_from_slice(b))
                    .unwrap();
                assert_eq!(one, chunk_bytes(idx));
            }
        }
        assert!(vol.replicas().unwrap().failovers >= 1);
    }

    #[test]
    fn a_copy_missing_or_behind_is_rewritten_from_the_newest_at_assembly() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        write_file(&open_replicated(&s, "v").unwrap(), 2);
        // b's disk is away: a alone is served, degraded, and takes more writes.
        let alone = open_replicated(&s[..1], "v").unwrap();
        let info = alone.replicas().unwrap();
        assert_eq!((info.copies.len(), info.degraded), (1, true));
        let mut t = alone.txn();
        t.put_xattr(ROOT_INO, b"user.later", b"only in a");
        t.commit().unwrap();
        drop(alone);
        assert_ne!(contents(&s[0], "v"), contents(&s[1], "v"));
        // Both again: b is behind and is rewritten from a.
        let vol = open_replicated(&s, "v").unwrap();
        assert!(!vol.replicas().unwrap().degraded);
        assert_eq!(
            vol.view()
                .xattr(ROOT_INO, b"user.later")
                .unwrap()
                .as_deref(),
            Some(&b"only in a"[..])
        );
        drop(vol);
        assert_eq!(contents(&s[0], "v"), contents(&s[1], "v"));

        // A replacement disk (an empty store) is given a copy too.
        drop(s);
        std::fs::remove_dir_all(d.path().join("b")).unwrap();
        let s = stores(d.path(), &["a", "b"]);
        let vol = open_replicated(&s, "v").unwrap();
        assert_eq!(vol.replicas().unwrap().copies.len(), 2);
        drop(vol);
        assert_eq!(contents(&s[0], "v"), contents(&s[1], "v"));
        let b = s[1].open_volume_copy("v").unwrap();
        assert_eq!(b.view().chunk(INO, 1).unwrap(), chunk_bytes(1));
    }

    #[test]
    fn an_interrupted_rewrite_leaves_the_copy_behind_so_it_is_rewritten_again() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        write_file(&open_replicated(&s, "v").unwrap(), 2);
        let vid = s[1].existing_id("v").unwrap();
        // What a rewrite leaves when it stops after its first batch.
        let mut b = WriteBatch::default();
        for cf in s[1].all_cfs() {
            b.delete_range_cf(cf, codec::volume_start(vid), codec::volume_end(vid));
        }
        b.put_cf(
            s[1].meta(),
            codec::write_gen_key(vid),
            codec::encode_counter(0),
        );
        s[1].write(b).unwrap();
        assert_eq!(s[1].write_gen(vid).unwrap(), 0);
        let vol = open_replicated(&s, "v").unwrap();
        assert_eq!(vol.replicas().unwrap().copies.len(), 2);
        drop(vol);
        assert_eq!(contents(&s[0], "v"), contents(&s[1], "v"));
    }

    #[test]
    fn an_encrypted_volume_s_copies_open_with_the_same_key() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        let key = MasterKey::from_bytes(&[7u8; 32]).unwrap();
        let new = NewVolume {
            encryption: Some(key.clone()),
            ..NewVolume::default()
        };
        create_replicated(&s, "v", &new, 2).unwrap();
        let vol = open_replicated(&s, "v").unwrap();
        write_file(&vol, 1);
        drop(vol);
        drop(s);
        // Each copy alone, in a new process's stores, opens with the key.
        for one in ["a", "b"] {
            let s = stores(d.path(), &[one]);
            s[0].unlock("v", &key).unwrap();
            let vol = open_replicated(&s, "v").unwrap();
            assert_eq!(vol.view().chunk(INO, 0).unwrap(), chunk_bytes(0));
        }
        // A replacement disk for b: its new copy opens with the key a was given.
        std::fs::remove_dir_all(d.path().join("b")).unwrap();
        let s = stores(d.path(), &["a", "b"]);
        s[0].unlock("v", &key).unwrap();
        let vol = open_replicated(&s, "v").unwrap();
        assert_eq!(vol.replicas().unwrap().copies.len(), 2);
        let b = VolumeView::new(&vol.copies, vol.set.as_deref(), 1);
        assert_eq!(b.chunk(INO, 0).unwrap(), chunk_bytes(0));
    }

    #[test]
    fn stores_of_other_chunk_sizes_do_not_take_copies() {
        let d = tempfile::tempdir().unwrap();
        let a = Store::open_or_create(&d.path().join("a"), &StoreOptions::default()).unwrap();
        let small = StoreOptions {
            chunk_size: 16 * 1024,
            ..StoreOptions::default()
        };
        let b = Store::open_or_create(&d.path().join("b"), &small).unwrap();
        let err = create_replicated(&[a, b], "v", &NewVolume::default(), 2).unwrap_err();
        assert!(err.to_string().contains("one chunk size"), "{err}");
    }

    #[test]
    fn replicated_volumes_are_refused_where_they_would_be_served_from_one_copy() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b", "c"]);
        let err = create_replicated(&s[..1], "v", &NewVolume::default(), 2).unwrap_err();
        assert!(err.to_string().contains("2 copies need 2 stores"), "{err}");
        create_replicated(&s[..2], "v", &NewVolume::default(), 2).unwrap();
        let err = s[0].open_volume("v").unwrap_err();
        assert!(err.to_string().contains("keeps 2 copies"), "{err}");
        // A volume of that name in c that is not a copy of this one.
        s[2].create_volume("v", None, None).unwrap();
        let err = open_replicated(&s, "v").err().unwrap();
        assert!(err.to_string().contains("not a copy"), "{err}");
        assert!(matches!(
            create_replicated(&s[..2], "v", &NewVolume::default(), 2),
            Err(Error::VolumeExists(_))
        ));
    }

    #[test]
    fn new_limits_reach_every_copy_and_one_that_missed_them_is_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        // One store alone cannot change the limits (its copy would differ), mounted or not.
        for mounted in [true, false] {
            let vol = mounted.then(|| open_replicated(&s, "v").unwrap());
            let err = s[1]
                .resize_volume("v", Some(Some(1 << 20)), None)
                .unwrap_err();
            assert!(err.to_string().contains("every copy at once"), "{err}");
            drop(vol);
        }
        // Copy b's disk is away while the quota changes: a is ahead, b is rewritten.
        let alone = open_replicated(&s[..1], "v").unwrap();
        write_file(&alone, 1);
        let err = alone.set_limits(Some(Some(1000)), None).unwrap_err();
        assert!(matches!(err, Error::QuotaBelowUsage { .. }), "{err}");
        alone.set_limits(Some(Some(1 << 20)), None).unwrap();
        assert_eq!(alone.quota(), 1 << 20);
        drop(alone);
        let vol = open_replicated(&s, "v").unwrap();
        assert_eq!((vol.quota(), vol.copies[1].vol.quota()), (1 << 20, 1 << 20));
        drop(vol);
        assert_eq!(contents(&s[0], "v"), contents(&s[1], "v"));
        assert_eq!(s[1].inspect_volume("v").unwrap().quota_bytes, Some(1 << 20));
    }

    #[test]
    fn copies_written_apart_are_refused_not_merged() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        write_file(&open_replicated(&s, "v").unwrap(), 1);
        // Each disk served alone, the same number of commits in each: equal generations.
        for (one, value) in [(0, &b"a's"[..]), (1, &b"b's"[..])] {
            let alone = open_replicated(&s[one..=one], "v").unwrap();
            let mut t = alone.txn();
            t.put_xattr(ROOT_INO, b"user.who", value);
            t.commit().unwrap();
        }
        let gens: Vec<u64> = s
            .iter()
            .map(|st| st.write_gen(st.existing_id("v").unwrap()).unwrap())
            .collect();
        assert_eq!(gens[0], gens[1]);
        let err = open_replicated(&s, "v").err().unwrap();
        assert!(err.to_string().contains("written apart"), "{err}");
        // Both untouched; after deleting b's copy, b is given a's.
        assert_ne!(contents(&s[0], "v"), contents(&s[1], "v"));
        s[1].delete_volume("v").unwrap();
        let vol = open_replicated(&s, "v").unwrap();
        assert_eq!(
            vol.view().xattr(ROOT_INO, b"user.who").unwrap().as_deref(),
            Some(&b"a's"[..])
        );
        drop(vol);
        assert_eq!(contents(&s[0], "v"), contents(&s[1], "v"));
    }

    #[test]
    fn a_copy_is_behind_when_it_stopped_in_an_epoch_the_newest_went_on_from() {
        let f = |gen, history: &[(u64, u64)]| Found {
            store: 0,
            vid: 1,
            replicas: None,
            gen,
            history: history.to_vec(),
            complete: true,
        };
        let newest = f(30, &[(7, 1), (8, 21)]);
        assert_eq!(how_far(&f(30, &[(7, 1), (8, 21)]), &newest), Some(true));
        assert_eq!(how_far(&f(20, &[(7, 1)]), &newest), Some(false));
        assert_eq!(how_far(&f(25, &[(7, 1), (8, 21)]), &newest), Some(false));
        // Went on in epoch 7 past where the newest left it, or in an epoch of its own.
        assert_eq!(how_far(&f(21, &[(7, 1)]), &newest), None);
        assert_eq!(how_far(&f(22, &[(7, 1), (9, 21)]), &newest), None);
        assert_eq!(how_far(&f(22, &[(9, 1)]), &newest), None);
        // An epoch begun after the copy's last commit (nothing written in it) is not
        // where it stopped.
        assert_eq!(how_far(&f(20, &[(7, 1), (9, 21)]), &newest), Some(false));
    }

    #[test]
    fn scrub_makes_a_copy_that_differs_equal_again_and_then_finds_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        let vol = open_replicated(&s, "v").unwrap();
        write_file(&vol, 40);
        // Copy b made to differ behind the set's back: a changed chunk, a missing inode,
        // a stray key.
        let vid = vol.id;
        let mut b = WriteBatch::default();
        let chunks = s[1].chunks_for(Compression::None);
        b.put_cf(chunks, codec::chunk_key(vid, INO, 3), b"not this");
        b.delete_cf(s[1].meta(), codec::inode_key(vid, INO));
        b.put_cf(s[1].meta(), codec::inode_key(vid, 99), b"stray");
        s[1].write(b).unwrap();
        assert_ne!(contents(&s[0], "v"), contents(&s[1], "v"));
        let mut windows = 0;
        let report = vol.scrub(&mut |_| windows += 1).unwrap();
        assert_eq!(
            (report.repaired, report.unreadable, report.copies),
            (3, 0, 2)
        );
        assert!(windows > 2, "{windows} windows");
        assert!(report.bytes > 40 * 64 * 1024, "{report:?}");
        assert_eq!(contents(&s[0], "v"), contents(&s[1], "v"));
        assert_eq!(vol.scrub(&mut |_| ()).unwrap().repaired, 0);
        // Through the store, as the control socket asks for it.
        let through = scrub_open(&s[1], "v", &mut |_| ()).unwrap();
        assert_eq!((through.repaired, through.keys), (0, report.keys));
    }

    #[test]
    fn differences_put_what_is_missing_or_changed_and_delete_what_is_extra() {
        let kv = |k: &str, v: &str| (k.as_bytes().to_vec(), v.as_bytes().to_vec());
        let ours = [kv("a", "1"), kv("b", "2"), kv("d", "4")];
        let theirs = [kv("b", "x"), kv("c", "3"), kv("d", "4"), kv("e", "5")];
        let got = differences(&ours, &theirs);
        let want: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
            (b"a".to_vec(), Some(b"1".to_vec())),
            (b"b".to_vec(), Some(b"2".to_vec())),
            (b"c".to_vec(), None),
            (b"e".to_vec(), None),
        ];
        assert_eq!(got, want);
        assert!(differences(&ours, &ours).is_empty());
    }

    #[test]
    fn a_new_epoch_that_reached_one_copy_only_is_settled_at_the_next_assembly() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b"]);
        create_replicated(&s, "v", &NewVolume::default(), 2).unwrap();
        write_file(&open_replicated(&s, "v").unwrap(), 1);
        let vid = s[0].existing_id("v").unwrap();
        // What a crash in the middle of beginning an epoch leaves: a has it, b not.
        let mut longer = s[0].replica_history(vid).unwrap();
        longer.push((42, s[0].write_gen(vid).unwrap() + 1));
        let mut b = WriteBatch::default();
        b.put_cf(
            s[0].meta(),
            codec::history_key(vid),
            codec::encode_history(&longer),
        );
        s[0].write(b).unwrap();
        for _ in 0..2 {
            // Level either way round, and agreeing afterwards.
            let vol = open_replicated(&s, "v").unwrap();
            assert!(!vol.replicas().unwrap().degraded);
            drop(vol);
            assert_eq!(s[1].replica_history(vid).unwrap(), longer);
        }
        // b fails while both are served; a goes on; b is then behind, not apart.
        let vol = open_replicated(&s, "v").unwrap();
        vol.set
            .as_ref()
            .unwrap()
            .fail(1, "test", &Error::Corrupt("test".into()));
        write_file(&vol, 2);
        drop(vol);
        assert!(s[1].write_gen(vid).unwrap() < s[0].write_gen(vid).unwrap());
        let vol = open_replicated(&s, "v").unwrap();
        assert_eq!(vol.replicas().unwrap().copies.len(), 2);
        drop(vol);
        assert_eq!(contents(&s[0], "v"), contents(&s[1], "v"));
    }

    #[test]
    fn copies_each_completed_with_a_replacement_disk_are_apart_not_behind() {
        let d = tempfile::tempdir().unwrap();
        let s = stores(d.path(), &["a", "b", "c", "d"]);
        create_replicated(&s[..2], "v", &NewVolume::default(), 2).unwrap();
        write_file(&open_replicated(&s[..2], "v").unwrap(), 1);
        // a with an empty c (b away), then b with an empty d (a away): each set complete,
        // each written.
        for (pair, writes) in [([0, 2], 3), ([1, 3], 1)] {
            let set = [s[pair[0]].clone(), s[pair[1]].clone()];
            let vol = open_replicated(&set, "v").unwrap();
            assert!(!vol.replicas().unwrap().degraded);
            for _ in 0..writes {
                let mut t = vol.txn();
                t.put_xattr(ROOT_INO, b"user.n", &[pair[0] as u8]);
                t.commit().unwrap();
            }
        }
        let err = open_replicated(&s[..2], "v").err().unwrap();
        assert!(err.to_string().contains("written apart"), "{err}");
    }
}
