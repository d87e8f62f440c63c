"""Attention-Gate, continual pretraining: train the per-layer gates on packed text (loss on every token).

    accelerate launch --config_file configs/accelerate/single_gpu.yaml recipes/attention_gate_cpt.py \
        --config configs/recipes/smollm2-135m/attention_gate_cpt.yaml [key=value ...] [--resume]

All logic lives in `trainkv.training`; this file only names the recipe and its defaults.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a source checkout

from trainkv.training import run_recipe  # noqa: E402

DEFAULTS = {"method": {"method": "attention_gate"}, "data": {"format": "cpt"}}

if __name__ == "__main__":
    run_recipe("attention_gate_cpt", DEFAULTS)
