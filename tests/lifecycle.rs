//! Mount lifecycle: readiness, clean shutdown on SIGTERM/SIGINT, creation of a missing store,
//! what a volume without a quota reports, and the dirty-page bound set in the mount's bdi.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;

use common::*;

#[test]
fn sigterm_unmounts_and_exits_zero() {
    let m = Mount::start(Opts::new());
    fs::write(m.path("f"), b"x").unwrap();
    let (status, dirs) = m.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(
        !is_mounted(&dirs.mnt),
        "the mount is still present after SIGTERM"
    );
    assert!(
        fs::read_dir(&dirs.mnt).unwrap().next().is_none(),
        "the bare mountpoint is not empty"
    );
}

#[test]
fn sigint_unmounts_and_exits_zero() {
    let m = Mount::start(Opts::new());
    fs::write(m.path("f"), b"x").unwrap();
    let (status, dirs) = m.signal_and_wait(libc::SIGINT);
    assert_eq!(status.code(), Some(0), "exit status after SIGINT");
    assert!(
        !is_mounted(&dirs.mnt),
        "the mount is still present after SIGINT"
    );
}

#[test]
fn clean_stop_persists_writes_that_were_never_fsynced() {
    let m = Mount::start(Opts::new());
    let data = pattern(5, (5 * MIB + 3) as usize);
    fs::write(m.path("unsynced"), &data).unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/small"), b"small").unwrap();
    fs::rename(m.path("d/small"), m.path("d/renamed")).unwrap();
    let dirs = m.stop();
    let m = Mount::start_in(dirs, Opts::new());
    assert!(
        read_all(&m.path("unsynced")) == data,
        "unsynced data lost across a clean stop"
    );
    assert_eq!(read_all(&m.path("d/renamed")), b"small");
}

#[test]
fn mount_creates_a_missing_data_dir_and_the_volume() {
    let dirs = Dirs::new();
    let nested = dirs.data.join("deeper/store");
    let mut dirs = dirs;
    dirs.data = nested.clone();
    let m = Mount::start_in(dirs, Opts::new().volume("fresh").quota("32Mi"));
    assert!(nested.is_dir(), "the data dir was not created");
    assert_eq!(df(m.mnt()).0, 32 * MIB);
    fs::write(m.path("f"), b"x").unwrap();
    let v = m.inspect();
    assert_eq!(v.name, "fresh");
    assert_eq!(v.quota_bytes, Some(32 * MIB));
}

#[test]
fn mountpoint_shows_an_empty_volume_root_directory() {
    let m = Mount::start(Opts::new());
    let md = lstat(m.mnt());
    assert!(md.is_dir());
    assert_eq!(md.dev(), m.dev);
    assert_eq!(md.nlink(), 2, "an empty root directory has two links");
    assert_eq!(
        fs::read_dir(m.mnt()).unwrap().count(),
        0,
        "a new volume is empty"
    );
    assert!(is_fusevol_mounted(m.mnt()));
}

#[test]
fn volume_without_quota_reports_the_backing_disk_size() {
    let m = Mount::start(Opts::new());
    assert_eq!(m.inspect().quota_bytes, None);
    let (total, _) = df(m.mnt());
    let backing = statvfs(m.data());
    let disk = backing.f_blocks * backing.f_frsize;
    let diff = total.abs_diff(disk);
    assert!(
        diff <= disk / 100,
        "df size {total} differs from the backing disk size {disk}"
    );
    // Free space comes from the disk as well.
    let s = statvfs(m.mnt());
    let free = s.f_bavail * s.f_frsize;
    let disk_free = backing.f_bavail * backing.f_frsize;
    assert!(
        free <= disk_free + disk / 100,
        "df reports {free} bytes available, the disk has {disk_free}"
    );
    assert!(free > 0);
}

#[test]
fn many_mount_and_unmount_cycles_keep_data_and_release_the_store() {
    let mut dirs = Dirs::new();
    for i in 0..5u64 {
        let m = Mount::start_in(dirs, Opts::new());
        for j in 0..i {
            assert_eq!(
                read_all(&m.path(&format!("f{j}"))),
                j.to_le_bytes(),
                "file of cycle {j}"
            );
        }
        fs::write(m.path(&format!("f{i}")), i.to_le_bytes()).unwrap();
        File::open(m.path(&format!("f{i}"))).unwrap();
        dirs = m.stop();
    }
}

/// The mount's writeback device in sysfs: `0:<minor of st_dev>`.
fn bdi_of(m: &Mount) -> std::path::PathBuf {
    let (major, minor) = (libc::major(m.dev), libc::minor(m.dev));
    std::path::PathBuf::from(format!("/sys/class/bdi/{major}:{minor}"))
}

fn bdi_value(m: &Mount, file: &str) -> u64 {
    let path = bdi_of(m).join(file);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim().parse().unwrap()
}

/// Waits (5 s at most) until the mount's bdi file satisfies `ok`: the server sets it right
/// after the mount appears, so a test may look a moment too early.
fn wait_bdi(m: &Mount, file: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let v = bdi_value(m, file);
        if ok(v) || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn mount_sets_its_dirty_page_bound_in_its_bdi() {
    let mut opts = Opts::new();
    opts.extra_args = vec!["--max-dirty".into(), "7%".into()];
    let m = Mount::start(opts);
    assert_eq!(libc::major(m.dev), 0, "a FUSE mount is an anonymous device");
    assert_eq!(wait_bdi(&m, "max_ratio", |v| v == 7), 7, "--max-dirty 7%");
    assert_eq!(bdi_value(&m, "strict_limit"), 1, "strict limiting stays on");

    // A byte bound (the default is one): the kernel keeps it as a share of the node's dirty
    // threshold and reads it back from that share, so it comes back close, not exact.
    let want = 96 * MIB;
    let mut opts = Opts::new();
    opts.extra_args = vec!["--max-dirty".into(), "96Mi".into()];
    let m = Mount::start(opts);
    let got = wait_bdi(&m, "max_bytes", |v| v.abs_diff(want) < want / 10);
    assert!(
        got.abs_diff(want) < want / 10,
        "max_bytes {got}, wanted about {want}"
    );
    assert_eq!(bdi_value(&m, "strict_limit"), 1);
}

#[test]
fn max_dirty_0_leaves_the_kernels_bound_of_fuse_mounts() {
    let mut opts = Opts::new();
    opts.extra_args = vec!["--max-dirty".into(), "0".into()];
    let m = Mount::start(opts);
    // Give a server that (wrongly) set something the time to do it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(bdi_value(&m, "max_ratio"), 1, "the kernel's 1% for FUSE");
    assert_eq!(bdi_value(&m, "strict_limit"), 1);
}

#[test]
fn the_default_dirty_page_bound_is_256_mib() {
    let m = Mount::start(Opts::new());
    let want = 256 * MIB;
    let got = wait_bdi(&m, "max_bytes", |v| v.abs_diff(want) < want / 10);
    assert!(
        got.abs_diff(want) < want / 10,
        "max_bytes {got}, wanted about {want}"
    );
}
