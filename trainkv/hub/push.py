"""`push_to_hub` and the ``trainkv push`` command: upload a gate checkpoint with huggingface_hub's `HfApi`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch.nn as nn
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from .checkpoint import GateCheckpoint
from .format import CHECKPOINT_FILES, CheckpointError, CheckpointNotFoundError
from .save import save_gated


def push_to_hub(path_or_model: str | os.PathLike | nn.Module, repo_id: str, token: str | None = None,
                private: bool = False, endpoint: str | None = None, *, revision: str | None = None,
                commit_message: str | None = None, eval_table: str | None = None):
    """Upload a gate checkpoint (a directory written by `save_gated`, or a model with a method attached).

    The checkpoint is checked as `load_gated` would check it before anything is sent; only
    ``config.json``, ``model.safetensors`` and ``README.md`` are uploaded, in one commit, to the model
    repo ``repo_id`` (created if needed). ``endpoint`` overrides ``HF_ENDPOINT``. Returns huggingface_hub's
    `CommitInfo` (``.commit_url``, ``.oid``, ``.repo_url``).
    """
    if isinstance(path_or_model, nn.Module):
        with tempfile.TemporaryDirectory(prefix="trainkv-push-") as tmp:
            folder = save_gated(path_or_model, Path(tmp) / "checkpoint", eval_table=eval_table, repo_id=repo_id)
            return push_to_hub(folder, repo_id, token=token, private=private, endpoint=endpoint, revision=revision,
                               commit_message=commit_message)
    if eval_table is not None:
        raise ValueError("eval_table applies when pushing a model; for a directory, pass it to save_gated")
    folder = Path(path_or_model)
    ckpt = GateCheckpoint.load(folder)  # refuse to publish a broken checkpoint
    api = HfApi(endpoint=endpoint, token=token)
    repo = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    method = ckpt.config["method"]["method"]
    return api.upload_folder(
        repo_id=repo.repo_id,
        repo_type="model",
        folder_path=folder,
        allow_patterns=list(CHECKPOINT_FILES),
        revision=revision,
        commit_message=commit_message or f"Upload trainkv {method} gates for {ckpt.config['base_model']}",
    )


def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``trainkv push``."""
    parser.add_argument("checkpoint_dir", help="gate checkpoint directory (written by trainkv.save_gated)")
    parser.add_argument("repo_id", help="Hub model repo to push to, e.g. org/llama3.1-8b-attention-gate")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    return parser


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``push`` subcommand (arguments + ``func=push_cli``) to a CLI's subparsers."""
    parser = subparsers.add_parser("push", help="upload a gate checkpoint to the Hugging Face Hub",
                                   description=push_to_hub.__doc__.split("\n\n")[0])
    add_push_arguments(parser)
    parser.set_defaults(func=push_cli)
    return parser


def push_cli(args: argparse.Namespace) -> int:
    """``trainkv push <checkpoint_dir> <repo_id>``: prints the commit URL, returns the exit status."""
    try:
        info = push_to_hub(
            args.checkpoint_dir, args.repo_id, token=args.token, private=args.private, endpoint=args.endpoint,
            revision=args.revision, commit_message=args.commit_message,
        )
    except (CheckpointError, CheckpointNotFoundError, HfHubHTTPError) as e:
        print(f"trainkv push: error: {e}", file=sys.stderr)
        return 1
    print(f"pushed {args.checkpoint_dir} to {args.repo_id}: {info.commit_url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainkv.hub")
    add_push_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
