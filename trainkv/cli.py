"""The ``trainkv`` command: ``generate``, ``eval``, ``push``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _budget(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() and "." not in text else value


def add_eviction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=_budget, default=None, help="entries per (layer, KV head), or a keep ratio like 0.125")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk size (tokens)")
    p.add_argument("--sink-tokens", type=int, default=None)
    p.add_argument("--recent-window", type=int, default=None)
    p.add_argument("--mode", choices=["budget", "threshold"], default=None)
    p.add_argument("--threshold", type=float, default=None)


def eviction_overrides(args) -> dict:
    names = {"budget": "budget", "chunk_size": "chunk_size", "sink_tokens": "sink_tokens",
             "recent_window": "recent_window", "mode": "mode", "threshold": "threshold"}
    return {dst: getattr(args, src) for src, dst in names.items() if getattr(args, src, None) is not None}


def cmd_generate(args) -> int:
    import torch

    import trainkv

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if prompt is None:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise SystemExit("error: empty prompt (give --prompt, --prompt-file, or text on stdin)")
    overrides = eviction_overrides(args)
    if args.method in trainkv.METHODS and not trainkv.get_method(args.method).trainable:
        model = trainkv.load_model(args.model)
        trainkv.attach(model, args.method, trainkv.EvictionConfig(**{"budget": 256, **overrides}))
    else:
        from .hub import load_gated

        model = load_gated(args.checkpoint or args.model, **overrides)
    tok = trainkv.load_tokenizer(args.model)
    if args.chat:
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
    elapsed = time.perf_counter() - start
    answer = tok.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    stats = out.cache.stats()
    kept = stats["kept_per_layer_head"]
    report = {
        "method": model.trainkv_state.method.name,
        "eviction": model.trainkv_state.eviction.to_dict(),
        "prompt_tokens": int(enc["input_ids"].shape[1]),
        "tokens_seen": stats["tokens_seen"],
        "kept_per_layer_head": [row[0] for row in kept],
        "kv_bytes_held": stats["bytes"]["kv"],
        "full_cache_kv_bytes": _full_cache_bytes(model, stats["tokens_seen"]),
        "seconds": round(elapsed, 3),
    }
    print(answer)
    print("---")
    if args.json:
        print(json.dumps(report))
    else:
        flat = [n for row in report["kept_per_layer_head"] for n in row]
        print(f"method {report['method']}  budget {report['eviction']['budget']}  chunk {report['eviction']['chunk_size']}")
        print(f"tokens seen {report['tokens_seen']}  entries kept per (layer, head): min {min(flat)} max {max(flat)}")
        for i, row in enumerate(report["kept_per_layer_head"]):
            print(f"  layer {i:2d}: {row}")
        print(f"KV bytes held {report['kv_bytes_held']:,} (full cache would hold {report['full_cache_kv_bytes']:,}, "
              f"{report['kv_bytes_held'] / max(1, report['full_cache_kv_bytes']):.1%})  time {elapsed:.2f}s")
    return 0


def _full_cache_bytes(model, tokens: int) -> int:
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * elem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate with an evicting cache and print cache statistics")
    g.add_argument("--model", default="smollm2-135m", help="model alias, local directory or Hub repo id")
    g.add_argument("--method", default="snapkv", help="a training-free method, or a trainable one loaded from --checkpoint")
    g.add_argument("--checkpoint", default=None, help="gate checkpoint (path, alias or Hub repo) for trained methods")
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt raw, without the chat template")
    g.add_argument("--json", action="store_true", help="print the statistics as JSON")
    add_eviction_args(g)
    g.set_defaults(func=cmd_generate)

    from .demo import add_demo_parser

    add_demo_parser(sub)
    try:
        from .eval.cli import add_eval_parser
    except ImportError:
        add_eval_parser = None
    if add_eval_parser is not None:
        add_eval_parser(sub)
    try:
        from .hub import add_push_parser
    except ImportError:
        add_push_parser = None
    if add_push_parser is not None:
        add_push_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
