"""Evaluation for trainkv: metrics (and, elsewhere, the harness)."""

from trainkv.eval.metrics import METRICS, score, string_match_all, string_match_part

__all__ = ["METRICS", "score", "string_match_all", "string_match_part"]
