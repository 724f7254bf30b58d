//! Online expansion of bound claims: acts on the pure
//! [`decide_expansion`](crate::k8s::expand::decide_expansion), step by step (see
//! [`crate::k8s::expand`] for the steps and why the PV's capacity moves last).
//!
//! The claim reconcile calls [`reconcile`] for every claim whose PV the controller provisioned;
//! a change of the claim or of its PV (the agent confirming a quota) triggers the next step.
//! Events on the claim: `Resizing`, `VolumeResizeSuccessful`, `VolumeResizeFailed` (Warning,
//! naming what is free on the node's tier when that is the reason).
//!
//! kube-controller-manager's expand controller (1.20) finds no in-tree plugin that expands a
//! `local` PV, posts `ExternalExpanding` ("waiting for an external controller") and leaves the
//! claim alone: it sets no `volume.kubernetes.io/storage-resizer` annotation (only for CSI
//! migration) and never touches the PV, so the two do not meet. Growing reservations are
//! taken under the same lock as provisioning decisions.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimCondition,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{Context, Error};
use crate::k8s::display_bytes;
use crate::k8s::expand::{decide_expansion, Expansion, CONDITION_RESIZING, RESIZE_CONDITIONS};
use crate::k8s::provision::{pending_bytes, ClusterState, Reservation};
use crate::k8s::ANNOTATION_VOLUME_SPEC;
use crate::size::format_bytes;

/// How soon a claim waiting for its agent is looked at again without a change (the agent's
/// confirmation on the PV normally triggers it first).
pub const AGENT_POLL: Duration = Duration::from_secs(10);

/// How soon a refused grow is tried again (space may have been freed).
pub const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// The event action of everything here.
const ACTION: &str = "Resize";

/// Acts on the size of `claim` (of fusevol class `class`). See the module doc.
pub async fn reconcile(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    ctx: &Arc<Context>,
) -> Result<Action, Error> {
    match decide(claim, class, ctx) {
        Expansion::Idle => Ok(Action::await_change()),
        Expansion::Grow {
            pv_name,
            resource_version,
            from,
            to,
            spec,
            reservation,
        } => {
            let patch = json!({ "metadata": {
                "resourceVersion": resource_version,
                "annotations": { ANNOTATION_VOLUME_SPEC: spec.to_annotation() },
            }});
            let sizes = format!("from {} to {}", display_bytes(from), display_bytes(to));
            grow(claim, ctx, &pv_name, &sizes, &patch, &reservation).await
        }
        Expansion::WaitForAgent { pv_name, quota } => {
            tracing::debug!(claim = %claim.name_any(), pv = %pv_name, quota, "waiting for the agent to apply the quota");
            Ok(Action::requeue(AGENT_POLL))
        }
        Expansion::Finish {
            pv_name,
            bytes,
            set_pv_capacity,
        } => finish(claim, ctx, &pv_name, bytes, set_pv_capacity).await,
        Expansion::Refuse { message } => {
            tracing::info!(claim = %claim.name_any(), %message, "not resizing");
            warn(ctx, claim, message).await;
            Ok(Action::requeue(REFUSED_RETRY))
        }
        Expansion::Shrink { message } => {
            tracing::info!(claim = %claim.name_any(), %message, "not shrinking");
            warn(ctx, claim, message).await;
            Ok(Action::await_change())
        }
    }
}

/// The decision, taken under the reservations lock; a grow's reservation replaces the claim's
/// earlier one, and reservations the cache shows fulfilled are dropped.
fn decide(claim: &PersistentVolumeClaim, class: &StorageClass, ctx: &Context) -> Expansion {
    let pvs = ctx.snapshot_pvs();
    let nodes = ctx.snapshot_nodes();
    let mut reservations = ctx.reservations.lock();
    reservations.retain(|r| pending_bytes(r, &pvs) > 0);
    let decision = decide_expansion(
        claim,
        class,
        &ClusterState {
            nodes: &nodes,
            pvs: &pvs,
            reservations: &reservations,
        },
    );
    if let Expansion::Grow { reservation, .. } = &decision {
        reservations.retain(|r| r.claim_uid != reservation.claim_uid);
        reservations.push(reservation.clone());
    }
    decision
}

/// Marks the claim `Resizing` and writes the new quota into the PV's volume spec.
async fn grow(
    claim: &PersistentVolumeClaim,
    ctx: &Context,
    pv_name: &str,
    sizes: &str,
    patch: &serde_json::Value,
    reservation: &Reservation,
) -> Result<Action, Error> {
    let note = format!(
        "resizing PersistentVolume {pv_name} {sizes} on node {} (tier {})",
        reservation.node, reservation.tier
    );
    tracing::info!(claim = %claim.name_any(), "{note}");
    ctx.publish(claim, ACTION, EventType::Normal, "Resizing", note)
        .await;
    let written = async {
        patch_claim_status(&ctx.client, claim, &resizing_status(claim)).await?;
        patch_pv(&ctx.client, pv_name, patch).await
    };
    if let Err(e) = written.await {
        ctx.reservations
            .lock()
            .retain(|r| r.claim_uid != reservation.claim_uid);
        let message = format!("cannot resize PersistentVolume {pv_name} {sizes}: {e}");
        warn(ctx, claim, message).await;
        return Err(e.into());
    }
    Ok(Action::requeue(AGENT_POLL))
}

/// The agent serves the new quota: the PV's capacity, then the claim's status.
async fn finish(
    claim: &PersistentVolumeClaim,
    ctx: &Context,
    pv_name: &str,
    bytes: u64,
    set_pv_capacity: bool,
) -> Result<Action, Error> {
    let size = format_bytes(bytes);
    let written = async {
        if set_pv_capacity {
            let patch = json!({ "spec": { "capacity": { "storage": size } } });
            patch_pv(&ctx.client, pv_name, &patch).await?;
        }
        patch_claim_status(&ctx.client, claim, &finished_status(claim, &size)).await
    };
    if let Err(e) = written.await {
        let message = format!("cannot record the new size of PersistentVolume {pv_name}: {e}");
        warn(ctx, claim, message).await;
        return Err(e.into());
    }
    let note = format!(
        "PersistentVolume {pv_name} has {}; its node's agent serves the new quota live",
        display_bytes(bytes)
    );
    tracing::info!(claim = %claim.name_any(), "{note}");
    ctx.publish(
        claim,
        ACTION,
        EventType::Normal,
        "VolumeResizeSuccessful",
        note,
    )
    .await;
    Ok(Action::await_change())
}

async fn warn(ctx: &Context, claim: &PersistentVolumeClaim, message: String) {
    ctx.publish(
        claim,
        ACTION,
        EventType::Warning,
        "VolumeResizeFailed",
        message,
    )
    .await;
}

/// The claim's conditions without the resize ones.
fn other_conditions(claim: &PersistentVolumeClaim) -> Vec<PersistentVolumeClaimCondition> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !RESIZE_CONDITIONS.contains(&c.type_.as_str()))
        .collect()
}

/// Status patch: the claim's conditions plus `Resizing` (kept as it was if already there).
fn resizing_status(claim: &PersistentVolumeClaim) -> serde_json::Value {
    let existing = claim
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION_RESIZING).cloned());
    let resizing = existing.unwrap_or_else(|| PersistentVolumeClaimCondition {
        type_: CONDITION_RESIZING.into(),
        status: "True".into(),
        last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
        message: Some("fusevol is resizing the volume".into()),
        ..Default::default()
    });
    let mut conditions = other_conditions(claim);
    conditions.push(resizing);
    json!({ "status": { "conditions": conditions } })
}

/// Status patch: `capacity` and the conditions without the resize ones.
fn finished_status(claim: &PersistentVolumeClaim, size: &str) -> serde_json::Value {
    let conditions = other_conditions(claim);
    json!({ "status": {
        "capacity": { "storage": size },
        "conditions": (!conditions.is_empty()).then_some(conditions),
    }})
}

async fn patch_claim_status(
    client: &Client,
    claim: &PersistentVolumeClaim,
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &claim.namespace().unwrap_or_default());
    api.patch_status(
        &claim.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map(|_| ())
}

async fn patch_pv(
    client: &Client,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests;
