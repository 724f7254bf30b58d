//! The provisioning decision over typed k8s-openapi objects, one behaviour per test.

use super::*;
use crate::k8s::crd::{FusevolNodeSpec, FusevolNodeStatus, TierStatus};
use crate::k8s::params::Compression;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaimSpec, TopologySelectorLabelRequirement, TopologySelectorTerm,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

pub(crate) const GI: u64 = 1 << 30;

pub(crate) fn node(name: &str, tiers: &[(&str, u64)]) -> FusevolNode {
    node_with_root(name, "/var/lib/fusevol", tiers)
}

fn node_with_root(name: &str, root: &str, tiers: &[(&str, u64)]) -> FusevolNode {
    let mut node = agent_without_status(name, root);
    node.status = Some(FusevolNodeStatus::from_tiers(
        tiers
            .iter()
            .map(|(tier, total)| TierStatus::new(*tier, *total, 0, vec![format!("/disks/{tier}")]))
            .collect(),
        Some("test".into()),
    ));
    node
}

fn agent_without_status(name: &str, root: &str) -> FusevolNode {
    FusevolNode::new(
        name,
        FusevolNodeSpec {
            node_name: name.into(),
            hostname: None,
            root: root.into(),
        },
    )
}

pub(crate) fn class(binding: &str, params: &[(&str, &str)]) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some("fusevol-fast".into()),
            ..Default::default()
        },
        provisioner: PROVISIONER.into(),
        parameters: Some(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        volume_binding_mode: Some(binding.into()),
        ..Default::default()
    }
}

fn wffc() -> StorageClass {
    class("WaitForFirstConsumer", &[("tier", "fast")])
}

fn immediate() -> StorageClass {
    class("Immediate", &[("tier", "fast")])
}

pub(crate) fn claim(
    uid: &str,
    storage: &str,
    selected_node: Option<&str>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(format!("data-{uid}")),
            namespace: Some("apps".into()),
            uid: Some(uid.into()),
            annotations: selected_node
                .map(|n| BTreeMap::from([(ANNOTATION_SELECTED_NODE.to_string(), n.to_string())])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some("fusevol-fast".into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.into()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// A fusevol PV as the controller creates it (via [`decide`]), for `claim_uid` on `node`.
pub(crate) fn existing_pv(
    node_name: &str,
    tier: &str,
    bytes: u64,
    claim_uid: &str,
) -> PersistentVolume {
    let nodes = [node(node_name, &[(tier, u64::MAX)])];
    let class = class("WaitForFirstConsumer", &[("tier", tier)]);
    let claim = claim(claim_uid, &bytes.to_string(), Some(node_name));
    match decide(&claim, &class, &state(&nodes, &[], &[])) {
        Decision::Create { pv, .. } => *pv,
        other => panic!("could not build a PV: {other:?}"),
    }
}

pub(crate) fn state<'a>(
    nodes: &'a [FusevolNode],
    pvs: &'a [PersistentVolume],
    reservations: &'a [Reservation],
) -> ClusterState<'a> {
    ClusterState {
        nodes,
        pvs,
        reservations,
    }
}

fn created(decision: Decision) -> (PersistentVolume, Reservation) {
    match decision {
        Decision::Create { pv, reservation } => (*pv, reservation),
        other => panic!("expected Create, got {other:?}"),
    }
}

fn rescheduled(decision: Decision) -> String {
    match decision {
        Decision::Reschedule { message } => message,
        other => panic!("expected Reschedule, got {other:?}"),
    }
}

fn failed(decision: Decision) -> String {
    match decision {
        Decision::Fail { message } => message,
        other => panic!("expected Fail, got {other:?}"),
    }
}

fn chosen_node(decision: Decision) -> String {
    created(decision).1.node
}

#[test]
fn wait_for_first_consumer_claim_without_selected_node_waits() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let decision = decide(&claim("u1", "1Gi", None), &wffc(), &state(&nodes, &[], &[]));
    assert_eq!(decision, Decision::Wait);
}

#[test]
fn selected_node_with_room_gets_a_pv_pinned_to_it_with_every_field_set() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let mut class = wffc();
    class.mount_options = Some(vec!["noatime".into()]);
    let (pv, reservation) = created(decide(
        &claim("u1", "10Gi", Some("n1")),
        &class,
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(
        reservation,
        Reservation {
            node: "n1".into(),
            tier: "fast".into(),
            bytes: 10 * GI,
            claim_uid: "u1".into(),
        }
    );

    let meta = &pv.metadata;
    assert_eq!(meta.name.as_deref(), Some("pvc-u1"));
    let annotations = meta.annotations.clone().unwrap_or_default();
    assert_eq!(annotations[ANNOTATION_PROVISIONED_BY], "local.fusevol.io");
    assert_eq!(annotations[ANNOTATION_TIER], "fast");
    assert_eq!(annotations[ANNOTATION_NODE], "n1");
    let spec = VolumeSpec::from_annotation(&annotations[ANNOTATION_VOLUME_SPEC]).unwrap();
    assert_eq!(
        spec,
        VolumeSpec {
            quota_bytes: 10 * GI,
            tier: "fast".into(),
            replicas: 1,
            compression: Compression::None,
            inode_limit: None,
            encryption: Default::default(),
            encryption_secret: None,
        }
    );
    let labels = meta.labels.clone().unwrap_or_default();
    assert_eq!(labels[ANNOTATION_NODE], "n1");
    assert_eq!(labels[ANNOTATION_TIER], "fast");
    assert_eq!(
        meta.finalizers.as_deref(),
        Some(&["local.fusevol.io/data-cleanup".to_string()][..])
    );

    let spec = pv.spec.clone().unwrap();
    assert_eq!(spec.capacity.unwrap()["storage"], Quantity("10Gi".into()));
    assert_eq!(spec.access_modes.unwrap(), ["ReadWriteOnce"]);
    assert_eq!(
        spec.local.unwrap().path,
        "/var/lib/fusevol/volumes/pvc-u1/mnt/data"
    );
    let term = &spec
        .node_affinity
        .unwrap()
        .required
        .unwrap()
        .node_selector_terms[0];
    let requirement = &term.match_expressions.as_ref().unwrap()[0];
    assert_eq!(
        (requirement.key.as_str(), requirement.operator.as_str()),
        ("kubernetes.io/hostname", "In")
    );
    assert_eq!(requirement.values.as_deref(), Some(&["n1".to_string()][..]));
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Delete")
    );
    assert_eq!(spec.mount_options.unwrap(), ["noatime"]);
    assert_eq!(spec.storage_class_name.as_deref(), Some("fusevol-fast"));
    assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
    let claim_ref = spec.claim_ref.unwrap();
    assert_eq!(claim_ref.namespace.as_deref(), Some("apps"));
    assert_eq!(claim_ref.name.as_deref(), Some("data-u1"));
    assert_eq!(claim_ref.uid.as_deref(), Some("u1"));
    assert_eq!(claim_ref.api_version.as_deref(), Some("v1"));
    assert_eq!(claim_ref.kind.as_deref(), Some("PersistentVolumeClaim"));

    assert_eq!(pv_node(&pv), Some("n1"));
    assert_eq!(pv_tier(&pv), Some("fast"));
    assert_eq!(pv_capacity_bytes(&pv), Some(10 * GI));
    assert!(is_fusevol_pv(&pv));
}

#[test]
fn pv_path_is_under_the_chosen_nodes_own_root() {
    let nodes = [
        node_with_root("n1", "/var/lib/fusevol", &[("fast", 20 * GI)]),
        node_with_root("n2", "/mnt/ssd/fusevol/", &[("fast", 20 * GI)]),
    ];
    let (pv, _) = created(decide(
        &claim("u2", "1Gi", Some("n2")),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    let path = pv.spec.and_then(|s| s.local).map(|l| l.path);
    assert_eq!(
        path.as_deref(),
        Some("/mnt/ssd/fusevol/volumes/pvc-u2/mnt/data")
    );
}

#[test]
fn a_node_publishing_a_root_in_a_system_directory_gets_no_pv() {
    // A compromised agent rewrites its FusevolNode: no PV path is ever built under /etc.
    let nodes = [node_with_root("n1", "/etc/../etc", &[("fast", 20 * GI)])];
    let message = rescheduled(decide(
        &claim("u1", "1Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    assert!(
        message.contains("spec.root") && message.contains("refused"),
        "{message}"
    );
    let nodes = [node_with_root("n1", "/etc", &[("fast", 20 * GI)])];
    let message = rescheduled(decide(
        &claim("u1", "1Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    assert!(message.contains("system directory /etc"), "{message}");
}

#[test]
fn capacity_exhausted_on_selected_node_reschedules_saying_requested_and_free() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let pvs = [existing_pv("n1", "fast", 17 * GI, "old")];
    let message = rescheduled(decide(
        &claim("u1", "10Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &pvs, &[]),
    ));
    assert_eq!(
        message,
        r#"node n1 tier "fast": requested 10Gi, free 3Gi (total 20Gi, allocated 17Gi)"#
    );
}

#[test]
fn space_the_agent_reports_allocated_without_a_pv_is_not_offered_again() {
    // A Retain PV was deleted: its volume stays on the node and the agent counts it.
    let mut n = node("n1", &[("fast", 20 * GI)]);
    n.status = Some(FusevolNodeStatus::from_tiers(
        vec![TierStatus::new("fast", 20 * GI, 15 * GI, vec![])],
        None,
    ));
    let nodes = [n];
    let message = rescheduled(decide(
        &claim("u1", "10Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    assert!(message.contains("free 5Gi"), "{message}");
}

#[test]
fn a_claim_that_exactly_fills_the_tier_is_accepted() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let pvs = [existing_pv("n1", "fast", 17 * GI, "old")];
    let decision = decide(
        &claim("u1", "3Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &pvs, &[]),
    );
    assert_eq!(chosen_node(decision), "n1");
}

#[test]
fn selected_node_without_agent_reschedules() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let message = rescheduled(decide(
        &claim("u1", "1Gi", Some("n9")),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(
        message,
        r#"node n9 has no fusevol agent (no FusevolNode "n9")"#
    );
}

#[test]
fn selected_node_whose_agent_published_no_capacity_reschedules() {
    let nodes = [agent_without_status("n1", "/var/lib/fusevol")];
    let message = rescheduled(decide(
        &claim("u1", "1Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(
        message,
        "node n1: the fusevol agent has not published its capacity yet"
    );
}

#[test]
fn unknown_tier_on_selected_node_reschedules_listing_the_nodes_tiers() {
    let nodes = [node("n1", &[("standard", 20 * GI), ("archive", GI)])];
    let message = rescheduled(decide(
        &claim("u1", "1Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(
        message,
        r#"node n1 has no tier "fast" (its tiers: standard, archive)"#
    );
}

#[test]
fn two_sequential_decisions_with_the_first_reservation_recorded_cannot_over_commit() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let mut reservations = Vec::new();
    let (_, first) = created(decide(
        &claim("a", "15Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &reservations),
    ));
    reservations.push(first);
    // The first PV is not created yet (not in the snapshot): only the reservation protects it.
    let message = rescheduled(decide(
        &claim("b", "10Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &reservations),
    ));
    assert_eq!(
        message,
        r#"node n1 tier "fast": requested 10Gi, free 5Gi (total 20Gi, allocated 0, reserved for claims being provisioned 15Gi)"#
    );
    let (_, second) = created(decide(
        &claim("b", "5Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &reservations),
    ));
    reservations.push(second);
    let total: u64 = reservations.iter().map(|r| r.bytes).sum();
    assert_eq!(total, 20 * GI);
    let third = decide(
        &claim("c", "1", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &reservations),
    );
    assert!(matches!(third, Decision::Reschedule { .. }), "{third:?}");
}

#[test]
fn a_reservation_whose_pv_exists_is_not_counted_twice() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let pvs = [existing_pv("n1", "fast", 15 * GI, "a")];
    let reservations = [Reservation {
        node: "n1".into(),
        tier: "fast".into(),
        bytes: 15 * GI,
        claim_uid: "a".into(),
    }];
    let decision = decide(
        &claim("b", "5Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &pvs, &reservations),
    );
    assert_eq!(chosen_node(decision), "n1");
}

#[test]
fn a_claims_own_reservation_does_not_count_against_it_on_retry() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let reservations = [Reservation {
        node: "n1".into(),
        tier: "fast".into(),
        bytes: 15 * GI,
        claim_uid: "a".into(),
    }];
    let decision = decide(
        &claim("a", "15Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &reservations),
    );
    assert_eq!(chosen_node(decision), "n1");
}

#[test]
fn pvs_of_other_provisioners_nodes_and_tiers_do_not_count() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let mut foreign = existing_pv("n1", "fast", 19 * GI, "foreign");
    if let Some(a) = foreign.metadata.annotations.as_mut() {
        a.insert(
            ANNOTATION_PROVISIONED_BY.into(),
            "rancher.io/local-path".into(),
        );
    }
    let pvs = [
        foreign,
        existing_pv("n2", "fast", 19 * GI, "x"),
        existing_pv("n1", "standard", 19 * GI, "y"),
    ];
    assert_eq!(allocated_on("n1", "fast", &pvs), 0);
    let decision = decide(
        &claim("u1", "20Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &pvs, &[]),
    );
    assert_eq!(chosen_node(decision), "n1");
}

#[test]
fn immediate_binding_picks_the_node_with_the_most_free_space_in_the_tier() {
    let nodes = [
        node("n1", &[("fast", 20 * GI)]),
        node("n2", &[("fast", 30 * GI)]),
        node("n3", &[("fast", 50 * GI)]),
        node("n4", &[("standard", 500 * GI)]),
    ];
    let pvs = [existing_pv("n3", "fast", 40 * GI, "old")];
    let decision = decide(
        &claim("u1", "1Gi", None),
        &immediate(),
        &state(&nodes, &pvs, &[]),
    );
    assert_eq!(chosen_node(decision), "n2");
}

#[test]
fn immediate_binding_counts_reservations_when_picking_a_node() {
    let nodes = [
        node("n1", &[("fast", 20 * GI)]),
        node("n2", &[("fast", 30 * GI)]),
    ];
    let reservations = [Reservation {
        node: "n2".into(),
        tier: "fast".into(),
        bytes: 25 * GI,
        claim_uid: "other".into(),
    }];
    let decision = decide(
        &claim("u1", "1Gi", None),
        &immediate(),
        &state(&nodes, &[], &reservations),
    );
    assert_eq!(chosen_node(decision), "n1");
}

#[test]
fn immediate_binding_fails_when_no_node_fits_saying_why_for_each_node() {
    let nodes = [
        node("n1", &[("fast", 2 * GI)]),
        node("n2", &[("standard", 100 * GI)]),
        agent_without_status("n3", "/var/lib/fusevol"),
    ];
    let message = failed(decide(
        &claim("u1", "10Gi", None),
        &immediate(),
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(
        message,
        r#"no node can hold 10Gi in tier "fast": node n1 tier "fast": requested 10Gi, free 2Gi (total 2Gi, allocated 0); node n2 has no tier "fast" (its tiers: standard); node n3: the fusevol agent has not published its capacity yet"#
    );
}

#[test]
fn immediate_binding_without_any_agent_fails() {
    let message = failed(decide(
        &claim("u1", "1Gi", None),
        &immediate(),
        &state(&[], &[], &[]),
    ));
    assert!(
        message.ends_with("no node runs a fusevol agent (no FusevolNode objects)"),
        "{message}"
    );
}

fn hostname_topology(terms: &[&[&str]]) -> Vec<TopologySelectorTerm> {
    terms
        .iter()
        .map(|values| TopologySelectorTerm {
            match_label_expressions: Some(vec![TopologySelectorLabelRequirement {
                key: LABEL_HOSTNAME.into(),
                values: values.iter().map(|v| v.to_string()).collect(),
            }]),
        })
        .collect()
}

#[test]
fn immediate_binding_only_considers_nodes_in_allowed_topologies() {
    let nodes = [
        node("n1", &[("fast", 20 * GI)]),
        node("n2", &[("fast", 90 * GI)]),
        node("n3", &[("fast", 50 * GI)]),
    ];
    let mut class = immediate();
    class.allowed_topologies = Some(hostname_topology(&[&["n1"], &["n3", "n9"]]));
    let decision = decide(&claim("u1", "1Gi", None), &class, &state(&nodes, &[], &[]));
    assert_eq!(
        chosen_node(decision),
        "n3",
        "n2 has more room but is not allowed"
    );

    class.allowed_topologies = Some(hostname_topology(&[&["n7"]]));
    let message = failed(decide(
        &claim("u1", "1Gi", None),
        &class,
        &state(&nodes, &[], &[]),
    ));
    assert!(
        message.ends_with(
            "no node with a fusevol agent is allowed by the StorageClass's allowedTopologies"
        ),
        "{message}"
    );
}

#[test]
fn allowed_topologies_match_the_hostname_label_not_the_node_name() {
    let mut n1 = node("n1", &[("fast", 20 * GI)]);
    n1.spec.hostname = Some("host-1".into());
    let nodes = [n1];
    let mut class = immediate();
    class.allowed_topologies = Some(hostname_topology(&[&["host-1"]]));
    let (pv, reservation) = created(decide(
        &claim("u1", "1Gi", None),
        &class,
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(reservation.node, "n1");
    let affinity = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.clone())
        .unwrap();
    let values = affinity.required.unwrap().node_selector_terms[0]
        .match_expressions
        .clone()
        .unwrap()[0]
        .values
        .clone();
    assert_eq!(values.as_deref(), Some(&["host-1".to_string()][..]));
    assert_eq!(
        pv_node(&pv),
        Some("n1"),
        "the node annotation names the node, not the hostname"
    );
}

#[test]
fn immediate_binding_rejects_topology_keys_it_cannot_evaluate() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let mut class = immediate();
    class.allowed_topologies = Some(vec![TopologySelectorTerm {
        match_label_expressions: Some(vec![TopologySelectorLabelRequirement {
            key: "topology.kubernetes.io/zone".into(),
            values: vec!["a".into()],
        }]),
    }]);
    let message = failed(decide(
        &claim("u1", "1Gi", None),
        &class,
        &state(&nodes, &[], &[]),
    ));
    assert!(
        message.starts_with(
            r#"StorageClass allowedTopologies key "topology.kubernetes.io/zone" is not supported"#
        ),
        "{message}"
    );
}

#[test]
fn selected_node_outside_allowed_topologies_reschedules() {
    let nodes = [
        node("n1", &[("fast", 20 * GI)]),
        node("n2", &[("fast", 20 * GI)]),
    ];
    let mut class = wffc();
    class.allowed_topologies = Some(hostname_topology(&[&["n2"]]));
    let message = rescheduled(decide(
        &claim("u1", "1Gi", Some("n1")),
        &class,
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(
        message,
        "node n1 is not allowed by the StorageClass's allowedTopologies"
    );
    let decision = decide(
        &claim("u1", "1Gi", Some("n2")),
        &class,
        &state(&nodes, &[], &[]),
    );
    assert_eq!(chosen_node(decision), "n2");
}

#[test]
fn immediate_binding_honours_a_selected_node_annotation() {
    let nodes = [
        node("n1", &[("fast", 20 * GI)]),
        node("n2", &[("fast", 90 * GI)]),
    ];
    let decision = decide(
        &claim("u1", "1Gi", Some("n1")),
        &immediate(),
        &state(&nodes, &[], &[]),
    );
    assert_eq!(chosen_node(decision), "n1");
}

#[test]
fn bad_parameters_fail_naming_each_parameter_even_before_a_node_is_selected() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let class = class(
        "WaitForFirstConsumer",
        &[
            ("tier", "fast"),
            ("replicas", "2"),
            ("compression", "brotli"),
            ("encrypt", "yes"),
            ("inodeLimit", "many"),
        ],
    );
    let message = failed(decide(
        &claim("u1", "1Gi", None),
        &class,
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(
        message,
        concat!(
            "4 problems: ",
            r#"(1) StorageClass parameter "compression": "brotli" is not allowed; allowed values: none, lz4, zstd; "#,
            r#"(2) StorageClass parameter "encrypt" is not known; allowed parameters: tier, replicas, compression, inodeLimit, encryption, encryptionSecretName, encryptionSecretNamespace; "#,
            r#"(3) StorageClass parameter "inodeLimit": "many" is not allowed; allowed values: a positive integer (e.g. 100000); "#,
            r#"(4) StorageClass parameter "replicas": "2" is not supported yet; allowed values: 1"#,
        )
    );
}

#[test]
fn reclaim_policy_retain_and_delete_are_copied_and_recycle_fails() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    for (policy, expected) in [
        (None, "Delete"),
        (Some("Delete"), "Delete"),
        (Some("Retain"), "Retain"),
    ] {
        let mut class = wffc();
        class.reclaim_policy = policy.map(String::from);
        let (pv, _) = created(decide(
            &claim("u1", "1Gi", Some("n1")),
            &class,
            &state(&nodes, &[], &[]),
        ));
        let got = pv.spec.and_then(|s| s.persistent_volume_reclaim_policy);
        assert_eq!(got.as_deref(), Some(expected));
    }
    let mut recycle = wffc();
    recycle.reclaim_policy = Some("Recycle".into());
    let message = failed(decide(
        &claim("u1", "1Gi", Some("n1")),
        &recycle,
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(
        message,
        r#"StorageClass reclaimPolicy "Recycle" is not supported; allowed values: Delete, Retain"#
    );
}

#[test]
fn read_write_many_and_block_claims_fail() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let mut bad = claim("u1", "1Gi", Some("n1"));
    if let Some(spec) = bad.spec.as_mut() {
        spec.access_modes = Some(vec!["ReadWriteMany".into()]);
        spec.volume_mode = Some("Block".into());
    }
    let message = failed(decide(&bad, &wffc(), &state(&nodes, &[], &[])));
    assert!(
        message.contains(r#"access mode "ReadWriteMany" is not supported"#),
        "{message}"
    );
    assert!(
        message.contains(r#"volumeMode "Block" is not supported"#),
        "{message}"
    );
}

#[test]
fn a_claim_whose_pv_exists_is_already_provisioned() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let pvs = [existing_pv("n1", "fast", 20 * GI, "u1")];
    let decision = decide(
        &claim("u1", "20Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &pvs, &[]),
    );
    assert_eq!(
        decision,
        Decision::AlreadyProvisioned {
            pv_name: "pvc-u1".into()
        }
    );
    // Also when the PV is not in a (lagging) cache but the claim is bound to it already.
    let mut bound = claim("u1", "20Gi", Some("n1"));
    if let Some(spec) = bound.spec.as_mut() {
        spec.volume_name = Some("pvc-u1".into());
    }
    let decision = decide(&bound, &wffc(), &state(&nodes, &[], &[]));
    assert_eq!(
        decision,
        Decision::AlreadyProvisioned {
            pv_name: "pvc-u1".into()
        }
    );
}

#[test]
fn claims_for_other_provisioners_bound_elsewhere_or_being_deleted_are_skipped() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let cluster = state(&nodes, &[], &[]);
    let mut other = wffc();
    other.provisioner = "kubernetes.io/no-provisioner".into();
    assert!(matches!(
        decide(&claim("u1", "1Gi", Some("n1")), &other, &cluster),
        Decision::Skip { .. }
    ));

    let mut prebound = claim("u1", "1Gi", Some("n1"));
    if let Some(spec) = prebound.spec.as_mut() {
        spec.volume_name = Some("static-pv".into());
    }
    assert_eq!(
        decide(&prebound, &wffc(), &cluster),
        Decision::Skip {
            reason: "the claim is bound to PersistentVolume static-pv".into()
        }
    );

    let mut deleting = claim("u1", "1Gi", Some("n1"));
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    assert!(matches!(
        decide(&deleting, &wffc(), &cluster),
        Decision::Skip { .. }
    ));
}

#[test]
fn a_node_name_too_long_for_a_label_is_only_annotated() {
    let long = format!("node-{}", "x".repeat(70));
    let nodes = [node(&long, &[("fast", 20 * GI)])];
    let (pv, _) = created(decide(
        &claim("u1", "1Gi", Some(&long)),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    let labels = pv.metadata.labels.clone().unwrap_or_default();
    assert!(!labels.contains_key(ANNOTATION_NODE));
    assert_eq!(labels[ANNOTATION_TIER], "fast");
    assert_eq!(pv_node(&pv), Some(long.as_str()));
}

#[test]
fn pv_helpers_fall_back_to_node_affinity_and_the_volume_spec() {
    let mut pv = existing_pv("n1", "fast", 3 * GI, "u1");
    if let Some(a) = pv.metadata.annotations.as_mut() {
        a.remove(ANNOTATION_NODE);
    }
    if let Some(s) = pv.spec.as_mut() {
        s.capacity = None;
    }
    assert_eq!(
        pv_node(&pv),
        Some("n1"),
        "from kubernetes.io/hostname In [n1]"
    );
    assert_eq!(
        pv_capacity_bytes(&pv),
        Some(3 * GI),
        "from the volume-spec quota"
    );
    assert_eq!(allocated_on("n1", "fast", &[pv]), 3 * GI);
}

#[test]
fn fractional_requests_round_up_to_whole_bytes_in_the_pv_capacity() {
    let nodes = [node("n1", &[("fast", 20 * GI)])];
    let (pv, reservation) = created(decide(
        &claim("u1", "1.5Gi", Some("n1")),
        &wffc(),
        &state(&nodes, &[], &[]),
    ));
    assert_eq!(reservation.bytes, 3 * GI / 2);
    assert_eq!(
        pv.spec.and_then(|s| s.capacity).unwrap()["storage"],
        Quantity("1536Mi".into())
    );
}
