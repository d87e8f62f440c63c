#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/b/setup.sh`): train three new scorers on one GPU at once
# (Attention-Gate on 2K contexts, Attention-Gate with prose mixed in, Locret on 2K contexts), measure the
# shipped Locret heads' missing 2K x 1/8 cell meanwhile, then the new scorers' 2K x 1/8 cells.
# Returns $OUT/<name>.tgz (final checkpoint + metrics + train summary), $OUT/eval.tgz and $OUT/logs.txt.
#   bash scripts/gpu/train_smollm2_scorers.sh [deadline seconds, default 560]
set -uo pipefail
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${1:-560} ))
mkdir -p logs
cfgdir=configs/recipes/smollm2-135m
train() {  # name config recipe
  ( s=$(date +%s)
    timeout $(( deadline - s - 60 )) accelerate launch --config_file configs/accelerate/single_gpu.yaml "recipes/$3" \
      --config "$cfgdir/$2" progress_bar=false >"logs/$1.log" 2>&1
    echo "$1: exit $? after $(( $(date +%s) - s )) s" >>"logs/$1.log" ) &
}
train ag2k attention_gate_sft_gpu_2k.yaml attention_gate_sft.py
train agmix attention_gate_mix_gpu.yaml attention_gate_sft.py
train rh2k locret_gpu_2k.yaml locret_train.py
ev() {  # seconds, args...
  timeout "$1" python -m trainkv eval --model smollm2-135m --device cuda --batch-size 64 --no-progress \
    --output results/smollm2 --tasks ruler --samples 4 "${@:2}"
}
ev 200 --methods retaining_head --checkpoint retaining_head=checkpoints/smollm2-135m/retaining_head \
  --keep 0.125 --context-lengths 2048 >logs/rh_cell.log 2>&1
wait
for run in attention_gate_sft_gpu_2k attention_gate_mix_gpu locret_gpu_2k; do
  d=runs/smollm2-135m/$run
  [ -f "$d/final/model.safetensors" ] || { echo "$run: no final checkpoint"; continue; }
  name=${run/_gpu/}
  left=$(( deadline - $(date +%s) - 15 ))
  [ "$left" -gt 20 ] && ev "$left" --methods "$name" --checkpoint "$name=$d/final" --keep 0.125 --context-lengths 2048 \
    >"logs/eval_$name.log" 2>&1
  tar czf "$OUT/$name.tgz" -C "$d" final train_summary.json metrics.jsonl
done
python -m trainkv eval --report-only --output results/smollm2 >/dev/null 2>&1
tar czf "$OUT/eval.tgz" results/smollm2
for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | tail -8; done >"$OUT/logs.txt"
cat "$OUT/logs.txt"
