#!/usr/bin/env bash
# Runs on the GPU machine (from the repository root, gpu-dist/ carried over): the kernel checks
# against the CPU reference, then the kernel benchmark. Results go to $OUT (or ./gpu-out).
# Usage: gpu-dist/run.sh [check|bench|all] [--quick]
set -uo pipefail
what=${1:-all}; shift || true
out=${OUT:-gpu-out}; mkdir -p "$out"
bin=$(mktemp -d)
for b in retro-gpu-check retro-gpu-bench; do xz -d -c "gpu-dist/$b.xz" > "$bin/$b"; chmod +x "$bin/$b"; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
rc=0
if [ "$what" = check ] || [ "$what" = all ]; then
  "$bin/retro-gpu-check" "$@" 2> >(tail -c 20000 > "$out/check.stderr") | tee "$out/check.md" || rc=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  "$bin/retro-gpu-bench" "$@" --json "$out/kernel.jsonl" | tee "$out/bench.md" || rc=1
fi
exit $rc
