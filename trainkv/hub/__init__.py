"""Gate checkpoints: save, load, push (safetensors + config.json + model card), built on huggingface_hub.

    trainkv.save_gated(model, "checkpoints/smollm2-135m/attention_gate", eval_table=table_md)
    model = trainkv.load_gated("smollm2-135m")             # alias, local path or Hub repo id
    trainkv.hub.push_to_hub("checkpoints/smollm2-135m/attention_gate", "org/smollm2-135m-attention-gate")

See `trainkv.hub.format` for the files and `trainkv.hub.load` for how names are looked up.
"""

from .checkpoint import GateCheckpoint
from .format import (
    CHECKPOINT_FILES, FORMAT_VERSION, CheckpointError, CheckpointNotFoundError, base_shape, config_hash,
)
from .load import checkpoint_roots, download_checkpoint, find_local_checkpoint, load_gated, resolve_checkpoint
from .push import add_push_arguments, add_push_parser, push_cli, push_to_hub
from .save import save_gated, to_checkpoint

__all__ = [
    "GateCheckpoint", "CHECKPOINT_FILES", "FORMAT_VERSION", "CheckpointError", "CheckpointNotFoundError",
    "base_shape", "config_hash", "checkpoint_roots", "download_checkpoint", "find_local_checkpoint", "load_gated",
    "resolve_checkpoint", "add_push_arguments", "add_push_parser", "push_cli", "push_to_hub", "save_gated", "to_checkpoint",
]
