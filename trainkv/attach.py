"""Put an eviction method on a loaded Hugging Face decoder, and take it off again.

`attach` adds one method module per layer as ``self_attn.trainkv_method``, freezes the backbone,
routes attention through the registered ``"trainkv"`` function and gives the model a `generate`
that builds an `EvictingCache`, prefills in chunks and decodes with static shapes where it can (issue 19:
`trainkv.static_decode`, captured as CUDA graphs by `trainkv.decode_graphs`). Nothing in transformers' code is edited:
the model's class is swapped for a subclass adding that `generate`, and two forward pre-hooks
hand the cache layer and hidden states to the attention function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .attention import ATTN_NAME, register
from .cache import EvictingCache
from .config import EvictionConfig
from .decode_graphs import DecodeGraphs
from .hub.push import push_to_hub
from .hub.save import save_gated
from .methods import METHOD_ATTR, MethodConfig, get_method, make_config, method_modules
from .models import check_supported, decoder_layers
from .static_decode import DecodeOptions, log_once


@dataclass
class AttachedState:
    method: MethodConfig
    eviction: EvictionConfig
    original_class: type
    original_attn: str
    handles: list = field(default_factory=list)
    requires_grad: dict = field(default_factory=dict)  # backbone parameters' flags before freezing
    decode: DecodeOptions = field(default_factory=DecodeOptions)  # static decode / CUDA graphs (issue 19)
    graphs: DecodeGraphs | None = None  # captured decode steps, per batch size and buffer shape


def _bind_layer(module, args, kwargs):
    """Attention pre-hook: hand the cache layer (if evicting) and the hidden states to the attention function."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    module._trainkv_layer = cache.layers[module.layer_idx] if isinstance(cache, EvictingCache) else None
    module._trainkv_hidden = kwargs.get("hidden_states", args[0] if args else None)


_NO_MASK: dict = {}


def _placeholder_mask(device: torch.device) -> torch.Tensor:
    """A 4D mask transformers passes through untouched: a static decode step builds no mask (its attention masks
    from the slots' validity)."""
    mask = _NO_MASK.get(device)
    if mask is None:
        mask = _NO_MASK[device] = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    return mask


def _begin_forward(model, args, kwargs):
    """Model pre-hook: tell the cache which new tokens are padding (and skip mask building in a static step)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, EvictingCache):
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    num_new = ids.shape[-1] if ids is not None else embeds.shape[1]
    cache.begin_forward(kwargs.get("attention_mask"), num_new)
    if cache.static_step:
        kwargs["attention_mask"] = _placeholder_mask((ids if ids is not None else embeds).device)
        return args, kwargs


class EvictingGenerationMixin:
    """Adds eviction defaults to `generate`: an `EvictingCache` and chunked prefill."""

    def generate(self, inputs=None, generation_config=None, eviction: EvictionConfig | dict | None = None,
                 static_decode: bool | None = None, cuda_graphs: bool | None = None, **kwargs):
        """transformers' `generate` with an `EvictingCache` (built from the attached settings changed by ``eviction``,
        unless ``cache=`` is given) and chunked prefill.

        static_decode: decode with static shapes once the prompt is in (issue 19; None: the attached
            `DecodeOptions`, by default on for accelerators, off on CPU). cuda_graphs: capture those steps as CUDA
            graphs (None: the attached options, by default on with CUDA). Settings that cannot stay static
            (threshold mode, ``evict_during_decoding=False``, ratio budgets, Ada-KV) decode as before, logged once.
        """
        state: AttachedState = self.trainkv_state
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None and input_ids.dim() == 2 and input_ids.shape[-1] == 0:
            raise ValueError("empty prompt: generate needs at least one input token")
        mask = kwargs.get("attention_mask")
        if mask is not None and input_ids is not None:
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
            if bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise ValueError("right padding is not supported: pad on the left (tokenizer.padding_side = 'left')")
        for unsupported in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"{unsupported}: assisted decoding needs cache rollback, which eviction cannot do")
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        if cache is None:
            cache = self.new_cache(eviction)
        elif eviction is not None:
            raise ValueError("pass either a cache or eviction settings, not both")
        if isinstance(cache, EvictingCache):
            prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            cache.prefill_end = prompt.shape[1] if prompt is not None else None
        if isinstance(cache, EvictingCache) and "prefill_chunk_size" not in kwargs:
            if generation_config is None or getattr(generation_config, "prefill_chunk_size", None) is None:
                kwargs["prefill_chunk_size"] = cache.config.chunk_size
        if not isinstance(cache, EvictingCache):
            return super().generate(inputs, generation_config=generation_config, cache=cache, **kwargs)
        self._configure_decode(cache, state.decode.merged(static=static_decode, cuda_graphs=cuda_graphs))
        cache.decode_horizon = self._decode_horizon(cache, generation_config, kwargs)
        try:
            return super().generate(inputs, generation_config=generation_config, cache=cache, **kwargs)
        finally:
            cache.end_static()  # the returned cache is in today's compacted layout
            cache.use_graphs = False

    def _decode_horizon(self, cache: EvictingCache, generation_config, kwargs) -> int | None:
        """The most tokens ``cache`` will have seen at the end of this call (prompt + new tokens), or None."""
        if cache.prefill_end is None:
            return None
        config = generation_config if generation_config is not None else self.generation_config
        new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if new is not None:
            return cache.get_seq_length() + cache.prefill_end + int(new)
        length = kwargs.get("max_length", getattr(config, "max_length", None))
        return cache.get_seq_length() + int(length) if length is not None else None

    def _configure_decode(self, cache: EvictingCache, options: DecodeOptions) -> None:
        device = next(self.parameters()).device
        method = self.trainkv_state.method
        modules = method_modules(self)
        cache.static_decode = options.static_enabled(device)
        cache.track_layout = any(getattr(m, "static_layout", True) for m in modules)
        cache.compile_step = options.compile_enabled(device) and cache.static_decode
        graphs = self.trainkv_state.graphs
        emulated = graphs is not None and graphs.emulate and bool(options.cuda_graphs)  # CPU tests of the runner
        cache.use_graphs = cache.static_decode and (options.graphs_enabled(device) or emulated)
        if cache.static_decode and not cache.use_graphs and device.type != "cuda":
            log_once(f"CUDA graphs off: the model is on {device.type}; the static decode step runs eagerly")
        if cache.use_graphs and not all(getattr(m, "cuda_graph_safe", False) for m in modules):
            log_once(f"CUDA graphs off for method {method.name!r}: its scoring is not graph-safe; "
                     "static decode runs eagerly")
            cache.use_graphs = False

    def __call__(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, EvictingCache) and getattr(cache, "use_graphs", False) and not args:
            state: AttachedState = self.trainkv_state
            if state.graphs is None:
                state.graphs = DecodeGraphs(state.decode.max_graphs)
            out = state.graphs.step(self, super().__call__, cache, kwargs)
            if out is not None:
                return out
        return super().__call__(*args, **kwargs)

    def save_pretrained(self, save_directory, eval_table: str | None = None, **kwargs):
        """Save the method's weights and settings (like a PEFT adapter), not the backbone."""
        return save_gated(self, save_directory, eval_table=eval_table)

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False, endpoint: str | None = None, **kwargs):
        """Push the method's checkpoint (weights, settings, model card) to a Hub repo."""
        return push_to_hub(self, repo_id, token=token, private=private, endpoint=endpoint, **kwargs)

    def new_cache(self, eviction: EvictionConfig | dict | None = None,
                  decode: DecodeOptions | dict | None = None) -> EvictingCache:
        """An empty `EvictingCache` with the attached settings, changed by ``eviction`` (`EvictionConfig.merged`).

        ``decode``: static decode / CUDA graph options for forwards made directly with this cache (`generate`
        sets them itself); without it, forwards with this cache use the compacting step."""
        cache = EvictingCache.for_model(self, self.trainkv_state.eviction.merged(eviction))
        if decode is not None:
            self.configure_decode(cache, decode)
        return cache

    def configure_decode(self, cache: EvictingCache, decode: DecodeOptions | dict | None = None) -> EvictingCache:
        """Set how one-token forwards made directly with ``cache`` decode (the attached `DecodeOptions` changed
        by ``decode``): e.g. a prefilled cache stepped token by token outside `generate`. Returns ``cache``."""
        self._configure_decode(cache, self.trainkv_state.decode.merged(decode))
        return cache


_SUBCLASSES: dict[type, type] = {}


def _evicting_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Evicting{cls.__name__}", (EvictingGenerationMixin, cls), {})
    return _SUBCLASSES[cls]


def attach(
    model: nn.Module,
    method: str | dict | MethodConfig = "streaming_llm",
    eviction: EvictionConfig | dict | None = None,
    freeze: bool = True,
    decode: DecodeOptions | dict | None = None,
    **method_overrides,
) -> nn.Module:
    """Attach an eviction method to ``model`` in place and return it.

    ``method``: a registered method name, a config dict or a `MethodConfig`; ``eviction``: runtime
    settings (budget, sinks, window, chunk size). The backbone is frozen (``freeze=True``); only the
    method's parameters stay trainable. ``decode``: how decoding steps run (`DecodeOptions`: static shapes,
    CUDA graphs; default: both on with CUDA, compacting step on CPU); ``generate(static_decode=...,
    cuda_graphs=...)`` changes them per call.
    """
    if hasattr(model, "trainkv_state"):
        raise ValueError("a trainkv method is already attached; call trainkv.detach(model) first")
    check_supported(model)
    method_config = make_config(method, **method_overrides)
    eviction_config = EvictionConfig().merged(eviction)
    method_cls = get_method(method_config.name)
    register()
    layers = decoder_layers(model)
    text_config = model.config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    state = AttachedState(method_config, eviction_config, type(model), model.config._attn_implementation,
                          decode=DecodeOptions().merged(decode))
    state.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    if freeze:
        model.requires_grad_(False)
    for layer in layers:
        attn = layer.self_attn
        module = method_cls(method_config, text_config, attn.layer_idx)
        module.eviction = eviction_config
        setattr(attn, METHOD_ATTR, module.to(device=device, dtype=dtype if method_cls.trainable else None))
        state.handles.append(attn.register_forward_pre_hook(_bind_layer, with_kwargs=True))
    state.handles.append(model.register_forward_pre_hook(_begin_forward, with_kwargs=True))
    model.set_attn_implementation(ATTN_NAME)
    model.trainkv_state = state
    model.__class__ = _evicting_class(type(model))
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove the method modules, hooks and eviction runtime; the model is the plain one again."""
    state: AttachedState | None = getattr(model, "trainkv_state", None)
    if state is None:
        raise ValueError("no trainkv method is attached to this model")
    for handle in state.handles:
        handle.remove()
    for layer in decoder_layers(model):
        if hasattr(layer.self_attn, METHOD_ATTR):
            delattr(layer.self_attn, METHOD_ATTR)
    for name, p in model.named_parameters():  # the method modules are gone: only backbone parameters remain
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    model.__class__ = state.original_class
    model.set_attn_implementation(state.original_attn)
    del model.trainkv_state
    return model
