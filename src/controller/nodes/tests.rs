//! The node-loss sweep against a scripted API server, under tokio's paused clock: the grace
//! period, the order and bodies of every call (guarded finalizer patch, delete preconditions,
//! events), a node that re-registers, a FusevolNode re-created by its agent, no decision before
//! the caches are synced, and a failed call counted and retried.

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::Client;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::*;
use crate::controller::ControllerMetrics;
use crate::k8s::mock::{self, Call};
use crate::k8s::{ANNOTATION_NODE, ANNOTATION_PROVISIONED_BY, PROVISIONER};

const GRACE: Duration = Duration::from_secs(30);
const NODE_N1: &str = "/api/v1/nodes/n1";
const PV_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const DB_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/db/events";
const FVN_N1: &str = "/apis/local.fusevol.io/v1alpha1/fusevolnodes/n1";
const CLAIM_OPT: &str = "/api/v1/namespaces/db/persistentvolumeclaims/opt";

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

fn fusevol_node(name: &str) -> FusevolNode {
    serde_json::from_value(json!({
        "apiVersion": "local.fusevol.io/v1alpha1", "kind": "FusevolNode",
        "metadata": {"name": name, "uid": format!("fvn-{name}")},
        "spec": {"nodeName": name, "root": format!("/var/lib/fusevol-{name}")},
    }))
    .unwrap()
}

fn class() -> StorageClass {
    serde_json::from_value(json!({
        "metadata": {"name": "fusevol-fast"}, "provisioner": PROVISIONER,
    }))
    .unwrap()
}

fn claim(name: &str, opt_in: bool) -> PersistentVolumeClaim {
    let annotations = if opt_in {
        json!({ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS: "true"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "db", "uid": format!("u-{name}"),
                     "annotations": annotations},
        "spec": {"storageClassName": "fusevol-fast"},
    }))
    .unwrap()
}

/// A fusevol PV `pvc-<name>` on `node`: Bound to claim `db/<name>`, or Released and deleted.
fn pv(name: &str, node: &str, bound: bool) -> PersistentVolume {
    let mut pv = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {
            "name": format!("pvc-{name}"), "uid": format!("pv-{name}"),
            "annotations": {ANNOTATION_PROVISIONED_BY: PROVISIONER, ANNOTATION_NODE: node},
            "finalizers": ["kubernetes.io/pv-protection", FINALIZER_DATA_CLEANUP],
        },
        "spec": {
            "persistentVolumeReclaimPolicy": "Delete",
            "claimRef": {"namespace": "db", "name": name, "uid": format!("u-{name}")},
        },
        "status": {"phase": if bound { "Bound" } else { "Released" }},
    });
    if !bound {
        pv["metadata"]["deletionTimestamp"] = json!("2026-12-01T10:00:00Z");
    }
    serde_json::from_value(pv).unwrap()
}

/// A store as a reflector leaves it: synced after its first complete list when `synced`.
fn store<K>(objects: Vec<K>, synced: bool) -> (Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut writer: Writer<K> = Default::default();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    if synced {
        writer.apply_watcher_event(&watcher::Event::InitDone);
    }
    (writer.as_reader(), writer)
}

/// The cluster of most tests: node n1 is deleted, n2 is up. On n1: a Released PV being
/// deleted, a Bound PV whose claim opts in, a Bound PV whose claim does not; on n2 a Released
/// PV being deleted (its agent's business).
struct World {
    nodes: Vec<Node>,
    pvs: Vec<PersistentVolume>,
    claims: Vec<PersistentVolumeClaim>,
}

fn world() -> World {
    World {
        nodes: vec![node("n2")],
        pvs: vec![
            pv("rel", "n1", false),
            pv("opt", "n1", true),
            pv("keep", "n1", true),
            pv("other", "n2", false),
        ],
        claims: vec![claim("opt", true), claim("keep", false)],
    }
}

/// The shared context and the node-loss state over `w`, all caches synced; the returned
/// writers feed the Node and claim caches.
fn contexts(client: Client, w: World) -> (Context, NodeLoss, Writer<Node>) {
    let (nodes, node_writer) = store(w.nodes, true);
    let (claims, _) = store(w.claims, true);
    let ctx = Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "fusevol-controller".into(),
                instance: Some("test".into()),
            },
        ),
        client,
        pvs: store(w.pvs, true).0,
        nodes: store(vec![fusevol_node("n1"), fusevol_node("n2")], true).0,
        classes: store(vec![class()], true).0,
        reservations: Mutex::new(Vec::new()),
        metrics: std::sync::Arc::new(ControllerMetrics::default()),
    };
    let loss = NodeLoss::new(nodes, claims, GRACE, &ctx.metrics);
    (ctx, loss, node_writer)
}

fn not_found() -> Value {
    mock::status(404, "NotFound")
}

/// The calls a full cleanup of n1 makes, in order.
fn full_cleanup_calls() -> Vec<Call> {
    vec![
        Call::new("GET", NODE_N1, 404, not_found()),
        Call::new(
            "PATCH",
            "/api/v1/persistentvolumes/pvc-rel",
            200,
            serde_json::to_value(pv("rel", "n1", false)).unwrap(),
        ),
        Call::new("POST", PV_EVENTS, 201, Value::Null),
        Call::new(
            "DELETE",
            CLAIM_OPT,
            200,
            serde_json::to_value(claim("opt", true)).unwrap(),
        ),
        Call::new("POST", DB_EVENTS, 201, Value::Null),
        Call::new("POST", DB_EVENTS, 201, Value::Null),
        Call::new(
            "DELETE",
            FVN_N1,
            200,
            serde_json::to_value(fusevol_node("n1")).unwrap(),
        ),
    ]
}

fn cleaned(finalizers: usize, claims: usize, fusevol_node: bool) -> Outcome {
    Outcome::Cleaned {
        finalizers,
        claims,
        fusevol_node,
    }
}

#[tokio::test(start_paused = true)]
async fn a_deleted_node_is_cleaned_up_after_the_grace_period_and_only_once() {
    let (client, server) = mock::client(full_cleanup_calls());
    let (ctx, loss, _w) = contexts(client, world());
    // Within the grace period: nothing (the scripted server would see any call).
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]));
    tokio::time::advance(GRACE - Duration::from_secs(1)).await;
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        sweep(&ctx, &loss).await,
        Some(vec![("n1".into(), cleaned(1, 1, true))])
    );
    let bodies = server.await.unwrap();
    assert_eq!(
        bodies[1],
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER_DATA_CLEANUP},
            {"op": "remove", "path": "/metadata/finalizers/1"},
        ]),
        "the agent's guarded patch"
    );
    assert_eq!(bodies[2]["reason"], "DataGoneWithNode");
    assert_eq!(bodies[2]["type"], "Warning");
    assert_eq!(bodies[2]["regarding"]["name"], "pvc-rel");
    let note = bodies[2]["note"].as_str().unwrap();
    assert!(
        note.contains("node n1 is gone") && note.contains("data went with it"),
        "{note}"
    );
    assert_eq!(
        bodies[3]["preconditions"]["uid"], "u-opt",
        "only that claim"
    );
    assert_eq!(bodies[4]["reason"], "ClaimDeletedOnNodeLoss");
    assert_eq!(bodies[4]["regarding"]["name"], "opt");
    let note = bodies[4]["note"].as_str().unwrap();
    assert!(
        note.contains("the claim has local.fusevol.io/delete-claim-on-node-loss=true"),
        "{note}"
    );
    assert_eq!(bodies[5]["reason"], "VolumeOnGoneNode");
    assert_eq!(bodies[5]["regarding"]["name"], "keep");
    let note = bodies[5]["note"].as_str().unwrap();
    assert!(
        note.contains("PV pvc-keep is on node n1") && note.contains("keeps it"),
        "{note}"
    );
    assert_eq!(
        bodies[6]["preconditions"]["uid"], "fvn-n1",
        "only that FusevolNode"
    );
    let metrics = ctx.metrics.render();
    for action in ["finalizer_removed", "claim_deleted", "fusevolnode_deleted"] {
        let line = format!("fusevol_controller_node_loss_actions_total{{action=\"{action}\"}} 1");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // Once the caches show the result, a sweep writes nothing more: the kept claim was told
    // already. (The server is gone: any call would fail and count.)
    let (client, _) = mock::client(vec![]);
    let w = World {
        pvs: vec![pv("keep", "n1", true)],
        claims: vec![claim("keep", false)],
        ..world()
    };
    let (mut ctx2, _, _) = contexts(client, w);
    ctx2.nodes = store(vec![fusevol_node("n2")], true).0;
    let told = loss.told.lock().clone();
    assert_eq!(told, BTreeSet::from(["u-keep".to_string()]));
    assert_eq!(
        sweep(&ctx2, &loss).await,
        Some(vec![("n1".into(), Outcome::Nothing)])
    );
    assert_eq!(loss.metrics.failures.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_node_that_re_registered_is_left_alone_and_its_grace_starts_again() {
    // The Node cache lags: it still misses n1, but the API server has it again.
    let (client, server) = mock::client(vec![Call::new(
        "GET",
        NODE_N1,
        200,
        serde_json::to_value(node("n1")).unwrap(),
    )]);
    let (ctx, loss, _w) = contexts(client, world());
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]));
    tokio::time::advance(GRACE).await;
    assert_eq!(
        sweep(&ctx, &loss).await,
        Some(vec![("n1".into(), Outcome::Returned)])
    );
    assert_eq!(server.await.unwrap().len(), 1, "no write at all");
    // Still missing from the lagging cache: a new grace period, not an immediate retry.
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]));
    assert_eq!(loss.metrics.failures.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_node_back_in_the_cache_within_the_grace_period_is_never_touched() {
    let (client, server) = mock::client(vec![]);
    let (ctx, loss, mut nodes) = contexts(client, world());
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]));
    tokio::time::advance(GRACE / 2).await;
    nodes.apply_watcher_event(&watcher::Event::Apply(node("n1")));
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]));
    tokio::time::advance(GRACE).await;
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]));
    assert!(server.await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_fusevol_node_re_created_by_a_new_agent_is_not_deleted() {
    let mut calls = full_cleanup_calls();
    let last = calls.len() - 1;
    calls[last] = Call::new("DELETE", FVN_N1, 409, mock::status(409, "Conflict"));
    let (client, server) = mock::client(calls);
    let (ctx, loss, _w) = contexts(client, world());
    sweep(&ctx, &loss).await;
    tokio::time::advance(GRACE).await;
    assert_eq!(
        sweep(&ctx, &loss).await,
        Some(vec![("n1".into(), cleaned(1, 1, false))])
    );
    server.await.unwrap();
    assert_eq!(
        loss.metrics.failures.get(),
        0,
        "a failed precondition is no failure"
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_decided_and_no_grace_starts_before_every_cache_is_synced() {
    for unsynced in ["nodes", "claims"] {
        let (client, server) = mock::client(vec![]);
        let (ctx, mut loss, _w) = contexts(client, world());
        // At start the Node list is still coming in: every node looks gone.
        let (nodes, mut node_writer) = store(vec![], unsynced != "nodes");
        let (claims, mut claim_writer) = store(world().claims, unsynced != "claims");
        loss.nodes = nodes;
        loss.claims = claims;
        assert!(!loss.ready(&ctx), "{unsynced}");
        assert_eq!(sweep(&ctx, &loss).await, None, "{unsynced}");
        tokio::time::advance(GRACE * 2).await;
        assert_eq!(sweep(&ctx, &loss).await, None, "{unsynced}");
        // The list completes (with n1 and n2 in it).
        if unsynced == "nodes" {
            node_writer.apply_watcher_event(&watcher::Event::InitApply(node("n1")));
            node_writer.apply_watcher_event(&watcher::Event::InitApply(node("n2")));
            node_writer.apply_watcher_event(&watcher::Event::InitDone);
        } else {
            node_writer.apply_watcher_event(&watcher::Event::Apply(node("n1")));
            node_writer.apply_watcher_event(&watcher::Event::Apply(node("n2")));
            claim_writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        assert!(loss.ready(&ctx), "{unsynced}");
        assert_eq!(sweep(&ctx, &loss).await, Some(vec![]), "{unsynced}");
        assert!(server.await.unwrap().is_empty(), "{unsynced}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_node_seen_only_once_synced_waits_out_its_whole_grace_period() {
    // Unsynced for a minute, then synced without n1: the grace period starts at the sync.
    let (client, server) = mock::client(full_cleanup_calls());
    let (ctx, mut loss, _w) = contexts(client, world());
    let (nodes, mut node_writer) = store(vec![node("n2")], false);
    loss.nodes = nodes;
    assert_eq!(sweep(&ctx, &loss).await, None);
    tokio::time::advance(GRACE * 2).await;
    node_writer.apply_watcher_event(&watcher::Event::InitDone);
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]));
    tokio::time::advance(GRACE).await;
    assert_eq!(
        sweep(&ctx, &loss).await,
        Some(vec![("n1".into(), cleaned(1, 1, true))])
    );
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_call_is_counted_and_the_next_sweep_retries() {
    let mut calls = vec![
        Call::new("GET", NODE_N1, 404, not_found()),
        Call::new(
            "PATCH",
            "/api/v1/persistentvolumes/pvc-rel",
            500,
            mock::status(500, "InternalError"),
        ),
    ];
    // The rest of the first attempt goes on (each item is independent) ...
    calls.extend(full_cleanup_calls().into_iter().skip(3));
    // ... and the next sweep retries: the claim and FusevolNode are still cached (the cache
    // has not seen their deletion yet) and their deletes now answer 404.
    calls.push(Call::new("GET", NODE_N1, 404, not_found()));
    calls.push(Call::new(
        "PATCH",
        "/api/v1/persistentvolumes/pvc-rel",
        200,
        serde_json::to_value(pv("rel", "n1", false)).unwrap(),
    ));
    calls.push(Call::new("POST", PV_EVENTS, 201, Value::Null));
    calls.push(Call::new("DELETE", CLAIM_OPT, 404, not_found()));
    calls.push(Call::new("DELETE", FVN_N1, 404, not_found()));
    let (client, server) = mock::client(calls);
    let (ctx, loss, _w) = contexts(client, world());
    sweep(&ctx, &loss).await;
    tokio::time::advance(GRACE).await;
    assert_eq!(sweep(&ctx, &loss).await, Some(vec![]), "n1 failed");
    assert_eq!(loss.metrics.failures.get(), 1);
    assert_eq!(
        sweep(&ctx, &loss).await,
        Some(vec![("n1".into(), cleaned(1, 0, false))])
    );
    assert_eq!(loss.metrics.failures.get(), 1);
    let bodies = server.await.unwrap();
    assert_eq!(bodies.len(), 11);
}
