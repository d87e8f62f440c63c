#!/usr/bin/env bash
# GPU session for issue 8 (run from the project root after `source .gpu/b/setup.sh`; ~6 min, at most ~9):
#   1. gate overhead: gated vs ungated prefill at equal chunk size, eager and torch.compile'd gate, profiled
#      (8B config, random bf16 weights, 32K context, chunk 4096, budget 4096)
#   2. SmolLM2-135M-Instruct, real weights, bf16: prefill + 256 tokens at 8K/32K/128K (full vs shipped gates
#      vs StreamingLLM, budget 1024) and decode throughput at 32K with the largest batch that fits
#   3. 8B decode: batch 1 (filled cache, and generate() after a real 32K prefill) up to the largest batch
# Writes overhead_llama3.1-8b.json, smollm2_runtime.json, decode_8b.json to $OUT; prints wall times.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
: "${OUT:?OUT must name the results folder}"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
total=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  grep -v -i "warning" "$OUT/$name.log" | tail -n 8
  echo "== $name: rc=$rc, wall $(( $(date +%s) - start )) s (limit $limit s)"
}

step overhead 170 python3 benchmarks/runtime_scale.py overhead --context 32768 --chunk 4096 --budget 4096 \
  --repeats 3 --profile
step smollm2 150 python3 benchmarks/runtime_scale.py smollm2 --contexts 8192 32768 131072 --new-tokens 256 \
  --budget 1024 --decode-context 32768
step decode 100 python3 benchmarks/runtime_scale.py decode --context 32768 --budget 2048 --steps 16 \
  --generate-context 32768 --generate-tokens 128
echo "== total wall $(( $(date +%s) - total )) s"
ls -l "$OUT"
