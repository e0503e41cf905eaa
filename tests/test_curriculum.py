"""Growing a model: `train --init-from` (matching parameters loaded, the rest fresh, the
list saved) and `train --curriculum` (stages in sequence, each from the one before,
resumable at any stage), on a tiny model on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, run_cli

from rigtrain.config import load_config
from rigtrain.errors import UserError
from rigtrain.model import build_model
from rigtrain.train.curriculum import read_curriculum
from rigtrain.train.initializing import load_matching

QUICK = [*TINY_MODEL, "data.workers=0", "eval.during_training=false"]


def _model(*overrides: str):
    config = load_config("demo", overrides=[*TINY_MODEL, *overrides])
    torch.manual_seed(0)
    return build_model(config.model, config.data)


def test_matching_parameters_load_and_the_rest_is_reported():
    two = _model("model.enc_layers=2").state_dict()
    grown = _model("model.enc_layers=3")
    report = load_matching(grown, two)
    assert report["loaded"] and not report["dropped"] and not report["shape_mismatched"]
    assert report["new"] and all(".2." in name for name in report["new"])  # only the third layer is new
    for name in report["loaded"]:
        assert torch.equal(grown.state_dict()[name], two[name])
    shrunk = load_matching(_model("model.enc_layers=1"), two)
    assert shrunk["dropped"] and all(".1." in name for name in shrunk["dropped"]) and not shrunk["new"]
    wider = load_matching(_model("model.d_model=48"), two)
    assert wider["shape_mismatched"] and "in the checkpoint" in wider["shape_mismatched"][0]


def _init_record(run: Path) -> dict:
    return json.loads((run / "init_from.json").read_text())


@pytest.mark.slow
def test_init_from_grows_and_shrinks_the_demo_model(tmp_path):
    source = tmp_path / "source"
    first = run_cli("train", "--out", str(source), "--steps", "2", "--set", *QUICK, "model.enc_layers=2")
    assert first.returncode == 0, first.stderr[-2000:]
    grown = tmp_path / "grown"
    result = run_cli(
        "train", "--out", str(grown), "--steps", "1", "--init-from", str(source), "--set", *QUICK, "model.enc_layers=3"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = _init_record(grown)
    assert record["step"] == 2 and record["loaded"] and record["new"] and not record["dropped"]
    assert "initialised from" in result.stdout and json.loads((grown / "config.json").read_text())["init_from"]
    shrunk = tmp_path / "shrunk"
    result = run_cli(
        "train", "--out", str(shrunk), "--steps", "1", "--init-from", str(source), "--set", *QUICK, "model.enc_layers=1"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert _init_record(shrunk)["dropped"] and not _init_record(shrunk)["new"]
    # bad sources are one line and exit 2, before anything trains
    empty = run_cli("train", "--out", str(tmp_path / "x"), "--init-from", str(tmp_path), "--steps", "1")
    assert empty.returncode == 2 and "--init-from" in empty.stderr and "Traceback" not in empty.stderr
    both = run_cli("train", "--out", str(grown), "--resume", "--init-from", str(source))
    assert both.returncode == 2 and "--init-from starts a new run" in both.stderr


CURRICULUM = """
[[stage]]
name = "one-layer"
steps = 2
set = ["model.enc_layers=1"]

[[stage]]
name = "two-layers"
steps = {steps}
set = ["model.enc_layers=2"]
"""


@pytest.mark.slow
def test_a_curriculum_runs_its_stages_in_order_and_resumes(tmp_path):
    spec = tmp_path / "curriculum.toml"
    spec.write_text(CURRICULUM.format(steps=2))
    out = tmp_path / "grow"
    result = run_cli("train", "--curriculum", str(spec), "--out", str(out), "--set", *QUICK)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = out / "stage-1-one-layer", out / "stage-2-two-layers"
    config = json.loads((second / "config.json").read_text())
    assert config["config"]["model"]["enc_layers"] == 2 and config["init_from"]["run_dir"] == str(first.resolve())
    assert _init_record(second)["new"] and _init_record(second)["loaded"]
    again = run_cli("train", "--curriculum", str(spec), "--out", str(out), "--set", *QUICK)
    assert again.returncode == 2 and "--resume" in again.stderr
    # a longer second stage: --resume skips the first and continues the second from its checkpoint
    spec.write_text(CURRICULUM.format(steps=3))
    resumed = run_cli("train", "--curriculum", str(spec), "--out", str(out), "--resume", "--set", *QUICK)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "stage 1 (one-layer) is done" in resumed.stdout and "resuming at step 2" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


@pytest.mark.parametrize(
    "text, named",
    [
        ("[[stage]]\nname = 'a'\nsteps = 0\n", "steps"),
        ("[[stage]]\nname = 'a'\nsteps = 5\nset = ['model.nope=1']\n", "model.nope"),
        ("[[stage]]\nname = 'a'\nsteps = 5\nlr = 1\n", "lr"),
        ("preset = 'demo'\n", "no stages"),
        ("[[stage]]\nname = 'a b'\nsteps = 5\n", "name"),
        ("[[stage", "not valid TOML"),
    ],
)
def test_bad_curriculum_files_name_the_stage_and_field(tmp_path, text, named):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=named):
        read_curriculum(path)
