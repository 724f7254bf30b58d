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
    session: Option<fuser::BackgroundSession>,
    store: Store,
    metrics: Arc<Metrics>,
}

/// Mounts volume `name` of `store` at `mountpoint` and serves it on background threads.
pub fn serve(
    store: &Store,
    name: &str,
    mountpoint: &Path,
    opts: &ServeOptions,
    metrics: Arc<Metrics>,
) -> Result<Served, MountError> {
    prepare_mount_point(mountpoint)?;
    let vol = store.open_volume(name)?;
    let fs = match Fs::new(store.clone(), vol.clone()) {
        Ok(fs) => Arc::new(fs),
        Err(e) => {
            store.close_volume(name);
            return Err(e.into());
        }
    };
    let ops = metrics.volume_ops(&vol);
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
    let session = fuser::Session::new(FuseFs::new(fs, ops), mountpoint, &config)
        .and_then(|s| s.spawn())
        .map_err(|source| {
            store.close_volume(name);
            metrics.forget_volume(name);
            MountError::Mount {
                path: mountpoint.into(),
                source,
            }
        })?;
    tracing::info!(volume = name, mountpoint = %mountpoint.display(), "serving");
    Ok(Served {
        volume: name.to_string(),
        mountpoint: mountpoint.to_path_buf(),
        session: Some(session),
        store: store.clone(),
        metrics,
    })
}

impl Served {
    /// Has the session ended (someone unmounted the volume)?
    pub fn finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the session to end (at most `grace`; a mount kept busy by
    /// open files is detached lazily). All acknowledged writes are made durable.
    pub fn stop(mut self, grace: Duration) -> Result<(), MountError> {
        self.stop_inner(grace)
    }

    fn stop_inner(&mut self, grace: Duration) -> Result<(), MountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        if !session.guard.is_finished() {
            if let Err(e) = nix::mount::umount(&self.mountpoint) {
                if e != nix::errno::Errno::EINVAL {
                    tracing::warn!(error = %e, mountpoint = %self.mountpoint.display(), "busy; detaching lazily");
                    if let Err(e) = detach(&self.mountpoint) {
                        result = Err(MountError::Io {
                            path: self.mountpoint.clone(),
                            source: e,
                        });
                    }
                }
            }
        }
        let deadline = Instant::now() + grace;
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if session.guard.is_finished() {
            if let Err(e) = session.join() {
                tracing::warn!(error = %e, "FUSE session ended with an error");
            }
        } else {
            tracing::warn!(volume = %self.volume, "session still busy after unmount; leaving it detached");
        }
        self.store.sync()?;
        self.store.close_volume(&self.volume);
        self.metrics.forget_volume(&self.volume);
        result
    }
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
    pub serve: ServeOptions,
}

/// `fusevol mount`: opens (or creates) the store and volume, serves it, and returns after
/// SIGINT/SIGTERM or an external unmount, with everything flushed.
pub fn run(req: &MountRequest) -> Result<(), MountError> {
    // Check the mount point before touching the store, so a typo changes nothing.
    prepare_mount_point(&req.mountpoint)?;
    let mut sopts = store::StoreOptions::default();
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
