#!/usr/bin/env bash
# The whole test suite: set-up, then every unit, integration and snapshot test in release mode
# (the end-to-end tests run the real model; debug builds would be far too slow).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
# The tensor-parallel server (feature `ring`) for tests/tp.rs: its own binary, target/ring/.
"$root/scripts/build-ring.sh"
# Snapshot tests must not silently accept new output in CI.
export INSTA_UPDATE=${INSTA_UPDATE:-no}
cargo test --release --workspace -- --test-threads=1 "$@"
