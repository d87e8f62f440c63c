#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/b/setup.sh`): Locret designs for the 2K x 1/8 cell of issue #5.
# Trains the variants below at once on one GPU (resumable: run the script again on a warm machine to go on),
# and scores every finished checkpoint on a DEV set (the eval split's generators with --seed 4321 and
# 8 samples per task: other samples than the reported seed-1234 evaluation) at 2K x 1/8 with 32 and 64
# protected recent tokens (Locret's stabilizers). Returns $OUT/dev.tgz (run files), $OUT/<variant>.tgz
# (final checkpoint, metrics, summary) and $OUT/logs.txt.
#   bash docs/experiments/locret_search/locret_search.sh [deadline seconds, default 560]
set -uo pipefail
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${1:-560} ))
mkdir -p logs runs/dev
base=configs/recipes/smollm2-135m/locret_gpu_2k.yaml
# name | overrides of the second Locret run (hidden 128, 600 steps, contexts 1.1-2.0K, max-logit target)
variants=(
  "lp|method.target=log_attention"
  "long|max_steps=1000 data.num_samples=8000"
  "long_lp|max_steps=1000 data.num_samples=8000 method.target=log_attention"
  "lp_h256|method.target=log_attention method.hidden=256"
)
train() {  # name overrides...
  local name=$1; shift
  [ -f "runs/smollm2-135m/locret_$name/final/model.safetensors" ] && return
  ( s=$(date +%s)
    timeout $(( deadline - s - 30 )) accelerate launch --config_file configs/accelerate/single_gpu.yaml \
      recipes/locret_train.py --config "$base" "output_dir=runs/smollm2-135m/locret_$name" "$@" progress_bar=false \
      >>"logs/train_$name.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - s )) s" >>"logs/train_$name.log" ) &
}
dev() {  # recent_window label=checkpoint... (L 2048, keep 1/8)
  local rw=$1; shift
  local args=() names=()
  for lc in "$@"; do names+=("${lc%%=*}_rw$rw"); args+=(--checkpoint "${lc%%=*}_rw$rw=${lc#*=}"); done
  local left=$(( deadline - $(date +%s) - 20 ))
  [ "$left" -gt 30 ] || return
  timeout "$left" python -m trainkv eval --model smollm2-135m --device cuda --batch-size 64 --no-progress \
    --output runs/dev --tasks ruler --samples 8 --seed 4321 --keep 0.125 --context-lengths 2048 \
    --recent-window "$rw" --methods "${names[@]}" "${args[@]}" >>"logs/dev_rw$rw.log" 2>&1
}
for v in "${variants[@]}"; do train "${v%%|*}" ${v#*|}; done
# meanwhile: full cache, the shipped heads and the second run (stashed from .gpu/a5 as /tmp/gpu/l2k)
timeout $(( deadline - $(date +%s) - 20 )) python -m trainkv eval --model smollm2-135m --device cuda \
  --batch-size 64 --no-progress --output runs/dev --tasks ruler --samples 8 --seed 4321 --methods full \
  --context-lengths 2048 >>logs/dev_full.log 2>&1 &
olds=(ship=checkpoints/smollm2-135m/retaining_head)
[ -f /tmp/gpu/l2k/model.safetensors ] && olds+=(l2k=/tmp/gpu/l2k)
dev 32 "${olds[@]}" & dev 64 "${olds[@]}" & dev 128 "${olds[@]}" &
# each variant as soon as it is trained
pending=("${variants[@]}")
while [ ${#pending[@]} -gt 0 ] && [ $(( deadline - $(date +%s) )) -gt 60 ]; do
  rest=()
  for v in "${pending[@]}"; do
    name=${v%%|*}; ck=runs/smollm2-135m/locret_$name/final
    if [ -f "$ck/model.safetensors" ]; then dev 32 "$name=$ck" & dev 64 "$name=$ck" &
    else rest+=("$v"); fi
  done
  pending=("${rest[@]}")
  sleep 10
done
wait
python -m trainkv eval --report-only --output runs/dev >/dev/null 2>&1
tar czf "$OUT/dev.tgz" runs/dev
for v in "${variants[@]}"; do
  d=runs/smollm2-135m/locret_${v%%|*}
  [ -d "$d" ] && tar czf "$OUT/${v%%|*}.tgz" -C "$d" $(cd "$d" && ls -d final train_summary.json metrics.jsonl 2>/dev/null)
done
python docs/experiments/locret_search/locret_tools.py table "runs/dev/runs/*.json" >"$OUT/logs.txt" 2>&1
for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | tail -4; done >>"$OUT/logs.txt"
cat "$OUT/logs.txt"
