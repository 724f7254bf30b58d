//! Density: many volumes of one store served at once by one process, as the agent serves a
//! node's PVs. Reports the time to mount them and the process's resident memory before
//! and after (idle, once every mount has answered a create, a write and a stat), per
//! volume. Needs root (/dev/fuse, mounts):
//!
//! ```sh
//! CARGO_TARGET_DIR=/var/tmp/fusevol-target cargo bench --profile release --bench density [-- 100]
//! ```
//!
//! The store and mount points live in a temp directory under `$FUSEVOL_BENCH_DIR`
//! (default `/var/tmp`). Every mount is stopped and the directory removed at the end.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusevol::metrics::Metrics;
use fusevol::mount::{serve, ServeOptions, Served};
use fusevol::store::{Store, StoreOptions};

/// Volumes when no count is given.
const DEFAULT_VOLUMES: usize = 100;

/// A number from /proc/self/status: `VmRSS:` and the like in KiB, or `Threads:`.
fn status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let value = l.strip_prefix(field)?.trim();
                value.trim_end_matches("kB").trim().parse().ok()
            })
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One create, write and stat through the mount: the volume answers.
fn touch(mountpoint: &Path) -> std::io::Result<()> {
    let f = mountpoint.join("hello");
    std::fs::write(&f, b"hello from a dense node\n")?;
    if std::fs::metadata(&f)?.len() != 24 {
        return Err(std::io::Error::other("wrong size read back"));
    }
    Ok(())
}

/// 8 MiB written with O_DIRECT in 1 MiB requests and fsync'd: every worker's request
/// buffer is likely to have held a full 1 MiB write.
fn write_big(mountpoint: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(mountpoint.join("big"))?;
    // FUSE passes O_DIRECT writes to the server as they are: no buffer alignment needed.
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..8 {
        f.write_all(&block)?;
    }
    f.sync_all()
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the first other argument is the count.
    let volumes = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.parse::<usize>())
        .transpose()?
        .unwrap_or(DEFAULT_VOLUMES);
    let base = std::env::var_os("FUSEVOL_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("fusevol-density-")
        .tempdir_in(base)?;
    let store = Store::open_or_create(&dir.path().join("store"), &StoreOptions::default())?;
    let names: Vec<String> = (0..volumes).map(|i| format!("v{i:04}")).collect();
    for name in &names {
        store.create_volume(name, Some(1 << 30), None)?;
    }
    let metrics = Arc::new(Metrics::new());
    let opts = ServeOptions {
        allow_other: true,
        threads: 4, // as the agent serves each PV
        ..ServeOptions::default()
    };
    let rss_before = status("VmRSS:");
    let threads_before = status("Threads:");
    let started = Instant::now();
    let mut served: Vec<Served> = Vec::with_capacity(volumes);
    let mut result = Ok(());
    for name in &names {
        let mp = dir.path().join("mnt").join(name);
        std::fs::create_dir_all(&mp)?;
        match serve(&store, name, &mp, &opts, metrics.clone()) {
            Ok(s) => served.push(s),
            Err(e) => {
                result = Err(anyhow::anyhow!("serving {name}: {e}"));
                break;
            }
        }
    }
    let mount_time = started.elapsed();
    if result.is_ok() {
        result = served
            .iter()
            .try_for_each(|s| touch(&s.mountpoint))
            .map_err(|e| anyhow::anyhow!("a mount did not answer: {e}"));
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = status("VmRSS:");
    let threads_after = status("Threads:");
    if result.is_ok() {
        result = served
            .iter()
            .try_for_each(|s| write_big(&s.mountpoint))
            .map_err(|e| anyhow::anyhow!("writing 8 MiB to a mount: {e}"));
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_written = status("VmRSS:");
    let n = served.len().max(1) as f64;
    println!(
        "{} volumes of one store served by one process (4 FUSE threads each)",
        served.len()
    );
    println!(
        "mount time: {:.2} s in all, {:.1} ms per volume",
        mount_time.as_secs_f64(),
        mount_time.as_secs_f64() * 1000.0 / n
    );
    println!(
        "RSS: {:.1} MiB before, {:.1} MiB with every volume served and idle: {:.2} MiB per volume",
        mib(rss_before),
        mib(rss_after),
        mib(rss_after.saturating_sub(rss_before)) / n
    );
    println!(
        "RSS after 8 MiB of 1 MiB O_DIRECT writes to each volume, idle again: {:.1} MiB, {:.2} MiB per volume",
        mib(rss_written),
        mib(rss_written.saturating_sub(rss_before)) / n
    );
    println!("threads: {threads_before} before, {threads_after} after");
    println!("peak RSS (VmHWM): {:.1} MiB", mib(status("VmHWM:")));
    let stop_started = Instant::now();
    for s in served {
        if let Err(e) = s.stop(Duration::from_secs(10)) {
            eprintln!("stopping a volume: {e}");
        }
    }
    println!(
        "stop time: {:.2} s in all",
        stop_started.elapsed().as_secs_f64()
    );
    drop(store);
    result
}
