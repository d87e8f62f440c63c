"""Budget sweeps: every method x budget x context length over the held-out synthetic tasks.

Protocol (query-agnostic eviction, as kvpress evaluates it; see ``research/toolkits.md``):

1. The **context** (chat-template prefix + task context, see :mod:`trainkv.eval.prompts`) is prefilled
   through an :class:`~trainkv.cache.EvictingCache` in chunks of ``chunk_size`` tokens, evicting after
   every chunk down to ``budget`` entries per (layer, KV head). ``chunk_size=None`` prefills the
   context in one pass (one-shot compression, what kvpress does).
2. Eviction is switched off (``cache.eviction_enabled = False``) and the question, the end of the user
   turn, the assistant header and the answer prefix are appended uncompressed; then greedy decoding
   for the sample's ``max_new_tokens`` (stopping at EOS).
3. The prediction is scored with RULER's ``string_match_all`` / ``string_match_part``.

Budgets. A float in (0, 1) is a keep ratio ``r``: ``budget = round(r * context_length)`` entries per
(layer, KV head), where ``context_length`` is the nominal length of the run (``--context-lengths``;
samples are sized to it with the model's tokenizer). An int is an absolute number of entries. One
budget holds for every sample of a run, so samples can share a batch. The *measured* compression of
each sample, ``mean over (layer, head) of entries kept after the context / context tokens`` (context
tokens = the ids that were compressed, chat prefix included), is recorded per sample.

Protected tokens, the same for every method: ``sink_tokens = 4`` first tokens and a recent window
of ``min(32, budget // 4)`` tokens (``--sink-tokens`` / ``--recent-window`` override both).

Chunking. The context is cut into chunks counted back from its end (the first chunk holds the
remainder, every later chunk ``chunk_size`` tokens). Rows of a left-padded batch then share their chunk
boundaries, so a batch gives exactly the results of running its samples one by one. (The deployed
runtime's ``generate`` chunks from the first column instead; with ``chunk_size`` >= the context, both
are one pass.)

Batching. Up to ``batch_size`` samples of one run are processed together: contexts are left-padded,
questions are left-padded inside their own block (the cache holds padding as invalid entries, positions
are computed per row), and decoding is a greedy loop over the batch. ``full`` is the same path with
a budget above every context (nothing is evicted; equal to plain transformers by invariant 1).

Train/eval separation: samples come from ``split="eval"`` only (the split is mixed into every sample's RNG, and
training recipes use ``split="train"``, whose templates, vocabularies and haystack text are disjoint from these).

Dev / test (docs/protocol.md): ``split="dev"`` draws ``samples`` per task from each dev seed, ``split="test"`` from
the test seed; a bare ``seed`` is an ad-hoc run (default :data:`DEFAULT_SEED`). Run files record ``eval_split`` and
``seeds``; every per-sample result carries ``(task, seed, index)``, the key that pairs samples across run files
(`trainkv.eval.intervals`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from trainkv.attach import attach, detach
from trainkv.config import EvictionConfig
from trainkv.data.sample import Sample
from trainkv.data.tasks import generate_samples
from trainkv.data.tasks._base import tokenizer_name
from trainkv.eval import report
from trainkv.eval.metrics import METRICS
from trainkv.eval.prompts import SEPARATOR, Prompt, build_prompt
from trainkv.eval.quality import run_quality
from trainkv.eval.records import aggregate, device_name, now, package_versions, samples_digest, write_json
from trainkv.eval.spec import (
    DEFAULT_SEED, DTYPES, FULL, NO_EVICTION_BUDGET, SPLIT, MethodSpec, budget_label, eviction_settings, expand_tasks,
    keep_entries, keep_ratio, parse_keep, parse_method, record_split, resolve_split, run_seeds, sanitize,
)
from trainkv.hub.format import CONFIG_NAME, WEIGHTS_NAME, read_config
from trainkv.hub.load import checkpoint_method_config, load_gated
from trainkv.hub.resolve import resolve_checkpoint
from trainkv.methods import make_config
from trainkv.models import load_model, load_tokenizer

SCHEMA = "trainkv.eval.run/1"


# ---------------------------------------------------------------------------------------------------------
# the batched query-agnostic evaluation of one run
# ---------------------------------------------------------------------------------------------------------
def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else list(eos))
    return ids


def chunk_bounds(width: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Column ranges of the prefill forwards, counted back from the end (the first one takes the remainder)."""
    if not chunk_size or chunk_size >= width:
        return [(0, width)]
    first = width % chunk_size or chunk_size
    bounds = [(0, first)]
    while bounds[-1][1] < width:
        start = bounds[-1][1]
        bounds.append((start, start + chunk_size))
    return bounds


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def run_batch(
    model, tokenizer, prompts: Sequence[Prompt], eviction: dict[str, Any] | None, chunk_size: int | None,
    pad_id: int | None = None,
) -> list[dict[str, Any]]:
    """Compress each prompt's context, append its question uncompressed, decode greedily.

    ``model`` has a trainkv method attached; ``eviction`` holds the overrides of its eviction settings
    (``None``: the full cache, nothing evicted). Returns, per prompt: the generated ``tokens`` (up to EOS, inclusive),
    the ``prediction`` text, and the cache's ``kept`` entries per (layer, KV head) after the context.
    """
    device = next(model.parameters()).device
    pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    cache = model.new_cache(eviction)
    if eviction is None:  # full cache: nothing is evicted, whatever the method (threshold-mode gates too)
        cache.eviction_enabled = False
    b = len(prompts)
    ctx_ids, ctx_mask = _left_pad([p.context_ids for p in prompts], pad_id, device)
    # the most tokens the cache will see (padded context, question, answer): learned allocation weights give no
    # head more entries than that (EvictionConfig.budget_for)
    cache.decode_horizon = (ctx_ids.shape[1] + max((len(p.question_ids) for p in prompts), default=0)
                            + max((p.max_new_tokens for p in prompts), default=0))
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    for start, end in chunk_bounds(ctx_ids.shape[1], chunk_size):
        model(input_ids=ctx_ids[:, start:end], attention_mask=ctx_mask[:, :end], position_ids=ctx_pos[:, start:end],
              cache=cache, logits_to_keep=1)
    stats = cache.stats()
    kept = [[layer[row] for layer in stats["kept_per_layer_head"]] for row in range(b)]  # [B][L][H]

    cache.eviction_enabled = False  # the question and the answer are appended uncompressed
    n_ctx = ctx_mask.sum(-1)
    q_ids, q_mask = _left_pad([p.question_ids for p in prompts], pad_id, device)
    mask = torch.cat([ctx_mask, q_mask], dim=1)
    q_pos = n_ctx[:, None] + (q_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=q_ids, attention_mask=mask, position_ids=q_pos, cache=cache, logits_to_keep=1)
    next_pos = q_pos[:, -1:] + 1

    eos = _eos_ids(model, tokenizer)
    budgets = [p.max_new_tokens for p in prompts]
    tokens: list[list[int]] = [[] for _ in range(b)]
    done = [budget <= 0 for budget in budgets]
    for step in range(max(budgets, default=0)):
        nxt = out.logits[:, -1].float().argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                tokens[i].append(t)
                done[i] = t in eos or len(tokens[i]) >= budgets[i]
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, logits_to_keep=1)
        next_pos = next_pos + 1
    results = []
    for i, p in enumerate(prompts):
        results.append({
            "tokens": tokens[i],
            "prediction": tokenizer.decode(tokens[i], skip_special_tokens=True),
            "kept": kept[i],
        })
    return results


def compression_of(kept: list[list[int]], context_tokens: int) -> dict[str, float]:
    """Measured compression of one sample: entries kept per (layer, head) after the context / context tokens."""
    flat = [n for row in kept for n in row]
    mean = sum(flat) / len(flat)
    return {
        "kept_mean": mean, "kept_min": min(flat), "kept_max": max(flat),
        "compression": mean / context_tokens,
    }


def score_sample(sample: Sample, prediction: str) -> float:
    return METRICS[sample.metric][2](prediction, sample.answers)


def evaluate_samples(
    model, tokenizer, samples: Sequence[Sample], *, eviction: dict[str, Any] | None, chunk_size: int | None,
    batch_size: int = 1, max_new_tokens: int | None = None, chat: bool = True, progress=None,
    done: dict[int, dict[str, Any]] | None = None, on_batch: Callable[[dict[int, dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Per-sample results of one run (in the order of ``samples``).

    Samples are sorted by context length into batches of ``batch_size`` (less padding); ``progress``
    (a tqdm bar) is advanced per sample. ``done``: results already computed (by sample position; a resumed run),
    which are kept and not recomputed; ``on_batch`` gets every result so far after each batch (to save them).
    """
    prompts = [build_prompt(s, tokenizer, chat=chat, max_new_tokens=max_new_tokens) for s in samples]
    finished = dict(done or {})
    order = sorted((i for i in range(len(samples)) if i not in finished), key=lambda i: (prompts[i].context_tokens, i))
    if progress is not None and finished:
        progress.update(len(finished))
    for k in range(0, len(order), max(1, batch_size)):
        idx = order[k:k + max(1, batch_size)]
        t0 = time.perf_counter()
        outs = run_batch(model, tokenizer, [prompts[i] for i in idx], eviction, chunk_size)
        _sync(model)
        per_sample = (time.perf_counter() - t0) / len(idx)
        for i, o in zip(idx, outs):
            s, p = samples[i], prompts[i]
            finished[i] = {
                "task": s.task,
                "index": s.metadata.get("index"),
                "seed": s.seed,
                "metric": s.metric,
                "prediction": o["prediction"],
                "references": list(s.answers),
                "score": score_sample(s, o["prediction"]),
                "context_tokens": p.context_tokens,
                "sample_context_tokens": s.context_tokens,
                "question_tokens": len(p.question_ids),
                "generated_tokens": len(o["tokens"]),
                "max_new_tokens": p.max_new_tokens,
                **compression_of(o["kept"], p.context_tokens),
                "seconds": round(per_sample, 4),
                "batch": len(idx),
            }
        if on_batch is not None:
            on_batch(finished)
        if progress is not None:
            progress.update(len(idx))
    return [finished[i] for i in range(len(samples))]


def _sync(model) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """What ``trainkv eval`` runs. See the module docstring for the protocol."""

    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=lambda: [FULL, "snapkv", "streaming_llm"])
    checkpoints: dict[str, str] = field(default_factory=dict)
    keep: list[int | float] = field(default_factory=lambda: [0.5, 0.25, 0.125, 0.0625])  # see trainkv.eval.spec
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    context_lengths: list[int] = field(default_factory=lambda: [512])
    samples: int = 5  # per task (and per seed of the split)
    seed: int | None = None  # an ad-hoc seed (default DEFAULT_SEED); the test seed makes a test run
    split: str | None = None  # "dev" | "test": the protocol's seeds (docs/protocol.md); None = ad hoc `seed`
    output: str = "results/eval"
    batch_size: int = 1
    device: str | None = None
    dtype: str = "float32"
    chunk_size: int | None = 512
    sink_tokens: int | None = None
    recent_window: int | None = None
    max_new_tokens: int | None = None
    chat: bool = True
    overwrite: bool = False
    tasks_enabled: bool = True
    kl: bool = False
    kl_samples: int = 4
    kl_chunk_size: int = 64
    progress: bool = True
    intervals: bool = True  # bootstrap intervals and paired claims in the report (trainkv.eval.intervals)

    def __post_init__(self):
        self.eval_split, self.seeds = resolve_split(self.split, self.seed)
        if self.split is None:
            self.seed = self.seeds[0]
        self.keep = [parse_keep(b) for b in self.keep]
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            self.chunk_size = None
        self.methods = list(dict.fromkeys(self.methods))
        self.tasks = expand_tasks(self.tasks)

    def method_specs(self) -> list[MethodSpec]:
        return [parse_method(m, self.checkpoints) for m in self.methods]

    @property
    def seed_field(self) -> int | list[int]:
        """``seed`` in run files: the seed (one), or the list of seeds (dev)."""
        return self.seeds[0] if len(self.seeds) == 1 else list(self.seeds)
















#: Config keys that must agree for an existing run file to count as done (batch size and device do
#: not change results: batched == unbatched).
RESUME_KEYS = ("model", "method", "budget", "context_length", "tasks", "samples_per_task", "seed", "seeds", "split",
               "eval_split", "eviction", "chunk_size", "chunking", "dtype", "max_new_tokens", "prompt", "samples_digest")


def _differing(old: dict[str, Any], config: dict[str, Any], extra: tuple[str, ...] = ()) -> list[str]:
    """The settings (`RESUME_KEYS` + ``extra``) in which a saved run's config differs from this cell's."""
    return [k for k in (*RESUME_KEYS, *extra) if old.get(k) != config.get(k)]


def _with_split_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A run config with ``seeds`` / ``eval_split`` (files written before the protocol have neither)."""
    out = dict(config)
    out.setdefault("seeds", list(run_seeds({"config": config})))
    out.setdefault("eval_split", record_split({"config": config}))
    return out


@contextlib.contextmanager
def checkpoint_with_settings(checkpoint: str, settings: dict[str, Any]):
    """A temporary copy of a checkpoint whose method config has ``settings`` (run-time settings such as Locret's
    ``pool_kernel`` / ``stabilizers``); the weights are the same file (linked, else copied)."""
    directory = resolve_checkpoint(checkpoint)
    config = read_config(directory)
    config["method"] = make_config(config["method"], **settings).to_dict()
    with tempfile.TemporaryDirectory(prefix="trainkv-ckpt-") as tmp:
        tmp = Path(tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        try:
            os.symlink(Path(directory, WEIGHTS_NAME).resolve(), tmp / WEIGHTS_NAME)
        except OSError:
            shutil.copyfile(Path(directory, WEIGHTS_NAME), tmp / WEIGHTS_NAME)
        yield str(tmp)


class Sweep:
    """Runs a :class:`SweepConfig`: loads the model once, writes one JSON per run, then the report."""

    def __init__(self, config: SweepConfig, model=None, tokenizer=None):
        self.config = config
        self.out = Path(config.output)
        self._model = model
        self._tokenizer = tokenizer
        self._samples: dict[int, list[Sample]] = {}
        self._method_configs: dict[MethodSpec, Any] = {}

    # --- resources ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.model)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.config.model, dtype=DTYPES[self.config.dtype], device=self.config.device)
        if self._model.generation_config.pad_token_id is None:
            self._model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        return self._model

    def samples(self, context_length: int) -> list[Sample]:
        """``samples`` per task from each seed of the run, task by task (seeds in order within a task)."""
        if context_length not in self._samples:
            out: list[Sample] = []
            for task in self.config.tasks:
                for seed in self.config.seeds:
                    out.extend(generate_samples(task, self.tokenizer, self.config.samples, context_length,
                                                seed=seed, split=SPLIT))
            self._samples[context_length] = out
        return self._samples[context_length]

    # --- method attach / detach -------------------------------------------------------------------
    def attach(self, spec: MethodSpec):
        model = self.model
        base = {"budget": NO_EVICTION_BUDGET, "chunk_size": self.config.chunk_size or NO_EVICTION_BUDGET}
        if spec.checkpoint is not None:
            if spec.overrides:  # run-time settings other than the checkpoint's: same weights, other config
                with checkpoint_with_settings(spec.checkpoint, dict(spec.overrides)) as path:
                    return load_gated(path, model=model, **base)
            return load_gated(spec.checkpoint, model=model, **base)
        method = "streaming_llm" if spec.is_full else spec.method
        return attach(model, method, EvictionConfig(**base), **dict(spec.overrides))

    def recent_window(self, spec: MethodSpec, entries: int) -> int | None:
        """The recent window of a run: ``--recent-window`` if given, else what the method asks for at this budget
        (`MethodConfig.protected_recent`, e.g. Locret's stabilizers, read from the checkpoint's config without
        loading its weights); None = the default rule (`protected_tokens`)."""
        if self.config.recent_window is not None:
            return self.config.recent_window
        if spec.is_full:
            return None
        if spec not in self._method_configs:
            if spec.checkpoint is not None:
                directory = resolve_checkpoint(spec.checkpoint)
                config = checkpoint_method_config(read_config(directory), spec.checkpoint)
                self._method_configs[spec] = make_config(config, **dict(spec.overrides)) if spec.overrides else config
            else:
                self._method_configs[spec] = make_config(spec.method, **dict(spec.overrides))
        return self._method_configs[spec].protected_recent(entries)

    def method_config(self, model) -> dict[str, Any]:
        state = model.trainkv_state
        return {"method": state.method.to_dict(), "base_eviction": state.eviction.to_dict()}

    # --- one run ---------------------------------------------------------------------------------
    def run_path(self, spec: MethodSpec, context_length: int, budget) -> Path:
        return self.out / "runs" / f"{sanitize(spec.label)}__L{context_length}__{budget_label(budget)}.json"

    def run_config(self, spec: MethodSpec, context_length: int, budget, samples: Sequence[Sample]) -> dict[str, Any]:
        c = self.config
        if spec.is_full:
            entries, eviction = None, None
            budget_info = {"spec": None, "label": FULL, "entries": None, "keep_ratio": 1.0}
        else:
            entries = keep_entries(budget, context_length)
            eviction = eviction_settings(entries, c.chunk_size, c.sink_tokens, self.recent_window(spec, entries))
            budget_info = {"spec": budget, "label": budget_label(budget), "entries": entries,
                           "keep_ratio": keep_ratio(budget, context_length)}
        return {
            "model": c.model,
            "method": spec.to_dict(),
            "budget": budget_info,
            "context_length": context_length,
            "tasks": list(c.tasks),
            "samples_per_task": c.samples,
            "seed": c.seed_field,
            "seeds": list(c.seeds),
            "split": SPLIT,
            "eval_split": c.eval_split,
            "eviction": eviction,
            "chunk_size": c.chunk_size,
            "chunking": "end-aligned" if c.chunk_size else "one-pass",
            "dtype": c.dtype,
            "max_new_tokens": c.max_new_tokens,
            "prompt": {"chat_template": c.chat, "separator": SEPARATOR, "split": "kvpress"},
            "samples_digest": samples_digest(samples),
            "batch_size": c.batch_size,
            "device": c.device,
        }

    def is_done(self, path: Path, config: dict[str, Any]) -> bool:
        if self.config.overwrite or not path.exists():
            return False
        try:
            old = _with_split_fields(json.loads(path.read_text())["config"])
        except (ValueError, KeyError):
            return False  # unreadable: redo
        differ = _differing(old, config)
        if differ:
            raise RuntimeError(
                f"{path} exists but was run with other settings ({', '.join(differ)}); use another --output "
                "directory or --overwrite"
            )
        return True

    def load_partial(self, partial: Path | None, config: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """The samples a killed run of the same cell finished (its ``.partial`` file), if run with these settings."""
        if partial is None or self.config.overwrite or not partial.exists():
            return {}
        try:
            saved = json.loads(partial.read_text())
            old, results = _with_split_fields(saved["config"]), {int(i): r for i, r in saved["results"].items()}
        except (ValueError, KeyError, AttributeError):
            return {}  # unreadable: start the cell again
        if _differing(old, config, extra=("samples_digest",)):
            return {}  # another cell's settings: its samples are not this one's
        return results

    def run_one(self, spec: MethodSpec, model, context_length: int, budget, progress=None,
                partial: Path | None = None) -> dict[str, Any]:
        """One cell's run record; with ``partial`` (a path), the samples finished so far are saved there after every
        batch and a killed run of the same cell resumes from them."""
        samples = self.samples(context_length)
        config = self.run_config(spec, context_length, budget, samples)
        config["method_config"] = self.method_config(model)
        eviction = config["eviction"]
        done = self.load_partial(partial, config)
        save = None if partial is None else (lambda finished: write_json(partial, {"config": config, "results": finished}))
        cuda = torch.device(self.config.device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        results = evaluate_samples(
            model, self.tokenizer, samples, eviction=eviction, chunk_size=self.config.chunk_size,
            batch_size=self.config.batch_size, max_new_tokens=self.config.max_new_tokens, chat=self.config.chat,
            progress=progress, done=done, on_batch=save,
        )
        seconds = time.perf_counter() - t0
        record = make_run_record(config, results, self.tokenizer, self.config.device, seconds, resumed=len(done))
        if cuda:
            record["timing"]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return record

    # --- everything ------------------------------------------------------------------------------
    def plan(self) -> list[tuple[MethodSpec, int, Any]]:
        """``(method, context length, budget)`` of every task run (``full`` once per length)."""
        out = []
        for spec in self.config.method_specs():
            for length in self.config.context_lengths:
                for budget in ([None] if spec.is_full else self.config.keep):
                    out.append((spec, length, budget))
        return out

    def run(self) -> dict[str, Any]:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        if c.tasks_enabled:
            todo = []
            for spec, length, budget in self.plan():
                path = self.run_path(spec, length, budget)
                config = self.run_config(spec, length, budget, self.samples(length))
                if self.is_done(path, config):
                    written.append(path)
                    continue
                todo.append((spec, length, budget, path))
            total = sum(len(self.samples(length)) for _, length, _, _ in todo)
            bar = tqdm(total=total, desc="eval", unit="sample", disable=not c.progress or not total, dynamic_ncols=True)
            by_method: dict[MethodSpec, list] = {}
            for item in todo:
                by_method.setdefault(item[0], []).append(item)
            for spec, items in by_method.items():
                model = self.attach(spec)
                try:
                    for _, length, budget, path in items:
                        bar.set_postfix_str(f"{spec.label} L={length} {budget_label(budget)}")
                        partial = path.with_name(path.name + ".partial")
                        record = self.run_one(spec, model, length, budget, progress=bar, partial=partial)
                        write_json(path, record)
                        partial.unlink(missing_ok=True)
                        written.append(path)
                        bar.write(f"{spec.label:>24} L={length:<6} {budget_label(budget):>8}: score "
                                  f"{record['aggregate']['score']:6.2f}  compression "
                                  f"{record['aggregate']['compression_mean']:.3f}  "
                                  f"{record['timing']['seconds_per_sample']:.2f} s/sample")
                finally:
                    self._detach(model)
            bar.close()
        if c.kl:
            run_quality(self)
        return report.write_report(self.out, selector=self.selector(), intervals=self.config.intervals)

    def selector(self) -> dict[str, Any]:
        """Which run files of the output directory the report pools (this sweep's model/tasks/seed)."""
        c = self.config
        return {"model": c.model, "tasks": list(c.tasks), "samples_per_task": c.samples, "seed": c.seed_field,
                "dtype": c.dtype}

    @staticmethod
    def _detach(model) -> None:
        if hasattr(model, "trainkv_state"):
            detach(model)


def make_run_record(config: dict[str, Any], results: list[dict[str, Any]], tokenizer, device, seconds: float,
                    resumed: int = 0) -> dict:
    """The JSON of one run: config, per-sample results, aggregates, provenance. ``resumed``: how many of the results
    an earlier, killed process of the same cell computed (``seconds`` is this process's time for the others)."""
    return {
        "schema": SCHEMA,
        "kind": "tasks",
        "config": config,
        "seed": config["seed"],
        "split": config["split"],
        "eval_split": config["eval_split"],
        "tokenizer": tokenizer_name(tokenizer),
        "versions": package_versions(),
        "device": device_name(device),
        "date": now(),
        "aggregate": aggregate(results),
        "timing": {"seconds": round(seconds, 3),
                   "seconds_per_sample": round(seconds / max(1, len(results) - resumed), 4),
                   "samples": len(results), "resumed_samples": resumed},
        "results": results,
    }




__all__ = [
    "DEFAULT_SEED", "FULL", "Sweep", "SweepConfig", "checkpoint_with_settings", "chunk_bounds", "compression_of",
    "evaluate_samples", "make_run_record", "run_batch",
]
