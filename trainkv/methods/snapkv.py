"""SnapKV: score entries by the attention they get from an observation window of recent queries.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
https://arxiv.org/abs/2404.14469. As in kvpress's SnapKVPress: mean attention of the last
``window_size`` queries (over the queries and the query heads of the KV group), smoothed with a 1-D
average pool of ``kernel_size``. In chunked prefill the window is the last queries seen so far (a
rolling buffer spans chunk boundaries and decoding steps). Recomputed at every eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import EvictionMethod, MethodConfig, ScoreContext
from .query_window import recent_queries


@dataclass
class SnapKVConfig(MethodConfig):
    name = "snapkv"
    window_size: int = 32
    kernel_size: int = 5


class SnapKV(EvictionMethod):
    config_class = SnapKVConfig
    static_layout = True  # the pooling runs over neighbouring entries of the compacted cache

    def update_scores(self, ctx: ScoreContext) -> None:
        queries, positions = recent_queries(ctx, self.config.window_size)
        if not ctx.will_evict:
            return
        probs = ctx.attention_probs(queries, positions)  # [B,H,g,n,L]
        scores = probs.mean(dim=(2, 3))  # [B,H,L]
        k = self.config.kernel_size
        if k > 1:  # average pool over neighbouring *valid* entries (padding slots do not dilute the mean)
            layer = ctx.layer
            scores = layer.to_layout(scores)  # the compacted cache's order (identity unless decoding in slots)
            b, h, length = scores.shape
            valid = layer.to_layout(layer.valid_mask().float()).reshape(b * h, 1, length)
            pool = lambda x: F.avg_pool1d(x, k, stride=1, padding=k // 2, count_include_pad=True)  # noqa: E731
            scores = pool(scores.reshape(b * h, 1, length) * valid) / pool(valid).clamp(min=1e-9)
            scores = layer.from_layout(scores.reshape(b, h, length))
        ctx.layer.scores = scores
