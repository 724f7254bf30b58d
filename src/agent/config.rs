//! The agent's configuration file (TOML, unknown keys rejected) and its validation.
//!
//! ```toml
//! node_name = "worker-1"          # default: the NODE_NAME environment variable
//! root = "/var/lib/fusevol"       # default; PV paths are <root>/volumes/<pv>/mnt/data
//! listen = "0.0.0.0:9808"         # /healthz and /metrics; default 0.0.0.0:9808
//! max_dirty = "256Mi"             # dirty page cache per volume (a size, "20%" of the
//!                                 # node's dirty threshold, "0": the kernel's 1%)
//! fuse_wake_here = true           # turn the kernel's fuse.wake_here on for the node
//!                                 # (see `crate::wake`); false leaves it alone
//! split_data = true               # FUSE workers take turns at reading: metadata stays
//!                                 # on one hot thread (`fusevol mount --split-data`)
//!
//! [[tiers]]
//! name = "fast"                   # a DNS label; StorageClass parameter `tier` names it
//! disks = ["/var/lib/fusevol/disks/nvme0"]
//! capacity = "20Gi"               # optional cap on what the tier offers
//! reserved = "1Gi"                # optional: kept free of volumes
//! free_space_floor = "256Mi"      # optional, per disk: below it writes get ENOSPC
//!                                 # (default 5% of the disk, 8Mi..256Mi; "0": off)
//! memory_budget = "64Mi"          # optional, per disk: its store's caches and write
//!                                 # buffers together (default 64Mi, at least 16Mi)
//!
//! [[nodes]]                       # optional: nodes whose disks differ
//! names = ["worker-7", "worker-8"] # these nodes use the tiers below instead
//! [[nodes.tiers]]
//! name = "fast"
//! disks = ["/var/lib/fusevol/disks/nvme1"]
//!
//! [[nodes]]                       # or by the node's labels (all must match); an entry
//! labels = { "fusevol.io/disks" = "two-nvme" }  # naming the node wins over labels
//! [[nodes.tiers]]
//! name = "fast"
//! disks = ["/mnt/nvme0/fusevol", "/mnt/nvme1/fusevol"]
//!
//! [static]                        # optional: static-provisioner mode
//! storage_class = "fusevol-static"
//! [[static.pools]]
//! tier = "standard"
//! count = 3
//! size = "10Gi"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bdi::DirtyLimit;
use crate::k8s::is_dns_label;
use crate::size::parse_quantity;
use crate::store::{DEFAULT_MEMORY_BUDGET, MIN_MEMORY_BUDGET};

/// Errors in the agent's configuration: each names the key and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_name: Option<String>,
    root: Option<PathBuf>,
    listen: Option<String>,
    max_dirty: Option<String>,
    fuse_wake_here: Option<bool>,
    split_data: Option<bool>,
    #[serde(default)]
    tiers: Vec<RawTier>,
    /// Per-node overrides of `tiers`: one ConfigMap for nodes whose disks differ.
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(rename = "static")]
    static_: Option<RawStatic>,
}

/// `[[nodes]]`: the nodes named in `names`, or else the nodes with all of `labels`, use
/// `tiers` instead of the top-level ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    tiers: Vec<RawTier>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    name: String,
    disks: Vec<PathBuf>,
    capacity: Option<String>,
    reserved: Option<String>,
    free_space_floor: Option<String>,
    memory_budget: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatic {
    storage_class: Option<String>,
    #[serde(default)]
    pools: Vec<RawPool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    tier: String,
    count: u32,
    size: String,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub node_name: String,
    pub root: PathBuf,
    pub listen: SocketAddr,
    /// The dirty-page bound of every mount (see [`crate::bdi`]).
    pub max_dirty: DirtyLimit,
    /// Turn the kernel's `fuse.wake_here` on for the node (see [`crate::wake`]).
    pub fuse_wake_here: bool,
    /// FUSE workers take turns at reading (`crate::mount::ServeOptions::split_data`).
    pub split_data: bool,
    /// The node's tiers: of the `[[nodes]]` entry naming it, else the top-level ones
    /// (before [`AgentConfig::with_labels`] applies the entries that match by labels).
    pub tiers: Vec<TierConfig>,
    /// `[[nodes]]` entries that match by labels, when no entry names the node.
    pub by_labels: Vec<LabelOverride>,
    pub static_mode: Option<StaticConfig>,
}

/// A `[[nodes]]` entry matching nodes by their labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelOverride {
    pub labels: BTreeMap<String, String>,
    pub tiers: Vec<TierConfig>,
}

/// One disk pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierConfig {
    pub name: String,
    /// One chunk store per disk directory.
    pub disks: Vec<PathBuf>,
    /// Cap on what the tier offers (bytes); `None`: the size of the disks' filesystems.
    pub capacity: Option<u64>,
    /// Bytes kept free of volumes.
    pub reserved: u64,
    /// Free-space floor of each disk of the tier (`None`: the store's default).
    pub free_space_floor: Option<u64>,
    /// Memory budget of each disk's store (caches and write buffers).
    pub memory_budget: u64,
}

/// Static-provisioner mode: PVs the agent keeps published for a no-provisioner class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticConfig {
    pub storage_class: String,
    pub pools: Vec<StaticPool>,
}

/// `count` PVs of `size_bytes` each in `tier`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticPool {
    pub tier: String,
    pub count: u32,
    pub size_bytes: u64,
}

/// The default root directory on the host.
pub const DEFAULT_ROOT: &str = "/var/lib/fusevol";
/// The default address of /healthz and /metrics.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9808";
/// The default static-mode StorageClass (as in `deploy/storageclasses.yaml`).
pub const DEFAULT_STATIC_CLASS: &str = "fusevol-static";

impl AgentConfig {
    /// Reads and validates `path`; `node_env` is the value of `NODE_NAME`, if set.
    pub fn load(path: &Path, node_env: Option<String>) -> Result<AgentConfig, ConfigError> {
        Self::load_text(path, node_env).map(|(c, _)| c)
    }

    /// [`AgentConfig::load`], and the text it was parsed from.
    pub fn load_text(
        path: &Path,
        node_env: Option<String>,
    ) -> Result<(AgentConfig, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let config = Self::parse(&text, node_env).map_err(|e| match e {
            ConfigError::Invalid(message) => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })?;
        Ok((config, text))
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str, node_env: Option<String>) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Invalid(e.message().replace('\n', " ")))?;
        let invalid = |m: String| ConfigError::Invalid(m);
        let node_name = raw
            .node_name
            .or(node_env)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                invalid("no node name: set node_name in the config or the NODE_NAME environment variable".into())
            })?;
        let root = raw.root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        if !root.is_absolute() {
            return Err(invalid(format!(
                "root {:?} must be an absolute path",
                root.display()
            )));
        }
        let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(format!(
                "listen {listen_text:?} is not an address:port (e.g. 0.0.0.0:9808)"
            ))
        })?;
        let max_dirty = match raw.max_dirty.as_deref() {
            None => crate::bdi::DEFAULT,
            Some(text) => text
                .parse()
                .map_err(|e| invalid(format!("max_dirty: {e}")))?,
        };
        let (raw_tiers, by_labels) = tiers_of_node(&node_name, raw.tiers, raw.nodes)?;
        let tiers = validate_tiers(raw_tiers)?;
        // A static pool may use a tier of the node's own tiers or of an entry matching it by
        // labels (checked again once the labels decide: `with_labels`).
        let names: BTreeSet<String> = tiers
            .iter()
            .chain(by_labels.iter().flat_map(|o| &o.tiers))
            .map(|t| t.name.clone())
            .collect();
        let static_mode = match raw.static_ {
            None => None,
            Some(s) => {
                let mut pools = Vec::new();
                for p in s.pools {
                    if !names.contains(&p.tier) {
                        return Err(invalid(format!(
                            "static pool: unknown tier {:?} (tiers: {})",
                            p.tier,
                            names.iter().cloned().collect::<Vec<_>>().join(", ")
                        )));
                    }
                    let size_bytes = parse_quantity(&p.size).map_err(|e| {
                        invalid(format!("static pool {:?}: size {:?}: {e}", p.tier, p.size))
                    })?;
                    if size_bytes == 0 {
                        return Err(invalid(format!(
                            "static pool {:?}: size must be more than 0",
                            p.tier
                        )));
                    }
                    pools.push(StaticPool {
                        tier: p.tier,
                        count: p.count,
                        size_bytes,
                    });
                }
                Some(StaticConfig {
                    storage_class: s
                        .storage_class
                        .unwrap_or_else(|| DEFAULT_STATIC_CLASS.to_string()),
                    pools,
                })
            }
        };
        Ok(AgentConfig {
            node_name,
            root,
            listen,
            max_dirty,
            fuse_wake_here: raw.fuse_wake_here.unwrap_or(true),
            split_data: raw.split_data.unwrap_or(true),
            tiers,
            by_labels,
            static_mode,
        })
    }

    /// This configuration for a node with `labels`: the tiers of the `[[nodes]]` entry
    /// whose labels it has, if no entry names the node. A node that two entries match by
    /// labels is an error (which tiers would be a guess).
    pub fn with_labels(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<AgentConfig, ConfigError> {
        let matching: Vec<&LabelOverride> = self
            .by_labels
            .iter()
            .filter(|o| o.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .collect();
        let mut out = self.clone();
        match matching.as_slice() {
            [] => {}
            [one] => out.tiers = one.tiers.clone(),
            many => {
                let shown: Vec<String> = many.iter().map(|o| format!("{:?}", o.labels)).collect();
                return Err(ConfigError::Invalid(format!(
                    "node {:?} matches {} [[nodes]] entries by labels: {}",
                    self.node_name,
                    many.len(),
                    shown.join(", ")
                )));
            }
        }
        let names: BTreeSet<&str> = out.tiers.iter().map(|t| t.name.as_str()).collect();
        let mut pools = out.static_mode.iter().flat_map(|s| &s.pools);
        if let Some(p) = pools.find(|p| !names.contains(p.tier.as_str())) {
            return Err(ConfigError::Invalid(format!(
                "static pool: unknown tier {:?} for node {:?} (its tiers: {})",
                p.tier,
                self.node_name,
                names.iter().copied().collect::<Vec<_>>().join(", ")
            )));
        }
        out.by_labels.clear();
        Ok(out)
    }

    /// The tier named `name`.
    pub fn tier(&self, name: &str) -> Option<&TierConfig> {
        self.tiers.iter().find(|t| t.name == name)
    }
}

/// The tiers that apply to node `node`: those of the `[[nodes]]` entry naming it, else
/// the top-level ones; and, when no entry names it, the entries that match by labels. A
/// node named by two entries is an error; so is an entry with neither names nor labels
/// (it would apply to no node) or with both.
fn tiers_of_node(
    node: &str,
    top: Vec<RawTier>,
    nodes: Vec<RawNode>,
) -> Result<(Vec<RawTier>, Vec<LabelOverride>), ConfigError> {
    let mut chosen = None;
    let mut seen = BTreeSet::new();
    let mut by_labels = Vec::new();
    for (i, n) in nodes.into_iter().enumerate() {
        match (n.names.is_empty(), n.labels.is_empty()) {
            (true, true) => {
                return Err(ConfigError::Invalid(format!(
                    "[[nodes]] entry {} has neither names nor labels (list the node names, or the labels, it applies to)",
                    i + 1
                )))
            }
            (false, false) => {
                return Err(ConfigError::Invalid(format!(
                    "[[nodes]] entry {} has both names and labels: use one (an entry naming a node wins over entries matching its labels)",
                    i + 1
                )))
            }
            (true, false) => {
                let label = format!("[[nodes]] labels {:?}", n.labels);
                let tiers = validate_tiers(n.tiers)
                    .map_err(|e| ConfigError::Invalid(format!("{label}: {e}")))?;
                by_labels.push(LabelOverride {
                    labels: n.labels,
                    tiers,
                });
                continue;
            }
            (false, true) => {}
        }
        for name in &n.names {
            if !seen.insert(name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "node {name:?} is named by two [[nodes]] entries"
                )));
            }
        }
        // Every entry is validated, not only this node's: a mistake shows on every node.
        let label = format!("[[nodes]] {}", n.names.join(", "));
        validate_tiers(n.tiers.clone())
            .map_err(|e| ConfigError::Invalid(format!("{label}: {e}")))?;
        if n.names.iter().any(|x| x == node) {
            chosen = Some(n.tiers);
        }
    }
    match chosen {
        Some(tiers) => Ok((tiers, Vec::new())),
        None => Ok((top, by_labels)),
    }
}

/// Validates tiers: names, disks (absolute, each in one tier), quantities.
fn validate_tiers(raw: Vec<RawTier>) -> Result<Vec<TierConfig>, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    if raw.is_empty() {
        return Err(invalid(
            "no tiers: add at least one [[tiers]] table with a name and disks".into(),
        ));
    }
    let mut names = BTreeSet::new();
    let mut all_disks = BTreeSet::new();
    let mut tiers = Vec::new();
    for t in raw {
        if !is_dns_label(&t.name) {
            return Err(invalid(format!(
                    "tier name {:?} must be a DNS label (lowercase letters, digits and '-', at most 63)",
                    t.name
                )));
        }
        if !names.insert(t.name.clone()) {
            return Err(invalid(format!("tier {:?} is defined twice", t.name)));
        }
        if t.disks.is_empty() {
            return Err(invalid(format!("tier {:?} has no disks", t.name)));
        }
        for d in &t.disks {
            if !d.is_absolute() {
                return Err(invalid(format!(
                    "tier {:?}: disk {:?} must be an absolute path",
                    t.name,
                    d.display()
                )));
            }
            if !all_disks.insert(d.clone()) {
                return Err(invalid(format!(
                    "disk {:?} is listed twice (each disk directory belongs to one tier)",
                    d.display()
                )));
            }
        }
        let quantity = |key: &str, v: &Option<String>| -> Result<Option<u64>, ConfigError> {
            v.as_deref()
                .map(|q| {
                    parse_quantity(q)
                        .map_err(|e| invalid(format!("tier {:?}: {key} {q:?}: {e}", t.name)))
                })
                .transpose()
        };
        let memory_budget =
            quantity("memory_budget", &t.memory_budget)?.unwrap_or(DEFAULT_MEMORY_BUDGET);
        if memory_budget < MIN_MEMORY_BUDGET {
            return Err(invalid(format!(
                "tier {:?}: memory_budget must be at least 16Mi",
                t.name
            )));
        }
        tiers.push(TierConfig {
            memory_budget,
            capacity: quantity("capacity", &t.capacity)?,
            reserved: quantity("reserved", &t.reserved)?.unwrap_or(0),
            free_space_floor: quantity("free_space_floor", &t.free_space_floor)?,
            name: t.name,
            disks: t.disks,
        });
    }
    Ok(tiers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        root = "/var/lib/fusevol"
        listen = "127.0.0.1:9808"
        [[tiers]]
        name = "fast"
        disks = ["/d/fast-0"]
        capacity = "20Gi"
        reserved = "1Gi"
        [[tiers]]
        name = "standard"
        disks = ["/d/std-0", "/d/std-1"]
        [static]
        [[static.pools]]
        tier = "standard"
        count = 3
        size = "1Gi"
    "#;

    #[test]
    fn nodes_entries_match_by_labels_unless_one_names_the_node() {
        let text = r#"
            [[tiers]]
            name = "fast"
            disks = ["/d/default"]
            [[nodes]]
            labels = { "disks" = "two", "zone" = "a" }
            [[nodes.tiers]]
            name = "fast"
            disks = ["/d/n0", "/d/n1"]
            [[nodes]]
            labels = { "disks" = "two" }
            [[nodes.tiers]]
            name = "bulk"
            disks = ["/d/hdd"]
            [[nodes]]
            names = ["special"]
            [[nodes.tiers]]
            name = "fast"
            disks = ["/d/special"]
        "#;
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let disks = |c: &AgentConfig| -> Vec<String> {
            c.tiers
                .iter()
                .flat_map(|t| &t.disks)
                .map(|d| d.display().to_string())
                .collect()
        };
        let c = AgentConfig::parse(text, Some("n1".into())).unwrap();
        assert_eq!(
            disks(&c),
            ["/d/default"],
            "before labels are known: top-level"
        );
        let none = c.with_labels(&labels(&[("zone", "a")])).unwrap();
        assert_eq!(disks(&none), ["/d/default"]);
        let hdd = c
            .with_labels(&labels(&[("disks", "two"), ("zone", "b")]))
            .unwrap();
        assert_eq!(disks(&hdd), ["/d/hdd"]);
        let e = c
            .with_labels(&labels(&[("disks", "two"), ("zone", "a")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("matches 2 [[nodes]] entries by labels"), "{e}");
        // A name wins over labels.
        let s = AgentConfig::parse(text, Some("special".into())).unwrap();
        let s = s
            .with_labels(&labels(&[("disks", "two"), ("zone", "a")]))
            .unwrap();
        assert_eq!(disks(&s), ["/d/special"]);
        for bad in [
            "[[nodes]]\n[[nodes.tiers]]\nname = \"f\"\ndisks = [\"/d/x\"]\n",
            "[[nodes]]\nnames = [\"a\"]\nlabels = { k = \"v\" }\n[[nodes.tiers]]\nname = \"f\"\ndisks = [\"/d/x\"]\n",
        ] {
            let text = format!("[[tiers]]\nname = \"f\"\ndisks = [\"/d/y\"]\n{bad}");
            let e = AgentConfig::parse(&text, Some("n".into())).unwrap_err().to_string();
            assert!(e.contains("names") && e.contains("labels"), "{e}");
        }
    }

    #[test]
    fn a_full_config_parses_with_defaults_filled_in() {
        let c = AgentConfig::parse(EXAMPLE, Some("n1".into())).unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.listen.port(), 9808);
        assert_eq!(c.max_dirty, crate::bdi::DEFAULT);
        assert!(c.fuse_wake_here, "on unless the config says otherwise");
        assert!(c.split_data, "on unless the config says otherwise");
        assert_eq!(c.tiers[0].capacity, Some(20 << 30));
        assert_eq!(c.tiers[0].reserved, 1 << 30);
        assert_eq!(c.tiers[1].capacity, None);
        assert_eq!(c.tiers[1].disks.len(), 2);
        assert_eq!(c.tiers[0].memory_budget, DEFAULT_MEMORY_BUDGET);
        let s = c.static_mode.unwrap();
        assert_eq!(s.storage_class, DEFAULT_STATIC_CLASS);
        assert_eq!(s.pools[0].size_bytes, 1 << 30);
    }

    #[test]
    fn split_data_can_be_turned_off_and_must_be_a_boolean() {
        let text = format!("split_data = false\n{EXAMPLE}");
        let c = AgentConfig::parse(&text, Some("n".into())).unwrap();
        assert!(!c.split_data);
        let text = format!("split_data = 1\n{EXAMPLE}");
        let e = AgentConfig::parse(&text, Some("n".into())).unwrap_err();
        assert!(e.to_string().contains("bool"), "{e}");
    }

    #[test]
    fn fuse_wake_here_can_be_turned_off_and_must_be_a_boolean() {
        let text = format!("fuse_wake_here = false\n{EXAMPLE}");
        let c = AgentConfig::parse(&text, Some("n".into())).unwrap();
        assert!(!c.fuse_wake_here);
        let text = format!("fuse_wake_here = \"yes\"\n{EXAMPLE}");
        let e = AgentConfig::parse(&text, Some("n".into())).unwrap_err();
        assert!(e.to_string().contains("bool"), "{e}");
    }

    #[test]
    fn max_dirty_takes_a_size_a_percentage_or_zero() {
        for (value, want) in [
            ("1Gi", DirtyLimit::Bytes(1 << 30)),
            ("20%", DirtyLimit::Percent(20)),
            ("0", DirtyLimit::Kernel),
        ] {
            let text = format!("max_dirty = \"{value}\"\n{EXAMPLE}");
            let c = AgentConfig::parse(&text, Some("n".into())).unwrap();
            assert_eq!(c.max_dirty, want, "{value}");
        }
    }

    #[test]
    fn the_config_names_the_node_over_the_environment() {
        let text = format!("node_name = \"cfg\"\n{EXAMPLE}");
        let c = AgentConfig::parse(&text, Some("env".into())).unwrap();
        assert_eq!(c.node_name, "cfg");
    }

    const PER_NODE: &str = r#"
        [[tiers]]
        name = "fast"
        disks = ["/d/fast-0"]
        [[nodes]]
        names = ["big-1", "big-2"]
        [[nodes.tiers]]
        name = "fast"
        disks = ["/nvme/a", "/nvme/b"]
        capacity = "2Ti"
        [[nodes.tiers]]
        name = "bulk"
        disks = ["/hdd/0"]
        [[nodes]]
        names = ["small-1"]
        [[nodes.tiers]]
        name = "fast"
        disks = ["/d/tiny"]
        [static]
        [[static.pools]]
        tier = "fast"
        count = 1
        size = "1Gi"
    "#;

    #[test]
    fn a_node_named_in_nodes_gets_its_tiers_and_the_others_the_top_level_ones() {
        let big = AgentConfig::parse(PER_NODE, Some("big-2".into())).unwrap();
        let names: Vec<&str> = big.tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["fast", "bulk"]);
        assert_eq!(big.tiers[0].disks.len(), 2);
        assert_eq!(big.tiers[0].capacity, Some(2 << 40));
        let small = AgentConfig::parse(PER_NODE, Some("small-1".into())).unwrap();
        assert_eq!(small.tiers[0].disks, [PathBuf::from("/d/tiny")]);
        let other = AgentConfig::parse(PER_NODE, Some("worker-9".into())).unwrap();
        assert_eq!(other.tiers.len(), 1);
        assert_eq!(other.tiers[0].disks, [PathBuf::from("/d/fast-0")]);
        // A static pool must name a tier of the node's own tiers.
        let text = PER_NODE.replace(
            "tier = \"fast\"\n        count",
            "tier = \"bulk\"\n        count",
        );
        assert!(AgentConfig::parse(&text, Some("big-1".into())).is_ok());
        let e = AgentConfig::parse(&text, Some("worker-9".into())).unwrap_err();
        assert!(e.to_string().contains("unknown tier \"bulk\""), "{e}");
    }

    #[test]
    fn a_mistake_in_any_nodes_entry_is_an_error_on_every_node() {
        let cases = [
            (
                PER_NODE.replace("\"/hdd/0\"", "\"hdd\""),
                "[[nodes]] big-1, big-2: tier \"bulk\": disk \"hdd\" must be an absolute path",
            ),
            (
                PER_NODE.replace("names = [\"small-1\"]", "names = [\"big-1\"]"),
                "node \"big-1\" is named by two [[nodes]] entries",
            ),
            (
                PER_NODE.replace("names = [\"small-1\"]", "names = []"),
                "[[nodes]] entry 2 has neither names nor labels",
            ),
            (
                PER_NODE.replace("name = \"bulk\"", "name = \"Bulk\""),
                "DNS label",
            ),
        ];
        for (text, want) in cases {
            for node in ["big-1", "small-1", "worker-9"] {
                let e = AgentConfig::parse(&text, Some(node.into())).unwrap_err();
                assert!(e.to_string().contains(want), "{node}: {e} lacks {want:?}");
            }
        }
    }

    #[test]
    fn bad_configs_get_an_error_naming_the_key() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("[[tiers]]\nname=\"a\"\ndisks=[\"/d\"]\n", None, "no node name"),
            ("colour = 1\n", Some("n"), "unknown field `colour`"),
            ("", Some("n"), "no tiers"),
            ("[[tiers]]\nname=\"Fast\"\ndisks=[\"/d\"]\n", Some("n"), "DNS label"),
            ("[[tiers]]\nname=\"a\"\ndisks=[]\n", Some("n"), "has no disks"),
            ("[[tiers]]\nname=\"a\"\ndisks=[\"d\"]\n", Some("n"), "absolute"),
            ("[[tiers]]\nname=\"a\"\ndisks=[\"/d\"]\ncapacity=\"lots\"\n", Some("n"), "capacity \"lots\""),
            ("[[tiers]]\nname=\"a\"\ndisks=[\"/d\"]\n[[tiers]]\nname=\"b\"\ndisks=[\"/d\"]\n", Some("n"), "listed twice"),
            ("[[tiers]]\nname=\"a\"\ndisks=[\"/d\"]\n[[tiers]]\nname=\"a\"\ndisks=[\"/e\"]\n", Some("n"), "defined twice"),
            ("[[tiers]]\nname=\"a\"\ndisks=[\"/d\"]\nmemory_budget=\"8Mi\"\n", Some("n"), "memory_budget must be at least 16Mi"),
            ("listen=\"nowhere\"\n[[tiers]]\nname=\"a\"\ndisks=[\"/d\"]\n", Some("n"), "listen \"nowhere\""),
            ("max_dirty=\"150%\"\n[[tiers]]\nname=\"a\"\ndisks=[\"/d\"]\n", Some("n"), "max_dirty: invalid dirty-page limit \"150%\""),
            ("[[tiers]]\nname=\"a\"\ndisks=[\"/d\"]\n[static]\n[[static.pools]]\ntier=\"b\"\ncount=1\nsize=\"1Gi\"\n", Some("n"), "unknown tier \"b\" (tiers: a)"),
        ];
        for (text, env, want) in cases {
            let err = AgentConfig::parse(text, env.map(String::from)).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{text:?}: {err} lacks {want:?}"
            );
        }
    }
}
