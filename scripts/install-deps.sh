#!/usr/bin/env bash
# Installs the system packages fusevol needs to build, run and test (Debian/Ubuntu).
# Idempotent: asks apt only for what is missing. Run as root (or with sudo available).
set -euo pipefail

# Build: clang/libclang for librocksdb-sys (bindgen), pkg-config. Run: fuse3 (/dev/fuse,
# fusermount3). Tests and benchmarks: fio, attr, bindfs, gocryptfs, PostgreSQL (pgbench).
PKGS=(fuse3 clang libclang-dev pkg-config build-essential fio attr bindfs gocryptfs postgresql postgresql-contrib python3 python3-pip)
if [ "${1:-}" = "--minimal" ]; then
  PKGS=(fuse3 clang libclang-dev pkg-config build-essential)
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The e2e tests parse /metrics with Prometheus' own OpenMetrics parser (PyPI prometheus_client).
if [ "${1:-}" != "--minimal" ] && ! python3 -c "import prometheus_client" 2>/dev/null; then
  echo "installing: prometheus_client (pip)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "prometheus_client==0.26.0"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found: install Rust with rustup (https://rustup.rs) and run again" >&2
  exit 1
fi
[ -e /dev/fuse ] || { echo "error: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }
