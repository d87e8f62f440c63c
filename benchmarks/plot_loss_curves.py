"""Overlay training-loss curves and say, with numbers, whether they match within noise (issue 9).

    python benchmarks/plot_loss_curves.py \
        --run "1 GPU=runs/mg/g1" --run "2 GPUs ZeRO-2=runs/mg/z2" --run "2 GPUs ZeRO-3=runs/mg/z3" \
        --run "1 GPU resumed from ZeRO-2=runs/mg/z2_resume_g1" --noise-run "1 GPU, data seed 8=runs/mg/g1_seed8" \
        --output-dir benchmarks/results/train/multi_gpu

Each ``--run LABEL=PATH`` is a run directory (its ``metrics.jsonl``) or a ``metrics.jsonl`` file; the
first run is the reference. Writes ``loss_curves.png`` (curves, and their difference to the reference),
``loss_match.json`` and ``loss_match.md``.

Per run and metric key (``--keys``, default ``loss`` plus ``kl`` where every run logged it), over the
steps both the run and the reference logged: max and mean |difference| to the reference, final values,
and the difference of the mean over the last ``--window`` steps. The noise it is compared with:

* ``sigma_step``: the reference curve's step-to-step noise, the robust standard deviation
  (1.4826 x median absolute deviation) of ``loss[t] - (centered moving average over --window logged
  steps)[t]`` (ends excluded; robust so that the bends of the curve do not count as noise). It is the
  scatter that batch composition alone puts on a single step's loss (log every step for it).
* ``seed_spread`` (with ``--noise-run``): max and mean |difference| between the reference and a run
  of the same recipe with another data-order seed, i.e. what "another equally valid run" looks like.

A run ``matches within noise`` when its mean |difference| to the reference is below the noise run's
(it is closer to the reference than an equally valid run on other data), or, without a noise run,
when its max |difference| is at most 3 sigma_step (``within_3_sigma_step``, reported either way).
Runs on the same data in the same order should sit far inside both; the gates' hinge loss on the
keep ratio can make small numerical differences grow late in a run, which the seed criterion tolerates.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def read_metrics(path: str | Path) -> dict[int, dict]:
    """``{step: record}`` from a run directory or a metrics.jsonl file (a resumed run's later line wins)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"no metrics file at {path}")
    records = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rec = json.loads(line)
            records[int(rec["step"])] = rec
    if not records:
        raise SystemExit(f"{path} holds no records")
    return records


def parse_run(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise SystemExit(f"--run {text!r}: use LABEL=PATH")
    label, path = text.split("=", 1)
    return label.strip(), path.strip()


def moving_average(values: list[float], window: int) -> list[float | None]:
    half = window // 2
    out: list[float | None] = []
    for i in range(len(values)):
        if i < half or i + half >= len(values):
            out.append(None)
        else:
            out.append(statistics.fmean(values[i - half:i + half + 1]))
    return out


def step_noise(curve: dict[int, float], window: int) -> float | None:
    """Std of the residuals of a curve around its centered moving average (consecutive steps only)."""
    steps = sorted(curve)
    values = [curve[s] for s in steps]
    smooth = moving_average(values, window)
    residuals = [v - m for v, m in zip(values, smooth) if m is not None]
    if len(residuals) < 2:
        return None
    center = statistics.median(residuals)
    return 1.4826 * statistics.median(abs(r - center) for r in residuals)  # robust std: the curve's bends are outliers


def compare(ref: dict[int, float], run: dict[int, float], window: int) -> dict:
    common = sorted(set(ref) & set(run))
    if not common:
        return {"common_steps": 0}
    diffs = [abs(run[s] - ref[s]) for s in common]
    rel = [d / abs(ref[s]) for d, s in zip(diffs, common) if ref[s]]
    worst = common[max(range(len(diffs)), key=diffs.__getitem__)]
    tail = common[-window:]
    return {
        "common_steps": len(common), "first_step": common[0], "last_step": common[-1],
        "max_abs_diff": max(diffs), "max_abs_diff_step": worst, "mean_abs_diff": statistics.fmean(diffs),
        "max_rel_diff": max(rel) if rel else None, "median_rel_diff": statistics.median(rel) if rel else None,
        "final_step": common[-1], "final_value": run[common[-1]], "reference_final_value": ref[common[-1]],
        "final_abs_diff": abs(run[common[-1]] - ref[common[-1]]),
        "tail_mean": statistics.fmean(run[s] for s in tail), "reference_tail_mean": statistics.fmean(ref[s] for s in tail),
        "tail_mean_abs_diff": abs(statistics.fmean(run[s] - ref[s] for s in tail)),
    }


def analyse(runs: list[tuple[str, dict[int, dict]]], noise_run: tuple[str, dict[int, dict]] | None, keys: list[str],
            window: int) -> dict:
    ref_label, ref = runs[0]
    result = {"reference": ref_label, "window": window, "keys": {}, "criterion": (
        "matches within noise: mean |diff| to the reference < the other-data-seed run's mean |diff| to it "
        "(also reported: max |diff| <= 3 sigma_step)" if noise_run else
        "matches within noise: max |diff| <= 3 sigma_step (no other-seed run given)"),
        "sigma_step_definition": f"robust std (1.4826 MAD) of loss[t] - centered {window}-step moving average of the "
                                 "reference curve",
    }
    for key in keys:
        curves = [(label, {s: r[key] for s, r in recs.items() if isinstance(r.get(key), (int, float))}) for label, recs in runs]
        ref_curve = curves[0][1]
        sigma = step_noise(ref_curve, window)
        entry = {"sigma_step": sigma, "reference_final_value": ref_curve[max(ref_curve)] if ref_curve else None,
                 "runs": {}}
        seed = None
        if noise_run is not None:
            noise_curve = {s: r[key] for s, r in noise_run[1].items() if isinstance(r.get(key), (int, float))}
            seed = compare(ref_curve, noise_curve, window)
            entry["seed_spread"] = {"label": noise_run[0], **seed}
        for label, curve in curves[1:]:
            c = compare(ref_curve, curve, window)
            if c["common_steps"]:
                verdicts = []
                if sigma:
                    c["max_abs_diff_over_sigma_step"] = c["max_abs_diff"] / sigma
                    c["within_3_sigma_step"] = c["max_abs_diff"] <= 3 * sigma
                    verdicts.append(c["within_3_sigma_step"])
                if seed and seed.get("common_steps"):
                    c["mean_abs_diff_over_seed_spread"] = c["mean_abs_diff"] / max(seed["mean_abs_diff"], 1e-12)
                    c["below_seed_spread"] = c["mean_abs_diff"] < seed["mean_abs_diff"]
                    verdicts = [c["below_seed_spread"]]  # the decisive test when another-seed run exists
                if verdicts:
                    c["matches_within_noise"] = all(verdicts)
            entry["runs"][label] = c
        result["keys"][key] = entry
    return result


def markdown(result: dict) -> str:
    lines = []
    for key, entry in result["keys"].items():
        sigma = entry["sigma_step"]
        lines.append(f"### `{key}` against {result['reference']}")
        lines.append("")
        lines.append(f"Step noise sigma_step = {_fmt(sigma)} ({result['sigma_step_definition']})."
                     + (f" Seed spread ({entry['seed_spread']['label']}): max |diff| {_fmt(entry['seed_spread'].get('max_abs_diff'))}, "
                        f"mean |diff| {_fmt(entry['seed_spread'].get('mean_abs_diff'))}." if "seed_spread" in entry else ""))
        lines.append("")
        lines.append("| run | steps | max abs diff (step) | max/sigma | mean abs diff | mean/seed spread | final | "
                     f"ref final | last-{result['window']} mean diff | within noise |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for label, c in entry["runs"].items():
            if not c.get("common_steps"):
                lines.append(f"| {label} | 0 | - | - | - | - | - | - | - | - |")
                continue
            ok = c.get("matches_within_noise")
            lines.append(
                f"| {label} | {c['first_step']}-{c['last_step']} | {_fmt(c['max_abs_diff'])} ({c['max_abs_diff_step']}) | "
                f"{_fmt(c.get('max_abs_diff_over_sigma_step'), 2)} | {_fmt(c['mean_abs_diff'])} | "
                f"{_fmt(c.get('mean_abs_diff_over_seed_spread'), 2)} | {_fmt(c['final_value'])} | "
                f"{_fmt(c['reference_final_value'])} | {_fmt(c['tail_mean_abs_diff'])} | "
                f"{'-' if ok is None else ('yes' if ok else 'NO')} |")
        lines.append("")
    lines.append(f"Criterion: {result['criterion']}.")
    return "\n".join(lines) + "\n"


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def plot(runs, noise_run, key: str, path: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ref = {s: r[key] for s, r in runs[0][1].items() if key in r}
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    everything = list(runs) + ([noise_run] if noise_run else [])
    for i, (label, recs) in enumerate(everything):
        curve = {s: r[key] for s, r in recs.items() if key in r}
        steps = sorted(curve)
        noise = noise_run is not None and i == len(everything) - 1
        kw = {"color": "0.6", "lw": 1.0, "alpha": 0.8} if noise else {"lw": 1.4, "ls": styles[i % len(styles)]}
        top.plot(steps, [curve[s] for s in steps], label=label + (" (noise reference)" if noise else ""), **kw)
        if i == 0:
            continue
        common = [s for s in steps if s in ref]
        bottom.plot(common, [curve[s] - ref[s] for s in common], label=label, **kw)
    values = [v for v in ref.values() if isinstance(v, (int, float))]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        top.set_yscale("log")  # the keep-ratio phase starts an order of magnitude above the rest
    bottom.axhline(0.0, color="k", lw=0.6)
    top.set_ylabel(key)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    top.set_title(title or f"training {key}")
    bottom.set_ylabel(f"{key} - {runs[0][0]}")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=PATH (run dir or metrics.jsonl); first = reference")
    ap.add_argument("--noise-run", default=None, help="LABEL=PATH of the same recipe with another data-order seed")
    ap.add_argument("--keys", nargs="+", default=None, help="metrics to compare (default: loss, and kl if logged)")
    ap.add_argument("--window", type=int, default=9, help="moving-average / tail window in steps (default 9)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--title", default=None)
    ap.add_argument("--no-plot", action="store_true", help="tables only (no matplotlib needed)")
    args = ap.parse_args(argv)
    if args.window < 3 or args.window % 2 == 0:
        ap.error("--window must be an odd number >= 3")
    parsed = [parse_run(r) for r in args.run]
    runs = [(label, read_metrics(path)) for label, path in parsed]
    noise_run = None
    if args.noise_run:
        label, path = parse_run(args.noise_run)
        noise_run = (label, read_metrics(path))
    keys = args.keys or ["loss"] + [k for k in ("kl",) if all(any(k in r for r in recs.values()) for _, recs in runs)]
    result = analyse(runs, noise_run, keys, args.window)
    result["runs"] = dict(parsed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_match.json").write_text(json.dumps(result, indent=2))
    (out / "loss_match.md").write_text(markdown(result))
    written = [out / "loss_match.json", out / "loss_match.md"]
    if not args.no_plot:
        plot(runs, noise_run, keys[0], out / "loss_curves.png", args.title)
        written.insert(0, out / "loss_curves.png")
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
