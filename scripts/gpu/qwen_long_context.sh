#!/usr/bin/env bash
# Issue 18 on one H200: Qwen2.5-Coder-0.5B-Instruct at 4K-32K tokens. The phases are sized from the recipes'
# measured training times (their YAML headers); every step logs its wall time (runs/<model>/logs/*.log and
# $OUT/qwen_logs.txt). First run and its lessons: docs/notes/issue18_qwen.md. Setup: `../shared/tools/gpu-prep --with-qwen`
# here, the stash runs back to back there, then `source .gpu/b/setup.sh` (it installs the six pinned wheels).
#
# Locret's shipped heads can stand in for its training (same recipe): copy checkpoints/qwen2.5-coder-0.5b/retaining_head
# to runs/qwen2.5-coder-0.5b/locret/final and touch final/.shipped there (a stash-like run carrying that folder).
#
#   bash scripts/gpu/qwen_long_context.sh train  [deadline s, default 560]
#       Everything the claims need, as a pipeline on one GPU: Attention-Gate (150 steps, 4-8K) and Locret (300 steps,
#       8-16K) train at once; each trained method is evaluated at 8K, 16K and 32K x 1/8 as soon as its final exists
#       (the Attention-Gate, trained on <= 8K, at 8K vs 32K is the length-generalization pair); the learned layer
#       budgets train on the finished gates (120 steps), then are evaluated; beside them the full cache and every
#       training-free method at 16K and 32K x 1/8. Run it again on the same warm machine to finish what the
#       deadline cut (finished trainings are skipped, finished cells are kept).
#   bash scripts/gpu/qwen_long_context.sh claims [deadline]
#       what `train` left unfinished, then KL to the full cache at 8K x 1/8 on held-out prose for every method, and
#       peak memory / prefill speed at 32K, full cache vs trainkv (benchmarks/runtime_scale.py smollm2 --model), for
#       which the evaluations leave the last RUNTIME_RESERVE seconds (default 150) once the Attention-Gate exists.
#   bash scripts/gpu/qwen_long_context.sh grid   [deadline]
#       the rest of the grid: 4K, keeps 1/4 and 1/16 everywhere, 1/32 at 32K.
#   bash scripts/gpu/qwen_long_context.sh long   [deadline]
#       the 32K miss of the 8-16K Locret heads: heads trained on 16-32K (locret_32k.yaml), then DEV cells at 32K x 1/8
#       (full cache, the shipped heads, the new heads; NDEV samples per task and dev seed, default 3), the choice by
#       scripts/select_checkpoint.py (declared order: shipped heads first), and only then the new heads' TEST cells at
#       16K and 32K x 1/8 (reported whichever wins; the claim uses the dev-chosen heads).
#
# No choice is made on these cells: the recipes and their run-time settings are fixed before any evaluation, so
# every cell is a test-split cell (docs/protocol.md; a choice among settings would need dev cells first). Every
# cell resumes (a `trainkv eval` output folder), trainings resume from their last checkpoint (`resume: auto`), so
# a phase cut short is finished by running it again on the same warm machine (runs/ survives between calls).
# Returns $OUT/qwen_results.tgz (results, train summaries and metrics, logs; no weights) and, after `train`,
# $OUT/qwen_gates.tgz.NN (the finals, in parts under 16 MiB: `cat qwen_gates.tgz.* | tar xz` here, then
# scripts/ship_checkpoint.py).
# CPU smoke test (the script's logic, in minutes): MODEL=smollm2-135m DEVICE=cpu LENGTHS_CLAIM="384 512" LENGTHS_LONG="512"
#   N=1 TRAIN_OVERRIDES="max_steps=2 data.seq_len=640 data.context_tokens=[256] data.num_samples=2" TRAIN_ACCEL=cpu
#   TF_METHODS="streaming_llm h2o" MAX_EVAL=2 OUT=/tmp/qs bash scripts/gpu/qwen_long_context.sh train 900  (887 s on 2 cores)
set -uo pipefail
phase=${1:?usage: qwen_long_context.sh train|claims|grid|long [deadline seconds]}
start=$(date +%s); deadline=$(( start + ${2:-560} ))
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
MODEL=${MODEL:-qwen2.5-coder-0.5b}; DEVICE=${DEVICE:-cuda}; N=${N:-8}
# bfloat16 since the second GPU session (the model's own dtype; the first session's cells were float32 and ran at
# ~13K tokens/s, too slow for the 32K cells): every cell of one results folder has the same dtype (trainkv eval
# refuses to merge runs of another dtype into a folder's table).
DTYPE=${DTYPE:-bfloat16}
# Everything lives under runs/ (ignored by git): the device machine keeps ignored paths between calls but
# replaces the rest of the tree with the carried one, so results or logs written elsewhere vanish at the next call.
RUNS=runs/${MODEL}; R=$RUNS/results; L_=$RUNS/logs; CFG=configs/recipes/qwen2.5-coder-0.5b
LONG=(${LENGTHS_LONG:-16384 32768}); CLAIM=(${LENGTHS_CLAIM:-8192 16384 32768})
TF_METHODS=(${TF_METHODS:-streaming_llm h2o snapkv tova corm random})
AG=$RUNS/attention_gate_sft/final; RH=$RUNS/locret/final; LB=$RUNS/layer_budget_r8/final; RH32=$RUNS/locret_32k/final
COMMON=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --split test --tasks ruler --samples "$N" --chunk-size 1024 --no-progress)
mkdir -p "$L_" "$R"

finish() {
  tar czf "$OUT/qwen_results.tgz" "$R" "$L_" $(ls "$RUNS"/*/train_summary.json "$RUNS"/*/metrics.jsonl \
    "$RUNS"/*/final/config.json "$RUNS"/*/final/allocation.json "$RUNS"/*/selection.json 2>/dev/null) 2>/dev/null
  local finals=()  # trained here (a final copied in from checkpoints/ carries a .shipped marker: not sent back)
  for d in "$RUNS"/*/final; do [ -f "$d/model.safetensors" ] && [ ! -f "$d/.shipped" ] && finals+=("$d"); done
  if [ "${#finals[@]}" -gt 0 ]; then tar czf - "${finals[@]}" | split -b 15M -d -a 2 - "$OUT/qwen_gates.tgz."; fi
  { for f in "$L_"/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | grep -v "^| \|^$" | tail -2; done
    echo "wall: $(( $(date +%s) - start )) s"; } >"$OUT/qwen_logs.txt"
}
trap finish EXIT
left() { echo $(( deadline - $(date +%s) - 30 )); }
ev() {  # log, args...: one `trainkv eval` process (blocks; resumable; skipped when no time is left)
  local log=$1; shift; local s=$(date +%s) l; l=$(left)
  [ "$l" -gt 15 ] || { echo "$log: skipped: no time left" >>"$L_/$log.log"; return 0; }
  timeout "$l" python -m trainkv eval "${COMMON[@]}" "$@" >>"$L_/$log.log" 2>&1
  echo "$log: exit $? after $(( $(date +%s) - s )) s" >>"$L_/$log.log"
}
train() {  # log recipe config output_dir [overrides...]: skipped when output_dir/final exists
  local log=$1 recipe=$2 config=$3 dir=$4; shift 4; local s=$(date +%s) l; l=$(left)
  [ -f "$dir/final/model.safetensors" ] && return 0
  [[ " ${SKIP_TRAIN:-} " == *" $log "* ]] && { echo "$log: skipped (SKIP_TRAIN)" >>"$L_/$log.log"; return 1; }
  [ "$l" -gt 30 ] || { echo "$log: skipped: no time left" >>"$L_/$log.log"; return 0; }
  timeout "$l" accelerate launch --config_file "configs/accelerate/${TRAIN_ACCEL:-single_gpu}.yaml" "recipes/$recipe" \
    --config "$CFG/$config" model="$MODEL" output_dir="$dir" progress_bar=false ${TRAIN_OVERRIDES:-} "$@" >>"$L_/$log.log" 2>&1
  local rc=$?; echo "$log: exit $rc after $(( $(date +%s) - s )) s" >>"$L_/$log.log"; return $rc
}

trained_present() {  # TM: the trained methods whose final exists, TC: their --checkpoint options
  TM=(); TC=()
  for spec in "attention_gate=$AG" "retaining_head=$RH" "layer_budget=$LB"; do
    if [ -f "${spec#*=}/model.safetensors" ]; then TM+=("${spec%%=*}"); TC+=(--checkpoint "$spec"); fi
  done
}
throttle() {  # wait while MAX_EVAL evaluation processes run (each holds the fp32 model and its activations)
  sleep 2  # the one launched last has started its process
  while [ "$(pgrep -fc '^timeout [0-9]+ python -m trainkv eval')" -ge "${MAX_EVAL:-8}" ]; do sleep 5; done
}
trained() {  # method checkpoint-option: that method's claim cells at every claim length, once its final exists
  local method=$1 ckpt=$2
  [ -f "${ckpt#*=}/model.safetensors" ] || { echo "trained_$method: no final, skipped" >>"$L_/trained_$method.log"; return 0; }
  for L in "${CLAIM[@]}"; do
    throttle
    ev "trained_${method}_$L" --output "$R/test" --methods "$method" --checkpoint "$ckpt" --keep 1/8 \
      --context-lengths "$L" --batch-size 8 &
  done
  wait
}
pipeline() {  # trainings and the claim cells, each cell as soon as what it needs exists
  { train train_ag attention_gate_sft.py attention_gate_sft.yaml "${AG%/final}"
    trained attention_gate "attention_gate=$AG" &
    train train_lb layer_budget_train.py layer_budget.yaml "${LB%/final}" method.base_checkpoint="$AG" && \
      trained layer_budget "layer_budget=$LB"
    wait; } &
  { train train_rh locret_train.py locret.yaml "${RH%/final}" && trained retaining_head "retaining_head=$RH"; } &
  for L in "${LONG[@]}"; do  # one process per method (a 0.5B model at batch 8 leaves the GPU mostly idle)
    for m in full "${TF_METHODS[@]}"; do
      throttle
      ev "tf_${m}_$L" --output "$R/test" --methods "$m" --keep 1/8 --context-lengths "$L" --batch-size 8 &
    done
  done
  for L in "${CLAIM[@]}"; do  # the full cache where only the trained methods run (the reference of their share)
    throttle
    [[ " ${LONG[*]} " == *" $L "* ]] || ev "full_$L" --output "$R/test" --methods full --keep 1/8 --context-lengths "$L" \
      --batch-size 8 &
  done
  wait
}

# the GGUF is joined, checked and converted to dense weights once, before a dozen processes would each do it
python -c "import trainkv; trainkv.load_model('$MODEL')" >"$L_/prepare.log" 2>&1
echo "prepare: exit $? after $(( $(date +%s) - start )) s" >>"$L_/prepare.log"

case $phase in
  train) pipeline ;;
  claims)
    # the 32K memory/prefill step runs last, alone on the GPU: keep RUNTIME_RESERVE seconds for it (2026-12-02: the
    # evaluations ran to the deadline and it never started)
    end=$deadline; [ -f "$AG/model.safetensors" ] && deadline=$(( deadline - ${RUNTIME_RESERVE:-150} ))
    ev kl_free --output "$R/kl" --kl-only --methods full "${TF_METHODS[@]}" --keep 1/8 --context-lengths "${CLAIM[0]}" &
    pipeline
    trained_present
    [ "${#TM[@]}" -gt 0 ] && ev kl_trained --output "$R/kl" --kl-only --methods "${TM[@]}" "${TC[@]}" --keep 1/8 \
      --context-lengths "${CLAIM[0]}" &
    wait
    deadline=$end
    l=$(left); [ -f "$AG/model.safetensors" ] || { echo "runtime: skipped: no Attention-Gate final" >"$L_/runtime.log"; l=0; }
    [ "$l" -gt 60 ] && timeout "$l" python benchmarks/runtime_scale.py smollm2 --model "$MODEL" \
      --checkpoint "$AG" --contexts "${LONG[-1]}" --new-tokens 64 --budget $(( ${LONG[-1]} / 8 )) --chunk 1024 \
      --decode-context "${LONG[-1]}" --name "$OUT/qwen_runtime" ${RUNTIME_ARGS:-} >"$L_/runtime.log" 2>&1 ;;
  grid)
    trained_present
    ev grid_4k --output "$R/test" --methods full "${TF_METHODS[@]}" "${TM[@]}" "${TC[@]}" --keep 1/4 1/8 1/16 \
      --context-lengths 4096 --batch-size 8 &
    for L in "${CLAIM[@]}"; do
      keeps=(1/4 1/16); [ "$L" = "${LONG[-1]}" ] && keeps+=(1/32)
      ev "grid_$L" --output "$R/test" --methods full "${TF_METHODS[@]}" "${TM[@]}" "${TC[@]}" --keep "${keeps[@]}" \
        --context-lengths "$L" --batch-size 8 &
    done
    wait ;;
  long)
    train train_rh32 locret_train.py locret_32k.yaml "${RH32%/final}"
    if [ -f "$RH32/model.safetensors" ]; then
      L=${LONG[-1]}; declare -A ck=([full]="" [retaining_head]="--checkpoint retaining_head=$RH" \
        [locret_32k]="--checkpoint locret_32k=$RH32")
      for m in full retaining_head locret_32k; do  # one process per method, as the test cells
        throttle
        ev "dev_${m}_$L" --output "$R/dev" --split dev --samples "${NDEV:-3}" --methods "$m" ${ck[$m]} --keep 1/8 \
          --context-lengths "$L" --batch-size 8 &
      done
      wait
      python scripts/select_checkpoint.py --dev "$R/dev" --candidates retaining_head locret_32k --lengths "$L" \
        --keep 1/8 --out "$RUNS/locret_32k/selection.json" >"$L_/select_32k.log" 2>&1
      echo "select_32k: exit $? (chosen: $(tail -1 "$L_/select_32k.log"))" >>"$L_/select_32k.log"
      for C in "${LONG[@]}"; do
        throttle
        ev "test_locret_32k_$C" --output "$R/test" --methods locret_32k ${ck[locret_32k]} --keep 1/8 \
          --context-lengths "$C" --batch-size 8 &
      done
      wait
    fi ;;
  *) echo "unknown phase $phase (train, claims, grid, long)" >&2; exit 2 ;;
esac
for d in test kl dev; do
  if [ -d "$R/$d/runs" ]; then python -m trainkv eval --report-only --output "$R/$d" >"$L_/report_$d.log" 2>&1; fi
done
exit 0
