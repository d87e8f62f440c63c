"""Random eviction: a lower bound every method must beat.

Each new token gets a uniform random score, so the kept set is a random subset (besides the
protected sink and recent tokens). Seeded per cache layer for reproducibility.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionMethod, MethodConfig, ScoreContext


@dataclass
class RandomConfig(MethodConfig):
    name = "random"
    seed: int = 0


class RandomScores(EvictionMethod):
    config_class = RandomConfig
    cuda_graph_safe = False  # draws on a CPU generator every step

    def new_token_scores(self, ctx: ScoreContext) -> torch.Tensor:
        gen = ctx.layer.state.get("generator")
        if gen is None:
            gen = torch.Generator(device="cpu").manual_seed(self.config.seed * 1_000_003 + self.layer_idx)
            ctx.layer.state["generator"] = gen
        b, h = ctx.layer.keys.shape[:2]
        return torch.rand((b, h, ctx.new_tokens), generator=gen).to(ctx.layer.device)
