"""Learned layer budgets, the tools around the method (`trainkv.methods.layer_budget`): measure an allocation without
training, and write a trained checkpoint's allocation artifacts (``allocation.json``, heat maps).

    python -m trainkv.training.layer_budget measure --base checkpoints/smollm2-135m/attention_gate --output runs/lb
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..budgets import check_allocation, layer_bytes, weighted
from ..config import EvictionConfig
from ..hub.checkpoint import GateCheckpoint
from ..hub.load import attach_with_base, load_gated
from ..hub.resolve import resolve_checkpoint
from ..hub.save import save_gated
from ..methods.layer_budget import measure_allocation
from ..models import load_model, load_tokenizer
from .allocation_plot import plot_allocation
from .config import DataConfig
from .data import build_dataset, collate, pad_token_id


def _train_batches(tokenizer, num_samples: int, seq_len: int, context_tokens: list[int], seed: int,
                   batch_size: int):
    """SFT batches of the synthetic tasks' TRAIN split (as the recipe's ``data.source=builtin:tasks``)."""
    cfg = DataConfig(source="builtin:tasks", format="sft", seq_len=seq_len, num_samples=num_samples,
                     context_tokens=context_tokens, seed=seed)
    cfg.validate()
    data = build_dataset(cfg, tokenizer, seed=seed)
    rows = [data[i] for i in range(len(data))]
    pad = pad_token_id(tokenizer)
    return [collate(rows[i:i + batch_size], pad) for i in range(0, len(rows), batch_size)]


def main(argv: list[str] | None = None) -> int:
    """``python -m trainkv.training.layer_budget measure``: a ``layer_budget`` checkpoint from a trained scorer without
    training (offsets 0: the scorer's own measured allocation), or re-measured from a trained one (``--from``)."""
    p = argparse.ArgumentParser(prog="python -m trainkv.training.layer_budget", description=main.__doc__)
    p.add_argument("command", choices=["measure"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="trained attention_gate / retaining_head checkpoint (offsets start at 0)")
    src.add_argument("--from", dest="source", help="a trained layer_budget checkpoint to re-measure")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--per-head", action="store_true")
    p.add_argument("--target-keep", type=float, default=0.09, help="recorded in the config (no training here)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--context-tokens", type=int, nargs="+", default=[900, 1300])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=11, help="TRAIN-split data seed")
    p.add_argument("--device", default=None)
    p.add_argument("--report-context", type=int, default=1024)
    p.add_argument("--power", type=float, default=1.0,
                   help="write keep_fraction ** power as the weights (1: proportional; < 1 flattens toward uniform)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.model)
    if args.source:
        model = load_gated(args.source, device=device)
    else:
        base_eviction = GateCheckpoint.load(resolve_checkpoint(args.base)).config["eviction"]
        model = load_model(args.model, device=device)
        attach_with_base(model, {"method": "layer_budget", "base_checkpoint": args.base, "per_head": args.per_head,
                                 "target_keep": args.target_keep, "report_context": args.report_context},
                         EvictionConfig.from_dict(base_eviction))
    batches = _train_batches(tok, args.samples, args.seq_len, args.context_tokens, args.seed, args.batch_size)
    weights = measure_allocation(model, batches)
    if args.power != 1.0:
        weights = [[max(w ** args.power, 1e-6) for w in row] for row in weights]
        model.trainkv_state.eviction = model.trainkv_state.eviction.replace(allocation_weights=weights)
    save_gated(model, args.output)
    write_allocation_artifacts(args.output)
    print(f"layer_budget: measured on {args.samples} TRAIN-split samples; per-layer weights "
          f"{[round(sum(r) / len(r), 3) for r in weights]}; written to {args.output}")
    return 0


def write_allocation_artifacts(checkpoint_dir, ratios: list[float] | None = None, context_tokens: int | None = None) -> dict:
    """Next to a trained ``layer_budget`` checkpoint: ``allocation.json`` (weights, learned offsets, integer
    head budgets at each keep ratio, default 1/8 and 1/16, for ``context_tokens``, per-layer bytes vs uniform),
    ``allocation_r<ratio>.png`` per ratio and ``allocation.png`` (the first ratio).

    Budgets use the evaluation's protected tokens (4 sinks, window ``min(32, budget // 4)``).
    """
    if os.environ.get("RANK", "0") != "0":
        return {}
    directory = Path(checkpoint_dir)
    ckpt = GateCheckpoint.load(directory)
    method, eviction, shape = ckpt.config["method"], ckpt.config["eviction"], ckpt.config["base_shape"]
    weights = eviction.get("allocation_weights")
    if weights is None:
        raise ValueError(f"{directory}: no allocation_weights in its eviction settings")
    ratios = list(ratios or (0.125, 0.0625))
    context_tokens = context_tokens or int(method.get("report_context", 1024))
    num_layers, num_heads = len(weights), len(weights[0])
    offsets = [[float(x) for x in ckpt.tensors[f"layers.{i}.offset"].float().tolist()] for i in range(num_layers)]
    report = {"checkpoint": str(directory), "base": method.get("base", {}).get("method"),
              "base_checkpoint": method.get("base_checkpoint"), "per_head": method.get("per_head"),
              "weights": weights, "offsets": offsets, "context_tokens": context_tokens, "budgets": {}}
    for r in ratios:
        entries = max(1, int(round(r * context_tokens)))
        sink = min(4, entries)
        window = max(0, min(min(32, entries // 4), entries - sink))
        # as the runtime allocates at this context (the horizon caps a layer at the tokens there are: the rest goes
        # to the other layers; EvictionConfig.budget_for)
        budgets = weighted(weights, entries, sink + window, max(context_tokens, entries))
        check_allocation(budgets, entries, sink + window)
        elt = 2  # bf16 bytes, for the report
        learned_bytes = sum(layer_bytes(budgets, 1, shape["head_dim"], elt))
        uniform_bytes = 2 * num_layers * num_heads * entries * shape["head_dim"] * elt
        report["budgets"][f"{r:g}"] = {
            "entries_per_head": entries, "floor": sink + window, "head_budgets": budgets,
            "layer_totals": [sum(row) for row in budgets], "kv_bytes_bf16": learned_bytes,
            "uniform_kv_bytes_bf16": uniform_bytes,
        }
        title = f"layer_budget ({report['base']}) keep {r:g} at {context_tokens} tokens: entries per (layer, KV head)"
        plot_allocation(budgets, directory / f"allocation_r{r:g}.png", title=title, reference=entries)
        if r == ratios[0]:
            plot_allocation(budgets, directory / "allocation.png", title=title, reference=entries)
    (directory / "allocation.json").write_text(json.dumps(report, indent=1))
    return report


__all__ = ["main", "write_allocation_artifacts"]

if __name__ == "__main__":
    raise SystemExit(main())
