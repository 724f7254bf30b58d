//! The node-loss decision over typed objects: a table of PV and claim states on a gone node,
//! which nodes count as missing, and the grace period.

use super::*;
use crate::k8s::{ANNOTATION_NODE, ANNOTATION_PROVISIONED_BY, PROVISIONER};
use serde_json::{json, Value};

fn node(name: &str, hostname: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {LABEL_HOSTNAME: hostname}},
    }))
    .unwrap()
}

fn fusevol_node(name: &str) -> FusevolNode {
    serde_json::from_value(json!({
        "apiVersion": "local.fusevol.io/v1alpha1", "kind": "FusevolNode",
        "metadata": {"name": name, "uid": format!("fvn-{name}")},
        "spec": {"nodeName": name, "root": "/var/lib/fusevol"},
    }))
    .unwrap()
}

fn class(name: &str, opt_in: Option<&str>) -> StorageClass {
    let mut annotations = serde_json::Map::new();
    if let Some(v) = opt_in {
        annotations.insert(ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS.into(), json!(v));
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "provisioner": PROVISIONER,
    }))
    .unwrap()
}

/// Claim `db/data` (uid `u1`) of class `fast`, with the opt-in annotation set to `opt_in`.
fn claim(opt_in: Option<&str>) -> PersistentVolumeClaim {
    let mut annotations = serde_json::Map::new();
    if let Some(v) = opt_in {
        annotations.insert(ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS.into(), json!(v));
    }
    serde_json::from_value(json!({
        "metadata": {"name": "data", "namespace": "db", "uid": "u1", "annotations": annotations},
        "spec": {"storageClassName": "fast"},
    }))
    .unwrap()
}

/// A fusevol PV `pvc-u1` on node `n1` in `phase`, bound by claimRef to `db/data` (uid `u1`).
fn pv(phase: &str, policy: &str, deleting: bool, finalizer: bool) -> PersistentVolume {
    let mut pv = json!({
        "metadata": {"name": "pvc-u1", "annotations": {
            ANNOTATION_PROVISIONED_BY: PROVISIONER, ANNOTATION_NODE: "n1",
        }},
        "spec": {
            "persistentVolumeReclaimPolicy": policy,
            "claimRef": {"namespace": "db", "name": "data", "uid": "u1"},
        },
        "status": {"phase": phase},
    });
    if deleting {
        pv["metadata"]["deletionTimestamp"] = json!("2026-12-01T10:00:00Z");
    }
    if finalizer {
        pv["metadata"]["finalizers"] =
            json!(["kubernetes.io/pv-protection", FINALIZER_DATA_CLEANUP]);
    }
    serde_json::from_value(pv).unwrap()
}

fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    *object.pointer_mut(pointer).unwrap() = value;
    object
}

#[derive(Debug, PartialEq)]
enum Want {
    Finalizer,
    DeleteClaim(OptIn),
    Keep,
    Nothing,
}

fn decided(c: &Cleanup) -> Want {
    match (&c.finalizers[..], &c.claims[..], &c.kept[..]) {
        ([pv], [], []) if pv == "pvc-u1" => Want::Finalizer,
        ([], [d], []) => {
            assert_eq!(
                (&*d.namespace, &*d.name, &*d.uid, &*d.pv),
                ("db", "data", "u1", "pvc-u1")
            );
            Want::DeleteClaim(d.opted_in.clone())
        }
        ([], [], [k]) => {
            assert_eq!(
                (&*k.namespace, &*k.claim, &*k.claim_uid, &*k.pv),
                ("db", "data", "u1", "pvc-u1")
            );
            Want::Keep
        }
        ([], [], []) => Want::Nothing,
        _ => panic!("more than one outcome for one PV: {c:?}"),
    }
}

#[test]
fn each_pv_state_on_a_gone_node_gets_its_outcome() {
    let released = |policy, deleting, finalizer| pv("Released", policy, deleting, finalizer);
    let bound = pv("Bound", "Delete", false, true);
    let other_uid: PersistentVolumeClaim = serde_json::from_value(with(
        serde_json::to_value(claim(None)).unwrap(),
        "/metadata/uid",
        json!("u2"),
    ))
    .unwrap();
    let mut claim_deleting = claim(Some("true"));
    claim_deleting.metadata.deletion_timestamp =
        serde_json::from_value(json!("2026-12-01T10:00:00Z")).unwrap();
    let not_ours: PersistentVolume = serde_json::from_value(with(
        serde_json::to_value(released("Delete", true, true)).unwrap(),
        &format!(
            "/metadata/annotations/{}",
            ANNOTATION_PROVISIONED_BY.replace('/', "~1")
        ),
        json!("other.example.com"),
    ))
    .unwrap();
    let elsewhere: PersistentVolume = serde_json::from_value(with(
        serde_json::to_value(released("Delete", true, true)).unwrap(),
        &format!(
            "/metadata/annotations/{}",
            ANNOTATION_NODE.replace('/', "~1")
        ),
        json!("n2"),
    ))
    .unwrap();
    let opt_class = class("fast", Some("true"));
    let plain_class = class("fast", None);
    #[rustfmt::skip]
    let table: Vec<(&str, PersistentVolume, Vec<PersistentVolumeClaim>, &StorageClass, Want)> = vec![
        ("released, Delete, being deleted: the data went with the node",
            released("Delete", true, true), vec![], &plain_class, Want::Finalizer),
        ("released, Delete, not deleted yet: the PV loop deletes it first",
            released("Delete", false, true), vec![], &plain_class, Want::Nothing),
        ("released, Retain, kept by nobody's delete: stays for the admin",
            released("Retain", false, true), vec![], &plain_class, Want::Nothing),
        ("released, Retain, deleted by an admin: nothing left to unmount",
            released("Retain", true, true), vec![], &plain_class, Want::Finalizer),
        ("failed and being deleted", pv("Failed", "Delete", true, true),
            vec![], &plain_class, Want::Finalizer),
        ("available (static pool) and being deleted", pv("Available", "Delete", true, true),
            vec![], &plain_class, Want::Finalizer),
        ("being deleted without our finalizer: not ours to release",
            released("Delete", true, false), vec![], &plain_class, Want::Nothing),
        ("bound, no annotation anywhere: the claim keeps its PV",
            bound.clone(), vec![claim(None)], &plain_class, Want::Keep),
        ("bound, the claim opts in", bound.clone(), vec![claim(Some("true"))], &plain_class,
            Want::DeleteClaim(OptIn::Claim)),
        ("bound, only \"true\" opts in", bound.clone(), vec![claim(Some("yes"))], &opt_class,
            Want::Keep),
        ("bound, the class opts in", bound.clone(), vec![claim(None)], &opt_class,
            Want::DeleteClaim(OptIn::Class("fast".into()))),
        ("bound, the claim opts out of a class that opts in",
            bound.clone(), vec![claim(Some("false"))], &opt_class, Want::Keep),
        ("bound, the claim is being deleted already", bound.clone(), vec![claim_deleting],
            &opt_class, Want::Nothing),
        ("bound, the claim is not in the cache", bound.clone(), vec![], &opt_class, Want::Nothing),
        ("bound to a claim of that name that was re-created (other uid)",
            bound.clone(), vec![other_uid], &opt_class, Want::Nothing),
        ("bound and `kubectl delete pv`'d: still the claim's data",
            pv("Bound", "Delete", true, true), vec![claim(None)], &plain_class, Want::Keep),
        ("pending: not settled by the PV controller", pv("Pending", "Delete", true, true),
            vec![claim(Some("true"))], &opt_class, Want::Nothing),
        ("not a fusevol PV", not_ours, vec![], &plain_class, Want::Nothing),
        ("a PV of another node", elsewhere, vec![], &plain_class, Want::Nothing),
    ];
    for (case, pv, claims, class, want) in table {
        let s = Snapshot {
            nodes: &[],
            fusevol_nodes: &[],
            pvs: std::slice::from_ref(&pv),
            claims: &claims,
            classes: std::slice::from_ref(class),
        };
        assert_eq!(decided(&cleanup("n1", &s)), want, "{case}");
    }
}

#[test]
fn the_gone_nodes_fusevol_node_is_deleted_by_uid_and_no_other() {
    let fvns = [fusevol_node("n1"), fusevol_node("n2")];
    let s = Snapshot {
        nodes: &[],
        fusevol_nodes: &fvns,
        pvs: &[],
        claims: &[],
        classes: &[],
    };
    let c = cleanup("n1", &s);
    assert_eq!(c.fusevol_node, Some(("n1".into(), "fvn-n1".into())));
    assert!(c.acts());
    let c = cleanup("n3", &s);
    assert_eq!(c, Cleanup::default());
    assert!(!c.acts());
}

#[test]
fn kept_volumes_alone_write_nothing() {
    let pvs = [pv("Bound", "Delete", false, true)];
    let claims = [claim(None)];
    let s = Snapshot {
        nodes: &[],
        fusevol_nodes: &[],
        pvs: &pvs,
        claims: &claims,
        classes: &[],
    };
    let c = cleanup("n1", &s);
    assert_eq!(c.kept.len(), 1);
    assert!(!c.acts(), "a kept volume is reported, never written");
}

#[test]
fn missing_nodes_are_those_fusevol_objects_name_without_a_node_object() {
    let nodes = [node("n2", "n2"), node("n3", "host-3")];
    let fvns = [fusevol_node("n1"), fusevol_node("n2")];
    // A PV on n4 by annotation, one pinned by hostname affinity only (host-3 is n3's label).
    let mut on_n4 = pv("Bound", "Delete", false, true);
    on_n4
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ANNOTATION_NODE.into(), "n4".into());
    let by_hostname: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "pvc-h", "annotations": {ANNOTATION_PROVISIONED_BY: PROVISIONER}},
        "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": LABEL_HOSTNAME, "operator": "In", "values": ["host-3"]}]}]}}},
    }))
    .unwrap();
    let foreign: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "other", "annotations": {ANNOTATION_NODE: "n9"}},
    }))
    .unwrap();
    let pvs = [on_n4, by_hostname, foreign];
    let s = Snapshot {
        nodes: &nodes,
        fusevol_nodes: &fvns,
        pvs: &pvs,
        claims: &[],
        classes: &[],
    };
    let missing: Vec<String> = missing_nodes(&s).into_iter().collect();
    assert_eq!(missing, ["n1", "n4"]);
}

#[test]
fn a_node_is_due_only_after_the_grace_period_and_a_return_resets_it() {
    let grace = Duration::from_secs(30);
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let set =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
    let mut gone = GoneSince::default();
    assert!(gone.observe(&set(&["n1"]), at(0), grace).is_empty());
    assert!(gone.observe(&set(&["n1", "n2"]), at(29), grace).is_empty());
    assert_eq!(gone.observe(&set(&["n1", "n2"]), at(30), grace), ["n1"]);
    // n1 re-registers (its Node is back), then goes again: a new grace period.
    assert_eq!(
        gone.observe(&set(&["n2"]), at(40), grace),
        Vec::<String>::new()
    );
    assert_eq!(gone.observe(&set(&["n1", "n2"]), at(59), grace), ["n2"]);
    assert_eq!(
        gone.observe(&set(&["n1", "n2"]), at(89), grace),
        ["n1", "n2"]
    );
    gone.forget("n1");
    assert_eq!(gone.observe(&set(&["n1", "n2"]), at(90), grace), ["n2"]);
    assert_eq!(
        gone.observe(&set(&["n1"]), at(90), Duration::ZERO),
        ["n1"],
        "no grace: due at once"
    );
}
