//! Master keys of encrypted volumes, read from the Secrets their StorageClasses name.
//!
//! Owns: reading the Secret a PV's spec points to (`encryptionSecretNamespace/Name`, data
//! key [`SECRET_DATA_KEY`]), and only those: the agent is granted `get` on Secrets by a
//! Role in each namespace that holds keys, never a cluster-wide read. A key read is kept
//! for [`KEY_TTL`] (a corrected Secret is seen within that time) and afterwards while the
//! Secret cannot be read again (a volume's key never changes). Only PVs not served yet
//! need a key (the store keeps the keys of the volumes it opened), so a served volume
//! never depends on the API server; Secrets are read at once, under one
//! [`super::API_TIMEOUT`]. A PV whose key cannot be had becomes [`Wanted::Broken`] with the
//! reason, which the agent posts as an event on the PV.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::volumes::{Plan, Wanted};
use crate::k8s::params::SecretRef;
use crate::store::{Encryption, MasterKey};

/// The data key of a Secret that holds a volume's master key.
pub const SECRET_DATA_KEY: &str = "key";
/// How long a key read from a Secret is used before the Secret is read again.
pub const KEY_TTL: Duration = Duration::from_secs(60);

/// Keys read, by Secret.
#[derive(Default)]
pub struct KeyCache {
    keys: HashMap<(String, String), (MasterKey, Instant)>,
}

/// Whether `w` is an encrypted volume to start serving (`served`: those served now).
fn needs_key(w: &Wanted, served: &BTreeSet<String>) -> bool {
    matches!(w, Wanted::Serve { pv, spec, key: None, .. }
        if spec.encryption != Encryption::None && !served.contains(pv))
}

impl KeyCache {
    /// `plan` with the key of every encrypted volume it starts serving attached, or the
    /// volume turned [`Wanted::Broken`] with why its key could not be read.
    pub async fn resolve(
        &mut self,
        client: &Client,
        plan: Plan,
        served: &BTreeSet<String>,
    ) -> Plan {
        let refs: BTreeSet<(String, String)> = plan
            .wanted
            .iter()
            .filter(|w| needs_key(w, served))
            .filter_map(|w| match w {
                Wanted::Serve { spec, .. } => spec.encryption_secret.as_ref(),
                _ => None,
            })
            .map(|r| (r.namespace.clone(), r.name.clone()))
            .filter(|id| {
                self.keys
                    .get(id)
                    .is_none_or(|(_, at)| at.elapsed() >= KEY_TTL)
            })
            .collect();
        let reads = refs.into_iter().map(|(namespace, name)| async move {
            let r = SecretRef { namespace, name };
            let key = read_key(client, &r).await;
            ((r.namespace, r.name), key)
        });
        let mut failed = BTreeMap::new();
        for (id, key) in futures::future::join_all(reads).await {
            match key {
                Ok(key) => {
                    self.keys.insert(id, (key, Instant::now()));
                }
                Err(e) => {
                    failed.insert(id, e);
                }
            }
        }
        let mut wanted = Vec::with_capacity(plan.wanted.len());
        for w in plan.wanted {
            if !needs_key(&w, served) {
                wanted.push(w);
                continue;
            }
            wanted.push(match w {
                Wanted::Serve { pv, spec, uid, .. } => {
                    let key = match &spec.encryption_secret {
                        // A key read before is still the volume's key, even when the
                        // Secret cannot be read now.
                        Some(r) => {
                            let id = (r.namespace.clone(), r.name.clone());
                            match (self.keys.get(&id), failed.get(&id)) {
                                (Some((key, _)), _) => Ok(key.clone()),
                                (None, Some(e)) => Err(e.clone()),
                                (None, None) => Err(format!("encryption key Secret {r}: not read")),
                            }
                        }
                        None => Err("encrypted, but its spec names no Secret with the key".into()),
                    };
                    match key {
                        Ok(key) => Wanted::Serve {
                            pv,
                            spec,
                            uid,
                            key: Some(key),
                        },
                        Err(message) => Wanted::Broken { pv, message },
                    }
                }
                w => w,
            });
        }
        Plan { wanted }
    }
}

/// Reads the master key in Secret `r`; the error says what to fix.
async fn read_key(client: &Client, r: &SecretRef) -> Result<MasterKey, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
    let secret = match tokio::time::timeout(super::API_TIMEOUT, api.get(&r.name)).await {
        Ok(Ok(s)) => s,
        Ok(Err(kube::Error::Api(e))) if e.code == 404 => {
            return Err(format!("encryption key Secret {r} not found"))
        }
        Ok(Err(kube::Error::Api(e))) if e.code == 403 => {
            return Err(format!(
                "the agent may not read encryption key Secret {r}: grant its service account `get` on that Secret (a Role and RoleBinding in namespace {}; see the README)",
                r.namespace
            ))
        }
        Ok(Err(e)) => return Err(format!("reading encryption key Secret {r}: {e}")),
        Err(_) => {
            return Err(format!(
                "reading encryption key Secret {r}: no answer from the API server in {}s",
                super::API_TIMEOUT.as_secs()
            ))
        }
    };
    let data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_DATA_KEY))
        .ok_or_else(|| format!("encryption key Secret {r} has no data key {SECRET_DATA_KEY:?}"))?;
    MasterKey::from_bytes(&data.0)
        .map_err(|e| format!("encryption key Secret {r}, data key {SECRET_DATA_KEY:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::mock::{client, Call};
    use crate::k8s::params::VolumeSpec;
    use serde_json::json;

    fn spec(secret: Option<(&str, &str)>) -> VolumeSpec {
        VolumeSpec {
            quota_bytes: 1 << 30,
            tier: "fast".into(),
            replicas: 1,
            compression: Default::default(),
            inode_limit: None,
            encryption: Encryption::Aes256Gcm,
            encryption_secret: secret.map(|(namespace, name)| SecretRef {
                namespace: namespace.into(),
                name: name.into(),
            }),
        }
    }

    fn serve(pv: &str, spec: VolumeSpec) -> Wanted {
        Wanted::Serve {
            pv: pv.into(),
            spec,
            uid: None,
            key: None,
        }
    }

    fn secret(data: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "k", "namespace": "ns"}, "data": data})
    }

    fn status(code: u16, reason: &str) -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code})
    }

    const HEX_B64: &str =
        "MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmYwMDExMjIzMzQ0NTU2Njc3ODg5OWFhYmJjY2RkZWVmZg==";

    #[tokio::test]
    async fn the_named_secret_is_read_once_and_its_key_attached() {
        let path = "/api/v1/namespaces/ns/secrets/k";
        let (c, server) = client(vec![Call::new(
            "GET",
            path,
            200,
            secret(json!({"key": HEX_B64})),
        )]);
        let mut cache = KeyCache::default();
        let plan = Plan {
            wanted: vec![
                serve("a", spec(Some(("ns", "k")))),
                serve("b", spec(Some(("ns", "k")))),
                serve(
                    "plain",
                    VolumeSpec {
                        encryption: Encryption::None,
                        encryption_secret: None,
                        ..spec(None)
                    },
                ),
            ],
        };
        let plan = cache.resolve(&c, plan, &BTreeSet::new()).await;
        let keys: Vec<bool> = plan
            .wanted
            .iter()
            .map(|w| matches!(w, Wanted::Serve { key: Some(_), .. }))
            .collect();
        assert_eq!(keys, [true, true, false], "{plan:?}");
        server.await.unwrap();
    }

    /// A served volume needs no key (its store holds it): no Secret is read for it, so a
    /// hung API server never holds up a round of served volumes. A key read before is used
    /// when the Secret cannot be read again.
    #[tokio::test(start_paused = true)]
    async fn served_volumes_read_no_secret_and_a_key_read_before_outlives_a_hung_api() {
        let path = "/api/v1/namespaces/ns/secrets/k";
        let (c, _server) = client(vec![
            Call::new("GET", path, 200, secret(json!({"key": HEX_B64}))),
            Call::hang("GET", path),
        ]);
        let mut cache = KeyCache::default();
        let plan = || Plan {
            wanted: vec![
                serve("a", spec(Some(("ns", "k")))),
                serve("b", spec(Some(("ns", "k")))),
            ],
        };
        let served: BTreeSet<String> = ["a".to_string()].into();
        let got = cache.resolve(&c, plan(), &served).await;
        assert!(
            matches!(&got.wanted[0], Wanted::Serve { key: None, .. }),
            "{got:?}"
        );
        assert!(
            matches!(&got.wanted[1], Wanted::Serve { key: Some(_), .. }),
            "{got:?}"
        );
        tokio::time::advance(KEY_TTL + Duration::from_secs(1)).await;
        let got = cache.resolve(&c, plan(), &BTreeSet::new()).await;
        for w in &got.wanted {
            assert!(matches!(w, Wanted::Serve { key: Some(_), .. }), "{got:?}");
        }
    }

    #[tokio::test]
    async fn a_key_that_cannot_be_read_breaks_the_pv_with_what_to_fix() {
        let (c, server) = client(vec![
            Call::new(
                "GET",
                "/api/v1/namespaces/ns/secrets/gone",
                404,
                status(404, "NotFound"),
            ),
            Call::new(
                "GET",
                "/api/v1/namespaces/ns/secrets/nokey",
                200,
                secret(json!({"password": HEX_B64})),
            ),
            Call::new(
                "GET",
                "/api/v1/namespaces/ns/secrets/short",
                200,
                secret(json!({"key": "c2hvcnQ="})),
            ),
            // Read in the order of (namespace, name), all at once.
            Call::new(
                "GET",
                "/api/v1/namespaces/other/secrets/k",
                403,
                status(403, "Forbidden"),
            ),
        ]);
        let mut cache = KeyCache::default();
        let plan = Plan {
            wanted: vec![
                serve("a", spec(Some(("ns", "gone")))),
                serve("b", spec(Some(("other", "k")))),
                serve("c", spec(Some(("ns", "nokey")))),
                serve("d", spec(Some(("ns", "short")))),
                serve("e", spec(None)),
            ],
        };
        let messages: Vec<String> = cache
            .resolve(&c, plan, &BTreeSet::new())
            .await
            .wanted
            .into_iter()
            .map(|w| match w {
                Wanted::Broken { message, .. } => message,
                w => panic!("not broken: {w:?}"),
            })
            .collect();
        assert!(
            messages[0].contains("Secret ns/gone not found"),
            "{messages:?}"
        );
        assert!(
            messages[1].contains("grant its service account `get`"),
            "{messages:?}"
        );
        assert!(messages[2].contains("no data key \"key\""), "{messages:?}");
        assert!(
            messages[3].contains("32 bytes, or 64 hexadecimal digits"),
            "{messages:?}"
        );
        assert!(messages[4].contains("names no Secret"), "{messages:?}");
        server.await.unwrap();
    }
}
