"""The argument layer every ``trainkv`` sub-command shares: argparse types that run the Python API's own
validation, so a bad flag gets one line naming the flag, what was given and what is accepted."""

from __future__ import annotations

import argparse
import difflib

from ..budgets import SPELLINGS, parse_budget
from ..config import EvictionConfig
from ..methods import METHODS


class CLIError(Exception):
    """A usage error: printed as one line (``trainkv <command>: error: ...``), exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``trainkv generate: error: argument --budget: '0' ... (see --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag_type(flag: str, convert, accepted: str):
    """An argparse ``type=`` that converts with ``convert`` and, on failure, names ``flag``, the value and
    ``accepted`` in the error argparse prints."""

    def parse(text: str):
        try:
            return convert(text)
        except (TypeError, ValueError) as e:
            detail = str(e).removeprefix(f"{flag}: ").removeprefix(f"{text!r} ").removeprefix(f"{text} ")
            raise argparse.ArgumentTypeError(f"{text!r} {detail}" if detail else f"{text!r}: use {accepted}") from None

    parse.__name__ = flag.lstrip("-").replace("-", "_")
    return parse


def _int_at_least(low: int):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"is not an integer; use an integer >= {low}") from None
        if value < low:
            raise ValueError(f"is too small; use an integer >= {low}")
        return value

    return convert


def positive_int(flag: str):
    return flag_type(flag, _int_at_least(1), "an integer >= 1")


def non_negative_int(flag: str):
    return flag_type(flag, _int_at_least(0), "an integer >= 0")


def budget(flag: str = "--budget"):
    """A run-time budget in the budget language (`trainkv.budgets`): entries, or a ratio of the tokens seen."""
    return flag_type(flag, lambda t: parse_budget(t, what=flag), SPELLINGS)


def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def method_name(flag: str = "--method"):
    """A registered method name; a typo gets the closest name."""

    def convert(text: str) -> str:
        if text not in METHODS:
            raise ValueError(f"is not a method{suggest(text, METHODS)}; known: {', '.join(sorted(METHODS))}")
        return text

    return flag_type(flag, convert, "a method name")


def add_eviction_args(p: argparse.ArgumentParser) -> None:
    """The `EvictionConfig` flags (each left out = the checkpoint's or the method's default)."""
    p.add_argument("--budget", type=budget("--budget"), default=None,
                   help="entries per (layer, KV head) like 512, or a ratio of the tokens seen like 0.125 or 1/8")
    p.add_argument("--chunk-size", type=positive_int("--chunk-size"), default=None, help="prefill chunk size (tokens)")
    p.add_argument("--sink-tokens", type=non_negative_int("--sink-tokens"), default=None)
    p.add_argument("--recent-window", type=non_negative_int("--recent-window"), default=None)
    p.add_argument("--mode", choices=["budget", "threshold"], default=None)
    p.add_argument("--threshold", type=float, default=None)


EVICTION_FLAGS = ("budget", "chunk_size", "sink_tokens", "recent_window", "mode", "threshold")


def eviction_overrides(args: argparse.Namespace) -> dict:
    """The eviction flags given on the command line, as `EvictionConfig` overrides, checked together (e.g. a budget
    below the protected tokens) with the same validation as the Python API."""
    given = {name: getattr(args, name) for name in EVICTION_FLAGS if getattr(args, name, None) is not None}
    try:
        EvictionConfig().replace(**{"sink_tokens": 0, "recent_window": 0, **given})
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    return given


__all__ = ["CLIError", "Parser", "add_eviction_args", "budget", "eviction_overrides", "flag_type", "method_name",
           "non_negative_int", "positive_int", "suggest"]
