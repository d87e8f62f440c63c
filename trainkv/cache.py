"""`EvictingCache`: a transformers `Cache` that keeps, per layer and per KV head, at most its budget.

Each layer stores keys/values as ``[batch, kv_heads, L, head_dim]`` where ``L`` is the largest number
of entries any (row, head) keeps; rows or heads that keep fewer (left padding, per-head budgets,
threshold mode) carry a validity mask. Entries are physically compacted with a gather after each
eviction, so the memory held is the kept entries, not a mask over the full context. Keys are stored
after RoPE at their original positions (no re-rotation); the position of every entry is stored too.

`get_seq_length()` returns the number of tokens *seen* (what generate uses for positions and chunk
slicing), not the number kept.

Decoding steps can instead run with static shapes (issue 19, `trainkv.static_decode`): once enabled on the
cache (``static_decode``, set by an attached model's `generate`), every one-token forward after the
prompt writes into a preallocated per-layer slot buffer and replaces one slot in place; the layer leaves
that mode (back to the compacted layout) on any other forward and at the end of `generate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import EvictionConfig
from .static_decode import SlotState, log_once, static_budgets, unsupported_reason


class EvictingLayer(CacheLayerMixin):
    """One decoder layer's compacted, per-head cache."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, layer_idx: int, owner: "EvictingCache"):
        super().__init__()
        self.layer_idx = layer_idx
        self.owner = owner
        self.seen = 0
        self.new_tokens = 0
        self.valid: torch.Tensor | None = None  # [B, H, L] bool; None = every entry valid
        self.positions: torch.Tensor | None = None  # [B, H, L] int64, original token positions (-1: padding)
        self.scores: torch.Tensor | None = None  # [B, H, L] float32, the method's keep-scores
        self.state: dict = {}  # method-specific running state (e.g. a query buffer)
        # Host-side entries held per KV head (same in every row), recorded with the validity tensor they
        # describe: lets eviction with ragged heads run without reading counts back from the device.
        self._held: tuple[torch.Tensor, list[int]] | None = None
        self.slots: SlotState | None = None  # static decode (issue 19): set while the layer is a slot buffer

    # --- transformers CacheLayerMixin API -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, _ = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((b, h, 0, key_states.shape[-1]))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, h, 0), dtype=torch.long, device=self.device)
        self.scores = torch.empty((b, h, 0), dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, c, _ = key_states.shape
        call_kwargs = kwargs.get("kwargs", kwargs) or {}
        if self.owner.static_step or self.slots is not None:
            if self.owner.static_step and c == 1 and self._static_update(key_states, value_states, call_kwargs):
                return self.keys, self.values
            self.exit_static()
        pos = call_kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(self.seen, self.seen + c, device=self.device)[None]
        pos = pos.to(self.device, torch.long).reshape(-1, c).expand(b, c)[:, None, :].expand(b, h, c)
        new_valid = self.owner.pending_valid
        if new_valid is not None and new_valid.shape != (b, c):
            raise ValueError(f"attention_mask covers {tuple(new_valid.shape)} new tokens, the input has {(b, c)}")
        if new_valid is not None:
            # Padding gets position -1, so no score computed by position (causality) sees a pad query attend.
            pos = pos.masked_fill(~new_valid[:, None, :], -1)
        held = self.held_counts()
        if new_valid is not None or self.valid is not None:
            old = self.valid if self.valid is not None else self._all_valid(self.keys.shape[-2])
            new = new_valid[:, None, :].expand(b, h, c) if new_valid is not None else self._all_valid(c)
            self.valid = torch.cat([old, new], dim=-1)
            self._held = (self.valid, [n + c for n in held]) if held is not None and new_valid is None else None
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, pos], dim=-1)
        self.scores = F.pad(self.scores, (0, c))  # new entries score 0 until the method scores them
        self.seen += c
        self.new_tokens = c
        return self.keys, self.values

    def _static_update(self, key_states, value_states, call_kwargs) -> bool:
        """A static decode step's write (issue 19): enter the slot buffers if needed, put the new token in the
        last slot. False (nothing done) when the layer cannot enter them now (a head above its budget)."""
        if self.slots is None:
            owner = self.owner
            config = owner.config
            budgets = static_budgets(config, self.layer_idx, self.keys.shape[1], owner.decode_horizon)
            self.slots = SlotState.enter(self, budgets, config.sink_tokens, config.recent_window, owner.track_layout,
                                         compile_step=owner.compile_step, horizon=owner.decode_horizon)
            if self.slots is None:
                log_once("static decode: a head holds more than its budget; this step compacts instead")
                return False
        elif self.slots.max_seen is not None and self.seen + 1 > self.slots.max_seen:
            log_once("static decode: more tokens than the decoding horizon the slots were sized for; compacting")
            return False
        b, h = self.keys.shape[:2]
        pos = call_kwargs.get("position_ids")
        if pos is None:
            pos = torch.full((b, 1), self.seen, dtype=torch.long, device=self.device)
        pos = pos.to(self.device, torch.long).reshape(-1, 1)[:, :1].expand(b, h)
        self.slots.append(self, key_states, value_states, pos)
        self.seen += 1
        self.new_tokens = 1
        return True

    def exit_static(self) -> None:
        """Leave the slot buffers: today's compacted layout again (no-op when not in them)."""
        if self.slots is not None:
            slots, self.slots = self.slots, None
            slots.to_compact(self)

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """A per-entry tensor ``[B, H, L]`` in the order of the compacted cache (identity unless the layer is in
        static decode with layout tracking; see `trainkv.static_decode`). Methods whose scores depend on
        neighbouring entries or on slot-aligned heads compute through it."""
        return x if self.slots is None or not self.slots.track else self.slots.to_layout(self, x)

    def from_layout(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_layout` (``y`` may have one head, broadcast to all)."""
        return y if self.slots is None or not self.slots.track else self.slots.from_layout(self, y)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only the new tokens' block is built by transformers' mask code; eviction-aware masking
        # over the stored entries happens in trainkv's attention function.
        if not self.owner.runtime_bound:
            raise RuntimeError(
                "EvictingCache was passed to a model without the trainkv runtime; its attention would ignore the "
                "stored entries' validity and positions. Call trainkv.attach(model, ...) first."
            )
        return query_length, self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.owner)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "EvictingCache cannot be cropped (evicted entries are gone); assisted/speculative decoding is not supported"
        )

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        if self.slots is not None:
            if index.numel() == self.keys.shape[0]:  # beam reordering: in place, the buffers (and graphs) stay
                self._select_rows_in_place(index.to(self.device))
                return
            self.exit_static()
        held = self.held_counts()  # the same for every row, so any row selection keeps it
        for name in ("keys", "values", "positions", "scores", "valid"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))
        for key, t in list(self.state.items()):
            if torch.is_tensor(t) and t.dim() > 0:
                self.state[key] = t.index_select(0, index.to(t.device))
        self._held = (self.valid, held) if held is not None and self.valid is not None else None

    def _select_rows_in_place(self, index: torch.Tensor) -> None:
        for name in ("keys", "values", "positions", "scores", "valid"):
            t = getattr(self, name)
            t.copy_(t.index_select(0, index))
        self.slots.select_rows(index)
        for key, t in list(self.state.items()):
            if torch.is_tensor(t) and t.dim() > 0:
                moved = t.index_select(0, index)
                if moved.shape == t.shape:
                    t.copy_(moved)
                else:
                    self.state[key] = moved

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.exit_static()
        if self.is_initialized:
            b = self.keys.shape[0]
            self._select_batch(torch.arange(b, device=self.device).repeat_interleave(repeats))

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.is_initialized else -1

    # --- eviction ------------------------------------------------------------------------------
    def _all_valid(self, length: int) -> torch.Tensor:
        b, h = self.keys.shape[:2]
        return torch.ones((b, h, length), dtype=torch.bool, device=self.device)

    def valid_mask(self) -> torch.Tensor:
        return self.valid if self.valid is not None else self._all_valid(self.keys.shape[-2])

    def protected_mask(self, sink_tokens: int, recent_window: int) -> torch.Tensor:
        """Sink tokens (position < sink_tokens) and the `recent_window` most recent positions of each row."""
        positions = self.positions if self.valid is None else self.positions.masked_fill(~self.valid, -1)
        current = positions.amax(dim=-1, keepdim=True)
        protected = (self.positions < sink_tokens) | (self.positions > current - recent_window)
        return protected if self.valid is None else protected & self.valid

    def kept_counts(self) -> torch.Tensor:
        """Entries held per (row, KV head): ``[B, H]``."""
        return self.valid_mask().sum(-1)

    def held_counts(self) -> list[int] | None:
        """Entries held per KV head, the same in every row, when known on the host (no device sync): always
        when every entry is valid, and after evictions that left heads ragged. None when unknown (padding)."""
        if not self.is_initialized:
            return None
        if self.valid is None:
            return [self.keys.shape[-2]] * self.keys.shape[1]
        if self._held is not None and self._held[0] is self.valid:
            return self._held[1]
        return None

    def _host_counts(self, budgets: torch.Tensor, threshold: float | None) -> list[int] | None:
        """Entries each KV head keeps (every row alike), as Python ints, when that needs no device sync: held
        counts known, budget mode, per-head budgets on the CPU. None otherwise."""
        held = self.held_counts()
        if held is None or threshold is not None or budgets.device.type != "cpu" or budgets.dim() > 1:
            return None
        limit = budgets.tolist() if budgets.dim() == 1 else [budgets.tolist()] * len(held)  # CPU: no device sync
        return [min(n, int(x)) for n, x in zip(held, limit)]

    def evict(self, budgets: torch.Tensor, sink_tokens: int, recent_window: int, threshold: float | None = None) -> None:
        """Keep, per (row, head), the protected entries plus the best-scored ones, up to ``budgets[h]``
        (``budgets`` ``[H]``, or ``[B, H]`` for per-row counts, e.g. Ada-KV's adaptive split).

        In threshold mode only entries scoring above ``threshold`` (or protected) are candidates.
        Kept entries are gathered into a smaller tensor (time order preserved). In budget mode with CPU
        budgets and no padding, how many entries each head holds and keeps is known on the host and the
        eviction runs without a device sync.
        """
        if not self.is_initialized or self.keys.shape[-2] == 0:
            return
        b, h, length = self.scores.shape
        protected = self.protected_mask(sink_tokens, recent_window)
        priority = self.scores.masked_fill(protected, float("inf"))
        if self.valid is not None:
            priority = priority.masked_fill(~self.valid, float("-inf"))
        host = self._host_counts(budgets, threshold)
        if host is not None:
            keep_len = max(host)
            uniform = all(x == keep_len for x in host)
            if keep_len == length and uniform:
                return  # nothing to drop
            count = None if uniform else torch.tensor(host, device=self.device).view(1, h)
        else:
            valid = self.valid_mask()
            limit = budgets.to(self.device)
            limit = limit.view(1, h).expand(b, h) if limit.dim() <= 1 else limit.view(b, h)  # [H] or per-row [B, H]
            if threshold is not None:
                candidates = protected | (valid & (self.scores > threshold))
                count = torch.minimum(candidates.sum(-1), limit)
            else:
                count = torch.minimum(valid.sum(-1), limit)
            keep_len = int(count.max())
            if keep_len == length and bool((count == length).all()):
                return  # nothing to drop
            uniform = False
        top = priority.topk(keep_len, dim=-1, sorted=True).indices  # best first
        if uniform:  # every (row, head) keeps keep_len entries: no dropped slots
            index = top.sort(dim=-1).values  # time order
            kept_all = True
        else:
            keep = torch.arange(keep_len, device=self.device) < count[..., None]
            index = top.masked_fill(~keep, length).sort(dim=-1).values  # time order; dropped slots last
            kept = index < length
            index = index.clamp(max=length - 1)
            kept_all = host is None and bool(kept.all())
        gather = index[..., None]
        self.keys = self.keys.gather(2, gather.expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, gather.expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = self.positions.gather(2, index)
        self.scores = self.scores.gather(2, index)
        self.valid = None if kept_all else kept
        self._held = (kept, host) if host is not None and not kept_all else None

    def nbytes(self) -> dict[str, int]:
        """Bytes held: keys+values, and the bookkeeping (positions, scores, validity)."""
        if not self.is_initialized:
            return {"kv": 0, "meta": 0}
        kv = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        meta = sum(t.numel() * t.element_size() for t in (self.positions, self.scores, self.valid) if t is not None)
        return {"kv": kv, "meta": meta}


class EvictingCache(Cache):
    """Per-layer, per-KV-head budgeted cache; pass it to ``generate(cache=...)`` or let an attached model build it."""

    def __init__(self, num_layers: int, config: EvictionConfig | None = None):
        super().__init__(layers=[EvictingLayer(i, self) for i in range(num_layers)])
        self.config = config or EvictionConfig()
        for name in ("layer_budgets", "head_budgets", "allocation_weights"):
            values = getattr(self.config, name)
            if values is not None and len(values) != num_layers:
                raise ValueError(f"{name} has {len(values)} entries, the model has {num_layers} layers")
        self.pending_valid: torch.Tensor | None = None  # [B, c] validity of the tokens being added
        self.eviction_enabled = True  # False: append without evicting (e.g. the question after a compressed context)
        self.runtime_bound = False  # set by an attached model's forward pre-hook (see begin_forward)
        self.prefill_end: int | None = None  # tokens seen once generate's prompt is prefilled (None: unknown)
        # Static decode (issue 19, trainkv.static_decode): off for a bare cache; an attached model's generate
        # turns it on (on accelerators by default). track_layout: the method's scores depend on today's layout.
        self.static_decode = False
        self.track_layout = True
        self.compile_step = False
        self.use_graphs = False  # capture static steps as CUDA graphs (trainkv.decode_graphs; set by generate)
        self.decode_horizon: int | None = None  # most tokens the cache will see (prompt + new tokens), if known
        self.static_step = False  # this forward is a static decode step (decided in begin_forward)

    @classmethod
    def for_model(cls, model, config: EvictionConfig | None = None) -> "EvictingCache":
        text_config = model.config.get_text_config(decoder=True)
        return cls(text_config.num_hidden_layers, config)

    def begin_forward(self, attention_mask: torch.Tensor | None, num_new: int) -> None:
        """Record which of the next ``num_new`` tokens are padding (from the 2D attention mask).

        A static decode step (`wants_static_step`) reads nothing from the mask: every decoded token is taken
        as a real token (generate never feeds a padded decoding token; finished rows get pad ids with mask 1).
        """
        self.runtime_bound = True
        self.__dict__.pop("_graph_entry", None)  # an eager forward: a graph replay must re-check its binding
        self.static_step = self.wants_static_step(num_new)
        if self.static_step:
            self.pending_valid = None
            return
        if attention_mask is None or attention_mask.dim() != 2:
            self.pending_valid = None
            return
        if attention_mask.shape[-1] < num_new:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} columns but {num_new} new tokens were given; "
                "pass the mask of the whole sequence so far"
            )
        new = attention_mask[:, -num_new:].bool()
        self.pending_valid = None if bool(new.all()) else new

    def static_unsupported(self) -> str | None:
        """Why this cache's settings cannot decode with static shapes (None: they can)."""
        memo = self.__dict__.get("_static_reason")
        if memo is not None and memo[0] is self.config:
            return memo[1]
        first = self.layers[0]
        heads = first.keys.shape[1] if first.is_initialized else None
        reason = unsupported_reason(self.config, len(self.layers), heads)
        if heads is not None:
            self._static_reason = (self.config, reason)
        return reason

    def wants_static_step(self, num_new: int) -> bool:
        """Whether a forward of ``num_new`` tokens is a static decode step (host-side only, no device read):
        static decode on, one token, after the prompt, settings that keep a fixed budget, eviction enabled."""
        if not self.static_decode or num_new != 1:
            return False
        seen = self.layers[0].seen
        if seen == 0 or (self.prefill_end is not None and seen < self.prefill_end):
            return False
        reason = self.static_unsupported()
        if reason is not None:
            log_once(reason)
            return False
        if not self.eviction_enabled:
            log_once("static decode off while eviction is paused (eviction_enabled=False): the cache grows")
            return False
        return True

    def end_static(self) -> None:
        """Every layer back to today's compacted layout (end of generate; idempotent)."""
        self.static_step = False
        self.__dict__.pop("_graph_entry", None)
        for layer in self.layers:
            layer.exit_static()

    @property
    def in_static(self) -> bool:
        return all(layer.slots is not None for layer in self.layers)

    @property
    def tokens_seen(self) -> int:
        return self.get_seq_length()

    def nbytes(self) -> dict[str, int]:
        totals = {"kv": 0, "meta": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                totals[k] += v
        return totals

    def stats(self) -> dict:
        """Tokens seen, entries kept per layer and head, and bytes held."""
        kept = [layer.kept_counts().tolist() if layer.is_initialized else [] for layer in self.layers]
        return {"tokens_seen": self.tokens_seen, "kept_per_layer_head": kept, "bytes": self.nbytes()}
