//! Nodes that go away: when a `Node` object is deleted, the leader cleans up what fusevol
//! keeps for it, as [`node_loss`](crate::k8s::node_loss) decides (its module doc says what and
//! why deletion, not NotReady, is the trigger).
//!
//! Owns the controller's one `Node` reflector (used by nothing else) and reads the shared
//! caches of the [`Context`] plus the claims controller's claim cache. Every [`SWEEP`] it
//! computes the nodes that fusevol objects name without a `Node` object; a node missing for
//! the grace period (`--node-loss-grace`) is [`reconcile`]d: the Node is read from the API
//! server once more (a node that re-registered is left alone and its grace period restarts),
//! then its PVs' data-cleanup finalizers are removed, opted-in claims deleted and its
//! `FusevolNode` deleted, each guarded (a JSON patch that tests the finalizer entry, delete
//! preconditions on the uid) and each announced by an event. The capacity the controller
//! publishes for the node ends with its `FusevolNode`: the capacity publisher deletes every
//! CSIStorageCapacity that no FusevolNode backs any more.
//!
//! A sweep and not a kube-runtime `Controller`: the object that triggers the work is the one
//! that is gone, and the runtime reconciles only objects its cache holds. Level-triggered all
//! the same: a restart or a new leader recomputes everything from its caches (a missing node's
//! grace period starts again with each leadership, which only delays the cleanup).
//!
//! Nothing is decided before every cache read is synced ([`NodeLoss::ready`]): at start an
//! empty Node cache would make every node look gone.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::Resource;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{drive, reflect, store_ready, Context, ControllerMetrics, Error};
use crate::k8s::crd::FusevolNode;
use crate::k8s::node_loss::{
    cleanup, missing_nodes, ClaimDeletion, GoneSince, KeptVolume, OptIn, Snapshot,
};
use crate::k8s::{ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS, FINALIZER_DATA_CLEANUP};

/// How often the missing nodes are recomputed.
pub const SWEEP: Duration = Duration::from_secs(5);

/// Default of `--node-loss-grace`: how long a Node must stay deleted before the cleanup.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Node-loss action label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
}

/// Counters of the node-loss cleanup, in the controller's registry.
#[derive(Clone)]
pub struct NodeLossMetrics {
    pub actions: Family<ActionLabels, Counter>,
    pub failures: Counter,
}

impl NodeLossMetrics {
    /// Registers the counters (once per process: see [`ControllerMetrics`]).
    pub(super) fn register(registry: &mut Registry) -> Self {
        let actions = Family::<ActionLabels, Counter>::default();
        let failures = Counter::default();
        registry.register(
            "node_loss_actions",
            "Cleanups for gone nodes, by action (finalizer_removed, claim_deleted, fusevolnode_deleted)",
            actions.clone(),
        );
        registry.register(
            "node_loss_failures",
            "Failed node-loss reconciles (retried at the next sweep)",
            failures.clone(),
        );
        NodeLossMetrics { actions, failures }
    }

    fn count(&self, action: &str) {
        self.actions
            .get_or_create(&ActionLabels {
                action: action.into(),
            })
            .inc();
    }
}

/// What the node-loss sweep keeps besides the shared [`Context`].
pub struct NodeLoss {
    pub nodes: Store<Node>,
    pub claims: Store<PersistentVolumeClaim>,
    pub grace: Duration,
    gone: Mutex<GoneSince>,
    /// Uids of the claims told that their PV's node is gone (told once per leadership).
    told: Mutex<BTreeSet<String>>,
    pub metrics: NodeLossMetrics,
}

/// What a [`reconcile`] of a missing node did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to write (only Bound PVs that keep their claim, already told).
    Nothing,
    /// The API server has the Node again: left alone.
    Returned,
    /// Cleaned up: how many finalizers removed, claims deleted, and whether the FusevolNode.
    Cleaned {
        finalizers: usize,
        claims: usize,
        fusevol_node: bool,
    },
}

impl NodeLoss {
    pub fn new(
        nodes: Store<Node>,
        claims: Store<PersistentVolumeClaim>,
        grace: Duration,
        metrics: &ControllerMetrics,
    ) -> Self {
        NodeLoss {
            nodes,
            claims,
            grace,
            gone: Mutex::new(GoneSince::default()),
            told: Mutex::new(BTreeSet::new()),
            metrics: metrics.node_loss.clone(),
        }
    }

    /// Whether every cache a decision reads is synced (the shared ones, Nodes and claims).
    pub fn ready(&self, ctx: &Context) -> bool {
        ctx.caches_ready() && store_ready(&self.nodes) && store_ready(&self.claims)
    }
}

/// Copies of the cached objects a decision reads.
struct Objects {
    nodes: Vec<Node>,
    fusevol_nodes: Vec<FusevolNode>,
    pvs: Vec<PersistentVolume>,
    claims: Vec<PersistentVolumeClaim>,
    classes: Vec<k8s_openapi::api::storage::v1::StorageClass>,
}

impl Objects {
    fn read(ctx: &Context, loss: &NodeLoss) -> Self {
        fn all<K: Clone>(s: Vec<Arc<K>>) -> Vec<K> {
            s.iter().map(|o| (**o).clone()).collect()
        }
        Objects {
            nodes: all(loss.nodes.state()),
            fusevol_nodes: ctx.snapshot_nodes(),
            pvs: ctx.snapshot_pvs(),
            claims: all(loss.claims.state()),
            classes: all(ctx.classes.state()),
        }
    }

    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            nodes: &self.nodes,
            fusevol_nodes: &self.fusevol_nodes,
            pvs: &self.pvs,
            claims: &self.claims,
            classes: &self.classes,
        }
    }
}

/// Runs the node-loss cleanup until dropped (with leadership): the Node reflector, and a
/// sweep every [`SWEEP`].
pub async fn run(ctx: Arc<Context>, claims: Store<PersistentVolumeClaim>, grace: Duration) {
    let (nodes, stream) = reflect::<Node>(&ctx.client);
    let loss = NodeLoss::new(nodes, claims, grace, &ctx.metrics);
    tracing::info!(grace = ?grace, "cleaning up after deleted nodes");
    let sweeps = async {
        loop {
            sweep(&ctx, &loss).await;
            tokio::time::sleep(SWEEP).await;
        }
    };
    futures::future::join(drive(stream, "Nodes", |_| {}), sweeps).await;
}

/// One sweep: reconciles every node missing for the grace period. `None` while a cache is
/// not synced (nothing decided, no grace period started).
pub async fn sweep(ctx: &Context, loss: &NodeLoss) -> Option<Vec<(String, Outcome)>> {
    if !loss.ready(ctx) {
        return None;
    }
    let missing = missing_nodes(&Objects::read(ctx, loss).snapshot());
    let now = tokio::time::Instant::now().into_std();
    let due = loss.gone.lock().observe(&missing, now, loss.grace);
    let mut done = Vec::new();
    for node in due {
        match reconcile(&node, ctx, loss).await {
            Ok(outcome) => done.push((node, outcome)),
            Err(e) => error_policy(&node, &e, loss),
        }
    }
    Some(done)
}

/// Logs and counts a failed reconcile; the next sweep tries again.
pub fn error_policy(node: &str, error: &Error, loss: &NodeLoss) {
    loss.metrics.failures.inc();
    tracing::warn!(%node, %error, "node-loss cleanup failed; retrying at the next sweep");
}

/// Cleans up after `node`, missing from the Node cache for the grace period.
pub async fn reconcile(node: &str, ctx: &Context, loss: &NodeLoss) -> Result<Outcome, Error> {
    let plan = cleanup(node, &Objects::read(ctx, loss).snapshot());
    let untold: Vec<&KeptVolume> = {
        let told = loss.told.lock();
        plan.kept
            .iter()
            .filter(|k| !told.contains(&k.claim_uid))
            .collect()
    };
    if !plan.acts() && untold.is_empty() {
        return Ok(Outcome::Nothing);
    }
    if node_exists(ctx, node).await? {
        tracing::info!(%node, "the Node is back (re-registered): nothing cleaned up");
        loss.gone.lock().forget(node);
        return Ok(Outcome::Returned);
    }
    let mut first_error = None;
    let mut note = |r: Result<bool, kube::Error>| match r {
        Ok(done) => done,
        Err(e) => {
            first_error.get_or_insert(e);
            false
        }
    };
    let mut finalizers = 0;
    for pv in &plan.finalizers {
        finalizers += usize::from(note(release_finalizer(ctx, loss, node, pv).await));
    }
    let mut claims = 0;
    for d in &plan.claims {
        claims += usize::from(note(delete_claim(ctx, loss, node, d).await));
    }
    for k in untold {
        tell_kept(ctx, node, k).await;
        loss.told.lock().insert(k.claim_uid.clone());
    }
    let fusevol_node = match &plan.fusevol_node {
        Some((name, uid)) => note(delete_fusevol_node(ctx, loss, name, uid).await),
        None => false,
    };
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(Outcome::Cleaned {
            finalizers,
            claims,
            fusevol_node,
        }),
    }
}

/// Whether the API server has a Node named `node` (read now, not from the cache).
async fn node_exists(ctx: &Context, node: &str) -> Result<bool, kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    Ok(api.get_opt(node).await?.is_some())
}

/// Removes the data-cleanup finalizer of PV `name` (the agent's guarded JSON patch), then
/// says so in an event on the PV. `Ok(false)`: the PV is not cached any more.
async fn release_finalizer(
    ctx: &Context,
    loss: &NodeLoss,
    node: &str,
    name: &str,
) -> Result<bool, kube::Error> {
    let Some(pv) = ctx.pvs.get(&ObjectRef::new(name)) else {
        return Ok(false);
    };
    crate::agent::remove_finalizer(&ctx.client, &pv).await?;
    tracing::info!(%node, pv = %name, "node gone: removed the data-cleanup finalizer");
    loss.metrics.count("finalizer_removed");
    // PVs are cluster-scoped: their events live in `default`, as the agent's do.
    let mut reference = pv.object_ref(&());
    reference.namespace = Some("default".into());
    let note = format!(
        "node {node} is gone (its Node object was deleted): the volume's data went with it; \
         removed finalizer {FINALIZER_DATA_CLEANUP} so that the PV can be deleted"
    );
    publish(ctx, &reference, "DataGoneWithNode", note).await;
    Ok(true)
}

/// Deletes an opted-in claim (only the object of uid `d.uid`), then says so in an event.
/// `Ok(false)`: it was gone or replaced already.
async fn delete_claim(
    ctx: &Context,
    loss: &NodeLoss,
    node: &str,
    d: &ClaimDeletion,
) -> Result<bool, kube::Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &d.namespace);
    if !deleted(api.delete(&d.name, &delete_uid(&d.uid)).await)? {
        return Ok(false);
    }
    tracing::info!(%node, claim = %format!("{}/{}", d.namespace, d.name), pv = %d.pv,
        "node gone: deleted the opted-in claim");
    loss.metrics.count("claim_deleted");
    let by = match &d.opted_in {
        OptIn::Claim => "the claim".to_string(),
        OptIn::Class(class) => format!("its StorageClass {class}"),
    };
    let note = format!(
        "node {node} is gone (its Node object was deleted) and {by} has \
         {ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS}=true: deleted the claim, whose PV {} and data \
         were on that node; a new claim of this name gets a fresh volume",
        d.pv
    );
    publish(
        ctx,
        &claim_ref(&d.namespace, &d.name, &d.uid),
        "ClaimDeletedOnNodeLoss",
        note,
    )
    .await;
    Ok(true)
}

/// Tells the claim of a Bound PV on a gone node that it keeps its PV, and what to do.
async fn tell_kept(ctx: &Context, node: &str, k: &KeptVolume) {
    let note = format!(
        "PV {} is on node {node}, which is gone (its Node object was deleted): the claim keeps \
         it, and a pod using it cannot start elsewhere. Delete the claim for a fresh volume, or \
         annotate it (or its StorageClass) {ANNOTATION_DELETE_CLAIM_ON_NODE_LOSS}=true to have \
         the controller do it",
        k.pv
    );
    let reference = claim_ref(&k.namespace, &k.claim, &k.claim_uid);
    publish(ctx, &reference, "VolumeOnGoneNode", note).await;
}

/// Deletes the `FusevolNode` of uid `uid` (not one a re-registered agent created since).
async fn delete_fusevol_node(
    ctx: &Context,
    loss: &NodeLoss,
    name: &str,
    uid: &str,
) -> Result<bool, kube::Error> {
    let api: Api<FusevolNode> = Api::all(ctx.client.clone());
    if !deleted(api.delete(name, &delete_uid(uid)).await)? {
        return Ok(false);
    }
    tracing::info!(node = %name, "node gone: deleted its FusevolNode");
    loss.metrics.count("fusevolnode_deleted");
    Ok(true)
}

/// Delete options that match only the object of `uid`.
fn delete_uid(uid: &str) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

/// A delete's result: `true` deleted, `false` gone already (404) or replaced by an object of
/// another uid (409: the precondition failed).
fn deleted<T>(r: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn claim_ref(namespace: &str, name: &str, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid: Some(uid.into()),
        ..ObjectReference::default()
    }
}

async fn publish(ctx: &Context, reference: &ObjectReference, reason: &str, note: String) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "NodeLoss".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, "cannot post an event");
    }
}

#[cfg(test)]
mod tests;
