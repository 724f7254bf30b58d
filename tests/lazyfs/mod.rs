//! LazyFs: a test-only FUSE passthrough filesystem that forgets, on a simulated power cut,
//! everything that was not made durable, after the fault-injection filesystem that Jepsen
//! uses (LazyFS). A store placed on it can be tested for power loss, not only for a killed
//! process: the page cache of the store's own files is lost too.
//!
//! [`LazyFs::mount`] serves a backing directory at a mount point, in this process, on
//! fuser's background session threads. [`LazyFs::power_cut`] throws away what is not durable,
//! rewinds the backing directory to its durable state, unmounts and mounts a fresh instance
//! over the same backing directory. Kill the processes using the layer first: a cut while
//! they run would hand them a half-rewound filesystem.
//!
//! # The model
//!
//! *File data.* Writes, truncates, extending `fallocate` and writes past end of file are
//! kept in an in-memory overlay per inode (4 KiB pages holding what a reader sees, the
//! logical size, and the lowest size the file had since its last sync, past which the
//! backing bytes are gone). Reads merge the overlay over the backing file. `fsync` and
//! `fdatasync` apply the overlay to the backing file and fsync it. Files are opened with
//! `FOPEN_DIRECT_IO`, so the kernel keeps no page cache above the layer: every write
//! reaches it. On a cut every overlay is dropped (but see *What survives a cut*), whether
//! its file is still open or not.
//!
//! *Directory entries.* Namespace changes (create, mknod, mkdir, symlink, link, unlink,
//! rmdir, rename, rename with `RENAME_EXCHANGE`) are applied to the backing directory at
//! once, and each is logged with the directories it changed. `fsync` of a directory makes
//! every logged change of that directory durable; a rename between two directories is
//! durable only once both were synced after it (the strict POSIX reading: ext4 and xfs
//! commit more, never less). Removed names (unlink, rmdir, a rename's victim) are moved
//! to a hidden trash directory (`.lazyfs-trash` in the backing root) so that open files
//! keep working and the name can come back. On a cut the non-durable changes are undone
//! newest first: a file or directory whose creation was not durable disappears (with
//! everything in it, synced or not), a removal comes back, a rename goes back, an
//! exchange is exchanged back. Then the trash is emptied: durable removals are final.
//! An `fsync` of a file makes its data and size durable, never its name: the data of a
//! file whose creation is undone is lost with it.
//!
//! *Everything else passes through.* statfs, getattr (with the overlay's size), readdir,
//! readlink, chmod, chown, utimes. BSD `flock` and POSIX `fcntl` locks are left to the
//! kernel: the layer does not announce `FUSE_POSIX_LOCKS` or `FUSE_FLOCK_LOCKS`, so the
//! kernel keeps the locks itself, which is right for processes on this one host. `ioctl`
//! answers `ENOTTY` (RocksDB's `FS_IOC_GETVERSION` falls back); xattrs are not supported
//! (`ENOSYS`, which the kernel turns into `EOPNOTSUPP`); `sync_file_range` and
//! `posix_fadvise` never reach a FUSE filesystem with direct I/O and have no effect.
//!
//! *What survives a cut.* [`CutMode::LoseAll`] loses every unsynced write and every
//! non-durable namespace change. [`CutMode::KeepSome`] models writeback and journal commits
//! that were under way when the power went: of each file's dirty pages a random prefix (in
//! file order, the last page torn at a 512-byte sector) reaches the backing file, and a
//! random prefix of the non-durable namespace changes (in the order they were made) is kept.
//!
//! # What it does not model
//!
//! - Writeback out of file order (a later page on disk, an earlier one not) and reordering
//!   of namespace changes against each other: [`CutMode::KeepSome`] keeps prefixes only.
//! - Metadata other than names and sizes (mode, owner, times) is durable at once.
//! - `fallocate(KEEP_SIZE)` allocation is not modelled (it changes no content); hole
//!   punching and zeroing are pending writes of zeros; other modes answer `EOPNOTSUPP`.
//! - An unlinked file that is still open keeps a link in the trash: its `st_nlink` is
//!   corrected for the trash, but `link(2)` of such a file succeeds where Linux says ENOENT.
//! - I/O errors: no EIO or ENOSPC is injected, a failed fsync never happens.
//!
//! One lock serializes every request: correct, not fast (fusevol's fsync-heavy workload
//! still runs at about 70 MB/s on two cores).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use fuser::{
    BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, IoctlFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session, TimeOrNow, WriteFlags,
};

/// Name of the hidden directory (in the backing root) that holds removed names until a cut.
pub const TRASH: &str = ".lazyfs-trash";
const PAGE: u64 = 4096;
const TTL: Duration = Duration::from_secs(1);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What survives of the state that was not durable when the power went.
#[derive(Clone, Copy, Debug)]
pub enum CutMode {
    /// Nothing: every unsynced write and every non-durable namespace change is lost (what
    /// LazyFS and RocksDB's own `FaultInjectionTestFS` do).
    LoseAll,
    /// Some, as if writeback and journal commits had been under way: of each file's dirty
    /// pages, the first k (k random, in file order) are written back, the next one torn at a
    /// random 512-byte sector, and the file's size only if all of them were; a pending
    /// truncation is applied or not (half the time each); of the non-durable namespace
    /// changes, a random prefix (in the order they happened) is kept, as a journal commits.
    KeepSome { seed: u64 },
}

/// What a power cut threw away.
#[derive(Clone, Debug, Default)]
pub struct CutReport {
    /// Files whose unsynced data or size change was dropped or torn.
    pub files_dropped: u64,
    /// Unsynced bytes dropped (dirty pages, 4 KiB each), before any were kept.
    pub bytes_dropped: u64,
    /// Of those, bytes written back anyway ([`CutMode::KeepSome`]).
    pub bytes_kept: u64,
    /// Namespace changes undone.
    pub entries_undone: u64,
    /// Non-durable namespace changes kept ([`CutMode::KeepSome`]).
    pub entries_kept: u64,
    /// Failures of the layer itself (undo steps that could not be applied, requests that
    /// panicked): must stay empty, else the cut did not leave the durable state.
    pub errors: Vec<String>,
}

/// Counters over the life of a [`LazyFs`], across cuts.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub cuts: u64,
    pub files_dropped: u64,
    pub bytes_dropped: u64,
    pub entries_undone: u64,
    /// fsync/fdatasync calls that made file data durable.
    pub file_syncs: u64,
    /// fsync calls on directories.
    pub dir_syncs: u64,
}

/// What is not durable right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Files with unsynced data or size changes.
    pub files: u64,
    /// Namespace changes not yet made durable.
    pub entries: u64,
}

/// A mounted layer (see the module doc). Dropping it unmounts without any cut semantics.
pub struct LazyFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    /// FUSE connection number (minor of st_dev), for aborting a mount that will not go.
    conn: Option<u64>,
    totals: Totals,
}

impl LazyFs {
    /// Serves `backing` at `mountpoint` (both existing directories).
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<LazyFs> {
        let backing = backing.canonicalize()?;
        let mountpoint = mountpoint.canonicalize()?;
        let state = Arc::new(Mutex::new(State::new(&backing)?));
        let mut fs = LazyFs {
            backing,
            mountpoint,
            state,
            session: None,
            conn: None,
            totals: Totals::default(),
        };
        fs.start()?;
        Ok(fs)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Counters since [`LazyFs::mount`], including the current instance's syncs.
    pub fn totals(&self) -> Totals {
        let st = lock(&self.state);
        let mut t = self.totals.clone();
        t.file_syncs += st.file_syncs;
        t.dir_syncs += st.dir_syncs;
        t
    }

    /// What a cut now would throw away.
    pub fn pending(&self) -> Pending {
        let st = lock(&self.state);
        Pending {
            files: st.overlays.len() as u64,
            entries: st.undo.len() as u64,
        }
    }

    /// Simulated power cut: drops every overlay, undoes every non-durable namespace change,
    /// unmounts, and mounts a fresh instance over the same backing directory. Requests that
    /// arrive meanwhile fail with EIO. Kill every process using the layer first.
    pub fn power_cut(&mut self) -> io::Result<CutReport> {
        self.power_cut_with(CutMode::LoseAll)
    }

    /// [`LazyFs::power_cut`], keeping what `mode` says of the non-durable state.
    pub fn power_cut_with(&mut self, mode: CutMode) -> io::Result<CutReport> {
        let report = {
            let mut st = lock(&self.state);
            st.cut = true;
            let report = st.discard(mode);
            self.totals.file_syncs += st.file_syncs;
            self.totals.dir_syncs += st.dir_syncs;
            report
        };
        self.stop()?;
        self.totals.cuts += 1;
        self.totals.files_dropped += report.files_dropped;
        self.totals.bytes_dropped += report.bytes_dropped;
        self.totals.entries_undone += report.entries_undone;
        self.state = Arc::new(Mutex::new(State::new(&self.backing)?));
        self.start()?;
        Ok(report)
    }

    fn start(&mut self) -> io::Result<()> {
        let trash = self.backing.join(TRASH);
        match fs::remove_dir_all(&trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir(&trash)?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lazyfs".into()),
            MountOption::Subtype("lazyfs".into()),
        ];
        config.n_threads = Some(4);
        config.clone_fd = true;
        let layer = Layer {
            state: self.state.clone(),
        };
        let session = Session::new(layer, &self.mountpoint, &config)?.spawn()?;
        self.session = Some(session);
        self.conn = fs::metadata(&self.mountpoint)
            .ok()
            .map(|m| dev_minor(m.dev()));
        Ok(())
    }

    /// Unmounts (detaching and aborting the connection if the mount is busy) and waits for
    /// the session's threads.
    fn stop(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        use nix::mount::{umount2, MntFlags};
        if umount2(&self.mountpoint, MntFlags::empty()).is_err() {
            let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
            if let Some(conn) = self.conn {
                abort_connection(conn);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !session.guard.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        if !session.guard.is_finished() {
            // Dropping the session would unmount whatever is mounted here later: leak it.
            std::mem::forget(session);
            return Err(io::Error::other(format!(
                "lazyfs session at {} did not end within {STOP_TIMEOUT:?}",
                self.mountpoint.display()
            )));
        }
        session.join()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        lock(&self.state).cut = true;
        if let Err(e) = self.stop() {
            eprintln!("lazyfs: {e}");
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn dev_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

/// Aborts FUSE connection `conn` through fusectl (mounting fusectl if needed).
fn abort_connection(conn: u64) {
    let base = Path::new("/sys/fs/fuse/connections");
    let dir = base.join(conn.to_string());
    if !dir.exists() {
        let _ = nix::mount::mount(
            Some("fusectl"),
            base,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let _ = fs::write(dir.join("abort"), b"1");
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// A path (relative to the backing root) at which the node can be reached now.
struct Node {
    rel: PathBuf,
}

struct Handle {
    ino: u64,
    file: File,
}

/// Unsynced content of one file.
struct Overlay {
    /// Size as readers see it.
    size: u64,
    /// Lowest size since the last sync: backing bytes at and past it read as zeros.
    floor: u64,
    /// Dirty pages as readers see them (zeros past `size`).
    pages: BTreeMap<u64, Box<[u8]>>,
}

/// A namespace change, with what restores the state before it.
enum Undo {
    /// `dir/name` did not exist: remove it (a directory with all it holds).
    Created { dir: u64, name: OsString },
    /// `dir/name` (inode `ino`) was removed; it now lives in the trash as `slot`.
    Removed {
        dir: u64,
        name: OsString,
        slot: OsString,
        ino: u64,
    },
    /// `from` was renamed to `to` (a replaced victim is a `Removed` logged just before).
    Renamed {
        from_dir: u64,
        from_name: OsString,
        to_dir: u64,
        to_name: OsString,
    },
    /// `a` and `b` were exchanged.
    Exchanged {
        a_dir: u64,
        a_name: OsString,
        b_dir: u64,
        b_name: OsString,
    },
}

struct Logged {
    /// Directories whose fsync this change still waits for.
    waits_for: Vec<u64>,
    undo: Undo,
}

struct State {
    root: PathBuf,
    nodes: HashMap<u64, Node>,
    /// (st_dev, st_ino) of the backing inode -> our inode number.
    ids: HashMap<(u64, u64), u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    dirs: HashMap<u64, Vec<(u64, FileType, OsString)>>,
    next_fh: u64,
    overlays: HashMap<u64, Overlay>,
    /// Links an inode has in the trash (hidden from st_nlink).
    trash_links: HashMap<u64, u32>,
    undo: Vec<Logged>,
    next_slot: u64,
    cut: bool,
    /// Requests that panicked (see [`Layer::with`]).
    failures: Vec<String>,
    file_syncs: u64,
    dir_syncs: u64,
}

type Res<T> = Result<T, Errno>;

fn eno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn nix_eno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn lstat(p: &Path) -> Res<fs::Metadata> {
    fs::symlink_metadata(p).map_err(eno)
}

fn kind_of(md: &fs::Metadata) -> FileType {
    FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile)
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(Duration::from_nanos(nsecs.clamp(0, 999_999_999) as u64)))
        .unwrap_or(UNIX_EPOCH)
}

fn timespec(t: Option<TimeOrNow>) -> nix::sys::time::TimeSpec {
    use nix::sys::time::TimeSpec;
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::new(d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                TimeSpec::new(s, ns)
            }
        },
    }
}

/// Reads as much of `buf` as the file holds at `off`; the rest stays as it is (zeros).
fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Replaces the prefix `from` of `p` by `to`, if `p` is `from` or below it.
fn rebase(p: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    let rest = p.strip_prefix(from).ok()?;
    Some(if rest.as_os_str().is_empty() {
        to.to_path_buf()
    } else {
        to.join(rest)
    })
}

impl Overlay {
    fn new(backing_size: u64) -> Overlay {
        Overlay {
            size: backing_size,
            floor: backing_size,
            pages: BTreeMap::new(),
        }
    }

    fn read(&self, file: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
        if off >= self.size || len == 0 {
            return Ok(Vec::new());
        }
        let end = off.saturating_add(len as u64).min(self.size);
        let mut buf = vec![0u8; (end - off) as usize];
        let backed = end.min(self.floor);
        if off < backed {
            read_full_at(file, &mut buf[..(backed - off) as usize], off)?;
        }
        for (&p, page) in self.pages.range(off / PAGE..=(end - 1) / PAGE) {
            let ps = p * PAGE;
            let (s, e) = (ps.max(off), (ps + PAGE).min(end));
            buf[(s - off) as usize..(e - off) as usize]
                .copy_from_slice(&page[(s - ps) as usize..(e - ps) as usize]);
        }
        Ok(buf)
    }

    fn write(&mut self, file: &File, off: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = off + data.len() as u64;
        for p in off / PAGE..=(end - 1) / PAGE {
            let ps = p * PAGE;
            let (s, e) = (ps.max(off), (ps + PAGE).min(end));
            if !self.pages.contains_key(&p) {
                let mut page = if s == ps && e == ps + PAGE {
                    Vec::new()
                } else {
                    self.read(file, ps, PAGE as usize)?
                };
                page.resize(PAGE as usize, 0);
                self.pages.insert(p, page.into_boxed_slice());
            }
            if let Some(page) = self.pages.get_mut(&p) {
                page[(s - ps) as usize..(e - ps) as usize]
                    .copy_from_slice(&data[(s - off) as usize..(e - off) as usize]);
            }
        }
        self.size = self.size.max(end);
        Ok(())
    }

    fn set_size(&mut self, size: u64) {
        if size < self.size {
            self.floor = self.floor.min(size);
            let _gone = self.pages.split_off(&size.div_ceil(PAGE));
            if !size.is_multiple_of(PAGE) {
                if let Some(page) = self.pages.get_mut(&(size / PAGE)) {
                    page[(size % PAGE) as usize..].fill(0);
                }
            }
        }
        self.size = size;
    }

    /// Writes back part of the overlay, as [`CutMode::KeepSome`] says; returns the bytes
    /// written.
    fn apply_some(&self, file: &File, rng: &mut SmallRng) -> io::Result<u64> {
        if self.floor < file.metadata()?.len() && rng.gen_bool(0.5) {
            file.set_len(self.floor)?;
        }
        let k = rng.gen_range(0..=self.pages.len());
        let mut kept = 0;
        for (i, (&p, page)) in self.pages.iter().enumerate().take(k + 1) {
            let ps = p * PAGE;
            let torn = if i < k {
                PAGE
            } else {
                512 * rng.gen_range(0..8)
            };
            let end = (ps + torn).min(self.size);
            if end > ps {
                file.write_all_at(&page[..(end - ps) as usize], ps)?;
                kept += end - ps;
            }
        }
        if k == self.pages.len() && file.metadata()?.len() < self.size {
            file.set_len(self.size)?;
        }
        Ok(kept)
    }

    /// Writes the overlay into the backing file (not synced).
    fn apply(&self, file: &File) -> io::Result<()> {
        if self.floor < file.metadata()?.len() {
            file.set_len(self.floor)?;
        }
        let mut run: Option<u64> = None;
        let mut buf = Vec::new();
        for (&p, page) in &self.pages {
            let ps = p * PAGE;
            if ps >= self.size {
                break;
            }
            let n = (self.size - ps).min(PAGE) as usize;
            let contiguous = run.is_some_and(|s| s + buf.len() as u64 == ps);
            if !contiguous || buf.len() >= 1 << 20 {
                if let Some(s) = run {
                    file.write_all_at(&buf, s)?;
                }
                buf.clear();
                run = Some(ps);
            }
            buf.extend_from_slice(&page[..n]);
        }
        if let Some(s) = run {
            file.write_all_at(&buf, s)?;
        }
        if file.metadata()?.len() != self.size {
            file.set_len(self.size)?;
        }
        Ok(())
    }
}

impl State {
    fn new(root: &Path) -> io::Result<State> {
        let md = fs::metadata(root)?;
        let mut st = State {
            root: root.to_path_buf(),
            nodes: HashMap::new(),
            ids: HashMap::new(),
            next_ino: 2,
            handles: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 1,
            overlays: HashMap::new(),
            trash_links: HashMap::new(),
            undo: Vec::new(),
            next_slot: 0,
            cut: false,
            failures: Vec::new(),
            file_syncs: 0,
            dir_syncs: 0,
        };
        st.nodes.insert(
            INodeNo::ROOT.0,
            Node {
                rel: PathBuf::new(),
            },
        );
        st.ids.insert((md.dev(), md.ino()), INodeNo::ROOT.0);
        Ok(st)
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn rel_of(&self, ino: u64) -> Res<PathBuf> {
        self.nodes
            .get(&ino)
            .map(|n| n.rel.clone())
            .ok_or(Errno::ESTALE)
    }

    /// `parent/name`, refusing the hidden trash.
    fn child(&self, parent: u64, name: &OsStr) -> Res<PathBuf> {
        let dir = self.rel_of(parent)?;
        if dir.as_os_str().is_empty() && name == TRASH {
            return Err(Errno::EPERM);
        }
        Ok(dir.join(name))
    }

    fn register(&mut self, rel: PathBuf, md: &fs::Metadata) -> u64 {
        let key = (md.dev(), md.ino());
        if let Some(&ino) = self.ids.get(&key) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.rel = rel;
            }
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.ids.insert(key, ino);
        self.nodes.insert(ino, Node { rel });
        ino
    }

    fn attr(&self, ino: u64, md: &fs::Metadata) -> FileAttr {
        let hidden = self.trash_links.get(&ino).copied().unwrap_or(0);
        FileAttr {
            ino: INodeNo(ino),
            size: self.overlays.get(&ino).map(|o| o.size).unwrap_or(md.size()),
            blocks: md.blocks(),
            atime: system_time(md.atime(), md.atime_nsec()),
            mtime: system_time(md.mtime(), md.mtime_nsec()),
            ctime: system_time(md.ctime(), md.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind_of(md),
            perm: (md.mode() & 0o7777) as u16,
            nlink: (md.nlink() as u32).saturating_sub(hidden),
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev() as u32,
            blksize: PAGE as u32,
            flags: 0,
        }
    }

    fn stat_ino(&self, ino: u64) -> Res<FileAttr> {
        let md = lstat(&self.abs(&self.rel_of(ino)?))?;
        Ok(self.attr(ino, &md))
    }

    /// Registers `rel` (which must exist) and returns its attributes.
    fn entry(&mut self, rel: PathBuf) -> Res<FileAttr> {
        let md = lstat(&self.abs(&rel))?;
        let ino = self.register(rel, &md);
        Ok(self.attr(ino, &md))
    }

    fn log(&mut self, mut waits_for: Vec<u64>, undo: Undo) {
        waits_for.dedup();
        self.undo.push(Logged { waits_for, undo });
    }

    /// Node paths follow a rename of `from` to `to`.
    fn moved(&mut self, from: &Path, to: &Path) {
        for n in self.nodes.values_mut() {
            if let Some(p) = rebase(&n.rel, from, to) {
                n.rel = p;
            }
        }
    }

    fn swapped(&mut self, a: &Path, b: &Path) {
        for n in self.nodes.values_mut() {
            if let Some(p) = rebase(&n.rel, a, b).or_else(|| rebase(&n.rel, b, a)) {
                n.rel = p;
            }
        }
    }

    /// Moves `rel` (inode `ino`) into the trash; returns the slot name and its path.
    fn move_to_trash(&mut self, rel: &Path, ino: u64) -> Res<(OsString, PathBuf)> {
        let slot = OsString::from(self.next_slot.to_string());
        self.next_slot += 1;
        let trash_rel = Path::new(TRASH).join(&slot);
        fs::rename(self.abs(rel), self.abs(&trash_rel)).map_err(eno)?;
        self.moved(rel, &trash_rel);
        *self.trash_links.entry(ino).or_insert(0) += 1;
        Ok((slot, trash_rel))
    }

    fn overlay(&mut self, ino: u64) -> Res<&mut Overlay> {
        if !self.overlays.contains_key(&ino) {
            let size = lstat(&self.abs(&self.rel_of(ino)?))?.size();
            self.overlays.insert(ino, Overlay::new(size));
        }
        self.overlays.get_mut(&ino).ok_or(Errno::EIO)
    }

    fn add_handle(&mut self, ino: u64, file: File) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, file });
        fh
    }

    // ---- requests --------------------------------------------------------------------------

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<FileAttr> {
        let rel = self.child(parent, name).map_err(|_| Errno::ENOENT)?;
        self.entry(rel)
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Res<FileAttr> {
        let path = self.abs(&self.rel_of(ino)?);
        if let Some(size) = size {
            self.overlay(ino)?.set_size(size);
        }
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777)).map_err(eno)?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&path, uid, gid).map_err(eno)?;
        }
        if atime.is_some() || mtime.is_some() {
            nix::sys::stat::utimensat(
                None,
                &path,
                &timespec(atime),
                &timespec(mtime),
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .map_err(nix_eno)?;
        }
        self.stat_ino(ino)
    }

    fn create(&mut self, parent: u64, name: &OsStr, mode: u32, flags: i32) -> Res<(FileAttr, u64)> {
        let rel = self.child(parent, name)?;
        let path = self.abs(&rel);
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(true)
            .mode(mode & 0o7777)
            .custom_flags(libc::O_CLOEXEC);
        let (file, created) = match oo.clone().create_new(true).open(&path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 => {
                (oo.open(&path).map_err(eno)?, false)
            }
            Err(e) => return Err(eno(e)),
        };
        let md = file.metadata().map_err(eno)?;
        let ino = self.register(rel, &md);
        if created {
            self.log(
                vec![parent],
                Undo::Created {
                    dir: parent,
                    name: name.to_owned(),
                },
            );
        }
        let attr = self.attr(ino, &md);
        Ok((attr, self.add_handle(ino, file)))
    }

    fn mknod(&mut self, parent: u64, name: &OsStr, mode: u32, rdev: u32) -> Res<FileAttr> {
        use nix::sys::stat::{Mode, SFlag};
        let rel = self.child(parent, name)?;
        let path = self.abs(&rel);
        if mode & libc::S_IFMT == libc::S_IFREG {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & 0o7777)
                .open(&path)
                .map_err(eno)?;
        } else {
            nix::sys::stat::mknod(
                &path,
                SFlag::from_bits_truncate(mode & libc::S_IFMT),
                Mode::from_bits_truncate(mode & 0o7777),
                rdev as libc::dev_t,
            )
            .map_err(nix_eno)?;
        }
        self.created(parent, name, rel)
    }

    fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32) -> Res<FileAttr> {
        let rel = self.child(parent, name)?;
        fs::DirBuilder::new()
            .mode(mode & 0o7777)
            .create(self.abs(&rel))
            .map_err(eno)?;
        self.created(parent, name, rel)
    }

    fn symlink(&mut self, parent: u64, name: &OsStr, target: &Path) -> Res<FileAttr> {
        let rel = self.child(parent, name)?;
        std::os::unix::fs::symlink(target, self.abs(&rel)).map_err(eno)?;
        self.created(parent, name, rel)
    }

    fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Res<FileAttr> {
        let src = self.abs(&self.rel_of(ino)?);
        let rel = self.child(parent, name)?;
        fs::hard_link(src, self.abs(&rel)).map_err(eno)?;
        self.created(parent, name, rel)
    }

    /// Logs the creation of `parent/name` (at `rel`) and returns its attributes.
    fn created(&mut self, parent: u64, name: &OsStr, rel: PathBuf) -> Res<FileAttr> {
        self.log(
            vec![parent],
            Undo::Created {
                dir: parent,
                name: name.to_owned(),
            },
        );
        self.entry(rel)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        let rel = self.child(parent, name)?;
        let md = lstat(&self.abs(&rel))?;
        match (dir, md.is_dir()) {
            (false, true) => return Err(Errno::EISDIR),
            (true, false) => return Err(Errno::ENOTDIR),
            (true, true) => {
                if fs::read_dir(self.abs(&rel)).map_err(eno)?.next().is_some() {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            (false, false) => {}
        }
        let ino = self.register(rel.clone(), &md);
        let (slot, _) = self.move_to_trash(&rel, ino)?;
        self.log(
            vec![parent],
            Undo::Removed {
                dir: parent,
                name: name.to_owned(),
                slot,
                ino,
            },
        );
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        let src = self.child(parent, name)?;
        let dst = self.child(newparent, newname)?;
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let smd = lstat(&self.abs(&src))?;
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            nix::fcntl::renameat2(
                None,
                &self.abs(&src),
                None,
                &self.abs(&dst),
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(nix_eno)?;
            self.swapped(&src, &dst);
            self.log(
                vec![parent, newparent],
                Undo::Exchanged {
                    a_dir: parent,
                    a_name: name.to_owned(),
                    b_dir: newparent,
                    b_name: newname.to_owned(),
                },
            );
            return Ok(());
        }
        let dmd = match fs::symlink_metadata(self.abs(&dst)) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(eno(e)),
        };
        if smd.is_dir() && dst != src && dst.starts_with(&src) {
            return Err(Errno::EINVAL);
        }
        let mut victim = None;
        if let Some(d) = &dmd {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if (d.dev(), d.ino()) == (smd.dev(), smd.ino()) {
                return Ok(());
            }
            if d.is_dir() {
                if !smd.is_dir() {
                    return Err(Errno::EISDIR);
                }
                if fs::read_dir(self.abs(&dst)).map_err(eno)?.next().is_some() {
                    return Err(Errno::ENOTEMPTY);
                }
            } else if smd.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            let ino = self.register(dst.clone(), d);
            victim = Some((ino, self.move_to_trash(&dst, ino)?));
        }
        if let Err(e) = fs::rename(self.abs(&src), self.abs(&dst)) {
            if let Some((ino, (_, trash_rel))) = victim {
                if fs::rename(self.abs(&trash_rel), self.abs(&dst)).is_ok() {
                    self.moved(&trash_rel, &dst);
                    if let Some(n) = self.trash_links.get_mut(&ino) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
            return Err(eno(e));
        }
        if let Some((ino, (slot, _))) = victim {
            self.log(
                vec![newparent],
                Undo::Removed {
                    dir: newparent,
                    name: newname.to_owned(),
                    slot,
                    ino,
                },
            );
        }
        self.moved(&src, &dst);
        self.log(
            vec![parent, newparent],
            Undo::Renamed {
                from_dir: parent,
                from_name: name.to_owned(),
                to_dir: newparent,
                to_name: newname.to_owned(),
            },
        );
        Ok(())
    }

    fn open(&mut self, ino: u64) -> Res<u64> {
        let path = self.abs(&self.rel_of(ino)?);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .or_else(|_| {
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
            })
            .map_err(eno)?;
        Ok(self.add_handle(ino, file))
    }

    fn read(&self, ino: u64, fh: u64, off: u64, size: u32) -> Res<Vec<u8>> {
        let h = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        match self.overlays.get(&ino) {
            Some(o) => o.read(&h.file, off, size as usize).map_err(eno),
            None => {
                let mut buf = vec![0u8; size as usize];
                let n = read_full_at(&h.file, &mut buf, off).map_err(eno)?;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }

    fn write(&mut self, ino: u64, fh: u64, off: u64, data: &[u8]) -> Res<u32> {
        if !self.handles.contains_key(&fh) {
            return Err(Errno::EBADF);
        }
        self.overlay(ino)?;
        let (Some(h), Some(o)) = (self.handles.get(&fh), self.overlays.get_mut(&ino)) else {
            return Err(Errno::EIO);
        };
        o.write(&h.file, off, data).map_err(eno)?;
        Ok(data.len() as u32)
    }

    fn fsync(&mut self, ino: u64, fh: u64, datasync: bool) -> Res<()> {
        let h = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        if let Some(o) = self.overlays.get(&ino) {
            o.apply(&h.file).map_err(eno)?;
        }
        let synced = if datasync {
            h.file.sync_data()
        } else {
            h.file.sync_all()
        };
        synced.map_err(eno)?;
        self.overlays.remove(&ino);
        self.file_syncs += 1;
        Ok(())
    }

    fn fallocate(&mut self, ino: u64, fh: u64, off: u64, len: u64, mode: i32) -> Res<()> {
        let end = off.checked_add(len).ok_or(Errno::EFBIG)?;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match mode {
            0 => {
                let o = self.overlay(ino)?;
                if end > o.size {
                    o.set_size(end);
                }
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            PUNCH | libc::FALLOC_FL_ZERO_RANGE => {
                let h = self
                    .handles
                    .get(&fh)
                    .ok_or(Errno::EBADF)?
                    .file
                    .try_clone()
                    .map_err(eno)?;
                let o = self.overlay(ino)?;
                let stop = if mode == PUNCH { end.min(o.size) } else { end };
                let zeros = vec![0u8; 1 << 20];
                let mut at = off;
                while at < stop {
                    let n = (stop - at).min(zeros.len() as u64);
                    o.write(&h, at, &zeros[..n as usize]).map_err(eno)?;
                    at += n;
                }
                Ok(())
            }
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    fn opendir(&mut self, ino: u64) -> Res<u64> {
        let rel = self.rel_of(ino)?;
        let mut entries = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (ino, FileType::Directory, OsString::from("..")),
        ];
        for e in fs::read_dir(self.abs(&rel)).map_err(eno)? {
            let e = e.map_err(eno)?;
            let name = e.file_name();
            if rel.as_os_str().is_empty() && name == TRASH {
                continue;
            }
            let child = rel.join(&name);
            // Entries can go away under a concurrent reader only through us: skip, don't fail.
            let Ok(md) = fs::symlink_metadata(self.abs(&child)) else {
                continue;
            };
            let child_ino = self.register(child, &md);
            entries.push((child_ino, kind_of(&md), name));
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.dirs.insert(fh, entries);
        Ok(fh)
    }

    fn fsyncdir(&mut self, ino: u64) -> Res<()> {
        for l in &mut self.undo {
            l.waits_for.retain(|d| *d != ino);
        }
        self.undo.retain(|l| !l.waits_for.is_empty());
        File::open(self.abs(&self.rel_of(ino)?))
            .and_then(|d| d.sync_all())
            .map_err(eno)?;
        self.dir_syncs += 1;
        Ok(())
    }

    // ---- power cut -------------------------------------------------------------------------

    /// Drops what is not durable and rewinds the backing directory to its durable state.
    fn discard(&mut self, mode: CutMode) -> CutReport {
        let mut rng = match mode {
            CutMode::LoseAll => None,
            CutMode::KeepSome { seed } => Some(SmallRng::seed_from_u64(seed)),
        };
        let mut report = CutReport {
            files_dropped: self.overlays.len() as u64,
            bytes_dropped: self
                .overlays
                .values()
                .map(|o| o.pages.len() as u64 * PAGE)
                .sum(),
            errors: std::mem::take(&mut self.failures),
            ..CutReport::default()
        };
        if let Some(rng) = &mut rng {
            let mut inos: Vec<u64> = self.overlays.keys().copied().collect();
            inos.sort_unstable();
            for ino in inos {
                let kept = self
                    .rel_of(ino)
                    .map_err(|_| io::Error::other("unknown inode"))
                    .and_then(|rel| OpenOptions::new().write(true).open(self.abs(&rel)))
                    .and_then(|f| self.overlays[&ino].apply_some(&f, rng));
                match kept {
                    Ok(n) => report.bytes_kept += n,
                    Err(e) => report.errors.push(format!("writing back inode {ino}: {e}")),
                }
            }
        }
        self.overlays.clear();
        self.handles.clear();
        self.dirs.clear();
        let keep = rng.map_or(0, |mut r| r.gen_range(0..=self.undo.len()));
        report.entries_kept = keep as u64;
        while self.undo.len() > keep {
            let Some(l) = self.undo.pop() else { break };
            report.entries_undone += 1;
            if let Err(e) = self.revert(&l.undo) {
                report.errors.push(e);
            }
        }
        let trash = self.root.join(TRASH);
        if let Err(e) = fs::remove_dir_all(&trash).and_then(|_| fs::create_dir(&trash)) {
            report.errors.push(format!("emptying the trash: {e}"));
        }
        report
    }

    fn revert(&mut self, undo: &Undo) -> Result<(), String> {
        let at = |st: &State, dir: u64, name: &OsStr| -> Result<PathBuf, String> {
            st.rel_of(dir)
                .map(|d| d.join(name))
                .map_err(|_| format!("directory inode {dir} unknown"))
        };
        let absent = |st: &State, rel: &Path| -> Result<(), String> {
            match fs::symlink_metadata(st.abs(rel)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Ok(_) => Err(format!("{} exists", rel.display())),
                Err(e) => Err(format!("{}: {e}", rel.display())),
            }
        };
        let why = |what: &str, rel: &Path, e: io::Error| format!("{what} {}: {e}", rel.display());
        match undo {
            Undo::Created { dir, name } => {
                let rel = at(self, *dir, name)?;
                let path = self.abs(&rel);
                let md = fs::symlink_metadata(&path).map_err(|e| why("stat", &rel, e))?;
                if md.is_dir() {
                    fs::remove_dir_all(&path).map_err(|e| why("remove", &rel, e))
                } else {
                    fs::remove_file(&path).map_err(|e| why("remove", &rel, e))
                }
            }
            Undo::Removed {
                dir,
                name,
                slot,
                ino,
            } => {
                let from = Path::new(TRASH).join(slot);
                let to = at(self, *dir, name)?;
                absent(self, &to)?;
                fs::rename(self.abs(&from), self.abs(&to)).map_err(|e| why("restore", &to, e))?;
                self.moved(&from, &to);
                if let Some(n) = self.trash_links.get_mut(ino) {
                    *n = n.saturating_sub(1);
                }
                Ok(())
            }
            Undo::Renamed {
                from_dir,
                from_name,
                to_dir,
                to_name,
            } => {
                let cur = at(self, *to_dir, to_name)?;
                let orig = at(self, *from_dir, from_name)?;
                absent(self, &orig)?;
                fs::rename(self.abs(&cur), self.abs(&orig))
                    .map_err(|e| why("rename back", &cur, e))?;
                self.moved(&cur, &orig);
                Ok(())
            }
            Undo::Exchanged {
                a_dir,
                a_name,
                b_dir,
                b_name,
            } => {
                let a = at(self, *a_dir, a_name)?;
                let b = at(self, *b_dir, b_name)?;
                nix::fcntl::renameat2(
                    None,
                    &self.abs(&a),
                    None,
                    &self.abs(&b),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .map_err(|e| format!("exchange back {}: {e}", a.display()))?;
                self.swapped(&a, &b);
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The FUSE adapter
// ---------------------------------------------------------------------------------------------

struct Layer {
    state: Arc<Mutex<State>>,
}

impl Layer {
    /// Runs `f` on the state under the lock; EIO once the power is cut, or if `f` panics
    /// (recorded, and reported by the next cut: the worker thread lives on).
    fn with<T>(&self, f: impl FnOnce(&mut State) -> Res<T>) -> Res<T> {
        let mut st = lock(&self.state);
        if st.cut {
            return Err(Errno::EIO);
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut st))) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                st.failures.push(format!("a request panicked: {msg}"));
                Err(Errno::EIO)
            }
        }
    }
}

fn reply_entry(reply: ReplyEntry, r: Res<FileAttr>) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Res<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Layer {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.with(|st| st.lookup(parent.0, name)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|st| st.stat_ino(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.with(|st| st.setattr(ino.0, mode, uid, gid, size, atime, mtime)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with(|st| fs::read_link(st.abs(&st.rel_of(ino.0)?)).map_err(eno)) {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.with(|st| st.mknod(parent.0, name, mode & !umask, rdev)),
        );
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.with(|st| st.mkdir(parent.0, name, mode & !umask)),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.with(|st| st.remove(parent.0, name, false)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.with(|st| st.remove(parent.0, name, true)));
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.with(|st| st.symlink(parent.0, link_name, target)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.with(|st| st.rename(parent.0, name, newparent.0, newname, flags)),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.with(|st| st.link(ino.0, newparent.0, newname)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|st| st.open(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|st| st.read(ino.0, fh.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|st| st.write(ino.0, fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.state).handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.with(|st| st.fsync(ino.0, fh.0, datasync)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|st| st.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = lock(&self.state);
        let Some(entries) = st.dirs.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.state).dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.with(|st| st.fsyncdir(ino.0)));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.with(|st| nix::sys::statvfs::statvfs(&st.root).map_err(nix_eno)) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.with(|st| st.create(parent.0, name, mode & !umask, flags)) {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.with(|st| st.fallocate(ino.0, fh.0, offset, length, mode)),
        );
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}
