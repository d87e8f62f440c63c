"""The training loop every recipe uses: one function, `train(cfg)`, for any trainable eviction method.

What it does, in order:

1. an `accelerate.Accelerator` (TensorBoard logging into ``output_dir``; gradient accumulation from
   the config, or from the DeepSpeed JSON when it fixes one);
2. the base model (`trainkv.load_model`, or a random one from ``model_config``), the method attached
   with `trainkv.attach` (backbone frozen), optional LoRA injected with peft beside it;
3. AdamW over the parameters that require gradients (the method's, plus LoRA), warmup then cosine /
   linear / constant learning rate;
4. the data (`trainkv.training.data`), consumed in a fixed, seeded order counted in samples;
5. the loop: ``loss, logs = Method.training_loss(model, batch, progress)``, backward, clipping, step,
   logs (loss, the method's logs, lr, grad norm, tokens/s) to TensorBoard, ``metrics.jsonl`` and a
   progress bar, and a checkpoint every ``save_every`` steps (`trainkv.training.checkpoint`);
6. the method's weights (and LoRA) exported to ``output_dir/final/`` with `trainkv.save_gated`.

The contract with a method (see `trainkv.methods.base.EvictionMethod`)::

    class SomeMethod(EvictionMethod):
        trainable = True
        @classmethod
        def training_loss(cls, model, batch, progress) -> tuple[torch.Tensor, dict[str, float]]: ...

``model`` behaves like the (unwrapped) Hugging Face model for attribute access (so
`trainkv.method_modules(model)` works) while calling it goes through the DDP / DeepSpeed wrapper;
``batch`` has ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` = no loss), ``[B, T]``;
``progress`` is ``step / max_steps`` in ``[0, 1)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..hub.load import attach_with_base
from ..hub.format import LORA_PREFIX
from ..hub.save import to_checkpoint
from ..methods import METHOD_ATTR, get_method, method_modules
from ..models import load_model, load_tokenizer
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .data import BatchPlan, SampleOrder, build_dataset, get_batch
from .recompute import enable_gradient_checkpointing

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "train_summary.json"
FINAL_NAME = "final"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a run returns: where it wrote, how far it got, and the per-step records of this process's run."""

    output_dir: Path
    final_dir: Path | None
    step: int
    samples_seen: int
    history: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history]


# --- model ------------------------------------------------------------------------------------------


class ModelView:
    """What `training_loss` receives: attributes of the unwrapped model, calls through the DDP / DeepSpeed wrapper."""

    def __init__(self, wrapped: nn.Module, model: nn.Module):
        object.__setattr__(self, "_wrapped", wrapped)
        object.__setattr__(self, "_model", model)

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_model"), name)

    def __setattr__(self, name, value):
        setattr(self._model, name, value)

    def __repr__(self) -> str:
        return f"ModelView({type(self._wrapped).__name__} -> {type(self._model).__name__})"


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return _DTYPES[name]


def resolve_mixed_precision(cfg: TrainConfig, dtype: torch.dtype, on_gpu: bool) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if env and env != "no":
        return env
    if on_gpu and dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    return "no"


def build_model(cfg: TrainConfig, dtype: torch.dtype, device) -> nn.Module:
    """The base model: `trainkv.load_model(cfg.model)`, or a random one built from ``cfg.model_config``."""
    if cfg.model_config is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        settings = dict(cfg.model_config)
        model_type = settings.pop("model_type", "llama")
        config = AutoConfig.for_model(model_type, **settings)
        with torch.device(device):  # initialise on the target device (an 8B random init takes minutes on CPU)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        digest = hashlib.sha256(json.dumps(cfg.model_config, sort_keys=True).encode()).hexdigest()[:12]
        model.config.trainkv_base_model = f"random-{model_type}-{digest}"
        return model.to(device).eval()
    return load_model(cfg.model, dtype=dtype, device=device)


def _is_lora(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def setup_trainable(model: nn.Module, cfg: TrainConfig, upcast: bool) -> list[tuple[str, nn.Parameter]]:
    """Attach the method (freezing the backbone), inject LoRA, and return the trainable (name, parameter) pairs."""
    if hasattr(model, "trainkv_state"):
        if model.trainkv_state.method.name != cfg.method["method"]:
            raise ConfigError(f"the given model carries method {model.trainkv_state.method.name!r}, the config asks "
                              f"for {cfg.method['method']!r}")
    else:
        attach_with_base(model, dict(cfg.method), eviction=dict(cfg.eviction) if cfg.eviction else None)
    if not getattr(model.config, "trainkv_base_model", None):
        model.config.trainkv_base_model = getattr(model.config, "_name_or_path", None) or cfg.model
    if cfg.lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), bias=cfg.lora.bias,
                          exclude_modules=rf".*\.{METHOD_ATTR}(\..*)?")
        inject_adapter_in_model(lora, model)
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if _is_lora(name):
                p.requires_grad_(True)
    for module in method_modules(model):
        module.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stray = [n for n, _ in named if f".{METHOD_ATTR}." not in n and not _is_lora(n)]
    if stray:
        raise RuntimeError(f"backbone parameters would be trained: {stray[:5]}; only the method and LoRA may train")
    if not named:
        raise ConfigError(f"method {cfg.method['method']!r} attached no trainable parameters")
    if upcast:
        for _, p in named:
            if p.dtype != torch.float32:
                p.data = p.data.float()
    return named


# --- optimisation -------------------------------------------------------------------------------------


def make_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, single_group: bool = False
                   ) -> tuple[torch.optim.Optimizer, list[list[str]]]:
    """AdamW; no weight decay on biases and 1-d parameters (unless ``single_group``: one group, decay on all).

    Returns the optimizer and its groups' parameter names.
    """
    if single_group or not cfg.weight_decay:
        decay, no_decay = list(named), []
    else:
        decay = [(n, p) for n, p in named if p.ndim >= 2]
        no_decay = [(n, p) for n, p in named if p.ndim < 2]
    groups, names = [], []
    for items, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
        if items:
            groups.append({"params": [p for _, p in items], "weight_decay": wd})
            names.append([n for n, _ in items])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return opt, names


def warmup_steps(cfg: TrainConfig) -> int:
    return cfg.warmup_steps or int(round(cfg.warmup_ratio * cfg.max_steps))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    warm = warmup_steps(cfg)
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.lr_scheduler == "constant":
        return 1.0
    span = max(1, cfg.max_steps - warm)
    t = min(1.0, (step - warm) / span)
    lo = cfg.min_lr_ratio
    if cfg.lr_scheduler == "linear":
        return lo + (1.0 - lo) * (1.0 - t)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def seed_step(seed: int, step: int, rank: int) -> None:
    """Re-seed every generator for optimizer step ``step`` on process ``rank`` (resume needs no RNG state)."""
    s = (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device


# --- helpers ------------------------------------------------------------------------------------------


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(accelerator) -> int:
    if not _is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)


def _configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Fill the DeepSpeed JSON's ``auto`` batch and clipping fields from the config (no dataloader is prepared)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.clip_value if cfg.clip_grad == "norm" else 0.0
    if cfg.clip_grad == "value":
        logger.warning("DeepSpeed clips by norm only: clip_grad=value is ignored (gradient_clipping=%s)",
                       ds["gradient_clipping"])


def _check_deepspeed_batch(accelerator, plan: BatchPlan) -> None:
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
def _zero_init(enabled: bool):
    """Build the model inside DeepSpeed's ``zero.Init`` only when asked.

    accelerate registers its ZeRO-3 config with transformers whatever ``zero3_init_flag`` says, so
    ``from_pretrained`` / ``from_config`` would always construct partitioned weights. With the flag off
    (and always for random ``model_config`` models, whose init must not depend on the launcher) the
    model is built whole on every process and partitioned by `accelerator.prepare`.
    """
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    if enabled or saved is None:
        yield
        return
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def _gathered(accelerator, params):
    """Under ZeRO-3, materialise ``params`` on every process for the duration (no-op otherwise)."""
    if _zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def _all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Average the trainable parameters' gradients over the processes in one flat all-reduce.

    Done by hand instead of by DDP's hooks so that any `training_loss` works: several forwards per
    step, forwards under ``no_grad`` (DDP then never arms its reducer), parameters without gradient.
    The trainable set is small (the method and LoRA), so one bucket is cheap. A parameter without a
    gradient counts as a zero gradient.
    """
    import torch.distributed as dist

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


def _resolve_resume(cfg: TrainConfig, output_dir: Path) -> Path | None:
    root = ckpt.checkpoints_root(output_dir)
    if cfg.resume is False:
        return None
    if isinstance(cfg.resume, str) and cfg.resume.lower() != "auto":
        path = Path(cfg.resume)
        if path.is_dir() and not ckpt.is_complete(path):  # an output dir or checkpoints dir: take its latest
            found = ckpt.latest_checkpoint(path) or ckpt.latest_checkpoint(ckpt.checkpoints_root(path))
            if found is None:
                raise ConfigError(f"resume={cfg.resume}: no complete checkpoint there")
            return found
        if not ckpt.is_complete(path):
            raise ConfigError(f"resume={cfg.resume}: not a complete checkpoint directory")
        return path
    found = ckpt.latest_checkpoint(root)
    if found is None and cfg.resume is True:
        raise ConfigError(f"resume=true but {root} holds no complete checkpoint (use resume=auto to start fresh)")
    return found


def _check_compatible(saved: dict, cfg: TrainConfig, source: Path) -> None:
    old = saved.get("config", {})
    for key in ("model", "model_config", "method", "lora"):
        if old.get(key) != cfg.to_dict().get(key):
            raise ConfigError(f"cannot resume from {source}: `{key}` differs ({old.get(key)!r} in the checkpoint, "
                              f"{cfg.to_dict().get(key)!r} now)")
    for key in ("data", "seed"):
        if old.get(key) != cfg.to_dict().get(key):
            logger.warning("resuming with a different `%s` than the checkpoint: the data order will differ", key)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(line + "\n" for line in keep))


def _master_tensors(unwrapped: nn.Module, named, weights: dict[str, torch.Tensor], exported: dict) -> dict:
    """The gathered fp32 masters (``weights``) under the checkpoint's tensor names.

    Under DeepSpeed with bf16 the module's own parameters are bf16 copies; the export keeps what the
    optimizer holds, as a single-process run does. Method tensors are ``layers.{i}.{name}``, LoRA ones
    ``lora.{peft name}`` (the parameter's name without the adapter name).
    """
    by_id = {id(p): n for n, p in named}
    out = {}
    for i, module in enumerate(method_modules(unwrapped)):
        for name, p in module.named_parameters():
            full = by_id.get(id(p))
            if full is not None and f"layers.{i}.{name}" in exported:
                out[f"layers.{i}.{name}"] = weights[full]
    adapters = list(getattr(unwrapped, "peft_config", None) or {})
    for full in weights:
        if _is_lora(full):
            for adapter in adapters:
                key = LORA_PREFIX + full.replace(f".{adapter}.", ".")
                if key in exported:
                    out[key] = weights[full]
    return out


def _export_final(accelerator, unwrapped: nn.Module, named, weights: dict[str, torch.Tensor], final_dir: Path) -> None:
    """Write the method (+ LoRA) to ``final_dir`` as a gate checkpoint (`trainkv.hub`), with the fp32 master values
    of the trained tensors; written to a temporary folder and renamed into place."""
    tmp = final_dir.with_name(f".tmp-{final_dir.name}-{os.getpid()}")
    with _gathered(accelerator, [p for _, p in named]):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            checkpoint = to_checkpoint(unwrapped, card_name=str(final_dir))
            checkpoint.tensors.update(_master_tensors(unwrapped, named, weights, checkpoint.tensors))
            checkpoint.save_pretrained(tmp)
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.replace(tmp, final_dir)
    accelerator.wait_for_everyone()


# --- the loop -----------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    tokenizer: Any = None,
    dataset: Any = None,
    *,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.model``; see the module docstring.

    ``model`` (a model or a zero-argument factory), ``tokenizer`` and ``dataset`` (rows with
    ``input_ids`` and ``labels``) replace what the config would load (tests, notebooks).
    ``stop_after`` ends the loop after that many optimizer steps of this call without the final
    export, like a killed run (tests of resume).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg.validate()
    cfg.check_method()
    method_cls = get_method(cfg.method["method"])
    output_dir = Path(cfg.output_dir)

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    on_gpu = torch.cuda.is_available() and not use_cpu
    dtype = resolve_dtype(cfg.dtype, on_gpu)
    mixed = resolve_mixed_precision(cfg, dtype, on_gpu)
    accelerator = Accelerator(
        log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
        project_dir=str(output_dir),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=mixed,
        step_scheduler_with_optimizer=False,
    )
    deepspeed = _is_deepspeed(accelerator)
    main = accelerator.is_main_process
    set_seed(cfg.seed)

    # --- resume / output directory ---
    resume_from = _resolve_resume(cfg, output_dir)
    root = ckpt.checkpoints_root(output_dir)
    if resume_from is None and cfg.resume is False and ckpt.list_checkpoints(root):
        if not cfg.overwrite_output_dir:
            raise ConfigError(
                f"{output_dir} already holds checkpoints of an earlier run: pass --resume (or resume=auto) to continue "
                f"it, overwrite_output_dir=true to start over, or another output_dir"
            )
    accelerator.wait_for_everyone()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and cfg.overwrite_output_dir:
            shutil.rmtree(root, ignore_errors=True)
            (output_dir / METRICS_NAME).unlink(missing_ok=True)
        ckpt.remove_partial(root)
        cfg.save(output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    saved = None
    if resume_from is not None:
        weights_saved, opt_saved, saved = ckpt.read_checkpoint(resume_from)
        _check_compatible(saved, cfg, resume_from)

    # --- tokenizer, data ---
    if tokenizer is None and dataset is None and (cfg.tokenizer or cfg.model_config is None):
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    if dataset is None:
        with accelerator.main_process_first():
            dataset = build_dataset(cfg.data, tokenizer, seed=cfg.seed)
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    data_seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed
    order = SampleOrder(len(dataset), data_seed, cfg.data.shuffle)

    # --- model, method, LoRA ---
    # DeepSpeed places (and under ZeRO-3 partitions) the model itself: a pretrained model is loaded on the CPU
    # first; a random `model_config` model is built on this process's GPU, where its init takes seconds.
    device = accelerator.device
    if deepspeed and (cfg.model_config is None or not on_gpu):
        device = torch.device("cpu")
    zero_init = _zero_stage(accelerator) == 3 and cfg.model_config is None and bool(
        accelerator.state.deepspeed_plugin.zero3_init_flag)
    with _zero_init(zero_init):
        if model is None:
            model = build_model(cfg, dtype, device)
        elif not isinstance(model, nn.Module):
            model = model()
    model.config.use_cache = False
    named = setup_trainable(model, cfg, upcast=mixed != "no" and not deepspeed)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)  # replays the method's forward state in the recomputation
    model.train()
    if resume_from is not None:
        ckpt.check_names(weights_saved, named, resume_from)
        ckpt.load_weights(named, weights_saved)
    num_trainable = sum(p.numel() for _, p in named)
    num_total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 init: partitioned

    # DeepSpeed: one parameter group (ZeRO links the optimizer state of a second group wrongly)
    optimizer, group_names = make_optimizer(named, cfg, single_group=deepspeed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if deepspeed:
        _configure_deepspeed(accelerator, cfg)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(wrapped)
    view = wrapped if wrapped is unwrapped else ModelView(wrapped, unwrapped)
    ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    batch_size = cfg.batch_size
    if deepspeed:
        batch_size = int(accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"])
    accumulation = accelerator.gradient_accumulation_steps
    plan = BatchPlan(batch_size, accelerator.num_processes, accumulation, accelerator.process_index)
    if deepspeed:
        _check_deepspeed_batch(accelerator, plan)

    step, samples_seen = 0, 0
    if saved is not None:
        ckpt.load_optimizer(accelerator, optimizer, named, weights_saved, opt_saved, saved.get("optimizer_param_groups", []))
        scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(ckpt._base_optimizer(optimizer).param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        step, samples_seen = int(saved["step"]), int(saved["samples_seen"])
        if saved.get("global_batch") != plan.global_batch:
            logger.warning("resuming with a global batch of %d sequences (checkpoint: %s); continuing at sample %d",
                           plan.global_batch, saved.get("global_batch"), samples_seen)
        if main:
            _truncate_metrics(output_dir / METRICS_NAME, step)
    accelerator.wait_for_everyone()

    if main:
        logger.info("trainkv: %s on %s, %d trainable of %d parameters (%.3f%%), %d processes, global batch %d, "
                    "%d steps%s", cfg.method["method"], cfg.model if cfg.model_config is None else "model_config",
                    num_trainable, num_total, 100 * num_trainable / max(1, num_total), accelerator.num_processes,
                    plan.global_batch, cfg.max_steps, f", resumed from {resume_from}" if resume_from else "")
    if cfg.report_to != "none":
        accelerator.init_trackers(cfg.run_name, config=_flat(cfg.to_dict()))

    history: list[dict] = []
    metrics_file = open(output_dir / METRICS_NAME, "a") if main else None
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (main and cfg.progress_bar), desc=cfg.run_name,
               dynamic_ncols=True)
    last_checkpoint = resume_from
    start_step = step
    t_run = time.perf_counter()
    total_tokens = 0
    try:
        while step < cfg.max_steps:
            if stop_after is not None and step - start_step >= stop_after:
                break
            t0 = time.perf_counter()
            seed_step(cfg.seed, step, accelerator.process_index)
            progress = step / cfg.max_steps
            losses, logs_sum, tokens = [], {}, 0
            grad_norm = None
            micro = plan.micro_batches(samples_seen)
            for index, (start, count) in enumerate(micro):
                last = index == len(micro) - 1
                accelerator.sync_gradients = last  # DeepSpeed: accumulation boundary; accelerate: optimizer gating
                batch = get_batch(dataset, order, start, count, pad_id)
                tokens += int(batch["attention_mask"].sum())
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                # DDP never reduces by itself here: gradients are all-reduced below (see _all_reduce_grads)
                with accelerator.no_sync(wrapped) if ddp else contextlib.nullcontext():
                    with accelerator.autocast():
                        loss, logs = method_cls.training_loss(view, batch, progress)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"step {step + 1}: the loss is {loss.item()}")
                    accelerator.backward(loss)  # divides by the accumulation steps (DeepSpeed: its own scaling)
                if last:
                    params = [p for _, p in named]
                    if ddp:
                        _all_reduce_grads(params, accelerator.num_processes)
                    if deepspeed or cfg.clip_grad == "norm":  # DeepSpeed clipped inside backward; this reads the norm
                        norm = accelerator.clip_grad_norm_(params, cfg.clip_value)
                        grad_norm = float(norm) if norm is not None else None
                    elif cfg.clip_grad == "value":
                        accelerator.clip_grad_value_(params, cfg.clip_value)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
                for k, v in (logs or {}).items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
            lr_used = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            samples_seen += plan.global_batch
            # --- logging (a collective: every process takes part) ---
            keys = sorted(logs_sum)
            local = torch.stack([torch.stack(losses).mean().cpu()] + [torch.tensor(logs_sum[k] / len(losses)) for k in keys]
                                + [torch.tensor(float(tokens))]).to(accelerator.device, torch.float64)
            reduced = accelerator.reduce(local, reduction="sum") / accelerator.num_processes
            total_step_tokens = int(round(float(reduced[-1]) * accelerator.num_processes))
            total_tokens += total_step_tokens
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": float(reduced[0]), **{k: float(reduced[i + 1]) for i, k in enumerate(keys)},
                      "lr": lr_used, "tokens_per_s": total_step_tokens / max(elapsed, 1e-9),
                      "step_time_s": elapsed, "samples_seen": samples_seen}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if on_gpu:
                record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            history.append(record)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                if cfg.report_to != "none":
                    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            bar.update(1)
            # --- checkpoint ---
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                state = {"step": step, "samples_seen": samples_seen, "global_batch": plan.global_batch,
                         "num_processes": accelerator.num_processes, "max_steps": cfg.max_steps,
                         "scheduler": scheduler.state_dict(), "config": cfg.to_dict(),
                         "param_groups": group_names, "loss": record["loss"]}
                path = ckpt.save_checkpoint(accelerator, optimizer, named, state, output_dir, step, cfg.keep_last)
                last_checkpoint = path or ckpt.checkpoints_root(output_dir) / f"{ckpt.PREFIX}{step:08d}"
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    final_dir = None
    finished = step >= cfg.max_steps
    if finished:
        weights = ckpt.gather_weights(accelerator, named)
        final_dir = output_dir / FINAL_NAME
        _export_final(accelerator, unwrapped, named, weights, final_dir)
        checksum = torch.tensor([float(sum(w.double().sum() for w in (p.detach().float() for _, p in named)))],
                                dtype=torch.float64, device=accelerator.device)
        checksums = [float(x) for x in accelerator.gather(checksum).cpu()]
        memory = torch.tensor([torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
                              if on_gpu else [0.0, 0.0], dtype=torch.float64, device=accelerator.device)
        memory = accelerator.gather(memory).view(-1, 2).cpu().tolist()  # [process][allocated, reserved]
        if not deepspeed and len(set(checksums)) > 1:
            logger.warning("trainable weights differ between processes: %s", checksums)
        if main:
            summary = {
                "step": step, "samples_seen": samples_seen, "max_steps": cfg.max_steps,
                "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                "mixed_precision": mixed, "dtype": str(dtype).replace("torch.", ""), "global_batch": plan.global_batch,
                "trainable_parameters": num_trainable, "total_parameters": num_total,
                "wall_time_s": time.perf_counter() - t_run, "tokens": total_tokens,
                "final_loss": history[-1]["loss"] if history else None, "resumed_from": str(resume_from) if resume_from else None,
                "replica_checksums": checksums, "weights_sha256": _weights_digest(weights),
                "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
                "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
                "max_memory_gib_per_process": [m[0] for m in memory] if on_gpu else None,
                "max_memory_reserved_gib_per_process": [m[1] for m in memory] if on_gpu else None,
            }
            (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, final_dir, step, samples_seen, history, last_checkpoint, resume_from)


def _weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()


__all__ = ["ModelView", "TrainResult", "build_model", "lr_factor", "make_optimizer", "seed_step", "setup_trainable", "train"]
