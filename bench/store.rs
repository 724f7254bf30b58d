//! Micro-benchmarks of the filesystem core over a real RocksDB store, without FUSE, so a
//! regression in the engine shows up without the kernel's noise:
//!
//! ```sh
//! CARGO_TARGET_DIR=/var/tmp/fusevol-target cargo bench --profile release --bench store
//! ```
//!
//! The store lives in a temp directory under `$FUSEVOL_BENCH_DIR` (default `/var/tmp`),
//! so it is on a real disk. Every operation commits its own `WriteBatch` with the WAL on
//! (not synced), as in the mounted filesystem; `fsync` is measured separately.

use std::sync::atomic::{AtomicU64, Ordering};

use divan::{black_box, Bencher};
use fusevol::fs::{Caller, Fs};
use fusevol::store::{Store, StoreOptions, ROOT_INO};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const ME: Caller = Caller { uid: 0, gid: 0 };
const FILE: u32 = libc::S_IFREG | 0o644;
const DIR: u32 = libc::S_IFDIR | 0o755;
/// Size of the file that the read and overwrite benchmarks work on.
const FILE_BYTES: u64 = 64 << 20;

fn main() {
    divan::main();
}

// Fields drop in order: the store closes before its temporary directory is removed
// (the other way round left ~14 MB per run in /var/tmp).
struct Setup {
    fs: Fs,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let base = std::env::var_os("FUSEVOL_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("fusevol-microbench-")
        .tempdir_in(base)
        .expect("temp dir for the store");
    let store = Store::open_or_create(&dir.path().join("store"), &StoreOptions::default())
        .expect("create store");
    store
        .create_volume("bench", None, None)
        .expect("create volume");
    let vol = store.open_volume("bench").expect("open volume");
    let fs = Fs::new(store, vol).expect("fs");
    Setup { _dir: dir, fs }
}

/// A store with one `FILE_BYTES` file written sequentially; returns its inode.
fn setup_with_file() -> (Setup, u64) {
    let s = setup();
    let ino =
        s.fs.create_node(ME, ROOT_INO, b"data", FILE, 0, None)
            .expect("create")
            .ino;
    let block = vec![0x5a_u8; 1 << 20];
    for off in (0..FILE_BYTES).step_by(block.len()) {
        s.fs.write(ino, off, &block, false).expect("write");
    }
    (s, ino)
}

/// Appends whole 64 KiB chunks to a growing file (the sequential-write path: no read).
#[divan::bench(sample_count = 50, sample_size = 64)]
fn write_64k_sequential(b: Bencher) {
    let s = setup();
    let ino =
        s.fs.create_node(ME, ROOT_INO, b"f", FILE, 0, None)
            .expect("create")
            .ino;
    let buf = vec![7u8; 64 << 10];
    let off = AtomicU64::new(0);
    b.counter(divan::counter::BytesCount::new(buf.len()))
        .bench_local(|| {
            let o = off.fetch_add(buf.len() as u64, Ordering::Relaxed);
            s.fs.write(ino, o, &buf, false).expect("write")
        });
}

/// 4 KiB overwrites at random aligned offsets of a 64 MiB file (chunk patches).
#[divan::bench(sample_count = 50, sample_size = 200)]
fn write_4k_random_overwrite(b: Bencher) {
    let (s, ino) = setup_with_file();
    let buf = vec![9u8; 4096];
    let mut rng = SmallRng::seed_from_u64(1);
    b.bench_local(|| {
        let off = rng.gen_range(0..FILE_BYTES / 4096) * 4096;
        s.fs.write(ino, off, &buf, false).expect("write")
    });
}

/// 4 KiB reads at random aligned offsets (warm caches: the engine's own cost).
#[divan::bench(sample_count = 50, sample_size = 200)]
fn read_4k_random(b: Bencher) {
    let (s, ino) = setup_with_file();
    let mut rng = SmallRng::seed_from_u64(2);
    b.bench_local(|| {
        let off = rng.gen_range(0..FILE_BYTES / 4096) * 4096;
        black_box(s.fs.read(ino, off, 4096).expect("read"))
    });
}

/// 1 MiB sequential reads, wrapping around the file.
#[divan::bench(sample_count = 30, sample_size = 8)]
fn read_1m_sequential(b: Bencher) {
    let (s, ino) = setup_with_file();
    let off = AtomicU64::new(0);
    b.counter(divan::counter::BytesCount::new(1usize << 20))
        .bench_local(|| {
            let o = off.fetch_add(1 << 20, Ordering::Relaxed) % FILE_BYTES;
            black_box(s.fs.read(ino, o, 1 << 20).expect("read"))
        });
}

/// Creates empty files, 1,000 per directory.
#[divan::bench(sample_count = 50, sample_size = 100)]
fn create_file(b: Bencher) {
    let s = setup();
    let n = AtomicU64::new(0);
    b.bench_local(|| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        let dir_name = format!("d{}", i / 1000);
        let dir = match s.fs.lookup(ROOT_INO, dir_name.as_bytes()) {
            Ok(a) => a.ino,
            Err(_) => {
                s.fs.create_node(ME, ROOT_INO, dir_name.as_bytes(), DIR, 0, None)
                    .expect("mkdir")
                    .ino
            }
        };
        s.fs.create_node(ME, dir, format!("f{i}").as_bytes(), FILE, 0, None)
            .expect("create")
    });
}

/// Looks up existing names among 10,000 files in one directory.
#[divan::bench(sample_count = 50, sample_size = 200)]
fn lookup_existing(b: Bencher) {
    let s = setup();
    for i in 0..10_000 {
        s.fs.create_node(ME, ROOT_INO, format!("f{i}").as_bytes(), FILE, 0, None)
            .expect("create");
    }
    let mut rng = SmallRng::seed_from_u64(3);
    b.bench_local(|| {
        let name = format!("f{}", rng.gen_range(0..10_000));
        black_box(s.fs.lookup(ROOT_INO, name.as_bytes()).expect("lookup"))
    });
}

/// Creates, writes 4 KiB into and unlinks a file (the small-file churn of a database).
#[divan::bench(sample_count = 50, sample_size = 100)]
fn create_write_unlink(b: Bencher) {
    let s = setup();
    let buf = vec![1u8; 4096];
    let n = AtomicU64::new(0);
    b.bench_local(|| {
        let name = format!("t{}", n.fetch_add(1, Ordering::Relaxed));
        let ino =
            s.fs.create_node(ME, ROOT_INO, name.as_bytes(), FILE, 0, None)
                .expect("create")
                .ino;
        s.fs.write(ino, 0, &buf, false).expect("write");
        s.fs.unlink(ROOT_INO, name.as_bytes()).expect("unlink")
    });
}

/// Makes every committed operation durable (an fsync of the WAL) after one 4 KiB write.
#[divan::bench(sample_count = 30, sample_size = 20)]
fn write_4k_then_fsync(b: Bencher) {
    let (s, ino) = setup_with_file();
    let buf = vec![3u8; 4096];
    let mut rng = SmallRng::seed_from_u64(4);
    b.bench_local(|| {
        let off = rng.gen_range(0..FILE_BYTES / 4096) * 4096;
        s.fs.write(ino, off, &buf, false).expect("write");
        s.fs.fsync().expect("fsync")
    });
}
