//! The FUSE connection holder (`fusevol fdstore`) and its client.
//!
//! A FUSE connection lives as long as any open file description of its `/dev/fuse` device
//! (the server's fd and each of its clones). The holder is a small process that keeps a
//! copy of every fd of every volume a server serves, received over a unix socket
//! (SOCK_SEQPACKET, SCM_RIGHTS), together with what INIT negotiated. When the server
//! dies, the connections stay up: the kernel keeps queueing requests (callers wait), and
//! the next server takes the fds back, sends `FUSE_NOTIFY_RESEND` for the requests the
//! dead one had read but not answered, and serves on, without INIT and without remounting.
//!
//! Owns: the wire protocol (one JSON message per packet, fds as ancillary data), the
//! holder's table (key -> fds + the server's record of them), the ownership sessions that
//! let a new server ask the live one to hand over ([`FdStore::takeover`]), and dropping
//! the fds of connections that ended (unmounted or aborted: the device polls POLLERR).
//! It knows nothing of volumes beyond the record the server stores ([`Held`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest message (JSON) of the protocol.
const MAX_MSG: usize = 64 * 1024;
/// Most fds in one message (one volume's device fd and its clones).
pub const MAX_FDS: usize = 64;
/// How long a take-over waits for the live server to hand over.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client waits for the holder's answer to any other request: a hung holder
/// is an error, not a hung server or command.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the holder looks for connections that ended.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum FdStoreError {
    #[error("fd holder socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fd holder at {0} is already running")]
    Running(PathBuf),
    #[error("fd holder protocol: {0}")]
    Protocol(String),
    #[error("fd holder refused: {0}")]
    Refused(String),
}

pub type Result<T, E = FdStoreError> = std::result::Result<T, E>;

/// What INIT negotiated on a connection (fuser's [`fuser::InitState`], serializable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRecord {
    pub major: u32,
    pub minor: u32,
    pub kernel_flags: u64,
    pub granted: u64,
    pub max_write: u32,
}

impl From<fuser::InitState> for InitRecord {
    fn from(s: fuser::InitState) -> Self {
        InitRecord {
            major: s.major,
            minor: s.minor,
            kernel_flags: s.kernel_flags,
            granted: s.granted,
            max_write: s.max_write,
        }
    }
}

impl From<InitRecord> for fuser::InitState {
    fn from(r: InitRecord) -> Self {
        fuser::InitState {
            major: r.major,
            minor: r.minor,
            kernel_flags: r.kernel_flags,
            granted: r.granted,
            max_write: r.max_write,
        }
    }
}

/// The server's record of one held connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The volume served on it.
    pub volume: String,
    /// The store directory of the volume.
    pub store: PathBuf,
    /// The volume's id in its store (ids are never reused: a volume deleted and made
    /// again under the same name has another, and must not take over the old one's
    /// connection, whose kernel caches refer to the old volume's inodes).
    #[serde(default)]
    pub volume_id: Option<u32>,
    /// The connection's number under /sys/fs/fuse/connections (the mount's device minor).
    pub conn: Option<u32>,
    pub init: InitRecord,
    /// The volume's mount generation taken by the fresh mount that made the connection:
    /// records of its requests answer them again when the kernel resends them after a
    /// take-over (see `crate::fs::Answering`). `None` from servers that kept none.
    #[serde(default)]
    pub generation: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// Opens an ownership session on this connection (kept open for the server's life).
    Hello {
        pid: u32,
    },
    Put {
        key: String,
        meta: Value,
        owner: Option<u64>,
    },
    Get {
        key: String,
        owner: Option<u64>,
    },
    Remove {
        key: String,
    },
    List,
    /// Asks the live owners of `keys` to hand over, and waits until they have exited.
    Takeover {
        keys: Vec<String>,
        owner: Option<u64>,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    released: Option<usize>,
}

impl Response {
    fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    fn error(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// The event the holder sends on an ownership session.
const RELEASE_EVENT: &[u8] = br#"{"event":"release"}"#;

// ----- wire -----

fn send(sock: BorrowedFd<'_>, msg: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(msg)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message and its fds; `None` at end of stream.
fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel installed `fd` in our fd table for this message
                    // (SCM_RIGHTS); nothing else refers to it, so we take ownership.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, fds, truncated)
    };
    if truncated {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "message or fds truncated",
        ));
    }
    if len == 0 {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    let sock = seqpacket()?;
    socket::connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(sock)
}

// ----- client -----

/// How often a server whose ownership session ended (the holder restarted) tries to open
/// a new one.
const REREGISTER_INTERVAL: Duration = Duration::from_secs(1);

/// A server's handle on the holder at a socket path.
#[derive(Debug, Clone)]
pub struct FdStore {
    path: PathBuf,
    /// This process's ownership session, once [`FdStore::register`]ed (0: none). Shared by
    /// the clones: a session opened again after a holder restart is every clone's.
    owner: Arc<AtomicU64>,
    /// How many ownership sessions this process opened (0: never registered).
    sessions: Arc<AtomicU64>,
}

impl FdStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FdStore {
            path: path.into(),
            owner: Arc::new(AtomicU64::new(0)),
            sessions: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The number of the ownership session this process has now: it changes when the
    /// holder restarted and a new session was opened, and then every connection must be
    /// handed again under the new one ([`FdStore::put`]). `None` while a registered
    /// process has lost its session and not opened the next (a put then would be held
    /// for no live owner, and a hand-over could not reach this process).
    pub fn session(&self) -> Option<u64> {
        let n = self.sessions.load(Ordering::Acquire);
        (n == 0 || self.owner().is_some()).then_some(n)
    }

    /// The id of this process's ownership session, if it has one now.
    fn owner(&self) -> Option<u64> {
        Some(self.owner.load(Ordering::Acquire)).filter(|&o| o != 0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: std::io::Error) -> FdStoreError {
        FdStoreError::Socket {
            path: self.path.clone(),
            source,
        }
    }

    fn call(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(Response, Vec<OwnedFd>)> {
        let sock = connect(&self.path).map_err(|e| self.err(e))?;
        // The holder answers a take-over when the live server has exited, or after
        // TAKEOVER_TIMEOUT at the latest; give it a little more.
        let wait = match req {
            Request::Takeover { .. } => TAKEOVER_TIMEOUT + CALL_TIMEOUT,
            _ => CALL_TIMEOUT,
        };
        let tv = TimeVal::new(wait.as_secs() as libc::time_t, 0);
        socket::setsockopt(&sock, sockopt::ReceiveTimeout, &tv)
            .and_then(|()| socket::setsockopt(&sock, sockopt::SendTimeout, &tv))
            .map_err(|e| self.err(e.into()))?;
        self.exchange(sock.as_fd(), req, fds)
    }

    fn exchange(
        &self,
        sock: BorrowedFd<'_>,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>)> {
        let msg = serde_json::to_vec(req).map_err(|e| FdStoreError::Protocol(e.to_string()))?;
        send(sock, &msg, fds).map_err(|e| self.err(e))?;
        let Some((raw, fds)) = recv(sock).map_err(|e| self.err(e))? else {
            return Err(FdStoreError::Protocol(
                "holder closed the connection".into(),
            ));
        };
        let resp: Response =
            serde_json::from_slice(&raw).map_err(|e| FdStoreError::Protocol(e.to_string()))?;
        if !resp.ok {
            return Err(FdStoreError::Refused(resp.error.unwrap_or_default()));
        }
        Ok((resp, fds))
    }

    /// Opens this process's ownership session: what it puts or gets is its own until it
    /// exits, and `on_release` runs (on a thread of its own) when another server asks to
    /// take over ([`FdStore::takeover`]); the holder then waits for this process to exit.
    /// When the holder restarts, the session is opened again with the new one (every
    /// [`REREGISTER_INTERVAL`] until it answers); the server must then hand it its
    /// connections again under the new session (see [`FdStore::session`]).
    pub fn register(&mut self, on_release: impl Fn() + Send + Sync + 'static) -> Result<()> {
        let sock = self.hello()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("fdstore-owner".into())
            .spawn(move || me.keep_session(sock, on_release))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Opens an ownership session: its socket, kept open for the session's life.
    fn hello(&self) -> Result<OwnedFd> {
        let sock = connect(&self.path).map_err(|e| self.err(e))?;
        let hello = Request::Hello {
            pid: std::process::id(),
        };
        let (resp, _) = self.exchange(sock.as_fd(), &hello, &[])?;
        let owner = resp
            .owner
            .filter(|&o| o != 0)
            .ok_or_else(|| FdStoreError::Protocol("no owner id".into()))?;
        self.owner.store(owner, Ordering::Release);
        self.sessions.fetch_add(1, Ordering::AcqRel);
        Ok(sock)
    }

    /// Waits for release events on session `sock`, and opens a new session when the holder
    /// goes away; runs for the life of the process.
    fn keep_session(&self, mut sock: OwnedFd, on_release: impl Fn()) {
        loop {
            while let Ok(Some((msg, _))) = recv(sock.as_fd()) {
                if msg == RELEASE_EVENT {
                    on_release();
                }
            }
            self.owner.store(0, Ordering::Release);
            tracing::warn!(
                "fd holder session ended (the holder exited?); opening a new one when it is back"
            );
            sock = loop {
                std::thread::sleep(REREGISTER_INTERVAL);
                match self.hello() {
                    Ok(sock) => break sock,
                    Err(error) => tracing::debug!(%error, "fd holder not back yet"),
                }
            };
            tracing::info!(owner = self.owner(), "fd holder session opened again");
        }
    }

    /// Hands the holder copies of `fds` (a connection's device fd and its clones) under
    /// `key`, replacing what it held there.
    pub fn put(&self, key: &str, held: &Held, fds: &[BorrowedFd<'_>]) -> Result<()> {
        if fds.is_empty() || fds.len() > MAX_FDS {
            return Err(FdStoreError::Protocol(format!("{} fds", fds.len())));
        }
        let meta = serde_json::to_value(held).map_err(|e| FdStoreError::Protocol(e.to_string()))?;
        let req = Request::Put {
            key: key.to_string(),
            meta,
            owner: self.owner(),
        };
        self.call(&req, fds).map(|_| ())
    }

    /// Copies of the fds held under `key` and their record; `None` if nothing is held.
    pub fn get(&self, key: &str) -> Result<Option<(Held, Vec<OwnedFd>)>> {
        let req = Request::Get {
            key: key.to_string(),
            owner: self.owner(),
        };
        let (resp, fds) = self.call(&req, &[])?;
        let Some(meta) = resp.meta else {
            return Ok(None);
        };
        let held: Held =
            serde_json::from_value(meta).map_err(|e| FdStoreError::Protocol(e.to_string()))?;
        if fds.is_empty() {
            return Err(FdStoreError::Protocol(format!("{key}: no fds")));
        }
        Ok(Some((held, fds)))
    }

    /// Drops what is held under `key` (the connection ends once no server has it either).
    pub fn remove(&self, key: &str) -> Result<()> {
        let req = Request::Remove {
            key: key.to_string(),
        };
        self.call(&req, &[]).map(|_| ())
    }

    /// Keys held now.
    pub fn list(&self) -> Result<Vec<String>> {
        let (resp, _) = self.call(&Request::List, &[])?;
        Ok(resp.keys.unwrap_or_default())
    }

    /// The connections held for volumes of the store in `dir`, by key (the mount point).
    /// Copies of their fds come along with each record and are closed at once.
    pub fn held_for_store(&self, dir: &Path) -> Result<Vec<(String, Held)>> {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mut out = Vec::new();
        for key in self.list()? {
            if let Some((held, _fds)) = self.get(&key)? {
                let store = std::fs::canonicalize(&held.store).unwrap_or(held.store.clone());
                if store == dir {
                    out.push((key, held));
                }
            }
        }
        Ok(out)
    }

    /// [`FdStore::takeover`] for a starting server: logs the outcome and returns whether a
    /// live server handed over (its exit may not have released its store's lock yet: see
    /// [`crate::mount::after_hand_over`]).
    pub fn take_over_from_live(&self, keys: &[String]) -> bool {
        match self.takeover(keys) {
            Ok(0) => false,
            Ok(n) => {
                tracing::info!(servers = n, "the live server handed over");
                true
            }
            Err(error) => {
                tracing::error!(%error, "take-over from the live server failed");
                false
            }
        }
    }

    /// Asks the live servers that own any of `keys` to hand over, and returns once they
    /// have exited (how many did). Zero if no live server owns them.
    pub fn takeover(&self, keys: &[String]) -> Result<usize> {
        let req = Request::Takeover {
            keys: keys.to_vec(),
            owner: self.owner(),
        };
        let (resp, _) = self.call(&req, &[])?;
        Ok(resp.released.unwrap_or(0))
    }
}

// ----- holder -----

struct Entry {
    fds: Vec<OwnedFd>,
    meta: Value,
    owner: Option<u64>,
}

#[derive(Default)]
struct Table {
    entries: BTreeMap<String, Entry>,
    /// Live ownership sessions: owner id -> the session's socket (for events).
    owners: HashMap<u64, Arc<OwnedFd>>,
}

#[derive(Default)]
struct Holder {
    table: Mutex<Table>,
    /// Signalled when an ownership session ends.
    owner_gone: Condvar,
}

/// `fusevol fdstore`: holds FUSE connections at socket `path` until killed. Refuses to
/// start if another holder answers there; replaces a stale socket file.
pub fn run(path: &Path) -> Result<()> {
    let err = |source| FdStoreError::Socket {
        path: path.into(),
        source,
    };
    if connect(path).is_ok() {
        return Err(FdStoreError::Running(path.into()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let listener = seqpacket().map_err(err)?;
    let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
    socket::bind(listener.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
    // Only root (the agent) may hand over or take connections.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(err)?;
    raise_fd_limit();
    let backlog = Backlog::new(64).map_err(|e| err(e.into()))?;
    socket::listen(&listener, backlog).map_err(|e| err(e.into()))?;
    let holder = Arc::new(Holder::default());
    let pruner = holder.clone();
    std::thread::Builder::new()
        .name("fdstore-prune".into())
        .spawn(move || loop {
            std::thread::sleep(PRUNE_INTERVAL);
            pruner.prune();
        })
        .map_err(err)?;
    tracing::info!(socket = %path.display(), "holding FUSE connections");
    loop {
        let conn = match socket::accept(listener.as_raw_fd()) {
            Ok(fd) => {
                // SAFETY: accept returned a new fd that nothing else owns.
                unsafe { OwnedFd::from_raw_fd(fd) }
            }
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            // Out of fds or memory: exiting would drop every held connection. Wait.
            Err(
                e @ (nix::errno::Errno::EMFILE
                | nix::errno::Errno::ENFILE
                | nix::errno::Errno::ENOMEM
                | nix::errno::Errno::ENOBUFS),
            ) => {
                tracing::error!(error = %e, "cannot accept a connection; retrying");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(err(e.into())),
        };
        let h = holder.clone();
        let spawned = std::thread::Builder::new()
            .name("fdstore-conn".into())
            .spawn(move || h.serve_connection(conn));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot serve a connection");
        }
    }
}

/// Raises the soft limit of open fds to the hard one: each held volume costs up to one fd
/// per FUSE worker of its server.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, "cannot raise the open-file limit");
            }
        }
        _ => {}
    }
}

impl Holder {
    fn serve_connection(&self, conn: OwnedFd) {
        let conn = Arc::new(conn);
        let mut session = None;
        loop {
            let (raw, fds) = match recv(conn.as_fd()) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "fd holder connection failed");
                    break;
                }
            };
            let (resp, out) = match serde_json::from_slice::<Request>(&raw) {
                Ok(Request::Hello { .. }) if session.is_some() => {
                    (Response::error("hello twice"), Vec::new())
                }
                Ok(Request::Hello { pid }) => {
                    let id = {
                        let mut t = self.table.lock();
                        let id = fresh_owner_id(&t.owners);
                        t.owners.insert(id, conn.clone());
                        id
                    };
                    session = Some(id);
                    tracing::info!(owner = id, pid, "server registered");
                    let resp = Response {
                        owner: Some(id),
                        ..Response::ok()
                    };
                    (resp, Vec::new())
                }
                Ok(req) => self.handle(req, fds),
                Err(e) => (Response::error(format!("bad request: {e}")), Vec::new()),
            };
            let msg = serde_json::to_vec(&resp).unwrap_or_default();
            let borrowed: Vec<BorrowedFd<'_>> = out.iter().map(|f| f.as_fd()).collect();
            if let Err(e) = send(conn.as_fd(), &msg, &borrowed) {
                tracing::warn!(error = %e, "cannot answer");
                break;
            }
        }
        if let Some(id) = session {
            let mut t = self.table.lock();
            t.owners.remove(&id);
            for e in t.entries.values_mut() {
                if e.owner == Some(id) {
                    e.owner = None;
                }
            }
            drop(t);
            tracing::info!(owner = id, "server gone; its connections stay held");
            self.owner_gone.notify_all();
        }
    }

    /// Answers one request; the fds of the answer (for `get`) are copies.
    fn handle(&self, req: Request, fds: Vec<OwnedFd>) -> (Response, Vec<OwnedFd>) {
        match req {
            Request::Hello { .. } => (Response::error("hello twice"), Vec::new()),
            Request::Put { key, meta, owner } => {
                if fds.is_empty() {
                    return (Response::error("put without fds"), Vec::new());
                }
                tracing::info!(key, fds = fds.len(), "holding");
                let entry = Entry { fds, meta, owner };
                self.table.lock().entries.insert(key, entry);
                (Response::ok(), Vec::new())
            }
            Request::Get { key, owner } => self.get(&key, owner),
            Request::Remove { key } => {
                if self.table.lock().entries.remove(&key).is_some() {
                    tracing::info!(key, "released");
                }
                (Response::ok(), Vec::new())
            }
            Request::List => {
                let keys = self.table.lock().entries.keys().cloned().collect();
                let resp = Response {
                    keys: Some(keys),
                    ..Response::ok()
                };
                (resp, Vec::new())
            }
            Request::Takeover { keys, owner } => (self.takeover(&keys, owner), Vec::new()),
        }
    }

    fn get(&self, key: &str, owner: Option<u64>) -> (Response, Vec<OwnedFd>) {
        let mut t = self.table.lock();
        let Some(e) = t.entries.get_mut(key) else {
            return (Response::ok(), Vec::new());
        };
        let copies: std::io::Result<Vec<OwnedFd>> = e.fds.iter().map(|f| f.try_clone()).collect();
        match copies {
            Ok(fds) => {
                if owner.is_some() {
                    e.owner = owner;
                }
                let resp = Response {
                    meta: Some(e.meta.clone()),
                    ..Response::ok()
                };
                (resp, fds)
            }
            Err(err) => (Response::error(err), Vec::new()),
        }
    }

    /// Sends a release event to every other live owner of `keys` and waits for them to
    /// exit (their ownership sessions to close).
    fn takeover(&self, keys: &[String], owner: Option<u64>) -> Response {
        let mut t = self.table.lock();
        let mut owners: Vec<u64> = keys
            .iter()
            .filter_map(|k| t.entries.get(k).and_then(|e| e.owner))
            .filter(|o| Some(*o) != owner && t.owners.contains_key(o))
            .collect();
        owners.sort_unstable();
        owners.dedup();
        for o in &owners {
            if let Some(sock) = t.owners.get(o) {
                tracing::info!(owner = o, ?owner, "asking the live server to hand over");
                if let Err(e) = send(sock.as_fd(), RELEASE_EVENT, &[]) {
                    tracing::warn!(owner = o, error = %e, "cannot reach the live server");
                }
            }
        }
        let deadline = Instant::now() + TAKEOVER_TIMEOUT;
        while owners.iter().any(|o| t.owners.contains_key(o)) {
            if self.owner_gone.wait_until(&mut t, deadline).timed_out() {
                return Response::error("the live server did not hand over in time");
            }
        }
        Response {
            released: Some(owners.len()),
            ..Response::ok()
        }
    }

    /// Drops the fds of connections that ended (unmounted or aborted).
    fn prune(&self) {
        let mut t = self.table.lock();
        let ended: Vec<String> = t
            .entries
            .iter()
            .filter(|(_, e)| e.fds.first().is_none_or(|fd| connection_ended(fd.as_fd())))
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            t.entries.remove(&k);
            tracing::info!(key = k, "connection ended (unmounted or aborted); dropped");
        }
    }
}

/// A random, nonzero owner id that no live session has: ids are never counted from 1, so
/// one that a server kept from a holder that restarted never names another server's
/// session in the new holder.
fn fresh_owner_id(live: &HashMap<u64, Arc<OwnedFd>>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        // RandomState is seeded from the OS's randomness; each one hashes differently.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let id = h.finish();
        if id != 0 && !live.contains_key(&id) {
            return id;
        }
    }
}

/// Does `/dev/fuse` fd report its connection gone (POLLERR once aborted or unmounted)?
fn connection_ended(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
        }),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fdstore.sock");
        let p = path.clone();
        std::thread::spawn(move || run(&p));
        let deadline = Instant::now() + Duration::from_secs(5);
        while connect(&path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        (dir, path)
    }

    fn held() -> Held {
        Held {
            volume: "v".into(),
            store: "/data".into(),
            volume_id: Some(3),
            conn: Some(42),
            init: InitRecord {
                major: 7,
                minor: 40,
                kernel_flags: 1 << 39,
                granted: 1,
                max_write: 1 << 20,
            },
            generation: Some(9),
        }
    }

    #[test]
    fn holds_fds_and_hands_out_copies_that_refer_to_the_same_file() {
        let (_d, path) = start();
        let store = FdStore::new(&path);
        let (r, w) = nix::unistd::pipe().unwrap();
        store.put("/mnt/a", &held(), &[w.as_fd()]).unwrap();
        drop(w);
        let (got, fds) = store.get("/mnt/a").unwrap().unwrap();
        assert_eq!(got, held());
        assert_eq!(fds.len(), 1);
        nix::unistd::write(&fds[0], b"x").unwrap();
        let mut buf = [0u8; 1];
        nix::unistd::read(r.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf, b"x");
        assert_eq!(store.list().unwrap(), vec!["/mnt/a".to_string()]);
        // A get leaves the entry in place (a crash after a get must not lose it).
        assert!(store.get("/mnt/a").unwrap().is_some());
        store.remove("/mnt/a").unwrap();
        assert!(store.get("/mnt/a").unwrap().is_none());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn a_second_holder_on_a_live_socket_is_refused() {
        let (_d, path) = start();
        assert!(matches!(run(&path), Err(FdStoreError::Running(_))));
    }

    #[test]
    fn takeover_waits_for_the_live_owner_to_hand_over() {
        let (_d, path) = start();
        // The "old server": its session is a raw connection we close on release.
        let sock = connect(&path).unwrap();
        let client = FdStore::new(&path);
        let (resp, _) = client
            .exchange(sock.as_fd(), &Request::Hello { pid: 1 }, &[])
            .unwrap();
        let old = FdStore {
            path: path.clone(),
            owner: Arc::new(AtomicU64::new(resp.owner.unwrap())),
            sessions: Arc::new(AtomicU64::new(1)),
        };
        let (_r, w) = nix::unistd::pipe().unwrap();
        old.put("/mnt/a", &held(), &[w.as_fd()]).unwrap();
        let releaser = std::thread::spawn(move || {
            let (msg, _) = recv(sock.as_fd()).unwrap().unwrap();
            assert_eq!(msg, RELEASE_EVENT);
            std::thread::sleep(Duration::from_millis(200));
            drop(sock); // "exits"
        });
        let mut new = FdStore::new(&path);
        new.register(|| {}).unwrap();
        let start = Instant::now();
        assert_eq!(new.takeover(&["/mnt/a".to_string()]).unwrap(), 1);
        assert!(start.elapsed() >= Duration::from_millis(200));
        releaser.join().unwrap();
        // Nobody live owns it now: a second take-over has nothing to wait for.
        assert_eq!(new.takeover(&["/mnt/a".to_string()]).unwrap(), 0);
        assert!(new.get("/mnt/a").unwrap().is_some());
    }

    #[test]
    fn bad_requests_get_an_error_not_a_crash() {
        let (_d, path) = start();
        let sock = connect(&path).unwrap();
        send(sock.as_fd(), b"not json", &[]).unwrap();
        let (raw, _) = recv(sock.as_fd()).unwrap().unwrap();
        let resp: Response = serde_json::from_slice(&raw).unwrap();
        assert!(!resp.ok);
        let store = FdStore::new(&path);
        assert!(matches!(
            store.call(
                &Request::Put {
                    key: "k".into(),
                    meta: Value::Null,
                    owner: None
                },
                &[]
            ),
            Err(FdStoreError::Refused(_))
        ));
        assert!(store.list().unwrap().is_empty());
    }
}
