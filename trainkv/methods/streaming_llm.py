"""StreamingLLM: keep the attention sinks and the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453. The score of a token is its position, so after the protected
sink tokens the budget is filled with the most recent ones. Positions are kept as they were
(no re-rotation), as kvpress's StreamingLLMPress does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionMethod, MethodConfig, ScoreContext


@dataclass
class StreamingLLMConfig(MethodConfig):
    name = "streaming_llm"


class StreamingLLM(EvictionMethod):
    config_class = StreamingLLMConfig

    def new_token_scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.layer.positions[..., -ctx.new_tokens :].float()
