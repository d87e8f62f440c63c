"""The interface every eviction method implements, what the runtime hands it at each step, and where an
attached method's modules live on a model (``self_attn.trainkv_method`` of every decoder layer)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn as nn

from ..cache import EvictingLayer
from ..models import decoder_layers

#: Attribute of each attention module that holds its layer's method module (set by `trainkv.attach`).
METHOD_ATTR = "trainkv_method"


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses add their hyper-parameters as dataclass fields."""

    name: ClassVar[str] = "base"

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}

    def protected_recent(self, budget: int) -> int | None:
        """Recent tokens this method wants protected at a budget of ``budget`` entries per head, or None
        (no preference: the caller's rule applies). Used by ``trainkv eval`` when ``--recent-window`` is
        not given."""
        return None

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        data = {k: v for k, v in data.items() if k != "method"}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{cls.name}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class ScoreContext:
    """What a method sees after a forward step of one attention layer with an `EvictingCache`.

    The layer already holds the new tokens (the last ``new_tokens`` entries of ``layer.keys``).
    """

    module: nn.Module  # the attention module (q_proj, k_proj, ..., config, layer_idx)
    layer: EvictingLayer
    hidden_states: torch.Tensor | None  # [B, c, hidden] input of the attention module
    query: torch.Tensor  # [B, Hq, c, D] after RoPE
    scaling: float
    will_evict: bool

    @property
    def new_tokens(self) -> int:
        return self.layer.new_tokens

    @property
    def num_kv_heads(self) -> int:
        return self.layer.keys.shape[1]

    def attention_probs(self, queries: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        """Softmax attention of ``queries`` ``[B, Hq, n, D]`` (at ``query_positions`` ``[B, n]``) over the
        stored entries, respecting validity and causality by position. Returns ``[B, Hkv, group, n, L]`` fp32."""
        keys = self.layer.keys
        b, hkv, length, d = keys.shape
        hq, n = queries.shape[1], queries.shape[2]
        g = hq // hkv
        q = queries.float().reshape(b, hkv, g * n, d)
        logits = torch.matmul(q, keys.float().transpose(-1, -2)) * self.scaling  # [B, Hkv, g*n, L]
        logits = logits.view(b, hkv, g, n, length)
        allowed = self.layer.positions[:, :, None, None, :] <= query_positions[:, None, None, :, None]
        allowed = allowed & self.layer.valid_mask()[:, :, None, None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.nan_to_num(probs, nan=0.0)

    def new_query_positions(self) -> torch.Tensor:
        """Positions ``[B, c]`` of the new tokens."""
        return self.layer.positions[:, 0, -self.new_tokens :]


class EvictionMethod(nn.Module):
    """One per attention layer, attached as ``self_attn.trainkv_method``.

    A method fills ``layer.scores`` (higher = keep) for the stored entries; the cache then keeps the
    protected tokens plus the top-scored ones. Static scorers (a score per token, fixed once computed)
    override `new_token_scores`; attention-based scorers override `update_scores`.
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    trainable: ClassVar[bool] = False
    #: Static decode (issue 19): the scores depend on where entries sit in the compacted cache (neighbours, heads
    #: aligned slot by slot), so the runtime tracks that layout; such a method reads it through
    #: ``layer.to_layout`` / ``layer.from_layout`` (identities on the compacted cache).
    static_layout: ClassVar[bool] = False
    #: Its per-step scoring can be replayed from a CUDA graph (no host-side random numbers or tensors per step).
    cuda_graph_safe: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, model_config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.eviction = None  # the EvictionConfig it was attached with (set by `attach`)
        text = model_config.get_text_config(decoder=True)
        self.num_kv_heads = text.num_key_value_heads
        self.num_heads = text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.hidden_size = text.hidden_size

    def new_token_scores(self, ctx: ScoreContext) -> torch.Tensor:
        """Scores ``[B, Hkv, c]`` of the new tokens."""
        raise NotImplementedError

    def update_scores(self, ctx: ScoreContext) -> None:
        """Default: static per-token scores, written once for the new tokens."""
        c = ctx.new_tokens
        ctx.layer.scores[..., -c:] = self.new_token_scores(ctx).float()

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, config={self.config}"


def method_modules(model: nn.Module) -> list[EvictionMethod]:
    """The attached method module of each layer, in layer order."""
    return [getattr(layer.self_attn, METHOD_ATTR) for layer in decoder_layers(model)]


def method_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the method's parameters and buffers, keyed ``layers.{i}.{name}``."""
    out = {}
    for i, module in enumerate(method_modules(model)):
        for name, tensor in module.state_dict().items():
            out[f"layers.{i}.{name}"] = tensor
    return out
