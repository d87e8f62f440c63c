"""Apply the selection rule of docs/protocol.md to dev-split run files and record the choice in ``selection.json``.

    python scripts/select_checkpoint.py --dev results/evidence/dev \
        --candidates "locret:pool_kernel=1,stabilizers=32" "locret:pool_kernel=9,stabilizers=32" ... \
        --lengths 1024 2048 --keep 1/8 \
        --family aggregation --family-dev results/evidence/dev_family --twin-prefix locret_ho \
        --out checkpoints/smollm2-135m/retaining_head/selection.json

Candidates are method labels of the dev run files (``NAME`` or ``NAME:settings`` of ``trainkv eval --checkpoint
NAME=PATH``), in the declared order: the first one is the default and wins exact ties. A candidate's twin (its
held-out-trained counterpart with the same run-time settings) is ``--twin-prefix`` plus the candidate's settings
(``locret:pool_kernel=1,...`` -> ``locret_ho:pool_kernel=1,...``), or ``--twins`` one by one.

Prints the chosen label (last line, alone) so that a script can run the test cells of exactly that candidate:
``chosen=$(python scripts/select_checkpoint.py ... | tail -1)``. Refuses any run file that is not dev-split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainkv.data.tasks import family_tasks
from trainkv.eval.selection import SelectionError, parse_cells, select, write_selection

ROOT = Path(__file__).resolve().parents[1]


def _same(old: dict, new: dict) -> bool:
    """The same choice from the same files (everything but the date and the command line)."""
    def strip(rec: dict) -> dict:
        return {k: v for k, v in rec.items() if k not in ("date", "command")}
    return json.dumps(strip(old), sort_keys=True) == json.dumps(strip(new), sort_keys=True)


def twin_label(candidate: str, prefix: str) -> str:
    _, colon, settings = candidate.partition(":")
    return f"{prefix}{colon}{settings}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--dev", nargs="+", required=True, help="dev output folder(s) of trainkv eval --split dev")
    p.add_argument("--candidates", nargs="+", required=True, help="method labels, in declared order (first = default)")
    p.add_argument("--lengths", nargs="+", type=int, required=True, help="context lengths of the deciding cells")
    p.add_argument("--keep", nargs="+", required=True, help="keeps of the deciding cells (1/8 ...)")
    p.add_argument("--family", help="held-out family (trainkv.data.tasks.TASK_FAMILIES) of the generalization check")
    p.add_argument("--family-dev", nargs="*", default=[], help="dev folder(s) of the twins' family runs")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--twin-prefix", help="twin label = PREFIX + the candidate's ':settings'")
    g.add_argument("--twins", nargs="+", help="twin labels, one per candidate")
    p.add_argument("--out", required=True, help="where to write selection.json (checkpoints/<alias>/<method>/)")
    p.add_argument("--root", default=str(ROOT), help="paths in the record are relative to this folder")
    p.add_argument("--force", action="store_true", help="replace a selection.json that records another choice")
    args = p.parse_args(argv)

    twins = None
    if args.family:
        twins = args.twins or ([twin_label(c, args.twin_prefix) for c in args.candidates] if args.twin_prefix else None)
        if not twins:
            p.error("--family needs --twin-prefix or --twins")
    try:
        record = select(args.dev, args.candidates, parse_cells(args.lengths, args.keep), family=args.family,
                        family_tasks=family_tasks(args.family) if args.family else None, family_dev=args.family_dev,
                        twins=twins, root=args.root)
    except (SelectionError, KeyError) as e:
        print(f"select_checkpoint: {e}", file=sys.stderr)
        return 2
    record["command"] = "python scripts/select_checkpoint.py " + " ".join(
        f'"{a}"' if any(c in a for c in " :,") else a for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    if out.exists():  # a rerun (e.g. a resumed GPU call) keeps the recorded choice and its date
        old = json.loads(out.read_text())
        if _same(old, record):
            print(f"{out}: the same choice is already recorded ({old['date']}); kept", file=sys.stderr)
            print(old["chosen"])
            return 0
        if not args.force:
            print(f"select_checkpoint: {out} records another choice ({old.get('chosen')!r}, {old.get('date')}); "
                  "a new choice needs --force (and a new test seed if test cells of the old one were read)",
                  file=sys.stderr)
            return 2
    write_selection(record, out)
    for c in record["candidates"]:
        fam = f"  family {c['family_score']:6.1f}" if "family_score" in c else ""
        print(f"{c['label']:48s} tasks {c['task_score']:6.1f}{fam}  score {c['score']:6.1f}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    print(record["chosen"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
