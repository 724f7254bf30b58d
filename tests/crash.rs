//! Durability: kill -9 the mount process, mount again, and check that fsync'd data is intact
//! and that `fsck` finds a clean store.
//!
//! `fsynced_data_survives_kill9_and_remount_over_the_stale_mount` mounts again right over the
//! stale mount the killed process leaves (fusevol must recover it by itself); the other tests
//! lazily unmount the stale mount first, so that their durability and accounting checks do not
//! depend on stale-mount recovery.

#[macro_use]
mod common;

use std::fs::{self, File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

fn opts() -> Opts {
    Opts::new().quota("1Gi")
}

#[test]
fn fsynced_data_survives_kill9_and_remount_over_the_stale_mount() {
    let m = Mount::start(opts());
    // A new file, fsync'd and still open at the crash.
    let a = pattern(1, (3 * MIB + 77) as usize);
    let fa = create_rw(&m.path("new-file"));
    pwrite_all(&fa, &a, 0).unwrap();
    fa.sync_all().unwrap();
    // An existing file partly overwritten and extended, fdatasync'd.
    write_big_file(&m.path("existing"), 2 * MIB, 2).unwrap();
    let fb = open_rw(&m.path("existing"));
    pwrite_all(&fb, b"OVERWRITTEN", MIB + 5).unwrap();
    pwrite_all(&fb, b"EXTENDED", 2 * MIB + 100).unwrap();
    fb.sync_data().unwrap();
    // A file in a new directory, file and directory fsync'd.
    fs::create_dir(m.path("dir")).unwrap();
    let c = pattern(3, 70_000);
    let fc = create_rw(&m.path("dir/c"));
    pwrite_all(&fc, &c, 0).unwrap();
    fc.sync_all().unwrap();
    fsync_path(&m.path("dir")).unwrap();
    // Atomic replace: write temp, fsync, rename over the target, fsync the directory.
    fs::write(m.path("config"), b"old config").unwrap();
    fsync_path(&m.path("config")).unwrap();
    let ft = create_rw(&m.path("config.tmp"));
    pwrite_all(&ft, b"new config", 0).unwrap();
    ft.sync_all().unwrap();
    drop(ft);
    fs::rename(m.path("config.tmp"), m.path("config")).unwrap();
    fsync_path(m.mnt()).unwrap();
    // A sparse file with data far out.
    let fs_ = create_rw(&m.path("sparse"));
    pwrite_all(&fs_, b"far away", 5 * GIB).unwrap();
    fs_.sync_all().unwrap();
    setxattr(&m.path("dir/c"), "user.k", b"v", 0).unwrap();
    fsync_path(&m.path("dir/c")).unwrap();

    let dirs = m.kill9();
    // No unmount, no waiting: mounting again must recover the stale mount by itself.
    drop((fa, fb, fc, fs_));
    let m = Mount::start_in(dirs, opts());
    let got = read_all(&m.path("new-file"));
    assert!(
        got == a,
        "fsync'd new file: {} bytes read, content equal: {}",
        got.len(),
        got == a
    );
    let b = read_all(&m.path("existing"));
    assert_eq!(b.len() as u64, 2 * MIB + 108);
    assert_eq!(&b[(MIB + 5) as usize..(MIB + 16) as usize], b"OVERWRITTEN");
    assert_eq!(&b[(2 * MIB + 100) as usize..], b"EXTENDED");
    assert!(b[..MIB as usize] == pattern(2, MIB as usize)[..]);
    assert!(is_zero(&b[(2 * MIB) as usize..(2 * MIB + 100) as usize]));
    assert!(read_all(&m.path("dir/c")) == c);
    assert_eq!(getxattr(&m.path("dir/c"), "user.k").unwrap(), b"v");
    assert_eq!(read_all(&m.path("config")), b"new config");
    assert_errno!(fs::metadata(m.path("config.tmp")), libc::ENOENT);
    let f = File::open(m.path("sparse")).unwrap();
    assert_eq!(pread(&f, 5 * GIB, 100).unwrap(), b"far away");
    drop(f);
    let dirs = m.stop();
    fsck(&dirs.data, &[]).code_is(0);
}

#[test]
fn mount_recovers_over_a_stale_fuse_mount() {
    let dirs = Dirs::new();
    make_stale_mount(&dirs.mnt);
    let m = Mount::start_in(dirs, Opts::new());
    fs::write(m.path("f"), b"works").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"works");
    let dirs = m.stop();
    assert!(
        !is_fusevol_mounted(&dirs.mnt),
        "a mount is left at the mountpoint after a clean stop"
    );
}

/// A file whose content was fsync'd and that no later operation touches.
#[derive(Clone, Debug)]
struct Synced {
    path: PathBuf,
    seed: u64,
    len: usize,
}

/// Writes, fsyncs, renames and deletes files under `dir` until an operation fails (which
/// happens when the filesystem process is killed) or `stop` is set.
fn data_worker(dir: PathBuf, t: u64, stop: Arc<AtomicBool>, synced: Arc<Mutex<Vec<Synced>>>) {
    if fs::create_dir_all(&dir).is_err() {
        return;
    }
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let seed = t * 1_000_000 + i;
        let len = ((seed * 7919) % (600 * KIB)) as usize + 1;
        let data = pattern(seed, len);
        let res = (|| -> std::io::Result<()> {
            let p = dir.join(format!("w{i}"));
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)?;
            // Write in pieces at odd offsets to produce partial chunks.
            let mut off = 0;
            while off < len {
                let n = std::cmp::min(100_003, len - off);
                pwrite_all(&f, &data[off..off + n], off as u64)?;
                off += n;
            }
            match i % 4 {
                0 => {
                    f.sync_all()?;
                    let fin = dir.join(format!("synced{i}"));
                    fs::rename(&p, &fin)?;
                    File::open(&dir)?.sync_all()?;
                    synced.lock().unwrap().push(Synced {
                        path: fin,
                        seed,
                        len,
                    });
                }
                1 => fs::remove_file(&p)?,
                2 => {
                    ftruncate(&f, (len / 3) as u64)?;
                    setxattr(&p, "user.n", &i.to_le_bytes(), 0)?;
                }
                _ => {
                    if i > 8 {
                        let _ = fs::remove_file(dir.join(format!("w{}", i - 5)));
                    }
                }
            }
            Ok(())
        })();
        if res.is_err() {
            return;
        }
    }
}

/// Directory and link churn under `dir`.
fn meta_worker(dir: PathBuf, stop: Arc<AtomicBool>) {
    if fs::create_dir_all(&dir).is_err() {
        return;
    }
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let res = (|| -> std::io::Result<()> {
            let d = dir.join(format!("d{}", i % 17));
            match i % 6 {
                0 => {
                    let _ = fs::create_dir(&d);
                }
                1 => {
                    let _ = fs::write(d.join(format!("f{i}")), i.to_le_bytes());
                }
                2 => {
                    let _ = fs::rename(&d, dir.join(format!("d{}", (i * 3) % 17)));
                }
                3 => {
                    let _ = std::os::unix::fs::symlink(
                        format!("d{i}"),
                        dir.join(format!("s{}", i % 11)),
                    );
                    let _ = fs::remove_file(dir.join(format!("s{}", (i + 5) % 11)));
                }
                4 => {
                    if let Ok(rd) = fs::read_dir(&d) {
                        for e in rd {
                            let p = e?.path();
                            let _ = fs::hard_link(&p, dir.join(format!("h{}", i % 13)));
                            let _ = fs::remove_file(&p);
                        }
                    }
                }
                _ => {
                    let _ = fs::remove_dir(&d);
                    let _ = fs::remove_file(dir.join(format!("h{}", i % 13)));
                }
            }
            // Stop once the filesystem is gone.
            fs::metadata(&dir).map(|_| ())
        })();
        if res.is_err() {
            return;
        }
    }
}

fn verify_synced(synced: &[Synced]) {
    for s in synced {
        let got = fs::read(&s.path)
            .unwrap_or_else(|e| panic!("fsync'd file {} lost: {e}", s.path.display()));
        assert_eq!(
            got.len(),
            s.len,
            "length of fsync'd file {}",
            s.path.display()
        );
        assert!(
            got == pattern(s.seed, s.len),
            "content of fsync'd file {} differs",
            s.path.display()
        );
    }
}

#[test]
fn kill9_during_busy_writes_then_remount_keeps_fsynced_files_and_fsck_is_clean() {
    kill9_during_busy_writes(opts());
}

/// The same through FUSE over io_uring: requests the dead server's rings held end with an
/// error when the connection goes (no writer waits for ever), and nothing fsync'd is lost.
#[test]
fn kill9_during_busy_writes_served_through_io_uring() {
    if !std::path::Path::new("/sys/module/fuse/parameters/enable_uring").exists() {
        eprintln!("SKIP kill9_during_busy_writes_served_through_io_uring: this kernel has no FUSE over io_uring (6.14+)");
        return;
    }
    let mut o = opts();
    o.extra_args = vec!["--io-uring".into(), "true".into()];
    kill9_during_busy_writes(o);
}

fn kill9_during_busy_writes(opts: Opts) {
    let mut dirs = Dirs::new();
    let synced: Arc<Mutex<Vec<Synced>>> = Arc::new(Mutex::new(vec![]));
    for round in 0..3u64 {
        let m = Mount::start_in(dirs, opts.clone());
        verify_synced(&synced.lock().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = vec![];
        for t in 0..2u64 {
            let (dir, stop, synced) = (
                m.path(&format!("r{round}/t{t}")),
                stop.clone(),
                synced.clone(),
            );
            workers.push(thread::spawn(move || {
                data_worker(dir, round * 10 + t, stop, synced)
            }));
        }
        let (dir, stop2) = (m.path(&format!("r{round}/meta")), stop.clone());
        workers.push(thread::spawn(move || meta_worker(dir, stop2)));
        thread::sleep(Duration::from_millis(2500));
        dirs = m.kill9();
        // Lazily unmount the stale mount (the test above covers mounting over it).
        detach_all(&dirs.mnt);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
    }
    let n_synced = synced.lock().unwrap().len();
    assert!(
        n_synced >= 3,
        "the workload fsync'd only {n_synced} files before the crashes"
    );
    let m = Mount::start_in(dirs, opts.clone());
    verify_synced(&synced.lock().unwrap());
    let dirs = m.stop();
    fsck(&dirs.data, &[]).code_is(0);

    // Accounting survived the crashes: removing everything brings usage back to zero.
    let m = Mount::start_in(dirs, opts.clone());
    for e in fs::read_dir(m.mnt()).unwrap() {
        fs::remove_dir_all(e.unwrap().path()).unwrap();
    }
    let empty = eventually(Duration::from_secs(10), || {
        let v = m.inspect();
        v.used_bytes == 0 && v.chunks == 0
    });
    assert!(
        empty,
        "an empty volume after crashes still accounts data: {:?}",
        m.inspect()
    );
    let v = m.inspect();
    assert!(
        v.inodes <= 1,
        "an empty volume after crashes still has {} inodes",
        v.inodes
    );
    let dirs = m.stop();
    fsck(&dirs.data, &[]).code_is(0);
}

#[test]
fn unlinked_open_file_is_reclaimed_after_a_crash() {
    let m = Mount::start(opts());
    write_big_file(&m.path("keep"), MIB, 1).unwrap();
    let f = create_rw(&m.path("orphan"));
    pwrite_all(&f, &pattern(2, (8 * MIB) as usize), 0).unwrap();
    f.sync_all().unwrap();
    fs::remove_file(m.path("orphan")).unwrap();
    fsync_path(m.mnt()).unwrap();
    assert!(
        m.inspect().used_bytes >= 9 * MIB,
        "the open orphan's data must still be accounted"
    );
    let dirs = m.kill9();
    // Lazily unmount the stale mount (the test above covers mounting over it).
    detach_all(&dirs.mnt);
    drop(f);
    let m = Mount::start_in(dirs, opts());
    let reclaimed = eventually(Duration::from_secs(10), || {
        m.inspect().used_bytes <= MIB + CHUNK_MAX
    });
    assert!(
        reclaimed,
        "the orphan's 8 MiB were not reclaimed after the crash: {:?}",
        m.inspect()
    );
    assert!(read_all(&m.path("keep")) == pattern(1, MIB as usize));
    let dirs = m.stop();
    fsck(&dirs.data, &[]).code_is(0);
}

#[test]
fn quota_usage_is_consistent_after_a_crash_mid_overwrite() {
    let m = Mount::start(Opts::new().quota("32Mi"));
    write_big_file(&m.path("a"), 8 * MIB, 1).unwrap();
    // Overwrite continuously, then crash in the middle.
    let p = m.path("a");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let w = thread::spawn(move || {
        let mut round = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            round += 1;
            let Ok(f) = OpenOptions::new().write(true).open(&p) else {
                return;
            };
            for i in 0..8u64 {
                if pwrite_all(&f, &pattern(round * 8 + i, MIB as usize), i * MIB).is_err() {
                    return;
                }
            }
            if f.sync_data().is_err() {
                return;
            }
        }
    });
    thread::sleep(Duration::from_millis(1500));
    let dirs = m.kill9();
    // Lazily unmount the stale mount (the test above covers mounting over it).
    detach_all(&dirs.mnt);
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    let m = Mount::start_in(dirs, Opts::new().quota("32Mi"));
    assert_eq!(lstat(&m.path("a")).len(), 8 * MIB);
    let used = m.inspect().used_bytes;
    let file = fusevol::fs::charge::chunks_charge(128, 8 * MIB)
        + fusevol::fs::charge::INODE_CHARGE
        + fusevol::fs::charge::dirent_charge(1);
    assert!(
        used <= file,
        "8 MiB file accounts {used} bytes (at most {file}) after a crash during overwrites"
    );
    // The full quota minus the file is still usable.
    write_big_file(&m.path("b"), 20 * MIB, 2).expect("20 MiB next to 8 MiB in a 32 MiB quota");
    let dirs = m.stop();
    fsck(&dirs.data, &[]).code_is(0);
}

#[test]
fn fsck_reports_and_repairs_what_a_crash_left_and_only_repairs_with_repair() {
    let m = Mount::start(opts());
    write_big_file(&m.path("keep"), MIB, 1).unwrap();
    let f = create_rw(&m.path("orphan"));
    pwrite_all(&f, &pattern(2, (4 * MIB) as usize), 0).unwrap();
    f.sync_all().unwrap();
    fs::remove_file(m.path("orphan")).unwrap();
    fsync_path(m.mnt()).unwrap();
    let dirs = m.kill9();
    // Lazily unmount the stale mount (the test above covers mounting over it).
    detach_all(&dirs.mnt);
    drop(f);
    // Offline check right after the crash, before any remount: the store may hold an orphan.
    let first = fsck(&dirs.data, &[]).no_panic();
    match first.code() {
        Some(0) => {}
        Some(1) => {
            // Without --repair nothing changes: the same problems are found again.
            fsck(&dirs.data, &[]).code_is(1);
            fsck(&dirs.data, &["--repair"]).code_is(1);
            fsck(&dirs.data, &[]).code_is(0);
        }
        other => panic!("fsck after a crash exited {other:?}: {first:?}"),
    }
    fsck(&dirs.data, &["--repair"]).code_is(0);
    let m = Mount::start_in(dirs, opts());
    assert!(read_all(&m.path("keep")) == pattern(1, MIB as usize));
    let reclaimed = eventually(Duration::from_secs(10), || {
        m.inspect().used_bytes <= MIB + CHUNK_MAX
    });
    assert!(
        reclaimed,
        "the orphan's space is still accounted: {:?}",
        m.inspect()
    );
}
