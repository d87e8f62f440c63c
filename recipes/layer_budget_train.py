"""Learned layer budgets: train per-layer (optionally per-KV-head) offsets on top of a frozen, trained
Attention-Gate (or Locret) scorer, then write the learned allocation next to the checkpoint.

    accelerate launch --config_file configs/accelerate/single_gpu.yaml recipes/layer_budget_train.py \
        --config configs/recipes/smollm2-135m/layer_budget.yaml [key=value ...] [--resume]
    # another total, e.g. keep 1/16:
    ... method.target_keep=0.0625 output_dir=runs/smollm2-135m/layer_budget_r16

Writes ``<output_dir>/final/`` (a gate checkpoint whose eviction settings carry the learned
``allocation_weights``; it holds the base scorer's weights too, so it loads on its own with
``trainkv.load_gated``) plus ``allocation.json`` and ``allocation.png`` (the allocation per layer and
head at ``method.target_keep``). All logic lives in `trainkv.training` and
`trainkv.methods.layer_budget`; this file only names the recipe and its defaults.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a source checkout

from trainkv.training import run_recipe  # noqa: E402
from trainkv.training.layer_budget import write_allocation_artifacts  # noqa: E402

DEFAULTS = {"method": {"method": "layer_budget"}, "data": {"format": "sft"}}

if __name__ == "__main__":
    result = run_recipe("layer_budget", DEFAULTS)
    if result.final_dir is not None:
        report = write_allocation_artifacts(result.final_dir)
        if report:
            print(f"layer_budget: allocation written to {result.final_dir}/allocation.json and allocation.png")
