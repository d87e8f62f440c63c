#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/b/setup.sh`): issue #5, a confirmation on samples no choice was made on:
# eval split, seed 2024 (not the dev seeds 4321/777, not the reported 1234), 16 samples per task, 1K and 2K x 1/8,
# full cache vs the shipped Locret heads and Attention-Gate. Output: $OUT/confirm.tgz (results/smollm2_seed2024).
#   bash docs/experiments/locret_search/locret_confirm.sh [deadline seconds, default 200]
set -uo pipefail
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${1:-200} ))
mkdir -p logs
for L in 2048 1024; do
  for m in full retaining_head attention_gate; do
    ck=(); [ "$m" != full ] && ck=(--checkpoint "$m=checkpoints/smollm2-135m/$m")
    timeout $(( deadline - $(date +%s) - 15 )) python -m trainkv eval --model smollm2-135m --device cuda \
      --batch-size 64 --no-progress --tasks ruler --output results/smollm2_seed2024 --samples 16 --seed 2024 \
      --keep 0.125 --context-lengths $L --methods $m "${ck[@]}" >>"logs/${m}_$L.log" 2>&1 &
  done
done
wait
python -m trainkv eval --report-only --output results/smollm2_seed2024 --seed 2024 --samples 16 >/dev/null 2>&1
tar czf "$OUT/confirm.tgz" results/smollm2_seed2024
python docs/experiments/locret_search/locret_tools.py table "results/smollm2_seed2024/runs/*.json" | tee "$OUT/logs.txt"
