"""Learned layer (and head) budgets: how much of one total KV budget each layer / KV head gets.

Rule-based allocators (uniform, PyramidKV, Ada-KV, XKV: `trainkv.allocation`) split the budget by a
fixed rule; this method *learns* the split on top of a trained scorer. It wraps a frozen Attention-Gate
or Locret (retaining head) scorer, loaded from ``base_checkpoint`` (or trained jointly, ``train_base``),
and adds per layer (``per_head``: per KV head) a trainable offset ``b`` to the scorer's keep-logits:

* Attention-Gate base: ``z = gate_logit + b``;
* Locret base: ``z = exp(a) * (s - mu) / sd + b`` (``mu``/``sd``: the scores' mean / std per head,
  measured on the first training batch and then fixed; ``a``, ``b`` trainable, per layer or head).

Objective: Attention-Gate's soft-eviction objective with only ``a, b`` trainable: self-distillation KL
to the same frozen model without eviction, where every evictable key's attention logit gets
``log sigmoid(z)`` (same chunk / sink / window semantics as the runtime, `gated_chunk_attention`), plus
``ratio_weight * relu(keep - target_keep)``, ``keep`` = mean soft keep probability over all layers,
heads and evictable tokens. The hinge is *global*: the model decides which layers and heads keep more.

From logits to budgets. During the last ``1 - measure_from`` of training, the soft keep fraction of each
(layer, head) on the training batches is averaged (in memory, not in resumable checkpoints: a run resumed
inside that stretch measures only the steps after the resume; `measure_allocation` re-measures on
demand); these are saved as the checkpoint's ``EvictionConfig.allocation_weights`` (per-layer mode:
each layer's mean, the same for its heads). At
run time a budget of ``B`` entries per head on average becomes integer budgets proportional to them,
at least the protected tokens each, summing exactly to ``B x layers x KV heads``
(`trainkv.allocation.weighted`), for whatever ``B`` the runtime or ``trainkv eval`` uses. (Deviation
from "save integer ``head_budgets``": those would pin one total and override every evaluated budget;
the integer budgets at the trained ratio are written to ``allocation.json`` next to the checkpoint by
`write_allocation_artifacts`, with the heat map ``allocation.png``.)

Run-time scoring is the base scorer's, passed through the same per-(layer, head) monotone map ``z``
(so in budget mode each head keeps exactly the base scorer's top entries; in threshold or Ada-KV
mode the calibrated ``z`` is compared, as trained). The checkpoint holds the base's weights too, so
it loads on its own with `trainkv.load_gated`.

Memory note: the cache pads the heads of a layer to the largest, so per-head budgets save kept
entries but a layer's bytes follow its largest head; ``per_head: false`` (the default) allocates per
layer, and then bytes follow the allocation exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_gate import distillation_loss, gated_chunk_attention, target_keep
from .base import EvictionMethod, MethodConfig, ScoreContext

logger = logging.getLogger(__name__)

BASES = ("attention_gate", "retaining_head")


@dataclass
class LayerBudgetConfig(MethodConfig):
    """Settings of the learned allocation.

    base: the scorer's method config (``{method: attention_gate | retaining_head, ...}``); with
        ``base_checkpoint`` its settings come from that checkpoint, keys given here override them;
        null: the checkpoint's (without one: ``attention_gate``).
    base_checkpoint: trained scorer checkpoint (path, ``alias/name`` or Hub id) whose weights are loaded
        into the base at attach time. Null: the base starts untrained (use ``train_base: true``), or its
        weights come from a ``layer_budget`` checkpoint being loaded.
    per_head: one offset per KV head (else one per layer, shared by its heads).
    train_base: also train the base scorer (joint training); default frozen.
    init_offset: initial offset (Locret base: initial ``b``; 0 = the base's own calibration).
    target_keep: the mean soft keep probability of the evictable tokens the hinge allows (global over layers
        and heads); train at the operating point, ``(budget - protected) / (context - protected)``, e.g. 0.09
        for keep 1/8 and 0.045 for keep 1/16 at 1024 tokens (4 sinks, windows 32 / 16).
    ramp / ratio_weight / loss: as Attention-Gate's (``ramp``: from 1.0 down to ``target_keep`` over that
        fraction of training, 0 = none, the base is trained already).
    train_chunk_size / train_sink_tokens / train_recent_window: the soft mask's chunk / sinks / window
        (null: those of the `EvictionConfig` the method is attached with, so training mirrors the runtime).
    measure_from: the keep fractions that become the allocation are averaged over the steps with
        ``progress >= measure_from``.
    report_context: context length (tokens) at which `write_allocation_artifacts` reports integer budgets.
    """

    name = "layer_budget"
    base: dict | None = None
    base_checkpoint: str | None = None
    per_head: bool = False
    train_base: bool = False
    init_offset: float = 0.0
    target_keep: float = 0.09
    ramp: float = 0.0
    ratio_weight: float = 5.0
    loss: str = "kl"
    train_chunk_size: int | None = None
    train_sink_tokens: int | None = None
    train_recent_window: int | None = None
    measure_from: float = 0.75
    report_context: int = 1024

    def __post_init__(self):
        if isinstance(self.base, str):
            self.base = {"method": self.base}
        explicit = self.base is not None
        if self.base is None:
            self.base = {"method": "attention_gate"}
        if not isinstance(self.base, dict) or "method" not in self.base:
            raise ValueError(f"layer_budget: base must be a method config with a `method` key, got {self.base!r}")
        if self.base_checkpoint:
            found = _read_base_config(self.base_checkpoint)
            if found is not None:
                saved = dict(found["method"])
                asked = self.base.get("method")
                if explicit and asked != saved["method"]:
                    raise ValueError(f"layer_budget: base says method {asked!r}, but {self.base_checkpoint} holds "
                                     f"{saved['method']!r}")
                if found.get("lora"):
                    raise ValueError(f"layer_budget: {self.base_checkpoint} carries LoRA weights; a layer_budget base "
                                     "must leave the backbone unchanged")
                self.base = {**saved, **{k: v for k, v in self.base.items() if k != "method"}}
        if self.base["method"] not in BASES:
            raise ValueError(f"layer_budget: base method must be one of {BASES}, got {self.base['method']!r}")
        if not 0.0 < self.target_keep <= 1.0:
            raise ValueError(f"layer_budget: target_keep must lie in (0, 1], got {self.target_keep}")
        if not 0.0 <= self.measure_from < 1.0:
            raise ValueError(f"layer_budget: measure_from must lie in [0, 1), got {self.measure_from}")
        if self.loss not in ("kl", "lm", "kl+lm"):
            raise ValueError(f"layer_budget: loss must be kl, lm or kl+lm, got {self.loss!r}")

    def mask_settings(self, eviction=None) -> tuple[int, int, int]:
        """(chunk size, sink tokens, recent window) of the soft mask: these settings', else the runtime's
        (``eviction``, the `EvictionConfig` attached with), else the Attention-Gate base's, else 512 / 4 / 32."""
        ag = self.base if self.base["method"] == "attention_gate" else {}
        out = []
        for own, runtime, default in (("train_chunk_size", "chunk_size", 512), ("train_sink_tokens", "sink_tokens", 4),
                                      ("train_recent_window", "recent_window", 32)):
            value = getattr(self, own)
            if value is None and eviction is not None:
                value = getattr(eviction, runtime)
            if value is None:
                value = ag.get(own)
            out.append(int(default if value is None else value))
        return out[0], out[1], out[2]


# --- base checkpoint files ------------------------------------------------------------------------------
_BASE_CACHE: dict[str, object] = {}


def _resolve(path: str):
    from ..hub.format import CheckpointNotFoundError
    from ..hub.load import resolve_checkpoint

    try:
        return resolve_checkpoint(path, local_files_only=True)
    except (CheckpointNotFoundError, FileNotFoundError, OSError):
        return None


def _read_base_config(path: str) -> dict | None:
    """The base checkpoint's config.json (JSON only), or None when it cannot be found here."""
    from ..hub.format import read_config

    directory = _resolve(path)
    if directory is None:
        logger.debug("layer_budget: base checkpoint %s not found here", path)
        return None
    return read_config(directory)


def _base_checkpoint(path: str):
    if path not in _BASE_CACHE:
        from ..hub.checkpoint import GateCheckpoint

        directory = _resolve(path)
        _BASE_CACHE[path] = None if directory is None else GateCheckpoint.load(directory)
    return _BASE_CACHE[path]


# --- the module -------------------------------------------------------------------------------------------
class LayerBudget(EvictionMethod):
    """A frozen base scorer plus this layer's trainable offset (and, for Locret, scale)."""

    config_class = LayerBudgetConfig
    trainable = True

    def __init__(self, config: LayerBudgetConfig, model_config, layer_idx: int):
        super().__init__(config, model_config, layer_idx)
        from . import get_method, make_config

        base_cls = get_method(config.base["method"])
        self.base = base_cls(make_config(config.base), model_config, layer_idx)
        n = self.num_kv_heads if config.per_head else 1
        self.offset = nn.Parameter(torch.full((n,), float(config.init_offset)))
        self.locret = config.base["method"] == "retaining_head"
        if self.locret:
            self.log_scale = nn.Parameter(torch.zeros(n))
            self.register_buffer("score_mean", torch.zeros(self.num_kv_heads))
            self.register_buffer("score_std", torch.ones(self.num_kv_heads))
            self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.base_ready = config.train_base
        if config.base_checkpoint:
            self._load_base(config.base_checkpoint, layer_idx, model_config)
        if not config.train_base:
            self.base.requires_grad_(False)
        self.soft_eviction = False
        self.last_logits: torch.Tensor | None = None
        self.keep_sum: torch.Tensor | None = None  # float64 [H]: keep fractions summed over the measured steps
        self.keep_steps = 0
        self.keep_last: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # [B, T] real tokens of the batch in flight (training_loss sets it)

    def _load_base(self, path: str, layer_idx: int, model_config) -> None:
        ckpt = _base_checkpoint(path)
        if ckpt is None:  # not here: the weights must come from the checkpoint being loaded (checked before use)
            return
        prefix = f"layers.{layer_idx}."
        tensors = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
        try:
            self.base.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise ValueError(f"layer_budget: {path} does not fit this model's layer {layer_idx}: {e}") from None
        self.base_ready = True
        text = model_config.get_text_config(decoder=True)
        if layer_idx == text.num_hidden_layers - 1:
            _BASE_CACHE.pop(path, None)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if any(k.startswith("base.") for k in state_dict):
            self.base_ready = True
        return out

    def requires_grad_(self, requires_grad: bool = True):
        """The trainer turns the whole method trainable; the base stays frozen unless ``train_base``."""
        super().requires_grad_(requires_grad)
        if not self.config.train_base:
            self.base.requires_grad_(False)
        return self

    def _check_ready(self) -> None:
        if not self.base_ready:
            raise RuntimeError(
                f"layer_budget: the base scorer has no weights (base_checkpoint={self.config.base_checkpoint!r} "
                "was not found here). Give a trained attention_gate / retaining_head checkpoint as "
                "method.base_checkpoint, set method.train_base=true, or load a layer_budget checkpoint"
            )

    # --- scores -------------------------------------------------------------------------------------
    def base_scores(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The base scorer's raw scores ``[B, Hkv, T]`` for a whole sequence."""
        if self.locret:
            return self.base.scores(self.base.head_inputs(module, hidden))
        return self.base.gate_logits(hidden)

    def calibrate(self, raw: torch.Tensor) -> torch.Tensor:
        """Keep-logits ``z`` ``[B, Hkv, T]`` from base scores (module doc)."""
        raw = raw.float()
        if self.locret:
            mean = self.score_mean.float()[:, None]
            std = self.score_std.float().clamp(min=1e-6)[:, None]
            scale = self.log_scale.float().exp()[:, None]
            return (raw - mean) / std * scale + self.offset.float()[:, None]
        return raw + self.offset.float()[:, None]

    def new_token_scores(self, ctx: ScoreContext) -> torch.Tensor:
        self._check_ready()
        return self.calibrate(self.base.new_token_scores(ctx))

    def offsets(self) -> dict[str, list[float]]:
        out = {"offset": self.offset.detach().float().cpu().tolist()}
        if self.locret:
            out["scale"] = self.log_scale.detach().float().exp().cpu().tolist()
        return out

    # --- training ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _calibrate_from(self, raw: torch.Tensor, valid: torch.Tensor) -> None:
        """Locret: fix each head's score mean / std from the first training batch (averaged over processes)."""
        x = raw.float()
        m = valid[:, None, :].expand_as(x).float()
        count = m.sum(dim=(0, 2)).clamp(min=1)
        mean = (x * m).sum(dim=(0, 2)) / count
        sq = ((x - mean[None, :, None]) ** 2 * m).sum(dim=(0, 2)) / count
        stats = torch.stack([mean, sq])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
            stats /= torch.distributed.get_world_size()
        self.score_mean.copy_(stats[0])
        self.score_std.copy_(stats[1].clamp(min=1e-12).sqrt())
        self.calibrated.fill_(True)

    def attention_without_cache(self, module, query, key, value, attention_mask, scaling, hidden_states=None, **kwargs):
        """Training attention: soft log-gates ``log sigmoid(z)`` on evictable keys (Attention-Gate's mask)."""
        if not self.soft_eviction:
            return None
        if hidden_states is None:
            raise RuntimeError("layer_budget: hidden states were not captured; is the method attached?")
        self._check_ready()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_base):
            raw = self.base_scores(module, hidden_states)
        if self.locret and not bool(self.calibrated):
            self._calibrate_from(raw, self._valid if self._valid is not None else
                                 torch.ones(raw.shape[0], raw.shape[2], dtype=torch.bool, device=raw.device))
        logits = self.calibrate(raw)
        self.last_logits = logits
        chunk, sinks, window = self.config.mask_settings(self.eviction)
        out = gated_chunk_attention(query, key, value, F.logsigmoid(logits), scaling, chunk=chunk, sinks=sinks,
                                    window=window, attention_mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None

    @classmethod
    def training_loss(cls, model, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        from ..attach import method_modules

        mods = method_modules(model)
        cfg: LayerBudgetConfig = mods[0].config
        _, sinks, window = cfg.mask_settings(mods[0].eviction)
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"], dtype=torch.bool)
        evictable = evictable_mask(real, sinks, window)
        for m in mods:
            m._valid = real
        try:
            loss, logs = distillation_loss(model, mods, batch, cfg.loss)
        finally:
            for m in mods:
                m._valid = None
        per_head = torch.stack([masked_keep(m.last_logits, evictable) for m in mods])  # [L, H], differentiable
        keep = per_head.mean()
        target = target_keep(cfg, progress)
        ratio = F.relu(keep - target)
        loss = loss + cfg.ratio_weight * ratio
        logs.update(keep=keep.item(), target_keep=target, ratio_loss=ratio.item(),
                    keep_layer_min=per_head.mean(-1).min().item(), keep_layer_max=per_head.mean(-1).max().item())
        record_keep(model, mods, per_head.detach(), progress)
        for m in mods:
            m.last_logits = None
        return loss, logs


def evictable_mask(real: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """``[B, T]``: real tokens that are neither among a row's first ``sinks`` nor its last ``window`` real tokens."""
    from_start = real.long().cumsum(-1)
    from_end = real.long().flip(-1).cumsum(-1).flip(-1)
    return real & (from_start > sinks) & (from_end > window)


def masked_keep(logits: torch.Tensor, evictable: torch.Tensor) -> torch.Tensor:
    """Mean soft keep probability per KV head over the evictable tokens: ``[H]`` from logits ``[B, H, T]``."""
    p = torch.sigmoid(logits.float())
    m = evictable[:, None, :].to(p.dtype)
    count = m.sum(dim=(0, 2)).clamp(min=1)
    if float(m.sum()) == 0:
        return p.new_ones(p.shape[1])
    return (p * m).sum(dim=(0, 2)) / count


@torch.no_grad()
def record_keep(model, mods: list[LayerBudget], per_head: torch.Tensor, progress: float) -> None:
    """Accumulate the measured keep fractions and write the allocation weights into the attached eviction config."""
    stats = per_head.float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
        stats /= torch.distributed.get_world_size()
    stats = stats.double().cpu()
    cfg: LayerBudgetConfig = mods[0].config
    for m, row in zip(mods, stats):
        m.keep_last = row
        if progress >= cfg.measure_from:
            m.keep_sum = row.clone() if m.keep_sum is None else m.keep_sum + row
            m.keep_steps += 1
    state = getattr(model, "trainkv_state", None)
    if state is not None:
        state.eviction = state.eviction.replace(allocation_weights=allocation_weights(mods))


def allocation_weights(mods: list[LayerBudget]) -> list[list[float]]:
    """``[L][H]`` measured keep fractions (averaged over the measured steps, else the last step's); per-layer
    mode: each layer's mean for every head."""
    table = []
    for m in mods:
        if m.keep_steps:
            row = m.keep_sum / m.keep_steps
        elif m.keep_last is not None:
            row = m.keep_last
        else:
            row = torch.ones(m.num_kv_heads, dtype=torch.float64)
        if not m.config.per_head:
            row = row.mean().expand(m.num_kv_heads)
        table.append([max(float(x), 1e-6) for x in row])
    return table


@torch.no_grad()
def measure_allocation(model, batches) -> list[list[float]]:
    """Re-measure the keep fractions on ``batches`` (dicts with ``input_ids``, ``attention_mask``) with the current
    offsets (one soft-eviction forward each, no gradients), replace the accumulated statistics with them and write
    the allocation weights into the attached eviction config. Returns the weights ``[L][H]``.

    On a base fresh from its checkpoint (offsets 0) this is the allocation the trained scorer implies by itself
    (its gates were trained under a global keep ratio, so their keep fractions already differ across layers)."""
    from ..attach import method_modules

    mods = method_modules(model)
    for m in mods:
        m.keep_sum, m.keep_steps = None, 0
    cfg: LayerBudgetConfig = mods[0].config
    _, sinks, window = cfg.mask_settings(mods[0].eviction)
    device = next(model.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"], dtype=torch.bool)
        for m in mods:
            m.soft_eviction, m._valid = True, real
        try:
            model(**batch)
        finally:
            for m in mods:
                m.soft_eviction, m._valid = False, None
        evictable = evictable_mask(real, sinks, window)
        per_head = torch.stack([masked_keep(m.last_logits, evictable) for m in mods])
        for m in mods:
            m.last_logits = None
        record_keep(model, mods, per_head, progress=1.0)
    return allocation_weights(mods)


def _train_batches(tokenizer, num_samples: int, seq_len: int, context_tokens: list[int], seed: int,
                   batch_size: int):
    """SFT batches of the synthetic tasks' TRAIN split (as the recipe's ``data.source=builtin:tasks``)."""
    from ..training.config import DataConfig
    from ..training.data import build_dataset, collate

    cfg = DataConfig(source="builtin:tasks", format="sft", seq_len=seq_len, num_samples=num_samples,
                     context_tokens=context_tokens, seed=seed)
    cfg.validate()
    data = build_dataset(cfg, tokenizer, seed=seed)
    rows = [data[i] for i in range(len(data))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return [collate(rows[i:i + batch_size], pad) for i in range(0, len(rows), batch_size)]


def main(argv: list[str] | None = None) -> int:
    """``python -m trainkv.allocation measure``: a ``layer_budget`` checkpoint from a trained scorer without
    training (offsets 0: the scorer's own measured allocation), or re-measured from a trained one (``--from``)."""
    import argparse

    import trainkv

    p = argparse.ArgumentParser(prog="python -m trainkv.allocation", description=main.__doc__)
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
    tok = trainkv.load_tokenizer(args.model)
    if args.source:
        model = trainkv.load_gated(args.source, device=device)
    else:
        from ..hub.checkpoint import GateCheckpoint
        from ..hub.load import resolve_checkpoint

        base_eviction = GateCheckpoint.load(resolve_checkpoint(args.base)).config["eviction"]
        model = trainkv.load_model(args.model, device=device)
        trainkv.attach(model, {"method": "layer_budget", "base_checkpoint": args.base, "per_head": args.per_head,
                               "target_keep": args.target_keep, "report_context": args.report_context},
                       trainkv.EvictionConfig.from_dict(base_eviction))
    batches = _train_batches(tok, args.samples, args.seq_len, args.context_tokens, args.seed, args.batch_size)
    weights = measure_allocation(model, batches)
    if args.power != 1.0:
        weights = [[max(w ** args.power, 1e-6) for w in row] for row in weights]
        model.trainkv_state.eviction = model.trainkv_state.eviction.replace(allocation_weights=weights)
    trainkv.save_gated(model, args.output)
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
    import json
    from pathlib import Path

    from ..allocation import check_allocation, layer_bytes, weighted
    from ..allocation_plot import plot_allocation
    from ..hub.checkpoint import GateCheckpoint

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
        budgets = weighted(weights, entries, sink + window)
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


# registry (the one line in trainkv/methods/__init__.py imports this module)
from . import register_method  # noqa: E402

register_method(LayerBudget)

__all__ = ["LayerBudget", "LayerBudgetConfig", "allocation_weights", "evictable_mask", "masked_keep",
           "measure_allocation", "record_keep", "write_allocation_artifacts"]
