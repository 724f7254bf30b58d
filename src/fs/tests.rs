//! Filesystem-core tests against a real RocksDB store in a temp directory, no FUSE.

use super::data::{Seek, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE};
use super::xattr::{XattrReply, XATTR_CREATE, XATTR_REPLACE};
use super::*;
use crate::store::StoreOptions;

const ROOT: Ino = ROOT_INO;
const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};
const FILE: u32 = libc::S_IFREG | 0o644;
const DIR: u32 = libc::S_IFDIR | 0o755;

struct T {
    _dir: tempfile::TempDir,
    fs: Fs,
}

fn setup(quota: Option<u64>, inodes: Option<u64>) -> T {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&dir.path().join("store"), &StoreOptions::default()).unwrap();
    store.create_volume("v", quota, inodes).unwrap();
    let vol = store.open_volume("v").unwrap();
    let fs = Fs::new(store, vol).unwrap();
    T { _dir: dir, fs }
}

fn mkfile(fs: &Fs, parent: Ino, name: &str) -> Ino {
    fs.create_node(ME, parent, name.as_bytes(), FILE, 0, None)
        .unwrap()
        .ino
}

fn mkdir(fs: &Fs, parent: Ino, name: &str) -> Ino {
    fs.create_node(ME, parent, name.as_bytes(), DIR, 0, None)
        .unwrap()
        .ino
}

fn names(fs: &Fs, dir: Ino) -> Vec<String> {
    fs.readdir(dir, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn written_bytes_read_back_across_chunk_boundaries() {
    let t = setup(None, None);
    let ino = mkfile(&t.fs, ROOT, "f");
    let cs = t.fs.chunk_size as usize;
    let data = pattern(3 * cs + 123, 7);
    assert_eq!(
        t.fs.write(ino, 100, &data, false).unwrap() as usize,
        data.len()
    );
    let back = t.fs.read(ino, 100, data.len() as u32).unwrap();
    assert_eq!(back, data);
    // The first 100 bytes are a hole: zeros.
    assert_eq!(t.fs.read(ino, 0, 100).unwrap(), vec![0u8; 100]);
    assert_eq!(t.fs.getattr(ino).unwrap().size, 100 + data.len() as u64);
    // Overwrite in the middle of a chunk keeps the rest.
    t.fs.write(ino, cs as u64 + 5, b"XYZ", false).unwrap();
    let mid = t.fs.read(ino, cs as u64, 16).unwrap();
    assert_eq!(&mid[5..8], b"XYZ");
    assert_eq!(mid[..5], data[cs - 100..cs - 95]);
}

#[test]
fn writes_past_4_gib_are_sparse_and_count_only_stored_bytes() {
    let t = setup(Some(1 << 20), None);
    let ino = mkfile(&t.fs, ROOT, "big");
    let off = 5u64 << 30;
    t.fs.write(ino, off, b"hello", false).unwrap();
    let a = t.fs.getattr(ino).unwrap();
    assert_eq!(a.size, off + 5);
    assert!(t.fs.volume().used_bytes() < 70_000, "a hole takes no space");
    assert_eq!(t.fs.read(ino, off - 2, 7).unwrap(), b"\0\0hello");
    assert_eq!(t.fs.read(ino, 1 << 32, 4).unwrap(), vec![0; 4]);
}

#[test]
fn truncate_down_frees_space_and_up_reads_zeros() {
    let t = setup(None, None);
    let ino = mkfile(&t.fs, ROOT, "f");
    let cs = t.fs.chunk_size;
    t.fs.write(ino, 0, &pattern(4 * cs as usize, 1), false)
        .unwrap();
    assert_eq!(t.fs.volume().used_bytes(), 4 * cs);
    t.fs.setattr(
        ino,
        SetAttr {
            size: Some(cs + 10),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(t.fs.volume().used_bytes(), cs + 10);
    assert_eq!(t.fs.volume().chunks(), 2);
    t.fs.setattr(
        ino,
        SetAttr {
            size: Some(3 * cs),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        t.fs.volume().used_bytes(),
        cs + 10,
        "growing adds a hole, not data"
    );
    let back = t.fs.read(ino, cs, 100).unwrap();
    assert_eq!(
        &back[..10],
        &pattern(4 * cs as usize, 1)[cs as usize..cs as usize + 10]
    );
    assert!(
        back[10..].iter().all(|b| *b == 0),
        "bytes past the old end read as zeros"
    );
}

#[test]
fn a_write_past_the_quota_fails_and_changes_nothing() {
    let t = setup(Some(100_000), None);
    let ino = mkfile(&t.fs, ROOT, "f");
    t.fs.write(ino, 0, &pattern(90_000, 3), false).unwrap();
    let before = t.fs.getattr(ino).unwrap();
    let err =
        t.fs.write(ino, 90_000, &pattern(20_000, 4), false)
            .unwrap_err();
    assert!(matches!(err, FsError::NoSpace), "{err:?}");
    assert_eq!(t.fs.getattr(ino).unwrap().size, before.size);
    assert_eq!(t.fs.volume().used_bytes(), 90_000);
    assert_eq!(t.fs.read(ino, 0, 90_000).unwrap(), pattern(90_000, 3));
    // Up to the quota exactly is fine.
    t.fs.write(ino, 90_000, &pattern(10_000, 5), false).unwrap();
    assert_eq!(t.fs.volume().used_bytes(), 100_000);
    assert_eq!(t.fs.statfs().unwrap().bfree, 0);
}

#[test]
fn concurrent_writers_never_exceed_the_quota() {
    let t = setup(Some(2 << 20), None);
    let fs = &t.fs;
    let inos: Vec<Ino> = (0..4).map(|i| mkfile(fs, ROOT, &format!("f{i}"))).collect();
    std::thread::scope(|s| {
        for ino in &inos {
            s.spawn(move || {
                for i in 0..200u64 {
                    let _ = fs.write(*ino, i * 8192, &[1u8; 8192], false);
                    assert!(fs.volume().used_bytes() <= 2 << 20);
                }
            });
        }
    });
    let used = fs.volume().used_bytes();
    assert!(
        used <= 2 << 20 && used > (2 << 20) - 4 * 8192,
        "used {used}"
    );
    let stored: u64 = inos.iter().map(|i| fs.load(*i).unwrap().stored_bytes).sum();
    assert_eq!(
        stored, used,
        "per-file accounting matches the volume counter"
    );
}

#[test]
fn fallocate_reserves_and_punch_hole_frees() {
    let t = setup(Some(1 << 20), None);
    let ino = mkfile(&t.fs, ROOT, "f");
    t.fs.fallocate(ino, 0, 300_000, 0).unwrap();
    assert_eq!(t.fs.getattr(ino).unwrap().size, 300_000);
    assert_eq!(t.fs.volume().used_bytes(), 300_000);
    assert_eq!(t.fs.read(ino, 1000, 10).unwrap(), vec![0; 10]);
    let err = t.fs.fallocate(ino, 300_000, 1 << 20, 0).unwrap_err();
    assert!(matches!(err, FsError::NoSpace));
    assert_eq!(
        t.fs.getattr(ino).unwrap().size,
        300_000,
        "a refused fallocate changes nothing"
    );
    t.fs.write(ino, 0, &pattern(300_000, 9), false).unwrap();
    assert_eq!(
        t.fs.volume().used_bytes(),
        300_000,
        "writing into allocated space takes no more"
    );
    t.fs.fallocate(
        ino,
        65_536,
        131_072,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(t.fs.getattr(ino).unwrap().size, 300_000);
    assert_eq!(t.fs.volume().used_bytes(), 300_000 - 131_072);
    assert_eq!(t.fs.read(ino, 65_536, 131_072).unwrap(), vec![0; 131_072]);
    assert_eq!(
        t.fs.read(ino, 0, 10).unwrap(),
        pattern(300_000, 9)[..10].to_vec()
    );
    // Punching part of a chunk zeroes it but keeps the chunk.
    t.fs.fallocate(ino, 10, 20, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        .unwrap();
    let head = t.fs.read(ino, 0, 40).unwrap();
    assert_eq!(head[10..30], [0u8; 20]);
    assert_eq!(head[30..40], pattern(300_000, 9)[30..40]);
    assert!(matches!(
        t.fs.fallocate(ino, 0, 10, FALLOC_FL_PUNCH_HOLE),
        Err(FsError::NotSupported)
    ));
}

#[test]
fn seek_data_and_hole_follow_stored_chunks() {
    let t = setup(None, None);
    let ino = mkfile(&t.fs, ROOT, "f");
    let cs = t.fs.chunk_size;
    t.fs.write(ino, 0, &[1; 4096], false).unwrap();
    t.fs.write(ino, 10 * cs, &[2; 4096], false).unwrap();
    assert_eq!(t.fs.seek(ino, 0, Seek::Data).unwrap(), 0);
    assert_eq!(t.fs.seek(ino, 0, Seek::Hole).unwrap(), 4096);
    assert_eq!(t.fs.seek(ino, 4096, Seek::Data).unwrap(), 10 * cs);
    assert_eq!(t.fs.seek(ino, 10 * cs, Seek::Hole).unwrap(), 10 * cs + 4096);
    assert!(matches!(
        t.fs.seek(ino, 10 * cs + 4096, Seek::Data),
        Err(FsError::NoDataPastOffset)
    ));
}

#[test]
fn unlinked_open_file_keeps_data_until_release_and_survives_a_restart_as_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let ino;
    {
        let store = Store::open_or_create(&path, &StoreOptions::default()).unwrap();
        store.create_volume("v", None, None).unwrap();
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        ino = mkfile(&fs, ROOT, "f");
        fs.open(ino).unwrap();
        fs.write(ino, 0, b"still here", false).unwrap();
        fs.unlink(ROOT, b"f").unwrap();
        assert!(matches!(fs.lookup(ROOT, b"f"), Err(FsError::NotFound)));
        assert_eq!(fs.read(ino, 0, 100).unwrap(), b"still here");
        assert_eq!(fs.getattr(ino).unwrap().nlink, 0);
        // The server stops without releasing (a crash).
    }
    let store = Store::open_or_create(&path, &StoreOptions::default()).unwrap();
    let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
    assert!(
        matches!(fs.getattr(ino), Err(FsError::NotFound)),
        "orphan reclaimed at mount"
    );
    assert_eq!(fs.volume().used_bytes(), 0);
    assert_eq!(fs.volume().inodes(), 1);
}

#[test]
fn release_of_the_last_handle_frees_an_unlinked_file() {
    let t = setup(None, None);
    let ino = mkfile(&t.fs, ROOT, "f");
    t.fs.open(ino).unwrap();
    t.fs.open(ino).unwrap();
    t.fs.write(ino, 0, &[7; 5000], false).unwrap();
    t.fs.unlink(ROOT, b"f").unwrap();
    t.fs.release(ino).unwrap();
    assert_eq!(t.fs.read(ino, 0, 1).unwrap(), vec![7]);
    t.fs.release(ino).unwrap();
    assert!(matches!(t.fs.getattr(ino), Err(FsError::NotFound)));
    assert_eq!(t.fs.volume().used_bytes(), 0);
}

#[test]
fn rename_replaces_moves_and_honours_flags() {
    let t = setup(None, None);
    let fs = &t.fs;
    let a = mkfile(fs, ROOT, "a");
    let b = mkfile(fs, ROOT, "b");
    fs.write(b, 0, b"bbb", false).unwrap();
    let d = mkdir(fs, ROOT, "d");
    assert!(matches!(
        fs.rename(ROOT, b"a", ROOT, b"b", libc::RENAME_NOREPLACE),
        Err(FsError::Exists)
    ));
    fs.rename(ROOT, b"a", ROOT, b"b", 0).unwrap();
    assert_eq!(fs.lookup(ROOT, b"b").unwrap().ino, a);
    assert!(
        matches!(fs.getattr(b), Err(FsError::NotFound)),
        "replaced file is gone"
    );
    assert_eq!(fs.volume().used_bytes(), 0, "and its data freed");
    fs.rename(ROOT, b"b", d, b"inside", 0).unwrap();
    assert_eq!(names(fs, d), vec![".", "..", "inside"]);
    let e = mkdir(fs, ROOT, "e");
    assert!(matches!(
        fs.rename(d, b"inside", ROOT, b"e", 0),
        Err(FsError::IsDir)
    ));
    assert!(matches!(
        fs.rename(ROOT, b"e", d, b"inside", 0),
        Err(FsError::NotDir)
    ));
    // Exchange a file and a directory across parents: link counts follow.
    let f2 = mkfile(fs, d, "file");
    let root_links = fs.getattr(ROOT).unwrap().nlink;
    fs.rename(d, b"file", ROOT, b"e", libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(fs.lookup(ROOT, b"e").unwrap().ino, f2);
    assert_eq!(fs.lookup(d, b"file").unwrap().ino, e);
    assert_eq!(fs.getattr(ROOT).unwrap().nlink, root_links - 1);
    assert_eq!(fs.getattr(d).unwrap().nlink, 3);
    // A directory cannot move into itself.
    assert!(matches!(
        fs.rename(ROOT, b"d", e, b"x", 0),
        Err(FsError::Invalid)
    ));
    // Over an empty directory works, over a non-empty one does not.
    mkdir(fs, ROOT, "empty");
    assert!(matches!(
        fs.rename(ROOT, b"empty", ROOT, b"d", 0),
        Err(FsError::NotEmpty)
    ));
    let full = mkdir(fs, ROOT, "full");
    fs.rename(ROOT, b"full", ROOT, b"empty", 0).unwrap();
    assert_eq!(fs.lookup(ROOT, b"empty").unwrap().ino, full);
    assert_eq!(
        fs.getattr(ROOT).unwrap().nlink,
        2 + 2,
        "root holds d and empty"
    );
}

#[test]
fn rename_updates_ctime_of_the_moved_inode_and_both_parents() {
    let t = setup(None, None);
    let fs = &t.fs;
    let d1 = mkdir(fs, ROOT, "d1");
    let d2 = mkdir(fs, ROOT, "d2");
    let f = mkfile(fs, d1, "f");
    let old = Timestamp {
        secs: 1000,
        nanos: 0,
    };
    for ino in [d1, d2, f] {
        fs.setattr(
            ino,
            SetAttr {
                mtime: Some(SetTime::At(old)),
                ctime: Some(old),
                ..Default::default()
            },
        )
        .unwrap();
    }
    fs.rename(d1, b"f", d2, b"g", 0).unwrap();
    assert!(fs.getattr(f).unwrap().ctime > old);
    assert_eq!(
        fs.getattr(f).unwrap().mtime,
        old,
        "content unchanged: mtime kept"
    );
    assert!(fs.getattr(d1).unwrap().mtime > old);
    assert!(fs.getattr(d2).unwrap().mtime > old);
}

#[test]
fn hard_links_share_data_and_count() {
    let t = setup(None, None);
    let fs = &t.fs;
    let f = mkfile(fs, ROOT, "f");
    fs.write(f, 0, b"shared", false).unwrap();
    fs.link(f, ROOT, b"g").unwrap();
    assert_eq!(fs.getattr(f).unwrap().nlink, 2);
    fs.unlink(ROOT, b"f").unwrap();
    let g = fs.lookup(ROOT, b"g").unwrap();
    assert_eq!((g.ino, g.nlink), (f, 1));
    assert_eq!(fs.read(f, 0, 10).unwrap(), b"shared");
    let d = mkdir(fs, ROOT, "d");
    assert!(matches!(fs.link(d, ROOT, b"d2"), Err(FsError::Perm)));
    assert!(matches!(fs.link(f, ROOT, b"g"), Err(FsError::Exists)));
}

#[test]
fn directories_need_to_be_empty_to_go() {
    let t = setup(None, None);
    let fs = &t.fs;
    let d = mkdir(fs, ROOT, "d");
    mkfile(fs, d, "x");
    assert!(matches!(fs.rmdir(ROOT, b"d"), Err(FsError::NotEmpty)));
    assert!(matches!(fs.unlink(ROOT, b"d"), Err(FsError::IsDir)));
    assert!(matches!(fs.rmdir(d, b"x"), Err(FsError::NotDir)));
    fs.unlink(d, b"x").unwrap();
    fs.rmdir(ROOT, b"d").unwrap();
    assert_eq!(fs.getattr(ROOT).unwrap().nlink, 2);
    assert_eq!(fs.volume().inodes(), 1);
}

#[test]
fn names_longer_than_255_bytes_are_refused() {
    let t = setup(None, None);
    let ok = "n".repeat(255);
    mkfile(&t.fs, ROOT, &ok);
    let long = "n".repeat(256);
    let err =
        t.fs.create_node(ME, ROOT, long.as_bytes(), FILE, 0, None)
            .unwrap_err();
    assert!(matches!(err, FsError::NameTooLong));
    assert!(matches!(
        t.fs.lookup(ROOT, long.as_bytes()),
        Err(FsError::NameTooLong)
    ));
}

#[test]
fn readdir_resumes_correctly_while_the_directory_changes() {
    let t = setup(None, None);
    let fs = &t.fs;
    for i in 0..50 {
        mkfile(fs, ROOT, &format!("f{i:02}"));
    }
    let first = fs.readdir(ROOT, 0, 12).unwrap();
    let resume = first.last().unwrap().cookie;
    // Remove entries already listed and some not yet listed, add new ones.
    for i in 0..5 {
        fs.unlink(ROOT, format!("f{i:02}").as_bytes()).unwrap();
    }
    for i in 40..45 {
        fs.unlink(ROOT, format!("f{i:02}").as_bytes()).unwrap();
    }
    for i in 0..5 {
        mkfile(fs, ROOT, &format!("new{i}"));
    }
    let mut seen: Vec<String> = first
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    let mut off = resume;
    loop {
        let more = fs.readdir(ROOT, off, 7).unwrap();
        let Some(last) = more.last() else { break };
        off = last.cookie;
        seen.extend(more.into_iter().map(|e| String::from_utf8(e.name).unwrap()));
    }
    // Every entry untouched during the listing appears exactly once.
    for i in 5..40 {
        let n = format!("f{i:02}");
        assert_eq!(seen.iter().filter(|s| **s == n).count(), 1, "{n}");
    }
    for i in 45..50 {
        assert_eq!(seen.iter().filter(|s| **s == format!("f{i}")).count(), 1);
    }
    for i in 40..45 {
        assert!(
            !seen.contains(&format!("f{i}")),
            "removed before being listed"
        );
    }
}

#[test]
fn xattrs_follow_linux_semantics() {
    let t = setup(None, None);
    let fs = &t.fs;
    let f = mkfile(fs, ROOT, "f");
    assert!(matches!(fs.getxattr(f, b"user.a", 0), Err(FsError::NoData)));
    assert!(matches!(
        fs.setxattr(f, b"user.a", b"1", XATTR_REPLACE),
        Err(FsError::NoData)
    ));
    fs.setxattr(f, b"user.a", b"value", XATTR_CREATE).unwrap();
    assert!(matches!(
        fs.setxattr(f, b"user.a", b"v2", XATTR_CREATE),
        Err(FsError::Exists)
    ));
    assert_eq!(fs.getxattr(f, b"user.a", 0).unwrap(), XattrReply::Size(5));
    assert!(matches!(fs.getxattr(f, b"user.a", 2), Err(FsError::Range)));
    assert_eq!(
        fs.getxattr(f, b"user.a", 100).unwrap(),
        XattrReply::Data(b"value".to_vec())
    );
    fs.setxattr(f, b"user.b", b"", 0).unwrap();
    assert_eq!(
        fs.listxattr(f, 100).unwrap(),
        XattrReply::Data(b"user.a\0user.b\0".to_vec())
    );
    assert!(matches!(
        fs.setxattr(f, b"user.big", &vec![0; 65537], 0),
        Err(FsError::TooBig)
    ));
    let long = format!("user.{}", "x".repeat(251));
    assert!(matches!(
        fs.setxattr(f, long.as_bytes(), b"", 0),
        Err(FsError::Range)
    ));
    assert!(matches!(
        fs.setxattr(f, b"system.posix_acl_access", b"", 0),
        Err(FsError::NotSupported)
    ));
    fs.removexattr(f, b"user.a").unwrap();
    assert!(matches!(fs.removexattr(f, b"user.a"), Err(FsError::NoData)));
    fs.unlink(ROOT, b"f").unwrap();
    assert!(matches!(
        fs.getxattr(f, b"user.b", 0),
        Err(FsError::NotFound)
    ));
}

#[test]
fn the_inode_limit_is_enforced() {
    let t = setup(None, Some(3));
    mkfile(&t.fs, ROOT, "a");
    mkdir(&t.fs, ROOT, "b");
    let err = t.fs.create_node(ME, ROOT, b"c", FILE, 0, None).unwrap_err();
    assert!(matches!(err, FsError::NoSpace));
    assert!(
        t.fs.lookup(ROOT, b"c").is_err(),
        "a refused create leaves no entry"
    );
    let s = t.fs.statfs().unwrap();
    assert_eq!((s.files, s.ffree), (3, 0));
    t.fs.unlink(ROOT, b"a").unwrap();
    mkfile(&t.fs, ROOT, "c");
}

#[test]
fn statfs_reports_the_quota_and_usage() {
    let t = setup(Some(10 << 20), None);
    let f = mkfile(&t.fs, ROOT, "f");
    t.fs.write(f, 0, &vec![1; 1 << 20], false).unwrap();
    let s = t.fs.statfs().unwrap();
    assert_eq!(s.blocks * u64::from(s.bsize), 10 << 20);
    assert_eq!((s.blocks - s.bfree) * u64::from(s.bsize), 1 << 20);
    assert_eq!(s.namelen, 255);
}

#[test]
fn setgid_directories_pass_their_group_on() {
    let t = setup(None, None);
    let fs = &t.fs;
    let d = fs
        .create_node(ME, ROOT, b"shared", libc::S_IFDIR | 0o2775, 0, None)
        .unwrap();
    fs.setattr(
        d.ino,
        SetAttr {
            gid: Some(4242),
            ..Default::default()
        },
    )
    .unwrap();
    let other = Caller { uid: 1, gid: 1 };
    let f = fs.create_node(other, d.ino, b"f", FILE, 0, None).unwrap();
    assert_eq!(f.gid, 4242);
    let sub = fs.create_node(other, d.ino, b"sub", DIR, 0, None).unwrap();
    assert_eq!(sub.gid, 4242);
    assert_ne!(sub.perm & libc::S_ISGID as u16, 0);
}

#[test]
fn symlinks_store_their_target() {
    let t = setup(None, None);
    let a =
        t.fs.create_node(ME, ROOT, b"l", libc::S_IFLNK, 0, Some(b"../some/where"))
            .unwrap();
    assert_eq!(a.kind, Kind::Symlink);
    assert_eq!(a.size, 13);
    assert_eq!(t.fs.readlink(a.ino).unwrap(), b"../some/where");
    let long = vec![b'x'; 4096];
    assert!(matches!(
        t.fs.create_node(ME, ROOT, b"m", 0, 0, Some(&long)),
        Err(FsError::NameTooLong)
    ));
}

#[test]
fn volumes_of_one_store_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), &StoreOptions::default()).unwrap();
    store.create_volume("a", None, None).unwrap();
    store.create_volume("b", None, None).unwrap();
    let fa = Fs::new(store.clone(), store.open_volume("a").unwrap()).unwrap();
    let fb = Fs::new(store.clone(), store.open_volume("b").unwrap()).unwrap();
    let f = mkfile(&fa, ROOT, "secret");
    fa.write(f, 0, b"only in a", false).unwrap();
    assert!(matches!(fb.lookup(ROOT, b"secret"), Err(FsError::NotFound)));
    assert_eq!(names(&fb, ROOT), vec![".", ".."]);
    assert_eq!(fb.volume().used_bytes(), 0);
    // Same inode number in b is a different file.
    let g = mkfile(&fb, ROOT, "other");
    assert_eq!(g, f, "inode numbers are per volume");
    assert_eq!(fb.read(g, 0, 100).unwrap(), b"");
    assert_eq!(fa.read(f, 0, 100).unwrap(), b"only in a");
}

#[test]
fn a_corrupted_inode_record_is_an_error_not_a_panic() {
    let t = setup(None, None);
    let f = mkfile(&t.fs, ROOT, "f");
    t.fs.store()
        .db()
        .put_cf(t.fs.store().meta(), keys::inode_key(t.fs.vid(), f), b"junk")
        .unwrap();
    let err = t.fs.getattr(f).unwrap_err();
    assert!(matches!(err, FsError::Store(_)));
    assert_eq!(err.errno(), libc::EIO);
    assert!(t.fs.read(f, 0, 10).is_err());
}

/// Small overwrites are stored as patches (merge operands): whatever mix of patches and
/// whole-chunk writes a file gets, it reads back like a plain byte array, before and
/// after RocksDB folds the patches into the chunks, and after a restart.
#[test]
fn small_overwrites_read_back_exactly_before_and_after_compaction_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (ino, model) = {
        let store = Store::open_or_create(&path, &StoreOptions::default()).unwrap();
        store.create_volume("v", None, None).unwrap();
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        let ino = mkfile(&fs, ROOT, "f");
        let cs = fs.chunk_size;
        let span = 5 * cs;
        let mut model: Vec<u8> = Vec::new();
        let mut seed = 0x2545_f491_u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % m
        };
        for round in 0..400u64 {
            // Mostly 1..8 KiB writes anywhere (patches), sometimes a whole chunk.
            let (off, len) = if round % 17 == 0 {
                (next(5) * cs, cs)
            } else {
                (next(span), 1 + next(8192))
            };
            let data = pattern(len as usize, round as u8);
            fs.write(ino, off, &data, false).unwrap();
            let end = (off + len) as usize;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
            if round % 50 == 0 {
                assert_eq!(fs.read(ino, 0, model.len() as u32).unwrap(), model);
            }
        }
        assert_eq!(fs.read(ino, 0, model.len() as u32).unwrap(), model);
        let a = fs.getattr(ino).unwrap();
        assert_eq!(a.size, model.len() as u64);
        // Fold the patches into the chunks and read again.
        store.db().flush_cf(store.chunks()).unwrap();
        store
            .db()
            .compact_range_cf(store.chunks(), None::<&[u8]>, None::<&[u8]>);
        assert_eq!(fs.read(ino, 0, model.len() as u32).unwrap(), model);
        // Patches on top of compacted chunks.
        fs.write(ino, 3, b"abc", false).unwrap();
        model[3..6].copy_from_slice(b"abc");
        fs.fsync().unwrap();
        (ino, model)
    };
    let store = Store::open_or_create(&path, &StoreOptions::default()).unwrap();
    let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
    assert_eq!(fs.read(ino, 0, model.len() as u32).unwrap(), model);
    // A read in the middle of a chunk sees the same bytes as the model.
    assert_eq!(
        fs.read(ino, 70_000, 10_000).unwrap(),
        model[70_000..80_000].to_vec()
    );
}

/// A patch that starts past what a chunk stores reads zeros in the gap, counts only up
/// to its end, and truncating into a patched chunk keeps the patched bytes before it.
#[test]
fn a_patch_past_the_stored_end_of_a_chunk_leaves_zeros_and_truncate_keeps_it() {
    let t = setup(None, None);
    let ino = mkfile(&t.fs, ROOT, "f");
    t.fs.write(ino, 0, b"head", false).unwrap();
    t.fs.write(ino, 10_000, b"tail", false).unwrap();
    let mut want = vec![0u8; 10_004];
    want[..4].copy_from_slice(b"head");
    want[10_000..].copy_from_slice(b"tail");
    assert_eq!(t.fs.read(ino, 0, 20_000).unwrap(), want);
    assert_eq!(t.fs.volume().used_bytes(), 10_004);
    let mut r = t.fs.getattr(ino).unwrap();
    assert_eq!(r.size, 10_004);
    t.fs.setattr(
        ino,
        SetAttr {
            size: Some(10_002),
            ..Default::default()
        },
    )
    .unwrap();
    r = t.fs.getattr(ino).unwrap();
    assert_eq!(r.size, 10_002);
    assert_eq!(t.fs.read(ino, 9_999, 10).unwrap(), b"\0ta");
    assert_eq!(t.fs.volume().used_bytes(), 10_002);
}

/// Deleting files removes every key they own (inode, chunk lengths, chunks, xattrs):
/// nothing is left for the store to carry, whichever way the chunks were deleted.
#[test]
fn deleted_files_leave_no_keys_behind() {
    let t = setup(None, None);
    let cs = t.fs.chunk_size;
    let small = mkfile(&t.fs, ROOT, "small");
    t.fs.write(small, 0, &pattern(3 * cs as usize + 10, 1), false)
        .unwrap();
    t.fs.write(small, 100, b"patch", false).unwrap();
    t.fs.setxattr(small, b"user.a", b"1", 0).unwrap();
    let big = mkfile(&t.fs, ROOT, "big");
    // Sparse, with more chunks than the point-delete limit.
    for i in 0..=RANGE_DELETE_MIN_CHUNKS {
        t.fs.write(big, i * cs + 7, b"x", false).unwrap();
    }
    t.fs.unlink(ROOT, b"small").unwrap();
    t.fs.unlink(ROOT, b"big").unwrap();
    let v = t.fs.vid();
    for ino in [small, big] {
        let mut left = 0;
        for prefix in [
            keys::chunk_len_prefix(v, ino),
            keys::xattr_prefix(v, ino),
            keys::inode_key(v, ino),
        ] {
            t.fs.store()
                .scan_meta(&prefix, |_, _| {
                    left += 1;
                    Ok(true)
                })
                .unwrap();
        }
        let cp = keys::chunk_prefix(v, ino);
        t.fs.store()
            .scan(
                t.fs.store().chunks(),
                &cp,
                &keys::prefix_end(&cp),
                |_, _| {
                    left += 1;
                    Ok(true)
                },
            )
            .unwrap();
        assert_eq!(left, 0, "keys left for inode {ino}");
    }
    assert_eq!(t.fs.volume().used_bytes(), 0);
    assert_eq!(t.fs.volume().chunks(), 0);
}

#[test]
fn a_corrupted_chunk_patch_is_an_error_not_a_panic() {
    let t = setup(None, None);
    let f = mkfile(&t.fs, ROOT, "f");
    t.fs.write(f, 0, &[1; 100], false).unwrap();
    t.fs.store()
        .db()
        .merge_cf(
            t.fs.store().chunks(),
            keys::chunk_key(t.fs.vid(), f, 0),
            b"junk",
        )
        .unwrap();
    let err = t.fs.read(f, 0, 10).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
}
