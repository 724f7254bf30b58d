//! Serving one volume at a mount point: mount-point checks (including recovery of a
//! stale mount left by a killed server), the FUSE session, and a clean stop on
//! SIGINT/SIGTERM or when someone unmounts the volume. Used by `fusevol mount` and by
//! the node agent (which serves many volumes from one store).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};

use crate::bdi::DirtyLimit;
use crate::fdstore::{FdStore, Held};
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
    #[error("FUSE connection holder: {0}")]
    Holder(#[from] crate::fdstore::FdStoreError),
    #[error("{path}: the fd holder keeps this mount point's live connection for {held}; refusing to serve another volume on it (stop that mount first: Ctrl-C of its server, or `umount`)")]
    HeldByOther { path: PathBuf, held: String },
    #[error("{path}: cannot serve the live connection another server initialised: {mismatch} (serve it with the binary that made it, or unmount it)")]
    InitMismatch {
        path: PathBuf,
        mismatch: crate::fuse::InitMismatch,
    },
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
    /// The threads take turns at reading: metadata requests stay on the reader, data
    /// requests pass the reading on (see fuser's `reading_role.rs`).
    pub split_data: bool,
    /// Serve through FUSE over io_uring where the kernel offers it (never with a
    /// holder: see fuser's `uring.rs`).
    pub io_uring: bool,
    /// The FUSE connection holder: mounts outlive this process and the next server
    /// takes their connections over (see [`crate::fdstore`]).
    pub fdstore: Option<FdStore>,
    /// Serve as on a kernel without `FUSE_NOTIFY_RESEND` even if this one has it (tests).
    pub no_resend: bool,
    /// The most of the page cache the mount's dirty pages may take (see [`crate::bdi`]).
    pub max_dirty: DirtyLimit,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            allow_other: false,
            threads: 4,
            split_data: true,
            io_uring: false,
            fdstore: None,
            no_resend: std::env::var_os("FUSEVOL_NO_RESEND").is_some(),
            max_dirty: crate::bdi::DEFAULT,
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
    /// The stores of the volume's copies (one unless it is replicated).
    stores: Vec<Store>,
    metrics: Arc<Metrics>,
    /// The holder keeping this connection.
    held: Option<Hold>,
    /// Taken over from a previous server rather than mounted here.
    pub adopted: bool,
}

/// A connection in the holder's keeping: where, under which key, and this server's own
/// copies of what it holds (to hand them again to a holder that restarted).
struct Hold {
    holder: FdStore,
    key: String,
    record: Held,
    fds: Vec<std::os::fd::OwnedFd>,
}

impl Hold {
    fn put(&self, holder: &FdStore) -> Result<(), crate::fdstore::FdStoreError> {
        let borrowed: Vec<_> = self.fds.iter().map(|f| f.as_fd()).collect();
        holder.put(&self.key, &self.record, &borrowed)
    }
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
    if let Some(holder) = &opts.fdstore {
        if let Some(served) = take_over(store, name, mountpoint, opts, holder, &metrics)? {
            return Ok(served);
        }
    }
    prepare_mount_point(mountpoint)?;
    crate::fsck::recount_if_needed(store, name)?;
    let vol = store.open_volume(name)?;
    serve_open(std::slice::from_ref(store), vol, mountpoint, opts, metrics)
}

/// [`serve`] for replicated volume `name` from its copies in `stores` (brought level
/// first: see [`store::open_replicated`]), with the limits given set first. Never with a
/// holder: a server that takes a held
/// connection over opens one store.
pub fn serve_replicated(
    stores: &[Store],
    (name, (quota, inodes)): (&str, Limits),
    mountpoint: &Path,
    opts: &ServeOptions,
    metrics: Arc<Metrics>,
) -> Result<Served, MountError> {
    let mut opts = opts.clone();
    if opts.fdstore.take().is_some() {
        tracing::warn!(
            volume = name,
            "a replicated volume is not handed to the fd holder: a restart of this server ends its mount"
        );
    }
    prepare_mount_point(mountpoint)?;
    let vol = store::open_replicated(stores, name)?;
    if quota.is_some() || inodes.is_some() {
        // In every copy at once (one commit), before anything is served.
        vol.set_limits(quota.map(Some), inodes.map(Some))?;
    }
    serve_open(stores, vol, mountpoint, &opts, metrics)
}

/// Mounts open volume `vol` (copies in `stores`) at `mountpoint` and serves it.
fn serve_open(
    stores: &[Store],
    vol: store::OpenVolume,
    mountpoint: &Path,
    opts: &ServeOptions,
    metrics: Arc<Metrics>,
) -> Result<Served, MountError> {
    let name = vol.name.clone();
    let name = name.as_str();
    let store = vol.store().clone();
    let volume_id = vol.id;
    let ops = metrics.volume_ops(vol.volume());
    let fs = Arc::new(Fs::new(store.clone(), vol)?);
    let generation = fs.mount_generation();
    let config = session_config(name, opts);
    let mount_err = |source| {
        metrics.forget_volume(name);
        MountError::Mount {
            path: mountpoint.into(),
            source,
        }
    };
    let mut session =
        fuser::Session::new(FuseFs::new(fs, ops), mountpoint, &config).map_err(mount_err)?;
    // Mounted now (Session::new mounts): the connection number is in mountinfo.
    let connection = fuse_connection(mountpoint);
    crate::bdi::set_for_connection(connection, opts.max_dirty, name);
    let held = opts.fdstore.as_ref().and_then(|h| {
        hold(
            h,
            &mut session,
            &store,
            (name, volume_id, generation),
            mountpoint,
            connection,
            opts,
        )
    });
    let session = session.spawn().map_err(mount_err)?;
    tracing::info!(volume = name, mountpoint = %mountpoint.display(), ?connection, held = held.is_some(), "serving");
    Ok(Served {
        volume: name.to_string(),
        mountpoint: mountpoint.to_path_buf(),
        connection,
        unmounted: false,
        session: Some(session),
        stores: stores.to_vec(),
        metrics,
        held,
        adopted: false,
    })
}

fn session_config(name: &str, opts: &ServeOptions) -> Config {
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
    config.split_data = opts.split_data;
    config.io_uring = opts.io_uring && opts.fdstore.is_none();
    config
}

/// The key a connection is held under: the mount point as an absolute path, made without
/// touching the file system (a stat of a mount point whose server is gone would wait).
fn holder_key(mountpoint: &Path) -> String {
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    // The parent is no FUSE mount of ours: resolving it (symlinks, `..`) is safe, and it
    // makes every spelling of the mount point one key.
    let key = match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(abs),
        _ => abs,
    };
    key.to_string_lossy().into_owned()
}

/// Does the holder of `opts` keep a connection for `mountpoint` (then the mount is live
/// and its callers wait for a server: a stat of it would wait too)?
pub fn is_held(opts: &ServeOptions, mountpoint: &Path) -> bool {
    opts.fdstore.as_ref().is_some_and(|holder| {
        holder
            .list()
            .is_ok_and(|keys| keys.contains(&holder_key(mountpoint)))
    })
}

/// Does the kernel offer `FUSE_NOTIFY_RESEND` on this connection (and may we use it)?
fn resend_usable(init: fuser::InitState, opts: &ServeOptions) -> bool {
    !opts.no_resend && init.kernel_has(fuser::InitFlags::FUSE_HAS_RESEND)
}

/// Hands copies of a fresh session's device fds to the holder. With `FUSE_NOTIFY_RESEND`
/// it holds every fd the workers read from (so requests a dying server had read can be
/// resent); without, only the device fd, which the workers never read from (so those
/// requests fail with ECONNABORTED when the server dies, instead of waiting forever).
/// A failure is logged and the volume served without the holder.
fn hold(
    holder: &FdStore,
    session: &mut fuser::Session<FuseFs>,
    store: &Store,
    (name, volume_id, generation): (&str, u32, Option<u64>),
    mountpoint: &Path,
    conn: Option<u32>,
    opts: &ServeOptions,
) -> Option<Hold> {
    let init = session.init_state()?;
    let fds = if resend_usable(init, opts) {
        session.device_fds()
    } else {
        session.read_through_clones();
        session.device_fd().map(|fd| vec![fd])
    };
    let key = holder_key(mountpoint);
    let record = Held {
        volume: name.to_string(),
        store: store.dir().to_path_buf(),
        volume_id: Some(volume_id),
        conn,
        init: init.into(),
        generation,
    };
    let result = fds.map_err(|e| e.to_string()).and_then(|fds| {
        let hold = Hold {
            holder: holder.clone(),
            key,
            record,
            fds,
        };
        hold.put(holder).map(|()| hold).map_err(|e| e.to_string())
    });
    match result {
        Ok(hold) => {
            if let Err(error) = store.record_holder(holder.path()) {
                tracing::warn!(%error, "cannot note the fd holder in the store directory: `volume delete` and `fsck --repair` will not see that this volume is mounted");
            }
            Some(hold)
        }
        Err(error) => {
            tracing::error!(volume = name, %error, "cannot hand the FUSE connection to the holder: a restart of this server will end the mount");
            None
        }
    }
}

/// Serves `name` on the live connection the holder keeps for `mountpoint`, if it has
/// one that is still mounted there: no INIT, no mount; requests the previous server had
/// read but not answered are queued again (`FUSE_NOTIFY_RESEND`). `None` if there is
/// nothing to take over (a stale record is dropped).
fn take_over(
    store: &Store,
    name: &str,
    mountpoint: &Path,
    opts: &ServeOptions,
    holder: &FdStore,
    metrics: &Arc<Metrics>,
) -> Result<Option<Served>, MountError> {
    let key = holder_key(mountpoint);
    let (record, fds) = match holder.get(&key) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(None),
        // Unreachable holder: it may still keep a live connection here, and mounting
        // afresh would stat that mount point and wait forever. A clear error instead.
        Err(error) => return Err(MountError::Holder(error)),
    };
    let mounted = fuse_connection_at(Path::new(&key));
    if record.volume != name || record.conn.is_none() || mounted != record.conn {
        tracing::warn!(volume = name, held = ?record, ?mounted, "held connection is not this volume's live mount; dropping it");
        if let Err(error) = holder.remove(&key) {
            tracing::warn!(%error, "cannot drop the stale held connection");
        }
        return Ok(None);
    }
    let init: fuser::InitState = record.init.into();
    match crate::fuse::check_adopted_init(init) {
        Err(mismatch) => {
            return Err(MountError::InitMismatch {
                path: mountpoint.into(),
                mismatch,
            })
        }
        Ok(missing) if !missing.is_empty() => {
            tracing::warn!(volume = name, ?missing, "the live connection was initialised without capabilities this binary asks for: serving without them until the volume's next fresh mount");
        }
        Ok(_) => {}
    }
    let vol = store.open_volume(name)?;
    let same_store =
        std::fs::canonicalize(&record.store).ok() == std::fs::canonicalize(store.dir()).ok();
    if !same_store || record.volume_id.is_some_and(|id| id != vol.id) {
        // Another store's volume, or a volume made again under this name: the kernel's
        // caches on this connection refer to the other one's inodes. Keep it held.
        return Err(MountError::HeldByOther {
            path: mountpoint.into(),
            held: format!(
                "volume {:?} (id {:?}) of {}",
                record.volume,
                record.volume_id,
                record.store.display()
            ),
        });
    }
    let copies = fds
        .iter()
        .map(|f| f.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|source| MountError::Io {
            path: mountpoint.into(),
            source,
        })?;
    let ops = metrics.volume_ops(vol.volume());
    let fs = Arc::new(Fs::adopt(store.clone(), vol, record.generation)?);
    let mount_err = |source| {
        metrics.forget_volume(name);
        MountError::Mount {
            path: mountpoint.into(),
            source,
        }
    };
    let config = session_config(name, opts);
    let resend = resend_usable(init, opts);
    let mut session =
        fuser::Session::from_initialized(FuseFs::new(fs, ops), fds, config.acl, config, init)
            .map_err(mount_err)?;
    if !resend {
        session.read_through_clones();
    }
    // Before any worker reads: a resend moves every request read and unanswered back to
    // the queue, and a request this server's workers were already handling would run
    // twice.
    if resend {
        if let Err(error) = session.notifier().resend() {
            tracing::error!(volume = name, %error, "FUSE_NOTIFY_RESEND failed: requests the previous server had read stay unanswered");
        }
    }
    let session = session.spawn().map_err(mount_err)?;
    let conn = record.conn;
    // Set by the server that mounted it already; again, in case this one's bound differs.
    crate::bdi::set_for_connection(conn, opts.max_dirty, name);
    tracing::info!(volume = name, mountpoint = %mountpoint.display(), ?conn, resend, "took over the live FUSE connection");
    Ok(Some(Served {
        volume: name.to_string(),
        mountpoint: mountpoint.to_path_buf(),
        connection: conn,
        unmounted: false,
        session: Some(session),
        stores: vec![store.clone()],
        metrics: metrics.clone(),
        held: Some(Hold {
            holder: holder.clone(),
            key,
            record,
            fds: copies,
        }),
        adopted: true,
    }))
}

/// The FUSE connection number of the fuse mount at `path` (its device minor), from
/// /proc/self/mountinfo.
pub fn fuse_connection(path: &Path) -> Option<u32> {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    fuse_connection_at(&canon)
}

/// [`fuse_connection`] of an absolute path taken as is (no stat: safe on a mount point
/// whose server is gone).
fn fuse_connection_at(canon: &Path) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    connection_in(&text, canon)
}

/// The connection number of the last fuse mount at `canon` in a mountinfo text.
fn connection_in(mountinfo: &str, canon: &Path) -> Option<u32> {
    mountinfo.lines().rev().find_map(|l| {
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

    /// The key the holder keeps this connection under (None: not held).
    pub fn held_key(&self) -> Option<&str> {
        self.held.as_ref().map(|h| h.key.as_str())
    }

    /// Hands the connection to `holder` again when this process opened a new ownership
    /// session (the holder restarted and lost it; `held_in`: the session it was last
    /// handed under, updated), so that a restart of this server, or a hand-over, after
    /// the holder's still keeps the mount.
    pub fn hold_again_if_lost(&self, holder: &FdStore, held_in: &mut Option<u64>) {
        let Some(session) = holder.session() else {
            return; // Lost, not open again yet: the next check.
        };
        if self.held.is_none() || *held_in == Some(session) {
            return;
        }
        match self.hold_again(holder) {
            Ok(()) => {
                if held_in.is_some() {
                    tracing::warn!(volume = %self.volume, "the fd holder restarted; handed it the connection again");
                }
                *held_in = Some(session);
            }
            Err(error) => {
                tracing::warn!(volume = %self.volume, %error, "cannot hand the connection to the fd holder again")
            }
        }
    }

    /// Hands the connection to `holder` again (a holder that restarted lost it).
    pub fn hold_again(&self, holder: &FdStore) -> Result<(), crate::fdstore::FdStoreError> {
        match &self.held {
            Some(hold) => hold.put(holder),
            None => Ok(()),
        }
    }

    /// Stops reading requests on a held connection (the ones read are finished and
    /// answered; the others stay queued in the kernel for the next server). None if the
    /// connection is not held (it is stopped, not left) or already ended.
    fn start_drain(&self) -> Option<fuser::Drain> {
        self.held.as_ref()?;
        let drain = self.session.as_ref()?.drain();
        drain.stop();
        Some(drain)
    }

    /// Leaves the mount and its connection to the next server, for a process about to
    /// exit (a restart or an upgrade): nothing is unmounted, the holder keeps the
    /// connection, and requests wait in the kernel until the next server takes it over.
    /// Call [`drain`] first, then sync the store: then no request is half-done at exit.
    /// Without a holder, hands `self` back: the caller must stop it instead.
    #[must_use]
    pub fn leave_to_next_server(mut self) -> Option<Self> {
        if self.held.is_none() {
            return Some(self);
        }
        if let Some(session) = self.session.as_mut() {
            session.disown_mount();
        }
        tracing::info!(volume = %self.volume, "left to the next server");
        // No stop and no unmount: the workers serve on until this process exits.
        std::mem::forget(self);
        None
    }

    fn stop_inner(&mut self, grace: Duration) -> Result<(), MountError> {
        // First the holder's copy: then an unmount (or an abort) ends the connection.
        if let Some(hold) = self.held.take() {
            if let Err(error) = hold.holder.remove(&hold.key) {
                tracing::warn!(volume = %self.volume, %error, "cannot drop the held connection");
            }
        }
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
            if self.is_open() {
                self.abort_workers();
            }
            if self.is_open() {
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
        // A replicated volume is synced when one copy is (a failed copy's disk may be gone).
        let mut first_err = None;
        let mut synced = 0;
        for store in &self.stores {
            match store.sync() {
                Ok(()) => synced += 1,
                Err(e) => {
                    tracing::error!(volume = %self.volume, store = %store.dir().display(), error = %e, "sync after unmount failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if synced == 0 || self.stores.len() == 1 => result.and(Err(e.into())),
            _ => result,
        }
    }

    /// Whether any store still has the volume open (a FUSE worker still owns it).
    fn is_open(&self) -> bool {
        self.stores.iter().any(|s| s.is_open(&self.volume))
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
        while self.is_open() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How long a server leaving its connections waits for their requests in flight.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Drains the held connections of `served` before a hand-over: each stops reading, and
/// the requests already read are finished and answered, within `limit` for all of them.
/// Then the next server finds nothing half-done: it need not resend anything (kernels
/// without `FUSE_NOTIFY_RESEND` would fail such requests with ECONNABORTED) nor answer
/// anything from the replay ring. Returns how many connections did not drain in time
/// (their requests in flight are resent to the next server, as after a crash).
pub fn drain<'a>(served: impl IntoIterator<Item = &'a Served>, limit: Duration) -> usize {
    let started = Instant::now();
    let deadline = started + limit;
    let drains: Vec<(&str, fuser::Drain)> = served
        .into_iter()
        .filter_map(|s| Some((s.volume.as_str(), s.start_drain()?)))
        .collect();
    // All together: every connection's readers are signalled again every few ms, so a
    // slow request on one volume does not leave another's workers reading.
    while !drains.iter().all(|(_, d)| d.drained()) && Instant::now() < deadline {
        drains.iter().for_each(|(_, d)| d.poke());
        std::thread::sleep(Duration::from_millis(2));
    }
    let late = drains
        .iter()
        .filter(|(volume, d)| {
            let done = d.drained();
            if !done {
                tracing::warn!(
                    volume,
                    workers = d.workers(),
                    "requests still in flight at the hand-over: the next server gets them resent"
                );
            }
            !done
        })
        .count();
    tracing::info!(
        connections = drains.len(),
        late,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "drained for the hand-over"
    );
    late
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

/// Registers this process with the holder and, if a live server still serves
/// `mountpoint`, asks it to hand over and waits until it has exited (the store can be
/// opened only then). Returns whether the holder keeps a connection for `mountpoint`.
/// Problems with the holder are logged: the volume is then served without it.
fn claim_from_holder(
    holder: &mut FdStore,
    mountpoint: &Path,
    handover: Arc<AtomicBool>,
) -> (bool, bool) {
    if let Err(error) = holder.register(move || handover.store(true, Ordering::Release)) {
        tracing::error!(%error, "fd holder unreachable: serving without it (a restart will end the mount)");
        return (false, false);
    }
    let key = holder_key(mountpoint);
    let handed_over = holder.take_over_from_live(std::slice::from_ref(&key));
    (
        holder.list().is_ok_and(|keys| keys.contains(&key)),
        handed_over,
    )
}

/// Runs `open` (which opens stores) and, right after a hand-over, runs it again while it
/// fails because a store is locked, for 10 s at most: the previous server's session with
/// the holder may close before its exit has released the stores' lock files.
pub fn after_hand_over<T, E>(
    handed_over: bool,
    locked: impl Fn(&E) -> bool,
    mut open: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Err(e) if handed_over && locked(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// How often an idle store is checked for memtables to give back.
pub const IDLE_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// How often `fusevol mount` checks that the fd holder still holds its connection.
const HOLD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What `fusevol mount` was asked to do.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub data: PathBuf,
    /// The other stores of a replicated volume (`--data` given again).
    pub mirrors: Vec<PathBuf>,
    /// Copies of a new volume (`None`: one; see [`store::create_replicated`]).
    pub replicas: Option<u32>,
    pub volume: String,
    pub quota: Option<u64>,
    pub inodes: Option<u64>,
    /// Compression of a new volume (`None`: none; an existing volume keeps its own).
    pub compression: Option<store::Compression>,
    /// Encryption of a new volume (`None`: none); an existing volume keeps its own, and
    /// asking for another is refused.
    pub encryption: Option<store::Encryption>,
    /// The master key of an encrypted volume (`--key-file`).
    pub key: Option<store::MasterKey>,
    pub mountpoint: PathBuf,
    /// Chunk size for a new store.
    pub chunk_size: Option<u64>,
    /// Free-space floor of the store's disk (`None`: the default).
    pub free_space_floor: Option<u64>,
    /// Memory budget of the store (caches and write buffers).
    pub memory_budget: u64,
    /// Turn the kernel's `fuse.wake_here` on for the node (see [`crate::wake`]).
    pub fuse_wake_here: bool,
    pub serve: ServeOptions,
}

/// Creates the volume of `req` if it does not exist, or brings an existing one to the
/// quota and inode limit asked; gives the store the volume's key.
fn prepare_volume(store: &Store, req: &MountRequest) -> Result<(), MountError> {
    let name = &req.volume;
    let info = match store.inspect_volume(name) {
        Ok(info) => info,
        Err(store::Error::VolumeNotFound(_)) => {
            let new = store::NewVolume {
                quota: req.quota,
                inode_limit: req.inodes,
                compression: req.compression.unwrap_or_default(),
                encryption: new_volume_key(req)?,
            };
            store.create_volume_with(name, &new)?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    check_existing(store, &info, req)
}

/// Brings existing volume `info` of `store` to the quota and inode limit asked, gives the
/// store its key, and refuses another encryption than its own.
fn check_existing(
    store: &Store,
    info: &store::VolumeInfo,
    req: &MountRequest,
) -> Result<(), MountError> {
    let (quota, inodes) = limits_asked(info, req, store)?;
    if quota.is_some() || inodes.is_some() {
        store.resize_volume(&req.volume, quota.map(Some), inodes.map(Some))?;
    }
    Ok(())
}

/// Checks what `req` asks of existing volume `info` of `store` (another encryption is
/// refused; another compression or copy count is kept, with a warning), gives the store
/// the volume's key, and returns the quota and inode limit to change (`None`: as they are).
fn limits_asked(
    info: &store::VolumeInfo,
    req: &MountRequest,
    store: &Store,
) -> Result<(Option<u64>, Option<u64>), MountError> {
    let name = &req.volume;
    let has = info.encryption.algorithm;
    if req.encryption.is_some_and(|asked| asked != has) {
        return Err(store::Error::Unsupported(format!(
            "volume {name:?} exists with encryption {has}, chosen at its creation: it cannot be served as another (use a new volume)"
        ))
        .into());
    }
    match &req.key {
        Some(key) => store.unlock(name, key)?,
        None if !has.is_none() => return Err(store::Error::KeyRequired(name.clone()).into()),
        None => {}
    }
    if let Some(asked) = req.compression.filter(|c| *c != info.compression.algorithm) {
        tracing::warn!(volume = %name, compression = %info.compression.algorithm, asked = %asked,
            "the volume exists with another compression, fixed at its creation: keeping it");
    }
    let copies = info.replicas.as_ref().map_or(1, |r| r.wanted);
    if req.replicas.is_some_and(|asked| asked != copies) {
        tracing::warn!(volume = %name, copies, "the volume exists with another number of copies, fixed at its creation: keeping it");
    }
    Ok((
        req.quota.filter(|q| info.quota_bytes != Some(*q)),
        req.inodes.filter(|n| info.inode_limit != Some(*n)),
    ))
}

/// Removes the control sockets of `stores` (at exit).
fn remove_sockets(stores: &[Store]) {
    for s in stores {
        let _ = std::fs::remove_file(crate::control::socket_path(s.dir()));
    }
}

/// Opens the stores in `dirs` (a replicated volume's other copies: `--data` given again).
/// One that cannot be opened (its disk gone or failing) is left out: the volume is served
/// from the others, degraded.
fn open_dirs(dirs: &[&PathBuf], sopts: &store::StoreOptions) -> Vec<Store> {
    let mut stores = Vec::new();
    for dir in dirs {
        match Store::open_or_create(dir, sopts) {
            Ok(s) => stores.push(s),
            Err(e) => tracing::error!(store = %dir.display(), error = %e,
                "cannot open the store of a copy: serving the volume without it (degraded)"),
        }
    }
    stores
}

/// Whether `store` holds (a copy of) volume `name`, readable or not.
fn holds(store: &Store, name: &str) -> bool {
    !matches!(
        store.inspect_volume(name),
        Err(store::Error::VolumeNotFound(_))
    )
}

/// Creates replicated volume `req.volume` in `stores` if none holds it (copies: `--replicas`,
/// else one per store), or checks what is asked of the copies that exist and returns the
/// limits to change (set once the copies are assembled); gives every store the volume's
/// key.
fn prepare_replicated(stores: &[Store], req: &MountRequest) -> Result<Limits, MountError> {
    let name = &req.volume;
    let mut holders = Vec::new();
    for s in stores {
        match s.inspect_volume(name) {
            Ok(info) => holders.push((s, info)),
            Err(store::Error::VolumeNotFound(_)) => {}
            // A copy being rewritten, or one that cannot be read: the assembly decides.
            Err(e) => tracing::warn!(volume = %name, store = %s.dir().display(), error = %e,
                "cannot inspect the copy in this store"),
        }
    }
    if holders.is_empty() {
        let new = store::NewVolume {
            quota: req.quota,
            inode_limit: req.inodes,
            compression: req.compression.unwrap_or_default(),
            encryption: new_volume_key(req)?,
        };
        let copies = req.replicas.unwrap_or(stores.len() as u32);
        store::create_replicated(stores, name, &new, copies)?;
        return Ok((None, None));
    }
    let (mut quota, mut inodes) = (None, None);
    for (s, info) in &holders {
        let (q, i) = limits_asked(info, req, s)?;
        quota = quota.or(q);
        inodes = inodes.or(i);
    }
    Ok((quota, inodes))
}

/// A quota and inode limit to set (`None`: as they are).
type Limits = (Option<u64>, Option<u64>);

/// The master key of a new volume (`None`: not encrypted), from the request's
/// `--encryption` and `--key-file`.
fn new_volume_key(req: &MountRequest) -> Result<Option<store::MasterKey>, MountError> {
    let name = &req.volume;
    match (req.encryption.unwrap_or_default(), &req.key) {
        (store::Encryption::None, None) => Ok(None),
        (store::Encryption::Aes256Gcm, Some(key)) => Ok(Some(key.clone())),
        (store::Encryption::Aes256Gcm, None) => Err(store::Error::Unsupported(
            "--encryption aes-256-gcm needs --key-file (the volume's master key)".into(),
        )
        .into()),
        (store::Encryption::None, Some(_)) => Err(store::Error::Unsupported(format!(
            "--key-file given for new volume {name:?} without --encryption: add --encryption aes-256-gcm to create it encrypted, or drop --key-file"
        ))
        .into()),
    }
}

/// `fusevol mount`: opens (or creates) the store and volume, serves it, and returns after
/// SIGINT/SIGTERM or an external unmount, with everything flushed.
pub fn run(req: &MountRequest) -> Result<(), MountError> {
    let handover = Arc::new(AtomicBool::new(false));
    let mut serve_opts = req.serve.clone();
    let (held_here, handed_over) = match &mut serve_opts.fdstore {
        Some(holder) => claim_from_holder(holder, &req.mountpoint, handover.clone()),
        None => (false, false),
    };
    // Check the mount point before touching the store, so a typo changes nothing (not a
    // held one: its server may be gone, and a stat would wait for the next).
    if !held_here {
        prepare_mount_point(&req.mountpoint)?;
    }
    // Each store of a replicated volume's copies has the whole budget: halving it halved
    // the memtables, so 1 GiB written left 267 blob and table files per store instead of
    // 31, and compactions to match.
    let mut sopts = store::StoreOptions {
        free_space_floor: req.free_space_floor,
        memory_budget: req.memory_budget,
        ..Default::default()
    };
    if let Some(cs) = req.chunk_size {
        sopts.chunk_size = u32::try_from(cs)
            .ok()
            .filter(|c| c.is_power_of_two() && (4096..=(4 << 20)).contains(c))
            .ok_or(store::Error::InvalidChunkSize(cs))?;
    }
    // The other copies' directories that exist first: whether the volume exists decides
    // what a missing directory is (a disk not there, or one to create the volume on).
    let (present, missing): (Vec<&PathBuf>, Vec<&PathBuf>) =
        req.mirrors.iter().partition(|d| d.is_dir());
    let mirrors = open_dirs(&present, &sopts);
    let in_mirrors = mirrors.iter().any(|s| holds(s, &req.volume));
    if in_mirrors && !req.data.is_dir() {
        return Err(store::Error::Unsupported(format!(
            "{} does not exist, and volume {:?} exists in another --data directory: give the directories that exist first (for a replacement disk, create the directory empty)",
            req.data.display(),
            req.volume
        ))
        .into());
    }
    let store = after_hand_over(
        handed_over,
        |e| matches!(e, store::Error::Locked(_)),
        || Store::open_or_create(&req.data, &sopts),
    )?;
    let exists = in_mirrors || holds(&store, &req.volume);
    let mut stores = vec![store.clone()];
    stores.extend(mirrors);
    if exists {
        for dir in &missing {
            // A disk that is not there (not mounted): never a new store on the
            // filesystem below. A replacement disk is given as an empty directory.
            tracing::error!(store = %dir.display(),
                "the store directory of a copy does not exist: serving the volume without it (degraded; for a replacement disk, create the directory empty)");
        }
    } else {
        stores.extend(open_dirs(&missing, &sopts));
    }
    let replicated = !req.mirrors.is_empty()
        || req.replicas.is_some_and(|n| n > 1)
        || store
            .inspect_volume(&req.volume)
            .is_ok_and(|i| i.replicas.is_some());
    let limits = if replicated {
        prepare_replicated(&stores, req)?
    } else {
        prepare_volume(&store, req)?;
        (None, None)
    };
    let metrics = Arc::new(Metrics::new());
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, term.clone()).map_err(|source| MountError::Io {
            path: req.mountpoint.clone(),
            source,
        })?;
    }
    // One socket per store: a replicated volume's state can be inspected through any of
    // its disks (the first may be the one that failed).
    for s in &stores {
        if let Err(e) = crate::control::serve(s.clone(), metrics.clone()) {
            tracing::warn!(store = %s.dir().display(), error = %e, "control socket unavailable: volume commands will not reach this process");
        }
    }
    crate::wake::apply(req.fuse_wake_here);
    if serve_opts.io_uring {
        crate::wake::enable_uring(serve_opts.fdstore.is_some());
    }
    let served = if replicated {
        let volume = (req.volume.as_str(), limits);
        serve_replicated(&stores, volume, &req.mountpoint, &serve_opts, metrics)?
    } else {
        serve(&store, &req.volume, &req.mountpoint, &serve_opts, metrics)?
    };
    eprintln!(
        "fusevol: serving volume {:?} of {} at {} (Ctrl-C to unmount)",
        req.volume,
        req.data.display(),
        req.mountpoint.display()
    );
    let mut last_idle_check = Instant::now();
    let mut last_hold_check = Instant::now();
    // The holder's session the connection was handed under (by `serve`).
    let mut held_in = serve_opts.fdstore.as_ref().and_then(FdStore::session);
    let sigterm = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, sigterm.clone()).map_err(
        |source| MountError::Io {
            path: req.mountpoint.clone(),
            source,
        },
    )?;
    while !term.load(Ordering::Acquire) && !served.finished() && !handover.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
        stores.iter().for_each(Store::reclaim_if_wanted);
        if last_idle_check.elapsed() >= IDLE_FLUSH_INTERVAL {
            last_idle_check = Instant::now();
            for s in &stores {
                if let Err(e) = s.flush_if_idle(1 << 20) {
                    tracing::warn!(store = %s.dir().display(), error = %e, "idle flush failed");
                }
            }
        }
        if last_hold_check.elapsed() >= HOLD_CHECK_INTERVAL {
            last_hold_check = Instant::now();
            if let Some(holder) = &serve_opts.fdstore {
                served.hold_again_if_lost(holder, &mut held_in);
            }
        }
    }
    // SIGTERM or a take-over with a holder: leave the mount to the next server.
    let served = if handover.load(Ordering::Acquire) || sigterm.load(Ordering::Acquire) {
        // Nothing half-done at exit: drain, then make everything answered durable.
        drain([&served], DRAIN_LIMIT);
        // A failed sync (a full or failing disk) still leaves the mount to the next server
        // (ending it would fail every caller for good); the exit status says so.
        let results: Vec<_> = stores.iter().map(Store::sync).collect();
        // A replicated volume's copies: durable when one of them is.
        let synced = match results.iter().position(Result::is_ok) {
            Some(_) => Ok(()),
            None => results
                .into_iter()
                .find_map(Result::err)
                .map_or(Ok(()), Err),
        };
        if let Err(e) = &synced {
            tracing::error!(error = %e, "sync before leaving the mount failed: what was written since the last fsync may be lost");
        }
        match served.leave_to_next_server() {
            None => {
                eprintln!(
                    "fusevol: left {} to the next server",
                    req.mountpoint.display()
                );
                remove_sockets(&stores);
                // Exit now: no destructor may unmount or close what the next server takes.
                std::process::exit(if synced.is_ok() { 0 } else { 1 });
            }
            Some(served) => {
                synced?;
                served
            }
        }
    } else {
        served
    };
    let external = served.finished() && !term.load(Ordering::Acquire);
    served.stop(Duration::from_secs(10))?;
    remove_sockets(&stores);
    if external {
        tracing::info!("unmounted externally");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
47 27 0:40 / /var/tmp/a\\040b rw,nosuid,nodev,relatime shared:20 - fuse.fusevol fusevol:v rw,user_id=0
48 27 0:42 / /var/tmp/c rw,nosuid,nodev,relatime - fuse /store rw,user_id=0
49 27 0:43 / /var/tmp/c rw,nosuid,nodev,relatime - fuse.fusevol fusevol:w rw,user_id=0
50 27 7:1 / /var/tmp/d rw,relatime - ext4 /dev/loop1 rw
";

    #[test]
    fn the_connection_is_the_minor_of_the_last_fuse_mount_at_the_path() {
        let at = |p: &str| connection_in(MOUNTINFO, Path::new(p));
        assert_eq!(at("/var/tmp/a b"), Some(40), "octal escapes are undone");
        assert_eq!(at("/var/tmp/c"), Some(43), "the mount on top counts");
        assert_eq!(at("/var/tmp/d"), None, "not a FUSE mount");
        assert_eq!(at("/"), None);
        assert_eq!(at("/var/tmp/nowhere"), None);
    }
}
