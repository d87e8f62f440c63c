"""A rolling buffer of the most recent queries of a layer, for observation-window scorers."""

from __future__ import annotations

import torch

from .base import ScoreContext


def recent_queries(ctx: ScoreContext, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the new queries to the layer's buffer, keep the last ``window``; return (queries, positions).

    Queries are ``[B, Hq, n, D]`` (after RoPE), positions ``[B, n]``. The buffer lets decoding-time
    eviction use the same observation window as prefill.
    """
    state = ctx.layer.state
    q_new = ctx.query[:, :, -window:].detach()
    p_new = ctx.new_query_positions()[:, -window:]
    if "queries" in state:
        q_new = torch.cat([state["queries"], q_new], dim=2)[:, :, -window:]
        p_new = torch.cat([state["query_positions"], p_new], dim=1)[:, -window:]
    state["queries"], state["query_positions"] = q_new, p_new
    return q_new, p_new
