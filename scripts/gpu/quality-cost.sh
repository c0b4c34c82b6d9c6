#!/usr/bin/env bash
# Runs on the GPU machine (from the repository root, gpu-dist/ carried over): the decode step time of
# the points of the quality grid (docs/quality.md) through the CUDA server, on random Llama-3.1-8B-shaped
# bf16 weights at 32K context, batch 1 and 8 (requests sent together). Budgets are fractions of the
# context, as in retro-eval. One server per point, so the points are split into parts that each fit
# one device call: `quality-cost.sh 1`, then `quality-cost.sh 2` (the weights stay while the machine is
# warm; `gen` makes them again if not). Rows: $OUT/e2e.jsonl; scripts/quality-cost-merge.py puts them
# into the quality results.
set -euo pipefail
part=${1:?usage: quality-cost.sh 1|2}
for b in mistralrs-server; do
  mkdir -p gpu-bin; [ -f gpu-bin/$b ] || { xz -d -c gpu-dist/$b.xz > gpu-bin/$b; chmod +x gpu-bin/$b; }
done
python3 scripts/gpu/e2e.py gen
r() { echo "$1:--kv-budget-ratio=$2${3:+:--kv-window=$3}"; }
case $part in
  1) policies=(full $(r quest 0.1) $(r quest 0.125) $(r quest 0.15) $(r quest 0.1875) $(r quest 0.2) $(r quest 0.3)) ;;
  2) policies=($(r retro 0.1 2) $(r retro 0.15 2) $(r retro 0.1 4) $(r retro 0.15 4) $(r quest 0.225)) ;;
  *) echo "part 1 or 2" >&2; exit 2 ;;
esac
exec python3 scripts/gpu/e2e.py run --contexts 32768 --batches 1 8 --together --window 6 --policies "${policies[@]}"
