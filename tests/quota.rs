//! Per-volume byte quota and inode limit, enforced through the mount.
//!
//! The mount uses the kernel writeback cache, so a buffered write beyond the quota may be
//! accepted by write(2) and fail later at fsync(2) or close(2): the tests accept ENOSPC at any
//! of those points, require that at least one reported it, and that the volume never stores
//! more than its quota.
//!
//! Usage counts metadata too (inodes, names, symlink targets, xattrs, chunk keys; see
//! `src/fs/charge.rs`): exact expectations use the charge functions of the library.

#[macro_use]
mod common;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use common::*;
use fusevol::fs::charge::{chunks_charge, dirent_charge, INODE_CHARGE, VOLUME_OVERHEAD_MAX};
use fusevol::store::{Store, StoreOptions};

/// What an empty file named `name` is charged (its inode and its directory entry).
fn node_charge(name: &str) -> u64 {
    INODE_CHARGE + dirent_charge(name.len())
}

/// Outcome of writing a file that may run into the quota.
#[derive(Debug)]
struct FillResult {
    /// Bytes accepted by write(2).
    accepted: u64,
    /// Which calls reported ENOSPC ("open", "write", "fsync", "close").
    enospc_at: Vec<&'static str>,
}

/// Write up to `len` bytes of pattern `seed` to `p` in 256 KiB pieces, then fsync and close,
/// recording ENOSPC wherever it is reported (also at open: a new file's inode and name
/// count toward the quota). Any other error fails the test.
fn fill(p: &Path, len: u64, seed: u64) -> FillResult {
    let mut res = FillResult {
        accepted: 0,
        enospc_at: vec![],
    };
    let f = match OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            res.enospc_at.push("open");
            return res;
        }
        Err(e) => panic!("open failed with {e} (expected success or ENOSPC)"),
    };
    let piece = pattern(seed, 256 * KIB as usize);
    let mut off = 0;
    while off < len {
        let n = std::cmp::min(piece.len() as u64, len - off) as usize;
        match pwrite_all(&f, &piece[..n], off) {
            Ok(()) => {
                off += n as u64;
                res.accepted = off;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                res.enospc_at.push("write");
                break;
            }
            Err(e) => panic!("write at {off} failed with {e} (expected success or ENOSPC)"),
        }
    }
    match f.sync_all() {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => res.enospc_at.push("fsync"),
        Err(e) => panic!("fsync failed with {e} (expected success or ENOSPC)"),
    }
    match close_file(f) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => res.enospc_at.push("close"),
        Err(e) => panic!("close failed with {e} (expected success or ENOSPC)"),
    }
    res
}

fn assert_within_quota(m: &Mount, quota: u64) {
    let info = m.inspect();
    assert_eq!(info.quota_bytes, Some(quota));
    assert!(
        info.used_bytes <= quota,
        "used_bytes {} exceeds the quota {quota}",
        info.used_bytes
    );
    let (total, used) = df(m.mnt());
    assert_eq!(total, quota, "df size");
    assert!(used <= quota, "df used {used} exceeds the quota {quota}");
}

#[test]
fn writing_beyond_quota_reports_enospc_and_never_stores_more_than_quota() {
    let quota = 8 * MIB;
    let m = Mount::start(Opts::new().quota("8Mi"));
    let r = fill(&m.path("big"), 16 * MIB, 1);
    assert!(
        !r.enospc_at.is_empty(),
        "16 MiB written into an 8 MiB volume without ENOSPC: {r:?}"
    );
    assert_within_quota(&m, quota);
    // Nothing more fits, also not in another file.
    let r2 = fill(&m.path("more"), 2 * MIB, 2);
    assert!(
        !r2.enospc_at.is_empty(),
        "full volume accepted 2 MiB more without ENOSPC: {r2:?}"
    );
    assert_within_quota(&m, quota);
    // Usage was close to the quota, not rejected early.
    let used = m.inspect().used_bytes;
    assert!(
        used >= quota - MIB,
        "the volume refused data at {used} of {quota} bytes"
    );
}

#[test]
fn many_small_files_cannot_exceed_quota() {
    let quota = 4 * MIB;
    let m = Mount::start(Opts::new().quota("4Mi"));
    let mut saw_enospc = false;
    for i in 0..200 {
        let r = fill(&m.path(&format!("f{i}")), 64 * KIB, i);
        if !r.enospc_at.is_empty() {
            saw_enospc = true;
        }
    }
    assert!(
        saw_enospc,
        "12.5 MiB in 64 KiB files fit into a 4 MiB quota"
    );
    assert_within_quota(&m, quota);
}

#[test]
fn space_is_usable_again_after_deleting_files() {
    let m = Mount::start(Opts::new().quota("8Mi"));
    let r = fill(&m.path("a"), 12 * MIB, 1);
    assert!(!r.enospc_at.is_empty(), "{r:?}");
    fs::remove_file(m.path("a")).unwrap();
    let freed = eventually(Duration::from_secs(10), || {
        m.inspect().used_bytes < 256 * KIB
    });
    assert!(
        freed,
        "deleting the only file did not release its space: {:?}",
        m.inspect()
    );
    let data = pattern(9, (6 * MIB) as usize);
    let f = create_rw(&m.path("b"));
    pwrite_all(&f, &data, 0).expect("write after freeing space");
    f.sync_all().expect("fsync after freeing space");
    drop_cache(&f);
    assert!(pread(&f, 0, data.len() + 1).unwrap() == data);
    close_file(f).expect("close after freeing space");
    // The same holds for truncating a file down.
    let r = fill(&m.path("c"), 4 * MIB, 3);
    assert!(!r.enospc_at.is_empty(), "6 + 4 MiB fit into 8 MiB: {r:?}");
    truncate(&m.path("b"), MIB).unwrap();
    let freed = eventually(Duration::from_secs(10), || {
        m.inspect().used_bytes <= 5 * MIB + 2 * CHUNK_MAX
    });
    assert!(
        freed,
        "truncating 6 MiB to 1 MiB did not release space: {:?}",
        m.inspect()
    );
    write_big_file(&m.path("d"), 2 * MIB, 4).expect("write after truncating");
}

#[test]
fn fallocate_beyond_quota_fails_with_enospc_immediately() {
    let m = Mount::start(Opts::new().quota("8Mi"));
    let f = create_rw(&m.path("f"));
    assert_errno!(fallocate(&f, 0, 0, 16 * MIB), libc::ENOSPC);
    assert_eq!(
        f.metadata().unwrap().len(),
        0,
        "failed fallocate changed the size"
    );
    assert!(m.inspect().used_bytes <= 8 * MIB);
    fallocate(&f, 0, 0, 4 * MIB).expect("fallocate within the quota");
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB);
}

#[test]
fn fallocated_space_is_reserved_for_later_writes() {
    let m = Mount::start(Opts::new().quota("8Mi"));
    let a = create_rw(&m.path("reserved"));
    fallocate(&a, 0, 0, 6 * MIB).expect("fallocate 6 MiB of 8 MiB");
    // Another file cannot take the reserved space.
    let r = fill(&m.path("other"), 4 * MIB, 1);
    assert!(
        !r.enospc_at.is_empty(),
        "4 MiB fit next to 6 MiB of preallocated space in 8 MiB: {r:?}"
    );
    fs::remove_file(m.path("other")).unwrap();
    assert!(eventually(Duration::from_secs(10), || m
        .inspect()
        .used_bytes
        <= 6 * MIB + 2 * CHUNK_MAX));
    // Writing into the preallocated range succeeds.
    let data = pattern(2, (6 * MIB) as usize);
    pwrite_all(&a, &data, 0).expect("write into preallocated space");
    a.sync_all()
        .expect("fsync of writes into preallocated space");
    close_file(a).expect("close");
    assert_within_quota(&m, 8 * MIB);
}

#[test]
fn ftruncate_up_beyond_quota_makes_a_hole_that_takes_no_quota() {
    // As on ext4 with quotas: growing a file with truncate stores nothing, so it is
    // allowed past the quota and leaves the quota untouched; fallocate is what reserves.
    let m = Mount::start(Opts::new().quota("8Mi"));
    let f = create_rw(&m.path("f"));
    pwrite_all(&f, b"abc", 0).unwrap();
    f.sync_all().unwrap();
    let before = m.inspect().used_bytes;
    ftruncate(&f, 16 * MIB).expect("a sparse truncate-up takes no space");
    assert_eq!(f.metadata().unwrap().len(), 16 * MIB);
    f.sync_all().unwrap();
    assert_eq!(
        m.inspect().used_bytes,
        before,
        "the hole counted toward the quota"
    );
    assert_eq!(pread(&f, 0, 5).unwrap(), b"abc\0\0");
    assert_eq!(pread(&f, 12 * MIB, 4).unwrap(), vec![0u8; 4]);
}

#[test]
fn holes_do_not_count_toward_usage() {
    let m = Mount::start(Opts::new().quota("8Mi"));
    let f = create_rw(&m.path("sparse"));
    pwrite_all(&f, &pattern(1, 4096), 0).unwrap();
    pwrite_all(&f, &pattern(2, 4096), 7 * MIB).unwrap();
    f.sync_all().unwrap();
    let used = m.inspect().used_bytes;
    assert!(used >= 8192, "8 KiB of data but used_bytes = {used}");
    assert!(
        used <= 2 * CHUNK_MAX,
        "sparse file with 8 KiB of data uses {used} bytes"
    );
    // The rest of the quota is still available for data.
    write_big_file(&m.path("dense"), 6 * MIB, 3)
        .expect("6 MiB next to a sparse 7 MiB file in 8 MiB");
}

#[test]
fn overwriting_data_does_not_count_it_twice() {
    let m = Mount::start(Opts::new().quota("16Mi"));
    let p = m.path("f");
    for round in 0..4 {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .unwrap();
        pwrite_all(&f, &pattern(round, (4 * MIB) as usize), 0).unwrap();
        f.sync_all().unwrap();
        close_file(f).unwrap();
    }
    let used = m.inspect().used_bytes;
    assert!(
        (4 * MIB..=4 * MIB + CHUNK_MAX).contains(&used),
        "4 MiB overwritten 4 times: used_bytes = {used}"
    );
    // Partial overwrites at odd offsets.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    for i in 0..50u64 {
        pwrite_all(&f, &pattern(i, 10_000), i * 77_777).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let used = m.inspect().used_bytes;
    assert!(
        (4 * MIB..=4 * MIB + CHUNK_MAX).contains(&used),
        "after partial overwrites: used_bytes = {used}"
    );
}

#[test]
fn hard_links_do_not_count_data_twice() {
    let m = Mount::start(Opts::new().quota("16Mi"));
    write_big_file(&m.path("a"), 4 * MIB, 1).unwrap();
    let used1 = m.inspect().used_bytes;
    fs::hard_link(m.path("a"), m.path("b")).unwrap();
    fs::hard_link(m.path("a"), m.path("c")).unwrap();
    assert_eq!(
        m.inspect().used_bytes,
        used1 + 2 * dirent_charge(1),
        "a link costs its directory entry, not the data again"
    );
    fs::remove_file(m.path("a")).unwrap();
    fs::remove_file(m.path("b")).unwrap();
    assert_eq!(
        m.inspect().used_bytes,
        used1,
        "space released while a link remains"
    );
    fs::remove_file(m.path("c")).unwrap();
    assert!(eventually(Duration::from_secs(10), || m
        .inspect()
        .used_bytes
        < 256 * KIB));
}

#[test]
fn online_resize_up_grows_df_and_allows_more_writes() {
    let m = Mount::start(Opts::new().quota("4Mi"));
    let r = fill(&m.path("a"), 6 * MIB, 1);
    assert!(!r.enospc_at.is_empty(), "{r:?}");
    assert_within_quota(&m, 4 * MIB);
    fusevol(args![
        "volume",
        "resize",
        "--data",
        m.data(),
        m.volume(),
        "--quota",
        "16Mi"
    ])
    .ok();
    assert_eq!(df(m.mnt()).0, 16 * MIB, "df size after online resize");
    assert_eq!(m.inspect().quota_bytes, Some(16 * MIB));
    write_big_file(&m.path("b"), 8 * MIB, 2).expect("8 MiB more after growing the quota to 16 MiB");
    drop_cache_path(&m.path("b"));
    let f = File::open(m.path("b")).unwrap();
    assert!(
        pread(&f, 0, (8 * MIB) as usize).unwrap()[..MIB as usize] == pattern(2, MIB as usize)[..]
    );
    assert_within_quota(&m, 16 * MIB);
}

#[test]
fn online_resize_down_above_usage_takes_effect_immediately() {
    let m = Mount::start(Opts::new().quota("32Mi"));
    write_big_file(&m.path("a"), 4 * MIB, 1).unwrap();
    fusevol(args![
        "volume",
        "resize",
        "--data",
        m.data(),
        m.volume(),
        "--quota",
        "6Mi"
    ])
    .ok();
    assert_eq!(df(m.mnt()).0, 6 * MIB, "df size after shrinking the quota");
    let r = fill(&m.path("b"), 4 * MIB, 2);
    assert!(
        !r.enospc_at.is_empty(),
        "4 + 4 MiB fit into a 6 MiB quota: {r:?}"
    );
    assert_within_quota(&m, 6 * MIB);
}

#[test]
fn online_resize_below_usage_fails_and_keeps_the_quota() {
    let m = Mount::start(Opts::new().quota("32Mi"));
    write_big_file(&m.path("a"), 8 * MIB, 1).unwrap();
    let out = fusevol(args![
        "volume",
        "resize",
        "--data",
        m.data(),
        m.volume(),
        "--quota",
        "4Mi"
    ])
    .user_error();
    let msg = out.stderr.to_lowercase();
    assert!(
        msg.contains("quota") || msg.contains("usage") || msg.contains("used"),
        "the error should explain that the quota is below the usage: {}",
        out.stderr
    );
    assert_eq!(m.inspect().quota_bytes, Some(32 * MIB));
    assert_eq!(df(m.mnt()).0, 32 * MIB);
    write_big_file(&m.path("b"), 8 * MIB, 2)
        .expect("quota must be unchanged after a failed resize");
}

fn create_entries_until_error(m: &Mount, max: u64) -> (u64, io::Error) {
    for i in 0..max {
        if let Err(e) = File::create(m.path(&format!("f{i}"))) {
            return (i, e);
        }
    }
    panic!("created {max} files without hitting the inode limit");
}

#[test]
fn inode_limit_rejects_new_files_with_enospc() {
    let m = Mount::start(Opts::new().inodes(20));
    let (created, err) = create_entries_until_error(&m, 40);
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "creating a file beyond the inode limit: expected ENOSPC, got {err}"
    );
    // The root directory may or may not count toward the limit.
    assert!(
        (19..=20).contains(&created),
        "inode limit 20 allowed {created} files"
    );
    let info = m.inspect();
    assert_eq!(info.inode_limit, Some(20));
    assert!(
        info.inodes <= 20,
        "inspect reports {} inodes with a limit of 20",
        info.inodes
    );
    // Other kinds of inodes are limited as well.
    let e = fs::create_dir(m.path("dir")).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)),
        "mkdir: {e}"
    );
    let e = symlink("x", m.path("sym")).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)),
        "symlink: {e}"
    );
    let e = mkfifo(&m.path("fifo"), 0o600).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)),
        "mkfifo: {e}"
    );
    // A hard link is not a new inode.
    fs::hard_link(m.path("f0"), m.path("link")).expect("hard link at the inode limit");
    // Deleting a file frees its inode.
    fs::remove_file(m.path("f1")).unwrap();
    assert!(eventually(Duration::from_secs(10), || File::create(
        m.path("again")
    )
    .is_ok()));
    assert!(File::create(m.path("again2")).is_err());
}

#[test]
fn inode_limit_set_by_volume_create_applies_to_the_mount() {
    // Same limit through `volume create` rather than the mount flag.
    let dirs = Dirs::new();
    create_volume(&dirs.data, "vol", &["--inodes", "10"]).ok();
    let m = Mount::start_in(dirs, Opts::new());
    let (created, err) = create_entries_until_error(&m, 30);
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)),
        "expected ENOSPC or EDQUOT, got {err}"
    );
    assert!(
        (9..=10).contains(&created),
        "inode limit 10 allowed {created} files"
    );
    for i in 0..created {
        assert!(lstat(&m.path(&format!("f{i}"))).is_file());
    }
    let info = m.inspect();
    assert_eq!(info.inode_limit, Some(10));
    assert!(
        info.inodes == created || info.inodes == created + 1,
        "inspect inodes = {}",
        info.inodes
    );
}

#[test]
fn usage_and_df_track_data_exactly_for_chunk_aligned_files() {
    let m = Mount::start(Opts::new().quota("64Mi"));
    assert!(m.inspect().used_bytes < 64 * KIB);
    write_big_file(&m.path("a"), 3 * MIB, 1).unwrap();
    write_big_file(&m.path("b"), MIB, 2).unwrap();
    let info = m.inspect();
    let chunks = 4 * MIB / CHUNK_MAX;
    let want = chunks_charge(chunks, 4 * MIB) + node_charge("a") + node_charge("b");
    assert_eq!(
        info.used_bytes, want,
        "4 MiB of chunk-aligned data in {chunks} chunks and two files"
    );
    assert_eq!(info.chunks, chunks);
    let (_, used) = df(m.mnt());
    assert_eq!(used, want.div_ceil(4096) * 4096, "df counts whole blocks");
    fs::remove_file(m.path("a")).unwrap();
    let left = chunks_charge(MIB / CHUNK_MAX, MIB) + node_charge("b");
    assert!(
        eventually(Duration::from_secs(10), || m.inspect().used_bytes == left),
        "after deleting 3 MiB of 4: {:?}",
        m.inspect()
    );
}

// ---------------------------------------------------------------------------------------------
// Metadata counts toward the quota
// ---------------------------------------------------------------------------------------------

/// Most that a compacted store's files hold beyond the keys and values of its volume:
/// per table file its index, filter, properties and footer; per blob file its header and
/// footer.
const FILE_FORMAT_OVERHEAD: u64 = 64 * KIB;

fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Runs `op(0)`, `op(1)`, ... until it fails with ENOSPC or EDQUOT; returns how many
/// succeeded. Any other error fails the test.
fn until_full(what: &str, mut op: impl FnMut(u64) -> io::Result<()>) -> u64 {
    for i in 0..1_000_000 {
        match op(i) {
            Ok(()) => {}
            Err(e) if is_full(&e) => return i,
            Err(e) => panic!("{what} #{i}: {e} (expected success or ENOSPC)"),
        }
    }
    panic!("{what}: a million without ENOSPC");
}

fn full() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

/// What the store holds for `volume` (its server stopped): the bytes of its keys and
/// values, and after compacting its range, the bytes of live table and blob files (the
/// volume is the store's only one).
fn stored_bytes(data: &Path, volume: &str) -> (u64, u64) {
    let store = Store::open_existing(data, &StoreOptions::default()).unwrap();
    let f = store.footprint(volume).unwrap();
    (f.logical, f.disk)
}

/// Removes everything in the mounted volume.
fn remove_all(m: &Mount) {
    for e in fs::read_dir(m.mnt()).unwrap() {
        let p = e.unwrap().path();
        if lstat(&p).is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
}

/// The ways to make the store hold bytes without writing file data, each run until the
/// volume is full: `op(m, i)` does the i-th step.
type Filler = (&'static str, fn(&Mount, u64) -> io::Result<()>);

fn xattrs_with_growing_names(m: &Mount, i: u64) -> io::Result<()> {
    let p = m.path(&format!("x{i}"));
    File::create(&p)?;
    // Each file takes attributes until its per-inode space or the quota is full.
    let n = until_full("setxattr", |j| {
        let name = format!("user.{j:0>w$}", w = (10 + (j * 37 + i) % 240) as usize);
        setxattr(&p, &name, &pattern(j, 4000), 0)
    });
    if n == 0 {
        return Err(full());
    }
    Ok(())
}

fn symlinks_with_long_targets(m: &Mount, i: u64) -> io::Result<()> {
    let target = "t".repeat(4095);
    symlink(&target, m.path(&format!("s{i:0>250}")))
}

fn empty_files_with_long_names(m: &Mount, i: u64) -> io::Result<()> {
    File::create(m.path(&format!("{i:f>255}"))).map(|_| ())
}

fn directories_with_long_names(m: &Mount, i: u64) -> io::Result<()> {
    // Nested ten deep, then a fresh chain: entries in many directories.
    let mut p = m.path(&format!("{:d>255}", i / 10));
    for level in 0..i % 10 {
        p = p.join(format!("{level:d>200}"));
    }
    fs::create_dir(&p)
}

fn hard_links_with_long_names(m: &Mount, i: u64) -> io::Result<()> {
    let target = m.path("target");
    if i == 0 {
        File::create(&target)?;
    }
    fs::hard_link(&target, m.path(&format!("{i:h>255}")))
}

fn one_byte_chunks(m: &Mount, i: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(m.path("sparse"))?;
    fallocate(&f, 0, i * CHUNK_MAX, 1)
}

const FILLERS: [Filler; 6] = [
    ("xattrs with growing names", xattrs_with_growing_names),
    ("symlinks with 4 KiB targets", symlinks_with_long_targets),
    (
        "empty files with 255-byte names",
        empty_files_with_long_names,
    ),
    ("directories with long names", directories_with_long_names),
    ("hard links with 255-byte names", hard_links_with_long_names),
    ("1-byte chunks of a sparse file", one_byte_chunks),
];

/// Checks a full volume: within the quota by its counter, and the store holds no more
/// than the quota plus the documented overheads. Returns the directories, unmounted.
fn check_full(m: Mount, quota: u64, what: &str) -> Dirs {
    let used = m.inspect().used_bytes;
    assert!(used <= quota, "{what}: used_bytes {used} > quota {quota}");
    assert!(
        used > quota - 8 * KIB,
        "{what}: refused at {used} of {quota} bytes"
    );
    let volume = m.volume().to_string();
    let dirs = m.stop();
    let (logical, disk) = stored_bytes(&dirs.data, &volume);
    eprintln!("{what}: used {used}, keys and values {logical}, files {disk}");
    assert!(
        logical <= quota + VOLUME_OVERHEAD_MAX,
        "{what}: the store holds {logical} bytes of keys and values for a {quota}-byte quota"
    );
    assert!(
        disk <= quota + VOLUME_OVERHEAD_MAX + FILE_FORMAT_OVERHEAD,
        "{what}: the store's files hold {disk} bytes for a {quota}-byte quota"
    );
    // fsck recomputes the usage from what is stored, by the same charges.
    fsck(&dirs.data, &[]).code_is(0);
    dirs
}

/// The reported bypass (62 MiB of xattr values in a 16 MiB volume, 22 MiB of symlink
/// targets in an 8 MiB one): each way of storing metadata, run until ENOSPC, then all of
/// them interleaved, leaves the store holding at most the quota plus a documented
/// constant; deleting everything brings usage back to the empty volume's.
#[test]
fn no_kind_of_metadata_stores_more_than_the_quota() {
    let quota = MIB;
    let opts = || Opts::new().quota("1Mi");
    let mut m = Mount::start(opts());
    let baseline = m.inspect().used_bytes;
    assert_eq!(baseline, 0, "an empty volume is charged nothing");
    for (what, op) in FILLERS {
        let n = until_full(what, |i| op(&m, i));
        assert!(n > 0, "{what}: nothing fitted into an empty volume");
        let dirs = check_full(m, quota, what);
        m = Mount::start_in(dirs, opts());
        remove_all(&m);
        assert!(
            eventually(Duration::from_secs(10), || m.inspect().used_bytes
                == baseline),
            "{what}: usage after deleting everything: {:?}",
            m.inspect()
        );
    }
    // All of them interleaved, until none of them fits any more.
    let mut live = [true; FILLERS.len()];
    let mut round = 0;
    while live.iter().any(|l| *l) {
        for (k, (what, op)) in FILLERS.iter().enumerate() {
            if !live[k] {
                continue;
            }
            match op(&m, round) {
                Ok(()) => {}
                Err(e) if is_full(&e) => live[k] = false,
                Err(e) => panic!("{what} #{round} (interleaved): {e}"),
            }
        }
        round += 1;
    }
    let dirs = check_full(m, quota, "interleaved");
    let m = Mount::start_in(dirs, opts());
    remove_all(&m);
    assert!(
        eventually(Duration::from_secs(10), || m.inspect().used_bytes
            == baseline),
        "usage after deleting everything: {:?}",
        m.inspect()
    );
    let dirs = m.stop();
    let (logical, _) = stored_bytes(&dirs.data, &opts().volume);
    assert!(
        logical <= VOLUME_OVERHEAD_MAX,
        "an emptied volume still holds {logical} bytes"
    );
    fsck(&dirs.data, &[]).code_is(0);
}

#[test]
fn xattrs_of_one_file_are_bounded_and_count_toward_the_quota() {
    let m = Mount::start(Opts::new().quota("64Mi"));
    let p = m.path("f");
    File::create(&p).unwrap();
    let before = m.inspect().used_bytes;
    let n = until_full("setxattr", |i| {
        setxattr(&p, &format!("user.{i:03}"), &pattern(i, 4096), 0)
    });
    // 128 KiB of names and values per inode: 31 of these.
    assert_eq!(n, 31, "{n} values of 4 KiB on one inode");
    let used = m.inspect().used_bytes;
    assert!(
        used - before >= n * (8 + 4096),
        "attributes were not charged: {before} -> {used}"
    );
    assert_errno!(setxattr(&p, "user.big", &vec![0; 65536], 0), libc::ENOSPC);
    assert_errno!(setxattr(&p, "user.big", &vec![0; 65537], 0), libc::E2BIG);
    // Replacing a value of the same size fits; removing one makes room again.
    setxattr(&p, "user.000", &pattern(9, 4096), libc::XATTR_REPLACE).unwrap();
    removexattr(&p, "user.001").unwrap();
    setxattr(&p, "user.new", &pattern(8, 4000), 0).unwrap();
    // Another file has its own room.
    File::create(m.path("g")).unwrap();
    setxattr(&m.path("g"), "user.big", &vec![1; 65536], 0).unwrap();
    assert_eq!(getxattr(&m.path("g"), "user.big").unwrap(), vec![1; 65536]);
    fs::remove_file(&p).unwrap();
    fs::remove_file(m.path("g")).unwrap();
    assert!(eventually(Duration::from_secs(10), || m
        .inspect()
        .used_bytes
        == 0));
}
