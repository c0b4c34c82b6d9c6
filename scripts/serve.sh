#!/usr/bin/env bash
# Serve the embedded SmolLM2-135M-Instruct on 127.0.0.1 with CPU paged attention.
# Extra arguments go to mistralrs-server (e.g. --port 8080, --kv-policy full).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
cargo build --release -p mistralrs-retro --bin mistralrs-server
exec "$root/target/release/mistralrs-server" --cpu --kv-policy full "$@"
