#!/usr/bin/env bash
# Issue 9 on a machine with 2 GPUs (about 9 minutes): the SmolLM2 Attention-Gate recipe on 1 GPU and on 2 GPUs with
# DeepSpeed ZeRO-2 and ZeRO-3 at the same global batch (loss curves must match), the ZeRO-3 export loaded in a
# one-GPU runtime, a ZeRO-2 checkpoint resumed on 1 GPU, and the 8B training throughput on 1 and 2 GPUs.
#
# Preparation, here (network):   ../shared/tools/gpu-prep && bash scripts/gpu/prep_deepspeed_wheels.sh
# GPU machine (kind nvidia-h100-x2), two runs back to back:
#   1. carry [".gpu/a"]  command: bash .gpu/a/stash.sh
#   2. carry [".gpu/b"]  command: source .gpu/b/setup.sh && bash scripts/gpu/multi_gpu_training.sh   (timeout_s 600)
# Results: $OUT/summary.txt and $OUT/multi_gpu.tgz (metrics.jsonl + train_summary.json of every run, throughput and
# export-check JSONs, the loss-match tables, log tails). Back here:
#   mkdir -p benchmarks/results/train/multi_gpu && tar xzf <files_at>/multi_gpu.tgz -C benchmarks/results/train/multi_gpu
#   python benchmarks/plot_loss_curves.py ... (the command is in summary.txt) to draw the PNG if the GPU had no matplotlib
#
# Order (most important first; 1-GPU jobs run in pairs, one per GPU):
#   1. [GPU0] 1-GPU run, batch 8              [GPU1] 1-GPU run, data seed 8 (the noise reference)
#   2. 2 GPUs ZeRO-2, batch 4 per GPU  3. 2 GPUs ZeRO-3, batch 4 per GPU
#   4. [GPU0] load the ZeRO-3 export with trainkv.load_gated + generate   [GPU1] resume ZeRO-2's step-$MID checkpoint
#   5. 8B throughput, 1 GPU   6. 8B throughput, 2 GPUs DDP   7. 8B throughput, 2 GPUs ZeRO-3 (if time is left)
# Every job runs under `timeout`, inside a total budget (BUDGET_S, default 510 s); a job that no longer fits is
# skipped and said so. Env: STEPS (default 80), BUDGET_S, OUT. For a CPU dry run of the whole flow (DeepSpeed with
# several CPU processes is broken in accelerate 1.15, so NPROC=1 there):
#   NPROC=1 STEPS=4 BUDGET_S=2400 LIMIT_SCALE=4 EXTRA="data.seq_len=384 data.context_tokens=[256] eviction.chunk_size=128" \
#   TP_EXTRA="--model-config tiny --seq-len 128 eviction.chunk_size=32" bash scripts/gpu/multi_gpu_training.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-510}
STEPS=${STEPS:-80}
NPROC=${NPROC:-2}   # processes of the "2-GPU" jobs
LIMIT_SCALE=${LIMIT_SCALE:-1}   # multiplies every job's time limit (CPU dry run)
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
read -r -a TP_EXTRA_ARGS <<< "${TP_EXTRA:-}"
MID=$(( STEPS / 2 ))
OUT=${OUT:-$PWD/out_multi_gpu}
R=runs/multi_gpu
CFG=configs/recipes/smollm2-135m/attention_gate_sft_gpu.yaml
LAUNCH="python3 -m accelerate.commands.launch"
RECIPE=recipes/attention_gate_sft.py
# the recipe's GPU settings, shortened: same seed, data and global batch (8 sequences) for every launcher
COMMON=(max_steps=$STEPS save_every=$MID keep_last=2 log_every=1 warmup_steps=$(( STEPS / 10 )) data.num_samples=$(( STEPS * 8 ))
        report_to=none progress_bar=false "${EXTRA_ARGS[@]}")
RESERVE=25   # seconds kept for the summary and the archive
start=$(date +%s)
rm -rf "$R"
mkdir -p "$R/logs" "$R/results" "$OUT"
SUMMARY=$R/results/summary.txt
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - start )); }

# job NAME LIMIT_S MIN_S command...: run under timeout into logs/NAME.log; skipped if fewer than MIN_S seconds are left
job() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE )) need=$(( $3 * LIMIT_SCALE ))
  shift 3
  local left=$(( BUDGET_S - $(elapsed) - RESERVE ))
  if (( left < need )); then
    say "$name: SKIPPED at t=$(elapsed)s (${left}s left, needs ${need}s)"
    return 99
  fi
  (( limit > left )) && limit=$left
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$R/logs/$name.log" 2>&1
  local rc=$?
  local note=""
  (( rc == 124 || rc == 137 )) && note=" TIMED OUT"
  say "$name: rc=$rc$note, $(( $(date +%s) - t0 ))s (limit ${limit}s), done at t=$(elapsed)s"
  if (( rc != 0 )); then
    grep -v -E "it/s\]|s/it\]|FutureWarning|UserWarning|warnings.warn" "$R/logs/$name.log" | tail -25 | sed "s/^/  [$name] /"
  fi
  return $rc
}

ONE=($LAUNCH --config_file configs/accelerate/single_gpu.yaml)   # + --gpu_ids N
R1=($RECIPE --config $CFG batch_size=8 "${COMMON[@]}")           # 1 GPU x 8 sequences
R2=($RECIPE --config $CFG batch_size=$(( 8 / NPROC )) "${COMMON[@]}")   # 2 GPUs x 4 sequences
TP=(benchmarks/train_throughput.py --warmup 3 --steps 8 "${TP_EXTRA_ARGS[@]}")  # 8B config, random weights, 8K tokens

say "issue 9 multi-GPU run: STEPS=$STEPS BUDGET_S=$BUDGET_S, $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
python3 - <<'PY' 2>&1 | grep -v -i warn | tee -a "$SUMMARY"
import importlib, torch
for name in ("transformers", "accelerate", "deepspeed", "matplotlib"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} NOT importable: {type(e).__name__}: {e}")
print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPUs")
PY

# 1. the 1-GPU reference (GPU0) and the noise reference with other data (GPU1), side by side
job g1 170 60 "${ONE[@]}" --gpu_ids 0 "${R1[@]}" output_dir=$R/g1 overwrite_output_dir=true &
job g1_seed8 170 60 "${ONE[@]}" --gpu_ids 1 "${R1[@]}" output_dir=$R/g1_seed8 overwrite_output_dir=true data.seed=8 &
wait
# 2-3. two GPUs, DeepSpeed ZeRO-2 and ZeRO-3, 4 sequences per GPU: the same 8 sequences per step as g1
job z2 170 60 $LAUNCH --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes $NPROC --main_process_port 29512 \
  "${R2[@]}" output_dir=$R/z2 overwrite_output_dir=true
job z3 200 60 $LAUNCH --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes $NPROC --main_process_port 29513 \
  "${R2[@]}" output_dir=$R/z3 overwrite_output_dir=true
# 4. ZeRO-3's export in a one-GPU runtime (GPU0); ZeRO-2's step-MID checkpoint resumed on one GPU (GPU1), same
#    global batch, to the end: its steps MID+1.. must continue the ZeRO-2 curve
if [ -f "$R/z3/final/model.safetensors" ]; then
  job export_check_z3 90 30 env CUDA_VISIBLE_DEVICES=0 python3 scripts/gpu/check_export.py --checkpoint $R/z3/final \
    --reference $R/g1/final --output $R/results/export_check_z3.json &
else
  say "export_check_z3: SKIPPED (no $R/z3/final)"
fi
ck=$(printf "%s/z2/checkpoints/checkpoint-%08d" "$R" "$MID")
if [ -d "$ck" ]; then
  mkdir -p "$R/z2_resume_g1/checkpoints" && cp -r "$ck" "$R/z2_resume_g1/checkpoints/"
  job z2_resume_g1 150 45 "${ONE[@]}" --gpu_ids 1 "${R1[@]}" output_dir=$R/z2_resume_g1 --resume &
else
  say "z2_resume_g1: SKIPPED (no checkpoint $ck)"
fi
wait
# 5-7. training throughput of the Llama-3.1-8B config (random weights) at 8K tokens: 1 GPU, 2 GPUs DDP, 2 GPUs ZeRO-3
job throughput_1gpu 150 60 "${ONE[@]}" --gpu_ids 0 "${TP[@]}" --output $R/results/throughput_1gpu.json \
  --label "accelerate launch --config_file configs/accelerate/single_gpu.yaml ${TP[*]}"
job throughput_2gpu_ddp 160 70 $LAUNCH --config_file configs/accelerate/multi_gpu.yaml --num_processes $NPROC \
  --main_process_port 29522 "${TP[@]}" --output $R/results/throughput_2gpu_ddp.json \
  --label "accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes $NPROC ${TP[*]}"
job throughput_2gpu_zero3 170 80 $LAUNCH --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes $NPROC \
  --main_process_port 29523 "${TP[@]}" --output $R/results/throughput_2gpu_zero3.json \
  --label "accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes $NPROC ${TP[*]}"

# --- summary ---------------------------------------------------------------------------------------------------
tp=$(ls "$R"/results/throughput_*gpu*.json 2>/dev/null | tr '\n' ' ')
if [ -n "$tp" ]; then
  timeout 30 python3 benchmarks/train_throughput.py --combine $tp --output "$R/results/throughput_scaling.json" \
    2>&1 | grep -v -i warn | tee -a "$SUMMARY"
fi
runs=()
for pair in "1 GPU, batch 8=g1" "2 GPUs ZeRO-2, 4+4=z2" "2 GPUs ZeRO-3, 4+4=z3" "1 GPU resumed from ZeRO-2 step $MID=z2_resume_g1"; do
  [ -s "$R/${pair##*=}/metrics.jsonl" ] && runs+=(--run "${pair%=*}=$R/${pair##*=}")
done
noise=()
[ -s "$R/g1_seed8/metrics.jsonl" ] && noise=(--noise-run "1 GPU, data seed 8=$R/g1_seed8")
plot_flag=--no-plot
python3 -c "import matplotlib" 2>/dev/null && plot_flag=
if [ -s "$R/g1/metrics.jsonl" ] && (( ${#runs[@]} > 2 )); then
  say "loss match: python3 benchmarks/plot_loss_curves.py ${runs[*]} ${noise[*]} --output-dir <dir>"
  timeout 60 python3 benchmarks/plot_loss_curves.py "${runs[@]}" "${noise[@]}" --output-dir "$R/results/loss_match" \
    $plot_flag 2>&1 | grep -v -i warn | tee -a "$SUMMARY"
fi
if [ -s "$R/z2/metrics.jsonl" ] && [ -s "$R/z2_resume_g1/metrics.jsonl" ]; then  # the resumed steps against ZeRO-2's own
  timeout 60 python3 benchmarks/plot_loss_curves.py --run "2 GPUs ZeRO-2=$R/z2" \
    --run "1 GPU resumed from ZeRO-2 step $MID=$R/z2_resume_g1" --keys loss --output-dir "$R/results/loss_match_resume" \
    --title "resume across GPU count: ZeRO-2 x2 -> 1 GPU at step $MID" $plot_flag 2>&1 | grep -v -i warn | tee -a "$SUMMARY"
fi
python3 - "$R" <<'PY' 2>&1 | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
for name in ("g1", "g1_seed8", "z2", "z3", "z2_resume_g1"):
    p = r / name / "train_summary.json"
    if p.is_file():
        s = json.loads(p.read_text())
        print(f"{name}: {s['distributed_type'].split('.')[-1]} x{s['num_processes']}, global batch {s['global_batch']}, "
              f"step {s['step']}, final loss {s['final_loss']}, {s['wall_time_s']:.0f} s, "
              f"peak {max(s.get('max_memory_gib_per_process') or [0]):.1f} GiB, resumed_from {s['resumed_from']}")
    else:
        print(f"{name}: no train_summary.json")
p = r / "results" / "export_check_z3.json"
if p.is_file():
    e = json.loads(p.read_text())
    print(f"export check (ZeRO-3 final in a 1-GPU runtime): {e['checks']}; passkey {e['passkey']['generated']!r} "
          f"(expected {e['passkey']['expected']}); chat {e['chat']['generated']!r}; vs 1-GPU gates: "
          f"max |diff| {e.get('reference', {}).get('max_abs_diff')}")
PY

mkdir -p "$R/pack/logs"
for name in g1 g1_seed8 z2 z3 z2_resume_g1; do
  [ -d "$R/$name" ] || continue
  mkdir -p "$R/pack/$name"
  cp "$R/$name"/metrics.jsonl "$R/$name"/train_summary.json "$R/$name"/config.yaml "$R/pack/$name/" 2>/dev/null
done
cp -r "$R/results" "$R/pack/"
for f in "$R"/logs/*.log; do
  grep -v -E "it/s\]|s/it\]" "$f" | tail -300 > "$R/pack/logs/$(basename "$f")"
done
say "total wall time: $(elapsed)s"
cp "$SUMMARY" "$OUT/summary.txt"
tar czf "$OUT/multi_gpu.tgz" -C "$R/pack" .
ls -la "$OUT"
