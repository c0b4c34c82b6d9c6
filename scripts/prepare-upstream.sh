#!/usr/bin/env bash
# Builds the patched upstream crates that the workspace's [patch.crates-io] points at.
#
# For each crate named in UPSTREAM below: take the pristine crates.io source from cargo's registry
# (fetching it with a throwaway manifest when it is not there yet), copy it into
# .upstream/<crate>-<version>, and apply patches/<crate>/NNNN-*.patch in order.
# A stamp (sha256 of the version and every patch) makes re-runs free; any change to a patch
# re-creates the folder from the pristine source. A patch that does not apply fails the script,
# naming the patch.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.upstream"
UPSTREAM=("mistralrs-core 0.8.1" "mistralrs-server-core 0.8.1" "mistralrs-quant 0.8.1")

registry_src() { # crate version -> path of the unpacked registry source, or empty
  local d
  for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$1-$2"; do
    [ -f "$d/Cargo.toml" ] && { echo "$d"; return; }
  done
}

fetch_pristine() { # make sure cargo's registry holds every upstream crate
  local missing=0 spec
  for spec in "${UPSTREAM[@]}"; do
    set -- $spec
    [ -n "$(registry_src "$1" "$2")" ] || missing=1
  done
  [ $missing = 0 ] && return
  local tmp; tmp=$(mktemp -d)
  mkdir -p "$tmp/src" && : > "$tmp/src/lib.rs"
  {
    echo '[package]'; echo 'name = "upstream-fetch"'; echo 'version = "0.0.0"'; echo 'edition = "2021"'
    echo '[dependencies]'
    for spec in "${UPSTREAM[@]}"; do set -- $spec; echo "$1 = \"=$2\""; done
  } > "$tmp/Cargo.toml"
  echo "prepare-upstream: fetching pristine sources from crates.io" >&2
  cargo fetch --quiet --manifest-path "$tmp/Cargo.toml"
  rm -rf "$tmp"
}

fetch_pristine
mkdir -p "$out"
for spec in "${UPSTREAM[@]}"; do
  set -- $spec
  crate=$1 version=$2
  src=$(registry_src "$crate" "$version")
  [ -n "$src" ] || { echo "prepare-upstream: $crate $version is not in cargo's registry" >&2; exit 1; }
  dest="$out/$crate-$version"
  patches=()
  if [ -d "$root/patches/$crate" ]; then
    while IFS= read -r p; do patches+=("$p"); done < <(find "$root/patches/$crate" -maxdepth 1 -name '[0-9][0-9][0-9][0-9]-*.patch' | sort)
  fi
  stamp=$( { echo "$crate $version pinned-git-v1"; for p in "${patches[@]}"; do echo "$(basename "$p")"; cat "$p"; done; } | sha256sum | cut -d' ' -f1)
  if [ -f "$dest/.patch-stamp" ] && [ "$(cat "$dest/.patch-stamp")" = "$stamp" ]; then
    continue
  fi
  # Copy to a fresh folder, then swap it in, so an interrupted run never leaves a half-patched crate.
  rm -rf "$dest.tmp"
  cp -rp "$src" "$dest.tmp"
  for p in "${patches[@]}"; do
    if ! patch -d "$dest.tmp" -p1 --forward --batch --quiet --no-backup-if-mismatch < "$p" > "$dest.tmp.log" 2>&1; then
      echo "prepare-upstream: patch $(realpath --relative-to="$root" "$p") does not apply to $crate $version:" >&2
      cat "$dest.tmp.log" >&2
      rm -rf "$dest.tmp" "$dest.tmp.log"
      exit 1
    fi
  done
  rm -f "$dest.tmp.log"
  # mistralrs-core's build script embeds `git rev-parse HEAD` (found by walking up from the crate) and
  # asks to rerun when .git/HEAD changes. Inside our checkout that would be *our* HEAD, so every commit
  # here would rebuild mistralrs-core (~8 minutes). A tiny repo with one fixed commit pins it.
  GIT_AUTHOR_DATE="2000-01-01T00:00:00Z" GIT_COMMITTER_DATE="2000-01-01T00:00:00Z" \
    git -C "$dest.tmp" -c init.defaultBranch=pinned -c user.name=prepare-upstream -c user.email=prepare-upstream@localhost \
    -c commit.gpgsign=false init -q
  GIT_AUTHOR_DATE="2000-01-01T00:00:00Z" GIT_COMMITTER_DATE="2000-01-01T00:00:00Z" \
    git -C "$dest.tmp" -c user.name=prepare-upstream -c user.email=prepare-upstream@localhost \
    -c commit.gpgsign=false commit -q --allow-empty -m "$crate $version + patches $stamp"
  echo "$stamp" > "$dest.tmp/.patch-stamp"
  # cp -p keeps the registry mtimes of untouched files, so cargo (which fingerprints path crates by
  # mtime) rebuilds only when a patch really changed something.
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  echo "prepare-upstream: $crate $version with ${#patches[@]} patch(es)" >&2
done
