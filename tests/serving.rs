//! How the FUSE workers share the requests: with `--split-data` (the default) they take
//! turns at reading, the reader answering metadata itself and passing the reading on while
//! it answers a data request; with `--split-data false` all read at once; with `--threads
//! 1` one does everything. Every mode must answer every request, concurrent data and
//! metadata alike (writes, reads, fsync, fsyncdir, truncation, fallocate, create, stat,
//! rename, readdir, unlink), with the right bytes, and stop cleanly. A request left
//! unanswered (a lost turn, a reply through the wrong fd) hangs the test until the mount's
//! watchdog kills the server.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;

use common::*;

const WRITERS: usize = 4;
const RECORDS: u64 = 64;
const RECORD: usize = 8192;

fn record(writer: usize, n: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    for (i, b) in r.iter_mut().enumerate() {
        *b = (writer as u64 * 31 + n * 7 + i as u64 % 251) as u8;
    }
    r
}

/// Writers (pwrite + fsync), readers of what they wrote, and a metadata churner (create,
/// stat, rename, readdir, unlink), all at once.
fn mixed_workload(mnt: &Path) {
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let path = mnt.join(format!("data-{w}"));
        handles.push(thread::spawn(move || {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            for n in 0..RECORDS {
                f.write_all_at(&record(w, n), n * RECORD as u64).unwrap();
                if n % 8 == 7 {
                    f.sync_data().unwrap();
                }
                let mut back = vec![0u8; RECORD];
                f.read_exact_at(&mut back, n * RECORD as u64).unwrap();
                assert!(
                    back == record(w, n),
                    "writer {w}: record {n} read back wrong"
                );
            }
            f.sync_all().unwrap();
        }));
    }
    // Truncations (SETATTR with a size) and fallocate on a scratch file.
    let scratch = mnt.join("scratch");
    handles.push(thread::spawn(move || {
        let f = File::create(&scratch).unwrap();
        for i in 0..100u64 {
            f.set_len((i % 7 + 1) * 200_000).unwrap();
            // SAFETY: fallocate on an open file's own descriptor with valid ranges.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, ((i % 5 + 1) * 100_000) as i64) };
            assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
            f.set_len(0).unwrap();
        }
        assert_eq!(f.metadata().unwrap().len(), 0);
    }));
    let dir: PathBuf = mnt.join("churn");
    fs::create_dir(&dir).unwrap();
    handles.push(thread::spawn(move || {
        for i in 0..300 {
            let a = dir.join(format!("f{i}"));
            fs::write(&a, format!("{i}")).unwrap();
            assert_eq!(fs::metadata(&a).unwrap().len(), format!("{i}").len() as u64);
            let b = dir.join(format!("g{i}"));
            fs::rename(&a, &b).unwrap();
            if i % 3 == 0 {
                fs::remove_file(&b).unwrap();
            }
            if i % 50 == 49 {
                File::open(&dir).unwrap().sync_all().unwrap(); // FSYNCDIR
            }
        }
        let left = fs::read_dir(&dir).unwrap().count();
        assert_eq!(left, 200, "files left after the churn");
    }));
    for h in handles {
        h.join().unwrap();
    }
}

fn check_written(mnt: &Path) {
    for w in 0..WRITERS {
        let f = File::open(mnt.join(format!("data-{w}"))).unwrap();
        for n in 0..RECORDS {
            let mut back = vec![0u8; RECORD];
            f.read_exact_at(&mut back, n * RECORD as u64).unwrap();
            assert!(
                back == record(w, n),
                "writer {w}: record {n} wrong after remount"
            );
        }
    }
}

fn serves_in_mode(args: &[&str]) {
    let mut opts = Opts::new();
    opts.extra_args = args.iter().map(|a| a.to_string()).collect();
    let m = Mount::start(opts.clone());
    mixed_workload(m.mnt());
    let dirs = m.stop();
    let m = Mount::start_in(dirs, opts);
    check_written(m.mnt());
    m.stop();
}

#[test]
fn workers_taking_turns_answer_concurrent_data_and_metadata() {
    serves_in_mode(&["--threads", "4"]);
}

#[test]
fn workers_reading_at_once_answer_concurrent_data_and_metadata() {
    serves_in_mode(&["--threads", "4", "--split-data", "false"]);
}

#[test]
fn two_workers_taking_turns_answer_concurrent_data_and_metadata() {
    serves_in_mode(&["--threads", "2", "--split-data", "true"]);
}

#[test]
fn one_worker_answers_concurrent_data_and_metadata() {
    serves_in_mode(&["--threads", "1"]);
}

/// Completions the process's io_uring instances have posted: the kernel's `CqHead` of
/// each io_uring fd in /proc/PID/fdinfo. With FUSE over io_uring each one is a request
/// the kernel delivered through a ring.
fn io_uring_completions(pid: i32) -> u64 {
    let mut total = 0;
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_ring =
            fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("io_uring"));
        if !is_ring {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        for line in info.lines() {
            if let Some(v) = line.strip_prefix("CqHead:") {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Requests whose arguments and replies fill a ring slot's payload buffer: 1 MiB writes
/// and reads (O_DIRECT, so each is one request), a 60 KiB xattr, a 200-entry listing.
fn large_requests(mnt: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let path = mnt.join("large");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let block = |i: u64| -> Vec<u8> {
        (0..1 << 20)
            .map(|b| (b as u64 * 13 + i * 101) as u8)
            .collect()
    };
    for i in 0..4u64 {
        f.write_all_at(&block(i), i << 20).unwrap();
    }
    f.sync_all().unwrap();
    for i in 0..4u64 {
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, i << 20).unwrap();
        assert!(back == block(i), "1 MiB block {i} read back wrong");
    }
    let value: Vec<u8> = (0..60 * 1024).map(|i| (i % 253) as u8).collect();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and name, and a buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"user.big".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut back = vec![0u8; 64 * 1024];
    // SAFETY: as above; `back` is writable for its length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"user.big".as_ptr(),
            back.as_mut_ptr().cast(),
            back.len(),
        )
    };
    assert_eq!(
        n,
        value.len() as isize,
        "getxattr: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        back[..value.len()] == value[..],
        "60 KiB xattr read back wrong"
    );
    assert_eq!(fs::read_dir(mnt.join("churn")).unwrap().count(), 200);
}

/// FUSE over io_uring (`--io-uring true`, Linux 6.14+): the rings answer the same mixed
/// load with the right bytes, requests do go through them, and the volume stops and
/// mounts again with everything written.
#[test]
fn io_uring_answers_concurrent_data_and_metadata() {
    if !Path::new("/sys/module/fuse/parameters/enable_uring").exists() {
        eprintln!("SKIP io_uring_answers_concurrent_data_and_metadata: this kernel has no FUSE over io_uring (6.14+)");
        return;
    }
    let mut opts = Opts::new();
    opts.extra_args = vec!["--io-uring".into(), "true".into()];
    let m = Mount::start(opts.clone());
    let before = io_uring_completions(m.pid());
    mixed_workload(m.mnt());
    large_requests(m.mnt());
    let after = io_uring_completions(m.pid());
    assert!(
        after >= before + 2000,
        "the requests did not go through the rings: {before} -> {after} completions"
    );
    let dirs = m.stop();
    let m = Mount::start_in(dirs, opts);
    check_written(m.mnt());
    m.stop();
}

/// Without `--io-uring` no ring is made: /dev/fuse serves as before.
#[test]
fn dev_fuse_serves_without_rings_by_default() {
    let m = Mount::start(Opts::new());
    mixed_workload(m.mnt());
    assert_eq!(
        io_uring_completions(m.pid()),
        0,
        "a ring served a mount not asked to use io_uring"
    );
    m.stop();
}
