#!/usr/bin/env bash
# /tmp/gpu/long_lp = the weights now shipped in checkpoints/smollm2-135m/retaining_head (sha256 f2b94f55...) with
# pool_kernel 1 and stabilizers 0.5 in config.json (as run here). To re-run: copy that folder to .gpu/a5/long_lp, edit.
# On the GPU machine (after `source .gpu/b/setup.sh` and stashing the long_lp heads from .gpu/a5): issue #5,
# second step of the Locret search (`locret_search.sh` was the first). Both candidates now carry
# stabilizers = 0.5 (half of the budget protected as the most recent tokens) in their config.json:
#   * DEV set (eval split, --seed 4321, 8 samples per task): long_lp at 2K x 1/8 with 128 recent tokens, and
#     1K x 1/8 (budget 128) with 32 vs 64 for both candidates + the full cache;
#   * the reported grid (eval split, seed 1234, 4 samples, as every other row of results/smollm2) for both:
#     0.5K/1K/2K x 1/2, 1/4, 1/8, 1/16, the recent window taken from each checkpoint (no --recent-window);
#   * KL to the full cache on held-out prose at 1K (8 segments, as results/smollm2_kl).
#   bash docs/experiments/locret_search/locret_final.sh [deadline seconds, default 540]
set -uo pipefail
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${1:-540} ))
mkdir -p logs runs/dev
ship=checkpoints/smollm2-135m/retaining_head
lp=/tmp/gpu/long_lp
ev() {  # log, args...
  local log=$1; shift
  timeout $(( deadline - $(date +%s) - 25 )) python -m trainkv eval --model smollm2-135m --device cuda \
    --batch-size 64 --no-progress --tasks ruler "$@" >>"logs/$log.log" 2>&1
}
dev=(--output runs/dev --samples 8 --seed 4321 --keep 0.125)
ev dev2k "${dev[@]}" --context-lengths 2048 --recent-window 128 --methods long_lp_rw128 --checkpoint long_lp_rw128=$lp &
ev dev1k_full --output runs/dev --samples 8 --seed 4321 --methods full --context-lengths 1024 &
for rw in 32 64; do
  ev dev1k_$rw "${dev[@]}" --context-lengths 1024 --recent-window $rw --methods ship_rw$rw long_lp_rw$rw \
    --checkpoint ship_rw$rw=$ship --checkpoint long_lp_rw$rw=$lp &
done
grid=(--output results/smollm2 --samples 4 --keep 0.5 0.25 0.125 0.0625)
for L in 2048 1024 512; do
  ev grid_ship_$L "${grid[@]}" --context-lengths $L --overwrite --methods retaining_head --checkpoint retaining_head=$ship &
  ev grid_lp_$L "${grid[@]}" --context-lengths $L --methods locret_long_lp --checkpoint locret_long_lp=$lp &
done
wait
ev kl --kl-only --kl-samples 8 --output results/smollm2_kl --keep 0.25 0.125 --context-lengths 1024 --overwrite \
  --methods retaining_head locret_long_lp --checkpoint retaining_head=$ship --checkpoint locret_long_lp=$lp
python -m trainkv eval --report-only --output runs/dev >/dev/null 2>&1
tar czf "$OUT/dev.tgz" runs/dev
tar czf "$OUT/grid.tgz" results/smollm2/runs/retaining_head__* results/smollm2/runs/locret_long_lp__* \
  results/smollm2_kl/quality/retaining_head__* results/smollm2_kl/quality/locret_long_lp__*
python docs/experiments/locret_search/locret_tools.py table "runs/dev/runs/*.json" "results/smollm2/runs/retaining_head__*" \
  "results/smollm2/runs/locret_long_lp__*" "results/smollm2_kl/quality/retaining_head__*" "results/smollm2_kl/quality/locret_long_lp__*" >"$OUT/logs.txt" 2>&1
for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | tail -3; done >>"$OUT/logs.txt"
cat "$OUT/logs.txt"
