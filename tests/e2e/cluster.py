"""A real Kubernetes v1.20.2 control plane on 127.0.0.1 for fusevol's end-to-end tests.

    with Cluster(REPO_ROOT) as c:            # etcd, apiserver, controller-manager, scheduler,
        c.kubectl("get", "nodes")            # three Ready nodes, `kubectl apply -k deploy/`
        c.start_agent("node-a", [Tier("fast", "10Gi")])
        c.start_controller(0)

Everything runs as a host process of this machine, started from a fresh temporary directory;
leaving the `with` block (normally, on a failed assertion, on Ctrl-C or SIGTERM turned into
KeyboardInterrupt by the runner) stops every process by its pid (SIGTERM, then SIGKILL),
lazily unmounts every mount under the temporary directory and removes it. Python 3 standard
library only. The control plane binaries come from tests/e2e/build-k8s.sh.

No kubelet runs: nodes are API objects marked Ready by the harness, pods get bound to nodes
and never start. A test plays the kubelet's part through the PV's `local.path` on the host.
"""

import base64
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_CACHE = Path(os.environ.get("FUSEVOL_K8S_CACHE", "/var/tmp/fusevol-k8s-v1.20.2"))
K8S_BIN = K8S_CACHE / "bin"
ETCD = os.environ.get("FUSEVOL_ETCD", "/usr/bin/etcd")
DEFAULT_FUSEVOL_BIN = "/var/tmp/fusevol-target/release/fusevol"
NAMESPACE = "fusevol-system"
AGENT_SA = "fusevol-agent"
CONTROLLER_SA = "fusevol-controller"
DEFAULT_NODES = ("node-a", "node-b", "node-c")
HOSTNAME_LABEL = "kubernetes.io/hostname"
FUSE_FSTYPE = "fuse.fusevol"

# kube-controller-manager without the controllers that need a kubelet or a cloud: without the
# node lifecycle controller, nodes that no kubelet heartbeats stay Ready.
KCM_CONTROLLERS = ("*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle,-route,-service,"
                   "-attachdetach,-csrsigning,-csrapproving,-bootstrapsigner,-tokencleaner")


class E2EError(Exception):
    """A failed expectation: its message is what the runner prints as the reason."""


class Fatal(E2EError):
    """A failure that waiting longer cannot fix (a process exited): `wait_for` re-raises it."""


class KubectlError(E2EError):
    def __init__(self, args, rc, stdout, stderr):
        self.args_ = list(args)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"kubectl {' '.join(self.args_)} exited {rc}: {stderr.strip() or stdout.strip()}")

    @property
    def forbidden(self):
        return "forbidden" in self.stderr.lower()


# ---------------------------------------------------------------------------------------------
# Small helpers


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_UNITS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def parse_quantity(q):
    """Bytes of a Kubernetes quantity (`1Gi`, `500M`, `1.5Gi`, `1073741824`, `1e3`)."""
    if isinstance(q, (int, float)):
        return int(q)
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([kMGTPE]i?|)\s*", str(q))
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    from decimal import Decimal
    return int(Decimal(m.group(1)) * _UNITS[m.group(2)])


def mounts():
    """[(mountpoint, fstype)] from /proc/mounts (octal escapes decoded)."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
                out.append((mp, parts[2]))
    return out


def fuse_mount_count(path):
    """How many fuse.fusevol mounts are stacked at `path`. Never touches `path` itself: a
    mount the fd holder keeps while no agent serves it would make a stat wait."""
    path = os.path.join(os.path.realpath(os.path.dirname(str(path))), os.path.basename(str(path)))
    return sum(1 for mp, ty in mounts() if mp == str(path) and ty == FUSE_FSTYPE)


# A stat of a mount nobody serves waits killably in the kernel (the fd holder keeps the
# connection): such a probe runs in a child process, SIGKILLed after this.
LIVE_PROBE_TIMEOUT = 10
_LIVE_PROBE = "import os, sys; os.statvfs(sys.argv[1]); os.listdir(sys.argv[1])"


def is_live_fuse_mount(path, timeout=LIVE_PROBE_TIMEOUT):
    """Is `path` a fuse.fusevol mount point whose server answers (stat works, within
    `timeout` s)?"""
    if not any(mp == str(path) and ty == FUSE_FSTYPE for mp, ty in mounts()):
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", _LIVE_PROBE, str(path)], timeout=timeout,
                               stdin=subprocess.DEVNULL, capture_output=True)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def http_get(url, timeout=3):
    """(status, body text) of a plain-HTTP GET; (None, error) when it cannot connect."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError) as e:
        return None, str(e)


def tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text):
    return ANSI.sub("", text)


def wait_for(predicate, timeout, what, interval=0.25):
    """Calls `predicate` until it returns something truthy, and returns that. Exceptions from
    the predicate count as "not yet" (the last one is reported); on timeout raises E2EError
    naming `what` and the last value or exception seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = f"last value: {value!r}"
        except Fatal:
            raise
        except (E2EError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
            last = f"last error: {e}"
        if time.monotonic() >= deadline:
            raise E2EError(f"timed out after {timeout:g}s waiting for {what} ({last})")
        time.sleep(interval)


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup():
    # If the harness dies without cleaning up (SIGKILL), its children get SIGTERM rather than
    # living on. New session: a Ctrl-C on the terminal reaches only the harness, which then
    # stops everything in order (agents unmount before the API server goes away).
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Proc:
    """A process the harness started, its log file, and how to stop it."""

    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
        log.flush()
        full_env = dict(os.environ)
        if env:
            full_env.update({k: str(v) for k, v in env.items()})
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=full_env, cwd=cwd, start_new_session=True, preexec_fn=_child_setup)
        finally:
            log.close()
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def send(self, sig):
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Sends `sig`, waits up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.alive():
            self.send(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.popen.wait(timeout=30)
        return self.popen.returncode

    def kill9(self):
        self.send(signal.SIGKILL)
        self.popen.wait(timeout=30)
        return self.popen.returncode

    def log_text(self):
        try:
            return strip_ansi(self.log_path.read_text("utf-8", "replace"))
        except OSError:
            return ""


class Tier:
    """One `[[tiers]]` table of an agent's configuration."""

    def __init__(self, name, capacity=None, reserved=None):
        self.name = name
        self.capacity = capacity
        self.reserved = reserved

    def __repr__(self):
        return f"Tier({self.name!r}, {self.capacity!r})"


class Agent:
    def __init__(self, node, root, config_path, port, proc, tiers, static):
        self.node = node
        self.root = root
        self.config_path = config_path
        self.port = port
        self.proc = proc
        self.tiers = tiers
        self.static = static
        self.fdstore = False

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


class Controller:
    def __init__(self, index, identity, port, proc):
        self.index = index
        self.identity = identity
        self.port = port
        self.proc = proc

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def _toml_str(s):
    return json.dumps(str(s))  # a TOML basic string for the paths and names used here


# ---------------------------------------------------------------------------------------------


class Cluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler, N Ready nodes and
    fusevol's `deploy/` applied, all on 127.0.0.1; fusevol agents and controllers on demand."""

    def __init__(self, repo_root=REPO_ROOT, nodes=DEFAULT_NODES, capacity_api=True,
                 fusevol_bin=None, label="e2e", verbose=False, allow_apply_failure=False):
        self.repo_root = Path(repo_root)
        # FUSEVOL_E2E_DEPLOY: another kustomize directory to install instead of deploy/.
        self.deploy_dir = Path(os.environ.get("FUSEVOL_E2E_DEPLOY") or self.repo_root / "deploy")
        if isinstance(nodes, int):
            nodes = [f"node-{chr(ord('a') + i)}" if i < 26 else f"node-{i}" for i in range(nodes)]
        self.node_names = list(nodes)
        self.capacity_api = capacity_api
        self.fusevol_bin = fusevol_bin or os.environ.get("FUSEVOL_BIN", DEFAULT_FUSEVOL_BIN)
        self.label = label
        self.verbose = verbose
        self.tmp = None
        self.procs = []          # control-plane processes, in start order
        self.agents = {}         # node -> Agent (the current process)
        self.controllers = {}    # index -> Controller
        self.other_procs = []    # agent/controller processes that were replaced (restarts)
        self.fdstores = {}       # node -> its `fusevol fdstore` Proc
        self.timings = {}
        self.apply_output = ""
        self.apply_stdout = ""
        self.apply_rc = None
        self.allow_apply_failure = allow_apply_failure
        self.kubeconfigs = {}    # "admin" / ServiceAccount name -> path
        self.tokens = {}
        self.api_port = None
        self._stopped = False

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.dump_logs()
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.dump_logs()
        self.stop()
        return False

    def log(self, msg):
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # -- start --------------------------------------------------------------------------------

    def start(self):
        t0 = time.monotonic()
        for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"):
            if not (K8S_BIN / b).exists():
                raise E2EError(f"{K8S_BIN / b} is missing: run tests/e2e/build-k8s.sh")
        base = os.environ.get("FUSEVOL_E2E_TMP") or None
        self.tmp = Path(tempfile.mkdtemp(prefix=f"fusevol-{self.label}-", dir=base))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        pki = self.tmp / "pki"
        pki.mkdir()

        # ServiceAccount token signing key pair.
        sa_key, sa_pub = pki / "sa.key", pki / "sa.pub"
        self._run(["openssl", "genrsa", "-out", sa_key, "2048"])
        self._run(["openssl", "rsa", "-in", sa_key, "-pubout", "-out", sa_pub])
        self.admin_token = secrets.token_hex(24)
        tokens = self.tmp / "tokens.csv"
        tokens.write_text(f"{self.admin_token},admin,admin,system:masters\n")
        tokens.chmod(0o600)

        # etcd
        etcd_port, peer_port = free_port(), free_port()
        etcd = self._spawn("etcd", [
            ETCD, "--name", "e2e", "--data-dir", self.tmp / "etcd",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"e2e=http://127.0.0.1:{peer_port}",
            "--log-level", "warn",
        ])
        wait_for(lambda: self._alive(etcd) and
                 http_get(f"http://127.0.0.1:{etcd_port}/health")[0] == 200,
                 30, "etcd /health")

        # kube-apiserver
        self.api_port = free_port()
        args = [
            K8S_BIN / "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.api_port}", "--insecure-port=0",
            "--advertise-address=127.0.0.1", f"--cert-dir={pki}",
            f"--token-auth-file={tokens}", "--authorization-mode=RBAC",
            f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/24", "--allow-privileged=true",
            "--profiling=false",
        ]
        if self.capacity_api:
            args += ["--feature-gates=CSIStorageCapacity=true",
                     "--runtime-config=storage.k8s.io/v1alpha1=true"]
        apiserver = self._spawn("kube-apiserver", args)
        self.server = f"https://127.0.0.1:{self.api_port}"
        wait_for(lambda: self._alive(apiserver) and self.api("GET", "/readyz", raw=True)[0] == 200,
                 90, "kube-apiserver /readyz")
        self.kubeconfigs["admin"] = self._write_kubeconfig("admin", self.admin_token, None)
        self.timings["apiserver_ready"] = time.monotonic() - t0

        kc = self.kubeconfigs["admin"]
        common = [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                  f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1",
                  "--secure-port=0", "--port=0", "--leader-elect=false"]
        self._spawn("kube-controller-manager", [
            K8S_BIN / "kube-controller-manager", *common,
            f"--controllers={KCM_CONTROLLERS}",
            f"--service-account-private-key-file={sa_key}",
            f"--root-ca-file={pki / 'apiserver.crt'}",
            "--pvclaimbinder-sync-period=5s",
        ])
        sched_args = [K8S_BIN / "kube-scheduler", *common]
        if self.capacity_api:
            sched_args.append("--feature-gates=CSIStorageCapacity=true")
        self._spawn("kube-scheduler", sched_args)

        for n in self.node_names:
            self.add_node(n)
        self.timings["nodes_ready"] = time.monotonic() - t0

        # fusevol's manifests, as a user installs them.
        res = self.kubectl_run("apply", "-k", str(self.deploy_dir))
        self.apply_output = res.stdout + res.stderr
        self.apply_stdout = res.stdout
        self.apply_rc = res.returncode
        if res.returncode != 0 and not self.allow_apply_failure:
            raise E2EError(f"kubectl apply -k deploy/ exited {res.returncode}:\n{self.apply_output.strip()}")
        if res.returncode == 0:
            self.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                         "crd/fusevolnodes.local.fusevol.io")
        for sa in (AGENT_SA, CONTROLLER_SA):
            self.tokens[sa] = wait_for(lambda: self._sa_token(NAMESPACE, sa), 60,
                                       f"the token Secret of ServiceAccount {NAMESPACE}/{sa}")
            self.kubeconfigs[sa] = self._write_kubeconfig(sa, self.tokens[sa], NAMESPACE)
        self.timings["cluster_ready"] = time.monotonic() - t0
        self.log(f"cluster ready in {self.timings['cluster_ready']:.1f}s at {self.server} ({self.tmp})")
        return self

    def _run(self, argv, **kw):
        res = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, **kw)
        if res.returncode != 0:
            raise E2EError(f"{' '.join(map(str, argv))} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def _spawn(self, name, argv, env=None, log_name=None):
        p = Proc(name, argv, self.logs / f"{log_name or name}.log", env=env)
        self.procs.append(p)
        self.log(f"started {name} pid {p.pid}")
        return p

    def _alive(self, proc):
        if not proc.alive():
            raise Fatal(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc.log_path, 30)}")
        return True

    def _write_kubeconfig(self, user, token, namespace):
        ctx = {"cluster": "e2e", "user": user}
        if namespace:
            ctx["namespace"] = namespace
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
            "clusters": [{"name": "e2e", "cluster": {"server": self.server,
                                                      "insecure-skip-tls-verify": True}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": ctx}],
        }
        path = self.tmp / f"kubeconfig-{user}"
        path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        path.chmod(0o600)
        return path

    def _sa_token(self, namespace, sa):
        obj = self.kubectl("get", "serviceaccount", "-n", namespace, sa, as_json=True)
        for ref in obj.get("secrets") or []:
            secret = self.kubectl("get", "secret", "-n", namespace, ref["name"], as_json=True)
            token = (secret.get("data") or {}).get("token")
            if secret.get("type") == "kubernetes.io/service-account-token" and token:
                return base64.b64decode(token).decode()
        return None

    # -- nodes --------------------------------------------------------------------------------

    def add_node(self, name, cpu="32", memory="128Gi", pods="250"):
        """A Node object marked Ready, with capacity, without the not-ready taint."""
        labels = {HOSTNAME_LABEL: name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        self.api("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        resources = {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "1Ti"}
        self.api("PATCH", f"/api/v1/nodes/{name}/status", {"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "marked Ready by the fusevol e2e harness (no kubelet)",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": {"kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2",
                         "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "none://0", "kernelVersion": os.uname().release,
                         "osImage": "fusevol-e2e", "machineID": "", "systemUUID": "", "bootID": ""},
        }}, content_type="application/merge-patch+json")
        # The TaintNodesByCondition admission plugin taints every new node not-ready.
        self.api("PATCH", f"/api/v1/nodes/{name}", {"spec": {"taints": None}},
                 content_type="application/merge-patch+json")
        node = self.api("GET", f"/api/v1/nodes/{name}")[1]
        if node["spec"].get("taints"):
            raise E2EError(f"node {name} still has taints: {node['spec']['taints']}")

    # -- API access ---------------------------------------------------------------------------

    def api(self, method, path, body=None, content_type="application/json", token=None,
            raw=False, check=True, timeout=30):
        """(status, parsed JSON body) of an API request; with `raw`, the body as text. Raises
        E2EError on a status >= 400 when `check` (and never when `raw`)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode("utf-8", "replace")
        except (OSError, urllib.error.URLError) as e:
            if raw:
                return None, str(e)
            raise E2EError(f"{method} {path}: {e}")
        if raw:
            return status, text
        if status >= 400 and check:
            raise E2EError(f"{method} {path}: HTTP {status}: {text.strip()}")
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def kubectl_run(self, *args, kubeconfig=None, input=None, timeout=120):
        """The CompletedProcess of kubectl (never raises on a non-zero exit)."""
        argv = [str(K8S_BIN / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfigs['admin']}",
                *map(str, args)]
        return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def kubectl(self, *args, as_json=False, check=True, input=None, kubeconfig=None, timeout=120):
        """kubectl as admin: stdout, or parsed JSON with `as_json` (adds `-o json`). Raises
        KubectlError on a non-zero exit when `check`."""
        if as_json:
            args = (*args, "-o", "json")
        if isinstance(input, (dict, list)):
            input = json.dumps(input)
        res = self.kubectl_run(*args, kubeconfig=kubeconfig, input=input, timeout=timeout)
        if res.returncode != 0 and check:
            raise KubectlError(args, res.returncode, res.stdout, res.stderr)
        if as_json and res.returncode == 0:
            return json.loads(res.stdout)
        return res.stdout if res.returncode == 0 else res

    def kubectl_as(self, sa, *args, as_json=False, check=True, input=None, timeout=120):
        """kubectl with the token of ServiceAccount `sa` (fusevol-agent, fusevol-controller)."""
        return self.kubectl(*args, as_json=as_json, check=check, input=input,
                            kubeconfig=self.kubeconfigs[sa], timeout=timeout)

    def apply(self, *objects):
        """`kubectl apply` of dicts (as a v1 List)."""
        return self.kubectl("apply", "-f", "-", input={"apiVersion": "v1", "kind": "List",
                                                       "items": list(objects)})

    def create(self, *objects):
        return self.kubectl("create", "-f", "-", input={"apiVersion": "v1", "kind": "List",
                                                        "items": list(objects)})

    def get(self, kind, name=None, namespace=None, check=True):
        """An object (dict) or, without `name`, the list of items; None if not found and not
        `check`."""
        args = ["get", kind] + ([name] if name else [])
        args += ["-n", namespace] if namespace else []
        try:
            obj = self.kubectl(*args, as_json=True)
        except KubectlError as e:
            if not check and "NotFound" in e.stderr:
                return None
            raise
        return obj if name else obj.get("items", [])

    def wait_for(self, predicate, timeout, what, interval=0.25):
        return wait_for(predicate, timeout, what, interval)

    def ensure_namespace(self, ns):
        """Creates `ns` and waits for its default ServiceAccount (pod admission needs it)."""
        if self.get("namespace", ns, check=False) is None:
            self.kubectl("create", "namespace", ns)
        wait_for(lambda: self.get("serviceaccount", "default", ns, check=False), 30,
                 f"ServiceAccount {ns}/default")

    def events(self, namespace, kind=None, name=None, type_=None):
        """Core v1 events (events.k8s.io/v1 ones included) about an object."""
        sel = []
        if kind:
            sel.append(f"involvedObject.kind={kind}")
        if name:
            sel.append(f"involvedObject.name={name}")
        if type_:
            sel.append(f"type={type_}")
        args = ["get", "events", "-n", namespace]
        if sel:
            args += ["--field-selector", ",".join(sel)]
        return self.kubectl(*args, as_json=True).get("items", [])

    # -- fusevol processes --------------------------------------------------------------------

    def node_dir(self, node):
        return self.tmp / "nodes" / node

    def start_fdstore(self, node):
        """Starts `fusevol fdstore` for `node` (once; as the fdstore DaemonSet of deploy/
        does) and returns its socket. It outlives the node's agents; `stop` ends it after
        them, which ends the FUSE connections it still holds."""
        sock = self.node_dir(node) / "fdstore.sock"
        if node not in self.fdstores or not self.fdstores[node].alive():
            proc = Proc(f"fdstore {node}", [self.fusevol_bin, "fdstore", "--socket", sock],
                        self.logs / f"fdstore-{node}.log",
                        env={"RUST_LOG": "info", "NO_COLOR": "1", "RUST_BACKTRACE": "1"})
            self.fdstores[node] = proc
            self.other_procs.append(proc)
            wait_for(lambda: sock.exists(), 10, f"the fd holder of {node} to listen")
        return sock

    def start_agent(self, node, tiers, static=None, wait=True, timeout=60, env=None,
                    fdstore=True):
        """Starts `fusevol agent` for `node` as a host process, with the agent's own token.
        `tiers`: [Tier] (or (name, capacity) pairs); `static`: None or a dict
        {"storage_class": ..., "pools": [{"tier", "count", "size"}]}; `fdstore`: serve
        through the node's FUSE connection holder (mounts outlive the agent). With `wait`,
        returns when /healthz answers 200 and the FusevolNode publishes every tier."""
        if node in self.agents and self.agents[node].proc.alive():
            raise E2EError(f"agent of {node} is already running")
        tiers = [t if isinstance(t, Tier) else Tier(*t) for t in tiers]
        ndir = self.node_dir(node)
        root = ndir / "root"
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        lines = [f"node_name = {_toml_str(node)}", f"root = {_toml_str(root)}",
                 f"listen = {_toml_str(f'127.0.0.1:{port}')}", ""]
        for t in tiers:
            disk = ndir / "disks" / f"{t.name}-0"
            disk.mkdir(parents=True, exist_ok=True)
            lines += ["[[tiers]]", f"name = {_toml_str(t.name)}", f"disks = [{_toml_str(disk)}]"]
            if t.capacity is not None:
                lines.append(f"capacity = {_toml_str(t.capacity)}")
            if t.reserved is not None:
                lines.append(f"reserved = {_toml_str(t.reserved)}")
            lines.append("")
        if static:
            lines.append("[static]")
            if static.get("storage_class"):
                lines.append(f"storage_class = {_toml_str(static['storage_class'])}")
            for p in static.get("pools", []):
                lines += ["[[static.pools]]", f"tier = {_toml_str(p['tier'])}",
                          f"count = {int(p['count'])}", f"size = {_toml_str(p['size'])}"]
            lines.append("")
        config = ndir / "agent.toml"
        config.write_text("\n".join(lines))
        argv = [self.fusevol_bin, "agent", "--config", config]
        if fdstore:
            argv += ["--fdstore", self.start_fdstore(node)]
        proc = Proc(f"agent {node}", argv,
                    self.logs / f"agent-{node}.log",
                    env={"NODE_NAME": node, "KUBECONFIG": self.kubeconfigs[AGENT_SA],
                         "RUST_LOG": "info", "NO_COLOR": "1", "RUST_BACKTRACE": "1",
                         **(env or {})})
        if node in self.agents:
            self.other_procs.append(self.agents[node].proc)
        agent = Agent(node, root, config, port, proc, tiers, static)
        agent.fdstore = fdstore
        self.agents[node] = agent
        self.log(f"started agent {node} pid {proc.pid} port {port}")
        if wait:
            self.wait_agent_ready(node, timeout)
        return agent

    def wait_agent_ready(self, node, timeout=60):
        agent = self.agents[node]
        want = {t.name for t in agent.tiers}

        def ready():
            if not agent.proc.alive():
                raise Fatal(f"agent {node} exited with {agent.proc.popen.returncode}:\n"
                               f"{tail(agent.proc.log_path, 30)}")
            if http_get(agent.url + "/healthz")[0] != 200:
                return False
            fvn = self.get("fusevolnodes", node, check=False)
            tiers = {t.get("name") for t in ((fvn or {}).get("status") or {}).get("tiers") or []}
            return want <= tiers
        try:
            wait_for(ready, timeout, f"agent {node}: /healthz 200 and FusevolNode {node} "
                                     f"with status.tiers {sorted(want)}")
        except E2EError as e:
            if agent.proc.alive():
                raise E2EError(f"{e}\nagent log:\n{tail(agent.proc.log_path, 30)}") from None
            raise

    def stop_agent(self, node, sig=signal.SIGTERM, timeout=20):
        """Stops the agent of `node` (SIGKILL: like kill -9). Returns its exit code."""
        agent = self.agents[node]
        if sig == signal.SIGKILL:
            return agent.proc.kill9()
        return agent.proc.stop(sig, timeout)

    def restart_agent(self, node, sig=signal.SIGTERM, wait=True):
        agent = self.agents[node]
        rc = self.stop_agent(node, sig)
        self.start_agent(node, agent.tiers, agent.static, wait=wait, fdstore=agent.fdstore)
        return rc

    def start_controller(self, index, wait=True, timeout=60, env=None):
        """Starts replica `index` of `fusevol controller` (POD_NAME fusevol-controller-<index>)
        with the controller's own token. With `wait`, returns when /healthz answers 200."""
        if index in self.controllers and self.controllers[index].proc.alive():
            raise E2EError(f"controller {index} is already running")
        identity = f"fusevol-controller-{index}"
        port = free_port()
        proc = Proc(f"controller {index}", [
            self.fusevol_bin, "controller", "--namespace", NAMESPACE,
            "--leader-election-lease", "fusevol-controller", "--listen", f"127.0.0.1:{port}"],
            self.logs / f"controller-{index}.log",
            env={"POD_NAME": identity, "POD_NAMESPACE": NAMESPACE,
                 "KUBECONFIG": self.kubeconfigs[CONTROLLER_SA], "RUST_LOG": "info",
                 "NO_COLOR": "1", "RUST_BACKTRACE": "1", **(env or {})})
        if index in self.controllers:
            self.other_procs.append(self.controllers[index].proc)
        ctl = Controller(index, identity, port, proc)
        self.controllers[index] = ctl
        self.log(f"started controller {index} pid {proc.pid} port {port}")
        if wait:
            self.wait_controller_ready(index, timeout)
        return ctl

    def wait_controller_ready(self, index, timeout=60):
        ctl = self.controllers[index]

        def ready():
            if not ctl.proc.alive():
                raise Fatal(f"controller {index} exited with {ctl.proc.popen.returncode}:\n"
                               f"{tail(ctl.proc.log_path, 30)}")
            return http_get(ctl.url + "/healthz")[0] == 200
        wait_for(ready, timeout, f"controller {index} /healthz 200")

    def stop_controller(self, index, sig=signal.SIGTERM, timeout=20):
        ctl = self.controllers[index]
        if sig == signal.SIGKILL:
            return ctl.proc.kill9()
        return ctl.proc.stop(sig, timeout)

    def leader(self):
        """holderIdentity of the controller's Lease, or None."""
        lease = self.get("lease", "fusevol-controller", NAMESPACE, check=False)
        return ((lease or {}).get("spec") or {}).get("holderIdentity") or None

    # -- stop ---------------------------------------------------------------------------------

    def _fusevol_procs(self):
        return ([c.proc for c in self.controllers.values()] +
                [a.proc for a in self.agents.values()] + self.other_procs)

    def stop(self):
        """Stops everything this cluster started (by pid), unmounts, removes the temp dir."""
        if self._stopped:
            return
        self._stopped = True
        problems = []
        # 1. fusevol: controllers first, then agents (on SIGTERM they unmount their volumes,
        #    or with the fd holder leave them held: they end with the holder, see 2).
        for c in list(self.controllers.values()):
            self._stop_proc(c.proc, 10, problems)
        for a in list(self.agents.values()):
            self._stop_proc(a.proc, 20, problems)
        for p in self.other_procs:
            self._stop_proc(p, 10, problems)
        # 2. Whatever is still mounted under the temp dir (agents killed with -9, or a bug).
        if self.tmp:
            self._unmount_all(problems)
        # 3. The control plane, in reverse start order.
        for p in reversed(self.procs):
            self._stop_proc(p, 10, problems)
        # 4. The temp dir, unless something is still mounted there.
        if self.tmp and self.tmp.exists():
            left = self.mounts_under_tmp()
            if left:
                problems.append(f"still mounted, {self.tmp} kept: {left}")
            elif os.environ.get("FUSEVOL_E2E_KEEP"):
                print(f"FUSEVOL_E2E_KEEP: kept {self.tmp}", file=sys.stderr)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        for p in problems:
            print(f"cluster cleanup: {p}", file=sys.stderr)

    def _stop_proc(self, proc, timeout, problems):
        try:
            proc.stop(signal.SIGTERM, timeout)
        except Exception as e:  # keep stopping the others
            problems.append(f"stopping {proc.name} (pid {proc.pid}): {e}")

    def mounts_under_tmp(self):
        prefix = str(self.tmp) + "/"
        return [mp for mp, _ in mounts() if mp.startswith(prefix)]

    def _unmount_all(self, problems):
        for _ in range(5):
            left = self.mounts_under_tmp()
            if not left:
                return
            for mp in sorted(left, key=len, reverse=True):
                res = subprocess.run(["umount", "-l", mp], capture_output=True, text=True,
                                     stdin=subprocess.DEVNULL)
                if res.returncode != 0:
                    problems.append(f"umount -l {mp}: {res.stderr.strip()}")

    # -- diagnostics --------------------------------------------------------------------------

    def all_procs(self):
        return self.procs + self._fusevol_procs()

    def dump_logs(self, lines=40, file=None):
        """Prints the tail of every component's log (for a failed test)."""
        file = file or sys.stderr
        if not self.tmp or not self.logs.exists():
            return
        for log in sorted(self.logs.glob("*.log")):
            print(f"----- {log.name} (last {lines} lines) -----", file=file)
            print(strip_ansi(tail(log, lines)), file=file)
        file.flush()
