//! The `FusevolNode` custom resource: one cluster-scoped object per node, named after the node,
//! through which the node's agent publishes where its volumes live and how much each tier
//! (disk pool) can still hold. The controller reads it to place volumes.
//!
//! Spec or status? Both, each for what it is:
//! - `spec` is the node's identity, written by the agent when it registers and unchanged after:
//!   the node name, its `kubernetes.io/hostname` label value and the agent's root directory on
//!   the host (under which every PV path lies, see [`layout`](super::layout)).
//! - `status` is observed state — capacity per tier — which the agent refreshes often through
//!   the `/status` subresource. Status writes do not bump `metadata.generation`, cannot
//!   overwrite the spec, and are what Kubernetes conventions reserve for observations.
//!
//! So the agent creates the object with its spec (a status sent on create is dropped by the
//! API server), then patches `/status`. A node whose object has no status yet has published no
//! capacity: the controller places nothing there.
//!
//! Printer columns can only show scalar fields, so the status keeps node-wide totals (and the
//! tier names as one string) next to the per-tier list; [`FusevolNodeStatus::from_tiers`]
//! computes them, so they cannot disagree with the tiers.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::display_bytes;

/// Identity of a node's agent, written when it registers. Capacity, which changes, is observed
/// state: it is in the status.
// Each printcolumn(...) repeats `type_ = "string"`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "local.fusevol.io",
    version = "v1alpha1",
    kind = "FusevolNode",
    plural = "fusevolnodes",
    shortname = "fvn",
    status = "FusevolNodeStatus",
    derive = "PartialEq",
    doc = "A node's fusevol agent: where its volumes live on the host and the capacity of each tier (disk pool). One per node, named after the node; written by the agent.",
    printcolumn(
        name = "Tiers",
        type_ = "string",
        json_path = ".status.tierNames",
        description = "The node's tiers (disk pools)"
    ),
    printcolumn(
        name = "Total",
        type_ = "string",
        json_path = ".status.total",
        description = "Capacity of all tiers"
    ),
    printcolumn(
        name = "Allocated",
        type_ = "string",
        json_path = ".status.allocated",
        description = "Sum of the quotas of the node's volumes"
    ),
    printcolumn(
        name = "Free",
        type_ = "string",
        json_path = ".status.free",
        description = "Capacity not allocated to volumes"
    ),
    printcolumn(
        name = "Root",
        type_ = "string",
        json_path = ".spec.root",
        description = "The agent's directory on the host",
        priority = 1
    ),
    printcolumn(
        name = "Agent",
        type_ = "string",
        json_path = ".status.agentVersion",
        description = "Version of the node's agent",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FusevolNodeSpec {
    /// The node's name (also the object's name).
    pub node_name: String,
    /// The node's `kubernetes.io/hostname` label value, which PV node affinity and
    /// StorageClass `allowedTopologies` match; when absent, the node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The agent's root directory on the host: PV paths are
    /// `<root>/volumes/<pv-name>/mnt/data`.
    pub root: String,
}

/// Capacity of a node as its agent observes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FusevolNodeStatus {
    /// Per tier (disk pool) capacity.
    #[serde(default)]
    pub tiers: Vec<TierStatus>,
    /// Tier names joined with commas (for `kubectl get`).
    #[serde(default)]
    pub tier_names: String,
    /// Sum over tiers of `totalBytes`.
    #[serde(default)]
    pub total_bytes: u64,
    /// Sum over tiers of `allocatedBytes`.
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Sum over tiers of `freeBytes`.
    #[serde(default)]
    pub free_bytes: u64,
    /// `totalBytes` for people (rounded, e.g. `1.8Ti`).
    #[serde(default)]
    pub total: String,
    /// `allocatedBytes` for people.
    #[serde(default)]
    pub allocated: String,
    /// `freeBytes` for people.
    #[serde(default)]
    pub free: String,
    /// Version of the agent that wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// Capacity of one tier (disk pool) of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TierStatus {
    /// The tier's name, as StorageClass parameter `tier` names it.
    pub name: String,
    /// Bytes the tier offers to volumes.
    pub total_bytes: u64,
    /// Sum of the quotas of the volumes the agent holds in this tier.
    pub allocated_bytes: u64,
    /// `totalBytes - allocatedBytes` (0 when over-allocated).
    pub free_bytes: u64,
    /// The host directories (one per disk) holding the tier's data.
    #[serde(default)]
    pub disks: Vec<String>,
}

impl TierStatus {
    /// A tier's status, with `free_bytes` computed.
    pub fn new(
        name: impl Into<String>,
        total_bytes: u64,
        allocated_bytes: u64,
        disks: Vec<String>,
    ) -> Self {
        TierStatus {
            name: name.into(),
            total_bytes,
            allocated_bytes,
            free_bytes: total_bytes.saturating_sub(allocated_bytes),
            disks,
        }
    }
}

impl FusevolNodeStatus {
    /// A status whose node-wide totals and display fields are computed from `tiers`.
    pub fn from_tiers(tiers: Vec<TierStatus>, agent_version: Option<String>) -> Self {
        let sum = |f: fn(&TierStatus) -> u64| tiers.iter().map(f).fold(0u64, u64::saturating_add);
        let total_bytes = sum(|t| t.total_bytes);
        let allocated_bytes = sum(|t| t.allocated_bytes);
        let free_bytes = sum(|t| t.free_bytes);
        FusevolNodeStatus {
            tier_names: tiers
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            total_bytes,
            allocated_bytes,
            free_bytes,
            total: display_bytes(total_bytes),
            allocated: display_bytes(allocated_bytes),
            free: display_bytes(free_bytes),
            agent_version,
            tiers,
        }
    }

    /// The tier named `name`, if the node has it.
    pub fn tier(&self, name: &str) -> Option<&TierStatus> {
        self.tiers.iter().find(|t| t.name == name)
    }
}

/// The CustomResourceDefinition shipped in `deploy/`: [`FusevolNode::crd`] without the
/// empty-string `default`s that schemars derives from `#[serde(default)]` on `String` fields.
/// Kubernetes up to 1.20 refuses them (its schema validator takes a zero value for null:
/// "default: Invalid value: \"null\": in body must be of type string"), and they add
/// nothing: the agent always writes the whole status.
pub fn crd(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = FusevolNode::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            strip_empty_string_defaults(schema);
        }
    }
    crd
}

fn strip_empty_string_defaults(
    schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
) {
    if matches!(&schema.default, Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(serde_json::Value::String(s))) if s.is_empty())
    {
        schema.default = None;
    }
    for p in schema.properties.iter_mut().flat_map(|m| m.values_mut()) {
        strip_empty_string_defaults(p);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        strip_empty_string_defaults(items);
    }
}

impl FusevolNode {
    /// The node's `kubernetes.io/hostname` label value (its name unless published otherwise).
    pub fn hostname(&self) -> &str {
        self.spec
            .hostname
            .as_deref()
            .unwrap_or(&self.spec.node_name)
    }

    /// The tier named `name`, if the agent published it.
    pub fn tier(&self, name: &str) -> Option<&TierStatus> {
        self.status.as_ref().and_then(|s| s.tier(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn the_crd_is_cluster_scoped_with_a_status_subresource() {
        let crd = super::crd();
        let yaml = serde_yaml::to_string(&crd).unwrap();
        assert!(
            !yaml.contains("default: ''"),
            "Kubernetes 1.20 refuses empty-string defaults"
        );
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("fusevolnodes.local.fusevol.io")
        );
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.kind, "FusevolNode");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Tiers",
                "Total",
                "Allocated",
                "Free",
                "Root",
                "Agent",
                "Age"
            ]
        );
        assert_eq!(FusevolNode::api_version(&()), "local.fusevol.io/v1alpha1");
    }

    #[test]
    fn status_totals_are_computed_from_the_tiers() {
        let status = FusevolNodeStatus::from_tiers(
            vec![
                TierStatus::new("fast", 20 << 30, 17 << 30, vec!["/d/nvme0".into()]),
                TierStatus::new("standard", 100 << 30, 120 << 30, vec![]),
            ],
            Some("0.1.0".into()),
        );
        assert_eq!(status.tier_names, "fast,standard");
        assert_eq!(status.total_bytes, 120 << 30);
        assert_eq!(status.allocated_bytes, 137 << 30);
        assert_eq!(
            status.free_bytes,
            3 << 30,
            "an over-allocated tier has 0 free"
        );
        assert_eq!(
            (status.total.as_str(), status.free.as_str()),
            ("120Gi", "3Gi")
        );
        assert_eq!(status.tier("fast").map(|t| t.free_bytes), Some(3 << 30));
        assert!(status.tier("slow").is_none());
    }

    #[test]
    fn status_serializes_with_camel_case_fields() {
        let mut node = FusevolNode::new(
            "n1",
            FusevolNodeSpec {
                node_name: "n1".into(),
                hostname: None,
                root: "/var/lib/fusevol".into(),
            },
        );
        node.status = Some(FusevolNodeStatus::from_tiers(
            vec![TierStatus::new("fast", 1 << 30, 0, vec![])],
            None,
        ));
        let json = serde_json::to_value(&node).unwrap();
        assert_eq!(json["spec"]["nodeName"], "n1");
        assert_eq!(json["status"]["tiers"][0]["totalBytes"], 1u64 << 30);
        assert_eq!(json["status"]["tierNames"], "fast");
        assert_eq!(node.hostname(), "n1");
        let back: FusevolNode = serde_json::from_value(json).unwrap();
        assert_eq!(back, node);
    }
}
