"""The `trainkv` command (issue 16): it never runs what was not asked, and every error is one line naming the flag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import trainkv
from runtime_helpers import env_for_subprocess
from trainkv.cli import build_parser, main
from trainkv.cli.args import CLIError
from trainkv.cli.check import matches
from trainkv.cli.demo import MARKER, fresh_output
from trainkv.cli.generate import checkpoint_for
from trainkv.hub.format import CheckpointNotFoundError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "smollm2-135m"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainkv", *args], capture_output=True, text=True,
                          env=env_for_subprocess(), cwd=ROOT, timeout=120)


# --- which method runs ----------------------------------------------------------------------------------------
def test_a_method_name_typo_is_refused_with_a_suggestion():
    out = run_cli("generate", "--method", "snapkvv", "--prompt", "hi")
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()  # one line, no traceback
    assert "--method" in line and "'snapkvv'" in line and "did you mean 'snapkv'" in line


def test_the_method_and_checkpoint_rules():
    model = "smollm2-135m"
    assert checkpoint_for(model, None, None) == model  # nothing asked: the model's default shipped gates
    assert checkpoint_for(model, "snapkv", None) is None  # training-free: no checkpoint
    assert checkpoint_for(model, "retaining_head", None) == "smollm2-135m/retaining_head"  # not attention_gate
    rh = str(SHIPPED / "retaining_head")
    assert checkpoint_for(model, None, rh) == rh  # a checkpoint alone runs its own method
    assert checkpoint_for(model, "retaining_head", rh) == rh
    with pytest.raises(CLIError, match=r"--method attention_gate does not match --checkpoint .*retaining_head'"):
        checkpoint_for(model, "attention_gate", rh)
    with pytest.raises(CLIError, match=r"--method snapkv does not match"):
        checkpoint_for(model, "snapkv", rh)  # a training-free method with a checkpoint is a mismatch too
    with pytest.raises(CLIError, match="--checkpoint 'no/such/dir'"):
        checkpoint_for(model, None, "no/such/dir")


def test_a_trainable_method_without_a_shipped_checkpoint_fails_naming_where_it_looked():
    out = run_cli("generate", "--model", "llama3.1-8b", "--method", "retaining_head", "--prompt", "hi")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "--method retaining_head" in line and "llama3.1-8b/retaining_head" in line and "--checkpoint" in line


# --- one-line errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, flag, given", [
    (["generate", "--budget", "0", "--prompt", "x"], "--budget", "'0'"),
    (["generate", "--budget", "-5", "--prompt", "x"], "--budget", "'-5'"),
    (["generate", "--budget", "1.5", "--prompt", "x"], "--budget", "'1.5'"),
    (["generate", "--chunk-size", "0", "--prompt", "x"], "--chunk-size", "'0'"),
    (["eval", "--samples", "0"], "--samples", "'0'"),
    (["eval", "--keep", "0"], "--keep", "'0'"),
    (["check", "--budgets", "2.5", "--prompt", "x"], "--budgets", "'2.5'"),
])
def test_bad_flags_get_one_line_naming_the_flag_and_what_is_accepted(args, flag, given, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert flag in err and given in err and ("use" in err or "known" in err)


def test_eval_budgets_flag_points_to_keep(capsys):
    assert main(["eval", "--budgets", "1/8", "--output", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--budgets is now --keep" in err and "--keep 1/8" in err


def test_errors_raised_inside_a_command_are_one_line_unless_debug(tmp_path, capsys):
    args = ["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trainkv generate: error: --checkpoint")
    with pytest.raises(CLIError):
        main(args + ["--debug"])  # the traceback, on request


def test_empty_prompt_file_and_missing_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["generate", "--method", "snapkv", "--prompt-file", str(empty)]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["generate", "--method", "snapkv", "--prompt-file", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_help_lists_every_command_without_rst():
    text = build_parser().format_help()
    for command in ("demo", "generate", "check", "eval", "push"):
        assert command in text
    assert "``" not in text and "`trainkv" not in text


# --- checkpoint names -----------------------------------------------------------------------------------------
def test_an_unknown_alias_checkpoint_lists_the_local_ones_instead_of_asking_the_hub():
    with pytest.raises(CheckpointNotFoundError) as err:
        trainkv.load_gated("smollm2-135m/nope")
    msg = str(err.value)
    assert "smollm2-135m/attention_gate" in msg and "smollm2-135m/retaining_head" in msg


def test_the_not_found_hint_says_where_recipes_write():
    with pytest.raises(CheckpointNotFoundError, match=r"runs/<alias>/<recipe>/final.*scripts/ship_checkpoint.py"):
        trainkv.hub.resolve_checkpoint("qwen3-8b")


# --- demo and check -------------------------------------------------------------------------------------------
def test_demo_starts_from_an_empty_folder_it_made(tmp_path, capsys):
    out = tmp_path / "demo_output"
    fresh_output(out)
    (out / "eval").mkdir()
    (out / "eval" / "old.json").write_text("{}")
    fresh_output(out)  # a second demo: the first one's results are gone, and it says so
    assert not (out / "eval").exists() and (out / MARKER).is_file()
    assert "removing the earlier demo results" in capsys.readouterr().out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CLIError, match="not made by trainkv demo"):
        fresh_output(mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_check_criterion():
    assert matches("The valve is 7.", "The valve is 7.", None)
    assert matches("the  valve is 7.", "The valve is 7.", None)  # whitespace and case aside
    assert not matches("The valve is 9.", "The valve is 7.", None)
    assert matches("It was valve 7, I think", "anything", "valve 7")
    assert not matches("It was valve 9", "anything", "valve 7")


@pytest.mark.integration
def test_generate_json_prints_only_json_and_check_runs_the_budgets(tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The code word is OSPREY. " + "Filler sentence about the weather. " * 60 + "What is the code word?")
    assert main(["generate", "--method", "snapkv", "--budget", "96", "--prompt-file", str(prompt), "--json",
                 "--max-new-tokens", "3"]) == 0
    report = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    assert report["method"] == "snapkv" and report["checkpoint"] is None and report["eviction"]["budget"] == 96
    assert max(n for row in report["kept_per_layer_head"] for n in row) == 96
    assert main(["check", "--method", "retaining_head", "--prompt-file", str(prompt), "--budgets", "1/2", "1/8",
                 "--max-new-tokens", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "retaining_head" and summary["checkpoint"].endswith("smollm2-135m/retaining_head")
    assert [r["budget"] for r in summary["rows"]] == ["full", 0.5, 0.125]
    full, half, eighth = (max(n for row in r["kept_per_layer_head"] for n in row) for r in summary["rows"])
    assert full == summary["prompt_tokens"] + 2 and eighth < half < full  # the budgets really differ
    assert summary["rows"][0]["matches"]
