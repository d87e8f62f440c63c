"""``trainkv generate``: one prompt through an evicting cache, the answer and what the cache held.

Which method runs is never a guess:

* ``--checkpoint PATH`` runs the method saved in that checkpoint (``--method``, if also given, must name it);
* ``--method M`` with a trainable M (``attention_gate``, ``retaining_head``, ``layer_budget``) runs the shipped
  checkpoint ``<model>/<M>`` (e.g. ``checkpoints/smollm2-135m/retaining_head``), or fails naming where it looked;
* ``--method M`` with a training-free M runs it with the given eviction flags (budget default 256);
* neither: the model's default shipped gates (``checkpoints/<model>/`` and its ``DEFAULT``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..attach import attach
from ..config import EvictionConfig
from ..hub.format import CheckpointNotFoundError, read_config
from ..hub.load import load_gated
from ..hub.resolve import resolve_checkpoint
from ..methods import get_method
from ..models import load_model, load_tokenizer
from .args import CLIError, add_eviction_args, eviction_overrides, method_name, positive_int

DEFAULT_TRAINING_FREE_BUDGET = 256


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from ``--prompt``, ``--prompt-file`` or standard input; an empty one is refused."""
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise CLIError(f"--prompt-file {args.prompt_file!r}: no such file")
        prompt = path.read_text()
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CLIError("empty prompt: give --prompt, --prompt-file, or text on standard input")
    return prompt


def checkpoint_for(model: str, method: str | None, checkpoint: str | None) -> str | None:
    """The checkpoint to load (None: run a training-free method), by the rules of the module docstring."""
    if checkpoint is not None:
        try:
            saved = read_config(resolve_checkpoint(checkpoint))["method"]["method"]
        except CheckpointNotFoundError as e:
            raise CLIError(f"--checkpoint {checkpoint!r}: {e}") from None
        if method is not None and method != saved:
            raise CLIError(f"--method {method} does not match --checkpoint {checkpoint}, which holds {saved!r}: "
                           f"leave --method out, or give a {method} checkpoint")
        return checkpoint
    if method is None:
        return model
    if get_method(method).trainable:
        return f"{model}/{method}"
    return None


def load_for(args: argparse.Namespace):
    """The model with the asked method attached, and the checkpoint it came from (or None)."""
    overrides = eviction_overrides(args)
    source = checkpoint_for(args.model, args.method, args.checkpoint)
    if source is None:
        model = load_model(args.model)
        attach(model, args.method, EvictionConfig(**{"budget": DEFAULT_TRAINING_FREE_BUDGET, **overrides}))
        return model, None
    try:
        directory = resolve_checkpoint(source)
    except CheckpointNotFoundError as e:
        raise CLIError(f"--method {args.method}: no checkpoint {source!r} ({e}); give one with --checkpoint PATH"
                       if args.method and not args.checkpoint else str(e)) from None
    return load_gated(directory, allow_other_base=args.allow_other_base, **overrides), str(directory)


def encode(tok, prompt: str, chat: bool):
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
    return tok(prompt, return_tensors="pt")


def full_cache_bytes(model, tokens: int) -> int:
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * elem


def generate_once(model, tok, prompt: str, max_new_tokens: int, chat: bool = True, eviction: dict | None = None) -> dict:
    """Greedy generation of one prompt; returns the answer and the cache statistics."""
    enc = encode(tok, prompt, chat)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             eviction=eviction)
    elapsed = time.perf_counter() - start
    stats = out.cache.stats()
    return {
        "answer": tok.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True),
        "prompt_tokens": int(enc["input_ids"].shape[1]),
        "tokens_seen": stats["tokens_seen"],
        "kept_per_layer_head": [row[0] for row in stats["kept_per_layer_head"]],
        "kv_bytes_held": stats["bytes"]["kv"],
        "full_cache_kv_bytes": full_cache_bytes(model, stats["tokens_seen"]),
        "seconds": round(elapsed, 3),
    }


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    model, checkpoint = load_for(args)
    tok = load_tokenizer(args.model)
    result = generate_once(model, tok, prompt, args.max_new_tokens, chat=args.chat)
    report = {"method": model.trainkv_state.method.name, "checkpoint": checkpoint,
              "eviction": model.trainkv_state.eviction.to_dict(), **result}
    if args.json:
        print(json.dumps(report))
        return 0
    print(report["answer"])
    print("---")
    flat = [n for row in report["kept_per_layer_head"] for n in row]
    print(f"method {report['method']}" + (f" (checkpoint {checkpoint})" if checkpoint else "")
          + f"  budget {report['eviction']['budget']}  chunk {report['eviction']['chunk_size']}")
    print(f"tokens seen {report['tokens_seen']}  entries kept per (layer, head): min {min(flat)} max {max(flat)}")
    held, full = report["kv_bytes_held"], report["full_cache_kv_bytes"]
    print(f"KV bytes held {held:,} (full cache would hold {full:,}, {held / max(1, full):.1%})  time "
          f"{report['seconds']:.2f}s")
    return 0


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model, method and checkpoint flags of `generate` and `check`."""
    p.add_argument("--model", default="smollm2-135m", help="model alias, local directory or Hub repo id")
    p.add_argument("--method", type=method_name(), default=None,
                   help="a training-free method, or a trainable one (its shipped checkpoint <model>/<method>, or "
                        "--checkpoint); default: the model's shipped gates")
    p.add_argument("--checkpoint", default=None, help="gate checkpoint (path, alias/name or Hub repo); its method runs")
    p.add_argument("--allow-other-base", action="store_true",
                   help="load a checkpoint trained for another base model of the same architecture (it may evict poorly)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-file", default=None)
    p.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt raw, without the chat template")


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate with an evicting cache and print what the cache held",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(g)
    g.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=64)
    g.add_argument("--json", action="store_true", help="print only a JSON object (answer and cache statistics)")
    add_eviction_args(g)
    g.set_defaults(func=cmd_generate)


__all__ = ["add_generate_parser", "add_model_args", "checkpoint_for", "cmd_generate", "generate_once", "load_for"]
