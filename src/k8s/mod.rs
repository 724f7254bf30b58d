//! The Kubernetes side of fusevol, as pure logic: no API calls, no async runtime.
//!
//! The agent (a DaemonSet, one per node) serves one FUSE filesystem per PersistentVolume and
//! publishes the node's capacity as a [`crd::FusevolNode`]; the controller (a Deployment with
//! leader election) provisions PersistentVolumes for claims whose StorageClass names the
//! provisioner [`PROVISIONER`]. The event loops that watch the API and act on what these
//! modules decide live elsewhere; everything here is a function of typed k8s-openapi objects.
//!
//! - [`params`]: StorageClass parameters and the claim's request → a validated
//!   [`params::VolumeRequest`] holding the [`params::VolumeSpec`] the agent serves.
//! - [`crd`]: the cluster-scoped `FusevolNode` custom resource (per-node, per-tier capacity).
//! - [`layout`]: where a volume lives under the agent's root on the host, and why the PV's
//!   `local.path` points *inside* the FUSE mount.
//! - [`provision`]: the controller's provisioning decision for one claim, and the helpers that
//!   read fusevol's PersistentVolumes (node, tier, capacity).
//! - [`node_loss`]: what the controller cleans up when a node's `Node` object is gone.
//! - [`expand`]: the controller's expansion decision for one bound claim.
//!
//! Names shared by the agent, the controller and the manifests under `deploy/` are constants
//! here so that they are spelled once.

pub mod crd;
pub mod expand;
pub mod layout;
#[cfg(test)]
pub mod mock;
pub mod node_loss;
pub mod params;
pub mod provision;

/// The provisioner name: StorageClasses with `provisioner: local.fusevol.io` are fusevol's, and
/// so is the CSIDriver object through which the scheduler reads published capacity.
pub const PROVISIONER: &str = "local.fusevol.io";

/// The scheduler's annotation on a WaitForFirstConsumer claim naming the node chosen for its
/// first consumer. The controller removes it to ask the scheduler to pick again.
pub const ANNOTATION_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// The annotation every dynamically provisioned PV carries naming its provisioner (the PV
/// controller of kube-controller-manager leaves deletion of such PVs to that provisioner).
pub const ANNOTATION_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// PV annotation holding the [`params::VolumeSpec`] as JSON: what the agent must serve.
pub const ANNOTATION_VOLUME_SPEC: &str = "local.fusevol.io/volume-spec";

/// PV annotation written by the node's agent: the quota (bytes, decimal) that the volume's
/// live mount enforces. An expansion reports the new size only once this shows it.
pub const ANNOTATION_APPLIED_QUOTA: &str = "local.fusevol.io/applied-quota";

/// PV annotation and label: the tier (disk pool) of the node holding the volume.
pub const ANNOTATION_TIER: &str = "local.fusevol.io/tier";

/// PV annotation (always) and label (when the name is a valid label value, that is at most 63
/// characters): the name of the node holding the volume.
pub const ANNOTATION_NODE: &str = "local.fusevol.io/node";

/// PV finalizer: the PV object goes away only after the agent has deleted the volume's data.
pub const FINALIZER_DATA_CLEANUP: &str = "local.fusevol.io/data-cleanup";

/// Claim or StorageClass annotation: `"true"` lets the controller delete a Bound claim whose
/// node is gone (its `Node` object deleted), so that its pod can get a fresh volume elsewhere.
/// A claim's own value wins over its class's. See [`node_loss`].
pub const ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS: &str = "local.fusevol.io/delete-claim-on-node-loss";

/// The well-known node label that PV node affinity and StorageClass `allowedTopologies` use.
pub const LABEL_HOSTNAME: &str = "kubernetes.io/hostname";

/// Formats a byte count for people: the largest binary unit in which it is at least 1, with
/// at most one decimal (`10Gi`, `2.5Ti`, `17.3Gi`, `512`). Rounded, so for display only: the
/// result is still a valid Kubernetes quantity, but not an exact one.
pub fn display_bytes(bytes: u64) -> String {
    for (suffix, shift) in crate::size::BINARY_UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit {
            // Tenths of the unit, rounded to nearest; u128 so that nothing overflows.
            let tenths = (u128::from(bytes) * 10 + u128::from(unit) / 2) / u128::from(unit);
            return if tenths % 10 == 0 {
                format!("{}{suffix}", tenths / 10)
            } else {
                format!("{}.{}{suffix}", tenths / 10, tenths % 10)
            };
        }
    }
    bytes.to_string()
}

/// Is `name` a DNS label (RFC 1123): 1 to 63 lowercase letters, digits and `-`, starting and
/// ending with a letter or digit? Tier names must be, as they become label values and paths.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Is `value` a valid Kubernetes label value: empty, or at most 63 characters of
/// alphanumerics, `-`, `_` and `.`, starting and ending with an alphanumeric?
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.is_empty()
        || (bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_bytes_is_short_and_readable() {
        assert_eq!(display_bytes(0), "0");
        assert_eq!(display_bytes(512), "512");
        assert_eq!(display_bytes(1024), "1Ki");
        assert_eq!(display_bytes(10 << 30), "10Gi");
        assert_eq!(display_bytes(5 << 39), "2.5Ti");
        assert_eq!(display_bytes((17 << 30) + (300 << 20)), "17.3Gi");
        assert_eq!(display_bytes((1 << 30) - 1), "1024Mi", "rounds to nearest");
        assert_eq!(display_bytes(u64::MAX), "16Ei");
    }

    #[test]
    fn dns_labels_are_lowercase_alphanumerics_and_dashes() {
        for ok in ["default", "fast", "nvme-0", "a", "0", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok:?}");
        }
        for bad in [
            "",
            "Fast",
            "fast_1",
            "-fast",
            "fast-",
            "a.b",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
    }

    #[test]
    fn label_values_allow_dots_and_underscores_up_to_63_characters() {
        for ok in ["", "node-1", "ip-10-0-0-1.ec2.internal", "A_b"] {
            assert!(is_label_value(ok), "{ok:?}");
        }
        for bad in ["-a", "a.", "a/b", &"a".repeat(64)] {
            assert!(!is_label_value(bad), "{bad:?}");
        }
    }
}
