//! Leader election on a `coordination.k8s.io/v1` Lease, so that of the controller's replicas
//! exactly one provisions at a time.
//!
//! The holder renews `renewTime` every [`LeaderElection::renew_every`]; another replica takes
//! the Lease over when `renewTime + leaseDurationSeconds` has passed. Every write is an update
//! carrying the `resourceVersion` read just before, so two replicas racing for an expired
//! Lease cannot both win: the API server refuses the second with a conflict. A leader that
//! fails to renew before its own lease runs out stops (the process exits and restarts as a
//! candidate), so two leaders never act at once for longer than clock skew.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;

/// A replica's view of one Lease.
#[derive(Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Leading,
    /// Another replica holds it.
    Following { holder: String },
}

impl LeaderElection {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// How often the leader renews (a third of the lease duration).
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// One attempt to acquire or renew the Lease.
    pub async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following {
                    holder: "(another replica, just now)".into(),
                }),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && !expired(spec, now) {
            return Ok(Attempt::Following { holder });
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        // `lease` still carries the resourceVersion read above: a concurrent writer wins.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following {
                holder: "(another replica, just now)".into(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) {
        let mut last_holder = String::new();
        loop {
            match self.try_acquire().await {
                Ok(Attempt::Leading) => return,
                Ok(Attempt::Following { holder }) => {
                    if holder != last_holder {
                        tracing::info!(%holder, lease = %self.name, "waiting for the leader's lease to expire");
                        last_holder = holder;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "leader election failed; retrying")
                }
            }
            tokio::time::sleep(self.renew_every()).await;
        }
    }

    /// Renews until a renewal is refused or the lease runs out; returns why leadership ended.
    pub async fn keep(&self) -> String {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every()).await;
            match self.try_acquire().await {
                Ok(Attempt::Leading) => last_ok = tokio::time::Instant::now(),
                Ok(Attempt::Following { holder }) => {
                    return format!("lost the lease {} to {holder}", self.name)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the lease");
                    if last_ok.elapsed() >= self.duration {
                        return format!("could not renew the lease {} in time: {e}", self.name);
                    }
                }
            }
        }
    }
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref() else {
        return true;
    };
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match renewed
        .0
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds))
    {
        Ok(until) => until < now,
        Err(_) => false,
    }
}
