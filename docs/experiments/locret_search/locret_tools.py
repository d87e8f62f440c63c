"""Small helpers of the issue-#5 GPU scripts (`locret_*.sh`).

    python docs/experiments/locret_search/locret_tools.py candidate NAME SRC POOL STABILIZERS   # runs/cand/NAME = SRC with these run-time settings
    python docs/experiments/locret_search/locret_tools.py table GLOB [GLOB ...]                 # one line per run file: score, per-task scores / KL
    python docs/experiments/locret_search/locret_tools.py best N GLOB                           # the N best labels by score, space-separated
"""

from __future__ import annotations

import glob
import json
import shutil
import sys
from pathlib import Path


def candidate(name: str, src: str, pool: str, stabilizers: str) -> None:
    """A copy of checkpoint ``src`` at ``runs/cand/<name>`` whose config sets ``pool_kernel`` and ``stabilizers``
    (an int is a number of tokens, a float a fraction of the budget); the weights are the same bytes."""
    dest = Path("runs/cand") / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config["method"].update(pool_kernel=int(pool), stabilizers=float(stabilizers) if "." in stabilizers else int(stabilizers))
    (dest / "config.json").write_text(json.dumps(config, indent=2))


def table(patterns: list[str]) -> None:
    for pattern in patterns:
        for f in sorted(glob.glob(pattern)):
            agg = json.loads(Path(f).read_text())["aggregate"]
            if "score" in agg:
                tasks = " ".join(f"{v:5.1f}" for v in agg["per_task"].values())
                print(f"{Path(f).name:44s} {agg['score']:6.1f} n={agg['n']}  {tasks}")
            else:
                print(f"{Path(f).name:44s} KL {agg.get('kl', float('nan')):.4f} ppl {agg.get('ppl', float('nan')):.2f}")


def best(n: int, pattern: str) -> list[str]:
    """Labels of the ``n`` best run files by score; ties: the simpler setting first (pooling 1, 32 stabilizers,
    the shipped heads)."""
    scores = {}
    for f in glob.glob(pattern):
        run = json.loads(Path(f).read_text())
        scores[run["config"]["method"]["label"]] = run["aggregate"]["score"]
    order = sorted(scores, key=lambda m: (-scores[m], "_p1_" not in m, "_s32" not in m, not m.startswith("ship")))
    return order[:n]


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["-h"]
    if cmd == "candidate" and len(rest) == 4:
        candidate(*rest)
    elif cmd == "table" and rest:
        table(rest)
    elif cmd == "best" and len(rest) == 2:
        print(" ".join(best(int(rest[0]), rest[1])))
    else:
        raise SystemExit(__doc__)
