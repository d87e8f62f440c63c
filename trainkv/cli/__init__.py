"""The ``trainkv`` command (the top floor: it may import every other part of the package).

    trainkv demo                                   the main job on the embedded model (CPU, offline)
    trainkv generate --prompt-file long.txt        one prompt through an evicting cache
    trainkv check --prompt-file mine.txt           your prompt at several budgets: where does the answer change?
    trainkv eval --methods full snapkv ...         budget sweeps: tables, plots, JSON
    trainkv push <checkpoint> <org/repo>           upload a gate checkpoint

Errors are one line (``trainkv <command>: error: ...``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..hub.format import CheckpointError, CheckpointNotFoundError
from ..hub.push import add_push_parser
from .args import CLIError, Parser
from .check import add_check_parser
from .demo import add_demo_parser
from .eval import add_eval_parser
from .generate import add_generate_parser

DESCRIPTION = """trainkv: teach a frozen LLM which KV-cache entries it can forget.

commands:
  demo       the main job on the embedded model: shipped gates vs a baseline, then a few training steps
  generate   one prompt through an evicting cache: the answer and what the cache held
  check      your own prompt at several budgets: where does the answer change?
  eval       budget sweeps over methods x keeps x tasks x context lengths (JSON, tables, plots)
  push       upload a gate checkpoint to the Hugging Face Hub

Budgets: 512 = entries per (layer, KV head); 0.125 or 1/8 = a ratio (of the tokens seen at run time; of the
context length in `eval --keep`). Errors are one line; --debug shows the traceback."""

#: Errors shown as one line (anything else is a bug: its traceback is printed).
USER_ERRORS = (CLIError, CheckpointError, CheckpointNotFoundError, FileNotFoundError, ValueError, TypeError,
               RuntimeError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="trainkv", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,check,eval,push}")
    add_demo_parser(sub)
    add_generate_parser(sub)
    add_check_parser(sub)
    add_eval_parser(sub)
    add_push_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = str(e).strip() or type(e).__name__
        print(f"trainkv {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trainkv {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
