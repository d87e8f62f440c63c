"""TOVA (Token Omission Via Attention): keep the tokens the last query attends to most.

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024, https://arxiv.org/abs/2401.06104.
The score of every stored entry is the attention of the most recent query, averaged over all query
heads of the layer as in the paper and kvpress's TOVAPress (``average="all"``; every KV head then
keeps the same tokens), or over the query heads of each KV group (``average="group"``). Recomputed
at every eviction. Checked against kvpress 0.5.5's TOVAPress on 2026-12-02 with ``average="all"``, a
one-pass prefill and only the last token protected (SmolLM2-135M-Instruct, 12 evaluation samples at 1K
tokens, keep 1/4 and 1/8): the same kept positions in 2160/2160 (layer, KV head) sets and the same
greedy text on 24/24 samples (docs/experiments/kvpress_reference.md); ``average="group"`` is not kvpress's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import EvictionMethod, MethodConfig, ScoreContext


@dataclass
class TOVAConfig(MethodConfig):
    name = "tova"
    average: str = "all"  # "all" query heads (paper, kvpress) or per KV "group"

    def __post_init__(self):
        if self.average not in ("all", "group"):
            raise ValueError(f"tova: average must be 'all' or 'group', got {self.average!r}")


class TOVA(EvictionMethod):
    config_class = TOVAConfig
    static_layout = True  # average="all" averages heads slot by slot of the compacted cache

    def update_scores(self, ctx: ScoreContext) -> None:
        if not ctx.will_evict:
            return
        probs = ctx.attention_probs(ctx.query[:, :, -1:], ctx.new_query_positions()[:, -1:])  # [B,H,g,1,L]
        scores = probs.mean(dim=2)[:, :, 0]  # [B, Hkv, L]
        if self.config.average == "all":  # heads hold the same positions slot by slot (they always keep the same set)
            layer = ctx.layer
            scores = layer.to_layout(scores)  # the compacted cache's order (identity unless decoding in slots)
            scores = layer.from_layout(scores.mean(dim=1, keepdim=True).expand_as(scores).contiguous())
        ctx.layer.scores = scores
