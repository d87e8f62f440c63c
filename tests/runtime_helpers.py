"""Brute-force references and helpers for the runtime tests (issue 2, invariants 1-4).

Tiny random Llama models are built in code (GQA: 4 query heads, 2 KV heads). The embedded
SmolLM2-135M-Instruct is loaded once per session for the ``integration`` tests. The references are
computed from the *plain* model's own post-RoPE queries and keys (captured through a recording
attention function), with plain matmuls.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

import trainkv
from trainkv.methods.random_scores import RandomConfig, RandomScores

TOL = 1e-4  # invariant 1: max abs logit difference against plain transformers (fp32)
VOCAB = 96
PAD = 0


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------
def tiny_config(**overrides) -> LlamaConfig:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=None, attn_implementation="sdpa",
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_tiny(seed: int = 0, sharp: float = 1.0, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama in eval mode. ``sharp`` scales q/k projections so attention is peaked (clear rankings)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    if sharp != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(sharp)
                layer.self_attn.k_proj.weight.mul_(sharp)
    # eos_token_id=None: generation never stops early, so sequences compare position by position
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def random_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=gen)


def left_pad(rows: list[torch.Tensor], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into ``(input_ids, attention_mask)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@contextlib.contextmanager
def attached(model, method="streaming_llm", **eviction):
    """Attach ``method`` with the given EvictionConfig fields for the duration of a block, then detach."""
    trainkv.attach(model, method, trainkv.EvictionConfig(**eviction))
    try:
        yield model
    finally:
        trainkv.detach(model)


def greedy(model, ids, mask=None, new=6, **kwargs):
    """Greedy generation returning (new tokens, per-step logits [B, new, V], output)."""
    out = model.generate(
        ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=new, do_sample=False,
        output_logits=True, return_dict_in_generate=True, **kwargs,
    )
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1), out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# capture the plain model's post-RoPE queries and keys
# ---------------------------------------------------------------------------------------------------------
_RECORD_NAME = "trainkv_test_record"
_RECORDED: list = []


def _record_attention(module, query, key, value, attention_mask, **kwargs):
    _RECORDED.append((module.layer_idx, query.detach().clone(), key.detach().clone()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_RECORD_NAME, _record_attention)
AttentionMaskInterface.register(_RECORD_NAME, sdpa_mask)


@torch.no_grad()
def capture_qk(model, input_ids, attention_mask=None, position_ids=None):
    """Post-RoPE ``(query [B,Hq,L,D], key [B,Hkv,L,D])`` of every layer of a plain (not attached) model."""
    assert not hasattr(model, "trainkv_state"), "capture_qk needs the plain model"
    previous = model.config._attn_implementation
    model.set_attn_implementation(_RECORD_NAME)
    _RECORDED.clear()
    try:
        model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
    finally:
        model.set_attn_implementation(previous)
    out = [None] * model.config.num_hidden_layers
    for layer_idx, q, k in _RECORDED:
        out[layer_idx] = (q, k)
    _RECORDED.clear()
    return out


def brute_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """Causal softmax attention by plain matmuls, per KV group: q ``[Hq,n,D]``, k ``[Hkv,L,D]`` -> ``[Hkv,g,n,L]``."""
    hq, n, d = q.shape
    hkv, length, _ = k.shape
    g = hq // hkv
    out = torch.empty((hkv, g, n, length), dtype=torch.float64)
    for h in range(hq):
        logits = (q[h].double() @ k[h // g].double().T) * scaling  # [n, L]
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        out[h // g, h % g] = torch.softmax(logits, dim=-1)
    return out


# ---------------------------------------------------------------------------------------------------------
# the kept set, by brute force
# ---------------------------------------------------------------------------------------------------------
def protected_positions(positions: list[int], sink: int, recent: int) -> set[int]:
    if not positions:
        return set()
    current = max(positions)
    return {p for p in positions if p < sink or p > current - recent}


def expected_kept(positions, scores, budget: int, sink: int, recent: int, threshold: float | None = None) -> set[int]:
    """Positions a (row, head) must keep: the protected ones plus the best-scored, ``budget`` in all.

    ``positions``/``scores`` are the valid entries before eviction (python lists)."""
    positions = [int(p) for p in positions]
    scores = [float(s) for s in scores]
    prot = protected_positions(positions, sink, recent)
    others = [(s, p) for p, s in zip(positions, scores) if p not in prot]
    if threshold is not None:
        others = [(s, p) for s, p in others if s > threshold]
    others.sort(reverse=True)
    room = max(0, budget - len(prot))
    return prot | {p for _, p in others[:room]}


def assert_kept_topk(kept: set[int], positions, scores, budget: int, sink: int, recent: int, tol: float = 1e-5):
    """``kept`` is the protected set plus a top-``budget`` by score; near-ties (within ``tol``) may go either way."""
    positions = [int(p) for p in positions]
    score_of = {p: float(s) for p, s in zip(positions, scores)}
    prot = protected_positions(positions, sink, recent)
    assert len(kept) == min(budget, len(positions)), (len(kept), budget, len(positions))
    assert prot <= kept, f"protected tokens evicted: {sorted(prot - kept)}"
    assert kept <= set(positions)
    kept_scores = [score_of[p] for p in kept - prot]
    dropped_scores = [score_of[p] for p in set(positions) - kept]
    if kept_scores and dropped_scores:
        assert min(kept_scores) >= max(dropped_scores) - tol, (min(kept_scores), max(dropped_scores))
    exact = expected_kept(positions, scores, budget, sink, recent)
    if kept != exact:  # only allowed at a near-tie on the boundary
        for p in kept ^ exact:
            boundary = min(kept_scores) if kept_scores else 0.0
            assert abs(score_of[p] - boundary) <= tol, f"position {p} differs from the exact top-k"


def row_head_entries(layer, row: int, head: int):
    """(positions, scores, slot indices) of the valid entries of one (row, head) of an EvictingLayer."""
    valid = layer.valid_mask()[row, head]
    slots = valid.nonzero().flatten()
    return layer.positions[row, head, slots].tolist(), layer.scores[row, head, slots].tolist(), slots


# ---------------------------------------------------------------------------------------------------------
# a test-only method: random scores, recorded before every eviction
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RecorderConfig(RandomConfig):
    name = "test_recorder"


class Recorder(RandomScores):
    """Random scores; snapshots the layer (entries, scores) just before the runtime decides to evict."""

    config_class = RecorderConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[dict] = []

    def update_scores(self, ctx):
        super().update_scores(ctx)
        layer = ctx.layer
        self.events.append(dict(
            will_evict=ctx.will_evict, new_tokens=ctx.new_tokens, seen=layer.seen,
            positions=layer.positions.clone(), scores=layer.scores.clone(), valid=layer.valid_mask().clone(),
        ))


# ---------------------------------------------------------------------------------------------------------
# the embedded SmolLM2 (integration)
# ---------------------------------------------------------------------------------------------------------
def prose_ids(tok, n_tokens: int, offset: int = 0) -> torch.Tensor:
    """``n_tokens`` token ids of the bundled prose, starting ``offset`` characters in."""
    from importlib.resources import files

    text = files("trainkv").joinpath("data/prose/alice_in_wonderland.txt").read_text()
    ids = tok(text[offset: offset + 8 * n_tokens], return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


def kv_bytes(layers: int, batch: int, kv_heads: int, budget: int, head_dim: int, element_size: int = 4) -> int:
    return 2 * layers * batch * kv_heads * budget * head_dim * element_size


def env_for_subprocess() -> dict:
    """Environment of a test's child process: the project and tests/ importable, offline, one thread."""
    root, tests = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(tests), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run_launcher(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` for a launcher (torchrun, accelerate launch) whose workers are grandchildren in sessions of
    their own: on timeout the launcher and every process below it are killed, so no worker outlives the test
    (a plain ``run`` kills only the launcher, and a worker left holding the output pipes would block reading
    them), and the test fails with the tail of the output instead of a bare TimeoutExpired. Before the kill, the
    processes below the launcher get SIGABRT, on which Python's faulthandler (PYTHONFAULTHANDLER=1 here) prints every
    thread's stack: a hung worker shows where it waits in the failure message (how the gloo teardown deadlock
    behind test_torchrun_two_cpu_processes_agree's occasional hang was found; fixed by `Run.close`)."""
    env = {**kwargs.pop("env", os.environ), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = _descendants(proc.pid)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGABRT)
        time.sleep(3)  # the stacks reach the pipes
        for pid in [*workers, *_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", "(output unreadable: a process still holds the pipes)"
        raise AssertionError(f"{cmd[2:4]} ran past {timeout:.0f} s; it and its workers were killed.\n"
                             f"{out[-2000:]}\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
