"""Static-shape decoding for `EvictingCache` (issue 19): one fixed buffer per layer, one slot replaced per step.

Once a layer's cache is at its budget, a decoding step adds one entry per (row, KV head) and evicts one, so
its shapes never change. `SlotState` keeps each layer in a preallocated buffer of ``S`` slots
(``S - 1 >= `` the layer's largest head budget, rounded up to `SLOT_ALIGN`); the last slot receives the
new token. A step is:

1. write the new key / value / position into slot ``S - 1`` (`SlotState.append`);
2. attend over all ``S`` slots, invalid ones masked (`SlotState.attend`);
3. the method updates its scores over the slots, exactly as on the compacted cache;
4. per (row, head), pick the slot to overwrite (`select_slots`): when the head holds more than its
   budget, the lowest-scored entry that is neither a sink, in the recent window nor padding (the new
   token itself when it is the lowest: it is then dropped); otherwise the first free slot; move the
   new entry there and free slot ``S - 1``.

The kept *set* is exactly what today's top-k-then-compact keeps (one entry enters, the lowest-priority
one leaves); only the order of entries inside the buffer differs. Attention does not depend on that
order (positions are stored, the mask comes from validity). Two methods' scores do (SnapKV pools
neighbouring entries, TOVA averages heads slot by slot); for them (``EvictionMethod.static_layout``)
the layer also tracks where each entry would sit in today's compacted layout (``order``, ``length``)
and the method reads its scores through `EvictingLayer.to_layout` / `from_layout`. Leaving the static
mode (end of `generate`, a multi-token forward, a batch change) gathers the buffer back into today's
layout.

No step reads a device value on the host and no step allocates more than small temporaries, so a
whole decoding forward can be captured as a CUDA graph (`trainkv.decode_graphs`).

Ground floor: imports nothing from trainkv.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

logger = logging.getLogger("trainkv.decode")

#: Slots are rounded up to a multiple of this (aligned rows for the fused attention kernels).
SLOT_ALIGN = 8
#: Environment switches: ``1`` / ``0`` force the static decode path / CUDA graphs on or off (default: on CUDA).
ENV_STATIC = "TRAINKV_STATIC_DECODE"
ENV_GRAPHS = "TRAINKV_CUDA_GRAPHS"

_LOGGED: set[str] = set()


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` (one line, prefixed ``trainkv:``) the first time it occurs in this process."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, "trainkv: %s", message)


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


@dataclass(frozen=True)
class DecodeOptions:
    """How decoding steps run once the cache is at its budget.

    static: the static-shape slot-replacement step (None: on for CUDA and other accelerators, off on CPU, where
        today's compacting step stays the default; ``TRAINKV_STATIC_DECODE=1/0`` overrides None).
    cuda_graphs: capture the static step as a CUDA graph, per batch size and buffer shape, reused across
        `generate` calls (None: on wherever the static step runs on CUDA; ``TRAINKV_CUDA_GRAPHS=1/0`` overrides
        None). Without CUDA it is always off.
    compile_step: run the slot selection through `torch.compile` (fuses ~30 small kernels per layer into a few;
        None: on with CUDA graphs). Falls back to eager, logged once, if compiling fails.
    max_graphs: CUDA graphs kept per model (least recently used dropped first; each holds its cache buffers).
    """

    static: bool | None = None
    cuda_graphs: bool | None = None
    compile_step: bool | None = None
    max_graphs: int = 4

    def merged(self, other: "DecodeOptions | dict | None" = None, **changes) -> "DecodeOptions":
        out = self
        if isinstance(other, DecodeOptions):
            out = other
        elif isinstance(other, dict):
            out = replace(self, **other)
        elif other is not None:
            raise TypeError(f"decode options must be DecodeOptions, a dict or None, got {type(other).__name__}")
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(out, **changes) if changes else out

    def static_enabled(self, device: torch.device) -> bool:
        wanted = self.static if self.static is not None else _env_flag(ENV_STATIC)
        return wanted if wanted is not None else device.type != "cpu"

    def graphs_enabled(self, device: torch.device) -> bool:
        if device.type != "cuda" or not self.static_enabled(device):
            return False
        wanted = self.cuda_graphs if self.cuda_graphs is not None else _env_flag(ENV_GRAPHS)
        return True if wanted is None else wanted

    def compile_enabled(self, device: torch.device) -> bool:
        return self.compile_step if self.compile_step is not None else self.graphs_enabled(device)


def static_budgets(config, layer_idx: int, num_kv_heads: int, horizon: int | None = None) -> list[int] | None:
    """Per-head entry counts a layer keeps in static decode: its fixed budgets; under Ada-KV
    (``head_allocation="adaptive"``) the split only when it cannot move (None otherwise).

    Ada-KV splits a layer's total ``T`` anew at every eviction, each head keeping at least its safeguard
    ``ceil(adaptive_floor * T / H)``. When ``H`` safeguards cover ``T`` (and the protected tokens), every head
    keeps exactly its safeguard at every step (`trainkv.budgets.adaptive_head_counts`): a fixed split.
    """
    budgets = config.budget_for(layer_idx, num_kv_heads, 0, horizon)
    if config.head_allocation != "adaptive" or num_kv_heads == 1:
        return budgets
    total = sum(budgets)
    safe = math.ceil(config.adaptive_floor * total / num_kv_heads)
    if safe * num_kv_heads >= total and safe >= config.sink_tokens + config.recent_window:
        return [safe] * num_kv_heads
    return None


def unsupported_reason(config, num_layers: int | None = None, num_kv_heads: int | None = None) -> str | None:
    """Why an `EvictionConfig` cannot decode with static shapes (None: it can)."""
    if config.mode == "threshold":
        return "static decode off: threshold mode keeps a data-dependent number of entries; using the compacting step"
    if not config.evict_during_decoding:
        return "static decode off: evict_during_decoding=False lets the cache grow; using the compacting step"
    if isinstance(config.budget, float) and config.layer_budgets is None and config.head_budgets is None:
        return "static decode off: a ratio budget grows with the tokens seen; using the compacting step"
    if config.head_allocation == "adaptive":
        if num_kv_heads is None:  # not known before the first forward: decided at the first decoding step
            return None
        if not all(static_budgets(config, i, num_kv_heads) for i in range(num_layers)):
            return ("static decode off: Ada-KV (head_allocation='adaptive') moves entries between heads at every "
                    "step (a head may grow to the layer total minus the other heads' floors); "
                    "using the compacting step")
    return None


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


# ---------------------------------------------------------------------------------------------------------
# the slot choice: a pure function of small tensors (compilable)
# ---------------------------------------------------------------------------------------------------------
def select_slots(positions: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor,
                 order: torch.Tensor | None, length: torch.Tensor | None, sink: int, window: int):
    """The slot each (row, head) writes its new entry to, and the layout bookkeeping, for one step.

    positions / scores / valid: ``[B, H, S]`` with the new entry in slot ``S - 1`` (valid); budgets ``[H]``.
    Returns ``(j, new_score, new_position, order_after, length_after)``: ``j`` ``[B, H]`` is the slot that
    receives the new entry (``S - 1``: it is dropped). Protected entries are the sinks (position <
    ``sink``) and the ``window`` most recent positions, as `EvictingLayer.protected_mask` defines them.
    ``order``/``length`` (today's layout index of every slot, today's layout length) are None when not
    tracked; then the last two results are None.
    """
    n = positions.shape[-1] - 1
    new_position = positions[..., n]  # [B, H]
    new_score = scores[..., n]
    protected = (positions < sink) | (positions > (new_position - window)[..., None])
    candidates = scores.masked_fill(protected | ~valid, float("inf"))
    count = valid.sum(-1)  # [B, H], the new entry included
    over = count > budgets
    # Index minima written as min-reductions over slot numbers (explicit tie rule: the lowest slot; argmin's
    # tie behaviour differs between backends, and inductor's CPU argmin over bytes was seen to be wrong).
    slot = torch.arange(n + 1, device=positions.device)
    lowest = candidates.amin(-1, keepdim=True)
    j_evict = torch.where(candidates == lowest, slot, n + 1).amin(-1)  # lowest-scored evictable (new one included)
    j_free = torch.where(valid[..., :n], n + 1, slot[:n]).amin(-1)  # first free slot (exists when not over budget)
    j = torch.where(over, j_evict, j_free)
    if order is None:
        return j, new_score, new_position, None, None
    # Today's layout after this step (see the module doc): the layer compacts when any head is over budget.
    big = torch.iinfo(order.dtype).max
    old = valid.clone()
    old[..., n] = False
    lead = order.masked_fill(~old, big).amin(-1)  # leading invalid entries of today's layout
    vj = order.gather(-1, j[..., None])  # layout index of the entry leaving (the new one's when it is dropped)
    compacts = over.any()
    kept = count - over.to(count.dtype)
    shifted = order - lead[..., None] - ((order > vj) & over[..., None]).to(order.dtype)
    order_after = torch.where(compacts, shifted, order)
    new_index = torch.where(compacts, kept - 1, length.expand_as(kept))
    order_after = order_after.scatter(-1, j[..., None], new_index[..., None])
    length_after = torch.where(compacts, kept.amax(), length + 1)
    return j, new_score, new_position, order_after, length_after


_COMPILED: dict[str, object] = {}


def compiled_select_slots(*args):
    """`select_slots` through `torch.compile` (dynamic shapes: one compilation for every budget and batch size);
    eager for good, logged once, if compiling or running the compiled function fails (it is pure: rerunning is
    safe)."""
    if _COMPILED.get("failed") is None:
        try:
            fn = _COMPILED.get("fn")
            if fn is None:
                fn = _COMPILED["fn"] = torch.compile(select_slots, dynamic=True, fullgraph=True)
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager from now on
            _COMPILED["failed"] = f"{type(exc).__name__}: {exc}"
            reason = _COMPILED["failed"][:300]
            log_once(f"compiling the static decode slot choice failed, running it eagerly ({reason})", logging.WARNING)
    return select_slots(*args)


def compile_status() -> dict:
    """Whether the slot choice ran compiled (for benchmark records)."""
    return {"compiled": _COMPILED.get("fn") is not None and _COMPILED.get("failed") is None,
            "failure": _COMPILED.get("failed")}


# ---------------------------------------------------------------------------------------------------------
# one layer's slots
# ---------------------------------------------------------------------------------------------------------
class SlotState:
    """The static-shape state of one `EvictingLayer` while decoding (module doc).

    The layer's own ``keys``/``values`` ``[B, H, S, D]``, ``positions``/``scores``/``valid`` ``[B, H, S]`` are
    the slot buffers; this holds the rest: per-head budgets on the device, and (``track``) today's layout
    index of every slot plus today's layout length.
    """

    def __init__(self, budgets: torch.Tensor, capacity: int, sink: int, window: int, order: torch.Tensor | None,
                 length: torch.Tensor | None, span: int, compile_step: bool = False, max_seen: int | None = None):
        self.budgets = budgets
        self.capacity = capacity
        self.max_seen = max_seen  # slots sized for at most this many tokens seen (None: by the budgets)
        self.sink = sink
        self.window = window
        self.order = order
        self.length = length
        self.span = span  # size of today's-layout views (> any layout index)
        self.compile_step = compile_step
        self._new: tuple | None = None  # (key, value) of the step in flight

    @property
    def track(self) -> bool:
        return self.order is not None

    @property
    def new_slot(self) -> int:
        return self.capacity - 1

    # --- entering / leaving ------------------------------------------------------------------------
    @classmethod
    def enter(cls, layer, budgets: list[int], sink: int, window: int, track: bool, compile_step: bool = False,
              horizon: int | None = None) -> "SlotState | None":
        """Move a compacted layer into slot buffers (returns None, leaving the layer as it is, when some head
        holds more than its budget).

        ``horizon``: the most tokens this cache will have seen (prompt + new tokens, when generate knows it); a
        head never holds more entries than tokens seen, so the buffer needs no more slots than that.
        """
        b, h, length, d = layer.keys.shape
        held = layer.held_counts()
        if held is not None:
            fits = all(n <= x for n, x in zip(held, budgets))
        else:  # padding: counts differ per row; one device read, once per generate
            fits = bool((layer.kept_counts() <= torch.tensor(budgets, device=layer.device)).all())
        if not fits:
            return None
        limit = max(budgets) if horizon is None else max(length, min(max(budgets), horizon))
        capacity = _round_up(limit + 1, SLOT_ALIGN)
        max_seen = capacity - 1 if max(budgets) > capacity - 1 else None
        dev = layer.device
        valid_old = layer.valid
        if length <= capacity - 1:
            index = None
            take = length
        else:  # more layout positions than slots (leading padding): valid entries first, their layout index kept
            key = (~layer.valid_mask()).to(torch.int8)
            index = torch.argsort(key, dim=-1, stable=True)[..., : capacity - 1]
            take = capacity - 1

        def fill(src: torch.Tensor, shape, value, dtype) -> torch.Tensor:
            out = torch.full(shape, value, dtype=dtype, device=dev)
            if index is not None:
                src = src.gather(2, index if src.dim() == 3 else index[..., None].expand(-1, -1, -1, d))
            out[:, :, :take] = src
            return out

        keys = fill(layer.keys, (b, h, capacity, d), 0, layer.keys.dtype)
        values = fill(layer.values, (b, h, capacity, d), 0, layer.values.dtype)
        positions = fill(layer.positions, (b, h, capacity), -1, torch.long)
        scores = fill(layer.scores, (b, h, capacity), 0, torch.float32)
        valid_src = valid_old if valid_old is not None else torch.ones((b, h, length), dtype=torch.bool, device=dev)
        valid = fill(valid_src, (b, h, capacity), False, torch.bool)
        order = length_t = None
        if track:
            slots = torch.arange(length, device=dev).expand(b, h, length)
            order = fill(slots, (b, h, capacity), 0, torch.long)
            length_t = torch.tensor(length, device=dev)
        state = cls(torch.tensor(budgets, device=dev), capacity, sink, window, order, length_t,
                    span=max(2 * capacity, length + capacity + 1), compile_step=compile_step, max_seen=max_seen)
        layer.keys, layer.values, layer.positions, layer.scores, layer.valid = keys, values, positions, scores, valid
        layer._held = None
        return state

    def to_compact(self, layer) -> None:
        """Gather the slots back into today's compacted layout (time order; exact layout when tracked)."""
        b, h, capacity, d = layer.keys.shape
        dev = layer.device
        valid = layer.valid
        if self.track:
            length = int(self.length)
            index = self.order.masked_fill(~valid, length).clamp(max=length)
        else:  # valid entries first, in time order
            length = int(valid.sum(-1).max()) if valid.numel() else 0
            key = layer.positions.masked_fill(~valid, torch.iinfo(torch.long).max)
            rank = torch.argsort(torch.argsort(key, dim=-1, stable=True), dim=-1)
            index = rank.masked_fill(~valid, length).clamp(max=length)
        slot_of = torch.full((b, h, length + 1), capacity - 1, dtype=torch.long, device=dev)  # slot S-1: free
        slot_of.scatter_(-1, index, torch.arange(capacity, device=dev).expand(b, h, capacity))
        slot_of = slot_of[..., :length]  # layout positions without an entry point at the free slot S-1 (invalid)
        gather = slot_of[..., None].expand(-1, -1, -1, d)
        layer.keys = layer.keys.gather(2, gather)
        layer.values = layer.values.gather(2, gather)
        layer.positions = layer.positions.gather(2, slot_of)
        layer.scores = layer.scores.gather(2, slot_of)
        kept = valid.gather(2, slot_of)
        layer.valid = None if bool(kept.all()) else kept
        layer._held = None

    # --- one step ----------------------------------------------------------------------------------
    def append(self, layer, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor) -> None:
        """Write the new token (``key``/``value`` ``[B, H, 1, D]``, ``position`` ``[B, H]``) into the last slot."""
        n = self.new_slot
        layer.keys[:, :, n].copy_(key[:, :, 0])
        layer.values[:, :, n].copy_(value[:, :, 0])
        layer.positions[:, :, n].copy_(position)
        layer.scores[:, :, n].zero_()
        layer.valid[:, :, n].fill_(True)
        if self.track:
            self.order[:, :, n].copy_(self.length.expand(position.shape))
        self._new = (key, value, position)

    def attend(self, layer, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of one new query per row ``[B, Hq, 1, D]`` over the slots (invalid ones masked)."""
        keys = layer.keys
        b, hkv, _, d = keys.shape
        hq = query.shape[1]
        q = query.reshape(b, hkv, hq // hkv, d)  # the g query heads of a KV head as g query rows
        out = F.scaled_dot_product_attention(q, keys, layer.values, attn_mask=layer.valid[:, :, None, :], scale=scaling)
        return out.reshape(b, hq, 1, d)

    def evict(self, layer) -> None:
        """Keep the budget: move the new entry into its slot (`select_slots`), free the last slot."""
        select = compiled_select_slots if self.compile_step else select_slots
        j, new_score, new_position, order_after, length_after = select(
            layer.positions, layer.scores, layer.valid, self.budgets, self.order, self.length, self.sink, self.window)
        key, value, position = self._new
        self._new = None
        index = j[..., None]
        wide = index[..., None].expand(-1, -1, 1, key.shape[-1])
        layer.keys.scatter_(2, wide, key)
        layer.values.scatter_(2, wide, value)
        layer.positions.scatter_(2, index, position[..., None])  # the step's input, not a view of the buffer
        layer.scores.scatter_(2, index, new_score[..., None].clone())  # a view of the buffer's last slot
        layer.valid.scatter_(2, index, True)
        layer.valid[:, :, self.new_slot].fill_(False)
        if self.track:
            self.order.copy_(order_after)
            self.length.copy_(length_after)

    # --- today's layout views (identity on the compacted cache) --------------------------------------
    def to_layout(self, layer, x: torch.Tensor) -> torch.Tensor:
        """A per-slot tensor ``[B, H, S]`` laid out as today's compacted cache ``[B, H, span]`` (zeros elsewhere)."""
        index = self.order.masked_fill(~layer.valid, self.span)
        out = x.new_zeros((*x.shape[:-1], self.span + 1))
        return out.scatter_(-1, index, x)[..., : self.span]

    def from_layout(self, layer, y: torch.Tensor) -> torch.Tensor:
        """Back from today's layout ``[B, H or 1, span]`` to the slots ``[B, H, S]`` (invalid slots: 0)."""
        index = self.order.masked_fill(~layer.valid, self.span)
        y = F.pad(y, (0, 1)).expand(*index.shape[:-1], self.span + 1)
        return y.gather(-1, index)

    # --- batch changes -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"budgets": self.budgets}
        if self.track:
            out.update(order=self.order, length=self.length)
        return out

    def select_rows(self, index: torch.Tensor) -> None:
        """Reorder rows in place (beam search); the batch size stays."""
        if self.track:
            self.order.copy_(self.order.index_select(0, index))


__all__ = ["DecodeOptions", "ENV_GRAPHS", "ENV_STATIC", "SLOT_ALIGN", "SlotState", "compile_status",
           "compiled_select_slots", "log_once",
           "select_slots", "static_budgets", "unsupported_reason"]
