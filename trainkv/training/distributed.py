"""What the trainer and its checkpoints need to know about DDP and DeepSpeed.

DeepSpeed is optional (``pip install 'trainkv[deepspeed]'``): it is imported only inside the functions
that run under it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate.utils import DistributedType
from transformers.integrations import deepspeed as hf_deepspeed

from .config import ConfigError, TrainConfig
from .data import BatchPlan

logger = logging.getLogger(__name__)


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)


def base_optimizer(optimizer):
    """The torch optimizer under accelerate's (and DeepSpeed's) wrappers."""
    opt = getattr(optimizer, "optimizer", optimizer)
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Fill the DeepSpeed JSON's ``auto`` batch and clipping fields from the config (no dataloader is prepared)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.clip_value if cfg.clip_grad == "norm" else 0.0
    if cfg.clip_grad == "value":
        logger.warning("DeepSpeed clips by norm only: clip_grad=value is ignored (gradient_clipping=%s)",
                       ds["gradient_clipping"])


def check_deepspeed_batch(accelerator, plan: BatchPlan) -> None:
    """DeepSpeed's batch settings (after `prepare` filled the ``auto`` ones) must describe the trainer's batches."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    want = {"train_micro_batch_size_per_gpu": plan.batch_size, "gradient_accumulation_steps": plan.accumulation,
            "train_batch_size": plan.global_batch}
    have = {k: ds.get(k) for k in want}
    wrong = {k: v for k, v in have.items() if v not in ("auto", None) and int(v) != want[k]}
    if wrong:
        raise ConfigError(
            f"the DeepSpeed config's batch settings {have} do not match this run: {accelerator.num_processes} processes x "
            f"batch {plan.batch_size} x accumulation {plan.accumulation} = {plan.global_batch} sequences per step. "
            "Leave them \"auto\" in configs/deepspeed/*.json (filled from batch_size / gradient_accumulation_steps)"
        )


@contextlib.contextmanager
def zero_init(enabled: bool):
    """Build the model inside DeepSpeed's ``zero.Init`` only when asked.

    accelerate registers its ZeRO-3 config with transformers whatever ``zero3_init_flag`` says, so
    ``from_pretrained`` / ``from_config`` would always construct partitioned weights. With the flag off
    (and always for random ``model_config`` models, whose init must not depend on the launcher) the
    model is built whole on every process and partitioned by `accelerator.prepare`.
    """
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    if enabled or saved is None:
        yield
        return
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def gathered(accelerator, params):
    """Under ZeRO-3, materialise ``params`` on every process for the duration (no-op otherwise)."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Average the trainable parameters' gradients over the processes in one flat all-reduce.

    Done by hand instead of by DDP's hooks so that any `training_loss` works: several forwards per
    step, forwards under ``no_grad`` (DDP then never arms its reducer), parameters without gradient.
    The trainable set is small (the method and LoRA), so one bucket is cheap. A parameter without a
    gradient counts as a zero gradient.
    """
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


__all__ = ["all_reduce_grads", "base_optimizer", "check_deepspeed_batch", "configure_deepspeed", "gathered",
           "is_deepspeed", "zero_init", "zero_stage"]
