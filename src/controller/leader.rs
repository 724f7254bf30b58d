//! Leader election on a `coordination.k8s.io/v1` Lease, so that of the controller's replicas
//! exactly one provisions at a time. The semantics are client-go's `leaderelection` package
//! (what kube-controller-manager and kube-scheduler run), reproduced here:
//!
//! - **Expiry is judged by the candidate's own monotonic clock, never by the holder's
//!   `renewTime`.** A candidate remembers the Lease's record (holder, renew and acquire time,
//!   duration, transitions) and the local [`Instant`] at which it last saw that record
//!   *change*; it may take the Lease over only when `leaseDurationSeconds` of local time have
//!   passed since then without a change. Wall clocks of different nodes may disagree by any
//!   amount; a holder that keeps renewing keeps its Lease however old its `renewTime` looks.
//! - **The leader gives up before anyone can take over.** It renews every
//!   [`Timing::retry_period`]; when no renewal has succeeded for [`Timing::renew_deadline`]
//!   (< the lease duration) since the start of the last successful one, it stops leading. A
//!   candidate's clock for the same record starts no earlier than the write it observed, so the
//!   old leader has stopped at least `lease duration − renew deadline` before a new one starts.
//! - **Every API call has a timeout** ([`Timing::call_timeout`], half the renew deadline, as
//!   client-go's `NewFromKubeconfig` sets), and a renewal round is cut off at the renew
//!   deadline as a whole: a hung API server cannot keep a leader leading.
//! - **Work stops with leadership.** [`LeaderElection::lead`] runs the reconcilers as a future
//!   and drops it (cancelling every reconcile at its next await) the moment leadership ends.
//! - **The Lease is released on shutdown** (client-go's `ReleaseOnCancel`): after the work has
//!   stopped, the leader writes `holderIdentity: ""`, `leaseDurationSeconds: 1` and fresh
//!   renew/acquire times, so a replacement takes over at its next retry instead of waiting out
//!   the lease.
//!
//! Every write is an update carrying the `resourceVersion` just read, so two candidates racing
//! for one Lease cannot both win: the API server refuses the second with a conflict.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;

/// Durations of the election. client-go's defaults (kube-controller-manager's flags) are
/// 15 s lease, 10 s renew deadline, 2 s retry period; [`Timing::for_lease`] keeps those
/// proportions for any lease duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a candidate waits, by its own clock, after the Lease last changed.
    pub lease_duration: Duration,
    /// How long the leader may go without a successful renewal before it stops leading.
    pub renew_deadline: Duration,
    /// Pause between attempts, for the leader and the candidates alike.
    pub retry_period: Duration,
    /// Upper bound of each API call.
    pub call_timeout: Duration,
}

impl Timing {
    /// Renew deadline 2/3 and retry period 2/15 of the lease duration (15 s → 10 s and 2 s);
    /// each call bounded by max(renew deadline / 2, 1 s), never more than the renew deadline.
    pub fn for_lease(lease_duration: Duration) -> Timing {
        let renew_deadline = lease_duration * 2 / 3;
        Timing {
            lease_duration,
            renew_deadline,
            retry_period: lease_duration * 2 / 15,
            call_timeout: (renew_deadline / 2)
                .max(Duration::from_secs(1))
                .min(renew_deadline),
        }
    }

    /// The lease duration as written to the Lease: whole seconds, rounded up, so that the
    /// duration others wait is never shorter than the one this replica's deadline assumes.
    fn lease_seconds(&self) -> i32 {
        let d = self.lease_duration;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }
}

/// Why an attempt did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Leading,
    /// Another replica holds it and, by our clock, its lease has not run out.
    Following { holder: String },
    /// Our write lost a race (conflict): someone else wrote the Lease since we read it.
    Raced,
}

/// How [`LeaderElection::lead`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was asked for, or the work finished; the Lease was handed back (if we could).
    Shutdown,
    /// Leadership was lost: refused, taken over, or not renewed within the renew deadline.
    Lost(String),
}

/// The leader-election record of a Lease (client-go's `LeaderElectionRecord`): what must
/// change for a candidate to consider the holder alive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: String,
    lease_duration_seconds: Option<i32>,
    acquire_time: Option<Timestamp>,
    renew_time: Option<Timestamp>,
    transitions: i32,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            lease_duration_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// The last record seen and when, by the local monotonic clock, it was first seen.
#[derive(Debug, Clone)]
struct Observed {
    record: Record,
    at: Instant,
}

/// A replica's view of one Lease.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Option<Observed>,
    /// Start of the last attempt that wrote the Lease as ours (None: not leading).
    renewed_at: Option<Instant>,
}

impl LeaderElection {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: None,
            renewed_at: None,
        }
    }

    /// Runs `call` with [`Timing::call_timeout`].
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.timing.call_timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(Error::Timeout(self.timing.call_timeout)),
        }
    }

    /// Remembers `record`; the observation clock restarts only when the record changed.
    fn observe(&mut self, record: Record, now: Instant) {
        if self.observed.as_ref().map(|o| &o.record) != Some(&record) {
            self.observed = Some(Observed { record, at: now });
        }
    }

    /// Whether the observed holder's lease still runs at `now`, by our clock: less than its
    /// `leaseDurationSeconds` (ours, when the Lease names none) since the record last changed.
    fn observed_valid(&self, now: Instant) -> bool {
        let Some(o) = &self.observed else {
            return false;
        };
        let seconds = o
            .record
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map_or(self.timing.lease_duration, |s| {
                Duration::from_secs(s.unsigned_abs().into())
            });
        o.at + seconds > now
    }

    /// One attempt to acquire or renew the Lease (client-go's `tryAcquireOrRenew`).
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, Error> {
        let started = Instant::now();
        let now = Timestamp::now();
        let seconds = self.timing.lease_seconds();
        let Some(mut lease) = self.call(self.api.get_opt(&self.name)).await? else {
            let spec = LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(spec.clone()),
            };
            return match self
                .call(self.api.create(&PostParams::default(), &lease))
                .await
            {
                Ok(_) => {
                    self.observe(Record::of(&spec), started);
                    self.renewed_at = Some(started);
                    Ok(Attempt::Leading)
                }
                Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(Attempt::Raced),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let record = Record::of(spec);
        let ours = record.holder == self.identity;
        // Another holder's record may have been written while the GET was in flight: its
        // expiry clock starts when the answer arrived (client-go's observedTime), never
        // earlier. Our own record keeps the earlier start, so we give up sooner, not later.
        let seen = Instant::now();
        self.observe(record.clone(), if ours { started } else { seen });
        if !ours && !record.holder.is_empty() && self.observed_valid(seen) {
            return Ok(Attempt::Following {
                holder: record.holder,
            });
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(record.transitions.saturating_add(1));
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        let written = Record::of(spec);
        // `lease` still carries the resourceVersion read above: a concurrent writer wins.
        match self
            .call(self.api.replace(&self.name, &PostParams::default(), &lease))
            .await
        {
            Ok(_) => {
                self.observe(written, started);
                self.renewed_at = Some(started);
                Ok(Attempt::Leading)
            }
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(Attempt::Raced),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads, trying every retry period.
    pub async fn acquire(&mut self) {
        let mut last_holder = String::new();
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => return,
                Ok(Attempt::Following { holder }) => {
                    if holder != last_holder {
                        tracing::info!(%holder, lease = %self.name, "another replica leads; waiting until its lease goes unrenewed for a lease duration");
                        last_holder = holder;
                    }
                }
                Ok(Attempt::Raced) => {
                    tracing::debug!(lease = %self.name, "another replica wrote the lease first")
                }
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "leader election failed; retrying")
                }
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews every retry period until leadership ends; returns why. Leadership ends when
    /// another holder shows in the Lease, or when no renewal has succeeded for the renew
    /// deadline since the start of the last successful one: the return comes at that deadline
    /// at the latest, however the API server behaves.
    pub async fn keep(&mut self) -> String {
        loop {
            let Some(renewed_at) = self.renewed_at else {
                return format!("not holding the lease {}", self.name);
            };
            let deadline = renewed_at + self.timing.renew_deadline;
            tokio::time::sleep_until((Instant::now() + self.timing.retry_period).min(deadline))
                .await;
            let started = Instant::now();
            if started >= deadline {
                self.renewed_at = None;
                return format!(
                    "could not renew the lease {} within the renew deadline of {:?}",
                    self.name, self.timing.renew_deadline
                );
            }
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Leading)) => {}
                Ok(Ok(Attempt::Following { holder })) => {
                    self.renewed_at = None;
                    return format!("lost the lease {} to {holder}", self.name);
                }
                Ok(Ok(Attempt::Raced)) => {
                    tracing::warn!(lease = %self.name, "the lease changed under the renewal; retrying")
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.name, "cannot renew the lease")
                }
                Err(_) => {
                    self.renewed_at = None;
                    return format!(
                        "the renewal of the lease {} did not finish within the renew deadline of {:?}",
                        self.name, self.timing.renew_deadline
                    );
                }
            }
        }
    }

    /// Hands the Lease back if it names us (client-go's `release`): reads it for a current
    /// resourceVersion, then writes an empty holder and a one-second duration. Bounded by the
    /// renew deadline as a whole. Returns whether it wrote.
    pub async fn release(&mut self) -> Result<bool, Error> {
        let deadline = self.timing.renew_deadline;
        match tokio::time::timeout(deadline, self.write_release()).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(deadline)),
        }
    }

    async fn write_release(&mut self) -> Result<bool, Error> {
        self.renewed_at = None;
        let Some(mut lease) = self.call(self.api.get_opt(&self.name)).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let now = Timestamp::now();
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(MicroTime(now));
        spec.renew_time = Some(MicroTime(now));
        self.call(self.api.replace(&self.name, &PostParams::default(), &lease))
            .await?;
        Ok(true)
    }

    /// Runs `work` while this replica leads (call after [`acquire`](Self::acquire)). `work`
    /// is dropped, which cancels it, as soon as leadership is lost or `shutdown` resolves;
    /// on shutdown (or when `work` finishes by itself) the Lease is then released.
    pub async fn lead(
        &mut self,
        work: impl Future<Output = ()>,
        shutdown: impl Future<Output = ()>,
    ) -> Ended {
        let mut work = Box::pin(work);
        let ended = tokio::select! {
            why = self.keep() => Ended::Lost(why),
            _ = shutdown => Ended::Shutdown,
            _ = &mut work => Ended::Shutdown,
        };
        // The work stops before the Lease can change hands.
        drop(work);
        if ended == Ended::Shutdown {
            match self.release().await {
                Ok(true) => tracing::info!(lease = %self.name, "released the lease"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "cannot release the lease; the next leader waits for it to run out")
                }
            }
        }
        ended
    }
}
