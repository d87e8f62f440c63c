"""One budget language (issue 15): the same spellings mean the same thing wherever a budget is given."""

from __future__ import annotations

import pytest
import torch

import trainkv
from runtime_helpers import make_tiny, random_ids
from trainkv.budgets import keep_entries, parse_budget, ratio_entries
from trainkv.cli.args import budget as budget_flag
from trainkv.eval.spec import parse_keep
from trainkv.training import TrainConfig

SPELLINGS = [("512", 512), (512, 512), ("0.125", 0.125), (0.125, 0.125), ("1/8", 0.125), (" 1 / 8 ", 0.125),
             ("1", 1), ("1.0", 1.0), ("2048.0", 2048)]


@pytest.mark.parametrize("text, value", SPELLINGS)
def test_every_surface_reads_a_spelling_the_same_way(text, value):
    surfaces = {
        "parse_budget": parse_budget(text),
        "EvictionConfig(budget=)": trainkv.EvictionConfig(budget=text, sink_tokens=0, recent_window=0).budget,
        "generate(eviction=) / load_gated(budget=)":  # both merge overrides with EvictionConfig.merged
            trainkv.EvictionConfig(sink_tokens=0, recent_window=0).merged({"budget": text}).budget,
        "YAML eviction.budget": trainkv.EvictionConfig.from_dict(
            TrainConfig.from_dict({"method": {"method": "attention_gate"}, "model": "x",
                                   "eviction": {"budget": text, "sink_tokens": 0, "recent_window": 0}}).eviction).budget,
        "trainkv eval --keep": parse_keep(str(text)),
    }
    if isinstance(text, str):
        surfaces["trainkv generate --budget"] = budget_flag()(text)
    for where, got in surfaces.items():
        assert got == value and type(got) is type(value), (where, got)


@pytest.mark.parametrize("bad", ["0", "-5", "1.5", "1/0", "abc", "", "nan", "inf", 0, -1, 0.0, 1.5, True, None])
def test_bad_spellings_are_refused_with_the_accepted_ones(bad):
    with pytest.raises(ValueError, match="like 512, or a ratio in \\(0, 1\\] like 0.125 or 1/8"):
        parse_budget(bad, what="--budget")


def test_the_two_meanings_of_a_ratio_have_two_names():
    # run time (`budget`): a ratio of the tokens seen so far, at least the protected tokens
    assert ratio_entries(0.125, 1024, protected=36) == 128 and ratio_entries(0.125, 100, protected=36) == 36
    # evaluation (`keep`): a ratio of the run's nominal context length, fixed for the run
    assert keep_entries(0.125, 1024) == 128 and keep_entries(512, 1024) == 512


def kept(out) -> int:
    return max(n for layer in out.cache.stats()["kept_per_layer_head"] for row in layer for n in row)


def test_a_ratio_budget_in_generate_grows_with_the_tokens_seen():
    model = make_tiny()
    trainkv.attach(model, "h2o", trainkv.EvictionConfig(budget="1/4", sink_tokens=1, recent_window=2, chunk_size=16))
    with torch.no_grad():
        out = model.generate(random_ids(64), max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        assert kept(out) == 16  # ceil(64 / 4) after the 64-token prompt
        out = model.generate(random_ids(64), max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                             eviction={"budget": "1/8"})
        assert kept(out) == 8  # ceil(64 / 8)
