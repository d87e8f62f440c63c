"""The training loop every recipe uses: one function, `train(cfg)`, for any trainable eviction method.

`train` runs the steps of a `Run`, in order:

1. `Run.__init__`: an `accelerate.Accelerator` (TensorBoard logging into ``output_dir``; gradient
   accumulation from the config, or from the DeepSpeed JSON when it fixes one) and the seed;
2. `Run.open_output_dir`: refuse to clobber an earlier run, or find the checkpoint to resume from;
3. `Run.load_data`: the data (`trainkv.training.data`), consumed in a fixed, seeded order counted in samples;
4. `Run.load_model`: the base model (`trainkv.load_model`, or a random one from ``model_config``), the
   method attached (`trainkv.hub.load.attach_with_base`; backbone frozen), optional LoRA injected with
   peft beside it, the resumed weights;
5. `Run.prepare`: AdamW over the parameters that require gradients (the method's, plus LoRA), warmup
   then cosine / linear / constant learning rate, `accelerator.prepare`, the batch plan;
6. `Run.restore_progress`: optimizer, schedule and data position of the resumed checkpoint;
7. `Run.run_steps`: per step ``loss, logs = Method.training_loss(model, batch, progress)``, backward,
   clipping, optimizer step (`Run.optimizer_step`); logs (loss, the method's logs, lr, grad norm,
   tokens/s) to TensorBoard, ``metrics.jsonl`` and a progress bar; a checkpoint every ``save_every``
   steps (`trainkv.training.checkpoint`);
8. `Run.export`: the method's weights (and LoRA) as a gate checkpoint in ``<output_dir>/final/``
   (`trainkv.hub.save.to_checkpoint`), and ``train_summary.json``.

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
import gc
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
from typing import Any, Callable, TextIO

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, inject_adapter_in_model
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from ..hub.format import LORA_PREFIX
from ..hub.load import attach_with_base
from ..hub.save import to_checkpoint
from ..methods import METHOD_ATTR, get_method, method_modules
from ..models import load_model, load_tokenizer
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .data import BatchPlan, SampleOrder, build_dataset, data_seed, get_batch, pad_token_id
from .distributed import (all_reduce_grads, base_optimizer, check_deepspeed_batch, configure_deepspeed, gathered,
                          is_deepspeed, zero_init, zero_stage)
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


# --- the run, step by step ---------------------------------------------------------------------------


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
    cfg.validate()
    cfg.check_method()
    run = Run(cfg)
    run.open_output_dir()
    run.load_data(tokenizer, dataset)
    run.load_model(model)
    run.prepare()
    run.restore_progress()
    run.announce()
    run.run_steps(stop_after)
    final_dir = run.export() if run.step >= cfg.max_steps else None
    result = TrainResult(run.output_dir, final_dir, run.step, run.samples_seen, run.history, run.last_checkpoint,
                         run.resume.path if run.resume else None)
    run.close()
    return result


@dataclass
class Resume:
    """The checkpoint a run continues from, as read from disk."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict


class Run:
    """One training run: its settings, the accelerator, model, optimizer and data, and how far it got.

    `train` calls the steps below in order; each fills in what the next ones use.
    """

    def __init__(self, cfg: TrainConfig):
        """Set up the accelerator (precision, logging, accumulation) and seed every generator."""
        self.cfg = cfg
        self.method_cls = get_method(cfg.method["method"])
        self.output_dir = Path(cfg.output_dir)
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
        self.on_gpu = torch.cuda.is_available() and not use_cpu
        self.dtype = resolve_dtype(cfg.dtype, self.on_gpu)
        self.mixed = resolve_mixed_precision(cfg, self.dtype, self.on_gpu)
        self.accelerator = Accelerator(
            log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
            project_dir=str(self.output_dir),
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=self.mixed,
            step_scheduler_with_optimizer=False,
        )
        self.deepspeed = is_deepspeed(self.accelerator)
        self.main = self.accelerator.is_main_process
        set_seed(cfg.seed)
        self.resume: Resume | None = None
        self.step = self.samples_seen = self.total_tokens = 0
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None

    # --- 2. output directory and resume ---------------------------------------------------------------

    def open_output_dir(self) -> None:
        """Refuse to clobber an earlier run's checkpoints, clean up or start over, save the config, and read
        the checkpoint to resume from (if any)."""
        cfg, accelerator, output_dir = self.cfg, self.accelerator, self.output_dir
        resume_from = _resolve_resume(cfg, output_dir)
        root = ckpt.checkpoints_root(output_dir)
        if resume_from is None and cfg.resume is False and ckpt.list_checkpoints(root) and not cfg.overwrite_output_dir:
            raise ConfigError(
                f"{output_dir} already holds checkpoints of an earlier run: pass --resume (or resume=auto) to continue "
                f"it, overwrite_output_dir=true to start over, or another output_dir"
            )
        accelerator.wait_for_everyone()
        if self.main:
            output_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is None and cfg.overwrite_output_dir:
                shutil.rmtree(root, ignore_errors=True)
                (output_dir / METRICS_NAME).unlink(missing_ok=True)
            ckpt.remove_partial(root)
            cfg.save(output_dir / "config.yaml")
        accelerator.wait_for_everyone()
        if resume_from is not None:
            weights, optimizer, state = ckpt.read_checkpoint(resume_from)
            _check_compatible(state, cfg, resume_from)
            self.resume = Resume(resume_from, weights, optimizer, state)
        self.last_checkpoint = resume_from

    # --- 3. data ----------------------------------------------------------------------------------------

    def load_data(self, tokenizer: Any, dataset: Any) -> None:
        """The tokenized rows (given, or built from ``cfg.data``), the padding id and the seeded sample order."""
        cfg = self.cfg
        if tokenizer is None and dataset is None and (cfg.tokenizer or cfg.model_config is None):
            tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        if dataset is None:
            with self.accelerator.main_process_first():
                dataset = build_dataset(cfg.data, tokenizer, seed=cfg.seed)
        self.dataset = dataset
        self.pad_id = 0 if tokenizer is None else pad_token_id(tokenizer)
        self.order = SampleOrder(len(dataset), data_seed(cfg.data, cfg.seed), cfg.data.shuffle)

    # --- 4. model ---------------------------------------------------------------------------------------

    def load_model(self, model: nn.Module | Callable[[], nn.Module] | None) -> None:
        """The base model (given, from a factory, loaded or random), the method attached, LoRA, the resumed weights."""
        cfg, accelerator = self.cfg, self.accelerator
        # DeepSpeed places (and under ZeRO-3 partitions) the model itself: a pretrained model is loaded on the CPU
        # first; a random `model_config` model is built on this process's GPU, where its init takes seconds.
        device = accelerator.device
        if self.deepspeed and (cfg.model_config is None or not self.on_gpu):
            device = torch.device("cpu")
        zero3_init = zero_stage(accelerator) == 3 and cfg.model_config is None and bool(
            accelerator.state.deepspeed_plugin.zero3_init_flag)
        with zero_init(zero3_init):
            if model is None:
                model = build_model(cfg, self.dtype, device)
            elif not isinstance(model, nn.Module):
                model = model()
        model.config.use_cache = False
        self.named = setup_trainable(model, cfg, upcast=self.mixed != "no" and not self.deepspeed)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)  # replays the method's forward state in the recomputation
        model.train()
        if self.resume is not None:
            ckpt.check_names(self.resume.weights, self.named, self.resume.path)
            ckpt.load_weights(self.named, self.resume.weights)
        self.model = model
        self.num_trainable = sum(p.numel() for _, p in self.named)
        self.num_total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: partitioned

    # --- 5. optimizer, accelerate, batches ----------------------------------------------------------------

    def prepare(self) -> None:
        """AdamW and its schedule, `accelerator.prepare` (DDP / DeepSpeed), and the batch plan."""
        cfg, accelerator = self.cfg, self.accelerator
        # DeepSpeed: one parameter group (ZeRO links the optimizer state of a second group wrongly)
        optimizer, self.group_names = make_optimizer(self.named, cfg, single_group=self.deepspeed)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        if self.deepspeed:
            configure_deepspeed(accelerator, cfg)
        self.wrapped, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.unwrapped = accelerator.unwrap_model(self.wrapped)
        self.view = self.wrapped if self.wrapped is self.unwrapped else ModelView(self.wrapped, self.unwrapped)
        self.ddp = isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel)
        batch_size = cfg.batch_size
        if self.deepspeed:
            batch_size = int(accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"])
        self.plan = BatchPlan(batch_size, accelerator.num_processes, accelerator.gradient_accumulation_steps,
                              accelerator.process_index)
        if self.deepspeed:
            check_deepspeed_batch(accelerator, self.plan)

    def close(self) -> None:
        """End the run on every rank: drop the wrapped model, optimizer and schedule while the process group is still
        registered, give the process group's worker threads a moment, then destroy it.

        The order matters for gloo (several CPU processes): DDP's reducer holds the process group, and when the
        reducer was the last holder, freeing it (at ``train``'s return, with the GIL held) joined gloo's worker
        threads while one of them waited for the GIL to free a finished collective's Python tensors: a deadlock
        (py-spy: ``~Reducer`` -> ``~ProcessGroupGloo`` -> ``std::thread::join`` on the main thread, ``decref`` waiting
        for the GIL in ``ProcessGroupGloo::runLoop``), seen now and then in test_torchrun_two_cpu_processes_agree."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        for name in ("wrapped", "view", "unwrapped", "optimizer", "scheduler", "model"):
            if hasattr(self, name):
                setattr(self, name, None)
        accelerator.free_memory()  # the accelerator's own references to what it prepared
        gc.collect()  # the reducer goes now; the process group lives on in the default group
        time.sleep(0.2)  # the GIL released: gloo's threads finish freeing their last collectives
        accelerator.end_training()  # trackers, then the process group (its threads idle)

    # --- 6. resume ----------------------------------------------------------------------------------------

    def restore_progress(self) -> None:
        """From the resumed checkpoint: optimizer state, schedule, step and samples consumed; metrics cut to it."""
        resume = self.resume
        if resume is not None:
            ckpt.load_optimizer(self.accelerator, self.optimizer, self.named, resume.weights, resume.optimizer,
                                resume.state.get("optimizer_param_groups", []))
            self.scheduler.load_state_dict(resume.state["scheduler"])
            for group, lr in zip(base_optimizer(self.optimizer).param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
            self.step, self.samples_seen = int(resume.state["step"]), int(resume.state["samples_seen"])
            if resume.state.get("global_batch") != self.plan.global_batch:
                logger.warning("resuming with a global batch of %d sequences (checkpoint: %s); continuing at sample %d",
                               self.plan.global_batch, resume.state.get("global_batch"), self.samples_seen)
            if self.main:
                _truncate_metrics(self.output_dir / METRICS_NAME, self.step)
        self.accelerator.wait_for_everyone()

    def announce(self) -> None:
        """One log line about the run; the TensorBoard trackers."""
        cfg = self.cfg
        if self.main:
            logger.info("trainkv: %s on %s, %d trainable of %d parameters (%.3f%%), %d processes, global batch %d, "
                        "%d steps%s", cfg.method["method"], cfg.model if cfg.model_config is None else "model_config",
                        self.num_trainable, self.num_total, 100 * self.num_trainable / max(1, self.num_total),
                        self.accelerator.num_processes, self.plan.global_batch, cfg.max_steps,
                        f", resumed from {self.resume.path}" if self.resume else "")
        if cfg.report_to != "none":
            self.accelerator.init_trackers(cfg.run_name, config=_flat(cfg.to_dict()))

    # --- 7. the loop ----------------------------------------------------------------------------------------

    def run_steps(self, stop_after: int | None) -> None:
        """Optimizer steps until ``max_steps`` (or ``stop_after`` steps of this call), each logged and checkpointed."""
        cfg = self.cfg
        metrics_file = open(self.output_dir / METRICS_NAME, "a") if self.main else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.main and cfg.progress_bar),
                   desc=cfg.run_name, dynamic_ncols=True)
        start_step = self.step
        self.t_run = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                if stop_after is not None and self.step - start_step >= stop_after:
                    break
                record = self.optimizer_step()
                self.log(record, metrics_file, bar)
                self.maybe_checkpoint(record)
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()

    def optimizer_step(self) -> dict:
        """One optimizer step over this process's micro-batches; returns the step's record (averaged over processes)."""
        t0 = time.perf_counter()
        seed_step(self.cfg.seed, self.step, self.accelerator.process_index)
        progress = self.step / self.cfg.max_steps
        losses, logs_sum, tokens, grad_norm = [], {}, 0, None
        micro = self.plan.micro_batches(self.samples_seen)
        for index, (start, count) in enumerate(micro):
            last = index == len(micro) - 1
            self.accelerator.sync_gradients = last  # DeepSpeed: accumulation boundary; accelerate: optimizer gating
            batch = get_batch(self.dataset, self.order, start, count, self.pad_id)
            tokens += int(batch["attention_mask"].sum())
            loss, logs = self._forward_backward(batch, progress)
            if last:
                grad_norm = self._apply_gradients()
            losses.append(loss.detach().float())
            for k, v in (logs or {}).items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
        lr_used = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        self.samples_seen += self.plan.global_batch
        return self._record(losses, logs_sum, tokens, lr_used, grad_norm, t0)

    def _forward_backward(self, batch: dict[str, torch.Tensor], progress: float) -> tuple[torch.Tensor, dict]:
        accelerator = self.accelerator
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        # DDP never reduces by itself here: gradients are all-reduced in _apply_gradients (see all_reduce_grads)
        with accelerator.no_sync(self.wrapped) if self.ddp else contextlib.nullcontext():
            with accelerator.autocast():
                loss, logs = self.method_cls.training_loss(self.view, batch, progress)
            if not torch.isfinite(loss):
                parts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (logs or {}).items())
                raise FloatingPointError(f"step {self.step + 1}: the loss is {loss.item()}"
                                         f"{f' ({parts})' if parts else ''}; {self._nonfinite_hint()}")
            accelerator.backward(loss)  # divides by the accumulation steps (DeepSpeed: its own scaling)
        return loss, logs

    def _apply_gradients(self) -> float | None:
        """All-reduce (DDP), clip, step and zero the gradients; returns the gradient norm where it is measured."""
        cfg, accelerator = self.cfg, self.accelerator
        params = [p for _, p in self.named]
        grad_norm = None
        if self.ddp:
            all_reduce_grads(params, accelerator.num_processes)
        # which gradients are finite, taken before clipping (read only on a non-finite norm): clipping by a NaN norm
        # multiplies every gradient by NaN, and clipping by value turns an inf into a finite number
        names, finite = ([], None) if self.deepspeed else self._finite_flags()
        if self.deepspeed or cfg.clip_grad == "norm":  # DeepSpeed clipped inside backward; this reads the norm
            norm = accelerator.clip_grad_norm_(params, cfg.clip_value)
            grad_norm = float(norm) if norm is not None else None
        elif cfg.clip_grad == "value":
            accelerator.clip_grad_value_(params, cfg.clip_value)
        if not self.deepspeed and not self._finite(finite, grad_norm):  # (DeepSpeed handles overflow itself)
            # checked before the update, so the weights (and the next checkpoint) stay finite
            bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
            raise FloatingPointError(f"step {self.step + 1}: non-finite gradients (norm {grad_norm}) in {len(bad)} "
                                     f"parameters, first {bad[:3]}; the weights were not updated. {self._nonfinite_hint()}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _finite_flags(self) -> tuple[list[str], torch.Tensor | None]:
        """The names of the parameters that have a gradient and, on the device (no host read), whether each is finite."""
        named = [(n, p.grad) for n, p in self.named if p.grad is not None]
        if not named:
            return [], None
        return [n for n, _ in named], torch.stack([torch.isfinite(g).all() for _, g in named])

    @staticmethod
    def _finite(finite: torch.Tensor | None, grad_norm: float | None) -> bool:
        """Whether every gradient is finite (from the clipped norm when it was measured, else one device read)."""
        if grad_norm is not None:
            return math.isfinite(grad_norm)
        return finite is None or bool(finite.all())

    def _nonfinite_hint(self) -> str:
        last = self.last_checkpoint
        where = (f"the last checkpoint ({last.name}) was written before this step; resume from it" if last is not None
                 else "no checkpoint was written yet; retry")
        return f"{where} with a lower lr, or in float32 (dtype=float32 mixed_precision=no) to tell a bf16 overflow from a bug"

    def _record(self, losses: list[torch.Tensor], logs_sum: dict[str, float], tokens: int, lr_used: float,
                grad_norm: float | None, t0: float) -> dict:
        """The step's record, averaged over the processes (a collective: every process takes part)."""
        accelerator = self.accelerator
        keys = sorted(logs_sum)
        local = torch.stack([torch.stack(losses).mean().cpu()] + [torch.tensor(logs_sum[k] / len(losses)) for k in keys]
                            + [torch.tensor(float(tokens))]).to(accelerator.device, torch.float64)
        reduced = accelerator.reduce(local, reduction="sum") / accelerator.num_processes
        step_tokens = int(round(float(reduced[-1]) * accelerator.num_processes))
        self.total_tokens += step_tokens
        elapsed = time.perf_counter() - t0
        record = {"step": self.step, "loss": float(reduced[0]),
                  **{k: float(reduced[i + 1]) for i, k in enumerate(keys)},
                  "lr": lr_used, "tokens_per_s": step_tokens / max(elapsed, 1e-9),
                  "step_time_s": elapsed, "samples_seen": self.samples_seen}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if self.on_gpu:
            record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.history.append(record)
        return record

    def log(self, record: dict, metrics_file: TextIO | None, bar) -> None:
        """Every ``log_every`` steps (and the last): TensorBoard and ``metrics.jsonl``; the progress bar every step."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            if cfg.report_to != "none":
                self.accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=self.step)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        bar.update(1)

    def maybe_checkpoint(self, record: dict) -> None:
        """Every ``save_every`` steps (not the last: the export follows), a resumable checkpoint."""
        cfg, step = self.cfg, self.step
        if not (cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps):
            return
        state = {"step": step, "samples_seen": self.samples_seen, "global_batch": self.plan.global_batch,
                 "num_processes": self.accelerator.num_processes, "max_steps": cfg.max_steps,
                 "scheduler": self.scheduler.state_dict(), "config": cfg.to_dict(),
                 "param_groups": self.group_names, "loss": record["loss"]}
        path = ckpt.save_checkpoint(self.accelerator, self.optimizer, self.named, state, self.output_dir, step,
                                    cfg.keep_last)
        self.last_checkpoint = path or ckpt.checkpoints_root(self.output_dir) / f"{ckpt.PREFIX}{step:08d}"

    # --- 8. export ------------------------------------------------------------------------------------------

    def export(self) -> Path:
        """The finished run: the gate checkpoint in ``<output_dir>/final/`` and ``train_summary.json``."""
        accelerator = self.accelerator
        weights = ckpt.gather_weights(accelerator, self.named)
        final_dir = self.output_dir / FINAL_NAME
        _export_final(accelerator, self.unwrapped, self.named, weights, final_dir)
        checksum = torch.tensor([float(sum(w.double().sum() for w in (p.detach().float() for _, p in self.named)))],
                                dtype=torch.float64, device=accelerator.device)
        checksums = [float(x) for x in accelerator.gather(checksum).cpu()]
        memory = torch.tensor([torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
                              if self.on_gpu else [0.0, 0.0], dtype=torch.float64, device=accelerator.device)
        memory = accelerator.gather(memory).view(-1, 2).cpu().tolist()  # [process][allocated, reserved]
        if not self.deepspeed and len(set(checksums)) > 1:
            logger.warning("trainable weights differ between processes: %s", checksums)
        if self.main:
            self._write_summary(weights, checksums, memory)
        return final_dir

    def _write_summary(self, weights: dict[str, torch.Tensor], checksums: list[float],
                       memory: list[list[float]]) -> None:
        cfg, accelerator, on_gpu = self.cfg, self.accelerator, self.on_gpu
        summary = {
            "step": self.step, "samples_seen": self.samples_seen, "max_steps": cfg.max_steps,
            "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "mixed_precision": self.mixed, "dtype": str(self.dtype).replace("torch.", ""),
            "global_batch": self.plan.global_batch,
            "trainable_parameters": self.num_trainable, "total_parameters": self.num_total,
            "wall_time_s": time.perf_counter() - self.t_run, "tokens": self.total_tokens,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "resumed_from": str(self.resume.path) if self.resume else None,
            "replica_checksums": checksums, "weights_sha256": _weights_digest(weights),
            "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
            "max_memory_gib_per_process": [m[0] for m in memory] if on_gpu else None,
            "max_memory_reserved_gib_per_process": [m[1] for m in memory] if on_gpu else None,
        }
        (self.output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))


# --- model --------------------------------------------------------------------------------------------


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


# --- resume, logging, export --------------------------------------------------------------------------


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
    with gathered(accelerator, [p for _, p in named]):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            checkpoint = to_checkpoint(unwrapped, card_name=str(final_dir))
            checkpoint.tensors.update(_master_tensors(unwrapped, named, weights, checkpoint.tensors))
            checkpoint.save_pretrained(tmp)
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.replace(tmp, final_dir)
    accelerator.wait_for_everyone()


def _weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()


__all__ = ["ModelView", "Run", "TrainResult", "build_model", "lr_factor", "make_optimizer", "seed_step",
           "setup_trainable", "train"]
