//! Expansion's API traffic against a scripted API server: method, path and body of every call
//! of each step (through the claim reconcile, as the controller runs it), a refusal that
//! changes nothing, and a PV write that conflicts.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::super::tests::{event_reason, node, store_of, EVENTS};
use super::super::{reconcile, Context, ControllerMetrics};
use super::{AGENT_POLL, REFUSED_RETRY};
use crate::k8s::crd::FusevolNode;
use crate::k8s::mock::{self, Call};
use crate::k8s::provision::Reservation;
use crate::k8s::{
    ANNOTATION_APPLIED_QUOTA, ANNOTATION_NODE, ANNOTATION_PROVISIONED_BY, ANNOTATION_TIER,
    ANNOTATION_VOLUME_SPEC, PROVISIONER,
};

const GI: u64 = 1 << 30;
const CLAIM_STATUS: &str = "/api/v1/namespaces/db/persistentvolumeclaims/data-0/status";
const PV: &str = "/api/v1/persistentvolumes/pvc-u1";

fn class() -> StorageClass {
    serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "fusevol-fast"},
        "provisioner": PROVISIONER,
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": true,
        "parameters": {"tier": "fast"},
    }))
    .unwrap()
}

/// Claim db/data-0 (uid u1) Bound to pvc-u1, asking `request`, with `status` and conditions.
fn claim(request: &str, status: &str, conditions: &[&str]) -> PersistentVolumeClaim {
    let conditions: Vec<Value> = conditions
        .iter()
        .map(|t| json!({"type": t, "status": "True"}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data-0", "namespace": "db", "uid": "u1"},
        "spec": {
            "storageClassName": "fusevol-fast",
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": request}},
            "volumeName": "pvc-u1",
        },
        "status": {"phase": "Bound", "capacity": {"storage": status}, "conditions": conditions},
    }))
    .unwrap()
}

/// pvc-u1 on n1/fast with `capacity`, volume-spec quota `quota` and the agent's `applied`.
fn pv(capacity: &str, quota: u64, applied: Option<u64>) -> PersistentVolume {
    let mut annotations = json!({
        ANNOTATION_PROVISIONED_BY: PROVISIONER,
        ANNOTATION_NODE: "n1",
        ANNOTATION_TIER: "fast",
        ANNOTATION_VOLUME_SPEC: format!(r#"{{"quotaBytes":{quota},"tier":"fast","replicas":1,"compression":"none"}}"#),
    });
    if let Some(a) = applied {
        annotations[ANNOTATION_APPLIED_QUOTA] = json!(a.to_string());
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "pvc-u1", "resourceVersion": "41", "annotations": annotations},
        "spec": {
            "capacity": {"storage": capacity},
            "claimRef": {"namespace": "db", "name": "data-0", "uid": "u1"},
        },
        "status": {"phase": "Bound"},
    }))
    .unwrap()
}

fn context(client: Client, nodes: Vec<FusevolNode>, pvs: Vec<PersistentVolume>) -> Arc<Context> {
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
        classes: store_of(vec![class()]),
        reservations: Mutex::new(Vec::new()),
        metrics: std::sync::Arc::new(ControllerMetrics::default()),
    })
}

fn reply<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap()
}

#[tokio::test]
async fn a_grow_marks_the_claim_resizing_then_writes_the_quota_into_the_pv() {
    let grown = claim("2Gi", "1Gi", &[]);
    let (client, server) = mock::client(vec![
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new("PATCH", CLAIM_STATUS, 200, reply(&grown)),
        Call::new("PATCH", PV, 200, reply(&pv("1Gi", 2 * GI, None))),
    ]);
    let ctx = context(
        client,
        vec![node("n1", 4 * GI)],
        vec![pv("1Gi", GI, Some(GI))],
    );
    let action = reconcile(Arc::new(grown), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(AGENT_POLL));
    let bodies = server.await.unwrap();
    assert_eq!(event_reason(&bodies[0]), "Resizing");
    assert_eq!(bodies[0]["type"], "Normal");
    let note = bodies[0]["note"].as_str().unwrap();
    assert!(
        note.contains("pvc-u1 from 1Gi to 2Gi on node n1 (tier fast)"),
        "{note}"
    );
    let conditions = &bodies[1]["status"]["conditions"];
    assert_eq!(conditions[0]["type"], "Resizing", "{conditions}");
    assert_eq!(conditions[0]["status"], "True");
    assert!(conditions[0]["lastTransitionTime"].is_string());
    // Only the quota and the version guard: the capacity waits for the agent.
    let patch = &bodies[2];
    assert_eq!(patch["metadata"]["resourceVersion"], "41");
    assert!(patch.get("spec").is_none(), "{patch}");
    let spec: Value = serde_json::from_str(
        patch["metadata"]["annotations"][ANNOTATION_VOLUME_SPEC]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(spec["quotaBytes"], 2 * GI);
    assert_eq!(spec["tier"], "fast");
    assert_eq!(
        *ctx.reservations.lock(),
        [Reservation {
            node: "n1".into(),
            tier: "fast".into(),
            bytes: 2 * GI,
            claim_uid: "u1".into(),
        }],
        "held until the cache shows the new quota"
    );
}

#[tokio::test]
async fn once_the_agent_applied_it_the_pv_capacity_then_the_claim_status_are_set() {
    let growing = claim("2Gi", "1Gi", &["Resizing", "ModifyingVolume"]);
    let (client, server) = mock::client(vec![
        Call::new("PATCH", PV, 200, reply(&pv("2Gi", 2 * GI, Some(2 * GI)))),
        Call::new("PATCH", CLAIM_STATUS, 200, reply(&growing)),
        Call::new("POST", EVENTS, 201, Value::Null),
    ]);
    let ctx = context(
        client,
        vec![node("n1", 4 * GI)],
        vec![pv("1Gi", 2 * GI, Some(2 * GI))],
    );
    let action = reconcile(Arc::new(growing), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0], json!({"spec": {"capacity": {"storage": "2Gi"}}}));
    assert_eq!(
        bodies[1],
        json!({"status": {
            "capacity": {"storage": "2Gi"},
            "conditions": [{"type": "ModifyingVolume", "status": "True"}],
        }}),
        "the resize condition goes, others stay"
    );
    assert_eq!(event_reason(&bodies[2]), "VolumeResizeSuccessful");
    let note = bodies[2]["note"].as_str().unwrap();
    assert!(note.contains("pvc-u1 has 2Gi"), "{note}");
}

#[tokio::test]
async fn waiting_for_the_agent_calls_nothing() {
    let (client, server) = mock::client(vec![]);
    let ctx = context(
        client,
        vec![node("n1", 4 * GI)],
        vec![pv("1Gi", 2 * GI, Some(GI))],
    );
    let action = reconcile(Arc::new(claim("2Gi", "1Gi", &["Resizing"])), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(AGENT_POLL));
    assert_eq!(server.await.unwrap(), Vec::<Value>::new());
}

#[tokio::test]
async fn a_grow_beyond_the_free_space_is_a_warning_and_nothing_else() {
    let (client, server) = mock::client(vec![Call::new("POST", EVENTS, 201, Value::Null)]);
    let ctx = context(
        client,
        vec![node("n1", 4 * GI)],
        vec![pv("1Gi", GI, Some(GI))],
    );
    let action = reconcile(Arc::new(claim("8Gi", "1Gi", &[])), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(REFUSED_RETRY));
    let bodies = server.await.unwrap();
    assert_eq!(bodies.len(), 1, "no write to the claim or the PV");
    assert_eq!(bodies[0]["type"], "Warning");
    assert_eq!(event_reason(&bodies[0]), "VolumeResizeFailed");
    let note = bodies[0]["note"].as_str().unwrap();
    assert!(
        note.contains("cannot grow PersistentVolume pvc-u1 from 1Gi to 8Gi")
            && note.contains("requested 7Gi, free 3Gi (total 4Gi, allocated 1Gi)"),
        "{note}"
    );
    assert!(ctx.reservations.lock().is_empty());
}

#[tokio::test]
async fn a_shrink_is_a_warning_and_nothing_else() {
    let (client, server) = mock::client(vec![Call::new("POST", EVENTS, 201, Value::Null)]);
    let ctx = context(
        client,
        vec![node("n1", 4 * GI)],
        vec![pv("2Gi", 2 * GI, Some(2 * GI))],
    );
    let action = reconcile(Arc::new(claim("1Gi", "2Gi", &[])), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0]["type"], "Warning");
    assert_eq!(event_reason(&bodies[0]), "VolumeResizeFailed");
    assert!(bodies[0]["note"]
        .as_str()
        .unwrap()
        .contains("volumes cannot shrink"));
}

#[tokio::test]
async fn a_pv_changed_meanwhile_fails_the_grow_and_frees_its_reservation() {
    let grown = claim("2Gi", "1Gi", &[]);
    let (client, server) = mock::client(vec![
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new("PATCH", CLAIM_STATUS, 200, reply(&grown)),
        Call::new("PATCH", PV, 409, mock::status(409, "Conflict")),
        Call::new("POST", EVENTS, 201, Value::Null),
    ]);
    let ctx = context(
        client,
        vec![node("n1", 4 * GI)],
        vec![pv("1Gi", GI, Some(GI))],
    );
    let result = reconcile(Arc::new(grown), ctx.clone()).await;
    assert!(result.is_err(), "retried by the error policy");
    let bodies = server.await.unwrap();
    assert_eq!(bodies[3]["type"], "Warning");
    assert_eq!(event_reason(&bodies[3]), "VolumeResizeFailed");
    assert!(ctx.reservations.lock().is_empty());
}

#[tokio::test]
async fn a_claim_of_its_size_calls_nothing() {
    let (client, server) = mock::client(vec![]);
    let ctx = context(
        client,
        vec![node("n1", 4 * GI)],
        vec![pv("1Gi", GI, Some(GI))],
    );
    let action = reconcile(Arc::new(claim("1Gi", "1Gi", &[])), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(server.await.unwrap(), Vec::<Value>::new());
}
