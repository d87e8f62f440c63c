#!/usr/bin/env bash
# Issue 17, GPU call 1 of 2 (one H200, after `source .gpu/b/setup.sh`; docs/protocol.md).
#  * Trains the two held-out-family recipes at once (the shipped recipes with the aggregation family, cwe + fwe,
#    left out; configs/recipes/smollm2-135m/*_heldout.yaml): Attention-Gate 600 steps, Locret 1000 steps, bf16.
#    The shipped twins took <= 6 and ~5.3 min of training while sharing the GPU (README training-cost table; the
#    Locret process with its data generation: 425 s beside three other trainings). Finals:
#    runs/smollm2-135m/{attention_gate_sft_gpu_2k,locret_gpu_2k_lp}_heldout/final.
#  * Meanwhile (the GPU has room: SmolLM2 evaluation is launch-bound), cells that depend on neither new checkpoint:
#    the dev cells of the shipped checkpoints (full cache, Attention-Gate, Locret under its six declared run-time
#    settings; 1K and 2K x 1/8; 16 cells x 132 samples), and the training-free test cells at 2K (6 methods x keep
#    1/4, 1/8, 1/16 x 88 samples). ~3.7K samples; committed H200 runs did 13-15 samples/s beside trainings.
# Outputs stay in runs/evidence (results/evidence links there) for call 2, scripts/gpu/evidence_eval.sh, which must
# follow on the same warm machine (it redoes whatever is missing). Rerunning this script resumes both trainings from
# their last checkpoint (save_every=100) and skips finished cells.
# (The CPU smoke test sets ACCELERATE=cpu and TRAIN_OVERRIDES="max_steps=2 ..." besides evidence_lib.sh's settings.)
# Returns $OUT/attention_gate_ho.tgz, $OUT/retaining_head_ho.tgz (final + metrics + train summary),
# $OUT/evidence_call1.tgz (the cells so far) and $OUT/logs.txt.
#   bash scripts/gpu/evidence_train_heldout.sh [deadline seconds, default 540]
set -uo pipefail
start=$(date +%s)
deadline=$(( start + ${1:-540} ))
source scripts/gpu/evidence_lib.sh
cfgdir=configs/recipes/smollm2-135m

train() {  # log config recipe
  ( s=$(date +%s)
    timeout $(( deadline - s - 30 )) accelerate launch --config_file "configs/accelerate/${ACCELERATE:-single_gpu}.yaml" \
      "recipes/$3" --config "$cfgdir/$2" progress_bar=false ${TRAIN_OVERRIDES:-} >"logs/$1.log" 2>&1
    echo "$1: exit $? after $(( $(date +%s) - s )) s" >>"logs/$1.log" ) &
}
train train_ag_ho attention_gate_sft_gpu_2k_heldout.yaml attention_gate_sft.py
train train_rh_ho locret_gpu_2k_lp_heldout.yaml locret_train.py
sleep 15  # the trainings generate their data on the CPU first
dev_ruler_jobs
tf_jobs 6 "${LENGTHS[0]}"   # 2K (the first length); 1K follows in call 2
wait

for pair in attention_gate_ho=attention_gate_sft_gpu_2k_heldout retaining_head_ho=locret_gpu_2k_lp_heldout; do
  d=runs/smollm2-135m/${pair#*=}
  if [ -f "$d/final/model.safetensors" ]; then
    tar czf "$OUT/${pair%%=*}.tgz" -C "$d" final train_summary.json metrics.jsonl
  else
    echo "${pair%%=*}: no final checkpoint in $d (rerun this script: training resumes)" | tee -a logs/missing.log
  fi
done
tar czhf "$OUT/evidence_call1.tgz" "$E"
{ for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | grep -v "^| \|^$" | tail -3; done
  echo "wall: $(( $(date +%s) - start )) s"; } >"$OUT/logs.txt"
cat "$OUT/logs.txt"
