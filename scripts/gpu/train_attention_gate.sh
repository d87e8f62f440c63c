#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/b/setup.sh`): train the SmolLM2 Attention-Gates and return them in $OUT.
set -euo pipefail
cfg=configs/recipes/smollm2-135m/attention_gate_sft_gpu.yaml
run=runs/smollm2-135m/attention_gate_sft_gpu
start=$(date +%s)
accelerate launch --config_file configs/accelerate/single_gpu.yaml recipes/attention_gate_sft.py --config "$cfg" "$@" 2>&1 \
  | grep -v "it/s\]" | grep -vi "warn" | tail -40
echo "wall seconds: $(( $(date +%s) - start ))"
mkdir -p "$OUT/attention_gate"
cp "$run"/final/* "$run"/train_summary.json "$run"/metrics.jsonl "$OUT/attention_gate/"
