#!/usr/bin/env bash
# Runs on the GPU machine (from the repository root, gpu-dist/ carried over): the kernel checks
# against the CPU reference, then the kernel benchmark. Results go to $OUT (or ./gpu-out).
# Usage: gpu-dist/run.sh [check|bench|all] [--quick]
#        gpu-dist/run.sh e2e [gen|run|sanity] [e2e.py flags]   (end to end through the CUDA server)
set -uo pipefail
what=${1:-all}; shift || true
out=${OUT:-gpu-out}; mkdir -p "$out"
bin=gpu-bin; mkdir -p "$bin" gpu-work
for b in retro-gpu-check retro-gpu-bench mistralrs-server; do
  [ -f "gpu-dist/$b.xz" ] && xz -d -c "gpu-dist/$b.xz" > "$bin/$b" && chmod +x "$bin/$b"
done
if [ "$what" = e2e ]; then
  step=${1:-run}; shift || true
  gguf=gpu-work/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$HOME/gguf-parts"
  for d in gpu-dist/gguf-*; do [ -f "$d/part" ] && cp "$d/part" "$HOME/gguf-parts/${d#gpu-dist/gguf-}"; done
  ls "$HOME/gguf-parts"
  if [ "$step" = sanity ] || [ "$step" = compare ] && [ -f "$HOME/gguf-parts/2" ] && [ ! -f "$gguf" ]; then
    cat "$HOME"/gguf-parts/* > "$gguf"
    [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat gpu-dist/gguf.sha256)" ] || { echo "gguf parts do not join to the original" >&2; rm -f "$gguf"; exit 1; }
  fi
  exec python3 gpu-dist/e2e.py "$step" "$@"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
rc=0
if [ "$what" = check ] || [ "$what" = all ]; then
  "$bin/retro-gpu-check" "$@" 2> >(tail -c 20000 > "$out/check.stderr") | tee "$out/check.md" || rc=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  "$bin/retro-gpu-bench" "$@" --json "$out/kernel.jsonl" | tee "$out/bench.md" || rc=1
fi
exit $rc
