"""A fixed input for the committed SmolLM2 Attention-Gate checkpoint, and the scores it must give.

The reference file ``tests/data/attention_gate_smollm2_reference.safetensors`` was written by this
module with the gate code as it was before the run-time rewrite of issue 8 (the unfold window
attention and separate ``_split``), so the test in test_attention_gate.py pins the new code to the
old numbers. When the shipped checkpoint was replaced (second training run), the reference was rewritten
with the old code of commit 7e3dd81 on the new weights. Regenerate only on purpose, with the old code:

    python tests/gate_reference.py --write

The input needs no model: deterministic hidden states built from sines (RMS about 1, like the
normed layer input the gate sees), one row left-padded, scored whole-sequence and chunk by chunk
(the run-time ring buffer), for every layer of the checkpoint.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m" / "attention_gate"
REFERENCE = Path(__file__).parent / "data" / "attention_gate_smollm2_reference.safetensors"
BATCH, LENGTH, PAD, CHUNK = 2, 200, 23, 48


def load_checkpoint_gates() -> list:
    """The checkpoint's gates as standalone `AttentionGate` modules (fp32, eval), one per layer."""
    from trainkv.hub import GateCheckpoint
    from trainkv.methods import make_config
    from trainkv.methods.attention_gate import AttentionGate

    ckpt = GateCheckpoint.load(CHECKPOINT)
    shape = ckpt.config["base_shape"]
    model_config = LlamaConfig(
        hidden_size=shape["hidden_size"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], num_hidden_layers=shape["num_hidden_layers"],
        head_dim=shape["head_dim"], vocab_size=shape["vocab_size"],
    )
    method_config = make_config(ckpt.config["method"])
    gates = []
    for i in range(shape["num_hidden_layers"]):
        gate = AttentionGate(method_config, model_config, i)
        prefix = f"layers.{i}."
        gate.load_state_dict({k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}, strict=True)
        gates.append(gate.float().eval())
    return gates


def fixed_hidden(hidden_size: int) -> torch.Tensor:
    """``[BATCH, LENGTH, hidden]`` fp32 from closed-form sines (no RNG, same on every machine)."""
    t = torch.arange(LENGTH, dtype=torch.float64)[None, :, None]
    d = torch.arange(hidden_size, dtype=torch.float64)[None, None, :]
    b = torch.arange(BATCH, dtype=torch.float64)[:, None, None]
    x = torch.sin(0.37 * (t + 1) * (0.013 * d + 0.5) + 0.7 * d + 1.3 * b) + 0.5 * torch.cos(0.011 * t * d + b)
    return (x * math.sqrt(2.0 / 1.25)).float()


def valid_mask() -> torch.Tensor:
    valid = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    valid[1, :PAD] = False  # row 1 is left-padded
    return valid


def runtime_scores(gate, hidden: torch.Tensor, valid: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Scores from the run-time path, chunk by chunk with the gate's ring buffer: ``[B, Hkv, T]``."""
    from trainkv.methods.base import ScoreContext

    owner = SimpleNamespace(pending_valid=None)
    layer = SimpleNamespace(owner=owner, state={})
    out = []
    for s in range(0, hidden.shape[1], chunk):
        owner.pending_valid = valid[:, s:s + chunk]
        ctx = ScoreContext(module=None, layer=layer, hidden_states=hidden[:, s:s + chunk], query=None, scaling=1.0,
                           will_evict=False)
        out.append(gate.new_token_scores(ctx))
    return torch.cat(out, dim=-1)


@torch.no_grad()
def compute() -> dict[str, torch.Tensor]:
    gates = load_checkpoint_gates()
    hidden = fixed_hidden(gates[0].hidden_size)
    valid = valid_mask()
    whole = torch.stack([g.gate_logits(hidden) for g in gates])  # [layers, B, Hkv, T]
    chunked = torch.stack([runtime_scores(g, hidden, valid) for g in gates])
    return {"whole": whole.contiguous(), "chunked": chunked.contiguous()}


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/gate_reference.py --write   (overwrites the committed reference)")
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import save_file

    REFERENCE.parent.mkdir(exist_ok=True)
    tensors = compute()
    save_file(tensors, REFERENCE)
    print(f"wrote {REFERENCE}: " + ", ".join(f"{k} {tuple(v.shape)} |max| {v.abs().max():.2f}" for k, v in tensors.items()))
