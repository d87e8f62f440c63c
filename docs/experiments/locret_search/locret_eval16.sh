#!/usr/bin/env bash
# /tmp/gpu/long_lp = the weights now shipped in checkpoints/smollm2-135m/retaining_head (sha256 f2b94f55...); this script
# overrides pool_kernel / stabilizers where it needs other settings. To re-run: copy that folder to .gpu/a5/long_lp.
# On the GPU machine (after `source .gpu/b/setup.sh` and stashing the long_lp heads from .gpu/a5): issue #5,
# a tighter measurement of the cells that decide it: eval split, seed 1234 (the reported seed), 16 samples per
# task (176 per cell; the grid's 4 samples are the first 4 of each task), 1K and 2K x 1/8, for the full cache,
# the shipped Attention-Gate, Locret as first shipped (pool 1, 32 stabilizers) and long_lp with pool 9 and
# 32 / half-budget stabilizers. Output: $OUT/eval16.tgz (results/smollm2_16/runs), $OUT/logs.txt.
#   bash docs/experiments/locret_search/locret_eval16.sh [deadline seconds, default 400]
set -uo pipefail
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${1:-400} ))
mkdir -p logs runs/cand
python docs/experiments/locret_search/locret_tools.py candidate locret_v1 checkpoints/smollm2-135m/retaining_head 1 32
python docs/experiments/locret_search/locret_tools.py candidate locret_lp_p9_s0.5 /tmp/gpu/long_lp 9 0.5
python docs/experiments/locret_search/locret_tools.py candidate locret_lp_p9_s32 /tmp/gpu/long_lp 9 32
ev() {  # log, args...
  local log=$1; shift
  timeout $(( deadline - $(date +%s) - 20 )) python -m trainkv eval --model smollm2-135m --device cuda \
    --batch-size 64 --no-progress --tasks ruler --output results/smollm2_16 --samples 16 --seed 1234 \
    --keep 0.125 "$@" >>"logs/$log.log" 2>&1
}
for L in 2048 1024; do
  ev full_$L --context-lengths $L --methods full &
  ev ag_$L --context-lengths $L --methods attention_gate --checkpoint attention_gate=checkpoints/smollm2-135m/attention_gate &
  for n in locret_v1 locret_lp_p9_s0.5 locret_lp_p9_s32; do
    ev ${n}_$L --context-lengths $L --methods $n --checkpoint $n=runs/cand/$n &
  done
done
wait
python -m trainkv eval --report-only --output results/smollm2_16 >/dev/null 2>&1
tar czf "$OUT/eval16.tgz" results/smollm2_16
python docs/experiments/locret_search/locret_tools.py table "results/smollm2_16/runs/*.json" >"$OUT/logs.txt" 2>&1
for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | tail -2; done >>"$OUT/logs.txt"
cat "$OUT/logs.txt"
