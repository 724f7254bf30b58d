//! Configuration changes without a restart.
//!
//! Owns: noticing that the agent's configuration file changed (in Kubernetes a ConfigMap
//! volume, which the kubelet updates in place within a minute of an edit) and telling the
//! agent what of the new configuration applies now. The file is read again every round;
//! a text that changed is validated as at start (an invalid one is reported once and the
//! running configuration kept). What applies at once is the node's tiers and disks (see
//! [`super::volumes::VolumeManager::reconfigure`]: new disks are opened, a disk that holds
//! volumes is never dropped); every other setting is reported as needing a restart.

use std::path::{Path, PathBuf};

use super::config::AgentConfig;

/// The agent's configuration file as last read.
pub struct ConfigWatch {
    path: PathBuf,
    node_env: Option<String>,
    /// The text last acted on (applied, or reported as invalid).
    text: Option<String>,
}

/// What a changed configuration file holds.
#[derive(Debug)]
pub enum Change {
    /// A valid configuration.
    Valid(Box<AgentConfig>),
    /// A text that does not validate: the message says why (the running one is kept).
    Invalid(String),
}

impl ConfigWatch {
    /// Watches `path`, whose text `running` the running configuration was parsed from
    /// (an edit made while the agent started is then seen as a change).
    pub fn new(path: &Path, running: String, node_env: Option<String>) -> ConfigWatch {
        ConfigWatch {
            path: path.to_path_buf(),
            node_env,
            text: Some(running),
        }
    }

    /// The new configuration if the file's text changed since the last call (or the
    /// start); `None` when it did not, or cannot be read now (a ConfigMap volume swaps its
    /// files: the next round reads it).
    pub fn poll(&mut self) -> Option<Change> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        if self.text.as_deref() == Some(text.as_str()) {
            return None;
        }
        self.text = Some(text.clone());
        Some(match AgentConfig::parse(&text, self.node_env.clone()) {
            Ok(c) => Change::Valid(Box::new(c)),
            Err(e) => Change::Invalid(format!("{}: {e}", self.path.display())),
        })
    }
}

/// The settings of `new` that differ from `running` and apply only at the next start.
pub fn needs_restart(running: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |changed: bool, name: &'static str| {
        if changed {
            out.push(name);
        }
    };
    check(running.node_name != new.node_name, "node_name");
    check(running.root != new.root, "root");
    check(running.listen != new.listen, "listen");
    check(running.max_dirty != new.max_dirty, "max_dirty");
    check(
        running.fuse_wake_here != new.fuse_wake_here,
        "fuse_wake_here",
    );
    check(running.split_data != new.split_data, "split_data");
    check(running.static_mode != new.static_mode, "static");
    let store_settings = |c: &AgentConfig, disk: &Path| {
        c.tiers
            .iter()
            .find(|t| t.disks.iter().any(|d| d == disk))
            .map(|t| (t.free_space_floor, t.memory_budget))
    };
    let disk_settings_changed = running.tiers.iter().flat_map(|t| &t.disks).any(|d| {
        matches!((store_settings(running, d), store_settings(new, d)), (Some(a), Some(b)) if a != b)
    });
    check(
        disk_settings_changed,
        "free_space_floor/memory_budget of an open disk",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
node_name = "n1"
[[tiers]]
name = "fast"
disks = ["/d/a"]
"#;

    #[test]
    fn a_changed_file_is_read_once_and_an_invalid_one_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, BASE).unwrap();
        let mut w = ConfigWatch::new(&path, BASE.to_string(), None);
        assert!(w.poll().is_none(), "unchanged");
        let more = format!("{BASE}[[tiers]]\nname = \"bulk\"\ndisks = [\"/d/b\"]\n");
        std::fs::write(&path, &more).unwrap();
        match w.poll() {
            Some(Change::Valid(c)) => assert_eq!(c.tiers.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(w.poll().is_none(), "acted on once");
        std::fs::write(&path, "tiers = 3").unwrap();
        match w.poll() {
            Some(Change::Invalid(m)) => assert!(m.contains("agent.toml"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(w.poll().is_none(), "reported once");
        // Gone for a moment (a ConfigMap volume swapping its files): nothing.
        std::fs::remove_file(&path).unwrap();
        assert!(w.poll().is_none());
    }

    #[test]
    fn settings_other_than_tiers_are_named_as_needing_a_restart() {
        let running = AgentConfig::parse(BASE, None).unwrap();
        let tiers_only = AgentConfig::parse(
            &format!("{BASE}[[tiers]]\nname = \"bulk\"\ndisks = [\"/d/b\"]\n"),
            None,
        )
        .unwrap();
        assert!(needs_restart(&running, &tiers_only).is_empty());
        let other = AgentConfig::parse(
            r#"
node_name = "n1"
listen = "0.0.0.0:9999"
[[tiers]]
name = "fast"
disks = ["/d/a"]
memory_budget = "128Mi"
"#,
            None,
        )
        .unwrap();
        assert_eq!(
            needs_restart(&running, &other),
            ["listen", "free_space_floor/memory_budget of an open disk"]
        );
    }
}
