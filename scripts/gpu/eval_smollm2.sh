#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/b/setup.sh`): the SmolLM2 evaluation sweep, returned as $OUT/eval.tgz.
#   bash scripts/gpu/eval_smollm2.sh <output dir> <seconds> [extra trainkv eval args]
set -uo pipefail
out=$1; secs=$2; shift 2
timeout "$secs" python -m trainkv.cli eval --model smollm2-135m --device cuda --batch-size 16 --no-progress --output "$out" "$@" 2>&1 \
  | grep -v "it/s\]" | tail -15
python -m trainkv.cli eval --report-only --output "$out" >/dev/null 2>&1
tar czf "$OUT/eval.tgz" "$out"
