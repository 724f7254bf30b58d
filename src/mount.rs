//! Serving one volume at a mount point: mount-point checks (including recovery of a
//! stale mount left by a killed server), the FUSE session, and a clean stop on
//! SIGINT/SIGTERM or when someone unmounts the volume. Used by `fusevol mount` and by
//! the node agent (which serves many volumes from one store).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};

use crate::fs::Fs;
use crate::fuse::FuseFs;
use crate::metrics::Metrics;
use crate::store::{self, Store};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {0} does not exist")]
    NoMountPoint(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mount point {0} is already mounted (by a live process); unmount it first")]
    AlreadyMounted(PathBuf),
    #[error("mount point {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("volume: {0}")]
    Fs(#[from] crate::fs::FsError),
    #[error("volume {0:?}: its FUSE session is still live after unmount and abort; the volume stays open")]
    SessionLive(String),
    #[error("cannot mount {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Is `path` a mount point whose FUSE server is gone ("Transport endpoint is not connected")?
/// statfs, not stat: the kernel answers stat from its attribute cache (long TTLs) even
/// after the server died, while statfs always reaches the server.
pub fn is_stale(path: &Path) -> bool {
    let by_stat =
        matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    by_stat
        || matches!(
            nix::sys::statfs::statfs(path),
            Err(nix::errno::Errno::ENOTCONN)
        )
}

/// Mount points listed in /proc/self/mountinfo (unescaped).
pub fn mount_points() -> Vec<(PathBuf, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mp = unescape(fields.get(4)?);
            let fstype = fields.get(sep + 1)?.to_string();
            Some((PathBuf::from(mp), fstype))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(path: &Path) -> bool {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mount_points()
        .iter()
        .any(|(mp, _)| *mp == canon || mp == path)
}

/// Lazily detaches whatever is mounted at `path`.
pub fn detach(path: &Path) -> std::io::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)
}

/// Checks a mount point before mounting; recovers a stale mount left by a killed server.
pub fn prepare_mount_point(path: &Path) -> Result<(), MountError> {
    if is_stale(path) {
        tracing::warn!(path = %path.display(), "recovering stale mount left by a dead server");
        detach(path).map_err(|source| MountError::Io {
            path: path.into(),
            source,
        })?;
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::NoMountPoint(path.into()))
        }
        Err(source) => {
            return Err(MountError::Io {
                path: path.into(),
                source,
            })
        }
        Ok(m) if !m.is_dir() => return Err(MountError::NotADirectory(path.into())),
        Ok(_) => {}
    }
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if mount_points()
        .iter()
        .any(|(mp, t)| *mp == canon && t.starts_with("fuse"))
    {
        return Err(MountError::AlreadyMounted(path.into()));
    }
    Ok(())
}

/// How to serve a volume.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub allow_other: bool,
    pub threads: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            allow_other: false,
            threads: 4,
        }
    }
}

/// A volume being served at a mount point.
pub struct Served {
    pub volume: String,
    pub mountpoint: PathBuf,
    /// The FUSE connection's number under `/sys/fs/fuse/connections` (the device minor of
    /// the mount), read right after mounting: a lazily detached mount is no longer listed.
    connection: Option<u32>,
    /// The host mount point was unmounted (or detached) already.
    unmounted: bool,
    session: Option<fuser::BackgroundSession>,
    store: Store,
    metrics: Arc<Metrics>,
}

/// Mounts volume `name` of `store` at `mountpoint` and serves it on background threads.
///
/// The session's filesystem owns the open volume, so the volume counts as open (and
/// cannot be deleted or served a second time) until the session's last thread has ended,
/// however the mount ends: [`Served::stop`], an external unmount, or an aborted connection.
pub fn serve(
    store: &Store,
    name: &str,
    mountpoint: &Path,
    opts: &ServeOptions,
    metrics: Arc<Metrics>,
) -> Result<Served, MountError> {
    prepare_mount_point(mountpoint)?;
    crate::fsck::recount_if_needed(store, name)?;
    let vol = store.open_volume(name)?;
    let ops = metrics.volume_ops(vol.volume());
    let fs = Arc::new(Fs::new(store.clone(), vol)?);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("fusevol:{name}")),
        // A kernel option (fuser's Subtype only reaches fusermount): /proc/mounts shows fuse.fusevol.
        MountOption::CUSTOM("subtype=fusevol".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::RW,
    ];
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let session =
        fuser::Session::new(FuseFs::new(fs, ops), mountpoint, &config).map_err(|source| {
            metrics.forget_volume(name);
            MountError::Mount {
                path: mountpoint.into(),
                source,
            }
        })?;
    // Mounted now (Session::new mounts): the connection number is in mountinfo.
    let connection = fuse_connection(mountpoint);
    let session = session.spawn().map_err(|source| {
        metrics.forget_volume(name);
        MountError::Mount {
            path: mountpoint.into(),
            source,
        }
    })?;
    tracing::info!(volume = name, mountpoint = %mountpoint.display(), ?connection, "serving");
    Ok(Served {
        volume: name.to_string(),
        mountpoint: mountpoint.to_path_buf(),
        connection,
        unmounted: false,
        session: Some(session),
        store: store.clone(),
        metrics,
    })
}

/// The FUSE connection number of the fuse mount at `path` (its device minor), from
/// /proc/self/mountinfo.
pub fn fuse_connection(path: &Path) -> Option<u32> {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        let fstype = fields.get(sep + 1)?;
        if !fstype.starts_with("fuse") || Path::new(&unescape(fields.get(4)?)) != canon {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        // FUSE superblocks are anonymous devices: major 0, the minor is the connection.
        (major == "0").then(|| minor.parse().ok()).flatten()
    })
}

/// Where the kernel's fusectl filesystem lists FUSE connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Aborts FUSE connection `conn`: every mount of it (bind mounts in pods included) fails
/// every request with ENOTCONN from now on, and the server's reads end with ENODEV. Mounts
/// fusectl first if nobody has (a fresh container's /sys does not have it).
pub fn abort_connection(conn: u32) -> std::io::Result<()> {
    let abort = Path::new(FUSECTL).join(conn.to_string()).join("abort");
    if !abort.exists()
        && !mount_points()
            .iter()
            .any(|(mp, t)| mp == Path::new(FUSECTL) && t == "fusectl")
    {
        nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(std::io::Error::from)?;
    }
    match std::fs::write(&abort, b"1") {
        // The connection is gone already: nothing left to abort.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

impl Served {
    /// Has the session ended (someone unmounted the volume)?
    pub fn finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the session to end. A mount kept alive past `grace` (open
    /// files, or bind mounts elsewhere, as kubelet makes for every pod using a volume) has
    /// its FUSE connection aborted: once the volume is stopped, nothing reaches it any
    /// more, so its data can be deleted and its id never serves anyone else. Acknowledged
    /// writes are made durable. Fails with [`MountError::SessionLive`] (and the volume
    /// stays open, so it cannot be deleted) if the session does not end even so.
    pub fn stop(mut self, grace: Duration) -> Result<(), MountError> {
        self.stop_inner(grace)
    }

    /// Unmounts the host mount point (lazily if busy) without waiting for the session:
    /// lets a caller with many volumes unmount them all first and then wait once.
    pub fn unmount(&mut self) -> Result<(), MountError> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        if self.unmounted || session.guard.is_finished() {
            return Ok(());
        }
        self.unmounted = true;
        if let Err(e) = nix::mount::umount(&self.mountpoint) {
            if e != nix::errno::Errno::EINVAL {
                tracing::warn!(error = %e, mountpoint = %self.mountpoint.display(), "busy; detaching lazily");
                detach(&self.mountpoint).map_err(|source| MountError::Io {
                    path: self.mountpoint.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn stop_inner(&mut self, grace: Duration) -> Result<(), MountError> {
        let mut result = self.unmount();
        let Some(session) = self.session.take() else {
            return result;
        };
        if !wait_finished(&session, grace) {
            self.abort(&session);
        }
        if session.guard.is_finished() {
            if let Err(e) = session.join() {
                tracing::warn!(error = %e, "FUSE session ended with an error");
            }
            // fuser's session thread ends early when a worker panicked, while the other
            // workers go on serving: the volume is closed only when all of them are gone.
            if self.store.is_open(&self.volume) {
                self.abort_workers();
            }
            if self.store.is_open(&self.volume) {
                tracing::error!(volume = %self.volume, "FUSE workers still serve after abort; the volume stays open");
                result = Err(MountError::SessionLive(self.volume.clone()));
            }
        } else {
            // The threads keep the volume open (they own it): it cannot be deleted.
            tracing::error!(volume = %self.volume, "FUSE session still live after abort; the volume stays open");
            result = Err(MountError::SessionLive(self.volume.clone()));
        }
        self.metrics.forget_volume(&self.volume);
        // A failed sync (a full or failing disk) must not skip the rest: report it.
        if let Err(e) = self.store.sync() {
            tracing::error!(volume = %self.volume, error = %e, "sync after unmount failed");
            result = result.and(Err(e.into()));
        }
        result
    }

    /// Aborts the connection of a session that outlived its unmount, and waits for its
    /// threads (a few seconds: an aborted connection ends every read at once).
    fn abort(&self, session: &fuser::BackgroundSession) {
        let Some(conn) = self.connection else {
            tracing::error!(volume = %self.volume, "mount still in use and its FUSE connection unknown: cannot abort it");
            return;
        };
        tracing::warn!(volume = %self.volume, conn, "mount still in use elsewhere (bind mounts, open files); aborting its FUSE connection");
        if let Err(e) = abort_connection(conn) {
            tracing::error!(volume = %self.volume, conn, error = %e, "cannot abort the FUSE connection");
            return;
        }
        wait_finished(session, Duration::from_secs(10));
    }
}

impl Served {
    /// Aborts the connection of workers that outlived their session thread, and waits
    /// (10 s at most) for them to drop the volume.
    fn abort_workers(&self) {
        let Some(conn) = self.connection else {
            return;
        };
        tracing::warn!(volume = %self.volume, conn, "FUSE workers outlived their session; aborting the connection");
        if let Err(e) = abort_connection(conn) {
            tracing::error!(volume = %self.volume, conn, error = %e, "cannot abort the FUSE connection");
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.store.is_open(&self.volume) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn wait_finished(session: &fuser::BackgroundSession, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !session.guard.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    session.guard.is_finished()
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.stop_inner(Duration::from_secs(5));
    }
}

/// How often an idle store is checked for memtables to give back.
pub const IDLE_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// What `fusevol mount` was asked to do.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub data: PathBuf,
    pub volume: String,
    pub quota: Option<u64>,
    pub inodes: Option<u64>,
    pub mountpoint: PathBuf,
    /// Chunk size for a new store.
    pub chunk_size: Option<u64>,
    /// Free-space floor of the store's disk (`None`: the default).
    pub free_space_floor: Option<u64>,
    pub serve: ServeOptions,
}

/// `fusevol mount`: opens (or creates) the store and volume, serves it, and returns after
/// SIGINT/SIGTERM or an external unmount, with everything flushed.
pub fn run(req: &MountRequest) -> Result<(), MountError> {
    // Check the mount point before touching the store, so a typo changes nothing.
    prepare_mount_point(&req.mountpoint)?;
    let mut sopts = store::StoreOptions {
        free_space_floor: req.free_space_floor,
        ..Default::default()
    };
    if let Some(cs) = req.chunk_size {
        sopts.chunk_size = u32::try_from(cs)
            .ok()
            .filter(|c| c.is_power_of_two() && (4096..=(4 << 20)).contains(c))
            .ok_or(store::Error::InvalidChunkSize(cs))?;
    }
    let store = Store::open_or_create(&req.data, &sopts)?;
    match store.inspect_volume(&req.volume) {
        Ok(info) => {
            let quota = req.quota.filter(|q| info.quota_bytes != Some(*q));
            let inodes = req.inodes.filter(|n| info.inode_limit != Some(*n));
            if quota.is_some() || inodes.is_some() {
                store.resize_volume(&req.volume, quota.map(Some), inodes.map(Some))?;
            }
        }
        Err(store::Error::VolumeNotFound(_)) => {
            store.create_volume(&req.volume, req.quota, req.inodes)?;
        }
        Err(e) => return Err(e.into()),
    }
    let metrics = Arc::new(Metrics::new());
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, term.clone()).map_err(|source| MountError::Io {
            path: req.mountpoint.clone(),
            source,
        })?;
    }
    if let Err(e) = crate::control::serve(store.clone(), metrics.clone()) {
        tracing::warn!(error = %e, "control socket unavailable: volume commands will not reach this process");
    }
    let served = serve(&store, &req.volume, &req.mountpoint, &req.serve, metrics)?;
    eprintln!(
        "fusevol: serving volume {:?} of {} at {} (Ctrl-C to unmount)",
        req.volume,
        req.data.display(),
        req.mountpoint.display()
    );
    let mut last_idle_check = Instant::now();
    while !term.load(Ordering::Acquire) && !served.finished() {
        std::thread::sleep(Duration::from_millis(50));
        store.reclaim_if_wanted();
        if last_idle_check.elapsed() >= IDLE_FLUSH_INTERVAL {
            last_idle_check = Instant::now();
            if let Err(e) = store.flush_if_idle(1 << 20) {
                tracing::warn!(error = %e, "idle flush failed");
            }
        }
    }
    let external = served.finished() && !term.load(Ordering::Acquire);
    served.stop(Duration::from_secs(10))?;
    let _ = std::fs::remove_file(crate::control::socket_path(&req.data));
    if external {
        tracing::info!("unmounted externally");
    }
    Ok(())
}
