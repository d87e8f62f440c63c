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

Train/eval separation: samples come from ``split="eval"`` only, default seed :data:`DEFAULT_SEED`
(the split is mixed into every sample's RNG, and training recipes use ``split="train"``, whose
templates, vocabularies and haystack text are disjoint from these).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from trainkv.data.sample import Sample
from trainkv.eval.metrics import METRICS
from trainkv.eval.prompts import SEPARATOR, Prompt, build_prompt

#: Default seed of the evaluation samples. Training draws from ``split="train"`` (other seeds,
#: templates and haystacks); never pass ``split="train"`` data to an evaluation.
DEFAULT_SEED = 1234
SPLIT = "eval"
FULL = "full"
SCHEMA = "trainkv.eval.run/1"
DEFAULT_SINK_TOKENS = 4
MAX_RECENT_WINDOW = 32
NO_EVICTION_BUDGET = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------
# budgets and protected tokens
# ---------------------------------------------------------------------------------------------------------
def parse_budget(text: str | int | float) -> int | float:
    """``"0.125"`` -> keep ratio 0.125; ``"64"`` -> 64 entries. Ratios must lie in (0, 1]."""
    if isinstance(text, bool):
        raise TypeError("a budget is a keep ratio or a number of entries")
    if isinstance(text, (int, float)):
        value = text
    else:
        s = text.strip()
        if "/" in s:  # "1/8"
            num, den = s.split("/", 1)
            value = float(num) / float(den)
        elif re.fullmatch(r"\d+", s):
            value = int(s)
        else:
            value = float(s)
    if isinstance(value, float):
        if value.is_integer() and value > 1:
            return int(value)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a keep ratio must lie in (0, 1], got {value}")
        return value
    if value < 1:
        raise ValueError(f"an absolute budget must be >= 1 entry, got {value}")
    return int(value)


def resolve_budget(budget: int | float, context_length: int) -> int:
    """Entries per (layer, KV head): ``round(ratio * context_length)`` for a ratio, the int otherwise."""
    if isinstance(budget, float):
        return max(1, int(round(budget * context_length)))
    return int(budget)


def keep_ratio(budget: int | float, context_length: int) -> float:
    """The keep ratio a budget stands for at ``context_length`` (x axis of the plots)."""
    return float(budget) if isinstance(budget, float) else budget / context_length


def budget_label(budget: int | float | None) -> str:
    """Stable text for file names and table columns: ``r0.125`` (ratio), ``n64`` (entries), ``full``."""
    if budget is None:
        return FULL
    if isinstance(budget, float):
        return f"r{budget:g}"
    return f"n{int(budget)}"


def protected_tokens(budget: int, sink_tokens: int | None = None, recent_window: int | None = None) -> tuple[int, int]:
    """``(sink_tokens, recent_window)`` for a budget: 4 sinks and ``min(32, budget // 4)`` recent tokens.

    Explicit values win. Sinks shrink (and the window to 0) when the budget cannot hold them.
    """
    sink = DEFAULT_SINK_TOKENS if sink_tokens is None else int(sink_tokens)
    recent = min(MAX_RECENT_WINDOW, budget // 4) if recent_window is None else int(recent_window)
    sink = min(sink, budget)
    recent = max(0, min(recent, budget - sink))
    return sink, recent


def eviction_settings(
    budget: int, chunk_size: int | None, sink_tokens: int | None = None, recent_window: int | None = None,
) -> dict[str, Any]:
    """The ``EvictionConfig`` fields a run uses (passed as overrides to ``model.new_cache``)."""
    sink, recent = protected_tokens(budget, sink_tokens, recent_window)
    return {
        "budget": int(budget), "sink_tokens": sink, "recent_window": recent,
        "chunk_size": int(chunk_size) if chunk_size else NO_EVICTION_BUDGET,
    }


# ---------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One row of the sweep: ``full``, a training-free method (with optional settings) or a checkpoint.

    ``label`` is what tables and file names show: ``snapkv``, ``snapkv:window_size=64`` or the
    ``NAME`` of ``--checkpoint NAME=PATH``.
    """

    label: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = ()
    checkpoint: str | None = None

    @property
    def is_full(self) -> bool:
        return self.method == FULL

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "method": self.method, "overrides": dict(self.overrides), "checkpoint": self.checkpoint}
        if self.checkpoint is not None:
            # the weights, not the path, identify a trained method: a run made with other weights at the same
            # path must not count as done (resume) or be reported under these
            out["weights_sha256"] = checkpoint_digest(self.checkpoint)
        return out


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    from trainkv.hub.format import file_sha256

    return file_sha256(Path(path))[:16]


def checkpoint_digest(checkpoint: str) -> str | None:
    """First 16 hex digits of the sha256 of a local checkpoint's ``model.safetensors`` (None for Hub ids / aliases)."""
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        return None
    st = weights.stat()
    return _file_digest(str(weights), st.st_size, st.st_mtime_ns, st.st_ino)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_method(text: str, checkpoints: dict[str, str] | None = None) -> MethodSpec:
    """``full`` | ``snapkv`` | ``snapkv:window_size=64,kernel_size=7`` | a ``--checkpoint`` name."""
    checkpoints = checkpoints or {}
    if text in checkpoints:
        return MethodSpec(text, text, (), checkpoints[text])
    name, _, rest = text.partition(":")
    if name == FULL:
        return MethodSpec(FULL, FULL)
    from trainkv.methods import get_method

    cls = get_method(name)  # raises on unknown names
    if cls.trainable:
        raise ValueError(f"{name} is trainable: give its weights with --checkpoint {name}=PATH")
    overrides = []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method settings are KEY=VALUE, got {item!r} in {text!r}")
        overrides.append((key.strip(), _parse_value(value.strip())))
    return MethodSpec(text, name, tuple(overrides))


def sanitize(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", label).strip("-") or "method"


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
) -> list[dict[str, Any]]:
    """Per-sample results of one run (in the order of ``samples``).

    Samples are sorted by context length into batches of ``batch_size`` (less padding); ``progress``
    (a tqdm bar) is advanced per sample.
    """
    prompts = [build_prompt(s, tokenizer, chat=chat, max_new_tokens=max_new_tokens) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (prompts[i].context_tokens, i))
    results: list[dict[str, Any] | None] = [None] * len(samples)
    for k in range(0, len(order), max(1, batch_size)):
        idx = order[k:k + max(1, batch_size)]
        t0 = time.perf_counter()
        outs = run_batch(model, tokenizer, [prompts[i] for i in idx], eviction, chunk_size)
        _sync(model)
        per_sample = (time.perf_counter() - t0) / len(idx)
        for i, o in zip(idx, outs):
            s, p = samples[i], prompts[i]
            results[i] = {
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
        if progress is not None:
            progress.update(len(idx))
    return results  # type: ignore[return-value]


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
    budgets: list[int | float] = field(default_factory=lambda: [0.5, 0.25, 0.125, 0.0625])
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    context_lengths: list[int] = field(default_factory=lambda: [512])
    samples: int = 5
    seed: int = DEFAULT_SEED
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

    def __post_init__(self):
        self.budgets = [parse_budget(b) for b in self.budgets]
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expand_tasks(tasks: Iterable[str]) -> list[str]:
    """Task names; ``ruler`` stands for RULER's 11 offline tasks, ``all`` for every registered task."""
    from trainkv.data.tasks import RULER_TASKS, TASKS

    out: list[str] = []
    for t in tasks:
        if t == "ruler":
            out.extend(RULER_TASKS)
        elif t == "all":
            out.extend(TASKS)
        elif t in TASKS:
            out.append(t)
        else:
            raise ValueError(f"unknown task {t!r}; known: ruler, all, {', '.join(sorted(TASKS))}")
    return list(dict.fromkeys(out))


def package_versions() -> dict[str, str]:
    import transformers

    import trainkv

    return {
        "trainkv": trainkv.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def samples_digest(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.to_kvpress_row(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_json(path: Path, payload: dict) -> None:
    """Atomic write (a killed sweep never leaves half a file that resuming would trust)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


#: Config keys that must agree for an existing run file to count as done (batch size and device do
#: not change results: batched == unbatched).
RESUME_KEYS = ("model", "method", "budget", "context_length", "tasks", "samples_per_task", "seed", "split",
               "eviction", "chunk_size", "chunking", "dtype", "max_new_tokens", "prompt", "samples_digest")


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
            from trainkv.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.model)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            from trainkv.models import load_model

            self._model = load_model(self.config.model, dtype=DTYPES[self.config.dtype], device=self.config.device)
        if self._model.generation_config.pad_token_id is None:
            self._model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        return self._model

    def samples(self, context_length: int) -> list[Sample]:
        from trainkv.data.tasks import generate_samples

        if context_length not in self._samples:
            out: list[Sample] = []
            for task in self.config.tasks:
                out.extend(generate_samples(task, self.tokenizer, self.config.samples, context_length,
                                            seed=self.config.seed, split=SPLIT))
            self._samples[context_length] = out
        return self._samples[context_length]

    # --- method attach / detach -------------------------------------------------------------------
    def attach(self, spec: MethodSpec):
        import trainkv

        model = self.model
        base = {"budget": NO_EVICTION_BUDGET, "chunk_size": self.config.chunk_size or NO_EVICTION_BUDGET}
        if spec.checkpoint is not None:
            from trainkv.hub import load_gated  # lazy: the hub module is optional for training-free sweeps

            return load_gated(spec.checkpoint, model=model, **base)
        method = "streaming_llm" if spec.is_full else spec.method
        return trainkv.attach(model, method, trainkv.EvictionConfig(**base), **dict(spec.overrides))

    def recent_window(self, spec: MethodSpec, entries: int) -> int | None:
        """The recent window of a run: ``--recent-window`` if given, else what the method asks for at this budget
        (`MethodConfig.protected_recent`, e.g. Locret's stabilizers, read from the checkpoint's config without
        loading its weights); None = the default rule (`protected_tokens`)."""
        if self.config.recent_window is not None:
            return self.config.recent_window
        if spec.is_full:
            return None
        if spec not in self._method_configs:
            from trainkv.methods import make_config

            if spec.checkpoint is not None:
                from trainkv.hub.format import read_config
                from trainkv.hub.load import checkpoint_method_config, resolve_checkpoint

                directory = resolve_checkpoint(spec.checkpoint)
                self._method_configs[spec] = checkpoint_method_config(read_config(directory), spec.checkpoint)
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
            entries = resolve_budget(budget, context_length)
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
            "seed": c.seed,
            "split": SPLIT,
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
            old = json.loads(path.read_text())["config"]
        except (ValueError, KeyError):
            return False  # unreadable: redo
        differ = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
        if differ:
            raise RuntimeError(
                f"{path} exists but was run with other settings ({', '.join(differ)}); use another --output "
                "directory or --overwrite"
            )
        return True

    def run_one(self, spec: MethodSpec, model, context_length: int, budget, progress=None) -> dict[str, Any]:
        samples = self.samples(context_length)
        config = self.run_config(spec, context_length, budget, samples)
        config["method_config"] = self.method_config(model)
        eviction = config["eviction"]
        cuda = torch.device(self.config.device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        results = evaluate_samples(
            model, self.tokenizer, samples, eviction=eviction, chunk_size=self.config.chunk_size,
            batch_size=self.config.batch_size, max_new_tokens=self.config.max_new_tokens, chat=self.config.chat,
            progress=progress,
        )
        seconds = time.perf_counter() - t0
        record = make_run_record(config, results, self.tokenizer, self.config.device, seconds)
        if cuda:
            record["timing"]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return record

    # --- everything ------------------------------------------------------------------------------
    def plan(self) -> list[tuple[MethodSpec, int, Any]]:
        """``(method, context length, budget)`` of every task run (``full`` once per length)."""
        out = []
        for spec in self.config.method_specs():
            for length in self.config.context_lengths:
                for budget in ([None] if spec.is_full else self.config.budgets):
                    out.append((spec, length, budget))
        return out

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from trainkv.eval import report

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
                        record = self.run_one(spec, model, length, budget, progress=bar)
                        write_json(path, record)
                        written.append(path)
                        bar.write(f"{spec.label:>24} L={length:<6} {budget_label(budget):>8}: score "
                                  f"{record['aggregate']['score']:6.2f}  compression "
                                  f"{record['aggregate']['compression_mean']:.3f}  "
                                  f"{record['timing']['seconds_per_sample']:.2f} s/sample")
                finally:
                    self._detach(model)
            bar.close()
        if c.kl:
            from trainkv.eval.quality import run_quality

            run_quality(self)
        return report.write_report(self.out, selector=self.selector())

    def selector(self) -> dict[str, Any]:
        """Which run files of the output directory the report pools (this sweep's model/tasks/seed)."""
        c = self.config
        return {"model": c.model, "tasks": list(c.tasks), "samples_per_task": c.samples, "seed": c.seed,
                "dtype": c.dtype}

    @staticmethod
    def _detach(model) -> None:
        import trainkv

        if hasattr(model, "trainkv_state"):
            trainkv.detach(model)


def make_run_record(config: dict[str, Any], results: list[dict[str, Any]], tokenizer, device, seconds: float) -> dict:
    """The JSON of one run: config, per-sample results, aggregates, provenance."""
    from trainkv.data.tasks._base import tokenizer_name

    return {
        "schema": SCHEMA,
        "kind": "tasks",
        "config": config,
        "seed": config["seed"],
        "split": config["split"],
        "tokenizer": tokenizer_name(tokenizer),
        "versions": package_versions(),
        "device": device_name(device),
        "date": now(),
        "aggregate": aggregate(results),
        "timing": {"seconds": round(seconds, 3), "seconds_per_sample": round(seconds / max(1, len(results)), 4),
                   "samples": len(results)},
        "results": results,
    }


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score over all samples (0-100), per task, and the mean measured compression."""
    if not results:
        return {"score": math.nan, "n": 0, "per_task": {}, "compression_mean": math.nan}
    per_task: dict[str, list[float]] = {}
    for r in results:
        per_task.setdefault(r["task"], []).append(r["score"])
    return {
        "score": sum(r["score"] for r in results) / len(results),
        "n": len(results),
        "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
        "compression_mean": sum(r["compression"] for r in results) / len(results),
        "context_tokens_mean": sum(r["context_tokens"] for r in results) / len(results),
    }


__all__ = [
    "DEFAULT_SEED", "FULL", "MethodSpec", "Sweep", "SweepConfig", "aggregate", "budget_label", "chunk_bounds",
    "compression_of", "evaluate_samples", "eviction_settings", "expand_tasks", "keep_ratio", "parse_budget",
    "parse_method", "protected_tokens", "resolve_budget", "run_batch",
]
