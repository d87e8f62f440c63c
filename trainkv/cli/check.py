"""``trainkv check``: your own prompt at several budgets, to see where the answer starts to change.

One prompt is not a measurement, but it is what a user tries first. ``check`` generates the answer with the full
cache (budget 1, nothing evicted), then at each ``--budgets`` value, and prints them side by side with the entries
kept, marking where the answer differs from the full cache's (or, with ``--expect TEXT``, where it stops
containing TEXT). Pick a budget at or above the smallest one whose answers still match, on several prompts like
yours.

    trainkv check --prompt-file report.txt --budgets 1/2 1/4 1/8 1/16 --expect "valve 7"
"""

from __future__ import annotations

import argparse
import json

from ..models import load_tokenizer
from .args import budget, positive_int
from .generate import add_model_args, generate_once, load_for, read_prompt

DEFAULT_BUDGETS = ["1/2", "1/4", "1/8", "1/16"]


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def matches(answer: str, reference: str, expect: str | None) -> bool:
    """Whether an answer keeps what matters: contains ``expect`` if given, else equals the full cache's answer
    (whitespace and case aside)."""
    if expect is not None:
        return normalize(expect) in normalize(answer)
    return normalize(answer) == normalize(reference)


def cmd_check(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    args.budget = None  # the eviction flags of `generate` are the budgets here
    for name in ("chunk_size", "sink_tokens", "recent_window", "mode", "threshold"):
        setattr(args, name, None)
    model, checkpoint = load_for(args)
    tok = load_tokenizer(args.model)
    rows = [{"budget": "full", **generate_once(model, tok, prompt, args.max_new_tokens, args.chat, {"budget": 1.0})}]
    reference = rows[0]["answer"]
    for b in args.budgets:
        rows.append({"budget": b, **generate_once(model, tok, prompt, args.max_new_tokens, args.chat, {"budget": b})})
    for row in rows:
        row["matches"] = matches(row["answer"], reference, args.expect)
    keeps = [r for r in rows[1:] if r["matches"]]
    lowest = None
    for r in rows[1:]:  # budgets as given, largest first: the last one before the first miss
        if not r["matches"]:
            break
        lowest = r["budget"]
    summary = {"method": model.trainkv_state.method.name, "checkpoint": checkpoint, "prompt_tokens": rows[0]["prompt_tokens"],
               "criterion": f"contains {args.expect!r}" if args.expect else "same answer as the full cache",
               "lowest_matching_budget": lowest, "rows": rows}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"method {summary['method']}" + (f" (checkpoint {checkpoint})" if checkpoint else "")
          + f", {summary['prompt_tokens']} prompt tokens; criterion: {summary['criterion']}")
    print(f"{'budget':>8}  {'kept/head':>9}  {'KV held':>8}  ok  answer")
    for r in rows:
        kept = max(n for row in r["kept_per_layer_head"] for n in row)
        share = r["kv_bytes_held"] / max(1, r["full_cache_kv_bytes"])
        answer = r["answer"].strip().splitlines()[0][:70] if r["answer"].strip() else "(empty)"
        print(f"{r['budget']!s:>8}  {kept:>9}  {share:>8.1%}  {'yes' if r['matches'] else ' NO'}  {answer}")
    if lowest is None:
        print("the answer changes already at the largest budget tried: keep more (or check the full answer)")
    else:
        print(f"answers match down to budget {lowest}" + ("" if len(keeps) == len(rows) - 1 else
                                                          "; below it they change") + ". One prompt is not a "
              "measurement: try several prompts like yours before choosing.")
    return 0


def add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="your prompt at several budgets: where does the answer change?",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--budgets", nargs="+", type=budget("--budgets"), default=[budget()(b) for b in DEFAULT_BUDGETS],
                   help="run-time budgets, largest first: ratios of the tokens seen (1/8) or entries (512) "
                        f"(default: {' '.join(DEFAULT_BUDGETS)})")
    p.add_argument("--expect", default=None, help="text the answer must contain (else: the full cache's answer)")
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=48)
    p.add_argument("--json", action="store_true", help="print only a JSON object")
    p.set_defaults(func=cmd_check)


__all__ = ["add_check_parser", "cmd_check", "matches"]
