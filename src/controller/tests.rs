//! The controller's API traffic against a scripted API server (kube-rs mock service): method,
//! path and body of every call for provision, reschedule, restart idempotency, racing claims,
//! deletion of released PVs, no decision before the caches are synced, and leader election
//! (hung renewal, a holder's skewed clock, release on shutdown) under tokio's paused clock.

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

pub(super) const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/db/events";

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

pub(super) fn node(name: &str, total: u64) -> FusevolNode {
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

/// A store as a reflector leaves it after its first complete list (synced).
pub(super) fn store_of<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut writer: Writer<K> = Default::default();
    list_into(&mut writer, objects, true);
    writer.as_reader()
}

/// Feeds `writer` the watcher's initial list of `objects`; `done`: the list is complete.
fn list_into<K>(writer: &mut Writer<K>, objects: Vec<K>, done: bool)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    if done {
        writer.apply_watcher_event(&watcher::Event::InitDone);
    }
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
        metrics: Arc::new(ControllerMetrics::default()),
    })
}

pub(super) fn event_reason(body: &Value) -> &str {
    body["reason"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn provisioning_creates_the_pv_then_reports_it() {
    let (client, server) = mock::client(vec![
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
    assert_eq!(event_reason(&bodies[1]), "ProvisioningSucceeded");
    assert_eq!(bodies[1]["regarding"]["name"], "data-0");
    let pv = &bodies[0];
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
    assert_eq!(bodies.len(), 2);
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
    let note = bodies[2]["note"].as_str().unwrap();
    assert!(
        note.contains("reserved for claims being provisioned 1Gi"),
        "{note}"
    );
}

#[tokio::test]
async fn a_repeated_reconcile_after_a_restart_creates_no_second_pv() {
    // The PV exists but this replica's cache does not have it yet (after a restart, or a
    // reconcile triggered by the PV's own watch event): the create gets 409, and nothing
    // is reported a second time (no event, no "created" count).
    let (client, server) = mock::client(vec![Call::new(
        "POST",
        "/api/v1/persistentvolumes",
        409,
        mock::status(409, "AlreadyExists"),
    )]);
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
    server.await.unwrap();
    let created = ctx.metrics.outcomes.get_or_create(&OutcomeLabels {
        outcome: "created".into(),
    });
    assert_eq!(created.get(), 0, "counted as created");

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

// ---- No decision before the caches are synced ----

/// A fusevol PV of `bytes` on node `node`, tier fast.
fn existing_pv(name: &str, node: &str, bytes: &str) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {
            crate::k8s::ANNOTATION_PROVISIONED_BY: PROVISIONER,
            crate::k8s::ANNOTATION_NODE: node,
            crate::k8s::ANNOTATION_TIER: "fast",
        }},
        "spec": {"capacity": {"storage": bytes}},
    }))
    .unwrap()
}

/// A context whose stores are fed by the returned writers, as `run`'s reflectors feed them.
struct Unsynced {
    pvs: Writer<PersistentVolume>,
    nodes: Writer<FusevolNode>,
    classes: Writer<StorageClass>,
}

fn unsynced_context(client: Client) -> (Arc<Context>, Unsynced) {
    let writers = Unsynced {
        pvs: Default::default(),
        nodes: Default::default(),
        classes: Default::default(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "fusevol-controller".into(),
                instance: Some("test".into()),
            },
        ),
        client,
        pvs: writers.pvs.as_reader(),
        nodes: writers.nodes.as_reader(),
        classes: writers.classes.as_reader(),
        reservations: Mutex::new(Vec::new()),
        metrics: Arc::new(ControllerMetrics::default()),
    });
    (ctx, writers)
}

#[tokio::test]
async fn a_claim_arriving_before_the_caches_sync_is_not_provisioned_until_they_do() {
    // Node n1 has room for 1.5Gi, of which an existing PV takes 1Gi: a 1Gi claim does not fit.
    // Until the PV list is complete the store shows no PV, and a decision then would create a
    // second PV on the node (over-commit).
    let (client, server) = mock::client(vec![]);
    let (ctx, mut w) = unsynced_context(client);
    list_into(&mut w.nodes, vec![node("n1", 3 << 29)], true);
    list_into(&mut w.classes, vec![class("WaitForFirstConsumer")], true);
    list_into(&mut w.pvs, vec![existing_pv("pvc-old", "n1", "1Gi")], false);
    assert!(ctx.pvs.state().is_empty(), "a partial list is not visible");
    assert!(!ctx.caches_ready());
    let pending = Arc::new(claim("data-0", "u1", "1Gi", Some("n1")));
    for _ in 0..3 {
        let action = reconcile(pending.clone(), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(CACHE_SYNC_RETRY));
    }
    assert!(
        server.await.unwrap().is_empty(),
        "no event, no PV, no reschedule"
    );
    assert!(ctx.reservations.lock().is_empty(), "nothing reserved");

    // The list completes: the same claim is now decided, seeing the existing PV.
    let (client, server) = mock::client(vec![
        Call::new("POST", EVENTS, 201, Value::Null),
        Call::new(
            "PATCH",
            "/api/v1/namespaces/db/persistentvolumeclaims/data-0",
            200,
            serde_json::to_value(claim("data-0", "u1", "1Gi", None)).unwrap(),
        ),
    ]);
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "fusevol-controller".into(),
                instance: Some("test".into()),
            },
        ),
        pvs: ctx.pvs.clone(),
        nodes: ctx.nodes.clone(),
        classes: ctx.classes.clone(),
        reservations: Mutex::new(Vec::new()),
        metrics: Arc::new(ControllerMetrics::default()),
    });
    w.pvs.apply_watcher_event(&watcher::Event::InitDone);
    assert!(ctx.caches_ready());
    let action = reconcile(pending, ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    let bodies = server.await.unwrap();
    let note = bodies[0]["note"].as_str().unwrap();
    assert!(note.contains("requested 1Gi, free 512Mi"), "{note}");
    assert_eq!(
        bodies[1],
        json!({"metadata": {"annotations": {ANNOTATION_SELECTED_NODE: null}}})
    );
}

#[tokio::test]
async fn each_unsynced_store_alone_holds_every_decision() {
    for unsynced in ["pvs", "nodes", "classes"] {
        let (client, server) = mock::client(vec![]);
        let (ctx, mut w) = unsynced_context(client);
        list_into(&mut w.pvs, vec![], unsynced != "pvs");
        list_into(
            &mut w.nodes,
            vec![node("n1", 10 << 30)],
            unsynced != "nodes",
        );
        list_into(
            &mut w.classes,
            vec![class("WaitForFirstConsumer")],
            unsynced != "classes",
        );
        assert!(!ctx.caches_ready(), "{unsynced}");
        let action = reconcile(
            Arc::new(claim("data-0", "u1", "1Gi", Some("n1"))),
            ctx.clone(),
        )
        .await
        .unwrap();
        assert_eq!(action, Action::requeue(CACHE_SYNC_RETRY), "{unsynced}");
        assert!(server.await.unwrap().is_empty(), "{unsynced}");

        // Capacity publishing waits too: free bytes from a partial PV list overstate nodes.
        let (client, server) = mock::client(vec![]);
        let ctx = Arc::new(Context {
            client,
            recorder: Recorder::new(
                ctx.client.clone(),
                Reporter {
                    controller: "fusevol-controller".into(),
                    instance: Some("test".into()),
                },
            ),
            pvs: ctx.pvs.clone(),
            nodes: ctx.nodes.clone(),
            classes: ctx.classes.clone(),
            reservations: Mutex::new(Vec::new()),
            metrics: Arc::new(ControllerMetrics::default()),
        });
        let ar = kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("storage.k8s.io", "v1", "CSIStorageCapacity"),
            "csistoragecapacities",
        );
        let mut last = Default::default();
        assert!(!publish_capacity_round(&ctx, &ar, "fusevol-system", &mut last).await);
        assert!(server.await.unwrap().is_empty(), "{unsynced}");
    }
}

// ---- Leader election ----

mod election {
    use std::time::Duration;

    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use kube::Client;
    use parking_lot::Mutex;
    use serde_json::{json, Value};
    use std::sync::Arc;
    use tokio::time::Instant;

    use crate::controller::leader::{Attempt, Ended, LeaderElection, Timing};
    use crate::k8s::mock::{self, Call};

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/fusevol-system/leases";
    const LEASE: &str =
        "/apis/coordination.k8s.io/v1/namespaces/fusevol-system/leases/fusevol-controller";
    const SECOND: Duration = Duration::from_secs(1);

    fn timing() -> Timing {
        Timing::for_lease(Duration::from_secs(15))
    }

    fn election(client: Client, identity: &str) -> LeaderElection {
        LeaderElection::new(
            client,
            "fusevol-system",
            "fusevol-controller",
            identity,
            timing(),
        )
    }

    /// The Lease as the API server returns it.
    fn lease(holder: &str, rv: u32, renewed: Timestamp, transitions: i32) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "fusevol-controller", "namespace": "fusevol-system",
                         "resourceVersion": rv.to_string()},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 15,
                "acquireTime": micro(renewed),
                "renewTime": micro(renewed),
                "leaseTransitions": transitions,
            },
        })
    }

    fn micro(t: Timestamp) -> String {
        t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    }

    fn not_found() -> Call {
        Call::new("GET", LEASE, 404, mock::status(404, "NotFound"))
    }

    /// A future that never ends by itself and records when it was dropped (cancelled).
    fn work(stopped: &Arc<Mutex<Option<Instant>>>) -> impl std::future::Future<Output = ()> {
        struct Guard(Arc<Mutex<Option<Instant>>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                *self.0.lock() = Some(Instant::now());
            }
        }
        let guard = Guard(stopped.clone());
        async move {
            let _guard = guard;
            std::future::pending::<()>().await
        }
    }

    #[test]
    fn the_renew_deadline_is_shorter_than_the_lease_and_calls_shorter_than_the_deadline() {
        let t = timing();
        assert_eq!(t.renew_deadline, 10 * SECOND, "client-go's default");
        assert_eq!(t.retry_period, 2 * SECOND, "client-go's default");
        assert_eq!(t.call_timeout, 5 * SECOND, "client-go's renewDeadline / 2");
        for seconds in 3..=300 {
            let t = Timing::for_lease(Duration::from_secs(seconds));
            assert!(t.renew_deadline < t.lease_duration, "{t:?}");
            assert!(t.retry_period < t.renew_deadline, "{t:?}");
            assert!(t.call_timeout < t.renew_deadline, "{t:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_renewal_stops_the_work_within_the_renew_deadline() {
        let (client, server) = mock::client(vec![
            not_found(),
            Call::new("POST", LEASES, 201, Value::Null),
            // The renewal at +2 s goes through ...
            Call::new("GET", LEASE, 200, lease("a", 2, Timestamp::now(), 0)),
            Call::new("PUT", LEASE, 200, Value::Null),
            // ... then the API server takes requests and never answers.
            Call::hang("GET", LEASE),
            Call::hang("GET", LEASE),
        ]);
        let mut le = election(client, "a");
        let t0 = Instant::now();
        le.acquire().await;
        let stopped = Arc::new(Mutex::new(None));
        let ended =
            tokio::time::timeout(60 * SECOND, le.lead(work(&stopped), std::future::pending()))
                .await
                .expect("lead must end by itself");
        let Ended::Lost(why) = ended else {
            panic!("{ended:?}")
        };
        assert!(why.contains("renew deadline"), "{why}");
        // The last successful renewal started at +2 s; others, whose clocks start when they
        // see that write, cannot take over before +17 s. The work stopped at +12 s.
        let last_renewal = t0 + 2 * SECOND;
        let stopped_at = stopped.lock().expect("the work was dropped");
        assert_eq!(stopped_at - last_renewal, timing().renew_deadline);
        assert!(stopped_at - last_renewal < timing().lease_duration);
        assert_eq!(Instant::now(), stopped_at);
        let bodies = server.await.unwrap();
        assert_eq!(bodies.len(), 6);
        assert_eq!(bodies[3]["spec"]["holderIdentity"], "a");
        assert_eq!(bodies[3]["metadata"]["resourceVersion"], "2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_over_by_another_stops_the_work_at_once() {
        let (client, server) = mock::client(vec![
            not_found(),
            Call::new("POST", LEASES, 201, Value::Null),
            Call::new("GET", LEASE, 200, lease("b", 3, Timestamp::now(), 1)),
        ]);
        let mut le = election(client, "a");
        le.acquire().await;
        let t0 = Instant::now();
        let stopped = Arc::new(Mutex::new(None));
        let ended = le.lead(work(&stopped), std::future::pending()).await;
        assert_eq!(
            ended,
            Ended::Lost("lost the lease fusevol-controller to b".into())
        );
        assert_eq!(stopped.lock().expect("dropped") - t0, timing().retry_period);
        assert_eq!(server.await.unwrap().len(), 3, "no write, no release");
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_with_a_skewed_clock_keeps_its_lease_while_it_renews() {
        // The holder's renewTime is an hour behind the candidate's wall clock (clock skew), and
        // so a candidate comparing renewTime with its own clock would take over at once. By
        // client-go's rule the candidate waits until the record has not changed for a lease
        // duration of its own monotonic clock.
        let skewed = Timestamp::now() - SignedDuration::from_hours(1);
        let mut calls = Vec::new();
        // Renewed (a new record) at every look for 30 s: never taken over.
        for k in 0..=15u32 {
            let renewed = skewed + SignedDuration::from_secs(2 * i64::from(k));
            calls.push(Call::new("GET", LEASE, 200, lease("a", 10 + k, renewed, 4)));
        }
        // Then the holder stops renewing: the record seen at +30 s stays. The candidate looks
        // every 2 s; at +44 s the lease still runs (30 + 15 > 44), at +46 s it does not.
        let last = skewed + SignedDuration::from_secs(30);
        for _ in 0..8 {
            calls.push(Call::new("GET", LEASE, 200, lease("a", 25, last, 4)));
        }
        calls.push(Call::new("PUT", LEASE, 200, Value::Null));
        let (client, server) = mock::client(calls);
        let mut le = election(client, "b");
        let t0 = Instant::now();
        tokio::time::timeout(120 * SECOND, le.acquire())
            .await
            .expect("acquires once the lease goes unrenewed");
        let acquired = Instant::now() - t0;
        assert_eq!(acquired, 46 * SECOND);
        assert!(acquired - 30 * SECOND > timing().lease_duration);
        let bodies = server.await.unwrap();
        let put = bodies.last().unwrap();
        assert_eq!(
            put["metadata"]["resourceVersion"], "25",
            "the update is conditional"
        );
        assert_eq!(put["spec"]["holderIdentity"], "b");
        assert_eq!(put["spec"]["leaseTransitions"], 5);
        assert_eq!(put["spec"]["leaseDurationSeconds"], 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_stale_by_the_wall_clock_is_not_taken_over_before_a_lease_duration() {
        // A candidate that has just started sees a record an hour old: it still waits a full
        // lease duration of its own clock, since it cannot tell skew from death.
        let stale = lease("a", 7, Timestamp::now() - SignedDuration::from_hours(1), 0);
        let (client, server) = mock::client(vec![Call::new("GET", LEASE, 200, stale)]);
        let mut le = election(client, "b");
        assert_eq!(
            le.try_acquire_or_renew().await.unwrap(),
            Attempt::Following { holder: "a".into() }
        );
        assert_eq!(server.await.unwrap().len(), 1, "no write");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_work_then_releases_the_lease() {
        let (client, server) = mock::client(vec![
            not_found(),
            Call::new("POST", LEASES, 201, Value::Null),
            // Release: read for a current resourceVersion, then hand back.
            Call::new("GET", LEASE, 200, lease("a", 4, Timestamp::now(), 3)),
            Call::new("PUT", LEASE, 200, Value::Null),
        ]);
        let mut le = election(client, "a");
        le.acquire().await;
        let t0 = Instant::now();
        let stopped = Arc::new(Mutex::new(None));
        let ended = le.lead(work(&stopped), tokio::time::sleep(SECOND)).await;
        assert_eq!(ended, Ended::Shutdown);
        assert_eq!(stopped.lock().expect("dropped") - t0, SECOND);
        let bodies = server.await.unwrap();
        let released = &bodies[3];
        assert_eq!(released["metadata"]["resourceVersion"], "4");
        assert_eq!(released["spec"]["holderIdentity"], "");
        assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
        assert_eq!(released["spec"]["leaseTransitions"], 3);
        assert!(released["spec"]["renewTime"].is_string());
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_taken_over_at_the_first_try() {
        let (client, server) = mock::client(vec![
            Call::new("GET", LEASE, 200, lease("", 5, Timestamp::now(), 3)),
            Call::new("PUT", LEASE, 200, Value::Null),
        ]);
        let mut le = election(client, "b");
        assert_eq!(le.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
        let bodies = server.await.unwrap();
        assert_eq!(bodies[1]["spec"]["holderIdentity"], "b");
        assert_eq!(bodies[1]["spec"]["leaseTransitions"], 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_releases_nothing_and_a_hung_release_is_bounded() {
        let (client, server) = mock::client(vec![Call::new(
            "GET",
            LEASE,
            200,
            lease("a", 4, Timestamp::now(), 0),
        )]);
        let mut le = election(client, "b");
        assert!(
            !le.release().await.unwrap(),
            "the lease names another holder"
        );
        assert_eq!(server.await.unwrap().len(), 1, "no write");

        let (client, server) = mock::client(vec![Call::hang("GET", LEASE)]);
        let mut le = election(client, "a");
        let t0 = Instant::now();
        assert!(le.release().await.is_err());
        assert_eq!(Instant::now() - t0, timing().call_timeout);
        server.await.unwrap();
    }
}

/// A follower's `/metrics` (no leadership ever) is one valid OpenMetrics exposition: every
/// family once, with its TYPE, the leader gauge at 0, and the closing `# EOF`.
#[test]
fn a_followers_metrics_are_one_exposition_with_the_leader_gauge() {
    let metrics = ControllerMetrics::default();
    let text = metrics.render();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    assert!(
        text.contains("# TYPE fusevol_controller_leader gauge\nfusevol_controller_leader 0\n"),
        "{text}"
    );
    let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let unique: std::collections::BTreeSet<&&str> = types.iter().collect();
    assert_eq!(
        types.len(),
        unique.len(),
        "a family registered twice: {text}"
    );
    metrics.leader.set(1);
    assert!(metrics.render().contains("fusevol_controller_leader 1\n"));
}

/// FusevolNode updates re-queue every claim only when room grew: a new node or tier, or
/// more free bytes (a claim that did not fit may fit now). Allocations growing during a
/// burst, or an unchanged status, do not.
#[test]
fn only_more_room_on_a_node_requeues_the_claims() {
    let with_free = |name: &str, tier: &str, free: u64| -> FusevolNode {
        let mut n = node(name, 100);
        if let Some(s) = n.status.as_mut() {
            s.tiers[0].name = tier.into();
            s.tiers[0].free_bytes = free;
            s.tiers[0].allocated_bytes = 100 - free;
        }
        n
    };
    let mut free = FreeCapacity::default();
    assert!(free.grew(&with_free("n1", "fast", 100)), "a new node");
    assert!(!free.grew(&with_free("n1", "fast", 100)), "unchanged");
    assert!(!free.grew(&with_free("n1", "fast", 60)), "less room");
    assert!(!free.grew(&with_free("n1", "fast", 10)), "less room");
    assert!(free.grew(&with_free("n1", "fast", 30)), "room freed");
    assert!(free.grew(&with_free("n1", "bulk", 5)), "a new tier");
    assert!(free.grew(&with_free("n2", "fast", 0)), "another node");
    let mut no_status = node("n3", 1);
    no_status.status = None;
    assert!(
        !free.grew(&no_status),
        "a node without status offers nothing yet"
    );
}
