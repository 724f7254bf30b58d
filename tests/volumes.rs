//! `fusevol volume create|list|inspect|resize|delete` and isolation of volumes in one store.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use common::*;
use fusevol::fs::charge::{chunks_charge, dirent_charge, INODE_CHARGE};

/// What one file or directory named `name` is charged besides its data.
fn node(name: &str) -> u64 {
    INODE_CHARGE + dirent_charge(name.len())
}

fn new_store_with(volumes: &[(&str, &[&str])]) -> Dirs {
    let dirs = Dirs::new();
    for (name, extra) in volumes {
        create_volume(&dirs.data, name, extra).ok();
    }
    dirs
}

#[test]
fn create_then_inspect_reports_limits_and_empty_usage() {
    let dirs = new_store_with(&[("v1", &["--quota", "64Mi", "--inodes", "1000"])]);
    let v = inspect(&dirs.data, "v1");
    assert_eq!(v.quota_bytes, Some(64 * MIB));
    assert_eq!(v.inode_limit, Some(1000));
    assert_eq!(v.used_bytes, 0);
    assert_eq!(v.chunks, 0);
    assert!(v.inodes <= 1, "a new volume has {} inodes", v.inodes);
}

#[test]
fn create_without_limits_reports_null_quota_and_inode_limit() {
    let dirs = new_store_with(&[("plain", &[])]);
    let v = inspect(&dirs.data, "plain");
    assert_eq!(v.quota_bytes, None);
    assert_eq!(v.inode_limit, None);
}

#[test]
fn sizes_are_parsed_as_kubernetes_quantities() {
    let dirs = Dirs::new();
    let cases: &[(&str, u64)] = &[
        ("64Mi", 64 << 20),
        ("10Gi", 10 << 30),
        ("500M", 500_000_000),
        ("12345", 12_345),
        ("1Ki", 1024),
        ("1k", 1000),
        ("2G", 2_000_000_000),
        ("1Ti", 1 << 40),
        ("1.5Gi", 1_610_612_736),
    ];
    for (i, (q, want)) in cases.iter().enumerate() {
        let name = format!("v{i}");
        create_volume(&dirs.data, &name, &["--quota", q]).ok();
        assert_eq!(
            inspect(&dirs.data, &name).quota_bytes,
            Some(*want),
            "--quota {q}"
        );
    }
}

#[test]
fn list_json_returns_every_volume_with_the_same_fields_as_inspect() {
    let dirs = new_store_with(&[
        ("alpha", &["--quota", "1Gi"]),
        ("beta", &[]),
        ("gamma", &["--inodes", "7"]),
    ]);
    let vols = list(&dirs.data);
    let names: BTreeSet<_> = vols.iter().map(|v| v.name.clone()).collect();
    let want: BTreeSet<String> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
    for v in &vols {
        assert_eq!(*v, inspect(&dirs.data, &v.name));
    }
}

#[test]
fn plain_list_and_inspect_name_the_volumes() {
    let dirs = new_store_with(&[("first-vol", &["--quota", "1Gi"]), ("second-vol", &[])]);
    let out = fusevol(args!["volume", "list", "--data", &dirs.data]).ok();
    assert!(
        out.stdout.contains("first-vol") && out.stdout.contains("second-vol"),
        "{}",
        out.stdout
    );
    let out = fusevol(args![
        "volume",
        "inspect",
        "--data",
        &dirs.data,
        "first-vol"
    ])
    .ok();
    assert!(out.stdout.contains("first-vol"), "{}", out.stdout);
}

#[test]
fn mount_creates_the_volume_with_the_given_limits() {
    let m = Mount::start(Opts::new().volume("auto").quota("48Mi").inodes(500));
    let v = m.inspect();
    assert_eq!(v.quota_bytes, Some(48 * MIB));
    assert_eq!(v.inode_limit, Some(500));
    let names: Vec<_> = list(m.data()).into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["auto"]);
}

#[test]
fn inspect_and_list_report_live_usage_while_mounted() {
    let m = Mount::start(Opts::new().quota("64Mi"));
    let before = m.inspect();
    write_big_file(&m.path("data"), 2 * MIB, 1).unwrap();
    for i in 0..10 {
        fs::write(m.path(&format!("small{i}")), b"").unwrap();
    }
    fs::create_dir(m.path("dir")).unwrap();
    let after = m.inspect();
    let small: u64 = (0..10).map(|i| node(&format!("small{i}"))).sum();
    assert_eq!(
        after.used_bytes,
        chunks_charge(32, 2 * MIB) + node("data") + small + node("dir"),
        "2 MiB written (chunk-aligned), 12 names and inodes"
    );
    assert_eq!(
        after.inodes - before.inodes,
        12,
        "1 data file + 10 files + 1 directory"
    );
    assert!(after.chunks >= 1);
    let listed = list(m.data());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], after);
}

#[test]
fn resize_changes_the_quota_offline() {
    let dirs = new_store_with(&[("v", &["--quota", "1Gi"])]);
    fusevol(args![
        "volume", "resize", "--data", &dirs.data, "v", "--quota", "2Gi"
    ])
    .ok();
    assert_eq!(inspect(&dirs.data, "v").quota_bytes, Some(2 << 30));
    fusevol(args![
        "volume", "resize", "--data", &dirs.data, "v", "--quota", "100Mi"
    ])
    .ok();
    assert_eq!(inspect(&dirs.data, "v").quota_bytes, Some(100 << 20));
    let m = Mount::start_in(dirs, Opts::new().volume("v"));
    assert_eq!(df(m.mnt()).0, 100 * MIB, "the mount uses the resized quota");
}

#[test]
fn resize_below_usage_fails_with_a_clear_message_and_keeps_the_quota() {
    let m = Mount::start(Opts::new().quota("64Mi"));
    write_big_file(&m.path("f"), 8 * MIB, 1).unwrap();
    let dirs = m.stop();
    let out = fusevol(args![
        "volume", "resize", "--data", &dirs.data, "vol", "--quota", "4Mi"
    ])
    .user_error();
    let msg = out.stderr.to_lowercase();
    assert!(
        msg.contains("quota") || msg.contains("usage") || msg.contains("used"),
        "the error should say that the quota is below the usage: {}",
        out.stderr
    );
    let v = inspect(&dirs.data, "vol");
    assert_eq!(v.quota_bytes, Some(64 * MIB));
    assert_eq!(v.used_bytes, chunks_charge(128, 8 * MIB) + node("f"));
}

#[test]
fn delete_removes_the_volume_and_a_new_one_of_that_name_starts_empty() {
    let dirs = new_store_with(&[("keep", &[])]);
    let m = Mount::start_in(dirs, Opts::new().volume("gone"));
    write_big_file(&m.path("old-data"), MIB, 1).unwrap();
    let dirs = m.stop();
    fusevol(args!["volume", "delete", "--data", &dirs.data, "gone"]).ok();
    let names: Vec<_> = list(&dirs.data).into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["keep"]);
    fusevol(args![
        "volume", "inspect", "--data", &dirs.data, "gone", "--json"
    ])
    .json_error("volume_not_found");
    create_volume(&dirs.data, "gone", &[]).ok();
    let v = inspect(&dirs.data, "gone");
    assert_eq!(
        (v.used_bytes, v.chunks),
        (0, 0),
        "recreated volume carries old usage: {v:?}"
    );
    let m = Mount::start_in(dirs, Opts::new().volume("gone"));
    assert_eq!(
        fs::read_dir(m.mnt()).unwrap().count(),
        0,
        "recreated volume shows old files"
    );
}

#[test]
fn deleting_a_mounted_volume_fails_and_the_mount_keeps_working() {
    let m = Mount::start(Opts::new().quota("64Mi"));
    fs::write(m.path("f"), b"still here").unwrap();
    fusevol(args!["volume", "delete", "--data", m.data(), m.volume()]).user_error();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"still here");
    fs::write(m.path("g"), b"new").unwrap();
    assert_eq!(m.inspect().quota_bytes, Some(64 * MIB));
    let dirs = m.stop();
    let m = Mount::start_in(dirs, Opts::new());
    assert_eq!(fs::read(m.path("f")).unwrap(), b"still here");
}

#[test]
fn deleting_a_volume_returns_its_disk_space() {
    let m = Mount::start(Opts::new().volume("big"));
    // Incompressible data so that the store really holds 50 MiB.
    write_big_file_random(&m.path("f1"), 30 * MIB);
    write_big_file_random(&m.path("f2"), 20 * MIB);
    let dirs = m.stop();
    create_volume(&dirs.data, "other", &[]).ok();
    let before = du(&dirs.data);
    assert!(
        before >= 50 * MIB,
        "store holds only {before} bytes after writing 50 MiB"
    );
    fusevol(args!["volume", "delete", "--data", &dirs.data, "big"]).ok();
    let after = du(&dirs.data);
    assert!(
        after + 40 * MIB <= before,
        "deleting a volume with 50 MiB of data: store disk usage {before} -> {after} bytes"
    );
    assert_eq!(list(&dirs.data).len(), 1);
}

fn write_big_file_random(p: &Path, len: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(len);
    let mut buf = vec![0u8; MIB as usize];
    let f = create_rw(p);
    for i in 0..len / MIB {
        rng.fill_bytes(&mut buf);
        pwrite_all(&f, &buf, i * MIB).unwrap();
    }
    f.sync_all().unwrap();
    close_file(f).unwrap();
}

#[test]
fn volumes_in_one_store_cannot_see_each_others_files() {
    let m = Mount::start(Opts::new().volume("a").quota("64Mi"));
    fs::create_dir(m.path("only-in-a")).unwrap();
    write_big_file(&m.path("only-in-a/data"), 3 * MIB, 1).unwrap();
    fs::write(m.path("same-name"), b"from a").unwrap();
    let dirs = m.stop();
    // One process owns the store: mount the other volume after the first is unmounted.
    let m = Mount::start_in(dirs, Opts::new().volume("b").quota("64Mi"));
    let names: Vec<_> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.is_empty(),
        "volume b shows entries of volume a: {names:?}"
    );
    assert_errno!(fs::metadata(m.path("only-in-a")), libc::ENOENT);
    fs::write(m.path("same-name"), b"from b").unwrap();
    write_big_file(&m.path("b-data"), MIB, 2).unwrap();
    let dirs = m.stop();
    let a = inspect(&dirs.data, "a");
    let b = inspect(&dirs.data, "b");
    // Each volume counts only its own data (3 MiB + 6 bytes and 1 MiB + 6 bytes).
    assert!(
        (3 * MIB + 6..=3 * MIB + CHUNK_MAX).contains(&a.used_bytes),
        "usage of a: {a:?}"
    );
    assert!(
        (MIB + 6..=MIB + CHUNK_MAX).contains(&b.used_bytes),
        "usage of b: {b:?}"
    );
    let m = Mount::start_in(dirs, Opts::new().volume("a"));
    let mut names: Vec<_> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec!["only-in-a", "same-name"]);
    assert_eq!(fs::read(m.path("same-name")).unwrap(), b"from a");
    let d = fs::read(m.path("only-in-a/data")).unwrap();
    assert!(d[..MIB as usize] == pattern(1, MIB as usize)[..]);
}

#[test]
fn fsck_of_a_healthy_store_exits_zero() {
    let m = Mount::start(Opts::new().quota("64Mi"));
    fs::create_dir_all(m.path("a/b")).unwrap();
    write_big_file(&m.path("a/b/f"), 3 * MIB + 17, 1).unwrap();
    fs::hard_link(m.path("a/b/f"), m.path("link")).unwrap();
    std::os::unix::fs::symlink("a/b/f", m.path("sym")).unwrap();
    setxattr(&m.path("a"), "user.x", b"1", 0).unwrap();
    let f = create_rw(&m.path("sparse"));
    pwrite_all(&f, b"x", 5 * GIB).unwrap();
    drop(f);
    fs::remove_file(m.path("link")).unwrap();
    let dirs = m.stop();
    fsck(&dirs.data, &[]).code_is(0);
    fsck(&dirs.data, &["--volume", "vol"]).code_is(0);
    fsck(&dirs.data, &["--repair"]).code_is(0);
    fsck(&dirs.data, &[]).code_is(0);
}
