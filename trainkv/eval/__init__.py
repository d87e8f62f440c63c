"""Evaluation for trainkv: RULER metrics, prompts, budget sweeps, KL / perplexity, reports (``trainkv eval``)."""

from trainkv.eval.metrics import METRICS, score, string_match_all, string_match_part
from trainkv.eval.prompts import Prompt, build_prompt, kvpress_row
from trainkv.eval.runner import Sweep, SweepConfig, evaluate_samples, run_batch
from trainkv.eval.spec import DEFAULT_SEED, parse_keep

__all__ = [
    "METRICS", "score", "string_match_all", "string_match_part", "Prompt", "build_prompt", "kvpress_row",
    "DEFAULT_SEED", "Sweep", "SweepConfig", "evaluate_samples", "parse_keep", "run_batch",
]
