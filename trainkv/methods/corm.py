"""CORM: keep the tokens that recent queries found important.

Dai et al., "CORM: Cache Optimization with Recent Message for Large Language Model Inference",
2024, https://arxiv.org/abs/2404.15949. CORM keeps a token while some query among the last ``r``
gives it attention above ``1/t`` (t = tokens seen). In budget form the score of an entry is the
largest attention it received from the recent queries (max over the window and the query heads of
the KV group), normalised by ``1/t`` so scores are comparable as the context grows; threshold mode
with ``threshold=1.0`` reproduces CORM's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import EvictionMethod, MethodConfig, ScoreContext
from .query_window import recent_queries


@dataclass
class CORMConfig(MethodConfig):
    name = "corm"
    window_size: int = 32


class CORM(EvictionMethod):
    config_class = CORMConfig

    def update_scores(self, ctx: ScoreContext) -> None:
        queries, positions = recent_queries(ctx, self.config.window_size)
        if not ctx.will_evict:
            return
        probs = ctx.attention_probs(queries, positions)  # [B,H,g,n,L]
        ctx.layer.scores = probs.amax(dim=(2, 3)) * ctx.layer.seen
