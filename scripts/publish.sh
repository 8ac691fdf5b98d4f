#!/usr/bin/env bash
# Publishes the seven branches under BRANCHES_DIR to the Hub repository REPO:
# writes the model card from the branch reports, then runs `mixtral-gptq publish`, which verifies
# each branch (a branch that fails `verify` is never uploaded), creates the Hub branches and uploads
# each directory with the official `hf` client.
#
# The token is read by `hf` from HF_TOKEN only; this script never prints or writes it.
#
# Usage: scripts/publish.sh BRANCHES_DIR OWNER/REPO [--dry-run]
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 BRANCHES_DIR OWNER/REPO [--dry-run]" >&2
  exit 2
fi
dir=$1
repo=$2
shift 2

bin=${MIXTRAL_GPTQ:-mixtral-gptq}
branches=()
for b in main gptq-4bit-128g-actorder_True gptq-4bit-32g-actorder_True \
         gptq-3bit--1g-actorder_True gptq-3bit-128g-actorder_True \
         gptq-8bit--1g-actorder_True gptq-8bit-128g-actorder_True; do
  if [[ -d "$dir/$b" ]]; then
    branches+=("$dir/$b")
  else
    echo "warning: $dir/$b is missing; it is not published" >&2
  fi
done
if [[ ${#branches[@]} -eq 0 ]]; then
  echo "error: no branch directories under $dir" >&2
  exit 2
fi

card_args=()
if [[ -f comparison/baseline-eval.json ]]; then
  card_args+=(--baseline-eval comparison/baseline-eval.json)
fi
card="$dir/README.md"
"$bin" card --repo "$repo" --out "$card" "${card_args[@]}" "${branches[@]}"
"$bin" publish --repo "$repo" --card "$card" "$@" "${branches[@]}"
