#!/usr/bin/env bash
# Quick start: install what is missing, build fusevol, and mount a 1 GiB dev volume from
# an embedded local store. Runs in the foreground; Ctrl-C unmounts.
#   DATA=/var/tmp/fusevol-dev/data MNT=/var/tmp/fusevol-dev/mnt QUOTA=1Gi (override any)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/fusevol-target}"
DATA="${DATA:-/var/tmp/fusevol-dev/data}"
MNT="${MNT:-/var/tmp/fusevol-dev/mnt}"
QUOTA="${QUOTA:-1Gi}"

bash scripts/install-deps.sh --minimal
cargo build --release --bin fusevol
mkdir -p "$DATA" "$MNT"
echo "mounting volume 'default' (quota $QUOTA) at $MNT; store in $DATA"
echo "try in another shell: df -h $MNT; echo hi > $MNT/hello; $CARGO_TARGET_DIR/release/fusevol volume list --data $DATA"
exec "$CARGO_TARGET_DIR/release/fusevol" mount --data "$DATA" --volume default --quota "$QUOTA" "$MNT"
