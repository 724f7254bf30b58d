//! Requests sent again after a restart, against a real store in a temp directory, no FUSE.

use std::collections::BTreeMap;
use std::fmt::Debug;

use super::*;
use crate::fs::tests::{DIR, FILE, ME, ROOT};
use crate::fs::xattr::XattrReply;
use crate::fs::FsError;
use crate::store::codec as keys;
use crate::store::{Store, StoreOptions};

struct T {
    _dir: tempfile::TempDir,
    store: Store,
}

fn setup() -> T {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&dir.path().join("store"), &StoreOptions::default()).unwrap();
    store.create_volume("v", None, None).unwrap();
    T { _dir: dir, store }
}

impl T {
    fn fresh(&self) -> Fs {
        Fs::new(self.store.clone(), self.store.open_volume("v").unwrap()).unwrap()
    }

    fn adopt(&self, generation: Option<u64>) -> Fs {
        Fs::adopt(
            self.store.clone(),
            self.store.open_volume("v").unwrap(),
            generation,
        )
        .unwrap()
    }
}

fn resent(unique: u64) -> Unique {
    Unique(unique | RESENT)
}

/// Every key and value of the volume, in both column families.
fn contents(fs: &Fs) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let (st, v) = (fs.store(), fs.vid());
    let mut all = BTreeMap::new();
    for cf in [st.meta(), st.chunks()] {
        st.scan(
            cf,
            &keys::volume_start(v),
            &keys::volume_end(v),
            |k, val| {
                all.insert(k.to_vec(), val.to_vec());
                Ok(true)
            },
        )
        .unwrap();
    }
    all
}

/// Carries out `op` as request `unique`, then as the same request resent: the second
/// answer must be the first one, and the volume must not change at all.
fn once<R: PartialEq + Debug>(fs: &Fs, unique: u64, op: impl Fn(Answering) -> Result<R>) -> R {
    let first = op(fs.answering(Unique(unique))).unwrap();
    let before = contents(fs);
    let again = op(fs.answering(resent(unique)));
    assert_eq!(again.unwrap(), first, "request {unique} resent");
    assert!(
        contents(fs) == before,
        "request {unique}: the resent one changed the volume"
    );
    first
}

fn ino_of(fs: &Fs, dir: Ino, name: &str) -> Ino {
    fs.lookup(dir, name.as_bytes()).unwrap().ino
}

#[test]
fn every_recorded_operation_resent_is_answered_as_before_and_not_done_again() {
    let t = setup();
    let fs = t.fresh();
    let d = once(&fs, 2, |a| a.create_node(ME, ROOT, b"d", DIR, 0, None)).ino;
    let f = once(&fs, 4, |a| a.create_node(ME, d, b"f", FILE, 0, None)).ino;
    once(&fs, 6, |a| a.create_node(ME, d, b"s", 0, 0, Some(b"f")));
    let fifo = libc::S_IFIFO | 0o600;
    once(&fs, 8, |a| a.create_node(ME, d, b"p", fifo, 0, None));
    let linked = once(&fs, 10, |a| a.link(f, d, b"g"));
    assert_eq!(linked.nlink, 2, "linked once");
    once(&fs, 12, |a| a.setxattr(f, b"user.k", b"v", XATTR_CREATE));
    once(&fs, 14, |a| a.setxattr(f, b"user.k", b"w", XATTR_REPLACE));
    once(&fs, 16, |a| a.removexattr(f, b"user.k"));
    once(&fs, 18, |a| a.rename(d, b"g", d, b"h", 0));
    once(&fs, 20, |a| {
        a.rename(d, b"h", ROOT, b"h", libc::RENAME_NOREPLACE)
    });
    let s = ino_of(&fs, d, "s");
    once(&fs, 22, |a| {
        a.rename(d, b"f", d, b"s", libc::RENAME_EXCHANGE)
    });
    assert_eq!(ino_of(&fs, d, "s"), f, "exchanged once, not swapped back");
    assert_eq!(ino_of(&fs, d, "f"), s);
    once(&fs, 24, |a| a.unlink(ROOT, b"h"));
    once(&fs, 26, |a| a.unlink(d, b"p"));
    once(&fs, 28, |a| a.create_node(ME, d, b"e", DIR, 0, None));
    once(&fs, 30, |a| a.rmdir(d, b"e"));
    assert_eq!(fs.getattr(f).unwrap().nlink, 1);
    assert_eq!(fs.getattr(d).unwrap().nlink, 2, "no subdirectory left");
    let names: Vec<_> = fs.readdir(d, 2, 100).unwrap();
    assert_eq!(names.len(), 2, "f and s: {names:?}");
}

#[test]
fn a_resent_request_without_a_matching_record_is_carried_out() {
    let t = setup();
    let fs = t.fresh();
    // Never recorded (the previous server died before it committed).
    let x = fs
        .answering(resent(40))
        .create_node(ME, ROOT, b"x", DIR, 0, None)
        .unwrap();
    assert_eq!(ino_of(&fs, ROOT, "x"), x.ino);
    // The same unique as a recorded mkdir, but another operation: an rmdir.
    let d = fs
        .answering(Unique(42))
        .create_node(ME, ROOT, b"d", DIR, 0, None)
        .unwrap();
    fs.answering(resent(42)).rmdir(ROOT, b"d").unwrap();
    assert!(matches!(fs.lookup(ROOT, b"d"), Err(FsError::NotFound)));
    // The same operation and unique, other arguments.
    fs.answering(Unique(44))
        .setxattr(x.ino, b"user.a", b"1", XATTR_CREATE)
        .unwrap();
    fs.answering(resent(44))
        .setxattr(x.ino, b"user.b", b"2", XATTR_CREATE)
        .unwrap();
    assert_eq!(
        fs.getxattr(x.ino, b"user.b", 10).unwrap(),
        XattrReply::Data(b"2".to_vec())
    );
    // A recorded entry whose inode is gone: made again.
    let again = fs
        .answering(resent(42))
        .create_node(ME, ROOT, b"d", DIR, 0, None)
        .unwrap();
    assert_ne!(again.ino, d.ino);
    assert_eq!(ino_of(&fs, ROOT, "d"), again.ino);
}

#[test]
fn records_answer_resent_requests_only_on_the_connection_that_made_them() {
    let t = setup();
    let (d, generation) = {
        let fs = t.fresh();
        let d = fs
            .answering(Unique(2))
            .create_node(ME, ROOT, b"d", DIR, 0, None);
        (d.unwrap(), fs.mount_generation())
    };
    assert!(generation.is_some());
    {
        // Taken over: the connection's generation comes with it.
        let fs = t.adopt(generation);
        let again = fs
            .answering(resent(2))
            .create_node(ME, ROOT, b"d", DIR, 0, None);
        assert_eq!(again.unwrap(), d);
    }
    {
        // Taken over from a server that kept no generation: carried out again.
        let fs = t.adopt(None);
        let again = fs
            .answering(resent(2))
            .create_node(ME, ROOT, b"d", DIR, 0, None);
        assert!(matches!(again, Err(FsError::Exists)), "{again:?}");
    }
    // A fresh mount: a new connection, whose uniques start again.
    let fs = t.fresh();
    assert!(fs.mount_generation() > generation);
    let again = fs
        .answering(resent(2))
        .create_node(ME, ROOT, b"d", DIR, 0, None);
    assert!(matches!(again, Err(FsError::Exists)), "{again:?}");
    fs.answering(resent(2)).rmdir(ROOT, b"d").unwrap();
    assert!(matches!(fs.lookup(ROOT, b"d"), Err(FsError::NotFound)));
}

#[test]
fn the_ring_stays_bounded_and_an_overwritten_record_runs_again() {
    let t = setup();
    let fs = t.fresh();
    let n = 3 * RING_SLOTS;
    for i in 0..n {
        let name = format!("f{i}");
        let unique = Unique(2 * (i + 1));
        fs.answering(unique)
            .create_node(ME, ROOT, name.as_bytes(), FILE, 0, None)
            .unwrap();
    }
    let mut slots = 0;
    fs.store()
        .scan_meta(&keys::tag_prefix(fs.vid(), keys::TAG_REPLAY), |_, _| {
            slots += 1;
            Ok(true)
        })
        .unwrap();
    assert_eq!(slots, RING_SLOTS);
    let oldest = fs
        .answering(resent(2))
        .create_node(ME, ROOT, b"f0", FILE, 0, None);
    assert!(matches!(oldest, Err(FsError::Exists)), "{oldest:?}");
    let last = format!("f{}", n - 1);
    let newest = fs
        .answering(resent(2 * n))
        .create_node(ME, ROOT, last.as_bytes(), FILE, 0, None);
    assert_eq!(newest.unwrap().ino, ino_of(&fs, ROOT, &last));
}

#[test]
fn an_unreadable_record_is_no_error_the_request_runs_again() {
    let t = setup();
    let fs = t.fresh();
    fs.answering(Unique(2))
        .create_node(ME, ROOT, b"d", DIR, 0, None)
        .unwrap();
    let mut b = rocksdb::WriteBatch::default();
    b.put_cf(fs.store().meta(), keys::replay_key(fs.vid(), 1), b"junk");
    fs.store().write(b).unwrap();
    let again = fs
        .answering(resent(2))
        .create_node(ME, ROOT, b"d", DIR, 0, None);
    assert!(matches!(again, Err(FsError::Exists)), "{again:?}");
}

#[test]
fn uniques_map_to_slots_by_twos_and_the_resent_mark_is_ignored() {
    assert_eq!(Unique(2).slot(), 1);
    assert_eq!(resent(2).slot(), 1);
    assert_eq!(resent(2).id(), 2);
    assert!(resent(2).is_resent() && !Unique(2).is_resent());
    assert_eq!(Unique(2 + 2 * RING_SLOTS).slot(), 1);
    assert_ne!(Unique(4).slot(), Unique(2).slot());
}
