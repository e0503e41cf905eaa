"""Damaged checkpoints, on copies of one run trained once for the module: the newest
checkpoint truncated, with flipped bytes or a garbage completion record falls back to the one
before it (for `eval` and `--resume`), and a run with no good checkpoint left is exit 2.
Apart from test_faults.py so that its one shared run does not tie that module's tests to one
pytest-xdist worker."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_faults import TINY, rigtrain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, demo_data):
    run = tmp_path_factory.mktemp("damaged") / "run"
    made = rigtrain(
        "train", "--out", str(run), "--steps", "15", "--set", *TINY, "train.ckpt_every=5", "train.keep_ckpts=3"
    )
    assert made.returncode == 0, made.stderr[-2000:]
    return run


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage-complete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, three_checkpoints, damage):
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    newest = run / "checkpoints" / "step00000015"
    # the optimizer's states, the largest file (in model_states at ZeRO-0, the plan for one process)
    optim = max(newest.rglob("*.pt"), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        with optim.open("r+b") as f:
            f.truncate(optim.stat().st_size // 2)
    elif damage == "flip":
        with optim.open("r+b") as f:
            f.seek(1000)
            f.write(os.urandom(4096))
    else:
        (newest / "complete.json").write_text("{not json")
    scored = rigtrain("eval", str(run), "--json")
    assert scored.returncode == 0 and json.loads(scored.stdout)["step"] == 10
    assert "step00000015 is damaged" in scored.stderr
    resumed = rigtrain("train", "--out", str(run), "--resume", "--steps", "16")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step00000015 is damaged and skipped" in resumed.stdout and "resuming at step 10/16" in resumed.stdout


def test_no_good_checkpoint_left_is_exit_2(tmp_path, three_checkpoints):
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    for tag in (run / "checkpoints").glob("step*"):
        (tag / "complete.json").write_text("[]")
    result = rigtrain("train", "--out", str(run), "--resume")
    assert result.returncode == 2 and "every checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert rigtrain("eval", str(run)).returncode == 2


@pytest.mark.parametrize(
    "record",
    [
        {"step": 15, "files": [1, 2]},
        {"step": 15, "files": {"trainer.json": 5}},
        {"step": 15, "files": {"trainer.json": {"bytes": "12", "xxh3": "ab"}}},
        {"step": "15", "files": {}},
        {"step": True},
        [15],
    ],
)
def test_a_hand_edited_completion_record_is_damage_not_a_traceback(tmp_path, record):
    """complete.json's values are trusted once read: a record out of the shape the save
    writes is a damaged checkpoint, skipped with its reason, like one that is not JSON."""
    from rigtrain.train.checkpoints import complete_tags, newest_good, verify

    tag = tmp_path / "checkpoints" / "step00000015"
    tag.mkdir(parents=True)
    (tag / "trainer.json").write_text("{}")
    (tag / "complete.json").write_text(json.dumps(record))
    assert "cannot be read" in verify(tag)
    assert complete_tags(tmp_path / "checkpoints") == []
    said = []
    assert newest_good(tmp_path / "checkpoints", warn=said.append) is None and "step00000015 is damaged" in said[0]
