"""`TrainConfig`: every setting of a training run, loaded from YAML plus ``key=value`` overrides.

    cfg = TrainConfig.from_yaml("configs/recipes/smollm2-135m/attention_gate_sft.yaml", ["max_steps=5"])
    cfg = TrainConfig.from_args(sys.argv[1:])        # --config FILE [--resume [PATH]] [key=value ...]

Overrides use dotted keys for nested sections (``data.seq_len=512``, ``lora.r=8``,
``method.target_keep=0.25``); values are parsed as YAML (``lora=null``, ``tasks=[niah_single_1]``).
Unknown keys and values of the wrong type are refused with a message naming the key, what was
given and what is allowed.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from ..config import EvictionConfig
from ..methods import get_method, make_config


class ConfigError(ValueError):
    """A training configuration that cannot be used (unknown key, wrong type, bad value)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: ``1e-3`` is a number (PyYAML's YAML 1.1 reads it as a string) and only
    true/false are booleans (YAML 1.1 also turns yes/no/on/off into booleans, so ``mixed_precision=no``
    became ``False``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class LoraSettings:
    """Optional LoRA (peft) trained beside the method's parameters.

    r: rank; alpha: scaling numerator (``lora_alpha``); dropout: ``lora_dropout``;
    target_modules: names of the backbone's linear layers to adapt (never the method's own modules).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: str = "none"

    def validate(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module (e.g. [q_proj, v_proj])")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"lora.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")


@dataclass
class DataConfig:
    """Where the training data comes from and how it is turned into token blocks.

    source: ``builtin`` (offline: local prose + the synthetic tasks' TRAIN split), ``builtin:prose``,
        ``builtin:tasks``, a Hub dataset name, or local files (``.json/.jsonl/.txt/.parquet/.csv``, a
        directory or a glob).
    format: ``cpt`` (continual pretraining: documents packed into ``seq_len`` blocks, loss on every
        token) or ``sft`` (chat template, loss only on the answer / assistant tokens). Rows that already
        hold ``input_ids`` (and optionally ``labels``) are used as they are.
    seq_len: tokens per training sequence (packed block length for cpt, maximum length for sft).
    num_samples: synthetic samples to generate (builtin), or the number of rows to use from a dataset
        (null = all).
    tasks: synthetic task names for the builtin source (null = every task the generators offer).
    context_tokens: target context length(s) of synthetic samples (null = fit ``seq_len``).
    prose: builtin cpt only: also pack the TRAIN half of the local prose.
    prose_blocks: builtin sft only: add this many windows of the TRAIN-half prose (random offsets, seeded),
        ``prose_block_tokens`` tokens each (default ``seq_len``), with the loss on every token; mixes
        natural-text distillation into answer-only SFT (0 = none).
    subset / split: dataset configuration name and split (``eval`` is never allowed: it is the
        held-out evaluation split of the synthetic tasks).
    text_field / messages_field: column names for cpt text and sft chat messages. sft also accepts
        ``prompt``/``completion``, ``instruction``/``input``/``output`` (Alpaca) and
        ``context``/``question``/``answer_prefix``/``answer(s)`` (trainkv / kvpress samples) rows.
    system_prompt: optional system message for sft chat formatting.
    shuffle: shuffle sample order (per epoch, seeded); seed: data seed (null = the run's seed).
    num_proc: processes for tokenization (``datasets.map``).
    """

    source: str = "builtin"
    format: str = "cpt"
    seq_len: int = 1024
    num_samples: int | None = 256
    tasks: list[str] | None = None
    context_tokens: list[int] | None = None
    prose: bool = True
    prose_blocks: int = 0
    prose_block_tokens: int | None = None
    subset: str | None = None
    split: str = "train"
    text_field: str = "text"
    messages_field: str = "messages"
    system_prompt: str | None = None
    shuffle: bool = True
    seed: int | None = None
    num_proc: int | None = None

    def validate(self) -> None:
        if self.format not in ("cpt", "sft"):
            raise ConfigError(f"data.format must be 'cpt' or 'sft', got {self.format!r}")
        _positive("data.seq_len", self.seq_len)
        if self.seq_len < 8:
            raise ConfigError(f"data.seq_len must be at least 8 tokens, got {self.seq_len}")
        if self.num_samples is not None:
            _positive("data.num_samples", self.num_samples)
        if self.split.lower() == "eval":
            raise ConfigError(
                "data.split='eval' is the held-out evaluation split and is never used for training; use 'train'"
            )
        if self.context_tokens is not None:
            if isinstance(self.context_tokens, int):
                self.context_tokens = [self.context_tokens]
            for n in self.context_tokens:
                _positive("data.context_tokens", n)
        if self.prose_blocks < 0:
            raise ConfigError(f"data.prose_blocks must be >= 0, got {self.prose_blocks}")
        if self.prose_blocks and (self.format != "sft" or not self.source.startswith("builtin")):
            raise ConfigError("data.prose_blocks mixes prose into builtin sft data; with format=cpt use data.prose=true")
        if self.prose_block_tokens is not None:
            _positive("data.prose_block_tokens", self.prose_block_tokens)
            if self.prose_block_tokens > self.seq_len:
                raise ConfigError(f"data.prose_block_tokens={self.prose_block_tokens} exceeds data.seq_len={self.seq_len}")
        if not self.source:
            raise ConfigError("data.source is empty: use 'builtin', a Hub dataset name or local files")


@dataclass
class TrainConfig:
    """One training run. Every field can be set in the YAML file or as ``key=value`` on the command line."""

    # --- run ------------------------------------------------------------------------------------
    output_dir: str = "runs/trainkv"
    run_name: str = "trainkv"  # TensorBoard project name (recipes set their own)
    seed: int = 0
    imports: list[str] = field(default_factory=list)  # modules to import first (e.g. to register a custom method)
    # --- model ----------------------------------------------------------------------------------
    model: str = "smollm2-135m"  # alias, local directory or Hub repo id (trainkv.load_model)
    model_config: dict | None = None  # build a RANDOM model from this config instead (tests, benchmarks)
    tokenizer: str | None = None  # default: the model's; required with model_config unless data is tokenized
    dtype: str = "auto"  # backbone dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16
    mixed_precision: str = "auto"  # auto (bf16 autocast when the backbone is bf16 on GPU), no, bf16, fp16
    gradient_checkpointing: bool = False
    # --- method ---------------------------------------------------------------------------------
    method: dict = field(default_factory=lambda: {"method": "attention_gate"})  # {method: name, **hyper-parameters}
    eviction: dict = field(default_factory=dict)  # trainkv.EvictionConfig fields (runtime settings saved with the gates)
    lora: LoraSettings | None = None
    # --- data -----------------------------------------------------------------------------------
    data: DataConfig = field(default_factory=DataConfig)
    # --- optimisation ---------------------------------------------------------------------------
    max_steps: int = 100  # optimizer steps
    batch_size: int = 1  # sequences per device per micro-step
    gradient_accumulation_steps: int = 1  # under DeepSpeed an explicit value in the DS json wins
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"  # cosine, linear or constant (after warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # fraction of max_steps, used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr (cosine / linear)
    clip_grad: str = "norm"  # norm, value or none (DeepSpeed: norm only, from the DS json / this value)
    clip_value: float = 1.0  # max gradient norm (clip_grad=norm) or max |grad| (clip_grad=value)
    # --- logging and checkpoints ------------------------------------------------------------------
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints (0 = none, only the final export)
    keep_last: int = 2  # checkpoints kept
    resume: Any = False  # false | true (latest checkpoint, must exist) | auto (latest if any) | a checkpoint path
    overwrite_output_dir: bool = False  # allow a fresh run in a directory that already has checkpoints
    report_to: str = "tensorboard"  # tensorboard or none
    progress_bar: bool = True

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        if not self.output_dir:
            raise ConfigError("output_dir is empty")
        if self.model_config is None and not self.model:
            raise ConfigError("set `model` (alias, directory or Hub id) or `model_config` (random model)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if not isinstance(self.method, dict) or "method" not in self.method:
            raise ConfigError(f"method must be a mapping with a `method` key (e.g. {{method: attention_gate}}), got {self.method!r}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "keep_last"):
            _positive(name, getattr(self, name))
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_scheduler must be cosine, linear or constant, got {self.lr_scheduler!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("set warmup_steps or warmup_ratio, not both")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad not in ("norm", "value", "none"):
            raise ConfigError(f"clip_grad must be norm, value or none, got {self.clip_grad!r}")
        if self.clip_grad != "none" and self.clip_value <= 0:
            raise ConfigError(f"clip_value must be > 0, got {self.clip_value}")
        if self.report_to not in ("tensorboard", "none"):
            raise ConfigError(f"report_to must be tensorboard or none, got {self.report_to!r}")
        if not (isinstance(self.resume, bool) or isinstance(self.resume, str)):
            raise ConfigError(f"resume must be true, false, 'auto' or a checkpoint path, got {self.resume!r}")
        if isinstance(self.resume, str) and self.resume.lower() in ("true", "false", "yes", "no"):
            self.resume = self.resume.lower() in ("true", "yes")
        self.data.validate()
        if self.lora is not None:
            self.lora.validate()
        if self.eviction:
            try:
                EvictionConfig.from_dict(self.eviction)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"eviction: {err}") from None
        return self

    def check_method(self) -> None:
        """Check that the method is registered, trainable, and accepts its settings (after `imports`)."""
        import_modules(self.imports)
        try:
            cls = get_method(self.method["method"])
            make_config(self.method)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"method: {err}") from None
        if not getattr(cls, "trainable", False):
            raise ConfigError(f"method {self.method['method']!r} has no trainable parameters; nothing to train")
        if not hasattr(cls, "training_loss"):
            raise ConfigError(f"method {self.method['method']!r} defines no training_loss(model, batch, progress)")

    # --- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] | None = None) -> "TrainConfig":
        data = copy.deepcopy(data or {})
        for item in overrides or []:
            key, value = parse_override(item)
            _set_dotted(data, key, value)
        cfg = _build(cls, data, prefix="")
        return cfg.validate()

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "TrainConfig":
        data = read_yaml(path) if path is not None else {}
        try:
            return cls.from_dict(data, overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}" if path else str(err)) from None

    @classmethod
    def from_args(cls, argv: list[str] | None = None, defaults: dict | None = None, prog: str | None = None) -> "TrainConfig":
        """Parse ``--config FILE [--resume [PATH]] [key=value | --key=value ...]``.

        ``defaults`` (from the recipe) apply below the YAML file; the command line wins over both.
        """
        parser = argparse.ArgumentParser(prog=prog, description="trainkv training recipe")
        parser.add_argument("--config", help="YAML recipe config (configs/recipes/<model>/<recipe>.yaml)")
        parser.add_argument("--resume", nargs="?", const=True, default=None,
                            help="continue from the latest checkpoint in output_dir (or from PATH)")
        parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        args, rest = parser.parse_known_args(argv)
        if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: the flag, then an override
            rest.insert(0, args.resume)
            args.resume = True
        overrides = []
        i = 0
        while i < len(rest):
            item = rest[i]
            if item.startswith("--") and "=" not in item:
                if i + 1 >= len(rest):
                    raise ConfigError(f"{item}: missing value (use key=value)")
                item = f"{item}={rest[i + 1]}"
                i += 1
            overrides.append(item)
            i += 1
        if args.resume is not None:
            overrides.append(f"resume={args.resume}" if args.resume is not True else "resume=true")
        data = copy.deepcopy(defaults or {})
        if args.config:
            _merge(data, read_yaml(args.config))
        try:
            cfg = cls.from_dict(data, overrides)
        except ConfigError as err:
            raise ConfigError(f"{args.config}: {err}" if args.config else str(err)) from None
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            raise SystemExit(0)
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --- helpers ---------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    """The settings of a YAML config file (a mapping at the top level)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def import_modules(names: list[str]) -> None:
    for name in names or []:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"imports: cannot import {name!r}: {err}") from None


def parse_override(item: str) -> tuple[str, Any]:
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"cannot parse override {item!r}: use key=value (e.g. max_steps=5, data.seq_len=512)")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"cannot parse override {item!r}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("method",):
            _merge(base[k], v)
        else:
            base[k] = v


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {p!r} is not a section (it is {nxt!r})")
        cur = nxt
    cur[parts[-1]] = value


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _coerce(name: str, value: Any, tp) -> Any:
    """Check (and gently convert) ``value`` against the annotation ``tp``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{name} cannot be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of settings, got {value!r}")
        return _build(tp, value, prefix=f"{name}.")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            if item_tp is not Any and not isinstance(value, (list, dict)):
                value = [value]  # a single item where a list is expected
            else:
                raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return value
    return _coerce_scalar(name, value, tp)


def _coerce_scalar(name: str, value: Any, tp) -> Any:
    """Check (and gently convert) a bool, int, float or str setting; other types pass unchecked."""
    if value is None:
        raise ConfigError(f"{name} cannot be null (expected {_type_name(tp)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown setting '{prefix}{key}'{hint} (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    missing = [f.name for f in known.values() if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"missing settings: {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


__all__ = ["ConfigError", "DataConfig", "LoraSettings", "TrainConfig", "parse_override", "import_modules"]
