//! The controller's expansion decision for one claim, as a pure function of the same snapshot
//! that provisioning decides from ([`decide_expansion`]).
//!
//! An expansion is a few steps, each its own decision: level-triggered, so after a restart or
//! a missed event the next reconcile finds where the claim stands.
//! 1. [`Expansion::Grow`]: the claim asks for more than the quota in its PV's volume-spec
//!    annotation, and the node's tier has room for the growth (the accounting and
//!    reservations of provisioning, see [`super::provision`]): mark the claim `Resizing` and
//!    set the new quota in the annotation. Only there: the PV's capacity stays until step 3,
//!    because a kubelet that sees a PV's capacity above its claim's `status.capacity` finishes
//!    the resize on its own (a `local` volume needs nothing on the node) and would report a
//!    size before the volume has it.
//! 2. [`Expansion::WaitForAgent`]: the node's agent raises the live mount's quota (no
//!    remount: `df` in the pod shows the new size at once) and then writes the quota it
//!    applied in the PV's [`ANNOTATION_APPLIED_QUOTA`].
//! 3. [`Expansion::Finish`]: the agent applied it: set the PV's capacity, then the claim's
//!    `status.capacity`, and remove its [`RESIZE_CONDITIONS`].
//!
//! Refusals change nothing on the PV: [`Expansion::Refuse`] when the tier has no room (the
//! message names what is free), the class does not allow expansion or the PV is unreadable;
//! [`Expansion::Shrink`] when a claim asks for less than its `status.capacity`. The API server
//! refuses to lower a bound claim's request ("field can not be less than previous value"), so
//! a shrink reaches the controller only from a server that lets one through. A request above
//! the claim's status but within the PV's quota (a grow whose request was lowered again, which
//! Kubernetes 1.23+ allows with RecoverVolumeExpansionFailure) finishes at the PV's size: a
//! volume never shrinks.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;

use super::params::VolumeSpec;
use super::provision::{
    annotation, is_fusevol_pv, published_usage, pv_capacity_bytes, pv_node, pv_tier,
    pv_volume_spec, ClusterState, PlacementError, Reservation,
};
use super::{display_bytes, ANNOTATION_APPLIED_QUOTA, PROVISIONER};
use crate::size::parse_quantity;

/// The claim condition of a resize in progress.
pub const CONDITION_RESIZING: &str = "Resizing";

/// The claim conditions of a resize: `Resizing`, and `FileSystemResizePending` (set by
/// resizers whose volumes need the kubelet to finish; fusevol's never do, but it clears it).
pub const RESIZE_CONDITIONS: [&str; 2] = [CONDITION_RESIZING, "FileSystemResizePending"];

/// What the controller should do about a claim's size.
#[derive(Debug, Clone, PartialEq)]
pub enum Expansion {
    /// The claim has what it asks for, or is no bound claim of a fusevol PV.
    Idle,
    /// Record `reservation`, mark the claim `Resizing`, then write `spec` (quota `to`) into
    /// the volume-spec annotation of `pv_name`, guarded by its `resource_version`.
    Grow {
        pv_name: String,
        resource_version: Option<String>,
        from: u64,
        to: u64,
        /// Boxed: a spec is several times the size of the other variants.
        spec: Box<VolumeSpec>,
        reservation: Reservation,
    },
    /// The PV asks for `quota`; its agent has not confirmed it yet.
    WaitForAgent { pv_name: String, quota: u64 },
    /// The volume has `bytes`: set the PV's capacity to it (if `set_pv_capacity`), then the
    /// claim's `status.capacity`, and remove the resize conditions.
    Finish {
        pv_name: String,
        bytes: u64,
        set_pv_capacity: bool,
    },
    /// The claim cannot grow now: a Warning with `message`; nothing changes, retried later.
    Refuse { message: String },
    /// The claim asks for less than it has: a Warning with `message`; nothing changes.
    Shrink { message: String },
}

/// The sizes an expansion compares, in bytes.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// The claim's `spec.resources.requests.storage`.
    request: u64,
    /// The claim's `status.capacity.storage`.
    status: u64,
    /// The PV's `spec.capacity.storage` (0 if it has none).
    capacity: u64,
}

/// Decides what to do about the size of `claim` of StorageClass `class`. See the module doc.
pub fn decide_expansion(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    cluster: &ClusterState<'_>,
) -> Expansion {
    let Some(pv) = bound_fusevol_pv(claim, class, cluster.pvs) else {
        return Expansion::Idle;
    };
    let Some(sizes) = sizes(claim, pv) else {
        // No request or status yet (the PV controller is binding): nothing to compare.
        return Expansion::Idle;
    };
    let pv_name = pv.metadata.name.clone().unwrap_or_default();
    let resizing = has_resize_condition(claim);
    if sizes.request < sizes.status {
        return Expansion::Shrink {
            message: format!(
                "the claim requests {}, less than the {} it has: volumes cannot shrink; PersistentVolume {pv_name} keeps its size",
                display_bytes(sizes.request),
                display_bytes(sizes.status)
            ),
        };
    }
    if sizes.request == sizes.status && !resizing {
        return Expansion::Idle;
    }
    let spec = match pv_volume_spec(pv) {
        Some(Ok(spec)) => spec,
        Some(Err(e)) => {
            return Expansion::Refuse {
                message: format!("PersistentVolume {pv_name}: bad volume-spec annotation: {e}"),
            }
        }
        None => {
            return Expansion::Refuse {
                message: format!("PersistentVolume {pv_name} has no volume-spec annotation"),
            }
        }
    };
    if sizes.request > spec.quota_bytes {
        return grow(claim, class, pv, spec, sizes.request, cluster);
    }
    let applied = annotation(&pv.metadata, ANNOTATION_APPLIED_QUOTA).and_then(|v| v.parse().ok());
    if applied.is_none_or(|a: u64| a < spec.quota_bytes) {
        return Expansion::WaitForAgent {
            pv_name,
            quota: spec.quota_bytes,
        };
    }
    Expansion::Finish {
        pv_name,
        bytes: sizes.capacity.max(spec.quota_bytes),
        set_pv_capacity: sizes.capacity < spec.quota_bytes,
    }
}

/// The fusevol PV `claim` is bound to, if the claim is a bound claim of a fusevol class and the
/// PV is in `pvs` and names the claim back.
fn bound_fusevol_pv<'a>(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    pvs: &'a [PersistentVolume],
) -> Option<&'a PersistentVolume> {
    let bound = claim.status.as_ref()?.phase.as_deref() == Some("Bound");
    if class.provisioner != PROVISIONER || claim.metadata.deletion_timestamp.is_some() || !bound {
        return None;
    }
    let name = claim.spec.as_ref()?.volume_name.as_deref()?;
    let pv = pvs
        .iter()
        .find(|pv| pv.metadata.name.as_deref() == Some(name))?;
    let claim_ref = pv.spec.as_ref()?.claim_ref.as_ref()?;
    let names_claim = claim_ref.uid.is_some() && claim_ref.uid == claim.metadata.uid;
    (is_fusevol_pv(pv) && names_claim).then_some(pv)
}

fn sizes(claim: &PersistentVolumeClaim, pv: &PersistentVolume) -> Option<Sizes> {
    let request = claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    let status = claim.status.as_ref()?.capacity.as_ref()?.get("storage")?;
    let capacity = pv
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| parse_quantity(&q.0).ok())
        .unwrap_or(0);
    Some(Sizes {
        request: parse_quantity(&request.0).ok()?,
        status: parse_quantity(&status.0).ok()?,
        capacity,
    })
}

/// Whether the claim carries one of the [`RESIZE_CONDITIONS`].
pub fn has_resize_condition(claim: &PersistentVolumeClaim) -> bool {
    claim
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| RESIZE_CONDITIONS.contains(&c.type_.as_str()))
        })
}

/// [`Expansion::Grow`] if the class allows it and the node's tier has room for the growth;
/// [`Expansion::WaitForAgent`] if that grow was written and the snapshot lags behind.
fn grow(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    pv: &PersistentVolume,
    spec: VolumeSpec,
    request: u64,
    cluster: &ClusterState<'_>,
) -> Expansion {
    let pv_name = pv.metadata.name.clone().unwrap_or_default();
    let from = pv_capacity_bytes(pv).unwrap_or(spec.quota_bytes);
    let refuse = |why: String| Expansion::Refuse {
        message: format!(
            "cannot grow PersistentVolume {pv_name} from {} to {}: {why}",
            display_bytes(from),
            display_bytes(request)
        ),
    };
    if class.allow_volume_expansion != Some(true) {
        return refuse(format!(
            "StorageClass {} does not allow volume expansion (allowVolumeExpansion: true)",
            class.metadata.name.as_deref().unwrap_or_default()
        ));
    }
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    // A grow to this size written already, and the snapshot not showing it yet: the PV's
    // quota is `request` by now (or the write failed, which dropped the reservation).
    let in_flight = cluster
        .reservations
        .iter()
        .any(|r| r.claim_uid == uid && r.bytes == request);
    if in_flight {
        return Expansion::WaitForAgent {
            pv_name,
            quota: request,
        };
    }
    let reservation = match room_for(pv, &spec, &uid, request, from, cluster) {
        Ok(reservation) => reservation,
        Err(e) => return refuse(e.to_string()),
    };
    Expansion::Grow {
        pv_name,
        resource_version: pv.metadata.resource_version.clone(),
        from,
        to: request,
        spec: Box::new(VolumeSpec {
            quota_bytes: request,
            ..spec
        }),
        reservation,
    }
}

/// The reservation of `request` bytes for the claim `claim_uid` if its PV's tier has room for
/// the growth from `from`, else why not.
fn room_for(
    pv: &PersistentVolume,
    spec: &VolumeSpec,
    claim_uid: &str,
    request: u64,
    from: u64,
    cluster: &ClusterState<'_>,
) -> Result<Reservation, PlacementError> {
    let node_name = pv_node(pv).unwrap_or_default().to_string();
    let tier = pv_tier(pv).unwrap_or(&spec.tier).to_string();
    let Some(node) = cluster.nodes.iter().find(|n| n.spec.node_name == node_name) else {
        return Err(PlacementError::NoAgent { node: node_name });
    };
    // The PV's own size is in `allocated`: only the growth needs free bytes.
    let usage = published_usage(node, &tier, claim_uid, cluster)?;
    let growth = request.saturating_sub(from);
    if growth > usage.free() {
        return Err(PlacementError::InsufficientCapacity {
            node: node_name,
            tier,
            requested: growth,
            usage,
        });
    }
    Ok(Reservation {
        node: node_name,
        tier,
        bytes: request,
        claim_uid: claim_uid.to_string(),
    })
}

#[cfg(test)]
mod tests;
