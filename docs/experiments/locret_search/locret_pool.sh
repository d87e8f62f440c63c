#!/usr/bin/env bash
# /tmp/gpu/long_lp = the weights now shipped in checkpoints/smollm2-135m/retaining_head (sha256 f2b94f55...); this script
# overrides pool_kernel / stabilizers where it needs other settings. To re-run: copy that folder to .gpu/a5/long_lp.
# On the GPU machine (after `source .gpu/b/setup.sh` and stashing the long_lp heads from .gpu/a5): issue #5,
# third step of the Locret search. Runtime settings of two trained heads (the shipped ones and long_lp)
# chosen on a NEW dev set (eval split, --seed 777, 16 samples per task; not the reported seed 1234):
#   pool_kernel 1 (Locret) / 5 / 9 (max-pool of the scores over neighbours, see RetainingHeadConfig)
#   x stabilizers 32 tokens / half of the budget.
# Rule fixed before the run: the two best dev scores at 2K x 1/8 get the reported grid (eval split, seed 1234,
# 4 samples: 0.5K/1K/2K x 1/2, 1/4, 1/8, 1/16) and the KL rows at 1K; the best is the result.
#   bash docs/experiments/locret_search/locret_pool.sh [deadline seconds, default 540]
set -uo pipefail
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${1:-540} ))
mkdir -p logs runs/devpool runs/cand
for base in ship=checkpoints/smollm2-135m/retaining_head lp=/tmp/gpu/long_lp; do
  for pool in 1 5 9; do for stab in 32 0.5; do
    python docs/experiments/locret_search/locret_tools.py candidate "${base%%=*}_p${pool}_s$stab" "${base#*=}" $pool $stab
  done; done
done
ev() {  # log, args...
  local log=$1; shift
  timeout $(( deadline - $(date +%s) - 25 )) python -m trainkv eval --model smollm2-135m --device cuda \
    --batch-size 64 --no-progress --tasks ruler "$@" >>"logs/$log.log" 2>&1
}
dev=(--output runs/devpool --samples 16 --seed 777 --context-lengths 2048)
ev dev_full "${dev[@]}" --methods full &
group() {  # log names...
  local log=$1; shift; local args=()
  for n in "$@"; do args+=(--checkpoint "$n=runs/cand/$n"); done
  ev "$log" "${dev[@]}" --keep 0.125 --methods "$@" "${args[@]}"
}
group dev_a ship_p1_s32 ship_p1_s0.5 ship_p5_s32 &
group dev_b ship_p5_s0.5 ship_p9_s32 ship_p9_s0.5 &
group dev_c lp_p1_s32 lp_p1_s0.5 lp_p5_s32 &
group dev_d lp_p5_s0.5 lp_p9_s32 lp_p9_s0.5 &
wait
best=$(python docs/experiments/locret_search/locret_tools.py best 2 "runs/devpool/runs/*__r0.125.json")
echo "selected on dev: $best" | tee logs/selected.log
grid=(--output results/smollm2 --samples 4 --keep 0.5 0.25 0.125 0.0625)
for n in $best; do
  for L in 2048 1024 512; do
    ev "grid_${n}_$L" "${grid[@]}" --context-lengths $L --methods "locret_$n" --checkpoint "locret_$n=runs/cand/$n" &
  done
done
wait
args=(); names=()
for n in $best; do names+=("locret_$n"); args+=(--checkpoint "locret_$n=runs/cand/$n"); done
ev kl --kl-only --kl-samples 8 --output results/smollm2_kl --keep 0.25 0.125 --context-lengths 1024 \
  --methods "${names[@]}" "${args[@]}"
python -m trainkv eval --report-only --output runs/devpool >/dev/null 2>&1
tar czf "$OUT/devpool.tgz" runs/devpool
tar czf "$OUT/grid.tgz" results/smollm2/runs/locret_* results/smollm2_kl/quality/locret_*
python docs/experiments/locret_search/locret_tools.py table "runs/devpool/runs/*.json" "results/smollm2/runs/locret_*" \
  "results/smollm2_kl/quality/locret_*" >"$OUT/logs.txt" 2>&1
for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | tail -2; done >>"$OUT/logs.txt"
cat "$OUT/logs.txt"
