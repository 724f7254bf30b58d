//! POSIX semantics of a fusevol mount, checked against what ext4 does.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn mount() -> Mount {
    Mount::start(Opts::new())
}

// ---------------------------------------------------------------------------------------------
// Regular files: read/write
// ---------------------------------------------------------------------------------------------

#[test]
fn written_data_reads_back_from_page_cache_and_from_storage() {
    let m = mount();
    let p = m.path("big");
    let data = pattern(1, (3 * MIB + 12345) as usize);
    write_file(&p, &data);
    assert_eq!(lstat(&p).len(), data.len() as u64);
    assert!(read_all(&p) == data, "read back differs (page cache)");
    drop_cache_path(&p);
    assert!(
        read_all(&p) == data,
        "read back differs after the page cache was dropped"
    );
}

#[test]
fn unaligned_writes_across_chunk_boundaries_read_back_exactly() {
    let m = mount();
    let p = m.path("f");
    let f = create_rw(&p);
    let mut model = vec![0u8; 0];
    let writes: &[(u64, usize)] = &[
        (65530, 20),
        (131071, 2),
        (3, 5),
        (16383, 3),
        (262144 - 1, 65536 + 2),
        (4095, 4098),
        (500_000, 1),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let buf = pattern(100 + i as u64, len);
        pwrite_all(&f, &buf, off).unwrap();
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&buf);
    }
    drop_cache(&f);
    let got = pread(&f, 0, model.len() + 100).unwrap();
    assert_eq!(got.len(), model.len(), "file size");
    let first_diff = got.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "content differs from the model at this offset"
    );
}

#[test]
fn random_writes_and_truncates_match_an_in_memory_model() {
    let m = mount();
    let p = m.path("model");
    let f = create_rw(&p);
    let mut rng = SmallRng::seed_from_u64(0xF05E);
    let mut model: Vec<u8> = Vec::new();
    for step in 0..300 {
        match rng.gen_range(0..10) {
            0 => {
                let len = rng.gen_range(0..400_000usize);
                ftruncate(&f, len as u64).unwrap();
                model.resize(len, 0);
            }
            1 => drop_cache(&f),
            _ => {
                let off = if rng.gen_bool(0.3) {
                    (rng.gen_range(0..6u64) * 65536).saturating_sub(rng.gen_range(0..8))
                } else {
                    rng.gen_range(0..350_000u64)
                };
                let len = rng.gen_range(1..70_000usize);
                let buf = pattern(step, len);
                pwrite_all(&f, &buf, off).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&buf);
            }
        }
        if step % 25 == 24 {
            let got = pread(&f, 0, model.len() + 10).unwrap();
            assert_eq!(got.len(), model.len(), "size after step {step}");
            let d = got.iter().zip(&model).position(|(a, b)| a != b);
            assert_eq!(d, None, "content differs from model after step {step}");
        }
    }
    drop_cache(&f);
    assert_eq!(lstat(&p).len(), model.len() as u64);
    assert!(read_all(&p) == model, "final content differs from model");
}

#[test]
fn read_at_or_past_eof_returns_no_bytes_and_short_read_at_tail() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"0123456789");
    let f = File::open(&p).unwrap();
    assert_eq!(pread(&f, 10, 100).unwrap(), b"");
    assert_eq!(pread(&f, 1_000_000, 100).unwrap(), b"");
    assert_eq!(pread(&f, 7, 100).unwrap(), b"789");
}

#[test]
fn sparse_write_beyond_4gib_reads_back_with_zero_holes_and_few_blocks() {
    let m = mount();
    let p = m.path("sparse");
    let f = create_rw(&p);
    let off = 5 * GIB + 3;
    let data = pattern(7, 100_000);
    pwrite_all(&f, &data, off).unwrap();
    pwrite_all(&f, b"head", 0).unwrap();
    drop_cache(&f);
    let md = lstat(&p);
    assert_eq!(md.len(), off + data.len() as u64);
    assert!(
        md.blocks() < 2048,
        "sparse file uses {} blocks of 512 bytes (>= 1 MiB)",
        md.blocks()
    );
    assert_eq!(pread(&f, off, data.len()).unwrap(), data);
    assert_eq!(pread(&f, 0, 4).unwrap(), b"head");
    assert!(
        is_zero(&pread(&f, 4, 65536).unwrap()),
        "hole after head is not zero"
    );
    assert!(
        is_zero(&pread(&f, 2 * GIB, 200_000).unwrap()),
        "hole at 2 GiB is not zero"
    );
    assert!(
        is_zero(&pread(&f, off - 70_000, 70_000).unwrap()),
        "hole before data is not zero"
    );
    assert!(
        is_zero(&pread(&f, 4 * GIB - 10, 20).unwrap()),
        "hole across 4 GiB is not zero"
    );
}

#[test]
fn o_append_writes_always_land_at_end_of_file() {
    let m = mount();
    let p = m.path("log");
    write_file(&p, b"start;");
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    let mut plain = OpenOptions::new().write(true).open(&p).unwrap();
    a.write_all(b"a1;").unwrap();
    b.write_all(b"b1;").unwrap();
    a.write_all(b"a2;").unwrap();
    plain.write_all(b"XX").unwrap(); // at offset 0, overwrites "st"
                                     // Linux: pwrite on an O_APPEND descriptor still appends.
    pwrite_all(&b, b"b2;", 0).unwrap();
    drop(a);
    drop(b);
    drop(plain);
    assert_eq!(read_all(&p), b"XXart;a1;b1;a2;b2;");
    drop_cache_path(&p);
    assert_eq!(read_all(&p), b"XXart;a1;b1;a2;b2;");
}

#[test]
fn open_with_o_trunc_empties_existing_file() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, &pattern(1, 200_000));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        assert_eq!(lstat(&p).len(), 0);
        f.write_all(b"new").unwrap();
    }
    drop_cache_path(&p);
    assert_eq!(read_all(&p), b"new");
}

#[test]
fn truncate_down_then_up_reads_zeros_not_old_data() {
    let m = mount();
    let p = m.path("f");
    let data = pattern(3, 300_000);
    write_file(&p, &data);
    drop_cache_path(&p);
    // ftruncate down inside a chunk, then extend again.
    let f = open_rw(&p);
    ftruncate(&f, 70_000).unwrap();
    ftruncate(&f, 300_000).unwrap();
    drop_cache(&f);
    let got = pread(&f, 0, 400_000).unwrap();
    assert_eq!(got.len(), 300_000);
    assert!(
        got[..70_000] == data[..70_000],
        "data below the truncation point changed"
    );
    let nz = got[70_000..].iter().position(|&b| b != 0);
    assert_eq!(
        nz.map(|i| i + 70_000),
        None,
        "stale data reappeared after truncate down/up"
    );
    // truncate(2) by path, down to a non-chunk-aligned size, then extend by writing past EOF.
    truncate(&p, 10).unwrap();
    pwrite_all(&f, b"end", 200_000).unwrap();
    drop_cache(&f);
    let got = pread(&f, 0, 400_000).unwrap();
    assert_eq!(got.len(), 200_003);
    assert_eq!(&got[..10], &data[..10]);
    assert!(
        is_zero(&got[10..200_000]),
        "stale data reappeared after truncate + write past EOF"
    );
    assert_eq!(&got[200_000..], b"end");
}

#[test]
fn truncate_up_creates_sparse_zero_filled_file() {
    let m = mount();
    let p = m.path("f");
    let f = create_rw(&p);
    ftruncate(&f, 100 * MIB).unwrap();
    drop_cache(&f);
    let md = lstat(&p);
    assert_eq!(md.len(), 100 * MIB);
    assert!(
        md.blocks() < 256,
        "a truncated-up file uses {} blocks",
        md.blocks()
    );
    assert!(is_zero(&pread(&f, 50 * MIB - 100, 300_000).unwrap()));
    assert!(is_zero(&pread(&f, 100 * MIB - 10, 100).unwrap()));
    assert_eq!(pread(&f, 100 * MIB - 10, 100).unwrap().len(), 10);
}

#[test]
fn written_data_is_counted_in_st_blocks() {
    let m = mount();
    let p = m.path("dense");
    write_file(&p, &pattern(5, MIB as usize));
    drop_cache_path(&p);
    let b = lstat(&p).blocks();
    assert!(
        b >= 2048,
        "1 MiB of data but st_blocks = {b} (512-byte units)"
    );
    assert!(b <= 2048 + 2 * 128, "1 MiB of data but st_blocks = {b}");
}

#[test]
fn mmap_shared_writes_reach_the_file() {
    let m = mount();
    let p = m.path("mapped");
    let f = create_rw(&p);
    let len = 3 * 65536 + 100;
    ftruncate(&f, len as u64).unwrap();
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let s = std::slice::from_raw_parts_mut(addr as *mut u8, len);
        s[0] = b'A';
        s[65536] = b'B';
        s[len - 1] = b'Z';
        assert_eq!(libc::msync(addr, len, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(addr, len), 0);
    }
    drop_cache(&f);
    let got = pread(&f, 0, len).unwrap();
    assert_eq!(got.len(), len);
    assert_eq!((got[0], got[65536], got[len - 1]), (b'A', b'B', b'Z'));
    assert_eq!(got.iter().filter(|&&b| b != 0).count(), 3);
}

#[test]
fn concurrent_writers_do_not_corrupt_each_other() {
    let m = mount();
    let shared = m.path("shared");
    create_rw(&shared);
    let mut handles = vec![];
    for t in 0..4u64 {
        let own = m.path(&format!("own{t}"));
        let shared = shared.clone();
        handles.push(std::thread::spawn(move || {
            let f = create_rw(&own);
            let g = OpenOptions::new().write(true).open(&shared).unwrap();
            for i in 0..32u64 {
                pwrite_all(&f, &pattern(t * 1000 + i, 40_000), i * 40_000).unwrap();
                // Disjoint 10_000-byte slots of the shared file, interleaved across threads.
                pwrite_all(
                    &g,
                    &pattern(t * 1000 + i + 500, 10_000),
                    (i * 4 + t) * 10_000,
                )
                .unwrap();
            }
            f.sync_all().unwrap();
            g.sync_all().unwrap();
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    drop_cache_path(&shared);
    let s = read_all(&shared);
    assert_eq!(s.len(), 128 * 10_000);
    for t in 0..4u64 {
        let p = m.path(&format!("own{t}"));
        drop_cache_path(&p);
        let d = read_all(&p);
        assert_eq!(d.len(), 32 * 40_000);
        for i in 0..32u64 {
            let o = (i * 40_000) as usize;
            assert!(
                d[o..o + 40_000] == pattern(t * 1000 + i, 40_000)[..],
                "own{t} block {i} corrupted"
            );
            let o = ((i * 4 + t) * 10_000) as usize;
            assert!(
                s[o..o + 10_000] == pattern(t * 1000 + i + 500, 10_000)[..],
                "shared slot {t}/{i} corrupted"
            );
        }
    }
}

#[test]
fn writes_through_a_descriptor_follow_the_inode_after_its_directory_is_renamed() {
    let m = mount();
    fs::create_dir(m.path("a")).unwrap();
    let mut f = create_rw(&m.path("a/file"));
    f.write_all(b"one ").unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    f.write_all(b"two").unwrap();
    f.sync_all().unwrap();
    drop(f);
    drop_cache_path(&m.path("b/file"));
    assert_eq!(read_all(&m.path("b/file")), b"one two");
    assert_errno!(fs::metadata(m.path("a/file")), libc::ENOENT);
}

// ---------------------------------------------------------------------------------------------
// fallocate, SEEK_DATA/SEEK_HOLE, fsync
// ---------------------------------------------------------------------------------------------

#[test]
fn fallocate_default_mode_extends_size_with_zeros_and_keeps_existing_data() {
    let m = mount();
    let p = m.path("f");
    let f = create_rw(&p);
    pwrite_all(&f, b"hello", 0).unwrap();
    fallocate(&f, 0, 0, MIB).unwrap();
    assert_eq!(lstat(&p).len(), MIB);
    drop_cache(&f);
    let got = pread(&f, 0, 2 * MIB as usize).unwrap();
    assert_eq!(got.len(), MIB as usize);
    assert_eq!(&got[..5], b"hello", "fallocate clobbered existing data");
    assert!(is_zero(&got[5..]));
    // Allocating inside the file does not change its size.
    fallocate(&f, 0, 1000, 5000).unwrap();
    assert_eq!(lstat(&p).len(), MIB);
    assert_eq!(pread(&f, 0, 5).unwrap(), b"hello");
}

#[test]
fn fallocate_punch_hole_keep_size_zeroes_range_and_releases_space() {
    let m = mount();
    let p = m.path("f");
    let data = pattern(9, (2 * MIB) as usize);
    write_file(&p, &data);
    drop_cache_path(&p);
    let blocks_before = lstat(&p).blocks();
    let used_before = m.inspect().used_bytes;
    let f = open_rw(&p);
    // An unaligned small hole.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        1000,
        4000,
    )
    .unwrap();
    // A large aligned hole: 512 KiB .. 1536 KiB.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        512 * KIB,
        MIB,
    )
    .unwrap();
    drop_cache(&f);
    assert_eq!(
        lstat(&p).len(),
        2 * MIB,
        "punch hole with KEEP_SIZE changed the size"
    );
    let got = pread(&f, 0, (3 * MIB) as usize).unwrap();
    assert_eq!(got.len(), (2 * MIB) as usize);
    let mut want = data.clone();
    want[1000..5000].fill(0);
    want[(512 * KIB) as usize..(1536 * KIB) as usize].fill(0);
    let d = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        d, None,
        "content after punching holes differs at this offset"
    );
    let blocks_after = lstat(&p).blocks();
    assert!(
        blocks_after + 1024 <= blocks_before,
        "punching 1 MiB freed too little: st_blocks {blocks_before} -> {blocks_after}"
    );
    let used_after = m.inspect().used_bytes;
    assert!(
        used_after + MIB - 2 * CHUNK_MAX <= used_before,
        "punching 1 MiB: used_bytes {used_before} -> {used_after}"
    );
}

#[test]
fn seek_data_and_seek_hole_find_data_regions_at_chunk_granularity() {
    let m = mount();
    let p = m.path("f");
    let f = create_rw(&p);
    pwrite_all(&f, &pattern(1, 4096), 0).unwrap();
    pwrite_all(&f, &pattern(2, 4096), 10 * MIB).unwrap();
    f.sync_all().unwrap();
    let size = 10 * MIB + 4096;
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA).unwrap(), 0);
    let hole = lseek(&f, 0, libc::SEEK_HOLE).unwrap();
    assert!(
        (4096..=CHUNK_MAX).contains(&hole) && hole < 10 * MIB,
        "SEEK_HOLE from 0 = {hole}"
    );
    let data = lseek(&f, MIB, libc::SEEK_DATA).unwrap();
    assert!(
        (10 * MIB - CHUNK_MAX..=10 * MIB).contains(&data),
        "SEEK_DATA from 1 MiB = {data}"
    );
    let hole = lseek(&f, 10 * MIB, libc::SEEK_HOLE).unwrap();
    assert_eq!(
        hole, size,
        "SEEK_HOLE in the last data region must give the file size"
    );
    assert_errno!(lseek(&f, size, libc::SEEK_DATA), libc::ENXIO);
    assert_errno!(lseek(&f, size + 100, libc::SEEK_HOLE), libc::ENXIO);
    // Extending with a hole: data past the last data region does not exist.
    ftruncate(&f, 20 * MIB).unwrap();
    assert_errno!(lseek(&f, 11 * MIB, libc::SEEK_DATA), libc::ENXIO);
    let hole = lseek(&f, 11 * MIB, libc::SEEK_HOLE).unwrap();
    assert!(
        (11 * MIB..=20 * MIB).contains(&hole),
        "SEEK_HOLE in trailing hole = {hole}"
    );
}

#[test]
fn seek_hole_on_dense_file_returns_size_and_seek_data_on_empty_file_is_enxio() {
    let m = mount();
    let p = m.path("dense");
    write_file(&p, &pattern(4, 300_000));
    let f = File::open(&p).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE).unwrap(), 300_000);
    assert_eq!(lseek(&f, 123_456, libc::SEEK_DATA).unwrap(), 123_456);
    let e = m.path("empty");
    write_file(&e, b"");
    let g = File::open(&e).unwrap();
    assert_errno!(lseek(&g, 0, libc::SEEK_DATA), libc::ENXIO);
}

#[test]
fn fsync_and_fdatasync_succeed_on_files_and_directories() {
    let m = mount();
    fs::create_dir(m.path("d")).unwrap();
    let mut f = create_rw(&m.path("d/f"));
    f.write_all(&pattern(1, 100_000)).unwrap();
    f.sync_data().unwrap();
    f.write_all(b"more").unwrap();
    f.sync_all().unwrap();
    let d = File::open(m.path("d")).unwrap();
    d.sync_all().unwrap();
    d.sync_data().unwrap();
    File::open(m.mnt()).unwrap().sync_all().unwrap();
    drop(f);
    drop_cache_path(&m.path("d/f"));
    assert_eq!(lstat(&m.path("d/f")).len(), 100_004);
}

// ---------------------------------------------------------------------------------------------
// Unlink, links, symlinks, fifos, directories
// ---------------------------------------------------------------------------------------------

#[test]
fn unlinked_open_file_keeps_its_data_until_closed_then_releases_space() {
    let m = mount();
    let p = m.path("tmpfile");
    let data = pattern(11, (4 * MIB) as usize);
    let mut f = create_rw(&p);
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let used_with_file = m.inspect().used_bytes;
    assert!(
        used_with_file >= 4 * MIB,
        "used_bytes {used_with_file} after writing 4 MiB"
    );
    fs::remove_file(&p).unwrap();
    assert_errno!(fs::metadata(&p), libc::ENOENT);
    assert!(!fs::read_dir(m.mnt())
        .unwrap()
        .any(|e| e.unwrap().file_name() == "tmpfile"));
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop_cache(&f);
    assert!(
        pread(&f, 0, data.len()).unwrap() == data,
        "unlinked open file lost its data"
    );
    // It can still grow.
    pwrite_all(&f, b"tail", data.len() as u64).unwrap();
    drop_cache(&f);
    assert_eq!(pread(&f, data.len() as u64, 10).unwrap(), b"tail");
    // A new file of the same name is a different file.
    write_file(&p, b"other");
    assert_eq!(pread(&f, 0, 5).unwrap(), &data[..5]);
    assert_eq!(read_all(&p), b"other");
    drop(f);
    let released = eventually(Duration::from_secs(10), || m.inspect().used_bytes < MIB);
    assert!(
        released,
        "space not released after closing the unlinked file: {:?}",
        m.inspect()
    );
}

#[test]
fn hard_link_shares_inode_data_and_counts_links() {
    let m = mount();
    let a = m.path("a");
    fs::create_dir(m.path("d")).unwrap();
    let b = m.path("d/b");
    write_file(&a, b"shared");
    fs::hard_link(&a, &b).unwrap();
    let (ma, mb) = (lstat(&a), lstat(&b));
    assert_eq!(ma.ino(), mb.ino());
    assert_eq!(ma.nlink(), 2);
    assert_eq!(mb.nlink(), 2);
    OpenOptions::new()
        .append(true)
        .open(&b)
        .unwrap()
        .write_all(b"+more")
        .unwrap();
    assert_eq!(read_all(&a), b"shared+more");
    fs::remove_file(&a).unwrap();
    assert_eq!(lstat(&b).nlink(), 1);
    drop_cache_path(&b);
    assert_eq!(read_all(&b), b"shared+more");
    fs::hard_link(&b, m.path("c")).unwrap();
    fs::hard_link(&b, m.path("e")).unwrap();
    assert_eq!(lstat(&b).nlink(), 3);
}

#[test]
fn hard_link_errors_match_ext4() {
    let m = mount();
    fs::create_dir(m.path("dir")).unwrap();
    write_file(&m.path("f"), b"x");
    write_file(&m.path("g"), b"y");
    assert_errno!(fs::hard_link(m.path("dir"), m.path("dirlink")), libc::EPERM);
    assert_errno!(fs::hard_link(m.path("f"), m.path("g")), libc::EEXIST);
    assert_errno!(fs::hard_link(m.path("missing"), m.path("h")), libc::ENOENT);
    assert_errno!(fs::hard_link(m.path("f"), m.path("nodir/h")), libc::ENOENT);
    assert_eq!(lstat(&m.path("f")).nlink(), 1);
    assert_eq!(read_all(&m.path("g")), b"y");
}

#[test]
fn symlink_readlink_lstat_and_path_resolution() {
    let m = mount();
    fs::create_dir(m.path("dir")).unwrap();
    write_file(&m.path("dir/target"), b"content");
    symlink("dir/target", m.path("rel")).unwrap();
    symlink(m.path("dir"), m.path("abs")).unwrap();
    let long_target = "x".repeat(1000) + "/y";
    symlink(&long_target, m.path("long")).unwrap();
    symlink("nowhere", m.path("dangling")).unwrap();
    symlink("loop2", m.path("loop1")).unwrap();
    symlink("loop1", m.path("loop2")).unwrap();

    assert_eq!(
        fs::read_link(m.path("rel")).unwrap(),
        Path::new("dir/target")
    );
    assert_eq!(
        fs::read_link(m.path("long")).unwrap(),
        Path::new(&long_target)
    );
    let md = lstat(&m.path("rel"));
    assert!(md.file_type().is_symlink());
    assert_eq!(md.len(), "dir/target".len() as u64);
    assert_eq!(md.mode() & 0o777, 0o777);
    assert_eq!(lstat(&m.path("long")).len(), long_target.len() as u64);
    assert_eq!(read_all(&m.path("rel")), b"content");
    assert_eq!(read_all(&m.path("abs/target")), b"content");
    assert!(fs::metadata(m.path("abs")).unwrap().is_dir());
    assert_errno!(fs::metadata(m.path("dangling")), libc::ENOENT);
    assert_errno!(fs::metadata(m.path("loop1")), libc::ELOOP);
    assert_errno!(
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(m.path("rel")),
        libc::ELOOP
    );
    assert_errno!(fs::read_link(m.path("dir/target")), libc::EINVAL);
    assert_errno!(symlink("x", m.path("rel")), libc::EEXIST);
    // Writing through a dangling symlink creates its target.
    write_file(&m.path("dangling"), b"made");
    assert_eq!(read_all(&m.path("nowhere")), b"made");
}

#[test]
fn mkfifo_creates_a_fifo_that_passes_data() {
    let m = mount();
    let p = m.path("pipe");
    mkfifo(&p, 0o640).unwrap();
    let md = lstat(&p);
    assert!(md.file_type().is_fifo(), "mode {:o}", md.mode());
    assert_eq!(md.mode() & 0o7777, 0o640 & !current_umask());
    assert_eq!(md.len(), 0);
    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.write_all(b"through the pipe").unwrap();
    let mut buf = [0u8; 16];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"through the pipe");
    assert_errno!(mkfifo(&p, 0o600), libc::EEXIST);
    let de = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == "pipe")
        .unwrap();
    assert!(de.file_type().unwrap().is_fifo(), "readdir type of a fifo");
}

fn current_umask() -> u32 {
    // Read the umask without changing it (Linux >= 4.7).
    let s = fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
}

#[test]
fn directories_mkdir_rmdir_and_nlink_follow_ext4() {
    let m = mount();
    let d = m.path("d");
    let root_links = lstat(m.mnt()).nlink();
    fs::create_dir(&d).unwrap();
    assert_eq!(lstat(&d).nlink(), 2);
    assert_eq!(lstat(m.mnt()).nlink(), root_links + 1);
    fs::create_dir(d.join("s1")).unwrap();
    fs::create_dir(d.join("s2")).unwrap();
    write_file(&d.join("file"), b"");
    assert_eq!(lstat(&d).nlink(), 4, "nlink = 2 + subdirectories");
    assert_errno!(fs::create_dir(&d), libc::EEXIST);
    assert_errno!(fs::create_dir(d.join("file")), libc::EEXIST);
    assert_errno!(fs::create_dir(m.path("nope/x")), libc::ENOENT);
    assert_errno!(fs::create_dir(d.join("file/x")), libc::ENOTDIR);
    assert_errno!(fs::remove_dir(&d), libc::ENOTEMPTY);
    assert_errno!(fs::remove_dir(d.join("file")), libc::ENOTDIR);
    assert_errno!(fs::remove_file(d.join("s1")), libc::EISDIR);
    fs::remove_dir(d.join("s1")).unwrap();
    assert_eq!(lstat(&d).nlink(), 3);
    fs::remove_dir(d.join("s2")).unwrap();
    fs::remove_file(d.join("file")).unwrap();
    assert_eq!(lstat(&d).nlink(), 2);
    assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
    fs::remove_dir(&d).unwrap();
    assert_errno!(fs::metadata(&d), libc::ENOENT);
    assert_eq!(lstat(m.mnt()).nlink(), root_links);
    // A fresh directory with the old name is empty.
    fs::create_dir(&d).unwrap();
    assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
}

#[test]
fn mkdir_applies_mode_and_umask() {
    let m = mount();
    fs::DirBuilder::new()
        .mode(0o700)
        .create(m.path("private"))
        .unwrap();
    assert_eq!(
        lstat(&m.path("private")).mode() & 0o7777,
        0o700 & !current_umask()
    );
    let md = lstat(&m.path("private"));
    assert!(md.is_dir());
    assert_eq!((md.uid(), md.gid()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Rename
// ---------------------------------------------------------------------------------------------

#[test]
fn rename_moves_file_between_directories() {
    let m = mount();
    fs::create_dir(m.path("a")).unwrap();
    fs::create_dir(m.path("b")).unwrap();
    write_file(&m.path("a/f"), b"payload");
    let ino = lstat(&m.path("a/f")).ino();
    fs::rename(m.path("a/f"), m.path("b/g")).unwrap();
    assert_errno!(fs::metadata(m.path("a/f")), libc::ENOENT);
    assert_eq!(lstat(&m.path("b/g")).ino(), ino);
    drop_cache_path(&m.path("b/g"));
    assert_eq!(read_all(&m.path("b/g")), b"payload");
    let names: Vec<_> = fs::read_dir(m.path("b"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["g"]);
    assert_eq!(fs::read_dir(m.path("a")).unwrap().count(), 0);
}

#[test]
fn rename_over_existing_file_replaces_it_and_old_target_stays_readable_while_open() {
    let m = mount();
    write_file(&m.path("src"), b"new contents");
    write_file(&m.path("dst"), &pattern(2, 300_000));
    let old = File::open(m.path("dst")).unwrap();
    let src_ino = lstat(&m.path("src")).ino();
    fs::rename(m.path("src"), m.path("dst")).unwrap();
    assert_errno!(fs::metadata(m.path("src")), libc::ENOENT);
    assert_eq!(lstat(&m.path("dst")).ino(), src_ino);
    assert_eq!(read_all(&m.path("dst")), b"new contents");
    assert_eq!(old.metadata().unwrap().nlink(), 0);
    drop_cache(&old);
    assert!(
        pread(&old, 0, 300_000).unwrap() == pattern(2, 300_000),
        "replaced file lost data while open"
    );
    let names: BTreeSet<_> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn rename_over_hard_link_decrements_link_count_of_replaced_inode() {
    let m = mount();
    write_file(&m.path("a"), b"a");
    fs::hard_link(m.path("a"), m.path("a2")).unwrap();
    write_file(&m.path("b"), b"b");
    fs::rename(m.path("b"), m.path("a2")).unwrap();
    assert_eq!(lstat(&m.path("a")).nlink(), 1);
    assert_eq!(read_all(&m.path("a")), b"a");
    assert_eq!(read_all(&m.path("a2")), b"b");
}

#[test]
fn rename_directory_moves_subtree_and_updates_parent_link_counts() {
    let m = mount();
    fs::create_dir_all(m.path("p1/d/sub")).unwrap();
    fs::create_dir(m.path("p2")).unwrap();
    write_file(&m.path("p1/d/sub/f"), b"deep");
    assert_eq!(lstat(&m.path("p1")).nlink(), 3);
    assert_eq!(lstat(&m.path("p2")).nlink(), 2);
    fs::rename(m.path("p1/d"), m.path("p2/d2")).unwrap();
    assert_eq!(lstat(&m.path("p1")).nlink(), 2);
    assert_eq!(lstat(&m.path("p2")).nlink(), 3);
    assert_eq!(read_all(&m.path("p2/d2/sub/f")), b"deep");
    // ".." of the moved directory now points at the new parent.
    assert_eq!(lstat(&m.path("p2/d2/..")).ino(), lstat(&m.path("p2")).ino());
    assert_errno!(fs::metadata(m.path("p1/d")), libc::ENOENT);
    assert_errno!(
        fs::rename(m.path("p2"), m.path("p2/d2/sub/inside")),
        libc::EINVAL
    );
}

#[test]
fn rename_directory_over_empty_directory_succeeds_and_over_nonempty_fails_with_enotempty() {
    let m = mount();
    fs::create_dir(m.path("src")).unwrap();
    write_file(&m.path("src/f"), b"1");
    fs::create_dir(m.path("empty")).unwrap();
    fs::create_dir(m.path("full")).unwrap();
    write_file(&m.path("full/g"), b"2");
    assert_errno!(fs::rename(m.path("src"), m.path("full")), libc::ENOTEMPTY);
    assert_eq!(read_all(&m.path("src/f")), b"1");
    assert_eq!(read_all(&m.path("full/g")), b"2");
    let root_links = lstat(m.mnt()).nlink();
    fs::rename(m.path("src"), m.path("empty")).unwrap();
    assert_eq!(read_all(&m.path("empty/f")), b"1");
    assert_errno!(fs::metadata(m.path("src")), libc::ENOENT);
    assert_eq!(
        lstat(m.mnt()).nlink(),
        root_links - 1,
        "root lost one subdirectory"
    );
}

#[test]
fn rename_file_over_directory_fails_with_eisdir_and_directory_over_file_with_enotdir() {
    let m = mount();
    write_file(&m.path("f"), b"f");
    fs::create_dir(m.path("d")).unwrap();
    assert_errno!(fs::rename(m.path("f"), m.path("d")), libc::EISDIR);
    assert_errno!(fs::rename(m.path("d"), m.path("f")), libc::ENOTDIR);
    assert_errno!(fs::rename(m.path("missing"), m.path("x")), libc::ENOENT);
    assert_eq!(read_all(&m.path("f")), b"f");
    assert!(lstat(&m.path("d")).is_dir());
}

#[test]
fn rename_noreplace_fails_with_eexist_when_target_exists() {
    let m = mount();
    write_file(&m.path("a"), b"a");
    write_file(&m.path("b"), b"b");
    assert_errno!(
        rename2(&m.path("a"), &m.path("b"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert_eq!(read_all(&m.path("a")), b"a");
    assert_eq!(read_all(&m.path("b")), b"b");
    rename2(&m.path("a"), &m.path("c"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(read_all(&m.path("c")), b"a");
    assert_errno!(fs::metadata(m.path("a")), libc::ENOENT);
}

#[test]
fn rename_exchange_swaps_two_files_atomically() {
    let m = mount();
    fs::create_dir(m.path("d")).unwrap();
    write_file(&m.path("a"), b"AAAA");
    write_file(&m.path("d/b"), b"BB");
    let (ia, ib) = (lstat(&m.path("a")).ino(), lstat(&m.path("d/b")).ino());
    rename2(&m.path("a"), &m.path("d/b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(read_all(&m.path("a")), b"BB");
    assert_eq!(read_all(&m.path("d/b")), b"AAAA");
    assert_eq!(lstat(&m.path("a")).ino(), ib);
    assert_eq!(lstat(&m.path("d/b")).ino(), ia);
}

#[test]
fn rename_exchange_swaps_file_and_directory_across_parents() {
    let m = mount();
    fs::create_dir(m.path("p1")).unwrap();
    fs::create_dir(m.path("p2")).unwrap();
    fs::create_dir(m.path("p1/dir")).unwrap();
    write_file(&m.path("p1/dir/inner"), b"in");
    write_file(&m.path("p2/file"), b"file");
    rename2(&m.path("p1/dir"), &m.path("p2/file"), libc::RENAME_EXCHANGE).unwrap();
    assert!(lstat(&m.path("p1/dir")).is_file());
    assert_eq!(read_all(&m.path("p1/dir")), b"file");
    assert!(lstat(&m.path("p2/file")).is_dir());
    assert_eq!(read_all(&m.path("p2/file/inner")), b"in");
    assert_eq!(lstat(&m.path("p1")).nlink(), 2, "p1 lost its subdirectory");
    assert_eq!(lstat(&m.path("p2")).nlink(), 3, "p2 gained a subdirectory");
    assert_eq!(
        lstat(&m.path("p2/file/..")).ino(),
        lstat(&m.path("p2")).ino()
    );
}

#[test]
fn rename_exchange_with_missing_target_fails_with_enoent() {
    let m = mount();
    write_file(&m.path("a"), b"a");
    assert_errno!(
        rename2(&m.path("a"), &m.path("b"), libc::RENAME_EXCHANGE),
        libc::ENOENT
    );
    assert_eq!(read_all(&m.path("a")), b"a");
    assert_errno!(fs::metadata(m.path("b")), libc::ENOENT);
}

// ---------------------------------------------------------------------------------------------
// Extended attributes
// ---------------------------------------------------------------------------------------------

#[test]
fn xattr_set_get_list_remove_roundtrip() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"");
    setxattr(&p, "user.one", b"1", 0).unwrap();
    setxattr(&p, "user.two", b"second value", 0).unwrap();
    setxattr(&p, "user.empty", b"", 0).unwrap();
    let bin: Vec<u8> = (0..=255u8).collect();
    setxattr(&p, "user.bin", &bin, 0).unwrap();
    assert_eq!(getxattr(&p, "user.one").unwrap(), b"1");
    assert_eq!(getxattr(&p, "user.two").unwrap(), b"second value");
    assert_eq!(getxattr(&p, "user.empty").unwrap(), b"");
    assert_eq!(getxattr(&p, "user.bin").unwrap(), bin);
    assert_eq!(getxattr_len(&p, "user.two").unwrap(), 12);
    assert_eq!(
        listxattr(&p).unwrap(),
        vec!["user.bin", "user.empty", "user.one", "user.two"]
    );
    assert_eq!(
        listxattr_len(&p).unwrap(),
        "user.bin\0user.empty\0user.one\0user.two\0".len(),
        "listxattr size query"
    );
    // Overwrite with a shorter value.
    setxattr(&p, "user.two", b"2", 0).unwrap();
    assert_eq!(getxattr(&p, "user.two").unwrap(), b"2");
    removexattr(&p, "user.one").unwrap();
    assert_errno!(getxattr(&p, "user.one"), libc::ENODATA);
    assert_eq!(
        listxattr(&p).unwrap(),
        vec!["user.bin", "user.empty", "user.two"]
    );
    // A 4000-byte value (fits an ext4 block).
    let big = pattern(3, 4000);
    setxattr(&p, "user.big", &big, 0).unwrap();
    assert_eq!(getxattr(&p, "user.big").unwrap(), big);
}

#[test]
fn xattr_create_flag_on_existing_attribute_fails_with_eexist() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"");
    setxattr(&p, "user.k", b"v1", libc::XATTR_CREATE).unwrap();
    assert_errno!(
        setxattr(&p, "user.k", b"v2", libc::XATTR_CREATE),
        libc::EEXIST
    );
    assert_eq!(getxattr(&p, "user.k").unwrap(), b"v1");
}

#[test]
fn xattr_replace_flag_on_missing_attribute_fails_with_enodata() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"");
    assert_errno!(
        setxattr(&p, "user.k", b"v", libc::XATTR_REPLACE),
        libc::ENODATA
    );
    assert_errno!(getxattr(&p, "user.k"), libc::ENODATA);
    setxattr(&p, "user.k", b"v", 0).unwrap();
    setxattr(&p, "user.k", b"w", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.k").unwrap(), b"w");
}

#[test]
fn xattr_get_or_remove_missing_attribute_fails_with_enodata() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"");
    assert_errno!(getxattr(&p, "user.nothing"), libc::ENODATA);
    assert_errno!(getxattr_len(&p, "user.nothing"), libc::ENODATA);
    assert_errno!(removexattr(&p, "user.nothing"), libc::ENODATA);
    assert_eq!(listxattr(&p).unwrap(), Vec::<String>::new());
    assert_eq!(listxattr_len(&p).unwrap(), 0);
}

#[test]
fn xattr_too_small_buffer_fails_with_erange() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"");
    setxattr(&p, "user.k", b"0123456789", 0).unwrap();
    setxattr(&p, "user.other", b"x", 0).unwrap();
    assert_errno!(getxattr_buf(&p, "user.k", 5), libc::ERANGE);
    assert_eq!(getxattr_buf(&p, "user.k", 10).unwrap(), b"0123456789");
    assert_errno!(listxattr_buf(&p, 5), libc::ERANGE);
    let n = listxattr_len(&p).unwrap();
    assert_eq!(listxattr_buf(&p, n).unwrap().len(), n);
}

#[test]
fn xattrs_work_on_directories_and_are_dropped_with_the_file() {
    let m = mount();
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    setxattr(&d, "user.dir", b"yes", 0).unwrap();
    assert_eq!(getxattr(&d, "user.dir").unwrap(), b"yes");
    let p = m.path("f");
    write_file(&p, b"");
    setxattr(&p, "user.old", b"1", 0).unwrap();
    fs::remove_file(&p).unwrap();
    write_file(&p, b"");
    assert_eq!(
        listxattr(&p).unwrap(),
        Vec::<String>::new(),
        "new file inherited xattrs of a deleted one"
    );
    // Symlinks cannot carry user.* attributes (ext4: EPERM); set via the link follows it.
    symlink("f", m.path("ln")).unwrap();
    assert_errno!(lsetxattr(&m.path("ln"), "user.x", b"1", 0), libc::EPERM);
    setxattr(&m.path("ln"), "user.via", b"link", 0).unwrap();
    assert_eq!(getxattr(&p, "user.via").unwrap(), b"link");
}

#[test]
fn xattr_changes_update_ctime_but_not_mtime() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"x");
    let (_, mt0, ct0) = times(&p);
    tick();
    setxattr(&p, "user.a", b"1", 0).unwrap();
    let (_, mt1, ct1) = times(&p);
    assert!(ct1 > ct0, "setxattr did not update ctime");
    assert_eq!(mt1, mt0, "setxattr changed mtime");
    tick();
    removexattr(&p, "user.a").unwrap();
    let (_, mt2, ct2) = times(&p);
    assert!(ct2 > ct1, "removexattr did not update ctime");
    assert_eq!(mt2, mt0);
}

// ---------------------------------------------------------------------------------------------
// Attributes and timestamps
// ---------------------------------------------------------------------------------------------

#[test]
fn chmod_changes_mode_and_updates_ctime_only() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"x");
    let (at0, mt0, ct0) = times(&p);
    tick();
    chmod(&p, 0o4751).unwrap();
    let md = lstat(&p);
    assert_eq!(md.mode() & 0o7777, 0o4751);
    assert!(md.is_file());
    let (at1, mt1, ct1) = times(&p);
    assert!(ct1 > ct0, "chmod did not update ctime");
    assert_eq!(mt1, mt0, "chmod changed mtime");
    assert_eq!(at1, at0, "chmod changed atime");
    fs::create_dir(m.path("d")).unwrap();
    chmod(&m.path("d"), 0o1777).unwrap();
    assert_eq!(lstat(&m.path("d")).mode() & 0o7777, 0o1777);
    assert!(lstat(&m.path("d")).is_dir());
}

#[test]
fn chown_changes_owner_and_clears_setuid_and_setgid_bits() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"x");
    chown(&p, 1000, 2000).unwrap();
    let md = lstat(&p);
    assert_eq!((md.uid(), md.gid()), (1000, 2000));
    chown(&p, u32::MAX, 3000).unwrap(); // -1 keeps the owner
    let md = lstat(&p);
    assert_eq!((md.uid(), md.gid()), (1000, 3000));
    chmod(&p, 0o6755).unwrap();
    let (_, _, ct0) = times(&p);
    tick();
    chown(&p, 0, 0).unwrap();
    let md = lstat(&p);
    assert_eq!((md.uid(), md.gid()), (0, 0));
    assert_eq!(
        md.mode() & 0o7777,
        0o755,
        "chown of a regular file must clear set-user-ID and set-group-ID"
    );
    assert!(times(&p).2 > ct0, "chown did not update ctime");
    symlink("f", m.path("ln")).unwrap();
    lchown(&m.path("ln"), 7, 8).unwrap();
    assert_eq!(
        (lstat(&m.path("ln")).uid(), lstat(&m.path("ln")).gid()),
        (7, 8)
    );
    assert_eq!(lstat(&p).uid(), 0, "lchown followed the symlink");
}

#[test]
fn write_updates_mtime_and_ctime() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"x");
    let (_, mt0, ct0) = times(&p);
    tick();
    let f = open_rw(&p);
    pwrite_all(&f, b"yz", 1).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (_, mt1, ct1) = times(&p);
    assert!(mt1 > mt0, "write did not update mtime");
    assert!(ct1 > ct0, "write did not update ctime");
    assert!(ct1 >= mt1);
}

#[test]
fn truncate_updates_mtime_and_ctime() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"some data");
    let (_, mt0, ct0) = times(&p);
    tick();
    truncate(&p, 2).unwrap();
    let (_, mt1, ct1) = times(&p);
    assert!(
        mt1 > mt0 && ct1 > ct0,
        "truncate did not update mtime/ctime"
    );
}

/// `utimensat` takes any `tv_sec`: the extremes must get an answer (ext4 clamps them to its
/// range and succeeds), never a panicking server that leaves the caller in state D and a
/// mount that no longer stops.
#[test]
fn utimensat_with_the_extremes_of_time_answers_and_the_mount_still_stops() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"x");
    for (a, b) in [
        (i64::MIN, i64::MIN),
        (i64::MAX, i64::MAX),
        (i64::MIN, i64::MAX),
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let q = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(utimensat(&q, ts(a, 999_999_999), ts(b, 0), 0));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("utimensat({a}, {b}) got no answer in 20 s"));
        if let Err(e) = &r {
            assert!(
                matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOVERFLOW)),
                "utimensat({a}, {b}): {e}"
            );
        }
        let md = lstat(&p);
        if r.is_ok() && a == b {
            // Stored as given (within the kernel's own clamping to its time range).
            assert_eq!(md.mtime().signum(), b.signum(), "mtime {}", md.mtime());
        }
        assert_eq!(fs::read(&p).unwrap(), b"x");
    }
    m.stop();
}

#[test]
fn utimensat_sets_explicit_times_with_nanoseconds_and_honours_omit_and_now() {
    let m = mount();
    let p = m.path("f");
    write_file(&p, b"x");
    utimensat(
        &p,
        ts(1_000_000_000, 123_456_789),
        ts(1_500_000_000, 987_654_321),
        0,
    )
    .unwrap();
    let md = lstat(&p);
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
    // Dates before 1970 and after 2038 survive too.
    utimensat(&p, ts(-86_400, 5), ts(4_000_000_000, 6), 0).unwrap();
    let md = lstat(&p);
    assert_eq!((md.atime(), md.atime_nsec()), (-86_400, 5));
    assert_eq!((md.mtime(), md.mtime_nsec()), (4_000_000_000, 6));
    let (_, _, ct0) = times(&p);
    tick();
    utimensat(&p, ts(0, libc::UTIME_OMIT), ts(1_234, 0), 0).unwrap();
    let md = lstat(&p);
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        (-86_400, 5),
        "UTIME_OMIT changed atime"
    );
    assert_eq!(md.mtime(), 1_234);
    assert!(times(&p).2 > ct0, "utimensat did not update ctime");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    utimensat(&p, ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW), 0).unwrap();
    let md = lstat(&p);
    assert!(
        md.atime() >= before - 1 && md.mtime() >= before - 1,
        "UTIME_NOW did not set the current time"
    );
    // On a symlink itself.
    symlink("f", m.path("ln")).unwrap();
    utimensat(
        &m.path("ln"),
        ts(10, 0),
        ts(20, 0),
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    assert_eq!(lstat(&m.path("ln")).mtime(), 20);
    assert!(
        lstat(&p).mtime() >= before - 1,
        "AT_SYMLINK_NOFOLLOW changed the target"
    );
}

#[test]
fn rename_updates_ctime_of_renamed_inode_and_mtime_of_both_parents() {
    let m = mount();
    fs::create_dir(m.path("a")).unwrap();
    fs::create_dir(m.path("b")).unwrap();
    write_file(&m.path("a/f"), b"x");
    let (_, fmt0, fct0) = times(&m.path("a/f"));
    let (_, amt0, act0) = times(&m.path("a"));
    let (_, bmt0, bct0) = times(&m.path("b"));
    tick();
    fs::rename(m.path("a/f"), m.path("b/f")).unwrap();
    let (_, fmt1, fct1) = times(&m.path("b/f"));
    let (_, amt1, act1) = times(&m.path("a"));
    let (_, bmt1, bct1) = times(&m.path("b"));
    assert!(
        fct1 > fct0,
        "rename did not update ctime of the renamed file"
    );
    assert_eq!(fmt1, fmt0, "rename changed mtime of the renamed file");
    assert!(
        amt1 > amt0 && act1 > act0,
        "rename did not update mtime/ctime of the source directory"
    );
    assert!(
        bmt1 > bmt0 && bct1 > bct0,
        "rename did not update mtime/ctime of the target directory"
    );
}

#[test]
fn create_and_unlink_update_parent_mtime_and_ctime_and_unlink_updates_inode_ctime() {
    let m = mount();
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    let (_, mt0, ct0) = times(&d);
    tick();
    write_file(&d.join("f"), b"x");
    let (_, mt1, ct1) = times(&d);
    assert!(
        mt1 > mt0 && ct1 > ct0,
        "create did not update the directory's mtime/ctime"
    );
    fs::hard_link(d.join("f"), m.path("keep")).unwrap();
    let (_, _, fct) = times(&m.path("keep"));
    tick();
    fs::remove_file(d.join("f")).unwrap();
    let (_, mt2, ct2) = times(&d);
    assert!(
        mt2 > mt1 && ct2 > ct1,
        "unlink did not update the directory's mtime/ctime"
    );
    assert!(
        times(&m.path("keep")).2 > fct,
        "unlink did not update ctime of the inode (nlink changed)"
    );
    tick();
    fs::create_dir(d.join("sub")).unwrap();
    let (_, mt3, _) = times(&d);
    assert!(mt3 > mt2, "mkdir did not update the parent's mtime");
    tick();
    fs::remove_dir(d.join("sub")).unwrap();
    assert!(times(&d).1 > mt3, "rmdir did not update the parent's mtime");
}

#[test]
fn link_updates_ctime_of_the_inode() {
    let m = mount();
    write_file(&m.path("f"), b"x");
    let (_, mt0, ct0) = times(&m.path("f"));
    tick();
    fs::hard_link(m.path("f"), m.path("g")).unwrap();
    let (_, mt1, ct1) = times(&m.path("f"));
    assert!(ct1 > ct0, "link did not update ctime");
    assert_eq!(mt1, mt0, "link changed mtime");
}

#[test]
fn new_files_get_creator_ids_and_requested_mode() {
    let m = mount();
    let p = m.path("f");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .open(&p)
        .unwrap();
    drop(f);
    let md = lstat(&p);
    assert_eq!(md.mode() & 0o7777, 0o640 & !current_umask());
    assert_eq!((md.uid(), md.gid()), (0, 0));
    assert_eq!(md.nlink(), 1);
    assert_eq!(md.len(), 0);
}

// ---------------------------------------------------------------------------------------------
// Permissions (kernel-checked, as an unprivileged user)
// ---------------------------------------------------------------------------------------------

fn perm_mount() -> Mount {
    let m = Mount::start(Opts::new().allow_other());
    chmod(m.mnt(), 0o755).unwrap();
    m
}

fn open_as_nobody(p: &Path, flags: i32, mode: u32) -> i32 {
    let c = cstr(p);
    run_as(NOBODY, NOGROUP, || unsafe {
        let fd = libc::open(c.as_ptr(), flags, mode);
        let e = ret_errno(fd);
        if fd >= 0 {
            libc::close(fd);
        }
        e
    })
}

#[test]
fn permissions_deny_reading_a_private_file_to_other_users() {
    let m = perm_mount();
    let p = m.path("secret");
    write_file(&p, b"secret");
    chmod(&p, 0o600).unwrap();
    assert_eq!(errname(open_as_nobody(&p, libc::O_RDONLY, 0)), "EACCES");
    chmod(&p, 0o644).unwrap();
    assert_eq!(errname(open_as_nobody(&p, libc::O_RDONLY, 0)), "OK");
    assert_eq!(errname(open_as_nobody(&p, libc::O_WRONLY, 0)), "EACCES");
    assert_eq!(
        errname(open_as_nobody(&p, libc::O_RDWR | libc::O_TRUNC, 0)),
        "EACCES"
    );
    assert_eq!(read_all(&p), b"secret");
}

#[test]
fn permissions_deny_creating_in_a_directory_without_write_access() {
    let m = perm_mount();
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o755).unwrap();
    let f = d.join("new");
    assert_eq!(
        errname(open_as_nobody(&f, libc::O_CREAT | libc::O_WRONLY, 0o644)),
        "EACCES"
    );
    assert_errno!(fs::metadata(&f), libc::ENOENT);
    let c = cstr(d.join("sub"));
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        ret_errno(libc::mkdir(c.as_ptr(), 0o755))
    });
    assert_eq!(errname(r), "EACCES");
    // Without search permission, nothing inside can be reached.
    write_file(&d.join("inside"), b"x");
    chmod(&d, 0o700).unwrap();
    let c = cstr(d.join("inside"));
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        ret_errno(libc::stat(c.as_ptr(), &mut st))
    });
    assert_eq!(errname(r), "EACCES");
}

#[test]
fn files_created_by_another_user_are_owned_by_that_user() {
    let m = perm_mount();
    let d = m.path("shared");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o777).unwrap();
    let f = d.join("mine");
    assert_eq!(
        errname(open_as_nobody(&f, libc::O_CREAT | libc::O_WRONLY, 0o600)),
        "OK"
    );
    let md = lstat(&f);
    assert_eq!((md.uid(), md.gid()), (NOBODY, NOGROUP));
    let c = cstr(d.join("subdir"));
    assert_eq!(
        run_as(NOBODY, NOGROUP, || unsafe {
            ret_errno(libc::mkdir(c.as_ptr(), 0o700))
        }),
        0
    );
    let md = lstat(&d.join("subdir"));
    assert_eq!((md.uid(), md.gid()), (NOBODY, NOGROUP));
}

#[test]
fn sticky_directory_prevents_deleting_other_users_files() {
    let m = perm_mount();
    let d = m.path("tmp");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o1777).unwrap();
    write_file(&d.join("roots"), b"x");
    let c = cstr(d.join("roots"));
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        ret_errno(libc::unlink(c.as_ptr()))
    });
    assert_eq!(errname(r), "EPERM");
    assert!(lstat(&d.join("roots")).is_file());
    // Own files can be deleted.
    let own = cstr(d.join("own"));
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        let fd = libc::open(own.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
        if fd < 0 {
            return ret_errno(fd);
        }
        libc::close(fd);
        ret_errno(libc::unlink(own.as_ptr()))
    });
    assert_eq!(errname(r), "OK");
}

#[test]
fn only_the_owner_may_chmod_and_only_root_may_chown() {
    let m = perm_mount();
    let p = m.path("f");
    write_file(&p, b"x");
    chmod(&p, 0o666).unwrap();
    let c = cstr(&p);
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        ret_errno(libc::chmod(c.as_ptr(), 0o777))
    });
    assert_eq!(errname(r), "EPERM");
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        ret_errno(libc::chown(c.as_ptr(), NOBODY, NOGROUP))
    });
    assert_eq!(errname(r), "EPERM");
    assert_eq!(lstat(&p).mode() & 0o7777, 0o666);
    assert_eq!(lstat(&p).uid(), 0);
    // The owner can chmod its own file.
    chown(&p, NOBODY, NOGROUP).unwrap();
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        ret_errno(libc::chmod(c.as_ptr(), 0o600))
    });
    assert_eq!(errname(r), "OK");
    assert_eq!(lstat(&p).mode() & 0o7777, 0o600);
}

#[test]
fn write_by_unprivileged_user_clears_setuid_bit() {
    let m = perm_mount();
    let p = m.path("suid");
    write_file(&p, b"#!/bin/sh\n");
    chmod(&p, 0o4777).unwrap();
    let c = cstr(&p);
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_APPEND);
        if fd < 0 {
            return ret_errno(fd);
        }
        let w = libc::write(fd, b"x".as_ptr() as *const _, 1);
        let e = if w < 0 { ret_errno(-1) } else { 0 };
        libc::close(fd);
        e
    });
    assert_eq!(errname(r), "OK");
    assert_eq!(
        lstat(&p).mode() & 0o7777,
        0o777,
        "write by another user must clear set-user-ID"
    );
}

#[test]
fn umask_of_the_creating_process_is_applied() {
    let m = perm_mount();
    let f = cstr(m.path("masked"));
    let d = cstr(m.path("maskeddir"));
    let r = run_as(0, 0, || unsafe {
        libc::umask(0o027);
        let fd = libc::open(f.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o777);
        if fd < 0 {
            return ret_errno(fd);
        }
        libc::close(fd);
        ret_errno(libc::mkdir(d.as_ptr(), 0o777))
    });
    assert_eq!(errname(r), "OK");
    assert_eq!(lstat(&m.path("masked")).mode() & 0o7777, 0o750);
    assert_eq!(lstat(&m.path("maskeddir")).mode() & 0o7777, 0o750);
}

#[test]
fn files_created_in_setgid_directory_inherit_its_group() {
    let m = perm_mount();
    let d = m.path("proj");
    fs::create_dir(&d).unwrap();
    chown(&d, 0, 4242).unwrap();
    chmod(&d, 0o2777).unwrap();
    let f = cstr(d.join("f"));
    let sub = cstr(d.join("sub"));
    let r = run_as(NOBODY, NOGROUP, || unsafe {
        let fd = libc::open(f.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
        if fd < 0 {
            return ret_errno(fd);
        }
        libc::close(fd);
        ret_errno(libc::mkdir(sub.as_ptr(), 0o755))
    });
    assert_eq!(errname(r), "OK");
    assert_eq!(
        lstat(&d.join("f")).gid(),
        4242,
        "file did not inherit the setgid directory's group"
    );
    let sd = lstat(&d.join("sub"));
    assert_eq!(sd.gid(), 4242, "subdirectory did not inherit the group");
    assert_ne!(
        sd.mode() & 0o2000,
        0,
        "subdirectory did not inherit the setgid bit"
    );
}

// ---------------------------------------------------------------------------------------------
// Names, readdir, statfs, persistence
// ---------------------------------------------------------------------------------------------

#[test]
fn names_of_255_bytes_work_and_256_bytes_fail_with_enametoolong() {
    let m = mount();
    let n255 = "n".repeat(255);
    let n256 = "n".repeat(256);
    let u255 = "é".repeat(127) + "x"; // 255 bytes of UTF-8
    write_file(&m.path(&n255), b"ok");
    write_file(&m.path(&u255), b"utf8");
    assert_eq!(read_all(&m.path(&n255)), b"ok");
    let names: HashSet<_> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.contains(std::ffi::OsStr::new(&n255)));
    assert!(names.contains(std::ffi::OsStr::new(&u255)));
    assert_errno!(File::create(m.path(&n256)), libc::ENAMETOOLONG);
    assert_errno!(fs::create_dir(m.path(&n256)), libc::ENAMETOOLONG);
    assert_errno!(symlink("x", m.path(&n256)), libc::ENAMETOOLONG);
    assert_errno!(
        fs::hard_link(m.path(&n255), m.path(&n256)),
        libc::ENAMETOOLONG
    );
    assert_errno!(fs::rename(m.path(&n255), m.path(&n256)), libc::ENAMETOOLONG);
    assert_errno!(fs::metadata(m.path(&n256)), libc::ENAMETOOLONG);
    assert_eq!(read_all(&m.path(&n255)), b"ok");
    fs::create_dir(m.path(&("d".repeat(255)))).unwrap();
    fs::rename(
        m.path(&n255),
        m.path(&format!("{}/{}", "d".repeat(255), "m".repeat(255))),
    )
    .unwrap();
    assert_eq!(statvfs(m.mnt()).f_namemax, 255);
}

#[test]
fn readdir_returns_every_entry_with_its_type() {
    let m = mount();
    let d = m.path("big");
    fs::create_dir(&d).unwrap();
    let mut want = BTreeMap::new();
    for i in 0..3000 {
        let name = format!("file-{i:05}-{}", "z".repeat(i % 40));
        write_file(&d.join(&name), b"");
        want.insert(name, 'f');
    }
    for i in 0..20 {
        fs::create_dir(d.join(format!("dir{i}"))).unwrap();
        want.insert(format!("dir{i}"), 'd');
        symlink("x", d.join(format!("sym{i}"))).unwrap();
        want.insert(format!("sym{i}"), 'l');
    }
    let mut got = BTreeMap::new();
    for e in fs::read_dir(&d).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        let t = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_file() {
            'f'
        } else {
            '?'
        };
        let name = e.file_name().into_string().unwrap();
        assert!(
            got.insert(name.clone(), t).is_none(),
            "{name} returned twice"
        );
    }
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "readdir result differs from the created entries"
    );
    // "." and ".." are listed by the raw readdir.
    let raw = raw_readdir_names(&d);
    assert!(raw.contains(&".".to_string()) && raw.contains(&"..".to_string()));
}

fn raw_readdir_names(d: &Path) -> Vec<String> {
    let c = cstr(d);
    let mut out = vec![];
    unsafe {
        let dir = libc::opendir(c.as_ptr());
        assert!(!dir.is_null());
        loop {
            let ent = libc::readdir(dir);
            if ent.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr());
            out.push(name.to_string_lossy().into_owned());
        }
        libc::closedir(dir);
    }
    out
}

#[test]
fn readdir_returns_untouched_entries_exactly_once_while_directory_changes() {
    let m = mount();
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    let n = 2000;
    for i in 0..n {
        write_file(&d.join(format!("f{i:05}")), b"");
    }
    let mut touched: HashSet<String> = HashSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let c = cstr(&d);
    let mut rng = SmallRng::seed_from_u64(42);
    let mut created = 0;
    unsafe {
        let dir = libc::opendir(c.as_ptr());
        assert!(!dir.is_null());
        let mut count = 0usize;
        loop {
            let ent = libc::readdir(dir);
            if ent.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
                .to_string_lossy()
                .into_owned();
            if name != "." && name != ".." {
                *seen.entry(name).or_default() += 1;
            }
            count += 1;
            if count.is_multiple_of(150) {
                // Mutate: delete some entries (seen or not), create new ones, rename some.
                for _ in 0..40 {
                    let i = rng.gen_range(0..n);
                    let name = format!("f{i:05}");
                    if touched.insert(name.clone()) {
                        fs::remove_file(d.join(&name)).unwrap();
                    }
                }
                for _ in 0..40 {
                    let name = format!("new{created:05}");
                    created += 1;
                    write_file(&d.join(&name), b"");
                    touched.insert(name);
                }
                for _ in 0..5 {
                    let i = rng.gen_range(0..n);
                    let name = format!("f{i:05}");
                    if touched.insert(name.clone()) {
                        let to = format!("renamed{i:05}");
                        fs::rename(d.join(&name), d.join(&to)).unwrap();
                        touched.insert(to);
                    }
                }
            }
        }
        libc::closedir(dir);
    }
    for (name, c) in &seen {
        assert_eq!(*c, 1, "{name} returned {c} times");
    }
    for i in 0..n {
        let name = format!("f{i:05}");
        if !touched.contains(&name) {
            assert!(
                seen.contains_key(&name),
                "untouched entry {name} was skipped"
            );
        }
    }
    for name in seen.keys() {
        assert!(
            name.starts_with('f') && !touched.contains(name) || touched.contains(name),
            "unexpected entry {name}"
        );
    }
}

#[test]
fn statfs_reports_quota_as_size_and_volume_usage_as_used() {
    let m = Mount::start(Opts::new().quota("64Mi"));
    let (total, used0) = df(m.mnt());
    assert_eq!(total, 64 * MIB, "df size must equal the quota");
    assert!(used0 < MIB, "empty volume shows {used0} bytes used");
    write_big_file(&m.path("f"), 8 * MIB, 1).unwrap();
    let (total, used) = df(m.mnt());
    assert_eq!(total, 64 * MIB);
    assert!(
        (8 * MIB..=8 * MIB + 2 * CHUNK_MAX).contains(&used),
        "8 MiB written, df used = {used}"
    );
    let s = statvfs(m.mnt());
    assert!(s.f_bavail <= s.f_bfree);
    let info = m.inspect();
    let frsize = s.f_frsize;
    assert!(
        used.abs_diff(info.used_bytes) < frsize,
        "df used {used} differs from inspect used_bytes {} by more than one block",
        info.used_bytes
    );
}

#[test]
fn data_and_metadata_persist_across_unmount_and_remount() {
    let m = Mount::start(Opts::new());
    fs::create_dir_all(m.path("a/b")).unwrap();
    let big = pattern(77, (2 * MIB + 333) as usize);
    write_file(&m.path("a/b/big"), &big);
    let sf = create_rw(&m.path("sparse"));
    pwrite_all(&sf, b"far", 6 * GIB).unwrap();
    drop(sf);
    symlink("a/b/big", m.path("ln")).unwrap();
    fs::hard_link(m.path("a/b/big"), m.path("hard")).unwrap();
    mkfifo(&m.path("fifo"), 0o600).unwrap();
    setxattr(&m.path("a"), "user.tag", b"dir-xattr", 0).unwrap();
    setxattr(&m.path("hard"), "user.tag", b"file-xattr", 0).unwrap();
    chmod(&m.path("a/b"), 0o711).unwrap();
    lchown(&m.path("ln"), 5, 6).unwrap();
    chown(&m.path("sparse"), 1234, 5678).unwrap();
    utimensat(&m.path("sparse"), ts(111, 222), ts(333, 444), 0).unwrap();
    let attrs = |m: &Mount| -> Vec<_> {
        ["a", "a/b", "a/b/big", "sparse", "ln", "hard", "fifo"]
            .iter()
            .map(|p| {
                let md = lstat(&m.path(p));
                (
                    p.to_string(),
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    md.nlink(),
                    if md.is_dir() { 0 } else { md.len() },
                    md.ino(),
                )
            })
            .collect()
    };
    let before = attrs(&m);
    let dirs = m.stop();
    let m = Mount::start_in(dirs, Opts::new());
    let after = attrs(&m);
    assert_eq!(before, after);
    assert!(read_all(&m.path("a/b/big")) == big);
    // Check the times before reading updates the access time.
    let md = lstat(&m.path("sparse"));
    assert_eq!(
        (md.atime(), md.atime_nsec(), md.mtime(), md.mtime_nsec()),
        (111, 222, 333, 444)
    );
    let f = File::open(m.path("sparse")).unwrap();
    assert_eq!(pread(&f, 6 * GIB, 10).unwrap(), b"far");
    assert!(is_zero(&pread(&f, 3 * GIB, 100_000).unwrap()));
    assert_eq!(fs::read_link(m.path("ln")).unwrap(), Path::new("a/b/big"));
    assert_eq!(getxattr(&m.path("a"), "user.tag").unwrap(), b"dir-xattr");
    assert_eq!(
        getxattr(&m.path("a/b/big"), "user.tag").unwrap(),
        b"file-xattr"
    );
    let mut names: Vec<_> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec!["a", "fifo", "hard", "ln", "sparse"]);
}

#[test]
fn seek_on_a_regular_file_descriptor_and_read_see_same_data_as_pread() {
    let m = mount();
    let p = m.path("f");
    let data = pattern(8, 200_000);
    write_file(&p, &data);
    drop_cache_path(&p);
    let mut f = File::open(&p).unwrap();
    f.seek(SeekFrom::Start(65_530)).unwrap();
    let mut buf = vec![0u8; 100_000];
    f.read_exact(&mut buf).unwrap();
    assert!(buf[..] == data[65_530..165_530]);
    assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), 200_000);
}
