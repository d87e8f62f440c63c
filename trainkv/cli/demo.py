"""``trainkv demo``: the product in a few minutes on a CPU, offline.

1. Loads the embedded SmolLM2-135M-Instruct with the shipped Attention-Gates (`checkpoints/`).
2. Runs a small slice of the evaluation split (held-out templates and seed) at one keep ratio for the
   full cache, the best training-free baseline and the shipped gates; prints the table and writes the
   accuracy plot.
3. Runs a few steps of the Attention-Gate SFT recipe on CPU to show the training loop.

Each run starts from an empty ``--output`` folder (what an earlier demo left there is removed first, and the
demo says so), so its table is always measured, never read back.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ..eval.runner import Sweep, SweepConfig
from ..hub.format import read_config
from ..hub.resolve import find_local_checkpoint
from ..resources import find_resource
from ..training import TrainConfig, train
from .args import CLIError, method_name, positive_int

DEMO_TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_1"]  # short answers: the demo caps generation
RECIPE = "configs/recipes/smollm2-135m/attention_gate_sft.yaml"
MARKER = ".trainkv-demo"  # marks a folder the demo made (only such a folder is emptied)


def fresh_output(out: Path) -> None:
    """An empty ``out``: a folder an earlier demo made is removed (said out loud); any other non-empty folder is
    refused, so the demo never deletes what it did not write."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise CLIError(f"--output {out} exists and was not made by trainkv demo; give another --output")
        print(f"removing the earlier demo results in {out}/ (each demo measures anew)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by trainkv demo\n")


def run_demo(args) -> int:
    out = Path(args.output)
    gates = find_local_checkpoint(args.model)
    if gates is None:
        raise CLIError(f"no shipped gates for {args.model!r} (looked under checkpoints/ and the installed data files)")
    fresh_output(out)
    method = read_config(gates)["method"]["method"]
    print(f"[1/3] {args.model} + shipped {method} gates from {gates}")
    start = time.perf_counter()
    sweep = Sweep(SweepConfig(
        model=args.model, methods=["full", args.baseline, method], checkpoints={method: str(gates)},
        keep=[args.keep], tasks=args.tasks, context_lengths=[args.context], samples=args.samples,
        output=str(out / "eval"), batch_size=args.batch_size, device="cpu", progress=True,
        max_new_tokens=args.max_new_tokens,
    ))
    print(f"[2/3] evaluation split: {len(args.tasks)} tasks x {args.samples} samples at {args.context} tokens, "
          f"keep {args.keep}")
    sweep.run()
    print()
    table = (out / "eval" / "summary.md").read_text().split("## Per task")[0]
    print(table.strip())
    print(f"\nplot: {out / 'eval' / 'accuracy_vs_budget.png'}   ({time.perf_counter() - start:.0f} s)")
    if args.train_steps > 0:
        print(f"\n[3/3] {args.train_steps} steps of the Attention-Gate SFT recipe on CPU")
        cfg = TrainConfig.from_yaml(
            find_resource(RECIPE),
            [f"max_steps={args.train_steps}", f"output_dir={out / 'train'}", "data.num_samples=8", "save_every=0",
             "overwrite_output_dir=true", "data.context_tokens=[200]", "data.seq_len=320", "log_every=1"],
        )
        result = train(cfg)
        losses = [round(r["loss"], 4) for r in result.history if "loss" in r]
        print(f"trained {result.step} steps (losses {losses}); gates written to {result.final_dir}")
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: shipped gates vs baselines on the embedded model, then a few "
                                    "training steps (CPU, offline, ~3 min)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--baseline", type=method_name("--baseline"), default="snapkv",
                   help="training-free method to compare (default: the best one at 1K x 1/8 in the results grid)")
    p.add_argument("--keep", type=float, default=0.125, help="keep ratio of the context (default 0.125)")
    p.add_argument("--context", type=positive_int("--context"), default=1024)
    p.add_argument("--tasks", nargs="+", default=DEMO_TASKS)
    p.add_argument("--samples", type=positive_int("--samples"), default=2)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=2)
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=16,
                   help="cap on generated tokens (the answers are short numbers)")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--output", default="demo_output", help="folder for the results (emptied first if a demo made it)")
    p.set_defaults(func=run_demo)


__all__ = ["add_demo_parser", "fresh_output", "run_demo"]
