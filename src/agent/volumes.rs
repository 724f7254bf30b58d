//! The node-local half of the agent: the chunk stores of the node's disks, the FUSE mounts of
//! the PVs it serves, and what it does to a PV's data. Blocking code, no API calls: the agent's
//! event loop computes a [`Plan`] from the PVs pinned to its node and hands it to
//! [`VolumeManager::apply`], which reports which PVs' data is gone (so their finalizer can go).
//!
//! One store (one RocksDB) per disk directory; a volume lives in one store of its tier, named
//! after its PV. With one replica the agent puts a new volume on the tier's disk with the most
//! free bytes; a later issue adds copies on further disks of the tier (a volume is one
//! contiguous key range of its store, so a copy is an export and ingest of that range).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;

use super::config::{AgentConfig, TierConfig};
use crate::k8s::crd::TierStatus;
use crate::k8s::layout::{volume_paths, DATA_DIR};
use crate::k8s::params::VolumeSpec;
use crate::k8s::provision::{is_fusevol_pv, pv_node, pv_volume_spec};
use crate::k8s::FINALIZER_DATA_CLEANUP;
use crate::metrics::Metrics;
use crate::mount::{self, MountError, ServeOptions, Served};
use crate::store::{self, Store, StoreOptions};

/// Errors of the node-local side; each names the PV or disk concerned.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("disk {disk}: {source}")]
    Store { disk: PathBuf, source: store::Error },
    #[error("PV {pv}: {source}")]
    Volume { pv: String, source: store::Error },
    #[error("PV {pv}: {source}")]
    Mount { pv: String, source: MountError },
    #[error("PV {pv}: {path}: {source}")]
    Io {
        pv: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("PV {pv}: no tier {tier:?} on this node (its tiers: {available})")]
    UnknownTier {
        pv: String,
        tier: String,
        available: String,
    },
    #[error("PV {pv}: bad volume spec annotation: {message}")]
    BadSpec { pv: String, message: String },
    #[error("PV {pv}: {message}")]
    Unsupported { pv: String, message: String },
}

/// What should become of one PV of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Serve the volume at its mount point (creating it with `spec` if new).
    Serve { pv: String, spec: VolumeSpec },
    /// The PV is released with reclaim policy Delete, or being deleted: unmount and delete
    /// the volume's data (`delete_data`), or only unmount (a Retain PV an administrator
    /// deletes keeps its data in the store). Then its finalizer may go.
    Cleanup { pv: String, delete_data: bool },
    /// A PV that names this node but that the agent cannot serve (bad annotation).
    Broken { pv: String, message: String },
}

/// The agent's intent for all PVs of its node; PVs not named here are not served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub wanted: Vec<Wanted>,
}

/// Computes the plan for `node` from all PVs the agent sees (pure).
pub fn plan(node: &str, pvs: &[PersistentVolume]) -> Plan {
    let mut wanted = Vec::new();
    for pv in pvs
        .iter()
        .filter(|pv| is_fusevol_pv(pv) && pv_node(pv) == Some(node))
    {
        let Some(name) = pv.metadata.name.clone() else {
            continue;
        };
        let policy = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            .unwrap_or("Delete");
        let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
        let has_finalizer = pv
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == FINALIZER_DATA_CLEANUP);
        let deleting = pv.metadata.deletion_timestamp.is_some();
        let released_delete = phase == Some("Released") && policy == "Delete";
        if deleting || released_delete {
            // Without our finalizer the data was cleaned up already (or never ours to clean).
            if has_finalizer || released_delete {
                wanted.push(Wanted::Cleanup {
                    pv: name,
                    delete_data: policy == "Delete",
                });
            }
            continue;
        }
        match pv_volume_spec(pv) {
            Some(Ok(spec)) => wanted.push(Wanted::Serve { pv: name, spec }),
            Some(Err(e)) => wanted.push(Wanted::Broken {
                pv: name,
                message: format!("bad volume spec annotation: {e}"),
            }),
            None => wanted.push(Wanted::Broken {
                pv: name,
                message: "no volume spec annotation".into(),
            }),
        }
    }
    Plan { wanted }
}

/// What [`VolumeManager::apply`] did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// PVs whose cleanup is done: their finalizer may be removed.
    pub cleaned: Vec<String>,
    /// PVs newly served in this round.
    pub started: Vec<String>,
    /// What failed, per PV (retried on the next round).
    pub errors: Vec<VolumeError>,
}

struct Disk {
    tier: String,
    path: PathBuf,
    store: Store,
}

/// The stores of the node's disks and the mounts being served.
pub struct VolumeManager {
    root: PathBuf,
    tiers: Vec<TierConfig>,
    disks: Vec<Disk>,
    /// The mounts being served, with the spec last applied to each (so the store is asked
    /// about limits only when the PV's spec changes, not on every round).
    served: BTreeMap<String, (Served, VolumeSpec)>,
    metrics: Arc<Metrics>,
    serve_options: ServeOptions,
}

impl VolumeManager {
    /// Opens (creating where needed) the store of every disk of every tier.
    pub fn open(config: &AgentConfig, metrics: Arc<Metrics>) -> Result<VolumeManager, VolumeError> {
        let mut disks = Vec::new();
        for tier in &config.tiers {
            for path in &tier.disks {
                let store =
                    Store::open_or_create(path, &StoreOptions::default()).map_err(|source| {
                        VolumeError::Store {
                            disk: path.clone(),
                            source,
                        }
                    })?;
                disks.push(Disk {
                    tier: tier.name.clone(),
                    path: path.clone(),
                    store,
                });
            }
        }
        Ok(VolumeManager {
            root: config.root.clone(),
            tiers: config.tiers.clone(),
            disks,
            served: BTreeMap::new(),
            metrics,
            serve_options: ServeOptions {
                allow_other: true,
                threads: 4,
            },
        })
    }

    /// The stores, for the control sockets.
    pub fn stores(&self) -> Vec<Store> {
        self.disks.iter().map(|d| d.store.clone()).collect()
    }

    /// Names of the PVs being served.
    pub fn served(&self) -> Vec<String> {
        self.served.keys().cloned().collect()
    }

    /// Brings the node in line with `plan`: serves what is wanted, cleans up what is released,
    /// and stops serving PVs the plan no longer names (their data stays).
    pub fn apply(&mut self, plan: &Plan) -> Outcome {
        let mut out = Outcome::default();
        let mut keep = BTreeSet::new();
        for w in &plan.wanted {
            match w {
                Wanted::Serve { pv, spec } => {
                    keep.insert(pv.clone());
                    match self.ensure_served(pv, spec) {
                        Ok(true) => out.started.push(pv.clone()),
                        Ok(false) => {}
                        Err(e) => out.errors.push(e),
                    }
                }
                Wanted::Cleanup { pv, delete_data } => match self.cleanup(pv, *delete_data) {
                    Ok(()) => out.cleaned.push(pv.clone()),
                    Err(e) => out.errors.push(e),
                },
                Wanted::Broken { pv, message } => out.errors.push(VolumeError::BadSpec {
                    pv: pv.clone(),
                    message: message.clone(),
                }),
            }
        }
        let gone: Vec<String> = self
            .served
            .keys()
            .filter(|pv| !keep.contains(*pv))
            .cloned()
            .collect();
        for pv in gone {
            if let Err(e) = self.unserve(&pv) {
                out.errors.push(e);
            }
        }
        out
    }

    /// Serves `pv`, creating its volume first if no store holds it. Returns whether it was
    /// (re)started in this call.
    fn ensure_served(&mut self, pv: &str, spec: &VolumeSpec) -> Result<bool, VolumeError> {
        if let Some((s, applied)) = self.served.get(pv) {
            if !s.finished() {
                if applied != spec {
                    self.ensure_quota(pv, spec)?;
                    if let Some((_, applied)) = self.served.get_mut(pv) {
                        *applied = spec.clone();
                    }
                }
                return Ok(false);
            }
            // Someone unmounted it (or the session died): serve it again.
            tracing::warn!(pv, "mount ended unexpectedly; serving it again");
            if let Some((s, _)) = self.served.remove(pv) {
                let _ = s.stop(Duration::from_secs(1));
            }
        }
        if spec.replicas != 1 {
            return Err(VolumeError::Unsupported {
                pv: pv.into(),
                message: format!(
                    "replicas {} is not supported by this agent (only 1)",
                    spec.replicas
                ),
            });
        }
        let disk = match self.disk_holding(pv)? {
            Some(i) => i,
            None => self.create_volume(pv, spec)?,
        };
        self.ensure_quota(pv, spec)?;
        let paths = volume_paths(&self.root.to_string_lossy(), pv);
        let mount_point = PathBuf::from(&paths.mount_point);
        // A mount left by a killed agent: stat fails with ENOTCONN, so detach it first.
        if mount::is_stale(&mount_point) {
            tracing::warn!(pv, "detaching the stale mount of a previous agent");
            let _ = mount::detach(&mount_point);
        }
        std::fs::create_dir_all(&mount_point).map_err(|source| VolumeError::Io {
            pv: pv.into(),
            path: mount_point.clone(),
            source,
        })?;
        let served = mount::serve(
            &self.disks[disk].store,
            pv,
            &mount_point,
            &self.serve_options,
            self.metrics.clone(),
        )
        .map_err(|source| VolumeError::Mount {
            pv: pv.into(),
            source,
        })?;
        // The PV's local.path: exists only inside the mounted volume (see k8s::layout).
        let data = mount_point.join(DATA_DIR);
        if let Err(e) = make_data_dir(&data) {
            let _ = served.stop(Duration::from_secs(5));
            return Err(VolumeError::Io {
                pv: pv.into(),
                path: data,
                source: e,
            });
        }
        self.served.insert(pv.to_string(), (served, spec.clone()));
        tracing::info!(pv, disk = %self.disks[disk].path.display(), "serving volume");
        Ok(true)
    }

    /// Applies the spec's quota and inode limit to an existing volume (volume expansion).
    fn ensure_quota(&self, pv: &str, spec: &VolumeSpec) -> Result<(), VolumeError> {
        let Some(i) = self.disk_holding(pv)? else {
            return Ok(());
        };
        let store = &self.disks[i].store;
        let info = store
            .inspect_volume(pv)
            .map_err(|source| VolumeError::Volume {
                pv: pv.into(),
                source,
            })?;
        if info.quota_bytes != Some(spec.quota_bytes) || info.inode_limit != spec.inode_limit {
            store
                .resize_volume(pv, Some(Some(spec.quota_bytes)), Some(spec.inode_limit))
                .map_err(|source| VolumeError::Volume {
                    pv: pv.into(),
                    source,
                })?;
        }
        Ok(())
    }

    fn create_volume(&mut self, pv: &str, spec: &VolumeSpec) -> Result<usize, VolumeError> {
        let candidates: Vec<usize> = (0..self.disks.len())
            .filter(|&i| self.disks[i].tier == spec.tier)
            .collect();
        if candidates.is_empty() {
            return Err(VolumeError::UnknownTier {
                pv: pv.into(),
                tier: spec.tier.clone(),
                available: self
                    .tiers
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        // The disk with the most bytes not yet promised to volumes.
        let mut best = candidates[0];
        let mut best_free = 0u64;
        for &i in &candidates {
            let d = &self.disks[i];
            let free = fs_size(&d.path)
                .unwrap_or(0)
                .saturating_sub(allocated_in(&d.store));
            if free > best_free {
                best = i;
                best_free = free;
            }
        }
        self.disks[best]
            .store
            .create_volume(pv, Some(spec.quota_bytes), spec.inode_limit)
            .map_err(|source| VolumeError::Volume {
                pv: pv.into(),
                source,
            })?;
        tracing::info!(pv, disk = %self.disks[best].path.display(), quota = spec.quota_bytes, "created volume");
        Ok(best)
    }

    /// Index of the disk whose store holds volume `pv`.
    fn disk_holding(&self, pv: &str) -> Result<Option<usize>, VolumeError> {
        for (i, d) in self.disks.iter().enumerate() {
            let names = d
                .store
                .volume_names()
                .map_err(|source| VolumeError::Store {
                    disk: d.path.clone(),
                    source,
                })?;
            if names.iter().any(|n| n == pv) {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    fn unserve(&mut self, pv: &str) -> Result<(), VolumeError> {
        if let Some((s, _)) = self.served.remove(pv) {
            tracing::info!(pv, "unmounting");
            s.stop(Duration::from_secs(10))
                .map_err(|source| VolumeError::Mount {
                    pv: pv.into(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Unmounts `pv`; with `delete_data` deletes its volume and its directory. Idempotent.
    fn cleanup(&mut self, pv: &str, delete_data: bool) -> Result<(), VolumeError> {
        self.unserve(pv)?;
        let paths = volume_paths(&self.root.to_string_lossy(), pv);
        let mount_point = Path::new(&paths.mount_point);
        // A mount left by a killed agent would keep the directory busy.
        if mount::is_mounted(mount_point) || mount::is_stale(mount_point) {
            let _ = mount::detach(mount_point);
        }
        if !delete_data {
            return Ok(());
        }
        if let Some(i) = self.disk_holding(pv)? {
            self.disks[i]
                .store
                .delete_volume(pv)
                .map_err(|source| VolumeError::Volume {
                    pv: pv.into(),
                    source,
                })?;
            tracing::info!(pv, "deleted volume data");
        }
        // Only empty directories: never follow into anything a mount might expose.
        for dir in [paths.mount_point.as_str(), paths.dir.as_str()] {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VolumeError::Io {
                        pv: pv.into(),
                        path: dir.into(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Capacity per tier: total (the configured cap, else the size of the disks'
    /// filesystems) minus reserved, and allocated = the sum of the volumes' quotas.
    pub fn capacity(&self) -> Vec<TierStatus> {
        self.tiers
            .iter()
            .map(|t| {
                let disks: Vec<&Disk> = self.disks.iter().filter(|d| d.tier == t.name).collect();
                let raw = t.capacity.unwrap_or_else(|| {
                    disks
                        .iter()
                        .map(|d| fs_size(&d.path).unwrap_or(0))
                        .fold(0, u64::saturating_add)
                });
                let allocated = disks
                    .iter()
                    .map(|d| allocated_in(&d.store))
                    .fold(0, u64::saturating_add);
                TierStatus::new(
                    t.name.clone(),
                    raw.saturating_sub(t.reserved),
                    allocated,
                    t.disks
                        .iter()
                        .map(|d| d.to_string_lossy().into_owned())
                        .collect(),
                )
            })
            .collect()
    }

    /// Unmounts everything (data stays). Used on shutdown.
    pub fn shutdown(&mut self) {
        let names: Vec<String> = self.served.keys().cloned().collect();
        for pv in names {
            if let Err(e) = self.unserve(&pv) {
                tracing::warn!(error = %e, "unmount on shutdown failed");
            }
        }
        for d in &self.disks {
            if let Err(e) = d.store.sync() {
                tracing::warn!(disk = %d.path.display(), error = %e, "sync on shutdown failed");
            }
        }
    }

    /// Gives back idle memtables of every store (called periodically).
    pub fn flush_idle(&self) {
        for d in &self.disks {
            let _ = d.store.flush_if_idle(1 << 20);
        }
    }
}

impl Drop for VolumeManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn make_data_dir(data: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::create_dir(data) {
        Ok(()) => {
            // Like local-path-provisioner: any pod user may write; fsGroup narrows it.
            std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o777))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sum of the quotas of a store's volumes (a volume without quota counts its used bytes).
fn allocated_in(store: &Store) -> u64 {
    store
        .list_volumes()
        .map(|vs| {
            vs.iter()
                .map(|v| v.quota_bytes.unwrap_or(v.used_bytes))
                .fold(0, u64::saturating_add)
        })
        .unwrap_or(0)
}

/// Size of the filesystem holding `path`.
fn fs_size(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks() as u64).saturating_mul(st.fragment_size() as u64))
}

impl VolumeError {
    /// The PV concerned (empty for a disk-wide error).
    pub fn pv(&self) -> &str {
        match self {
            VolumeError::Store { .. } => "",
            VolumeError::Volume { pv, .. }
            | VolumeError::Mount { pv, .. }
            | VolumeError::Io { pv, .. }
            | VolumeError::UnknownTier { pv, .. }
            | VolumeError::BadSpec { pv, .. }
            | VolumeError::Unsupported { pv, .. } => pv,
        }
    }
}
