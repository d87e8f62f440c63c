"""Data for trainkv: seeded RULER-style synthetic long-context tasks and offline haystacks."""

from trainkv.data.sample import Sample

__all__ = ["Sample"]
