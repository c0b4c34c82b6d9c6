#!/usr/bin/env bash
# Builds the GPU check and benchmark binaries on this CPU-only machine (CUDA 13.0 toolkit from PyPI,
# see ../shared/GPU.md) and packs them, xz-compressed, into gpu-dist/ for the GPU machine.
# Usage: scripts/gpu/build.sh   (first run: mistralrs-core with cuda, ~30 minutes on 2 cores)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
./scripts/prepare-upstream.sh
cargo fetch --quiet
# shellcheck disable=SC1091
source "$root/../shared/gpu/cuda-toolkit.sh" >/dev/null
export CARGO_TARGET_DIR="$root/target/cuda"
cargo build --release -p mistralrs-retro --features cuda --bin retro-gpu-check --bin retro-gpu-bench
mkdir -p gpu-dist
for b in retro-gpu-check retro-gpu-bench; do
  xz -6 -T2 -c "$CARGO_TARGET_DIR/release/$b" > "gpu-dist/$b.xz"
done
cp scripts/gpu/run.sh gpu-dist/
ls -la gpu-dist
