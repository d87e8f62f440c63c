"""Pictures of a budget allocation: a (layer x KV head) heat map with per-layer totals (matplotlib, Agg).

    plot_allocation(budgets, "checkpoints/x/allocation.png", reference=128)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    """pyplot on the Agg backend (chosen here, when a picture is drawn, not when trainkv is imported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_allocation(budgets: Sequence[Sequence[float]], path: str | Path, title: str = "",
                    reference: float | None = None) -> Path:
    """Heat map of ``budgets`` ``[L][H]`` (rows = layers, columns = KV heads), beside each layer's mean per
    head; ``reference`` (e.g. the uniform budget) is drawn as a line. Writes a PNG and returns its path."""
    plt = _pyplot()
    data = np.asarray(budgets, dtype=float)
    num_layers, num_heads = data.shape
    height = max(3.0, 0.22 * num_layers + 1.5)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(4.0 + 0.45 * num_heads, height),
                                 gridspec_kw={"width_ratios": [max(1.2, 0.45 * num_heads), 2.2]}, sharey=True)
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_heads))
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 16)))
    if num_layers * num_heads <= 160:
        for i in range(num_layers):
            for j in range(num_heads):
                v = data[i, j]
                ax.text(j, i, f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}", ha="center", va="center",
                        fontsize=6, color="white" if v < data.mean() else "black")
    fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04, label="entries")
    means = data.mean(axis=1)
    bx.barh(range(num_layers), means, color="tab:blue", alpha=0.8, label="mean per head")
    if num_heads > 1:
        bx.plot(data.max(axis=1), range(num_layers), "k|", markersize=6, label="largest head (bytes)")
    if reference is not None:
        bx.axvline(reference, color="tab:red", linestyle="--", linewidth=1, label=f"uniform {reference:g}")
    bx.set_xlabel("entries per head")
    bx.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


__all__ = ["plot_allocation"]
