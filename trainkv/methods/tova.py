"""TOVA (Token Omission Via Attention): keep the tokens the last query attends to most.

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024, https://arxiv.org/abs/2401.06104.
The score of every stored entry is the attention of the most recent query, averaged over the query
heads of its KV group (kvpress averages over all heads; per-KV-head selection is used here so each
head keeps what its own queries need). Recomputed at every eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import EvictionMethod, MethodConfig, ScoreContext


@dataclass
class TOVAConfig(MethodConfig):
    name = "tova"


class TOVA(EvictionMethod):
    config_class = TOVAConfig

    def update_scores(self, ctx: ScoreContext) -> None:
        if not ctx.will_evict:
            return
        probs = ctx.attention_probs(ctx.query[:, :, -1:], ctx.new_query_positions()[:, -1:])  # [B,H,g,1,L]
        ctx.layer.scores = probs.mean(dim=2)[:, :, 0]
