# Issue 17: the cells of the evidence session, used by scripts/gpu/evidence_session.sh;
# sourced, not run. Every cell is a `trainkv eval` run file in a resumable
# output folder, so a call that finds a cell done skips it in seconds (samples are generated, the model is not
# loaded). Settings (environment, defaults = the real session):
#   DEV_N=4 DEV_FAMILY_N=8 TEST_N=16 TF_N=8   samples per task (per seed on dev: 4 x 3 seeds = 12 per task)
#   TEST_ARGS="--split test"                   a dry run passes "--seed 1234" (ad hoc: no test files)
#   EVIDENCE=results/evidence                  output root (on the GPU machine a link into runs/, which survives
#                                              between calls on a warm machine)
#   AG_HO, RH_HO                               the held-out-trained checkpoints (call 1 writes them)
#   SEL_AG, SEL_RH                             where the choices are recorded
#   LENGTHS="2048 1024" RULER=ruler DEVICE=cuda SETTINGS=... TF_METHODS=... TK="python -m trainkv"
#                                              (the CPU smoke test shrinks these)
# Needs `deadline` (epoch seconds) set by the caller.
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
DEV_N=${DEV_N:-4}; DEV_FAMILY_N=${DEV_FAMILY_N:-8}; TEST_N=${TEST_N:-16}; TF_N=${TF_N:-8}
TEST=(${TEST_ARGS:---split test})
E=${EVIDENCE:-results/evidence}
LENGTHS=(${LENGTHS:-2048 1024}); RULER=(${RULER:-ruler}); DEVICE=${DEVICE:-cuda}
TK=(${TK:-python -m trainkv})
AG=checkpoints/smollm2-135m/attention_gate
RH=checkpoints/smollm2-135m/retaining_head
AG_HO=${AG_HO:-runs/smollm2-135m/attention_gate_sft_gpu_2k_heldout/final}
RH_HO=${RH_HO:-runs/smollm2-135m/locret_gpu_2k_lp_heldout/final}
SEL_AG=${SEL_AG:-$AG/selection.json}
SEL_RH=${SEL_RH:-$RH/selection.json}
# Locret run-time settings, declared before any dev run, in order: the shipped setting first (it wins exact ties)
settings=()
for s in 32 0.5; do for p in 9 1 5; do settings+=("pool_kernel=$p,stabilizers=$s"); done; done
[ -n "${SETTINGS:-}" ] && settings=($SETTINGS)
TF_METHODS=(${TF_METHODS:-streaming_llm h2o snapkv tova corm random})

mkdir -p logs runs/evidence
[ "$E" != results/evidence ] || [ -e results/evidence ] || ln -s ../runs/evidence results/evidence

ev() {  # log, args...: one `trainkv eval` process (blocks; resumable; skipped when no time is left)
  local log=$1; shift
  local s left
  s=$(date +%s); left=$(( deadline - s - 35 ))
  [ "$left" -gt 15 ] || { echo "$log: skipped ($*): no time left" >>"logs/$log.log"; return 0; }
  timeout "$left" "${TK[@]}" eval --model smollm2-135m --device "$DEVICE" --no-progress "$@" >>"logs/$log.log" 2>&1
  echo "$log: exit $? after $(( $(date +%s) - s )) s" >>"logs/$log.log"
}

DEV=(--split dev --keep 1/8 --context-lengths "${LENGTHS[@]}")
DEVR=("${DEV[@]}" --output "$E/dev" --tasks "${RULER[@]}" --samples "$DEV_N" --batch-size $(( 33 * DEV_N / 2 )))
DEVF=("${DEV[@]}" --output "$E/dev_family" --tasks family:aggregation --samples "$DEV_FAMILY_N"
      --batch-size $(( 6 * DEV_FAMILY_N )))
TESTR=("${TEST[@]}" --output "$E/test" --tasks "${RULER[@]}" --samples "$TEST_N" --batch-size $(( 11 * TEST_N / 2 )))
TESTF=("${TEST[@]}" --output "$E/test_family" --tasks family:aggregation --samples "$TEST_N" --keep 1/8
       --context-lengths "${LENGTHS[@]}" --batch-size $(( 2 * TEST_N )))
TESTTF=("${TEST[@]}" --output "$E/test" --tasks "${RULER[@]}" --samples "$TF_N" --batch-size $(( 11 * TF_N ))
        --keep 1/4 1/8 1/16)

# dev, 1K and 2K x 1/8 on every RULER task: full cache, the shipped Attention-Gate, the shipped Locret heads under
# each declared setting (background jobs; their pids in dev_full_pid, dev_ag_pid, dev_rh_pids)
dev_ruler_jobs() {
  ev dev_full "${DEVR[@]}" --methods full & dev_full_pid=$!
  ev dev_ag "${DEVR[@]}" --methods attention_gate --checkpoint "attention_gate=$AG" & dev_ag_pid=$!
  dev_rh_pids=()
  for i in "${!settings[@]}"; do
    ev "dev_rh$i" "${DEVR[@]}" --methods "retaining_head:${settings[$i]}" --checkpoint "retaining_head=$RH" &
    dev_rh_pids+=($!)
  done
}

# training-free test cells (no choice involved) at the given lengths, methods spread over `procs` processes
tf_jobs() {  # procs lengths...
  local procs=$1; shift
  local i m group
  for (( i = 0; i < procs; i++ )); do
    group=()
    for m in "${!TF_METHODS[@]}"; do (( m % procs == i )) && group+=("${TF_METHODS[$m]}"); done
    [ ${#group[@]} -gt 0 ] && ev "test_tf$i" "${TESTTF[@]}" --methods "${group[@]}" --context-lengths "$@" &
  done
}
