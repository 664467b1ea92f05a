#!/usr/bin/env bash
# Wall time of the seven `lens` commands on the tiny profile (the issue's 15-minute budget on 2 cores).
# Usage: bench/pipeline_time.sh [OUTPUT_ROOT] [extra key=value overrides...]
# Writes <root>/tiny/pipeline_time.json and prints the comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-runs-bench}; shift || true
lens=(.venv/bin/lens)
common=(--profile tiny "run.output_root=$root" "tracking.tracking_uri=sqlite:///$PWD/$root/mlflow.db" "$@")
declare -A secs
run() { local name=$1; shift; local t0=$(date +%s.%N); "${lens[@]}" "$@" "${common[@]}" > "/tmp/lens-bench-$name.log" 2>&1 \
  || { echo "$name failed: see /tmp/lens-bench-$name.log"; exit 1; }; secs[$name]=$(echo "$(date +%s.%N) - $t0" | bc); echo "$name: ${secs[$name]} s"; }
start=$(date +%s.%N)
run prepare prepare
run warm_start warm-start
run train_grpo train --algo grpo
run train_lens train --algo lens
run evaluate_grpo evaluate --algo grpo
run evaluate_lens evaluate --algo lens
run compare compare
total=$(echo "$(date +%s.%N) - $start" | bc)
echo "total: $total s"
{ echo "{"; for k in "${!secs[@]}"; do echo "  \"$k\": ${secs[$k]},"; done; echo "  \"total\": $total"; echo "}"; } > "$root/tiny/pipeline_time.json"
cat "$root/tiny/compare/compare.md" | head -20
cat "$root/tiny/warm_start/warm_start.json"
