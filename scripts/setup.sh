#!/usr/bin/env bash
# Everything a fresh machine of the CI kind needs before building or testing: the patched upstream
# crates and the embedded test model. Idempotent and quick when nothing changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
command -v cargo >/dev/null || { echo "setup: cargo is required (rustup)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "setup: python3 with pip is required" >&2; exit 1; }
"$root/scripts/prepare-upstream.sh"
"$root/scripts/fetch-smollm2.sh"
"$root/scripts/fetch-text.sh"
"$root/scripts/fetch-openai-client.sh"
