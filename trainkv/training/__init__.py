"""Method-agnostic training: config, data, loop, checkpoints (used by every recipe in ``recipes/``).

    from trainkv.training import TrainConfig, train
    cfg = TrainConfig.from_args()          # --config configs/recipes/<model>/<recipe>.yaml [key=value ...] [--resume]
    train(cfg)

Launch recipes with ``accelerate launch --config_file configs/accelerate/<x>.yaml recipes/<recipe>.py ...``
(CPU, one GPU, DDP on N GPUs, DeepSpeed ZeRO-2/3), or ``torchrun`` with ``ACCELERATE_USE_CPU=true`` for
several CPU processes (gloo DDP).
"""

import logging
import sys

from .config import ConfigError, DataConfig, LoraSettings, TrainConfig
from .trainer import ModelView, TrainResult, train


def run_recipe(name: str, defaults: dict | None = None, argv: list[str] | None = None) -> TrainResult:
    """Entry point of a recipe script: parse ``--config``/overrides (``defaults`` below the YAML) and train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = TrainConfig.from_args(argv, defaults={"run_name": name, **(defaults or {})}, prog=name)
        return train(cfg)
    except ConfigError as err:
        print(f"{name}: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = ["ConfigError", "DataConfig", "LoraSettings", "TrainConfig", "TrainResult", "ModelView", "run_recipe",
           "train"]
