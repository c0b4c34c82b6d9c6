#!/usr/bin/env bash
# Build the tensor-parallel server (mistral.rs's `ring` backend) as target/ring/mistralrs-server.
# Upstream makes every safetensors model distributed in such a build, so it cannot replace the
# normal binary; cargo builds it in the shared target directory (only the crates whose features
# differ are compiled twice) and the result is copied aside.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/prepare-upstream.sh"
cargo build --release -p mistralrs-retro --features ring --bin mistralrs-server
mkdir -p target/ring
cp target/release/mistralrs-server target/ring/mistralrs-server.tmp
mv target/ring/mistralrs-server.tmp target/ring/mistralrs-server
# Put the normal binary back in target/release (cargo relinks it from its own cache: no compile).
cargo build --release -p mistralrs-retro --bin mistralrs-server
