//! Static-provisioner mode (like sig-storage-local-static-provisioner): the agent keeps
//! `count` PVs of `size` per configured pool published for a `kubernetes.io/no-provisioner`
//! StorageClass. Each is an ordinary fusevol PV of this node (same annotations, layout and
//! finalizer), named `fusevol-<node>-<tier>-<index>`, with reclaim policy Delete: when its
//! claim goes, the agent wipes the volume, the PV goes, and the agent publishes a fresh one under the
//! same name on the next round. (The controller deletes the released PV object, as it does
//! for every released fusevol PV with policy Delete; the agent has no delete permission.)

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalVolumeSource, PersistentVolume, PersistentVolumeSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use super::config::{StaticConfig, StaticPool};
use crate::k8s::crd::FusevolNodeSpec;
use crate::k8s::layout::volume_paths;
use crate::k8s::params::{Compression, VolumeSpec};
use crate::k8s::provision::hostname_affinity;
use crate::k8s::{
    is_label_value, ANNOTATION_NODE, ANNOTATION_PROVISIONED_BY, ANNOTATION_TIER,
    ANNOTATION_VOLUME_SPEC, FINALIZER_DATA_CLEANUP, PROVISIONER,
};
use crate::size::format_bytes;

/// Label on static PVs: the tier of the pool they belong to.
pub const LABEL_STATIC_POOL: &str = "local.fusevol.io/static-pool";

/// Is `pv` one the agent published in static mode?
pub fn is_static(pv: &PersistentVolume) -> bool {
    pv.labels().contains_key(LABEL_STATIC_POOL)
}

/// The name of static PV `index` of `tier` on `node`: readable when it fits in a volume name
/// (63 characters), else with the node name replaced by a hash of it.
pub fn static_pv_name(node: &str, tier: &str, index: u32) -> String {
    let name = format!("fusevol-{node}-{tier}-{index}");
    if name.len() <= 63 && crate::store::validate_volume_name(&name).is_ok() {
        return name;
    }
    let hash = crate::fnv::fnv1a64(node.bytes());
    format!("fusevol-{hash:016x}-{tier}-{index}")
}

/// The PV for static slot `index` of `pool`.
pub fn build(
    node: &FusevolNodeSpec,
    class: &str,
    pool: &StaticPool,
    index: u32,
) -> PersistentVolume {
    let name = static_pv_name(&node.node_name, &pool.tier, index);
    let spec = VolumeSpec {
        quota_bytes: pool.size_bytes,
        tier: pool.tier.clone(),
        replicas: 1,
        compression: Compression::None,
        inode_limit: None,
        encryption: Default::default(),
        encryption_secret: None,
    };
    let hostname = node
        .hostname
        .clone()
        .unwrap_or_else(|| node.node_name.clone());
    let mut labels = BTreeMap::from([
        (LABEL_STATIC_POOL.to_string(), pool.tier.clone()),
        (ANNOTATION_TIER.to_string(), pool.tier.clone()),
    ]);
    if is_label_value(&node.node_name) {
        labels.insert(ANNOTATION_NODE.to_string(), node.node_name.clone());
    }
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([
                (
                    ANNOTATION_PROVISIONED_BY.to_string(),
                    PROVISIONER.to_string(),
                ),
                (ANNOTATION_VOLUME_SPEC.to_string(), spec.to_annotation()),
                (ANNOTATION_TIER.to_string(), pool.tier.clone()),
                (ANNOTATION_NODE.to_string(), node.node_name.clone()),
            ])),
            finalizers: Some(vec![FINALIZER_DATA_CLEANUP.to_string()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(format_bytes(pool.size_bytes)),
            )])),
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            local: Some(LocalVolumeSource {
                path: volume_paths(&node.root, &name).local_path,
                fs_type: None,
            }),
            node_affinity: Some(hostname_affinity(&hostname)),
            persistent_volume_reclaim_policy: Some("Delete".to_string()),
            storage_class_name: Some(class.to_string()),
            volume_mode: Some("Filesystem".to_string()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The static PVs that should exist and do not (by name) among `all`.
pub fn missing(
    node: &FusevolNodeSpec,
    config: &StaticConfig,
    all: &[PersistentVolume],
) -> Vec<PersistentVolume> {
    let mut out = Vec::new();
    for pool in &config.pools {
        for i in 0..pool.count {
            let name = static_pv_name(&node.node_name, &pool.tier, i);
            if !all.iter().any(|pv| pv.name_any() == name) {
                out.push(build(node, &config.storage_class, pool, i));
            }
        }
    }
    out
}

/// Publishes the missing static PVs.
pub async fn reconcile(
    client: &Client,
    node: &FusevolNodeSpec,
    config: &StaticConfig,
    all: &[PersistentVolume],
) {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    for pv in missing(node, config, all) {
        match api.create(&PostParams::default(), &pv).await {
            Ok(_) => tracing::info!(pv = %pv.name_any(), "published static PV"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => tracing::warn!(pv = %pv.name_any(), error = %e, "cannot publish static PV"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_mode_publishes_the_missing_slots_of_each_pool() {
        let node = FusevolNodeSpec {
            node_name: "n1".into(),
            hostname: None,
            root: "/var/lib/fusevol".into(),
        };
        let config = StaticConfig {
            storage_class: "fusevol-static".into(),
            pools: vec![StaticPool {
                tier: "standard".into(),
                count: 3,
                size_bytes: 1 << 30,
            }],
        };
        let existing = build(&node, "fusevol-static", &config.pools[0], 1);
        let missing = missing(&node, &config, &[existing]);
        let names: Vec<String> = missing.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["fusevol-n1-standard-0", "fusevol-n1-standard-2"]);
        let pv = &missing[0];
        let spec = pv.spec.as_ref().unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("fusevol-static"));
        assert_eq!(
            spec.local.as_ref().unwrap().path,
            "/var/lib/fusevol/volumes/fusevol-n1-standard-0/mnt/data"
        );
        assert!(is_static(pv));
        assert!(crate::k8s::provision::is_fusevol_pv(pv));
        assert_eq!(crate::k8s::provision::pv_capacity_bytes(pv), Some(1 << 30));
        let long = "n".repeat(80);
        let name = static_pv_name(&long, "standard", 7);
        assert!(name.len() <= 63 && name.ends_with("-standard-7"), "{name}");
    }
}
