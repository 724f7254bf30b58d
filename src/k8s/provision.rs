//! The controller's provisioning decision for one claim, as a pure function of a snapshot of
//! the cluster ([`decide`]), and the helpers that read fusevol's PersistentVolumes.
//!
//! Capacity accounting: the free space of a node's tier is
//! `total − allocated − reserved`, where
//! - `total` is what the node's agent publishes for the tier in its [`FusevolNode`] status,
//! - `allocated` is the sum of the sizes of fusevol PVs pinned to that node and tier
//!   (whatever their phase: a Released or terminating PV still holds its data; a PV's size is
//!   the larger of its capacity and its volume-spec quota, which differ while it grows), and
//! - `reserved` is the sum of the controller's in-flight [`Reservation`]s for that node and tier
//!   made by OTHER claims, each for the bytes its claim's PV in the snapshot does not occupy
//!   yet ([`pending_bytes`]: all of them before the PV exists, the growth while it is being
//!   expanded, none once the snapshot shows the PV at the reserved size).
//!
//! The caller records the [`Reservation`] returned with [`Decision::Create`] (or with an
//! expansion, [`super::expand`]) before it writes the PV, and drops it once its cache shows
//! the PV at that size (or the write failed): two claims racing for one node then never
//! over-commit it, as the second decision sees the first's reservation.
//!
//! Binding modes: with `WaitForFirstConsumer` the controller acts only once the scheduler has
//! annotated the claim with [`ANNOTATION_SELECTED_NODE`]; if that node cannot hold the volume
//! the decision is [`Decision::Reschedule`], and the controller removes the annotation (the
//! scheduler then picks again) and posts a Warning event with the message. With `Immediate`
//! the controller picks, among the nodes allowed by the class's `allowedTopologies`, the one
//! whose tier has the most free space.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crd::FusevolNode;
use super::layout::{validate_root, volume_paths};
use super::params::{BindingMode, VolumeRequest, VolumeSpec};
use super::{
    display_bytes, is_label_value, ANNOTATION_NODE, ANNOTATION_PROVISIONED_BY,
    ANNOTATION_SELECTED_NODE, ANNOTATION_TIER, ANNOTATION_VOLUME_SPEC, FINALIZER_DATA_CLEANUP,
    LABEL_HOSTNAME, PROVISIONER,
};
use crate::size::{format_bytes, parse_quantity};

/// Capacity the controller has promised to a claim whose PV it is creating or growing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub node: String,
    pub tier: String,
    /// The size the claim's PV will have (not the growth: see [`pending_bytes`]).
    pub bytes: u64,
    pub claim_uid: String,
}

/// What the controller knows of the cluster when it decides: the agents' published capacity,
/// the existing PVs (all of them; non-fusevol PVs are ignored) and its own reservations.
#[derive(Debug, Clone, Copy)]
pub struct ClusterState<'a> {
    pub nodes: &'a [FusevolNode],
    pub pvs: &'a [PersistentVolume],
    pub reservations: &'a [Reservation],
}

/// What the controller should do about a claim.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Record `reservation`, then create `pv` (boxed: a PV is far larger than the other
    /// variants).
    Create {
        pv: Box<PersistentVolume>,
        reservation: Reservation,
    },
    /// The claim's PV (`pv_name`) exists already: nothing to do (e.g. after a restart).
    AlreadyProvisioned { pv_name: String },
    /// The node the scheduler selected cannot hold the volume: remove the claim's
    /// selected-node annotation and post a Warning event with `message`.
    Reschedule { message: String },
    /// The claim cannot be provisioned as it is (bad parameters, no node fits): post a Warning
    /// event with `message` and retry later.
    Fail { message: String },
    /// WaitForFirstConsumer claim whose node the scheduler has not selected yet.
    Wait,
    /// Not a claim for this provisioner to act on (other provisioner, being deleted, bound to
    /// another PV).
    Skip { reason: String },
}

/// How full a node's tier is, as the controller accounts it (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierUsage {
    pub total: u64,
    pub allocated: u64,
    pub reserved: u64,
}

impl TierUsage {
    /// Bytes still free: `total − allocated − reserved`, 0 when over-committed.
    pub fn free(&self) -> u64 {
        self.total
            .saturating_sub(self.allocated)
            .saturating_sub(self.reserved)
    }
}

/// Why a volume cannot go on a node; the message is what the Warning event says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("node {node} has no fusevol agent (no FusevolNode {node:?})")]
    NoAgent { node: String },
    #[error("node {node}: FusevolNode spec.root {root:?} is refused ({why}); PV paths are built under it")]
    BadRoot {
        node: String,
        root: String,
        why: String,
    },
    #[error("node {node}: the fusevol agent has not published its capacity yet")]
    NoCapacityPublished { node: String },
    #[error("node {node} has no tier {tier:?} (its tiers: {available})")]
    UnknownTier {
        node: String,
        tier: String,
        available: String,
    },
    #[error(
        "node {node} tier {tier:?}: requested {}, free {} (total {}, allocated {}{})",
        display_bytes(*.requested),
        display_bytes(.usage.free()),
        display_bytes(.usage.total),
        display_bytes(.usage.allocated),
        reserved_note(.usage)
    )]
    InsufficientCapacity {
        node: String,
        tier: String,
        requested: u64,
        usage: TierUsage,
    },
    #[error("node {node} is not allowed by the StorageClass's allowedTopologies")]
    TopologyNotAllowed { node: String },
    #[error("StorageClass allowedTopologies key {key:?} is not supported with volumeBindingMode Immediate; allowed keys: {LABEL_HOSTNAME} (or use volumeBindingMode WaitForFirstConsumer)")]
    UnsupportedTopologyKey { key: String },
}

fn reserved_note(usage: &TierUsage) -> String {
    if usage.reserved == 0 {
        String::new()
    } else {
        format!(
            ", reserved for claims being provisioned {}",
            display_bytes(usage.reserved)
        )
    }
}

/// The name of the PV provisioned for the claim with uid `claim_uid`.
pub fn pv_name_for_claim(claim_uid: &str) -> String {
    format!("pvc-{claim_uid}")
}

/// Is `pv` one of fusevol's (annotated as provisioned by [`PROVISIONER`])?
pub fn is_fusevol_pv(pv: &PersistentVolume) -> bool {
    annotation(&pv.metadata, ANNOTATION_PROVISIONED_BY) == Some(PROVISIONER)
}

/// The node a fusevol PV is pinned to: its [`ANNOTATION_NODE`], else the single
/// `kubernetes.io/hostname` value of its node affinity.
pub fn pv_node(pv: &PersistentVolume) -> Option<&str> {
    if let Some(node) = annotation(&pv.metadata, ANNOTATION_NODE) {
        return Some(node);
    }
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let mut hostnames = terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == LABEL_HOSTNAME && e.operator == "In")
        .flat_map(|e| e.values.iter().flatten());
    match (hostnames.next(), hostnames.next()) {
        (Some(node), None) => Some(node.as_str()),
        _ => None,
    }
}

/// The tier of a fusevol PV ([`ANNOTATION_TIER`]).
pub fn pv_tier(pv: &PersistentVolume) -> Option<&str> {
    annotation(&pv.metadata, ANNOTATION_TIER)
}

/// The [`VolumeSpec`] the agent must serve for a PV, if it carries one.
pub fn pv_volume_spec(pv: &PersistentVolume) -> Option<Result<VolumeSpec, serde_json::Error>> {
    annotation(&pv.metadata, ANNOTATION_VOLUME_SPEC).map(VolumeSpec::from_annotation)
}

/// The bytes a PV occupies: the larger of its `capacity.storage` and the quota of its volume
/// spec (during an expansion the quota grows first, the capacity once the agent applied it).
pub fn pv_capacity_bytes(pv: &PersistentVolume) -> Option<u64> {
    let capacity = pv
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| parse_quantity(&q.0).ok());
    let quota = pv_volume_spec(pv)
        .and_then(Result::ok)
        .map(|s| s.quota_bytes);
    capacity.max(quota)
}

/// The PV of the claim with uid `claim_uid` among `pvs`: the one named for it
/// ([`pv_name_for_claim`]) or whose `claimRef` names it.
pub fn claim_pv<'a>(claim_uid: &str, pvs: &'a [PersistentVolume]) -> Option<&'a PersistentVolume> {
    let name = pv_name_for_claim(claim_uid);
    pvs.iter().find(|pv| {
        pv.metadata.name.as_deref() == Some(name.as_str())
            || pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.uid.as_deref())
                == Some(claim_uid)
    })
}

/// The bytes of `reservation` that its claim's PV in `pvs` does not occupy yet: all of them
/// while the PV is not there, the growth while it is smaller, 0 once it has the reserved size.
pub fn pending_bytes(reservation: &Reservation, pvs: &[PersistentVolume]) -> u64 {
    let occupied = claim_pv(&reservation.claim_uid, pvs)
        .and_then(pv_capacity_bytes)
        .unwrap_or(0);
    reservation.bytes.saturating_sub(occupied)
}

/// Sum of the capacities of the fusevol PVs pinned to `node` in `tier`.
pub fn allocated_on(node: &str, tier: &str, pvs: &[PersistentVolume]) -> u64 {
    pvs.iter()
        .filter(|pv| is_fusevol_pv(pv) && pv_node(pv) == Some(node) && pv_tier(pv) == Some(tier))
        .filter_map(pv_capacity_bytes)
        .fold(0, u64::saturating_add)
}

/// Sum of the reservations on `node`/`tier` of claims other than `claim_uid`, each for the
/// bytes its PV in `pvs` does not occupy yet ([`pending_bytes`]; what a PV occupies is
/// counted by [`allocated_on`] instead).
pub fn reserved_on(
    node: &str,
    tier: &str,
    claim_uid: &str,
    reservations: &[Reservation],
    pvs: &[PersistentVolume],
) -> u64 {
    reservations
        .iter()
        .filter(|r| r.node == node && r.tier == tier && r.claim_uid != claim_uid)
        .map(|r| pending_bytes(r, pvs))
        .fold(0, u64::saturating_add)
}

/// How full `tier` of `node` is for the claim with uid `claim_uid` (whose own reservation is
/// not counted); `None` when the node has published no such tier.
pub fn tier_usage(
    node: &FusevolNode,
    tier: &str,
    claim_uid: &str,
    cluster: &ClusterState<'_>,
) -> Option<TierUsage> {
    let published = node.tier(tier)?;
    let name = &node.spec.node_name;
    // The agent's own count covers volumes whose PV is gone (Retain leftovers still take
    // their space); the PVs cover what the agent has not published yet. Take the larger.
    let allocated = allocated_on(name, tier, cluster.pvs).max(published.allocated_bytes);
    Some(TierUsage {
        total: published.total_bytes,
        allocated,
        reserved: reserved_on(name, tier, claim_uid, cluster.reservations, cluster.pvs),
    })
}

/// Decides what to do about `claim` of StorageClass `class`. See the module doc.
pub fn decide(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    cluster: &ClusterState<'_>,
) -> Decision {
    if class.provisioner != PROVISIONER {
        return Decision::Skip {
            reason: format!(
                "StorageClass provisioner is {:?}, not {PROVISIONER}",
                class.provisioner
            ),
        };
    }
    if claim.metadata.deletion_timestamp.is_some() {
        return Decision::Skip {
            reason: "the claim is being deleted".into(),
        };
    }
    let Some(uid) = claim.metadata.uid.as_deref() else {
        return Decision::Fail {
            message: "the claim has no metadata.uid".into(),
        };
    };
    let pv_name = pv_name_for_claim(uid);
    let bound_to = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    let pv_exists = cluster
        .pvs
        .iter()
        .any(|pv| pv.metadata.name.as_deref() == Some(pv_name.as_str()));
    if pv_exists || bound_to == Some(pv_name.as_str()) {
        return Decision::AlreadyProvisioned { pv_name };
    }
    if let Some(other) = bound_to.filter(|v| !v.is_empty()) {
        return Decision::Skip {
            reason: format!("the claim is bound to PersistentVolume {other}"),
        };
    }

    let request = match VolumeRequest::new(claim, class) {
        Ok(request) => request,
        Err(e) => {
            return Decision::Fail {
                message: e.to_string(),
            }
        }
    };
    let selected = annotation(&claim.metadata, ANNOTATION_SELECTED_NODE);
    let placement = match (selected, request.binding_mode) {
        (Some(node), _) => place_on_selected(node, &request, class, uid, cluster).map_err(|e| {
            Decision::Reschedule {
                message: e.to_string(),
            }
        }),
        (None, BindingMode::WaitForFirstConsumer) => return Decision::Wait,
        (None, BindingMode::Immediate) => place_anywhere(&request, class, uid, cluster)
            .map_err(|message| Decision::Fail { message }),
    };
    match placement {
        Ok(node) => {
            let pv = build_pv(claim, class, &request, node, &pv_name, uid);
            Decision::Create {
                pv: Box::new(pv),
                reservation: Reservation {
                    node: node.spec.node_name.clone(),
                    tier: request.spec.tier.clone(),
                    bytes: request.spec.quota_bytes,
                    claim_uid: uid.to_string(),
                },
            }
        }
        Err(decision) => decision,
    }
}

/// Checks that the scheduler's node can hold the volume.
fn place_on_selected<'a>(
    node_name: &str,
    request: &VolumeRequest,
    class: &StorageClass,
    claim_uid: &str,
    cluster: &ClusterState<'a>,
) -> Result<&'a FusevolNode, PlacementError> {
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.spec.node_name == node_name)
        .ok_or_else(|| PlacementError::NoAgent {
            node: node_name.to_string(),
        })?;
    // The scheduler honours allowedTopologies already; this only catches a hand-set annotation.
    // Keys this function cannot evaluate are left to the scheduler.
    if topology_allows(class, node.hostname()) == Ok(false) {
        return Err(PlacementError::TopologyNotAllowed {
            node: node_name.to_string(),
        });
    }
    check_fits(node, request, claim_uid, cluster).map(|_| node)
}

/// Picks the allowed node whose tier has the most free space (ties: the first by name).
fn place_anywhere<'a>(
    request: &VolumeRequest,
    class: &StorageClass,
    claim_uid: &str,
    cluster: &ClusterState<'a>,
) -> Result<&'a FusevolNode, String> {
    let mut nodes: Vec<&FusevolNode> = cluster.nodes.iter().collect();
    nodes.sort_by(|a, b| a.spec.node_name.cmp(&b.spec.node_name));
    let mut best: Option<(&FusevolNode, u64)> = None;
    let mut refusals = Vec::new();
    let mut allowed_nodes = 0;
    for node in nodes {
        match topology_allows(class, node.hostname()) {
            Err(e) => return Err(e.to_string()),
            Ok(false) => continue,
            Ok(true) => allowed_nodes += 1,
        }
        match check_fits(node, request, claim_uid, cluster) {
            Ok(free) if best.is_none_or(|(_, best_free)| free > best_free) => {
                best = Some((node, free))
            }
            Ok(_) => {}
            Err(e) => refusals.push(e.to_string()),
        }
    }
    if let Some((node, _)) = best {
        return Ok(node);
    }
    let requested = format!(
        "{} in tier {:?}",
        display_bytes(request.spec.quota_bytes),
        request.spec.tier
    );
    Err(if cluster.nodes.is_empty() {
        format!(
            "no node can hold {requested}: no node runs a fusevol agent (no FusevolNode objects)"
        )
    } else if allowed_nodes == 0 {
        format!("no node can hold {requested}: no node with a fusevol agent is allowed by the StorageClass's allowedTopologies")
    } else {
        format!("no node can hold {requested}: {}", refusals.join("; "))
    })
}

/// The free bytes of the request's tier on `node` if the volume fits there.
fn check_fits(
    node: &FusevolNode,
    request: &VolumeRequest,
    claim_uid: &str,
    cluster: &ClusterState<'_>,
) -> Result<u64, PlacementError> {
    let node_name = &node.spec.node_name;
    // A FusevolNode is written by its node's agent: never trust its root into a host path
    // of a PV that kubelet will bind-mount without checking it first.
    validate_root(&node.spec.root).map_err(|why| PlacementError::BadRoot {
        node: node_name.clone(),
        root: node.spec.root.clone(),
        why,
    })?;
    let tier = &request.spec.tier;
    let usage = published_usage(node, tier, claim_uid, cluster)?;
    let free = usage.free();
    if request.spec.quota_bytes > free {
        return Err(PlacementError::InsufficientCapacity {
            node: node_name.clone(),
            tier: tier.clone(),
            requested: request.spec.quota_bytes,
            usage,
        });
    }
    Ok(free)
}

/// [`tier_usage`], or why the node has none for `tier` (no capacity published, no such tier).
pub fn published_usage(
    node: &FusevolNode,
    tier: &str,
    claim_uid: &str,
    cluster: &ClusterState<'_>,
) -> Result<TierUsage, PlacementError> {
    let node_name = &node.spec.node_name;
    let Some(status) = node.status.as_ref() else {
        return Err(PlacementError::NoCapacityPublished {
            node: node_name.clone(),
        });
    };
    tier_usage(node, tier, claim_uid, cluster).ok_or_else(|| PlacementError::UnknownTier {
        node: node_name.clone(),
        tier: tier.to_string(),
        available: if status.tiers.is_empty() {
            "none".into()
        } else {
            let names: Vec<&str> = status.tiers.iter().map(|t| t.name.as_str()).collect();
            names.join(", ")
        },
    })
}

/// Whether the class's `allowedTopologies` allow a node with this `kubernetes.io/hostname`.
/// Terms are ORed, the expressions of a term ANDed; a term without expressions matches
/// nothing (as in Kubernetes). Only `kubernetes.io/hostname` keys can be evaluated here.
fn topology_allows(class: &StorageClass, hostname: &str) -> Result<bool, PlacementError> {
    let terms = match class.allowed_topologies.as_deref() {
        None | Some([]) => return Ok(true),
        Some(terms) => terms,
    };
    let mut allowed = false;
    for term in terms {
        let expressions = term.match_label_expressions.as_deref().unwrap_or_default();
        if let Some(other) = expressions.iter().find(|e| e.key != LABEL_HOSTNAME) {
            return Err(PlacementError::UnsupportedTopologyKey {
                key: other.key.clone(),
            });
        }
        allowed |= !expressions.is_empty()
            && expressions
                .iter()
                .all(|e| e.values.iter().any(|v| v == hostname));
    }
    Ok(allowed)
}

fn build_pv(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    request: &VolumeRequest,
    node: &FusevolNode,
    pv_name: &str,
    claim_uid: &str,
) -> PersistentVolume {
    let node_name = &node.spec.node_name;
    let tier = &request.spec.tier;
    let annotations = BTreeMap::from([
        (
            ANNOTATION_PROVISIONED_BY.to_string(),
            PROVISIONER.to_string(),
        ),
        (
            ANNOTATION_VOLUME_SPEC.to_string(),
            request.spec.to_annotation(),
        ),
        (ANNOTATION_TIER.to_string(), tier.clone()),
        (ANNOTATION_NODE.to_string(), node_name.clone()),
    ]);
    let mut labels = BTreeMap::from([(ANNOTATION_TIER.to_string(), tier.clone())]);
    if is_label_value(node_name) {
        labels.insert(ANNOTATION_NODE.to_string(), node_name.clone());
    }
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name.to_string()),
            annotations: Some(annotations),
            labels: Some(labels),
            finalizers: Some(vec![FINALIZER_DATA_CLEANUP.to_string()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(format_bytes(request.spec.quota_bytes)),
            )])),
            access_modes: Some(request.access_modes.clone()),
            local: Some(LocalVolumeSource {
                path: volume_paths(&node.spec.root, pv_name).local_path,
                fs_type: None,
            }),
            node_affinity: Some(hostname_affinity(node.hostname())),
            persistent_volume_reclaim_policy: Some(request.reclaim_policy.as_str().to_string()),
            mount_options: (!request.mount_options.is_empty())
                .then(|| request.mount_options.clone()),
            storage_class_name: class.metadata.name.clone(),
            volume_mode: Some("Filesystem".to_string()),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".to_string()),
                kind: Some("PersistentVolumeClaim".to_string()),
                namespace: claim.metadata.namespace.clone(),
                name: claim.metadata.name.clone(),
                uid: Some(claim_uid.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Required node affinity on `kubernetes.io/hostname In [hostname]`: what pins a PV to its node.
pub fn hostname_affinity(hostname: &str) -> VolumeNodeAffinity {
    VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: LABEL_HOSTNAME.to_string(),
                    operator: "In".to_string(),
                    values: Some(vec![hostname.to_string()]),
                }]),
                match_fields: None,
            }],
        }),
    }
}

pub(super) fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

#[cfg(test)]
pub(crate) mod tests;
