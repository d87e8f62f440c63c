#!/usr/bin/env bash
# Issue 19's measurements still missing after the 2026-12-02 runs (docs/notes/issue19_decode.md), one call on one
# H200 after `source .gpu/b/setup.sh` (SmolLM2's stash parts needed):
#   1. 8B config, 32K, budget 2048, batched: the full cache at the largest batch that fits (24 sequences of 32K:
#      103 GiB of KV beside 15 GiB of weights; 28 leaves no room for the batch-1 copy the rows start from) against
#      trainkv graphed at batches up to 192 (2 x 192 x 2056 slots x 128 KiB = 103 GiB: the rows hold the batch-1
#      source and the repeated cache at once). Also `linear_floor` (every linear layer of one token in a CUDA graph).
#   2. SmolLM2-135M real weights, batch 1, 32K and 8K, budget 1024 (benchmarks/results/smollm2_runtime.json's
#      budget): against that file's trainkv decode (20.5 / 23.2 tok/s at 8K / 32K) and against the full cache
#      with StaticCache + torch.compile measured in the same run.
#   bash scripts/gpu/decode_latency.sh [deadline s, default 560]
# Returns $OUT/decode_latency_8b_batched.json, $OUT/decode_latency_smollm2.json and their logs.
set -uo pipefail
deadline=$(( $(date +%s) + ${1:-560} ))
export PYTHONUNBUFFERED=1
left() { echo $(( deadline - $(date +%s) - 20 )); }
timeout $(( $(left) * 55 / 100 )) python3 benchmarks/decode_latency.py --model llama3.1-8b-random --contexts 32768 \
  --budgets 2048 --batches 8 24 192 --rows hf_dynamic trainkv_graphed --steps 32 \
  --out "$OUT/decode_latency_8b_batched.json" >"$OUT/decode_latency_8b_batched.log" 2>&1
echo "8b batched: exit $?" >>"$OUT/decode_latency_8b_batched.log"
timeout "$(left)" python3 benchmarks/decode_latency.py --model smollm2-135m --contexts 32768 8192 --budgets 1024 \
  --batches 1 --rows hf_dynamic hf_static_compiled trainkv_eager trainkv_graphed --steps 32 \
  --out "$OUT/decode_latency_smollm2.json" >"$OUT/decode_latency_smollm2.log" 2>&1
echo "smollm2: exit $?" >>"$OUT/decode_latency_smollm2.log"
