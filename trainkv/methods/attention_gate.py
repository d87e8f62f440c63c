"""Attention-Gate: a small in-context attention module per layer that decides which tokens to keep.

Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate", 2024,
https://arxiv.org/abs/2410.12876. No official code exists; this follows the paper's design (a
reduced multi-head attention over the layer's input followed by a gating function giving one flag
per token and KV head, trained with an eviction-ratio loss) and makes it trainable with the DMS
recipe (Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression",
https://arxiv.org/abs/2506.05345): soft log-gates added to attention logits outside the protected
window, self-distillation to the same frozen model with eviction off, and a one-sided global
keep-ratio loss ramped from no eviction.

Semantics shared by training and the runtime. With prefill chunk size C, sink tokens S
and recent window W, a query in chunk m sees key j unconditionally when j is a sink, lies in chunk m,
or lies within the W most recent positions at the end of chunk m-1 (those survived the last
eviction as protected). Every other earlier key survives only if its gate keeps it: at run time its
gate logit is its keep-score (threshold mode: kept iff logit > 0; budget mode: top-budget by logit),
in training its log-sigmoid is added to the attention logit (soft eviction).

The gate's own attention is causal over a sliding window of ``gate_window`` tokens, so at run time it
needs only a ring buffer of that many small gate keys/values per layer, not the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import EvictionMethod, MethodConfig, ScoreContext, method_modules
from .gate_runtime import gate_scores, run_gate
from .window_attention import window_attention, window_mask


@dataclass
class AttentionGateConfig(MethodConfig):
    name = "attention_gate"
    gate_heads: int = 2
    gate_head_dim: int = 16
    gate_window: int = 64
    init_bias: float = 5.0  # sigmoid(5) ~ 0.993: training starts at "keep everything"
    # training
    target_keep: float = 0.125  # target fraction of evictable tokens kept (global over layers/heads)
    ramp: float = 0.3  # fraction of training over which the target ramps from 1 to target_keep
    ratio_weight: float = 5.0
    noise: float = 0.0  # logistic-noise temperature for training (0 = deterministic soft gates)
    # The training mask mirrors the runtime's chunk / sinks / window; None = take them from the
    # EvictionConfig the method is attached with (so training and runtime agree by construction).
    train_chunk_size: int | None = None
    train_sink_tokens: int | None = None
    train_recent_window: int | None = None
    loss: str = "kl"  # "kl" (self-distillation), "lm", or "kl+lm"
    # "token": KL averaged over all loss tokens of the batch; "row": per row first, then over rows (so a
    # prose row with thousands of loss tokens weighs as much as a task answer of ten)
    kl_reduction: str = "token"

    def __post_init__(self):
        if self.loss not in ("kl", "lm", "kl+lm"):
            raise ValueError(f"attention_gate loss must be 'kl', 'lm' or 'kl+lm', got {self.loss!r}")
        if self.kl_reduction not in ("token", "row"):
            raise ValueError(f"attention_gate kl_reduction must be 'token' or 'row', got {self.kl_reduction!r}")


class AttentionGate(EvictionMethod):
    """Per-layer gate: a reduced causal sliding-window attention over the layer's input hidden states,
    plus a direct projection, giving one keep-logit per token and KV head."""

    config_class = AttentionGateConfig
    trainable = True

    def __init__(self, config: AttentionGateConfig, model_config, layer_idx: int):
        super().__init__(config, model_config, layer_idx)
        inner = config.gate_heads * config.gate_head_dim
        self.qkv = nn.Linear(self.hidden_size, 3 * inner, bias=False)
        self.out = nn.Linear(inner, self.num_kv_heads, bias=True)
        self.direct = nn.Linear(self.hidden_size, self.num_kv_heads, bias=False)
        nn.init.normal_(self.qkv.weight, std=self.hidden_size**-0.5)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.direct.weight)
        nn.init.constant_(self.out.bias, config.init_bias)
        self.soft_eviction = False  # set by the trainer: apply the gates in training attention
        self.last_logits: torch.Tensor | None = None

    # --- the gate itself -------------------------------------------------------------------------
    def input_weight(self) -> torch.Tensor:
        """q, k, v and direct-path projections stacked into one matrix (one matmul), padded with zero rows to a
        multiple of 8 so the projected rows (and the queries viewed from them) are 16-byte aligned for the fused
        SDPA kernels: ``[3*h*d + Hkv + pad, hidden]``."""
        parts = [self.qkv.weight, self.direct.weight]
        rows = self.qkv.weight.shape[0] + self.direct.weight.shape[0]
        if rows % 8:
            parts.append(self.qkv.weight.new_zeros((8 - rows % 8, self.hidden_size)))
        return torch.cat(parts)

    def _scores(self, hidden, ring, mask, runner=gate_scores):
        cfg = self.config
        return runner(hidden, self.input_weight(), self.out.weight, self.out.bias, ring, mask,
                      cfg.gate_heads, cfg.gate_head_dim, cfg.gate_window)

    def empty_ring(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Gate keys/values ``[B, W, 2, heads, head_dim]`` before the first token: zeros (marked invalid)."""
        cfg = self.config
        return like.new_zeros((batch, cfg.gate_window, 2, cfg.gate_heads, cfg.gate_head_dim))

    def gate_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Keep-logits ``[B, Hkv, T]`` for a whole sequence (training / analysis)."""
        b, t, _ = hidden.shape
        w = self.config.gate_window
        valid = torch.ones((b, w + t), dtype=torch.bool, device=hidden.device)
        valid[:, :w] = False
        mask = window_mask(t, w, valid, hidden.device, hidden.dtype)
        with sdpa_kernel(sdpa_backends_without_cudnn()):  # trained through: not on cuDNN (see gated_chunk_attention)
            return self._scores(hidden, self.empty_ring(b, hidden), mask)[0]

    # --- runtime --------------------------------------------------------------------------------
    def new_token_scores(self, ctx: ScoreContext) -> torch.Tensor:
        """Scores of the new tokens; keeps the last ``gate_window`` gate keys/values per layer (a ring buffer,
        not the context) and, on the host, how many trailing tokens are known valid (then no mask is built)."""
        hidden = ctx.hidden_states
        b, c, _ = hidden.shape
        w = self.config.gate_window
        state = ctx.layer.state
        if "gate_ring" not in state:
            state["gate_ring"] = self.empty_ring(b, hidden)
            state["gate_valid"] = torch.zeros((b, w), dtype=torch.bool, device=hidden.device)
            state["gate_clean"] = 0  # trailing ring entries known (on the host) to be real tokens
        pending = ctx.layer.owner.pending_valid  # None: every new token is real
        clean = state["gate_clean"]
        valid = None
        if clean < w or pending is not None:
            old = state["gate_valid"]
            if old is None:
                old = torch.ones((b, w), dtype=torch.bool, device=hidden.device)
            new = pending if pending is not None else torch.ones((b, c), dtype=torch.bool, device=hidden.device)
            valid = torch.cat([old, new], dim=1)  # [B, W + c]
        mask = window_mask(c, w, valid, hidden.device, hidden.dtype)
        logits, state["gate_ring"] = self._scores(hidden, state["gate_ring"], mask,
                                                  runner=lambda *a: run_gate(*a, device=hidden.device))
        state["gate_clean"] = min(w, clean + c) if pending is None else 0
        state["gate_valid"] = None if state["gate_clean"] >= w else valid[:, c:]
        return logits

    # --- training ---------------------------------------------------------------------------------
    def attention_without_cache(self, module, query, key, value, attention_mask, scaling, hidden_states=None, **kwargs):
        """Gated attention for training: soft log-gates on evictable keys, chunk/window semantics of the runtime."""
        if not self.soft_eviction:
            return None
        if hidden_states is None:
            raise RuntimeError("attention_gate: hidden states were not captured; is the method attached?")
        logits = self.gate_logits(hidden_states)  # [B, Hkv, T]
        if self.training and self.config.noise > 0:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logits = logits + self.config.noise * (torch.log(u) - torch.log1p(-u))
        self.last_logits = logits
        chunk, sinks, window = self.training_semantics()
        out = gated_chunk_attention(
            query, key, value, F.logsigmoid(logits.float()), scaling,
            chunk=chunk, sinks=sinks, window=window, attention_mask=attention_mask,
        )
        return out.transpose(1, 2).contiguous(), None

    def training_semantics(self) -> tuple[int, int, int]:
        """(chunk size, sink tokens, recent window) the training mask uses: the config's, else the runtime's."""
        ev = self.eviction
        pick = lambda own, runtime, default: own if own is not None else (runtime if ev is not None else default)  # noqa: E731
        return (
            pick(self.config.train_chunk_size, ev and ev.chunk_size, 512),
            pick(self.config.train_sink_tokens, ev and ev.sink_tokens, 4),
            pick(self.config.train_recent_window, ev and ev.recent_window, 32),
        )

    @classmethod
    def training_loss(cls, model, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        gates = method_modules(model)
        cfg: AttentionGateConfig = gates[0].config
        loss, logs = distillation_loss(model, gates, batch, cfg.loss, cfg.kl_reduction)
        _, sinks, window = gates[0].training_semantics()
        keep = keep_fraction([g.last_logits for g in gates], sinks, window)
        target = target_keep(cfg, progress)
        ratio = F.relu(keep - target)
        loss = loss + cfg.ratio_weight * ratio
        logs.update(keep=keep.item(), target_keep=target, ratio_loss=ratio.item())
        for g in gates:
            g.last_logits = None
        return loss, logs


def distillation_loss(model, mods: list, batch: dict, loss: str = "kl", kl_reduction: str = "token"
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Self-distillation of a model with soft eviction (``mods[i].soft_eviction = True``) to itself without it.

    ``loss``: "kl" (KL(teacher || student) on the positions that predict a label, see `reduce_kl`), "lm" (cross
    entropy on the labels) or "kl+lm". The teacher is the same forward with eviction off, under no_grad.

    With labels, the logits are computed only at the positions that predict one (transformers' ``logits_to_keep``
    with the positions; the union over the rows): the same loss and gradients as from the whole sequence's logits,
    without the ``[B, T, vocab]`` fp32 tensors (5 GB each for 8K tokens of a 152K vocabulary).
    """
    labels = batch.get("labels")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    targets = keep = None
    if labels is not None:
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts label t+1
        keep = (targets != -100).any(0).nonzero().flatten()  # [n] positions that predict a label in some row
        inputs["logits_to_keep"] = keep
        targets = targets[:, keep]
    teacher, student = teacher_student_logits(model, mods, inputs, teacher="kl" in loss)
    mask = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
    if targets is not None:
        mask = targets != -100
    if "attention_mask" in batch:
        real = batch["attention_mask"].bool()
        mask = mask & (real[:, keep] if keep is not None else real)
    logs: dict[str, float] = {}
    total = student.new_zeros(())
    if teacher is not None:
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
        kl = reduce_kl(kl, mask, kl_reduction)
        total = total + kl
        logs["kl"] = kl.item()
    if "lm" in loss and labels is not None:
        lm = F.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100)
        total = total + lm
        logs["lm"] = lm.item()
    return total, logs


def teacher_student_logits(model, mods: list, inputs: dict, teacher: bool = True
                           ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """fp32 logits of ``model(**inputs)`` without soft eviction (the teacher, no grad; None unless ``teacher``) and
    with it (the student); soft eviction is off again afterwards, also on an error."""
    teacher_logits = None
    try:
        if teacher:
            for m in mods:
                m.soft_eviction = False
            with torch.no_grad():
                teacher_logits = model(**inputs).logits.float()
        for m in mods:
            m.soft_eviction = True
        student = model(**inputs).logits.float()
    finally:
        for m in mods:
            m.soft_eviction = False
    return teacher_logits, student


def reduce_kl(kl: torch.Tensor, mask: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Mean of per-position KL ``[B, T]`` over the loss positions: over all of them ("token") or per row then
    over the rows that have any ("row")."""
    if reduction == "token":
        return (kl * mask).sum() / mask.sum().clamp(min=1)
    if reduction != "row":
        raise ValueError(f"kl_reduction must be 'token' or 'row', got {reduction!r}")
    per_row = (kl * mask).sum(1) / mask.sum(1).clamp(min=1)
    has = mask.any(1)
    return per_row[has].mean() if bool(has.any()) else per_row.sum() * 0


def target_keep(cfg: AttentionGateConfig, progress: float) -> float:
    """Keep-ratio target: 1 at the start, linearly down to ``target_keep`` over the first ``ramp`` of training."""
    if cfg.ramp <= 0:
        return cfg.target_keep
    frac = min(1.0, progress / cfg.ramp)
    return 1.0 - frac * (1.0 - cfg.target_keep)


def keep_fraction(logits: list[torch.Tensor], sinks: int, window: int) -> torch.Tensor:
    """Mean soft keep probability over all layers, heads and evictable tokens (not sinks, not the final window)."""
    t = logits[0].shape[-1]
    lo, hi = min(sinks, t), max(min(sinks, t), t - window)
    if hi <= lo:
        return logits[0].new_ones(())
    return torch.stack([torch.sigmoid(l[..., lo:hi].float()).mean() for l in logits]).mean()


def gated_chunk_attention(query, key, value, log_gate, scaling, chunk: int, sinks: int, window: int, attention_mask=None):
    """Causal attention where key j's logit gets ``log_gate[j]`` for queries that see it only through its gate.

    Processed chunk by chunk of queries (as the runtime does): for queries in ``[s, e)`` the keys
    ``[sinks, s - window]`` are gated, the others are not. The per-key bias is folded into an extra
    key channel (``scale * [q, 1] . [k, b / scale]``), so any SDPA backend computes it and gradients
    reach the gates through the keys. Shapes: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``,
    log_gate ``[B, Hkv, T]``; returns ``[B, Hq, T, D]``.

    Never through cuDNN attention (`sdpa_backends_without_cudnn`), the default backend for masked bf16 SDPA on
    H100/H200 since torch 2.11, whose backward returns NaN query gradients when the key length is 64 mod 128 and
    some query row's logsumexp is below -ln(FLT_MAX) = -88.7 (pytorch/pytorch#196678). Qwen2.5 has such rows (heads
    that attend to almost nothing: in layers 0, 4 and 8 of Qwen2.5-Coder-0.5B, as low as -304, measured on CPU), and the
    last chunk has 64 mod 128 keys whenever the sequence has: step 13 of that model's recipe (an 8,000-token sample)
    got NaN gradients on an H200 (the fix is not yet confirmed there; docs/notes/issue18_qwen.md).
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    pad = 8
    scale = scaling
    k_rep = key.repeat_interleave(g, 1) if g > 1 else key
    v_rep = value.repeat_interleave(g, 1) if g > 1 else value
    lg = log_gate.to(query.dtype)
    lg = lg.repeat_interleave(g, 1) if g > 1 else lg  # [B, Hq, T]
    q_aug = torch.cat([query, query.new_ones(b, hq, t, 1), query.new_zeros(b, hq, t, pad - 1)], dim=-1)
    v_aug = torch.cat([v_rep, v_rep.new_zeros(b, hq, t, pad)], dim=-1)
    outs = []
    positions = torch.arange(t, device=query.device)
    with sdpa_kernel(sdpa_backends_without_cudnn()):
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            gated = (positions[:e] >= sinks) & (positions[:e] < s - window)  # evictable when chunk [s, e) runs
            bias = torch.where(gated, lg[..., :e], torch.zeros_like(lg[..., :e])) / scale
            k_aug = torch.cat([k_rep[:, :, :e], bias[..., None], k_rep.new_zeros(b, hq, e, pad - 1)], dim=-1)
            mask = torch.ones((e - s, e), dtype=torch.bool, device=query.device).tril(diagonal=s)
            if attention_mask is not None and attention_mask.dim() == 4:
                mask = mask & attention_mask[:, :, s:e, :e].bool()
            out = F.scaled_dot_product_attention(q_aug[:, :, s:e], k_aug, v_aug[:, :, :e], attn_mask=mask, scale=scale)
            outs.append(out[..., :d])
    return torch.cat(outs, dim=2)


def sdpa_backends_without_cudnn() -> list[SDPBackend]:
    """The SDPA backends enabled now, less cuDNN attention (see `gated_chunk_attention`): flash, memory-efficient
    and math as the user left them (the math fallback if none of them is on). The backend is chosen in the forward
    and its backward kernel recorded with it, so this holds for the backward too. CPU kernels are unaffected."""
    cuda = torch.backends.cuda
    enabled = [(SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
               (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
               (SDPBackend.MATH, cuda.math_sdp_enabled())]
    return [backend for backend, on in enabled if on] or [SDPBackend.MATH]


__all__ = ["AttentionGate", "AttentionGateConfig", "gated_chunk_attention", "keep_fraction", "sdpa_backends_without_cudnn",
           "target_keep", "window_attention"]
