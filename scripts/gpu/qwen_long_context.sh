#!/usr/bin/env bash
# Issue 18 on one H200: Qwen2.5-Coder-0.5B-Instruct at 4K-32K tokens. NOT YET RUN on a GPU: the phases below are
# sized from the recipes' measured training times (their YAML headers), the evaluation times are guesses; run
# `train` first and read its wall times before planning the rest. Setup: `../shared/tools/gpu-prep --with-qwen`
# here, the stash runs back to back there, then `source .gpu/b/setup.sh` (it installs the six pinned wheels).
#
#   bash scripts/gpu/qwen_long_context.sh train  [deadline s, default 560]
#       Attention-Gate (150 steps, 4-8K) and Locret (300 steps, 8-16K) train at once, then the learned layer
#       budgets on the trained gates (120 steps); beside them the choice-free test cells that decide the claims:
#       the full cache and every training-free method at 16K and 32K x 1/8.
#   bash scripts/gpu/qwen_long_context.sh claims [deadline]
#       the trained methods at 8K, 16K and 32K x 1/8 (the Attention-Gate, trained on <= 8K, at 8K vs 32K is the
#       length-generalization pair), KL to the full cache at 8K x 1/8 on held-out prose for every method, and
#       peak memory / prefill speed at 32K, full cache vs trainkv (benchmarks/runtime_scale.py smollm2 --model).
#   bash scripts/gpu/qwen_long_context.sh grid   [deadline]
#       the rest of the grid: 4K, keeps 1/4 and 1/16 everywhere, 1/32 at 32K.
#
# No choice is made on these cells: the recipes and their run-time settings are fixed before any evaluation, so
# every cell is a test-split cell (docs/protocol.md; a choice among settings would need dev cells first). Every
# cell resumes (a `trainkv eval` output folder), trainings resume from their last checkpoint (`resume: auto`), so
# a phase cut short is finished by running it again on the same warm machine (runs/ survives between calls).
# Returns $OUT/qwen_results.tgz (results, train summaries and metrics, logs; no weights) and, after `train`,
# $OUT/qwen_gates.tgz.NN (the finals, in parts under 16 MiB: `cat qwen_gates.tgz.* | tar xz` here, then
# scripts/ship_checkpoint.py).
# CPU smoke test (the script's logic, in minutes): MODEL=smollm2-135m DEVICE=cpu LENGTHS_CLAIM="512" LENGTHS_LONG="512"
#   N=1 TRAIN_OVERRIDES="max_steps=2 data.seq_len=640 data.context_tokens=[256] data.num_samples=2" TRAIN_ACCEL=cpu
#   TF_METHODS="streaming_llm" OUT=/tmp/qs bash scripts/gpu/qwen_long_context.sh train 400
set -uo pipefail
phase=${1:?usage: qwen_long_context.sh train|claims|grid [deadline seconds]}
start=$(date +%s); deadline=$(( start + ${2:-560} ))
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
MODEL=${MODEL:-qwen2.5-coder-0.5b}; DEVICE=${DEVICE:-cuda}; N=${N:-8}
R=results/${MODEL}; RUNS=runs/${MODEL}; CFG=configs/recipes/qwen2.5-coder-0.5b
LONG=(${LENGTHS_LONG:-16384 32768}); CLAIM=(${LENGTHS_CLAIM:-8192 16384 32768})
TF_METHODS=(${TF_METHODS:-streaming_llm h2o snapkv tova corm random})
AG=$RUNS/attention_gate_sft/final; RH=$RUNS/locret/final; LB=$RUNS/layer_budget_r8/final
TRAINED=(--checkpoint "attention_gate=$AG" --checkpoint "retaining_head=$RH" --checkpoint "layer_budget=$LB")
COMMON=(--model "$MODEL" --device "$DEVICE" --split test --tasks ruler --samples "$N" --chunk-size 1024 --no-progress)
mkdir -p logs "$R"

finish() {
  tar czf "$OUT/qwen_results.tgz" "$R" logs $(ls "$RUNS"/*/train_summary.json "$RUNS"/*/metrics.jsonl \
    "$RUNS"/*/final/config.json "$RUNS"/*/final/allocation.json 2>/dev/null) 2>/dev/null
  if [ "$phase" = train ] && ls "$RUNS"/*/final/model.safetensors >/dev/null 2>&1; then
    tar czf - "$RUNS"/*/final | split -b 15M -d -a 2 - "$OUT/qwen_gates.tgz."
  fi
  { for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | grep -v "^| \|^$" | tail -2; done
    echo "wall: $(( $(date +%s) - start )) s"; } >"$OUT/qwen_logs.txt"
}
trap finish EXIT
left() { echo $(( deadline - $(date +%s) - 30 )); }
ev() {  # log, args...: one `trainkv eval` process (blocks; resumable; skipped when no time is left)
  local log=$1; shift; local s=$(date +%s) l; l=$(left)
  [ "$l" -gt 15 ] || { echo "$log: skipped: no time left" >>"logs/$log.log"; return 0; }
  timeout "$l" python -m trainkv eval "${COMMON[@]}" "$@" >>"logs/$log.log" 2>&1
  echo "$log: exit $? after $(( $(date +%s) - s )) s" >>"logs/$log.log"
}
train() {  # log recipe config [overrides...]
  local log=$1 recipe=$2 config=$3; shift 3; local s=$(date +%s) l; l=$(left)
  [ "$l" -gt 30 ] || { echo "$log: skipped: no time left" >>"logs/$log.log"; return 0; }
  timeout "$l" accelerate launch --config_file "configs/accelerate/${TRAIN_ACCEL:-single_gpu}.yaml" "recipes/$recipe" \
    --config "$CFG/$config" model="$MODEL" progress_bar=false ${TRAIN_OVERRIDES:-} "$@" >>"logs/$log.log" 2>&1
  local rc=$?; echo "$log: exit $rc after $(( $(date +%s) - s )) s" >>"logs/$log.log"; return $rc
}

case $phase in
  train)
    train train_ag attention_gate_sft.py attention_gate_sft.yaml output_dir="${AG%/final}" && \
      train train_lb layer_budget_train.py layer_budget.yaml output_dir="${LB%/final}" method.base_checkpoint="$AG" &
    train train_rh locret_train.py locret.yaml output_dir="${RH%/final}" &
    for L in "${LONG[@]}"; do
      ev "tf_$L" --output "$R/test" --methods full "${TF_METHODS[@]}" --keep 1/8 --context-lengths "$L" --batch-size 8 &
    done
    wait ;;
  claims)
    for L in "${CLAIM[@]}"; do
      ev "trained_$L" --output "$R/test" --methods attention_gate retaining_head layer_budget "${TRAINED[@]}" \
        --keep 1/8 --context-lengths "$L" --batch-size 8 &
    done
    ev kl --output "$R/kl" --kl-only --methods full "${TF_METHODS[@]}" attention_gate retaining_head layer_budget \
      "${TRAINED[@]}" --keep 1/8 --context-lengths "${CLAIM[0]}" &
    wait
    l=$(left); [ "$l" -gt 60 ] && timeout "$l" python benchmarks/runtime_scale.py smollm2 --model "$MODEL" \
      --checkpoint "$AG" --contexts "${LONG[-1]}" --new-tokens 64 --budget $(( ${LONG[-1]} / 8 )) --chunk 1024 \
      --decode-context "${LONG[-1]}" --name "$OUT/qwen_runtime" >logs/runtime.log 2>&1 ;;
  grid)
    ev grid_4k --output "$R/test" --methods full "${TF_METHODS[@]}" attention_gate retaining_head layer_budget \
      "${TRAINED[@]}" --keep 1/4 1/8 1/16 --context-lengths 4096 --batch-size 8 &
    for L in "${CLAIM[@]}"; do
      keeps=(1/4 1/16); [ "$L" = "${LONG[-1]}" ] && keeps+=(1/32)
      ev "grid_$L" --output "$R/test" --methods full "${TF_METHODS[@]}" attention_gate retaining_head layer_budget \
        "${TRAINED[@]}" --keep "${keeps[@]}" --context-lengths "$L" --batch-size 8 &
    done
    wait ;;
  *) echo "unknown phase $phase (train, claims, grid)" >&2; exit 2 ;;
esac
for d in test kl; do
  if [ -d "$R/$d/runs" ]; then python -m trainkv eval --report-only --output "$R/$d" >"logs/report_$d.log" 2>&1; fi
done
exit 0
