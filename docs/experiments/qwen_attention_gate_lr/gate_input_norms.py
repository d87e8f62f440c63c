"""Norms of the Attention-Gate's input (each attention layer's input hidden states, after its input_layernorm) on
the first 1,024 tokens of README.md, per model: Adam moves a linear gate's logit by about lr x L1(input) per step,
so the ratio of these norms is the ratio of the learning rates that move two models' gates equally fast.

    python docs/experiments/qwen_attention_gate_lr/gate_input_norms.py smollm2-135m qwen2.5-coder-0.5b
"""

import sys
from pathlib import Path

import torch

from trainkv.models import load_model, load_tokenizer

README = Path(__file__).resolve().parents[3] / "README.md"


def main(names: list[str]) -> None:
    for name in names:
        tok = load_tokenizer(name)
        model = load_model(name, dtype=torch.float32)
        ids = tok(README.read_text(), return_tensors="pt").input_ids[:, :1024]
        seen: dict[int, torch.Tensor] = {}

        def grab(i):
            return lambda module, args, kwargs: seen.__setitem__(i, kwargs.get("hidden_states", args[0] if args else None))

        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True)
        with torch.no_grad():
            model(ids)
        l1 = sorted(float(seen[i][0].abs().sum(-1).median()) for i in seen)
        print(f"{name}: hidden {model.config.hidden_size}; per-layer median L1 per token: min {l1[0]:.0f}, "
              f"median {l1[len(l1) // 2]:.0f}, max {l1[-1]:.0f}; "
              f"largest |h| {max(float(seen[i].abs().max()) for i in seen):.0f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2-135m"])
