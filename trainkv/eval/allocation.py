"""Allocators side by side: one scorer, one total budget, split by each allocator, on the evaluation split.

    python -m trainkv.eval.allocation --checkpoint checkpoints/smollm2-135m/attention_gate \
        --allocators uniform,pyramid,adakv,xkv --learned learned=checkpoints/smollm2-135m/layer_budget_r8 \
        --keep 0.125 --context-length 2048 --tasks ruler --samples 4 --output results/layer_budget/x.json

The allocators themselves live in `trainkv.budgets`; this module measures them. Profiling (`profile_scores`, for
XKV): the model runs with its method attached and nothing evicted (one-shot prefill, threshold mode with
threshold -inf, so attention-based scorers compute their scores too) on a few TRAIN-split samples; each layer's
per-head scores of the evictable tokens (not sinks, not the recent window) are mapped to non-negative
importances and sorted. The score is the method's own: SnapKV / H2O / TOVA / CORM attention mass as is (XKV's
own choice is SnapKV), Attention-Gate and layer-budget keep-logits through a sigmoid (keep probability), Locret
scores (pre-softmax logit maxima) through a softmax over the tokens of each head.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..attach import attach
from ..budgets import ScoreProfile, allocate, check_allocation, eviction_overrides, layer_bytes, weighted
from ..config import EvictionConfig
from ..data.tasks import generate_samples
from ..hub.checkpoint import GateCheckpoint
from ..hub.load import load_gated
from ..hub.resolve import resolve_checkpoint
from ..models import load_model, load_tokenizer
from .prompts import build_prompt
from .quality import prose_segments, quality_batch, summarize_quality
from .records import aggregate, device_name, now, package_versions, samples_digest, write_json
from .runner import evaluate_samples
from .spec import DEFAULT_SEED, DTYPES, NO_EVICTION_BUDGET, eviction_settings, expand_tasks, keep_entries, parse_keep

TRANSFORMS = {"attention_gate": "sigmoid", "layer_budget": "sigmoid", "retaining_head": "softmax"}


def _importance(scores: torch.Tensor, transform: str) -> torch.Tensor:
    """Non-negative importances from a method's scores ``[H, n]`` (module doc)."""
    scores = scores.float()
    if transform == "sigmoid":
        return torch.sigmoid(scores)
    if transform == "softmax":
        return torch.softmax(scores, dim=-1)
    if transform == "identity":
        return scores.clamp(min=0.0)
    raise ValueError(f"unknown transform {transform!r}: sigmoid, softmax or identity")


@torch.no_grad()
def profile_scores(model, contexts: Sequence[Sequence[int]], *, transform: str = "auto", sink_tokens: int = 4,
                   recent_window: int = 32) -> ScoreProfile:
    """Run ``model`` (a method attached) on each token-id list of ``contexts`` with nothing evicted and
    collect each layer's per-head importances of the evictable tokens (module doc)."""
    state = model.trainkv_state
    name = state.method.name
    if transform == "auto":
        transform = TRANSFORMS.get(name, "identity")
    device = next(model.parameters()).device
    out = ScoreProfile([], [], method=name, transform=transform)
    for ids in contexts:
        n = len(ids)
        cache = model.new_cache({"mode": "threshold", "threshold": float("-inf"), "budget": max(n, sink_tokens + recent_window),
                                 "chunk_size": max(n, 1), "sink_tokens": sink_tokens, "recent_window": recent_window,
                                 "head_allocation": "fixed", "head_budgets": None, "layer_budgets": None,
                                 "allocation_weights": None})
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        model(input_ids=x, attention_mask=torch.ones_like(x), cache=cache, logits_to_keep=1)
        gains, heads = [], []
        for layer in cache.layers:
            pos = layer.positions[0]  # [H, n]
            keep = (pos >= sink_tokens) & (pos <= n - 1 - recent_window)
            imp = _importance(layer.scores[0], transform)
            imp = torch.where(keep, imp, torch.zeros_like(imp))
            imp = imp / imp.sum(-1, keepdim=True).clamp(min=1e-30) if transform == "softmax" else imp
            srt = imp.sort(dim=-1, descending=True).values[:, : int(keep[0].sum())].cpu()  # [H, evictable]
            heads.append(srt)
            tot = float(srt.sum())
            gains.append(srt.sum(0) / tot if tot > 0 else torch.zeros(srt.shape[1]))
        out.layer_gains.append(gains)
        out.head_sorted.append(heads)
        out.context_tokens.append(n)
    return out


def learned_weights(checkpoint: str) -> list[list[float]]:
    """The ``allocation_weights`` saved in a ``layer_budget`` checkpoint's eviction settings."""
    config = GateCheckpoint.load(resolve_checkpoint(checkpoint)).config
    weights = config.get("eviction", {}).get("allocation_weights")
    if weights is None:
        raise ValueError(f"{checkpoint}: its eviction settings hold no allocation_weights (not a trained layer_budget?)")
    return weights


# ---------------------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CompareConfig:
    """What `compare` runs. ``scorer``: a training-free method name, ignored when ``checkpoint`` (a trained gate
    checkpoint, whose method then scores) is given. ``learned``: ``{label: layer_budget checkpoint}``, whose learned
    ``allocation_weights`` are applied with this same scorer. ``keep``: evaluation keeps of ``context_length``
    (`trainkv.eval.spec`: ``round(r * context_length)`` entries per head on average, 4 sinks, recent window
    ``min(32, entries // 4)``). xkv is profiled on ``profile_samples`` TRAIN-split samples per task. ``kl_segments``
    > 0 also measures, per allocator, the KL to the full cache and the perplexity on that many EVAL-split prose
    segments (`trainkv.eval.quality`, fed in chunks of ``kl_chunk_size``); ``task_eval=False`` skips the tasks.
    ``learned_adaptive``: also run each learned allocation as layer totals split across the layer's heads by
    Ada-KV at every eviction (``learned+adakv:<label>``)."""

    model: str = "smollm2-135m"
    scorer: str = "snapkv"
    checkpoint: str | None = None
    allocators: list[str] = field(default_factory=lambda: ["uniform", "pyramid", "adakv", "xkv"])
    learned: dict[str, str] = field(default_factory=dict)
    learned_adaptive: bool = False
    keep: list[int | float] = field(default_factory=lambda: [0.125, 0.0625])
    context_length: int = 1024
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    samples: int = 5
    seed: int = DEFAULT_SEED
    profile_samples: int = 4
    chunk_size: int | None = 512
    full: bool = True
    task_eval: bool = True
    kl_segments: int = 0
    kl_chunk_size: int = 64
    max_new_tokens: int | None = None
    dtype: str = "float32"
    device: str | None = None
    batch_size: int = 1
    output: str | None = None
    command: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.keep = [parse_keep(k) for k in self.keep]
        self.tasks = expand_tasks(self.tasks)
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")


class Comparison:
    """One comparison: the model with its scorer attached, the samples, and the record written after every run."""

    def __init__(self, cfg: CompareConfig):
        self.cfg = cfg
        self.tok = load_tokenizer(cfg.model)
        self.model = self._scored_model()
        text = self.model.config.get_text_config(decoder=True)
        self.num_layers, self.num_heads = text.num_hidden_layers, text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.element = next(self.model.parameters()).element_size()
        self.samples = [s for t in cfg.tasks for s in generate_samples(t, self.tok, cfg.samples, cfg.context_length,
                                                                        seed=cfg.seed, split="eval")]
        self.weights = {label: learned_weights(path) for label, path in cfg.learned.items()}
        self.profiles: dict[tuple[int, int], ScoreProfile] = {}
        self.t_start = time.perf_counter()
        self.record: dict[str, Any] = {
            "schema": "trainkv.allocation.compare/1", "command": cfg.command, "model": cfg.model,
            "scorer": {"method": self.model.trainkv_state.method.name, "checkpoint": cfg.checkpoint},
            "context_length": cfg.context_length, "tasks": list(cfg.tasks), "samples_per_task": cfg.samples,
            "seed": cfg.seed, "split": "eval", "chunk_size": cfg.chunk_size, "dtype": cfg.dtype,
            "max_new_tokens": cfg.max_new_tokens, "samples_digest": samples_digest(self.samples),
            "learned": dict(cfg.learned), "device": device_name(cfg.device), "versions": package_versions(),
            "date": now(), "runs": [],
        }

    # --- steps --------------------------------------------------------------------------------------
    def _scored_model(self):
        cfg = self.cfg
        model = load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = self.tok.pad_token_id
        base = {"budget": NO_EVICTION_BUDGET, "chunk_size": cfg.chunk_size or NO_EVICTION_BUDGET}
        if cfg.checkpoint is not None:
            return load_gated(cfg.checkpoint, model=model, **base)
        return attach(model, cfg.scorer, EvictionConfig(**base))

    def save(self) -> None:
        self.record["seconds"] = round(time.perf_counter() - self.t_start, 1)
        if self.cfg.output:  # after every run: a killed comparison keeps what it finished
            write_json(Path(self.cfg.output), self.record)

    def run_tasks(self, label: str, keep, eviction: dict, budgets=None) -> dict:
        """Score one allocation (``budgets`` ``[L][H]``) on the evaluation samples and record it."""
        cfg = self.cfg
        t0 = time.perf_counter()
        results = evaluate_samples(self.model, self.tok, self.samples, eviction=eviction, chunk_size=cfg.chunk_size,
                                   batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
        agg = aggregate(results)
        entry = {"allocator": label, "budget": keep, "score": agg["score"], "per_task": agg["per_task"],
                 "compression_mean": agg["compression_mean"], "seconds": round(time.perf_counter() - t0, 2)}
        if budgets is not None:
            entry["head_budgets"] = budgets
            entry["kv_bytes_per_sample"] = sum(layer_bytes(budgets, 1, self.head_dim, self.element))
            entry["kept_entries"] = sum(map(sum, budgets))
        self.record["runs"].append(entry)
        self.save()
        if cfg.progress:
            print(f"{label:>12} keep {keep!s:>8}: score {agg['score']:6.2f}  compression "
                  f"{agg['compression_mean']:.3f}  {entry['seconds']:.0f}s", flush=True)
        return entry

    def profile(self, eviction: dict) -> ScoreProfile:
        """XKV's score profile on TRAIN-split samples, with this keep's protected tokens (computed once per pair)."""
        cfg = self.cfg
        key = (eviction["sink_tokens"], eviction["recent_window"])
        if key not in self.profiles:
            train = [s for t in cfg.tasks for s in generate_samples(t, self.tok, cfg.profile_samples, cfg.context_length,
                                                                     seed=cfg.seed, split="train")]
            contexts = [build_prompt(s, self.tok).context_ids for s in train]
            self.profiles[key] = profile_scores(self.model, contexts, sink_tokens=key[0], recent_window=key[1])
        profile = self.profiles[key]
        self.record["xkv_profile"] = {"samples": len(profile.context_tokens), "transform": profile.transform,
                                      "context_tokens": profile.context_tokens, "split": "train"}
        return profile

    def allocations(self, entries: int, floor: int, profile: ScoreProfile | None) -> list[tuple[str, dict, list]]:
        """``(label, EvictionConfig overrides, head budgets)`` of every allocator at ``entries`` per head."""
        cfg = self.cfg
        names = list(cfg.allocators) + [f"learned:{label}" for label in self.weights]
        if cfg.learned_adaptive:
            names += [f"learned+adakv:{label}" for label in self.weights]
        out = []
        for name in names:
            if name.startswith(("learned:", "learned+adakv:")):
                budgets = weighted(self.weights[name.split(":", 1)[1]], entries, floor)
                overrides = eviction_overrides("adakv" if name.startswith("learned+adakv:") else "weighted", budgets)
            else:
                budgets = allocate(name, entries, self.num_layers, self.num_heads, scores=profile, floor=floor)
                overrides = eviction_overrides(name, budgets)
            check_allocation(budgets, entries, floor)
            out.append((name, overrides, budgets))
        return out

    def run_kl(self, keep, entries: int, settings: list, segments: list) -> None:
        """KL to the full cache and perplexity of every allocation on the prose segments."""
        cfg = self.cfg
        t0 = time.perf_counter()
        evictions = [{**eviction_settings(entries, cfg.kl_chunk_size), **o} for _, o, _ in settings]
        per: list[list[dict]] = [[] for _ in settings]
        for seg in segments:
            ids = torch.tensor([seg], dtype=torch.long, device=cfg.device)
            for i, r in enumerate(quality_batch(self.model, ids, evictions, cfg.kl_chunk_size, [entries] * len(settings))):
                per[i].append({k: (v[0] if isinstance(v, list) else v) for k, v in r.items()})
        for (name, _, _), rows in zip(settings, per):
            q = summarize_quality(rows)
            self.record["kl"]["runs"].append({"allocator": name, "budget": keep, **q})
            if cfg.progress:
                print(f"{name:>12} keep {keep!s:>8}: KL {q['kl']:.4f}  ppl {q['ppl']:.3f} (full {q['ppl_full']:.3f})",
                      flush=True)
        self.record["kl"]["seconds"] = round(self.record["kl"].get("seconds", 0) + time.perf_counter() - t0, 1)
        self.save()

    # --- all of it ------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        if cfg.full and cfg.task_eval:
            self.run_tasks("full", None, {"budget": NO_EVICTION_BUDGET})
        segments = None
        if cfg.kl_segments:
            segments = prose_segments(self.tok, cfg.context_length, cfg.kl_segments)
            self.record["kl"] = {"segments": len(segments), "chunk_size": cfg.kl_chunk_size, "split": "eval", "runs": []}
        for keep in cfg.keep:
            entries = keep_entries(keep, cfg.context_length)
            eviction = eviction_settings(entries, cfg.chunk_size)
            floor = eviction["sink_tokens"] + eviction["recent_window"]
            profile = self.profile(eviction) if "xkv" in cfg.allocators else None
            settings = self.allocations(entries, floor, profile)
            for name, overrides, budgets in settings if cfg.task_eval else []:
                entry = self.run_tasks(name, keep, {**eviction, **overrides}, budgets)
                if profile is not None and "adakv" not in name:
                    entry["xkv_retained_importance"] = profile.retained(budgets, floor)
            if segments:
                self.run_kl(keep, entries, settings, segments)
        self.save()
        return self.record


def compare(cfg: CompareConfig) -> dict:
    """Evaluate each allocator with the same scorer and total budget (see `CompareConfig`); returns the record,
    also written to ``cfg.output`` after every run."""
    return Comparison(cfg).run()


def summary_table(record: dict) -> str:
    """Markdown: score per allocator (rows) and budget (columns), with the full-cache score."""
    runs = record["runs"]
    budgets = sorted({r["budget"] for r in runs if r["budget"] is not None}, reverse=True)
    names = list(dict.fromkeys(r["allocator"] for r in runs if r["budget"] is not None))
    lines = ["| allocator | " + " | ".join(f"keep {b:g}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)] if budgets else []
    for name in names:
        cells = []
        for b in budgets:
            hit = [r for r in runs if r["allocator"] == name and r["budget"] == b]
            cells.append(f"{hit[0]['score']:.1f}" if hit else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    full = [r for r in runs if r["allocator"] == "full"]
    if full:
        lines.append(f"| full cache | {full[0]['score']:.1f} |" + " |" * (len(budgets) - 1))
    kl = record.get("kl", {}).get("runs", [])
    if kl:
        kb = sorted({r["budget"] for r in kl}, reverse=True)
        lines += ([""] if lines else []) + ["| allocator | " + " | ".join(f"KL at keep {b:g}" for b in kb) + " |",
                                            "|---|" + "---|" * len(kb)]
        for name in dict.fromkeys(r["allocator"] for r in kl):
            cells = [next((f"{r['kl']:.4f}" for r in kl if r["allocator"] == name and r["budget"] == b), "") for b in kb]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m trainkv.eval.allocation", description="compare budget allocators with one scorer")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scorer", default="snapkv", help="training-free method (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="trained scorer checkpoint (e.g. checkpoints/smollm2-135m/attention_gate)")
    p.add_argument("--allocators", default="uniform,pyramid,adakv,xkv")
    p.add_argument("--learned", action="append", default=[], metavar="NAME=PATH",
                   help="a layer_budget checkpoint whose learned allocation is applied with the same scorer")
    p.add_argument("--keep", default="0.125,0.0625",
                   help="comma-separated keeps: ratios of --context-length (0.125 or 1/8) or entries per head (512)")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--tasks", default="niah_single_1", help="comma-separated task names, or ruler")
    p.add_argument("--samples", type=int, default=5, help="per task")
    p.add_argument("--profile-samples", type=int, default=4, help="TRAIN-split samples per task for xkv's profile")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--no-full", action="store_true")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on each sample's generation budget")
    p.add_argument("--kl-segments", type=int, default=0,
                   help="also the KL to the full cache / perplexity on this many EVAL-split prose segments")
    p.add_argument("--kl-chunk-size", type=int, default=64)
    p.add_argument("--no-tasks", action="store_true", help="skip the task evaluation (e.g. KL only)")
    p.add_argument("--device", default=None)
    p.add_argument("--learned-adaptive", action="store_true",
                   help="also run each --learned allocation as layer totals with Ada-KV's adaptive split across heads")
    p.add_argument("--output", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    cfg = CompareConfig(
        model=args.model, scorer=args.scorer, checkpoint=args.checkpoint,
        allocators=[a for a in args.allocators.split(",") if a], learned=dict(i.split("=", 1) for i in args.learned),
        learned_adaptive=args.learned_adaptive, keep=args.keep.split(","), context_length=args.context_length,
        tasks=args.tasks.split(","), samples=args.samples, seed=args.seed, profile_samples=args.profile_samples,
        chunk_size=args.chunk_size or None, full=not args.no_full, task_eval=not args.no_tasks,
        kl_segments=args.kl_segments, kl_chunk_size=args.kl_chunk_size, max_new_tokens=args.max_new_tokens,
        dtype=args.dtype, device=args.device, batch_size=args.batch_size, output=args.output,
        command="python -m trainkv.eval.allocation " + " ".join(shlex.quote(a) for a in argv),
    )
    print(summary_table(compare(cfg)))
    return 0


__all__ = ["CompareConfig", "Comparison", "compare", "learned_weights", "main", "profile_scores", "summary_table"]

if __name__ == "__main__":
    raise SystemExit(main())
