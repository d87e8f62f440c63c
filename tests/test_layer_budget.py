"""The learned allocation (``layer_budget``, issue 6) on tiny random Llamas, CPU.

Only the offsets (and, for a Locret base, the scales) train; the base scorer and the backbone stay
byte for byte; the measured keep fractions become ``allocation_weights`` in the exported checkpoint,
which loads on its own and whose runtime keeps exactly the weighted allocation at any budget.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import trainkv
from runtime_helpers import make_tiny, random_ids
from trainkv.budgets import check_allocation, weighted
from trainkv.hub.load import attach_with_base
from trainkv.methods.layer_budget import LayerBudget, LayerBudgetConfig, evictable_mask, measure_allocation
from trainkv.training.layer_budget import write_allocation_artifacts

ROOT = Path(__file__).resolve().parents[1]
EVICTION = dict(budget=32, sink_tokens=4, recent_window=8, chunk_size=16)
TRAIN_MASK = dict(train_chunk_size=16, train_sink_tokens=4, train_recent_window=8)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def backbone(model) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if "trainkv_method" not in n}


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if ".trainkv_method.base." in n}


def tiny(seed=3):
    model = make_tiny(seed=seed, num_hidden_layers=3)
    model.config.trainkv_base_model = "tiny-random-llama"
    return model


def save_base(model, path: Path, method: str = "attention_gate") -> Path:
    """A 'trained' scorer: the method with randomised weights (so its scores vary), saved as a checkpoint."""
    settings = TRAIN_MASK if method == "attention_gate" else {}
    trainkv.attach(model, method, trainkv.EvictionConfig(**EVICTION), **settings)
    torch.manual_seed(7)
    with torch.no_grad():
        for m in trainkv.method_modules(model):
            for name, p in m.named_parameters():
                if name.startswith("direct") or name.startswith("fc"):
                    p.normal_(std=0.5)
    trainkv.save_gated(model, path)
    trainkv.detach(model)
    return path


@pytest.fixture
def ag_base(tmp_path):
    return save_base(tiny(), tmp_path / "ag")


def train_steps(model, steps: int, lr: float = 0.1, batch=None):
    for m in trainkv.method_modules(model):
        m.requires_grad_(True)  # what the trainer does
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    batch = batch or {"input_ids": random_ids(64, batch=2, seed=1), "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    losses, logs = [], []
    for step in range(steps):
        loss, log = LayerBudget.training_loss(model, batch, step / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        logs.append(log)
    return losses, logs


@pytest.mark.parametrize("per_head", [False, True])
def test_only_offsets_train_and_the_loss_decreases(ag_base, per_head):
    model = tiny()
    before_backbone = digest(backbone(model))
    attach_with_base(model, {"method": "layer_budget", "base_checkpoint": str(ag_base), "target_keep": 0.3,
                           "per_head": per_head, "measure_from": 0.5}, trainkv.EvictionConfig(**EVICTION))
    mods = trainkv.method_modules(model)
    assert mods[0].config.base["train_chunk_size"] == 16  # the base's settings come from its checkpoint
    saved = trainkv.load_gated(ag_base, model=tiny()).state_dict()
    for name, t in base_weights(model).items():  # the base holds the checkpoint's weights
        torch.testing.assert_close(t, saved[name.replace(".base.", ".")], rtol=0, atol=0)
    before_base = digest(base_weights(model))
    for m in mods:
        m.requires_grad_(True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"model.layers.{i}.self_attn.trainkv_method.offset" for i in range(3)]
    assert mods[0].offset.shape == ((2,) if per_head else (1,))

    losses, logs = train_steps(model, 12)
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:])), losses
    assert logs[-1]["keep"] < logs[0]["keep"]
    assert digest(base_weights(model)) == before_base  # frozen base, byte for byte
    assert digest(backbone(model)) == before_backbone  # invariant 6
    assert all(float(m.offset.detach().abs().max()) > 0.5 for m in mods)  # the offsets moved (down: keep less)
    weights = model.trainkv_state.eviction.allocation_weights
    assert len(weights) == 3 and all(len(r) == 2 for r in weights)
    if not per_head:
        assert all(r[0] == r[1] for r in weights)
    expected = [m.keep_sum / m.keep_steps for m in mods]
    assert mods[0].keep_steps == 6
    for row, e in zip(weights, expected):
        assert row == pytest.approx([float(e.mean())] * 2 if not per_head else e.tolist())
    trainkv.detach(model)


def test_locret_base_trains_scale_and_offset(tmp_path):
    base = save_base(tiny(), tmp_path / "locret", method="retaining_head")
    model = tiny()
    attach_with_base(model, {"method": "layer_budget", "base_checkpoint": str(base), "target_keep": 0.25,
                           **TRAIN_MASK}, trainkv.EvictionConfig(**EVICTION))
    mods = trainkv.method_modules(model)
    before_base = digest(base_weights(model))
    losses, logs = train_steps(model, 10)
    assert all(bool(m.calibrated) for m in mods)  # score mean / std fixed from the first batch
    assert losses[-1] < losses[0], losses
    assert digest(base_weights(model)) == before_base
    assert all(float(m.offset.detach().abs().max()) > 0.1 for m in mods)
    trainable = sorted(n.split("trainkv_method.")[1] for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["log_scale"] * 3 + ["offset"] * 3
    # run time: the calibrated scores are a per-head monotone map of the base's, so budget mode keeps the same
    # entries (distinct tokens: a Locret score depends on the token alone in layer 0, and exact ties may break
    # either way)
    ids = (torch.randperm(95, generator=torch.Generator().manual_seed(4))[:90] + 1)[None]
    assert model.trainkv_state.eviction.allocation_weights is not None  # training wrote the learned allocation
    out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                         eviction={"allocation_weights": None})  # uniform budgets, as the reference
    trainkv.detach(model)
    ref_model = tiny()
    trainkv.load_gated(base, model=ref_model)
    ref = ref_model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    for a, b in zip(out.cache.layers, ref.cache.layers):
        assert torch.equal(a.positions, b.positions)


def test_runtime_with_uniform_budgets_keeps_what_the_base_keeps(ag_base):
    ids = random_ids(150, batch=2, seed=9)
    model = tiny()
    attach_with_base(model, {"method": "layer_budget", "base_checkpoint": str(ag_base), "per_head": True},
                   trainkv.EvictionConfig(**EVICTION))
    with torch.no_grad():
        for m in trainkv.method_modules(model):
            m.offset.copy_(torch.tensor([2.0, -3.0]))  # any offsets: ranks inside a head do not change
    out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    ref = trainkv.load_gated(ag_base, model=tiny()).generate(ids, max_new_tokens=2, do_sample=False,
                                                             return_dict_in_generate=True)
    for a, b in zip(out.cache.layers, ref.cache.layers):
        assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(out.sequences, ref.sequences)


def test_missing_base_weights_are_refused(tmp_path):
    model = tiny()
    with pytest.raises(trainkv.hub.CheckpointNotFoundError, match="nope"):
        attach_with_base(model, {"method": "layer_budget", "base_checkpoint": str(tmp_path / "nope")},
                         trainkv.EvictionConfig(**EVICTION))
    assert not hasattr(model, "trainkv_state")
    # trainkv.attach itself reads no checkpoint: the base has no weights until they are loaded
    trainkv.attach(model, {"method": "layer_budget", "base_checkpoint": str(tmp_path / "nope")},
                   trainkv.EvictionConfig(**EVICTION))
    with pytest.raises(RuntimeError, match="base scorer has no weights"):
        LayerBudget.training_loss(model, {"input_ids": random_ids(40)}, 0.0)
    with pytest.raises(ValueError, match="base method must be one of"):
        LayerBudgetConfig(base={"method": "snapkv"})


def test_evictable_mask_follows_rows():
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    m = evictable_mask(real, sinks=2, window=2)
    assert m.int().tolist() == [[0, 0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0, 0]]


def test_trainer_exports_a_checkpoint_whose_runtime_follows_the_learned_allocation(ag_base, tmp_path):
    from trainkv.training import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(1, 96, (64,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    cfg = TrainConfig.from_dict(dict(
        output_dir=str(tmp_path / "run"), model_config={"vocab_size": 96}, report_to="none", progress_bar=False,
        method={"method": "layer_budget", "base_checkpoint": str(ag_base), "target_keep": 0.3, "per_head": True,
                "measure_from": 0.5, "report_context": 200},
        eviction=EVICTION, max_steps=6, batch_size=2, lr=0.1, lr_scheduler="constant", seed=0,
    ))
    model = tiny()
    before = digest(backbone(model))
    result = train(cfg, model=model, dataset=rows)
    assert result.losses[-1] < result.losses[0]
    assert digest(backbone(model)) == before
    final = result.final_dir
    config = json.loads((final / "config.json").read_text())
    weights = config["eviction"]["allocation_weights"]
    assert config["method"]["method"] == "layer_budget" and len(weights) == 3
    from safetensors.torch import load_file

    tensors = load_file(str(final / "model.safetensors"))
    assert {k.split(".", 2)[2] for k in tensors} >= {"offset", "base.out.bias", "base.qkv.weight"}

    # the checkpoint loads on its own (base weights inside), even if the base checkpoint is gone
    import shutil

    shutil.rmtree(ag_base)
    loaded = trainkv.load_gated(final, model=tiny())
    for budget in (24, 40):
        out = loaded.generate(random_ids(200, seed=5), max_new_tokens=1, do_sample=False,
                              return_dict_in_generate=True, eviction={"budget": budget})
        kept = [layer[0] for layer in out.cache.stats()["kept_per_layer_head"]]
        assert kept == weighted(weights, budget, 12)
        check_allocation(kept, budget, 12)

    report = write_allocation_artifacts(final, ratios=[0.125, 0.25])
    assert (final / "allocation.json").is_file()
    assert (final / "allocation_r0.125.png").stat().st_size > 1000 and (final / "allocation_r0.25.png").is_file()
    assert (final / "allocation.png").is_file()
    for r, entry in report["budgets"].items():
        check_allocation(entry["head_budgets"], entry["entries_per_head"], entry["floor"])


@pytest.mark.parametrize("model_dir", ["smollm2-135m", "llama3.1-8b"])
def test_shipped_recipe_configs_load(model_dir):
    from trainkv.training import TrainConfig

    cfg = TrainConfig.from_yaml(ROOT / "configs" / "recipes" / model_dir / "layer_budget.yaml")
    assert cfg.data.split == "train" and cfg.method["method"] == "layer_budget"
    cfg.check_method()


def test_measure_allocation_without_training(ag_base):
    model = tiny()
    attach_with_base(model, {"method": "layer_budget", "base_checkpoint": str(ag_base), "per_head": True},
                   trainkv.EvictionConfig(**EVICTION))
    batches = [{"input_ids": random_ids(64, batch=2, seed=s), "attention_mask": torch.ones(2, 64, dtype=torch.long)}
               for s in (1, 2)]
    weights = measure_allocation(model, batches)
    assert model.trainkv_state.eviction.allocation_weights == weights
    mods = trainkv.method_modules(model)
    assert all(m.keep_steps == 2 for m in mods)
    # offsets 0: the base gates' own soft keep fraction over the evictable tokens, under soft eviction
    assert all(0.0 < w < 1.0 for row in weights for w in row)
    assert len({round(w, 6) for row in weights for w in row}) > 1  # layers / heads differ
    trainkv.detach(model)
