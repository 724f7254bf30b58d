//! The agent's confirmation that a volume's quota is live: after each round it writes the
//! quota each served mount enforces into its PV's [`ANNOTATION_APPLIED_QUOTA`]. An expansion
//! (see [`crate::k8s::expand`]) waits for it before it sets the PV's capacity and the claim's
//! size, so a claim never reports bytes its volume does not have.
//!
//! A raised quota needs no remount: the store swaps the open volume's limit, and the next
//! write and `statfs` (`df` in the pod) see it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::k8s::ANNOTATION_APPLIED_QUOTA;

/// The PVs among `all` whose annotation does not show the quota `applied` says their mount
/// enforces, with that quota (pure).
pub fn unconfirmed<'a>(
    all: &'a [PersistentVolume],
    applied: &BTreeMap<String, u64>,
) -> Vec<(&'a PersistentVolume, u64)> {
    all.iter()
        .filter_map(|pv| {
            let quota = *applied.get(&pv.name_any())?;
            let shown = pv.annotations().get(ANNOTATION_APPLIED_QUOTA);
            (shown != Some(&quota.to_string())).then_some((pv, quota))
        })
        .collect()
}

/// Writes `quota` into the PV's applied-quota annotation, guarded by the resourceVersion the
/// agent saw. If the PV changed meanwhile (a newer quota, a new object of that name, the PV
/// controller binding it), the write is refused with a conflict and nothing is confirmed:
/// that change starts a new round, which confirms what is served by then.
pub async fn confirm(
    client: &Client,
    pv: &PersistentVolume,
    quota: u64,
) -> Result<(), kube::Error> {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    let patch = json!({ "metadata": {
        "resourceVersion": pv.resource_version(),
        "annotations": { ANNOTATION_APPLIED_QUOTA: quota.to_string() },
    }});
    match api
        .patch(
            &pv.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
