#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/b/setup.sh`): learned layer budgets on top of the shipped
# Attention-Gate (two runs at once: total keep 1/8 and 1/16 at 2K tokens), then the allocators side by side
# with the same scorer on the evaluation split at 2K tokens. Returns $OUT/layer_budget.tgz and prints the table.
#   bash scripts/gpu/learned_layer_budgets.sh [samples per task, default 6]
set -uo pipefail
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
samples=${1:-6}
base=checkpoints/smollm2-135m/attention_gate
mkdir -p logs results/layer_budget
# target_keep = evictable fraction kept at the operating point: (budget - protected) / (context - protected),
# protected = 4 sinks + a window of min(32, budget / 4): 1/8 of 2048 -> (256 - 36) / 2012 = 0.11; 1/16 -> 92 / 2012 = 0.046
lb() {  # name target_keep budget
  local s=$(date +%s)
  timeout 240 accelerate launch --config_file configs/accelerate/single_gpu.yaml recipes/layer_budget_train.py \
    --config configs/recipes/smollm2-135m/layer_budget.yaml output_dir="runs/smollm2-135m/layer_budget_$1" \
    method.base_checkpoint=$base method.target_keep="$2" method.report_context=2048 eviction.budget="$3" \
    eviction.chunk_size=512 data.source=builtin:tasks data.seq_len=2304 "data.context_tokens=[1600,2000]" \
    data.num_samples=1600 data.seed=11 batch_size=8 max_steps=150 warmup_steps=5 save_every=0 log_every=10 \
    progress_bar=false >"logs/lb_$1.log" 2>&1
  echo "layer_budget_$1: exit $? after $(( $(date +%s) - s )) s"
}
lb r8 0.11 0.125 &
lb r16 0.046 0.0625 &
wait
s=$(date +%s)
timeout 330 python -m trainkv.eval.allocation --checkpoint $base --allocators uniform,pyramid,adakv,xkv \
  --learned learned_r8=runs/smollm2-135m/layer_budget_r8/final --learned learned_r16=runs/smollm2-135m/layer_budget_r16/final \
  --keep 0.125,0.0625 --context-length 2048 --tasks ruler --samples "$samples" --device cuda --batch-size 66 \
  --output results/layer_budget/smollm2_ag_2048.json 2>&1 | grep -v "it/s\]" | tail -25
echo "allocation compare: $(( $(date +%s) - s )) s"
tar czf "$OUT/layer_budget.tgz" results/layer_budget runs/smollm2-135m/layer_budget_r8/final runs/smollm2-135m/layer_budget_r16/final \
  runs/smollm2-135m/layer_budget_r8/train_summary.json runs/smollm2-135m/layer_budget_r16/train_summary.json logs/lb_*.log
