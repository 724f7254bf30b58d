"""fusevol's end-to-end scenarios (issue 7), each an assertion on what a user would see.

A scenario is a function of a started `Cluster`; it raises `E2EError` (or `AssertionError`)
with the reason when an expectation fails, and `Skip` when it cannot run here. Scenarios that
share a `shared` key run one after another in one cluster; the others get a fresh cluster each.
"""

import errno
import os
import random
import subprocess
import signal
import sys
import threading
import json
import time
import urllib.request
import ssl

from cluster import (AGENT_SA, CONTROLLER_SA, HOSTNAME_LABEL, NAMESPACE, E2EError, Fatal, KubectlError,
                     Tier, http_get, is_live_fuse_mount, fuse_mount_count, parse_quantity,
                     tail, wait_for)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PROVISIONER = "local.fusevol.io"


class Skip(Exception):
    """The scenario cannot run here (the reason is printed as SKIP)."""


class Scenario:
    def __init__(self, name, fn, needs_fusevol, shared, cluster_kwargs, default):
        self.name = name
        self.fn = fn
        self.needs_fusevol = needs_fusevol
        self.shared = shared
        self.cluster_kwargs = cluster_kwargs
        self.default = default
        self.doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""


SCENARIOS = {}


def scenario(name, needs_fusevol=True, shared=None, default=True, **cluster_kwargs):
    def register(fn):
        SCENARIOS[name] = Scenario(name, fn, needs_fusevol, shared, cluster_kwargs, default)
        return fn
    return register


def check(cond, message):
    if not cond:
        raise E2EError(message)


# ---------------------------------------------------------------------------------------------
# Objects


def storage_class(name, tier=None, reclaim="Delete", binding="WaitForFirstConsumer", **params):
    parameters = dict(params)
    if tier is not None:
        parameters["tier"] = tier
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name, "labels": {"fusevol-e2e": "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": reclaim,
            "volumeBindingMode": binding, "parameters": parameters}


def claim(name, ns, cls, size, access_modes=("ReadWriteOnce",), volume_mode=None):
    spec = {"storageClassName": cls, "accessModes": list(access_modes),
            "resources": {"requests": {"storage": size}}}
    if volume_mode:
        spec["volumeMode"] = volume_mode
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pod_spec(claims):
    """A pod spec mounting `claims` (name -> claim name). Zero resource requests, so that every
    node scores the same and the scheduler's choice among fitting nodes is random."""
    return {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 0,
        "containers": [{
            "name": "app", "image": "busybox:1.36", "command": ["sleep", "1000000"],
            "resources": {"requests": {"cpu": "0", "memory": "0"}},
            "volumeMounts": [{"name": v, "mountPath": f"/{v}"} for v in claims],
        }],
        "volumes": [{"name": v, "persistentVolumeClaim": {"claimName": c}}
                    for v, c in claims.items()],
    }


def pod(name, ns, claim_name):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": pod_spec({"data": claim_name})}


def claim_with_pod(name, ns, cls, size, **kw):
    """A claim `name` and a pod `name` using it (the first consumer)."""
    return [claim(name, ns, cls, size, **kw), pod(name, ns, name)]


# ---------------------------------------------------------------------------------------------
# Reading the cluster


def pvc(c, ns, name):
    return c.get("pvc", name, ns, check=False)


def pv(c, name):
    return c.get("pv", name, check=False)


def bound_claims(c, ns):
    return {p["metadata"]["name"]: p for p in c.get("pvc", namespace=ns)
            if (p.get("status") or {}).get("phase") == "Bound"}


def wait_bound(c, ns, names, timeout):
    """Waits until every claim in `names` is Bound; returns {name: pvc}."""
    names = set(names)

    def done():
        b = bound_claims(c, ns)
        missing = names - set(b)
        if missing:
            raise E2EError(f"{len(missing)} of {len(names)} not Bound yet: {sorted(missing)[:5]}")
        return {n: b[n] for n in names}
    return wait_for(done, timeout, f"claims {sorted(names)[:5]}{'...' if len(names) > 5 else ''} "
                                   f"in {ns} to be Bound", interval=0.5)


def wait_pods_bound(c, ns, names, timeout):
    """Waits until every pod in `names` has spec.nodeName; returns {name: pod}."""
    names = set(names)

    def done():
        pods = {p["metadata"]["name"]: p for p in c.get("pods", namespace=ns)}
        missing = [n for n in names if not (pods.get(n, {}).get("spec") or {}).get("nodeName")]
        if missing:
            raise E2EError(f"not bound to a node yet: {sorted(missing)[:5]}")
        return {n: pods[n] for n in names}
    return wait_for(done, timeout, f"pods in {ns} to be bound to nodes", interval=0.5)


def pv_node(pv_obj):
    """The node a PV is pinned to by its required node affinity (kubernetes.io/hostname)."""
    terms = (((pv_obj.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}) \
        .get("nodeSelectorTerms") or []
    for t in terms:
        for e in t.get("matchExpressions") or []:
            if e.get("key") == HOSTNAME_LABEL and e.get("operator") == "In" and len(e.get("values") or []) == 1:
                return e["values"][0]
    raise E2EError(f"PV {pv_obj['metadata']['name']} has no required node affinity "
                   f"{HOSTNAME_LABEL} In [node]: {pv_obj['spec'].get('nodeAffinity')}")


def pv_bytes(pv_obj):
    return parse_quantity(pv_obj["spec"]["capacity"]["storage"])


def class_tiers(c):
    """StorageClass name -> tier parameter (fusevol's classes only)."""
    out = {}
    for sc in c.get("storageclass"):
        if sc.get("provisioner") == PROVISIONER:
            out[sc["metadata"]["name"]] = (sc.get("parameters") or {}).get("tier", "default")
    return out


def fusevol_pvs(c):
    return [p for p in c.get("pv") if (p["metadata"].get("annotations") or {})
            .get("pv.kubernetes.io/provisioned-by") == PROVISIONER or p["spec"].get("local")]


def fvn_tier(c, node, tier):
    fvn = c.get("fusevolnodes", node)
    for t in ((fvn.get("status") or {}).get("tiers") or []):
        if t.get("name") == tier:
            return t
    raise E2EError(f"FusevolNode {node} has no status.tiers entry {tier!r}: {fvn.get('status')}")


def warnings(c, ns, kind, name):
    """Messages of the Warning events about object kind/name."""
    return [e.get("message") or "" for e in c.events(ns, kind=kind, name=name, type_="Warning")]


def wait_warning(c, ns, kind, name, must_contain, timeout=60, what=None):
    """Waits for a Warning event about kind/name whose message contains every string of
    `must_contain` (each item may be a tuple of alternatives); returns the message."""
    def matches(msg):
        return all(any(alt in msg for alt in (item if isinstance(item, tuple) else (item,)))
                   for item in must_contain)

    def found():
        msgs = warnings(c, ns, kind, name)
        for m in msgs:
            if matches(m):
                return m
        raise E2EError(f"Warning events so far: {msgs}")
    return wait_for(found, timeout, what or f"a Warning event on {kind} {ns}/{name} containing "
                                           f"{must_contain}", interval=0.5)


def force_delete_pods(c, ns, names):
    """Deletes pods at once (no kubelet will confirm a graceful deletion)."""
    c.kubectl("delete", "pod", "-n", ns, "--grace-period=0", "--force", "--wait=false",
              "--ignore-not-found", *names)
    wait_for(lambda: not ({p["metadata"]["name"] for p in c.get("pods", namespace=ns)} & set(names)),
             30, f"pods {names} to be gone")


def fvn_status(c, node):
    return (c.get("fusevolnodes", node).get("status") or {})


# ---------------------------------------------------------------------------------------------
# Playing the kubelet


class VolumeView:
    """A claim of a pod as the kubelet of the pod's node sees it."""

    def __init__(self, claim_name, pvc_obj, pv_obj, node, path):
        self.claim = claim_name
        self.pvc = pvc_obj
        self.pv = pv_obj
        self.pv_name = pv_obj["metadata"]["name"]
        self.node = node
        self.path = path
        self.mnt = os.path.dirname(path)
        self.request = parse_quantity(pvc_obj["spec"]["resources"]["requests"]["storage"])


def kubelet_view(c, ns, pod_name, check_size=True):
    """For pod `pod_name` bound to node N: each of its claims is Bound to a PV pinned to N whose
    `local.path` is `<N's agent root>/volumes/<pv>/mnt/data`, on a live fuse.fusevol mount (the
    `mnt` parent) whose size (statvfs) equals the claim's request. Returns [VolumeView]."""
    p = c.get("pod", pod_name, ns)
    node = p["spec"].get("nodeName")
    check(node, f"pod {ns}/{pod_name} is not bound to a node")
    views = []
    for vol in p["spec"].get("volumes") or []:
        src = vol.get("persistentVolumeClaim")
        if not src:
            continue
        cl = pvc(c, ns, src["claimName"])
        check(cl and cl.get("status", {}).get("phase") == "Bound",
              f"claim {ns}/{src['claimName']} of pod {pod_name} is not Bound")
        pv_obj = pv(c, cl["spec"]["volumeName"])
        check(pv_obj is not None, f"PV {cl['spec']['volumeName']} not found")
        pv_name = pv_obj["metadata"]["name"]
        check(pv_node(pv_obj) == node,
              f"pod {pod_name} is on {node} but its PV {pv_name} is pinned to {pv_node(pv_obj)}")
        local = (pv_obj["spec"].get("local") or {}).get("path")
        check(local, f"PV {pv_name} has no spec.local.path: {pv_obj['spec']}")
        agent = c.agents.get(node)
        check(agent is not None, f"no agent runs for node {node}")
        want = f"{agent.root}/volumes/{pv_name}/mnt/data"
        check(local == want, f"PV {pv_name}: local.path {local!r}, expected {want!r} "
                             f"(under the root of {node}'s own agent)")
        fvn_root = (c.get("fusevolnodes", node).get("spec") or {}).get("root")
        check(fvn_root == str(agent.root),
              f"FusevolNode {node} spec.root {fvn_root!r} is not the agent's root {agent.root}")
        v = VolumeView(src["claimName"], cl, pv_obj, node, local)
        check(is_live_fuse_mount(v.mnt), f"{v.mnt} (PV {pv_name} on {node}) is not a live "
                                          f"fuse.fusevol mount")
        check(os.path.isdir(v.path), f"{v.path} is not a directory")
        if check_size:
            st = os.statvfs(v.mnt)
            size = st.f_blocks * st.f_frsize
            check(size == v.request, f"df size of {v.mnt} is {size}, the claim requests "
                                     f"{v.request} ({cl['spec']['resources']['requests']['storage']})")
        views.append(v)
    check(views, f"pod {ns}/{pod_name} has no claims")
    return views


def wait_kubelet_view(c, ns, pod_name, timeout=30):
    """kubelet_view once the agent has caught up (mounts can lag the PV's binding)."""
    return wait_for(lambda: kubelet_view(c, ns, pod_name), timeout,
                    f"pod {ns}/{pod_name}'s volumes to be served on its node", interval=0.5)


class PodMount:
    """The kubelet's part for one pod volume: `local.path` bind-mounted into the pod's own
    directory (what the container sees), optionally with a file held open there as a database
    holds its WAL. Unmounting the host path does not end this mount; only `release` does
    (the cluster's cleanup also detaches whatever is left under its temp dir)."""

    def __init__(self, c, pod_name, view, hold=None):
        self.dir = c.tmp / "pods" / pod_name / view.claim
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", view.path, str(self.dir)], check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)
        self.fd = None
        if hold:
            self.fd = os.open(self.dir / hold, os.O_RDWR | os.O_CREAT, 0o644)

    def write_sync(self, data):
        """Appends to the held file and fsyncs it; raises OSError as the container would see."""
        os.write(self.fd, data)
        os.fsync(self.fd)

    def release(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        subprocess.run(["umount", "-l", str(self.dir)], capture_output=True,
                       stdin=subprocess.DEVNULL)


def pod_with_volume(c, ns, name, hold, size="1Gi", cls="fusevol-fast"):
    """A claim `name` and its pod, Bound and served; the pod's bind mount holds file `hold`
    open. Returns (VolumeView, PodMount)."""
    c.create(*claim_with_pod(name, ns, cls, size))
    wait_bound(c, ns, [name], 90)
    wait_pods_bound(c, ns, [name], 60)
    (v,) = wait_kubelet_view(c, ns, name)
    return v, PodMount(c, name, v, hold=hold)


DISCONNECTED = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV}


def disconnected(fn):
    """True if `fn()` fails as on an ended FUSE connection; False if it succeeds."""
    try:
        fn()
        return False
    except OSError as e:
        if e.errno in DISCONNECTED:
            return True
        raise E2EError(f"expected a disconnected error, got {e!r}")


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def payload(tag, size=1 * MiB):
    rnd = random.Random(tag)
    return rnd.randbytes(size)


def df_used(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# ---------------------------------------------------------------------------------------------
# fusevol processes


def start_fusevol(c, tiers, controllers=2, static=None, fdstore=True):
    """Starts one agent per node of `tiers` (node -> [Tier]) and `controllers` controller
    replicas, then waits until all are ready. `fdstore`: agents serve through their node's
    FUSE connection holder, as deploy/ runs them (False: the fallback without a holder)."""
    for node, ts in tiers.items():
        c.start_agent(node, ts, static=(static or {}).get(node), wait=False, fdstore=fdstore)
    for i in range(controllers):
        c.start_controller(i, wait=False)
    for node in tiers:
        c.wait_agent_ready(node, 60)
    for i in range(controllers):
        c.wait_controller_ready(i, 60)
    if controllers:
        wait_for(lambda: c.leader() in {ctl.identity for ctl in c.controllers.values()}, 60,
                 "a controller replica to hold Lease fusevol-system/fusevol-controller")


def capacities(c, cls):
    """node -> capacity bytes of the CSIStorageCapacity objects of class `cls`."""
    out = {}
    for cap in c.get("csistoragecapacities.v1alpha1.storage.k8s.io", namespace=NAMESPACE):
        if cap.get("storageClassName") != cls or cap.get("capacity") is None:
            continue
        topo = cap.get("nodeTopology") or {}
        node = (topo.get("matchLabels") or {}).get(HOSTNAME_LABEL)
        for e in topo.get("matchExpressions") or []:
            if e.get("key") == HOSTNAME_LABEL and e.get("operator") == "In" and len(e.get("values") or []) == 1:
                node = e["values"][0]
        if node:
            out[node] = parse_quantity(cap["capacity"])
    return out


def wait_capacities_published(c, cls, tier, nodes, timeout=60):
    """Waits until, for every node, a CSIStorageCapacity of class `cls` publishes the free
    bytes of `tier` that the node's FusevolNode reports."""
    def ok():
        caps = capacities(c, cls)
        want = {n: fvn_tier(c, n, tier)["freeBytes"] for n in nodes}
        got = {n: caps.get(n) for n in nodes}
        if got != want:
            raise E2EError(f"published {got}, FusevolNode free {want}")
        return caps
    return wait_for(ok, timeout, f"CSIStorageCapacity objects of class {cls} in {NAMESPACE} "
                                 f"matching each node's free {tier} bytes", interval=0.5)


def log_lines(proc, *needles):
    """Lines of a process log containing every needle (case-insensitive)."""
    out = []
    for line in proc.log_text().splitlines():
        low = line.lower()
        if all(n.lower() in low for n in needles):
            out.append(line)
    return out


def check_alive(c):
    """Every fusevol process the scenario left running is still alive."""
    for node, a in c.agents.items():
        check(a.proc.alive(), f"agent {node} died (exit {a.proc.popen.returncode}):\n"
                              f"{tail(a.proc.log_path, 20)}")
    for i, ctl in c.controllers.items():
        check(ctl.proc.alive(), f"controller {i} died (exit {ctl.proc.popen.returncode}):\n"
                                f"{tail(ctl.proc.log_path, 20)}")


# =============================================================================================
# Scenarios that need only the control plane


@scenario("manifests", needs_fusevol=False, shared="plain", allow_apply_failure=True)
def manifests(c):
    """Every object of `kubectl apply -k deploy/` is accepted; the CRD is Established."""
    check(c.apply_rc == 0, f"kubectl apply -k {c.deploy_dir} exited {c.apply_rc}:\n"
                           f"{c.apply_output.strip()}")
    # Each object kustomize renders exists on the server.
    rendered = c.kubectl("kustomize", str(c.deploy_dir))
    kinds = [line.split(":", 1)[1].strip() for line in rendered.splitlines()
             if line.startswith("kind:")]
    check(len(kinds) >= 10, f"kustomize rendered only {kinds}")
    applied = c.apply_stdout.splitlines()
    for line in applied:
        check(line.endswith((" created", " configured", " unchanged")),
              f"apply output line: {line!r}")
    check(len(applied) == len(kinds),
          f"apply reported {len(applied)} objects, kustomize rendered {len(kinds)}:\n{c.apply_output}")
    crd = c.get("crd", "fusevolnodes.local.fusevol.io")
    conds = {x["type"]: x["status"] for x in crd["status"].get("conditions", [])}
    check(conds.get("Established") == "True", f"CRD conditions: {conds}")
    check(conds.get("NonStructuralSchema") != "True", f"CRD conditions: {conds}")
    res = c.kubectl_run("get", "fusevolnodes")
    check(res.returncode == 0 and ("No resources found" in res.stderr or res.stdout.startswith("NAME")),
          f"kubectl get fusevolnodes: exit {res.returncode}: {res.stdout!r} {res.stderr!r}")
    # Printer columns are served (kubectl shows the headers once an object exists).
    probe = {"apiVersion": "local.fusevol.io/v1alpha1", "kind": "FusevolNode",
             "metadata": {"name": "e2e-probe"}, "spec": {"nodeName": "e2e-probe", "root": "/x"}}
    c.create(probe)
    out = c.kubectl("get", "fusevolnodes")
    for col in ("TIERS", "TOTAL", "ALLOCATED", "FREE"):
        check(col in out.splitlines()[0], f"kubectl get fusevolnodes lacks column {col}: {out!r}")
    c.kubectl("delete", "fusevolnode", "e2e-probe")
    # The objects a user relies on.
    for kind, name, ns in [("namespace", NAMESPACE, None), ("csidriver", PROVISIONER, None),
                           ("storageclass", "fusevol-fast", None),
                           ("storageclass", "fusevol-standard", None),
                           ("storageclass", "fusevol-static", None),
                           ("daemonset", "fusevol-agent", NAMESPACE),
                           ("daemonset", "fusevol-fdstore", NAMESPACE),
                           ("deployment", "fusevol-controller", NAMESPACE)]:
        check(c.get(kind, name, ns, check=False) is not None, f"{kind} {name} missing")
    # The workloads are schedulable as shipped: an agent pod bound to every node (its
    # tolerations, priority class and requests), both controller replicas bound to nodes.
    n = len(c.node_names)

    def scheduled():
        ds = c.get("daemonset", "fusevol-agent", NAMESPACE).get("status") or {}
        if (ds.get("desiredNumberScheduled"), ds.get("currentNumberScheduled")) != (n, n):
            raise E2EError(f"DaemonSet fusevol-agent status {ds}")
        pods = c.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                         "app.kubernetes.io/name in (fusevol-agent,fusevol-controller)", as_json=True)["items"]
        nodes = {}
        for p in pods:
            nodes.setdefault(p["metadata"]["labels"]["app.kubernetes.io/name"], []).append(
                p["spec"].get("nodeName"))
        agents, ctls = nodes.get("fusevol-agent", []), nodes.get("fusevol-controller", [])
        if sorted(agents) != sorted(c.node_names) or len(ctls) != 2 or not all(ctls):
            raise E2EError(f"pods bound to nodes: {nodes}")
        return True
    wait_for(scheduled, 60, "an agent pod on every node and both controller pods scheduled",
             interval=0.5)
    if c.capacity_api:
        drv = c.get("csidriver", PROVISIONER)
        check(drv["spec"].get("storageCapacity") is True,
              f"CSIDriver {PROVISIONER} spec.storageCapacity is {drv['spec'].get('storageCapacity')}")


def expect_forbidden(c, sa, *args, input=None):
    try:
        c.kubectl_as(sa, *args, input=input)
    except KubectlError as e:
        check(e.forbidden, f"{sa}: kubectl {' '.join(args)} failed, but not with Forbidden: {e.stderr.strip()}")
        check(f"system:serviceaccount:{NAMESPACE}:{sa}" in e.stderr,
              f"{sa}: the refusal names another user: {e.stderr.strip()}")
        return
    raise E2EError(f"{sa} was allowed: kubectl {' '.join(args)}")


def expect_allowed(c, sa, *args, input=None):
    try:
        return c.kubectl_as(sa, *args, input=input)
    except KubectlError as e:
        raise E2EError(f"{sa} was refused: kubectl {' '.join(args)}: {e.stderr.strip()}") from None


def raw_as(c, sa, method, path, body, content_type="application/merge-patch+json"):
    status, obj = c.api(method, path, body, content_type=content_type, token=c.tokens[sa],
                        check=False)
    return status, obj


@scenario("rbac", needs_fusevol=False, shared="plain", allow_apply_failure=True)
def rbac(c):
    """The ServiceAccount tokens of deploy/ get exactly what their component needs."""
    ns = "e2e-rbac"
    c.ensure_namespace(ns)
    c.create(claim("victim", ns, "fusevol-fast", "1Gi"))
    agent, ctl = AGENT_SA, CONTROLLER_SA

    # What they have no business doing.
    expect_forbidden(c, agent, "get", "secrets", "--all-namespaces")
    expect_forbidden(c, agent, "get", "secrets", "-n", NAMESPACE)
    expect_forbidden(c, agent, "delete", "pvc", "victim", "-n", ns, "--wait=false")
    check(pvc(c, ns, "victim") is not None, "claim victim is gone after the agent's refused delete")
    expect_forbidden(c, ctl, "get", "secrets", "-n", NAMESPACE)
    expect_forbidden(c, ctl, "get", "secrets", "--all-namespaces")
    secret = c.get("serviceaccount", agent, NAMESPACE)["secrets"][0]["name"]
    expect_forbidden(c, ctl, "get", "secret", secret, "-n", NAMESPACE)
    expect_forbidden(c, ctl, "delete", "node", c.node_names[0], "--dry-run=server")
    expect_forbidden(c, ctl, "get", "lease", "anything", "-n", "default")
    expect_forbidden(c, ctl, "get", "csistoragecapacities", "-n", "default")
    expect_forbidden(c, agent, "create", "-f", "-", input=json.dumps(
        {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
         "metadata": {"name": "e2e-agent-lease", "namespace": NAMESPACE}, "spec": {}}))

    # The agent: PVs, its FusevolNode (object and status), its Node, events; no PV create
    # (static mode's deploy/static/rbac-agent-static.yaml is not applied here).
    expect_allowed(c, agent, "get", "pv")
    expect_forbidden(c, agent, "create", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "e2e-agent-pv"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                  "hostPath": {"path": "/etc"}}}))
    expect_allowed(c, agent, "get", "node", c.node_names[0])
    fvn = {"apiVersion": "local.fusevol.io/v1alpha1", "kind": "FusevolNode",
           "metadata": {"name": "e2e-rbac-node"},
           "spec": {"nodeName": "e2e-rbac-node", "root": "/var/lib/fusevol"}}
    expect_allowed(c, agent, "create", "-f", "-", input=json.dumps(fvn))
    expect_allowed(c, agent, "get", "fusevolnodes")
    expect_allowed(c, agent, "patch", "fusevolnode", "e2e-rbac-node", "--type=merge",
                   "-p", json.dumps({"spec": {"root": "/srv/fusevol"}}))
    status, obj = raw_as(c, agent, "PATCH",
                         "/apis/local.fusevol.io/v1alpha1/fusevolnodes/e2e-rbac-node/status",
                         {"status": {"tiers": [{"name": "fast", "totalBytes": 10 * GiB,
                                                "allocatedBytes": 0, "freeBytes": 10 * GiB}]}})
    check(status == 200, f"agent PATCH fusevolnodes/status: HTTP {status}: {obj}")
    check(c.get("fusevolnodes", "e2e-rbac-node")["status"]["tiers"][0]["totalBytes"] == 10 * GiB,
          "the agent's status patch did not stick")
    # The controller deletes a gone node's FusevolNode (issue 13 §3), and writes none.
    expect_forbidden(c, ctl, "patch", "fusevolnode", "e2e-rbac-node", "--type=merge",
                     "-p", json.dumps({"spec": {"root": "/srv/other"}}))
    expect_allowed(c, ctl, "delete", "fusevolnode", "e2e-rbac-node")
    ev = {"apiVersion": "v1", "kind": "Event",
          "metadata": {"name": "e2e-rbac-agent", "namespace": "default"},
          "involvedObject": {"kind": "Node", "name": c.node_names[0]},
          "reason": "E2E", "message": "rbac probe", "type": "Normal"}
    expect_allowed(c, agent, "create", "-f", "-", input=json.dumps(ev))

    # The controller: claims, PVs (create, delete), classes, FusevolNodes, CSIDriver, its
    # Lease and CSIStorageCapacity in its namespace.
    expect_allowed(c, ctl, "get", "pvc", "--all-namespaces")
    expect_allowed(c, ctl, "get", "storageclass")
    expect_allowed(c, ctl, "get", "fusevolnodes")
    expect_allowed(c, ctl, "get", "csidriver", PROVISIONER)
    pv_obj = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": "e2e-rbac-pv"},
              "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                       "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "fusevol-fast",
                       "local": {"path": "/var/lib/fusevol/volumes/e2e-rbac-pv/mnt/data"},
                       "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                           {"key": HOSTNAME_LABEL, "operator": "In",
                            "values": [c.node_names[0]]}]}]}}}}
    expect_allowed(c, ctl, "create", "-f", "-", input=json.dumps(pv_obj))
    expect_allowed(c, ctl, "get", "pv", "e2e-rbac-pv")
    expect_allowed(c, ctl, "patch", "pv", "e2e-rbac-pv", "--type=merge",
                   "-p", json.dumps({"metadata": {"labels": {"e2e": "patched"}}}))
    expect_allowed(c, ctl, "delete", "pv", "e2e-rbac-pv", "--wait=false")
    expect_allowed(c, ctl, "get", "nodes")
    # Deleting a claim: only opted-in claims of gone nodes (issue 13 §3).
    expect_allowed(c, ctl, "delete", "pvc", "victim", "-n", ns, "--dry-run=server")
    expect_allowed(c, ctl, "patch", "pvc", "victim", "-n", ns, "--type=merge",
                   "-p", json.dumps({"metadata": {"annotations": {"e2e": "patched"}}}))
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "e2e-rbac-lease", "namespace": NAMESPACE},
             "spec": {"holderIdentity": "e2e", "leaseDurationSeconds": 15}}
    expect_allowed(c, ctl, "create", "-f", "-", input=json.dumps(lease))
    got = json.loads(expect_allowed(c, ctl, "get", "lease", "e2e-rbac-lease", "-o", "json"))
    got["spec"]["holderIdentity"] = "e2e-2"
    expect_allowed(c, ctl, "replace", "-f", "-", input=json.dumps(got))
    check(c.get("lease", "e2e-rbac-lease", NAMESPACE)["spec"]["holderIdentity"] == "e2e-2",
          "the controller's Lease update did not stick")
    if c.capacity_api:
        expect_allowed(c, ctl, "get", "csistoragecapacities", "-n", NAMESPACE)
        cap = {"apiVersion": "storage.k8s.io/v1alpha1", "kind": "CSIStorageCapacity",
               "metadata": {"name": "e2e-rbac-cap", "namespace": NAMESPACE},
               "storageClassName": "fusevol-fast", "capacity": "1Gi",
               "nodeTopology": {"matchLabels": {HOSTNAME_LABEL: c.node_names[0]}}}
        expect_allowed(c, ctl, "create", "-f", "-", input=json.dumps(cap))
        expect_allowed(c, ctl, "delete", "csistoragecapacity", "e2e-rbac-cap", "-n", NAMESPACE)
    ev["metadata"] = {"name": "e2e-rbac-controller", "namespace": ns}
    ev["involvedObject"] = {"kind": "PersistentVolumeClaim", "name": "victim", "namespace": ns}
    expect_allowed(c, ctl, "create", "-f", "-", input=json.dumps(ev))
    c.kubectl("delete", "namespace", ns, "--wait=false")


# =============================================================================================
# Scenarios that run fusevol


@scenario("statefulset")
def statefulset(c):
    """Issue 7 §1: a 3-replica StatefulSet gets one live, correctly sized volume per pod."""
    ns = "e2e-sts"
    # Without the fd holder (an agent deployed without it): a SIGTERM'd agent unmounts
    # its volumes, and the next one mounts them afresh. With the holder (every other
    # scenario, as deploy/ runs it) the mounts outlive the agent: agent-restart.
    start_fusevol(c, {n: [Tier("fast", "10Gi"), Tier("standard", "10Gi")] for n in c.node_names},
                  fdstore=False)
    c.ensure_namespace(ns)
    sts = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "serviceName": "web", "replicas": 3, "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod_spec({"data": "x"})},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"storageClassName": "fusevol-fast", "accessModes": ["ReadWriteOnce"],
                         "resources": {"requests": {"storage": "1Gi"}}}}],
        },
    }
    # The template mounts the claim template by its name.
    sts["spec"]["template"]["spec"]["volumes"] = []
    sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "data", "mountPath": "/data"}]
    c.create(sts)
    claims = [f"data-web-{i}" for i in range(3)]
    pods = [f"web-{i}" for i in range(3)]
    wait_bound(c, ns, claims, 120)
    wait_pods_bound(c, ns, pods, 60)
    views = {}
    for i, p in enumerate(pods):
        (v,) = wait_kubelet_view(c, ns, p)
        cl = pvc(c, ns, claims[i])
        check(v.pv_name == f"pvc-{cl['metadata']['uid']}",
              f"PV of {claims[i]} is {v.pv_name}, expected pvc-<claim uid>")
        check(pv_bytes(v.pv) == GiB, f"PV {v.pv_name} capacity {v.pv['spec']['capacity']}")
        check(v.pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete",
              f"PV {v.pv_name} reclaim policy {v.pv['spec'].get('persistentVolumeReclaimPolicy')}")
        write_file(os.path.join(v.path, "hello.txt"), f"hello from {p}\n".encode())
        write_file(os.path.join(v.path, "blob"), payload(p))
        views[p] = v
    for p, v in views.items():
        check(read_file(os.path.join(v.path, "hello.txt")) == f"hello from {p}\n".encode(),
              f"{p}: hello.txt reads back wrong")
    # Restart the agent of web-0's node: its volumes are served again, data intact.
    node = views["web-0"].node
    rc = c.stop_agent(node)
    check(rc == 0, f"agent {node} exited {rc} on SIGTERM, expected 0")
    for v in views.values():
        if v.node == node:
            check(fuse_mount_count(v.mnt) == 0, f"{v.mnt} still mounted after its agent stopped")
    a = c.agents[node]
    c.start_agent(node, a.tiers, a.static, fdstore=a.fdstore)
    for p, v in views.items():
        (v2,) = wait_kubelet_view(c, ns, p)
        check(v2.path == v.path, f"{p}: path changed across the restart: {v.path} -> {v2.path}")
        check(fuse_mount_count(v2.mnt) == 1, f"{v2.mnt}: {fuse_mount_count(v2.mnt)} stacked mounts")
        check(read_file(os.path.join(v.path, "hello.txt")) == f"hello from {p}\n".encode(),
              f"{p}: hello.txt differs after restarting agent {node}")
        check(read_file(os.path.join(v.path, "blob")) == payload(p),
              f"{p}: blob differs after restarting agent {node}")
    check_alive(c)


@scenario("capacity")
def capacity(c):
    """Issue 7 §2: the scheduler sees published capacity; 20 claims never over-commit a tier."""
    ns = "e2e-capacity"
    a, b, cc = c.node_names
    tiers = {a: [Tier("fast", "512Mi"), Tier("standard", "2Gi")],
             b: [Tier("fast", "4Gi"), Tier("standard", "3Gi")],
             cc: [Tier("fast", "4Gi"), Tier("standard", "512Mi")]}
    start_fusevol(c, tiers)
    c.ensure_namespace(ns)

    # Part 1: claims that do not fit on node A go where they fit, first time.
    wait_capacities_published(c, "fusevol-fast", "fast", c.node_names)
    names = [f"fit-{i}" for i in range(3)]
    c.create(*[o for n in names for o in claim_with_pod(n, ns, "fusevol-fast", "1Gi")])
    seen = {n: set() for n in names}

    def all_bound():
        done = True
        for p in c.get("pvc", namespace=ns):
            n = p["metadata"]["name"]
            if n in seen:
                sel = (p["metadata"].get("annotations") or {}).get("volume.kubernetes.io/selected-node")
                if sel:
                    seen[n].add(sel)
                done &= (p.get("status") or {}).get("phase") == "Bound"
        return done
    wait_for(all_bound, 90, f"claims {names} to be Bound", interval=0.2)
    for n in names:
        node = pv_node(pv(c, pvc(c, ns, n)["spec"]["volumeName"]))
        check(node != a, f"{n} (1Gi) got a PV on {a}, whose fast tier has 512Mi")
        check(seen[n] == {node}, f"{n}: selected-node went through {sorted(seen[n])}, "
                                 f"expected only {node} (no rescheduling)")
        w = warnings(c, ns, "PersistentVolumeClaim", n)
        check(not w, f"{n}: unexpected Warning events {w}")
    wait_pods_bound(c, ns, names, 60)
    for n in names:
        wait_kubelet_view(c, ns, n)

    # Part 2: 20 claims at once; the standard tiers hold 2 + 3 + 0 of them.
    wait_capacities_published(c, "fusevol-standard", "standard", c.node_names)
    burst = [f"burst-{i:02d}" for i in range(20)]
    c.create(*[o for n in burst for o in claim_with_pod(n, ns, "fusevol-standard", "1Gi")])
    fits = 5

    def settled():
        bound = [n for n in bound_claims(c, ns) if n.startswith("burst-")]
        if len(bound) > fits:
            raise Fatal(f"{len(bound)} burst claims Bound, only {fits} fit: a tier is over-committed")
        return len(bound) == fits
    wait_for(settled, 180, f"{fits} of the 20 burst claims to be Bound", interval=1)
    time.sleep(5)  # nothing more binds, nothing over-commits
    bound = {n: p for n, p in bound_claims(c, ns).items() if n.startswith("burst-")}
    check(len(bound) == fits, f"{len(bound)} burst claims Bound after settling, expected {fits}")
    per_node = {n: 0 for n in c.node_names}
    for p in c.get("pv"):
        if p["spec"].get("storageClassName") == "fusevol-standard":
            per_node[pv_node(p)] += pv_bytes(p)
    totals = {n: parse_quantity(next(t.capacity for t in ts if t.name == "standard"))
              for n, ts in tiers.items()}
    for n in c.node_names:
        check(per_node[n] <= totals[n], f"node {n} tier standard over-committed: PVs "
                                        f"{per_node[n]} bytes > capacity {totals[n]}")

    def fvn_matches():
        for n in c.node_names:
            t = fvn_tier(c, n, "standard")
            if t["allocatedBytes"] != per_node[n]:
                raise E2EError(f"FusevolNode {n} standard allocatedBytes {t['allocatedBytes']} != "
                               f"sum of its PVs {per_node[n]}")
            check(t["allocatedBytes"] <= t["totalBytes"], f"FusevolNode {n} standard: {t}")
        return True
    wait_for(fvn_matches, 30, "FusevolNode standard allocation to match the PVs")
    # Claims that did not fit: no PV, and a Warning saying why.
    pv_claims = {(p["spec"].get("claimRef") or {}).get("uid") for p in c.get("pv")}
    for n in burst:
        if n in bound:
            continue
        cl = pvc(c, ns, n)
        check(cl["metadata"]["uid"] not in pv_claims, f"{n} is not Bound but has a PV")

        def explained():
            for m in warnings(c, ns, "PersistentVolumeClaim", n):
                if ("1Gi" in m or "1073741824" in m) and "free" in m:
                    return m
            for m in warnings(c, ns, "Pod", n):
                if "enough free storage" in m:
                    return m
            return None
        wait_for(explained, 60, f"a Warning on claim {n} saying what was requested and what is "
                                f"free (or on pod {n}: not enough free storage)", interval=1)
    check_alive(c)


@scenario("bad-input")
def bad_input(c):
    """Issue 7 §3: bad classes and claims get no PV and a Warning naming the field."""
    ns = "e2e-bad"
    start_fusevol(c, {n: [Tier("fast", "10Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    c.create(storage_class("e2e-unknown-param", tier="fast", foo="bar"),
             storage_class("e2e-bad-compression", tier="fast", compression="brotli"),
             storage_class("e2e-zstd", tier="fast", compression="zstd"))
    objs = (claim_with_pod("unknown-param", ns, "e2e-unknown-param", "1Gi") +
            claim_with_pod("bad-compression", ns, "e2e-bad-compression", "1Gi") +
            claim_with_pod("block", ns, "fusevol-fast", "1Gi", volume_mode="Block") +
            claim_with_pod("rwx", ns, "fusevol-fast", "1Gi", access_modes=("ReadWriteMany",)) +
            claim_with_pod("good", ns, "fusevol-fast", "1Gi") +
            claim_with_pod("zstd", ns, "e2e-zstd", "1Gi"))
    c.create(*objs)
    expect = {
        "unknown-param": ["foo", "tier"],            # the parameter, and the allowed ones
        "bad-compression": ["compression", "brotli", "none"],
        "block": ["Block", "Filesystem"],
        "rwx": ["ReadWriteMany", "ReadWriteOnce"],
    }
    for name, needles in expect.items():
        wait_warning(c, ns, "PersistentVolumeClaim", name, needles, timeout=60)
    # A good claim next to them is provisioned, so the controller is not just idle.
    wait_bound(c, ns, ["good", "zstd"], 90)
    check_compressed_volume(c, ns, "zstd", "zstd")
    time.sleep(3)
    uids = {pvc(c, ns, n)["metadata"]["uid"]: n for n in expect}
    for p in c.get("pv"):
        ref = p["spec"].get("claimRef") or {}
        check(ref.get("uid") not in uids and not (ref.get("namespace") == ns and ref.get("name") in expect),
              f"PV {p['metadata']['name']} was made for bad claim {ref.get('name')}")
    for name in expect:
        check(pvc(c, ns, name)["status"].get("phase") == "Pending", f"{name} is not Pending")
    check_alive(c)


ENCRYPTION_SECRET = "fusevol-volume-key"


@scenario("encryption")
def encryption(c):
    """Issue 14 §3: a class with `encryption: aes-256-gcm` gets volumes sealed under the
    master key of the Secret it names, which the agent may read only through the optional
    grant of deploy/encryption/ (get on that one Secret). What a pod writes reaches the
    node's disk only sealed; a class naming a Secret the agent cannot read or that does not
    exist leaves its PV unserved with a Warning saying what to fix."""
    ns = "e2e-encryption"
    start_fusevol(c, {n: [Tier("fast", "10Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    key = os.urandom(32).hex()
    c.kubectl("create", "secret", "generic", ENCRYPTION_SECRET, "-n", NAMESPACE,
              f"--from-literal=key={key}")
    c.kubectl("create", "secret", "generic", "not-granted", "-n", NAMESPACE,
              f"--from-literal=key={key}")
    c.kubectl("apply", "-f", str(c.deploy_dir / "encryption" / "rbac-agent-keys.yaml"))

    def enc_class(name, secret):
        return storage_class(name, tier="fast", encryption="aes-256-gcm",
                             encryptionSecretName=secret, encryptionSecretNamespace=NAMESPACE)
    c.create(enc_class("e2e-encrypted", ENCRYPTION_SECRET),
             enc_class("e2e-not-granted", "not-granted"),
             storage_class("e2e-no-secret", tier="fast", encryption="aes-256-gcm"))
    c.create(*claim_with_pod("sealed", ns, "e2e-encrypted", "1Gi"),
             *claim_with_pod("denied", ns, "e2e-not-granted", "1Gi"),
             *claim_with_pod("nosecret", ns, "e2e-no-secret", "1Gi"))
    wait_warning(c, ns, "PersistentVolumeClaim", "nosecret",
                 ["encryptionSecretName", "encryptionSecretNamespace"], timeout=60)
    wait_bound(c, ns, ["sealed"], 90)
    (v,) = wait_kubelet_view(c, ns, "sealed", timeout=60)
    marker = b"E2E-PLAINTEXT-MARKER-%d-" % os.getpid()
    write_file(os.path.join(v.path, marker.decode() + "name"), marker * 20000)
    disk = c.node_dir(v.node) / "disks" / "fast-0"
    out = subprocess.run([c.fusevol_bin, "volume", "inspect", "--data", str(disk), v.pv_name,
                          "--json"], capture_output=True, text=True, timeout=60)
    check(out.returncode == 0, f"volume inspect {v.pv_name} failed: {out.stderr}")
    info = json.loads(out.stdout)
    check((info.get("encryption") or {}).get("algorithm") == "aes-256-gcm",
          f"volume {v.pv_name} of an encrypted class: {info}")
    leaks = []
    for root, _, files in os.walk(disk):
        for f in files:
            try:
                data = open(os.path.join(root, f), "rb").read()
            except OSError:
                continue
            if marker in data:
                leaks.append(os.path.join(root, f))
    check(not leaks, f"plaintext of a file written through the pod found in {leaks}")
    # The not-granted Secret: Bound (the controller does not read keys), never served,
    # and a Warning on its PV that says what to grant.
    wait_bound(c, ns, ["denied"], 90)
    denied_pv = pvc(c, ns, "denied")["spec"]["volumeName"]
    wait_warning(c, "default", "PersistentVolume", denied_pv,
                 ["not-granted", "grant its service account"], timeout=60)
    check_alive(c)


@scenario("reconfigure")
def reconfigure(c):
    """Issue 15: per-node configuration changes without a restart. A tier added to one
    node's configuration file (written as the kubelet updates a ConfigMap volume: a new
    file renamed over the old) is published by the same agent process within a round and
    gets claims; removing a disk that holds a volume is refused with a Warning on the
    node's FusevolNode, and the volume stays served; an invalid file is reported and the
    running configuration kept."""
    ns = "e2e-reconfigure"
    start_fusevol(c, {n: [Tier("fast", "4Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    node = c.node_names[0]
    agent = c.agents[node]
    pid = agent.proc.pid
    original = agent.config_path.read_text()
    bulk_disk = c.node_dir(node) / "disks" / "bulk-0"
    bulk_disk.mkdir(parents=True, exist_ok=True)

    def rewrite(text):
        tmp = agent.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.rename(tmp, agent.config_path)
    rewrite(original + f'\n[[tiers]]\nname = "bulk"\ndisks = ["{bulk_disk}"]\ncapacity = "2Gi"\n')
    wait_for(lambda: fvn_tier(c, node, "bulk"), 40, f"FusevolNode {node} to publish tier bulk")
    check(agent.proc.alive() and agent.proc.pid == pid, "the agent restarted to apply its configuration")
    c.create(storage_class("e2e-bulk", tier="bulk"))
    c.create(*claim_with_pod("b", ns, "e2e-bulk", "1Gi"))
    wait_bound(c, ns, ["b"], 90)
    (v,) = wait_kubelet_view(c, ns, "b", timeout=60)
    check(v.node == node, f"a claim of tier bulk landed on {v.node}, the only bulk node is {node}")
    write_file(os.path.join(v.path, "before"), payload("before"))
    # The bulk disk holds that volume: removing the tier is refused, the volume served.
    rewrite(original)
    wait_warning(c, "default", "FusevolNode", node, ["holds volumes", str(bulk_disk)], timeout=40)
    write_file(os.path.join(v.path, "after"), payload("after"))
    check(fvn_tier(c, node, "bulk")["allocatedBytes"] == GiB, "tier bulk no longer counts its volume")
    # An invalid file: reported, nothing changes.
    rewrite("this is = not [ toml")
    wait_warning(c, "default", "FusevolNode", node, ["configuration not applied"], timeout=40)
    check(agent.proc.alive() and agent.proc.pid == pid, "the agent exited on an invalid configuration")
    check(open(os.path.join(v.path, "before"), "rb").read() == payload("before"), "data changed")
    rewrite(original)
    # [[nodes]] by labels: node b gets tier "lab" once the Node carries the label.
    other = c.agents[c.node_names[1]]
    lab_disk = c.node_dir(other.node) / "disks" / "lab-0"
    lab_disk.mkdir(parents=True, exist_ok=True)
    text = other.config_path.read_text()
    tmp = other.config_path.with_suffix(".tmp")
    tmp.write_text(text + f'\n[[nodes]]\nlabels = {{ "fusevol-e2e/disks" = "lab" }}\n'
                          f'[[nodes.tiers]]\nname = "lab"\ndisks = ["{lab_disk}"]\n')
    os.rename(tmp, other.config_path)
    time.sleep(12)
    check(all(t["name"] != "lab" for t in c.get("fusevolnodes", other.node)["status"]["tiers"]),
          f"{other.node} has tier lab without the label")
    c.kubectl("label", "node", other.node, "fusevol-e2e/disks=lab")
    wait_for(lambda: fvn_tier(c, other.node, "lab"), 90,
             f"FusevolNode {other.node} to publish tier lab after the Node was labelled")
    check(other.proc.alive(), "the agent of the labelled node exited")
    check_alive(c)


def check_compressed_volume(c, ns, pod_name, algorithm):
    """Issue 14 §2: the class's `compression` reaches the node: the volume of `pod_name` is
    created with `algorithm`, and text written through the pod's view is stored in a fraction
    of its size while the quota counts all of it (`fusevol volume inspect` on the node)."""
    (v,) = wait_kubelet_view(c, ns, pod_name)
    rows = b"".join(b"%d,row %d of a table a database keeps\n" % (i, i) for i in range(200_000))
    write_file(os.path.join(v.path, "table.csv"), rows)
    disk = c.node_dir(v.node) / "disks" / "fast-0"
    out = subprocess.run([c.fusevol_bin, "volume", "inspect", "--data", str(disk), v.pv_name,
                          "--json"], capture_output=True, text=True, timeout=60)
    check(out.returncode == 0, f"volume inspect {v.pv_name} failed: {out.stderr}")
    info = json.loads(out.stdout)
    comp = info.get("compression") or {}
    check(comp.get("algorithm") == algorithm,
          f"volume {v.pv_name} of class compression={algorithm} has compression {comp}")
    check(comp.get("logical_bytes") == len(rows), f"logical bytes {comp}, wrote {len(rows)}")
    stored = comp.get("stored_bytes") or 0
    check(0 < stored * 4 < len(rows), f"{len(rows)} bytes of text stored in {stored}: {comp}")
    check(info["used_bytes"] >= len(rows), f"usage {info['used_bytes']} below the data written")


@scenario("reclaim")
def reclaim(c):
    """Issue 7 §4: Delete wipes the data, then the PV, and frees capacity; Retain keeps both."""
    ns = "e2e-reclaim"
    start_fusevol(c, {n: [Tier("fast", "4Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    c.create(storage_class("e2e-retain", tier="fast", reclaim="Retain"))
    c.create(*claim_with_pod("del", ns, "fusevol-fast", "1Gi"),
             *claim_with_pod("keep", ns, "e2e-retain", "1Gi"))
    wait_bound(c, ns, ["del", "keep"], 90)
    wait_pods_bound(c, ns, ["del", "keep"], 60)
    (vd,) = wait_kubelet_view(c, ns, "del")
    (vk,) = wait_kubelet_view(c, ns, "keep")
    write_file(os.path.join(vd.path, "f"), payload("del"))
    write_file(os.path.join(vk.path, "f"), payload("keep"))
    check(vk.pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain",
          f"PV of keep has reclaim policy {vk.pv['spec']['persistentVolumeReclaimPolicy']}")
    free_before = fvn_tier(c, vd.node, "fast")["freeBytes"]
    alloc_before = fvn_tier(c, vd.node, "fast")["allocatedBytes"]
    vol_dir = os.path.dirname(vd.mnt)

    force_delete_pods(c, ns, ["del", "keep"])
    c.kubectl("delete", "pvc", "-n", ns, "del", "keep", "--wait=false")

    # Delete: the data goes first, then the PV object.
    order = []

    def deleted():
        pv_gone = pv(c, vd.pv_name) is None
        data_gone = not os.path.exists(vol_dir)
        if pv_gone and not data_gone:
            order.append(f"PV {vd.pv_name} gone while {vol_dir} still exists")
        return pv_gone and data_gone
    wait_for(deleted, 60, f"PV {vd.pv_name} and its data {vol_dir} to be deleted", interval=0.1)
    check(not order, order[0] if order else "")
    check(fuse_mount_count(vd.mnt) == 0, f"{vd.mnt} is still mounted")

    def freed():
        t = fvn_tier(c, vd.node, "fast")
        if t["freeBytes"] != free_before + GiB or t["allocatedBytes"] != alloc_before - GiB:
            raise E2EError(f"{vd.node} fast: {t}; before: free {free_before}, allocated {alloc_before}")
        return True
    wait_for(freed, 30, f"FusevolNode {vd.node} fast freeBytes to grow back by 1Gi")

    # Retain: the PV goes Released; the data stays readable on the node.
    wait_for(lambda: (pv(c, vk.pv_name) or {}).get("status", {}).get("phase") == "Released", 60,
             f"PV {vk.pv_name} (Retain) to be Released")
    time.sleep(3)
    check(pv(c, vk.pv_name) is not None, f"PV {vk.pv_name} (Retain) was deleted")
    check(is_live_fuse_mount(vk.mnt), f"{vk.mnt} (Retain, Released) is not served any more")
    check(read_file(os.path.join(vk.path, "f")) == payload("keep"), "retained data differs")
    check_alive(c)


@scenario("restarts")
def restarts(c):
    """Issue 7 §5: kill -9 an agent, and the leading controller in a burst of claims."""
    ns = "e2e-restarts"
    start_fusevol(c, {n: [Tier("fast", "20Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    first = [f"v-{i}" for i in range(3)]
    c.create(*[o for n in first for o in claim_with_pod(n, ns, "fusevol-fast", "1Gi")])
    wait_bound(c, ns, first, 90)
    wait_pods_bound(c, ns, first, 60)
    views = {n: wait_kubelet_view(c, ns, n)[0] for n in first}
    for n, v in views.items():
        write_file(os.path.join(v.path, "f"), payload(n))
    node = views["v-0"].node
    c.stop_agent(node, signal.SIGKILL)
    a = c.agents[node]
    c.start_agent(node, a.tiers, a.static, fdstore=a.fdstore)
    for n, v in views.items():
        (v2,) = wait_kubelet_view(c, ns, n)
        check(v2.path == v.path, f"{n}: path changed: {v.path} -> {v2.path}")
        check(fuse_mount_count(v.mnt) == 1,
              f"{v.mnt}: {fuse_mount_count(v.mnt)} fuse.fusevol mounts after the agent's kill -9 "
              f"and restart (expected the stale one replaced)")
        check(read_file(os.path.join(v.path, "f")) == payload(n), f"{n}: data differs after kill -9")

    # The leader dies in the middle of a burst; the other replica finishes it.
    leader = c.leader()
    idx = next(i for i, ctl in c.controllers.items() if ctl.identity == leader)
    burst = [f"b-{i:02d}" for i in range(12)]
    c.create(*[o for n in burst[:6] for o in claim_with_pod(n, ns, "fusevol-fast", "256Mi")])
    time.sleep(0.5)
    c.stop_controller(idx, signal.SIGKILL)
    c.create(*[o for n in burst[6:] for o in claim_with_pod(n, ns, "fusevol-fast", "256Mi")])
    wait_bound(c, ns, burst, 150)
    new_leader = c.leader()
    check(new_leader and new_leader != leader,
          f"Lease holder is {new_leader!r} after killing leader {leader!r}")
    claims = {p["metadata"]["uid"]: p["metadata"]["name"] for p in c.get("pvc", namespace=ns)}
    per_claim = {}
    for p in c.get("pv"):
        ref = p["spec"].get("claimRef") or {}
        if ref.get("namespace") == ns:
            per_claim.setdefault(ref.get("uid"), []).append(p["metadata"]["name"])
    for uid, name in claims.items():
        pvs = per_claim.get(uid, [])
        check(len(pvs) == 1, f"claim {name} has PVs {pvs}, expected exactly one")
        check(pvs[0] == f"pvc-{uid}", f"claim {name}: PV {pvs[0]}, expected pvc-{uid}")
    stray = set(per_claim) - set(claims)
    check(not stray, f"PVs for claims that do not exist: {[per_claim[u] for u in stray]}")
    wait_pods_bound(c, ns, burst, 60)
    for n in burst:
        wait_kubelet_view(c, ns, n)
    # The killed replica comes back as a follower and changes nothing.
    c.start_controller(idx)
    time.sleep(2)
    check(c.leader() == new_leader, f"Lease moved to {c.leader()!r} when {leader!r} came back")
    check_alive(c)


@scenario("static")
def static(c):
    """Issue 7 §6: static mode publishes PVs; a claim binds one; deleting it makes a fresh one."""
    ns = "e2e-static"
    a = c.node_names[0]
    pools = {"storage_class": "fusevol-static", "pools": [{"tier": "standard", "count": 2, "size": "1Gi"}]}
    # Static mode's extra permission (creating PVs) is not in the base.
    c.kubectl("apply", "-f", str(c.deploy_dir / "static" / "rbac-agent-static.yaml"))
    start_fusevol(c, {a: [Tier("standard", "10Gi")]}, static={a: pools})
    c.ensure_namespace(ns)

    def static_pvs():
        return {p["metadata"]["name"]: p for p in c.get("pv")
                if p["spec"].get("storageClassName") == "fusevol-static"}

    def published():
        pvs = static_pvs()
        avail = [p for p in pvs.values() if p.get("status", {}).get("phase") == "Available"]
        if len(avail) != 2:
            raise E2EError(f"static PVs: {[(n, p.get('status', {}).get('phase')) for n, p in pvs.items()]}")
        for p in avail:
            check(pv_bytes(p) == GiB, f"static PV {p['metadata']['name']} capacity {p['spec']['capacity']}")
            check(pv_node(p) == a, f"static PV {p['metadata']['name']} pinned to {pv_node(p)}")
        return pvs
    before = wait_for(published, 60, f"2 Available 1Gi static PVs of {a}", interval=0.5)
    c.create(*claim_with_pod("s", ns, "fusevol-static", "1Gi"))
    wait_bound(c, ns, ["s"], 60)
    wait_pods_bound(c, ns, ["s"], 60)
    (v,) = wait_kubelet_view(c, ns, "s")
    check(v.pv_name in before, f"claim s bound {v.pv_name}, not one of the static PVs {sorted(before)}")
    old_uid = v.pv["metadata"]["uid"]
    write_file(os.path.join(v.path, "secret"), b"old tenant's data\n")
    force_delete_pods(c, ns, ["s"])
    c.kubectl("delete", "pvc", "-n", ns, "s", "--wait=false")

    def fresh():
        pvs = published()
        uids = {p["metadata"]["uid"] for p in pvs.values()}
        if old_uid in uids:
            raise E2EError(f"PV {v.pv_name} (uid {old_uid}) is still there")
        return pvs
    after = wait_for(fresh, 90, "the used static PV to be wiped and a fresh one published", interval=0.5)
    for name, p in after.items():
        local = p["spec"]["local"]["path"]
        mnt = os.path.dirname(local)
        wait_for(lambda: is_live_fuse_mount(mnt), 30, f"static PV {name} to be served at {mnt}")
        check(not os.path.exists(os.path.join(local, "secret")),
              f"fresh static PV {name} still holds the old claim's file")
    check_alive(c)


@scenario("no-capacity-api", capacity_api=False)
def no_capacity_api(c):
    """Issue 7 §7: without CSIStorageCapacity the controller reschedules a claim off a full node."""
    ns = "e2e-nocap"
    a, b, cc = c.node_names
    tiers = {a: [Tier("fast", "512Mi")], b: [Tier("fast", "512Mi")], cc: [Tier("fast", "10Gi")]}
    start_fusevol(c, tiers)
    c.ensure_namespace(ns)
    res = c.kubectl("api-resources", "--api-group=storage.k8s.io")
    check("csistoragecapacities" not in res, f"the server serves CSIStorageCapacity:\n{res}")
    # Only node A can be picked: the scheduler selects it, the controller sends the claim back.
    c.kubectl("cordon", b, cc)
    c.create(*claim_with_pod("big", ns, "fusevol-fast", "1Gi"))
    msg = wait_warning(c, ns, "PersistentVolumeClaim", "big",
                       [("1Gi", "1073741824"), ("512Mi", "536870912")], timeout=60,
                       what=f"a Warning on claim big saying 1Gi was requested and {a} had 512Mi free")
    check(not [p for p in c.get("pv") if (p["spec"].get("claimRef") or {}).get("name") == "big"],
          f"a PV was created on the full node (event: {msg})")
    c.kubectl("uncordon", b, cc)
    wait_bound(c, ns, ["big"], 120)
    wait_pods_bound(c, ns, ["big"], 60)
    (v,) = wait_kubelet_view(c, ns, "big")
    check(v.node == cc, f"big ended on {v.node}, the only node where it fits is {cc}")
    # The controller noticed, and said so once.
    lines = {i: log_lines(ctl.proc, "csistoragecapacit") for i, ctl in c.controllers.items()}
    check(any(lines.values()), "no controller log line mentions CSIStorageCapacity not being served")
    for i, ls in lines.items():
        check(len(ls) <= 1, f"controller {i} mentions CSIStorageCapacity {len(ls)} times "
                            f"(expected once):\n" + "\n".join(ls[:5]))
    check_alive(c)


@scenario("observability")
def observability(c):
    """Issue 7 §8: FusevolNode capacity matches the PVs; /metrics answer and match df."""
    ns = "e2e-obs"
    tiers = {n: [Tier("fast", "4Gi"), Tier("standard", "2Gi")] for n in c.node_names}
    start_fusevol(c, tiers)
    c.ensure_namespace(ns)
    specs = [("o-fast-1", "fusevol-fast", "1Gi"), ("o-fast-2", "fusevol-fast", "512Mi"),
             ("o-std-1", "fusevol-standard", "1Gi"), ("o-std-2", "fusevol-standard", "256Mi")]
    c.create(*[o for n, cls, size in specs for o in claim_with_pod(n, ns, cls, size)])
    names = [s[0] for s in specs]
    wait_bound(c, ns, names, 90)
    wait_pods_bound(c, ns, names, 60)
    views = {n: wait_kubelet_view(c, ns, n)[0] for n in names}
    v = views["o-fast-1"]
    write_file(os.path.join(v.path, "three-mib"), payload("obs", 3 * MiB))
    write_file(os.path.join(v.path, "small"), b"x" * 1000)

    ct = class_tiers(c)

    def consistent():
        alloc = {(n, t.name): 0 for n, ts in tiers.items() for t in ts}
        for p in c.get("pv"):
            cls = p["spec"].get("storageClassName")
            if cls in ct and p["spec"].get("claimRef"):
                alloc[(pv_node(p), ct[cls])] += pv_bytes(p)
        for n, ts in tiers.items():
            st = fvn_status(c, n)
            got = {t["name"]: t for t in st.get("tiers") or []}
            for t in ts:
                g = got.get(t.name)
                check(g, f"FusevolNode {n} has no tier {t.name}")
                want = (parse_quantity(t.capacity), alloc[(n, t.name)])
                if (g["totalBytes"], g["allocatedBytes"]) != want or \
                        g["freeBytes"] != want[0] - want[1]:
                    raise E2EError(f"FusevolNode {n} tier {t.name}: {g}; expected total/allocated {want}")
            tot = sum(t["totalBytes"] for t in got.values())
            all_ = sum(t["allocatedBytes"] for t in got.values())
            check(st.get("totalBytes") == tot and st.get("allocatedBytes") == all_
                  and st.get("freeBytes") == tot - all_,
                  f"FusevolNode {n} sums: {st}")
        return True
    wait_for(consistent, 30, "every FusevolNode's per-tier total/allocated/free to match the PVs")
    # kubectl get shows them.
    out = c.kubectl("get", "fusevolnodes")
    lines = out.splitlines()
    header = lines[0].split()
    check(header[:5] == ["NAME", "TIERS", "TOTAL", "ALLOCATED", "FREE"], f"columns: {lines[0]}")
    for n in c.node_names:
        row = next((l.split() for l in lines[1:] if l.split()[0] == n), None)
        check(row, f"kubectl get fusevolnodes has no row {n}:\n{out}")
        st = fvn_status(c, n)
        check(row[1] == st.get("tierNames") and set(row[1].split(",")) == {"fast", "standard"},
              f"row {row}: TIERS")
        for col, key in ((2, "totalBytes"), (3, "allocatedBytes"), (4, "freeBytes")):
            shown = parse_quantity(row[col])
            check(abs(shown - st[key]) <= max(st[key] * 0.05, 1),
                  f"{n}: {header[col]} shows {row[col]}, status {key} is {st[key]}")
    # /metrics, /healthz and /readyz (ready: a round with the complete list of PVs applied).
    for n, ag in c.agents.items():
        check(http_get(ag.url + "/healthz")[0] == 200, f"agent {n} /healthz")
        code, body = http_get(ag.url + "/readyz")
        check(code == 200, f"agent {n} /readyz: {code} {body[:200]!r}")
    for i, ctl in c.controllers.items():
        check(http_get(ctl.url + "/readyz")[0] == 200, f"controller {i} /readyz")
    leaders = 0
    for i, ctl in c.controllers.items():
        code, text = http_get(ctl.url + "/metrics")
        check(code == 200, f"controller {i} /metrics: {code} {text[:200]!r}")
        families = openmetrics(text, f"controller {i}")
        leader = [s.value for s in families.get("fusevol_controller_leader", [])]
        check(len(leader) == 1, f"controller {i}: fusevol_controller_leader samples {leader}")
        leaders += int(leader[0])
    check(leaders == 1, f"{leaders} controller replicas say they lead, expected 1 (and 1 follower)")
    for n, ag in c.agents.items():
        code, text = http_get(ag.url + "/metrics")
        check(code == 200, f"agent {n} /metrics: {code}")
        openmetrics(text, f"agent {n}")

    def used_matches():
        code, text = http_get(c.agents[v.node].url + "/metrics")
        check(code == 200, f"agent {v.node} /metrics: {code} {text[:200]}")
        vals = [line for line in text.splitlines()
                if line.startswith("fusevol_volume_used_bytes{") and f'"{v.pv_name}"' in line]
        check(vals, f"agent {v.node} /metrics has no fusevol_volume_used_bytes for {v.pv_name}")
        metric = float(vals[0].rsplit(" ", 1)[1])
        used = df_used(v.mnt)
        frsize = os.statvfs(v.mnt).f_frsize
        if abs(metric - used) >= frsize:
            raise E2EError(f"metric {metric}, df used {used}")
        return metric
    used = wait_for(used_matches, 20, f"fusevol_volume_used_bytes of {v.pv_name} to match df")
    check(used >= 3 * MiB, f"used bytes {used} < the 3 MiB written")
    check_alive(c)


def openmetrics(text, who):
    """Parses a /metrics body with Prometheus' own OpenMetrics parser (strict: one `# EOF`,
    every family once, valid names and types); returns family name -> its samples."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and others on invalid input
        raise E2EError(f"{who} /metrics is not valid OpenMetrics: {e}\n{text[-1500:]}") from None
    out = {}
    for f in families:
        for sample in f.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


@scenario("delete-bound-pv")
def delete_bound_pv(c):
    """Issue 12 §1: `kubectl delete pv` of a Bound PV keeps its data and live mount until the claim goes."""
    ns = "e2e-delpv"
    # With the fd holder, as deploy/ runs the agents: its copy of the connection must not
    # keep the deleted volume's mount alive.
    start_fusevol(c, {n: [Tier("fast", "4Gi")] for n in c.node_names}, fdstore=True)
    c.ensure_namespace(ns)
    v, pod = pod_with_volume(c, ns, "db", hold="wal")
    pod.write_sync(b"committed before the delete\n")
    vol_dir = os.path.dirname(v.mnt)

    c.kubectl("delete", "pv", v.pv_name, "--wait=false")
    p = pv(c, v.pv_name)
    check(p and p["metadata"].get("deletionTimestamp"), f"PV {v.pv_name} has no deletionTimestamp: {p}")
    # 30 s of a database writing through the pod's bind mount, every write fsync'd.
    written = 1
    deadline = time.time() + 30
    while time.time() < deadline:
        pod.write_sync(b"row %d\n" % written)
        written += 1
        time.sleep(0.25)
    p = pv(c, v.pv_name)
    check(p is not None and p.get("status", {}).get("phase") == "Bound",
          f"PV {v.pv_name} after 30 s: {p and p.get('status')}")
    check(is_live_fuse_mount(v.mnt), f"{v.mnt} is not served any more after the PV delete")
    text = read_file(pod.dir / "wal")
    lines = text.count(b"\n")
    check(text.startswith(b"committed before the delete\n") and lines == written,
          f"the pod's file has {lines} lines, {written} were fsync'd")

    # The claim goes: Kubernetes releases the PV, and now the data goes, then the PV object.
    force_delete_pods(c, ns, ["db"])
    c.kubectl("delete", "pvc", "-n", ns, "db", "--wait=false")
    wait_for(lambda: pv(c, v.pv_name) is None and not os.path.exists(vol_dir), 90,
             f"PV {v.pv_name} and its data {vol_dir} to be deleted after the claim", interval=0.25)
    check(disconnected(lambda: pod.write_sync(b"after")),
          "the force-deleted pod's bind mount still writes after its volume was deleted")
    pod.release()
    check_alive(c)


@scenario("tenant-isolation", nodes=1)
def tenant_isolation(c):
    """Issue 12 §2: a force-deleted pod's bind mount reaches nothing once its volume is gone, never the next tenant's."""
    ns = "e2e-tenants"
    node = c.node_names[0]
    # With the fd holder, as deploy/ runs the agents: its copy of the old tenant's connection
    # must go with the volume, or the old pod would wait on it instead of failing.
    start_fusevol(c, {node: [Tier("fast", "4Gi")]}, fdstore=True)
    c.ensure_namespace(ns)
    v1, old = pod_with_volume(c, ns, "one", hold="wal")
    old.write_sync(b"tenant one\n")
    write_file(os.path.join(v1.path, "secret"), b"tenant one's secret")

    # The pod is force-deleted (its container, and bind mount, live on), the claim deleted.
    force_delete_pods(c, ns, ["one"])
    c.kubectl("delete", "pvc", "-n", ns, "one", "--wait=false")
    wait_for(lambda: pv(c, v1.pv_name) is None, 90, f"PV {v1.pv_name} to be deleted")

    # The next tenant gets a volume on the same node, from the same store.
    c.create(*claim_with_pod("two", ns, "fusevol-fast", "1Gi"))
    wait_bound(c, ns, ["two"], 90)
    wait_pods_bound(c, ns, ["two"], 60)
    (v2,) = wait_kubelet_view(c, ns, "two")
    check(v2.node == node, f"claim two landed on {v2.node}")
    write_file(os.path.join(v2.path, "secret"), b"tenant two's secret")
    write_file(os.path.join(v2.path, "wal"), b"tenant two's wal")

    # Everything the old pod can still try reaches nothing of tenant two.
    # The held file may still be answered from the old pod's own page cache (the kernel keeps
    # clean pages of an aborted connection), but only with tenant one's own bytes.
    try:
        os.lseek(old.fd, 0, os.SEEK_SET)
        got = os.read(old.fd, 4096)
        check(got == b"tenant one\n", f"the old pod's open file reads {got!r}")
    except OSError as e:
        check(e.errno in DISCONNECTED, f"reading the old pod's open file: {e!r}")
    check(disconnected(lambda: old.write_sync(b"more")), "the old pod's open file still writes")
    for name in ["secret", "wal"]:
        check(disconnected(lambda: read_file(old.dir / name)),
              f"the old pod's bind mount still reads {name}")
    check(disconnected(lambda: os.listdir(old.dir)), "the old pod's bind mount still lists")
    old.release()
    check(read_file(os.path.join(v2.path, "secret")) == b"tenant two's secret", "tenant two's data differs")
    check_alive(c)


@scenario("api-freeze")
def api_freeze(c):
    """Issue 12 §5: a frozen API server (SIGSTOP, 90 s) is no storage outage, also for an agent restarted meanwhile."""
    ns = "e2e-freeze"
    start_fusevol(c, {n: [Tier("fast", "4Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    v, pod = pod_with_volume(c, ns, "w", hold="log")
    agent = c.agents[v.node]
    apiserver = next(p for p in c.procs if p.name == "kube-apiserver")
    apiserver.send(signal.SIGSTOP)
    writes, unhealthy = 0, []
    try:
        deadline = time.time() + 90
        next_probe = 0
        while time.time() < deadline:
            pod.write_sync(b"write %d\n" % writes)
            writes += 1
            if time.time() >= next_probe:
                status, body = http_get(agent.url + "/healthz", timeout=5)
                if status != 200:
                    unhealthy.append((round(90 - (deadline - time.time())), status, body))
                next_probe = time.time() + 2
            time.sleep(0.2)
        check(not unhealthy, f"agent /healthz failed while the API server was frozen: {unhealthy[:5]}")
        check(agent.proc.alive(), "the agent died while the API server was frozen")
        lines = read_file(pod.dir / "log").count(b"\n")
        check(lines == writes, f"{writes} fsync'd writes, {lines} in the file")
        # Still frozen: the agent dies and starts again. It cannot reach the API server, so
        # it serves the volumes of its last run from local state, taking the live
        # connection over from the node's fd holder.
        pod.release()
        c.stop_agent(v.node, signal.SIGKILL)
        c.start_agent(v.node, agent.tiers, agent.static, wait=False, fdstore=agent.fdstore)
        agent = c.agents[v.node]
        wait_for(lambda: is_live_fuse_mount(v.mnt), 60,
                 f"{v.mnt} to be served again by an agent that started while the API server is frozen")
        got = read_file(os.path.join(v.path, "log")).count(b"\n")
        check(got == writes, f"after the restart the file has {got} lines, {writes} were fsync'd")
        wait_for(lambda: http_get(agent.url + "/healthz", timeout=5)[0] == 200, 30,
                 "the restarted agent's /healthz to answer 200 while the API server is frozen")
        # Alive and serving its last run's volumes, but not ready: it has not seen the
        # complete list of PVs yet (a rolling update would wait here).
        code, body = http_get(agent.url + "/readyz", timeout=5)
        check(code == 503 and "PVs" in body,
              f"the restarted agent's /readyz during the freeze: {code} {body[:200]!r}")
    finally:
        apiserver.send(signal.SIGCONT)
    check(is_live_fuse_mount(v.mnt), f"{v.mnt} is not served after the freeze")
    wait_for(lambda: http_get(agent.url + "/readyz", timeout=5)[0] == 200, 60,
             "the agent's /readyz to answer 200 once the API server is back")
    # The API is back: new claims are provisioned and served again.
    c.create(*claim_with_pod("after", ns, "fusevol-fast", "1Gi"))
    wait_bound(c, ns, ["after"], 180)
    wait_pods_bound(c, ns, ["after"], 60)
    wait_kubelet_view(c, ns, "after", timeout=60)
    check_alive(c)


@scenario("burst", default=False)
def burst(c):
    """Speed (not in the default set): FUSEVOL_E2E_BURST claims (200) over three nodes.
    Reports, from watches of claims and PVs and of the node's mount table: claim created ->
    Bound (what a user waits), the controller's share (selected-node seen -> PV created), the
    agent's share (PV created -> its FUSE mount served), and each process's RSS before and
    after (agent growth per served volume)."""
    n_claims = int(os.environ.get("FUSEVOL_E2E_BURST", "200"))
    # Immediate binding, claims without pods: no scheduler in the loop (kube-scheduler binds
    # ~1.2 WaitForFirstConsumer claims/s here), for RSS at many served volumes.
    immediate = os.environ.get("FUSEVOL_E2E_BURST_IMMEDIATE") == "1"
    ns = "e2e-burst"
    start_fusevol(c, {n: [Tier("fast", "1000Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    cls = "fusevol-fast"
    if immediate:
        cls = "e2e-burst-immediate"
        c.create(storage_class(cls, tier="fast", binding="Immediate"))
    seen, selected, created, bound = {}, {}, {}, {}
    pv_created, served = {}, {}
    stop = threading.Event()

    def rss_of_all():
        out = {}
        for label, proc in ([(f"controller {i}", x.proc) for i, x in c.controllers.items()] +
                            [(f"agent {n}", x.proc) for n, x in c.agents.items()]):
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmRSS:"):
                        out[label] = int(line.split()[1]) / 1024
            except (OSError, ValueError, IndexError):
                out[label] = float("nan")
        return out

    def watch_mounts():
        # The node's mount table, as the kubelet would find the served volumes.
        while not stop.is_set():
            t = time.monotonic()
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    left, _, right = line.partition(" - ")
                    parts = left.split()
                    if len(parts) > 4 and right.startswith("fuse") and "/volumes/" in parts[4]:
                        pv_name = parts[4].split("/volumes/", 1)[1].split("/", 1)[0]
                        served.setdefault(pv_name, t)
            time.sleep(0.05)

    def watch(path, on_event):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(c.server + path)
        req.add_header("Authorization", f"Bearer {c.admin_token}")
        with urllib.request.urlopen(req, context=ctx, timeout=900) as r:
            for line in r:
                if stop.is_set():
                    return
                on_event(json.loads(line), time.monotonic())

    def on_pvc(ev, t):
        o = ev["object"]
        uid = o["metadata"]["uid"]
        seen.setdefault(uid, t)
        if (o["metadata"].get("annotations") or {}).get("volume.kubernetes.io/selected-node"):
            selected.setdefault(uid, t)
        if (o.get("status") or {}).get("phase") == "Bound":
            bound.setdefault(uid, t)

    def on_pv(ev, t):
        ref = ev["object"]["spec"].get("claimRef") or {}
        if ev["type"] == "ADDED" and ref.get("namespace") == ns:
            created.setdefault(ref["uid"], t)
            pv_created.setdefault(ev["object"]["metadata"]["name"], t)
    rss_before = rss_of_all()
    threads = [threading.Thread(target=watch, args=(f"/api/v1/namespaces/{ns}/persistentvolumeclaims?watch=1", on_pvc), daemon=True),
               threading.Thread(target=watch, args=("/api/v1/persistentvolumes?watch=1", on_pv), daemon=True),
               threading.Thread(target=watch_mounts, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(1)
    names = [f"c-{i:03d}" for i in range(n_claims)]
    t0 = time.monotonic()
    for i in range(0, n_claims, 50):
        if immediate:
            c.create(*[claim(n, ns, cls, "16Mi") for n in names[i:i + 50]])
        else:
            c.create(*[o for n in names[i:i + 50] for o in claim_with_pod(n, ns, cls, "16Mi")])
    wait_bound(c, ns, names, max(600, 2 * n_claims))
    total = time.monotonic() - t0
    wait_for(lambda: all(p in served for p in pv_created), 300,
             "every PV of the burst to be served on its node", interval=1)
    time.sleep(1)
    stop.set()

    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")
    ctl_share = [(created[u] - selected[u]) * 1000 for u in created if u in selected]
    to_bound = [(bound[u] - selected[u]) * 1000 for u in bound if u in selected]
    claim_to_bound = [(bound[u] - seen[u]) * 1000 for u in bound if u in seen]
    agent_share = [(served[p] - pv_created[p]) * 1000 for p in pv_created if p in served]
    rss = rss_of_all()
    per_node = {}
    for p in c.get("pv"):
        ref = p["spec"].get("claimRef") or {}
        if ref.get("namespace") == ns:
            node = pv_node(p)
            per_node[node] = per_node.get(node, 0) + 1
    growth = {n: (rss[f"agent {n}"] - rss_before.get(f"agent {n}", float("nan"))) / k
              for n, k in per_node.items() if f"agent {n}" in rss}

    def ms(xs):
        return f"p50 {pct(xs, 50):.0f} ms, p99 {pct(xs, 99):.0f} ms (n={len(xs)})"
    print(f"    burst: {n_claims} claims Bound in {total:.1f}s\n"
          f"    claim created -> Bound: {ms(claim_to_bound)}\n"
          f"    selected-node -> PV created (controller): {ms(ctl_share)}\n"
          f"    selected-node -> Bound: {ms(to_bound)}\n"
          f"    PV created -> mount served (agent): {ms(agent_share)}\n"
          f"    volumes per node: {per_node}\n"
          f"    RSS MiB before: { {k: round(v, 1) for k, v in rss_before.items()} }\n"
          f"    RSS MiB after:  { {k: round(v, 1) for k, v in rss.items()} }\n"
          f"    agent RSS growth per served volume, MiB: { {k: round(v, 2) for k, v in growth.items()} }",
          flush=True)
    check(len(agent_share) == len(pv_created), f"{len(pv_created) - len(agent_share)} PVs never served")
    check_alive(c)


# =============================================================================================
# Issue 13 §3: nodes that go away

NODE_LOSS_OPT_IN = "local.fusevol.io/delete-claim-on-node-loss"


def pinned_claim_with_pod(name, ns, cls, size, node, annotations=None):
    """A claim `name` and a pod `name` using it, the pod held to `node` by a nodeSelector."""
    cl, p = claim_with_pod(name, ns, cls, size)
    if annotations:
        cl["metadata"]["annotations"] = annotations
    p["spec"]["nodeSelector"] = {HOSTNAME_LABEL: node}
    return [cl, p]


def deleting(obj):
    return obj is not None and bool(obj["metadata"].get("deletionTimestamp"))


@scenario("node-loss")
def node_loss(c):
    """Issue 13 §3: a deleted Node's FusevolNode, capacity and deleted PVs go; Bound PVs stay unless their claim or class opts in."""
    ns = "e2e-node-loss"
    start_fusevol(c, {n: [Tier("fast", "4Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    lost = c.node_names[1]
    opt_class = storage_class("e2e-node-loss", tier="fast")
    opt_class["metadata"]["annotations"] = {NODE_LOSS_OPT_IN: "true"}
    c.create(opt_class)
    c.create(*pinned_claim_with_pod("old", ns, "fusevol-fast", "256Mi", lost),
             *pinned_claim_with_pod("kept", ns, "fusevol-fast", "256Mi", lost),
             *pinned_claim_with_pod("opt-claim", ns, "fusevol-fast", "256Mi", lost,
                                    annotations={NODE_LOSS_OPT_IN: "true"}),
             *pinned_claim_with_pod("opt-class", ns, "e2e-node-loss", "256Mi", lost))
    names = ["old", "kept", "opt-claim", "opt-class"]
    wait_bound(c, ns, names, 90)
    wait_pods_bound(c, ns, names, 60)
    views = {n: wait_kubelet_view(c, ns, n)[0] for n in names}
    for n, v in views.items():
        check(v.node == lost, f"claim {n} landed on {v.node}, not {lost}")
        write_file(os.path.join(v.path, "f"), payload(n))
    for cls in ["fusevol-fast", "e2e-node-loss"]:
        wait_capacities_published(c, cls, "fast", c.node_names)

    # The machine dies, its agent with it. Then claim `old` is deleted: its PV is Released and
    # deleted, and hangs on the data-cleanup finalizer that no agent will remove.
    agent = c.agents[lost]
    c.stop_agent(lost, signal.SIGKILL)
    force_delete_pods(c, ns, ["old"])
    c.kubectl("delete", "pvc", "-n", ns, "old", "--wait=false")
    old_pv = views["old"].pv_name
    wait_for(lambda: deleting(pv(c, old_pv)), 60, f"PV {old_pv} to be Released and deleted")
    time.sleep(5)
    check(pv(c, old_pv) is not None, f"PV {old_pv} went although no agent cleaned it up")

    # The operator deletes the Node. Nothing happens within the grace period (30 s).
    t0 = time.time()
    c.kubectl("delete", "node", lost)
    time.sleep(10)
    check(pv(c, old_pv) is not None, f"PV {old_pv} went within the grace period")
    check(c.get("fusevolnodes", lost, check=False) is not None,
          f"FusevolNode {lost} went within the grace period")
    wait_for(lambda: pv(c, old_pv) is None, 90, f"PV {old_pv} of the deleted node to go")
    took = time.time() - t0
    check(took >= 28, f"PV {old_pv} went {took:.0f} s after the Node, before the 30 s grace")
    wait_for(lambda: c.get("fusevolnodes", lost, check=False) is None, 30,
             f"FusevolNode {lost} to be deleted")
    events = [e for e in c.events("default", kind="PersistentVolume", name=old_pv)
              if e.get("reason") == "DataGoneWithNode"]
    check(events and lost in events[0].get("message", ""),
          f"no DataGoneWithNode event naming {lost} on PV {old_pv}: {events}")

    def capacity_withdrawn():
        for cls in ["fusevol-fast", "e2e-node-loss"]:
            caps = capacities(c, cls)
            if lost in caps or set(caps) != set(c.node_names) - {lost}:
                raise E2EError(f"class {cls}: capacity published for {sorted(caps)}")
        return True
    wait_for(capacity_withdrawn, 30, f"the CSIStorageCapacity objects of {lost} to go")

    # Opted-in claims (on the claim, on the class) are deleted; their pods, bound to the gone
    # node, go as the pod garbage collector would delete them.
    for n in ["opt-claim", "opt-class"]:
        wait_for(lambda: pvc(c, ns, n) is None or deleting(pvc(c, ns, n)), 30,
                 f"opted-in claim {n} to be deleted")
    force_delete_pods(c, ns, ["kept", "opt-claim", "opt-class"])
    for n in ["opt-claim", "opt-class"]:
        wait_for(lambda: pvc(c, ns, n) is None and pv(c, views[n].pv_name) is None, 90,
                 f"claim {n} and its PV {views[n].pv_name} to go")
    wait_warning(c, ns, "PersistentVolumeClaim", "opt-claim",
                 ["is gone", f"the claim has {NODE_LOSS_OPT_IN}=true"])
    wait_warning(c, ns, "PersistentVolumeClaim", "opt-class",
                 ["is gone", f"StorageClass e2e-node-loss has {NODE_LOSS_OPT_IN}=true"])

    # The Bound claim without opt-in keeps its PV, and is told so.
    kept = views["kept"]
    check((pvc(c, ns, "kept") or {}).get("status", {}).get("phase") == "Bound",
          "claim kept is not Bound any more")
    kept_pv = pv(c, kept.pv_name)
    check(kept_pv is not None and kept_pv["status"].get("phase") == "Bound"
          and not deleting(kept_pv), f"PV {kept.pv_name} of claim kept: {kept_pv}")
    wait_warning(c, ns, "PersistentVolumeClaim", "kept", ["is gone", "keeps it"])

    # The node comes back (kubelet registers it again, the agent starts): the kept volume is
    # served with its data, the node's FusevolNode and capacity are back and stay.
    c.add_node(lost)
    c.start_agent(lost, agent.tiers)
    wait_for(lambda: is_live_fuse_mount(kept.mnt), 60, f"{kept.mnt} to be served again")
    check(read_file(os.path.join(kept.path, "f")) == payload("kept"), "kept data differs")
    for cls in ["fusevol-fast", "e2e-node-loss"]:
        wait_capacities_published(c, cls, "fast", c.node_names)
    time.sleep(12)
    check(c.get("fusevolnodes", lost, check=False) is not None,
          f"FusevolNode {lost} of the returned node was deleted")
    check(pv(c, kept.pv_name) is not None, f"PV {kept.pv_name} went after the node returned")


# Issue 13 §2: online volume expansion

RESIZE_CONDITIONS = {"Resizing", "FileSystemResizePending"}


def df_size(path):
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def patch_request(c, ns, name, size, check=True):
    """`kubectl patch pvc` of the claim's storage request, as an operator types it."""
    return c.kubectl("patch", "pvc", "-n", ns, name, "--type=merge", "-p",
                     json.dumps({"spec": {"resources": {"requests": {"storage": size}}}}),
                     check=check)


def volume_sizes(c, ns, name, pv_name, mount):
    """Every place an expansion shows: the claim's status and resize conditions, the PV's
    capacity, volume-spec quota and the agent's applied quota, and df of the mount."""
    cl = pvc(c, ns, name)
    p = pv(c, pv_name)
    ann = p["metadata"].get("annotations") or {}
    conds = {x["type"] for x in (cl.get("status") or {}).get("conditions") or []}
    return {
        "claim status": parse_quantity(cl["status"]["capacity"]["storage"]),
        "resize conditions": sorted(conds & RESIZE_CONDITIONS),
        "PV capacity": pv_bytes(p),
        "PV quota": json.loads(ann[f"{PROVISIONER}/volume-spec"])["quotaBytes"],
        "applied quota": int(ann.get(f"{PROVISIONER}/applied-quota", "0")),
        "df": df_size(mount),
    }


def all_sizes(size):
    return {"claim status": size, "resize conditions": [], "PV capacity": size, "PV quota": size,
            "applied quota": size, "df": size}


def wait_sizes(c, ns, v, pod, size, timeout, what):
    def ok():
        got = volume_sizes(c, ns, v.claim, v.pv_name, pod.dir)
        if got != all_sizes(size):
            raise E2EError(f"{got}")
        return got
    return wait_for(ok, timeout, f"every size of claim {v.claim} to be {size} ({what})", interval=0.5)


@scenario("expand")
def expand(c):
    """Issue 13 §2: `kubectl patch pvc` grows a claim in use live (df in the pod, data kept); beyond the tier's free space: a Warning, nothing changes."""
    ns = "e2e-expand"
    start_fusevol(c, {n: [Tier("fast", "4Gi")] for n in c.node_names})
    c.ensure_namespace(ns)
    v, pod = pod_with_volume(c, ns, "db", hold="wal")
    pod.write_sync(b"committed before the grow\n")
    blob = payload("expand", 8 * MiB)
    write_file(pod.dir / "blob", blob)
    wait_sizes(c, ns, v, pod, GiB, 30, "before the grow")

    # Grow 1Gi -> 2Gi while the pod writes through its bind mount.
    t0 = time.monotonic()
    patch_request(c, ns, "db", "2Gi")
    writes, df_at = 1, None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pod.write_sync(b"row %d\n" % writes)
        writes += 1
        if df_at is None and df_size(pod.dir) == 2 * GiB:
            df_at = time.monotonic() - t0
        if df_at is not None and volume_sizes(c, ns, "db", v.pv_name, pod.dir) == all_sizes(2 * GiB):
            break
        time.sleep(0.1)
    done_at = time.monotonic() - t0
    got = volume_sizes(c, ns, "db", v.pv_name, pod.dir)
    check(got == all_sizes(2 * GiB), f"60 s after the patch to 2Gi: {got}")
    check(is_live_fuse_mount(v.mnt) and fuse_mount_count(v.mnt) == 1,
          f"{v.mnt}: not one live mount after the grow")
    wal = read_file(pod.dir / "wal")
    lines = wal.count(b"\n")
    check(wal.startswith(b"committed before the grow\n") and lines == writes,
          f"the pod's file has {lines} lines, {writes} were fsync'd")
    check(read_file(pod.dir / "blob") == blob, "the data written before the grow differs")
    # The pod can use the new space: 1.1 GiB, more than the old quota.
    big = pod.dir / "big"
    with open(big, "wb") as f:
        chunk = payload("big", 16 * MiB)
        for _ in range(69):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(big)
    reasons = [e.get("reason") for e in c.events(ns, kind="PersistentVolumeClaim", name="db")]
    for r in ("Resizing", "VolumeResizeSuccessful"):
        check(r in reasons, f"no {r} event on the claim: {reasons}")
    # kube-controller-manager's ExternalExpanding is a Warning in 1.20 (no in-tree plugin
    # matches a `local` PV); fusevol's own must be none.
    ours = [(e.get("reason"), e.get("message")) for e in
            c.events(ns, kind="PersistentVolumeClaim", name="db", type_="Warning")
            if e.get("reason") != "ExternalExpanding"]
    check(not ours, f"Warnings during a grow that fits: {ours}")
    check(fvn_tier(c, v.node, "fast")["allocatedBytes"] == 2 * GiB,
          f"FusevolNode {v.node} allocated: {fvn_tier(c, v.node, 'fast')}")
    print(f"    expand: 1Gi -> 2Gi: df in the pod after {df_at:.1f}s, claim status after "
          f"{done_at:.1f}s; kube-controller-manager: "
          f"{'ExternalExpanding' if 'ExternalExpanding' in reasons else 'no ExternalExpanding'} event",
          flush=True)

    # The API server refuses a shrink itself: nothing of it reaches the controller.
    res = patch_request(c, ns, "db", "1Gi", check=False)
    check(not isinstance(res, str) and "less than previous value" in res.stderr,
          f"a shrink to 1Gi was not refused by the API server: {res}")

    # Beyond the node's free space (4Gi tier, 2Gi allocated): a Warning naming what is free.
    patch_request(c, ns, "db", "8Gi")
    msg = wait_warning(c, ns, "PersistentVolumeClaim", "db",
                       ["cannot grow", "to 8Gi", "free 2Gi"], timeout=60)
    time.sleep(5)
    got = volume_sizes(c, ns, "db", v.pv_name, pod.dir)
    check(got == all_sizes(2 * GiB), f"a refused grow changed something: {got} ({msg})")
    pod.write_sync(b"after the refused grow\n")
    check(read_file(pod.dir / "wal").endswith(b"after the refused grow\n"), "the pod's file")
    pod.release()
    check_alive(c)


# -- issue 13 §1: agent restarts that pods never notice -------------------------------------

POD_WRITER = r"""
import json, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n, errors, samples = 0, [], []
end = time.time() + 300
while time.time() < end and not os.path.exists(stop):
    start = time.time()
    try:
        os.write(fd, b"write %08d\n" % n)
        os.fsync(fd)
        n += 1
    except OSError as e:
        errors.append(f"write {n}: {e}")
    samples.append((start, time.time() - start))
    time.sleep(0.05)
os.close(fd)
print(json.dumps({"writes": n, "errors": errors, "samples": samples}))
"""


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@scenario("agent-restart")
def agent_restart(c):
    """Issue 13 §1: kill -9 and SIGTERM restarts of an agent serving through its node's fd holder, with a pod writing and fsyncing through its bind mount every 50 ms: no write fails, none is lost, no remount."""
    ns = "e2e-restart"
    node = c.node_names[0]
    start_fusevol(c, {node: [Tier("fast", "4Gi")]}, controllers=1, fdstore=True)
    c.ensure_namespace(ns)
    v, pod = pod_with_volume(c, ns, "w", hold=None)
    check(fuse_mount_count(v.mnt) == 1, f"{v.mnt}: not one mount")
    # The "container": its own process holds the file open (a process that spawns the next
    # agent must not: the exec would flush the file, waiting for that very agent).
    restarts = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGTERM]
    stop = c.tmp / "writer.stop"
    writer = subprocess.Popen([sys.executable, "-c", POD_WRITER, str(pod.dir / "log"), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    windows = []
    try:
        time.sleep(3)
        for sig in restarts:
            t0 = time.time()
            c.restart_agent(node, sig, wait=False)
            log = c.agents[node].proc.log_path
            wait_for(lambda: b"took over the live FUSE connection" in
                     log.read_bytes().split(b"=== ")[-1], 60,
                     f"the agent restarted after {sig.name} to take the mount over")
            windows.append((sig.name, t0, time.time()))
            if sig == signal.SIGTERM:
                # A planned stop drains: the old agent answered what it had read first.
                old = log.read_bytes().split(b"=== ")[-2]
                check(b"drained for the hand-over" in old and b"late=0" in old,
                      f"the SIGTERM'd agent did not drain its connections:\n{old[-2000:].decode(errors='replace')}")
            c.wait_agent_ready(node, 60)
            time.sleep(2)
        # The holder itself dies and comes back empty: the agent hands it its connections
        # again within a round, so the next agent crash still ends no mount.
        holder = c.fdstores[node]
        holder.kill9()
        c.start_fdstore(node)
        wait_for(lambda: b"holding key=" in c.fdstores[node].log_path.read_bytes().split(b"=== ")[-1],
                 30, "the agent to hand its connections to the restarted holder")
        t0 = time.time()
        c.restart_agent(node, signal.SIGKILL, wait=False)
        log = c.agents[node].proc.log_path
        wait_for(lambda: b"took over the live FUSE connection" in log.read_bytes().split(b"=== ")[-1],
                 60, "the agent to take the mount over after the holder's restart")
        windows.append(("SIGKILL after holder restart", t0, time.time()))
        c.wait_agent_ready(node, 60)
        time.sleep(2)
        stop.touch()
        out, err = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
    check(writer.returncode == 0, f"the pod's writer failed: {err.decode()[-2000:]}")
    result = json.loads(out)
    check(not result["errors"], f"writes failed across agent restarts: {result['errors'][:5]}")
    lines = read_file(pod.dir / "log").count(b"\n")
    check(lines == result["writes"], f"{result['writes']} fsync'd writes, {lines} in the file")
    check(fuse_mount_count(v.mnt) == 1, f"{v.mnt}: {fuse_mount_count(v.mnt)} mounts after the restarts (a remount?)")
    check(is_live_fuse_mount(v.mnt), f"{v.mnt} not served after the restarts")
    longest = []
    for name, t0, t1 in windows:
        during = [d for s, d in result["samples"] if t0 - 0.1 <= s <= t1 + 0.5]
        longest.append(max(during) if during else 0.0)
    print(f"    {result['writes']} writes, 0 failed; longest write per restart "
          f"({', '.join(n for n, _, _ in windows)}): {', '.join(f'{x * 1000:.0f} ms' for x in longest)}; "
          f"p50 {percentile(longest, 0.5) * 1000:.0f} ms, p99 {percentile(longest, 0.99) * 1000:.0f} ms; "
          f"all writes p50 {percentile([d for _, d in result['samples']], 0.5) * 1000:.1f} ms")
    pod.release()
    check_alive(c)
