"""Copy a trained run's final checkpoint into ``checkpoints/`` with its model card, evaluation table and training config.

    python scripts/ship_checkpoint.py --final runs/smollm2-135m/attention_gate_sft_gpu_2k/final \
        --dest checkpoints/smollm2-135m/attention_gate --label attention_gate \
        --train-config configs/recipes/smollm2-135m/attention_gate_sft_gpu_2k.yaml \
        --train-summary runs/smollm2-135m/attention_gate_sft_gpu_2k/train_summary.json

The evaluation table comes from ``results/smollm2/summary.json`` (rows of ``--label``: score and share of the
full cache per context length and keep ratio) and, when present, ``results/smollm2_kl/summary.json`` (KL).
The copy is written to a temporary folder next to ``--dest`` and renamed into place (never half-written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from trainkv.eval.report import budget_title
from trainkv.hub.checkpoint import GateCheckpoint


def eval_table(summary: dict, label: str, command: str, runs_dir: str) -> str:
    rows = []
    full = summary.get("full", {})
    runs = summary.get("methods", {}).get(label, {})
    for length in sorted(runs, key=int):
        cells = runs[length]
        base = full.get(length, {}).get("score")
        for budget in sorted(cells, key=lambda b: -float(b[1:])):
            s = cells[budget]["score"]
            share = f"{100 * s / base:.0f}%" if base else "-"
            rows.append(f"| {length} | {budget_title({'spec': cells[budget]['keep_ratio']})} | {s:.1f} | {base:.1f} | {share} |")
    if not rows:
        raise SystemExit(f"no rows for {label!r} in the summary: evaluate it first (trainkv eval ... --checkpoint {label}=...)")
    split = "Test split (docs/protocol.md)" if summary.get("eval_split") == "test" else "Evaluation split"
    head = (f"{split} of the synthetic RULER-style tasks (11 tasks x "
            f"{summary.get('samples_per_task')} samples, seed {summary.get('seed')}, chunked prefill "
            f"{summary.get('chunk_size')}, query-agnostic; devices: {', '.join(summary.get('devices', []))}).\n"
            f"Reproduce (a new output folder, so nothing is reused; `--device cpu` works, slowly): `{command}`\n"
            f"The committed runs are `{runs_dir}/{label}__L*.json` (their `weights_sha256` is this checkpoint's).\n\n"
            "| context tokens | keep ratio | score | full cache | share of full |\n|---|---|---|---|---|\n")
    return head + "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--final", required=True, help="the run's final checkpoint directory")
    p.add_argument("--dest", required=True, help="checkpoints/<alias>/<name>")
    p.add_argument("--label", required=True, help="the method label of its rows in the results summary")
    p.add_argument("--results", default="results/smollm2/summary.json")
    p.add_argument("--train-config", required=True, help="the recipe YAML it was trained with")
    p.add_argument("--train-summary", help="the run's train_summary.json (wall time, GPU, steps)")
    p.add_argument("--load-name", help="what the card's example passes to load_gated (default: --dest)")
    args = p.parse_args(argv)

    dest = Path(args.dest)
    summary = json.loads(Path(args.results).read_text())
    model = summary.get("model")
    cells = summary.get("methods", {}).get(args.label, {})
    keeps = sorted({c["keep_ratio"] for by_keep in cells.values() for c in by_keep.values()}, reverse=True)
    lengths = sorted(cells, key=int)  # (eval_table refuses a label without cells)
    settings = "".join(f"{flag} {summary[key]} " for key, flag, default in
                       (("chunk_size", "--chunk-size", 512), ("dtype", "--dtype", "float32"))
                       if summary.get(key, default) != default)  # the evaluation's, where not the CLI default
    command = (f"trainkv eval {f'--model {model} ' if model and model != 'smollm2-135m' else ''}"
               f"--methods {args.label} --checkpoint {args.label}={dest.as_posix()} --tasks ruler "
               f"--context-lengths {' '.join(map(str, lengths))} "
               f"--keep {' '.join(f'{k:g}' for k in keeps)} "
               f"--samples {summary.get('samples_per_task', 4)} "
               f"{settings}"
               f"{'--split test ' if summary.get('eval_split') == 'test' else ''}--output results/reproduce")
    ckpt = GateCheckpoint.load(args.final)
    ckpt.eval_table = eval_table(summary, args.label, command, (Path(args.results).parent / "runs").as_posix())
    ckpt.card_name = args.load_name or dest.as_posix()
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.save_pretrained(tmp)  # writes the card; then the source's weight and config files, byte for byte:
    for name in ("model.safetensors", "config.json"):  # re-serialising changes the file's sha256 (safetensors
        shutil.copyfile(Path(args.final) / name, tmp / name)  # writes its metadata map in no fixed order)
    shutil.copyfile(args.train_config, tmp / "training_config.yaml")
    if args.train_summary:
        shutil.copyfile(args.train_summary, tmp / "train_summary.json")
    old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    print(f"shipped {args.final} -> {dest} (weights sha256 {json.loads((dest / 'config.json').read_text())['weights_sha256'][:16]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
