//! The manifests under deploy/: every YAML document parses into its typed Kubernetes object
//! (without fields the type does not know), and the properties fusevol relies on hold.
//!
//! The CRD file is generated from the Rust type; after changing `fusevol::k8s::crd`,
//! regenerate it with
//!
//! ```text
//! FUSEVOL_BLESS=1 cargo test --release --test deploy_manifests
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use fusevol::k8s::crd::FusevolNode;
use fusevol::k8s::params::{BindingMode, ClassSettings};
use fusevol::k8s::{is_dns_label, PROVISIONER};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const NAMESPACE: &str = "fusevol-system";
const CRD_FILE: &str = "crd-fusevolnode.yaml";
const AGENT_SA: &str = "fusevol-agent";
const CONTROLLER_SA: &str = "fusevol-controller";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// A parsed object and the file (relative to deploy/) it came from.
struct Item<T> {
    file: String,
    object: T,
}

/// Every object under deploy/, by kind.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Item<Namespace>>,
    service_accounts: Vec<Item<ServiceAccount>>,
    services: Vec<Item<Service>>,
    config_maps: Vec<Item<ConfigMap>>,
    cluster_roles: Vec<Item<ClusterRole>>,
    cluster_role_bindings: Vec<Item<ClusterRoleBinding>>,
    roles: Vec<Item<Role>>,
    role_bindings: Vec<Item<RoleBinding>>,
    daemon_sets: Vec<Item<DaemonSet>>,
    deployments: Vec<Item<Deployment>>,
    stateful_sets: Vec<Item<StatefulSet>>,
    storage_classes: Vec<Item<StorageClass>>,
    csi_drivers: Vec<Item<CSIDriver>>,
    crds: Vec<Item<CustomResourceDefinition>>,
    fusevol_nodes: Vec<Item<FusevolNode>>,
    /// (file, kind, name, namespace) of every object, for scope checks.
    all: Vec<(String, String, String, Option<String>)>,
}

/// Deserializes `value` into `T` and checks that serializing it back keeps every field of
/// `value`: a field the type does not know (a typo, a wrong nesting) is lost on the way.
/// (Serializing may add fields, such as `apiVersion`/`kind` of embedded claim templates.)
fn typed<T: DeserializeOwned + Serialize>(file: &str, kind: &str, value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{file}: {kind} does not parse: {e}"));
    let back = serde_json::to_value(&object).unwrap();
    let mut lost = Vec::new();
    lost_fields(value, &back, String::new(), &mut lost);
    assert!(
        lost.is_empty(),
        "{file}: {kind} has fields its type does not know or reads differently: {lost:?}"
    );
    object
}

/// Paths of `written` that `read` lacks or holds with another value.
fn lost_fields(written: &Value, read: &Value, path: String, lost: &mut Vec<String>) {
    match (written, read) {
        (Value::Object(w), Value::Object(r)) => {
            for (key, value) in w {
                let child = format!("{path}.{key}");
                match r.get(key) {
                    Some(read_value) => lost_fields(value, read_value, child, lost),
                    None => lost.push(child),
                }
            }
        }
        (Value::Array(w), Value::Array(r)) if w.len() == r.len() => {
            for (i, (value, read_value)) in w.iter().zip(r).enumerate() {
                lost_fields(value, read_value, format!("{path}[{i}]"), lost);
            }
        }
        _ if written == read => {}
        _ => lost.push(path),
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    out.sort();
}

fn relative(path: &Path) -> String {
    path.strip_prefix(deploy_dir())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The YAML documents of a file, as JSON values (empty documents skipped).
fn documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let yaml = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", relative(path)));
            serde_json::to_value(yaml).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn load() -> Manifests {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let mut m = Manifests::default();
    for path in files {
        let file = relative(&path);
        if file == "kustomization.yaml" {
            continue;
        }
        for doc in documents(&path) {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let meta = &doc["metadata"];
            m.all.push((
                file.clone(),
                kind.clone(),
                meta["name"].as_str().unwrap_or_default().to_string(),
                meta["namespace"].as_str().map(String::from),
            ));
            macro_rules! push {
                ($field:ident) => {
                    m.$field.push(Item {
                        file: file.clone(),
                        object: typed(&file, &kind, &doc),
                    })
                };
            }
            match (api_version.as_str(), kind.as_str()) {
                ("v1", "Namespace") => push!(namespaces),
                ("v1", "ServiceAccount") => push!(service_accounts),
                ("v1", "Service") => push!(services),
                ("v1", "ConfigMap") => push!(config_maps),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => push!(cluster_roles),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => push!(cluster_role_bindings),
                ("rbac.authorization.k8s.io/v1", "Role") => push!(roles),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => push!(role_bindings),
                ("apps/v1", "DaemonSet") => push!(daemon_sets),
                ("apps/v1", "Deployment") => push!(deployments),
                ("apps/v1", "StatefulSet") => push!(stateful_sets),
                ("storage.k8s.io/v1", "StorageClass") => push!(storage_classes),
                ("storage.k8s.io/v1", "CSIDriver") => push!(csi_drivers),
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => push!(crds),
                ("local.fusevol.io/v1alpha1", "FusevolNode") => push!(fusevol_nodes),
                _ => panic!("{file}: unknown kind {kind:?} of apiVersion {api_version:?}: add it to this test"),
            }
        }
    }
    m
}

fn find<'a, T>(items: &'a [Item<T>], name: &str, meta: impl Fn(&T) -> Option<&str>) -> &'a T {
    items
        .iter()
        .map(|i| &i.object)
        .find(|o| meta(o) == Some(name))
        .unwrap_or_else(|| panic!("no object named {name:?}"))
}

fn pod_spec_of_daemon_set(m: &Manifests, name: &str) -> PodSpec {
    let ds = find(&m.daemon_sets, name, |d| d.metadata.name.as_deref());
    ds.spec.clone().and_then(|s| s.template.spec).unwrap()
}

fn pod_spec_of_deployment(m: &Manifests, name: &str) -> PodSpec {
    let d = find(&m.deployments, name, |d| d.metadata.name.as_deref());
    d.spec.clone().and_then(|s| s.template.spec).unwrap()
}

fn only_container(spec: &PodSpec) -> &Container {
    assert_eq!(spec.containers.len(), 1);
    &spec.containers[0]
}

#[test]
fn every_document_parses_into_a_known_kind_without_unknown_fields() {
    let m = load();
    assert!(m.all.len() >= 15, "found only {} documents", m.all.len());
    // Names are unique per kind and namespace.
    let mut seen = BTreeSet::new();
    for (file, kind, name, namespace) in &m.all {
        assert!(!name.is_empty(), "{file}: a {kind} without a name");
        assert!(
            seen.insert((kind, name, namespace)),
            "{file}: {kind} {name} defined twice"
        );
    }
}

#[test]
fn crd_file_equals_what_the_rust_type_generates() {
    let path = deploy_dir().join(CRD_FILE);
    let crd = fusevol::k8s::crd::crd();
    if std::env::var_os("FUSEVOL_BLESS").is_some_and(|v| v == "1") {
        let yaml = serde_yaml::to_string(&crd).unwrap();
        let header =
            "# GENERATED from fusevol::k8s::crd::FusevolNode: do not edit. Regenerate with\n\
                      #   FUSEVOL_BLESS=1 cargo test --release --test deploy_manifests\n";
        fs::write(&path, format!("{header}{yaml}")).unwrap();
    }
    let written = documents(&path);
    assert_eq!(written.len(), 1, "{CRD_FILE} holds one document");
    assert!(
        written[0] == serde_json::to_value(&crd).unwrap(),
        "{CRD_FILE} differs from FusevolNode::crd(): regenerate it with \
         FUSEVOL_BLESS=1 cargo test --release --test deploy_manifests"
    );
}

#[test]
fn storage_classes_use_the_provisioner_and_wait_for_first_consumer() {
    let m = load();
    for (name, tier) in [("fusevol-fast", "fast"), ("fusevol-standard", "standard")] {
        let class = find(&m.storage_classes, name, |c| c.metadata.name.as_deref());
        assert_eq!(class.provisioner, PROVISIONER, "{name}");
        assert_eq!(
            class.volume_binding_mode.as_deref(),
            Some("WaitForFirstConsumer"),
            "{name}"
        );
        assert_eq!(
            class.allow_volume_expansion,
            Some(true),
            "{name}: claims grow online"
        );
        // The controller accepts the class as it is.
        let settings = ClassSettings::from_storage_class(class)
            .unwrap_or_else(|e| panic!("{name} is not a valid fusevol class: {e}"));
        assert_eq!(settings.tier, tier);
        assert_eq!(settings.binding_mode, BindingMode::WaitForFirstConsumer);
    }
    let fixed = find(&m.storage_classes, "fusevol-static", |c| {
        c.metadata.name.as_deref()
    });
    assert_eq!(fixed.provisioner, "kubernetes.io/no-provisioner");
    assert_eq!(
        fixed.allow_volume_expansion,
        Some(false),
        "static PVs have a fixed size"
    );
    assert_eq!(
        fixed.volume_binding_mode.as_deref(),
        Some("WaitForFirstConsumer")
    );
}

#[test]
fn csi_driver_publishes_storage_capacity_without_attach_or_pod_info() {
    let m = load();
    let driver = find(&m.csi_drivers, PROVISIONER, |d| d.metadata.name.as_deref());
    assert_eq!(driver.spec.storage_capacity, Some(true));
    assert_eq!(driver.spec.attach_required, Some(false));
    assert_eq!(driver.spec.pod_info_on_mount, Some(false));
}

#[test]
fn agent_daemon_set_is_privileged_with_dev_fuse_bidirectional_root_and_node_name() {
    let m = load();
    let spec = pod_spec_of_daemon_set(&m, "fusevol-agent");
    assert_eq!(spec.service_account_name.as_deref(), Some(AGENT_SA));
    let container = only_container(&spec);
    assert_eq!(container.image.as_deref(), Some("fusevol:dev"));
    assert_eq!(
        container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged),
        Some(true),
        "FUSE mounts with Bidirectional propagation need a privileged container"
    );
    let volumes = spec.volumes.clone().unwrap_or_default();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.clone())
            .unwrap_or_else(|| panic!("no hostPath volume {name}"))
    };
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|m| m.mount_path == path)
            .cloned()
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
    };

    let fuse = mount_of("/dev/fuse");
    let fuse_source = host_path(&fuse.name);
    assert_eq!(fuse_source.path, "/dev/fuse");
    assert_eq!(fuse_source.type_.as_deref(), Some("CharDevice"));

    let root = mount_of("/var/lib/fusevol");
    assert_eq!(root.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(
        host_path(&root.name).path,
        root.mount_path,
        "the root must be mounted at its host path: PV paths are host paths the agent mounts at"
    );

    let env = container.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));

    let liveness = container
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    assert_eq!(liveness.and_then(|h| h.path.as_deref()), Some("/healthz"));
    let readiness = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    assert_eq!(readiness.and_then(|h| h.path.as_deref()), Some("/readyz"));
    let ports = container.ports.clone().unwrap_or_default();
    assert!(ports
        .iter()
        .any(|p| p.name.as_deref() == Some("http-metrics")));

    let config_volume = volumes
        .iter()
        .find_map(|v| v.config_map.as_ref())
        .expect("the agent mounts a ConfigMap");
    assert_eq!(config_volume.name, "fusevol-agent-config");
}

#[test]
fn fd_holder_runs_beside_the_agent_on_a_shared_socket_and_outlives_agent_rollouts() {
    let m = load();
    let agent = pod_spec_of_daemon_set(&m, "fusevol-agent");
    let holder = pod_spec_of_daemon_set(&m, "fusevol-fdstore");
    let args = |spec: &PodSpec| only_container(spec).args.clone().unwrap_or_default();
    let holder_args = args(&holder);
    assert_eq!(holder_args.first().map(String::as_str), Some("fdstore"));
    let socket_of = |args: &[String], flag: &str| {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
        PathBuf::from(&args[i + 1])
    };
    let socket = socket_of(&holder_args, "--socket");
    assert_eq!(
        socket_of(&args(&agent), "--fdstore"),
        socket,
        "the agent must use the holder's socket"
    );
    // Both see the socket's directory from the same host directory.
    let host_dir_of = |spec: &PodSpec| {
        let dir = socket.parent().unwrap().to_string_lossy().into_owned();
        let mount = only_container(spec)
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .find(|v| v.mount_path == dir)
            .unwrap_or_else(|| panic!("{dir} not mounted"));
        spec.volumes
            .clone()
            .unwrap_or_default()
            .into_iter()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.host_path)
            .map(|h| h.path)
            .expect("a hostPath")
    };
    assert_eq!(host_dir_of(&agent), host_dir_of(&holder));
    let sc = only_container(&holder)
        .security_context
        .clone()
        .unwrap_or_default();
    assert_ne!(sc.privileged, Some(true), "holding fds needs no privilege");
    assert_eq!(holder.automount_service_account_token, Some(false));
    let strategy = |name: &str| {
        find(&m.daemon_sets, name, |d| d.metadata.name.as_deref())
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .and_then(|u| u.type_.clone())
    };
    // An agent rollout replaces agent pods only; the holder is rolled by hand.
    assert_eq!(strategy("fusevol-fdstore").as_deref(), Some("OnDelete"));
    assert_eq!(strategy("fusevol-agent").as_deref(), Some("RollingUpdate"));
}

/// The example agent configuration, as far as the manifests depend on it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentConfig {
    root: String,
    listen: String,
    tiers: Vec<TierConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TierConfig {
    name: String,
    disks: Vec<String>,
    capacity: Option<String>,
}

#[test]
fn agent_config_map_holds_a_toml_whose_paths_and_port_match_the_daemon_set() {
    let m = load();
    let config_map = find(&m.config_maps, "fusevol-agent-config", |c| {
        c.metadata.name.as_deref()
    });
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get("agent.toml"))
        .expect("agent.toml in the ConfigMap");
    let config: AgentConfig = toml::from_str(text).unwrap_or_else(|e| panic!("agent.toml: {e}"));

    let spec = pod_spec_of_daemon_set(&m, "fusevol-agent");
    let container = only_container(&spec);
    let bidirectional: Vec<String> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_propagation.as_deref() == Some("Bidirectional"))
        .map(|m| m.mount_path.clone())
        .collect();
    assert_eq!(bidirectional, std::slice::from_ref(&config.root));
    assert!(!config.tiers.is_empty());
    for tier in &config.tiers {
        assert!(
            is_dns_label(&tier.name),
            "tier {:?} is not a DNS label",
            tier.name
        );
        assert!(!tier.disks.is_empty(), "tier {} has no disks", tier.name);
        for disk in &tier.disks {
            assert!(
                disk.starts_with(&format!("{}/", config.root)),
                "{disk} is not under the root"
            );
        }
        if let Some(capacity) = &tier.capacity {
            fusevol::size::parse_quantity(capacity).unwrap();
        }
    }
    for class in ["fast", "standard"] {
        assert!(
            config.tiers.iter().any(|t| t.name == class),
            "no tier {class} for fusevol-{class}"
        );
    }
    let port = config
        .listen
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<i32>()
        .unwrap();
    let ports = container.ports.clone().unwrap_or_default();
    assert!(
        ports.iter().any(|p| p.container_port == port),
        "listen port {port} is not exposed"
    );
    let args = container.args.clone().unwrap_or_default();
    let config_mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.read_only == Some(true))
        .map(|m| m.mount_path.clone())
        .unwrap();
    assert!(
        args.contains(&format!("{config_mount}/agent.toml")),
        "{args:?}"
    );
}

#[test]
fn controller_deployment_runs_two_replicas_with_leader_election_and_health() {
    let m = load();
    let deployment = find(&m.deployments, "fusevol-controller", |d| {
        d.metadata.name.as_deref()
    });
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let spec = pod_spec_of_deployment(&m, "fusevol-controller");
    assert_eq!(spec.service_account_name.as_deref(), Some(CONTROLLER_SA));
    let container = only_container(&spec);
    assert_eq!(container.image.as_deref(), Some("fusevol:dev"));
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.iter()
            .any(|a| a.starts_with("--leader-election-lease=")),
        "{args:?}"
    );
    let env = container.env.clone().unwrap_or_default();
    for (name, field) in [
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_NAME", "metadata.name"),
    ] {
        let var = env
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let path = var.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        assert_eq!(path.map(|f| f.field_path.as_str()), Some(field));
    }
    let liveness = container
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    assert_eq!(liveness.and_then(|h| h.path.as_deref()), Some("/healthz"));
    let readiness = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    assert_eq!(readiness.and_then(|h| h.path.as_deref()), Some("/readyz"));
    let ports = container.ports.clone().unwrap_or_default();
    assert!(ports
        .iter()
        .any(|p| p.name.as_deref() == Some("http-metrics")));
    let security = container.security_context.clone().unwrap_or_default();
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
}

/// Every rule granted to a ServiceAccount, through any binding in deploy/.
/// What the kustomize base grants `service_account` (not `static/`, applied only for
/// agents in static mode, nor `encryption/`, applied only for encrypted classes).
fn rules_of(m: &Manifests, service_account: &str) -> Vec<PolicyRule> {
    rules_in(m, service_account, |file| {
        !file.starts_with("static/") && !file.starts_with("encryption/")
    })
}

fn rules_in(
    m: &Manifests,
    service_account: &str,
    include: impl Fn(&str) -> bool,
) -> Vec<PolicyRule> {
    let is_subject = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == service_account
                && s.namespace.as_deref() == Some(NAMESPACE)
        })
    };
    let mut rules = Vec::new();
    for binding in m
        .cluster_role_bindings
        .iter()
        .filter(|i| include(&i.file))
        .map(|i| &i.object)
    {
        if is_subject(&binding.subjects) {
            assert_eq!(binding.role_ref.kind, "ClusterRole");
            let role = find(&m.cluster_roles, &binding.role_ref.name, |r| {
                r.metadata.name.as_deref()
            });
            rules.extend(role.rules.clone().unwrap_or_default());
        }
    }
    for binding in m
        .role_bindings
        .iter()
        .filter(|i| include(&i.file))
        .map(|i| &i.object)
    {
        if is_subject(&binding.subjects) {
            let role_rules = match binding.role_ref.kind.as_str() {
                "Role" => find(&m.roles, &binding.role_ref.name, |r| {
                    r.metadata.name.as_deref()
                })
                .rules
                .clone(),
                _ => find(&m.cluster_roles, &binding.role_ref.name, |r| {
                    r.metadata.name.as_deref()
                })
                .rules
                .clone(),
            };
            rules.extend(role_rules.unwrap_or_default());
        }
    }
    assert!(!rules.is_empty(), "{service_account} is granted nothing");
    rules
}

fn grants(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

fn all_rules(m: &Manifests) -> Vec<(String, PolicyRule)> {
    let cluster = m
        .cluster_roles
        .iter()
        .map(|i| (i.file.clone(), i.object.rules.clone()));
    let namespaced = m
        .roles
        .iter()
        .map(|i| (i.file.clone(), i.object.rules.clone()));
    cluster
        .chain(namespaced)
        .flat_map(|(file, rules)| {
            rules
                .unwrap_or_default()
                .into_iter()
                .map(move |r| (file.clone(), r))
        })
        .collect()
}

#[test]
fn rbac_rules_use_no_wildcards() {
    let m = load();
    let rules = all_rules(&m);
    assert!(!rules.is_empty());
    for (file, rule) in rules {
        let words = rule
            .verbs
            .iter()
            .chain(rule.resources.iter().flatten())
            .chain(rule.api_groups.iter().flatten())
            .chain(rule.resource_names.iter().flatten())
            .chain(rule.non_resource_urls.iter().flatten());
        for word in words {
            assert!(!word.contains('*'), "{file}: wildcard {word:?} in {rule:?}");
        }
        assert!(
            rule.non_resource_urls.is_none(),
            "{file}: non-resource URLs granted"
        );
    }
}

#[test]
fn agent_is_granted_nothing_on_secrets() {
    let m = load();
    for rule in rules_of(&m, AGENT_SA) {
        assert!(
            !rule
                .resources
                .iter()
                .flatten()
                .any(|r| r.starts_with("secrets")),
            "{rule:?}"
        );
    }
}

/// Encrypted classes: the optional grant lets the agent `get` named Secrets in one
/// namespace, nothing more (no list or watch, no cluster-wide read).
#[test]
fn the_encryption_grant_is_get_on_named_secrets_of_one_namespace() {
    let m = load();
    let rules = rules_in(&m, AGENT_SA, |file| file.starts_with("encryption/"));
    assert!(grants(&rules, "", "secrets", "get"), "{rules:?}");
    for rule in &rules {
        assert_eq!(rule.verbs, ["get"], "{rule:?}");
        assert!(
            rule.resource_names.as_ref().is_some_and(|n| !n.is_empty()),
            "Secrets must be named: {rule:?}"
        );
    }
    let cluster_wide: Vec<&str> = m
        .cluster_role_bindings
        .iter()
        .filter(|b| b.file.starts_with("encryption/"))
        .map(|b| b.file.as_str())
        .collect();
    assert!(
        cluster_wide.is_empty(),
        "cluster-wide bindings: {cluster_wide:?}"
    );
    let kustomization = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    assert!(
        !kustomization.contains("encryption/"),
        "the base must not grant Secrets"
    );
}

#[test]
fn controller_is_granted_nothing_on_secrets() {
    let m = load();
    for rule in rules_of(&m, CONTROLLER_SA) {
        assert!(
            !rule
                .resources
                .iter()
                .flatten()
                .any(|r| r.starts_with("secrets")),
            "{rule:?}"
        );
    }
}

#[test]
fn agent_rules_grant_what_the_agent_needs() {
    let m = load();
    let rules = rules_of(&m, AGENT_SA);
    let needed = [
        (
            "",
            "persistentvolumes",
            &["get", "list", "watch", "patch"][..],
        ),
        (
            "local.fusevol.io",
            "fusevolnodes",
            &["get", "list", "watch", "create", "patch"],
        ),
        ("local.fusevol.io", "fusevolnodes/status", &["get", "patch"]),
        ("", "events", &["create", "patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
        ("", "nodes", &["get"]),
    ];
    for (group, resource, verbs) in needed {
        for verb in verbs {
            assert!(
                grants(&rules, group, resource, verb),
                "agent lacks {verb} {group}/{resource}"
            );
        }
    }
    assert!(
        !grants(&rules, "", "persistentvolumes", "delete"),
        "the controller deletes PVs, not the agent"
    );
    // Least privilege: the agent only patches; only static mode creates PVs.
    for (group, resource) in [
        ("", "persistentvolumes"),
        ("local.fusevol.io", "fusevolnodes"),
        ("local.fusevol.io", "fusevolnodes/status"),
    ] {
        assert!(
            !grants(&rules, group, resource, "update"),
            "the agent never updates {group}/{resource}"
        );
    }
    assert!(
        !grants(&rules, "", "persistentvolumes", "create"),
        "an agent of the default (dynamic) mode must not create PVs"
    );
    let static_rules = rules_in(&m, AGENT_SA, |_| true);
    assert!(
        grants(&static_rules, "", "persistentvolumes", "create"),
        "static/rbac-agent-static.yaml grants the static mode's PV create"
    );
}

#[test]
fn controller_rules_grant_what_the_controller_needs() {
    let m = load();
    let rules = rules_of(&m, CONTROLLER_SA);
    let needed = [
        (
            "",
            "persistentvolumeclaims",
            &["get", "list", "watch", "patch", "delete"][..],
        ),
        ("", "persistentvolumeclaims/status", &["patch"]),
        (
            "",
            "persistentvolumes",
            &["get", "list", "watch", "create", "delete", "patch"],
        ),
        ("", "nodes", &["get", "list", "watch"]),
        (
            "storage.k8s.io",
            "storageclasses",
            &["get", "list", "watch"],
        ),
        (
            "local.fusevol.io",
            "fusevolnodes",
            &["get", "list", "watch", "delete"],
        ),
        ("", "events", &["create", "patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
        (
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"],
        ),
        (
            "storage.k8s.io",
            "csidrivers",
            &["get", "create", "update", "patch"],
        ),
        (
            "storage.k8s.io",
            "csistoragecapacities",
            &[
                "get", "list", "watch", "create", "update", "patch", "delete",
            ],
        ),
    ];
    for (group, resource, verbs) in needed {
        for verb in verbs {
            assert!(
                grants(&rules, group, resource, verb),
                "controller lacks {verb} {group}/{resource}"
            );
        }
    }
    for verb in ["create", "update", "patch"] {
        assert!(
            !grants(&rules, "local.fusevol.io", "fusevolnodes", verb),
            "only agents write FusevolNodes ({verb}); the controller only deletes a gone node's"
        );
    }
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !grants(&rules, "", "nodes", verb),
            "the controller only reads Nodes ({verb}): deleting one is the operator's call"
        );
    }
    for verb in ["create", "update"] {
        assert!(
            !grants(&rules, "", "persistentvolumeclaims", verb),
            "the controller never writes claims ({verb})"
        );
    }
    // Expansion patches; it never updates claims or PVs wholesale.
    for resource in [
        "persistentvolumeclaims",
        "persistentvolumeclaims/status",
        "persistentvolumes",
    ] {
        assert!(
            !grants(&rules, "", resource, "update"),
            "the controller never updates {resource}"
        );
    }
    // Leases and capacity objects only in the controller's own namespace.
    for resource in ["leases", "csistoragecapacities"] {
        let cluster_wide = m
            .cluster_roles
            .iter()
            .flat_map(|i| i.object.rules.iter().flatten())
            .any(|r| r.resources.iter().flatten().any(|x| x == resource));
        assert!(!cluster_wide, "{resource} granted cluster-wide");
    }
}

#[test]
fn bindings_name_existing_service_accounts_in_the_namespace() {
    let m = load();
    let accounts: BTreeSet<(Option<&str>, Option<&str>)> = m
        .service_accounts
        .iter()
        .map(|i| {
            (
                i.object.metadata.namespace.as_deref(),
                i.object.metadata.name.as_deref(),
            )
        })
        .collect();
    let subjects = m
        .cluster_role_bindings
        .iter()
        .flat_map(|i| i.object.subjects.iter().flatten())
        .chain(
            m.role_bindings
                .iter()
                .flat_map(|i| i.object.subjects.iter().flatten()),
        );
    for subject in subjects {
        assert_eq!(subject.kind, "ServiceAccount");
        assert!(
            accounts.contains(&(subject.namespace.as_deref(), Some(subject.name.as_str()))),
            "no ServiceAccount {:?}/{}",
            subject.namespace,
            subject.name
        );
    }
}

const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "StorageClass",
    "CSIDriver",
    "CustomResourceDefinition",
    "FusevolNode",
];

#[test]
fn base_objects_are_in_fusevol_system_unless_cluster_scoped() {
    let m = load();
    assert!(m
        .namespaces
        .iter()
        .any(|n| n.object.metadata.name.as_deref() == Some(NAMESPACE)));
    for (file, kind, name, namespace) in &m.all {
        if file.starts_with("examples/") {
            continue;
        }
        if CLUSTER_SCOPED.contains(&kind.as_str()) {
            assert_eq!(
                namespace, &None,
                "{file}: cluster-scoped {kind} {name} names a namespace"
            );
        } else {
            assert_eq!(
                namespace.as_deref(),
                Some(NAMESPACE),
                "{file}: {kind} {name}"
            );
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    #[allow(dead_code)]
    api_version: Option<String>,
    #[allow(dead_code)]
    kind: Option<String>,
    resources: Vec<String>,
    #[allow(dead_code)]
    namespace: Option<String>,
    #[serde(default)]
    images: Vec<KustomizeImage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KustomizeImage {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

#[test]
fn kustomization_lists_exactly_the_manifests_of_the_base() {
    // deny_unknown_fields: only resources, namespace and images (old kustomize in kubectl 1.20).
    let text = fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let kustomization: Kustomization = serde_yaml::from_str(&text).unwrap();
    let listed: BTreeSet<String> = kustomization.resources.iter().cloned().collect();
    assert_eq!(
        listed.len(),
        kustomization.resources.len(),
        "a resource is listed twice"
    );
    for resource in &listed {
        assert!(
            deploy_dir().join(resource).is_file(),
            "kustomization lists missing {resource}"
        );
    }
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let manifests: BTreeSet<String> = files
        .iter()
        .map(|p| relative(p))
        .filter(|f| {
            f != "kustomization.yaml"
                && !f.starts_with("examples/")
                && !f.starts_with("static/")
                && !f.starts_with("encryption/")
        })
        .collect();
    assert_eq!(
        listed, manifests,
        "kustomization.yaml resources vs manifest files in deploy/"
    );

    let image = kustomization
        .images
        .iter()
        .find(|i| i.name == "fusevol")
        .expect("images: fusevol");
    let tag = format!(
        "{}:{}",
        image.new_name.as_deref().unwrap_or("fusevol"),
        image.new_tag.as_deref().unwrap_or("latest")
    );
    assert_eq!(tag, "fusevol:dev");
}

#[test]
fn example_stateful_set_claims_volumes_from_fusevol_fast() {
    let m = load();
    let example = m
        .stateful_sets
        .iter()
        .find(|i| i.file.starts_with("examples/"))
        .expect("a StatefulSet in deploy/examples/");
    let templates = example
        .object
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.clone())
        .unwrap_or_default();
    assert!(!templates.is_empty());
    for template in templates {
        let spec = template.spec.unwrap_or_default();
        assert_eq!(spec.storage_class_name.as_deref(), Some("fusevol-fast"));
        assert_eq!(
            spec.access_modes.as_deref(),
            Some(&["ReadWriteOnce".to_string()][..])
        );
    }
}

#[test]
fn dockerfile_builds_in_a_rust_stage_and_runs_on_bookworm_slim_with_fuse3() {
    let text = fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: build and runtime");
    assert!(
        froms[0].contains("rust:") && froms[0].ends_with(" AS build"),
        "{}",
        froms[0]
    );
    assert_eq!(froms[1], "FROM debian:bookworm-slim");
    for package in ["clang", "libclang-dev", "pkg-config", "fuse3"] {
        assert!(
            text.contains(&format!(" {package}")),
            "Dockerfile does not install {package}"
        );
    }
    assert!(text.contains("ENTRYPOINT [\"fusevol\"]"));
}

/// The metrics Services select the agent's and the controller's pods, reach the port each
/// container names `http-metrics` (the one its /metrics listens on), and are headless, so
/// that Prometheus scrapes every pod on its own (each agent reports its own node).
#[test]
fn metrics_services_select_each_pod_and_reach_its_metrics_port() {
    let m = load();
    let ds = find(&m.daemon_sets, "fusevol-agent", |d| {
        d.metadata.name.as_deref()
    });
    let dep = find(&m.deployments, "fusevol-controller", |d| {
        d.metadata.name.as_deref()
    });
    let agent = (
        ds.spec.as_ref().and_then(|s| s.template.metadata.clone()),
        pod_spec_of_daemon_set(&m, "fusevol-agent"),
    );
    let controller = (
        dep.spec.as_ref().and_then(|s| s.template.metadata.clone()),
        pod_spec_of_deployment(&m, "fusevol-controller"),
    );
    for (service, (template, spec)) in [
        ("fusevol-agent-metrics", agent),
        ("fusevol-controller-metrics", controller),
    ] {
        let svc = find(&m.services, service, |s| s.metadata.name.as_deref());
        assert_eq!(svc.metadata.namespace.as_deref(), Some("fusevol-system"));
        let s = svc.spec.as_ref().unwrap();
        assert_eq!(s.cluster_ip.as_deref(), Some("None"), "{service}: headless");
        let labels = template.and_then(|t| t.labels).unwrap_or_default();
        let selector = s.selector.clone().unwrap_or_default();
        assert!(!selector.is_empty(), "{service}: no selector");
        for (k, v) in &selector {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{service}: selector {k}={v} misses the pods"
            );
        }
        let port = &s.ports.as_ref().unwrap()[0];
        let container_port = only_container(&spec)
            .ports
            .as_ref()
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p.name.as_deref() == Some("http-metrics"))
            })
            .unwrap_or_else(|| panic!("{service}: the container names no http-metrics port"))
            .container_port;
        assert_eq!(
            port.target_port,
            Some(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                    "http-metrics".into()
                )
            ),
            "{service}: targetPort"
        );
        assert_eq!(port.port, container_port, "{service}: port");
        let annotations = svc.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.get("prometheus.io/port").map(String::as_str),
            Some(container_port.to_string().as_str()),
            "{service}: prometheus.io/port"
        );
        let args = only_container(&spec)
            .args
            .clone()
            .unwrap_or_default()
            .join(" ");
        if service == "fusevol-controller-metrics" {
            assert!(
                args.contains(&format!(":{container_port}")),
                "{service}: the controller listens elsewhere: {args}"
            );
        }
    }
}

/// The local paths Cargo.toml names (`path = "..."`: the library, the binary, benchmark
/// targets, patched crates).
fn manifest_paths() -> Vec<String> {
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("Cargo.toml");
    let manifest =
        toml::Value::Table(toml::from_str::<toml::Table>(&text).expect("Cargo.toml parses"));
    let mut out = Vec::new();
    fn walk(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    match (k.as_str(), v) {
                        ("path", toml::Value::String(p)) => out.push(p.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&manifest, &mut out);
    out
}

/// `docker build -f deploy/Dockerfile .` works only if the build stage has every file the
/// manifest names (cargo refuses a manifest whose targets or patched crates are missing,
/// even for `--bin fusevol`), and `.dockerignore` keeps none of them out of the context.
#[test]
fn the_image_build_copies_every_path_the_cargo_manifest_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = fs::read_to_string(deploy_dir().join("Dockerfile")).expect("Dockerfile");
    // Sources of the COPY lines of the build stage (before the runtime stage's FROM).
    let build_stage = dockerfile.split("\nFROM ").nth(1).unwrap_or("");
    let mut copied = Vec::new();
    for line in build_stage.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"COPY") && !words.iter().any(|w| w.starts_with("--from")) {
            copied.extend(words[1..words.len() - 1].iter().map(|w| w.to_string()));
        }
    }
    let ignored: Vec<String> = fs::read_to_string(root.join(".dockerignore"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    let paths = manifest_paths();
    assert!(paths.len() >= 4, "manifest paths: {paths:?}");
    for p in ["Cargo.toml", "Cargo.lock", ".cargo"]
        .iter()
        .map(|s| s.to_string())
        .chain(paths)
    {
        let covered = copied
            .iter()
            .any(|c| p == *c || p.starts_with(&format!("{}/", c.trim_end_matches('/'))));
        assert!(
            covered,
            "deploy/Dockerfile does not COPY {p} (COPY sources: {copied:?})"
        );
        assert!(
            root.join(&p).exists(),
            "{p} named by the manifest does not exist"
        );
        let excluded = ignored
            .iter()
            .any(|i| p == *i || p.starts_with(&format!("{i}/")));
        assert!(
            !excluded,
            ".dockerignore excludes {p}, which the build needs"
        );
    }
}
