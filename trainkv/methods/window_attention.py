"""Causal sliding-window attention in O(tokens x window), as a few batched SDPA calls (no unfold copy).

The Attention-Gate's own attention: query i sees keys ``(i - W, i]`` (itself always, even when it is
padding, so no softmax row is empty). Layout is the projection's natural one, ``[B, T, heads, dim]``.

Every call gets exactly ``W`` keys before its first query: the run-time ring buffer (invalid zeros at
the start of a sequence) or, for a whole sequence, ``W`` invalid zeros. With ``c`` queries:

- ``c <= W`` (decoding, short chunks): one SDPA of the ``c`` queries over the last ``c + W - 1`` keys
  with a banded mask (no mask at all for one query with a full window);
- ``c > W``: the queries are cut into blocks of ``W``; block ``j`` attends to the ``2W`` keys
  ``[previous block, own block]`` under one banded ``[W, 2W]`` mask, all blocks in one batched SDPA.

Masks are split into a host-side decision (is every key valid? then the mask is a cached constant)
and, only when some key is invalid, a mask built from the validity tensor. No host syncs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def band_mask(queries: int, keys: int, window: int, device: torch.device) -> torch.Tensor | None:
    """``[queries, keys]`` bool: the last ``queries`` of ``keys`` positions, each seeing ``(i - window, i]``.

    None when every entry is True (one query over at most ``window`` keys)."""
    if queries == 1 and keys <= window:
        return None
    qpos = torch.arange(keys - queries, keys, device=device)[:, None]
    kpos = torch.arange(keys, device=device)[None, :]
    return (kpos <= qpos) & (kpos > qpos - window)


@functools.lru_cache(maxsize=16)
def block_band_mask(window: int, device: torch.device) -> torch.Tensor:
    """``[W, 2W]`` bool: query ``r`` of a block sees key ``s`` of ``[previous block, own block]`` iff ``r < s <= r + W``."""
    r = torch.arange(window, device=device)[:, None]
    s = torch.arange(2 * window, device=device)[None, :]
    return (s > r) & (s <= r + window)


@functools.lru_cache(maxsize=64)
def last_diagonal(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """``[queries, keys]`` bool: True where query i meets its own key (the last ``queries`` keys)."""
    return torch.eye(queries, keys, dtype=torch.bool, device=device).roll(keys - queries, dims=1)


def _blocks(x: torch.Tensor, window: int, nblocks: int) -> torch.Tensor:
    """``[B, W + nblocks*W, ...]`` -> ``[B, nblocks, 2W, ...]``: each block with the block before it."""
    b, rest = x.shape[0], x.shape[2:]
    span = nblocks * window
    prev = x[:, :span].reshape(b, nblocks, window, *rest)
    own = x[:, window:window + span].reshape(b, nblocks, window, *rest)
    return torch.cat([prev, own], dim=2)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive one SDPA uses (0 where True, -inf where False), built once here
    instead of inside every SDPA call."""
    return mask.to(dtype).log_()


@functools.lru_cache(maxsize=64)
def _constant_mask(queries: int, window: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    if queries <= window:
        band = band_mask(queries, queries + window - 1, window, device)
        return None if band is None else additive(band, dtype)
    return additive(block_band_mask(window, device), dtype)


def window_mask(queries: int, window: int, valid: torch.Tensor | None, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The additive attention mask `sliding_window_attention` needs for ``queries`` new tokens after ``window`` keys.

    ``valid``: ``[B, window + queries]`` key validity, or None when every key is valid (known on the host:
    the mask is then a cached constant). Returns a ``dtype`` mask broadcastable to the SDPA scores of
    `sliding_window_attention`, or None when nothing is masked.
    """
    if valid is None:
        return _constant_mask(queries, window, device, dtype)
    if queries <= window:
        keys = queries + window - 1
        band = band_mask(queries, keys, window, device)
        visible = valid[:, None, None, -keys:]  # [B, 1, 1, keys]
        if band is not None:
            visible = visible & band
        return additive(visible | last_diagonal(queries, keys, device), dtype)  # [B, 1, c, keys]
    band = block_band_mask(window, device)
    nblocks = -(-queries // window)
    pad = nblocks * window - queries
    vb = _blocks(F.pad(valid, (0, pad), value=False), window, nblocks)  # [B, nb, 2W]
    mask = (band & vb[:, :, None, :]) | last_diagonal(window, 2 * window, device)  # [B, nb, W, 2W]
    return additive(mask.flatten(0, 1)[:, None], dtype)  # [B*nb, 1, W, 2W]


def sliding_window_attention(q: torch.Tensor, kv: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Sliding-window attention of ``c`` queries ``q`` ``[B, c, h, d]`` over ``kv`` ``[B, W + c, 2, h, d]``
    (keys and values of the ``W`` positions before the queries, then of the queries' own positions).

    ``mask`` comes from `window_mask`. Returns ``[B, c, h, d]``; scale ``d ** -0.5``.
    """
    b, c, h, d = q.shape
    if mask is not None and mask.dtype != q.dtype:  # e.g. under autocast: SDPA wants the query's dtype
        mask = mask.to(q.dtype)
    if c <= window:
        keys = kv[:, kv.shape[1] - (c + window - 1):]
        k, v = keys[:, :, 0].transpose(1, 2), keys[:, :, 1].transpose(1, 2)  # [B, h, keys, d]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
        return out.transpose(1, 2)
    nblocks = -(-c // window)
    pad = nblocks * window - c
    if pad:
        q = F.pad(q, (0, 0, 0, 0, 0, pad))
        kv = F.pad(kv, (0, 0, 0, 0, 0, 0, 0, pad))
    qb = q.reshape(b, nblocks, window, h, d).transpose(2, 3).reshape(b * nblocks, h, window, d)
    kvb = _blocks(kv, window, nblocks)  # [B, nb, 2W, 2, h, d]
    k = kvb[:, :, :, 0].transpose(2, 3).reshape(b * nblocks, h, 2 * window, d)
    v = kvb[:, :, :, 1].transpose(2, 3).reshape(b * nblocks, h, 2 * window, d)
    out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask)  # [B*nb, h, W, d]
    out = out.reshape(b, nblocks, h, window, d).transpose(2, 3).reshape(b, nblocks * window, h, d)
    return out[:, :c]


def window_attention(q, k, v, valid: torch.Tensor | None, window: int) -> torch.Tensor:
    """Causal sliding-window attention for the last ``c`` of ``n`` tokens (head-major layout).

    q ``[B, h, c, d]`` are the queries of the last c tokens; k, v ``[B, h, n, d]`` all n tokens; valid
    ``[B, n]`` marks real (non-padding) tokens (None: all). Query i sees keys (i - window, i]; itself
    always. Returns ``[B, h, c, d]``.
    """
    b, h, c, d = q.shape
    n = k.shape[2]
    kv = torch.stack([k, v], dim=2).permute(0, 3, 2, 1, 4)  # [B, n, 2, h, d]
    if valid is None:
        valid = torch.ones((b, n), dtype=torch.bool, device=q.device)
    span = c + window
    if n >= span:
        kv, valid = kv[:, n - span:], valid[:, n - span:]
    else:
        kv = F.pad(kv, (0, 0, 0, 0, 0, 0, span - n, 0))
        valid = F.pad(valid, (span - n, 0), value=False)
    mask = window_mask(c, window, valid, q.device, q.dtype)
    return sliding_window_attention(q.transpose(1, 2), kv, window, mask).transpose(1, 2)


__all__ = ["band_mask", "block_band_mask", "additive", "last_diagonal", "sliding_window_attention", "window_attention", "window_mask"]
