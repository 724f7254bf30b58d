//! The agent: its plan as a pure function of PVs, its API traffic against a scripted API
//! server, and a real FUSE mount served for a PV object and removed with its data on Delete.

use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolume;
use serde_json::{json, Value};

use super::config::AgentConfig;
use super::volumes::{plan, Plan, VolumeManager, Wanted};
use super::*;
use crate::k8s::crd::{FusevolNodeSpec, FusevolNodeStatus, TierStatus};
use crate::k8s::mock::{self, Call};
use crate::k8s::{ANNOTATION_NODE, ANNOTATION_PROVISIONED_BY, ANNOTATION_VOLUME_SPEC, PROVISIONER};

fn pv(name: &str, node: &str, phase: &str, policy: &str, deleting: bool) -> PersistentVolume {
    let mut meta = json!({
        "name": name,
        "annotations": {
            ANNOTATION_PROVISIONED_BY: PROVISIONER,
            ANNOTATION_NODE: node,
            ANNOTATION_VOLUME_SPEC: r#"{"quotaBytes":67108864,"tier":"fast","replicas":1,"compression":"none"}"#,
        },
        "finalizers": ["kubernetes.io/pv-protection", FINALIZER_DATA_CLEANUP],
    });
    if deleting {
        meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    serde_json::from_value(json!({
        "metadata": meta,
        "spec": {"persistentVolumeReclaimPolicy": policy},
        "status": {"phase": phase},
    }))
    .unwrap()
}

#[test]
fn the_plan_serves_this_nodes_pvs_and_cleans_up_released_ones() {
    let pvs = [
        pv("bound", "n1", "Bound", "Delete", false),
        pv("other-node", "n2", "Bound", "Delete", false),
        pv("released-delete", "n1", "Released", "Delete", false),
        pv("released-retain", "n1", "Released", "Retain", false),
        pv("deleted-retain", "n1", "Released", "Retain", true),
    ];
    let Plan { wanted } = plan("n1", &pvs);
    let summary: Vec<String> = wanted
        .iter()
        .map(|w| match w {
            Wanted::Serve { pv, .. } => format!("serve {pv}"),
            Wanted::Cleanup { pv, delete_data } => format!("cleanup {pv} delete={delete_data}"),
            Wanted::Broken { pv, .. } => format!("broken {pv}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "serve bound",
            "cleanup released-delete delete=true",
            "serve released-retain",
            "cleanup deleted-retain delete=false",
        ]
    );
    let mut broken = pv("bad", "n1", "Bound", "Delete", false);
    broken
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ANNOTATION_VOLUME_SPEC.into(), "{".into());
    assert!(matches!(
        &plan("n1", &[broken]).wanted[0],
        Wanted::Broken { .. }
    ));
}

#[tokio::test]
async fn registering_applies_the_spec_and_capacity_goes_to_the_status_subresource() {
    let node = json!({"apiVersion": "local.fusevol.io/v1alpha1", "kind": "FusevolNode",
        "metadata": {"name": "n1"}, "spec": {"nodeName": "n1", "root": "/r"}});
    let (client, server) = mock::client(vec![
        Call::new(
            "PATCH",
            "/apis/local.fusevol.io/v1alpha1/fusevolnodes/n1",
            200,
            node.clone(),
        )
        .query("fieldManager=fusevol-agent"),
        Call::new(
            "PATCH",
            "/apis/local.fusevol.io/v1alpha1/fusevolnodes/n1/status",
            200,
            node,
        ),
    ]);
    let spec = FusevolNodeSpec {
        node_name: "n1".into(),
        hostname: None,
        root: "/r".into(),
    };
    register(&client, &spec).await.unwrap();
    let status = FusevolNodeStatus::from_tiers(
        vec![TierStatus::new("fast", 10 << 30, 1 << 30, vec![])],
        None,
    );
    publish_status(&client, "n1", &status).await.unwrap();
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0]["spec"], json!({"nodeName": "n1", "root": "/r"}));
    assert_eq!(bodies[0]["kind"], "FusevolNode");
    assert_eq!(
        bodies[1]["status"]["tiers"][0]["freeBytes"],
        json!(9u64 << 30)
    );
}

#[tokio::test]
async fn the_finalizer_is_removed_by_a_guarded_json_patch() {
    let released = pv("pv1", "n1", "Released", "Delete", true);
    let (client, server) = mock::client(vec![Call::new(
        "PATCH",
        "/api/v1/persistentvolumes/pv1",
        200,
        serde_json::to_value(&released).unwrap(),
    )]);
    remove_finalizer(&client, &released).await.unwrap();
    let bodies = server.await.unwrap();
    assert_eq!(
        bodies[0],
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER_DATA_CLEANUP},
            {"op": "remove", "path": "/metadata/finalizers/1"},
        ])
    );
    // Nothing to remove: no call at all.
    let (client, server) = mock::client(vec![]);
    let mut gone = released.clone();
    gone.metadata.finalizers = Some(vec!["kubernetes.io/pv-protection".into()]);
    remove_finalizer(&client, &gone).await.unwrap();
    assert_eq!(server.await.unwrap(), Vec::<Value>::new());
}

#[test]
fn a_pv_is_served_as_a_live_mount_and_its_data_deleted_on_release() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let disk = tmp.path().join("disk");
    let text = format!(
        "node_name = \"n1\"\nroot = \"{}\"\nlisten = \"127.0.0.1:0\"\n[[tiers]]\nname = \"fast\"\ndisks = [\"{}\"]\ncapacity = \"1Gi\"\n",
        root.display(),
        disk.display()
    );
    let config = AgentConfig::parse(&text, None).unwrap();
    let mut manager =
        VolumeManager::open(&config, Arc::new(crate::metrics::Metrics::new())).unwrap();
    let bound = pv("pvc-1", "n1", "Bound", "Delete", false);
    let outcome = manager.apply(&plan("n1", std::slice::from_ref(&bound)));
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert_eq!(outcome.started, ["pvc-1"]);

    let paths = crate::k8s::layout::volume_paths(&root.to_string_lossy(), "pvc-1");
    assert!(crate::mount::is_mounted(std::path::Path::new(
        &paths.mount_point
    )));
    let st = nix::sys::statvfs::statvfs(paths.mount_point.as_str()).unwrap();
    assert_eq!(
        st.blocks() as u64 * st.fragment_size() as u64,
        64 << 20,
        "df shows the quota"
    );
    std::fs::write(format!("{}/file", paths.local_path), b"hello").unwrap();
    assert_eq!(manager.capacity()[0].allocated_bytes, 64 << 20);

    // A second round changes nothing.
    let again = manager.apply(&plan("n1", std::slice::from_ref(&bound)));
    assert!(again.started.is_empty() && again.errors.is_empty());

    let released = pv("pvc-1", "n1", "Released", "Delete", false);
    let outcome = manager.apply(&plan("n1", &[released]));
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert_eq!(outcome.cleaned, ["pvc-1"]);
    assert!(!crate::mount::is_mounted(std::path::Path::new(
        &paths.mount_point
    )));
    assert!(
        !std::path::Path::new(&paths.dir).exists(),
        "the PV's directory is gone"
    );
    assert_eq!(
        manager.capacity()[0].allocated_bytes,
        0,
        "the volume is gone from the store"
    );
}
