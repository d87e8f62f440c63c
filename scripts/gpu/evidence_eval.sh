#!/usr/bin/env bash
# Issue 17, GPU call 2 of 2 (one H200, after `source .gpu/b/setup.sh`, right after evidence_train_heldout.sh on the
# same warm machine; docs/protocol.md). Several `trainkv eval` processes share the GPU; every folder resumes, so the
# cells call 1 finished are skipped in seconds (and a cold machine redoes them: slower, same result).
#
#  1. DEV (seeds 4321, 777, 2024), 1K and 2K x 1/8. The shipped checkpoints on every RULER task (call 1; redone here
#     if missing) -> results/evidence/dev; on the held-out family (aggregation, 8 per task per seed = 48 per cell):
#     full cache, the held-out-trained Attention-Gate, the held-out-trained Locret heads under the six declared
#     settings -> results/evidence/dev_family; the full cache on vt, kv_retrieval, passkey (why no retrieval family
#     was held out) -> results/evidence/dev_other_families.
#  2. CHOICE: scripts/select_checkpoint.py applies the rule to the dev files only and writes
#     checkpoints/smollm2-135m/{attention_gate,retaining_head}/selection.json, before any trained test cell exists.
#  3. TEST (seed 271828): full cache (176 per cell) and the training-free methods at 1K (88 per cell; 2K came from
#     call 1) at once; after each choice, its checkpoint at 1K and 2K x 1/4, 1/8, 1/16 (176 per cell, one process
#     per cell) -> results/evidence/test, and the held-out family at 1K and 2K x 1/8 (32 per cell): full, shipped and
#     held-out-trained Attention-Gate / Locret (chosen setting) -> results/evidence/test_family.
#
# ~5.2K samples (1.6K of them training-free at 1K); committed H200 runs did 13-19 samples/s over 6-10 processes:
# ~5-6.5 min of cells + ~1 min of start, choice and reports. Returns $OUT/evidence.tgz (results/evidence + the two
# selection.json) and $OUT/logs.txt (choices, paired claims, per-process exits).
#   bash scripts/gpu/evidence_eval.sh [deadline seconds, default 540]
set -uo pipefail
start=$(date +%s)
deadline=$(( start + ${1:-540} ))
source scripts/gpu/evidence_lib.sh
for d in "$AG_HO" "$RH_HO"; do
  [ -f "$d/model.safetensors" ] || { echo "missing $d: run scripts/gpu/evidence_train_heldout.sh first"; exit 3; }
done

# --- 1. dev (each method: RULER cells, skipped if call 1 made them, then its family cells) + choice-free test cells
dev_ruler_jobs
ev fam_full "${DEVF[@]}" --methods full & fam_full_pid=$!
ev fam_ag "${DEVF[@]}" --methods attention_gate_ho --checkpoint "attention_gate_ho=$AG_HO" & fam_ag_pid=$!
fam_rh_pids=()
for i in "${!settings[@]}"; do
  ev "fam_rh$i" "${DEVF[@]}" --methods "retaining_head_ho:${settings[$i]}" --checkpoint "retaining_head_ho=$RH_HO" &
  fam_rh_pids+=($!)
done
ev dev_other "${DEV[@]}" --output "$E/dev_other_families" --tasks vt kv_retrieval passkey --samples "$DEV_N" \
  --batch-size $(( 9 * DEV_N )) --methods full &
ev test_full "${TESTR[@]}" --methods full --context-lengths "${LENGTHS[@]}" &
tf_jobs 6 "${LENGTHS[@]}"   # 2K: done in call 1, skipped

# --- 2. the choices, on dev files only; 3. the test cells of what was chosen ---------------------------------------
test_cells() {  # log-prefix method checkpoint-args...: one process per (length, keep)
  local prefix=$1 method=$2; shift 2
  local L k
  for L in "${LENGTHS[@]}"; do for k in 1/4 1/8 1/16; do
    ev "${prefix}_${L}_${k//\//-}" "${TESTR[@]}" --methods "$method" "$@" --keep "$k" --context-lengths "$L" &
  done; done
}
wait "$dev_full_pid" "$dev_ag_pid" "$fam_full_pid" "$fam_ag_pid"
if python scripts/select_checkpoint.py --dev "$E/dev" --candidates attention_gate --lengths "${LENGTHS[@]}" --keep 1/8 \
     --family aggregation --family-dev "$E/dev_family" --twins attention_gate_ho --out "$SEL_AG" \
     >logs/select_ag.log 2>&1; then
  test_cells test_ag attention_gate --checkpoint "attention_gate=$AG"
  ev test_family_ag "${TESTF[@]}" --methods full attention_gate attention_gate_ho \
    --checkpoint "attention_gate=$AG" --checkpoint "attention_gate_ho=$AG_HO" &
fi
wait "${dev_rh_pids[@]}" "${fam_rh_pids[@]}"
cands=(); for st in "${settings[@]}"; do cands+=("retaining_head:$st"); done
chosen=$(python scripts/select_checkpoint.py --dev "$E/dev" --candidates "${cands[@]}" --lengths "${LENGTHS[@]}" \
  --keep 1/8 --family aggregation --family-dev "$E/dev_family" --twin-prefix retaining_head_ho --out "$SEL_RH" \
  2>logs/select_rh.log | tail -1)
if [ -n "$chosen" ]; then
  echo "Locret chosen on dev: $chosen" >>logs/select_rh.log
  test_cells test_rh "$chosen" --checkpoint "retaining_head=$RH"
  ev test_family_rh "${TESTF[@]}" --methods "$chosen" "retaining_head_ho:${chosen#retaining_head:}" \
    --checkpoint "retaining_head=$RH" --checkpoint "retaining_head_ho=$RH_HO" &
fi
wait

# --- reports, claims, and what comes back -------------------------------------------------------------------------
for f in dev dev_family dev_other_families test test_family; do
  [ -d "$E/$f/runs" ] && "${TK[@]}" eval --report-only --output "$E/$f" >"logs/report_$f.log" 2>&1
done
tar czhf "$OUT/evidence.tgz" "$E" $(ls "$SEL_AG" "$SEL_RH" 2>/dev/null)
{ cat logs/select_*.log 2>/dev/null
  for f in test test_family; do
    echo "== $E/$f"; sed -n '/^## Paired claims/,/^## Per task/p' "$E/$f/summary.md" 2>/dev/null | grep '^- '
  done
  for f in logs/*.log; do echo "== $f"; grep -v "it/s\]" "$f" | grep -vi "warn" | grep -v "^| \|^$" | tail -3; done
  echo "wall: $(( $(date +%s) - start )) s"; } >"$OUT/logs.txt"
cat "$OUT/logs.txt"
