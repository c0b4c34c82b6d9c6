#!/usr/bin/env bash
# Builds the GPU check and benchmark binaries and the CUDA server on this CPU-only machine (CUDA 13.0
# toolkit from PyPI, set up by scripts/gpu/cuda-toolkit.sh; see docs/gpu.md, "Building for the GPU")
# and packs them, xz-compressed, into gpu-dist/ for the GPU machine, with the end-to-end driver, the
# SmolLM2 tokenizer (for the random-weight model) and the SmolLM2 GGUF in two parts,
# gpu-dist/gguf-{1,2}/ (one transfer carries 64 MiB: send one part with each call; run.sh stashes
# them in $HOME/gguf-parts on the GPU machine until all are there).
# Usage: scripts/gpu/build.sh   (first run: mistralrs-core with cuda, ~30 minutes on 2 cores)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
./scripts/prepare-upstream.sh
cargo fetch --quiet
# shellcheck disable=SC1091
source "$root/scripts/gpu/cuda-toolkit.sh" >/dev/null
export CARGO_TARGET_DIR="$root/target/cuda"
cargo build --release -p mistralrs-retro --features cuda --bin retro-gpu-check --bin retro-gpu-bench --bin mistralrs-server
rm -rf gpu-dist/gguf-*; mkdir -p gpu-dist/gguf-1 gpu-dist/gguf-2
for b in retro-gpu-check retro-gpu-bench mistralrs-server; do
  xz -6 -T2 -c "$CARGO_TARGET_DIR/release/$b" > "gpu-dist/$b.xz"
done
cp scripts/gpu/run.sh scripts/gpu/e2e.py scripts/gpu/sanity-cpu.json gpu-dist/
cp models/smollm2-135m-instruct-f32/tokenizer.json gpu-dist/
gguf=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Part 1 fills one transfer on its own (with the repository's ~1.6 MB of tracked files); part 2 goes
# with the server binary. The GPU machine is released after 30 s idle: send them in back-to-back calls.
head -c 64000000 "$gguf" > gpu-dist/gguf-1/part
tail -c +64000001 "$gguf" > gpu-dist/gguf-2/part
sha256sum "$gguf" | cut -d' ' -f1 > gpu-dist/gguf.sha256
ls -la gpu-dist
