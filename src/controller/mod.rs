//! `fusevol controller`: provisions PersistentVolumes for claims of fusevol StorageClasses, in
//! the kube-rs controller shape (a [`Context`], [`reconcile`] returning an [`Action`],
//! [`error_policy`]).
//!
//! - Claims: [`reconcile`] takes a snapshot (reflector caches of PVs, `FusevolNode`s and
//!   StorageClasses, plus the in-flight [`Reservation`]s), asks the pure
//!   [`decide`](crate::k8s::provision::decide) what to do, and does it: create the PV, or
//!   remove the scheduler's `selected-node` annotation (reschedule), posting events
//!   `ProvisioningSucceeded` (after the PV is created: nothing else on that path) and
//!   `ProvisioningFailed` on the claim. A claim is reconciled when it, its class or its PV
//!   changes, and all claims when a node's room grows (at most 32 at once); the snapshot
//!   lives only for the decision, never across an API call.
//! - Bound claims that ask for more: [`expand`] grows their volume live (after a provisioning
//!   decision of `AlreadyProvisioned`), events `Resizing`, `VolumeResizeSuccessful` and
//!   `VolumeResizeFailed`.
//! - Released PVs with reclaim policy Delete: [`reconcile_pv`] deletes the object; the node's
//!   agent then deletes the data and removes the finalizer, and only then is the PV gone.
//! - [`capacity`]: the CSIDriver and CSIStorageCapacity objects the scheduler reads.
//! - [`nodes`]: cleanup after a deleted `Node` (its FusevolNode, finalizers, opted-in claims).
//! - [`leader`]: Lease-based leader election (client-go's semantics); only the leader runs
//!   the above, and it stops them before its lease could run out in the others' view.
//!
//! No decision before the caches are synced: every path that decides from the reflector
//! stores (claims, capacity publishing) first checks that each store it reads has seen its
//! first complete list ([`Context::caches_ready`]) and otherwise requeues. A store that is
//! still listing is empty or partial, and a decision on it would count a node's PVs as absent
//! and over-commit the node, right after a start or a failover.
//!
//! Restart safety: a PV's name is a function of its claim's uid, so re-running a reconcile
//! (after a restart, a missed event or a stale cache) finds the PV or gets `AlreadyExists`,
//! never a second PV. Reservations live only in the leader's memory: they cover the window
//! between a decision and the PV showing in the cache, and a new leader's cache has every PV.

pub mod capacity;
pub mod expand;
pub mod leader;
pub mod nodes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::k8s::crd::FusevolNode;
use crate::k8s::provision::{decide, is_fusevol_pv, ClusterState, Decision, Reservation};
use crate::k8s::{ANNOTATION_SELECTED_NODE, PROVISIONER};

/// Errors of one reconcile (retried by [`error_policy`]) or of the controller as a whole.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot connect to the Kubernetes API: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("leadership ended: {0}")]
    LostLeadership(String),
}

/// How the controller was started.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Namespace of the Lease and the CSIStorageCapacity objects.
    pub namespace: String,
    /// Name of the leader-election Lease.
    pub lease: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    pub listen: std::net::SocketAddr,
    /// Lease duration.
    pub lease_duration: Duration,
    /// How long a Node must stay deleted before [`nodes`] cleans up after it.
    pub node_loss_grace: Duration,
}

/// Provisioning outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// The controller's metrics: one registry per process, made once at start and kept across
/// leadership terms (a follower serves the same families, at zero), so that `/metrics` is
/// one valid OpenMetrics exposition whatever the replica's role.
pub struct ControllerMetrics {
    registry: Mutex<Registry>,
    pub outcomes: Family<OutcomeLabels, Counter>,
    pub latency: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
    pub node_loss: nodes::NodeLossMetrics,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fusevol_controller");
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this replica leads (holds the Lease)",
            leader.clone(),
        );
        let node_loss = nodes::NodeLossMetrics::register(&mut registry);
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let latency =
            Family::<OutcomeLabels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            });
        registry.register(
            "provisioning",
            "Provisioning decisions acted on, by outcome (created, rescheduled, failed)",
            outcomes.clone(),
        );
        registry.register(
            "provisioning_seconds",
            "Time from a claim's creation to the controller's action, by outcome",
            latency.clone(),
        );
        ControllerMetrics {
            registry: Mutex::new(registry),
            outcomes,
            latency,
            leader,
            node_loss,
        }
    }
}

impl ControllerMetrics {
    fn record(&self, outcome: &str, claim: &PersistentVolumeClaim) {
        let l = OutcomeLabels {
            outcome: outcome.to_string(),
        };
        self.outcomes.get_or_create(&l).inc();
        if let Some(created) = claim.metadata.creation_timestamp.as_ref() {
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(created.0);
            self.latency
                .get_or_create(&l)
                .observe(age.as_secs_f64().max(0.0));
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry.lock()).is_err() {
            out.push_str("# error encoding metrics\n");
        }
        out
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub pvs: Store<PersistentVolume>,
    pub nodes: Store<FusevolNode>,
    pub classes: Store<StorageClass>,
    /// In-flight reservations; decisions are taken under this lock (see module doc).
    pub reservations: Mutex<Vec<Reservation>>,
    pub metrics: Arc<ControllerMetrics>,
}

/// How soon a reconcile that found the caches still listing tries again (a sync also
/// triggers every claim at once).
pub const CACHE_SYNC_RETRY: Duration = Duration::from_secs(2);

/// Whether `store` has seen its first complete list (its writer got the watcher's `InitDone`).
fn store_ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

impl Context {
    /// Whether every store a decision reads (PVs, FusevolNodes, StorageClasses) is synced.
    pub fn caches_ready(&self) -> bool {
        store_ready(&self.pvs) && store_ready(&self.nodes) && store_ready(&self.classes)
    }

    /// Waits until [`caches_ready`](Self::caches_ready); an error means a store's writer is
    /// gone and the store will never be synced.
    pub async fn wait_for_caches(&self) -> Result<(), reflector::store::WriterDropped> {
        self.pvs.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.classes.wait_until_ready().await
    }

    fn snapshot_pvs(&self) -> Vec<PersistentVolume> {
        self.pvs.state().iter().map(|p| (**p).clone()).collect()
    }

    fn snapshot_nodes(&self) -> Vec<FusevolNode> {
        self.nodes.state().iter().map(|n| (**n).clone()).collect()
    }

    fn class(&self, name: &str) -> Option<Arc<StorageClass>> {
        self.classes.get(&ObjectRef::new(name))
    }

    async fn event(
        &self,
        claim: &PersistentVolumeClaim,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.publish(claim, "Provision", type_, reason, note).await
    }

    /// Posts an event about `claim` (a failure to post is logged, never an error).
    async fn publish(
        &self,
        claim: &PersistentVolumeClaim,
        action: &str,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &claim.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot post an event");
        }
    }
}

/// Creates `pv`; a PV of that name existing already counts as success (a repeated reconcile).
pub async fn create_pv(client: &Client, pv: &PersistentVolume) -> Result<Created, kube::Error> {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    match api.create(&PostParams::default(), pv).await {
        Ok(_) => Ok(Created::New),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Created::Existed),
        Err(e) => Err(e),
    }
}

/// What [`create_pv`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// The PV existed already: a reconcile triggered by the PV's own watch event before the
    /// PV cache had it, or one after a restart. Nothing to report again.
    Existed,
}

/// Asks the scheduler to pick another node: removes the claim's selected-node annotation.
pub async fn reschedule(client: &Client, claim: &PersistentVolumeClaim) -> Result<(), kube::Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &claim.namespace().unwrap_or_default());
    let patch = json!({ "metadata": { "annotations": { ANNOTATION_SELECTED_NODE: null } } });
    api.patch(
        &claim.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

/// Acts on one claim. See the module doc.
pub async fn reconcile(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.caches_ready() {
        // Every read below (class, PVs, nodes) would see a partial list.
        tracing::debug!(claim = %claim.name_any(), "caches not synced yet; requeueing");
        return Ok(Action::requeue(CACHE_SYNC_RETRY));
    }
    let class_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    let Some(class) = ctx.class(&class_name) else {
        // Not ours, or the class does not exist (yet): a class event triggers us again.
        return Ok(Action::await_change());
    };
    if class.provisioner != PROVISIONER {
        return Ok(Action::await_change());
    }
    // The snapshots live only for the decision: a reconcile waiting on the API server
    // below must not hold a copy of every PV (200 claims in flight held 160 MiB).
    let decision = {
        let pvs = ctx.snapshot_pvs();
        let nodes = ctx.snapshot_nodes();
        let mut reservations = ctx.reservations.lock();
        // Reservations whose PV is cached at the reserved size are counted as PVs now.
        reservations.retain(|r| crate::k8s::provision::pending_bytes(r, &pvs) > 0);
        let decision = decide(
            &claim,
            &class,
            &ClusterState {
                nodes: &nodes,
                pvs: &pvs,
                reservations: &reservations,
            },
        );
        if let Decision::Create { reservation, .. } = &decision {
            reservations.retain(|r| r.claim_uid != reservation.claim_uid);
            reservations.push(reservation.clone());
        }
        decision
    };
    let who = format!(
        "{}/{}",
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    );
    match decision {
        Decision::Create { pv, reservation } => {
            // The PV first, the event after: nothing but the create on the path from the
            // scheduler's choice to the PV.
            let name = pv.name_any();
            match create_pv(&ctx.client, &pv).await {
                Ok(Created::Existed) => {
                    tracing::debug!(claim = %who, pv = %name, "the PV exists already");
                    Ok(Action::await_change())
                }
                Ok(Created::New) => {
                    tracing::info!(claim = %who, pv = %name, node = %reservation.node, "provisioned");
                    ctx.metrics.record("created", &claim);
                    ctx.event(
                        &claim,
                        EventType::Normal,
                        "ProvisioningSucceeded",
                        format!(
                            "created PersistentVolume {name} on node {} (tier {})",
                            reservation.node, reservation.tier
                        ),
                    )
                    .await;
                    Ok(Action::await_change())
                }
                Err(e) => {
                    ctx.reservations
                        .lock()
                        .retain(|r| r.claim_uid != reservation.claim_uid);
                    ctx.metrics.record("failed", &claim);
                    ctx.event(
                        &claim,
                        EventType::Warning,
                        "ProvisioningFailed",
                        format!("cannot create PersistentVolume {name}: {e}"),
                    )
                    .await;
                    Err(e.into())
                }
            }
        }
        Decision::Reschedule { message } => {
            tracing::info!(claim = %who, %message, "rescheduling");
            ctx.metrics.record("rescheduled", &claim);
            ctx.event(
                &claim,
                EventType::Warning,
                "ProvisioningFailed",
                format!("{message}; asking the scheduler to pick another node"),
            )
            .await;
            reschedule(&ctx.client, &claim).await?;
            Ok(Action::await_change())
        }
        Decision::Fail { message } => {
            tracing::info!(claim = %who, %message, "cannot provision");
            ctx.metrics.record("failed", &claim);
            ctx.event(&claim, EventType::Warning, "ProvisioningFailed", message)
                .await;
            Ok(Action::requeue(Duration::from_secs(60)))
        }
        Decision::AlreadyProvisioned { .. } => expand::reconcile(&claim, &class, &ctx).await,
        Decision::Wait | Decision::Skip { .. } => Ok(Action::await_change()),
    }
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(
    claim: Arc<PersistentVolumeClaim>,
    error: &Error,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(claim = %claim.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Deletes a Released fusevol PV whose reclaim policy is Delete (the agent's finalizer keeps
/// the object until the node has deleted the data).
pub async fn reconcile_pv(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    let delete = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Delete");
    if is_fusevol_pv(&pv) && released && delete && pv.metadata.deletion_timestamp.is_none() {
        let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
        match api.delete(&pv.name_any(), &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(pv = %pv.name_any(), "released with reclaim policy Delete: deleting")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

fn error_policy_pv(pv: Arc<PersistentVolume>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(pv = %pv.name_any(), %error, "PV reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

struct Endpoints {
    metrics: Arc<ControllerMetrics>,
}

impl crate::http::Endpoints for Endpoints {
    fn health(&self) -> Result<(), String> {
        // A follower is healthy: it waits for the lease.
        Ok(())
    }
    /// Ready while running: a follower serves its metrics and waits for the lease, which
    /// is its job (a Service in front of the replicas should reach both).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// Runs the controller: waits for leadership, then provisions until SIGTERM/SIGINT (the Lease
/// is then released); a replica that loses leadership stops provisioning and waits for it
/// again. See [`leader`] for the timing.
pub async fn run(settings: Settings) -> Result<(), Error> {
    let client = Client::try_default()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let metrics = Arc::new(ControllerMetrics::default());
    let endpoints = Arc::new(Endpoints {
        metrics: metrics.clone(),
    });
    crate::http::serve(settings.listen, endpoints.clone())
        .await
        .map_err(|source| Error::Listen {
            addr: settings.listen,
            source,
        })?;
    let timing = leader::Timing::for_lease(settings.lease_duration);
    let mut election = leader::LeaderElection::new(
        client.clone(),
        &settings.namespace,
        &settings.lease,
        &settings.identity,
        timing,
    );
    // One SIGTERM listener for the whole run: a signal between the phases is not lost.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Config(format!("cannot handle SIGTERM: {e}")))?;
    tracing::info!(
        identity = %settings.identity,
        lease = ?timing.lease_duration,
        renew_deadline = ?timing.renew_deadline,
        retry_period = ?timing.retry_period,
        "waiting for leadership"
    );
    // A replica that loses leadership (its renewals failed, e.g. the API server hung)
    // stops its work and becomes a candidate again in-process, as a restarted container
    // would, without a restart that kubelet may delay by its crash-loop backoff.
    loop {
        let acquired = tokio::select! {
            _ = election.acquire() => true,
            _ = sigterm.recv() => false,
            _ = tokio::signal::ctrl_c() => false,
        };
        if !acquired {
            // An acquire cut short may have written the Lease already: hand it back if it
            // names us.
            if let Err(e) = election.release().await {
                tracing::warn!(error = %e, "cannot check the lease on shutdown");
            }
            return Ok(());
        }
        tracing::info!(identity = %settings.identity, "leading");
        metrics.leader.set(1);
        // The caches start empty and unsynced with every leadership: a decision waits
        // for them.
        let (pvs, pv_stream) = reflect::<PersistentVolume>(&client);
        let (nodes, node_stream) = reflect::<FusevolNode>(&client);
        let (classes, class_stream) = reflect::<StorageClass>(&client);
        let caches = Caches {
            pvs: pv_stream,
            nodes: node_stream,
            classes: class_stream,
        };
        let ctx = Arc::new(Context {
            client: client.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: capacity::FIELD_MANAGER.into(),
                    instance: Some(settings.identity.clone()),
                },
            ),
            pvs,
            nodes,
            classes,
            reservations: Mutex::new(Vec::new()),
            metrics: metrics.clone(),
        });
        let work = provision(
            ctx,
            caches,
            settings.namespace.clone(),
            settings.node_loss_grace,
        );
        let shutdown = async {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let ended = election.lead(work, shutdown).await;
        metrics.leader.set(0);
        match ended {
            leader::Ended::Shutdown => return Ok(()),
            leader::Ended::Lost(why) => {
                let e = Error::LostLeadership(why);
                tracing::error!(error = %e, "stopped provisioning; a candidate again");
            }
        }
    }
}

/// The reflectors behind the [`Context`]'s stores, as streams that must be polled to fill them.
struct Caches {
    pvs: BoxStream<'static, Result<PersistentVolume, watcher::Error>>,
    nodes: BoxStream<'static, Result<FusevolNode, watcher::Error>>,
    classes: BoxStream<'static, Result<StorageClass, watcher::Error>>,
}

/// A reflector for every `K` of the cluster: the store it fills, and the stream that fills it.
fn reflect<K>(client: &Client) -> (Store<K>, BoxStream<'static, Result<K, watcher::Error>>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    // No decision reads managedFields: caching them would double what every object (and
    // every decision's copy of the PV cache) takes.
    let stream = reflector::reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default())
            .modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects()
    .boxed();
    (store, stream)
}

/// Polls a reflector stream (which fills its store) until it ends, calling `touched` for each
/// object it delivers.
async fn drive<K>(
    stream: impl Stream<Item = Result<K, watcher::Error>>,
    what: &str,
    mut touched: impl FnMut(&K),
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(object) => touched(&object),
            Err(e) => tracing::warn!(error = %e, watch = what, "watch failed; retrying"),
        }
    }
}

/// Reconciles of one controller in flight at once: bounds the memory and connections a
/// burst of claims takes (each reconcile may wait on the API server).
const RECONCILE_CONCURRENCY: u16 = 32;

/// The free bytes of every node's tiers as last seen, to tell when room grew.
#[derive(Debug, Default)]
struct FreeCapacity(std::collections::HashMap<(String, String), u64>);

impl FreeCapacity {
    /// Records `node`'s tiers; true when one is new or has more free bytes than before
    /// (a claim that did not fit may fit now). Less room, or the same, is false.
    fn grew(&mut self, node: &FusevolNode) -> bool {
        let name = node.name_any();
        let mut grew = false;
        for t in node.status.iter().flat_map(|s| &s.tiers) {
            let key = (name.clone(), t.name.clone());
            match self.0.insert(key, t.free_bytes) {
                Some(before) if before >= t.free_bytes => {}
                _ => grew = true,
            }
        }
        grew
    }
}

/// Everything the leader does; dropped (cancelled) when leadership ends.
async fn provision(
    ctx: Arc<Context>,
    caches: Caches,
    namespace: String,
    node_loss_grace: Duration,
) {
    let client = ctx.client.clone();
    // A claim is reconciled when it changes, when a PV naming it changes, when its class
    // changes, when any node's capacity changes (a waiting claim may fit now), and once when
    // the caches are first synced (claims seen before that were requeued).
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let controller = Controller::new(claims, watcher::Config::default());
    let claim_store = controller.store();
    let node_loss = nodes::run(ctx.clone(), claim_store.clone(), node_loss_grace);
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded::<()>();
    let claims = controller
        .watches(
            Api::<StorageClass>::all(client.clone()),
            watcher::Config::default(),
            move |class: StorageClass| {
                let name = class.name_any();
                claim_store
                    .state()
                    .iter()
                    .filter(|c| {
                        c.spec
                            .as_ref()
                            .and_then(|s| s.storage_class_name.as_deref())
                            == Some(name.as_str())
                    })
                    .map(|c| ObjectRef::from_obj(&**c))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<PersistentVolume>::all(client.clone()),
            watcher::Config::default(),
            |pv: PersistentVolume| {
                pv.spec
                    .and_then(|s| s.claim_ref)
                    .and_then(|r| Some(ObjectRef::new(&r.name?).within(&r.namespace?)))
            },
        )
        .reconcile_all_on(trigger_rx)
        .with_config(ControllerConfig::default().concurrency(RECONCILE_CONCURRENCY))
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "claim reconcile");
            }
        });

    let released = Controller::new(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(ControllerConfig::default().concurrency(RECONCILE_CONCURRENCY))
    .run(reconcile_pv, error_policy_pv, ctx.clone())
    .for_each(|_| async {});

    let node_trigger = trigger_tx.clone();
    let mut free = FreeCapacity::default();
    let synced = {
        let ctx = ctx.clone();
        async move {
            match ctx.wait_for_caches().await {
                Ok(()) => {
                    tracing::info!("caches synced: deciding from now on");
                    let _ = trigger_tx.unbounded_send(());
                }
                Err(e) => tracing::warn!(error = %e, "a cache will never sync; deciding nothing"),
            }
        }
    };
    let csi_driver = async {
        if let Err(e) = capacity::ensure_csi_driver(&client).await {
            tracing::warn!(error = %e, "cannot apply the CSIDriver object; the scheduler will not see fusevol's capacity");
        }
    };
    let background = futures::future::join5(
        drive(caches.pvs, "PersistentVolumes", |_| {}),
        drive(caches.nodes, "FusevolNodes", move |node| {
            // Only room that grew can make a waiting claim fit: a burst of provisioning
            // (allocations growing on every node) must not re-queue every claim each time.
            if free.grew(node) {
                let _ = node_trigger.unbounded_send(());
            }
        }),
        drive(caches.classes, "StorageClasses", |_| {}),
        synced,
        csi_driver,
    );

    tokio::select! {
        _ = claims => {}
        _ = released => {}
        _ = publish_capacity(ctx.clone(), namespace) => {}
        _ = node_loss => {}
        _ = background => {}
    }
}

/// Keeps the CSIStorageCapacity objects in line with the caches, every few seconds.
async fn publish_capacity(ctx: Arc<Context>, namespace: String) {
    let resource = capacity::discover(&ctx.client).await;
    let Some(resource) = resource else {
        tracing::warn!("the API server serves no CSIStorageCapacity version (Kubernetes 1.20 needs --feature-gates=CSIStorageCapacity=true --runtime-config=storage.k8s.io/v1alpha1=true): the scheduler will not see fusevol's capacity; full nodes are still refused by rescheduling");
        return std::future::pending().await;
    };
    tracing::info!(version = %resource.version, "publishing CSIStorageCapacity");
    if let Err(e) = ctx.wait_for_caches().await {
        tracing::warn!(error = %e, "a cache will never sync; publishing no capacity");
        return std::future::pending().await;
    }
    let mut last = BTreeMap::new();
    loop {
        publish_capacity_round(&ctx, &resource, &namespace, &mut last).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// One round of [`publish_capacity`]; publishes nothing (and returns false) while a cache it
/// reads is not synced, since free bytes from a partial PV list would overstate every node.
async fn publish_capacity_round(
    ctx: &Context,
    resource: &kube::api::ApiResource,
    namespace: &str,
    last: &mut BTreeMap<String, capacity::CapacityEntry>,
) -> bool {
    if !ctx.caches_ready() {
        return false;
    }
    let pvs = ctx.snapshot_pvs();
    let nodes = ctx.snapshot_nodes();
    let classes: Vec<StorageClass> = ctx.classes.state().iter().map(|c| (**c).clone()).collect();
    let want = {
        let reservations = ctx.reservations.lock();
        capacity::desired(
            &classes,
            &ClusterState {
                nodes: &nodes,
                pvs: &pvs,
                reservations: &reservations,
            },
        )
    };
    match capacity::publish(&ctx.client, resource, namespace, &want, last).await {
        Ok(now) => *last = now,
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish CSIStorageCapacity");
            last.clear();
        }
    }
    true
}

#[cfg(test)]
mod tests;
