"""Issue 19, a design tried and dropped: `torch.compile` of the whole one-token forward of an attached model in
static-decode mode (what the CUDA graph would then capture), on a tiny Llama on CPU.

    TORCH_LOGS=graph_breaks,recompiles python docs/experiments/decode_whole_forward_compile.py

Seen on 2026-12-02 (torch 2.13 CPU): the compiled logits equal the eager ones, but dynamo guards on the cache's
host counters (``cache.layers[i].seen == N``, advanced every step in ``EvictingLayer._static_update``) so every step
recompiles until ``recompile_limit`` (8) and falls back to eager, and it graph-breaks on a storage ``data_ptr`` call
in ``trainkv/attention.py``. Making the step compile once needs those counters out of the traced code.
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import trainkv

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
trainkv.attach(model, "attention_gate", eviction=dict(budget=24, sink_tokens=2, recent_window=4, chunk_size=16))
ids = torch.randint(1, 128, (1, 80))


@torch.no_grad()
def decode(compiled: bool) -> list[torch.Tensor]:
    cache = model.new_cache(decode=dict(static=True, compile_step=False))
    model(input_ids=ids[:, :64], position_ids=torch.arange(64)[None], cache=cache)
    call = torch.nn.Module.__call__.__get__(model)
    step = torch.compile(call, dynamic=False) if compiled else call
    return [step(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[t]]), cache=cache).logits.clone()
            for t in range(64, 76)]


eager = decode(False)
start = time.time()
compiled = decode(True)
print(f"12 compiled steps in {time.time() - start:.1f} s; max |logit difference| "
      f"{max(float((a - b).abs().max()) for a, b in zip(eager, compiled)):.2e}")
