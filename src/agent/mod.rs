//! `fusevol agent`: the node agent (a DaemonSet, one per node).
//!
//! - [`config`]: the TOML configuration.
//! - [`volumes`]: the node-local half (stores, mounts, data cleanup), blocking and API-free.
//! - [`static_pvs`]: the PVs the agent keeps published in static-provisioner mode.
//! - this module: the API side. It registers the node's [`FusevolNode`], watches every
//!   PersistentVolume (a reflector cache), and on each change (and every
//!   [`RESYNC`]) brings the node in line with the PVs pinned to it: level-triggered, so a
//!   restart or a missed event is repaired by the next round. Then it removes the
//!   data-cleanup finalizer of PVs whose data is gone, confirms the quotas its mounts enforce
//!   ([`applied_quota`], for volume expansion), keeps the static PVs published and refreshes
//!   the capacity in the `FusevolNode` status.
//! - [`reload`]: a changed configuration file applies its tiers and disks at once.

mod applied_quota;
pub mod config;
mod keys;
mod local_state;
mod reload;
pub mod static_pvs;
pub mod volumes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde_json::json;

use self::config::AgentConfig;
use self::volumes::{plan, VolumeManager};
use crate::fdstore::FdStore;
use crate::k8s::crd::{FusevolNode, FusevolNodeSpec, FusevolNodeStatus};
use crate::k8s::{ANNOTATION_NODE, FINALIZER_DATA_CLEANUP, LABEL_HOSTNAME};
use crate::metrics::Metrics;

/// The field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "fusevol-agent";

/// How often the agent re-checks everything even without a change.
pub const RESYNC: Duration = Duration::from_secs(10);

/// Errors that stop the agent (per-volume errors are retried and reported as events).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Volumes(#[from] volumes::VolumeError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot connect to the Kubernetes API: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("control socket of {disk}: {source}")]
    Control {
        disk: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Join(String),
}

/// Registers the node: creates or updates its `FusevolNode` spec (server-side apply).
pub async fn register(client: &Client, spec: &FusevolNodeSpec) -> Result<FusevolNode, kube::Error> {
    let api: Api<FusevolNode> = Api::all(client.clone());
    let body = json!({
        "apiVersion": FusevolNode::api_version(&()),
        "kind": FusevolNode::kind(&()),
        "metadata": { "name": spec.node_name },
        "spec": spec,
    });
    api.patch(
        &spec.node_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
}

/// Publishes the node's capacity in the `FusevolNode` status subresource.
pub async fn publish_status(
    client: &Client,
    node: &str,
    status: &FusevolNodeStatus,
) -> Result<FusevolNode, kube::Error> {
    let api: Api<FusevolNode> = Api::all(client.clone());
    api.patch_status(
        node,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await
}

/// Removes the data-cleanup finalizer from `pv` (a JSON patch that first tests the entry, so
/// a concurrent change of the list makes it fail instead of removing another finalizer).
/// Does nothing when the PV has no such finalizer.
pub async fn remove_finalizer(client: &Client, pv: &PersistentVolume) -> Result<(), kube::Error> {
    let Some(index) = pv
        .finalizers()
        .iter()
        .position(|f| f == FINALIZER_DATA_CLEANUP)
    else {
        return Ok(());
    };
    let api: Api<PersistentVolume> = Api::all(client.clone());
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "test", "path": path, "value": FINALIZER_DATA_CLEANUP },
        { "op": "remove", "path": path },
    ]))
    .map_err(kube::Error::SerdeError)?;
    match api
        .patch(
            &pv.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The node's `kubernetes.io/hostname` label (its name when the label or the Node is missing).
pub async fn node_hostname(client: &Client, node: &str) -> String {
    let api: Api<Node> = Api::all(client.clone());
    match api.get_opt(node).await {
        Ok(Some(n)) => n
            .labels()
            .get(LABEL_HOSTNAME)
            .cloned()
            .unwrap_or_else(|| node.to_string()),
        Ok(None) => {
            tracing::warn!(
                node,
                "no Node object of that name; using it as the hostname"
            );
            node.to_string()
        }
        Err(e) => {
            tracing::warn!(node, error = %e, "cannot read the Node; using its name as the hostname");
            node.to_string()
        }
    }
}

/// The agent's own health, never the API server's: its volume loop runs (it wakes at
/// least every [`RESYNC`], API or not) and no blocking volume operation hangs. A hung or
/// unreachable API server must not fail the liveness probe: the restart it causes would end
/// every FUSE mount on the node.
struct Health {
    /// When the volume loop last started a round.
    last_tick: Mutex<Option<Instant>>,
    /// Since when a blocking volume operation (mount, unmount, delete) has been running.
    busy_since: Mutex<Option<Instant>>,
    /// A first round with the complete list of PVs has been applied: every volume of this
    /// node that should be served is (or has reported why not).
    synced: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
}

/// A volume operation running longer than this makes the agent unhealthy.
const STUCK_AFTER: Duration = Duration::from_secs(300);

impl crate::http::Endpoints for Health {
    fn health(&self) -> Result<(), String> {
        // A long round (unmounts waiting for pods, a large delete, a recount) is work, not
        // a hang: healthy until it has run for STUCK_AFTER.
        if let Some(t) = *self.busy_since.lock() {
            if t.elapsed() > STUCK_AFTER {
                return Err(format!(
                    "a volume operation has been running for {}s",
                    t.elapsed().as_secs()
                ));
            }
            return Ok(());
        }
        match *self.last_tick.lock() {
            Some(t) if t.elapsed() < RESYNC * 6 => Ok(()),
            Some(t) => Err(format!(
                "the volume loop last ran {}s ago",
                t.elapsed().as_secs()
            )),
            None => Err("starting: serving the volumes of the last run".into()),
        }
    }
    /// Ready once a round with the complete list of PVs has been applied (the volumes of
    /// the last run are served before that, from local state), and while healthy.
    fn ready(&self) -> Result<(), String> {
        if !self.synced.load(std::sync::atomic::Ordering::Acquire) {
            return Err(
                "waiting for the first complete list of PVs from the API server".to_string(),
            );
        }
        crate::http::Endpoints::health(self)
    }
    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// Every API call but the watch is cut off after this: a hung API server delays the API
/// side (events, finalizers, status), never the volumes.
pub const API_TIMEOUT: Duration = Duration::from_secs(15);
/// Server-side limit of one watch call; kube's watcher treats a watch silent for this
/// plus 5 s as dead and starts a new one.
const WATCH_TIMEOUT_SECS: u32 = 60;

/// Runs `call` with [`API_TIMEOUT`]; `what` names it in the error.
async fn api_call<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer from the API server in {}s",
            API_TIMEOUT.as_secs()
        )),
    }
}

/// A client whose connections time out: kube's defaults wait forever.
async fn client() -> Result<Client, AgentError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?;
    config.connect_timeout = Some(Duration::from_secs(10));
    config.write_timeout = Some(API_TIMEOUT);
    Client::try_from(config).map_err(|e| AgentError::Config(e.to_string()))
}

/// The agent watches only the PVs of its own node: those carry the label
/// `local.fusevol.io/node=<node>` (set by the controller and the static mode). A node whose
/// name is no valid label value (longer than 63 characters) has no such label: its agent
/// watches every PV and the plan picks its own by annotation.
fn pv_watch_config(node: &str) -> watcher::Config {
    let config = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
    if crate::k8s::is_label_value(node) {
        config.labels(&format!("{ANNOTATION_NODE}={node}"))
    } else {
        config
    }
}

/// What one round of the volume loop hands to the API side.
#[derive(Clone, Default)]
struct Round {
    all: Arc<Vec<PersistentVolume>>,
    cleaned: Vec<String>,
    /// PV -> error message of the volumes that failed this round.
    failing: BTreeMap<String, String>,
    capacity: Vec<crate::k8s::crd::TierStatus>,
    /// PV -> the quota its mount enforces.
    applied: BTreeMap<String, u64>,
}

/// Runs the agent until SIGTERM/SIGINT; then unmounts its volumes (data stays) and returns.
///
/// Two loops: the volume loop (this task) serves what the PVs ask for, and never waits for
/// the API server beyond reading its reflector cache; the API side (a task of its own)
/// registers the node, removes finalizers, posts events and publishes capacity, each call
/// with a timeout. At start, before the API is reached, the volumes of the last run are
/// served again from local state.
pub async fn run(
    base: AgentConfig,
    config_source: Option<(std::path::PathBuf, String)>,
    fdstore: Option<FdStore>,
) -> Result<(), AgentError> {
    // Before any disk is opened: which ones are this node's may depend on its labels.
    let (config, labels) = labelled(&base).await?;
    let metrics = Arc::new(Metrics::new());
    let tier_metrics = TierMetrics::register(&metrics);
    crate::wake::apply(config.fuse_wake_here);
    let node = config.node_name.clone();
    let handover = Arc::new(tokio::sync::Notify::new());
    let (fdstore, handed_over) = match fdstore {
        Some(holder) => {
            let (root, handover) = (config.root.clone(), handover.clone());
            tokio::task::spawn_blocking(move || claim_from_holder(holder, &root, handover))
                .await
                .map_err(|e| AgentError::Join(e.to_string()))?
        }
        None => (None, false),
    };
    let manager = {
        let (config, metrics) = (config.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || {
            let mut m = crate::mount::after_hand_over(
                handed_over,
                |e| {
                    matches!(
                        e,
                        volumes::VolumeError::Store {
                            source: crate::store::Error::Locked(_),
                            ..
                        }
                    )
                },
                || VolumeManager::open(&config, metrics.clone()),
            )?;
            m.set_fdstore(fdstore);
            Ok::<_, volumes::VolumeError>(m)
        })
        .await
        .map_err(|e| AgentError::Join(e.to_string()))??
    };
    for store in manager.stores() {
        let disk = store.dir().display().to_string();
        crate::control::serve(store, metrics.clone())
            .map_err(|source| AgentError::Control { disk, source })?;
    }
    let manager = Arc::new(Mutex::new(manager));
    // Starting counts as busy: serving the last run's volumes may take a while.
    let health = Arc::new(Health {
        last_tick: Mutex::new(None),
        busy_since: Mutex::new(Some(Instant::now())),
        synced: std::sync::atomic::AtomicBool::new(false),
        metrics: metrics.clone(),
    });
    crate::http::serve(config.listen, health.clone())
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;

    // The volumes of the last run, before any API call.
    let mut saved = local_state::load(&config.root);
    if !saved.volumes.is_empty() {
        tracing::info!(
            count = saved.volumes.len(),
            "serving the volumes of the last run"
        );
        manager
            .lock()
            .remember_served(saved.volumes.keys().cloned());
        let outcome = apply_blocking(&manager, &health, saved.plan()).await?;
        for e in &outcome.errors {
            tracing::warn!(error = %e, "volume of the last run not served");
        }
    }

    *health.last_tick.lock() = Some(Instant::now());
    *health.busy_since.lock() = None;
    let client = client().await?;
    let (reader, writer) = reflector::store::<PersistentVolume>();
    let changed = Arc::new(tokio::sync::Notify::new());
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let watch = reflector(writer, watcher(pvs, pv_watch_config(&node)))
        .default_backoff()
        .touched_objects();
    {
        let changed = changed.clone();
        tokio::spawn(async move {
            let mut watch = std::pin::pin!(watch);
            while let Some(item) = watch.next().await {
                match item {
                    Ok(_) => changed.notify_one(),
                    Err(e) => tracing::warn!(error = %e, "PV watch failed; retrying"),
                }
            }
        });
    }
    let (rounds, rounds_rx) = tokio::sync::watch::channel(Round::default());
    let (key_client, mut keys) = (client.clone(), keys::KeyCache::default());
    let (node_warn, node_warnings) = tokio::sync::mpsc::unbounded_channel();
    let (labels_tx, mut labels_rx) = tokio::sync::watch::channel(labels.clone());
    let api_side = tokio::spawn(api_loop(
        client,
        config.clone(),
        rounds_rx,
        node_warnings,
        labels_tx,
        tier_metrics,
    ));
    let mut watch = config_source
        .map(|(p, text)| reload::ConfigWatch::new(&p, text, std::env::var("NODE_NAME").ok()));
    let (mut base, mut labels, mut running) = (base, labels, config.clone());
    // A disk added by the configuration that could not be opened yet: tried every round.
    let mut retry = false;
    let mut last_warnings = std::collections::BTreeSet::new();

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Config(format!("cannot handle SIGTERM: {e}")))?;
    *health.last_tick.lock() = Some(Instant::now());
    let mut synced = false;
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = handover.notified() => {
                tracing::info!("another agent takes over: handing the volumes over");
                break;
            }
        }
        *health.last_tick.lock() = Some(Instant::now());
        if !synced {
            // Never act on a partial list: a PV missing from it would be unmounted.
            if tokio::time::timeout(Duration::from_millis(100), reader.wait_until_ready())
                .await
                .is_err()
            {
                continue;
            }
            synced = true;
        }
        let mut warnings = Vec::new();
        let mut recompute = std::mem::take(&mut retry);
        match watch.as_mut().and_then(reload::ConfigWatch::poll) {
            None => {}
            Some(reload::Change::Invalid(m)) => {
                warnings.push(("ConfigInvalid", format!("configuration not applied: {m}")));
            }
            Some(reload::Change::Valid(new)) => {
                base = *new;
                recompute = true;
            }
        }
        if labels_rx.has_changed().unwrap_or(false) {
            labels = labels_rx.borrow_and_update().clone();
            if let Some(l) = &labels {
                save_labels(&base.root, l);
            }
            recompute |= !base.by_labels.is_empty();
        }
        if recompute {
            match (&labels, base.by_labels.is_empty()) {
                (None, false) => warnings.push((
                    "ConfigInvalid",
                    "configuration not applied: its [[nodes]] entries by labels wait for the Node's labels".to_string(),
                )),
                (labels, _) => {
                    let resolved = match labels {
                        Some(l) => base.with_labels(l),
                        None => Ok(base.clone()),
                    };
                    match resolved {
                        Ok(new) => {
                            let (w, complete) =
                                apply_config(new, &mut running, &manager, &metrics).await?;
                            warnings.extend(w);
                            retry = !complete;
                        }
                        Err(e) => warnings
                            .push(("ConfigInvalid", format!("configuration not applied: {e}"))),
                    }
                }
            }
        }
        // Said once each (a retried disk gives the same message every round).
        let now: std::collections::BTreeSet<(&'static str, String)> =
            warnings.into_iter().collect();
        for (reason, w) in now.difference(&last_warnings) {
            tracing::warn!(reason, "{w}");
            let _ = node_warn.send((reason, w.clone()));
        }
        if recompute || !now.is_empty() {
            last_warnings = now;
        }
        let all: Arc<Vec<PersistentVolume>> =
            Arc::new(reader.state().iter().map(|pv| (**pv).clone()).collect());
        let served_now: std::collections::BTreeSet<String> =
            manager.lock().served().into_iter().collect();
        let plan = keys
            .resolve(&key_client, plan(&node, &all), &served_now)
            .await;
        let mut served = local_state::Served::from_plan(&plan);
        let release = Arc::new(plan.clone());
        let outcome = apply_blocking(&manager, &health, plan).await?;
        health
            .synced
            .store(true, std::sync::atomic::Ordering::Release);
        // Every round, not only the first: a PV cleaned up while its volume was not
        // served, or a release that failed, must not leave callers waiting forever.
        {
            let m = manager.clone();
            let _ =
                tokio::task::spawn_blocking(move || m.lock().release_unwanted_held(&release)).await;
        }
        // Only what really is served now (a volume that failed to start is not "known").
        let now_served: std::collections::BTreeSet<String> =
            manager.lock().served().into_iter().collect();
        served.volumes.retain(|pv, _| now_served.contains(pv));
        if served != saved {
            let (root, s) = (config.root.clone(), served.clone());
            match tokio::task::spawn_blocking(move || local_state::save(&root, &s)).await {
                Ok(Ok(())) => saved = served,
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the served volumes"),
                Err(e) => tracing::warn!(error = %e, "cannot save the served volumes"),
            }
        }
        let capacity = {
            let manager = manager.clone();
            tokio::task::spawn_blocking(move || manager.lock().capacity())
                .await
                .map_err(|e| AgentError::Join(e.to_string()))?
        };
        let mut failing = BTreeMap::new();
        for e in &outcome.errors {
            tracing::warn!(error = %e, "volume not served");
            failing.insert(e.pv().to_string(), e.to_string());
        }
        // The API side takes the latest round; older ones are level-triggered repeats.
        let applied = manager.lock().applied_quotas();
        let _ = rounds.send(Round {
            all,
            cleaned: outcome.cleaned,
            failing,
            capacity,
            applied,
        });
    }
    api_side.abort();
    tracing::info!("stopping: leaving held volumes to the next agent, unmounting the others (their data stays)");
    tokio::task::spawn_blocking(move || manager.lock().shutdown())
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?;
    Ok(())
}

/// Applies a changed configuration file (see [`reload`]): its tiers and disks now, the
/// rest at the next start. Returns what to tell the cluster: Warning events on the node's
/// `FusevolNode`, (reason, message); one reason per kind of problem, as events of one
/// object and reason are aggregated into one (its first message).
async fn apply_config(
    new: AgentConfig,
    running: &mut AgentConfig,
    manager: &Arc<Mutex<VolumeManager>>,
    metrics: &Arc<Metrics>,
) -> Result<(Vec<(&'static str, String)>, bool), AgentError> {
    if new.tiers == running.tiers && reload::needs_restart(running, &new).is_empty() {
        return Ok((Vec::new(), true));
    }
    let mut warnings = Vec::new();
    let restart = reload::needs_restart(running, &new);
    if !restart.is_empty() {
        warnings.push((
            "ConfigNeedsRestart",
            format!(
                "configuration changed: {} apply at the next start of the agent",
                restart.join(", ")
            ),
        ));
    }
    let (m, tiers) = (manager.clone(), new.tiers.clone());
    let done = tokio::task::spawn_blocking(move || m.lock().reconfigure(&tiers))
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?;
    for store in done.opened {
        let disk = store.dir().display().to_string();
        if let Err(e) = crate::control::serve(store, metrics.clone()) {
            warnings.push((
                "DiskNotOpened",
                format!("control socket of new disk {disk}: {e}"),
            ));
        }
    }
    warnings.extend(done.refused.into_iter().map(|m| ("DiskChangeRefused", m)));
    tracing::info!(tiers = %new.tiers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(","), "configuration reloaded");
    // Only what was applied: a disk that did not open is tried again next round.
    if !done.incomplete {
        running.tiers = new.tiers;
    }
    Ok((warnings, !done.incomplete))
}

/// Where the agent keeps the labels its node had when last read (for a start while the API
/// server cannot be reached).
const LABELS_FILE: &str = "node-labels.json";
/// How often the API side reads the Node's labels again.
const LABELS_EVERY: Duration = Duration::from_secs(60);

/// `base` for this node's labels, when `[[nodes]]` entries match by labels: the Node's
/// labels are read before any disk is opened (they decide which disks are the node's), or,
/// if the API server cannot be reached, those of the last start. With neither the agent
/// does not start: opening the top-level disks on a node meant for others would create
/// stores where none belong (the DaemonSet starts it again; mounts stay with the fd holder).
async fn labelled(
    base: &AgentConfig,
) -> Result<(AgentConfig, Option<BTreeMap<String, String>>), AgentError> {
    if base.by_labels.is_empty() {
        return Ok((base.clone(), None));
    }
    let read = match client().await {
        Ok(c) => node_labels(&c, &base.node_name).await,
        Err(e) => Err(e.to_string()),
    };
    choose_labels(base, read)
}

/// [`labelled`] once the Node's labels were read (`read`), or not.
fn choose_labels(
    base: &AgentConfig,
    read: Result<BTreeMap<String, String>, String>,
) -> Result<(AgentConfig, Option<BTreeMap<String, String>>), AgentError> {
    let node = &base.node_name;
    let labels = match read {
        Ok(l) => {
            save_labels(&base.root, &l);
            l
        }
        Err(e) => {
            let path = base.root.join(LABELS_FILE);
            let kept = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match kept {
                Some(l) => {
                    tracing::warn!(error = %e, "cannot read the Node's labels; using those of the last start");
                    l
                }
                None => {
                    return Err(AgentError::Config(format!(
                        "the configuration chooses disks by node labels, and the labels of Node {node} cannot be read ({e}) nor were kept by an earlier start"
                    )))
                }
            }
        }
    };
    let config = base
        .with_labels(&labels)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    Ok((config, Some(labels)))
}

/// The labels of Node `node`.
async fn node_labels(client: &Client, node: &str) -> Result<BTreeMap<String, String>, String> {
    let api: Api<Node> = Api::all(client.clone());
    api_call("reading the Node's labels", api.get(node))
        .await
        .map(|n| n.labels().clone())
}

fn save_labels(root: &std::path::Path, labels: &BTreeMap<String, String>) {
    let write = std::fs::create_dir_all(root).and_then(|()| {
        let tmp = root.join(format!("{LABELS_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(labels).unwrap_or_default())?;
        std::fs::rename(&tmp, root.join(LABELS_FILE))
    });
    if let Err(e) = write {
        tracing::warn!(error = %e, "cannot keep the Node's labels");
    }
}

/// Registers with the FUSE connection holder and, if a live agent still serves this
/// node's volumes, asks it to hand over and waits until it has exited (its stores can be
/// opened only then). A holder that cannot be reached is logged and not used.
fn claim_from_holder(
    mut holder: FdStore,
    root: &std::path::Path,
    handover: Arc<tokio::sync::Notify>,
) -> (Option<FdStore>, bool) {
    if let Err(error) = holder.register(move || handover.notify_one()) {
        tracing::error!(%error, "fd holder unreachable: serving without it (an agent restart will end every mount)");
        return (None, false);
    }
    let prefix = volumes::held_key_prefix(root);
    let keys: Vec<String> = match holder.list() {
        Ok(keys) => keys
            .into_iter()
            .filter(|k| k.starts_with(&prefix))
            .collect(),
        Err(error) => {
            tracing::error!(%error, "fd holder unreachable");
            return (None, false);
        }
    };
    tracing::info!(held = keys.len(), "fd holder connected");
    let handed_over = holder.take_over_from_live(&keys);
    (Some(holder), handed_over)
}

/// Applies `plan` on a blocking thread, marking the agent busy meanwhile.
async fn apply_blocking(
    manager: &Arc<Mutex<VolumeManager>>,
    health: &Arc<Health>,
    plan: volumes::Plan,
) -> Result<volumes::Outcome, AgentError> {
    *health.busy_since.lock() = Some(Instant::now());
    let manager = manager.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut m = manager.lock();
        let outcome = m.apply(&plan);
        m.flush_idle();
        m.hold_again_if_lost();
        outcome
    })
    .await
    .map_err(|e| AgentError::Join(e.to_string()));
    *health.busy_since.lock() = None;
    outcome
}

/// The API side of the agent: everything it tells the API server, from the latest round.
async fn api_loop(
    client: Client,
    config: AgentConfig,
    mut rounds: tokio::sync::watch::Receiver<Round>,
    mut node_warnings: tokio::sync::mpsc::UnboundedReceiver<(&'static str, String)>,
    labels: tokio::sync::watch::Sender<Option<BTreeMap<String, String>>>,
    tier_metrics: TierMetrics,
) {
    let mut labels_read: Option<Instant> = None;
    let node = config.node_name.clone();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(node.clone()),
        },
    );
    let mut registered: Option<FusevolNode> = None;
    let mut published: Option<FusevolNodeStatus> = None;
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    while rounds.changed().await.is_ok() {
        let round = rounds.borrow_and_update().clone();
        // First: the labels must not wait for the registration to succeed.
        // The node's labels (`[[nodes]]` entries may match them), read now and then.
        if labels_read.is_none_or(|t| t.elapsed() >= LABELS_EVERY) {
            match node_labels(&client, &node).await {
                Ok(l) => {
                    labels_read = Some(Instant::now());
                    labels.send_if_modified(|cur| {
                        let changed = cur.as_ref() != Some(&l);
                        *cur = Some(l);
                        changed
                    });
                }
                Err(e) => tracing::warn!(error = %e, "node labels not read"),
            }
        }
        if registered.is_none() {
            match register_node(&client, &config).await {
                Ok(n) => {
                    published = n.status.clone();
                    registered = Some(n);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register the FusevolNode; retrying next round");
                    continue;
                }
            }
        }
        for name in &round.cleaned {
            let Some(pv) = round.all.iter().find(|pv| pv.name_any() == *name) else {
                continue;
            };
            match api_call("removing the finalizer", remove_finalizer(&client, pv)).await {
                // The controller deletes released PVs (static ones too); once a static PV
                // is gone, the next round publishes a fresh one under its name.
                Ok(()) => tracing::info!(pv = %name, "data cleaned up; finalizer removed"),
                Err(e) => tracing::warn!(pv = %name, error = %e, "finalizer not removed"),
            }
        }
        for (pv, quota) in applied_quota::unconfirmed(&round.all, &round.applied) {
            let what = "confirming the applied quota";
            if let Err(e) = api_call(what, applied_quota::confirm(&client, pv, quota)).await {
                tracing::warn!(pv = %pv.name_any(), error = %e, "applied quota not confirmed");
            }
        }
        for (pv, message) in &round.failing {
            if reported.get(pv) == Some(message) {
                continue;
            }
            let Some(obj) = round.all.iter().find(|p| p.name_any() == *pv) else {
                continue;
            };
            let event = Event {
                type_: EventType::Warning,
                reason: "VolumeFailed".into(),
                note: Some(truncate(message, 1000)),
                action: "Serve".into(),
                secondary: None,
            };
            // PVs are cluster-scoped: their events live in `default` (the API server
            // refuses an event whose namespace and object's differ otherwise).
            let mut reference = obj.object_ref(&());
            reference.namespace = Some("default".into());
            if let Err(e) = api_call("posting an event", recorder.publish(&event, &reference)).await
            {
                tracing::warn!(error = %e, "event not posted");
            }
        }
        reported = round.failing.clone();
        if let Some(n) = &registered {
            while let Ok((reason, message)) = node_warnings.try_recv() {
                let event = Event {
                    type_: EventType::Warning,
                    reason: reason.into(),
                    note: Some(truncate(&message, 1000)),
                    action: "Reconfigure".into(),
                    secondary: None,
                };
                let mut reference = n.object_ref(&());
                reference.namespace = Some("default".into());
                if let Err(e) =
                    api_call("posting an event", recorder.publish(&event, &reference)).await
                {
                    tracing::warn!(error = %e, "event not posted");
                }
            }
        }
        if let (Some(static_mode), Some(n)) = (&config.static_mode, &registered) {
            let work = static_pvs::reconcile(&client, &n.spec, static_mode, &round.all);
            if tokio::time::timeout(API_TIMEOUT * 4, work).await.is_err() {
                tracing::warn!("static PVs: the API server did not answer in time");
            }
        }
        tier_metrics.set(&round.capacity);
        let status =
            FusevolNodeStatus::from_tiers(round.capacity.clone(), Some(crate::VERSION.to_string()));
        if published.as_ref() != Some(&status) {
            match api_call(
                "publishing capacity",
                publish_status(&client, &node, &status),
            )
            .await
            {
                Ok(_) => published = Some(status),
                Err(e) => tracing::warn!(error = %e, "capacity not published"),
            }
        }
    }
}

/// Registers the node's `FusevolNode` (its hostname label read from the Node first).
async fn register_node(client: &Client, config: &AgentConfig) -> Result<FusevolNode, String> {
    let node = &config.node_name;
    let hostname = tokio::time::timeout(API_TIMEOUT, node_hostname(client, node))
        .await
        .unwrap_or_else(|_| node.clone());
    let spec = FusevolNodeSpec {
        node_name: node.clone(),
        hostname: (hostname != *node).then_some(hostname),
        root: config.root.to_string_lossy().into_owned(),
    };
    let n = api_call("registering the FusevolNode", register(client, &spec)).await?;
    tracing::info!(node, root = %spec.root, "registered FusevolNode");
    Ok(n)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Per-tier capacity gauges on the agent's /metrics.
struct TierMetrics {
    total: prometheus_client::metrics::family::Family<
        TierLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
    allocated: prometheus_client::metrics::family::Family<
        TierLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
    free: prometheus_client::metrics::family::Family<
        TierLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TierLabels {
    tier: String,
}

impl TierMetrics {
    fn register(metrics: &Metrics) -> TierMetrics {
        let t = TierMetrics {
            total: Default::default(),
            allocated: Default::default(),
            free: Default::default(),
        };
        metrics.with_registry(|r| {
            r.register(
                "tier_total_bytes",
                "Capacity the tier offers to volumes",
                t.total.clone(),
            );
            r.register(
                "tier_allocated_bytes",
                "Sum of the quotas of the tier's volumes",
                t.allocated.clone(),
            );
            r.register(
                "tier_free_bytes",
                "Capacity not allocated to volumes",
                t.free.clone(),
            );
        });
        t
    }

    fn set(&self, tiers: &[crate::k8s::crd::TierStatus]) {
        for t in tiers {
            let l = TierLabels {
                tier: t.name.clone(),
            };
            self.total.get_or_create(&l).set(t.total_bytes as i64);
            self.allocated
                .get_or_create(&l)
                .set(t.allocated_bytes as i64);
            self.free.get_or_create(&l).set(t.free_bytes as i64);
        }
    }
}

#[cfg(test)]
mod tests;
