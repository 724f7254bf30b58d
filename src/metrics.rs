//! Prometheus metrics, one registry per process. What this module owns:
//!
//! - FUSE operations: counts and errors per volume and operation, latency histograms per
//!   operation only (node-wide). Cardinality stays bounded: a volume adds 2 series per
//!   operation and 3 gauges, never a histogram, so 500 volumes export ~28,000 series,
//!   not the ~230,000 that per-volume histograms would.
//! - Volume gauges (quota, used bytes, inodes), rendered on demand from the open volumes.
//! - Store health per disk (bytes on disk against data held, blob garbage, memtables,
//!   write stalls, background errors, the free-space floor), read from each watched store
//!   at render time.
//!
//! The FUSE adapter only starts timers; the agent and controller register their own
//! metrics into the same registry ([`Metrics::with_registry`]).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::{Store, StoreHealth, Volume, WeakStore, UNLIMITED};

/// Operations the adapter reports.
pub const OPS: &[&str] = &[
    "lookup",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "release",
    "forget",
    "fsync",
    "readdir",
    "readdirplus",
    "fsyncdir",
    "statfs",
    "setxattr",
    "removexattr",
    "create",
    "fallocate",
    "lseek",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub volume: String,
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOnlyLabels {
    pub op: String,
}

/// A store: the tier it serves and its disk directory.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub tier: String,
    pub disk: String,
}

/// The store-health families, one series per watched store each.
#[derive(Default)]
struct StoreFamilies {
    disk: Family<StoreLabels, Gauge>,
    garbage: Family<StoreLabels, Gauge>,
    data: Family<StoreLabels, Gauge>,
    amplification: Family<StoreLabels, Gauge<f64, AtomicU64>>,
    memtables: Family<StoreLabels, Gauge>,
    stopped: Family<StoreLabels, Gauge>,
    delayed: Family<StoreLabels, Gauge>,
    background_errors: Family<StoreLabels, Gauge>,
    floor: Family<StoreLabels, Gauge>,
    health_failed: Family<StoreLabels, Counter>,
}

impl StoreFamilies {
    fn register(&self, r: &mut Registry) {
        r.register(
            "store_disk_bytes",
            "Bytes of the store's live table and blob files (WAL aside)",
            self.disk.clone(),
        );
        r.register(
            "store_blob_garbage_bytes",
            "Bytes of blob files no chunk references any more, not yet collected",
            self.garbage.clone(),
        );
        r.register(
            "store_data_bytes",
            "Bytes of file data the store's volumes hold (what quotas count)",
            self.data.clone(),
        );
        r.register(
            "store_space_amplification",
            "Disk bytes per byte of data (absent while the store holds no data)",
            self.amplification.clone(),
        );
        r.register(
            "store_memtable_bytes",
            "Bytes in memtables, not yet flushed",
            self.memtables.clone(),
        );
        r.register(
            "store_write_stopped",
            "1 while RocksDB stops every write (too many memtables or level-0 files)",
            self.stopped.clone(),
        );
        r.register(
            "store_delayed_write_rate_bytes",
            "Rate RocksDB slows writes to, bytes per second (0: not delayed)",
            self.delayed.clone(),
        );
        r.register(
            "store_background_errors",
            "Flush or compaction failures since the store opened",
            self.background_errors.clone(),
        );
        r.register(
            "store_free_space_floor_reached",
            "1 while changes are refused at the disk's free-space floor",
            self.floor.clone(),
        );
        r.register(
            "store_health_read_failures",
            "Scrapes that could not read the store's health",
            self.health_failed.clone(),
        );
    }

    fn set(&self, l: &StoreLabels, h: &StoreHealth) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.disk.get_or_create(l).set(g(h.disk_bytes));
        self.garbage.get_or_create(l).set(g(h.garbage_bytes));
        self.data.get_or_create(l).set(g(h.data_bytes));
        match h.space_amplification() {
            Some(a) => {
                self.amplification.get_or_create(l).set(a);
            }
            None => {
                self.amplification.remove(l);
            }
        }
        self.memtables.get_or_create(l).set(g(h.memtable_bytes));
        self.stopped
            .get_or_create(l)
            .set(i64::from(h.write_stopped));
        self.delayed.get_or_create(l).set(g(h.delayed_write_rate));
        self.background_errors
            .get_or_create(l)
            .set(g(h.background_errors));
        self.floor
            .get_or_create(l)
            .set(i64::from(h.at_free_space_floor));
    }

    fn remove(&self, l: &StoreLabels) {
        self.remove_gauges(l);
        self.health_failed.remove(l);
    }

    fn remove_gauges(&self, l: &StoreLabels) {
        for f in [
            &self.disk,
            &self.garbage,
            &self.data,
            &self.memtables,
            &self.stopped,
            &self.delayed,
            &self.background_errors,
            &self.floor,
        ] {
            f.remove(l);
        }
        self.amplification.remove(l);
    }
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~5 s
    Histogram::new(exponential_buckets(0.00001, 3.0, 13))
}

/// The process-wide registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    ops: Family<OpLabels, Counter>,
    errors: Family<OpLabels, Counter>,
    latency: Family<OpOnlyLabels, Histogram, fn() -> Histogram>,
    quota: Family<VolumeLabels, Gauge>,
    used: Family<VolumeLabels, Gauge>,
    inodes: Family<VolumeLabels, Gauge>,
    stored: Family<VolumeLabels, Gauge>,
    volumes: Mutex<HashMap<String, Arc<Volume>>>,
    store_families: StoreFamilies,
    stores: Mutex<Vec<(StoreLabels, WeakStore)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fusevol");
        let ops = Family::<OpLabels, Counter>::default();
        let errors = Family::<OpLabels, Counter>::default();
        let latency = Family::<OpOnlyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let quota = Family::<VolumeLabels, Gauge>::default();
        let used = Family::<VolumeLabels, Gauge>::default();
        let inodes = Family::<VolumeLabels, Gauge>::default();
        let stored = Family::<VolumeLabels, Gauge>::default();
        registry.register("fuse_operations", "FUSE operations served", ops.clone());
        registry.register("fuse_errors", "FUSE operations that failed", errors.clone());
        registry.register(
            "fuse_operation_seconds",
            "FUSE operation latency, all volumes of the process together",
            latency.clone(),
        );
        registry.register(
            "volume_quota_bytes",
            "Volume quota (absent: unlimited)",
            quota.clone(),
        );
        registry.register(
            "volume_used_bytes",
            "Bytes of file data stored",
            used.clone(),
        );
        registry.register("volume_inodes", "Inodes in use", inodes.clone());
        registry.register(
            "volume_stored_bytes",
            "What a compressed volume's file data takes on disk after compression, as RocksDB estimates it for flushed data (absent: uncompressed)",
            stored.clone(),
        );
        let store_families = StoreFamilies::default();
        store_families.register(&mut registry);
        Metrics {
            registry: Mutex::new(registry),
            ops,
            errors,
            latency,
            quota,
            used,
            inodes,
            stored,
            volumes: Mutex::new(HashMap::new()),
            store_families,
            stores: Mutex::new(Vec::new()),
        }
    }

    /// Reports the health of `store` (tier `tier`) at every render, while the store is
    /// open elsewhere: the registry does not keep it open.
    pub fn watch_store(&self, tier: &str, store: &Store) {
        let l = StoreLabels {
            tier: tier.to_string(),
            disk: store.dir().display().to_string(),
        };
        let mut stores = self.stores.lock();
        stores.retain(|(old, _)| *old != l);
        stores.push((l, store.downgrade()));
    }

    fn render_stores(&self) {
        let f = &self.store_families;
        self.stores.lock().retain(|(l, weak)| {
            let Some(store) = weak.upgrade() else {
                f.remove(l);
                return false;
            };
            match store.health() {
                Ok(h) => f.set(l, &h),
                Err(error) => {
                    // No stale values as if current: the gauges go until a read works.
                    tracing::warn!(disk = %l.disk, %error, "cannot read the store's health");
                    f.remove_gauges(l);
                    f.health_failed.get_or_create(l).inc();
                }
            }
            true
        });
    }

    /// Per-operation handles for one served volume, whose gauges are reported too.
    pub fn volume_ops(&self, vol: &Arc<Volume>) -> Arc<OpMetrics> {
        self.volumes.lock().insert(vol.name.clone(), vol.clone());
        self.ops_for(&vol.name)
    }

    /// Per-operation handles labelled with `volume`.
    pub fn ops_for(&self, volume: &str) -> Arc<OpMetrics> {
        let mut stats = HashMap::new();
        for op in OPS {
            let l = OpLabels {
                volume: volume.to_string(),
                op: op.to_string(),
            };
            stats.insert(
                *op,
                OpStat {
                    count: self.ops.get_or_create_owned(&l),
                    errors: self.errors.get_or_create_owned(&l),
                    latency: self
                        .latency
                        .get_or_create_owned(&OpOnlyLabels { op: op.to_string() }),
                },
            );
        }
        Arc::new(OpMetrics { stats })
    }

    /// Stops reporting a volume (after it is unmounted).
    pub fn forget_volume(&self, name: &str) {
        self.volumes.lock().remove(name);
        let vl = VolumeLabels {
            volume: name.to_string(),
        };
        self.quota.remove(&vl);
        self.used.remove(&vl);
        self.inodes.remove(&vl);
        self.stored.remove(&vl);
        for op in OPS {
            let l = OpLabels {
                volume: name.to_string(),
                op: op.to_string(),
            };
            self.ops.remove(&l);
            self.errors.remove(&l);
        }
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        for (name, v) in self.volumes.lock().iter() {
            let l = VolumeLabels {
                volume: name.clone(),
            };
            if v.quota() != UNLIMITED {
                self.quota.get_or_create(&l).set(v.quota() as i64);
            }
            self.used.get_or_create(&l).set(v.used_bytes() as i64);
            self.inodes.get_or_create(&l).set(v.inodes() as i64);
            if let Some(stored) = v.stored_bytes() {
                self.stored
                    .get_or_create(&l)
                    .set(i64::try_from(stored).unwrap_or(i64::MAX));
            }
        }
        self.render_stores();
        let mut out = String::new();
        if encode(&mut out, &self.registry.lock()).is_err() {
            out.push_str("# error encoding metrics\n");
        }
        out
    }

    /// Registers more metrics (the agent's and controller's own).
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        f(&mut self.registry.lock())
    }
}

struct OpStat {
    count: Counter,
    errors: Counter,
    latency: Histogram,
}

/// The operation metrics of one volume; cheap to use on every request.
pub struct OpMetrics {
    stats: HashMap<&'static str, OpStat>,
}

impl OpMetrics {
    /// Metrics that go nowhere (tests, tools).
    pub fn detached() -> Arc<OpMetrics> {
        Metrics::new().ops_for("detached")
    }

    /// Starts timing `op`; the count and latency are recorded when the timer drops.
    pub fn start(&self, op: &'static str) -> OpTimer<'_> {
        OpTimer {
            stat: self.stats.get(op),
            start: Instant::now(),
            failed: false,
        }
    }
}

pub struct OpTimer<'a> {
    stat: Option<&'a OpStat>,
    start: Instant,
    failed: bool,
}

impl OpTimer<'_> {
    pub fn failed(mut self) {
        self.failed = true;
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.stat {
            s.count.inc();
            if self.failed {
                s.errors.inc();
            }
            s.latency.observe(self.start.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Caller, Fs};
    use crate::store::{StoreOptions, ROOT_INO};

    /// The lines of a render that are samples (not comments), for one metric name.
    fn samples<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .collect()
    }

    fn all_samples(text: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#')).count()
    }

    #[test]
    fn series_per_volume_are_counters_only_and_histograms_do_not_grow_with_volumes() {
        let m = Metrics::new();
        let _one = m.ops_for("v0");
        let one = m.render();
        let _more: Vec<_> = (1..50).map(|i| m.ops_for(&format!("v{i}"))).collect();
        let fifty = m.render();
        let buckets = |t: &str| samples(t, "fusevol_fuse_operation_seconds_bucket").len();
        assert_eq!(
            buckets(&one),
            buckets(&fifty),
            "histograms grew with volumes"
        );
        assert!(
            samples(&fifty, "fusevol_fuse_operation_seconds_bucket")
                .iter()
                .all(|l| !l.contains("volume=")),
            "a latency histogram carries a volume label"
        );
        // Each further volume: one operation counter and one error counter per operation.
        let per_volume = (all_samples(&fifty) - all_samples(&one)) / 49;
        assert_eq!(per_volume, 2 * OPS.len(), "series per volume");
        // Forgetting a volume takes its series away.
        m.forget_volume("v7");
        assert!(!m.render().contains("volume=\"v7\""));
    }

    #[test]
    fn a_watched_store_reports_its_health_until_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open_or_create(&dir.path().join("store"), &StoreOptions::default()).unwrap();
        let m = Metrics::new();
        m.watch_store("fast", &store);
        let disk = store.dir().display().to_string();
        let label = format!("{{tier=\"fast\",disk=\"{disk}\"}}");
        let text = m.render();
        for metric in [
            "fusevol_store_disk_bytes",
            "fusevol_store_data_bytes",
            "fusevol_store_write_stopped",
            "fusevol_store_background_errors",
            "fusevol_store_free_space_floor_reached",
        ] {
            assert_eq!(
                samples(&text, metric),
                vec![format!("{metric}{label} 0").as_str()],
                "{text}"
            );
        }
        assert!(
            samples(&text, "fusevol_store_space_amplification").is_empty(),
            "an amplification of a store without data"
        );

        // 1 MiB of file data: the store counts it, and the amplification appears.
        store.create_volume("v", None, None).unwrap();
        let fs = Fs::new(store.clone(), store.open_volume("v").unwrap()).unwrap();
        let me = Caller { uid: 0, gid: 0 };
        let ino = fs
            .create_node(me, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, None)
            .unwrap()
            .ino;
        fs.write(ino, 0, &vec![7u8; 1 << 20], false).unwrap();
        let text = m.render();
        let used = store.inspect_volume("v").unwrap().used_bytes;
        assert!(used >= 1 << 20, "{used}");
        assert_eq!(
            samples(&text, "fusevol_store_data_bytes"),
            vec![format!("fusevol_store_data_bytes{label} {used}").as_str()],
            "the volumes' usage, as their quotas count it"
        );
        assert_eq!(samples(&text, "fusevol_store_space_amplification").len(), 1);

        // The registry does not keep the store open: once closed, its series go.
        drop(fs);
        drop(store);
        let text = m.render();
        assert!(
            !text.contains(&disk),
            "a closed store is still reported:\n{text}"
        );
        let again = Store::open_or_create(&dir.path().join("store"), &StoreOptions::default());
        assert!(again.is_ok(), "the registry kept the store locked");
    }

    #[test]
    fn a_compressed_volume_reports_what_its_data_takes_on_disk() {
        use crate::store::{Compression, NewVolume};
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open_or_create(&dir.path().join("store"), &StoreOptions::default()).unwrap();
        let m = Metrics::new();
        let me = Caller { uid: 0, gid: 0 };
        let mut served = Vec::new();
        for (name, compression) in [("plain", Compression::None), ("packed", Compression::Zstd)] {
            let new = NewVolume {
                compression,
                ..NewVolume::default()
            };
            store.create_volume_with(name, &new).unwrap();
            let vol = store.open_volume(name).unwrap();
            let _ops = m.volume_ops(vol.volume());
            let fs = Fs::new(store.clone(), vol).unwrap();
            let ino = fs
                .create_node(me, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, None)
                .unwrap()
                .ino;
            fs.write(ino, 0, &vec![7u8; 2 << 20], false).unwrap();
            served.push(fs);
        }
        // Flushed (inspect does it), the compressed volume's data shows, much smaller.
        let info = store.inspect_volume_measured("packed").unwrap();
        let text = m.render();
        let stored = samples(&text, "fusevol_volume_stored_bytes");
        assert_eq!(stored.len(), 1, "{text}");
        let value: u64 = stored[0]
            .strip_prefix("fusevol_volume_stored_bytes{volume=\"packed\"} ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}", stored[0]));
        assert_eq!(Some(value), info.compression.stored_bytes);
        assert!(value > 0 && value < 256 << 10, "{value}");
        m.forget_volume("packed");
        assert!(samples(&m.render(), "fusevol_volume_stored_bytes").is_empty());
    }
}
