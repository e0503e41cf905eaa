"""kill -9 and power cuts: a run killed at random moments and resumed each time ends with an
unbroken run's losses and weights (bench/kill_anywhere.py, short and with a fixed seed),
and a checkpoint is on the disk before it is marked complete and before an older one is
deleted (the order a power cut needs, which no kill shows: the page cache outlives a
process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rigtrain import files
from rigtrain.train import checkpoints

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_killed_at_random_moments_a_run_ends_as_if_never_killed(demo_data):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "kill_anywhere.py"),
            "--seed",
            "3",
            "--kills",
            "5",
            "--steps",
            "40",
            "--ckpt-every",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problems"] == [] and result.returncode == 0, (report, result.stderr[-2000:])
    assert report["kills"] >= 3  # a kill that comes after the run finished is not one


def _tag(ckpt: Path, step: int) -> Path:
    tag = ckpt / checkpoints.tag_for(step)
    (tag / "zero").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (tag / "zero" / "optim_states.pt").write_bytes(os.urandom(8192))
    return tag


def test_a_checkpoint_is_on_disk_before_it_is_marked_complete_and_older_ones_go(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    old = _tag(ckpt, 10)
    checkpoints.mark_complete(old, 10)
    new = _tag(ckpt, 20)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    def rmtree(path, **kwargs):
        events.append(("delete", str(path)))
        assert not (Path(path) / checkpoints.COMPLETE).exists(), "complete.json outlived a pruned tag's first file"

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", rmtree)
    checkpoints.mark_complete(new, 20)
    assert checkpoints.prune(ckpt, keep=1) == [old.name]

    def when(kind: str, path: Path) -> int:
        return events.index((kind, str(path)))

    def last(kind: str, path: Path) -> int:
        return len(events) - 1 - events[::-1].index((kind, str(path)))

    marked = when("rename", new / checkpoints.COMPLETE)
    for path in [*new.rglob("*"), new, ckpt]:  # every file and folder entry of the tag first
        if path.name != checkpoints.COMPLETE:
            assert when("fsync", path) < marked, path
    assert any(kind == "fsync" and ".tmp" in name for kind, name in events[:marked])  # complete.json's bytes
    assert when("delete", old) > last("fsync", new) > marked  # the rename itself on disk, then the prune
    assert checkpoints.newest_good(ckpt) == (20, new.name)
