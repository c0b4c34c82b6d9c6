set -u
# Usage (GPU machine, repository root, gpu-dist/ carried): OUT=dir bash scripts/gpu/ncu-launches.sh; then
# python3 scripts/gpu/ncu_per_step.py DIR here. The "retro2dense" variant did not complete under ncu when last run.
# Kernel launches per decode step by policy: ncu records every launch of a server run answering one
# request of T tokens; (launches at T=33) - (launches at T=1) = 32 decode steps.
mkdir -p gpu-bin gpu-work
xz -d -c gpu-dist/mistralrs-server.xz > gpu-bin/mistralrs-server && chmod +x gpu-bin/mistralrs-server
python3 gpu-dist/e2e.py gen --model gpu-work/llama-8l --layers 8 2>&1 | tail -1
which ncu || ls /opt/nvidia/nsight-compute/*/ncu
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
PROMPT=$(python3 -c "print(' '.join(['alpha','beta','gamma','delta','river','stone'][i%6] for i in range(600)))")
port=19800
run() { # name tokens flags...
  local name=$1 t=$2; shift 2; port=$((port+1))
  $NCU --clock-control none --metrics gpu__time_duration.sum --csv --log-file $OUT/ncu-$name-$t.csv \
    gpu-bin/mistralrs-server --model gpu-work/llama-8l --dtype bf16 --no-prefix-cache --port $port "$@" > $OUT/srv-$name-$t.log 2>&1 &
  for i in $(seq 1 240); do curl -sf http://127.0.0.1:$port/metrics > /dev/null && break; sleep 0.5; done
  curl -s http://127.0.0.1:$port/v1/completions -H 'Content-Type: application/json' \
    -d "{\"model\":\"default\",\"prompt\":\"$PROMPT\",\"max_tokens\":$t,\"temperature\":0}" | head -c 150; echo
  pkill -TERM -f "mistralrs-server --model gpu-work/llama-8l --dtype bf16 --no-prefix-cache --port $port" ; wait
  echo "$name T=$t done"
}
B="--kv-budget-tokens 128"
for t in 1 33; do
  run full $t --kv-policy full
  run quest $t --kv-policy quest $B
  run retro2 $t --kv-policy retro --kv-window 2 $B
  run retro2dense $t --kv-policy retro --kv-window 2 --kv-dense-layers 8 $B
done
cd $OUT && xz -9 ncu-*.csv
