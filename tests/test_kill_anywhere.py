"""kill -9 and power cuts: a run killed at random moments and resumed each time ends with an
unbroken run's losses and weights, and a `data prepare` killed and run again with a
prepare's files (bench/kill_anywhere.py, short and with a fixed seed); a checkpoint is on
the disk before it is marked complete and before an older one is deleted (the order a
power cut needs, which no kill shows: the page cache outlives a process); the workers of
a killed prepare die with it; one prepare writes into a folder at a time."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from rigtrain import files
from rigtrain.data.shards import PREPARE_LOG
from rigtrain.train import checkpoints

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from kill_anywhere import prepared_files  # noqa: E402  (a benchmark's helper, not a package's)


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
            "--videos",
            "64",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["train"]["problems"] == [] and report["prepare"]["problems"] == [], report
    assert result.returncode == 0, result.stderr[-2000:]
    assert report["train"]["kills"] >= 3  # a kill that comes after the run finished is not one
    assert report["prepare"]["kills"] >= 5


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


ORPHANS = """
import sys, time
from rigtrain.data.processes import in_order

def slow(job):
    time.sleep(60)

if __name__ == "__main__":
    for _ in in_order(slow, list(range(4)), 2, crashed=lambda job: None):
        pass
"""


@pytest.mark.parametrize("watch", ["pidfd", "polling"])
def test_the_workers_of_a_killed_prepare_die_with_it(tmp_path, watch):
    """They waited for ever, children of init, before: each holds both ends of the pipe it
    reads its jobs from, so it never sees an end of file (and they held the command's stdout,
    so a pipeline after it never ended). A worker watches its parent through a pidfd, or,
    where there is none (Linux before 5.3, other systems), looks at its process id once a
    second."""
    import psutil

    script = tmp_path / "decode.py"
    # the script is imported again in each worker (as __mp_main__): a system without pidfds
    no_pidfd = "import os\nif hasattr(os, 'pidfd_open'):\n    del os.pidfd_open\n"
    script.write_text((no_pidfd if watch == "polling" else "") + ORPHANS)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60

    def command_line(process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:  # gone, or a zombie
            return ""

    def forkserver_family() -> list:
        return [p for p in psutil.Process(parent.pid).children(recursive=True) if "forkserver" in command_line(p)]

    while len(forkserver_family()) < 3:  # the forkserver and two workers
        assert time.monotonic() < deadline and parent.poll() is None, "the workers never started"
        time.sleep(0.1)
    time.sleep(0.5)  # the workers have taken their jobs
    family = psutil.Process(parent.pid).children(recursive=True)
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    alive = [p for p in alive if command_line(p)]  # a zombie has ended, only not been reaped yet
    left = [command_line(p)[:80] for p in alive]
    for orphan in alive:
        orphan.kill()
    assert not alive, left
    assert parent.stdout.read() == b""  # the pipe's end of file came: no one holds it


def test_one_prepare_at_a_time_and_a_users_folder_untouched(tmp_path):
    from filelock import FileLock

    from rigtrain.config import load_config
    from rigtrain.data.prepare import prepare
    from rigtrain.data.shards import PREPARE_JOURNAL, PREPARE_LOCK
    from rigtrain.data.synth import synthesize
    from rigtrain.errors import UserError

    src = tmp_path / "world"
    synthesize(src, videos=2, seed=1)
    data = load_config("demo").data
    out = tmp_path / "shards"
    out.mkdir()
    (out / f"{PREPARE_JOURNAL}.tmp4242").write_text("{")  # a prepare killed while writing its first journal
    with FileLock(str(out / PREPARE_LOCK), timeout=0):  # another prepare at work
        with pytest.raises(UserError, match="another `rigtrain data prepare` is writing into"):
            prepare(src, out, data)
    index = prepare(src, out, data)  # the leftover is not the user's: the folder counts as empty
    assert index["clips"] > 0 and not list(out.glob("*.tmp*"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not an empty folder"):
        prepare(src, mine, data)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # not even a lock file


def _hear_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


# A process group of its own, to send it a Ctrl-C as a terminal does, and the default
# actions of SIGINT and SIGHUP restored: a shell starts a background job (`bash
# setup/test.sh &`) with SIGINT ignored, `nohup` ignores SIGHUP, children inherit that, and
# Python then never raises KeyboardInterrupt (rigtrain, rightly, trains on through SIGHUP)
AS_IN_A_TERMINAL = {"start_new_session": True, "preexec_fn": _hear_ctrl_c}


SLOW_JOBS = """
import signal, sys, time
from rigtrain.data.processes import in_order
from rigtrain.errors import StoppedBySignal

def slow(job):
    time.sleep(120)

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, StoppedBySignal.raise_it)  # as `rigtrain data prepare` does
    print("started", flush=True)
    try:
        for _ in in_order(slow, list(range(4)), 2, crashed=lambda job: None):
            pass
    except KeyboardInterrupt:
        print("stopped", flush=True)
"""


def test_a_stop_signal_does_not_wait_for_the_videos_in_flight(tmp_path):
    """The pool's own exit waits for every job in flight (an hour of video decodes for
    minutes); a stopping prepare ends its workers instead."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_JOBS)
    process = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "started"
    time.sleep(3)  # the workers have their jobs
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=100)
    assert out.strip() == "stopped" and time.monotonic() - stopped < 20


@pytest.mark.parametrize("how", ["ctrl-c", "hangup"])
def test_a_stopped_prepare_is_one_line_and_the_same_command_finishes_it(tmp_path, how):
    """Ctrl-C, and a closed terminal (SIGHUP to the whole process group, workers included;
    SIGTERM takes the same handler, test_a_stop_signal_does_not_wait_for_the_videos_in_flight)."""
    from rigtrain.data.synth import synthesize

    settings = ["--set", "data.shard_clips=16", "data.frame_size=160,160", "data.fps=16"]
    for videos in (48, 96, 192):  # more when a busy machine let the prepare finish before the signal
        src, out = tmp_path / f"world-{videos}", tmp_path / f"stopped-{videos}"
        synthesize(src, videos=videos, seed=2)
        command = [sys.executable, "-m", "rigtrain", "data", "prepare", str(src), str(out), "--workers", "2", *settings]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **AS_IN_A_TERMINAL
        )
        while f"4/{videos} videos" not in process.stdout.readline():  # three shards are written
            assert process.poll() is None
        # a terminal sends both to the whole process group
        os.killpg(process.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGHUP)
        _, err = process.communicate(timeout=60)
        if process.returncode != 0:
            break
    else:
        pytest.fail("every prepare finished before the signal came")
    lines = [line for line in err.splitlines() if line.strip() and "[WARNING]" not in line]
    stopped = "interrupted" if how == "ctrl-c" else "stopped by SIGHUP"
    assert process.returncode == (130 if how == "ctrl-c" else 129), err
    assert lines == [f"rigtrain: {stopped}; the same command again goes on after its last complete shard"], err
    log = (out / PREPARE_LOG).read_text().splitlines()  # what it said, for one left alone
    assert log[0].startswith("=== ") and f": {shlex.join(['rigtrain', *command[3:]])} (process " in log[0]
    assert f"4/{videos} videos" in "\n".join(log) and log[-1] == lines[0]
    early = run_cli("train", "--data", str(out), "--steps", "1")  # before it was finished
    assert early.returncode == 2 and early.stderr.splitlines()[-1] == (
        f"rigtrain: error: --data {out}: {out} is a `rigtrain data prepare` that was stopped before it finished; "
        f"run it again to finish it: rigtrain data prepare {src.resolve()} {out} (with the same --preset and --set)"
    ), early.stderr
    again = run_cli("data", "prepare", str(src), str(out), *settings)
    assert again.returncode == 0 and "continuing an interrupted prepare" in again.stdout, again.stderr
    log = (out / PREPARE_LOG).read_text().splitlines()[len(log) :]  # the next one's appended
    assert log[0].startswith("=== ") and "continuing an interrupted prepare" in log[1]
    assert log[-1] == again.stdout.splitlines()[-1] and log[-1].startswith("prepared ")
    straight = run_cli("data", "prepare", str(src), str(tmp_path / "straight"), *settings)
    assert straight.returncode == 0, straight.stderr
    assert prepared_files(out) == prepared_files(tmp_path / "straight")


BIG_RESULTS = """
from rigtrain.data.processes import in_order

def big(job):
    return bytes(32 << 20)  # a result that takes a while to go through a pipe

if __name__ == "__main__":
    print("started", flush=True)
    try:
        for _ in in_order(big, list(range(1000)), 2, crashed=lambda job: None):
            pass
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def test_a_ctrl_c_while_a_worker_sends_its_result_does_not_hang(tmp_path):
    """A Ctrl-C reaches every process of the group; a worker it ended half-way through
    sending a result left the pool's reading thread waiting for the rest for ever (8 of 10
    such Ctrl-Cs hung before results went through files)."""
    script = tmp_path / "big.py"
    script.write_text(BIG_RESULTS)
    for delay in (0.5, 0.8, 1.1, 1.4):
        process = subprocess.Popen(
            [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True, **AS_IN_A_TERMINAL
        )
        assert process.stdout.readline().strip() == "started"
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise AssertionError(f"a Ctrl-C {delay} s in hung the pool") from None
        assert out.strip() == "interrupted"


def test_a_filesystem_that_cannot_flush_folders_still_saves(tmp_path, monkeypatch):
    """A Windows drive under WSL2 and some FUSE and network filesystems refuse fsync on a
    folder (EINVAL): the checkpoint is still written and marked complete. A disk that is
    full when flushing is still an error (the save's own full-disk line reports it)."""
    import errno

    real_fsync = os.fsync

    def refuses_folders(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", refuses_folders)
    tag = _tag(tmp_path / "checkpoints", 5)
    checkpoints.mark_complete(tag, 5)
    assert checkpoints.newest_good(tmp_path / "checkpoints") == (5, tag.name)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        checkpoints.mark_complete(_tag(tmp_path / "checkpoints", 6), 6)
