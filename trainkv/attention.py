"""trainkv's attention function, registered with transformers' `AttentionInterface` as ``"trainkv"``.

With an `EvictingCache` bound to the layer it attends over the stored (compacted, possibly ragged)
entries, then lets the layer's method score the entries and evicts down to the budget (in a static decode
step, issue 19, over the layer's fixed slot buffer, replacing one slot per head: `static_step`). Without one
(plain forwards, training) it is transformers' SDPA attention, unless the method supplies its own
training attention.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .budgets import adaptive_head_counts
from .methods.base import ScoreContext
from .profiling import EVICT, SCORE, scope

ATTN_NAME = "trainkv"


def stored_attention(query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """Attention of the new queries ``[B, Hq, c, D]`` over a layer's stored entries (new ones last).

    Old entries are visible to every new query, new entries causally; invalid entries (padding,
    ragged heads) are masked, and a token always sees itself. Returns ``[B, Hq, c, D]``.
    """
    keys, values = layer.keys, layer.values
    b, hkv, length, _ = keys.shape
    hq, c = query.shape[1], query.shape[2]
    past = length - c
    if layer.valid is None:
        if c == 1:
            mask = None
        else:
            mask = torch.ones((c, length), dtype=torch.bool, device=query.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=hq != hkv)
    causal = torch.ones((c, length), dtype=torch.bool, device=query.device).tril(diagonal=past)
    own = torch.zeros_like(causal)
    own[:, past:] = torch.eye(c, dtype=torch.bool, device=query.device)
    mask = (layer.valid[:, :, None, :] & causal) | own  # [B, Hkv, c, L]
    g = hq // hkv
    q = query.reshape(b, hkv, g * c, query.shape[-1])
    mask = mask[:, :, None].expand(b, hkv, g, c, length).reshape(b, hkv, g * c, length)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, c, -1)


@functools.lru_cache(maxsize=256)
def _budget_tensor(budgets: tuple[int, ...]) -> torch.Tensor:
    """Per-head budgets as a CPU tensor, built once per distinct tuple (read-only: never modified in place)."""
    return torch.tensor(budgets)


def _should_evict(layer, config, budgets: torch.Tensor) -> bool:
    if not layer.owner.eviction_enabled:
        return False
    prefill_end = layer.owner.prefill_end  # set by generate; a 1-token prefill chunk is not a decoding step
    decoding = layer.seen > prefill_end if prefill_end is not None else (layer.new_tokens == 1 and layer.seen > 1)
    if decoding and not config.evict_during_decoding:
        return False
    if config.mode == "threshold":
        return True
    held = layer.held_counts()  # per KV head, known on the host unless padding made rows differ: no device sync
    if config.head_allocation == "adaptive":  # Ada-KV: the layer's total is the budget, split anew at each eviction
        if held is not None:
            return sum(held) > sum(budgets.tolist())
        return bool((layer.kept_counts().sum(-1) > int(budgets.sum())).any())
    # Per-head budgets differ: evict as soon as any head holds more than its own budget.
    if held is not None:
        return any(n > b for n, b in zip(held, budgets.tolist()))  # budgets live on the CPU
    return bool((layer.kept_counts() > budgets.to(layer.device)).any())


def trainkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = module.__dict__.pop("_trainkv_layer", None)
    hidden_states = module.__dict__.pop("_trainkv_hidden", None)
    method = getattr(module, "trainkv_method", None)
    scaling = module.scaling if scaling is None else scaling
    if layer is None:
        custom = getattr(method, "attention_without_cache", None)
        if custom is not None:
            out = custom(module, query, key, value, attention_mask, scaling=scaling, hidden_states=hidden_states, **kwargs)
            if out is not None:
                return out
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    if layer.slots is not None:
        return static_step(module, query, layer, method, hidden_states, scaling)
    config = layer.owner.config
    out = stored_attention(query, layer, scaling)
    budgets = _budget_tensor(tuple(config.budget_for(layer.layer_idx, layer.keys.shape[1], layer.seen,
                                                     layer.owner.decode_horizon)))
    will_evict = _should_evict(layer, config, budgets)
    if method is not None:
        ctx = ScoreContext(module, layer, hidden_states, query, scaling, will_evict)
        with torch.no_grad(), scope(SCORE):
            method.update_scores(ctx)
    if will_evict:
        threshold = config.threshold if config.mode == "threshold" else None
        if config.head_allocation == "adaptive":
            budgets = adaptive_head_counts(layer, budgets, config)  # [B, H] from the current scores
        with scope(EVICT):
            layer.evict(budgets, config.sink_tokens, config.recent_window, threshold)
    return out.transpose(1, 2).contiguous(), None


def static_step(module, query, layer, method, hidden_states, scaling):
    """A static-shape decoding step (issue 19, `trainkv.static_decode`): attention over the layer's slots, the
    method's scores, then one slot replaced per (row, head). No host read, no allocation beyond temporaries.

    Methods see ``will_evict=True`` at every step (scores are recomputed each step; only the eviction decision
    is made on the device). Method state that a method replaces (e.g. ``layer.scores = ...``, a query window)
    is copied back into the tensor it replaced when shapes agree, so the buffers a CUDA graph reads stay put.
    """
    slots = layer.slots
    out = slots.attend(layer, query, scaling)
    if method is not None:
        before = _state_tensors(layer)
        ctx = ScoreContext(module, layer, hidden_states, query, scaling, True)
        with torch.no_grad(), scope(SCORE):
            method.update_scores(ctx)
        _restore_identity(layer, before)
    with scope(EVICT):
        slots.evict(layer)
    return out.transpose(1, 2).contiguous(), None


_LAYER_TENSORS = ("keys", "values", "positions", "scores", "valid")


def _state_tensors(layer) -> dict:
    out = {name: getattr(layer, name) for name in _LAYER_TENSORS}
    for key, value in layer.state.items():
        if torch.is_tensor(value):
            out[("state", key)] = value
    return out


def _restore_identity(layer, before: dict) -> None:
    """Where a method replaced a layer tensor by a new one of the same shape and dtype, copy the new values into
    the old tensor and put it back (a captured graph keeps reading and writing the same memory)."""
    for name, old in before.items():
        if isinstance(name, tuple):
            new = layer.state.get(name[1])
        else:
            new = getattr(layer, name)
        if new is old or not torch.is_tensor(new) or new.shape != old.shape or new.dtype != old.dtype:
            continue
        if new.untyped_storage().data_ptr() == old.untyped_storage().data_ptr():
            new = new.clone()  # a view of the old tensor: copy through a temporary
        old.copy_(new)
        if isinstance(name, tuple):
            layer.state[name[1]] = old
        else:
            setattr(layer, name, old)


def register() -> None:
    """Register the attention function and (for plain forwards) the SDPA mask builder under ``"trainkv"``."""
    AttentionInterface.register(ATTN_NAME, trainkv_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
