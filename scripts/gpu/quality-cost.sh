#!/usr/bin/env bash
# Runs on the GPU machine (from the repository root, gpu-dist/ carried over): the decode step time of
# the points of the quality grid (docs/quality.md) through the CUDA server, on random Llama-3.1-8B-shaped
# bf16 weights. Budgets are fractions of the context, as in retro-eval; one server per point.
#   b1: 32K context, batch 1.
#   b8: 16K context, batch 8, requests sent together (a together-prefill of 8 x 32K does not fit an
#       H100's 80 GB beside the weights and the K/V pool).
# Usage: quality-cost.sh b1|b8 [point ...]   (a point: quest:0.1, retro:0.15:2, full; default: all)
# Rows: $OUT/e2e.jsonl; scripts/quality-cost-merge.py puts them into the quality results.
set -euo pipefail
what=${1:?usage: quality-cost.sh b1|b8 [point ...]}; shift
mkdir -p gpu-bin
[ -f gpu-bin/mistralrs-server ] || { xz -d -c gpu-dist/mistralrs-server.xz > gpu-bin/mistralrs-server; chmod +x gpu-bin/mistralrs-server; }
python3 scripts/gpu/e2e.py gen
points=("$@")
if [ ${#points[@]} -eq 0 ]; then
  points=(full)
  for b in 0.1 0.125 0.15 0.1875 0.2 0.225 0.3; do points+=("quest:$b"); done
  for w in 2 4; do for b in 0.1 0.15; do points+=("retro:$b:$w"); done; done
fi
policies=()
for p in "${points[@]}"; do
  IFS=: read -r name budget window <<< "$p"
  spec=$name
  [ -n "${budget:-}" ] && spec+=":--kv-budget-ratio=$budget"
  [ -n "${window:-}" ] && spec+=":--kv-window=$window"
  policies+=("$spec")
done
case $what in
  b1) args=(--contexts 32768 --batches 1) ;;
  b8) args=(--contexts 16384 --batches 8 --together --kv-tokens $((8 * 18432))) ;;
  *) echo "b1 or b8" >&2; exit 2 ;;
esac
exec python3 scripts/gpu/e2e.py run "${args[@]}" --window 6 --policies "${policies[@]}"
