//! A store whose disk fills up: writes get ENOSPC at the free-space floor (never EIO, and
//! RocksDB itself never runs out of room), deleting files gives the space back, and
//! nothing acknowledged is lost. The disk is a real small ext4 filesystem on a loop device.

#[macro_use]
mod common;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const DISK_MIB: u64 = 256;
const FILE_BYTES: usize = 4 << 20;

/// A `DISK_MIB` ext4 filesystem on a loop device, mounted at `root/disk`.
fn small_disk(dirs: &Dirs) -> PathBuf {
    let image = dirs.root.join("disk.img");
    let f = File::create(&image).unwrap();
    f.set_len(DISK_MIB << 20).unwrap();
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(&image)
        .output()
        .expect("mkfs.ext4");
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
    let disk = dirs.root.join("disk");
    fs::create_dir(&disk).unwrap();
    let out = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&disk)
        .output()
        .expect("mount -o loop");
    assert!(out.status.success(), "mount -o loop: {out:?}");
    disk
}

fn content(i: usize) -> Vec<u8> {
    let mut v = vec![0u8; FILE_BYTES];
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

/// Writes file `i` completely and fsyncs it; the error the application sees otherwise.
fn write_synced(dir: &Path, i: usize) -> io::Result<()> {
    let mut f = File::create(dir.join(format!("f{i}")))?;
    f.write_all(&content(i))?;
    f.sync_all()
}

/// Writes the next files f{done.len()}, ... (each fsync'd) until one fails, adding the
/// acknowledged ones to `done`: the error the application saw.
fn fill(dir: &Path, done: &mut Vec<usize>) -> io::Error {
    loop {
        match write_synced(dir, done.len()) {
            Ok(()) => done.push(done.len()),
            Err(e) => return e,
        }
        assert!(done.len() < 100, "a {DISK_MIB} MiB disk took 400 MiB");
    }
}

fn avail(path: &Path) -> u64 {
    let s = statvfs(path);
    s.f_bavail * s.f_frsize
}

#[test]
fn a_full_disk_gives_enospc_at_the_floor_and_deletes_give_the_space_back() {
    let mut dirs = Dirs::new();
    let disk = small_disk(&dirs);
    dirs.data = disk.join("store");
    let floor: u64 = 32 << 20;
    let mut opts = Opts::new();
    opts.extra_args = vec!["--free-space-floor".into(), "32Mi".into()];
    let m = Mount::start_in(dirs, opts.clone());

    // Fill: every file that fsync acknowledged must survive; the first refusal is ENOSPC.
    let mut done = Vec::new();
    let err = fill(m.mnt(), &mut done);
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "a full disk must answer ENOSPC, not {err}"
    );
    assert!(done.len() >= 5, "only {} files fitted", done.len());
    let free = avail(&disk);
    assert!(
        free > floor / 2,
        "the floor was not kept: {free} bytes left on the disk"
    );
    // Refused again, cleanly. A refusal starts a compaction that wins back what the
    // store no longer needs (the refused file's chunks, obsolete blobs and WAL files), so
    // retries may fit more files (measured: 0 to 5 of 4 MiB); the next refusal is ENOSPC
    // again and the floor still holds.
    let first = done.len();
    let again = fill(m.mnt(), &mut done);
    assert_eq!(again.raw_os_error(), Some(libc::ENOSPC), "{again}");
    eprintln!(
        "{first} files fitted before the first refusal, {} more after it",
        done.len() - first
    );
    let free = avail(&disk);
    assert!(
        free > floor / 2,
        "retries ate the floor: {free} bytes left on the disk"
    );
    let _ = fs::remove_file(m.path(&format!("f{}", done.len())));
    // Reads of what was acknowledged still work.
    for &i in &done {
        assert!(
            fs::read(m.path(&format!("f{i}"))).unwrap() == content(i),
            "f{i}"
        );
    }

    // Overwrites at the floor: an LSM store writes a new copy of every chunk it
    // overwrites, so they are refused with ENOSPC too, and RocksDB never runs out itself.
    let removed: Vec<usize> = done.iter().copied().filter(|i| i % 2 == 0).collect();
    let mut refused = 0;
    'rounds: for _ in 0..4 {
        for &i in &removed {
            let r = fs::OpenOptions::new()
                .write(true)
                .open(m.path(&format!("f{i}")))
                .and_then(|mut f| {
                    f.write_all(&content(i + 7))?;
                    f.sync_all()
                });
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    refused += 1;
                    break 'rounds;
                }
                Err(e) => panic!("overwrite at the floor: {e}"),
            }
        }
    }
    assert!(refused > 0, "overwrites at the floor were never refused");
    let free = avail(&disk);
    assert!(
        free > floor / 2,
        "overwrites ate the floor: {free} bytes left"
    );

    // Deleting files frees space (once compaction drops them): writes work again.
    for i in &removed {
        fs::remove_file(m.path(&format!("f{i}"))).unwrap();
    }
    let start = Instant::now();
    let mut fresh = 0;
    while fresh < 2 && start.elapsed() < Duration::from_secs(60) {
        match write_synced(m.mnt(), 500 + fresh) {
            Ok(()) => fresh += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("write after deleting files: {e}"),
        }
    }
    assert_eq!(
        fresh, 2,
        "no space came back within 60 s after deleting {removed:?}"
    );

    // Nothing acknowledged is lost; a clean stop, a clean fsck, a clean remount.
    let kept: Vec<usize> = done.iter().copied().filter(|i| i % 2 == 1).collect();
    let dirs = m.stop();
    let out = fsck(&dirs.data, &[]);
    assert!(out.success(), "fsck after filling the disk: {out:?}");
    let m = Mount::start_in(dirs, opts);
    for &i in &kept {
        assert!(
            fs::read(m.path(&format!("f{i}"))).unwrap() == content(i),
            "f{i}"
        );
    }
    for i in 0..fresh {
        assert!(fs::read(m.path(&format!("f{}", 500 + i))).unwrap() == content(500 + i));
    }
    m.stop();
}

/// The floor turned off and the disk filled anyway (as another process on the node would
/// fill it): RocksDB runs out of room itself. Callers still see ENOSPC, not EIO, and the
/// store resumes once space is freed on the disk, without a remount.
#[test]
fn rocksdb_out_of_space_answers_enospc_and_resumes_when_space_comes_back() {
    let mut dirs = Dirs::new();
    let disk = small_disk(&dirs);
    dirs.data = disk.join("store");
    let mut opts = Opts::new();
    opts.extra_args = vec!["--free-space-floor".into(), "0".into()];
    let m = Mount::start_in(dirs, opts.clone());
    // Another tenant of the disk takes 100 MiB.
    let ballast = disk.join("ballast");
    let out = Command::new("fallocate")
        .args(["-l", "100M"])
        .arg(&ballast)
        .output()
        .expect("fallocate");
    assert!(out.status.success(), "fallocate: {out:?}");
    let mut done = Vec::new();
    let err = fill(m.mnt(), &mut done);
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "RocksDB out of space must answer ENOSPC, not {err}"
    );
    fs::remove_file(&ballast).unwrap();
    let start = Instant::now();
    let resumed = loop {
        match write_synced(m.mnt(), 900) {
            Ok(()) => break true,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
            Err(e) => panic!("after space came back: {e}"),
        }
        if start.elapsed() > Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        resumed,
        "the store did not resume within 60 s after space was freed"
    );
    eprintln!(
        "RocksDB resumed {:.1} s after space was freed",
        start.elapsed().as_secs_f64()
    );
    for &i in &done {
        assert!(
            fs::read(m.path(&format!("f{i}"))).unwrap() == content(i),
            "f{i}"
        );
    }
    let dirs = m.stop();
    let out = fsck(&dirs.data, &[]);
    assert!(
        out.success(),
        "fsck after RocksDB ran out of space: {out:?}"
    );
}
