//! Restarts that callers never notice: with the FUSE connection holder (`fusevol
//! fdstore`), `fusevol mount` is killed with SIGKILL, stopped with SIGTERM, or replaced by
//! a second server, while a writer keeps a file open and writes and fsyncs in a loop and a
//! prober statfs's the mount point. The writer must see no error, every fsync'd record must
//! be there, and the mount must never answer ENOTCONN. The longest write (the pause) is
//! printed for the notes.

#[macro_use]
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const RECORD: usize = 4096;

/// Gives the calling thread an fd table of its own. Files it opens on the mount then do
/// not leak into the servers this test spawns: a child's exec closes its copy of every
/// fd, and closing one on a FUSE mount first writes its dirty pages back, which waits for
/// a server, while the server being exec'd is that very child. (Kubernetes never starts
/// an agent from a process that holds files on its volumes.)
fn private_fd_table() {
    // SAFETY: unshare(CLONE_FILES) only copies this thread's fd table; no memory is shared
    // or freed, and every fd stays valid in the copy.
    let r = unsafe { libc::unshare(libc::CLONE_FILES) };
    assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
}

/// A `fusevol fdstore` process, killed on drop.
struct Holder {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
}

impl Holder {
    fn start(dirs: &Dirs) -> Holder {
        Holder::start_at(&dirs.root, 0)
    }

    fn start_at(root: &Path, n: u32) -> Holder {
        let socket = root.join("fdstore.sock");
        let child = Command::new(BIN)
            .args(["fdstore", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(root.join(format!("fdstore-{n}.stderr"))).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while fusevol::fdstore::FdStore::new(&socket).list().is_err() {
            assert!(Instant::now() < deadline, "fdstore did not start");
            thread::sleep(Duration::from_millis(10));
        }
        Holder {
            child,
            socket,
            root: root.to_path_buf(),
        }
    }

    /// Kills the holder (it loses every connection it held) and starts a new one on the
    /// same socket, as a restart of its container does.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.socket);
        *self = Holder::start_at(&self.root.clone(), 1);
    }

    /// The keys the holder holds now.
    fn keys(&self) -> Vec<String> {
        fusevol::fdstore::FdStore::new(&self.socket)
            .list()
            .unwrap_or_default()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn opts(h: &Holder) -> Opts {
    let mut o = Opts::new().quota("1Gi");
    o.extra_args = vec!["--fdstore".into(), h.socket.display().to_string()];
    o
}

/// A second server of the same volume at the same mount point, started by hand (the
/// mount is live already, so [`Mount`]'s readiness check would not wait for it).
struct Server {
    child: Child,
    stderr: PathBuf,
}

impl Server {
    fn start(dirs: &Dirs, o: &Opts, n: u32, env: &[(&str, &str)]) -> Server {
        let stderr = dirs.root.join(format!("server-{n}.stderr"));
        let child = Command::new(BIN)
            .arg("mount")
            .arg("--data")
            .arg(&dirs.data)
            .args(["--volume", &o.volume])
            .args(&o.extra_args)
            .arg(&dirs.mnt)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Server { child, stderr }
    }

    /// The first server of a fresh mount, once it serves.
    fn mount(dirs: &Dirs, o: &Opts, env: &[(&str, &str)]) -> Server {
        let s = Server::start(dirs, o, 0, env);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(is_fusevol_mounted(&dirs.mnt) && statfs_answers(&dirs.mnt)) {
            assert!(Instant::now() < deadline, "not mounted:\n{}", s.log());
            thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the server serves the held connection.
    fn wait_took_over(&mut self) {
        let start = Instant::now();
        while !self.log().contains("took over the live FUSE connection") {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("server exited with {status}:\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no take-over after {:?}:\n{}",
                start.elapsed(),
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ctrl-C: unmounts for good.
    fn interrupt(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exit {status}:\n{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the writer and the prober saw.
#[derive(Default)]
struct Seen {
    written: u64,
    errors: Vec<String>,
    longest: Duration,
}

/// Writes one 4 KiB record after another into `path` and fsyncs each, until `stop`; a
/// second thread statfs's the mount point meanwhile.
fn workload(mnt: &Path, stop: Arc<AtomicBool>) -> thread::JoinHandle<Seen> {
    let path = mnt.join("log");
    let mnt = mnt.to_path_buf();
    let probe_stop = stop.clone();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let probe_seen = seen.clone();
    let prober = thread::spawn(move || {
        while !probe_stop.load(Ordering::Acquire) {
            if !statfs_answers(&mnt) {
                let e = std::io::Error::last_os_error();
                probe_seen
                    .lock()
                    .unwrap()
                    .errors
                    .push(format!("statfs: {e}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    thread::spawn(move || {
        private_fd_table();
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::Acquire) {
            let rec = record(n);
            let start = Instant::now();
            let r = f
                .write_all_at(&rec, n * RECORD as u64)
                .and_then(|()| f.sync_data());
            let took = start.elapsed();
            let mut s = seen.lock().unwrap();
            s.longest = s.longest.max(took);
            match r {
                Ok(()) => {
                    n += 1;
                    s.written = n;
                }
                Err(e) => s.errors.push(format!("record {n}: {e}")),
            }
            // No pause: a kill almost always lands on a write or fsync in flight, which
            // the next server must answer (FUSE_NOTIFY_RESEND).
            drop(s);
        }
        prober.join().unwrap();
        let s = std::mem::take(&mut *seen.lock().unwrap());
        s
    })
}

fn record(n: u64) -> Vec<u8> {
    let mut rec = format!("record {n:08}\n").into_bytes();
    rec.resize(RECORD, b'.' + (n % 50) as u8);
    rec
}

/// Every record the writer had fsync'd is in the file, in order.
fn check_records(path: &Path, written: u64) {
    let mut data = Vec::new();
    File::open(path).unwrap().read_to_end(&mut data).unwrap();
    assert!(
        data.len() as u64 >= written * RECORD as u64,
        "{} bytes for {written} records",
        data.len()
    );
    for n in 0..written {
        let at = (n as usize) * RECORD;
        assert!(data[at..at + RECORD] == record(n)[..], "record {n} differs");
    }
}

fn fsck_clean(data: &Path) {
    let out = fusevol([OsStr::new("fsck"), OsStr::new("--data"), data.as_os_str()]);
    assert!(out.success(), "fsck: {}{}", out.stdout, out.stderr);
}

use std::ffi::OsStr;

/// Runs the workload around `restart` (which replaces the server and returns the new
/// one); checks what the writer saw and that the records are there.
fn across(restart: impl FnOnce(Mount, &Opts, &mut Holder) -> (Server, Dirs), what: &str) {
    let dirs = Dirs::new();
    let mut holder = Holder::start(&dirs);
    let o = opts(&holder);
    let m = Mount::start_in(dirs, o.clone());
    let mnt = m.mnt().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(&mnt, stop.clone());
    thread::sleep(Duration::from_millis(800));
    let (server, dirs) = restart(m, &o, &mut holder);
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Release);
    let seen = w.join().unwrap();
    eprintln!(
        "{what}: {} records fsync'd, longest write+fsync {:?}",
        seen.written, seen.longest
    );
    assert!(
        seen.errors.is_empty(),
        "{what}: callers saw errors: {:?}",
        seen.errors
    );
    assert!(seen.written > 50, "too few records: {}", seen.written);
    check_records(&mnt.join("log"), seen.written);
    server.interrupt();
    assert!(!is_fusevol_mounted(&mnt), "Ctrl-C must unmount");
    fsck_clean(&dirs.data);
    drop(holder);
}

#[test]
fn kill9_of_the_server_is_a_pause_not_an_error() {
    across(
        |m, o, _| {
            let dirs = m.kill9();
            let mut s = Server::start(&dirs, o, 1, &[]);
            s.wait_took_over();
            (s, dirs)
        },
        "kill -9",
    );
}

#[test]
fn sigterm_leaves_the_mount_to_the_next_server() {
    across(
        |m, o, _| {
            let (status, dirs) = m.signal_and_wait(libc::SIGTERM);
            assert!(status.success());
            assert!(
                is_fusevol_mounted(&dirs.mnt),
                "SIGTERM with a holder keeps the mount"
            );
            let mut s = Server::start(&dirs, o, 1, &[]);
            s.wait_took_over();
            (s, dirs)
        },
        "SIGTERM + restart",
    );
}

#[test]
fn a_second_server_takes_over_from_the_live_one() {
    across(
        |m, o, _| {
            let mut s = Server::start(m.dirs(), o, 1, &[]);
            s.wait_took_over();
            // Signal 0: only wait; the first server exits by itself once it handed over.
            let (status, dirs) = m.signal_and_wait(0);
            assert!(status.success(), "the first server must exit cleanly");
            (s, dirs)
        },
        "hand-over",
    );
}

/// The holder restarts (a new version of its container) while a server serves: the server
/// opens a new ownership session with the new holder and hands it its connection again, so
/// a hand-over to a second server afterwards is still only a pause.
#[test]
fn after_a_holder_restart_a_hand_over_is_still_a_pause() {
    across(
        |m, o, holder| {
            holder.restart();
            let key = m.mnt().display().to_string();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !holder.keys().contains(&key) {
                assert!(
                    Instant::now() < deadline,
                    "the server did not hand its connection to the new holder"
                );
                thread::sleep(Duration::from_millis(50));
            }
            // The server's new ownership session is what the hand-over asks to release.
            thread::sleep(Duration::from_millis(1500));
            let mut s = Server::start(m.dirs(), o, 1, &[]);
            s.wait_took_over();
            let (status, dirs) = m.signal_and_wait(0);
            assert!(status.success(), "the first server must exit cleanly");
            (s, dirs)
        },
        "holder restart + hand-over",
    );
}

/// A file unlinked while open keeps its data for its holder across a take-over, and goes
/// once closed (the kernel forgets it).
#[test]
fn a_file_unlinked_while_open_lives_on_across_a_restart_and_goes_when_closed() {
    let dirs = Dirs::new();
    let holder = Holder::start(&dirs);
    let o = opts(&holder);
    let m = Mount::start_in(dirs, o.clone());
    let path = m.path("tmp");
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    // The file's holder, on a thread with its own fd table (see `private_fd_table`).
    let holder_thread = thread::spawn(move || {
        private_fd_table();
        let data = vec![7u8; 3 * MIB as usize];
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
        fs::remove_file(&path).unwrap();
        opened_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(
            back == data,
            "the unlinked file's data, read after the take-over"
        );
        f.write_all_at(b"more", 3 * MIB).unwrap();
        f.sync_all().unwrap();
    });
    opened_rx.recv().unwrap();
    let used_open = m.inspect().used_bytes;
    assert!(used_open >= 3 * MIB, "the open file still holds its bytes");
    let dirs = m.kill9();
    let mut s = Server::start(&dirs, &o, 1, &[]);
    s.wait_took_over();
    go_tx.send(()).unwrap();
    holder_thread.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while inspect(&dirs.data, "vol").used_bytes >= MIB && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let used = inspect(&dirs.data, "vol").used_bytes;
    assert!(
        used < MIB,
        "closed, the unlinked file must go: {used} bytes used"
    );
    s.interrupt();
    fsck_clean(&dirs.data);
    drop(holder);
}

/// On a kernel without FUSE_NOTIFY_RESEND (forced here), the mount survives a kill -9 too;
/// only a request the dead server had read but not answered fails (ECONNABORTED).
#[test]
fn without_resend_the_mount_survives_and_at_most_the_requests_in_flight_fail() {
    let dirs = Dirs::new();
    let holder = Holder::start(&dirs);
    let o = opts(&holder);
    let env = [("FUSEVOL_NO_RESEND", "1")];
    let mut first = Server::mount(&dirs, &o, &env);
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(&dirs.mnt, stop.clone());
    thread::sleep(Duration::from_millis(800));
    let _ = first.child.kill();
    let _ = first.child.wait();
    let mut s = Server::start(&dirs, &o, 1, &env);
    s.wait_took_over();
    thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Release);
    let seen = w.join().unwrap();
    eprintln!(
        "no resend: {} records, {} errors {:?}, longest {:?}",
        seen.written,
        seen.errors.len(),
        seen.errors,
        seen.longest
    );
    assert!(seen.errors.len() <= 2, "errors: {:?}", seen.errors);
    assert!(
        seen.errors.iter().all(|e| e.contains("os error 103")),
        "only ECONNABORTED: {:?}",
        seen.errors
    );
    check_records(&dirs.mnt.join("log"), seen.written);
    s.interrupt();
    fsck_clean(&dirs.data);
    drop(holder);
}

/// A planned restart (a hand-over to a second server, or SIGTERM and a new server) drains
/// the connection first: the old server stops reading, finishes and answers what it had
/// read, and only then exits. So even on a kernel without FUSE_NOTIFY_RESEND (forced
/// here), where a request left half-done would fail with ECONNABORTED, no caller sees an
/// error across several planned restarts under a write + fsync loop with no pause.
#[test]
fn without_resend_planned_restarts_are_drained_and_no_request_fails() {
    let dirs = Dirs::new();
    let holder = Holder::start(&dirs);
    let o = opts(&holder);
    let env = [("FUSEVOL_NO_RESEND", "1")];
    let mut server = Server::mount(&dirs, &o, &env);
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(&dirs.mnt, stop.clone());
    thread::sleep(Duration::from_millis(500));
    for n in 1..=6u32 {
        let sigterm = n % 2 == 0;
        if sigterm {
            // SIGTERM first (a container stop), then the next server.
            unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
            let status = server.child.wait().unwrap();
            assert!(status.success(), "exit {status}:\n{}", server.log());
        }
        let mut next = Server::start(&dirs, &o, n, &env);
        next.wait_took_over();
        if !sigterm {
            // A hand-over: the old server exits by itself once it has drained.
            let status = server.child.wait().unwrap();
            assert!(status.success(), "exit {status}:\n{}", server.log());
        }
        assert!(
            server.log().contains("drained for the hand-over") && server.log().contains("late=0"),
            "restart {n}: no complete drain:\n{}",
            server.log()
        );
        server = next;
        thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Release);
    let seen = w.join().unwrap();
    eprintln!(
        "no resend, 6 planned restarts: {} records, errors {:?}, longest write+fsync {:?}",
        seen.written, seen.errors, seen.longest
    );
    assert!(
        seen.errors.is_empty(),
        "callers saw errors: {:?}",
        seen.errors
    );
    assert!(seen.written > 50, "too few records: {}", seen.written);
    check_records(&dirs.mnt.join("log"), seen.written);
    server.interrupt();
    fsck_clean(&dirs.data);
    drop(holder);
}

/// A held connection is served on only by the volume it was made for: another store's
/// volume of the same name is refused with a clear error, and the held mount lives on for
/// its own server.
#[test]
fn a_held_mount_is_never_served_with_another_volume() {
    let dirs = Dirs::new();
    let holder = Holder::start(&dirs);
    let o = opts(&holder);
    let m = Mount::start_in(dirs, o.clone());
    fs::write(m.path("mine"), b"tenant A").unwrap();
    let (status, dirs) = m.signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    let other = dirs.extra_dir("other-store");
    let mut wrong = Command::new(BIN)
        .arg("mount")
        .arg("--data")
        .arg(&other)
        .args(["--volume", "vol"])
        .args(&o.extra_args)
        .arg(&dirs.mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = wrong.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the wrong server did not give up"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    wrong
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !status.success() && err.contains("refusing"),
        "{status}: {err}"
    );
    let mut s = Server::start(&dirs, &o, 1, &[]);
    s.wait_took_over();
    assert_eq!(fs::read(dirs.mnt.join("mine")).unwrap(), b"tenant A");
    s.interrupt();
    drop(holder);
}

/// While no server runs but the holder keeps a volume's connection (its mount is live,
/// and pods may use it through bind mounts), `volume delete` and `fsck --repair` refuse
/// and name the mount point; once it is unmounted, both work. A plain `fsck` reads only,
/// and runs.
#[test]
fn delete_and_repair_refuse_a_volume_whose_mount_is_held() {
    let dirs = Dirs::new();
    let holder = Holder::start(&dirs);
    let o = opts(&holder);
    let m = Mount::start_in(dirs, o);
    fs::write(m.path("kept"), b"still here").unwrap();
    let dirs = m.kill9();
    assert!(is_fusevol_mounted(&dirs.mnt), "the holder keeps the mount");
    let data = dirs.data.as_os_str();
    let delete = || {
        fusevol([
            OsStr::new("volume"),
            "delete".as_ref(),
            "--data".as_ref(),
            data,
            "vol".as_ref(),
        ])
    };
    let repair = || {
        fusevol([
            OsStr::new("fsck"),
            "--repair".as_ref(),
            "--data".as_ref(),
            data,
        ])
    };
    for out in [delete(), repair()] {
        let out = out.user_error();
        assert!(
            out.stderr.contains("still mounted at")
                && out.stderr.contains(&*dirs.mnt.to_string_lossy()),
            "{}",
            out.stderr
        );
    }
    fsck_clean(&dirs.data);
    assert!(
        list(&dirs.data).iter().any(|v| v.name == "vol"),
        "nothing was deleted"
    );
    detach_all(&dirs.mnt);
    // The holder drops a connection that ended within a second or so.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = repair();
        if out.success() {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {}", out.stderr);
        thread::sleep(Duration::from_millis(200));
    }
    assert!(delete().success());
    assert!(list(&dirs.data).iter().all(|v| v.name != "vol"));
    drop(holder);
}

/// Runs `op` on its own thread while the running server is made to die right after it
/// committed that operation and before it answered (`crash_op`, the test hook), then
/// starts the next server (which dies the same way after `next_crash_op`, if any): the
/// kernel sends the unanswered request again, and `op` returns what it returns.
fn across_a_crash_before_reply<T: Send + 'static>(
    dirs: &Dirs,
    o: &Opts,
    n: u32,
    server: &mut Server,
    next_crash_op: Option<&str>,
    op: impl FnOnce() -> T + Send + 'static,
) -> (Server, T) {
    let caller = thread::spawn(op);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the server did not crash before its reply:\n{}",
            server.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !caller.is_finished(),
        "the caller was answered by a server that crashed before answering"
    );
    let env: Vec<(&str, &str)> = next_crash_op
        .map(|op| ("FUSEVOL_TEST_CRASH_BEFORE_REPLY", op))
        .into_iter()
        .collect();
    let mut next = Server::start(dirs, o, n, &env);
    next.wait_took_over();
    let answer = caller.join().unwrap();
    (next, answer)
}

/// A server killed after it committed a mkdir, an unlink or a RENAME_EXCHANGE and before
/// it answered: the next server answers the request the kernel sends again from the
/// record of its answer, so the caller sees success, not EEXIST or ENOENT, and the
/// exchange is not swapped back.
#[test]
fn a_request_committed_but_unanswered_by_a_dead_server_is_answered_once() {
    let dirs = Dirs::new();
    let holder = Holder::start(&dirs);
    let o = opts(&holder);
    let env = [("FUSEVOL_TEST_CRASH_BEFORE_REPLY", "mkdir")];
    let mut first = Server::mount(&dirs, &o, &env);
    let mnt = dirs.mnt.clone();

    let dir = mnt.join("d");
    let (mut second, made) =
        across_a_crash_before_reply(&dirs, &o, 1, &mut first, Some("unlink"), move || {
            fs::create_dir(&dir)
        });
    made.expect("mkdir answered from its record");
    assert!(mnt.join("d").is_dir());
    assert!(
        second
            .log()
            .contains("answered a resent request from its record"),
        "{}",
        second.log()
    );

    fs::write(mnt.join("gone"), b"x").unwrap();
    let gone = mnt.join("gone");
    let (mut third, removed) =
        across_a_crash_before_reply(&dirs, &o, 2, &mut second, Some("rename"), move || {
            fs::remove_file(&gone)
        });
    removed.expect("unlink answered from its record");
    assert!(!mnt.join("gone").exists());

    fs::write(mnt.join("a"), b"first").unwrap();
    fs::write(mnt.join("b"), b"second").unwrap();
    let (a, b) = (mnt.join("a"), mnt.join("b"));
    let (fourth, swapped) =
        across_a_crash_before_reply(&dirs, &o, 3, &mut third, None, move || {
            rename2(&a, &b, libc::RENAME_EXCHANGE)
        });
    swapped.expect("exchange answered from its record");
    assert_eq!(fs::read(mnt.join("a")).unwrap(), b"second", "swapped once");
    assert_eq!(fs::read(mnt.join("b")).unwrap(), b"first", "swapped once");

    let mut names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "d"]);
    fourth.interrupt();
    fsck_clean(&dirs.data);
    drop(holder);
}
