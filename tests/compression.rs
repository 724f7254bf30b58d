//! Compressed volumes through the mount and the CLI: `--compression lz4|zstd` at creation,
//! what the data takes on the disk, what the quota counts, what `inspect` reports.

#[macro_use]
mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use common::*;

/// `len` bytes of text that compresses well (as logs, CSV or JSON do), distinct per `seed`.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("{seed},{i},row {i} of a table that fusevol stores compressed\n").as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn opts(compression: &str) -> Opts {
    let mut o = Opts::new();
    o.extra_args = vec!["--compression".into(), compression.into()];
    o
}

/// Bytes of the store's table and blob files (what the data takes; WAL and logs aside).
fn data_file_bytes(store: &Path) -> u64 {
    fs::read_dir(store.join("db"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.ends_with(".sst") || name.ends_with(".blob")
        })
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn write_synced(p: &Path, data: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// The `compression` object of `volume inspect --json`.
fn compression_of(data: &Path, volume: &str) -> serde_json::Value {
    let out = fusevol(args!["volume", "inspect", "--data", data, volume, "--json"]).ok();
    out.json()["compression"].clone()
}

#[test]
fn compressible_data_takes_a_fraction_of_the_disk_and_reads_back_after_remount() {
    let data = text(48 << 20, 1);
    let mut sizes = Vec::new();
    for compression in ["none", "lz4", "zstd"] {
        let m = Mount::start(opts(compression));
        write_synced(&m.path("table.csv"), &data);
        let c = compression_of(m.data(), m.volume());
        assert_eq!(c["algorithm"], compression, "{c}");
        assert_eq!(c["logical_bytes"], 48u64 << 20, "{c}");
        if compression == "none" {
            assert!(c.get("stored_bytes").is_none(), "{c}");
        } else {
            let stored = c["stored_bytes"].as_u64().unwrap();
            assert!(stored > 0 && stored < 12 << 20, "{compression}: {c}");
        }
        // Usage (and so the quota) counts what the files hold, not what they take.
        let used = m.inspect().used_bytes;
        assert!(used >= 48 << 20, "{compression}: used {used}");
        let dirs = m.stop();
        // Reopened (the WAL replayed into table files): the data is all there.
        let m = Mount::start_in(dirs, Opts::new());
        assert!(
            fs::read(m.path("table.csv")).unwrap() == data,
            "{compression}: data differs after remount"
        );
        let dirs = m.stop();
        sizes.push((compression, data_file_bytes(&dirs.data)));
        fsck(&dirs.data, &[]).code_is(0);
    }
    let plain = sizes[0].1;
    assert!(plain >= 48 << 20, "uncompressed store holds {plain} bytes");
    for (compression, bytes) in &sizes[1..] {
        assert!(
            bytes * 4 < plain,
            "{compression} store takes {bytes} bytes for what takes {plain} uncompressed"
        );
    }
}

#[test]
fn the_quota_counts_bytes_before_compression() {
    let mut o = opts("zstd");
    o.quota = Some("8Mi".into());
    let m = Mount::start(o);
    // 12 MiB of text that zstd stores in a few hundred KiB: only 8 MiB fit.
    let data = text(12 << 20, 2);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("big"))
        .unwrap();
    let mut accepted = 0usize;
    let mut refused = false;
    for piece in data.chunks(256 << 10) {
        match f.write_all(piece) {
            Ok(()) => accepted += piece.len(),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                refused = true;
                break;
            }
            Err(e) => panic!("write failed with {e}"),
        }
    }
    match f.sync_all() {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => refused = true,
        Err(e) => panic!("fsync failed with {e}"),
    }
    drop(f);
    assert!(
        refused,
        "12 MiB went into an 8 MiB volume ({accepted} accepted)"
    );
    let (total, used) = df(m.mnt());
    assert_eq!(total, 8 * MIB, "df size");
    assert!(
        (7 * MIB..=8 * MIB).contains(&used),
        "df used {used} of an 8 MiB quota"
    );
}

#[test]
fn compression_is_chosen_at_creation_and_kept() {
    let dirs = Dirs::new();
    let out = create_volume(&dirs.data, "logs", &["--compression", "lz4", "--json"]).ok();
    assert_eq!(out.json()["compression"]["algorithm"], "lz4");
    // Human output names it too.
    let out = fusevol(args!["volume", "inspect", "--data", &dirs.data, "logs"]).ok();
    assert!(out.stdout.contains("compression=lz4"), "{}", out.stdout);
    // A mount asking for another compression keeps the volume's own, with a warning.
    let m = Mount::start_in(dirs, opts("zstd").volume("logs"));
    write_synced(&m.path("f"), &text(1 << 20, 3));
    assert_eq!(compression_of(m.data(), "logs")["algorithm"], "lz4");
    let stderr = m.stderr();
    assert!(
        stderr.contains("another compression"),
        "no warning about the compression asked for: {stderr}"
    );
    let dirs = m.stop();
    // Volumes without compression report none; list carries the algorithm.
    create_volume(&dirs.data, "plain", &[]).ok();
    assert_eq!(
        listed_algorithms(&dirs.data, "compression"),
        ["lz4", "none"]
    );
}

#[test]
fn an_unknown_compression_is_a_usage_error_that_names_the_choices() {
    let dirs = Dirs::new();
    let out = create_volume(&dirs.data, "v", &["--compression", "gzip"]).user_error();
    assert!(
        out.stderr.contains("use none, lz4 or zstd"),
        "{}",
        out.stderr
    );
    let out = fusevol(args![
        "mount",
        "--data",
        &dirs.data,
        "--compression",
        "brotli",
        &dirs.mnt
    ])
    .user_error();
    assert!(
        out.stderr.contains("use none, lz4 or zstd"),
        "{}",
        out.stderr
    );
    assert!(!is_mounted(&dirs.mnt));
}
