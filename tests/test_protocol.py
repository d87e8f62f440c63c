"""The evaluation protocol (docs/protocol.md) as checks on the repository's files:

* every ``checkpoints/*/*/selection.json`` read dev-split run files only, those files are unchanged, and the rule,
  re-applied to them, gives the recorded choice (a synthetic record shows that a test-split file is caught);
* every test-split run file in ``results/`` postdates the test seed's declaration and the selection of the checkpoint
  it evaluates (the choice was recorded before the test cells existed);
* the held-out-family recipes are the shipped recipes minus one family, and no other family's TRAIN samples carry
  the held-out family's templates or formats.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from trainkv.data.tasks import HELD_OUT_FAMILY, TASK_FAMILIES, TASKS, TEMPLATES, family_tasks, training_tasks_without
from trainkv.eval.selection import SelectionError, check_selection, select
from trainkv.eval.spec import DEV_SEEDS, TEST_SEED, TEST_SEED_DECLARED, record_split

ROOT = Path(__file__).resolve().parents[1]
RESULT_DIRS = [ROOT / "results", ROOT / "benchmarks" / "results"]


def run_files() -> list[Path]:
    return sorted(p for d in RESULT_DIRS if d.is_dir() for p in d.rglob("*.json")
                  if p.parent.name in ("runs", "quality"))


def selections() -> list[Path]:
    return sorted((ROOT / "checkpoints").glob("*/*/selection.json"))


# ---------------------------------------------------------------------------------------------------------
# the repository's files
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", selections(), ids=lambda p: str(p.relative_to(ROOT)))
def test_recorded_choices_read_dev_runs_only_and_follow_the_rule(path):
    assert check_selection(path, ROOT) == []


def test_test_runs_postdate_the_seed_and_the_choices():
    chosen = {}
    for path in selections():
        rec = json.loads(path.read_text())
        if rec.get("weights_sha256"):
            chosen[rec["weights_sha256"]] = (rec["date"], path)
    problems = []
    for path in run_files():
        rec = json.loads(path.read_text())
        if record_split(rec) != "test":
            continue
        date = rec.get("date", "")
        if date[:10] < TEST_SEED_DECLARED:
            problems.append(f"{path}: a test-seed run dated {date}, before the test seed was declared")
        sha = rec["config"].get("method", {}).get("weights_sha256")
        if sha in chosen and date < chosen[sha][0]:
            problems.append(f"{path}: test run of {sha} dated {date}, before its choice ({chosen[sha][1]})")
    assert problems == []


def test_committed_runs_know_their_split():
    """Pre-protocol files are ad hoc (none drew the test seed); protocol files say dev or test."""
    for path in run_files():
        rec = json.loads(path.read_text())
        split = record_split(rec)
        assert split in ("dev", "test", "adhoc"), path
        if "eval_split" not in rec.get("config", {}):
            assert split == "adhoc", f"{path}: a pre-protocol file with test-seed samples"


def test_seeds_are_disjoint():
    assert TEST_SEED not in DEV_SEEDS and len(set(DEV_SEEDS)) == len(DEV_SEEDS) >= 3
    assert 1234 not in DEV_SEEDS and TEST_SEED != 1234  # the seed that steered the pre-protocol choices


# ---------------------------------------------------------------------------------------------------------
# the rule and its checks, on synthetic run files
# ---------------------------------------------------------------------------------------------------------
def _run(label: str, scores: dict[str, list[float]], seeds, split: str, length=1024, keep=0.125, date="2026-12-01T00:00:00+00:00",
         method=None, checkpoint=None, overrides=None):
    results = [{"task": t, "seed": s, "index": i, "score": float(v), "references": [f"{t}{s}{i}"]}
               for t, vs in scores.items() for s in seeds for i, v in enumerate(vs)]
    full = keep is None
    return {"kind": "tasks", "date": date, "eval_split": split,
            "config": {"context_length": length, "seed": list(seeds), "seeds": list(seeds), "eval_split": split,
                       "method": {"label": label, "method": method or ("full" if full else "retaining_head"),
                                  "checkpoint": checkpoint, "overrides": overrides or {}, "weights_sha256": "ab" * 8},
                       "budget": {"spec": keep, "label": "full" if full else f"r{keep:g}"}},
            "results": results}


def _write(folder: Path, rec: dict) -> None:
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    cfg = rec["config"]
    name = f"{cfg['method']['label'].replace(':', '-').replace(',', '-')}__L{cfg['context_length']}__{cfg['budget']['label']}"
    (folder / "runs" / f"{name}.json").write_text(json.dumps(rec))


@pytest.fixture
def dev_tree(tmp_path):
    dev, fam = tmp_path / "results" / "dev", tmp_path / "results" / "dev_family"
    seeds = list(DEV_SEEDS)
    for L in (1024, 2048):
        _write(dev, _run("full", {"niah": [100, 100, 0, 100], "cwe": [50, 50, 50, 0]}, seeds, "dev", L, None))
        # "a" (the default) holds everything on the tasks; "b" is better on niah; twins decide on the family
        _write(dev, _run("h:p=1", {"niah": [100, 100, 0, 100], "cwe": [50, 0, 50, 0]}, seeds, "dev", L, checkpoint="c",
                         overrides={"p": 1}))
        _write(dev, _run("h:p=9", {"niah": [100, 100, 100, 100], "cwe": [50, 50, 50, 0]}, seeds, "dev", L, checkpoint="c",
                         overrides={"p": 9}))
        _write(fam, _run("t:p=1", {"cwe": [50, 50, 50, 0]}, seeds, "dev", L))
        _write(fam, _run("t:p=9", {"cwe": [0, 0, 50, 0]}, seeds, "dev", L))
    return tmp_path, dev, fam


def test_select_applies_the_rule_and_the_check_accepts_it(dev_tree):
    root, dev, fam = dev_tree
    cells = [(1024, "r0.125"), (2048, "r0.125")]
    plain = select([dev], ["h:p=1", "h:p=9"], cells, root=root)
    assert plain["chosen"] == "h:p=9" and plain["chosen_settings"] == {"p": 9}
    scores = {c["label"]: c["score"] for c in plain["candidates"]}
    assert scores["h:p=1"] == pytest.approx(100 * (75 + 25) / (75 + 37.5)) and scores["h:p=9"] > 100
    rec = select([dev], ["h:p=1", "h:p=9"], cells, family="aggregation", family_tasks=["cwe"], family_dev=[fam],
                 twins=["t:p=1", "t:p=9"], root=root)
    by = {c["label"]: c for c in rec["candidates"]}
    assert by["h:p=9"]["family_score"] == pytest.approx(100 * 12.5 / 37.5)
    assert rec["chosen"] == "h:p=1"  # generalizes: min(task, family) is higher
    assert all(not c["file"].startswith("/") for c in by["h:p=1"]["cells"])  # paths relative to the root
    path = root / "checkpoints" / "m" / "h" / "selection.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    assert check_selection(path, root) == []
    # an exact tie goes to the earlier-declared candidate
    for f in (dev / "runs").glob("h-p=9__*.json"):
        data = json.loads(f.read_text())
        data["config"]["method"]["label"] = "h:p=7"
        (f.parent / f.name.replace("p=9", "p=7")).write_text(json.dumps(data))
    assert select([dev], ["h:p=7", "h:p=9"], cells, root=root)["chosen"] == "h:p=7"
    assert select([dev], ["h:p=9", "h:p=7"], cells, root=root)["chosen"] == "h:p=9"


def test_check_catches_test_files_tampering_and_a_wrong_winner(dev_tree):
    root, dev, fam = dev_tree
    cells = [(1024, "r0.125"), (2048, "r0.125")]
    rec = select([dev], ["h:p=1", "h:p=9"], cells, root=root)
    path = root / "selection.json"
    # a wrong winner
    path.write_text(json.dumps({**rec, "chosen": "h:p=1"}))
    assert any("the rule on the same files gives 'h:p=9'" in p for p in check_selection(path, root))
    # a run file changed after the choice
    path.write_text(json.dumps(rec))
    target = root / rec["candidates"][0]["cells"][0]["file"]
    data = json.loads(target.read_text())
    data["results"][0]["score"] = 0.0
    target.write_text(json.dumps(data))
    assert any("changed since the choice" in p for p in check_selection(path, root))
    # a test-split file among the ones a choice read
    data["config"]["seeds"] = data["config"]["seed"] = [TEST_SEED]
    data["eval_split"] = data["config"]["eval_split"] = "test"
    for r in data["results"]:
        r["seed"] = TEST_SEED
    target.write_text(json.dumps(data))
    assert any("test-split run file" in p for p in check_selection(path, root))
    # and select itself refuses to read one
    with pytest.raises(SelectionError, match="test-split run"):
        select([dev], ["h:p=1", "h:p=9"], cells, root=root)
    # ad-hoc files (e.g. the pre-protocol seed 1234) are refused too
    shutil.rmtree(dev)
    _write(dev, _run("full", {"niah": [100]}, [1234], "adhoc", 1024, None))
    with pytest.raises(SelectionError, match="adhoc-split run"):
        select([dev], ["h:p=1"], cells, root=root)


# ---------------------------------------------------------------------------------------------------------
# the held-out family
# ---------------------------------------------------------------------------------------------------------
SHIPPED = {"attention_gate_sft_gpu_2k_heldout.yaml": "attention_gate_sft_gpu_2k.yaml",
           "locret_gpu_2k_lp_heldout.yaml": "locret_gpu_2k_lp.yaml"}


@pytest.mark.parametrize("heldout", sorted(SHIPPED))
def test_heldout_recipes_are_the_shipped_ones_minus_one_family(heldout):
    from trainkv.training.config import TrainConfig

    folder = ROOT / "configs" / "recipes" / "smollm2-135m"
    held = TrainConfig.from_yaml(folder / heldout).to_dict()
    ship = TrainConfig.from_yaml(folder / SHIPPED[heldout]).to_dict()
    assert held["data"]["tasks"] == training_tasks_without(HELD_OUT_FAMILY)
    assert ship["data"]["tasks"] is None  # the shipped recipe trains on every task
    assert held["output_dir"] == ship["output_dir"] + "_heldout"
    for d in (held, ship):
        d["data"].pop("tasks")
        d.pop("output_dir")
    assert held == ship
    raw = yaml.safe_load((folder / heldout).read_text())
    assert set(raw["data"]["tasks"]) | set(family_tasks(HELD_OUT_FAMILY)) == set(TASKS)


def test_families_cover_every_task_and_shared_templates_are_held_out_together():
    assert sorted(t for ts in TASK_FAMILIES.values() for t in ts) == sorted(TASKS)
    with pytest.raises(ValueError, match="shares its prompt templates"):
        training_tasks_without("niah_multi")  # niah_single uses the same template table
    for family in ("variable_tracking", "aggregation", "kv_retrieval", "passkey"):
        rest = training_tasks_without(family)
        assert not {id(TEMPLATES[t]) for t in rest} & {id(TEMPLATES[t]) for t in family_tasks(family)}


#: Formats of the held-out family's contexts (cwe: RULER's numbered word list; fwe: the filler token of each split).
SIGNATURES = {"aggregation": [re.compile(r"\b1\. \S+ 2\. \S+ 3\. \S+"), re.compile(r"----|\.\.\.\.")]}


def test_no_training_sample_of_another_family_carries_the_heldout_family(tmp_path):
    import trainkv
    from trainkv.data.tasks import generate_samples

    tok = trainkv.load_tokenizer("smollm2-135m")
    held = family_tasks(HELD_OUT_FAMILY)
    fragments = sorted({f for t in held for split in ("train", "eval") for tpl in TEMPLATES[t][split]
                        for f in tpl.fragments()})
    assert fragments

    def text(samples):
        return "\n".join(f"{s.context}\n{s.question}\n{s.answer_prefix}" for s in samples)

    # the signatures do find the held-out family itself (the check is not vacuous)
    own = text([s for t in held for s in generate_samples(t, tok, 2, 1100, seed=7000, split="train")])
    assert all(sig.search(own) for sig in SIGNATURES[HELD_OUT_FAMILY])
    for task in training_tasks_without(HELD_OUT_FAMILY):
        for seed in (7000, 7002):  # the recipes' data seeds (data.seed 7 -> 7000 + length index)
            body = text(generate_samples(task, tok, 3, 1100, seed=seed, split="train"))
            assert not [f for f in fragments if f in body], task
            assert not [sig.pattern for sig in SIGNATURES[HELD_OUT_FAMILY] if sig.search(body)], task


def test_select_checkpoint_script_on_swept_dev_runs(tmp_path):
    """The GPU script's path on CPU: `Sweep(split="dev")` writes dev runs, scripts/select_checkpoint.py chooses among
    run-time settings (here two SnapKV windows stand in for Locret settings) with a held-out family, and the record
    passes the protocol check. An ad-hoc folder is refused."""
    import importlib.util

    import trainkv
    from test_eval import tiny_model
    from trainkv.eval.runner import Sweep, SweepConfig

    tok = trainkv.load_tokenizer("smollm2-135m")
    model = tiny_model(tok)
    common = dict(model="tiny", keep=[0.25], context_lengths=[160], samples=1, batch_size=3, chunk_size=64,
                  max_new_tokens=2, progress=False, split="dev")
    cands = ["snapkv:window_size=8", "snapkv:window_size=16"]
    Sweep(SweepConfig(methods=["full", *cands], tasks=["niah_single_1", "vt"], output=str(tmp_path / "dev"), **common),
          model=model, tokenizer=tok).run()
    # the twins (the held-out-trained checkpoint under the same settings) are stood in for by the same labels
    Sweep(SweepConfig(methods=["full", *cands], tasks=["passkey"], output=str(tmp_path / "fam"), **common),
          model=model, tokenizer=tok).run()
    spec = importlib.util.spec_from_file_location("select_checkpoint", ROOT / "scripts" / "select_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "checkpoints" / "tiny" / "snapkv" / "selection.json"
    argv = ["--dev", str(tmp_path / "dev"), "--candidates", *cands, "--lengths", "160", "--keep", "1/4",
            "--family", "passkey", "--family-dev", str(tmp_path / "fam"), "--twin-prefix", "snapkv", "--out", str(out),
            "--root", str(tmp_path)]
    assert script.main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["chosen"] in cands and rec["family_tasks"] == ["passkey"] and rec["dev_seeds"] == list(DEV_SEEDS)
    assert rec["candidates"][0]["cells"][0]["file"] == "dev/runs/snapkv-window_size=8__L160__r0.25.json"
    assert "271828" not in out.read_text()  # the test seed appears in no selection record
    assert check_selection(out, tmp_path) == []
    before = out.read_text()
    assert script.main(argv) == 0 and out.read_text() == before  # a rerun keeps the record (and its date)
    other = [a if a != "1/4" else "1/8" for a in argv]
    Sweep(SweepConfig(**{**common, "keep": [0.125]}, methods=cands, tasks=["niah_single_1", "vt"],
                      output=str(tmp_path / "dev")), model=model, tokenizer=tok).run()
    Sweep(SweepConfig(**{**common, "keep": [0.125]}, methods=cands, tasks=["passkey"], output=str(tmp_path / "fam")),
          model=model, tokenizer=tok).run()
    assert script.main(other) == 2 and out.read_text() == before  # another choice is refused without --force
    assert script.main([*other, "--force"]) == 0 and json.loads(out.read_text())["cells"][0]["keep"] == "r0.125"
    assert script.twin_label("locret:pool_kernel=1,stabilizers=32", "locret_ho") == "locret_ho:pool_kernel=1,stabilizers=32"
    Sweep(SweepConfig(**{**common, "split": None, "seed": 1234}, methods=["full", *cands], tasks=["niah_single_1"],
                      output=str(tmp_path / "adhoc")), model=model, tokenizer=tok).run()
    assert script.main([*argv[:1], str(tmp_path / "adhoc"), *argv[2:]]) == 2  # ad hoc: refused
