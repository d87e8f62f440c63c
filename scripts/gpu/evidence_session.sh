#!/usr/bin/env bash
# Issue 17 in ONE GPU call (one H200, after `source .gpu/b/setup.sh`; docs/protocol.md), with the test keeps cut
# to the deciding 1/8 (the README headline) so that it fits a session with little device time left.
#   1. both held-out-family recipes train (background); beside them the dev cells of the shipped checkpoints
#      (full, Attention-Gate, Locret under the declared settings) and the choice-free test cells (full cache,
#      the training-free methods) at 1K and 2K x 1/8;
#   2. once a held-out twin is trained: its dev cells on the held-out family, then the choice
#      (scripts/select_checkpoint.py on dev files only), then the chosen setting's test cells (1K, 2K x 1/8) and
#      the held-out family's test cells (shipped vs held-out-trained);
#   3. if a twin is not trained by CUTOFF seconds before the deadline, the choice is made without the family
#      check (selection.json says so) and its family cells are skipped (reported as not run).
# Returns $OUT/evidence.tgz (results/evidence + selection files + the held-out finals + logs).
#   bash scripts/gpu/evidence_session.sh [deadline seconds, default 560]
set -uo pipefail
start=$(date +%s)
deadline=$(( start + ${1:-560} ))
CUTOFF=${CUTOFF:-150}
mkdir -p results
export SETTINGS=${SETTINGS:-"pool_kernel=9,stabilizers=32 pool_kernel=1,stabilizers=32 pool_kernel=9,stabilizers=0.5"}
source scripts/gpu/evidence_lib.sh
TESTTF=("${TEST[@]}" --output "$E/test" --tasks "${RULER[@]}" --samples "$TF_N" --batch-size $(( 11 * TF_N )) --keep 1/8)
cfgdir=configs/recipes/smollm2-135m
alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
wait_pids() { while alive "$@"; do sleep 3; done; }  # also for processes that are not this shell's children
finish() {
  tar czhf "$OUT/evidence.tgz" "$E" logs $(ls "$SEL_AG" "$SEL_RH" 2>/dev/null) \
    $(ls -d runs/smollm2-135m/*heldout/final runs/smollm2-135m/*heldout/train_summary.json 2>/dev/null) 2>/dev/null
  { cat logs/select_*.log 2>/dev/null
    for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | grep -v "^| \|^$" | tail -2; done
    echo "wall: $(( $(date +%s) - start )) s"; } >"$OUT/logs.txt"
}
trap finish EXIT
train() {  # log config recipe
  ( s=$(date +%s)
    timeout $(( deadline - s - CUTOFF + 30 )) accelerate launch --config_file "configs/accelerate/${ACCELERATE:-single_gpu}.yaml" \
      "recipes/$3" --config "$cfgdir/$2" progress_bar=false ${TRAIN_OVERRIDES:-} >"logs/$1.log" 2>&1
    echo "$1: exit $? after $(( $(date +%s) - s )) s" >>"logs/$1.log" ) &
}
train train_ag_ho attention_gate_sft_gpu_2k_heldout.yaml attention_gate_sft.py; ag_train=$!
train train_rh_ho locret_gpu_2k_lp_heldout.yaml locret_train.py; rh_train=$!
sleep 10
dev_ruler_jobs
ev test_full "${TESTR[@]}" --methods full --keep 1/8 --context-lengths "${LENGTHS[@]}" &
tf_jobs 3 "${LENGTHS[@]}"

chosen_test() {  # kind(ag|rh) twin-dir candidates...: family dev of the twins, the choice, the test cells
  local kind=$1 twin=$2; shift 2
  local sel=$SEL_AG label=attention_gate ckpt=$AG fam=() chosen
  [ "$kind" = rh ] && { sel=$SEL_RH; label=retaining_head; ckpt=$RH; }
  if [ -f "$twin/model.safetensors" ]; then
    local pids=() c
    for c in "$@"; do
      local tw=${label}_ho; [ "$c" != "${c#*:}" ] && tw="${label}_ho:${c#*:}"
      ev "fam_${kind}_${#pids[@]}" "${DEVF[@]}" --methods "$tw" --checkpoint "${label}_ho=$twin" & pids+=($!)
    done
    wait_pids "${pids[@]}" "$fam_full_pid"
    fam=(--family aggregation --family-dev "$E/dev_family" --twin-prefix "${label}_ho")
  else
    echo "$label: held-out twin not trained in time; choice made without the family check" >>"logs/select_$kind.log"
  fi
  pick() { python scripts/select_checkpoint.py --dev "$E/dev" --candidates "$@" --lengths "${LENGTHS[@]}" --keep 1/8 \
      --out "$sel" 2>>"logs/select_$kind.log" | tail -1; }
  chosen=$(pick "$@" "${fam[@]}")
  if [ -z "$chosen" ] && [ ${#fam[@]} -gt 0 ]; then  # the family cells failed: choose without them, and say so
    echo "$label: family check unavailable (see above); choice made without it" >>"logs/select_$kind.log"
    fam=(); chosen=$(pick "$@")
  fi
  [ -n "$chosen" ] || { echo "$label: no choice (see above)" >>"logs/select_$kind.log"; return; }
  echo "$label chosen on dev: $chosen" >>"logs/select_$kind.log"
  local L
  for L in "${LENGTHS[@]}"; do
    ev "test_${kind}_$L" "${TESTR[@]}" --methods "$chosen" --checkpoint "$label=$ckpt" --keep 1/8 --context-lengths "$L" &
  done
  if [ ${#fam[@]} -gt 0 ]; then
    local ho=${label}_ho; [ "$chosen" != "${chosen#*:}" ] && ho="${label}_ho:${chosen#*:}"
    ev "test_family_$kind" "${TESTF[@]}" --methods full "$chosen" "$ho" --checkpoint "$label=$ckpt" \
      --checkpoint "${label}_ho=$twin" &
  fi
  wait
}
wait_for() {  # dir pid: until the final checkpoint exists, the training ended, or the cutoff
  while [ ! -f "$1/model.safetensors" ] && kill -0 "$2" 2>/dev/null && [ $(( deadline - $(date +%s) )) -gt "$CUTOFF" ]; do
    sleep 5
  done
}
ev fam_full "${DEVF[@]}" --methods full & fam_full_pid=$!
wait_pids "$dev_full_pid" "$dev_ag_pid"
rh_cands=(); for st in "${settings[@]}"; do rh_cands+=("retaining_head:$st"); done
( wait_for "$AG_HO" "$ag_train"; chosen_test ag "$AG_HO" attention_gate ) &
( wait_pids "${dev_rh_pids[@]}"; wait_for "$RH_HO" "$rh_train"; chosen_test rh "$RH_HO" "${rh_cands[@]}" ) &
wait
for f in dev dev_family test test_family; do
  [ -d "$E/$f/runs" ] && [ $(( deadline - $(date +%s) )) -gt 8 ] && \
    timeout $(( deadline - $(date +%s) - 5 )) "${TK[@]}" eval --report-only --output "$E/$f" >"logs/report_$f.log" 2>&1
done
