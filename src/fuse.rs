//! The FUSE adapter: translates fuser requests into calls on the filesystem core and
//! its results into replies. No filesystem logic lives here; errno values are produced
//! only here, from [`FsError::errno`].
//!
//! Kernel settings chosen for speed (see the README's "Speed" section): the writeback
//! cache (the kernel absorbs small buffered writes and sends page-aligned runs), 1 MiB
//! max_write, readdirplus, parallel directory operations, long entry/attribute TTLs and
//! cached negative lookups (fusevol is the only writer of its volumes), and
//! `FOPEN_KEEP_CACHE` so the page cache survives reopening a file.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::data::Seek;
use crate::fs::xattr::XattrReply;
use crate::fs::{Answering, Attr, Caller, Fs, FsError, SetAttr, SetTime, Unique, BLOCK_SIZE};
use crate::fs::{Kind, Timestamp};
use crate::metrics::OpMetrics;

/// How long the kernel may cache entries and attributes. fusevol is the only writer of
/// a volume, so these can be long; the kernel invalidates what it changes itself.
pub const TTL: Duration = Duration::from_secs(3600);
pub const MAX_WRITE: u32 = 1 << 20;

/// Test hook: `FUSEVOL_TEST_CRASH_BEFORE_REPLY=<op>` (a FUSE operation: `mkdir`,
/// `rename`, ...) makes the server kill itself (SIGKILL) once it has carried out and
/// committed that operation, before it answers: the moment a crash does the most harm,
/// as the request is sent again to the next server. Only tests set it.
pub const CRASH_BEFORE_REPLY_ENV: &str = "FUSEVOL_TEST_CRASH_BEFORE_REPLY";

pub struct FuseFs {
    fs: Arc<Fs>,
    metrics: Arc<OpMetrics>,
    /// The operation of [`CRASH_BEFORE_REPLY_ENV`], if set.
    crash_before_reply: Option<String>,
}

impl FuseFs {
    pub fn new(fs: Arc<Fs>, metrics: Arc<OpMetrics>) -> Self {
        let crash_before_reply = std::env::var(CRASH_BEFORE_REPLY_ENV).ok();
        FuseFs {
            fs,
            metrics,
            crash_before_reply,
        }
    }

    /// The namespace operations as answers to `req` (a resent request is answered from
    /// its record: see [`Answering`]).
    fn answering(&self, req: &Request) -> Answering<'_> {
        self.fs.answering(Unique(req.unique().0))
    }

    /// See [`CRASH_BEFORE_REPLY_ENV`].
    fn crash_point<T>(&self, op: &str, r: &Result<T, FsError>) {
        if r.is_ok() && self.crash_before_reply.as_deref() == Some(op) {
            tracing::warn!(
                op,
                "{CRASH_BEFORE_REPLY_ENV}: killing this server before it answers"
            );
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn to_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.to_system(),
        mtime: a.mtime.to_system(),
        ctime: a.ctime.to_system(),
        crtime: a.crtime.to_system(),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// A negative entry: node id 0 tells the kernel to cache "no such name" for the TTL.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

fn errno(op: &'static str, e: &FsError) -> Errno {
    if let FsError::Store(inner) = e {
        tracing::error!(op, error = %inner, "store failure");
    }
    Errno::from_i32(e.errno())
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(from_request_time(t)),
    }
}

/// A time from a request (the vendored fuser converts every `(sec, nsec)` the kernel can
/// send without panicking; see vendor/fuser/PATCHES.md).
fn from_request_time(t: SystemTime) -> Timestamp {
    Timestamp::from_system(t)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// Runs `f`, counting the operation and its latency.
macro_rules! op {
    ($self:ident, $name:literal, $reply:ident, $body:expr, |$v:ident| $ok:expr) => {{
        let _t = $self.metrics.start($name);
        match $body {
            Ok($v) => $ok,
            Err(e) => {
                _t.failed();
                $reply.error(errno($name, &e))
            }
        }
    }};
}

/// The capabilities fusevol asks for at INIT (beyond fuser's defaults).
const INIT_FLAGS: [InitFlags; 8] = [
    InitFlags::FUSE_WRITEBACK_CACHE,
    InitFlags::FUSE_DO_READDIRPLUS,
    InitFlags::FUSE_READDIRPLUS_AUTO,
    InitFlags::FUSE_PARALLEL_DIROPS,
    InitFlags::FUSE_CACHE_SYMLINKS,
    InitFlags::FUSE_ASYNC_DIO,
    InitFlags::FUSE_MAX_PAGES,
    // We clear set-id bits and capabilities ourselves; in exchange the kernel
    // marks the superblock SB_NOSEC and stops asking for security.capability
    // before every write (a round trip per write otherwise).
    InitFlags::FUSE_HANDLE_KILLPRIV_V2,
];

/// Why a connection another server initialised cannot be served by this binary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitMismatch {
    #[error("FUSE protocol {0}.{1}: this binary speaks 7.x only")]
    Protocol(u32, u32),
    #[error("the connection's max_write of {0} bytes exceeds this binary's request buffer ({1} bytes): larger writes would fail with EIO")]
    MaxWrite(u32, usize),
    #[error("the connection was granted capabilities this binary does not serve ({0:?}): it was made by another (newer?) fusevol")]
    Unknown(InitFlags),
}

/// Every capability this binary may grant: its own, and what fuser asks for by itself.
fn servable_flags() -> InitFlags {
    INIT_FLAGS.into_iter().fold(
        InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_INIT_EXT,
        |all, f| all | f,
    )
}

/// Checks what INIT negotiated on a connection another server (maybe another version of
/// fusevol) initialised, before this binary serves it: the kernel sends INIT once per
/// connection, so what it granted then is what this server gets. Refuses what this binary
/// cannot serve (another protocol major, a larger `max_write` than its request buffer,
/// or a capability it never grants, which may change what requests look like or what the
/// server must do: a rolled-back binary must not guess); otherwise returns the
/// capabilities this binary asks for and the kernel offers but the connection lacks (they
/// take effect at the volume's next fresh mount).
pub fn check_adopted_init(init: fuser::InitState) -> Result<Vec<InitFlags>, InitMismatch> {
    if init.major != 7 {
        return Err(InitMismatch::Protocol(init.major, init.minor));
    }
    if init.max_write as usize > fuser::MAX_WRITE_SIZE {
        return Err(InitMismatch::MaxWrite(
            init.max_write,
            fuser::MAX_WRITE_SIZE,
        ));
    }
    let granted = InitFlags::from_bits_retain(init.granted);
    let unknown = granted - servable_flags();
    if !unknown.is_empty() {
        return Err(InitMismatch::Unknown(unknown));
    }
    Ok(INIT_FLAGS
        .into_iter()
        .filter(|f| init.kernel_has(*f) && !granted.contains(*f))
        .collect())
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for flag in INIT_FLAGS {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        if let Err(max) = config.set_max_readahead(MAX_WRITE) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _t = self.metrics.start("lookup");
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &to_attr(&a), Generation(0)),
            Err(FsError::NotFound) => reply.entry(&TTL, &negative_entry(), Generation(0)),
            Err(e) => {
                _t.failed();
                reply.error(errno("lookup", &e))
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        op!(self, "getattr", reply, self.fs.getattr(ino.0), |a| reply
            .attr(&TTL, &to_attr(&a)))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(from_request_time),
            // fuser does not pass FATTR_KILL_SUIDGID; an unprivileged truncate is what sets it.
            kill_privs: size.is_some() && req.uid() != 0,
        };
        op!(self, "setattr", reply, self.fs.setattr(ino.0, s), |a| reply
            .attr(&TTL, &to_attr(&a)))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        op!(self, "readlink", reply, self.fs.readlink(ino.0), |t| reply
            .data(&t))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.answering(req).create_node(
            caller(req),
            parent.0,
            name.as_bytes(),
            mode,
            rdev,
            None,
        );
        self.crash_point("mknod", &r);
        op!(self, "mknod", reply, r, |a| reply.entry(
            &TTL,
            &to_attr(&a),
            Generation(0)
        ))
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mode = (mode & 0o7777) | libc::S_IFDIR;
        let r =
            self.answering(req)
                .create_node(caller(req), parent.0, name.as_bytes(), mode, 0, None);
        self.crash_point("mkdir", &r);
        op!(self, "mkdir", reply, r, |a| reply.entry(
            &TTL,
            &to_attr(&a),
            Generation(0)
        ))
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.answering(req).unlink(parent.0, name.as_bytes());
        self.crash_point("unlink", &r);
        op!(self, "unlink", reply, r, |_v| reply.ok())
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.answering(req).rmdir(parent.0, name.as_bytes());
        self.crash_point("rmdir", &r);
        op!(self, "rmdir", reply, r, |_v| reply.ok())
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.answering(req).create_node(
            caller(req),
            parent.0,
            link_name.as_bytes(),
            libc::S_IFLNK | 0o777,
            0,
            Some(target.as_os_str().as_bytes()),
        );
        self.crash_point("symlink", &r);
        op!(self, "symlink", reply, r, |a| reply.entry(
            &TTL,
            &to_attr(&a),
            Generation(0)
        ))
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.answering(req).rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        self.crash_point("rename", &r);
        op!(self, "rename", reply, r, |_v| reply.ok())
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self
            .answering(req)
            .link(ino.0, newparent.0, newname.as_bytes());
        self.crash_point("link", &r);
        op!(self, "link", reply, r, |a| reply.entry(
            &TTL,
            &to_attr(&a),
            Generation(0)
        ))
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        let _t = self.metrics.start("forget");
        if let Err(e) = self.fs.forget(ino.0) {
            _t.failed();
            // No reply to a FORGET: log it; the orphan stays for the next fresh mount.
            tracing::warn!(ino = ino.0, error = %e, "forget: cannot delete an unlinked inode");
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        op!(self, "open", reply, self.fs.open(ino.0), |_v| reply
            .opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE))
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        op!(
            self,
            "read",
            reply,
            self.fs.read(ino.0, offset, size),
            |d| { reply.data(&d) }
        )
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        op!(
            self,
            "write",
            reply,
            self.fs.write(ino.0, offset, data, kill),
            |n| { reply.written(n) }
        )
    }

    /// FLUSH (sent on every close) has nothing to do here: writes are committed when they
    /// arrive and the kernel writes dirty pages back before it would send FLUSH. ENOSYS
    /// makes the kernel stop sending it, which saves one round trip per close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        op!(self, "release", reply, self.fs.release(ino.0), |_v| reply
            .ok())
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        op!(self, "fsync", reply, self.fs.fsync(), |_v| reply.ok())
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        op!(
            self,
            "readdir",
            reply,
            self.fs.readdir(ino.0, offset, 256),
            |entries| {
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        e.cookie,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
        )
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listed = self.fs.readdir(ino.0, offset, 128).and_then(|entries| {
            entries
                .into_iter()
                .map(|e| {
                    let a = self.fs.getattr(e.ino)?;
                    Ok((e, a))
                })
                .collect::<Result<Vec<_>, FsError>>()
        });
        op!(self, "readdirplus", reply, listed, |entries| {
            for (e, a) in entries {
                if reply.add(
                    INodeNo(e.ino),
                    e.cookie,
                    OsStr::from_bytes(&e.name),
                    &TTL,
                    &to_attr(&a),
                    Generation(0),
                ) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        op!(self, "fsyncdir", reply, self.fs.fsync(), |_v| reply.ok())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        op!(self, "statfs", reply, self.fs.statfs(), |s| reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize
        ))
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self
            .answering(req)
            .setxattr(ino.0, name.as_bytes(), value, flags);
        self.crash_point("setxattr", &r);
        op!(self, "setxattr", reply, r, |_v| reply.ok())
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.fs.getxattr(ino.0, name.as_bytes(), size);
        match r {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            // Absence is the common answer (the kernel asks for security.capability
            // before writes): not an error worth counting.
            Err(FsError::NoData) => reply.error(Errno::from_i32(libc::ENODATA)),
            Err(e) => reply.error(errno("getxattr", &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(errno("listxattr", &e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.answering(req).removexattr(ino.0, name.as_bytes());
        self.crash_point("removexattr", &r);
        op!(self, "removexattr", reply, r, |_v| reply.ok())
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mode = if mode & libc::S_IFMT == 0 {
            mode | libc::S_IFREG
        } else {
            mode
        };
        // Replayed, the entry comes from its record and is opened again: the kernel gets
        // one handle, as it asked for one.
        let r = self
            .answering(req)
            .create_node(caller(req), parent.0, name.as_bytes(), mode, 0, None)
            .and_then(|a| {
                self.fs.open(a.ino)?;
                Ok(a)
            });
        self.crash_point("create", &r);
        op!(self, "create", reply, r, |a| reply.created(
            &TTL,
            &to_attr(&a),
            Generation(0),
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE
        ))
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.fallocate(ino.0, offset, length, mode);
        op!(self, "fallocate", reply, r, |_v| reply.ok())
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let what = match whence {
            libc::SEEK_DATA => Seek::Data,
            libc::SEEK_HOLE => Seek::Hole,
            _ => return reply.error(Errno::from_i32(libc::EINVAL)),
        };
        if offset < 0 {
            return reply.error(Errno::from_i32(libc::ENXIO));
        }
        let r = self.fs.seek(ino.0, offset as u64, what);
        op!(self, "lseek", reply, r, |o| reply.offset(o as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(granted: InitFlags, kernel: InitFlags) -> fuser::InitState {
        fuser::InitState {
            major: 7,
            minor: 45,
            kernel_flags: kernel.bits(),
            granted: granted.bits(),
            max_write: MAX_WRITE,
        }
    }

    #[test]
    fn an_adopted_connection_is_checked_against_what_this_binary_asks_for() {
        let all = INIT_FLAGS
            .into_iter()
            .fold(InitFlags::empty(), |a, f| a | f);
        assert_eq!(check_adopted_init(init(all, all)), Ok(vec![]));
        // Made by an older binary that did not ask for the writeback cache.
        let older = all - InitFlags::FUSE_WRITEBACK_CACHE;
        assert_eq!(
            check_adopted_init(init(older, all)),
            Ok(vec![InitFlags::FUSE_WRITEBACK_CACHE])
        );
        // What the kernel never offered is not missing.
        assert_eq!(check_adopted_init(init(older, older)), Ok(vec![]));
        let mut other = init(all, all);
        other.major = 8;
        assert_eq!(
            check_adopted_init(other),
            Err(InitMismatch::Protocol(8, 45))
        );
        // Granted by a binary that serves more than this one.
        let newer = all | InitFlags::FUSE_POSIX_ACL;
        assert_eq!(
            check_adopted_init(init(newer, newer)),
            Err(InitMismatch::Unknown(InitFlags::FUSE_POSIX_ACL))
        );
        // A connection served through io_uring cannot be taken over: the requests its
        // rings held are not given again.
        let uring = all | InitFlags::FUSE_OVER_IO_URING;
        assert_eq!(
            check_adopted_init(init(uring, uring)),
            Err(InitMismatch::Unknown(InitFlags::FUSE_OVER_IO_URING))
        );
        // fuser's own requests are servable.
        let with_fuser = all | InitFlags::FUSE_ASYNC_READ | InitFlags::FUSE_BIG_WRITES;
        assert_eq!(check_adopted_init(init(with_fuser, with_fuser)), Ok(vec![]));
        let mut big = init(all, all);
        big.max_write = (fuser::MAX_WRITE_SIZE + 4096) as u32;
        assert!(matches!(
            check_adopted_init(big),
            Err(InitMismatch::MaxWrite(..))
        ));
    }
}
