"""Learned layer (and head) budgets: how much of one total KV budget each layer / KV head gets.

trainkv's own method (no paper of its own). Rule-based allocators (uniform; PyramidKV, Cai et al.,
https://arxiv.org/abs/2406.02069; Ada-KV, Feng et al., https://arxiv.org/abs/2407.11550; XKV: all in
`trainkv.budgets`) split the budget by a fixed rule; this method *learns* the split on top of a trained
scorer, with the Attention-Gate objective (https://arxiv.org/abs/2410.12876). It wraps a frozen
Attention-Gate or Locret (retaining head) scorer, whose settings and weights come from
``base_checkpoint`` (read by `trainkv.hub.bases`, where checkpoints are loaded; this module does no I/O)
or are trained jointly (``train_base``), and adds per layer (``per_head``: per KV head) a trainable
offset ``b`` to the scorer's keep-logits:

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
demand, ``python -m trainkv.training.layer_budget measure``); these are saved as the checkpoint's
``EvictionConfig.allocation_weights`` (per-layer mode: each layer's mean, the same for its heads). At
run time a budget of ``B`` entries per head on average becomes integer budgets proportional to them,
at least the protected tokens each, summing exactly to ``B x layers x KV heads``
(`trainkv.budgets.weighted`), for whatever ``B`` the runtime or ``trainkv eval`` uses. (Integer
``head_budgets`` are not saved: they would pin one total and override every evaluated budget; the
integer budgets at the trained ratio are written to ``allocation.json`` next to the checkpoint by
`trainkv.training.layer_budget.write_allocation_artifacts`, with the heat map ``allocation.png``.)

Run-time scoring is the base scorer's, passed through the same per-(layer, head) monotone map ``z``
(so in budget mode each head keeps exactly the base scorer's top entries; in threshold or Ada-KV
mode the calibrated ``z`` is compared, as trained). The checkpoint holds the base's weights too, so
it loads on its own with `trainkv.load_gated`.

Memory note: the cache pads the heads of a layer to the largest, so per-head budgets save kept
entries but a layer's bytes follow its largest head; ``per_head: false`` (the default) allocates per
layer, and then bytes follow the allocation exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_gate import AttentionGate, distillation_loss, gated_chunk_attention, target_keep
from .base import EvictionMethod, MethodConfig, ScoreContext, method_modules
from .retaining_head import RetainingHead

BASE_CLASSES: dict[str, type[EvictionMethod]] = {"attention_gate": AttentionGate, "retaining_head": RetainingHead}
BASES = tuple(BASE_CLASSES)
DEFAULT_BASE = {"method": "attention_gate"}


@dataclass
class LayerBudgetConfig(MethodConfig):
    """Settings of the learned allocation.

    base: the scorer's method config (``{method: attention_gate | retaining_head, ...}``); with
        ``base_checkpoint`` its settings come from that checkpoint, keys given here override them
        (`trainkv.hub.bases.resolve_base`); null: the checkpoint's (without one: ``attention_gate``).
    base_checkpoint: trained scorer checkpoint (path, ``alias/name`` or Hub id) whose weights the trainer loads
        into the base after attaching (`trainkv.hub.bases.load_base_weights`). Null: the base starts untrained
        (use ``train_base: true``), or its weights come from a ``layer_budget`` checkpoint being loaded.
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
    report_context: context length (tokens) at which the allocation artifacts report integer budgets.
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
        if self.base is not None and (not isinstance(self.base, dict) or "method" not in self.base):
            raise ValueError(f"layer_budget: base must be a method config with a `method` key, got {self.base!r}")
        if self.base_settings["method"] not in BASES:
            raise ValueError(f"layer_budget: base method must be one of {BASES}, got {self.base_settings['method']!r}")
        if not 0.0 < self.target_keep <= 1.0:
            raise ValueError(f"layer_budget: target_keep must lie in (0, 1], got {self.target_keep}")
        if not 0.0 <= self.measure_from < 1.0:
            raise ValueError(f"layer_budget: measure_from must lie in [0, 1), got {self.measure_from}")
        if self.loss not in ("kl", "lm", "kl+lm"):
            raise ValueError(f"layer_budget: loss must be kl, lm or kl+lm, got {self.loss!r}")

    @property
    def base_settings(self) -> dict:
        """The base scorer's method config (``base``, or the default Attention-Gate)."""
        return self.base if self.base is not None else DEFAULT_BASE

    def mask_settings(self, eviction=None) -> tuple[int, int, int]:
        """(chunk size, sink tokens, recent window) of the soft mask: these settings', else the runtime's
        (``eviction``, the `EvictionConfig` attached with), else the Attention-Gate base's, else 512 / 4 / 32."""
        ag = self.base_settings if self.base_settings["method"] == "attention_gate" else {}
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


# --- the module -------------------------------------------------------------------------------------------
class LayerBudget(EvictionMethod):
    """A frozen base scorer plus this layer's trainable offset (and, for Locret, scale)."""

    config_class = LayerBudgetConfig
    trainable = True

    def __init__(self, config: LayerBudgetConfig, model_config, layer_idx: int):
        super().__init__(config, model_config, layer_idx)
        base_cls = BASE_CLASSES[config.base_settings["method"]]
        self.base = base_cls(base_cls.config_class.from_dict(config.base_settings), model_config, layer_idx)
        n = self.num_kv_heads if config.per_head else 1
        self.offset = nn.Parameter(torch.full((n,), float(config.init_offset)))
        self.locret = config.base_settings["method"] == "retaining_head"
        if self.locret:
            self.log_scale = nn.Parameter(torch.zeros(n))
            self.register_buffer("score_mean", torch.zeros(self.num_kv_heads))
            self.register_buffer("score_std", torch.ones(self.num_kv_heads))
            self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.base_ready = config.train_base
        if not config.train_base:
            self.base.requires_grad_(False)
        self.soft_eviction = False
        self.last_logits: torch.Tensor | None = None
        self.keep_sum: torch.Tensor | None = None  # float64 [H]: keep fractions summed over the measured steps
        self.keep_steps = 0
        self.keep_last: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # [B, T] real tokens of the batch in flight (training_loss sets it)

    def load_base(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load the base scorer's weights (this layer's tensors of a trained scorer checkpoint, keys without the
        ``layers.{i}.`` prefix)."""
        try:
            self.base.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise ValueError(f"layer_budget: {source} does not fit this model's layer {self.layer_idx}: {e}") from None
        self.base_ready = True

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
                f"layer_budget: the base scorer has no weights (base_checkpoint={self.config.base_checkpoint!r}). "
                "Load them with trainkv.hub.bases.load_base_weights(model) after attaching (the recipes do), set "
                "method.train_base=true, or load a trained layer_budget checkpoint with trainkv.load_gated"
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


__all__ = ["BASES", "LayerBudget", "LayerBudgetConfig", "allocation_weights", "evictable_mask", "masked_keep",
           "measure_allocation", "record_keep"]
