//! What the agent served, kept on the node (`<root>/served.json`), so that an agent that
//! starts while the API server is unreachable serves the volumes it already had, and
//! catches up with the API later. Only ever used to *serve*: data is deleted only on what
//! the API says (a Released PV), never on local state.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::volumes::{Plan, Wanted};
use crate::k8s::params::VolumeSpec;

/// File name under the agent root.
pub const FILE: &str = "served.json";

/// The PVs served at the end of the last round, with the spec each was served with.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Served {
    pub volumes: BTreeMap<String, Entry>,
}

/// One served PV.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub spec: VolumeSpec,
    /// The PV's UID (the volume refuses to serve another object of the same name).
    #[serde(default)]
    pub uid: Option<String>,
}

impl Served {
    /// The serving part of `plan`.
    pub fn from_plan(plan: &Plan) -> Served {
        let volumes = plan
            .wanted
            .iter()
            .filter_map(|w| match w {
                Wanted::Serve { pv, spec, uid, .. } => Some((
                    pv.clone(),
                    Entry {
                        spec: spec.clone(),
                        uid: uid.clone(),
                    },
                )),
                _ => None,
            })
            .collect();
        Served { volumes }
    }

    /// A plan that serves these volumes and nothing else.
    pub fn plan(&self) -> Plan {
        Plan {
            wanted: self
                .volumes
                .iter()
                .map(|(pv, e)| Wanted::Serve {
                    pv: pv.clone(),
                    spec: e.spec.clone(),
                    uid: e.uid.clone(),
                    key: None,
                })
                .collect(),
        }
    }
}

fn path(root: &Path) -> PathBuf {
    root.join(FILE)
}

/// Reads the file; a missing file is an empty set. A damaged one is reported and treated
/// as empty (the API will say what to serve once it answers).
pub fn load(root: &Path) -> Served {
    match std::fs::read(path(root)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring a damaged {FILE}");
            Served::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Served::default(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read {FILE}");
            Served::default()
        }
    }
}

/// Replaces the file atomically and durably (temp file, fsync, rename, fsync of the root).
pub fn save(root: &Path, served: &Served) -> std::io::Result<()> {
    crate::store::create_dir_all_durable(root)?;
    let tmp = root.join(format!(".{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(served).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(root))?;
    std::fs::File::open(root)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::params::Compression;

    #[test]
    fn the_served_set_round_trips_and_a_damaged_file_serves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Served::default());
        let spec = VolumeSpec {
            quota_bytes: 1 << 30,
            tier: "fast".into(),
            replicas: 1,
            compression: Compression::None,
            inode_limit: None,
            encryption: Default::default(),
            encryption_secret: None,
        };
        let plan = Plan {
            wanted: vec![
                Wanted::Serve {
                    pv: "pvc-1".into(),
                    spec: spec.clone(),
                    uid: Some("uid-1".into()),
                    key: None,
                },
                Wanted::Cleanup {
                    pv: "pvc-2".into(),
                    delete_data: true,
                },
            ],
        };
        let served = Served::from_plan(&plan);
        save(dir.path(), &served).unwrap();
        let back = load(dir.path());
        assert_eq!(back, served);
        assert_eq!(
            back.plan().wanted,
            [Wanted::Serve {
                pv: "pvc-1".into(),
                spec,
                uid: Some("uid-1".into()),
                key: None,
            }],
            "local state only ever serves"
        );
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert_eq!(load(dir.path()), Served::default());
    }
}
