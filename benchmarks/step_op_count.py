"""Kernel-launching ops per decoder layer in one decoding step (issue 19), counted on CPU.

    python benchmarks/step_op_count.py            # prints one line per method, writes nothing

Each aten op a one-token forward dispatches is counted (`TorchDispatchMode`); ops that launch no kernel (views:
view, slice, select, transpose, expand, ...; host scalars: scalar_tensor) are left out. The per-layer figure is the
difference between a 2-layer and a 1-layer tiny Llama, so the embedding, final norm and LM head drop out. Rows:
transformers' own step with a DynamicCache, and trainkv's static slot step (`static=True`, the slot choice
uncompiled as on CPU; on CUDA `compile_step` fuses it) for a few methods. On a GPU each counted op is at least one
kernel launch, ~2-3 us even inside a CUDA graph at batch 1.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainkv  # noqa: E402

NO_KERNEL = {"scalar_tensor", "view", "_unsafe_view", "reshape", "slice", "select", "t", "transpose", "unsqueeze", "squeeze", "expand",
         "alias", "as_strided", "permute", "detach", "_reshape_alias", "unbind", "split", "chunk"}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
METHODS = ("streaming_llm", "h2o", "snapkv", "attention_gate", "retaining_head")


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def step_ops(method: str | None, layers: int) -> Counter:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=layers)).eval()
    if method is None:
        cache = DynamicCache(config=model.config)
    else:
        trainkv.attach(model, method, eviction=dict(budget=24, sink_tokens=2, recent_window=4, chunk_size=16))
        cache = model.new_cache(decode=dict(static=True, compile_step=False))
    ids = torch.randint(1, TINY["vocab_size"], (1, 72))
    model(input_ids=ids[:, :64], position_ids=torch.arange(64)[None], cache=cache)
    for t in range(64, 71):  # into the slots, steady state
        model(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[t]]), cache=cache)
    with _Count() as count:
        model(input_ids=ids[:, 71:72], position_ids=torch.tensor([[71]]), cache=cache)
    return Counter({k: v for k, v in count.ops.items() if k not in NO_KERNEL})


def per_layer(method: str | None) -> Counter:
    two, one = step_ops(method, 2), step_ops(method, 1)
    two.subtract(one)
    return +two


def main() -> None:
    base = per_layer(None)
    print(f"transformers, DynamicCache: {sum(base.values())} launching ops per layer")
    for method in METHODS:
        ops = per_layer(method)
        extra = ops - base
        print(f"trainkv static step, {method}: {sum(ops.values())} per layer ({sum(extra.values())} more: "
              f"{', '.join(f'{k} {v}' for k, v in extra.most_common(8))}, ...)")


if __name__ == "__main__":
    main()
