#!/usr/bin/env bash
# On the GPU machine (after `source .gpu/b/setup.sh`): the whole SmolLM2 evaluation grid in one call, several
# processes sharing the GPU (SmolLM2 decoding is launch-bound): every training-free method and the given
# trained scorers at 0.5K/1K/2K x keep 1/2, 1/4, 1/8, 1/16 (resumes results/smollm2), then KL / perplexity on
# held-out prose at 1K x 1/4, 1/8 (results/smollm2_kl). Returns $OUT/eval.tgz, $OUT/kl.tgz, $OUT/logs.txt.
#   bash scripts/gpu/quality_grid.sh <deadline seconds> NAME=CHECKPOINT ...
set -uo pipefail
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + $1 )); shift
ckpts=(); names=()
for a in "$@"; do ckpts+=(--checkpoint "$a"); names+=("${a%%=*}"); done
mkdir -p logs
ev() {  # log, args...
  timeout $(( deadline - $(date +%s) - 25 )) python -m trainkv eval --model smollm2-135m --device cuda \
    --batch-size 64 --no-progress --tasks ruler --samples 4 "${@:2}" >"logs/$1.log" 2>&1
}
budgets="0.5 0.25 0.125 0.0625"
for L in 512 1024 2048; do
  ev "grid_$L" --output results/smollm2 --methods full streaming_llm h2o snapkv tova corm random --keep $budgets \
    --context-lengths $L &
done
[ ${#names[@]} -gt 0 ] && for L in 512 1024 2048; do
  ev "trained_$L" --output results/smollm2 --methods "${names[@]}" "${ckpts[@]}" --keep $budgets --context-lengths $L &
done
ev kl --kl-only --output results/smollm2_kl --methods full streaming_llm h2o snapkv tova corm ${names[@]+"${names[@]}"} \
  ${ckpts[@]+"${ckpts[@]}"} --keep 0.25 0.125 --context-lengths 1024 &
wait
python -m trainkv eval --report-only --output results/smollm2 >/dev/null 2>&1
python -m trainkv eval --report-only --output results/smollm2_kl >/dev/null 2>&1
tar czf "$OUT/eval.tgz" results/smollm2
tar czf "$OUT/kl.tgz" results/smollm2_kl
for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | tail -6; done >"$OUT/logs.txt"
cat "$OUT/logs.txt"
