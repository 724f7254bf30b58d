#!/usr/bin/env bash
# Obtains a Kubernetes v1.20.2 control plane (kube-apiserver, kube-scheduler,
# kube-controller-manager, kubectl) for the e2e tests, built from Debian bookworm's
# `kubernetes` source package (its orig tarball vendors every Go dependency), plus etcd from
# Debian's `etcd-server`. Recipe and traps: ../shared/K8S-E2E.md (and tests/e2e/README.md).
#
# Idempotent: when the four binaries are in the cache directory and run, it exits at once.
# Otherwise it installs what the build needs (apt-get), downloads the source package, and
# builds (~5 minutes on 2 cores). Runs as root, non-interactively.
#
#   FUSEVOL_K8S_CACHE  where the binaries go   (default /var/tmp/fusevol-k8s-v1.20.2; bin/ inside)
#   FUSEVOL_K8S_WORK   where the source builds (default /var/tmp/fusevol-k8s-build)
set -euo pipefail

K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_VERSION="v1.20.2"
CACHE="${FUSEVOL_K8S_CACHE:-/var/tmp/fusevol-k8s-v1.20.2}"
WORK="${FUSEVOL_K8S_WORK:-/var/tmp/fusevol-k8s-build}"
BINS=(kube-apiserver kube-scheduler kube-controller-manager kubectl)
# Packages the harness and the build need (etcd, openssl and curl at test time too).
PKGS=(golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev openssl curl make)

export DEBIAN_FRONTEND=noninteractive CI=true
exec </dev/null

log() { echo "build-k8s: $*" >&2; }

bins_ok() {
  local b
  for b in "${BINS[@]}"; do
    [[ -x "$CACHE/bin/$b" ]] || return 1
    "$CACHE/bin/$b" --version >/dev/null 2>&1 || {
      # kubectl 1.20 has no --version flag; `kubectl version --client` runs without a server.
      [[ $b == kubectl ]] && "$CACHE/bin/$b" version --client >/dev/null 2>&1
    } || return 1
  done
}
# What the harness needs at run time besides the four binaries.
runtime_ok() {
  [[ -x /usr/bin/etcd ]] && command -v openssl >/dev/null
}

if bins_ok && runtime_ok; then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (apt-get): the control plane in $CACHE/bin or etcd/openssl is missing"
  exit 1
fi

if bins_ok; then
  log "installing etcd-server and openssl (the binaries are cached in $CACHE/bin)"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends etcd-server openssl >/dev/null
  runtime_ok && exit 0
  log "etcd or openssl still missing"
  exit 1
fi

mkdir -p "$WORK" "$CACHE/bin"
# One build at a time per machine.
exec 9>"$WORK/.lock"
flock 9
if bins_ok && runtime_ok; then
  exit 0
fi

start=$(date +%s)

# 1. A deb-src entry matching the existing `deb` entries (same mirror, suites, keyring).
have_deb_src() {
  grep -rqsE '^[[:space:]]*(Types:.*\bdeb-src\b|deb-src[[:space:]])' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}
if ! have_deb_src; then
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    log "adding /etc/apt/sources.list.d/fusevol-deb-src.sources"
    # deb822: copy every stanza whose Types has `deb`, as Types: deb-src (comments dropped).
    awk '
      /^[[:space:]]*#/ { next }
      /^[[:space:]]*$/ { if (stanza != "" && isdeb) printf "%s\n", stanza; stanza = ""; isdeb = 0; next }
      /^Types:/ { if ($0 ~ /[[:space:]]deb([[:space:]]|$)/) isdeb = 1; stanza = stanza "Types: deb-src\n"; next }
      { stanza = stanza $0 "\n" }
      END { if (stanza != "" && isdeb) printf "%s", stanza }
    ' /etc/apt/sources.list.d/debian.sources >/etc/apt/sources.list.d/fusevol-deb-src.sources
  elif [[ -f /etc/apt/sources.list ]]; then
    log "adding /etc/apt/sources.list.d/fusevol-deb-src.list"
    sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' /etc/apt/sources.list \
      >/etc/apt/sources.list.d/fusevol-deb-src.list
  else
    log "no apt sources found to derive a deb-src entry from"
    exit 1
  fi
fi

# 2. Build dependencies (rsync and jq are used by Kubernetes' build scripts: without rsync the
#    generator step leaves an empty binary behind).
log "apt-get update; installing ${PKGS[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null

# 3. The source package (only the orig tarball is needed: it holds vendor/).
cd "$WORK"
if ! ls kubernetes_*.orig.tar.* >/dev/null 2>&1; then
  log "downloading source package kubernetes=$K8S_DEB_VERSION"
  apt-get source --download-only "kubernetes=$K8S_DEB_VERSION" >/dev/null 2>&1 || {
    # apt as root may warn about the _apt sandbox; retry loudly to show a real error.
    apt-get source --download-only "kubernetes=$K8S_DEB_VERSION"
  }
fi
orig=$(ls kubernetes_*.orig.tar.* | head -n1)
SRC="$WORK/src"
if [[ ! -f "$SRC/.fusevol-unpacked" ]]; then
  log "unpacking $orig"
  rm -rf "$SRC"
  mkdir -p "$SRC"
  tar -xf "$orig" -C "$SRC" --strip-components=1
  touch "$SRC/.fusevol-unpacked"
fi

# 4. The vendored reflect2 v1.0.1 crashes under Go >= 1.18 (SIGSEGV in map iteration while
#    encoding JSON, a few seconds after the apiserver starts): use Debian's 1.0.2.
R2=/usr/share/gocode/src/github.com/modern-go/reflect2
if [[ ! -f "$SRC/.fusevol-reflect2" ]]; then
  log "replacing vendor/github.com/modern-go/reflect2 with Debian's copy"
  rm -f "$SRC"/vendor/github.com/modern-go/reflect2/*.go "$SRC"/vendor/github.com/modern-go/reflect2/*.s
  cp "$R2"/*.go "$SRC/vendor/github.com/modern-go/reflect2/"
  cp "$R2"/*.s "$SRC/vendor/github.com/modern-go/reflect2/" 2>/dev/null || true
  touch "$SRC/.fusevol-reflect2"
fi

# 5. Build. Without a .git, the version comes from a version file.
cat >"$WORK/version.env" <<EOF
KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='$K8S_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
cd "$SRC"
what="cmd/kube-apiserver cmd/kube-scheduler cmd/kube-controller-manager cmd/kubectl"
log "make WHAT=\"$what\" (about 5 minutes on 2 cores)"
if ! make WHAT="$what" KUBE_BUILD_PLATFORMS=linux/amd64 KUBE_GIT_VERSION_FILE="$WORK/version.env" \
  >"$WORK/make.log" 2>&1; then
  log "make failed; last lines of $WORK/make.log:"
  tail -n 40 "$WORK/make.log" >&2
  # A half-built generator (e.g. rsync was missing) poisons later builds.
  rm -rf "$SRC/_output"
  exit 1
fi

for b in "${BINS[@]}"; do
  out="$SRC/_output/bin/$b"
  [[ -x $out ]] || out="$SRC/_output/local/bin/linux/amd64/$b"
  install -m 0755 "$out" "$CACHE/bin/$b.tmp"
  mv -f "$CACHE/bin/$b.tmp" "$CACHE/bin/$b"
done

if ! bins_ok || ! runtime_ok; then
  log "built binaries do not run, or etcd/openssl are missing:"
  for b in "${BINS[@]}"; do "$CACHE/bin/$b" --version || true; done
  exit 1
fi
log "done in $(($(date +%s) - start)) s: $CACHE/bin"
"$CACHE/bin/kube-apiserver" --version >&2
