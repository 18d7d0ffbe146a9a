#!/usr/bin/env bash
# Check that committed generated Swift code matches proto/*.proto and proto/*/*.proto.
#
# Usage: scripts/check-generated.sh [--full|--fast]
#   fast (always): recompute sha256 of every file listed in each
#         Sources/*/GENERATED.sha256 stamp, and check every proto/*.proto is
#         covered by a stamp. Catches protos edited without regenerating and
#         hand-edited generated files.
#   full: additionally regenerate into a temp dir and diff against the
#         committed files. Runs when --full is given, or automatically when
#         protoc and protoc-gen-swift ($PROTOC_GEN_SWIFT or the cache dir) are
#         available, unless --fast is given. With --full the plugin is built if needed.
set -euo pipefail

SWIFT_PROTOBUF_VERSION="1.39.0"
STAMP_NAME="GENERATED.sha256"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=auto
case "${1:-}" in
  "") ;;
  --full) MODE=full ;;
  --fast) MODE=fast ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

REGEN_MSG="run scripts/generate-protos.sh"
fail=0
stale() { echo "check-generated: generated code is out of date with $1: $REGEN_MSG" >&2; fail=1; }

# ---- fast check -----------------------------------------------------------
shopt -s nullglob
stamps=(Sources/*/"$STAMP_NAME")
declare -A COVERED=()
if [[ ${#stamps[@]} -eq 0 ]]; then
  echo "check-generated: no Sources/*/$STAMP_NAME stamp found: $REGEN_MSG" >&2
  exit 1
fi
for stamp in "${stamps[@]}"; do
  dir="$(dirname "$stamp")"
  declare -A LISTED=()
  # Protos this stamp covers (named in the staleness message).
  protos_in_stamp="$(grep -v '^#' "$stamp" | awk '$2 ~ /^proto\// {printf "%s%s", sep, $2; sep=", "}')"
  while IFS= read -r line; do
    [[ -z "$line" || "$line" == \#* ]] && continue
    want="${line%%  *}"; path="${line#*  }"
    LISTED["$path"]=1
    [[ "$path" == proto/* ]] && COVERED["$path"]=1
    if [[ ! -f "$path" ]]; then
      stale "${protos_in_stamp:-proto/} ($path, listed in $stamp, is missing)"; continue
    fi
    got="$(sha256sum "$path" | cut -d' ' -f1)"
    if [[ "$got" != "$want" ]]; then
      if [[ "$path" == proto/* ]]; then
        stale "$path (proto changed without regeneration)"
      else
        stale "${protos_in_stamp:-proto/} ($path was modified by hand)"
      fi
    fi
  done < "$stamp"
  for f in "$dir"/*.pb.swift; do
    [[ -n "${LISTED[$f]:-}" ]] || stale "proto/ ($f is not listed in $stamp)"
  done
  unset LISTED
done
for p in proto/*.proto proto/*/*.proto; do
  [[ -n "${COVERED[$p]:-}" ]] || stale "$p (not covered by any $STAMP_NAME stamp)"
done
if [[ $fail -ne 0 ]]; then exit 1; fi
echo "check-generated: stamps OK (${stamps[*]})"

# ---- full check -----------------------------------------------------------
if [[ "$MODE" == auto ]]; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/cairn/protoc-gen-swift-$SWIFT_PROTOBUF_VERSION/protoc-gen-swift"
  if command -v protoc >/dev/null 2>&1 && { [[ -x "${PROTOC_GEN_SWIFT:-}" ]] || [[ -x "$cache" ]]; }; then
    MODE=full
  else
    echo "check-generated: protoc-gen-swift not available; skipped full regeneration check (use --full)"
    exit 0
  fi
fi
[[ "$MODE" == full ]] || exit 0

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$ROOT/scripts/generate-protos.sh" --out-root "$tmp" 2>"$tmp/gen.log" \
  || { cat "$tmp/gen.log" >&2; echo "check-generated: regeneration failed" >&2; exit 1; }
for stamp in "${stamps[@]}"; do
  dir="$(dirname "$stamp")"
  # Compare generated sources exactly (only *.pb.swift; hand-written files in
  # the target are ignored); compare stamps ignoring the comment header (it
  # records tool versions).
  : >"$tmp/diff"
  for f in "$dir"/*.pb.swift "$tmp/$dir"/*.pb.swift; do
    rel="$dir/$(basename "$f")"
    diff -u "$rel" "$tmp/$rel" >>"$tmp/diff" 2>&1 || true
  done
  diff <(grep -v '^#' "$stamp") <(grep -v '^#' "$tmp/$stamp") >>"$tmp/diff" 2>&1 || true
  if [[ -s "$tmp/diff" ]]; then
    head -n 40 "$tmp/diff" >&2
    stale "$(grep -v '^#' "$stamp" | awk '$2 ~ /^proto\// {printf "%s%s", sep, $2; sep=", "}') (regenerating $dir differs from the committed files)"
  fi
done
for d in "$tmp"/Sources/*/; do
  d="${d#"$tmp"/}"; d="${d%/}"
  [[ -f "$d/$STAMP_NAME" ]] || stale "proto/ ($d is generated but not committed)"
done
if [[ $fail -ne 0 ]]; then exit 1; fi
echo "check-generated: full regeneration matches committed files"
