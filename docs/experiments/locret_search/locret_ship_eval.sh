#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/b/setup.sh`): the reported grid and KL rows of the shipped Locret heads
# (checkpoints/smollm2-135m/retaining_head), replacing the first heads' rows (--overwrite; those stay in git
# history and as locret_v1 in results/smollm2_16). Output: $OUT/ship.tgz, $OUT/logs.txt.
#   bash docs/experiments/locret_search/locret_ship_eval.sh [deadline seconds, default 300]
set -uo pipefail
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${1:-300} ))
mkdir -p logs
rh=(--methods retaining_head --checkpoint retaining_head=checkpoints/smollm2-135m/retaining_head --overwrite)
ev() {  # log, args...
  local log=$1; shift
  timeout $(( deadline - $(date +%s) - 20 )) python -m trainkv eval --model smollm2-135m --device cuda \
    --batch-size 64 --no-progress --tasks ruler "${rh[@]}" "$@" >>"logs/$log.log" 2>&1
}
for L in 2048 1024 512; do
  ev grid_$L --output results/smollm2 --samples 4 --keep 0.5 0.25 0.125 0.0625 --context-lengths $L &
done
ev kl --kl-only --kl-samples 8 --output results/smollm2_kl --keep 0.25 0.125 --context-lengths 1024 &
wait
tar czf "$OUT/ship.tgz" results/smollm2/runs/retaining_head__* results/smollm2_kl/quality/retaining_head__*
python docs/experiments/locret_search/locret_tools.py table "results/smollm2/runs/retaining_head__*" "results/smollm2_kl/quality/retaining_head__*" >"$OUT/logs.txt" 2>&1
for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | tail -2; done >>"$OUT/logs.txt"
cat "$OUT/logs.txt"
