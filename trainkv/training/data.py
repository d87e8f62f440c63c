"""Training data: token blocks for continual pretraining, chat-formatted answers for SFT.

`build_dataset(data_cfg, tokenizer, seed)` returns a `datasets.Dataset` whose rows are
``{"input_ids": [...], "labels": [...]}`` (``-100`` = no loss), from one of these sources:

* ``builtin`` (offline, the default): the TRAIN half of the local prose (`trainkv.data.haystack`)
  plus samples of the synthetic long-context tasks (`trainkv.data.tasks`) generated with the
  model's tokenizer from the TRAIN split (never ``eval``). ``builtin:prose`` / ``builtin:tasks``
  keep only one of the two.
* a Hub dataset name (``load_dataset(name, subset, split=...)``),
* local files: ``.json``/``.jsonl``/``.txt``/``.parquet``/``.csv``, a directory of them, or a glob.

Formats: ``cpt`` packs every document (followed by EOS) into ``seq_len``-token blocks with loss on
every token; ``sft`` renders each example with the tokenizer's chat template and puts the loss only
on the assistant's answer (for synthetic samples: the answer after the answer prefix). Rows that
already carry ``input_ids`` (and optionally ``labels``) are used as they are.

`datasets` (a required dependency) is imported where rows are loaded, not with this module: the ``trainkv``
command imports `trainkv.training`, and its sub-commands that never train then start without that import
(about a second), also on a machine whose image lacks the package.

`SampleOrder` maps a global sample counter to a row (a seeded permutation per epoch), so the data
position of a run is one integer (samples consumed), independent of the number of processes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data import tasks as task_mod
from ..data.haystack import prose_paragraphs, prose_text
from .config import ConfigError, DataConfig

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRAIN_SPLIT = "train"
LOCAL_TYPES = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


# --- sources ---------------------------------------------------------------------------------------


def _check_train_split(split: str) -> None:
    if split != TRAIN_SPLIT:
        raise AssertionError(f"training data must come from the {TRAIN_SPLIT!r} split, never {split!r}")


def default_context_tokens(cfg: DataConfig) -> list[int]:
    if cfg.context_tokens:
        return list(cfg.context_tokens)
    frac = 0.9 if cfg.format == "cpt" else 0.75  # sft: room for the chat template, question and answer
    return [max(16, int(cfg.seq_len * frac))]


def synthetic_samples(cfg: DataConfig, tokenizer, seed: int) -> list:
    """Samples of the synthetic tasks' TRAIN split: ``num_samples`` spread evenly over tasks and lengths."""
    names = list(cfg.tasks) if cfg.tasks else list(task_mod.TASKS)
    unknown = [t for t in names if t not in task_mod.TASKS]
    if unknown:
        raise ConfigError(f"data.tasks: unknown task(s) {unknown}; known: {sorted(task_mod.TASKS)}")
    lengths = default_context_tokens(cfg)
    combos = [(t, n) for n in lengths for t in names]
    total = cfg.num_samples or 256
    per = [total // len(combos) + (1 if i < total % len(combos) else 0) for i in range(len(combos))]
    out, skipped = [], []
    for (task, length), n in zip(combos, per):
        if n == 0:
            continue
        try:
            out.extend(task_mod.generate_samples(task, tokenizer, n, length, seed=seed * 1000 + lengths.index(length),
                                                split=TRAIN_SPLIT))
        except ValueError as err:  # e.g. a task whose smallest context is longer than `length`
            skipped.append(f"{task}@{length}: {err}")
    if skipped:
        logger.warning("data: skipped synthetic tasks that cannot be generated at these lengths: %s", "; ".join(skipped))
    if not out:
        raise ConfigError(f"data: no synthetic sample could be generated ({'; '.join(skipped)})")
    for s in out:
        _check_train_split(getattr(s, "split", TRAIN_SPLIT))
    return out


def answer_text(sample) -> str:
    """The target continuation of a synthetic sample after its answer prefix."""
    answers = list(sample.answers)
    body = answers[0] if getattr(sample, "metric", "all") == "part" else ", ".join(answers)
    prefix = sample.answer_prefix or ""
    sep = "" if (not prefix or prefix.endswith((" ", "\n"))) else " "
    return f"{sep}{body}."


def _builtin_rows(cfg: DataConfig, tokenizer, seed: int) -> list[dict]:
    kind = cfg.source.split(":", 1)[1] if ":" in cfg.source else "all"
    if kind not in ("all", "prose", "tasks"):
        raise ConfigError(f"data.source {cfg.source!r}: use builtin, builtin:prose or builtin:tasks")
    rows: list[dict] = []
    if cfg.format == "cpt" and kind in ("all", "prose") and (cfg.prose or kind == "prose"):
        paragraphs = prose_paragraphs(TRAIN_SPLIT)
        # one document per group of paragraphs (~4 KB of text), so blocks shuffle at a useful grain
        doc: list[str] = []
        size = 0
        for p in paragraphs:
            doc.append(p)
            size += len(p)
            if size > 4000:
                rows.append({"text": "\n\n".join(doc)})
                doc, size = [], 0
        if doc:
            rows.append({"text": "\n\n".join(doc)})
    if kind in ("all", "tasks") or cfg.format == "sft":
        if kind == "prose" and cfg.format == "sft":
            raise ConfigError("data.source=builtin:prose has no question/answer pairs; use builtin or builtin:tasks for sft")
        for s in synthetic_samples(cfg, tokenizer, seed):
            if cfg.format == "cpt":
                rows.append({"text": f"{s.context}\n\n{s.question} {s.answer_prefix}{answer_text(s)}"})
            else:
                rows.append({"context": s.context, "question": s.question, "answer_prefix": s.answer_prefix,
                             "answer": answer_text(s).lstrip(" ") if not s.answer_prefix else answer_text(s)})
    return rows


def prose_windows(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens of the TRAIN-half prose at seeded random offsets (sft mixing)."""
    ids = _encode(tokenizer, [prose_text(TRAIN_SPLIT)])[0]
    if len(ids) <= length:
        raise ConfigError(f"data.prose_block_tokens={length}: the TRAIN prose holds only {len(ids)} tokens")
    starts = np.random.default_rng([seed, 7919]).integers(0, len(ids) - length, size=n)
    return [ids[int(s) : int(s) + length] for s in starts]


def _local_files(source: str) -> list[str] | None:
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in LOCAL_TYPES)
        if not files:
            raise ConfigError(f"data.source {source}: no {'/'.join(LOCAL_TYPES)} files in this directory")
        return files
    if path.is_file():
        return [str(path)]
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source, recursive=True))
        if not files:
            raise ConfigError(f"data.source {source}: the pattern matches no file")
        return files
    if path.suffix in LOCAL_TYPES or source.startswith((".", "/")):
        raise ConfigError(f"data.source {source}: file not found")
    return None


def load_raw(cfg: DataConfig) -> datasets.Dataset:
    """The raw rows of a Hub dataset or of local files."""
    import datasets

    files = _local_files(cfg.source)
    if files is not None:
        types = {LOCAL_TYPES.get(Path(f).suffix) for f in files}
        if None in types or len(types) != 1:
            raise ConfigError(f"data.source {cfg.source}: files must all be one of {sorted(LOCAL_TYPES)} types, got {files[:5]}")
        builder = types.pop()
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    else:
        if cfg.split.lower() in ("test", "validation", "eval"):
            logger.warning("training on the %r split of %s", cfg.split, cfg.source)
        try:
            ds = datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
        except Exception as err:
            raise ConfigError(f"data.source {cfg.source!r}: cannot load it as a Hub dataset ({type(err).__name__}: {err}); "
                              "for offline runs use data.source=builtin or local files") from None
    if cfg.num_samples is not None and len(ds) > cfg.num_samples:
        ds = ds.select(range(cfg.num_samples))
    return ds


# --- tokenization ---------------------------------------------------------------------------------


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def pack_documents(token_lists: list[list[int]], seq_len: int, eos_id: int | None) -> list[list[int]]:
    """Concatenate documents (each followed by EOS) and cut into full ``seq_len`` blocks (the tail is dropped)."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        if eos_id is not None:
            flat.append(eos_id)
    n = len(flat) // seq_len
    return [flat[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def _chat_texts(tokenizer, messages: list[dict], system_prompt: str | None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns (the loss targets)."""
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("data.format=sft needs a tokenizer with a chat template")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise ConfigError("the chat template does not render conversations incrementally; cannot place the answer")
        spans.append((len(before), len(upto)))
    return full, spans


def _sft_conversation(row: dict, cfg: DataConfig) -> tuple[list[dict], str]:
    """(messages, answer_prefix) of a row in one of the accepted sft layouts (columns that are null don't count)."""
    has = lambda *keys: all(row.get(k) is not None for k in keys)  # noqa: E731
    if has(cfg.messages_field):
        return [{"role": m["role"], "content": m["content"]} for m in row[cfg.messages_field]], ""
    if has("prompt") and (has("completion") or has("response")):
        target = row["completion"] if has("completion") else row["response"]
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": target}], ""
    if has("instruction", "output"):  # Alpaca layout (e.g. LongAlpaca, Locret's training set)
        user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}], ""
    if has("question") and (has("answer") or has("answers")):
        answer = row["answer"] if has("answer") else row["answers"]
        if isinstance(answer, (list, tuple)):
            answer = ", ".join(map(str, answer))
        context = row.get("context") or ""
        user = f"{context}\n\n{row['question']}" if context else row["question"]
        prefix = row.get("answer_prefix") or ""
        return [{"role": "user", "content": user}, {"role": "assistant", "content": prefix + str(answer)}], prefix
    raise ConfigError(f"data.format=sft: cannot find a conversation in a row with columns {sorted(row)}; expected "
                      f"{cfg.messages_field!r}, prompt/completion, instruction/output, or context/question/answer")


def tokenize_sft(rows, tokenizer, cfg: DataConfig) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids and labels (loss on the answer only) of each row; rows longer than ``seq_len`` are dropped."""
    ids_out, labels_out, dropped = [], [], 0
    for row in rows:
        messages, prefix = _sft_conversation(row, cfg)
        text, spans = _chat_texts(tokenizer, messages, cfg.system_prompt)
        if prefix and spans:  # the answer prefix is given to the model at run time: no loss on it
            a, b = spans[-1]
            if text[a : a + len(prefix)] == prefix:
                spans[-1] = (a + len(prefix), b)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        if len(ids) > cfg.seq_len:
            dropped += 1
            continue
        labels = [IGNORE_INDEX] * len(ids)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and any(a <= start < b for a, b in spans):
                labels[i] = ids[i]
        if all(x == IGNORE_INDEX for x in labels):
            dropped += 1
            continue
        ids_out.append(ids)
        labels_out.append(labels)
    return ids_out, labels_out, dropped


def data_seed(cfg: DataConfig, run_seed: int) -> int:
    """The seed of the data (generation, prose windows, order): ``data.seed``, or the run's seed."""
    return cfg.seed if cfg.seed is not None else run_seed


def build_dataset(cfg: DataConfig, tokenizer, seed: int = 0) -> datasets.Dataset:
    """The tokenized training set: rows with ``input_ids`` and ``labels`` (``seed``: the run's seed)."""
    import datasets

    seed = data_seed(cfg, seed)
    raw = _builtin_dataset(cfg, tokenizer, seed) if cfg.source.startswith("builtin") else load_raw(cfg)
    columns = set(raw.column_names)
    fn, kwargs = _tokenize_fn(cfg, tokenizer, columns, len(raw))
    ds = raw.map(fn, batched=True, remove_columns=raw.column_names, **kwargs)
    if cfg.format == "sft" and "input_ids" not in columns and len(ds) < len(raw):
        logger.warning("data: dropped %d of %d sft rows longer than seq_len=%d (or without an answer)",
                       len(raw) - len(ds), len(raw), cfg.seq_len)
    if cfg.prose_blocks:
        blocks = prose_windows(tokenizer, cfg.prose_blocks, cfg.prose_block_tokens or cfg.seq_len, seed)
        extra = {"input_ids": blocks, "labels": [list(b) for b in blocks]}
        ds = datasets.concatenate_datasets([ds, in_memory_dataset(extra, fingerprint(*blocks), ds.features)])
    if len(ds) == 0:
        raise ConfigError(
            f"data: no training sequence left from {cfg.source!r} (format={cfg.format}, seq_len={cfg.seq_len}); "
            "for cpt the text must hold at least one full block; for sft lower the context length or raise seq_len"
        )
    return ds


def fingerprint(*parts) -> str:
    """A `datasets` fingerprint of plain values, hashed one part at a time (JSON; anything else by its ``str``)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def in_memory_dataset(rows: list[dict] | dict[str, list], fingerprint_: str, features=None) -> datasets.Dataset:
    """A `datasets.Dataset` over rows held in memory, fingerprinted by the caller.

    ``Dataset.from_list`` / ``from_dict`` fingerprint a new table by pickling it with dill, which depends on
    the interpreter and the pyarrow build: on the GPU image (Python 3.12.3, pyarrow 26, dill 0.4.1) it raised
    ``PicklingError: Can't pickle <class 'MonthDayNano'>`` and stopped the training before its first step. The
    fingerprint only names the table (nothing is cached for in-memory data), so a hash of the rows does.
    ``features``: the column types to give the rows (else inferred by pyarrow).
    """
    import datasets
    import pyarrow as pa

    schema = features.arrow_schema if features is not None else None
    table = pa.Table.from_pylist(rows, schema=schema) if isinstance(rows, list) else pa.Table.from_pydict(rows, schema=schema)
    info = datasets.DatasetInfo(features=features) if features is not None else None
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=info, fingerprint=fingerprint_)


def _builtin_dataset(cfg: DataConfig, tokenizer, seed: int) -> datasets.Dataset:
    if tokenizer is None:
        raise ConfigError("data.source=builtin needs a tokenizer (set `tokenizer`)")
    rows = _builtin_rows(cfg, tokenizer, seed)
    if not rows:
        raise ConfigError(f"data.source {cfg.source}: produced no rows")
    return in_memory_dataset(rows, fingerprint(*rows))


def _tokenize_fn(cfg: DataConfig, tokenizer, columns: set[str], num_rows: int):
    """The batched ``map`` function from raw rows to ``input_ids`` / ``labels`` rows, and its ``map`` settings."""
    if "input_ids" in columns:  # already tokenized
        def fn(batch):
            ids = batch["input_ids"]
            labels = batch["labels"] if batch.get("labels") is not None else [list(x) for x in ids]
            keep = [i for i, x in enumerate(ids) if 0 < len(x) <= cfg.seq_len]
            return {"input_ids": [list(ids[i]) for i in keep], "labels": [list(labels[i] or ids[i]) for i in keep]}
        return fn, {}
    if tokenizer is None:
        raise ConfigError("the data is text: set `tokenizer` (an alias or directory) to tokenize it")
    if cfg.format == "cpt":
        if cfg.text_field not in columns:
            raise ConfigError(f"data.format=cpt: no {cfg.text_field!r} column (columns: {sorted(columns)}); set data.text_field")
        eos = tokenizer.eos_token_id
        field = cfg.text_field

        def fn(batch):
            blocks = pack_documents(_encode(tokenizer, [t for t in batch[field] if t]), cfg.seq_len, eos)
            return {"input_ids": blocks, "labels": [list(b) for b in blocks]}
        # pack in one pass when small (no tail lost per batch), in batches of 1000 documents otherwise
        return fn, {"batch_size": max(1000, num_rows) if num_rows <= 20000 else 1000, "num_proc": cfg.num_proc}

    def fn(batch):
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        ids, labels, _ = tokenize_sft(rows, tokenizer, cfg)
        return {"input_ids": ids, "labels": labels}
    return fn, {"num_proc": cfg.num_proc}


# --- order and batches -----------------------------------------------------------------------------


class SampleOrder:
    """Global sample counter -> dataset row: a fresh seeded permutation per epoch (or the identity)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError("empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.size) if self.shuffle
                          else np.arange(self.size))
        return self._perm

    def __getitem__(self, k: int) -> int:
        epoch, pos = divmod(int(k), self.size)
        return int(self._permutation(epoch)[pos])

    def rows(self, start: int, count: int) -> list[int]:
        return [self[k] for k in range(start, start + count)]


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def collate(examples: list[dict], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``{"input_ids", "labels"}`` to the longest (rounded up to a multiple)."""
    length = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of > 1:
        length = int(math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of)
    b = len(examples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class BatchPlan:
    """Which global samples a process takes for one optimizer step.

    A step consumes ``global_batch = batch_size * num_processes * accumulation`` consecutive samples
    of the stream, starting at ``samples_seen``; micro-step ``a`` of process ``p`` takes the slice
    ``[(a * P + p) * B, +B)``. The same global batch therefore covers the same samples whatever the
    split between processes and accumulation, and a resumed run continues at ``samples_seen``.
    """

    batch_size: int
    num_processes: int
    accumulation: int
    process_index: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes * self.accumulation

    def micro_batches(self, samples_seen: int) -> list[tuple[int, int]]:
        b, p = self.batch_size, self.num_processes
        return [(samples_seen + (a * p + self.process_index) * b, b) for a in range(self.accumulation)]


def get_batch(dataset, order: SampleOrder, start: int, count: int, pad_id: int) -> dict[str, torch.Tensor]:
    rows = order.rows(start, count)
    examples = dataset[rows] if hasattr(dataset, "column_names") else None
    if examples is not None:
        examples = [{"input_ids": ids, "labels": lab} for ids, lab in zip(examples["input_ids"], examples["labels"])]
    else:
        examples = [dataset[r] for r in rows]
    return collate(examples, pad_id)


__all__ = [
    "IGNORE_INDEX", "BatchPlan", "SampleOrder", "build_dataset", "collate", "data_seed", "get_batch", "load_raw",
    "pack_documents", "pad_token_id", "synthetic_samples", "tokenize_sft",
]
