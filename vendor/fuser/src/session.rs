//! Filesystem session
//!
//! A session runs a filesystem implementation while it is being mounted to a specific mount
//! point. A session begins by mounting the filesystem and ends by unmounting it. While the
//! filesystem is mounted, the session loop receives, dispatches and replies to kernel requests
//! for filesystem operations under its mount point.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::thread::{self};

use log::debug;
use log::error;
use log::info;
use log::warn;
use nix::unistd::Uid;
use nix::unistd::geteuid;
use parking_lot::Mutex;

use crate::Errno;
use crate::Filesystem;
use crate::KernelConfig;
use crate::MountOption;
use crate::ReplyEmpty;
use crate::Request;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::dev_fuse::DevFuse;
use crate::drain::Drain;
use crate::ll;
use crate::ll::Operation;
use crate::ll::ResponseErrno;
use crate::ll::Version;
use crate::ll::flags::init_flags::InitFlags;
use crate::ll::fuse_abi as abi;
use crate::mnt::Mount;
use crate::mnt::mount_options::Config;
use crate::mnt::mount_options::check_option_conflicts;
use crate::notify::Notifier;
use crate::read_buf::FuseReadBuf;
use crate::reply::Reply;
use crate::reply::ReplyRaw;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;

/// The max size of write requests from the kernel. The absolute minimum is 4k,
/// FUSE recommends at least 128k, max 16M. The FUSE default is 16M on macOS
/// and 128k on other systems.
/// fusevol patch: public, so that a server can check a connection's max_write against it.
pub const MAX_WRITE_SIZE: usize = 16 * 1024 * 1024;

#[derive(Default, Debug, Eq, PartialEq, Clone, Copy)]
/// How requests should be filtered based on the calling UID.
pub enum SessionACL {
    /// Allow requests from any user. Corresponds to the `allow_other` mount option.
    All,
    /// Allow requests from root. Corresponds to the `allow_root` mount option.
    RootAndOwner,
    /// Allow requests from the owning UID. This is FUSE's default mode of operation.
    #[default]
    Owner,
}

impl SessionACL {
    /// Returns the mount option string for kernel/fusermount/libfuse paths.
    /// Both `All` and `RootAndOwner` map to `allow_other` - the kernel only
    /// understands `allow_other`, and fuser enforces the root-only restriction internally.
    #[allow(dead_code)]
    pub(crate) fn to_mount_option(self) -> Option<&'static str> {
        match self {
            SessionACL::All | SessionACL::RootAndOwner => Some("allow_other"),
            SessionACL::Owner => None,
        }
    }
}

/// Calls `destroy` on drop.
#[derive(Debug)]
pub(crate) struct FilesystemHolder<FS: Filesystem> {
    pub(crate) fs: Option<FS>,
}

impl<FS: Filesystem> FilesystemHolder<FS> {
    fn destroy(&mut self) {
        if let Some(mut fs) = self.fs.take() {
            fs.destroy();
        }
    }
}

impl<FS: Filesystem> Drop for FilesystemHolder<FS> {
    fn drop(&mut self) {
        self.destroy();
    }
}

#[derive(Debug)]
struct UmountOnDrop {
    mount: Arc<Mutex<Option<Mount>>>,
}

impl UmountOnDrop {
    fn umount(&self) -> io::Result<()> {
        if let Some(mount) = self.mount.lock().take() {
            mount.umount()?;
        }
        Ok(())
    }
}

impl Drop for UmountOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.umount() {
            warn!("Failed to umount filesystem: {}", e);
        }
    }
}

/// fusevol patch: what INIT negotiated on a connection, enough to serve it again from
/// another process without a new INIT (the kernel sends INIT once per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitState {
    /// Protocol version the kernel announced.
    pub major: u32,
    /// Protocol minor the kernel announced.
    pub minor: u32,
    /// Every capability the kernel offered (`flags2` included).
    pub kernel_flags: u64,
    /// The capabilities the reply granted.
    pub granted: u64,
    /// `max_write` of the reply.
    pub max_write: u32,
}

impl InitState {
    /// Did the kernel offer `flag`?
    pub fn kernel_has(&self, flag: InitFlags) -> bool {
        InitFlags::from_bits_retain(self.kernel_flags).contains(flag)
    }
}

/// The session data structure
#[derive(Debug)]
pub struct Session<FS: Filesystem> {
    /// Filesystem operation implementations. None after `destroy` called.
    pub(crate) filesystem: FilesystemHolder<FS>,
    /// Communication channel to the kernel driver
    pub(crate) ch: Channel,
    /// Handle to the mount.  Dropping this unmounts.
    mount: UmountOnDrop,
    /// Whether to restrict access to owner, root + owner, or unrestricted
    /// Used to implement `allow_root` and `auto_unmount`
    pub(crate) allowed: SessionACL,
    /// User that launched the fuser process
    pub(crate) session_owner: Uid,
    /// FUSE protocol version, as reported by the kernel.
    /// The field is set to `Some` when the init message is received.
    pub(crate) proto_version: Option<Version>,
    pub(crate) config: Config,
    /// fusevol patch: what INIT negotiated (set by the handshake or given to
    /// [`Session::from_initialized`]).
    init_state: Option<InitState>,
    /// fusevol patch: the channels the workers will read from, made ahead of
    /// [`Session::run`] by [`Session::device_fds`] or given to [`Session::from_initialized`].
    channels: Vec<Channel>,
    /// fusevol patch: workers read only through clones of the device fd, never through
    /// the fd itself (see [`Session::read_through_clones`]).
    read_through_clones: bool,
    /// fusevol patch: stops the workers between requests (see [`Drain`]).
    drain: Drain,
    /// fusevol patch 6: the io_uring rings made at INIT (see `uring.rs`).
    uring: Option<crate::uring::Rings>,
}

impl<FS: Filesystem> AsFd for Session<FS> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ch.as_fd()
    }
}

impl<FS: Filesystem> Session<FS> {
    /// Create a new session by mounting the given filesystem to the given mountpoint
    /// # Errors
    /// Returns an error if the options are incorrect, or if the fuse device can't be mounted.
    pub fn new<P: AsRef<Path>>(
        filesystem: FS,
        mountpoint: P,
        options: &Config,
    ) -> io::Result<Session<FS>> {
        check_option_conflicts(options)?;

        let mountpoint = mountpoint.as_ref();
        info!("Mounting {}", mountpoint.display());
        // If AutoUnmount is requested, but not AllowRoot or AllowOther, return an error
        // because fusermount needs allow_root or allow_other to handle the auto_unmount option
        if options.mount_options.contains(&MountOption::AutoUnmount)
            && options.acl == SessionACL::Owner
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("auto_unmount requires acl != Owner, got: {:?}", options.acl),
            ));
        }
        let (file, mount) = Mount::new(mountpoint, &options.mount_options, options.acl)?;

        let ch = Channel::new(file);

        let mut session = Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(Some(mount))),
            },
            allowed: options.acl,
            session_owner: geteuid(),
            proto_version: None,
            config: options.clone(),
            init_state: None,
            channels: Vec::new(),
            read_through_clones: false,
            drain: Drain::default(),
            uring: None,
        };

        session.handshake()?;

        Ok(session)
    }

    /// Wrap an existing /dev/fuse file descriptor. This doesn't mount the
    /// filesystem anywhere; that must be done separately.
    pub fn from_fd(
        filesystem: FS,
        fd: OwnedFd,
        acl: SessionACL,
        config: Config,
    ) -> io::Result<Self> {
        let ch = Channel::new(Arc::new(DevFuse(File::from(fd))));
        let mut session = Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(None)),
            },
            allowed: acl,
            session_owner: geteuid(),
            proto_version: None,
            config,
            init_state: None,
            channels: Vec::new(),
            read_through_clones: false,
            drain: Drain::default(),
            uring: None,
        };

        session.handshake()?;

        Ok(session)
    }

    /// fusevol patch: serves a connection whose INIT another process answered, through
    /// `fds` (one worker per fd: the connection's device fd and its clones, as
    /// [`Session::device_fds`] returned them). No handshake, no mount.
    /// # Errors
    /// Returns an error if `fds` is empty.
    pub fn from_initialized(
        filesystem: FS,
        fds: Vec<OwnedFd>,
        acl: SessionACL,
        config: Config,
        init: InitState,
    ) -> io::Result<Self> {
        let channels: Vec<Channel> = fds
            .into_iter()
            .map(|fd| Channel::new(Arc::new(DevFuse(File::from(fd)))))
            .collect();
        let Some(ch) = channels.first().cloned() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no /dev/fuse fd to serve",
            ));
        };
        Ok(Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(None)),
            },
            allowed: acl,
            session_owner: geteuid(),
            proto_version: Some(Version(init.major, init.minor)),
            config,
            init_state: Some(init),
            channels,
            read_through_clones: false,
            drain: Drain::default(),
            uring: None,
        })
    }

    /// fusevol patch: what INIT negotiated (None before the handshake).
    pub fn init_state(&self) -> Option<InitState> {
        self.init_state
    }

    /// fusevol patch: makes the channels the workers will read from (the device fd and,
    /// with `clone_fd`, one clone per further worker) and returns a duplicate of each, for
    /// a process that keeps the connection alive when this one dies. Requests read through
    /// a clone that no other process holds are aborted when this process dies, so a holder
    /// needs all of them.
    /// # Errors
    /// Returns an error if cloning or duplicating an fd fails.
    pub fn device_fds(&mut self) -> io::Result<Vec<OwnedFd>> {
        if self.channels.is_empty() {
            self.channels = self.make_channels()?;
        }
        self.channels
            .iter()
            .map(|ch| ch.as_fd().try_clone_to_owned())
            .collect()
    }

    /// fusevol patch: makes every worker read through a clone of the device fd (made at
    /// [`Session::run`]), and none through the fd itself; replaces channels given to
    /// [`Session::from_initialized`] by clones of the first. A holder that keeps only the
    /// device fd then keeps the connection alive when this process dies, while the
    /// requests this process had read fail (ECONNABORTED) instead of waiting forever: the
    /// choice for kernels without `FUSE_NOTIFY_RESEND`.
    pub fn read_through_clones(&mut self) {
        self.read_through_clones = true;
        if let Some(first) = self.channels.first().cloned() {
            self.ch = first;
        }
        self.channels.clear();
    }

    /// fusevol patch: a duplicate of the device fd.
    /// # Errors
    /// Returns an error if duplicating fails.
    pub fn device_fd(&self) -> io::Result<OwnedFd> {
        self.ch.as_fd().try_clone_to_owned()
    }

    fn make_channels(&self) -> io::Result<Vec<Channel>> {
        let n_threads = self.config.n_threads.unwrap_or(1).max(1);
        let mut channels = Vec::with_capacity(n_threads);
        if !self.read_through_clones {
            channels.push(self.ch.clone());
        }
        while channels.len() < n_threads {
            if self.config.clone_fd || self.read_through_clones {
                #[cfg(target_os = "linux")]
                {
                    channels.push(self.ch.clone_fd()?);
                    continue;
                }
                #[cfg(not(target_os = "linux"))]
                {
                    return Err(io::Error::other("clone_fd is only supported on Linux"));
                }
            } else {
                channels.push(self.ch.clone());
            }
        }
        Ok(channels)
    }

    /// Run the session loop in a background thread. If the returned handle is dropped,
    /// the filesystem is unmounted and the given session ends.
    pub fn spawn(self) -> io::Result<BackgroundSession> {
        let sender = self.ch.sender();
        let drain = self.drain.clone();
        // Take the fuse_session, so that we can unmount it
        let mount = std::mem::take(&mut *self.mount.mount.lock());
        let guard = thread::Builder::new()
            .name("fuser-bg".to_string())
            .spawn(move || self.run())?;
        Ok(BackgroundSession {
            guard,
            sender,
            mount,
            drain,
        })
    }

    /// Run the session loop that receives kernel requests and dispatches them to method
    /// calls into the filesystem. This read-dispatch-loop is non-concurrent to prevent
    /// having multiple buffers (which take up much memory), but the filesystem methods
    /// may run concurrent by spawning threads.
    /// # Errors
    /// Returns any final error when the session comes to an end.
    pub fn run(mut self) -> io::Result<()> {
        let n_threads = self.config.n_threads.unwrap_or(1);
        // fusevol patch: workers take turns at reading (see `reading_role.rs`).
        let role = (self.config.split_data && n_threads > 1)
            .then(|| Arc::new(crate::reading_role::ReadingRole::default()));

        if !cfg!(target_os = "linux") && n_threads != 1 {
            // TODO: check whether it works on macOS/FreeBSD and enable if it works.
            return Err(io::Error::other(
                "n_threads != 1 is only supported on Linux",
            ));
        }
        // fusevol patch: the channels may have been made already (see `device_fds`).
        if self.channels.is_empty() {
            self.channels = self.make_channels()?;
        }
        let Session {
            filesystem,
            ch: _,
            mount: _do_not_umount_yet,
            allowed,
            session_owner,
            proto_version: _,
            config: _,
            init_state: _,
            channels,
            read_through_clones: _,
            drain,
            uring,
        } = self;

        let mut filesystem = Arc::new(filesystem);

        let mut threads = Vec::with_capacity(n_threads);
        let first_channel = channels.first().cloned();
        // fusevol patch 6: with rings, one /dev/fuse worker is enough (FORGETs and
        // INTERRUPTs; everything if the kernel refused the rings and fell back).
        let channels: Vec<Channel> = if uring.is_some() {
            channels.into_iter().take(1).collect()
        } else {
            channels
        };

        for (i, ch) in channels.into_iter().enumerate() {
            let thread_name = format!("fuser-{i}");
            let event_loop = SessionEventLoop {
                thread_name: thread_name.clone(),
                filesystem: filesystem.clone(),
                ch,
                allowed,
                session_owner,
                drain: drain.clone(),
                role: role.clone(),
            };
            threads.push(
                thread::Builder::new()
                    .name(thread_name)
                    .spawn(move || event_loop.event_loop())?,
            );
        }

        // fusevol patch 6: one thread per io_uring ring, beside the /dev/fuse workers
        // (which still carry FORGETs and INTERRUPTs).
        for (i, ring) in uring
            .map(crate::uring::Rings::into_inner)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let Some(ch) = first_channel.clone() else {
                break;
            };
            let thread_name = format!("fuser-uring-{i}");
            let event_loop = SessionEventLoop {
                thread_name: thread_name.clone(),
                filesystem: filesystem.clone(),
                ch,
                allowed,
                session_owner,
                drain: drain.clone(),
                role: None,
            };
            // A ring not started leaves its CPU's requests waiting for ever (the kernel
            // waits for every queue): the process ends instead.
            match thread::Builder::new()
                .name(thread_name)
                .spawn(move || crate::uring::serve(ring, event_loop))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    error!(
                        "cannot start a FUSE io_uring thread: {e}; ending the process rather than leaving requests unanswered"
                    );
                    std::process::abort();
                }
            }
        }

        let mut reply: io::Result<()> = Ok(());
        for thread in threads {
            let res = match thread.join() {
                Ok(res) => res,
                Err(_) => {
                    return Err(io::Error::other("event loop thread panicked"));
                }
            };
            if let Err(e) = res {
                if reply.is_ok() {
                    reply = Err(e);
                }
            }
        }

        let Some(filesystem) = Arc::get_mut(&mut filesystem) else {
            return Err(io::Error::other(
                "BUG: must have one refcount for filesystem",
            ));
        };

        filesystem.destroy();

        reply
    }

    fn handshake(&mut self) -> io::Result<()> {
        let mut buf = FuseReadBuf::new();
        let buf = buf.as_mut();

        loop {
            // Read the init request from the kernel
            let size = match self.ch.receive_retrying(buf) {
                Ok(size) => size,
                Err(nix::errno::Errno::ENODEV) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "FUSE device disconnected during handshake",
                    ));
                }
                Err(err) => return Err(err.into()),
            };

            // Parse the request
            let request = match ll::AnyRequest::try_from(&buf[..size]) {
                Ok(request) => request,
                Err(err) => {
                    error!("{err}");
                    return Err(io::Error::new(io::ErrorKind::InvalidData, err.to_string()));
                }
            };

            // Extract the init operation
            let op = match request.operation() {
                Ok(op) => op,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "Failed to parse FUSE operation",
                    ));
                }
            };

            let init = match op {
                ll::Operation::Init(init) => init,
                _ => {
                    error!("Received non-init FUSE operation before init: {}", request);
                    // Send error response and return error - non-init during handshake is invalid
                    <ReplyRaw as Reply>::new(
                        request.unique(),
                        ReplySender::Channel(self.ch.sender()),
                    )
                    .send_ll(&ResponseErrno(ll::Errno::EIO));
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "Received non-init FUSE operation during handshake",
                    ));
                }
            };

            let v = init.version();
            if v.0 > abi::FUSE_KERNEL_VERSION {
                // Kernel has a newer major version than we support.
                // Send our version and wait for a second INIT request with a compatible version.
                debug!(
                    "INIT: Kernel version {} > our version {}, sending our version and waiting for next init",
                    v.0,
                    abi::FUSE_KERNEL_VERSION
                );
                let response = init.reply_version_only();
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&response);
                continue;
            }

            // We don't support ABI versions before 7.6
            if v < Version(7, 6) {
                error!("Unsupported FUSE ABI version {v}");
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&ResponseErrno(ll::Errno::EPROTO));
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("Unsupported FUSE ABI version {v}"),
                ));
            }

            let mut config = KernelConfig::new(init.capabilities(), init.max_readahead(), v);

            // Call filesystem init method and give it a chance to return an error
            let Some(filesystem) = &mut self.filesystem.fs else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Bug: filesystem must be initialized during handshake",
                ));
            };
            let res = filesystem.init(Request::ref_cast(request.header()), &mut config);
            if let Err(error) = res {
                let errno = Errno::from_i32(error.raw_os_error().unwrap_or(0));
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&ResponseErrno(errno));
                return Err(error);
            }

            // fusevol patch 6: FUSE over io_uring, asked for only once its rings exist.
            if self.config.io_uring && init.capabilities().contains(InitFlags::FUSE_OVER_IO_URING) {
                let per_queue = self.config.n_threads.unwrap_or(1).max(1).div_ceil(2);
                let payload = crate::uring::max_payload(config.max_write, config.max_pages());
                match crate::uring::Rings::new(&self.ch.dev(), per_queue, payload) {
                    Ok(rings) => {
                        if config
                            .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                            .is_ok()
                        {
                            self.uring = Some(rings);
                        }
                    }
                    Err(e) => warn!("FUSE over io_uring not used: cannot make its rings: {e}"),
                }
            } else if self.config.io_uring {
                debug!(
                    "the kernel offers no FUSE over io_uring (fuse.enable_uring off or kernel before 6.14)"
                );
            }

            // Remember the ABI version supported by kernel and mark the session initialized.
            self.proto_version = Some(v);

            // Log capability status for debugging
            for bit in 0..64 {
                let bitflags = InitFlags::from_bits_retain(1 << bit);
                if bitflags == InitFlags::FUSE_INIT_EXT {
                    continue;
                }
                let bitflag_is_known = InitFlags::all().contains(bitflags);
                let kernel_supports = init.capabilities().contains(bitflags);
                let we_requested = config.requested.contains(bitflags);
                // On macOS, there's a clash between linux and macOS constants,
                // so we pick macOS ones (last).
                let name = if let Some((name, _)) = bitflags.iter_names().last() {
                    Cow::Borrowed(name)
                } else {
                    Cow::Owned(format!("(1 << {bit})"))
                };
                if we_requested && kernel_supports {
                    debug!("capability {name} enabled")
                } else if we_requested {
                    debug!("capability {name} not supported by kernel")
                } else if kernel_supports {
                    debug!("capability {name} not requested by client")
                } else if bitflag_is_known {
                    debug!("capability {name} not supported nor requested")
                }
            }

            // Reply with our desired version and settings.
            debug!(
                "INIT response: ABI {}.{}, flags {:#x}, max readahead {}, max write {}",
                abi::FUSE_KERNEL_VERSION,
                abi::FUSE_KERNEL_MINOR_VERSION,
                init.capabilities() & config.requested,
                config.max_readahead,
                config.max_write
            );

            let response = init.reply(&config);
            <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                .send_ll(&response);
            // fusevol patch: remember what was negotiated.
            self.init_state = Some(InitState {
                major: v.0,
                minor: v.1,
                kernel_flags: init.capabilities().bits(),
                granted: ((config.requested | InitFlags::FUSE_INIT_EXT) & init.capabilities())
                    .bits(),
                max_write: config.max_write,
            });

            return Ok(());
        }
    }

    /// Unmount the filesystem
    pub fn unmount(&mut self) -> io::Result<()> {
        self.mount.umount()
    }

    /// Returns a thread-safe object that can be used to unmount the Filesystem
    pub fn unmount_callable(&mut self) -> SessionUnmounter {
        SessionUnmounter {
            mount: self.mount.mount.clone(),
        }
    }

    /// Returns an object that can be used to send notifications to the kernel
    pub fn notifier(&self) -> Notifier {
        Notifier::new(self.ch.sender())
    }
}

#[derive(Debug)]
/// A thread-safe object that can be used to unmount a Filesystem
pub struct SessionUnmounter {
    mount: Arc<Mutex<Option<Mount>>>,
}

impl SessionUnmounter {
    /// Unmount the filesystem
    pub fn unmount(&mut self) -> io::Result<()> {
        if let Some(mount) = std::mem::take(&mut *self.mount.lock()) {
            mount.umount()?;
        }
        Ok(())
    }
}

pub(crate) struct SessionEventLoop<FS: Filesystem> {
    /// Cache thread name for faster `debug!`.
    pub(crate) thread_name: String,
    pub(crate) ch: Channel,
    pub(crate) filesystem: Arc<FilesystemHolder<FS>>,
    pub(crate) allowed: SessionACL,
    pub(crate) session_owner: Uid,
    /// fusevol patch: stops the loop between requests (see [`Drain`]).
    pub(crate) drain: Drain,
    /// fusevol patch: the turn at reading, shared by the workers (see `reading_role.rs`).
    pub(crate) role: Option<Arc<crate::reading_role::ReadingRole>>,
}

impl<FS: Filesystem> SessionEventLoop<FS> {
    fn event_loop(&self) -> io::Result<()> {
        // Buffer for receiving requests from the kernel. Only one is allocated and
        // it is reused immediately after dispatching to conserve memory and allocations.
        let mut buf = FuseReadBuf::new();
        let buf = buf.as_mut();
        // fusevol patch: listed until the loop ends, so that a drain can wake its read.
        let enlisted = self.drain.enlist();
        // fusevol patch: this worker's turn at reading, if the workers take turns.
        let mut turn = None;
        loop {
            if turn.is_none() {
                turn = self
                    .role
                    .as_deref()
                    .map(crate::reading_role::ReadingRole::take);
            }
            // fusevol patch: a drained session reads no more requests; the ones not
            // read stay queued in the kernel for the next server.
            enlisted.reading(true);
            if self.drain.stopping() {
                enlisted.reading(false);
                return Ok(());
            }
            // Read the next request from the given channel to kernel driver
            // The kernel driver makes sure that we get exactly one request per read
            let received = self.ch.receive(buf);
            enlisted.reading(false);
            match received {
                // fusevol patch: retried here rather than in `receive_retrying`, so that
                // the drain flag is checked again after an EINTR.
                Err(
                    nix::errno::Errno::ENOENT
                    | nix::errno::Errno::EINTR
                    | nix::errno::Errno::EAGAIN,
                ) => continue,
                Ok(size) => match RequestWithSender::new(self.ch.sender(), &buf[..size]) {
                    // fusevol patch: another worker reads while this one answers a data
                    // request.
                    Some(req)
                        if turn.is_some() && crate::reading_role::is_data_request(&buf[..size]) =>
                    {
                        turn = None;
                        req.dispatch(self);
                    }
                    // Dispatch request
                    Some(req) => {
                        if let Ok(Operation::Destroy(_)) = req.request.operation() {
                            req.reply::<ReplyEmpty>().ok();
                            return Ok(());
                        } else {
                            req.dispatch(self)
                        }
                    }
                    // Quit loop on illegal request
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "Invalid request",
                        ));
                    }
                },
                Err(nix::errno::Errno::ENODEV) => return Ok(()),
                Err(err) => return Err(err.into()),
            }
        }
    }
}

/// The background session data structure
#[derive(Debug)]
pub struct BackgroundSession {
    /// Thread guard of the background session
    pub guard: JoinHandle<io::Result<()>>,
    /// Object for creating Notifiers for client use
    sender: ChannelSender,
    /// Ensures the filesystem is unmounted when the session ends
    mount: Option<Mount>,
    /// fusevol patch: stops the workers between requests.
    drain: Drain,
}

impl BackgroundSession {
    /// Unmount the filesystem and join the background thread.
    pub fn umount_and_join(mut self) -> io::Result<()> {
        if let Some(mount) = self.mount.take() {
            mount.umount()?;
        }
        self.join()
    }

    /// Returns an object that can be used to send notifications to the kernel
    pub fn notifier(&self) -> Notifier {
        Notifier::new(self.sender.clone())
    }

    /// fusevol patch: gives up the mount without unmounting it: dropping this session no
    /// longer unmounts, so a process that hands the connection over (its fds kept by
    /// another process) leaves the mount in place for the next server.
    pub fn disown_mount(&mut self) {
        if let Some(mount) = self.mount.take() {
            std::mem::forget(mount);
        }
    }

    /// fusevol patch: stops the workers between requests, for a process about to leave
    /// the connection to the next server (see [`Drain`]).
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// Join the filesystem thread.
    pub fn join(self) -> io::Result<()> {
        self.guard
            .join()
            .map_err(|_panic: Box<dyn std::any::Any + Send>| {
                io::Error::new(
                    io::ErrorKind::Other,
                    "filesystem background thread panicked",
                )
            })?
    }
}
