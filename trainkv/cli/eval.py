"""``trainkv eval``: budget sweeps over methods x budgets x tasks x context lengths, with tables and plots.

Examples::

    trainkv eval --model smollm2-135m --methods full snapkv streaming_llm tova --keep 1/2 1/4 1/8 1/16 \\
        --tasks ruler --context-lengths 512 1024 2048 --samples 5 --output results/smollm2-baseline
    trainkv eval --methods full attention_gate --checkpoint attention_gate=checkpoints/smollm2-135m/attention_gate ...
    trainkv eval --kl-only --methods full snapkv --keep 1/4 1/8 --context-lengths 1024 --output results/kl
    trainkv eval --report-only --output results/smollm2-baseline      # rebuild summary.md / plots
    trainkv eval --split dev ...          # the dev seeds: every choice is made here (docs/protocol.md)
    trainkv eval --split test ...         # the test seed: reported numbers only, after the choice is recorded
    trainkv eval --tasks family:aggregation ...                        # one task family (held-out-family checks)
    trainkv eval --compare RUN_A.json RUN_B.json [--tasks family:aggregation]   # paired claims: A vs B

--split dev|test draws --samples per task from each seed of the split (dev: 4321, 777, 2024; test: 271828);
--seed N is an ad-hoc run (default 1234, the pre-protocol seed; a test seed makes a test run). Run files record
which split they belong to (eval_split). Reports print 95% bootstrap intervals (trainkv.eval.intervals).

--keep: a ratio (1/8 or 0.125) is a share of each run's context length, fixed as round(r x length) entries per
(layer, KV head) for every sample of the run; an integer is entries. (The run-time --budget of ``trainkv generate``
takes a ratio of the tokens seen so far instead: hence the other name.)

See ``trainkv.eval.runner`` for the protocol (query-agnostic chunked prefill with eviction, question
appended uncompressed, greedy decoding) and ``trainkv.eval.quality`` for KL / perplexity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..budgets import SPELLINGS
from ..eval import report
from ..eval.intervals import KEEP_THRESHOLD, beats_claim, keeps_claim
from ..eval.runner import Sweep, SweepConfig
from ..eval.spec import DEFAULT_SEED, DEV_SEEDS, FULL, SPLIT_SEEDS, TEST_SEED, expand_tasks, parse_keep
from ..methods import TRAINING_FREE
from .args import CLIError, flag_type, positive_int


def _checkpoint(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"--checkpoint takes NAME=PATH, got {text!r}")
    return name, path


def _chunk(text: str) -> int | None:
    if text.lower() in ("none", "0", "all", "full"):
        return None
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("chunk size must be positive (or 'none' for one pass)")
    return value


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command on ``trainkv``'s sub-parsers."""
    p = subparsers.add_parser(
        "eval", help="budget sweeps over methods x budgets x tasks x context lengths (JSON, table, plot)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="model alias, local directory or Hub repo id")
    p.add_argument("--methods", nargs="+", default=None,
                   help="'full', training-free methods (optionally 'snapkv:window_size=64'), or names given with "
                        "--checkpoint (default: full and every training-free method)")
    p.add_argument("--method", dest="methods_single", default=None, help="a single method (same as --methods M)")
    p.add_argument("--checkpoint", action="append", type=_checkpoint, default=[], metavar="NAME=PATH",
                   help="a trained gate checkpoint (path, alias or Hub repo) evaluated as method NAME; repeatable")
    keep = flag_type("--keep", parse_keep, SPELLINGS)
    p.add_argument("--keep", nargs="+", type=keep, default=None,
                   help="ratios of the context length (0.125 or 1/8) or entries per (layer, KV head) (512) "
                        "(default: 1/2 1/4 1/8 1/16)")
    p.add_argument("--budgets", "--budget", dest="old_budgets", nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tasks", nargs="+", default=None,
                   help="task names; 'ruler' = RULER's 11 offline tasks, 'all' = every task, 'family:NAME' = a task "
                        "family (trainkv.data.tasks.TASK_FAMILIES) (default: ruler)")
    p.add_argument("--context-lengths", nargs="+", type=positive_int("--context-lengths"), default=[512, 1024, 2048])
    p.add_argument("--samples", type=positive_int("--samples"), default=5,
                   help="samples per task and context length (per seed of the split)")
    p.add_argument("--split", choices=sorted(SPLIT_SEEDS), default=None,
                   help=f"dev (seeds {', '.join(map(str, DEV_SEEDS))}: every choice) or test (seed {TEST_SEED}: "
                        "reported numbers only), docs/protocol.md")
    p.add_argument("--seed", type=int, default=None,
                   help=f"an ad-hoc seed instead of a split (default {DEFAULT_SEED}; the generators' EVAL split either "
                        "way, training uses TRAIN)")
    p.add_argument("--output", default="results/eval", help="output directory (resumable: finished runs are skipped)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=1, help="samples per forward (left padding; same results)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--chunk-size", type=_chunk, default=512,
                   help="prefill chunk size; eviction after each chunk ('none': the whole context in one pass, "
                        "as kvpress) (default 512)")
    p.add_argument("--sink-tokens", type=int, default=None, help="protected first tokens (default 4)")
    p.add_argument("--recent-window", type=int, default=None,
                   help="protected recent tokens (default: the method's own setting, e.g. Locret's stabilizers, "
                        "else min(32, budget // 4))")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on each sample's generation budget")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="no chat template (raw context + question)")
    p.add_argument("--overwrite", action="store_true", help="recompute runs whose JSON exists")
    p.add_argument("--kl", action="store_true", help="also KL to the full cache / perplexity on held-out prose")
    p.add_argument("--kl-only", action="store_true", help="only the KL / perplexity runs (no tasks)")
    p.add_argument("--kl-samples", type=positive_int("--kl-samples"), default=4, help="prose segments per context length for --kl")
    p.add_argument("--kl-chunk-size", type=positive_int("--kl-chunk-size"), default=64, help="chunk size of the --kl runs (default 64)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (on a busy or small CPU, 1 is often fastest)")
    p.add_argument("--report-only", action="store_true", help="only rebuild summary.json/.md and the plots")
    p.add_argument("--no-intervals", dest="intervals", action="store_false",
                   help="reports without bootstrap intervals and claims")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                   help="print paired claims of two run files (A's share of B, A - B, 95%% bootstrap on the samples "
                        "both hold; --tasks restricts the samples) and exit")
    p.add_argument("--threshold", type=float, default=KEEP_THRESHOLD,
                   help="share of RUN_B that --compare tests A against (default %(default)s%%)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_eval)
    return p


def config_from_args(args):
    if args.old_budgets:
        raise CLIError("--budgets is now --keep (in eval a ratio is a share of the context length, fixed per run; "
                       f"the run-time --budget is a share of the tokens seen): use --keep {' '.join(args.old_budgets)}")
    checkpoints = dict(args.checkpoint)
    methods = list(args.methods or [])
    if args.methods_single:
        methods.append(args.methods_single)
    if not methods:
        methods = [FULL, *TRAINING_FREE, *checkpoints]
    try:
        return SweepConfig(
            model=args.model, methods=methods, checkpoints=checkpoints, keep=list(args.keep or [0.5, 0.25, 0.125, 0.0625]),
            tasks=args.tasks or ["ruler"], context_lengths=args.context_lengths, samples=args.samples, seed=args.seed,
            split=args.split, output=args.output,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, chunk_size=args.chunk_size,
        sink_tokens=args.sink_tokens, recent_window=args.recent_window, max_new_tokens=args.max_new_tokens,
            chat=args.chat, overwrite=args.overwrite, tasks_enabled=not args.kl_only, kl=args.kl or args.kl_only,
            kl_samples=args.kl_samples, kl_chunk_size=args.kl_chunk_size, progress=args.progress,
            intervals=args.intervals,
        )
    except ValueError as e:  # --split with another --seed, an unknown task or family
        raise CLIError(str(e)) from None


def compare(path_a: str, path_b: str, tasks: list[str] | None = None, threshold: float = KEEP_THRESHOLD) -> list[str]:
    """The paired claims of two run files (same context length): A's share of B and A - B, with 95% intervals."""
    runs = []
    for path in (path_a, path_b):
        try:
            rec = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"--compare: cannot read {path}: {e}") from None
        if rec.get("kind") != "tasks":
            raise CLIError(f"--compare: {path} is not a task run file")
        if tasks:
            rec["results"] = [r for r in rec["results"] if r["task"] in tasks]
        runs.append(rec)
    a, b = runs
    try:
        claims = [keeps_claim(a, b, threshold), beats_claim(a, b)]
    except ValueError as e:
        raise CLIError(f"--compare: {e}") from None
    if claims[0].interval.n == 0:
        raise CLIError(f"--compare: {path_a} and {path_b} share no samples (other seeds, tasks or lengths)")
    return [c.sentence() for c in claims]


def cmd_eval(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        try:
            tasks = expand_tasks(args.tasks) if args.tasks else None
        except ValueError as e:
            raise CLIError(str(e)) from None
        for line in compare(*args.compare, tasks=tasks, threshold=args.threshold):
            print(line)
        return 0
    config = config_from_args(args)
    sweep = Sweep(config)
    if args.report_only:
        summary = report.write_report(config.output, intervals=args.intervals)
    else:
        summary = sweep.run()
    print((sweep.out / "summary.md").read_text())
    print(f"wrote {sweep.out / 'summary.md'}, {sweep.out / 'summary.json'}"
          + (f", {sweep.out / 'accuracy_vs_budget.png'}" if summary.get("full") or summary.get("methods") else ""))
    return 0


__all__ = ["add_eval_parser", "cmd_eval", "config_from_args"]
