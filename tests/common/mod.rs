//! Shared harness for the fusevol integration tests.
//!
//! Every test gets its own temporary root directory (under /var/tmp) holding the store (`data/`)
//! and the mountpoint (`mnt/`). [`Mount`] spawns `fusevol mount`, waits until the kernel shows
//! the mount, and on drop stops the process (SIGTERM, then SIGKILL) and detaches any mount left
//! at the mountpoint, so that no mount survives a test, even a panicking one. A watchdog kills
//! the filesystem process when a test runs for too long (`FUSEVOL_TEST_TIMEOUT`, seconds), so
//! that a hung filesystem turns into failed system calls (ENOTCONN) instead of a hung test run.
#![allow(dead_code)]

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_fusevol");
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;
/// Largest data/hole granularity the contract allows (one chunk).
pub const CHUNK_MAX: u64 = 64 * KIB;

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

fn watchdog_timeout() -> Duration {
    let secs = std::env::var("FUSEVOL_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(900);
    Duration::from_secs(secs)
}

// ---------------------------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------------------------

/// A test's private directories: `root/data` (the store) and `root/mnt` (the mountpoint).
/// Dropping it detaches any mount still present at `mnt` before the files are removed.
pub struct Dirs {
    pub root: PathBuf,
    pub data: PathBuf,
    pub mnt: PathBuf,
    tmp: Option<TempDir>,
}

impl Dirs {
    pub fn new() -> Dirs {
        let tmp = tempfile::Builder::new()
            .prefix("fusevol-test-")
            .tempdir_in("/var/tmp")
            .expect("create temp root");
        let root = tmp.path().canonicalize().unwrap();
        // World-traversable so that permission tests can run as an unprivileged user.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let data = root.join("data");
        let mnt = root.join("mnt");
        fs::create_dir(&data).unwrap();
        fs::create_dir(&mnt).unwrap();
        Dirs {
            root,
            data,
            mnt,
            tmp: Some(tmp),
        }
    }

    /// A second mountpoint inside this root (for tests that need two).
    pub fn extra_dir(&self, name: &str) -> PathBuf {
        let p = self.root.join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        detach_all(&self.mnt);
        // Detach anything else that a test mounted inside the root (extra mountpoints).
        for (mp, _) in mounts() {
            if mp.starts_with(&self.root) {
                detach_all(&mp);
            }
        }
        if let Some(tmp) = self.tmp.take() {
            if mounts().iter().any(|(mp, _)| mp.starts_with(&self.root)) {
                // Never recurse into a live mount: leak the directory instead.
                let _ = tmp.keep();
            } else {
                drop(tmp);
            }
        }
    }
}

/// (mountpoint, fstype) for every line of /proc/mounts.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let text = fs::read_to_string("/proc/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            let _dev = it.next()?;
            let mp = it.next()?;
            let ty = it.next()?;
            Some((PathBuf::from(unescape_mount_path(mp)), ty.to_string()))
        })
        .collect()
}

fn unescape_mount_path(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// Is there a `fuse.fusevol` mount at `mnt` according to /proc/mounts?
pub fn is_fusevol_mounted(mnt: &Path) -> bool {
    mounts()
        .iter()
        .any(|(mp, ty)| mp == mnt && ty == "fuse.fusevol")
}

pub fn is_mounted(mnt: &Path) -> bool {
    mounts().iter().any(|(mp, _)| mp == mnt)
}

/// Lazily detach every mount stacked at `mnt`.
pub fn detach_all(mnt: &Path) {
    for _ in 0..16 {
        if !is_mounted(mnt) {
            return;
        }
        let c = cstr(mnt);
        let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if r != 0 {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(mnt)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mount
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Opts {
    pub volume: String,
    pub quota: Option<String>,
    pub inodes: Option<u64>,
    pub allow_other: bool,
    pub extra_args: Vec<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            volume: "vol".into(),
            quota: None,
            inodes: None,
            allow_other: false,
            extra_args: vec![],
        }
    }
}

impl Opts {
    pub fn new() -> Opts {
        Opts::default()
    }
    pub fn volume(mut self, v: &str) -> Opts {
        self.volume = v.into();
        self
    }
    pub fn quota(mut self, q: &str) -> Opts {
        self.quota = Some(q.into());
        self
    }
    pub fn inodes(mut self, n: u64) -> Opts {
        self.inodes = Some(n);
        self
    }
    pub fn allow_other(mut self) -> Opts {
        self.allow_other = true;
        self
    }
}

static SPAWN_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A running `fusevol mount` process and its directories.
pub struct Mount {
    child: Option<Child>,
    dirs: Option<Dirs>,
    pub opts: Opts,
    stderr_path: PathBuf,
    watchdog: Option<mpsc::Sender<()>>,
    /// st_dev of the mounted filesystem.
    pub dev: u64,
}

impl Mount {
    /// Mount a fresh store/volume in new temporary directories; panics (with the process's
    /// stderr) if the mount does not become ready.
    pub fn start(opts: Opts) -> Mount {
        Mount::start_in(Dirs::new(), opts)
    }

    pub fn start_in(dirs: Dirs, opts: Opts) -> Mount {
        match Mount::try_start_in(dirs, opts) {
            Ok(m) => m,
            Err((_dirs, msg)) => panic!("{msg}"),
        }
    }

    /// Mount at `mnt` (default: dirs.mnt). On failure, returns the dirs and a message with
    /// the exit status and the process's stderr.
    pub fn try_start_in(dirs: Dirs, opts: Opts) -> Result<Mount, (Dirs, String)> {
        let mnt = dirs.mnt.clone();
        let data = dirs.data.clone();
        let n = SPAWN_COUNTER.fetch_add(1, Ordering::SeqCst);
        let stderr_path = dirs.root.join(format!("mount-{n}.stderr"));
        let stdout_path = dirs.root.join(format!("mount-{n}.stdout"));
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .arg("--data")
            .arg(&data)
            .arg("--volume")
            .arg(&opts.volume);
        if let Some(q) = &opts.quota {
            cmd.arg("--quota").arg(q);
        }
        if let Some(i) = opts.inodes {
            cmd.arg("--inodes").arg(i.to_string());
        }
        if opts.allow_other {
            cmd.arg("--allow-other");
        }
        cmd.args(&opts.extra_args);
        cmd.arg(&mnt);
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr_path).unwrap())
            .env("RUST_BACKTRACE", "1");
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Err((dirs, format!("cannot spawn {BIN}: {e}"))),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let err = fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err((
                    dirs,
                    format!("fusevol mount exited with {status} before the mount was ready; stderr:\n{err}"),
                ));
            }
            if let Some(dev) = live_mount_dev(&mnt) {
                let (tx, rx) = mpsc::channel::<()>();
                let pid = child.id() as i32;
                let mnt2 = mnt.clone();
                thread::spawn(move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) =
                        rx.recv_timeout(watchdog_timeout())
                    {
                        eprintln!(
                            "WATCHDOG: test ran longer than {:?}; killing fusevol (pid {pid}) mounted at {}",
                            watchdog_timeout(),
                            mnt2.display()
                        );
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                });
                return Ok(Mount {
                    child: Some(child),
                    dirs: Some(dirs),
                    opts,
                    stderr_path,
                    watchdog: Some(tx),
                    dev,
                });
            }
            if start.elapsed() > READY_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let err = fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err((
                    dirs,
                    format!("fusevol mount not ready after {READY_TIMEOUT:?}; stderr:\n{err}"),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dirs(&self) -> &Dirs {
        self.dirs.as_ref().unwrap()
    }
    pub fn mnt(&self) -> &Path {
        &self.dirs().mnt
    }
    pub fn data(&self) -> &Path {
        &self.dirs().data
    }
    pub fn volume(&self) -> &str {
        &self.opts.volume
    }
    /// Path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt().join(rel)
    }
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// `volume inspect --json` for this mount's volume (works while mounted).
    pub fn inspect(&self) -> VolumeInfo {
        inspect(self.data(), self.volume())
    }

    /// Send `sig` and wait for the process to exit; returns its status and the directories.
    /// Panics if it does not exit in time.
    pub fn signal_and_wait(mut self, sig: i32) -> (ExitStatus, Dirs) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = wait_timeout(&mut child, STOP_TIMEOUT);
        let dirs = self.dirs.take().unwrap();
        self.watchdog.take();
        match status {
            Some(s) => (s, dirs),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "fusevol did not exit within {STOP_TIMEOUT:?} after signal {sig}; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// Clean stop: SIGTERM, expect exit status 0 and the mount gone. Returns the directories
    /// for a remount or an offline command.
    pub fn stop(self) -> Dirs {
        let stderr_path = self.stderr_path.clone();
        let (status, dirs) = self.signal_and_wait(libc::SIGTERM);
        let err = fs::read_to_string(&stderr_path).unwrap_or_default();
        assert!(
            status.success(),
            "fusevol mount exited with {status} after SIGTERM; stderr:\n{err}"
        );
        assert!(
            !err.contains("panicked"),
            "fusevol mount panicked; stderr:\n{err}"
        );
        assert!(
            !is_fusevol_mounted(&dirs.mnt),
            "mount still present after fusevol exited"
        );
        dirs
    }

    /// kill -9 the process, leaving whatever the kernel keeps (usually a stale mount that
    /// answers ENOTCONN). Returns the directories for a remount.
    pub fn kill9(mut self) -> Dirs {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        self.watchdog.take();
        self.dirs.take().unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.watchdog.take();
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if wait_timeout(&mut child, STOP_TIMEOUT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(dirs) = self.dirs.take() {
            detach_all(&dirs.mnt);
            drop(dirs);
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// If `mnt` carries a working fuse.fusevol mount, its st_dev.
///
/// Liveness is checked with statfs(2), which the kernel always forwards to the filesystem
/// process: stat(2) can be answered from the attribute cache even by a dead (stale) mount.
fn live_mount_dev(mnt: &Path) -> Option<u64> {
    if !is_fusevol_mounted(mnt) {
        return None;
    }
    if !statfs_answers(mnt) {
        return None;
    }
    let md = fs::metadata(mnt).ok()?;
    let parent = fs::metadata(mnt.parent().unwrap()).ok()?;
    if md.dev() == parent.dev() {
        return None;
    }
    Some(md.dev())
}

const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Does a FUSE filesystem at `p` answer statfs(2)? (A stale mount answers ENOTCONN.)
pub fn statfs_answers(p: &Path) -> bool {
    let c = cstr(p);
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut s) };
    r == 0 && s.f_type as i64 == FUSE_SUPER_MAGIC
}

/// Leave a stale `fuse.fusevol` mount at `mnt`, like the one a kill -9'd fusevol leaves: the
/// connection is aborted, every access returns ENOTCONN.
pub fn make_stale_mount(mnt: &Path) {
    let dev = CString::new("/dev/fuse").unwrap();
    let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "open /dev/fuse: {}", io::Error::last_os_error());
    let src = CString::new("fusevol").unwrap();
    let ty = CString::new("fuse.fusevol").unwrap();
    let opts = CString::new(format!("fd={fd},rootmode=40000,user_id=0,group_id=0")).unwrap();
    let target = cstr(mnt);
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            ty.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr() as *const libc::c_void,
        )
    };
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    assert_eq!(r, 0, "mount fuse at {}: {err}", mnt.display());
    // With the device closed the connection is aborted: the mount is stale.
    let e = fs::metadata(mnt).expect_err("a stale mount must not answer stat");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOTCONN),
        "stale mount stat: {e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Running subcommands
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Out {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    pub fn success(&self) -> bool {
        self.status.success()
    }
    fn describe(&self) -> String {
        format!(
            "`fusevol {}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.status,
            self.stdout,
            self.stderr
        )
    }
    /// Expect exit 0.
    pub fn ok(self) -> Out {
        assert!(self.success(), "expected success: {}", self.describe());
        self.no_panic()
    }
    pub fn no_panic(self) -> Out {
        assert!(
            !self.stderr.contains("panicked"),
            "fusevol panicked: {}",
            self.describe()
        );
        assert!(
            self.status.code().is_some(),
            "fusevol died by a signal: {}",
            self.describe()
        );
        self
    }
    /// Expect exit code `code`.
    pub fn code_is(self, code: i32) -> Out {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit code: {}",
            self.describe()
        );
        self.no_panic()
    }
    /// Expect a user error: non-zero exit, no panic, and exactly one message line on stderr,
    /// starting with `error:`, as the last line. Log lines of the mount's logger (tracing
    /// format, with a level) may precede it; nothing else may.
    pub fn user_error(self) -> Out {
        assert_eq!(
            self.code(),
            Some(2),
            "expected exit 2 (could not run): {}",
            self.describe()
        );
        let out = self.no_panic();
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let last = lines.last().copied().unwrap_or("");
        assert!(
            last.starts_with("error:"),
            "stderr must end with one `error:` line: {}",
            out.describe()
        );
        for l in &lines[..lines.len() - 1] {
            let is_log = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                .iter()
                .any(|lv| l.contains(lv));
            assert!(
                is_log,
                "the error message must be one line (extra line {l:?}): {}",
                out.describe()
            );
        }
        out
    }
    /// Expect an error reported as JSON (`--json`): exit 2, and stderr's last line one
    /// object `{"error": kind, "message": ...}` with a non-empty message; returns the message.
    pub fn json_error(self, kind: &str) -> String {
        let (got, message, out) = self.json_error_of_any_kind();
        assert_eq!(got, kind, "error kind: {}", out.describe());
        message
    }
    /// As [`Out::json_error`], whatever the kind; returns kind, message and the output.
    pub fn json_error_of_any_kind(self) -> (String, String, Out) {
        assert_eq!(self.code(), Some(2), "expected exit 2: {}", self.describe());
        let out = self.no_panic();
        let last = out
            .stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("");
        let v: Value = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("stderr's last line is not JSON ({e}): {}", out.describe()));
        let kind = v["error"].as_str().unwrap_or("").to_string();
        let message = v["message"].as_str().unwrap_or("").to_string();
        assert!(!message.is_empty(), "no message: {}", out.describe());
        assert!(out.stdout.trim().is_empty(), "stdout: {}", out.describe());
        (kind, message, out)
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.describe()))
    }
}

/// Run `fusevol ARGS...` (with a timeout), capturing output.
pub fn fusevol<I, S>(args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    fusevol_timeout(args, CMD_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "`fusevol {}` did not finish within {CMD_TIMEOUT:?}",
            shown.join(" ")
        )
    })
}

/// Run `fusevol ARGS...`; None (after killing it) if it runs longer than `timeout`. Use for
/// commands that must fail, such as a `mount` that should be refused: a mount that succeeds
/// keeps running and is then killed (the caller's `Dirs` detaches it).
pub fn fusevol_timeout<I, S>(args: I, timeout: Duration) -> Option<Out>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut child = Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "1")
        .spawn()
        .expect("spawn fusevol");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let te = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&to.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&te.join().unwrap()).into_owned();
    Some(Out {
        args: shown,
        status,
        stdout,
        stderr,
    })
}

/// Shorthand: build an argument vector from a mix of &str and paths.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => {{
        let v: Vec<std::ffi::OsString> = vec![$(std::ffi::OsString::from($a)),*];
        v
    }};
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub quota_bytes: Option<u64>,
    pub inode_limit: Option<u64>,
    pub used_bytes: u64,
    pub inodes: u64,
    pub chunks: u64,
}

fn opt_u64(v: &Value, key: &str) -> Option<u64> {
    let f = v
        .get(key)
        .unwrap_or_else(|| panic!("volume JSON lacks {key:?}: {v}"));
    if f.is_null() {
        None
    } else {
        Some(
            f.as_u64()
                .unwrap_or_else(|| panic!("{key:?} is neither u64 nor null: {v}")),
        )
    }
}

fn req_u64(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("volume JSON lacks u64 {key:?}: {v}"))
}

impl VolumeInfo {
    pub fn from_json(v: &Value) -> VolumeInfo {
        assert!(v.is_object(), "volume JSON is not an object: {v}");
        VolumeInfo {
            name: v
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("volume JSON lacks string \"name\": {v}"))
                .to_string(),
            quota_bytes: opt_u64(v, "quota_bytes"),
            inode_limit: opt_u64(v, "inode_limit"),
            used_bytes: req_u64(v, "used_bytes"),
            inodes: req_u64(v, "inodes"),
            chunks: req_u64(v, "chunks"),
        }
    }
}

pub fn inspect(data: &Path, volume: &str) -> VolumeInfo {
    let out = fusevol(args!["volume", "inspect", "--data", data, volume, "--json"]).ok();
    let info = VolumeInfo::from_json(&out.json());
    assert_eq!(info.name, volume, "inspect returned another volume");
    info
}

pub fn list(data: &Path) -> Vec<VolumeInfo> {
    let out = fusevol(args!["volume", "list", "--data", data, "--json"]).ok();
    let v = out.json();
    let arr = v
        .as_array()
        .unwrap_or_else(|| panic!("list --json is not an array: {v}"));
    arr.iter().map(VolumeInfo::from_json).collect()
}

pub fn create_volume(data: &Path, name: &str, extra: &[&str]) -> Out {
    let mut a = args!["volume", "create", "--data", data, name];
    a.extend(extra.iter().map(OsString::from));
    fusevol(a)
}

/// `volume list --json` of store `data`: each volume's `<option>.algorithm`
/// (`compression`, `encryption`), in list order.
pub fn listed_algorithms(data: &Path, option: &str) -> Vec<String> {
    let out = fusevol(args!["volume", "list", "--data", data, "--json"]).ok();
    out.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[option]["algorithm"].as_str().unwrap().to_string())
        .collect()
}

pub fn fsck(data: &Path, extra: &[&str]) -> Out {
    let mut a = args!["fsck", "--data", data];
    a.extend(extra.iter().map(OsString::from));
    fusevol(a)
}

/// Poll `f` until it returns true or `timeout` passes; returns the last result.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Disk usage like `du`: allocated bytes of every file under `dir` (not following links).
pub fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let md = fs::symlink_metadata(dir).unwrap();
    total += md.blocks() * 512;
    if md.is_dir() {
        for e in fs::read_dir(dir).unwrap() {
            total += du(&e.unwrap().path());
        }
    }
    total
}

/// Snapshot of every file under a directory (relative path -> contents, or None for dirs).
pub fn snapshot_tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    fn walk(base: &Path, d: &Path, out: &mut std::collections::BTreeMap<PathBuf, Option<Vec<u8>>>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                out.insert(rel, None);
                walk(base, &p, out);
            } else if md.file_type().is_symlink() {
                out.insert(
                    rel,
                    Some(fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
                );
            } else {
                out.insert(rel, Some(fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// System-call helpers
// ---------------------------------------------------------------------------------------------

pub fn cstr(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).unwrap()
}

pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn cvt_l(r: i64) -> io::Result<i64> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn cvt_s(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn errname(e: i32) -> String {
    let n = match e {
        0 => "OK",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EDQUOT => "EDQUOT",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETXTBSY => "ETXTBSY",
        libc::E2BIG => "E2BIG",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

/// The errno of a failed result; panics (naming `what`) if it succeeded.
pub fn err_of<T: std::fmt::Debug>(r: io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: non-OS error {e}")),
    }
}

/// Assert that an `io::Result` expression failed with the given errno.
#[macro_export]
macro_rules! assert_errno {
    ($e:expr, $errno:expr) => {{
        let want: i32 = $errno;
        match $e {
            Ok(v) => panic!(
                "{}: expected {}, got Ok({:?})",
                stringify!($e),
                $crate::common::errname(want),
                v
            ),
            Err(err) => {
                let got = err.raw_os_error().unwrap_or(-1);
                assert!(
                    got == want,
                    "{}: expected {}, got {} ({})",
                    stringify!($e),
                    $crate::common::errname(want),
                    $crate::common::errname(got),
                    err
                );
            }
        }
    }};
}

pub fn rename2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (a, b) = (cstr(from), cstr(to));
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
    .map(|_| ())
}

pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) }).map(|_| ())
}

pub fn lseek(f: &File, off: u64, whence: i32) -> io::Result<u64> {
    cvt_l(unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) }).map(|v| v as u64)
}

pub fn ftruncate(f: &File, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::ftruncate(f.as_raw_fd(), len as i64) }).map(|_| ())
}

pub fn truncate(p: &Path, len: u64) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::truncate(c.as_ptr(), len as i64) }).map(|_| ())
}

pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    cvt(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const _,
            value.len(),
            flags,
        )
    })
    .map(|_| ())
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    cvt(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const _,
            value.len(),
            flags,
        )
    })
    .map(|_| ())
}

/// getxattr with an explicit buffer size; returns the bytes read.
pub fn getxattr_buf(p: &Path, name: &str, size: usize) -> io::Result<Vec<u8>> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; size];
    let r =
        cvt_s(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr() as *mut _, size) })?;
    buf.truncate(r);
    Ok(buf)
}

/// getxattr with size 0: the value's length.
pub fn getxattr_len(p: &Path, name: &str) -> io::Result<usize> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    cvt_s(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })
}

pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    getxattr_buf(p, name, 65536)
}

pub fn lgetxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 65536];
    let r = cvt_s(unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut _,
            buf.len(),
        )
    })?;
    buf.truncate(r);
    Ok(buf)
}

fn split_names(buf: &[u8]) -> Vec<String> {
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// listxattr with an explicit buffer size; the raw NUL-separated buffer.
pub fn listxattr_buf(p: &Path, size: usize) -> io::Result<Vec<u8>> {
    let c = cstr(p);
    let mut buf = vec![0u8; size];
    let r = cvt_s(unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr() as *mut _, size) })?;
    buf.truncate(r);
    Ok(buf)
}

pub fn listxattr_len(p: &Path) -> io::Result<usize> {
    let c = cstr(p);
    cvt_s(unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) })
}

/// Sorted xattr names (following symlinks).
pub fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    let mut v = split_names(&listxattr_buf(p, 65536)?);
    v.sort();
    Ok(v)
}

/// Sorted xattr names of the path itself (not following symlinks).
pub fn llistxattr(p: &Path) -> io::Result<Vec<String>> {
    let c = cstr(p);
    let mut buf = vec![0u8; 65536];
    let r = cvt_s(unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) })?;
    buf.truncate(r);
    let mut v = split_names(&buf);
    v.sort();
    Ok(v)
}

pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
}

pub fn mkfifo(p: &Path, mode: u32) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

pub fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, dev as libc::dev_t) }).map(|_| ())
}

pub fn chmod(p: &Path, mode: u32) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

pub fn chown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::chown(c.as_ptr(), uid, gid) }).map(|_| ())
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(|_| ())
}

pub fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// utimensat(AT_FDCWD, p, [atime, mtime], flags)
pub fn utimensat(
    p: &Path,
    atime: libc::timespec,
    mtime: libc::timespec,
    flags: i32,
) -> io::Result<()> {
    let c = cstr(p);
    let t = [atime, mtime];
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), flags) }).map(|_| ())
}

pub fn statvfs(p: &Path) -> libc::statvfs {
    let c = cstr(p);
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    assert_eq!(
        r,
        0,
        "statvfs {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    s
}

/// (total bytes, used bytes) as df computes them.
pub fn df(p: &Path) -> (u64, u64) {
    let s = statvfs(p);
    let total = s.f_blocks * s.f_frsize;
    let used = (s.f_blocks - s.f_bfree) * s.f_frsize;
    (total, used)
}

pub fn fsync_path(p: &Path) -> io::Result<()> {
    File::open(p)?.sync_all()
}

/// Close a file and report close(2)'s result (std's drop ignores it).
pub fn close_file(f: File) -> io::Result<()> {
    let fd: RawFd = f.into_raw_fd();
    cvt(unsafe { libc::close(fd) }).map(|_| ())
}

/// Write back and evict the file's page cache so the next reads are served by fusevol.
pub fn drop_cache(f: &File) {
    f.sync_all().expect("fsync before dropping the page cache");
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(
        r,
        0,
        "posix_fadvise(DONTNEED) failed: {}",
        io::Error::from_raw_os_error(r)
    );
}

/// Drop the page cache of a path (opens it read-only).
pub fn drop_cache_path(p: &Path) {
    let f = File::open(p).unwrap();
    drop_cache(&f);
}

/// Write all of `buf` at `off` (pwrite loop).
pub fn pwrite_all(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(buf, off)
}

/// Read up to `len` bytes at `off` (stops at EOF).
pub fn pread(f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

/// Deterministic pseudo-random bytes (xorshift) for file contents.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Run `f` in a forked child as uid/gid (supplementary groups cleared) and return its exit
/// code. `f` runs in the child of a multi-threaded process: it must only make raw system
/// calls (no allocation, no panics, no locks). Prepare CStrings before calling.
pub fn run_as(uid: u32, gid: u32, f: impl FnOnce() -> i32) -> i32 {
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(255);
            }
            let r = f();
            libc::_exit(r);
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                break;
            }
            assert!(r < 0 && errno() == libc::EINTR, "waitpid failed");
        }
        assert!(
            libc::WIFEXITED(status),
            "child killed by signal (status {status})"
        );
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, 255, "could not switch to uid {uid}/gid {gid}");
        code
    }
}

pub const NOBODY: u32 = 65534;
pub const NOGROUP: u32 = 65534;

/// Raw errno for use inside `run_as` closures: 0 when `r >= 0`.
pub fn ret_errno(r: libc::c_int) -> i32 {
    if r < 0 {
        unsafe { *libc::__errno_location() }
    } else {
        0
    }
}

pub fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

pub fn file_type_bits(p: &Path) -> u32 {
    lstat(p).mode() & libc::S_IFMT
}

/// Timestamps of a path (atime, mtime, ctime) in nanoseconds.
pub fn times(p: &Path) -> (i128, i128, i128) {
    let m = lstat(p);
    let t = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    (
        t(m.atime(), m.atime_nsec()),
        t(m.mtime(), m.mtime_nsec()),
        t(m.ctime(), m.ctime_nsec()),
    )
}

/// Sleep long enough that the next timestamp differs from any taken before.
pub fn tick() {
    thread::sleep(Duration::from_millis(30));
}

pub fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

pub fn write_file(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()))
}

pub fn create_rw(p: &Path) -> File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
}

pub fn open_rw(p: &Path) -> File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Write `len` bytes (pattern `seed`) to a new file at `p` in 1 MiB pieces, fsync, close.
pub fn write_big_file(p: &Path, len: u64, seed: u64) -> io::Result<()> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)?;
    let piece = pattern(seed, MIB as usize);
    let mut off = 0;
    while off < len {
        let n = std::cmp::min(MIB, len - off) as usize;
        pwrite_all(&f, &piece[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    close_file(f)
}
