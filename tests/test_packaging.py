"""A wheel install works without the source tree (issue 16): the shipped checkpoints and recipe configs travel as
data files, and trainkv finds them under <prefix>/share/trainkv."""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path

import pytest

from trainkv import resources
from trainkv.hub import resolve

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_checkpoint_and_config_file_is_a_wheel_data_file():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    packaged = {Path(f).as_posix() for patterns in table.values() for p in patterns for f in glob.glob(str(ROOT / p))}
    packaged = {Path(f).relative_to(ROOT).as_posix() for f in packaged}
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "checkpoints" / "smollm2-135m").rglob("*") if p.is_file()}
    shipped |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert shipped - packaged == set(), "files a wheel would not carry"
    for target, patterns in table.items():  # each lands at the same relative place under share/trainkv
        for p in patterns:
            assert target == "share/trainkv/" + str(Path(p).parent), (target, p)


def test_installed_data_files_are_found_when_there_is_no_source_tree(tmp_path, monkeypatch):
    data = tmp_path / "share" / "trainkv"
    (data / "checkpoints" / "smollm2-135m" / "attention_gate").mkdir(parents=True)
    (data / "checkpoints" / "smollm2-135m" / "attention_gate" / "config.json").write_text("{}")
    (data / "configs" / "recipes").mkdir(parents=True)
    (data / "configs" / "recipes" / "x.yaml").write_text("a: 1\n")
    monkeypatch.setattr(resources, "SOURCE_ROOT", tmp_path / "no-checkout")
    monkeypatch.setattr(resources, "DATA_ROOT", data)
    monkeypatch.chdir(tmp_path)
    assert resources.find_resource("configs/recipes/x.yaml") == data / "configs" / "recipes" / "x.yaml"
    assert resolve.find_local_checkpoint("smollm2-135m/attention_gate") == \
        data / "checkpoints" / "smollm2-135m" / "attention_gate"
    with pytest.raises(FileNotFoundError, match="configs/nope.yaml is not installed .*reinstall trainkv"):
        resources.find_resource("configs/nope.yaml")
