//! Prometheus metrics: FUSE operation counts, errors and latencies per volume, plus the
//! volume gauges (quota, used bytes, inodes) rendered on demand from the open volumes.
//! The registry and metric families live here; the FUSE adapter only starts timers.

use std::collections::HashMap;
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

use crate::store::{Volume, UNLIMITED};

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

fn latency_histogram() -> Histogram {
    // 10 µs .. ~5 s
    Histogram::new(exponential_buckets(0.00001, 3.0, 13))
}

/// The process-wide registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    ops: Family<OpLabels, Counter>,
    errors: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    quota: Family<VolumeLabels, Gauge>,
    used: Family<VolumeLabels, Gauge>,
    inodes: Family<VolumeLabels, Gauge>,
    volumes: Mutex<HashMap<String, Arc<Volume>>>,
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
        let latency = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let quota = Family::<VolumeLabels, Gauge>::default();
        let used = Family::<VolumeLabels, Gauge>::default();
        let inodes = Family::<VolumeLabels, Gauge>::default();
        registry.register("fuse_operations", "FUSE operations served", ops.clone());
        registry.register("fuse_errors", "FUSE operations that failed", errors.clone());
        registry.register(
            "fuse_operation_seconds",
            "FUSE operation latency",
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
        Metrics {
            registry: Mutex::new(registry),
            ops,
            errors,
            latency,
            quota,
            used,
            inodes,
            volumes: Mutex::new(HashMap::new()),
        }
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
                    latency: self.latency.get_or_create_owned(&l),
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
        for op in OPS {
            let l = OpLabels {
                volume: name.to_string(),
                op: op.to_string(),
            };
            self.ops.remove(&l);
            self.errors.remove(&l);
            self.latency.remove(&l);
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
        }
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
