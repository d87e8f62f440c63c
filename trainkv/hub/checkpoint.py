"""`GateCheckpoint`: a gate checkpoint in memory, saved, loaded and pushed through huggingface_hub's `ModelHubMixin`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin

from .resolve import is_repo_id, resolve_checkpoint
from .format import (
    CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, check_files, file_sha256, read_config, read_weights,
)

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

Trained KV-cache eviction modules (method `{{ method_name }}`) for {{ base_link }}, made with
trainkv (not on PyPI: install it from its source repository, see its README). The base model's weights are not in this repository: it holds only the
method's parameters{{ lora_note }} (`model.safetensors`, {{ num_tensors }} tensors) and their settings
(`config.json`); trainkv loads the base model and attaches them.

## Use

```python
import trainkv
model = trainkv.load_gated("{{ load_name }}")          # base model + gates, evicting runtime installed
out = model.generate(**inputs, max_new_tokens=256)      # evicts as it goes
out = model.generate(**inputs, max_new_tokens=256, eviction={"budget": 128})   # per-call override
```

## Settings it was trained with

| | setting | value |
|---|---|---|
{{ settings_rows }}

Base model shape: {{ shape_text }} (sha256 of these fields: `{{ base_config_hash }}`).
Written by trainkv {{ trainkv_version }}, checkpoint format {{ format_version }}.
{% if eval_table %}
## Evaluation

{{ eval_table }}
{% endif %}
"""


class GateCheckpoint(
    ModelHubMixin,
    library_name="trainkv",
    tags=["kv-cache-eviction", "trainkv"],
    model_card_template=CARD_TEMPLATE,
):
    """A gate checkpoint: its ``config`` (the ``config.json`` dict) and ``tensors`` (``model.safetensors``).

    ``save_pretrained(dir)`` writes the three files, ``push_to_hub(repo_id)`` uploads them and
    ``from_pretrained(dir_or_repo)`` reads them back (safetensors only, with every check of
    `trainkv.hub.format`). `trainkv.save_gated` / `trainkv.load_gated` build on it.
    """

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor] | None = None, eval_table: str | None = None,
                 card_name: str | None = None):
        self.config = dict(config)
        self.tensors = dict(tensors or {})
        self.eval_table = eval_table
        self.card_name = card_name
        self._hub_mixin_config = self.config

    # -- saving -------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.tensors.items()}
        weights = save_directory / WEIGHTS_NAME
        save_file(tensors, str(weights), metadata={"format": "pt", "library": "trainkv"})
        self.config["weights_sha256"] = file_sha256(weights)
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        (save_directory / CARD_NAME).unlink(missing_ok=True)  # the mixin writes a fresh card next

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        cfg = self.config
        base = cfg["base_model"]
        data = ModelCardData(**self._hub_mixin_info.model_card_data.to_dict())
        if is_repo_id(base) and not Path(base).exists():
            data.base_model = base
            data.base_model_relation = "adapter"
            base_link = f"[{base}](https://huggingface.co/{base})"
        else:
            base_link = f"the local base model `{base}`"
        method = cfg["method"]
        settings = [("method", k, v) for k, v in method.items() if k != "method"]
        settings += [("eviction", k, v) for k, v in cfg["eviction"].items()]
        rows = "\n".join(f"| {group} | `{k}` | `{json.dumps(v)}` |" for group, k, v in settings)
        shape = ", ".join(f"{k}={v}" for k, v in cfg["base_shape"].items())
        fields = dict(
            title=f"{method['method']} gates for {base}",
            method_name=method["method"],
            base_link=base_link,
            lora_note=" and LoRA weights" if cfg.get("lora") else "",
            num_tensors=len(self.tensors),
            load_name=self.card_name or "<repo id or local path>",
            settings_rows=rows,
            shape_text=shape,
            base_config_hash=cfg.get("base_config_hash", ""),
            trainkv_version=cfg.get("trainkv_version", "?"),
            format_version=cfg["format_version"],
            eval_table=(self.eval_table or "").strip(),
        )
        fields.update(kwargs)
        return ModelCard.from_template(
            card_data=data,
            template_str=self._hub_mixin_info.model_card_template,
            **fields,
        )

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> "GateCheckpoint":
        """Read a checkpoint directory: files present, no pickle, config readable, weights intact."""
        directory = Path(directory)
        check_files(directory)
        config = read_config(directory)
        tensors = read_weights(directory, config)
        return cls(config, tensors)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False, token=None,
                        cache_dir=None, local_files_only: bool = False, revision: str | None = None,
                        endpoint: str | None = None) -> "GateCheckpoint":
        """Read a checkpoint from an alias, a local directory or a Hub repo id (see `trainkv.hub.resolve`).

        Overrides `ModelHubMixin.from_pretrained`, which would read ``config.json`` from the default
        endpoint before any check: here the files are resolved first (``endpoint`` respected, offline
        mode honoured), then checked, and only ``model.safetensors`` is ever read as weights.
        """
        directory = resolve_checkpoint(
            pretrained_model_name_or_path, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
            local_files_only=local_files_only, force_download=force_download,
        )
        return cls.load(directory)
