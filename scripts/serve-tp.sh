#!/usr/bin/env bash
# Tensor-parallel serving on this machine: N ranks (2, 4 or 8) as separate processes that talk TCP
# over loopback through mistral.rs's ring backend (CPU). Usage:
#   scripts/serve-tp.sh N --model DIR [mistralrs-server flags...]
# Rank 0 serves the OpenAI API on --port (default 1234); every other rank serves its own /metrics on
# a port of its own (printed at startup). The ring uses ports RING_BASE_PORT..RING_BASE_PORT+N
# (default 29500). The model must be a safetensors directory whose heads split over N ranks.
# Ctrl-C (or SIGTERM) stops every rank.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/serve-tp.sh N --model DIR [mistralrs-server flags...]  (N = 2, 4 or 8 ranks)" >&2
  exit 2
fi
ranks=$1
shift
if [[ ${RETRO_SKIP_BUILD:-0} != 1 ]]; then
  "$root/scripts/setup.sh"
  "$root/scripts/build-ring.sh"
fi
server=${RETRO_RING_SERVER:-$root/target/ring/mistralrs-server}
base=${RING_BASE_PORT:-29500}
# --port belongs to rank 0; the workers take any free port for their /metrics.
port=1234
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    --port=*) port=${1#--port=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
dir=$(mktemp -d "${TMPDIR:-/tmp}/retro-ring.XXXXXX")
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT TERM
for ((r = ranks - 1; r >= 0; r--)); do
  cat > "$dir/rank$r.json" <<JSON
{"master_ip": "127.0.0.1", "master_port": $base, "port": $((base + 1 + r)), "right_ip": "127.0.0.1", "right_port": $((base + 1 + (r + 1) % ranks)), "rank": $r, "world_size": $ranks}
JSON
  if [[ $r -eq 0 ]]; then
    RING_CONFIG="$dir/rank0.json" "$server" "${args[@]}" --port "$port" &
  else
    RING_CONFIG="$dir/rank$r.json" "$server" "${args[@]}" --port 0 &
  fi
  pids+=($!)
done
# Stop everything as soon as any rank exits (a lone rank would wait forever in an all-reduce).
set +e
wait -n "${pids[@]}"
status=$?
exit $status
