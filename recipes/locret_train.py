"""Locret: train the retaining heads (per-layer importance regressors) on question/answer data.

    accelerate launch --config_file configs/accelerate/single_gpu.yaml recipes/locret_train.py \
        --config configs/recipes/smollm2-135m/locret.yaml [key=value ...] [--resume]

All logic lives in `trainkv.training`; this file only names the recipe and its defaults.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a source checkout

from trainkv.training import run_recipe  # noqa: E402

DEFAULTS = {"method": {"method": "retaining_head"}, "data": {"format": "sft"}}

if __name__ == "__main__":
    run_recipe("locret_train", DEFAULTS)
