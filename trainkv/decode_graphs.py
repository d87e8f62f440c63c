"""CUDA graphs of the static decode step (issue 19): capture a whole one-token forward once, replay it per token.

Once every layer of an `EvictingCache` decodes in slot buffers (`trainkv.static_decode`), a decoding forward has
static shapes, reads nothing back on the host and writes only into those buffers, so it can be recorded as a
CUDA graph with `torch.cuda.graph` and replayed: one launch per token instead of thousands. `DecodeGraphs`
(one per attached model) keeps the graphs, keyed by batch size, each layer's buffer shape and dtype, the
protected-token settings and the method state's host-side signature (the Python values a graph bakes in).

Life of a key: two eager steps on the capture stream (warm-up: cuBLAS handles, compiled kernels, method state
reaching its steady shape), then one capture, immediately replayed; every later step with that key only
copies the new token id and position into the graph's input tensors and replays. A graph is reused across
`generate` calls: the next cache's buffers are copied into the graph's once (when it is not already using
them) and the cache then works on the graph's tensors. At most ``max_graphs`` graphs are kept (least recently
used dropped; each holds its cache buffers).

Anything that cannot be captured (an exception during capture, a method replacing its state tensors with new
shapes, no ``position_ids``) falls back to the eager static step for that key, with one logged line. Forwards
asking for hidden states or attentions, embeddings input, and non-CUDA devices always run eagerly.

``emulate=True`` replaces the CUDA graph by re-running the captured call with the graph's own input tensors
and the host-side state rewound, so that the keying, binding, warm-up and bookkeeping logic is testable on CPU.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict

import torch

from .cache import EvictingCache
from .static_decode import log_once

WARMUP_STEPS = 2
_LAYER_TENSORS = ("keys", "values", "positions", "scores", "valid")
_SLOT_TENSORS = ("budgets", "order", "length")


def _host_value(value):
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def _bound_tensors(cache: EvictingCache) -> dict:
    """Every tensor a static decode step reads or writes, by (layer, name)."""
    out = {}
    for i, layer in enumerate(cache.layers):
        for name in _LAYER_TENSORS:
            out[(i, name)] = getattr(layer, name)
        for name in _SLOT_TENSORS:
            t = getattr(layer.slots, name)
            if t is not None:
                out[(i, "slots", name)] = t
        for name, t in layer.state.items():
            if torch.is_tensor(t):
                out[(i, "state", name)] = t
    return out


def _set_bound(cache: EvictingCache, name: tuple, tensor: torch.Tensor) -> None:
    layer = cache.layers[name[0]]
    if len(name) == 2:
        setattr(layer, name[1], tensor)
    elif name[1] == "slots":
        setattr(layer.slots, name[2], tensor)
    else:
        layer.state[name[2]] = tensor


def _host_snapshot(cache: EvictingCache) -> dict:
    return {
        "cache": (cache.static_step, cache.pending_valid, cache.runtime_bound),
        "layers": [(layer.seen, layer.new_tokens, dict(layer.state), {n: getattr(layer, n) for n in _LAYER_TENSORS},
                    {n: getattr(layer.slots, n) for n in _SLOT_TENSORS}) for layer in cache.layers],
    }


def _restore_host(cache: EvictingCache, snap: dict) -> None:
    cache.static_step, cache.pending_valid, cache.runtime_bound = snap["cache"]
    for layer, (seen, new, state, tensors, slot_tensors) in zip(cache.layers, snap["layers"]):
        layer.seen, layer.new_tokens = seen, new
        layer.state.clear()
        layer.state.update(state)
        for n, t in tensors.items():
            setattr(layer, n, t)
        for n, t in slot_tensors.items():
            setattr(layer.slots, n, t)


class _Entry:
    def __init__(self, graph, ids, positions, output, tensors, owner, replay_fn=None):
        self.graph = graph
        self.ids = ids
        self.positions = positions
        # the tensors of the model output produced during capture (they live in the graph's pool; the output's
        # cache is not kept: a graph must not keep a finished generate's cache alive)
        self.output_type = type(output)
        self.output = {k: v for k, v in output.items() if torch.is_tensor(v)}
        self.cache_field = next((k for k, v in output.items() if isinstance(v, EvictingCache)), None)
        self.tensors = tensors
        self.owner = owner
        self.replay_fn = replay_fn
        self.alive = True

    def replay(self, cache: EvictingCache) -> None:
        if self.replay_fn is None:
            self.graph.replay()
            return
        # emulation: a real graph reads and writes exactly the tensors it was captured on
        now = _bound_tensors(cache)
        stray = [n for n, t in self.tensors.items() if now.get(n) is not t]
        if stray or len(now) != len(self.tensors):
            raise AssertionError(f"graph replayed on tensors it was not captured on: {stray[:3]}")
        out = self.replay_fn(cache)  # and write the outputs where a replayed graph would have
        for k, v in self.output.items():
            v.copy_(out[k])


class DecodeGraphs:
    """Captured static decode steps of one model (module doc)."""

    def __init__(self, max_graphs: int = 4, emulate: bool = False):
        self.max_graphs = max(1, int(max_graphs))
        self.emulate = emulate
        self.entries: OrderedDict = OrderedDict()
        self.warm: dict = {}
        self.failed: dict = {}
        self.stats = {"captures": 0, "replays": 0, "eager_steps": 0}
        self.capture_hook = None  # called first inside every capture attempt (tests inject failures here)
        self._stream = None

    def clear(self) -> None:
        """Drop every graph (and the cache buffers they hold)."""
        for entry in self.entries.values():
            entry.alive = False
        self.entries.clear()
        self.warm.clear()
        self.failed.clear()

    # --- keys ----------------------------------------------------------------------------------------
    @staticmethod
    def key(cache: EvictingCache, ids: torch.Tensor, positions: torch.Tensor, kwargs: dict) -> tuple:
        config = cache.config
        layers = []
        for layer in cache.layers:
            slots = layer.slots
            state = tuple(sorted((k, _host_value(v)) for k, v in layer.state.items()))
            layers.append((tuple(layer.keys.shape), str(layer.keys.dtype), str(layer.values.dtype), slots.capacity,
                           slots.track, slots.span if slots.track else None, slots.compile_step, state))
        return (tuple(ids.shape), str(ids.device), tuple(positions.shape), _host_value(kwargs.get("logits_to_keep")),
                config.sink_tokens, config.recent_window, tuple(layers))

    # --- the step --------------------------------------------------------------------------------------
    def step(self, model, call, cache: EvictingCache, kwargs: dict):
        """One decoding forward through a graph, or None (then the caller runs it eagerly).

        Fast path: when the previous forward with this cache was a replay of the same graph (no eager forward
        since: `EvictingCache.begin_forward` forgets the graph), nothing on the host can have changed, so the key
        and the binding are not recomputed (they cost ~0.3 ms of Python for 32 layers).
        """
        ids = kwargs.get("input_ids")
        positions = kwargs.get("position_ids")
        if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or kwargs.get("inputs_embeds") is not None:
            return None
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return None
        if not (self.emulate or ids.device.type == "cuda"):
            return None
        if positions is None:
            log_once("CUDA graphs off: a decoding forward without position_ids (positions would be baked in)")
            return None
        if not cache.wants_static_step(1):
            return None
        light = (tuple(ids.shape), tuple(positions.shape), _host_value(kwargs.get("logits_to_keep")))
        last = cache.__dict__.get("_graph_entry")
        if last is not None and last[0].alive and last[1] == light and last[0].owner() is cache:
            entry = last[0]
        else:
            if not cache.in_static:
                return None  # before the first static step every layer enters its slots eagerly
            key = self.key(cache, ids, positions, kwargs)
            if key in self.failed:
                return None
            entry = self.entries.get(key)
            if entry is None:
                done = self.warm.get(key, 0)
                if done < WARMUP_STEPS:
                    self.warm[key] = done + 1
                    return self._eager(call, kwargs)
                out = self._capture(call, cache, kwargs, key)
                if out is not None:
                    cache._graph_entry = (self.entries[key], light)
                return out
            self.entries.move_to_end(key)
            self._bind(entry, cache)
        entry.ids.copy_(ids)
        entry.positions.copy_(positions)
        entry.replay(cache)
        self.stats["replays"] += 1
        cache.runtime_bound = True
        cache.static_step = True
        cache.pending_valid = None
        for layer in cache.layers:
            layer.seen += 1
            layer.new_tokens = 1
        cache._graph_entry = (entry, light)
        return self._output(entry, cache)

    def _eager(self, call, kwargs):
        """A warm-up step: eager, on the stream the capture will use."""
        self.stats["eager_steps"] += 1
        if self.emulate:
            return call(**kwargs)
        stream = self._capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = call(**kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _capture(self, call, cache: EvictingCache, kwargs: dict, key: tuple):
        ids, positions = kwargs["input_ids"], kwargs["position_ids"]
        static_ids, static_positions = ids.clone(), positions.clone()
        static_kwargs = dict(kwargs, input_ids=static_ids, position_ids=static_positions, attention_mask=None)
        before = _bound_tensors(cache)
        snap = _host_snapshot(cache)
        graph = None
        try:
            if self.capture_hook is not None:
                self.capture_hook()
            if self.emulate:
                out = call(**static_kwargs)
                replay_fn = self._emulated_replay(call, static_kwargs)
            else:
                stream = self._capture_stream()
                stream.wait_stream(torch.cuda.current_stream())
                graph = torch.cuda.CUDAGraph()
                # own memory pool per graph (a decode step's temporaries are small); same stream as the warm-up
                with torch.cuda.graph(graph, stream=stream):
                    out = call(**static_kwargs)
                torch.cuda.current_stream().wait_stream(stream)
                replay_fn = None
            after = _bound_tensors(cache)
            moved = [n for n in before if after.get(n) is not before[n]] + [n for n in after if n not in before]
            if moved:
                raise RuntimeError(f"the step replaced state tensors {moved[:3]} (shapes changed during capture)")
        except Exception as exc:  # noqa: BLE001 - any capture failure: this key runs eagerly from now on
            _restore_host(cache, snap)
            reason = f"{type(exc).__name__}: {exc}"
            self.failed[key] = reason
            log_once(f"CUDA graph capture failed, static decode runs eagerly for this shape ({reason[:300]})",
                     logging.WARNING)
            return None
        entry = _Entry(graph, static_ids, static_positions, out, after, weakref.ref(cache), replay_fn)
        self.stats["captures"] += 1
        if not self.emulate:  # (the emulated capture ran the step for real already; keep the host state it left)
            entry.replay(cache)  # capture records without running: run this step now
        self.entries[key] = entry
        while len(self.entries) > self.max_graphs:
            self.entries.popitem(last=False)[1].alive = False
        return self._output(entry, cache)

    def _emulated_replay(self, call, static_kwargs):
        """CPU stand-in for graph replay: run the step on the graph's tensors, then rewind the host-side state
        the Python code advanced (the runner does that bookkeeping itself, as after a real replay)."""

        def replay(cache):
            saved = [(layer.seen, layer.new_tokens) for layer in cache.layers]
            saved_cache = (cache.static_step, cache.pending_valid, cache.runtime_bound)
            out = call(**dict(static_kwargs, cache=cache))
            for layer, (seen, new) in zip(cache.layers, saved):
                layer.seen, layer.new_tokens = seen, new
            cache.static_step, cache.pending_valid, cache.runtime_bound = saved_cache
            return out

        return replay

    def _bind(self, entry: _Entry, cache: EvictingCache) -> None:
        """Make ``cache`` work on the graph's tensors (copying its current contents in when it does not yet)."""
        owner = entry.owner()
        if owner is not None and owner is not cache and owner.in_static:
            for name, t in entry.tensors.items():  # the previous owner still decodes: give it its own copies
                if _get_bound(owner, name) is t:
                    _set_bound(owner, name, t.clone())
        for name, t in entry.tensors.items():
            current = _get_bound(cache, name)
            if current is not t:
                t.copy_(current)
                _set_bound(cache, name, t)
        entry.owner = weakref.ref(cache)

    @staticmethod
    def _output(entry: _Entry, cache: EvictingCache):
        fields = {k: v.clone() for k, v in entry.output.items()}  # the graph overwrites them at the next replay
        if entry.cache_field is not None:
            fields[entry.cache_field] = cache
        return entry.output_type(**fields)


def _get_bound(cache: EvictingCache, name: tuple):
    layer = cache.layers[name[0]]
    if len(name) == 2:
        return getattr(layer, name[1])
    if name[1] == "slots":
        return getattr(layer.slots, name[2]) if layer.slots is not None else None
    return layer.state.get(name[2])


__all__ = ["DecodeGraphs", "WARMUP_STEPS"]
