"""Attention-Gate, supervised fine-tuning: train the gates (optionally with LoRA beside them) on chat data,
with the loss on the answers only.

    accelerate launch --config_file configs/accelerate/cpu.yaml recipes/attention_gate_sft.py \
        --config configs/recipes/smollm2-135m/attention_gate_sft.yaml max_steps=5
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 2 \
        recipes/attention_gate_sft.py --config configs/recipes/llama3.1-8b/attention_gate_sft.yaml

All logic lives in `trainkv.training`; this file only names the recipe and its defaults.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a source checkout

from trainkv.training import run_recipe  # noqa: E402

DEFAULTS = {"method": {"method": "attention_gate"}, "data": {"format": "sft"}}

if __name__ == "__main__":
    run_recipe("attention_gate_sft", DEFAULTS)
