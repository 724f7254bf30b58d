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
use crate::fdstore::FdStore;
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
    #[error("PV {pv}: mount point {path} is not empty on the host; refusing to mount over it (move its files away)")]
    MountPointNotEmpty { pv: String, path: PathBuf },
    #[error("PV {pv}: was served before, but no disk of this node holds its volume (a disk not mounted?); not creating it empty")]
    VolumeMissing { pv: String },
    #[error("PV {pv}: bad volume spec annotation: {message}")]
    BadSpec { pv: String, message: String },
    #[error("PV {pv}: {message}")]
    Unsupported { pv: String, message: String },
}

/// What should become of one PV of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Serve the volume at its mount point (creating it with `spec` if new), for the PV
    /// object with UID `uid` (the volume records it, and is never served for another).
    Serve {
        pv: String,
        spec: VolumeSpec,
        uid: Option<String>,
        /// The master key of an encrypted volume (read from its Secret by the API side:
        /// see `super::keys`); `None` for others, and before it is read.
        key: Option<store::MasterKey>,
    },
    /// No claim uses the PV any more (Released or Failed with reclaim policy Delete, or an
    /// unbound PV being deleted): unmount and delete the volume's data (`delete_data`), or
    /// only unmount (a Retain PV an administrator deletes keeps its data in the store).
    /// Then its finalizer may go. A Bound PV is never cleaned up, deleted or not.
    Cleanup { pv: String, delete_data: bool },
    /// A PV that names this node but that the agent cannot serve (bad annotation).
    Broken { pv: String, message: String },
}

/// The agent's intent for all PVs of its node; PVs not named here are not served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub wanted: Vec<Wanted>,
}

/// What the agent may do with a PV's data, from its phase, reclaim policy and deletion.
///
/// Data is deleted only when Kubernetes says no claim uses the PV any more: the PV
/// controller moves a PV to `Released` once its claim is gone (and to `Failed` when a
/// reclaim failed). A deletionTimestamp alone proves nothing: `kubectl delete pv` on a
/// Bound PV sets one at once, while `kubernetes.io/pv-protection` keeps the PV, its claim
/// and the pod using it alive. Such a PV stays served until its claim is deleted (as
/// kube-controller-manager's own volume plugins do: they reclaim only Released PVs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Bound, or a phase the PV controller has not settled yet: serve it.
    Serve,
    /// No claim uses it: unmount, and delete the data if `delete_data`.
    Cleanup { delete_data: bool },
    /// Deleted and cleaned up already (no finalizer of ours left): nothing to do.
    Gone,
}

fn fate(pv: &PersistentVolume) -> Fate {
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Delete");
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    let deleting = pv.metadata.deletion_timestamp.is_some();
    let has_finalizer = pv
        .metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER_DATA_CLEANUP);
    let delete_data = policy == "Delete";
    match phase {
        // In use by a claim (or about to be): never touch the data, deleting or not.
        Some("Bound") | Some("Pending") | None => Fate::Serve,
        Some("Released") | Some("Failed") if delete_data => Fate::Cleanup { delete_data },
        // Available (no claim) or Released with Retain: only a deletion ends the mount.
        _ if deleting && has_finalizer => Fate::Cleanup { delete_data },
        _ if deleting => Fate::Gone,
        _ => Fate::Serve,
    }
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
        match fate(pv) {
            Fate::Gone => continue,
            Fate::Cleanup { delete_data } => {
                wanted.push(Wanted::Cleanup {
                    pv: name,
                    delete_data,
                });
                continue;
            }
            Fate::Serve => {}
        }
        match pv_volume_spec(pv) {
            Some(Ok(spec)) => wanted.push(Wanted::Serve {
                pv: name,
                spec,
                uid: pv.metadata.uid.clone(),
                key: None,
            }),
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

/// What [`VolumeManager::reconfigure`] did.
#[derive(Default)]
pub struct Reconfigured {
    /// Stores of the disks opened (their control sockets are the caller's to start).
    pub opened: Vec<Store>,
    /// Empty disks no longer used (their store stays open until the agent restarts).
    pub removed: Vec<PathBuf>,
    /// What was refused or failed, one message each.
    pub refused: Vec<String>,
    /// A new disk could not be opened yet: worth trying again next round.
    pub incomplete: bool,
}

/// The disks kept for their volumes by an earlier run.
fn load_kept(root: &Path) -> Vec<KeptDisk> {
    std::fs::read(root.join(KEPT_DISKS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The settings of a tier that left the configuration while a disk of it holds volumes.
fn draining_tier(name: &str) -> TierConfig {
    TierConfig {
        name: name.to_string(),
        disks: Vec::new(),
        capacity: None,
        reserved: 0,
        free_space_floor: None,
        memory_budget: store::DEFAULT_MEMORY_BUDGET,
    }
}

/// Opens (or creates) the store of disk `path` of `tier`.
fn open_disk(tier: &TierConfig, path: &Path, metrics: &Metrics) -> Result<Disk, VolumeError> {
    let opts = StoreOptions {
        free_space_floor: tier.free_space_floor,
        memory_budget: tier.memory_budget,
        ..Default::default()
    };
    let store = Store::open_or_create(path, &opts).map_err(|source| VolumeError::Store {
        disk: path.to_path_buf(),
        source,
    })?;
    metrics.watch_store(&tier.name, &store);
    Ok(Disk {
        tier: tier.name.clone(),
        path: path.to_path_buf(),
        store,
        draining: false,
    })
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
    /// Gone from the configuration but holding volumes: still served, given no new
    /// volumes, kept across restarts (see [`KEPT_DISKS_FILE`]) until it is empty.
    draining: bool,
}

/// Where the agent keeps the disks that left its configuration while holding volumes, so
/// that the next start opens them too (their volumes are never left behind).
pub const KEPT_DISKS_FILE: &str = "kept-disks.json";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct KeptDisk {
    tier: String,
    path: PathBuf,
}

/// The stores of the node's disks and the mounts being served.
pub struct VolumeManager {
    root: PathBuf,
    tiers: Vec<TierConfig>,
    disks: Vec<Disk>,
    /// The mounts being served, with the spec last applied to each (so the store is asked
    /// about limits only when the PV's spec changes, not on every round).
    served: BTreeMap<String, (Served, VolumeSpec, Option<String>)>,
    /// Served PVs that no PV of the plan names any more (warned about once).
    orphaned: BTreeSet<String>,
    /// PVs served before (see [`VolumeManager::remember_served`]).
    known: BTreeSet<String>,
    /// Empty disks removed from the configuration: their stores stay open (their control
    /// sockets hold them) for a configuration that adds them again.
    retired: Vec<Disk>,
    metrics: Arc<Metrics>,
    serve_options: ServeOptions,
    /// The fd holder's ownership session the served connections were last handed under.
    held_session: Option<u64>,
}

impl VolumeManager {
    /// Opens (creating where needed) the store of every disk of every tier.
    pub fn open(config: &AgentConfig, metrics: Arc<Metrics>) -> Result<VolumeManager, VolumeError> {
        let mut disks = Vec::new();
        for tier in &config.tiers {
            for path in &tier.disks {
                disks.push(open_disk(tier, path, &metrics)?);
            }
        }
        let mut tiers = config.tiers.clone();
        for kept in load_kept(&config.root) {
            if disks.iter().any(|d| d.path == kept.path) {
                continue;
            }
            let tier = tiers
                .iter()
                .find(|t| t.name == kept.tier)
                .cloned()
                .unwrap_or_else(|| draining_tier(&kept.tier));
            match open_disk(&tier, &kept.path, &metrics) {
                Ok(mut d) => {
                    tracing::warn!(disk = %kept.path.display(), tier = %kept.tier, "disk no longer configured but holding volumes: served, given no new volumes");
                    d.draining = true;
                    if !tiers.iter().any(|t| t.name == kept.tier) {
                        tiers.push(tier);
                    }
                    disks.push(d);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a disk kept for its volumes cannot be opened")
                }
            }
        }
        Ok(VolumeManager {
            root: config.root.clone(),
            tiers,
            disks,
            served: BTreeMap::new(),
            orphaned: BTreeSet::new(),
            known: BTreeSet::new(),
            retired: Vec::new(),
            metrics,
            serve_options: ServeOptions {
                allow_other: true,
                threads: 4,
                split_data: config.split_data,
                max_dirty: config.max_dirty,
                ..ServeOptions::default()
            },
            held_session: None,
        })
    }

    /// Applies the tiers of a changed configuration (see [`super::reload`]): opens the
    /// disks that are new, moves an empty disk to its new tier, forgets an empty disk that
    /// is gone. A disk that holds volumes is never dropped nor moved: it stays in its tier
    /// (capacity, serving) and the refusal is reported, until its volumes are gone.
    pub fn reconfigure(&mut self, tiers: &[TierConfig]) -> Reconfigured {
        let mut out = Reconfigured::default();
        let wanted = |path: &Path| tiers.iter().find(|t| t.disks.iter().any(|d| d == path));
        let mut kept_tiers = BTreeSet::new();
        let mut i = 0;
        while i < self.disks.len() {
            let d = &self.disks[i];
            let to = wanted(&d.path);
            if to.is_some_and(|t| t.name == d.tier) {
                self.disks[i].draining = false;
                i += 1;
                continue;
            }
            let volumes = d.store.volume_names().map_or(usize::MAX, |v| v.len());
            if volumes > 0 {
                let what = match to {
                    Some(t) => format!("moving it to tier {:?}", t.name),
                    None => "removing it".to_string(),
                };
                out.refused.push(format!(
                    "disk {} of tier {:?} holds volumes: {what} is refused; it stays in tier {:?} until its volumes are gone",
                    d.path.display(),
                    d.tier,
                    d.tier
                ));
                kept_tiers.insert(d.tier.clone());
                self.disks[i].draining = true;
                i += 1;
            } else if let Some(t) = to {
                tracing::info!(disk = %d.path.display(), from = %d.tier, to = %t.name, "empty disk moved to another tier");
                self.disks[i].tier = t.name.clone();
                self.disks[i].draining = false;
                i += 1;
            } else {
                let d = self.disks.remove(i);
                tracing::info!(disk = %d.path.display(), tier = %d.tier, "empty disk removed from the configuration: no longer used");
                out.removed.push(d.path.clone());
                self.retired.push(d);
            }
        }
        for tier in tiers {
            for path in &tier.disks {
                if self.disks.iter().any(|d| d.path == *path) {
                    continue;
                }
                if let Some(i) = self.retired.iter().position(|d| d.path == *path) {
                    let mut d = self.retired.remove(i);
                    d.tier = tier.name.clone();
                    d.draining = false;
                    tracing::info!(disk = %path.display(), tier = %tier.name, "disk added again");
                    self.disks.push(d);
                    continue;
                }
                // A disk added while running must be there (mounted): creating its
                // directory would put a store on whatever filesystem holds the path.
                if !path.is_dir() {
                    out.refused.push(format!(
                        "new disk {} of tier {:?}: no such directory (not mounted yet?); tried again every round",
                        path.display(),
                        tier.name
                    ));
                    out.incomplete = true;
                    continue;
                }
                match open_disk(tier, path, &self.metrics) {
                    Ok(disk) => {
                        tracing::info!(disk = %path.display(), tier = %tier.name, "disk added");
                        out.opened.push(disk.store.clone());
                        self.disks.push(disk);
                    }
                    Err(e) => {
                        out.refused.push(format!("new disk not opened: {e}"));
                        out.incomplete = true;
                    }
                }
            }
        }
        // A tier gone from the configuration stays while a disk of it holds volumes.
        let mut new_tiers = tiers.to_vec();
        for t in &self.tiers {
            if kept_tiers.contains(&t.name) && !new_tiers.iter().any(|n| n.name == t.name) {
                new_tiers.push(t.clone());
            }
        }
        self.tiers = new_tiers;
        self.save_kept();
        out
    }

    /// Records the draining disks for the next start ([`KEPT_DISKS_FILE`]).
    fn save_kept(&self) {
        let kept: Vec<KeptDisk> = self
            .disks
            .iter()
            .filter(|d| d.draining)
            .map(|d| KeptDisk {
                tier: d.tier.clone(),
                path: d.path.clone(),
            })
            .collect();
        let path = self.root.join(KEPT_DISKS_FILE);
        let write = std::fs::create_dir_all(&self.root).and_then(|()| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&kept).unwrap_or_default())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)
        });
        if let Err(e) = write {
            tracing::warn!(error = %e, "cannot record the disks kept for their volumes");
        }
    }

    /// Serves through the FUSE connection holder: mounts outlive this agent, and the next
    /// agent takes them over (see [`crate::fdstore`]).
    pub fn set_fdstore(&mut self, fdstore: Option<FdStore>) {
        self.serve_options.fdstore = fdstore;
    }

    /// Hands the holder again every connection it lost (it restarted: its table is empty),
    /// so that an agent restart after a holder restart still ends no mount.
    /// After a new ownership session (the holder restarted) every connection is handed
    /// again, under it, so that a hand-over can reach this agent.
    pub fn hold_again_if_lost(&mut self) {
        let Some(holder) = &self.serve_options.fdstore else {
            return;
        };
        let Some(session) = holder.session() else {
            return; // Lost, not open again yet: the next round.
        };
        let new_session = self.held_session.is_some_and(|s| s != session);
        self.held_session = Some(session);
        let Ok(keys) = holder.list() else {
            return;
        };
        let keys: BTreeSet<String> = keys.into_iter().collect();
        let mut again = 0;
        for (pv, (served, _, _)) in &self.served {
            match served.held_key() {
                Some(key) if new_session || !keys.contains(key) => {
                    match served.hold_again(holder) {
                        Ok(()) => again += 1,
                        Err(e) => {
                            tracing::warn!(pv, error = %e, "cannot hand the connection to the holder again")
                        }
                    }
                }
                _ => {}
            }
        }
        if again > 0 {
            tracing::warn!(
                count = again,
                "the fd holder had lost connections (restarted?); handed them again"
            );
        }
    }

    /// Drops the held connections of this node's volumes that nothing will serve: not
    /// served now, and no PV of `plan` wants them served (a volume the last run served
    /// whose PV was cleaned up or vanished meanwhile, or a connection whose release
    /// failed before). Their mounts end (ENOTCONN) instead of keeping callers waiting
    /// for a server that will not come. A wanted volume that failed to start keeps its
    /// held connection: the next round tries again, and its callers only wait.
    pub fn release_unwanted_held(&self, plan: &Plan) {
        let Some(holder) = &self.serve_options.fdstore else {
            return;
        };
        let Ok(keys) = holder.list() else {
            return;
        };
        let served: BTreeSet<String> = self
            .served
            .values()
            .map(|(s, _, _)| s.mountpoint.display().to_string())
            .collect();
        let root = self.root.display().to_string();
        let wanted: BTreeSet<String> = plan
            .wanted
            .iter()
            .filter_map(|w| match w {
                Wanted::Serve { pv, .. } | Wanted::Broken { pv, .. } => {
                    Some(crate::k8s::layout::volume_paths(&root, pv).mount_point)
                }
                Wanted::Cleanup { .. } => None,
            })
            .collect();
        for key in unwanted_held(&held_key_prefix(&self.root), keys, &served, &wanted) {
            tracing::warn!(
                mountpoint = key,
                "a held connection that no volume is served on or wanted for; ending it"
            );
            if let Err(e) = holder.remove(&key) {
                tracing::warn!(error = %e, "cannot drop a held connection");
            }
        }
    }

    /// The stores, for the control sockets.
    pub fn stores(&self) -> Vec<Store> {
        self.disks.iter().map(|d| d.store.clone()).collect()
    }

    /// Names of the PVs being served.
    pub fn served(&self) -> Vec<String> {
        self.served.keys().cloned().collect()
    }

    /// The quota each served PV's mount enforces now (its spec last applied to the store:
    /// a changed spec is recorded only once its quota is live).
    pub fn applied_quotas(&self) -> BTreeMap<String, u64> {
        self.served
            .iter()
            .map(|(pv, (_, spec, _))| (pv.clone(), spec.quota_bytes))
            .collect()
    }

    /// Brings the node in line with `plan`: serves what is wanted, cleans up what is released,
    /// and stops serving PVs the plan no longer names (their data stays).
    pub fn apply(&mut self, plan: &Plan) -> Outcome {
        let mut out = Outcome::default();
        let mut keep = BTreeSet::new();
        for w in &plan.wanted {
            match w {
                Wanted::Serve { pv, spec, uid, key } => {
                    keep.insert(pv.clone());
                    match self.ensure_served(pv, spec, uid.as_deref(), key.as_ref()) {
                        Ok(true) => out.started.push(pv.clone()),
                        Ok(false) => {}
                        Err(e) => out.errors.push(e),
                    }
                }
                Wanted::Cleanup { pv, delete_data } => match self.cleanup(pv, *delete_data) {
                    Ok(()) => out.cleaned.push(pv.clone()),
                    Err(e) => out.errors.push(e),
                },
                Wanted::Broken { pv, message } => {
                    // Served already: a bad annotation does not cut off the pod using it.
                    keep.insert(pv.clone());
                    out.errors.push(VolumeError::BadSpec {
                        pv: pv.clone(),
                        message: message.clone(),
                    })
                }
            }
        }
        // A served PV the plan no longer names (its PV object vanished without our cleanup,
        // lost its node label, or turned Broken) keeps being served: a pod may still use it,
        // and only a cleanup (its claim released) or a shutdown may end a pod's access.
        // A new PV of the same name is checked against the volume's owner (ensure_served).
        for pv in self.served.keys() {
            if !keep.contains(pv) && self.orphaned.insert(pv.clone()) {
                tracing::warn!(pv, "served volume no longer named by any PV of this node; kept serving until its PV is cleaned up");
            }
        }
        self.orphaned
            .retain(|pv| self.served.contains_key(pv) && !keep.contains(pv));
        out
    }

    /// PVs that were served at some point: by this process, or by the last run (local
    /// state). Such a PV whose volume no store holds lost its data (a disk not mounted,
    /// a store deleted by hand): it is reported, never recreated empty.
    pub fn remember_served(&mut self, pvs: impl IntoIterator<Item = String>) {
        self.known.extend(pvs);
    }

    /// Serves `pv`, creating its volume first if no store holds it. Returns whether it was
    /// (re)started in this call.
    fn ensure_served(
        &mut self,
        pv: &str,
        spec: &VolumeSpec,
        uid: Option<&str>,
        key: Option<&store::MasterKey>,
    ) -> Result<bool, VolumeError> {
        if let Some((s, applied, owner)) = self.served.get(pv) {
            if !s.finished() {
                let new_owner = uid.is_some() && owner.as_deref() != uid;
                let new_spec = applied != spec;
                if new_owner {
                    // Another PV object of the same name: the volume must belong to it.
                    self.check_owner(pv, uid)?;
                }
                if new_spec {
                    self.ensure_quota(pv, spec)?;
                }
                if let Some((_, applied, owner)) = self.served.get_mut(pv) {
                    *applied = spec.clone();
                    *owner = uid.map(str::to_string);
                }
                return Ok(false);
            }
            // Someone unmounted it (or the session died): serve it again.
            tracing::warn!(pv, "mount ended unexpectedly; serving it again");
            if let Some((s, _, _)) = self.served.remove(pv) {
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
            None if self.known.contains(pv) => {
                return Err(VolumeError::VolumeMissing { pv: pv.into() })
            }
            None => self.create_volume(pv, spec, key)?,
        };
        self.check_encryption(disk, pv, spec)?;
        if let Some(key) = key {
            self.disks[disk]
                .store
                .unlock(pv, key)
                .map_err(|source| VolumeError::Volume {
                    pv: pv.into(),
                    source,
                })?;
        }
        if let Some(uid) = uid {
            self.disks[disk]
                .store
                .claim_volume(pv, uid)
                .map_err(|source| VolumeError::Volume {
                    pv: pv.into(),
                    source,
                })?;
        }
        self.ensure_quota(pv, spec)?;
        self.warn_if_other_compression(disk, pv, spec);
        let paths = volume_paths(&self.root.to_string_lossy(), pv);
        let mount_point = PathBuf::from(&paths.mount_point);
        // Held: the mount is live and waits for this server (a stat would wait too).
        let held = mount::is_held(&self.serve_options, &mount_point);
        // A mount left by a killed agent: stat fails with ENOTCONN, so detach it first.
        if !held && mount::is_stale(&mount_point) {
            tracing::warn!(pv, "detaching the stale mount of a previous agent");
            let _ = mount::detach(&mount_point);
        }
        make_host_dirs(&paths).map_err(|source| VolumeError::Io {
            pv: pv.into(),
            path: mount_point.clone(),
            source,
        })?;
        // The host-side mount point must stay empty (see k8s::layout): a file there would
        // be hidden under the mount, and `mnt/data` existing on the host would let a pod
        // start on the bare host disk whenever the volume is not served.
        if !held && !mount::is_mounted(&mount_point) && !dir_is_empty(&mount_point) {
            return Err(VolumeError::MountPointNotEmpty {
                pv: pv.into(),
                path: mount_point,
            });
        }
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
        self.served.insert(
            pv.to_string(),
            (served, spec.clone(), uid.map(str::to_string)),
        );
        self.known.insert(pv.to_string());
        tracing::info!(pv, disk = %self.disks[disk].path.display(), "serving volume");
        Ok(true)
    }

    /// Makes sure the served volume `pv` belongs to the PV object `uid`; if it belongs to
    /// another (a PV deleted and made again under the same name), stops serving it: the
    /// new object's pod must never reach the previous tenant's data.
    fn check_owner(&mut self, pv: &str, uid: Option<&str>) -> Result<(), VolumeError> {
        let (Some(uid), Some(i)) = (uid, self.disk_holding(pv)?) else {
            return Ok(());
        };
        if let Err(source) = self.disks[i].store.claim_volume(pv, uid) {
            self.unserve(pv)?;
            return Err(VolumeError::Volume {
                pv: pv.into(),
                source,
            });
        }
        Ok(())
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

    fn create_volume(
        &mut self,
        pv: &str,
        spec: &VolumeSpec,
        key: Option<&store::MasterKey>,
    ) -> Result<usize, VolumeError> {
        let encryption = match (spec.encryption, key) {
            (store::Encryption::None, _) => None,
            (_, Some(key)) => Some(key.clone()),
            (_, None) => {
                return Err(VolumeError::Volume {
                    pv: pv.into(),
                    source: store::Error::KeyRequired(pv.into()),
                })
            }
        };
        let candidates: Vec<usize> = (0..self.disks.len())
            .filter(|&i| self.disks[i].tier == spec.tier && !self.disks[i].draining)
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
        let new = crate::store::NewVolume {
            quota: Some(spec.quota_bytes),
            inode_limit: spec.inode_limit,
            compression: spec.compression,
            encryption,
        };
        self.disks[best]
            .store
            .create_volume_with(pv, &new)
            .map_err(|source| VolumeError::Volume {
                pv: pv.into(),
                source,
            })?;
        tracing::info!(pv, disk = %self.disks[best].path.display(), quota = spec.quota_bytes, compression = %spec.compression, "created volume");
        Ok(best)
    }

    /// Compression is fixed when a volume is created: a PV whose spec asks for another one
    /// (a volume created by an agent that did not know compression, a static PV of a class
    /// with `compression`) is served as it is, with a warning saying so.
    fn warn_if_other_compression(&self, disk: usize, pv: &str, spec: &VolumeSpec) {
        if let Ok(info) = self.disks[disk].store.inspect_volume(pv) {
            let has = info.compression.algorithm;
            if has != spec.compression {
                tracing::warn!(pv, compression = %has, asked = %spec.compression,
                    "the volume was created with another compression, fixed at creation: serving it as it is");
            }
        }
    }

    /// Encryption is fixed when a volume is created: a volume whose encryption is not the
    /// one its PV's spec asks for is not served (a class that promises sealed data must
    /// not get plain data, e.g. of a volume an agent older than encryption created; a
    /// sealed volume has no key under a spec without encryption).
    fn check_encryption(
        &self,
        disk: usize,
        pv: &str,
        spec: &VolumeSpec,
    ) -> Result<(), VolumeError> {
        let has = self.disks[disk]
            .store
            .inspect_volume(pv)
            .map_err(|source| VolumeError::Volume {
                pv: pv.into(),
                source,
            })?
            .encryption
            .algorithm;
        if has != spec.encryption {
            return Err(VolumeError::Unsupported {
                pv: pv.into(),
                message: format!(
                    "the volume has encryption {has}, its PV asks for {}: encryption is fixed when a volume is created; not serving it",
                    spec.encryption
                ),
            });
        }
        Ok(())
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
        if let Some((s, _, _)) = self.served.remove(pv) {
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
        self.known.remove(pv);
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

    /// Capacity per tier: total (the size of the disks' filesystems less each disk's
    /// free-space floor, lowered to the configured cap) minus reserved, and allocated
    /// = the sum of the quotas of every volume in the tier's stores, also those whose PV
    /// is gone (Retain leftovers still take their space).
    pub fn capacity(&self) -> Vec<TierStatus> {
        self.tiers
            .iter()
            .map(|t| {
                let disks: Vec<&Disk> = self.disks.iter().filter(|d| d.tier == t.name).collect();
                // A draining disk offers nothing: its volumes count, its room does not.
                let offering = disks.iter().filter(|d| !d.draining);
                let size = offering
                    .clone()
                    .map(|d| fs_size(&d.path).unwrap_or(0))
                    .fold(0, u64::saturating_add);
                let floors = offering
                    .map(|d| d.store.free_space_floor().0)
                    .fold(0, u64::saturating_add);
                // The disks can offer their size less the floors; a cap only lowers that.
                let usable = size.saturating_sub(floors);
                let raw = t.capacity.map_or(usable, |cap| cap.min(usable));
                let allocated = disks
                    .iter()
                    .map(|d| allocated_in(&d.store))
                    .fold(0, u64::saturating_add);
                TierStatus::new(
                    t.name.clone(),
                    raw.saturating_sub(t.reserved),
                    allocated,
                    disks
                        .iter()
                        .map(|d| d.path.to_string_lossy().into_owned())
                        .collect(),
                )
            })
            .collect()
    }

    /// Unmounts everything (data stays). Used on shutdown: every mount is unmounted first,
    /// then the sessions get one shared grace period to end before the connections still
    /// in use by pods are aborted (the process exit would end them anyway).
    pub fn shutdown(&mut self) {
        let served: Vec<Served> = std::mem::take(&mut self.served)
            .into_values()
            .map(|(s, _, _)| s)
            .collect();
        let mut served = self.leave_to_next_agent(served);
        for s in &mut served {
            if let Err(e) = s.unmount() {
                tracing::warn!(error = %e, "unmount on shutdown failed");
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for s in served {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if let Err(e) = s.stop(left) {
                tracing::warn!(error = %e, "unmount on shutdown failed");
            }
        }
        for d in &self.disks {
            if let Err(e) = d.store.sync() {
                tracing::warn!(disk = %d.path.display(), error = %e, "sync on shutdown failed");
            }
        }
    }

    /// With the holder: makes every store durable and leaves every held mount to the
    /// next agent (the process must exit right after). Returns the mounts not held.
    fn leave_to_next_agent(&self, served: Vec<Served>) -> Vec<Served> {
        if self.serve_options.fdstore.is_none() || served.is_empty() {
            return served;
        }
        // First every connection stops and finishes what it read (one shared limit),
        // then the stores are synced: nothing answered is lost, nothing is half-done.
        crate::mount::drain(&served, crate::mount::DRAIN_LIMIT);
        for d in &self.disks {
            if let Err(e) = d.store.sync() {
                tracing::error!(disk = %d.path.display(), error = %e, "sync before the hand-over failed");
            }
        }
        let left: Vec<Served> = served
            .into_iter()
            .filter_map(Served::leave_to_next_server)
            .collect();
        tracing::info!(unheld = left.len(), "volumes left to the next agent");
        left
    }

    /// Gives back idle memtables of every store (called periodically).
    pub fn flush_idle(&self) {
        for d in &self.disks {
            let _ = d.store.flush_if_idle(1 << 20);
            d.store.reclaim_if_wanted();
        }
    }
}

impl Drop for VolumeManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The held keys of this node's volumes (under `prefix`) that are neither served nor
/// wanted.
fn unwanted_held(
    prefix: &str,
    held: Vec<String>,
    served: &BTreeSet<String>,
    wanted: &BTreeSet<String>,
) -> Vec<String> {
    held.into_iter()
        .filter(|k| k.starts_with(prefix) && !served.contains(k) && !wanted.contains(k))
        .collect()
}

/// The prefix of the holder's keys of this node's volumes (their mount points under
/// `<root>/volumes/`).
pub fn held_key_prefix(root: &Path) -> String {
    format!("{}/", root.join("volumes").display())
}

/// Creates `<root>/volumes/<pv>/mnt` with the PV's directories root-only (0700): pods
/// reach a volume through kubelet's bind mount, never through the host path, so no other
/// host user may walk into a tenant's volume (the `data` directory inside it is 0777).
fn make_host_dirs(paths: &crate::k8s::layout::VolumePaths) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = Path::new(&paths.dir);
    if let Some(volumes) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(volumes)?;
        std::fs::set_permissions(volumes, std::fs::Permissions::from_mode(0o700))?;
    }
    for d in [dir, Path::new(&paths.mount_point)] {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Unreadable counts as empty: the mount that follows reports the real error.
fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut it| it.next().is_none())
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
            | VolumeError::MountPointNotEmpty { pv, .. }
            | VolumeError::VolumeMissing { pv }
            | VolumeError::UnknownTier { pv, .. }
            | VolumeError::BadSpec { pv, .. }
            | VolumeError::Unsupported { pv, .. } => pv,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_held_connections_of_this_node_that_nothing_serves_or_wants_are_released() {
        let prefix = held_key_prefix(Path::new("/var/lib/fusevol"));
        let key = |pv: &str| format!("{prefix}{pv}/mnt");
        let held = vec![
            key("served"),
            key("wanted-but-failing"),
            key("cleaned-up"),
            key("vanished"),
            "/other/root/volumes/x/mnt".to_string(),
        ];
        let served = BTreeSet::from([key("served")]);
        let wanted = BTreeSet::from([key("served"), key("wanted-but-failing")]);
        assert_eq!(
            unwanted_held(&prefix, held, &served, &wanted),
            vec![key("cleaned-up"), key("vanished")],
            "a wanted volume that failed to start keeps its connection; another root's keys are not ours"
        );
    }
}
