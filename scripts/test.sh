#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints, runs the
# unit, property, filesystem-core and FUSE integration tests, the end-to-end tests on a
# real Kubernetes control plane (built once per machine), then proves the store
# micro-benchmark and the benchmark harness work (bench/store.rs, bench/run --quick).
# Needs root (FUSE mounts, page-cache drops).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/fusevol-target}"
export CARGO_TERM_COLOR=never

bash scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test"
cargo test --release --no-fail-fast 2>&1 | tee /tmp/fusevol-test.log
echo "== end-to-end tests on a real Kubernetes 1.20 control plane (tests/e2e)"
FUSEVOL_BIN="$CARGO_TARGET_DIR/release/fusevol" tests/e2e/run --no-skip
echo "== store micro-benchmark (one sample each: proves it runs)"
cargo bench --profile release --bench store -- --sample-count 1 --sample-size 1
echo "== benchmark harness (quick)"
bench/run --quick --out "$(mktemp -d /tmp/fusevol-bench-quick.XXXXXX)"
