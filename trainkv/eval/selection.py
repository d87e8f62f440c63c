"""The selection rule of docs/protocol.md, applied to dev-split run files, and the checks of a recorded choice.

A choice (a checkpoint, its run-time settings) is made by :func:`select` on dev run files only, and recorded in a
``selection.json`` next to the shipped checkpoint (``scripts/select_checkpoint.py`` writes it). The record lists every
candidate, every dev run file each one was scored on (path, sha256, score, share of the full cache), the rule and the
winner, so that :func:`check_selection` (run by ``tests/test_protocol.py``) can re-apply the rule to the same files
and refuse a record that reads a test-split file.

The rule (``trainkv.selection/1``):

1. Candidates are declared before the dev runs, in order; the first is the default (the shipped setting).
2. For every declared cell (context length x keep) a candidate's *share* is ``100 * mean(candidate) / mean(full)`` on
   the same dev samples (paired by ``(task, seed, index)``); its *task score* is the mean share over the cells.
3. With a held-out family: each candidate names a twin (the same run-time settings on the checkpoint trained without
   that family), whose share on the family's dev samples (against the full-cache run of the family's dev folder, else
   the family's samples of the main full-cache run) is averaged over the same cells (*family score*); the
   candidate's score is ``min(task score, family score)``: a setting must hold on the tasks it trained on *and* on a
   task type it never saw.
4. The highest score wins; an exact tie goes to the earlier-declared candidate.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from trainkv.eval.intervals import paired_ratio
from trainkv.eval.records import now, write_json
from trainkv.eval.spec import (
    DEV_SEEDS, FULL, budget_label, parse_keep, record_split, run_seeds,
)
from trainkv.hub.format import file_sha256

SCHEMA = "trainkv.selection/1"
RULE = ("Candidates declared in order before the dev runs (first = default). Per declared cell (context length x "
        "keep): share = 100 * mean(candidate) / mean(full cache) on the same dev samples. Task score = mean share "
        "over the cells. With a held-out family: family score = the mean share of the candidate's held-out-trained "
        "twin on the family's dev samples, and score = min(task score, family score). Highest score wins; an exact "
        "tie goes to the earlier candidate. Only dev-split run files (docs/protocol.md) may be read.")


class SelectionError(ValueError):
    """A selection that cannot be made or checked (missing cell, a non-dev run file, a record that disagrees)."""


# ---------------------------------------------------------------------------------------------------------
# dev run files
# ---------------------------------------------------------------------------------------------------------
def _load(path: Path) -> dict[str, Any]:
    rec = json.loads(path.read_text())
    if rec.get("kind") != "tasks":
        raise SelectionError(f"{path}: not a task run file")
    rec["_path"] = str(path)
    return rec


def dev_runs(folders: Iterable[str | Path]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """``{(label, context length, budget label): run}`` of the task run files in ``folders`` (their ``runs/`` or
    themselves). Every file must be a dev-split run: a test or ad-hoc file here is an error, not a skip."""
    out: dict[tuple[str, int, str], dict[str, Any]] = {}
    for folder in folders:
        folder = Path(folder)
        files = sorted((folder / "runs").glob("*.json")) if (folder / "runs").is_dir() else sorted(folder.glob("*.json"))
        for path in files:
            rec = _load(path)
            split = record_split(rec)
            if split != "dev":
                raise SelectionError(f"{path} is a {split}-split run (seeds {list(run_seeds(rec))}); a choice may "
                                     f"read dev runs only (seeds {list(DEV_SEEDS)})")
            cfg = rec["config"]
            key = (cfg["method"]["label"], int(cfg["context_length"]), cfg["budget"]["label"])
            if key in out:
                raise SelectionError(f"two dev runs for {key}: {out[key]['_path']} and {path}")
            out[key] = rec
    return out


def parse_cells(lengths: Sequence[int], keeps: Sequence[str | float | int]) -> list[tuple[int, str]]:
    """``[(length, budget label)]``: every length x every keep (``1/8`` -> ``r0.125``)."""
    return [(int(L), budget_label(parse_keep(k) if isinstance(k, str) else k)) for L in lengths for k in keeps]


def _full(runs: dict, length: int) -> dict[str, Any]:
    for (label, L, blabel), rec in runs.items():
        if L == length and (rec["config"]["method"]["method"] == FULL or blabel == FULL):
            return rec
    raise SelectionError(f"no full-cache dev run at {length} tokens")


def _has_full(runs: dict, length: int) -> bool:
    try:
        _full(runs, length)
    except SelectionError:
        return False
    return True


def _rel(path: str, root: Path | None) -> str:
    """``path`` relative to ``root`` without resolving links (on the GPU machine ``results/evidence`` links into the
    surviving ``runs/``; the record names the path the files will have in the repository)."""
    p = Path(os.path.abspath(path))
    if root is not None:
        try:
            return p.relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def _share(rec: dict, full: dict, tasks: Sequence[str] | None, root: Path | None) -> dict[str, Any]:
    results = rec["results"] if tasks is None else [r for r in rec["results"] if r["task"] in tasks]
    ref = full["results"] if tasks is None else [r for r in full["results"] if r["task"] in tasks]
    if not results or not ref:
        raise SelectionError(f"{rec['_path']}: no samples of {list(tasks or [])} to score")
    interval = paired_ratio(results, ref)
    if interval.n == 0:
        raise SelectionError(f"{rec['_path']} and {full['_path']} share no samples (other seeds or lengths?)")
    return {
        "file": _rel(rec["_path"], root), "sha256": file_sha256(Path(rec["_path"])),
        "full_file": _rel(full["_path"], root), "full_sha256": file_sha256(Path(full["_path"])),
        "context_length": rec["config"]["context_length"], "keep": rec["config"]["budget"]["label"],
        "n": interval.n, "share": interval.point, "share_ci": [interval.lo, interval.hi],
        "date": rec.get("date"),
    }


# ---------------------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------------------
def select(
    dev: Iterable[str | Path], candidates: Sequence[str], cells: Sequence[tuple[int, str]], *,
    family: str | None = None, family_tasks: Sequence[str] | None = None, family_dev: Iterable[str | Path] = (),
    twins: Sequence[str] | None = None, root: str | Path | None = None,
) -> dict[str, Any]:
    """Apply the rule (module docstring) and return the ``selection.json`` record (without writing it).

    ``candidates``: method labels of the dev run files, in declared order. ``twins``: per candidate, the label of its
    held-out-trained twin in ``family_dev`` (with ``family`` and ``family_tasks``)."""
    if not candidates:
        raise SelectionError("no candidates")
    if len(set(candidates)) != len(candidates):
        raise SelectionError("a candidate is declared twice")
    root = Path(root) if root is not None else None
    runs = dev_runs(dev)
    fam_runs = dev_runs(family_dev) if family else {}
    if family and (not twins or len(twins) != len(candidates) or not family_tasks):
        raise SelectionError("a held-out family needs family_tasks and one twin label per candidate")
    out_candidates = []
    for i, label in enumerate(candidates):
        entry: dict[str, Any] = {"label": label, "order": i, "cells": []}
        for length, blabel in cells:
            rec = runs.get((label, length, blabel))
            if rec is None:
                raise SelectionError(f"candidate {label!r} has no dev run at {length} x {blabel}")
            entry["cells"].append(_share(rec, _full(runs, length), None, root))
            entry.setdefault("checkpoint", rec["config"]["method"].get("checkpoint"))
            entry.setdefault("weights_sha256", rec["config"]["method"].get("weights_sha256"))
            entry.setdefault("settings", rec["config"]["method"].get("overrides", {}))
        entry["task_score"] = sum(c["share"] for c in entry["cells"]) / len(entry["cells"])
        score = entry["task_score"]
        if family:
            twin = twins[i]  # type: ignore[index]
            entry["twin"] = twin
            entry["family_cells"] = []
            for length, blabel in cells:
                rec = fam_runs.get((twin, length, blabel))
                if rec is None:
                    raise SelectionError(f"twin {twin!r} of {label!r} has no dev run at {length} x {blabel}")
                ref = _full(fam_runs, length) if _has_full(fam_runs, length) else _full(runs, length)
                entry["family_cells"].append(_share(rec, ref, family_tasks, root))
            entry["family_score"] = sum(c["share"] for c in entry["family_cells"]) / len(entry["family_cells"])
            score = min(score, entry["family_score"])
        entry["score"] = score
        out_candidates.append(entry)
    best = max(out_candidates, key=lambda c: (c["score"] if not math.isnan(c["score"]) else -math.inf, -c["order"]))
    dates = [c["date"] for e in out_candidates for c in e["cells"] + e.get("family_cells", []) if c.get("date")]
    return {
        "schema": SCHEMA,
        "rule": RULE,
        "date": now(),
        "split": "dev",
        "dev_seeds": list(DEV_SEEDS),
        "cells": [{"context_length": L, "keep": b} for L, b in cells],
        "family": family,
        "family_tasks": list(family_tasks) if family_tasks else None,
        "candidates": out_candidates,
        "chosen": best["label"],
        "chosen_settings": best.get("settings", {}),
        "checkpoint": best.get("checkpoint"),
        "weights_sha256": best.get("weights_sha256"),
        "latest_dev_run": max(dates) if dates else None,
    }


def write_selection(record: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    write_json(path, record)
    return path


# ---------------------------------------------------------------------------------------------------------
# checks (tests/test_protocol.py)
# ---------------------------------------------------------------------------------------------------------
def referenced_files(record: dict[str, Any]) -> list[tuple[str, str]]:
    """``(path, sha256)`` of every run file a selection record read."""
    out = []
    for cand in record.get("candidates", []):
        for cell in cand.get("cells", []) + cand.get("family_cells", []):
            out.append((cell["file"], cell["sha256"]))
            out.append((cell["full_file"], cell["full_sha256"]))
    return list(dict.fromkeys(out))


def check_selection(path: str | Path, root: str | Path) -> list[str]:
    """Problems of a recorded choice (empty = fine): a referenced file missing, changed, not dev-split (a test-split
    file is the worst case), dated after the choice, or a winner that the rule, re-applied to the same files, does
    not give."""
    path, root = Path(path), Path(root)
    record = json.loads(path.read_text())
    problems = []
    if record.get("schema") != SCHEMA:
        return [f"{path}: schema {record.get('schema')!r}, expected {SCHEMA!r}"]
    for name, sha in referenced_files(record):
        file = root / name
        if not file.is_file():
            problems.append(f"{path}: reads {name}, which is missing")
            continue
        rec = json.loads(file.read_text())
        split = record_split(rec)
        if split != "dev":
            problems.append(f"{path}: reads {name}, a {split}-split run file (seeds {list(run_seeds(rec))})")
        if file_sha256(file) != sha:
            problems.append(f"{path}: {name} changed since the choice (sha256 differs)")
        if rec.get("date") and record.get("date") and rec["date"] > record["date"]:
            problems.append(f"{path}: {name} is dated after the choice")
    if problems:
        return problems
    cand = record["candidates"]
    folders_dev = sorted({str((root / c["file"]).parent) for e in cand for c in e["cells"]}
                         | {str((root / c["full_file"]).parent) for e in cand for c in e["cells"]})
    folders_fam = sorted({str((root / c["file"]).parent) for e in cand for c in e.get("family_cells", [])})
    cells = [(c["context_length"], c["keep"]) for c in record["cells"]]
    try:
        again = select(folders_dev, [e["label"] for e in cand], cells, family=record.get("family"),
                       family_tasks=record.get("family_tasks"), family_dev=folders_fam,
                       twins=[e.get("twin") for e in cand] if record.get("family") else None, root=root)
    except SelectionError as e:
        return [f"{path}: the rule cannot be re-applied: {e}"]
    if again["chosen"] != record["chosen"]:
        problems.append(f"{path}: chose {record['chosen']!r}, the rule on the same files gives {again['chosen']!r}")
    for old, new in zip(cand, again["candidates"]):
        same_nan = math.isnan(old["score"]) and math.isnan(new["score"])  # a full cache scoring 0 has no share
        if not same_nan and not math.isclose(old["score"], new["score"], rel_tol=1e-9, abs_tol=1e-9):
            problems.append(f"{path}: {old['label']} scored {old['score']}, the files give {new['score']}")
    return problems


__all__ = ["RULE", "SCHEMA", "SelectionError", "check_selection", "dev_runs", "parse_cells", "referenced_files",
           "select", "write_selection"]
