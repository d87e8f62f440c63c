#!/usr/bin/env bash
# GPU session, second batch: train Locret heads, evaluate them and the remaining baselines, re-measure gate overhead.
set -uo pipefail
run=runs/smollm2-135m/locret_gpu
start=$(date +%s)
timeout 170 accelerate launch --config_file configs/accelerate/single_gpu.yaml recipes/locret_train.py \
  --config configs/recipes/smollm2-135m/locret_gpu.yaml 2>&1 | grep -v "it/s\]" | grep -vi warn | tail -5
echo "locret wall seconds: $(( $(date +%s) - start ))"
mkdir -p "$OUT/retaining_head"
cp "$run"/final/* "$run"/train_summary.json "$run"/metrics.jsonl "$OUT/retaining_head/" || true
(cd benchmarks && timeout 70 python runtime_scale.py overhead --context 32768 --repeats 3 2>&1 | tail -1)
common="--tasks ruler --context-lengths 1024 2048 --samples 4"
e() { timeout "$1" python -m trainkv.cli eval --model smollm2-135m --device cuda --batch-size 16 --no-progress --output results/smollm2 $common "${@:2}" 2>&1 | grep -v "it/s\]" | tail -3; }
e 80 --methods retaining_head --checkpoint retaining_head="$run/final" --budgets 0.25 0.125
e 110 --methods tova h2o --budgets 0.25 0.125
e 90 --methods corm random streaming_llm --budgets 0.25 0.125
python -m trainkv.cli eval --report-only --output results/smollm2 >/dev/null 2>&1
tar czf "$OUT/eval2.tgz" results/smollm2
