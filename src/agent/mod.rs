//! `fusevol agent`: the node agent (a DaemonSet, one per node).
//!
//! - [`config`]: the TOML configuration.
//! - [`volumes`]: the node-local half (stores, mounts, data cleanup), blocking and API-free.
//! - [`static_pvs`]: the PVs the agent keeps published in static-provisioner mode.
//! - this module: the API side. It registers the node's [`FusevolNode`], watches every
//!   PersistentVolume (a reflector cache), and on each change (and every
//!   [`RESYNC`]) brings the node in line with the PVs pinned to it: level-triggered, so a
//!   restart or a missed event is repaired by the next round. Then it removes the
//!   data-cleanup finalizer of PVs whose data is gone, keeps the static PVs published and
//!   refreshes the capacity in the `FusevolNode` status.

pub mod config;
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
use crate::k8s::crd::{FusevolNode, FusevolNodeSpec, FusevolNodeStatus};
use crate::k8s::{FINALIZER_DATA_CLEANUP, LABEL_HOSTNAME};
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

struct Health {
    last_round: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl crate::http::Endpoints for Health {
    fn health(&self) -> Result<(), String> {
        match *self.last_round.lock() {
            Some(t) if t.elapsed() < RESYNC * 6 => Ok(()),
            Some(t) => Err(format!(
                "last reconcile round {}s ago",
                t.elapsed().as_secs()
            )),
            None => Err("starting: the PV cache is not synced yet".into()),
        }
    }
    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// Runs the agent until SIGTERM/SIGINT; then unmounts its volumes (data stays) and returns.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::new());
    let tier_metrics = TierMetrics::register(&metrics);
    let node = config.node_name.clone();
    let manager = {
        let (config, metrics) = (config.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || VolumeManager::open(&config, metrics))
            .await
            .map_err(|e| AgentError::Join(e.to_string()))??
    };
    for store in manager.stores() {
        let disk = store.dir().display().to_string();
        crate::control::serve(store, metrics.clone())
            .map_err(|source| AgentError::Control { disk, source })?;
    }
    let manager = Arc::new(Mutex::new(manager));

    let client = Client::try_default()
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let hostname = node_hostname(&client, &node).await;
    let spec = FusevolNodeSpec {
        node_name: node.clone(),
        hostname: (hostname != node).then_some(hostname),
        root: config.root.to_string_lossy().into_owned(),
    };
    let registered = register(&client, &spec).await?;
    tracing::info!(node, root = %spec.root, "registered FusevolNode");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(node.clone()),
        },
    );

    let health = Arc::new(Health {
        last_round: Mutex::new(None),
        metrics: metrics.clone(),
    });
    crate::http::serve(config.listen, health.clone())
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;

    let (reader, writer) = reflector::store::<PersistentVolume>();
    let changed = Arc::new(tokio::sync::Notify::new());
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let watch = reflector(writer, watcher(pvs, watcher::Config::default()))
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

    let mut published: Option<FusevolNodeStatus> = registered.status;
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Config(format!("cannot handle SIGTERM: {e}")))?;
    let mut ready = false;
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        if !ready {
            // Never act on a partial list: a PV missing from it would be unmounted.
            if tokio::time::timeout(Duration::from_millis(100), reader.wait_until_ready())
                .await
                .is_err()
            {
                continue;
            }
            ready = true;
        }
        let all: Vec<PersistentVolume> = reader.state().iter().map(|pv| (**pv).clone()).collect();
        let plan = plan(&node, &all);
        let (outcome, capacity) = {
            let manager = manager.clone();
            tokio::task::spawn_blocking(move || {
                let mut m = manager.lock();
                let outcome = m.apply(&plan);
                m.flush_idle();
                (outcome, m.capacity())
            })
            .await
            .map_err(|e| AgentError::Join(e.to_string()))?
        };
        for name in &outcome.cleaned {
            let Some(pv) = all.iter().find(|pv| pv.name_any() == *name) else {
                continue;
            };
            if let Err(e) = remove_finalizer(&client, pv).await {
                tracing::warn!(pv = %name, error = %e, "cannot remove the finalizer");
                continue;
            }
            // The controller deletes released PVs (static ones too); once a static PV is
            // gone, the next round publishes a fresh one under its name.
            tracing::info!(pv = %name, "data cleaned up; finalizer removed");
        }
        let mut failing = BTreeMap::new();
        for e in &outcome.errors {
            let pv = e.pv().to_string();
            let message = e.to_string();
            tracing::warn!(error = %message, "volume not served");
            if reported.get(&pv) != Some(&message) {
                if let Some(obj) = all.iter().find(|p| p.name_any() == pv) {
                    let event = Event {
                        type_: EventType::Warning,
                        reason: "VolumeFailed".into(),
                        note: Some(truncate(&message, 1000)),
                        action: "Serve".into(),
                        secondary: None,
                    };
                    // PVs are cluster-scoped: their events live in `default` (the API
                    // server refuses an event whose namespace and object's differ otherwise).
                    let mut reference = obj.object_ref(&());
                    reference.namespace = Some("default".into());
                    if let Err(e) = recorder.publish(&event, &reference).await {
                        tracing::warn!(error = %e, "cannot post an event");
                    }
                }
            }
            failing.insert(pv, message);
        }
        reported = failing;
        if let Some(static_mode) = &config.static_mode {
            static_pvs::reconcile(&client, &registered.spec, static_mode, &all).await;
        }
        tier_metrics.set(&capacity);
        let status = FusevolNodeStatus::from_tiers(capacity, Some(crate::VERSION.to_string()));
        if published.as_ref() != Some(&status) {
            match publish_status(&client, &node, &status).await {
                Ok(_) => published = Some(status),
                Err(e) => tracing::warn!(error = %e, "cannot publish capacity"),
            }
        }
        *health.last_round.lock() = Some(Instant::now());
    }
    tracing::info!("stopping: unmounting volumes (their data stays)");
    tokio::task::spawn_blocking(move || manager.lock().shutdown())
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?;
    Ok(())
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
