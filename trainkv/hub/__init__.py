"""Gate checkpoints: files, name resolution, save, push (safetensors + config.json + model card, on huggingface_hub).

    trainkv.save_gated(model, "checkpoints/smollm2-135m/attention_gate", eval_table=table_md)
    trainkv.hub.push_to_hub("checkpoints/smollm2-135m/attention_gate", "org/smollm2-135m-attention-gate")
    model = trainkv.load_gated("smollm2-135m")             # trainkv.hub.load: alias, local path or Hub repo id

`trainkv.hub.format` holds the files' rules, `trainkv.hub.resolve` how names are looked up. `trainkv.hub.load`
(`load_gated`) is the one module of this package above `trainkv.attach`, so it is not imported here.
"""

from .checkpoint import GateCheckpoint
from .format import (
    CHECKPOINT_FILES, FORMAT_VERSION, CheckpointError, CheckpointNotFoundError, base_shape, config_hash,
)
from .push import add_push_arguments, add_push_parser, push_cli, push_to_hub
from .resolve import checkpoint_roots, download_checkpoint, find_local_checkpoint, is_repo_id, resolve_checkpoint
from .save import save_gated, to_checkpoint

__all__ = [
    "GateCheckpoint", "CHECKPOINT_FILES", "FORMAT_VERSION", "CheckpointError", "CheckpointNotFoundError",
    "base_shape", "config_hash", "checkpoint_roots", "download_checkpoint", "find_local_checkpoint", "is_repo_id",
    "resolve_checkpoint", "add_push_arguments", "add_push_parser", "push_cli", "push_to_hub", "save_gated", "to_checkpoint",
]
