//! What a claim asks for, validated: StorageClass parameters, the claim's storage request,
//! access modes, volume mode, reclaim policy and binding mode become a [`VolumeRequest`]
//! holding the [`VolumeSpec`] the agent will serve.
//!
//! StorageClass parameters of provisioner `local.fusevol.io`:
//!
//! | parameter     | values                                   | default   |
//! |---------------|------------------------------------------|-----------|
//! | `tier`        | a disk pool of the node (a DNS label)    | `default` |
//! | `replicas`    | `1` (copies on distinct disks of a tier) | `1`       |
//! | `compression` | `none`, `lz4`, `zstd`                    | `none`    |
//! | `inodeLimit`  | a positive integer                       | no limit  |
//! | `encryption`  | `none`, `aes-256-gcm`                    | `none`    |
//! | `encryptionSecretName`, `encryptionSecretNamespace` | the Secret holding the master key (data key `key`: 32 bytes or 64 hex digits); both required with `encryption: aes-256-gcm` | |
//!
//! `replicas` above 1 is recognised but rejected as "not supported yet" until the store
//! implements it. Validation collects every problem of a claim
//! and its class into one [`ParamsError`], so that one event tells the user everything to fix.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use serde::{Deserialize, Serialize};

use crate::size::{parse_quantity, SizeError};

/// The tier used when a StorageClass names none.
pub const DEFAULT_TIER: &str = "default";

const PARAM_TIER: &str = "tier";
const PARAM_REPLICAS: &str = "replicas";
const PARAM_COMPRESSION: &str = "compression";
const PARAM_INODE_LIMIT: &str = "inodeLimit";
const PARAM_ENCRYPTION: &str = "encryption";
const PARAM_SECRET_NAME: &str = "encryptionSecretName";
const PARAM_SECRET_NAMESPACE: &str = "encryptionSecretNamespace";
const KNOWN_PARAMETERS: &str = "tier, replicas, compression, inodeLimit, encryption, encryptionSecretName, encryptionSecretNamespace";

const ACCESS_MODE_RWO: &str = "ReadWriteOnce";
const ACCESS_MODE_RWOP: &str = "ReadWriteOncePod";
const VOLUME_MODE_FILESYSTEM: &str = "Filesystem";

/// What the agent serves for one PV. Travels to the agent as JSON in the PV annotation
/// [`ANNOTATION_VOLUME_SPEC`](super::ANNOTATION_VOLUME_SPEC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Quota for file data: the claim's `resources.requests.storage`.
    pub quota_bytes: u64,
    /// The node's disk pool holding the volume.
    pub tier: String,
    /// Copies on distinct disks of the tier (only 1 is supported yet).
    pub replicas: u32,
    /// Compression of the volume's stored chunks (applied when the agent creates it).
    pub compression: Compression,
    /// Maximum number of inodes; `None` for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode_limit: Option<u64>,
    /// Encryption at rest (applied when the agent creates the volume).
    #[serde(default, skip_serializing_if = "Encryption::is_none")]
    pub encryption: Encryption,
    /// The Secret holding the master key of an encrypted volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_secret: Option<SecretRef>,
}

/// A Secret named by a StorageClass: the agent reads only Secrets named this way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl VolumeSpec {
    /// The JSON stored in the PV annotation.
    pub fn to_annotation(&self) -> String {
        // Serializing a struct of strings and integers into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses the PV annotation written by [`to_annotation`](Self::to_annotation).
    pub fn from_annotation(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}

/// Compression of a volume's stored chunks (the store's own setting, fixed when the
/// agent creates the volume).
pub use crate::store::{Compression, Encryption};

/// What happens to a PV (and its data) when its claim is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimPolicy {
    /// The agent deletes the data, then the PV goes away (the default).
    Delete,
    /// The PV and its data stay until an administrator deletes the PV.
    Retain,
}

impl ReclaimPolicy {
    /// The value of `persistentVolumeReclaimPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReclaimPolicy::Delete => "Delete",
            ReclaimPolicy::Retain => "Retain",
        }
    }
}

/// When a claim of the class gets its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingMode {
    /// As soon as the claim exists: the controller picks the node.
    Immediate,
    /// When a pod uses the claim: the scheduler picks the node
    /// (annotation [`ANNOTATION_SELECTED_NODE`](super::ANNOTATION_SELECTED_NODE)).
    WaitForFirstConsumer,
}

/// The validated StorageClass: its parameters plus the class-level settings fusevol honours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSettings {
    pub tier: String,
    pub replicas: u32,
    pub compression: Compression,
    pub inode_limit: Option<u64>,
    pub encryption: Encryption,
    pub encryption_secret: Option<SecretRef>,
    pub reclaim_policy: ReclaimPolicy,
    pub binding_mode: BindingMode,
    /// `mountOptions` of the class, copied to the PV.
    pub mount_options: Vec<String>,
}

/// A claim and its class, validated: everything needed to build the PV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub spec: VolumeSpec,
    pub reclaim_policy: ReclaimPolicy,
    pub binding_mode: BindingMode,
    /// The claim's access modes (only ReadWriteOnce and ReadWriteOncePod).
    pub access_modes: Vec<String>,
    pub mount_options: Vec<String>,
}

/// One thing wrong with a claim or its StorageClass; its message names the field and, where
/// there is a choice, the allowed values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(
        "StorageClass parameter {name:?} is not known; allowed parameters: {KNOWN_PARAMETERS}"
    )]
    UnknownParameter { name: String },
    #[error(
        "StorageClass parameter {name:?}: {value:?} is not allowed; allowed values: {allowed}"
    )]
    ParameterNotAllowed {
        name: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("StorageClass parameter {name:?}: {value:?} is not supported yet; allowed values: {allowed}")]
    ParameterNotSupportedYet {
        name: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("StorageClass reclaimPolicy {0:?} is not supported; allowed values: Delete, Retain")]
    ReclaimPolicy(String),
    #[error("StorageClass volumeBindingMode {0:?} is not known; allowed values: WaitForFirstConsumer, Immediate")]
    BindingMode(String),
    #[error("access mode {0:?} is not supported: a fusevol volume lives on one node; allowed access modes: ReadWriteOnce, ReadWriteOncePod")]
    AccessMode(String),
    #[error(
        "the claim has no access modes; allowed access modes: ReadWriteOnce, ReadWriteOncePod"
    )]
    NoAccessModes,
    #[error("volumeMode {0:?} is not supported; allowed values: Filesystem")]
    VolumeMode(String),
    #[error("the claim requests no storage: set spec.resources.requests.storage (e.g. 10Gi)")]
    NoStorageRequest,
    #[error(
        "the claim requests 0 bytes of storage: spec.resources.requests.storage must be positive"
    )]
    ZeroStorageRequest,
    #[error("spec.resources.requests.storage: {0}")]
    BadStorageRequest(SizeError),
    #[error("spec.dataSource/dataSourceRef ({0}) is not supported: fusevol volumes start empty")]
    DataSource(String),
    #[error("spec.selector is not supported: fusevol provisions a new volume for every claim")]
    Selector,
    #[error("StorageClass parameters: {0}")]
    Encryption(&'static str),
}

/// Every problem found in a claim and its StorageClass. Displayed as the one problem's message,
/// or as `N problems: (1) ...; (2) ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", ProblemList(.problems))]
pub struct ParamsError {
    pub problems: Vec<Problem>,
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [only] => write!(f, "{only}"),
            problems => {
                write!(f, "{} problems:", problems.len())?;
                for (i, problem) in problems.iter().enumerate() {
                    let separator = if i == 0 { "" } else { ";" };
                    write!(f, "{separator} ({}) {problem}", i + 1)?;
                }
                Ok(())
            }
        }
    }
}

impl ClassSettings {
    /// Validates a StorageClass (its provisioner is the caller's business).
    pub fn from_storage_class(class: &StorageClass) -> Result<Self, ParamsError> {
        let mut problems = Vec::new();
        let settings = class_settings(class, &mut problems);
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ParamsError { problems })
        }
    }
}

impl VolumeRequest {
    /// Validates a claim together with its StorageClass, reporting every problem of both.
    pub fn new(claim: &PersistentVolumeClaim, class: &StorageClass) -> Result<Self, ParamsError> {
        let mut problems = Vec::new();
        let settings = class_settings(class, &mut problems);
        let claim_spec = claim.spec.clone().unwrap_or_default();

        let access_modes = claim_spec.access_modes.unwrap_or_default();
        if access_modes.is_empty() {
            problems.push(Problem::NoAccessModes);
        }
        for mode in &access_modes {
            if mode != ACCESS_MODE_RWO && mode != ACCESS_MODE_RWOP {
                problems.push(Problem::AccessMode(mode.clone()));
            }
        }
        if let Some(mode) = claim_spec
            .volume_mode
            .filter(|m| m != VOLUME_MODE_FILESYSTEM)
        {
            problems.push(Problem::VolumeMode(mode));
        }
        if let Some(source) = claim_spec.data_source_ref.map(|s| s.kind) {
            problems.push(Problem::DataSource(source));
        } else if let Some(source) = claim_spec.data_source.map(|s| s.kind) {
            problems.push(Problem::DataSource(source));
        }
        if claim_spec.selector.is_some() {
            problems.push(Problem::Selector);
        }
        let storage = claim_spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|mut requests| requests.remove("storage"));
        let quota_bytes = match storage {
            None => {
                problems.push(Problem::NoStorageRequest);
                0
            }
            Some(quantity) => match parse_quantity(&quantity.0) {
                Ok(0) => {
                    problems.push(Problem::ZeroStorageRequest);
                    0
                }
                Ok(bytes) => bytes,
                Err(e) => {
                    problems.push(Problem::BadStorageRequest(e));
                    0
                }
            },
        };

        if !problems.is_empty() {
            return Err(ParamsError { problems });
        }
        Ok(VolumeRequest {
            spec: VolumeSpec {
                quota_bytes,
                tier: settings.tier,
                replicas: settings.replicas,
                compression: settings.compression,
                inode_limit: settings.inode_limit,
                encryption: settings.encryption,
                encryption_secret: settings.encryption_secret,
            },
            reclaim_policy: settings.reclaim_policy,
            binding_mode: settings.binding_mode,
            access_modes,
            mount_options: settings.mount_options,
        })
    }
}

/// Reads a class, pushing its problems; the returned settings are meaningful only when no
/// problem was pushed.
fn class_settings(class: &StorageClass, problems: &mut Vec<Problem>) -> ClassSettings {
    let empty = BTreeMap::new();
    let parameters = class.parameters.as_ref().unwrap_or(&empty);
    let mut settings = ClassSettings {
        tier: DEFAULT_TIER.to_string(),
        replicas: 1,
        compression: Compression::None,
        inode_limit: None,
        encryption: Encryption::None,
        encryption_secret: None,
        reclaim_policy: ReclaimPolicy::Delete,
        binding_mode: BindingMode::Immediate,
        mount_options: class.mount_options.clone().unwrap_or_default(),
    };
    for (name, value) in parameters {
        match name.as_str() {
            PARAM_TIER => {
                if super::is_dns_label(value) {
                    settings.tier = value.clone();
                } else {
                    problems.push(Problem::ParameterNotAllowed {
                        name: PARAM_TIER,
                        value: value.clone(),
                        allowed: "the name of a disk pool of the node: 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
                    });
                }
            }
            PARAM_REPLICAS => match value.parse::<u32>() {
                Ok(1) => settings.replicas = 1,
                Ok(n) if n > 1 => problems.push(Problem::ParameterNotSupportedYet {
                    name: PARAM_REPLICAS,
                    value: value.clone(),
                    allowed: "1",
                }),
                _ => problems.push(Problem::ParameterNotAllowed {
                    name: PARAM_REPLICAS,
                    value: value.clone(),
                    allowed: "1 (2 and more: not supported yet)",
                }),
            },
            PARAM_COMPRESSION => match value.parse::<Compression>() {
                Ok(c) => settings.compression = c,
                Err(_) => problems.push(Problem::ParameterNotAllowed {
                    name: PARAM_COMPRESSION,
                    value: value.clone(),
                    allowed: "none, lz4, zstd",
                }),
            },
            PARAM_INODE_LIMIT => match value.parse::<u64>() {
                Ok(n) if n > 0 => settings.inode_limit = Some(n),
                _ => problems.push(Problem::ParameterNotAllowed {
                    name: PARAM_INODE_LIMIT,
                    value: value.clone(),
                    allowed: "a positive integer (e.g. 100000)",
                }),
            },
            PARAM_ENCRYPTION => match value.parse::<Encryption>() {
                Ok(e) => settings.encryption = e,
                Err(_) => problems.push(Problem::ParameterNotAllowed {
                    name: PARAM_ENCRYPTION,
                    value: value.clone(),
                    allowed: "none, aes-256-gcm",
                }),
            },
            PARAM_SECRET_NAME | PARAM_SECRET_NAMESPACE => {}
            _ => problems.push(Problem::UnknownParameter { name: name.clone() }),
        }
    }
    encryption_settings(parameters, &mut settings, problems);
    match class.reclaim_policy.as_deref() {
        None | Some("Delete") => settings.reclaim_policy = ReclaimPolicy::Delete,
        Some("Retain") => settings.reclaim_policy = ReclaimPolicy::Retain,
        Some(other) => problems.push(Problem::ReclaimPolicy(other.to_string())),
    }
    match class.volume_binding_mode.as_deref() {
        None | Some("Immediate") => settings.binding_mode = BindingMode::Immediate,
        Some("WaitForFirstConsumer") => settings.binding_mode = BindingMode::WaitForFirstConsumer,
        Some(other) => problems.push(Problem::BindingMode(other.to_string())),
    }
    settings
}

/// The encryption Secret of a class (`encryptionSecretName`/`Namespace`), checked against
/// its `encryption` and `compression`.
fn encryption_settings(
    parameters: &BTreeMap<String, String>,
    settings: &mut ClassSettings,
    problems: &mut Vec<Problem>,
) {
    let name = parameters.get(PARAM_SECRET_NAME);
    let namespace = parameters.get(PARAM_SECRET_NAMESPACE);
    if let Some(n) = name.filter(|n| !is_dns_subdomain(n)) {
        problems.push(Problem::ParameterNotAllowed {
            name: PARAM_SECRET_NAME,
            value: n.clone(),
            allowed: "the name of a Secret (a DNS subdomain)",
        });
    }
    if let Some(n) = namespace.filter(|n| !super::is_dns_label(n)) {
        problems.push(Problem::ParameterNotAllowed {
            name: PARAM_SECRET_NAMESPACE,
            value: n.clone(),
            allowed: "the name of a namespace (a DNS label)",
        });
    }
    match (settings.encryption, name, namespace) {
        (Encryption::None, None, None) => {}
        (Encryption::None, _, _) => problems.push(Problem::Encryption(
            "encryptionSecretName/encryptionSecretNamespace given without encryption: aes-256-gcm",
        )),
        (_, Some(name), Some(namespace)) => {
            settings.encryption_secret = Some(SecretRef {
                namespace: namespace.clone(),
                name: name.clone(),
            });
        }
        _ => problems.push(Problem::Encryption(
            "encryption: aes-256-gcm needs encryptionSecretName and encryptionSecretNamespace (the Secret whose data key `key` holds the master key)",
        )),
    }
    if !settings.encryption.is_none() && !settings.compression.is_none() {
        problems.push(Problem::Encryption(
            "compression and encryption together are not supported yet (encrypted chunks do not compress): choose one",
        ));
    }
}

/// A DNS subdomain (RFC 1123) as Kubernetes object names use: at most 253 characters,
/// dot-separated DNS labels.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(super::is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, TypedLocalObjectReference, VolumeResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn class(params: &[(&str, &str)]) -> StorageClass {
        StorageClass {
            provisioner: crate::k8s::PROVISIONER.to_string(),
            parameters: Some(
                params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn claim(storage: Option<&str>, modes: &[&str]) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(modes.iter().map(|m| m.to_string()).collect()),
                resources: Some(VolumeResourceRequirements {
                    requests: storage.map(|s| {
                        [("storage".to_string(), Quantity(s.to_string()))]
                            .into_iter()
                            .collect()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn rwo(storage: &str) -> PersistentVolumeClaim {
        claim(Some(storage), &["ReadWriteOnce"])
    }

    fn problems(claim: &PersistentVolumeClaim, class: &StorageClass) -> Vec<String> {
        match VolumeRequest::new(claim, class) {
            Ok(request) => panic!("expected problems, got {request:?}"),
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn an_encrypted_class_names_its_secret_and_the_spec_carries_it() {
        let params = [
            ("encryption", "aes-256-gcm"),
            ("encryptionSecretName", "db-key"),
            ("encryptionSecretNamespace", "fusevol"),
        ];
        let req = VolumeRequest::new(&rwo("1Gi"), &class(&params)).unwrap();
        assert_eq!(req.spec.encryption, Encryption::Aes256Gcm);
        let secret = req.spec.encryption_secret.clone().unwrap();
        assert_eq!(secret.to_string(), "fusevol/db-key");
        let json = req.spec.to_annotation();
        assert!(
            json.contains(r#""encryption":"aes-256-gcm","encryptionSecret":{"namespace":"fusevol","name":"db-key"}"#),
            "{json}"
        );
        assert_eq!(VolumeSpec::from_annotation(&json).unwrap(), req.spec);
        // Unencrypted specs do not mention it (older agents read them unchanged).
        let plain = VolumeRequest::new(&rwo("1Gi"), &class(&[])).unwrap();
        assert!(!plain.spec.to_annotation().contains("ncryption"));
    }

    #[test]
    fn encryption_without_its_secret_or_with_compression_is_refused_with_what_to_fix() {
        let p = problems(&rwo("1Gi"), &class(&[("encryption", "aes-256-gcm")]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("needs encryptionSecretName and encryptionSecretNamespace"),
            "{p:?}"
        );
        let p = problems(
            &rwo("1Gi"),
            &class(&[
                ("encryptionSecretName", "k"),
                ("encryptionSecretNamespace", "n"),
            ]),
        );
        assert!(p[0].contains("without encryption: aes-256-gcm"), "{p:?}");
        let p = problems(
            &rwo("1Gi"),
            &class(&[
                ("encryption", "aes-256-gcm"),
                ("encryptionSecretName", "Bad_Name"),
                ("encryptionSecretNamespace", "n"),
                ("compression", "lz4"),
            ]),
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("\"encryptionSecretName\": \"Bad_Name\" is not allowed"),
            "{p:?}"
        );
        assert!(p[1].contains("not supported yet"), "{p:?}");
        let p = problems(&rwo("1Gi"), &class(&[("encryption", "rot13")]));
        assert!(p[0].contains("allowed values: none, aes-256-gcm"), "{p:?}");
    }

    #[test]
    fn defaults_give_tier_default_one_replica_no_compression_no_inode_limit() {
        let request = VolumeRequest::new(&rwo("10Gi"), &class(&[])).unwrap();
        assert_eq!(
            request.spec,
            VolumeSpec {
                quota_bytes: 10 << 30,
                tier: "default".into(),
                replicas: 1,
                compression: Compression::None,
                inode_limit: None,
                encryption: Encryption::None,
                encryption_secret: None,
            }
        );
        assert_eq!(request.reclaim_policy, ReclaimPolicy::Delete);
        assert_eq!(request.binding_mode, BindingMode::Immediate);
        assert_eq!(request.access_modes, ["ReadWriteOnce"]);
    }

    #[test]
    fn supported_parameters_are_read() {
        let class = class(&[
            ("tier", "fast"),
            ("replicas", "1"),
            ("compression", "none"),
            ("inodeLimit", "100000"),
        ]);
        let request = VolumeRequest::new(&rwo("512Mi"), &class).unwrap();
        assert_eq!(request.spec.tier, "fast");
        assert_eq!(request.spec.inode_limit, Some(100_000));
        assert_eq!(request.spec.quota_bytes, 512 << 20);
    }

    #[test]
    fn unknown_parameter_is_named_with_the_allowed_parameters() {
        assert_eq!(
            problems(&rwo("1Gi"), &class(&[("fsType", "ext4")])),
            [
                r#"StorageClass parameter "fsType" is not known; allowed parameters: tier, replicas, compression, inodeLimit, encryption, encryptionSecretName, encryptionSecretNamespace"#
            ]
        );
    }

    #[test]
    fn bad_compression_names_the_parameter_and_the_allowed_values() {
        assert_eq!(
            problems(&rwo("1Gi"), &class(&[("compression", "gzip")])),
            [
                r#"StorageClass parameter "compression": "gzip" is not allowed; allowed values: none, lz4, zstd"#
            ]
        );
    }

    #[test]
    fn compression_lz4_and_zstd_reach_the_volume_spec() {
        for (value, algorithm) in [("lz4", Compression::Lz4), ("zstd", Compression::Zstd)] {
            let req = VolumeRequest::new(&rwo("1Gi"), &class(&[("compression", value)])).unwrap();
            assert_eq!(req.spec.compression, algorithm);
            let json = req.spec.to_annotation();
            assert!(
                json.contains(&format!(r#""compression":"{value}""#)),
                "{json}"
            );
            assert_eq!(VolumeSpec::from_annotation(&json).unwrap(), req.spec);
        }
    }

    #[test]
    fn replicas_2_is_not_supported_yet_and_0_or_text_is_not_allowed() {
        assert_eq!(
            problems(&rwo("1Gi"), &class(&[("replicas", "2")])),
            [r#"StorageClass parameter "replicas": "2" is not supported yet; allowed values: 1"#]
        );
        for bad in ["0", "two", "-1", ""] {
            assert_eq!(
                problems(&rwo("1Gi"), &class(&[("replicas", bad)])),
                [format!(
                    r#"StorageClass parameter "replicas": {bad:?} is not allowed; allowed values: 1 (2 and more: not supported yet)"#
                )]
            );
        }
    }

    #[test]
    fn tier_must_be_a_dns_label_and_inode_limit_a_positive_integer() {
        let found = problems(
            &rwo("1Gi"),
            &class(&[("tier", "Fast_Disks"), ("inodeLimit", "0")]),
        );
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains(r#"parameter "inodeLimit": "0" is not allowed"#));
        assert!(found[1].contains(r#"parameter "tier": "Fast_Disks" is not allowed"#));
        assert!(found[1].contains("lowercase letters, digits and '-'"));
    }

    #[test]
    fn reclaim_policy_retain_and_delete_work_and_recycle_is_rejected() {
        let mut retain = class(&[]);
        retain.reclaim_policy = Some("Retain".into());
        let request = VolumeRequest::new(&rwo("1Gi"), &retain).unwrap();
        assert_eq!(request.reclaim_policy, ReclaimPolicy::Retain);

        let mut delete = class(&[]);
        delete.reclaim_policy = Some("Delete".into());
        let request = VolumeRequest::new(&rwo("1Gi"), &delete).unwrap();
        assert_eq!(request.reclaim_policy, ReclaimPolicy::Delete);

        let mut recycle = class(&[]);
        recycle.reclaim_policy = Some("Recycle".into());
        assert_eq!(
            problems(&rwo("1Gi"), &recycle),
            [
                r#"StorageClass reclaimPolicy "Recycle" is not supported; allowed values: Delete, Retain"#
            ]
        );
    }

    #[test]
    fn read_write_many_and_read_only_many_are_rejected_naming_the_mode() {
        let found = problems(
            &claim(
                Some("1Gi"),
                &["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"],
            ),
            &class(&[]),
        );
        assert_eq!(found.len(), 2);
        assert!(found[0].starts_with(r#"access mode "ReadWriteMany" is not supported"#));
        assert!(found[1].starts_with(r#"access mode "ReadOnlyMany" is not supported"#));
        let ok = VolumeRequest::new(&claim(Some("1Gi"), &["ReadWriteOncePod"]), &class(&[]));
        assert!(ok.is_ok());
    }

    #[test]
    fn block_volume_mode_is_rejected() {
        let mut block = rwo("1Gi");
        if let Some(spec) = block.spec.as_mut() {
            spec.volume_mode = Some("Block".into());
        }
        assert_eq!(
            problems(&block, &class(&[])),
            [r#"volumeMode "Block" is not supported; allowed values: Filesystem"#]
        );
    }

    #[test]
    fn missing_zero_and_malformed_storage_requests_are_rejected() {
        assert!(problems(&claim(None, &["ReadWriteOnce"]), &class(&[]))[0]
            .contains("requests no storage"));
        assert!(problems(&rwo("0"), &class(&[]))[0].contains("0 bytes"));
        assert!(problems(&rwo("10Gb"), &class(&[]))[0]
            .starts_with(r#"spec.resources.requests.storage: invalid size "10Gb""#));
    }

    #[test]
    fn data_sources_and_selectors_are_rejected() {
        let mut cloned = rwo("1Gi");
        if let Some(spec) = cloned.spec.as_mut() {
            spec.data_source = Some(TypedLocalObjectReference {
                kind: "PersistentVolumeClaim".into(),
                name: "other".into(),
                ..Default::default()
            });
            spec.selector = Some(LabelSelector::default());
        }
        let found = problems(&cloned, &class(&[]));
        assert_eq!(found.len(), 2);
        assert!(found[0].contains("(PersistentVolumeClaim) is not supported"));
        assert!(found[1].starts_with("spec.selector is not supported"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut bad_class = class(&[
            ("compression", "gzip"),
            ("replicas", "3"),
            ("colour", "red"),
        ]);
        bad_class.reclaim_policy = Some("Recycle".into());
        let mut bad_claim = claim(Some("0"), &["ReadWriteMany"]);
        if let Some(spec) = bad_claim.spec.as_mut() {
            spec.volume_mode = Some("Block".into());
        }
        let err = VolumeRequest::new(&bad_claim, &bad_class).unwrap_err();
        assert_eq!(err.problems.len(), 7, "{err}");
        let message = err.to_string();
        for needle in [
            "\"colour\" is not known",
            "\"compression\": \"gzip\" is not allowed",
            "\"replicas\": \"3\" is not supported yet",
            "reclaimPolicy \"Recycle\"",
            "access mode \"ReadWriteMany\"",
            "volumeMode \"Block\"",
            "0 bytes",
        ] {
            assert!(message.contains(needle), "{needle} missing from {message}");
        }
        assert!(message.starts_with("7 problems: (1) "), "{message}");
        assert!(message.contains("; (7) "), "{message}");
    }

    #[test]
    fn binding_mode_is_read_from_the_class() {
        let mut wffc = class(&[]);
        wffc.volume_binding_mode = Some("WaitForFirstConsumer".into());
        let settings = ClassSettings::from_storage_class(&wffc).unwrap();
        assert_eq!(settings.binding_mode, BindingMode::WaitForFirstConsumer);
        wffc.volume_binding_mode = Some("Later".into());
        let err = ClassSettings::from_storage_class(&wffc).unwrap_err();
        assert!(err.to_string().contains("volumeBindingMode \"Later\""));
    }

    #[test]
    fn volume_spec_round_trips_through_its_annotation_json() {
        let spec = VolumeSpec {
            quota_bytes: 1 << 30,
            tier: "fast".into(),
            replicas: 1,
            compression: Compression::None,
            inode_limit: Some(1000),
            encryption: Encryption::None,
            encryption_secret: None,
        };
        let json = spec.to_annotation();
        assert_eq!(
            json,
            r#"{"quotaBytes":1073741824,"tier":"fast","replicas":1,"compression":"none","inodeLimit":1000}"#
        );
        assert_eq!(VolumeSpec::from_annotation(&json).unwrap(), spec);
    }
}
