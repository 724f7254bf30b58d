//! The controller's API traffic against a scripted API server (kube-rs mock service): method,
//! path and body of every call for provision, reschedule, restart idempotency, racing claims
//! and deletion of released PVs.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::Client;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::*;
use crate::k8s::crd::FusevolNode;
use crate::k8s::mock::{self, Call};

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/db/events";

fn class(binding: &str) -> StorageClass {
    serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "fusevol-fast"},
        "provisioner": PROVISIONER,
        "volumeBindingMode": binding,
        "reclaimPolicy": "Delete",
        "parameters": {"tier": "fast"},
    }))
    .unwrap()
}

fn node(name: &str, total: u64) -> FusevolNode {
    serde_json::from_value(json!({
        "apiVersion": "local.fusevol.io/v1alpha1", "kind": "FusevolNode",
        "metadata": {"name": name},
        "spec": {"nodeName": name, "root": format!("/var/lib/fusevol-{name}")},
        "status": {"tiers": [{"name": "fast", "totalBytes": total, "allocatedBytes": 0, "freeBytes": total}]},
    }))
    .unwrap()
}

fn claim(name: &str, uid: &str, request: &str, selected: Option<&str>) -> PersistentVolumeClaim {
    let mut annotations = serde_json::Map::new();
    if let Some(n) = selected {
        annotations.insert(ANNOTATION_SELECTED_NODE.into(), json!(n));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "db", "uid": uid, "annotations": annotations},
        "spec": {
            "storageClassName": "fusevol-fast",
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": request}},
        },
    }))
    .unwrap()
}

fn store_of<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut writer: Writer<K> = Default::default();
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    writer.as_reader()
}

fn context(
    client: Client,
    nodes: Vec<FusevolNode>,
    pvs: Vec<PersistentVolume>,
    binding: &str,
) -> Arc<Context> {
    let _ = reflector::store::<PersistentVolume>; // the same stores `run` builds
    Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "fusevol-controller".into(),
                instance: Some("test".into()),
            },
        ),
        client,
        pvs: store_of(pvs),
        nodes: store_of(nodes),
        classes: store_of(vec![class(binding)]),
        reservations: Mutex::new(Vec::new()),
        metrics: ControllerMetrics::default(),
    })
}

fn event_reason(body: &Value) -> &str {
    body["reason"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn provisioning_creates_the_pv_between_two_events() {
    let (client, server) = mock::client(vec![
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new("POST", "/api/v1/persistentvolumes", 201, Value::Null),
        Call::new("POST", EVENTS, 201, Value::Null),
    ]);
    let ctx = context(
        client,
        vec![node("n1", 10 << 30)],
        vec![],
        "WaitForFirstConsumer",
    );
    let action = reconcile(
        Arc::new(claim("data-0", "u1", "1Gi", Some("n1"))),
        ctx.clone(),
    )
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
    let bodies = server.await.unwrap();
    assert_eq!(event_reason(&bodies[0]), "Provisioning");
    assert_eq!(bodies[0]["regarding"]["name"], "data-0");
    let pv = &bodies[1];
    assert_eq!(pv["metadata"]["name"], "pvc-u1");
    assert_eq!(
        pv["metadata"]["finalizers"],
        json!([crate::k8s::FINALIZER_DATA_CLEANUP])
    );
    assert_eq!(
        pv["spec"]["local"]["path"],
        "/var/lib/fusevol-n1/volumes/pvc-u1/mnt/data"
    );
    assert_eq!(pv["spec"]["capacity"]["storage"], "1Gi");
    assert_eq!(pv["spec"]["claimRef"]["uid"], "u1");
    assert_eq!(
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
            ["values"],
        json!(["n1"])
    );
    assert_eq!(event_reason(&bodies[2]), "ProvisioningSucceeded");
    assert_eq!(
        ctx.reservations.lock().len(),
        1,
        "held until the PV is cached"
    );
}

#[tokio::test]
async fn a_full_node_sends_the_claim_back_to_the_scheduler_with_a_warning() {
    let (client, server) = mock::client(vec![
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new(
            "PATCH",
            "/api/v1/namespaces/db/persistentvolumeclaims/data-0",
            200,
            serde_json::to_value(claim("data-0", "u1", "1Gi", None)).unwrap(),
        ),
    ]);
    let ctx = context(
        client,
        vec![node("n1", 512 << 20)],
        vec![],
        "WaitForFirstConsumer",
    );
    reconcile(Arc::new(claim("data-0", "u1", "1Gi", Some("n1"))), ctx)
        .await
        .unwrap();
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0]["type"], "Warning");
    assert_eq!(event_reason(&bodies[0]), "ProvisioningFailed");
    let note = bodies[0]["note"].as_str().unwrap();
    assert!(note.contains("requested 1Gi, free 512Mi"), "{note}");
    assert_eq!(
        bodies[1],
        json!({"metadata": {"annotations": {ANNOTATION_SELECTED_NODE: null}}})
    );
}

#[tokio::test]
async fn two_claims_racing_for_one_node_never_overcommit_it() {
    // Room for one 1Gi volume; the first PV is not in the cache yet when the second decides.
    let (client, server) = mock::client(vec![
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new("POST", "/api/v1/persistentvolumes", 201, Value::Null),
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new(
            "PATCH",
            "/api/v1/namespaces/db/persistentvolumeclaims/data-1",
            200,
            serde_json::to_value(claim("data-1", "u1", "1Gi", None)).unwrap(),
        ),
    ]);
    let ctx = context(
        client,
        vec![node("n1", 3 << 29)],
        vec![],
        "WaitForFirstConsumer",
    );
    reconcile(
        Arc::new(claim("data-0", "u0", "1Gi", Some("n1"))),
        ctx.clone(),
    )
    .await
    .unwrap();
    reconcile(Arc::new(claim("data-1", "u1", "1Gi", Some("n1"))), ctx)
        .await
        .unwrap();
    let bodies = server.await.unwrap();
    let note = bodies[3]["note"].as_str().unwrap();
    assert!(
        note.contains("reserved for claims being provisioned 1Gi"),
        "{note}"
    );
}

#[tokio::test]
async fn a_repeated_reconcile_after_a_restart_creates_no_second_pv() {
    // The PV exists but this replica's cache does not have it yet: the create gets 409.
    let (client, server) = mock::client(vec![
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new(
            "POST",
            "/api/v1/persistentvolumes",
            409,
            mock::status(409, "AlreadyExists"),
        ),
        Call::new("POST", EVENTS, 201, Value::Null),
    ]);
    let ctx = context(
        client,
        vec![node("n1", 10 << 30)],
        vec![],
        "WaitForFirstConsumer",
    );
    let action = reconcile(Arc::new(claim("data-0", "u1", "1Gi", Some("n1"))), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let bodies = server.await.unwrap();
    assert_eq!(event_reason(&bodies[2]), "ProvisioningSucceeded");

    // Once the PV is cached, a reconcile makes no call at all (the scripted server has none).
    let (client, server) = mock::client(vec![]);
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "pvc-u1", "annotations": {crate::k8s::ANNOTATION_PROVISIONED_BY: PROVISIONER}},
    }))
    .unwrap();
    let ctx = context(
        client,
        vec![node("n1", 10 << 30)],
        vec![pv],
        "WaitForFirstConsumer",
    );
    let action = reconcile(Arc::new(claim("data-0", "u1", "1Gi", Some("n1"))), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    assert!(server.await.unwrap().is_empty());
}

#[tokio::test]
async fn a_claim_waits_for_the_scheduler_under_wait_for_first_consumer() {
    let (client, server) = mock::client(vec![]);
    let ctx = context(
        client,
        vec![node("n1", 10 << 30)],
        vec![],
        "WaitForFirstConsumer",
    );
    let action = reconcile(Arc::new(claim("data-0", "u1", "1Gi", None)), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    assert!(server.await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_parameters_get_a_warning_and_a_retry_but_no_pv() {
    let (client, server) = mock::client(vec![Call::new("POST", EVENTS, 201, Value::Null)]);
    let ctx = context(
        client,
        vec![node("n1", 10 << 30)],
        vec![],
        "WaitForFirstConsumer",
    );
    let mut bad = claim("data-0", "u1", "1Gi", Some("n1"));
    bad.spec.as_mut().unwrap().access_modes = Some(vec!["ReadWriteMany".into()]);
    let action = reconcile(Arc::new(bad), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let bodies = server.await.unwrap();
    let note = bodies[0]["note"].as_str().unwrap();
    assert!(
        note.contains("ReadWriteMany") && note.contains("ReadWriteOnce"),
        "{note}"
    );
}

fn released(policy: &str) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": "pvc-u1", "annotations": {crate::k8s::ANNOTATION_PROVISIONED_BY: PROVISIONER}},
        "spec": {"persistentVolumeReclaimPolicy": policy},
        "status": {"phase": "Released"},
    }))
    .unwrap()
}

#[tokio::test]
async fn a_released_delete_pv_is_deleted_and_a_retain_pv_is_kept() {
    let (client, server) = mock::client(vec![Call::new(
        "DELETE",
        "/api/v1/persistentvolumes/pvc-u1",
        200,
        serde_json::to_value(released("Delete")).unwrap(),
    )]);
    let ctx = context(client, vec![], vec![], "WaitForFirstConsumer");
    reconcile_pv(Arc::new(released("Delete")), ctx)
        .await
        .unwrap();
    assert_eq!(server.await.unwrap().len(), 1);

    let (client, server) = mock::client(vec![]);
    let ctx = context(client, vec![], vec![], "WaitForFirstConsumer");
    reconcile_pv(Arc::new(released("Retain")), ctx)
        .await
        .unwrap();
    assert!(server.await.unwrap().is_empty());
}

#[tokio::test]
async fn capacity_objects_are_applied_in_the_served_version_and_stale_ones_deleted() {
    use kube::api::{ApiResource, GroupVersionKind};
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("storage.k8s.io", "v1alpha1", "CSIStorageCapacity"),
        "csistoragecapacities",
    );
    let nodes = [node("n1", 10 << 30)];
    let classes = [class("WaitForFirstConsumer")];
    let want = capacity::desired(
        &classes,
        &ClusterState {
            nodes: &nodes,
            pvs: &[],
            reservations: &[Reservation {
                node: "n1".into(),
                tier: "fast".into(),
                bytes: 1 << 30,
                claim_uid: "u9".into(),
            }],
        },
    );
    assert_eq!(want.len(), 1);
    assert_eq!(
        want[0].bytes,
        9 << 30,
        "in-flight reservations are not free"
    );
    let base = "/apis/storage.k8s.io/v1alpha1/namespaces/fusevol-system/csistoragecapacities";
    let name = want[0].name.clone();
    let (client, server) = mock::client(vec![
        Call::new("PATCH", format!("{base}/{name}"), 200, Value::Null).query("fieldManager=fusevol-controller"),
        Call::new("GET", base, 200, json!({
            "apiVersion": "storage.k8s.io/v1alpha1", "kind": "CSIStorageCapacityList", "metadata": {},
            "items": [
                {"apiVersion": "storage.k8s.io/v1alpha1", "kind": "CSIStorageCapacity", "metadata": {"name": name, "namespace": "fusevol-system"}},
                {"apiVersion": "storage.k8s.io/v1alpha1", "kind": "CSIStorageCapacity", "metadata": {"name": "fusevol-gone", "namespace": "fusevol-system"}},
            ],
        })).query("labelSelector="),
        Call::new("DELETE", format!("{base}/fusevol-gone"), 200, mock::status(200, "Success")),
    ]);
    let published = capacity::publish(&client, &ar, "fusevol-system", &want, &Default::default())
        .await
        .unwrap();
    assert!(published.contains_key(&name));
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0]["capacity"], json!((9u64 << 30).to_string()));
    assert_eq!(bodies[0]["storageClassName"], "fusevol-fast");
    assert_eq!(
        bodies[0]["nodeTopology"]["matchLabels"][crate::k8s::LABEL_HOSTNAME],
        "n1"
    );
    assert!(
        bodies[0].get("maximumVolumeSize").is_none(),
        "v1alpha1 has no maximumVolumeSize"
    );
}
