//! Filesystem-core tests against a real RocksDB store in a temp directory, no FUSE.

use super::charge::{chunks_charge, dirent_charge, inode_charge, xattr_charge, INODE_CHARGE};
use super::data::{Seek, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE};
use super::xattr::{XattrReply, XATTR_CREATE, XATTR_INODE_MAX, XATTR_LIST_MAX, XATTR_REPLACE};
use super::*;
use crate::store::codec as keys;
use crate::store::StoreOptions;
use rocksdb::WriteBatch;

pub(super) const ROOT: Ino = ROOT_INO;
/// An unprivileged caller.
pub(super) const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};
pub(super) const FILE: u32 = libc::S_IFREG | 0o644;
pub(super) const DIR: u32 = libc::S_IFDIR | 0o755;

struct T {
    _dir: tempfile::TempDir,
    fs: Fs,
}

fn setup(quota: Option<u64>, inodes: Option<u64>) -> T {
    setup_with(&crate::store::NewVolume {
        quota,
        inode_limit: inodes,
        compression: crate::store::Compression::None,
        encryption: None,
    })
}

fn setup_with(new: &crate::store::NewVolume) -> T {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&dir.path().join("store"), &StoreOptions::default()).unwrap();
    store.create_volume_with("v", new).unwrap();
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

/// What an empty file named `name` (or a node without data) is charged.
fn node_charge(name: &str) -> u64 {
    INODE_CHARGE + dirent_charge(name.len())
}

/// The volume's usage recomputed from what the store holds, by the rules of
/// [`super::charge`] (the formula `fsck` checks against).
fn recount(fs: &Fs) -> u64 {
    let (st, v) = (fs.store(), fs.vid());
    let mut total = 0;
    st.scan_meta(&keys::tag_prefix(v, keys::TAG_INODE), |k, val| {
        let ino = keys::parse_inode_key(v, k)?;
        total += inode_charge(ino, &InodeRecord::decode(val)?);
        Ok(true)
    })
    .unwrap();
    st.scan_meta(&keys::tag_prefix(v, keys::TAG_DIRENT), |k, _| {
        total += dirent_charge(keys::parse_dirent_key(v, k)?.1.len());
        Ok(true)
    })
    .unwrap();
    st.scan_meta(&keys::tag_prefix(v, keys::TAG_XATTR), |k, val| {
        total += xattr_charge(keys::parse_xattr_key(v, k)?.1.len(), val.len());
        Ok(true)
    })
    .unwrap();
    st.scan_meta(&keys::tag_prefix(v, keys::TAG_CHUNK_LEN), |_, val| {
        total += chunks_charge(1, keys::decode_chunk_len(val)?);
        Ok(true)
    })
    .unwrap();
    total
}

/// Usage equals what the store holds, charged by the rules.
#[track_caller]
fn assert_usage_exact(fs: &Fs) {
    assert_eq!(
        fs.volume().used_bytes(),
        recount(fs),
        "usage counter vs store"
    );
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
    let base = node_charge("f");
    assert_eq!(t.fs.volume().used_bytes(), base + chunks_charge(4, 4 * cs));
    t.fs.setattr(
        ino,
        SetAttr {
            size: Some(cs + 10),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(t.fs.volume().used_bytes(), base + chunks_charge(2, cs + 10));
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
        base + chunks_charge(2, cs + 10),
        "growing adds a hole, not data"
    );
    assert_usage_exact(&t.fs);
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
    let used = node_charge("f") + chunks_charge(2, 90_000);
    let err =
        t.fs.write(ino, 90_000, &pattern(20_000, 4), false)
            .unwrap_err();
    assert!(matches!(err, FsError::NoSpace), "{err:?}");
    assert_eq!(t.fs.getattr(ino).unwrap().size, before.size);
    assert_eq!(t.fs.volume().used_bytes(), used);
    assert_eq!(t.fs.read(ino, 0, 90_000).unwrap(), pattern(90_000, 3));
    // Up to the quota exactly is fine (the write stays inside the second chunk).
    let room = 100_000 - used;
    t.fs.write(ino, 90_000, &pattern(room as usize, 5), false)
        .unwrap();
    assert_eq!(t.fs.volume().used_bytes(), 100_000);
    assert_eq!(t.fs.statfs().unwrap().bfree, 0);
    assert!(matches!(
        t.fs.write(ino, 90_000 + room, b"x", false),
        Err(FsError::NoSpace)
    ));
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
    let charged: u64 = inos
        .iter()
        .map(|i| {
            let r = fs.load(*i).unwrap();
            chunks_charge(r.chunk_count, r.stored_bytes) + node_charge("f0")
        })
        .sum();
    assert_eq!(
        charged, used,
        "per-file accounting matches the volume counter"
    );
    assert_usage_exact(fs);
}

#[test]
fn fallocate_reserves_and_punch_hole_frees() {
    let t = setup(Some(1 << 20), None);
    let ino = mkfile(&t.fs, ROOT, "f");
    t.fs.fallocate(ino, 0, 300_000, 0).unwrap();
    assert_eq!(t.fs.getattr(ino).unwrap().size, 300_000);
    let base = node_charge("f");
    // 300,000 bytes are 5 chunks of 64 KiB (the last one partly).
    assert_eq!(t.fs.volume().used_bytes(), base + chunks_charge(5, 300_000));
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
        base + chunks_charge(5, 300_000),
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
    assert_eq!(
        t.fs.volume().used_bytes(),
        base + chunks_charge(3, 300_000 - 131_072),
        "two whole chunks punched out"
    );
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
    assert_usage_exact(&t.fs);
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
        fs.setxattr(ino, b"user.note", &[1; 3000], 0).unwrap();
        fs.unlink(ROOT, b"f").unwrap();
        assert_eq!(
            fs.volume().used_bytes(),
            INODE_CHARGE + chunks_charge(1, 10) + xattr_charge(9, 3000),
            "the orphan keeps everything but its entry charged"
        );
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

/// No inode number is given out twice in a volume's life: after the highest inode was
/// deleted, a reopen of the store (with nothing but what the batches committed) or a
/// take-over numbers on past it, and without skipping ahead.
#[test]
fn inode_numbers_are_never_given_out_twice_across_reopen_and_take_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let highest;
    {
        let store = Store::open_or_create(&path, &StoreOptions::default()).unwrap();
        store.create_volume("v", None, None).unwrap();
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        mkfile(&fs, ROOT, "a");
        highest = mkdir(&fs, ROOT, "b");
        fs.rmdir(ROOT, b"b").unwrap();
    }
    let store = Store::open_existing(&path, &StoreOptions::default()).unwrap();
    let c = {
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        let c = mkfile(&fs, ROOT, "c");
        fs.unlink(ROOT, b"c").unwrap();
        c
    };
    assert!(c > highest, "reopened: {c} after {highest} was deleted");
    let fs = Fs::adopt(store.clone(), store.open_volume("v").unwrap(), None).unwrap();
    let d = mkfile(&fs, ROOT, "d");
    assert_eq!(d, c + 1, "taken over: past every number given out, no gap");
}

/// A volume made before the counter existed has no record of deleted numbers above the
/// highest in use: taken over, numbering skips far past it; mounted afresh (the kernel
/// knows no node id), it goes on right after it. The first create records the counter.
#[test]
fn a_volume_without_an_inode_number_counter_skips_ahead_only_when_taken_over() {
    let t = setup(None, None);
    let a = mkfile(&t.fs, ROOT, "a");
    let (store, vid) = (t.fs.store().clone(), t.fs.vid());
    let mut b = WriteBatch::default();
    b.delete_cf(store.meta(), keys::next_ino_key(vid));
    store.write(b).unwrap();
    drop(t.fs);
    let fresh = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
    assert_eq!(fresh.first_free_ino().unwrap(), a + 1);
    drop(fresh);
    let adopted = Fs::adopt(store.clone(), store.open_volume("v").unwrap(), None).unwrap();
    let b = mkfile(&adopted, ROOT, "b");
    assert_eq!(b, a + 1 + LEGACY_ADOPT_INO_GAP);
    assert_eq!(store.next_ino(vid).unwrap(), Some(b + 1));
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
    assert_eq!(
        fs.volume().used_bytes(),
        node_charge("b") + node_charge("d"),
        "and its data freed: a (now named b) and d are left"
    );
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
    // 1 MiB of data in 16 chunks, and the file's inode and entry.
    let used = chunks_charge(16, 1 << 20) + node_charge("f");
    let bs = u64::from(s.bsize);
    assert_eq!(s.bfree, ((10 << 20) - used) / bs);
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
    for compression in crate::store::Compression::ALL {
        overwrites_read_back_exactly(compression, None);
    }
    // Encrypted: chunks sealed whole, partial writes read, patch and rewrite them.
    let key = crate::store::MasterKey::generate().unwrap();
    overwrites_read_back_exactly(crate::store::Compression::None, Some(key));
}

/// The test above on a volume of `compression` (its chunks in that column family),
/// encrypted under `key` if given.
fn overwrites_read_back_exactly(
    compression: crate::store::Compression,
    key: Option<crate::store::MasterKey>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (ino, model) = {
        let store = Store::open_or_create(&path, &StoreOptions::default()).unwrap();
        let new = crate::store::NewVolume {
            compression,
            encryption: key.clone(),
            ..Default::default()
        };
        store.create_volume_with("v", &new).unwrap();
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
        let cf = store.chunks_for(compression);
        store.db().flush_cf(cf).unwrap();
        store
            .db()
            .compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        assert_eq!(
            fs.read(ino, 0, model.len() as u32).unwrap(),
            model,
            "{compression}"
        );
        // Nothing of the volume went to another column family.
        for other in crate::store::Compression::ALL {
            let n = store
                .db()
                .iterator_cf(store.chunks_for(other), rocksdb::IteratorMode::Start)
                .count();
            assert_eq!(
                n > 0,
                other == compression,
                "{other} chunks of a {compression} volume"
            );
        }
        // Patches on top of compacted chunks.
        fs.write(ino, 3, b"abc", false).unwrap();
        model[3..6].copy_from_slice(b"abc");
        fs.fsync().unwrap();
        (ino, model)
    };
    let store = Store::open_or_create(&path, &StoreOptions::default()).unwrap();
    if let Some(key) = &key {
        assert!(matches!(
            store.open_volume("v"),
            Err(crate::store::Error::KeyRequired(_))
        ));
        let wrong = crate::store::MasterKey::generate().unwrap();
        assert!(matches!(
            store.unlock("v", &wrong),
            Err(crate::store::Error::WrongKey(_))
        ));
        store.unlock("v", key).unwrap();
    }
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
    assert_eq!(
        t.fs.volume().used_bytes(),
        node_charge("f") + chunks_charge(1, 10_004)
    );
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
    assert_eq!(
        t.fs.volume().used_bytes(),
        node_charge("f") + chunks_charge(1, 10_002)
    );
}

/// Deleting files removes every key they own (inode, chunk lengths, chunks, xattrs):
/// nothing is left for the store to carry, whichever way the chunks were deleted.
#[test]
fn deleted_files_leave_no_keys_behind() {
    for compression in crate::store::Compression::ALL {
        deleted_files_leave_no_keys(compression, None);
    }
    let key = crate::store::MasterKey::generate().unwrap();
    deleted_files_leave_no_keys(crate::store::Compression::None, Some(key));
}

fn deleted_files_leave_no_keys(
    compression: crate::store::Compression,
    key: Option<crate::store::MasterKey>,
) {
    let t = setup_with(&crate::store::NewVolume {
        compression,
        encryption: key,
        ..Default::default()
    });
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
                t.fs.store().chunks_for(compression),
                &cp,
                &keys::prefix_end(&cp),
                |_, _| {
                    left += 1;
                    Ok(true)
                },
            )
            .unwrap();
        assert_eq!(left, 0, "{compression}: keys left for inode {ino}");
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

// ----- metadata charges -----

#[test]
fn xattrs_are_charged_on_set_replace_and_credited_on_remove_and_unlink() {
    let t = setup(None, None);
    let fs = &t.fs;
    let f = mkfile(fs, ROOT, "f");
    let base = node_charge("f");
    assert_eq!(fs.volume().used_bytes(), base);
    fs.setxattr(f, b"user.a", &[7; 10], 0).unwrap();
    assert_eq!(fs.volume().used_bytes(), base + xattr_charge(6, 10));
    // Replacing charges the new value and credits the old one.
    fs.setxattr(f, b"user.a", &[8; 1000], XATTR_REPLACE)
        .unwrap();
    assert_eq!(fs.volume().used_bytes(), base + xattr_charge(6, 1000));
    fs.setxattr(f, b"user.a", b"", 0).unwrap();
    assert_eq!(fs.volume().used_bytes(), base + xattr_charge(6, 0));
    // A refused set changes nothing.
    assert!(matches!(
        fs.setxattr(f, b"user.a", b"x", XATTR_CREATE),
        Err(FsError::Exists)
    ));
    assert_eq!(fs.volume().used_bytes(), base + xattr_charge(6, 0));
    let long = format!("user.{}", "n".repeat(250));
    fs.setxattr(f, long.as_bytes(), &[1; 65536], 0).unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        base + xattr_charge(6, 0) + xattr_charge(255, 65536)
    );
    fs.removexattr(f, b"user.a").unwrap();
    assert_eq!(fs.volume().used_bytes(), base + xattr_charge(255, 65536));
    // The root directory's attributes count as well.
    fs.setxattr(ROOT, b"trusted.x", b"abc", 0).unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        base + xattr_charge(255, 65536) + xattr_charge(9, 3)
    );
    assert_usage_exact(fs);
    // Unlinking the file credits its inode, entry and attributes.
    fs.unlink(ROOT, b"f").unwrap();
    assert_eq!(fs.volume().used_bytes(), xattr_charge(9, 3));
    fs.removexattr(ROOT, b"trusted.x").unwrap();
    assert_eq!(fs.volume().used_bytes(), 0);
    assert_usage_exact(fs);
}

#[test]
fn a_dropped_file_capability_is_credited() {
    let t = setup(None, None);
    let fs = &t.fs;
    let f = mkfile(fs, ROOT, "f");
    fs.write(f, 0, b"x", false).unwrap();
    fs.setxattr(f, xattr::SECURITY_CAPABILITY, &[0; 20], 0)
        .unwrap();
    let with_cap = fs.volume().used_bytes();
    // An unprivileged write drops the capability (FUSE_HANDLE_KILLPRIV_V2).
    fs.write(f, 1, b"y", true).unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        with_cap + 1 - xattr_charge(xattr::SECURITY_CAPABILITY.len(), 20)
    );
    assert_eq!(fs.getattr(f).unwrap().blocks, 1, "data stays data");
    fs.setxattr(f, xattr::SECURITY_CAPABILITY, &[0; 20], 0)
        .unwrap();
    fs.setattr(
        f,
        SetAttr {
            uid: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        node_charge("f") + chunks_charge(1, 2),
        "chown dropped the capability"
    );
    assert_usage_exact(fs);
}

#[test]
fn symlink_targets_are_charged_and_credited() {
    let t = setup(None, None);
    let fs = &t.fs;
    let target = vec![b't'; SYMLINK_MAX];
    let l = fs
        .create_node(ME, ROOT, b"link", libc::S_IFLNK, 0, Some(&target))
        .unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        INODE_CHARGE + SYMLINK_MAX as u64 + dirent_charge(4)
    );
    assert_eq!(
        inode_charge(l.ino, &fs.load(l.ino).unwrap()),
        INODE_CHARGE + SYMLINK_MAX as u64
    );
    assert_usage_exact(fs);
    fs.unlink(ROOT, b"link").unwrap();
    assert_eq!(fs.volume().used_bytes(), 0);
}

#[test]
fn directories_and_special_files_are_charged_and_credited() {
    let t = setup(None, None);
    let fs = &t.fs;
    let d = mkdir(fs, ROOT, "dir");
    let sub = mkdir(fs, d, "sub");
    fs.create_node(ME, sub, b"fifo", libc::S_IFIFO | 0o600, 0, None)
        .unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        node_charge("dir") + node_charge("sub") + node_charge("fifo")
    );
    assert_usage_exact(fs);
    fs.unlink(sub, b"fifo").unwrap();
    fs.rmdir(d, b"sub").unwrap();
    assert_eq!(fs.volume().used_bytes(), node_charge("dir"));
    fs.rmdir(ROOT, b"dir").unwrap();
    assert_eq!(fs.volume().used_bytes(), 0);
}

#[test]
fn hard_links_charge_one_entry_each_and_the_inode_once() {
    let t = setup(None, None);
    let fs = &t.fs;
    let f = mkfile(fs, ROOT, "f");
    fs.write(f, 0, &[1; 5000], false).unwrap();
    let one = fs.volume().used_bytes();
    assert_eq!(one, node_charge("f") + chunks_charge(1, 5000));
    fs.link(f, ROOT, b"second-name").unwrap();
    let d = mkdir(fs, ROOT, "d");
    fs.link(f, d, b"third").unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        one + dirent_charge(11) + node_charge("d") + dirent_charge(5)
    );
    assert_usage_exact(fs);
    fs.unlink(ROOT, b"f").unwrap();
    fs.unlink(d, b"third").unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        INODE_CHARGE + dirent_charge(11) + chunks_charge(1, 5000) + node_charge("d"),
        "the last name carries the inode"
    );
    fs.unlink(ROOT, b"second-name").unwrap();
    assert_eq!(fs.volume().used_bytes(), node_charge("d"));
    assert_usage_exact(fs);
}

#[test]
fn rename_charges_the_new_name_and_credits_a_replaced_file() {
    let t = setup(None, None);
    let fs = &t.fs;
    let a = mkfile(fs, ROOT, "a");
    fs.write(a, 0, &[1; 100], false).unwrap();
    let b = mkfile(fs, ROOT, "b");
    fs.write(b, 0, &[2; 70_000], false).unwrap();
    fs.setxattr(b, b"user.k", &[3; 500], 0).unwrap();
    let a_alone = node_charge("b") + chunks_charge(1, 100);
    // Over an existing file: the victim's inode, entry, data and attributes go.
    fs.rename(ROOT, b"a", ROOT, b"b", 0).unwrap();
    assert_eq!(fs.volume().used_bytes(), a_alone);
    assert_usage_exact(fs);
    // A longer name costs more, a shorter one less.
    let long = "x".repeat(255);
    fs.rename(ROOT, b"b", ROOT, long.as_bytes(), 0).unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        a_alone - dirent_charge(1) + dirent_charge(255)
    );
    let d = mkdir(fs, ROOT, "d");
    fs.rename(ROOT, long.as_bytes(), d, b"z", 0).unwrap();
    assert_eq!(fs.volume().used_bytes(), a_alone + node_charge("d"));
    // An exchange keeps both names: nothing changes.
    mkfile(fs, ROOT, "other");
    let before = fs.volume().used_bytes();
    fs.rename(d, b"z", ROOT, b"other", libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(fs.volume().used_bytes(), before);
    // Over an empty directory: its inode and entry go.
    mkdir(fs, ROOT, "e");
    let before = fs.volume().used_bytes();
    fs.rename(ROOT, b"d", ROOT, b"e", 0).unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        before - node_charge("e"),
        "the replaced directory's inode and entry are credited"
    );
    assert_usage_exact(fs);
}

#[test]
fn a_rename_to_a_longer_name_past_the_quota_fails_and_changes_nothing() {
    let t = setup(Some(4096), None);
    let fs = &t.fs;
    let mut i = 0;
    while fs
        .create_node(ME, ROOT, format!("{i}").as_bytes(), FILE, 0, None)
        .is_ok()
    {
        i += 1;
    }
    let used = fs.volume().used_bytes();
    assert!(used <= 4096 && used + node_charge("99") > 4096);
    let err = fs
        .rename(ROOT, b"0", ROOT, "y".repeat(255).as_bytes(), 0)
        .unwrap_err();
    assert!(matches!(err, FsError::NoSpace), "{err:?}");
    assert!(fs.lookup(ROOT, b"0").is_ok());
    assert_eq!(fs.volume().used_bytes(), used);
    // Deleting works on a full volume.
    fs.unlink(ROOT, b"0").unwrap();
    assert_usage_exact(fs);
}

#[test]
fn each_stored_chunk_is_charged_also_a_one_byte_one() {
    let t = setup(None, None);
    let fs = &t.fs;
    let cs = fs.chunk_size;
    let f = mkfile(fs, ROOT, "sparse");
    for i in 0..50 {
        fs.write(f, i * cs + 3, b"x", false).unwrap();
    }
    for i in 50..100 {
        fs.fallocate(f, i * cs, 1, 0).unwrap();
    }
    // A write at offset 3 of an empty chunk stores 4 bytes (the gap reads as zeros).
    assert_eq!(
        fs.volume().used_bytes(),
        node_charge("sparse") + chunks_charge(100, 50 * 4 + 50)
    );
    assert_eq!(fs.volume().chunks(), 100);
    assert_usage_exact(fs);
    fs.setattr(
        f,
        SetAttr {
            size: Some(10 * cs),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        node_charge("sparse") + chunks_charge(10, 40)
    );
    fs.fallocate(f, 0, cs, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        .unwrap();
    assert_eq!(
        fs.volume().used_bytes(),
        node_charge("sparse") + chunks_charge(9, 36)
    );
    assert_usage_exact(fs);
}

/// The reported bypass: xattrs, symlinks, names and empty inodes were free. Whatever
/// mix of them fills a volume, usage stays within the quota and equals what is stored.
#[test]
fn metadata_alone_cannot_pass_the_quota() {
    let quota = 256 * 1024;
    let t = setup(Some(quota), None);
    let fs = &t.fs;
    let mut refused = 0;
    'files: for i in 0.. {
        let name = format!("{i:0>200}");
        let f = match fs.create_node(ME, ROOT, name.as_bytes(), FILE, 0, None) {
            Ok(a) => a.ino,
            Err(FsError::NoSpace) => break,
            Err(e) => panic!("{e:?}"),
        };
        for j in 0.. {
            let xname = format!("user.{j:0>100}");
            match fs.setxattr(f, xname.as_bytes(), &[j as u8; 4000], 0) {
                Ok(()) => {}
                Err(FsError::NoSpace) if j == 0 => break 'files,
                Err(FsError::NoSpace) => {
                    refused += 1;
                    break;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
    assert!(refused > 0, "no file reached its per-inode limit");
    for i in 0.. {
        let target = vec![b'a' + (i % 26) as u8; SYMLINK_MAX];
        let name = format!("l{i}");
        match fs.create_node(ME, ROOT, name.as_bytes(), libc::S_IFLNK, 0, Some(&target)) {
            Ok(_) => {}
            Err(FsError::NoSpace) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    for i in 0.. {
        match fs.create_node(ME, ROOT, format!("{i:x>255}").as_bytes(), DIR, 0, None) {
            Ok(_) => {}
            Err(FsError::NoSpace) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    let used = fs.volume().used_bytes();
    assert!(used <= quota, "used {used} > quota {quota}");
    assert!(
        used > quota - node_charge(&"x".repeat(255)),
        "stopped early at {used}"
    );
    assert_usage_exact(fs);
    // Stored keys and values (what the charges cover) are within the usage.
    let mut stored = 0u64;
    let v = fs.vid();
    for cf in [fs.store().meta(), fs.store().chunks()] {
        fs.store()
            .scan(
                cf,
                &keys::volume_start(v),
                &keys::volume_end(v),
                |k, val| {
                    stored += (k.len() + val.len()) as u64;
                    Ok(true)
                },
            )
            .unwrap();
    }
    assert!(
        stored <= used + charge::VOLUME_OVERHEAD_MAX,
        "the store holds {stored} bytes for a usage of {used}"
    );
    // Everything removed: usage is back to the empty volume's.
    for e in fs.readdir(ROOT, 2, usize::MAX).unwrap() {
        match e.kind {
            Kind::Dir => fs.rmdir(ROOT, &e.name).unwrap(),
            _ => fs.unlink(ROOT, &e.name).unwrap(),
        }
    }
    assert_eq!(fs.volume().used_bytes(), 0);
    assert_usage_exact(fs);
}

#[test]
fn xattrs_of_one_inode_are_bounded() {
    let t = setup(None, None);
    let fs = &t.fs;
    let f = mkfile(fs, ROOT, "f");
    // By bytes: 4 KiB values until the inode is full.
    let mut total = 0;
    for i in 0.. {
        let name = format!("user.{i:03}");
        match fs.setxattr(f, name.as_bytes(), &[1; 4096], 0) {
            Ok(()) => total += name.len() + 4096,
            Err(FsError::NoSpace) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(total <= XATTR_INODE_MAX && total + 4104 > XATTR_INODE_MAX);
    // Full: a new value of the largest size fails with ENOSPC, a larger one with E2BIG.
    assert!(matches!(
        fs.setxattr(f, b"user.big", &[0; 65536], 0),
        Err(FsError::NoSpace)
    ));
    assert!(matches!(
        fs.setxattr(f, b"user.big", &[0; 65537], 0),
        Err(FsError::TooBig)
    ));
    // Replacing a value counts without the old one: same size fits, larger does not.
    fs.setxattr(f, b"user.000", &[2; 4096], XATTR_REPLACE)
        .unwrap();
    let room = XATTR_INODE_MAX - total;
    fs.setxattr(f, b"user.000", &vec![3; 4096 + room], 0)
        .unwrap();
    assert!(matches!(
        fs.setxattr(f, b"user.000", &vec![3; 4097 + room], 0),
        Err(FsError::NoSpace)
    ));
    // Removing makes room again.
    fs.removexattr(f, b"user.001").unwrap();
    fs.setxattr(f, b"user.new", &[4; 4000], 0).unwrap();
    assert_usage_exact(fs);

    // By names: the name list stays within what listxattr(2) can return.
    let g = mkfile(fs, ROOT, "g");
    let mut count = 0;
    for i in 0.. {
        let name = format!("user.{i:0>250}");
        match fs.setxattr(g, name.as_bytes(), b"", 0) {
            Ok(()) => count += 1,
            Err(FsError::NoSpace) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(count, XATTR_LIST_MAX / 256);
    let XattrReply::Size(n) = fs.listxattr(g, 0).unwrap() else {
        panic!("size query answered with data")
    };
    assert!(n as usize <= XATTR_LIST_MAX);
    assert_usage_exact(fs);
}

/// `open` racing the last unlink: either the open comes first and the data stays until
/// release, or it fails with NotFound. Never a handle to an inode whose data is gone.
#[test]
fn open_racing_the_last_unlink_keeps_the_data_or_fails() {
    let t = setup(None, None);
    let fs = &t.fs;
    let (mut opened, mut refused) = (0u32, 0u32);
    for round in 0..2000u32 {
        let ino = mkfile(fs, ROOT, "f");
        let payload = round.to_be_bytes();
        fs.write(ino, 0, &payload, false).unwrap();
        let start = std::sync::Barrier::new(3);
        let outcomes = std::thread::scope(|s| {
            let openers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        match fs.open(ino) {
                            Ok(()) => {
                                // The handle must see the data until it is released.
                                let back = fs.read(ino, 0, 4);
                                fs.release(ino).unwrap();
                                match back {
                                    Ok(b) if b == payload => true,
                                    other => panic!(
                                        "round {round}: open succeeded, then read gave {other:?}"
                                    ),
                                }
                            }
                            Err(FsError::NotFound) => false,
                            Err(e) => panic!("round {round}: open failed with {e:?}"),
                        }
                    })
                })
                .collect();
            start.wait();
            fs.unlink(ROOT, b"f").unwrap();
            openers
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        for ok in outcomes {
            if ok {
                opened += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            matches!(fs.getattr(ino), Err(FsError::NotFound)),
            "round {round}: the inode outlived its last name and handle"
        );
        assert!(
            fs.open.lock().is_empty(),
            "round {round}: handle count left"
        );
    }
    assert_eq!(opened + refused, 4000);
    assert_eq!(fs.volume().used_bytes(), 0);
    assert_eq!(fs.volume().inodes(), 1);
    assert_usage_exact(fs);
    eprintln!("open before unlink: {opened}, after: {refused}");
}

/// Compressed volumes: the quota and usage count file bytes before compression (a 6 MiB
/// quota holds 6 MiB of text however well it compresses), what compressible data takes
/// on disk is a fraction of it, and deleting one volume leaves the others' chunks alone.
#[test]
fn compressed_volumes_count_bytes_before_compression_and_store_less() {
    use crate::store::{Compression, NewVolume};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&dir.path().join("store"), &StoreOptions::default()).unwrap();
    let line = b"fusevol compresses this line of text, again and again.\n";
    let text: Vec<u8> = (0..4 << 20).map(|i| line[i % line.len()]).collect();
    let mut filesystems = Vec::new();
    for c in Compression::ALL {
        let new = NewVolume {
            quota: Some(6 << 20),
            inode_limit: None,
            compression: c,
            encryption: None,
        };
        store.create_volume_with(c.name(), &new).unwrap();
        let fs = Fs::new(store.clone(), store.open_volume(c.name()).unwrap()).unwrap();
        let ino = mkfile(&fs, ROOT, "f");
        for (i, piece) in text.chunks(1 << 20).enumerate() {
            fs.write(ino, (i << 20) as u64, piece, false).unwrap();
        }
        // A patch over a chunk, and more than the quota leaves: refused, whatever the
        // data compresses to.
        fs.write(ino, 100, b"PATCHED", false).unwrap();
        let more = vec![b'a'; 3 << 20];
        assert!(
            matches!(fs.write(ino, 4 << 20, &more, false), Err(FsError::NoSpace)),
            "{c}: 3 MiB more fit in a 6 MiB quota holding 4 MiB"
        );
        fs.fsync().unwrap();
        filesystems.push((c, fs, ino));
    }
    let mut expected = text.clone();
    expected[100..107].copy_from_slice(b"PATCHED");
    let infos: Vec<_> = Compression::ALL
        .iter()
        .map(|c| store.inspect_volume_measured(c.name()).unwrap())
        .collect();
    for info in &infos {
        let c = info.compression;
        assert_eq!(c.logical_bytes, Some(4 << 20), "{info:?}");
        assert_eq!(
            info.used_bytes, infos[0].used_bytes,
            "usage differs: {info:?}"
        );
        match c.algorithm {
            Compression::None => assert_eq!(c.stored_bytes, None),
            _ => {
                let stored = c.stored_bytes.unwrap();
                assert!(stored > 0 && stored < 1 << 20, "{info:?}");
            }
        }
    }
    // Delete the lz4 volume: the zstd one keeps its data and its stored bytes.
    let zstd_before = infos[2].compression.stored_bytes;
    filesystems.retain(|(c, _, _)| *c != Compression::Lz4);
    let lz4_files = |store: &Store| {
        store
            .db()
            .property_int_value_cf(
                store.chunks_for(Compression::Lz4),
                "rocksdb.live-sst-files-size",
            )
            .unwrap()
            .unwrap_or(0)
    };
    assert!(
        lz4_files(&store) > 0,
        "the lz4 volume's chunks were flushed"
    );
    store.delete_volume("lz4").unwrap();
    assert_eq!(
        lz4_files(&store),
        0,
        "the deleted volume's chunks are still on disk"
    );
    for (c, fs, ino) in &filesystems {
        assert_eq!(fs.read(*ino, 0, 4 << 20).unwrap(), expected, "{c}");
    }
    // Still compressed (the deletion's compaction may have folded the patch in).
    let zstd = store.inspect_volume_measured("zstd").unwrap();
    let stored = zstd.compression.stored_bytes.unwrap();
    assert!(
        stored > 0 && stored < 1 << 20,
        "{zstd:?}, {zstd_before:?} before"
    );
}

/// Runs the same operations on `fs` and returns what a caller saw: every name, target,
/// xattr and byte, and the volume's usage, for comparing an encrypted volume with a plain
/// one.
fn transcript(fs: &Fs) -> Vec<String> {
    let mut out = Vec::new();
    let cs = fs.chunk_size as usize;
    let d = mkdir(fs, ROOT, "répertoire-ünïcode");
    let mut files = Vec::new();
    for i in 0..40 {
        let f = mkfile(fs, d, &format!("file-{i:02}-{}", "x".repeat(i * 5)));
        fs.write(f, 0, &pattern(i * 1000 + 1, i as u8), false)
            .unwrap();
        files.push(f);
    }
    let big = mkfile(fs, ROOT, "big");
    fs.write(big, 0, &pattern(3 * cs + 17, 9), false).unwrap();
    fs.write(big, 5, b"partial", false).unwrap();
    fs.write(big, (5 * cs + 3) as u64, b"past a hole", false)
        .unwrap();
    fs.fallocate(
        big,
        cs as u64 + 10,
        100,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    let size = |s: u64| SetAttr {
        size: Some(s),
        ..Default::default()
    };
    fs.setattr(files[3], size(100)).unwrap();
    fs.setattr(files[4], size(50_000)).unwrap();
    fs.create_node(ME, d, b"link", libc::S_IFLNK, 0, Some(b"../big"))
        .unwrap();
    fs.setxattr(big, b"user.one", b"first value", 0).unwrap();
    fs.setxattr(big, b"user.two", &[7u8; 3000], 0).unwrap();
    fs.setxattr(big, b"user.one", b"replaced", XATTR_REPLACE)
        .unwrap();
    fs.removexattr(big, b"user.two").unwrap();
    fs.setxattr(big, b"user.three", b"", 0).unwrap();
    fs.rename(d, b"file-00-", ROOT, b"moved", 0).unwrap();
    fs.rename(d, b"file-01-xxxxx", d, b"file-02-xxxxxxxxxx", 0)
        .unwrap();
    fs.unlink(d, b"file-05-xxxxxxxxxxxxxxxxxxxxxxxxx").unwrap();
    let mut listed = names(fs, d);
    listed.sort();
    out.push(format!("{listed:?}"));
    let mut root = names(fs, ROOT);
    root.sort();
    out.push(format!("{root:?}"));
    let l = fs.lookup(d, b"link").unwrap();
    out.push(format!("{:?}", fs.readlink(l.ino).unwrap()));
    for name in ["user.one", "user.two", "user.three"] {
        out.push(format!(
            "{name}: {:?}",
            fs.getxattr(big, name.as_bytes(), 4096)
        ));
    }
    let XattrReply::Data(list) = fs.listxattr(big, 4096).unwrap() else {
        panic!("listxattr gave a size")
    };
    let mut list: Vec<&[u8]> = list.split(|b| *b == 0).filter(|n| !n.is_empty()).collect();
    list.sort();
    out.push(format!("{list:?}"));
    for f in files.iter().chain([&big]) {
        if let Ok(a) = fs.getattr(*f) {
            out.push(format!(
                "{} {} {:?}",
                a.size,
                a.blocks,
                fs.read(*f, 0, 1 << 20).unwrap()
            ));
        }
    }
    let v = fs.volume();
    out.push(format!(
        "usage {} {} {}",
        v.used_bytes(),
        v.inodes(),
        v.chunks()
    ));
    out
}

/// An encrypted volume answers every operation exactly as a plain one (names, targets,
/// xattrs, bytes, sizes, usage: the quota counts plaintext), and fsck, given the key,
/// finds it clean and its counters right.
#[test]
fn an_encrypted_volume_answers_as_a_plain_one_and_fsck_finds_it_clean() {
    let plain = setup(None, None);
    let key = crate::store::MasterKey::generate().unwrap();
    let sealed = setup_with(&crate::store::NewVolume {
        encryption: Some(key.clone()),
        ..Default::default()
    });
    assert!(sealed.fs.volume().is_encrypted() && !plain.fs.volume().is_encrypted());
    assert_eq!(transcript(&sealed.fs), transcript(&plain.fs));
    sealed.fs.fsync().unwrap();
    let store = sealed.fs.store().clone();
    drop(sealed.fs);
    let report = crate::fsck::check_volume(&store, "v", false).unwrap();
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(report.inodes, plain.fs.volume().inodes());
}
