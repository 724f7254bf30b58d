//! fusevol: fast, quota-enforced, node-local persistent volumes.
//!
//! Layers, top to bottom (each module's doc says what it owns):
//! - [`cli`]: the `fusevol` command line.
//! - [`mount`]: serving a volume at a mount point (signals, stale mounts).
//! - [`control`]: the control socket through which `fusevol volume` reaches a running server.
//! - [`fdstore`]: the FUSE connection holder that keeps mounts alive across server restarts.
//! - [`bdi`]: the dirty-page bound of a mount's writeback device, raised after mounting.
//! - [`fuse`]: the thin FUSE adapter (fuser types in, errno out).
//! - [`fs`]: POSIX semantics, quota admission and the chunked data path of one volume.
//! - [`store`]: the RocksDB chunk store holding many volumes; [`store::codec`] is the key layout and the encoding of every value.
//! - [`fsck`]: offline check and repair.
//! - [`metrics`], [`size`], [`fnv`]: Prometheus metrics, Kubernetes quantities, a stable hash.
//! - [`k8s`]: the Kubernetes side's pure logic (StorageClass parameters, the per-node
//!   capacity resource, the provisioning decision, the host path layout of PVs).
//! - [`agent`], [`controller`]: `fusevol agent` and `fusevol controller`, the API side;
//!   [`http`]: their /healthz and /metrics endpoint.

pub mod agent;
pub mod bdi;
pub mod cli;
pub mod control;
pub mod controller;
pub mod fdstore;
pub mod fnv;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod http;
pub mod k8s;
pub mod metrics;
pub mod mount;
pub mod size;
pub mod store;
pub mod wake;

/// The version of this build (shown in FusevolNode status and events).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
