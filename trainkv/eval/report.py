"""Result files of a sweep -> ``summary.json``, ``summary.md`` and the plots.

Layout of an output directory::

    runs/<method>__L<context length>__<budget>.json     one task run (see trainkv.eval.runner)
    quality/<method>__L<context length>__<budget>.json  one KL / perplexity run (trainkv.eval.quality)
    summary.json  summary.md  accuracy_vs_budget.png  [kl_vs_budget.png]

``<budget>`` is ``r<keep ratio>``, ``n<entries>`` or ``full``. Scores are RULER string-match scores
(0-100); a table cell is the mean over every sample of every task of the run, and its share of the
full-cache score at the same context length, each with its 95% bootstrap interval (`trainkv.eval.intervals`: the
score's resamples samples within tasks; the share is a paired ratio on the samples both runs hold). For every trained
method (a ``--checkpoint``) the report adds paired claims: the share of the full cache against 90%, and the
difference to every training-free method at the same cell.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

from trainkv.eval.intervals import (
    KEEP_THRESHOLD, LENGTH_THRESHOLD, beats_claim, cell_interval, keeps_claim, length_claim, paired_ratio,
)
from trainkv.eval.spec import record_split, run_seeds
from trainkv.methods import get_method

FULL = "full"


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
def load_records(out_dir: str | Path, kind: str = "tasks") -> list[dict[str, Any]]:
    """Every run JSON of ``kind`` (``tasks`` -> runs/, ``quality`` -> quality/) in ``out_dir``."""
    folder = Path(out_dir) / ("runs" if kind == "tasks" else "quality")
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            continue
        if rec.get("kind") == kind:
            rec["_path"] = str(path)
            records.append(rec)
    return records


def matches(record: dict[str, Any], selector: dict[str, Any] | None) -> bool:
    if not selector:
        return True
    cfg = record["config"]
    return all(cfg.get(k) == v for k, v in selector.items() if k in cfg)


# ---------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------
def _budget_key(info: dict[str, Any]) -> tuple:
    """Order columns by decreasing keep ratio (full first)."""
    return (-(info.get("keep_ratio") or 1.0), info.get("label", ""))


def _is_trained(record: dict[str, Any]) -> bool:
    return record["config"]["method"].get("checkpoint") is not None


def summarize(task_records: Iterable[dict], quality_records: Iterable[dict] = (), intervals: bool = True
              ) -> dict[str, Any]:
    """Pool run records into ``{context length: {method: {budget label: cell}}}`` plus the full-cache scores
    (with ``intervals``: each cell's ``ci`` and ``relative_ci``, and the paired ``claims`` of trained methods)."""
    task_records = list(task_records)
    quality_records = list(quality_records)
    full_records: dict[str, dict] = {}
    cell_records: dict[tuple[str, str, str], dict] = {}
    full: dict[str, dict] = {}
    methods: dict[str, dict[str, dict[str, dict]]] = {}
    budgets: dict[str, dict] = {}
    lengths: set[int] = set()
    meta: dict[str, Any] = {}
    for rec in task_records:
        cfg = rec["config"]
        length = int(cfg["context_length"])
        lengths.add(length)
        label = cfg["method"]["label"]
        scores = [r["score"] for r in rec["results"]]
        per_task: dict[str, list[float]] = {}
        for r in rec["results"]:
            per_task.setdefault(r["task"], []).append(r["score"])
        cell = {
            "score": sum(scores) / len(scores) if scores else math.nan,
            "n": len(scores),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
            "compression": (sum(r["compression"] for r in rec["results"]) / len(scores)) if scores else math.nan,
            "entries": cfg["budget"].get("entries"),
            "keep_ratio": cfg["budget"].get("keep_ratio"),
            "seconds_per_sample": rec.get("timing", {}).get("seconds_per_sample"),
            "file": Path(rec.get("_path", "")).name,
        }
        if intervals and scores:
            ci = cell_interval(rec["results"])
            cell["ci"] = [ci.lo, ci.hi]
        if not meta:
            meta = {k: cfg.get(k) for k in ("model", "tasks", "samples_per_task", "seed", "split", "dtype",
                                            "chunk_size", "chunking")}
            meta.update(eval_split=record_split(rec), seeds=list(run_seeds(rec)))
        for key in ("model", "dtype"):  # one table compares like with like
            if cfg.get(key) != meta.get(key):
                raise ValueError(f"{rec.get('_path', 'a run record')} has {key} {cfg.get(key)!r}, the other runs "
                                 f"{meta.get(key)!r}: one results folder holds one {key}; give runs of another "
                                 f"{key} their own --output folder")
        meta.setdefault("devices", set()).add(rec.get("device"))  # type: ignore[union-attr]
        meta.setdefault("_samples", set()).add(cfg.get("samples_per_task"))  # type: ignore[union-attr]
        if cfg["method"]["method"] == FULL or cfg["budget"].get("label") == FULL:
            full[str(length)] = cell
            full_records[str(length)] = rec
            continue
        blabel = cfg["budget"]["label"]
        budgets.setdefault(blabel, {"label": blabel, "spec": cfg["budget"]["spec"],
                                    "keep_ratio": cfg["budget"]["keep_ratio"]})
        methods.setdefault(label, {}).setdefault(str(length), {})[blabel] = cell
        cell_records[(label, str(length), blabel)] = rec
    for label, per_len in methods.items():
        for length, cells in per_len.items():
            ref = full.get(length, {}).get("score")
            for blabel, cell in cells.items():
                cell["relative"] = (100.0 * cell["score"] / ref) if ref else None
                if intervals and ref and length in full_records:
                    r = paired_ratio(cell_records[(label, length, blabel)]["results"], full_records[length]["results"])
                    if r.n:
                        cell["relative_ci"] = [r.lo, r.hi]
                        cell["paired_n"] = r.n
    claims = _claims(cell_records, full_records) if intervals else []
    quality: dict[str, dict[str, dict[str, dict]]] = {}
    for rec in quality_records:
        cfg = rec["config"]
        q_label = cfg["budget"]["label"]
        quality.setdefault(cfg["method"]["label"], {}).setdefault(str(cfg["context_length"]), {})[q_label] = {
            **rec["aggregate"], "keep_ratio": cfg["budget"].get("keep_ratio"), "entries": cfg["budget"].get("entries"),
        }
        lengths.add(int(cfg["context_length"]))
        if q_label != FULL:
            budgets.setdefault(q_label, {"label": q_label, "spec": cfg["budget"]["spec"],
                                         "keep_ratio": cfg["budget"]["keep_ratio"]})
    if "devices" in meta:
        meta["devices"] = sorted(d for d in meta["devices"] if d)
    sizes = sorted(n for n in meta.pop("_samples", set()) if n is not None)
    if len(sizes) > 1:  # runs of several sizes pooled in one folder (e.g. training-free rows with fewer samples)
        meta["samples_per_task"] = " or ".join(map(str, sizes)) + " (see n per cell)"
    ordered = sorted(budgets.values(), key=_budget_key)
    return {
        **meta,
        "context_lengths": sorted(lengths),
        "budgets": ordered,
        "full": full,
        "methods": methods,
        "claims": claims,
        "quality": quality,
    }


def _claims(cell_records: dict[tuple[str, str, str], dict], full_records: dict[str, dict]) -> list[dict[str, Any]]:
    """Paired claims of every trained method's cell: its share of the full cache (>= 90%?) and its difference to
    every training-free method at the same context length and keep."""
    out = []
    def order(item):  # by context length, method, then decreasing keep
        (label, length, _), rec = item
        return int(length), label, -(rec["config"]["budget"].get("keep_ratio") or 0.0)

    for (label, length, blabel), rec in sorted(cell_records.items(), key=order):
        if not _is_trained(rec):
            continue
        if length in full_records:
            out.append(keeps_claim(rec, full_records[length]).to_dict())
        for (other, olen, oblabel), orec in sorted(cell_records.items()):
            if (olen, oblabel) == (length, blabel) and other != label and not _is_trained(orec):
                out.append(beats_claim(rec, orec).to_dict())
    out += _length_claims(cell_records, full_records)
    return out


def _length_claims(cell_records: dict[tuple[str, str, str], dict], full_records: dict[str, dict]) -> list[dict]:
    """Per trained method and keep with cells at two or more context lengths: its share at every longer length
    against its share at the shortest (length generalization, >= 85%?)."""
    out = []
    by_method: dict[tuple[str, str], dict[int, dict]] = {}
    for (label, length, blabel), rec in cell_records.items():
        if _is_trained(rec) and length in full_records:
            by_method.setdefault((label, blabel), {})[int(length)] = rec
    for (_, _), cells in sorted(by_method.items()):
        lengths = sorted(cells)
        short = lengths[0]
        for long in lengths[1:]:
            out.append(length_claim(cells[long], full_records[str(long)], cells[short],
                                    full_records[str(short)]).to_dict())
    return out


# ---------------------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------------------
def budget_title(budget: dict[str, Any]) -> str:
    spec = budget.get("spec")
    if isinstance(spec, float):
        frac = Fraction(spec).limit_denominator(1024)
        return f"{frac.numerator}/{frac.denominator}" if abs(float(frac) - spec) < 1e-9 and frac.numerator == 1 else f"{spec:.3g}"
    if isinstance(spec, int):
        return f"{spec} entries"
    return str(budget.get("label"))


def _fmt(x: float | None, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci(cell: dict[str, Any], key: str = "ci", nd: int = 1) -> str:
    ci = cell.get(key)
    return f" [{_fmt(ci[0], nd)}, {_fmt(ci[1], nd)}]" if ci else ""


def _score_cell(cell: dict[str, Any]) -> str:
    """``46.0 [41.2, 50.9] (98% [90, 106])`` (intervals where the summary has them)."""
    rel = ""
    if cell.get("relative") is not None:
        rel_ci = cell.get("relative_ci")
        rel = f" ({cell['relative']:.0f}%" + (f" [{_fmt(rel_ci[0], 0)}, {_fmt(rel_ci[1], 0)}]" if rel_ci else "") + ")"
    return f"{_fmt(cell['score'])}{_ci(cell)}{rel}"


def split_text(summary: dict[str, Any]) -> str:
    """``test split, seed 271828`` / ``dev split, seeds 4321, 777, 2024`` / ``adhoc split, seed 1234``."""
    seeds = summary.get("seeds") or ([] if summary.get("seed") is None else
                                     (summary["seed"] if isinstance(summary["seed"], list) else [summary["seed"]]))
    word = "seed" if len(seeds) == 1 else "seeds"
    return f"{summary.get('eval_split', 'adhoc')} split, {word} {', '.join(map(str, seeds))}"


def markdown(summary: dict[str, Any], title: str = "trainkv evaluation") -> str:
    lines = [f"# {title}", ""]
    tasks = summary.get("tasks") or []
    if tasks or summary["full"] or summary["methods"]:  # a KL-only folder has no task runs to describe
        seeds = summary.get("seeds") or [None]
        per_seed = " per seed" if len(seeds) > 1 else ""
        lines.append(
            f"Model `{summary.get('model')}`; tasks: {', '.join(tasks)}; {summary.get('samples_per_task')} samples per "
            f"task{per_seed} ({split_text(summary)}; generator split `{summary.get('split', 'eval')}`); dtype "
            f"{summary.get('dtype')}; prefill chunk {summary.get('chunk_size') or 'whole context'}; device(s): "
            f"{', '.join(summary.get('devices') or [])}."
        )
        lines.append("")
        lines.append("Cells: mean RULER string-match score (0-100) over all samples, and in parentheses its share of the "
                     "full-cache score at the same context length. Columns are keep ratios (budget = ratio x context "
                     "length entries per layer and KV head)."
                     + (" Brackets: 95% bootstrap intervals (2000 resamples within tasks; the share is a paired ratio "
                        "on the same samples)." if _has_intervals(summary) else ""))
    budgets = summary["budgets"]
    for length in summary["context_lengths"]:
        key = str(length)
        full = summary["full"].get(key)
        rows = [m for m in summary["methods"] if key in summary["methods"][m]]
        if not rows and not full:
            continue
        lines += ["", f"## {length} tokens", ""]
        cols = [b for b in budgets if any(b["label"] in summary["methods"][m][key] for m in rows)]
        if not cols:  # only the full cache was run at this length
            lines += ["| method | full cache |", "|---|---|", f"| full cache | {_fmt(full['score'])}{_ci(full)} |"]
            continue
        lines.append("| method | " + " | ".join(budget_title(b) for b in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        if full:
            cell = f"{_fmt(full['score'])}{_ci(full)} (100%)"
            lines.append("| full cache | " + " | ".join(cell for _ in cols) + " |")
        for m in rows:
            cells = []
            for b in cols:
                c = summary["methods"][m][key].get(b["label"])
                cells.append("" if c is None else _score_cell(c))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        # measured compression
        lines += ["", "Measured compression (entries kept per layer and KV head after the context / context tokens, "
                  "chat template included), mean over samples:", ""]
        lines.append("| method | " + " | ".join(budget_title(b) for b in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for m in rows:
            cells = []
            for b in cols:
                c = summary["methods"][m][key].get(b["label"])
                cells.append("" if c is None else f"{c['compression']:.3f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += _claims_markdown(summary)
    lines += _per_task_markdown(summary)
    lines += _quality_markdown(summary)
    return "\n".join(lines) + "\n"


def _has_intervals(summary: dict[str, Any]) -> bool:
    cells = [*summary.get("full", {}).values()]
    cells += [c for per_len in summary.get("methods", {}).values() for cs in per_len.values() for c in cs.values()]
    return any("ci" in c for c in cells)


def _claims_markdown(summary: dict[str, Any]) -> list[str]:
    """Per trained cell: the share of the full cache (>= 90%?) and the narrowest win over a training-free method."""
    claims = summary.get("claims") or []
    if not claims:
        return []
    lines = ["", "## Paired claims (trained methods)", "",
             f"95% paired bootstrap intervals on the samples both runs hold. `keeps`: share of the full cache, holds "
             f"when the whole interval is >= {KEEP_THRESHOLD:g}%. `beats`: score difference to the training-free "
             "method with the lowest lower bound at the same cell (every other training-free method is beaten by at "
             "least as much at the lower bound; all of them are in summary.json), holds when the whole interval is "
             "> 0.", ""]
    groups: dict[tuple[str, str], dict[str, list]] = {}
    lengths = [c for c in claims if c["kind"] == "holds"]
    for c in claims:
        if c["kind"] != "holds":
            groups.setdefault((c["method"], c["cell"]), {}).setdefault(c["kind"], []).append(c)
    for (_, _), kinds in groups.items():
        for c in kinds.get("keeps", []):
            lines.append(f"- {c['sentence']}")
        beats = kinds.get("beats", [])
        if beats:
            weakest = min(beats, key=lambda c: (c["interval"]["lo"] if not math.isnan(c["interval"]["lo"]) else -1e9))
            lines.append(f"- {weakest['sentence']} (narrowest of {len(beats)} training-free methods)")
    if lengths:
        lines += ["", f"Length generalization: a trained method's share of the full cache at a longer context as a "
                  f"percentage of its share at the shortest one (the lengths resampled independently), holds when "
                  f"the whole interval is >= {LENGTH_THRESHOLD:g}%.", ""]
        lines += [f"- {c['sentence']}" for c in lengths]
    return lines


def _per_task_markdown(summary: dict[str, Any]) -> list[str]:
    tasks = summary.get("tasks") or []
    if len(tasks) < 2:
        return []
    lines = ["", "## Per task", ""]
    for length in summary["context_lengths"]:
        key = str(length)
        entries = []
        if key in summary["full"]:
            entries.append(("full cache", summary["full"][key]))
        for m, per_len in summary["methods"].items():
            for b in summary["budgets"]:
                c = per_len.get(key, {}).get(b["label"])
                if c is not None:
                    entries.append((f"{m} @ {budget_title(b)}", c))
        if not entries:
            continue
        lines += [f"### {length} tokens", ""]
        lines.append("| run | " + " | ".join(tasks) + " | mean |")
        lines.append("|---|" + "---|" * (len(tasks) + 1))
        for name, c in entries:
            lines.append(f"| {name} | " + " | ".join(_fmt(c["per_task"].get(t)) for t in tasks) + f" | {_fmt(c['score'])} |")
        lines.append("")
    return lines


def _quality_markdown(summary: dict[str, Any]) -> list[str]:
    q = summary.get("quality") or {}
    if not q:
        return []
    lines = ["", "## Natural text: KL to the full cache and perplexity", "",
             "Held-out prose (EVAL split). Cells: mean KL(full || evicted) in nats per token over positions after "
             "the first `budget` tokens / perplexity of the evicted model (full-cache perplexity over the same "
             "positions in brackets)."]
    budgets = [b for b in summary["budgets"]]
    for length in summary["context_lengths"]:
        key = str(length)
        rows = [m for m in q if key in q[m]]
        if not rows:
            continue
        cols = [b for b in budgets if any(b["label"] in q[m][key] for m in rows)]
        lines += ["", f"### {length} tokens", ""]
        lines.append("| method | " + " | ".join(budget_title(b) for b in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for m in rows:
            if FULL in q[m][key]:
                c = q[m][key][FULL]
                lines.append(f"| {m} | " + " | ".join(f"0 / {_fmt(c['ppl'], 2)}" for _ in cols) + " |")
                continue
            cells = []
            for b in cols:
                c = q[m][key].get(b["label"])
                cells.append("" if c is None else f"{c['kl']:.4f} / {_fmt(c['ppl'], 2)} ({_fmt(c['ppl_full'], 2)})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _is_training_free(label: str) -> bool:
    try:
        return not get_method(label.split(":", 1)[0]).trainable
    except (KeyError, ValueError):
        return False  # a --checkpoint name: a trained method


def _line_styles(labels) -> dict[str, dict[str, Any]]:
    """A fixed colour per method (tab20, so 11+ methods stay distinct); trained methods solid, training-free dashed."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    return {m: {"color": cmap(i % 20), "linestyle": "--" if _is_training_free(m) else "-",
                "linewidth": 1.3 if _is_training_free(m) else 2.0} for i, m in enumerate(sorted(labels))}


def _legend_outside(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def plot_accuracy(summary: dict[str, Any], path: str | Path) -> Path:
    """One panel per context length: score relative to the full cache (%) against the keep ratio (log scale)."""
    plt = _pyplot()
    lengths = [L for L in summary["context_lengths"] if str(L) in summary["full"]
               or any(str(L) in v for v in summary["methods"].values())]
    n = max(1, len(lengths))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.0), squeeze=False, sharey=True)
    top = 110.0
    styles = _line_styles(summary["methods"])
    for ax, length in zip(axes[0], lengths):
        key = str(length)
        full = summary["full"].get(key)
        ax.axhline(100.0, color="black", linestyle="--", linewidth=1.2,
                   label="full cache" + (f" ({full['score']:.1f})" if full else ""))
        ticks: set[float] = set()
        for m, per_len in summary["methods"].items():
            cells = sorted(per_len.get(key, {}).values(), key=lambda c: c["keep_ratio"])
            ticks.update(c["keep_ratio"] for c in cells)
            pts = [(c["keep_ratio"], c["relative"]) for c in cells if c.get("relative") is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=m, **styles[m])
                top = max(top, max(p[1] for p in pts) + 10)
        ax.set_xscale("log", base=2)
        if ticks:
            ticks_sorted = sorted(ticks)
            ax.set_xticks(ticks_sorted)
            ax.set_xticklabels([budget_title({"spec": float(t)}) for t in ticks_sorted])
            ax.minorticks_off()
            ax.set_xlim(min(ticks_sorted) / 1.3, max(1.0, max(ticks_sorted)) * 1.1)
        ax.set_xlabel("keep ratio (entries per layer & KV head / context)")
        title = f"{length} tokens"
        if full:
            title += f" (full cache {full['score']:.1f})"
            if not full["score"]:
                ax.text(0.5, 0.3, "full cache scores 0:\nno relative score", transform=ax.transAxes, ha="center")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    for ax in axes[0]:
        ax.set_ylim(-5, top)
    axes[0][0].set_ylabel("score relative to full cache (%)")
    fig.suptitle(f"{summary.get('model')}: {len(summary.get('tasks') or [])} tasks x {summary.get('samples_per_task')} "
                 f"samples, query-agnostic eviction (solid: trained, dashed: training-free)")
    fig.tight_layout()
    _legend_outside(fig, axes[0][-1])
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_quality(summary: dict[str, Any], path: str | Path) -> Path | None:
    q = summary.get("quality") or {}
    if not q:
        return None
    plt = _pyplot()
    lengths = [L for L in summary["context_lengths"] if any(str(L) in v for v in q.values())]
    n = max(1, len(lengths))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.0), squeeze=False)
    styles = _line_styles(q)
    for ax, length in zip(axes[0], lengths):
        key = str(length)
        for m, per_len in q.items():
            cells = sorted((c for lbl, c in per_len.get(key, {}).items() if lbl != FULL), key=lambda c: c["keep_ratio"])
            if cells:
                ax.plot([c["keep_ratio"] for c in cells], [max(c["kl"], 1e-6) for c in cells], marker="o", markersize=4,
                        label=m, **styles[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ratios = sorted({c["keep_ratio"] for per_len in q.values() for lbl, c in per_len.get(key, {}).items() if lbl != FULL})
        if ratios:
            ax.set_xticks(ratios)
            ax.set_xticklabels([budget_title({"spec": float(r)}) for r in ratios])
            ax.minorticks_off()
        ax.set_xlabel("keep ratio")
        ax.set_title(f"{length} tokens")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("KL(full || evicted), nats/token")
    fig.tight_layout()
    _legend_outside(fig, axes[0][-1])
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# everything
# ---------------------------------------------------------------------------------------------------------
def write_report(out_dir: str | Path, selector: dict[str, Any] | None = None, title: str = "trainkv evaluation",
                 intervals: bool = True) -> dict:
    """Write ``summary.json``, ``summary.md``, ``accuracy_vs_budget.png`` (and ``kl_vs_budget.png``)."""
    out = Path(out_dir)
    tasks = [r for r in load_records(out, "tasks") if matches(r, selector)]
    q_selector = {k: v for k, v in (selector or {}).items() if k in ("model", "dtype")}
    quality = [r for r in load_records(out, "quality") if matches(r, q_selector)]
    summary = summarize(tasks, quality, intervals=intervals)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary, title))
    if tasks:
        plot_accuracy(summary, out / "accuracy_vs_budget.png")
    if quality:
        plot_quality(summary, out / "kl_vs_budget.png")
    return summary


__all__ = ["budget_title", "load_records", "markdown", "plot_accuracy", "plot_quality", "split_text", "summarize",
           "write_report"]
