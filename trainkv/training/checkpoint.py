"""Training checkpoints: atomic, world-size independent, and free of pickle.

A checkpoint is a directory ``<output_dir>/checkpoints/checkpoint-<step>/`` holding

* ``trainable.safetensors``: the full fp32 (master) value of every trainable parameter (the
  method's modules and LoRA), keyed by its name in the unwrapped model;
* ``optimizer.safetensors``: the AdamW state of each of those parameters (``<name>|exp_avg``,
  ``<name>|exp_avg_sq``, ``<name>|step``), gathered whole even under DeepSpeed ZeRO;
* ``trainer_state.json`` (written last): step, samples consumed, scheduler state, optimizer
  hyper-parameters, the config, the number of processes it was written with.

Only the main process writes, into ``checkpoints/.tmp-checkpoint-<step>-<id>/``; the directory is
renamed into place with `os.replace` once every file is flushed, so a run killed mid-save leaves a
``.tmp-*`` directory that resume ignores (and the next save removes). Everything is stored whole,
keyed by parameter name, and the data position is a count of samples, so a run can resume with a
different number of GPUs (or with / without DeepSpeed). Resume needs the checkpoint directory to be
readable from every process (a shared filesystem across nodes).

RNG: the trainer re-seeds every generator at the start of each optimizer step from
``(seed, step, process)``, so no RNG state needs saving to reproduce the run after a resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .distributed import base_optimizer, is_deepspeed

WEIGHTS_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return all((path / n).is_file() for n in (WEIGHTS_NAME, OPTIMIZER_NAME, STATE_NAME))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary and partial directories are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_partial(root: str | Path) -> list[Path]:
    """Delete temporary directories left by an interrupted save; returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(root: Path, step: int, files: dict[str, Any], keep_last: int) -> Path:
    """Write ``files`` (name -> tensors dict for ``.safetensors``, JSON-able for ``.json``) as checkpoint ``step``."""
    root.mkdir(parents=True, exist_ok=True)
    remove_partial(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # trainer_state.json last: a directory without it is never taken for a checkpoint
        for name in sorted(files, key=lambda n: n == STATE_NAME):
            target = tmp / name
            if name.endswith(".safetensors"):
                save_file({k: v.contiguous() for k, v in files[name].items()}, str(target))
            else:
                target.write_text(json.dumps(files[name], indent=1, sort_keys=True))
            with open(target, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            trash = root / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- gathering / restoring trainable state ----------------------------------------------------------


def _ds_optimizer_state(optimizer) -> None:
    """Make DeepSpeed ZeRO's optimizer state readable/writable per parameter.

    ZeRO creates the AdamW state lazily at the first step and links it to the parameters' fragments
    once, after the first parameter group's step (so a second group stays unlinked). Before a resume
    there is no state at all. This creates zero state where missing and (re-)links every group.
    """
    zero = getattr(optimizer, "optimizer", optimizer)
    base = base_optimizer(optimizer)
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_partitioned_groups_flat", None) or []
    for flat in flats:
        st = base.state[flat]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def gather_weights(accelerator, named_params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full fp32 values of the trainable parameters (a collective under DeepSpeed: call on every process)."""
    out = {}
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in named_params:
            out[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
    else:
        for name, p in named_params:
            out[name] = p.detach().float().cpu().clone()
    return out


def gather_optimizer(accelerator, optimizer, named_params) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW moments and step of each trainable parameter, whole (collective under DeepSpeed), and the
    parameter groups' hyper-parameters."""
    base = base_optimizer(optimizer)
    if is_deepspeed(accelerator):
        tensors = _gather_deepspeed_optimizer(optimizer, named_params)
    else:
        tensors = {}
        for name, p in named_params:
            for key, value in base.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{name}|{key}"] = value.detach().cpu().clone()
                elif isinstance(value, (int, float)):
                    tensors[f"{name}|{key}"] = torch.tensor(float(value))
    groups = [{k: v for k, v in g.items() if k != "params" and _jsonable(v)} for g in base.param_groups]
    return tensors, groups


def _gather_deepspeed_optimizer(optimizer, named_params) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state

    _ds_optimizer_state(optimizer)
    steps = [st.get("step") for st in base_optimizer(optimizer).state.values() if "step" in st]
    step = float(steps[0]) if steps else 0.0
    tensors = {}
    for name, p in named_params:
        for key in ADAM_KEYS:
            value = safe_get_full_optimizer_state(p, key)
            if value is not None:
                tensors[f"{name}|{key}"] = value.detach().float().cpu().clone()
        tensors[f"{name}|step"] = torch.tensor(step, dtype=torch.float32)
    return tensors


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(weights, optimizer tensors, trainer state) of a checkpoint directory (safetensors + JSON only)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (expected {WEIGHTS_NAME}, {OPTIMIZER_NAME}, {STATE_NAME})")
    state = json.loads((path / STATE_NAME).read_text())
    return load_file(str(path / WEIGHTS_NAME)), load_file(str(path / OPTIMIZER_NAME)), state


def check_names(saved: dict[str, torch.Tensor], named_params, source: Path) -> None:
    want = {n: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape) for n, p in named_params}
    have = {n: tuple(t.shape) for n, t in saved.items()}
    if want != have:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shape = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        raise ValueError(
            f"checkpoint {source} does not match this run's trainable parameters: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, different shapes {shape[:5]} (same model, method and LoRA settings needed)"
        )


@torch.no_grad()
def load_weights(named_params, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved values into the (not yet prepared) model's trainable parameters."""
    for name, p in named_params:
        p.copy_(weights[name].to(device=p.device, dtype=p.dtype))


def load_optimizer(accelerator, optimizer, named_params, weights, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Restore the optimizer state (and, under DeepSpeed, the fp32 master weights) after `prepare`."""
    base = base_optimizer(optimizer)
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        _ds_optimizer_state(optimizer)
        for name, p in named_params:
            safe_set_full_fp32_param(p, weights[name].to(accelerator.device))
            for key in ADAM_KEYS:
                if f"{name}|{key}" in tensors:
                    safe_set_full_optimizer_state(p, tensors[f"{name}|{key}"].to(accelerator.device), key)
        step = next((float(v) for k, v in tensors.items() if k.endswith("|step")), None)
        if step is not None:
            for st in base.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(step) if torch.is_tensor(st["step"]) else type(st["step"])(step)
        return
    order = [p for g in base.param_groups for p in g["params"]]
    ids = {id(p): i for i, p in enumerate(order)}
    state = {}
    for name, p in named_params:
        entry = {k.split("|", 1)[1]: v for k, v in tensors.items() if k.split("|", 1)[0] == name}
        if entry:
            state[ids[id(p)]] = entry
    current = base.state_dict()
    saved_groups = groups if groups and len(groups) == len(current["param_groups"]) else [{}] * len(current["param_groups"])
    param_groups = [{**g, **{k: v for k, v in s.items() if k in g}, "params": g["params"]}
                    for g, s in zip(current["param_groups"], saved_groups)]
    base.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(accelerator, optimizer, named_params, trainer_state: dict, output_dir: str | Path, step: int,
                    keep_last: int) -> Path | None:
    """Gather on every process, write atomically on the main one; returns the directory (main) or None."""
    weights = gather_weights(accelerator, named_params)
    opt_tensors, groups = gather_optimizer(accelerator, optimizer, named_params)
    path = None
    if accelerator.is_main_process:
        state = dict(trainer_state, optimizer_param_groups=groups, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        path = write_atomic(checkpoints_root(output_dir), step,
                            {WEIGHTS_NAME: weights, OPTIMIZER_NAME: opt_tensors, STATE_NAME: state}, keep_last)
    accelerator.wait_for_everyone()
    return path


__all__ = [
    "WEIGHTS_NAME", "OPTIMIZER_NAME", "STATE_NAME", "checkpoints_root", "list_checkpoints", "latest_checkpoint",
    "remove_partial", "write_atomic", "gather_weights", "gather_optimizer", "read_checkpoint", "load_weights",
    "load_optimizer", "save_checkpoint", "check_names",
]
