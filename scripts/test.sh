#!/usr/bin/env bash
# The whole test suite: set-up, then every unit, integration and snapshot test in release mode
# (the end-to-end tests run the real model; debug builds would be far too slow).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
# Snapshot tests must not silently accept new output in CI.
export INSTA_UPDATE=${INSTA_UPDATE:-no}
cargo test --release --workspace -- --test-threads=1 "$@"
