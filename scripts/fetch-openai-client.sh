#!/usr/bin/env bash
# The official OpenAI Python client, pinned, in a virtualenv at .venv (ignored), for tests/openai_client.rs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=3.57.0
venv="$root/.venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$version')" 2>/dev/null; then
  exit 0
fi
echo "fetch-openai-client: installing openai==$version into $venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$version"
