//! What the scheduler sees of fusevol's capacity: the `CSIDriver` object named
//! [`PROVISIONER`] with `storageCapacity: true`, and one `CSIStorageCapacity` per node and
//! fusevol StorageClass holding that node's free bytes in the class's tier.
//!
//! kube-scheduler's volume binding plugin looks up, for a claim's StorageClass, the CSIDriver
//! named like the class's provisioner; when that driver has `storageCapacity: true`, a node is
//! feasible for an unbound WaitForFirstConsumer claim only if some CSIStorageCapacity object of
//! that class whose `nodeTopology` matches the node's labels has `capacity` (and
//! `maximumVolumeSize`, where set) of at least the request. fusevol's PVs are `local` volumes,
//! not CSI ones, but the scheduler's check only needs the provisioner name, so the same
//! mechanism steers claims away from full nodes before the controller ever sees them.
//!
//! The API version differs by Kubernetes release (`v1alpha1` on 1.20 behind a feature gate,
//! `v1beta1` on 1.21–1.23, `v1` from 1.24; same fields, `v1alpha1` lacks
//! `maximumVolumeSize`): the controller discovers which one the server serves, and when none
//! is served it says so once and keeps provisioning (the reschedule path still protects
//! full nodes).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::k8s::crd::FusevolNode;
use crate::k8s::params::ClassSettings;
use crate::k8s::provision::{tier_usage, ClusterState};
use crate::k8s::{LABEL_HOSTNAME, PROVISIONER};

/// Field manager of the controller's server-side applies.
pub const FIELD_MANAGER: &str = "fusevol-controller";

/// Label on the CSIStorageCapacity objects the controller owns.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// One capacity object the controller wants published.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CapacityEntry {
    pub name: String,
    pub storage_class: String,
    pub hostname: String,
    pub bytes: u64,
}

/// The capacity objects for every fusevol class with valid parameters × every node that has
/// published the class's tier (pure).
pub fn desired(classes: &[StorageClass], cluster: &ClusterState<'_>) -> Vec<CapacityEntry> {
    let mut out = Vec::new();
    for class in classes.iter().filter(|c| c.provisioner == PROVISIONER) {
        let Ok(settings) = ClassSettings::from_storage_class(class) else {
            continue;
        };
        let class_name = class.name_any();
        for node in cluster.nodes {
            let Some(usage) = tier_usage(node, &settings.tier, "", cluster) else {
                continue;
            };
            out.push(CapacityEntry {
                name: object_name(&class_name, &node.spec.node_name),
                storage_class: class_name.clone(),
                hostname: node.hostname().to_string(),
                bytes: usage.free(),
            });
        }
    }
    out.sort();
    out
}

/// A stable object name for (class, node): `fusevol-` and a 64-bit FNV-1a hash.
pub fn object_name(class: &str, node: &str) -> String {
    let hash = crate::fnv::fnv1a64(class.bytes().chain([0u8]).chain(node.bytes()));
    format!("fusevol-{hash:016x}")
}

/// The object for `entry` in API version `version` of `storage.k8s.io`.
pub fn to_object(entry: &CapacityEntry, version: &str, namespace: &str) -> serde_json::Value {
    let mut obj = json!({
        "apiVersion": format!("storage.k8s.io/{version}"),
        "kind": "CSIStorageCapacity",
        "metadata": {
            "name": entry.name,
            "namespace": namespace,
            "labels": { LABEL_MANAGED_BY: FIELD_MANAGER },
        },
        "nodeTopology": { "matchLabels": { LABEL_HOSTNAME: entry.hostname } },
        "storageClassName": entry.storage_class,
        "capacity": entry.bytes.to_string(),
    });
    if version != "v1alpha1" {
        obj["maximumVolumeSize"] = json!(entry.bytes.to_string());
    }
    obj
}

/// The CSIStorageCapacity resource the server serves, preferring the most stable version.
pub async fn discover(client: &Client) -> Option<ApiResource> {
    let group = match kube::discovery::group(client, "storage.k8s.io").await {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "cannot discover storage.k8s.io");
            return None;
        }
    };
    for version in ["v1", "v1beta1", "v1alpha1"] {
        if let Some((ar, _)) = group
            .versioned_resources(version)
            .into_iter()
            .find(|(ar, _)| ar.kind == "CSIStorageCapacity")
        {
            return Some(ar);
        }
    }
    None
}

/// Publishes the capacity objects: applies those that changed since `last` and deletes
/// managed objects that are no longer wanted. Returns what is now published.
pub async fn publish(
    client: &Client,
    resource: &ApiResource,
    namespace: &str,
    want: &[CapacityEntry],
    last: &BTreeMap<String, CapacityEntry>,
) -> Result<BTreeMap<String, CapacityEntry>, kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
    let mut now = BTreeMap::new();
    for entry in want {
        if last.get(&entry.name) != Some(entry) {
            let body = to_object(entry, &resource.version, namespace);
            api.patch(
                &entry.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        }
        now.insert(entry.name.clone(), entry.clone());
    }
    let wanted: BTreeSet<&str> = want.iter().map(|e| e.name.as_str()).collect();
    let managed = api
        .list(&ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={FIELD_MANAGER}")))
        .await?;
    for obj in managed {
        let name = obj.name_any();
        if !wanted.contains(name.as_str()) {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(now)
}

/// Makes sure the CSIDriver object exists with `storageCapacity: true`.
pub async fn ensure_csi_driver(client: &Client) -> Result<(), kube::Error> {
    let api: Api<k8s_openapi::api::storage::v1::CSIDriver> = Api::all(client.clone());
    let body = json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSIDriver",
        "metadata": { "name": PROVISIONER },
        "spec": {
            "attachRequired": false,
            "podInfoOnMount": false,
            "storageCapacity": true,
            "volumeLifecycleModes": ["Persistent"],
        },
    });
    api.patch(
        PROVISIONER,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

/// Lists the fusevol nodes as a slice-friendly vector (for [`desired`]).
pub fn nodes_of(store: &kube::runtime::reflector::Store<FusevolNode>) -> Vec<FusevolNode> {
    store.state().iter().map(|n| (**n).clone()).collect()
}
