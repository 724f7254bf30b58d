#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints, runs the
# unit, property, filesystem-core and FUSE integration tests, then proves the benchmark
# harness works (bench/run --quick). Needs root (FUSE mounts, page-cache drops).
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
echo "== benchmark harness (quick)"
bench/run --quick --out "$(mktemp -d /tmp/fusevol-bench-quick.XXXXXX)"
