"""Locret retaining heads: a small MLP per layer that predicts how much later queries will need each token.

Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained Retaining Heads",
2024, https://arxiv.org/abs/2410.01805. The target and answer regions in full, the paper's
hyper-parameters, the variants and the deviations from Locret: docs/methods/retaining_head.md.

Module: per layer, ``fc2(act(fc1([q_proj(x), k_proj(x), v_proj(x)])))`` on the attention input, the
projections taken before RoPE; one raw score per KV head. A token's score depends only on that token
(a static score), so chunked prefill gives exactly the scores of a whole-sequence pass.

Training target: for key ``j`` and KV head ``h``, the largest pre-softmax logit ``q_p . k_j * scale``
that an answer query ``p > j`` (any query head of h's group) gives it (``target="log_attention"``: the
largest log attention weight); ``answer_region`` says which positions are answer queries. Computed in
the frozen forward, a chunk of queries at a time (no T x T matrix). Loss: ``SmoothL1(pred, target)``
over the key tokens, averaged over layers and heads, plus ``smooth_weight`` x the MSE between adjacent
tokens' scores. Only the heads are differentiated: training costs about one inference forward.

Runtime (`RetainingHeadConfig.eviction_config`): Locret's chunked prefill with chunk B, budget b and
stabilizers n_s becomes budget mode with ``chunk_size`` = B, ``budget`` = b, ``recent_window`` =
``max(stabilizers, final_tokens)`` and ``evict_during_decoding=False``; the protected tokens count inside
the budget, and kept entries stay at their original positions (no re-rotation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ..config import EvictionConfig
from .base import EvictionMethod, MethodConfig, ScoreContext, method_modules

ANSWER_REGIONS = ("auto", "labels", "tail", "all")
TARGETS = ("logit", "log_attention")


@dataclass
class RetainingHeadConfig(MethodConfig):
    """Settings of the retaining heads.

    hidden: MLP hidden size (the paper: 1024, 2.5% of Llama-3.1-8B; 256 here = 0.63% of Llama-3.1-8B,
        5.5% of SmolLM2-135M; see `param_count`).
    activation: MLP activation (None = the backbone's ``hidden_act``, SiLU for Llama as in the paper).
    init_std: std of the normal initialisation of fc1/fc2 (None = the backbone's ``initializer_range``).
    smooth_weight: weight of the adjacent-token smoothness term (paper: 0.0025).
    huber_beta: SmoothL1 beta (paper: 1.0).
    answer_region: which queries define the target: ``auto``/``labels``/``tail``/``all`` (module docstring).
    target: ``"logit"`` (Locret: the max pre-softmax logit) or ``"log_attention"`` (a trainkv variant: the max
        log attention *weight*, ``logit - logsumexp`` over each query's visible keys; module docstring).
    target_queries: ``tail`` mode: how many final tokens act as the answer (at most half of a row's tokens).
    answer_keys: also train on keys that are themselves answer tokens (Locret: no, prompt tokens only).
    target_chunk: answer queries processed at a time when computing the target (memory knob:
        ``B * num_heads * target_chunk * T`` fp32 logits are live at once).
    stabilizers: runtime: the last n tokens of the cache kept at every prefill eviction (Locret's n_s);
        maps onto ``EvictionConfig.recent_window``. An ``int`` is a number of tokens (at most half the
        budget), a ``float`` in (0, 1) a fraction of the budget (Locret's settings protect 15-40% of it:
        n_s = 2500 of b = 6000 or 16384). On SmolLM2 (issue #5) half the budget helped at 2K x 1/8 on one
        dev set and not on another, and hurt at 1K x 1/8 (budget 128): 32 tokens is the default.
    final_tokens: runtime: final prompt tokens never evicted (Locret's n_loc, the question); also
        covered by ``recent_window`` (``max(stabilizers, final_tokens)``).
    pool_kernel: runtime, a trainkv option (1 = Locret): max-pool each chunk's scores over this many
        neighbouring tokens (odd), so a kept token keeps its neighbours (a needle's digits together), as
        SnapKV pools attention. Pooling stays inside a prefill chunk (no score looks ahead of the chunk).
    """

    name = "retaining_head"
    hidden: int = 256
    activation: str | None = None
    init_std: float | None = None
    # training
    smooth_weight: float = 0.0025
    huber_beta: float = 1.0
    answer_region: str = "auto"
    target: str = "logit"
    target_queries: int = 128
    answer_keys: bool = False
    target_chunk: int = 256
    # runtime
    stabilizers: int | float = 32
    final_tokens: int = 0
    pool_kernel: int = 1

    def __post_init__(self):
        if self.answer_region not in ANSWER_REGIONS:
            raise ValueError(
                f"retaining_head: answer_region must be one of {ANSWER_REGIONS}, got {self.answer_region!r}"
            )
        if self.target not in TARGETS:
            raise ValueError(f"retaining_head: target must be one of {TARGETS}, got {self.target!r}")
        for name in ("hidden", "target_queries", "target_chunk"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"retaining_head: {name} must be positive, got {getattr(self, name)}")
        if isinstance(self.stabilizers, bool) or self.stabilizers < 0 or self.final_tokens < 0:
            raise ValueError("retaining_head: stabilizers and final_tokens must be >= 0")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"retaining_head: pool_kernel must be a positive odd number, got {self.pool_kernel}")
        if isinstance(self.stabilizers, float) and not self.stabilizers < 1.0:
            raise ValueError(
                f"retaining_head: a float stabilizers is a fraction of the budget in [0, 1), got {self.stabilizers}; "
                "give a number of tokens as an int"
            )

    def stabilizer_tokens(self, budget: int) -> int:
        """Locret's n_s at a budget of ``budget`` entries per head; a number of tokens is capped at half the
        budget (so the heads always choose at least half of what is kept)."""
        if isinstance(self.stabilizers, float):
            return int(round(self.stabilizers * budget))
        return min(int(self.stabilizers), budget // 2)

    def protected_recent(self, budget: int) -> int:
        """``max(stabilizers, final_tokens)`` at this budget (the protected recent window)."""
        return max(self.stabilizer_tokens(budget), self.final_tokens)

    def eviction_config(self, budget: int | float = 256, chunk_size: int = 512, sink_tokens: int = 4, **overrides):
        """The runtime settings of Locret's inference loop: budget mode, ``recent_window`` =
        ``max(stabilizers, final_tokens)``, no eviction while decoding. A fraction ``stabilizers`` needs an
        absolute (``int``) budget."""
        if isinstance(budget, float) and isinstance(self.stabilizers, float):
            raise ValueError(
                f"retaining_head: stabilizers={self.stabilizers} is a fraction of the budget, but budget={budget} "
                "is a keep ratio (entries unknown until the context is seen); pass an int budget (entries per "
                "head) or set stabilizers to a number of tokens"
            )
        recent = self.protected_recent(budget) if isinstance(budget, int) else max(self.stabilizers, self.final_tokens)
        settings = dict(
            budget=budget, chunk_size=chunk_size, sink_tokens=sink_tokens,
            recent_window=recent, evict_during_decoding=False, mode="budget",
        )
        settings.update(overrides)
        return EvictionConfig(**settings)


def param_count(model_config, hidden: int = 256) -> int:
    """Parameters of the retaining heads of all layers of a model with this (text) config."""
    text = model_config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    width = (text.num_attention_heads + 2 * text.num_key_value_heads) * head_dim
    return text.num_hidden_layers * (width * hidden + hidden * text.num_key_value_heads)


def answer_and_key_masks(config: RetainingHeadConfig, attention_mask: torch.Tensor, labels: torch.Tensor | None):
    """``(answer, keys)``: bool ``[B, T]`` masks of the answer queries and of the key tokens to train on."""
    real = attention_mask.bool()
    b, t = real.shape
    pos = torch.arange(t, device=real.device)
    # tail: the last ``target_queries`` real tokens of the row (at most half of a short row, so keys remain)
    n_real = real.sum(-1, keepdim=True)
    rank_from_end = real.flip(-1).long().cumsum(-1).flip(-1)  # 1 for the last real token, 2 before it...
    tail = real & (rank_from_end <= torch.clamp(n_real // 2, max=config.target_queries))
    if labels is not None:
        labelled = real & (labels != -100)
    else:
        labelled = torch.zeros_like(real)
    if config.answer_region == "labels":
        use_labels = torch.ones((b, 1), dtype=torch.bool, device=real.device)
    elif config.answer_region == "auto":
        use_labels = (labelled.any(-1) & (real & ~labelled).any(-1))[:, None]
    else:
        use_labels = torch.zeros((b, 1), dtype=torch.bool, device=real.device)
    if config.answer_region == "all":
        answer = real.clone()
    else:
        answer = torch.where(use_labels, labelled, tail)
    # a key needs an answer query strictly after it
    last_answer = torch.where(answer, pos, torch.full_like(pos, -1)).amax(-1, keepdim=True)
    keys = real & (pos < last_answer)
    if not config.answer_keys and config.answer_region != "all":
        keys = keys & ~answer
    return answer, keys


def causal_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    answer: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    chunk: int = 256,
    target: str = "logit",
) -> torch.Tensor:
    """Locret's target without an attention matrix: ``[B, Hkv, T]`` fp32, the max over answer queries
    ``p > j`` (``answer`` ``[B, T]`` bool) and over the GQA group of ``q_p . k_j * scaling``, ``-inf``
    where key ``j`` has no such query or is invalid (``key_valid`` ``[B, T]``). ``target="log_attention"``
    subtracts each query's ``logsumexp`` over its visible keys ``i <= p`` (log attention weights).

    ``query`` ``[B, Hq, T, D]``, ``key`` ``[B, Hkv, T, D]`` (after RoPE). The answer queries are gathered
    (ragged rows padded) and processed ``chunk`` at a time: ``B * Hq * chunk * T`` logits live at once.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    pos = torch.arange(t, device=query.device)
    counts = answer.sum(-1)
    num = int(counts.max()) if answer.numel() else 0
    best = torch.full((b, hkv, t), float("-inf"), dtype=torch.float32, device=query.device)
    if num == 0:
        return best
    # positions of each row's answer queries, in order; padded with t (invalid)
    qpos = torch.where(answer, pos, torch.full_like(pos, t)).sort(dim=-1).values[:, :num]
    qok = qpos < t
    qpos = qpos.clamp(max=t - 1)
    keys_f = key.float()
    for s in range(0, num, chunk):
        p, ok = qpos[:, s : s + chunk], qok[:, s : s + chunk]  # [B, a]
        a = p.shape[1]
        last = int(torch.where(ok, p, torch.zeros_like(p)).max())  # keys j < last can be targets
        if last == 0:
            continue
        span = last + 1 if target == "log_attention" else last  # the normaliser also needs key p itself
        q = query.gather(2, p[:, None, :, None].expand(b, hq, a, d)).float()  # [B, Hq, a, D]
        q = q.view(b, hkv, g * a, d)  # query head i belongs to KV head i // g
        logits = torch.matmul(q, keys_f[:, :, :span].transpose(-1, -2)).mul_(scaling).view(b, hkv, g, a, span)
        if target == "log_attention":
            visible = (p[:, :, None] >= pos[:span]) & key_valid[:, None, :span]  # [B, a, span]
            lse = logits.masked_fill(~visible[:, None, None], float("-inf")).logsumexp(-1, keepdim=True)
            logits.sub_(lse.nan_to_num_(0.0, neginf=0.0))  # rows of padded queries: masked below anyway
        allowed = ok[:, :, None] & (p[:, :, None] > pos[:span]) & key_valid[:, None, :span]  # [B, a, span]
        logits.masked_fill_(~allowed[:, None, None], float("-inf"))
        best[..., :span] = torch.maximum(best[..., :span], logits.amax(dim=(2, 3)))
    return best


class RetainingHead(EvictionMethod):
    """Per-layer retaining head: MLP over the token's pre-RoPE [q, k, v] projections -> one score per KV head."""

    config_class = RetainingHeadConfig
    trainable = True

    def __init__(self, config: RetainingHeadConfig, model_config, layer_idx: int):
        super().__init__(config, model_config, layer_idx)
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.fc1 = nn.Linear(width, config.hidden, bias=False)
        self.fc2 = nn.Linear(config.hidden, self.num_kv_heads, bias=False)
        self.act = ACT2FN[config.activation or getattr(model_config, "hidden_act", "silu")]
        std = config.init_std if config.init_std is not None else getattr(model_config, "initializer_range", 0.02)
        nn.init.normal_(self.fc1.weight, std=std)
        nn.init.normal_(self.fc2.weight, std=std)
        self._request: dict | None = None  # set by training_loss for one forward
        self.last: dict | None = None  # prediction, target, mask of that forward

    # --- the head -------------------------------------------------------------------------------
    def head_inputs(self, attn_module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, (Hq + 2 Hkv) D]``: the attention module's pre-RoPE q, k, v projections (no autograd graph)."""
        with torch.no_grad():
            projections = (attn_module.q_proj(hidden), attn_module.k_proj(hidden), attn_module.v_proj(hidden))
            return torch.cat(projections, dim=-1)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, Hkv, T]`` from head inputs ``[B, T, width]``."""
        x = features.to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(x))).transpose(1, 2)

    # --- runtime --------------------------------------------------------------------------------
    def new_token_scores(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.hidden_states is None:
            raise RuntimeError("retaining_head: hidden states were not captured; is the method attached?")
        scores = self.scores(self.head_inputs(ctx.module, ctx.hidden_states))
        k = self.config.pool_kernel
        if k > 1 and scores.shape[-1] > 1:  # max over valid neighbours of the chunk (padding never wins)
            b, h, c = scores.shape
            valid = None if ctx.layer.valid is None else ctx.layer.valid[..., -c:].expand(b, h, c)
            masked = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
            pooled = F.max_pool1d(masked.reshape(b * h, 1, c), k, stride=1, padding=k // 2).reshape(b, h, c)
            scores = pooled if valid is None else torch.where(valid, pooled, scores)
        return scores

    # --- training -------------------------------------------------------------------------------
    def attention_without_cache(self, module, query, key, value, attention_mask, scaling, hidden_states=None, **kwargs):
        """In a `training_loss` forward: record the head's prediction and the target; attention itself is
        the normal SDPA (returns None)."""
        request = self._request
        if request is None:
            return None
        if hidden_states is None:
            raise RuntimeError("retaining_head: hidden states were not captured; is the method attached?")
        with torch.no_grad():
            target = causal_importance(
                query.detach(), key.detach(), request["answer"], request["real"], scaling, self.config.target_chunk,
                self.config.target,
            )
        features = self.head_inputs(module, hidden_states.detach())
        with torch.enable_grad():
            pred = self.scores(features)
        mask = request["keys"][:, None, :] & torch.isfinite(target)  # [B, Hkv, T]
        self.last = {"pred": pred, "target": target.nan_to_num(0.0, posinf=0.0, neginf=0.0), "mask": mask}
        return None

    @classmethod
    def training_loss(cls, model, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        heads = method_modules(model)
        cfg: RetainingHeadConfig = heads[0].config
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        answer, keys = answer_and_key_masks(cfg, attention_mask, batch.get("labels"))
        request = {"answer": answer, "keys": keys, "real": attention_mask.bool()}
        for h in heads:
            h._request, h.last = request, None
        try:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
            try:
                model(**inputs, logits_to_keep=1)  # the LM head's output is not needed
            except TypeError:
                model(**inputs)
        finally:
            for h in heads:
                h._request = None
        records = [h.last for h in heads]
        for h in heads:
            h.last = None
        if any(r is None for r in records):
            raise RuntimeError(
                "retaining_head: some layers recorded no prediction; is the trainkv attention function active?"
            )
        return retaining_loss(records, cfg)


def retaining_loss(records: list[dict], cfg: RetainingHeadConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Locret's loss over the layers' ``{"pred", "target", "mask"}`` records (each ``[B, Hkv, T]``)."""
    huber_terms, smooth_terms = [], []
    for r in records:
        pred, target, mask = r["pred"].float(), r["target"], r["mask"]
        per = F.smooth_l1_loss(pred, target, beta=cfg.huber_beta, reduction="none")
        count = mask.sum(dim=(0, 2))  # per head
        head_mean = (per * mask).sum(dim=(0, 2)) / count.clamp(min=1)
        huber_terms.append(head_mean[count > 0].mean() if bool((count > 0).any()) else pred.sum() * 0.0)
        pm = r["mask"][..., :-1] & r["mask"][..., 1:]
        diff = (pred[..., 1:] - pred[..., :-1]).pow(2)
        smooth_terms.append((diff * pm).sum() / pm.sum().clamp(min=1))
    huber = torch.stack(huber_terms).mean()
    smooth = torch.stack(smooth_terms).sum()
    loss = huber + cfg.smooth_weight * smooth
    logs = {
        "huber": huber.item(),
        "smooth": smooth.item(),
        "top10_overlap": top_overlap(records, 0.1),
        "key_tokens": float(records[0]["mask"][:, 0].sum().item()),
        "target_mean": _masked_mean([r["target"] for r in records], [r["mask"] for r in records]),
    }
    return loss, logs


def _masked_mean(values: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    total = sum(float((v * m).sum()) for v, m in zip(values, masks))
    count = sum(int(m.sum()) for m in masks)
    return total / max(count, 1)


@torch.no_grad()
def top_overlap(records: list[dict], fraction: float = 0.1) -> float:
    """Mean over rows, layers and heads of |top-k(pred) ∩ top-k(target)| / k over the masked keys,
    k = ceil(fraction * keys)."""
    pred = torch.stack([r["pred"].detach().float() for r in records])  # [L, B, H, T]
    target = torch.stack([r["target"] for r in records])
    mask = torch.stack([r["mask"] for r in records])
    out = []
    for b in range(pred.shape[1]):
        m = mask[:, b]  # [L, H, T]
        n = int(m[0, 0].sum())
        if n == 0:
            continue
        k = max(1, math.ceil(fraction * n))
        p = pred[:, b].masked_fill(~m, float("-inf")).topk(k, dim=-1).indices
        t = target[:, b].masked_fill(~m, float("-inf")).topk(k, dim=-1).indices
        hit_p = torch.zeros_like(m).scatter_(-1, p, True)
        hit_t = torch.zeros_like(m).scatter_(-1, t, True)
        out.append(((hit_p & hit_t).sum(-1).float() / k).mean())
    return float(torch.stack(out).mean()) if out else 0.0


__all__ = [
    "RetainingHead", "RetainingHeadConfig", "TARGETS", "answer_and_key_masks", "causal_importance", "param_count",
    "retaining_loss", "top_overlap",
]
