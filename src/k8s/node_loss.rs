//! What the controller cleans up when a node is gone, as a pure function of the cluster's
//! objects: which nodes fusevol objects still name although no `Node` object does
//! ([`missing_nodes`]), how long each has been missing ([`GoneSince`]), and for one gone node
//! what to do with its `FusevolNode` and each of its PersistentVolumes ([`cleanup`]).
//!
//! The trigger is the deletion of the `Node` object, never `NotReady`: a NotReady node is
//! usually a reboot, a kubelet restart or a network partition, its disks come back and its
//! agent serves the same data again. Kubernetes itself keeps NotReady Nodes; the Node object
//! goes when an operator runs `kubectl delete node` for a machine that is lost, or a cloud
//! node-lifecycle controller or cluster autoscaler deletes it with its VM. That deletion is
//! the statement that the machine and its local disks are gone. The controller still waits a
//! grace period after it first sees the Node missing (a kubelet re-registering under the same
//! name within it cancels everything) and reads the Node from the API server once more before
//! it acts.
//!
//! For a gone node:
//! - its `FusevolNode` is deleted (guarded by its uid: a re-registered agent's new object is
//!   not), and with it the capacity the controller publishes for the node;
//! - a PV being deleted whose data-cleanup finalizer waits for the node's agent (Released or
//!   Failed, or Available in static mode) loses the finalizer: the data is gone with the node;
//! - a Bound PV keeps its claim and its data (never deleted automatically), unless the claim
//!   or its StorageClass opts in with [`ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS`]` = "true"`: then
//!   the claim is deleted (guarded by its uid), so that a StatefulSet can give its pod a fresh
//!   volume on another node. A claim's own annotation wins over its class's, so `"false"` on
//!   a claim opts it out of a class that opts in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crd::FusevolNode;
use super::provision::{is_fusevol_pv, pv_node};
use super::{ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS, FINALIZER_DATA_CLEANUP, LABEL_HOSTNAME};

/// The objects a node-loss decision reads, all from synced caches.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    pub nodes: &'a [Node],
    pub fusevol_nodes: &'a [FusevolNode],
    pub pvs: &'a [PersistentVolume],
    pub claims: &'a [PersistentVolumeClaim],
    pub classes: &'a [StorageClass],
}

/// What to do for one gone node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// The node's `FusevolNode` to delete, if it still exists: (name, uid).
    pub fusevol_node: Option<(String, String)>,
    /// PVs whose data-cleanup finalizer goes (their data went with the node).
    pub finalizers: Vec<String>,
    /// Claims that opted in to deletion.
    pub claims: Vec<ClaimDeletion>,
    /// Bound PVs that stay with their claim.
    pub kept: Vec<KeptVolume>,
}

impl Cleanup {
    /// Whether the cleanup writes anything (kept volumes are only reported).
    pub fn acts(&self) -> bool {
        self.fusevol_node.is_some() || !self.finalizers.is_empty() || !self.claims.is_empty()
    }
}

/// A claim to delete because it opted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimDeletion {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub pv: String,
    pub opted_in: OptIn,
}

/// Where the opt-in annotation was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptIn {
    Claim,
    /// On the claim's StorageClass (named).
    Class(String),
}

/// A Bound PV on a gone node that keeps its claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptVolume {
    pub pv: String,
    pub namespace: String,
    pub claim: String,
    pub claim_uid: String,
}

/// Names of the nodes that a `FusevolNode` or a fusevol PV names but no `Node` object carries
/// (as its name or its `kubernetes.io/hostname` label: a PV without the node annotation is
/// pinned by hostname).
pub fn missing_nodes(s: &Snapshot<'_>) -> BTreeSet<String> {
    let present: BTreeSet<&str> = s
        .nodes
        .iter()
        .flat_map(|n| {
            let label = n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_HOSTNAME));
            n.metadata.name.iter().chain(label).map(String::as_str)
        })
        .collect();
    let named = s
        .fusevol_nodes
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .chain(
            s.pvs
                .iter()
                .filter(|p| is_fusevol_pv(p))
                .filter_map(pv_node),
        );
    named
        .filter(|n| !present.contains(n))
        .map(str::to_string)
        .collect()
}

/// What to clean up for `node`, which is gone (see the module doc).
pub fn cleanup(node: &str, s: &Snapshot<'_>) -> Cleanup {
    let mut out = Cleanup {
        fusevol_node: s
            .fusevol_nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node))
            .and_then(|n| Some((n.metadata.name.clone()?, n.metadata.uid.clone()?))),
        ..Cleanup::default()
    };
    let on_node = s
        .pvs
        .iter()
        .filter(|pv| is_fusevol_pv(pv) && pv_node(pv) == Some(node));
    for pv in on_node {
        match fate(pv, s) {
            Fate::ReleaseFinalizer(name) => out.finalizers.push(name),
            Fate::DeleteClaim(d) => out.claims.push(d),
            Fate::Keep(k) => out.kept.push(k),
            Fate::Nothing => {}
        }
    }
    out
}

/// What happens to one PV of a gone node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    ReleaseFinalizer(String),
    DeleteClaim(ClaimDeletion),
    Keep(KeptVolume),
    /// Nothing yet: e.g. a Released PV that the controller has still to delete, a Bound PV
    /// whose claim is being deleted, a Retain PV nobody deletes.
    Nothing,
}

fn fate(pv: &PersistentVolume, s: &Snapshot<'_>) -> Fate {
    let Some(name) = pv.metadata.name.clone() else {
        return Fate::Nothing;
    };
    let phase = pv.status.as_ref().and_then(|st| st.phase.as_deref());
    let deleting = pv.metadata.deletion_timestamp.is_some();
    let finalizer = pv
        .metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER_DATA_CLEANUP);
    match phase {
        Some("Released" | "Failed" | "Available") if deleting && finalizer => {
            Fate::ReleaseFinalizer(name)
        }
        Some("Bound") => match bound_claim(pv, s.claims) {
            Some(claim) => claim_fate(name, claim, s.classes),
            None => Fate::Nothing,
        },
        _ => Fate::Nothing,
    }
}

/// The claim a Bound PV's `claimRef` names (same uid), unless it is being deleted already.
fn bound_claim<'a>(
    pv: &PersistentVolume,
    claims: &'a [PersistentVolumeClaim],
) -> Option<&'a PersistentVolumeClaim> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    claims.iter().find(|c| {
        c.metadata.namespace == r.namespace
            && c.metadata.name == r.name
            && r.uid.is_some()
            && c.metadata.uid == r.uid
            && c.metadata.deletion_timestamp.is_none()
    })
}

fn claim_fate(pv: String, claim: &PersistentVolumeClaim, classes: &[StorageClass]) -> Fate {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let name = claim.metadata.name.clone().unwrap_or_default();
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    let class = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .and_then(|n| {
            classes
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(n))
        });
    match opt_in(claim, class) {
        Some(opted_in) => Fate::DeleteClaim(ClaimDeletion {
            namespace,
            name,
            uid,
            pv,
            opted_in,
        }),
        None => Fate::Keep(KeptVolume {
            pv,
            namespace,
            claim: name,
            claim_uid: uid,
        }),
    }
}

/// Whether `claim` may be deleted when its node is gone: the claim's annotation if it has
/// one (only `"true"` opts in), else its class's.
pub fn opt_in(claim: &PersistentVolumeClaim, class: Option<&StorageClass>) -> Option<OptIn> {
    if let Some(value) = annotation(&claim.metadata) {
        return (value == "true").then_some(OptIn::Claim);
    }
    let class = class?;
    (annotation(&class.metadata) == Some("true"))
        .then(|| OptIn::Class(class.metadata.name.clone().unwrap_or_default()))
}

fn annotation(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS)
        .map(String::as_str)
}

/// When each missing node was first seen missing, to act only after a grace period.
#[derive(Debug, Default)]
pub struct GoneSince(BTreeMap<String, Instant>);

impl GoneSince {
    /// Records the nodes `missing` now (forgetting those that are back) and returns those
    /// missing for at least `grace`.
    pub fn observe(
        &mut self,
        missing: &BTreeSet<String>,
        now: Instant,
        grace: Duration,
    ) -> Vec<String> {
        self.0.retain(|n, _| missing.contains(n));
        for n in missing {
            self.0.entry(n.clone()).or_insert(now);
        }
        self.0
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Forgets `node` (it was found again): its grace period starts anew when it goes.
    pub fn forget(&mut self, node: &str) {
        self.0.remove(node);
    }
}

#[cfg(test)]
mod tests;
