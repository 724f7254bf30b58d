//! Encrypted volumes through the mount and the CLI: `--encryption aes-256-gcm --key-file`,
//! what reaches the store's files (no plaintext of contents or names), a missing or wrong
//! key, what `inspect` reports and what the quota counts.

#[macro_use]
mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;

/// Markers written as contents and names: none may appear in an encrypted store's files.
const CONTENT: &[u8] = b"CONFIDENTIAL-PAYROLL-ROW-";
const NAME: &str = "secret-salaries-2026";
const LINK_TARGET: &str = "target-of-the-hidden-symlink";
const XATTR_VALUE: &[u8] = b"xattr-value-nobody-may-read";
const XATTR_NAME: &str = "user.tenant-private-label";

fn key_file(dirs: &Dirs, name: &str, hex: &str) -> PathBuf {
    let p = dirs.root.join(name);
    fs::write(&p, format!("{hex}\n")).unwrap();
    p
}

const KEY_A: &str = "3f1c0c7d5e9a4b2e8d6f1a3c5b7e9d0f2a4c6e8b1d3f5a7c9e0b2d4f6a8c1e3b";
const KEY_B: &str = "0000000000000000000000000000000000000000000000000000000000000001";

fn encrypted(key: &Path) -> Opts {
    let mut o = Opts::new();
    o.extra_args = vec![
        "--encryption".into(),
        "aes-256-gcm".into(),
        "--key-file".into(),
        key.display().to_string(),
    ];
    o
}

fn with_key(key: &Path) -> Opts {
    let mut o = Opts::new();
    o.extra_args = vec!["--key-file".into(), key.display().to_string()];
    o
}

/// `len` bytes of the content marker, repeated.
fn contents(len: usize) -> Vec<u8> {
    CONTENT.iter().copied().cycle().take(len).collect()
}

/// Writes a tree with every kind of name and content the store keeps: files (whole
/// chunks, a partial overwrite inside a chunk, a short tail), a directory, a symlink, an
/// xattr, a rename. Returns the expected contents of the big file.
fn write_tree(m: &Mount) -> Vec<u8> {
    let dir = m.path(NAME);
    fs::create_dir(&dir).unwrap();
    let big = dir.join(format!("{NAME}.csv"));
    let mut expected = contents(3 << 20 | 1234);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&big)
        .unwrap();
    f.write_all(&expected).unwrap();
    // A partial write inside a chunk (read, patch, rewrite of a sealed chunk).
    f.write_all_at(b"patched-in-the-middle", 100_000).unwrap();
    expected[100_000..100_021].copy_from_slice(b"patched-in-the-middle");
    // A write past the end, leaving a hole.
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    f.write_all(CONTENT).unwrap();
    expected.resize(4 << 20, 0);
    expected.extend_from_slice(CONTENT);
    f.sync_all().unwrap();
    drop(f);
    std::os::unix::fs::symlink(LINK_TARGET, dir.join("link")).unwrap();
    setxattr(&big, XATTR_NAME, XATTR_VALUE, 0).unwrap();
    fs::write(dir.join("draft"), CONTENT).unwrap();
    fs::rename(dir.join("draft"), dir.join(format!("{NAME}.final"))).unwrap();
    expected
}

fn check_tree(m: &Mount, expected: &[u8]) {
    let dir = m.path(NAME);
    let big = dir.join(format!("{NAME}.csv"));
    assert!(fs::read(&big).unwrap() == expected, "file contents differ");
    assert_eq!(
        fs::read_link(dir.join("link")).unwrap(),
        Path::new(LINK_TARGET)
    );
    assert_eq!(getxattr_buf(&big, XATTR_NAME, 256).unwrap(), XATTR_VALUE);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "link".to_string(),
            format!("{NAME}.csv"),
            format!("{NAME}.final"),
        ]
    );
    assert_eq!(
        fs::read(dir.join(format!("{NAME}.final"))).unwrap(),
        CONTENT
    );
}

/// The store's files that hold any of the markers, with the marker found.
fn plaintext_in(store: &Path) -> Vec<(PathBuf, String)> {
    let markers: Vec<&[u8]> = vec![
        CONTENT,
        NAME.as_bytes(),
        LINK_TARGET.as_bytes(),
        XATTR_VALUE,
        XATTR_NAME.as_bytes(),
        b"patched-in-the-middle",
    ];
    let mut found = Vec::new();
    let mut stack = vec![store.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = fs::read(&p).unwrap();
            for m in &markers {
                if bytes.windows(m.len()).any(|w| w == *m) {
                    found.push((p.clone(), String::from_utf8_lossy(m).into_owned()));
                }
            }
        }
    }
    found
}

#[test]
fn no_plaintext_of_contents_or_names_reaches_the_store_and_all_reads_back_with_the_key() {
    // The same tree unencrypted: the scan finds the markers (it can fail).
    let m = Mount::start(Opts::new());
    write_tree(&m);
    let dirs = m.stop();
    let plain = plaintext_in(&dirs.data);
    for marker in [NAME, LINK_TARGET, "CONFIDENTIAL"] {
        assert!(
            plain.iter().any(|(_, m)| m.contains(marker)),
            "the scan does not see {marker:?} in an unencrypted store: {plain:?}"
        );
    }
    drop(dirs);

    let dirs = Dirs::new();
    let key = key_file(&dirs, "key", KEY_A);
    let m = Mount::start_in(dirs, encrypted(&key));
    let expected = write_tree(&m);
    check_tree(&m, &expected);
    let dirs = m.stop();
    // Stopped: WAL, table files, blob files, manifest, logs, all of it.
    let leaks = plaintext_in(&dirs.data);
    assert!(
        leaks.is_empty(),
        "plaintext in the store's files: {leaks:?}"
    );
    let marker = fs::read_to_string(dirs.data.join("FUSEVOL")).unwrap();
    assert!(
        marker.contains("format=2"),
        "an encrypted volume raises the store format (older fusevol refuse it): {marker}"
    );
    // Remounted with the key (no --encryption: the volume knows it is encrypted).
    let m = Mount::start_in(dirs, with_key(&key));
    check_tree(&m, &expected);
    let dirs = m.stop();
    fsck(&dirs.data, &["--key-file", key.to_str().unwrap()]).code_is(0);
}

#[test]
fn a_missing_or_wrong_key_refuses_to_mount_with_a_clear_error_and_loses_nothing() {
    let dirs = Dirs::new();
    let (key, wrong) = (
        key_file(&dirs, "key", KEY_A),
        key_file(&dirs, "wrong", KEY_B),
    );
    let m = Mount::start_in(dirs, encrypted(&key));
    let expected = write_tree(&m);
    let dirs = m.stop();
    let (dirs, err) = match Mount::try_start_in(dirs, Opts::new()) {
        Ok(_) => panic!("an encrypted volume mounted without its key"),
        Err(e) => e,
    };
    assert!(
        err.contains("is encrypted") && err.contains("--key-file"),
        "{err}"
    );
    assert!(!is_mounted(&dirs.mnt));
    let (dirs, err) = match Mount::try_start_in(dirs, with_key(&wrong)) {
        Ok(_) => panic!("an encrypted volume mounted with a wrong key"),
        Err(e) => e,
    };
    assert!(err.contains("wrong key"), "{err}");
    assert!(!is_mounted(&dirs.mnt));
    // fsck needs the key too, and says so; the wrong one is refused.
    let one = ["--volume", "vol", "--json"];
    let msg = fsck(&dirs.data, &one).json_error("key_required");
    assert!(msg.contains("is encrypted"), "{msg}");
    let wrong_arg = ["--key-file", wrong.to_str().unwrap()];
    fsck(&dirs.data, &[&wrong_arg[..], &one[..]].concat()).json_error("wrong_key");
    // Over the whole store, the other volumes are checked and this one is named as skipped.
    create_volume(&dirs.data, "plain", &[]).ok();
    let out = fsck(&dirs.data, &["--json"]).code_is(0);
    let reports = out.json();
    let skipped = &reports[1];
    assert_eq!(skipped["volume"], "vol", "{reports}");
    assert!(
        skipped["pending"][0]
            .as_str()
            .unwrap()
            .contains("not checked"),
        "{reports}"
    );
    assert_eq!(reports[0]["volume"], "plain", "{reports}");
    assert_eq!(reports[0]["problems"].as_array().map(Vec::len), Some(0));
    // Not a key at all.
    let bad = key_file(&dirs, "bad", "not a key");
    let msg =
        fsck(&dirs.data, &["--key-file", bad.to_str().unwrap(), "--json"]).json_error("bad_key");
    assert!(msg.contains("32 bytes, or 64 hexadecimal digits"), "{msg}");
    // Nothing was lost on the way.
    let m = Mount::start_in(dirs, with_key(&key));
    check_tree(&m, &expected);
}

#[test]
fn inspect_reports_encryption_and_the_quota_counts_the_bytes_written() {
    let dirs = Dirs::new();
    let key = key_file(&dirs, "key", KEY_A);
    let keyarg = key.to_str().unwrap();
    let out = create_volume(
        &dirs.data,
        "vault",
        &[
            "--quota",
            "8Mi",
            "--encryption",
            "aes-256-gcm",
            "--key-file",
            keyarg,
            "--json",
        ],
    )
    .ok();
    assert_eq!(out.json()["encryption"]["algorithm"], "aes-256-gcm");
    create_volume(&dirs.data, "plain", &["--json"]).ok();
    assert_eq!(
        listed_algorithms(&dirs.data, "encryption"),
        ["none", "aes-256-gcm"]
    );
    let out = fusevol(args!["volume", "inspect", "--data", &dirs.data, "vault"]).ok();
    assert!(
        out.stdout.contains("encryption=aes-256-gcm"),
        "{}",
        out.stdout
    );
    // 12 MiB into the 8 MiB quota: the nonce and tag of each chunk are not charged.
    let m = Mount::start_in(dirs, with_key(&key).volume("vault"));
    let mut f = fs::File::create(m.path("big")).unwrap();
    let mut accepted = 0usize;
    let data = contents(12 << 20);
    for piece in data.chunks(256 << 10) {
        match f.write_all(piece).and_then(|_| f.sync_data()) {
            Ok(()) => accepted += piece.len(),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("write failed with {e}"),
        }
    }
    assert!(
        (7 << 20..8 << 20).contains(&accepted),
        "accepted {accepted} bytes into an 8 MiB quota"
    );
    let used = m.inspect().used_bytes;
    assert!(used <= 8 << 20, "used {used}");
}

#[test]
fn encryption_options_that_cannot_work_are_refused_before_anything_is_created() {
    let dirs = Dirs::new();
    let key = key_file(&dirs, "key", KEY_A);
    let keyarg = key.to_str().unwrap();
    let msg = create_volume(&dirs.data, "v", &["--encryption", "aes-256-gcm", "--json"])
        .json_error("invalid_argument");
    assert!(msg.contains("--key-file"), "{msg}");
    let msg = create_volume(
        &dirs.data,
        "v",
        &[
            "--encryption",
            "aes-256-gcm",
            "--key-file",
            keyarg,
            "--compression",
            "lz4",
            "--json",
        ],
    )
    .json_error("invalid_argument");
    assert!(msg.contains("not supported yet"), "{msg}");
    let out = create_volume(&dirs.data, "v", &["--encryption", "rot13"]).user_error();
    assert!(out.stderr.contains("none or aes-256-gcm"), "{}", out.stderr);
    let out = fusevol(args!["volume", "list", "--data", &dirs.data, "--json"]).ok();
    assert_eq!(
        out.json().as_array().map(Vec::len),
        Some(0),
        "{}",
        out.stdout
    );
    // An unencrypted volume is not served as if it were encrypted.
    create_volume(&dirs.data, "plain", &[]).ok();
    let (_dirs, err) = match Mount::try_start_in(dirs, encrypted(&key).volume("plain")) {
        Ok(_) => panic!("an unencrypted volume mounted as encrypted"),
        Err(e) => e,
    };
    assert!(err.contains("exists with encryption none"), "{err}");
}
