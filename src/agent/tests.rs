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
fn the_plan_serves_bound_pvs_even_when_deleted_and_cleans_up_only_unclaimed_ones() {
    let pvs = [
        pv("bound", "n1", "Bound", "Delete", false),
        pv("other-node", "n2", "Bound", "Delete", false),
        pv("released-delete", "n1", "Released", "Delete", false),
        pv("released-retain", "n1", "Released", "Retain", false),
        pv("deleted-retain", "n1", "Released", "Retain", true),
        // `kubectl delete pv` of a PV whose claim still exists: pv-protection keeps it
        // Bound and the pod keeps using it, so it stays served with its data.
        pv("bound-deleting", "n1", "Bound", "Delete", true),
        pv("bound-deleting-retain", "n1", "Bound", "Retain", true),
        pv("pending-deleting", "n1", "Pending", "Delete", true),
        pv("deleted-released", "n1", "Released", "Delete", true),
        pv("failed-delete", "n1", "Failed", "Delete", false),
        pv("available-deleting", "n1", "Available", "Delete", true),
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
            "serve bound-deleting",
            "serve bound-deleting-retain",
            "serve pending-deleting",
            "cleanup deleted-released delete=true",
            "cleanup failed-delete delete=true",
            "cleanup available-deleting delete=true",
        ]
    );
    // Deleted, and our finalizer already gone: nothing left to do for it.
    let mut done = pv("done", "n1", "Released", "Retain", true);
    done.metadata.finalizers = Some(vec!["kubernetes.io/pv-protection".into()]);
    assert_eq!(plan("n1", &[done]).wanted, []);
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
    let (mut manager, root) = one_disk_manager(tmp.path());
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

/// A "pod": the PV's local path bind-mounted elsewhere, as kubelet does. Unmounted on drop.
struct PodMount {
    dir: std::path::PathBuf,
}

impl PodMount {
    fn new(local_path: &str, dir: std::path::PathBuf) -> PodMount {
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some(local_path),
            &dir,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        PodMount { dir }
    }
}

impl Drop for PodMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn one_disk_manager(tmp: &std::path::Path) -> (VolumeManager, std::path::PathBuf) {
    let root = tmp.join("root");
    let text = format!(
        "node_name = \"n1\"\nroot = \"{}\"\nlisten = \"127.0.0.1:0\"\n[[tiers]]\nname = \"fast\"\ndisks = [\"{}\"]\ncapacity = \"1Gi\"\n",
        root.display(),
        tmp.join("disk").display()
    );
    let config = AgentConfig::parse(&text, None).unwrap();
    let manager = VolumeManager::open(&config, Arc::new(crate::metrics::Metrics::new())).unwrap();
    (manager, root)
}

#[test]
fn a_bound_pv_being_deleted_stays_served_with_its_data_until_its_claim_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut manager, root) = one_disk_manager(tmp.path());
    let paths = crate::k8s::layout::volume_paths(&root.to_string_lossy(), "pvc-1");
    let out = manager.apply(&plan("n1", &[pv("pvc-1", "n1", "Bound", "Delete", false)]));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    std::fs::write(format!("{}/db", paths.local_path), b"rows").unwrap();

    // `kubectl delete pv` while the claim exists: a deletionTimestamp, still Bound.
    for _ in 0..3 {
        let out = manager.apply(&plan("n1", &[pv("pvc-1", "n1", "Bound", "Delete", true)]));
        assert!(out.errors.is_empty() && out.cleaned.is_empty(), "{out:?}");
    }
    assert_eq!(
        std::fs::read(format!("{}/db", paths.local_path)).unwrap(),
        b"rows",
        "the data and the live mount stay"
    );
    assert_eq!(manager.served(), ["pvc-1"]);

    // The claim is deleted: the PV controller releases the PV; now the data goes.
    let out = manager.apply(&plan(
        "n1",
        &[pv("pvc-1", "n1", "Released", "Delete", true)],
    ));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.cleaned, ["pvc-1"]);
    assert_eq!(manager.capacity()[0].allocated_bytes, 0);
}

/// The kubelet's bind mount outlives the host mount: stopping a volume must end the FUSE
/// connection itself, or the old pod keeps a live session on a key range that the store
/// believes closed, and sees whatever volume is created next.
#[test]
fn a_pod_bind_mount_reaches_nothing_after_its_volume_is_deleted_not_even_the_next_volume() {
    use std::io::{Read, Seek, Write};
    let tmp = tempfile::tempdir().unwrap();
    let (mut manager, root) = one_disk_manager(tmp.path());
    let p1 = crate::k8s::layout::volume_paths(&root.to_string_lossy(), "pvc-1");
    let out = manager.apply(&plan("n1", &[pv("pvc-1", "n1", "Bound", "Delete", false)]));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let pod = PodMount::new(&p1.local_path, tmp.path().join("pod-1"));
    // The pod holds a file open, as a database does.
    let mut held = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(pod.dir.join("wal"))
        .unwrap();
    held.write_all(b"tenant one").unwrap();
    held.sync_all().unwrap();

    // Pod force-deleted, claim deleted, PV released: the agent deletes the volume.
    let out = manager.apply(&plan(
        "n1",
        &[pv("pvc-1", "n1", "Released", "Delete", false)],
    ));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.cleaned, ["pvc-1"]);

    // A new tenant gets a volume on the same node and store.
    let out = manager.apply(&plan("n1", &[pv("pvc-2", "n1", "Bound", "Delete", false)]));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let p2 = crate::k8s::layout::volume_paths(&root.to_string_lossy(), "pvc-2");
    std::fs::write(format!("{}/secret", p2.local_path), b"tenant two").unwrap();
    std::fs::write(format!("{}/wal", p2.local_path), b"tenant two's wal").unwrap();

    // The old pod's bind mount and its open file reach nothing, never the new data.
    let connected = |r: &std::io::Result<()>| {
        !matches!(r, Err(e) if [libc::ENOTCONN, libc::ECONNABORTED, libc::EIO, libc::ENODEV]
            .contains(&e.raw_os_error().unwrap_or(0)))
    };
    // The held file may be answered from the old pod's own page cache (the kernel keeps
    // clean pages of an aborted connection), but only with tenant one's own bytes.
    let mut buf = Vec::new();
    let read_held = held
        .seek(std::io::SeekFrom::Start(0))
        .and_then(|_| held.read_to_end(&mut buf))
        .map(|_| ());
    assert!(
        !connected(&read_held) || buf == b"tenant one",
        "read of the held file: {read_held:?} {:?}",
        String::from_utf8_lossy(&buf)
    );
    let write_held = held.write_all(b"more").and_then(|_| held.sync_all());
    assert!(
        !connected(&write_held),
        "write of the held file: {write_held:?}"
    );
    for name in ["secret", "wal"] {
        let r = std::fs::read(pod.dir.join(name)).map(|_| ());
        assert!(!connected(&r), "{name} through the old bind mount: {r:?}");
    }
    let listing = std::fs::read_dir(&pod.dir).map(|_| ());
    assert!(
        !connected(&listing),
        "readdir of the old bind mount: {listing:?}"
    );
    drop(held);
    drop(pod);
    assert_eq!(
        std::fs::read(format!("{}/secret", p2.local_path)).unwrap(),
        b"tenant two",
        "the new volume is intact"
    );
}

#[test]
fn a_reissued_pv_of_the_same_name_is_never_served_the_previous_tenants_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut manager, _root) = one_disk_manager(tmp.path());
    let with_uid = |uid: &str| {
        let mut p = pv("static-n1-0", "n1", "Bound", "Retain", false);
        p.metadata.uid = Some(uid.into());
        p
    };
    let out = manager.apply(&plan("n1", &[with_uid("uid-old")]));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    // The old PV object goes (Retain: the data stays), and a new one takes its name.
    let out = manager.apply(&plan("n1", &[]));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let out = manager.apply(&plan("n1", &[with_uid("uid-new")]));
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert!(
        out.errors[0].to_string().contains("uid-old"),
        "{}",
        out.errors[0]
    );
    assert!(manager.served().is_empty(), "served for another tenant");
    // The old object itself is still served.
    let out = manager.apply(&plan("n1", &[with_uid("uid-old")]));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(manager.served(), ["static-n1-0"]);
}

#[test]
fn a_served_pv_that_turns_broken_or_vanishes_keeps_its_pod_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut manager, root) = one_disk_manager(tmp.path());
    let paths = crate::k8s::layout::volume_paths(&root.to_string_lossy(), "pvc-1");
    let good = pv("pvc-1", "n1", "Bound", "Delete", false);
    assert!(manager
        .apply(&plan("n1", std::slice::from_ref(&good)))
        .errors
        .is_empty());
    std::fs::write(format!("{}/f", paths.local_path), b"in use").unwrap();
    let mut broken = good.clone();
    broken
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ANNOTATION_VOLUME_SPEC.into(), "{".into());
    let out = manager.apply(&plan("n1", &[broken]));
    assert_eq!(out.errors.len(), 1, "the bad annotation is reported");
    assert_eq!(manager.served(), ["pvc-1"], "still served");
    // Gone from the PVs the agent sees (label removed, finalizer stripped by hand...).
    assert!(manager.apply(&plan("n1", &[])).errors.is_empty());
    assert_eq!(manager.served(), ["pvc-1"], "still served");
    assert_eq!(
        std::fs::read(format!("{}/f", paths.local_path)).unwrap(),
        b"in use"
    );
}

#[test]
fn a_pv_served_before_whose_volume_is_gone_is_reported_not_recreated_empty() {
    let tmp = tempfile::tempdir().unwrap();
    // The node's disk did not mount: the disk directory is empty (a fresh store).
    let (mut manager, _root) = one_disk_manager(tmp.path());
    manager.remember_served(["pvc-1".to_string()]);
    let out = manager.apply(&plan("n1", &[pv("pvc-1", "n1", "Bound", "Delete", false)]));
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert!(
        out.errors[0]
            .to_string()
            .contains("no disk of this node holds"),
        "{}",
        out.errors[0]
    );
    assert!(manager.served().is_empty());
    assert_eq!(
        manager.capacity()[0].allocated_bytes,
        0,
        "no empty volume made"
    );
}

/// `pv(name, n1, Bound, Delete)` whose volume spec asks for `quota` bytes.
fn bound_with_quota(name: &str, quota: u64) -> PersistentVolume {
    let mut p = pv(name, "n1", "Bound", "Delete", false);
    let spec =
        format!(r#"{{"quotaBytes":{quota},"tier":"fast","replicas":1,"compression":"none"}}"#);
    p.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_VOLUME_SPEC.into(), spec);
    p
}

fn df_size(path: &std::path::Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// Volume expansion on the node: a raised quota in the PV's spec reaches the live mount (and
/// a pod's bind mount of it) without a remount; an open file keeps working and can grow
/// past the old quota.
#[test]
fn a_raised_quota_is_applied_to_the_live_mount_without_a_remount() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let (mut manager, root) = one_disk_manager(tmp.path());
    let paths = crate::k8s::layout::volume_paths(&root.to_string_lossy(), "pvc-1");
    let out = manager.apply(&plan("n1", &[bound_with_quota("pvc-1", 64 << 20)]));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let pod = PodMount::new(&paths.local_path, tmp.path().join("pod-1"));
    let device = std::fs::metadata(&pod.dir).unwrap().dev();
    let mut held = std::fs::File::create(pod.dir.join("db")).unwrap();
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..48 {
        held.write_all(&chunk).unwrap();
    }
    held.sync_all().unwrap();
    assert_eq!(df_size(&pod.dir), 64 << 20);
    assert_eq!(manager.applied_quotas()["pvc-1"], 64 << 20);

    let out = manager.apply(&plan("n1", &[bound_with_quota("pvc-1", 128 << 20)]));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(
        out.started.is_empty(),
        "not served again: {:?}",
        out.started
    );
    assert_eq!(
        df_size(&pod.dir),
        128 << 20,
        "df in the pod shows the new size"
    );
    assert_eq!(
        std::fs::metadata(&pod.dir).unwrap().dev(),
        device,
        "the same mount"
    );
    // 48 MiB more than the old quota allowed, through the file held open all along.
    for _ in 0..48 {
        held.write_all(&chunk).unwrap();
    }
    held.sync_all().unwrap();
    assert_eq!(held.metadata().unwrap().len(), 96 << 20);
    assert_eq!(manager.applied_quotas()["pvc-1"], 128 << 20);
    assert_eq!(manager.capacity()[0].allocated_bytes, 128 << 20);
    drop(held);
    drop(pod);
}

/// A StorageClass's `compression` travels in the PV's spec: the agent creates the volume
/// with it, and what is written through the mount is stored compressed.
#[test]
fn a_pv_asking_for_compression_gets_a_compressed_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut manager, root) = one_disk_manager(tmp.path());
    let mut p = pv("pvc-z", "n1", "Bound", "Delete", false);
    p.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            ANNOTATION_VOLUME_SPEC.into(),
            r#"{"quotaBytes":67108864,"tier":"fast","replicas":1,"compression":"zstd"}"#.into(),
        );
    let out = manager.apply(&plan(
        "n1",
        &[p, pv("pvc-plain", "n1", "Bound", "Delete", false)],
    ));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let paths = crate::k8s::layout::volume_paths(&root.to_string_lossy(), "pvc-z");
    let rows: String = (0..100_000)
        .map(|i| format!("row {i} of a compressed table\n"))
        .collect();
    std::fs::write(format!("{}/table", paths.local_path), &rows).unwrap();
    let store = &manager.stores()[0];
    let z = store.inspect_volume_measured("pvc-z").unwrap();
    assert_eq!(z.compression.algorithm, crate::store::Compression::Zstd);
    assert_eq!(z.compression.logical_bytes, Some(rows.len() as u64));
    let stored = z.compression.stored_bytes.unwrap();
    assert!(stored > 0 && stored * 4 < rows.len() as u64, "{z:?}");
    let plain = store.inspect_volume("pvc-plain").unwrap();
    assert_eq!(plain.compression.algorithm, crate::store::Compression::None);
    manager.shutdown();
}

#[test]
fn only_quotas_the_pv_does_not_show_yet_are_confirmed() {
    let mut shown = bound_with_quota("shown", 1 << 30);
    shown
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            crate::k8s::ANNOTATION_APPLIED_QUOTA.into(),
            "1073741824".into(),
        );
    let mut stale = bound_with_quota("stale", 2 << 30);
    stale
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            crate::k8s::ANNOTATION_APPLIED_QUOTA.into(),
            "1073741824".into(),
        );
    let fresh = bound_with_quota("fresh", 1 << 30);
    let not_served = bound_with_quota("not-served", 1 << 30);
    let all = [shown, stale, fresh, not_served];
    let applied = BTreeMap::from([
        ("shown".to_string(), 1u64 << 30),
        ("stale".to_string(), 2 << 30),
        ("fresh".to_string(), 1 << 30),
    ]);
    let got: Vec<(String, u64)> = super::applied_quota::unconfirmed(&all, &applied)
        .into_iter()
        .map(|(pv, q)| (pv.name_any(), q))
        .collect();
    assert_eq!(
        got,
        [
            ("stale".to_string(), 2 << 30),
            ("fresh".to_string(), 1 << 30)
        ]
    );
}

#[tokio::test]
async fn a_confirmation_is_an_annotation_patch_guarded_by_the_resource_version() {
    let mut p = bound_with_quota("pvc-1", 2 << 30);
    p.metadata.resource_version = Some("17".into());
    let (client, server) = mock::client(vec![Call::new(
        "PATCH",
        "/api/v1/persistentvolumes/pvc-1",
        200,
        serde_json::to_value(&p).unwrap(),
    )]);
    super::applied_quota::confirm(&client, &p, 2 << 30)
        .await
        .unwrap();
    let bodies = server.await.unwrap();
    // A PV changed since the round read it: not an error (its change starts the next round).
    let (client, server) = mock::client(vec![Call::new(
        "PATCH",
        "/api/v1/persistentvolumes/pvc-1",
        409,
        mock::status(409, "Conflict"),
    )]);
    super::applied_quota::confirm(&client, &p, 2 << 30)
        .await
        .unwrap();
    server.await.unwrap();
    assert_eq!(
        bodies[0],
        json!({"metadata": {
            "resourceVersion": "17",
            "annotations": {crate::k8s::ANNOTATION_APPLIED_QUOTA: "2147483648"},
        }})
    );
}

/// A changed configuration (issue 15, per-node configuration without a restart): a new
/// tier's disk is opened and offered at once; a disk that holds volumes is neither
/// removed nor moved (refused, with a message naming it), an empty one is; a disk
/// removed and added again comes back.
#[test]
fn a_reconfiguration_opens_new_disks_and_never_drops_one_holding_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut manager, root) = one_disk_manager(tmp.path());
    let config = |tiers: &str| {
        let text = format!("node_name = \"n1\"\nroot = \"{}\"\n{tiers}", root.display());
        AgentConfig::parse(&text, None).unwrap().tiers
    };
    let (fast, bulk, spare) = (
        tmp.path().join("disk"),
        tmp.path().join("bulk"),
        tmp.path().join("spare"),
    );
    let tier = |name: &str, disks: &[&std::path::Path]| {
        let list: Vec<String> = disks
            .iter()
            .map(|d| format!("{:?}", d.display().to_string()))
            .collect();
        format!(
            "[[tiers]]\nname = \"{name}\"\ndisks = [{}]\n",
            list.join(", ")
        )
    };
    std::fs::create_dir_all(&bulk).unwrap();
    std::fs::create_dir_all(&spare).unwrap();
    let names = |m: &VolumeManager| -> Vec<(String, Vec<String>)> {
        m.capacity()
            .into_iter()
            .map(|t| (t.name.clone(), t.disks.clone()))
            .collect()
    };
    // Add a tier of two disks.
    let r = manager.reconfigure(&config(&format!(
        "{}{}",
        tier("fast", &[&fast]),
        tier("bulk", &[&bulk, &spare])
    )));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(r.opened.len(), 2);
    let shown = names(&manager);
    assert_eq!(shown[1].0, "bulk");
    assert_eq!(shown[1].1.len(), 2);
    // The fast disk holds a volume: removing it, or moving it, is refused; the empty
    // spare disk goes.
    manager.stores()[0]
        .create_volume("pvc-1", Some(1 << 20), None)
        .unwrap();
    let r = manager.reconfigure(&config(&tier("bulk", &[&bulk])));
    assert_eq!(r.refused.len(), 1, "{:?}", r.refused);
    assert!(r.refused[0].contains("holds volumes") && r.refused[0].contains("removing it"));
    assert_eq!(r.removed, std::slice::from_ref(&spare));
    let shown = names(&manager);
    let tiers: Vec<&str> = shown.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        tiers,
        ["bulk", "fast"],
        "fast stays while a volume is on it"
    );
    let r = manager.reconfigure(&config(&tier("bulk", &[&bulk, &fast])));
    assert!(
        r.refused[0].contains("moving it to tier \"bulk\""),
        "{:?}",
        r.refused
    );
    // The spare disk again: the same store, not a second open of it.
    let r = manager.reconfigure(&config(&format!(
        "{}{}",
        tier("fast", &[&fast]),
        tier("bulk", &[&bulk, &spare])
    )));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(names(&manager)[1].1.len(), 2);
    manager.shutdown();
}

/// `[[nodes]]` entries by labels: the labels read decide the disks, and are kept for a
/// start without the API server; with neither, the agent refuses to start rather than
/// open the top-level disks.
#[test]
fn labels_read_or_kept_choose_the_disks_and_without_them_the_agent_does_not_start() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let text = format!(
        "node_name = \"n1\"\nroot = \"{}\"\n[[tiers]]\nname = \"fast\"\ndisks = [\"/d/top\"]\n[[nodes]]\nlabels = {{ disks = \"nvme\" }}\n[[nodes.tiers]]\nname = \"fast\"\ndisks = [\"/d/nvme\"]\n",
        root.display()
    );
    let base = AgentConfig::parse(&text, None).unwrap();
    let disk = |c: &AgentConfig| c.tiers[0].disks[0].display().to_string();
    let e = super::choose_labels(&base, Err("API down".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be read (API down)"), "{e}");
    let nvme: std::collections::BTreeMap<String, String> =
        [("disks".to_string(), "nvme".to_string())].into();
    let (c, l) = super::choose_labels(&base, Ok(nvme.clone())).unwrap();
    assert_eq!((disk(&c), l), ("/d/nvme".to_string(), Some(nvme.clone())));
    // Kept: the next start without the API server chooses the same disks.
    let (c, _) = super::choose_labels(&base, Err("API down".into())).unwrap();
    assert_eq!(disk(&c), "/d/nvme");
    let (c, _) = super::choose_labels(&base, Ok(Default::default())).unwrap();
    assert_eq!(disk(&c), "/d/top", "relabelled: the top-level tiers");
}

/// A disk kept for its volumes (removed from the configuration while holding one) is
/// opened again by the next start, still gives no new volumes and no free room, and goes
/// once it is empty and a configuration change looks at it again.
#[test]
fn a_disk_kept_for_its_volumes_survives_a_restart_and_takes_no_new_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut manager, root) = one_disk_manager(tmp.path());
    let (fast, bulk) = (tmp.path().join("disk"), tmp.path().join("bulk"));
    std::fs::create_dir_all(&bulk).unwrap();
    let text = |disks: &str| {
        format!(
            "node_name = \"n1\"\nroot = \"{}\"\nlisten = \"127.0.0.1:0\"\n[[tiers]]\nname = \"fast\"\ndisks = [{disks}]\n",
            root.display()
        )
    };
    let only_bulk =
        AgentConfig::parse(&text(&format!("{:?}", bulk.display().to_string())), None).unwrap();
    manager.stores()[0]
        .create_volume("pvc-old", Some(1 << 20), None)
        .unwrap();
    let r = manager.reconfigure(&only_bulk.tiers);
    assert_eq!(r.refused.len(), 1, "{:?}", r.refused);
    manager.shutdown();
    drop((manager, r));
    // The next start opens the kept disk beside the configured one.
    let mut manager =
        VolumeManager::open(&only_bulk, Arc::new(crate::metrics::Metrics::new())).unwrap();
    let dirs: Vec<std::path::PathBuf> = manager
        .stores()
        .iter()
        .map(|s| s.dir().to_path_buf())
        .collect();
    assert_eq!(dirs, [bulk.clone(), fast.clone()]);
    let fast_tier = &manager.capacity()[0];
    assert_eq!(
        fast_tier.allocated_bytes,
        1 << 20,
        "the kept disk's volume still counts"
    );
    // New volumes go to the configured disk only.
    let out = manager.apply(&plan(
        "n1",
        &[pv("pvc-new", "n1", "Bound", "Delete", false)],
    ));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(manager.stores()[0]
        .volume_names()
        .unwrap()
        .contains(&"pvc-new".to_string()));
    assert!(!manager.stores()[1]
        .volume_names()
        .unwrap()
        .contains(&"pvc-new".to_string()));
    // Emptied, it goes at the next change.
    manager.stores()[1].delete_volume("pvc-old").unwrap();
    let r = manager.reconfigure(&only_bulk.tiers);
    assert_eq!(r.removed, std::slice::from_ref(&fast));
    manager.shutdown();
}
