"""H2O (Heavy-Hitter Oracle): keep the tokens with the largest accumulated attention.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, https://arxiv.org/abs/2306.14048. Every query adds its attention
probabilities (summed over the query heads of the KV group) to the score of each stored entry;
the recent window plays the role of H2O's "recent" tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import EvictionMethod, MethodConfig, ScoreContext


@dataclass
class H2OConfig(MethodConfig):
    name = "h2o"


class H2O(EvictionMethod):
    config_class = H2OConfig

    def update_scores(self, ctx: ScoreContext) -> None:
        c = ctx.new_tokens
        probs = ctx.attention_probs(ctx.query[:, :, -c:], ctx.new_query_positions())  # [B,H,g,c,L]
        ctx.layer.scores += probs.sum(dim=(2, 3))
