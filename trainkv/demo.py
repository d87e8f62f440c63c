"""``trainkv demo``: the product in a few minutes on a CPU, offline.

1. Loads the embedded SmolLM2-135M-Instruct with the shipped Attention-Gates (`checkpoints/`).
2. Runs a small slice of the evaluation split (held-out templates and seed) at one keep ratio for the
   full cache, the best training-free baseline and the shipped gates; prints the table and writes the
   accuracy plot.
3. Runs a few steps of the Attention-Gate SFT recipe on CPU to show the training loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_1"]  # short answers: the demo caps generation


def run_demo(args) -> int:
    from .eval.runner import Sweep, SweepConfig
    from .hub.load import find_local_checkpoint

    out = Path(args.output)
    gates = find_local_checkpoint(args.model)
    if gates is None:
        raise SystemExit(f"demo: no shipped gates for {args.model!r} under checkpoints/ (run it from a trainkv checkout)")
    method = json.loads((gates / "config.json").read_text())["method"]["method"]
    print(f"[1/3] {args.model} + shipped {method} gates from {gates}")
    start = time.perf_counter()
    sweep = Sweep(SweepConfig(
        model=args.model, methods=["full", args.baseline, method], checkpoints={method: str(gates)},
        budgets=[args.keep], tasks=args.tasks, context_lengths=[args.context], samples=args.samples,
        output=str(out / "eval"), batch_size=args.batch_size, device="cpu", progress=True,
        max_new_tokens=args.max_new_tokens,
    ))
    print(f"[2/3] evaluation split: {len(args.tasks)} tasks x {args.samples} samples at {args.context} tokens, "
          f"keep ratio {args.keep}")
    summary = sweep.run()
    print()
    table = (out / "eval" / "summary.md").read_text().split("## Per task")[0]
    print(table.strip())
    print(f"\nplot: {out / 'eval' / 'accuracy_vs_budget.png'}   ({time.perf_counter() - start:.0f} s)")
    if args.train_steps > 0:
        print(f"\n[3/3] {args.train_steps} steps of the Attention-Gate SFT recipe on CPU")
        from .training import TrainConfig, train

        cfg = TrainConfig.from_yaml(
            Path(__file__).resolve().parent.parent / "configs/recipes/smollm2-135m/attention_gate_sft.yaml",
            [f"max_steps={args.train_steps}", f"output_dir={out / 'train'}", "data.num_samples=8", "save_every=0",
             "overwrite_output_dir=true", "data.context_tokens=[200]", "data.seq_len=320", "log_every=1"],
        )
        result = train(cfg)
        losses = [round(r["loss"], 4) for r in result.history if "loss" in r]
        print(f"trained {result.step} steps (losses {losses}); gates written to {result.final_dir}")
    return 0 if summary is not None else 1


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: shipped gates vs baselines on the embedded model, then a few training steps")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--baseline", default="snapkv", help="training-free method to compare (default: the best one at 1K x 1/8 in results/smollm2)")
    p.add_argument("--keep", type=float, default=0.125, help="keep ratio")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tasks", nargs="+", default=DEMO_TASKS)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16, help="cap on generated tokens (the answers are short numbers)")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--output", default="demo_output")
    p.set_defaults(func=run_demo)


__all__ = ["add_demo_parser", "run_demo"]
