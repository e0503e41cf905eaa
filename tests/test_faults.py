"""A run you can leave alone: each fault injected for real into real training processes.
Signals (one and two ranks), the launcher killed, a loss that diverges, --resume with
changes, a full disk, two runs on one folder, a torn metrics line, shards that shrink, and
a list of bad invocations (damaged checkpoints are in test_damaged_checkpoints.py, which
shares one trained run between its tests; the same command twice giving the same losses is
in test_train.py, with resuming)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, run_cli

from rigtrain.errors import UserError
from rigtrain.train import stopping

pytestmark = pytest.mark.slow
# A small model with every part of the real one: steps of a few tens of milliseconds.
TINY = [*TINY_MODEL, "train.micro_batch_size=8"]


def rigtrain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = run_cli(*args, timeout=timeout)
    return result


def losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _hear_stop_signals() -> None:
    """As a command typed at a terminal hears them: a suite run in the background (`bash
    setup/test.sh &` ignores SIGINT) or under nohup (SIGHUP) would otherwise pass the
    ignore on, and rigtrain rightly leaves an ignored signal ignored (stopping.stop_signals)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTSTP):
        signal.signal(signum, signal.SIG_DFL)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rigtrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
        preexec_fn=_hear_stop_signals,
    )


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        path = run / "metrics.jsonl"
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines() if line):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} never came")


def workers_of(run: Path) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"rigtrain.train.worker" in cmdline and str(run.resolve()).encode() in cmdline:
                found.append(int(pid))
    return found


def pause_and_continue(process: subprocess.Popen, run: Path, workers: list[int], timeout: float = 120) -> None:
    """Ctrl-Z (SIGTSTP) to a launcher: it and the workers stop and no step is logged while
    they are; then `fg` (SIGCONT) and the steps go on."""
    import psutil

    ranks = [psutil.Process(pid) for pid in workers]
    process.send_signal(signal.SIGTSTP)
    deadline = time.monotonic() + 30
    while psutil.Process(process.pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.05)
    # SIGSTOP takes effect when a process is next scheduled: a rank may stop a moment after its launcher
    while any(rank.status() != psutil.STATUS_STOPPED for rank in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [rank.status() for rank in ranks] == [psutil.STATUS_STOPPED] * len(ranks)
    paused_at = len(losses(run))
    time.sleep(1.0)
    assert len(losses(run)) == paused_at  # no step while paused
    process.send_signal(signal.SIGCONT)  # what `fg` sends
    wait_for_step(run, max(losses(run)) + 2, process, timeout=timeout)


def complete_steps(run: Path) -> list[int]:
    from rigtrain.train import checkpoints

    return [step for step, _ in checkpoints.complete_tags(run / "checkpoints")]


# -- signals -----------------------------------------------------------------------------------


def test_sigterm_saves_the_step_in_flight_and_resumes_exactly(tmp_path, demo_data):
    common = ["--set", *TINY, "train.log_every=1", "train.ckpt_every=1000", "train.warmup_steps=2"]
    straight = tmp_path / "straight"
    assert rigtrain("train", "--out", str(straight), "--steps", "40", *common).returncode == 0
    run = tmp_path / "stopped"
    process = start("train", "--out", str(run), "--steps", "40", *common)
    wait_for_step(run, 8, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    line = next(line for line in out.splitlines() if "stopped by SIGTERM" in line)
    stopped_at = complete_steps(run)[-1]
    assert f"after step {stopped_at}" in line and "--resume" in line
    logged = max(losses(run))
    assert stopped_at - logged <= 1  # at most the step in flight: logged steps all saved, or the one after
    resumed = rigtrain("train", "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses(straight), losses(run)
    assert [b[s] for s in range(stopped_at + 1, 41)] == [a[s] for s in range(stopped_at + 1, 41)]  # bit for bit


def test_two_ranks_stop_together_on_ctrl_c_and_a_second_signal_stops_at_once(tmp_path, demo_data):
    run = tmp_path / "run"
    process = start("train", "--out", str(run), "--steps", "400", "--set", *TINY, "train.nproc=2", "train.log_every=1")
    wait_for_step(run, 3, process)
    # Ctrl-Z first: the ranks, in sessions of their own, pause with the launcher, and `fg` goes on
    pause_and_continue(process, run, workers_of(run))
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the launcher
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "paused (Ctrl-Z) with the run's 2 other process(es)" in err and f"--out {run} --resume" in err
    assert "paused (Ctrl-Z)" in (run / "train.log").read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "stopped by SIGINT" in out
    step = complete_steps(run)[-1]
    assert (run / "checkpoints" / f"step{step:08d}" / "rng_rank1.pt").is_file()  # both ranks saved that step
    assert workers_of(run) == []

    again = tmp_path / "again"
    process = start(
        "train",
        "--out",
        str(again),
        "--steps",
        "400",
        "--set",
        *TINY,
        "train.nproc=2",
        "train.log_every=1",
        "train.ckpt_every=2",
    )
    wait_for_step(again, 4, process)
    before = complete_steps(again)
    process.send_signal(signal.SIGTERM)
    time.sleep(stopping.SAME_REQUEST_S + 0.1)  # sooner, it is the same request (below)
    if process.poll() is None:  # a tiny run may have saved and stopped by now (a ranks-level test below)
        process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode in (143, -signal.SIGTERM)  # the second may land as the launcher exits
    from rigtrain.train.checkpoints import newest_good, verify

    after = complete_steps(again)  # whatever the second signal cut short, what is complete is whole
    assert after and after[-1] >= before[-1]
    assert all(verify(again / "checkpoints" / f"step{s:08d}") is None for s in after)
    assert newest_good(again / "checkpoints")[0] == after[-1]
    time.sleep(1)
    assert workers_of(again) == []

    # coreutils' `timeout` sends its SIGTERM to the command and to its process group: twice
    # at once is one request, and the run saves the step in flight
    twice = tmp_path / "twice"
    process = start(
        "train", "--out", str(twice), "--steps", "400", "--set", *TINY, "train.nproc=2", "train.log_every=1"
    )
    wait_for_step(twice, 3, process)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopping now" not in err, err[-2000:]
    assert "stopped by SIGTERM" in out and "is complete" in out


# A rank that counts the SIGTERMs it gets and writes the count: it ends after a second one,
# or after 3 s with one
COUNTING_RANK = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
open(os.path.join(sys.argv[1], "ready-" + os.environ["RANK"]), "w").close()
end = time.monotonic() + 3
while time.monotonic() < end and len(got) < 2:
    time.sleep(0.01)
open(os.path.join(sys.argv[1], os.environ["RANK"]), "w").write(str(len(got)))
"""


@pytest.mark.parametrize("gap_s, ranks_get", [(0.0, 1), (0.7, "killed")])
def test_the_launcher_passes_one_request_on_and_kills_on_a_second(tmp_path, capsys, gap_s, ranks_get):
    """Two SIGTERMs at once (coreutils' `timeout`) reach the ranks as one; a second one
    later kills them (SIGKILL, so they write nothing), and the launcher says so for them."""
    import threading

    from rigtrain.train.processes import run_local_ranks

    written_to, run = tmp_path / "written", tmp_path / "run"
    written_to.mkdir()
    before = signal.getsignal(signal.SIGTERM)

    def signal_twice() -> None:
        # once the launcher and both ranks have their handlers (a fixed second was not
        # always enough on a busy machine, and a SIGTERM before would end this process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            signal.getsignal(signal.SIGTERM) in (before, signal.SIG_DFL, signal.SIG_IGN)
            or len(list(written_to.glob("ready-*"))) < 2
        ):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(gap_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_twice, daemon=True).start()
    (run / "checkpoints").mkdir(parents=True)
    command = [sys.executable, "-c", COUNTING_RANK, str(written_to)]
    assert run_local_ranks(command, 2, dict(os.environ), run) == (143, None)
    written = {p.name: p.read_text() for p in written_to.iterdir() if not p.name.startswith("ready-")}
    assert written == ({"0": "1", "1": "1"} if ranks_get == 1 else {}), written
    said = capsys.readouterr().err.splitlines()
    assert said == (
        []
        if ranks_get == 1
        else [
            "rigtrain: second SIGTERM: stopping now; the complete checkpoints are as they were; "
            f"no checkpoint was complete yet; continue with: rigtrain train --out {run} --resume"
        ]
    )


# DeepSpeed's multi-node launcher as run_on_machines sees it: it ends on a second signal
# (its own handler kills the workers); the first goes to the workers through pdsh
DEEPSPEED_RUNNER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
time.sleep(30)
"""


def test_a_second_signal_to_a_multi_node_run_is_said_for_the_workers_it_kills(tmp_path, capsys, monkeypatch):
    import threading

    from rigtrain.train.processes import run_on_machines

    pdsh = tmp_path / "bin" / "pdsh"  # reaches no machine here: the first signal goes nowhere
    pdsh.parent.mkdir()
    pdsh.write_text("#!/bin/sh\nexit 0\n")
    pdsh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{pdsh.parent}:{os.environ['PATH']}")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)

    before = signal.getsignal(signal.SIGTERM)

    def signal_twice() -> None:
        # once run_on_machines has its handler: a SIGTERM before it (a busy machine slow to
        # start the runner) would end this test's own process
        while signal.getsignal(signal.SIGTERM) in (before, signal.SIG_DFL, signal.SIG_IGN):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.7)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_twice, daemon=True).start()
    code = run_on_machines([sys.executable, "-c", DEEPSPEED_RUNNER], run, ["node1", "node2"], dict(os.environ))
    assert code == 143
    assert capsys.readouterr().err.splitlines() == [
        "rigtrain: second SIGTERM: stopping now; the complete checkpoints are as they were; "
        f"no checkpoint was complete yet; continue with: rigtrain train --out {run} --resume"
    ]


# One training process (the launcher's own, or a rank under DeepSpeed's launcher) whose
# step never ends: a first SIGTERM waits for it, a second stops it at once
STOPPED_TWICE = """
import os, signal, sys, time
from pathlib import Path
from rigtrain.terminal import copy_output_to, outlive_the_terminal
from rigtrain.train.stopping import GracefulStop

outlive_the_terminal()
run = Path(sys.argv[1])
with copy_output_to(run / "train.log"):
    stop = GracefulStop(run)
    print("training", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.7)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


def test_a_second_signal_to_one_process_stops_it_at_once_and_says_where_to_go_on(tmp_path):
    """Said on stderr, not through the buffered stream the handler may have interrupted,
    and kept in train.log beside the run's other lines."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000004").mkdir(parents=True)
    (run / "checkpoints" / "step00000004" / "complete.json").write_text(json.dumps({"step": 4}))
    script = tmp_path / "twice.py"
    script.write_text(STOPPED_TWICE)
    done = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True, timeout=60)
    line = (
        "rigtrain: second SIGTERM: stopping now; the complete checkpoints are as they were; "
        f"the last complete checkpoint is step 4; continue with: rigtrain train --out {run} --resume"
    )
    assert done.returncode == 143 and done.stderr.splitlines()[-1:] == [line], done.stderr
    assert (run / "train.log").read_text().splitlines() == ["training", line]


def test_the_same_stop_signal_at_once_is_one_request(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    requests = stopping.StopRequests()
    assert requests.add(signal.SIGTERM) and not requests.add(signal.SIGTERM)  # `timeout`'s two
    clock[0] += stopping.SAME_REQUEST_S / 2
    assert not requests.add(signal.SIGINT)
    clock[0] += stopping.SAME_REQUEST_S
    assert requests.add(signal.SIGINT) and requests.signals == [signal.SIGTERM, signal.SIGINT]


def test_a_run_started_with_ctrl_c_ignored_trains_on_through_it_and_stops_on_sigterm(tmp_path, demo_data):
    """`rigtrain train &` in a shell script ignores SIGINT in the run, so that a Ctrl-C meant
    for the script (which reaches its whole process group) leaves the run alone, as Python
    leaves it alone; a stop signal the run still hears (SIGTERM) stops it as ever."""
    run = tmp_path / "run"

    def as_a_scripts_background_job():
        _hear_stop_signals()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.setpgid(0, 0)  # a group of its own, to send it a Ctrl-C as a terminal does

    process = subprocess.Popen(
        [sys.executable, "-m", "rigtrain", "train", "--out", str(run), "--steps", "400", "--set", *TINY,
         "train.log_every=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_a_scripts_background_job,
    )  # fmt: skip
    wait_for_step(run, 2, process)
    os.killpg(process.pid, signal.SIGINT)
    heard_at = max(losses(run))
    wait_for_step(run, heard_at + 3, process)  # trains on
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in out and "SIGINT" not in out + err


def test_no_worker_outlives_a_killed_launcher(tmp_path, demo_data):
    run = tmp_path / "run"
    process = start("train", "--out", str(run), "--steps", "4000", "--set", *TINY, "train.nproc=2", "train.log_every=1")
    wait_for_step(run, 2, process)
    assert len(workers_of(run)) == 2
    process.kill()
    process.communicate()
    deadline = time.monotonic() + 5
    while workers_of(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers_of(run) == []


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=")[1])


def test_a_rank_killed_mid_run_is_named_in_one_line_and_the_run_resumes(tmp_path, demo_data):
    """The kernel's out-of-memory killer takes one rank (SIGKILL; a crash in a driver,
    SIGSEGV, is worded in test_launch.py): the other's broken collective is one line, not a
    traceback, and the launcher names the rank, the signal and what sends it, the last
    complete checkpoint and --resume, which continues from it."""
    signum = signal.SIGKILL
    run = tmp_path / "run"
    settings = [*TINY, "train.nproc=2", "train.log_every=1", "train.ckpt_every=2"]
    process = start("train", "--out", str(run), "--steps", "400", "--set", *settings)
    wait_for_step(run, 5, process)
    victim = next(pid for pid in workers_of(run) if rank_of(pid) == 1)
    os.kill(victim, signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("rigtrain:")]
    assert "rank 0 stopped in step" in said[0] and "the connection to another training process broke" in said[0]
    name = signal.Signals(signum).name
    saved = complete_steps(run)[-1]
    assert said[-1].startswith(f"rigtrain: training process rank 1 was killed by {name} (")
    assert said[-1].endswith(
        f"the last complete checkpoint is step {saved}; continue with: rigtrain train --out {run} --resume"
    )
    assert workers_of(run) == []
    log = (run / "train.log").read_text()  # what the run said, kept beside it
    assert said[0] in log and said[-1] in log and log.startswith("=== ") and f"--out {run} --steps 400" in log
    resumed = rigtrain("train", "--out", str(run), "--resume", "--steps", str(saved + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {saved}/{saved + 1}" in resumed.stdout
    log = (run / "train.log").read_text()  # appended to, one header a command
    headers = [line for line in log.splitlines() if line.startswith("=== ")]
    assert len(headers) == 2 and headers[1].endswith(")") and "--resume" in headers[1]
    assert f"resuming at step {saved}/{saved + 1}" in log.split(headers[1])[1]


def test_a_native_crash_leaves_its_stacks_and_what_c_libraries_said_in_train_log(tmp_path, demo_data):
    """What a rank's C libraries write to its descriptors (NCCL's warnings; here os.write,
    past Python's streams, as C code writes) reaches the terminal and train.log, once: the
    launcher passes the ranks' output on. A crash in native code (a real SIGSEGV, on both
    ranks at step 5, as an NCCL watchdog's abort comes to every rank) leaves every thread's
    Python stack in train.log, each rank's dump whole under a line naming the rank, and on
    the terminal only the launcher's line, which says where the stacks are; so does one CPU
    process, which trains in the command's own process."""
    patch = """
        import ctypes, os
        train_step = module.Trainer.train_step
        def crashing(self, *args, **kwargs):
            if self.step + 1 == 3:
                os.write(2, f"NCCL WARN from rank {self.rank}, past Python\\n".encode())
            if self.step + 1 == 5:
                ctypes.string_at(0)  # reads address 0: SIGSEGV
            return train_step(self, *args, **kwargs)
        module.Trainer.train_step = crashing
    """
    env = _after_import(tmp_path / "crash-hook", "rigtrain.train.trainer", patch)
    run = tmp_path / "run"
    settings = [*TINY, "train.nproc=2", "train.log_every=1", "train.ckpt_every=2"]
    result = run_cli("train", "--out", str(run), "--steps", "40", "--set", *settings, fresh=True, env_extra=env)
    assert result.returncode == 1, result.stderr[-3000:]
    err = result.stderr
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("rigtrain:")][-1]
    assert re.match(r"rigtrain: training process rank [01] was killed by SIGSEGV \(a crash in native code", said), said
    assert f"its Python stacks are in {run / 'train.log'}; the last complete checkpoint is step 4;" in said
    log = (run / "train.log").read_text()
    for rank in (0, 1):
        assert f"NCCL WARN from rank {rank}, past Python" in err
        assert log.count(f"NCCL WARN from rank {rank}, past Python") == 1, log[-3000:]
    # each dump whole, after the line that names its rank: the first rank's, and the other's
    # where it crashed before the launcher stopped it
    parts = re.split(r"^\[rigtrain\] rank (\d)'s Python stacks \(faulthandler\):\n", log, flags=re.M)
    dumps = dict(zip(parts[1::2], parts[2::2]))  # rank: its dump, up to the next one
    assert len(dumps) == len(parts[1::2]) == log.count("Fatal Python error") >= 1, log[-4000:]
    assert said.split()[4] in dumps, (said, list(dumps))
    for dump in dumps.values():
        assert dump.startswith("Fatal Python error: Segmentation fault"), dump
        assert dump.count("Fatal Python error") == 1 and "in crashing" in dump and "most recent call first" in dump
    assert said in log and log.count("step     4  loss") == 1  # each rank-0 line once, the launcher's too
    # one CPU process trains inside the command's own process: its stacks are kept the same way
    alone = tmp_path / "alone"
    result = run_cli("train", "--out", str(alone), "--steps", "40", "--set", *TINY, fresh=True, env_extra=env)
    assert result.returncode == -signal.SIGSEGV and "Fatal Python error" not in result.stderr, result.stderr[-3000:]
    assert "in crashing" in (alone / "train.log").read_text().split("Fatal Python error: Segmentation fault", 1)[1]


def test_a_run_folder_deleted_under_a_run_is_one_line_and_never_made_again(tmp_path, demo_data):
    """`rm -rf` of the run folder (or its disk unmounted) while the run trains: the next
    write or save stops it with one line naming the folder, not a traceback from the
    training thread or from TensorBoard's writer thread, and the run does not make the
    folder again around the checkpoints DeepSpeed would write."""
    run = tmp_path / "run"
    process = start("train", "--out", str(run), "--steps", "400", "--set", *TINY, "train.ckpt_every=3")
    wait_for_step(run, 4, process)
    # Gone between two of its writes (the run trains in this one process): an rm -rf racing
    # the run's own writes may leave whatever it wrote meanwhile, and a folder half there.
    process.send_signal(signal.SIGSTOP)
    shutil.rmtree(run)
    process.send_signal(signal.SIGCONT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.strip()]
    assert len(said) == 1 and f"the run folder {run} is gone (deleted, or its disk unmounted)" in said[0], err
    assert not (run / "config.json").exists() and complete_steps(run) == []


CRASHES_AT_STEP_4 = """
import sys

from rigtrain.train import trainer

plain_step = trainer.Trainer.train_step


def crashing_step(self):  # what a GPU that fell off the bus, or a bug, does to a step
    if self.step == 3:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return plain_step(self)


trainer.Trainer.train_step = crashing_step
from rigtrain.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_an_unexplained_crash_is_one_line_with_its_traceback_kept_in_the_run(tmp_path, demo_data):
    """An error nothing else explains (a bug, a CUDA fault) is one line naming the step,
    the error, where its traceback is kept for a bug report, and the checkpoint to resume."""
    from conftest import run_script

    script, run = tmp_path / "crashes.py", tmp_path / "run"
    script.write_text(CRASHES_AT_STEP_4)
    result = run_script(script, "train", "--out", str(run), "--steps", "8", "--set", *TINY, "train.ckpt_every=2")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.strip()]
    report = run / "crash-rank0.txt"
    assert said == [
        "rigtrain: rank 0 failed in step 4 with RuntimeError: CUDA error: an illegal memory access was encountered "
        "(whether the GPU or its driver failed: `nvidia-smi -q`, and Xid lines in `sudo dmesg`); its traceback is in "
        f"{report}, for a bug report; the last complete checkpoint is step 2; once the cause is gone, continue with: "
        f"rigtrain train --out {run} --resume"
    ]
    kept = report.read_text()
    assert kept.startswith("Traceback") and "crashing_step" in kept and "illegal memory access" in kept


def test_a_disk_that_refuses_writes_is_said_in_words(tmp_path):
    import errno

    from rigtrain.train.saving import storage_failure

    (tmp_path / "config.json").write_text("{}")
    refused = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "metrics.jsonl"))
    assert (
        storage_failure(refused, tmp_path)
        == f"the disk refused a write ({tmp_path / 'metrics.jsonl'}): Read-only file system"
    )
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0") from None
    except RuntimeError as wrapped:  # torch.save's writer over a failing disk: the OSError is its context
        assert storage_failure(wrapped, tmp_path) == "the disk refused a write: Input/output error"
    torch_writer = RuntimeError(f"Parent directory {tmp_path}/checkpoints/step00000004 does not exist.")
    assert storage_failure(torch_writer, tmp_path).startswith("a folder of the run disappeared while it was written")
    assert storage_failure(RuntimeError("mat1 and mat2 must have the same dtype"), tmp_path) is None  # a bug
    (tmp_path / "config.json").unlink()
    assert (
        storage_failure(RuntimeError("anything"), tmp_path)
        == f"the run folder {tmp_path} is gone (deleted, or its disk unmounted)"
    )
    assert storage_failure(KeyError("x"), tmp_path) is None


def test_a_hung_rank_stops_the_run_after_the_collective_timeout_with_one_line(tmp_path, demo_data):
    """A rank that hangs inside a C call (here libc's pause(): a GPU stuck in its driver, a
    P2P link that hangs NCCL) does not keep the others waiting for ever: after
    train.collective_timeout_min the waiting rank says so in one line, with the checkpoint
    to resume from, and the launcher ends the hung one, which the SIGTERM did not reach.
    Before it kills it, it has the hung rank write where it was into train.log (its Python
    stacks: faulthandler on SIGUSR1 answers inside a C call), not onto the terminal."""
    patch = """
        import ctypes
        train_step = module.Trainer.train_step
        def hanging(self, *args, **kwargs):
            while self.step + 1 == 5 and self.rank == 1:
                ctypes.CDLL(None).pause()  # a signal ends one pause; the loop waits again
            return train_step(self, *args, **kwargs)
        module.Trainer.train_step = hanging
    """
    env = _after_import(tmp_path / "hang-hook", "rigtrain.train.trainer", patch)
    run = tmp_path / "run"
    settings = [*TINY, "train.nproc=2", "train.log_every=1", "train.ckpt_every=2", "train.collective_timeout_min=0.25"]
    started = time.monotonic()
    result = run_cli("train", "--out", str(run), "--steps", "400", "--set", *settings, fresh=True, env_extra=env)
    err = result.stderr
    assert result.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert time.monotonic() - started < 90  # 15 s of timeout, 10 s of grace for the hung rank, and the exits
    said = [line for line in err.splitlines() if line.startswith("rigtrain:")]
    assert len(said) == 1 and said[0].startswith("rigtrain: rank 0 stopped in step 5"), err[-3000:]
    assert "waited longer than train.collective_timeout_min (0.25 min) for another training process" in said[0]
    saved = complete_steps(run)[-1]
    assert saved == 4 and said[0].endswith(
        f"the last complete checkpoint is step {saved}; continue with: rigtrain train --out {run} --resume"
    )
    assert workers_of(run) == []
    log = (run / "train.log").read_text()
    where = log.split("[rigtrain] rank 1 did not end within 10 s of the run's failure; where it was", 1)
    assert len(where) == 2 and "in hanging" in where[1] and "(most recent call first)" in where[1], log[-3000:]
    assert where[1].index("[rigtrain] rank 1's Python stacks (faulthandler):") < where[1].index("in hanging")
    assert log.count("did not end within") == 1 and log.count("rank 1's Python stacks") == 1, log[-3000:]
    assert "did not end" not in err and "most recent call first" not in err  # the terminal: the one line


def start_on_a_terminal(run: Path, steps: int, *settings: str, nohup: bool = False):
    """`rigtrain train` in a terminal of its own (a pseudo-terminal it has as its controlling
    terminal, as a shell in an ssh session gives it), under `nohup` (SIGHUP ignored) if
    asked; returns the process and the terminal's other end, whose closing is the session
    dropping: the kernel sends SIGHUP, and writes to the terminal fail from then on."""
    import fcntl
    import pty
    import termios
    import threading

    terminal, its_end = pty.openpty()

    def take_the_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # Set either way: a suite run under nohup hands its tests SIGHUP ignored.
        signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)

    command = [sys.executable, "-m", "rigtrain", "train", "--out", str(run), "--steps", str(steps), "--set", *settings]
    process = subprocess.Popen(
        command, stdin=its_end, stdout=its_end, stderr=its_end, start_new_session=True, preexec_fn=take_the_terminal
    )
    os.close(its_end)

    def read_it():  # as a terminal does: what the run prints never fills the pipe
        try:
            while os.read(terminal, 4096):
                pass
        except OSError:
            return

    threading.Thread(target=read_it, daemon=True).start()
    return process, terminal


@pytest.mark.parametrize("nohup", [False, True], ids=["hangup", "nohup"])
def test_a_closed_terminal_saves_the_step_in_flight_and_nohup_trains_on(tmp_path, demo_data, nohup):
    """A dropped ssh session killed the run (the steps since the last checkpoint lost); now
    it stops as on SIGTERM, exit 129. Under nohup the run goes on to its end through a
    terminal that is gone (every print there failed with EIO, which ended the run)."""
    run = tmp_path / "run"
    settings = [*TINY, "train.log_every=1", "train.ckpt_every=1000", "train.nproc=2"]
    process, terminal = start_on_a_terminal(run, 40, *settings, nohup=nohup)
    wait_for_step(run, 6, process)
    os.close(terminal)  # the session drops
    assert process.wait(timeout=120) == (0 if nohup else 129)
    saved = complete_steps(run)[-1]
    # what it said after the terminal went is in the run folder (train.log), never lost
    said = (run / "train.log").read_text()
    if nohup:
        assert saved == 40 == max(losses(run))
        assert "step    40  loss" in said and "done: steps 1-40" in said
        return
    assert saved - max(losses(run)) <= 1  # the steps it logged are saved, or the one after
    assert f"stopped by SIGHUP after step {saved}; checkpoint " in said and f"--out {run} --resume" in said
    resumed = rigtrain("train", "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {saved}/40" in resumed.stdout and sorted(losses(run)) == list(range(1, 41))


def test_a_first_step_out_of_memory_backs_off_and_finishes(tmp_path, demo_data):
    # The demo's micro-batch (48) "runs out of memory" above 44, as on a card with less free
    # memory than the plan was told: 48 -> 42 (an eighth less), then it trains.
    run = tmp_path / "run"
    env = {**os.environ, "RIGTRAIN_FAULT_OOM_ABOVE_MICRO_BATCH": "44"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rigtrain",
            "train",
            "--out",
            str(run),
            "--steps",
            "3",
            "--set",
            *TINY_MODEL,
            "train.log_every=1",
            "train.ckpt_every=1",  # the failed attempt saved step 1 before it ran out
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads((run / "config.json").read_text())
    assert record["backed_off_from"] == [48] and record["config"]["train"]["micro_batch_size"] == 42
    assert "out of memory in the first steps at micro-batch 48: backing off to 42" in result.stdout  # the CPU's
    # after the second step, the first to hold the optimizer's states beside its activations
    assert "out of memory at step 3 on rank 0" in result.stderr and "GPU" not in result.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the failed attempts left no rows behind, nor a checkpoint to start from


def test_the_8bit_optimizer_without_bitsandbytes_is_one_line(tmp_path, demo_data):
    # as on the GPU kit's offline box: a bitsandbytes that cannot be imported
    shim = tmp_path / "shim" / "bitsandbytes"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named bitsandbytes')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}:{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "rigtrain", "train", "--out", str(tmp_path / "run"), "--steps", "1", "--set"]
        + [*TINY, "train.optimizer=adamw8bit"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.optimizer=adamw8bit needs bitsandbytes" in result.stderr and "Traceback" not in result.stderr


# -- divergence ------------------------------------------------------------------------------


@pytest.mark.parametrize("lr, says", [("1e4", "exploded"), ("1e30", "not finite")])
def test_divergence_stops_before_a_bad_checkpoint(tmp_path, demo_data, lr, says):
    import torch

    run = tmp_path / "run"
    result = rigtrain(
        "train",
        "--out",
        str(run),
        "--steps",
        "60",
        "--set",
        *TINY,
        f"train.lr={lr}",
        "train.log_every=5",
        "train.ckpt_every=5",
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("rigtrain:")]
    assert len(lines) == 1 and says in lines[0] and "train.lr" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # with nothing saved, the advice says --resume starts again rather than continuing
    assert ("starts again at step 0" in lines[0]) == (not complete_steps(run)), lines[0]
    print(lines[0])
    for step in complete_steps(run):  # whatever was saved is finite
        state = torch.load(run / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())


def _nan_gradients_hook(tmp_path: Path, steps: set[int]) -> dict:
    """A sitecustomize that makes one parameter's gradient NaN in the backward of the given
    steps (1 = the first), in the training process, with the loss itself finite: what an
    overflow in one layer's backward does."""
    patch = f"""
        build, step = module.build_model, [0]
        def build_model(*args, **kwargs):
            model = build(*args, **kwargs)
            poisoned = lambda grad: grad * float("nan") if step[0] in {sorted(steps)} else grad
            next(model.parameters()).register_hook(poisoned)
            return model
        train_step = module.Trainer.train_step
        def counted(self, *args, **kwargs):
            step[0] = self.step + 1
            return train_step(self, *args, **kwargs)
        module.build_model, module.Trainer.train_step = build_model, counted
    """
    return _after_import(tmp_path / "nan-hook", "rigtrain.train.trainer", patch)


def _train_with_nan_gradients(
    tmp_path: Path, steps: set[int], *settings: str
) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path / "run"
    command = ["train", "--out", str(run), "--steps", "12", "--set", *TINY, "train.log_every=1", *settings]
    result = run_cli(*command, fresh=True, env_extra=_nan_gradients_hook(tmp_path, steps))
    return run, result


@pytest.mark.parametrize(
    "stage, precision, optimizer, grad_clip",
    [
        ("0", "fp32", "adamw", "0"),
        ("1", "fp32", "adamw", "1"),
        ("0", "bf16", "adamw", "1"),
        ("0", "bf16", "adamw8bit", "1"),
    ],
)  # ZeRO-0: one GPU's plan; the 8-bit optimizer: one GPU's whose optimizer states crowd it
def test_an_update_with_nan_gradients_is_skipped_and_the_run_trains_on(
    tmp_path, demo_data, stage, precision, optimizer, grad_clip
):
    """From ZeRO-1 up DeepSpeed skips an update whose gradients are not finite. At ZeRO-0
    (one GPU's or one process's plan) it applied it, every weight turned NaN, and the run
    stopped at its next check, losing the steps since its last checkpoint. Now the fused
    optimizer skips it there too, decided on the device, and the 8-bit one on the host,
    also without clipping (train.grad_clip=0: the norm is taken all the same). A step
    whose update was skipped is not saved; a resumed run counts on from the checkpoint's
    total, and does not take that total for a new skip."""
    import torch

    settings = [f"train.zero_stage={stage}", f"train.precision={precision}", f"train.optimizer={optimizer}"]
    settings += [f"train.grad_clip={grad_clip}"]
    run, result = _train_with_nan_gradients(tmp_path, {4, 7}, *settings, "train.ckpt_every=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: step 4 is not saved: its update was skipped (inf or NaN gradients)" in result.stdout
    assert complete_steps(run) == [8, 12]
    resumed = rigtrain("train", "--out", str(run), "--resume", "--steps", "13")  # step 13 is saved: the last
    assert resumed.returncode == 0 and "not saved" not in resumed.stdout, resumed.stdout + resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = {row["step"]: row.get("skipped_steps", 0) for row in rows if "loss" in row}
    assert [skipped[s] for s in (3, 4, 6, 7, 12, 13)] == [0, 1, 1, 2, 2, 2], skipped
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)
    assert complete_steps(run)[-1] == 13
    state = torch.load(run / "checkpoints" / "step00000013" / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())
    if optimizer == "adamw8bit":  # the skipped updates held the schedule, as DeepSpeed's own skips do
        assert state["lr_scheduler"]["last_epoch"] == 13 - 2, state["lr_scheduler"]


def test_updates_skipped_too_often_in_a_row_stop_the_run_with_one_line(tmp_path, demo_data):
    run, result = _train_with_nan_gradients(tmp_path, {2, 3, 4}, "train.max_skipped_steps=3", "train.ckpt_every=10")
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("rigtrain:")]
    assert len(lines) == 1 and "the last 3 updates up to step 4 were skipped" in lines[0], result.stderr[-3000:]
    assert "(it starts again at step 0)" in lines[0] and "Traceback" not in result.stderr


# -- resume ------------------------------------------------------------------------------------


def test_a_run_whose_data_moved_resumes_from_the_new_place_and_other_data_is_refused(tmp_path, demo_data):
    """A new disk, another mount point: the same prepared shards in another folder are the
    run's data (the same clips of the same videos, compared by checksum); other data is a
    new run's, from these weights."""
    shared = (demo_data / "index.json").read_bytes()  # the session's dataset, which other tests read
    data = tmp_path / "shards"

    def link_arrays(src: str, dst: str) -> None:  # index.json copied: it is edited below, never the shared one
        os.symlink(src, dst) if src.endswith(".npy") else shutil.copy2(src, dst)

    shutil.copytree(demo_data, data, ignore=shutil.ignore_patterns("*.lock"), copy_function=link_arrays)
    run = tmp_path / "run"
    first = rigtrain("train", "--out", str(run), "--data", str(data), "--steps", "2", "--set", *TINY,
                     "eval.during_training=false")  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    moved = data.rename(tmp_path / "new-disk")
    gone = rigtrain("train", "--out", str(run), "--resume", "--steps", "3")
    assert gone.returncode == 2 and "their new place with --data if they moved" in gone.stderr
    resumed = rigtrain("train", "--out", str(run), "--resume", "--steps", "3", "--data", str(moved))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"the run's data moved from {data} to {moved}" in resumed.stdout and "resuming at step 2/3" in resumed.stdout
    scored = rigtrain("eval", str(run), "--json")
    assert scored.returncode == 0 and json.loads(scored.stdout)["split"]["from"] == "the run"
    other = tmp_path / "other"
    shutil.copytree(moved, other, symlinks=True)
    assert not (other / "index.json").is_symlink()
    index = json.loads((other / "index.json").read_text())
    index["shards"] = index["shards"][:-1]  # another prepare: fewer videos
    (other / "index.json").write_text(json.dumps(index))
    refused = rigtrain("train", "--out", str(run), "--resume", "--steps", "4", "--data", str(other))
    assert refused.returncode == 2 and "not the data this run trained on" in refused.stderr
    assert f"--init-from {run} --out NEW_DIR --data {other}" in refused.stderr
    assert (demo_data / "index.json").read_bytes() == shared


def test_resume_applies_what_the_user_sets_and_refuses_what_it_cannot(tmp_path, demo_data):
    run = tmp_path / "run"
    assert (
        rigtrain(
            "train",
            "--out",
            str(run),
            "--preset",
            "demo",
            "--steps",
            "10",
            "--set",
            *TINY,
            "train.ckpt_every=10",
            "train.log_every=1",
            "train.zero_stage=1",  # a part of the optimizer per process, as on several GPUs (below)
        ).returncode
        == 0
    )
    resumed = rigtrain(
        "train",
        "--out",
        str(run),
        "--preset",
        "demo",
        "--resume",
        "--steps",
        "12",
        "--set",
        "train.lr=1e-5",
        "train.min_lr_ratio=1.0",
        "train.warmup_steps=0",
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "train.lr 0.0003 -> 1e-05" in resumed.stdout  # the demo preset's 3e-4
    rows = {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert rows[11]["lr"] == pytest.approx(1e-5) and rows[12]["lr"] == pytest.approx(1e-5)
    assert json.loads((run / "config.json").read_text())["config"]["train"]["lr"] == 1e-5
    other = rigtrain("train", "--out", str(run), "--preset", "small", "--resume")
    assert other.returncode == 2 and "--preset demo" in other.stderr and "--preset small" in other.stderr
    shape = rigtrain("train", "--out", str(run), "--resume", "--set", "model.d_model=64")
    assert shape.returncode == 2 and "model.d_model" in shape.stderr
    assert f"--init-from {run} --out NEW_DIR --set model.d_model=64" in shape.stderr  # the way to change it

    # Trained on two GPUs, one since taken out, by a rigtrain from before DeepSpeed's
    # converter could take its checkpoints: refused, before anything is touched.
    from rigtrain.train import checkpoints

    record = json.loads((run / "config.json").read_text())
    record["plan"].update(world_size=2, device="cuda")
    (run / "config.json").write_text(json.dumps(record))
    for tag in (run / "checkpoints").glob("step*"):  # not DeepSpeed's `latest` file
        meta = json.loads((tag / "trainer.json").read_text())
        del meta["universal_checkpoint_info"]
        (tag / "trainer.json").write_text(json.dumps(meta))
        checkpoints.mark_complete(tag, meta["step"])
    checkpoints_before = sorted(p.name for p in (run / "checkpoints").iterdir())
    fewer = rigtrain("train", "--out", str(run), "--resume")
    assert fewer.returncode == 2 and len(fewer.stderr.strip().splitlines()) == 1, fewer.stderr
    assert "was trained on 2 GPU(s), and this machine now gives it 1" in fewer.stderr
    assert f"rigtrain train --init-from {run} --out NEW_DIR" in fewer.stderr
    assert "resume once on the same count" in fewer.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints_before


def test_a_zero0_run_resumes_on_more_processes_and_back_with_its_global_batch(tmp_path, demo_data):
    """One GPU's plan is ZeRO-0, whose checkpoint every process reads whole: a second card
    added (here a second CPU process), then taken out again, and the run goes on each time
    with the same global batch, from the same point of the epoch."""
    run = tmp_path / "run"
    first = rigtrain("train", "--out", str(run), "--steps", "4", "--set", *TINY, "train.zero_stage=0",
                     "train.ckpt_every=2", "train.log_every=1", "eval.during_training=false")  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    more = rigtrain("train", "--out", str(run), "--resume", "--steps", "6", "--set", "train.nproc=2")
    assert more.returncode == 0, more.stderr[-2000:]
    assert (
        "resuming on 2 process(es) instead of 1 (at ZeRO-0 each reads the whole optimizer): 1 x 4 clips" in more.stdout
    )
    assert "data position: 4 micro-batch(es) of 8 on 1 process(es) read, now 4 of 4 on 2" in more.stdout
    fewer = rigtrain("train", "--out", str(run), "--resume", "--steps", "8", "--set", "train.nproc=1",
                     "train.micro_batch_size=8")  # fmt: skip
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    assert (
        "resuming on 1 process(es) instead of 2 (at ZeRO-0 each reads the whole optimizer): 1 x 8 clips" in fewer.stdout
    )
    assert "now 6 of 8 on 1" in fewer.stdout  # 6 x 4 x 2 = 48 clips of the epoch read
    assert sorted(losses(run)) == list(range(1, 9)) and all(map(math.isfinite, losses(run).values()))
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert (plan["world_size"], plan["micro_batch_size"], plan["grad_accum_steps"]) == (1, 8, 1)


def test_a_zero1_run_resumes_on_fewer_processes_through_a_universal_checkpoint(tmp_path, demo_data):
    """Two GPUs at ZeRO-1, one taken out: each saved its own part of the optimizer, which
    DeepSpeed's converter merges into a universal checkpoint that one process loads; the
    conversion goes once the run has saved at its new count."""
    run = tmp_path / "run"
    first = rigtrain("train", "--out", str(run), "--steps", "4", "--set", *TINY, "train.nproc=2", "train.zero_stage=1",
                     "train.ckpt_every=2", "train.log_every=1", "eval.during_training=false")  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    fewer = rigtrain("train", "--out", str(run), "--resume", "--steps", "6", "--set", "train.nproc=1")
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    assert "resuming on 1 process(es) instead of 2 (at ZeRO-1 the optimizer's parts merged and cut again): 2 x 8" in (
        fewer.stdout
    )
    assert "converting checkpoint step00000004 into DeepSpeed's universal layout" in fewer.stdout
    assert "data position: 4 micro-batch(es) of 8 on 2 process(es) read, now 8 of 8 on 1" in fewer.stdout
    assert sorted(losses(run)) == list(range(1, 7)) and all(map(math.isfinite, losses(run).values()))
    assert not (run / "universal").exists()
    meta = json.loads((run / "checkpoints" / "step00000006" / "trainer.json").read_text())
    assert meta["counted_in"] == [1, 8] and meta["universal_checkpoint_info"]


def test_a_new_process_of_a_resumed_run_draws_its_own_random_stream(tmp_path):
    import torch

    from rigtrain.train import checkpoints

    (tmp_path / "trainer.json").write_text(json.dumps({"step": 7}))
    torch.manual_seed(0)
    checkpoints.save_rank_state(tmp_path, 0)
    draws = {}
    for rank in (0, 1, 2, 1):
        saved = checkpoints.load_rank_state(tmp_path, rank, seed=3)
        draws.setdefault(rank, []).append(torch.rand(4).tolist())
        assert saved == (rank == 0)
    assert draws[1][0] == draws[1][1]  # the same stream for the same rank and step
    assert len({tuple(d[0]) for d in draws.values()}) == 3  # and each rank its own


def test_fit_to_processes_keeps_the_global_batch_or_says_why_not(tmp_path):
    import dataclasses

    from rigtrain.config import load_config
    from rigtrain.train import checkpoints
    from rigtrain.train.resuming import fit_to_processes

    said = []
    config = load_config("demo", overrides=["train.micro_batch_size=12", "train.grad_accum_steps=2"])
    zero0 = {"world_size": 2, "zero_stage": 0, "device": "cuda", "micro_batch_size": 12, "grad_accum_steps": 2}
    assert fit_to_processes(zero0, config, 2, "RUN", said.append) is config  # the same processes: unchanged
    one = fit_to_processes(zero0, config, 1, "RUN", said.append).train
    assert (one.micro_batch_size, one.grad_accum_steps) == (12, 4)  # 48 clips, never a larger micro-batch
    three = fit_to_processes(zero0, config, 3, "RUN", said.append).train
    assert (three.micro_batch_size, three.grad_accum_steps) == (8, 2)
    assert said[-1].endswith("2 x 8 clips each, the global batch of 48 as before")
    with pytest.raises(UserError, match="its global batch of 48 clips cannot be shared equally by 5"):
        fit_to_processes(zero0, config, 5, "RUN", said.append)
    # at ZeRO-1 to 3 the newest checkpoint is converted, where it can be
    zero1 = {**zero0, "zero_stage": 1}
    tag = tmp_path / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / "trainer.json").write_text(json.dumps({"step": 4, "micro_batches": 4}))  # saved before 2026-12-06
    checkpoints.mark_complete(tag, 4)
    with pytest.raises(UserError, match="saved by a rigtrain from before 2026-12-06.*resume once on the same count"):
        fit_to_processes(zero1, config, 1, tmp_path, said.append)
    (tag / "trainer.json").write_text(json.dumps({"step": 4, "micro_batches": 4, "universal_checkpoint_info": True}))
    checkpoints.mark_complete(tag, 4)
    eight_bit = dataclasses.replace(config, train=dataclasses.replace(config.train, optimizer="adamw8bit"))
    with pytest.raises(UserError, match="its optimizer is adamw8bit"):
        fit_to_processes(zero1, eight_bit, 1, tmp_path, said.append)
    assert not (tmp_path / "universal").exists()  # refused before converting anything


# -- disk, files, folders -------------------------------------------------------------------


def _small_filesystem(tmp_path: Path, megabytes: int):
    """A tmpfs of that size where the machine allows mounting one; else None."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(mount)], capture_output=True
    )
    return mount if made.returncode == 0 else None


def _after_import(folder: Path, module_name: str, patch: str) -> dict:
    """An environment whose sitecustomize runs `patch` (Python source, with the module as
    `module`) right after `module_name` is first imported, in every process a command starts."""
    folder.mkdir()
    body = textwrap.indent(textwrap.dedent(patch).strip(), " " * 12)
    (folder / "sitecustomize.py").write_text(f"""
import importlib.abc, importlib.machinery, sys

class _Wrap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "{module_name}":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
{body}
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Wrap())
""")
    return {**os.environ, "PYTHONPATH": f"{folder}:{os.environ.get('PYTHONPATH', '')}"}


def _enospc_hook(tmp_path: Path, saves: int) -> dict:
    """Else: a sitecustomize that lets the first `saves` calls of torch.save into a
    checkpoints folder through and makes the later ones fail with ENOSPC, as a full disk
    does, in every process the run starts. torch.save writes through its own C++ writer, so
    the hook wraps torch.save itself when torch.serialization is first imported."""
    patch = f"""
        import errno
        save, calls = module.save, [0]
        def full_save(obj, f, *args, **kwargs):
            if "checkpoints" in str(f):
                calls[0] += 1
                if calls[0] > {saves}:
                    raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return save(obj, f, *args, **kwargs)
        module.save = full_save
    """
    return _after_import(tmp_path / "hook", "torch.serialization", patch)


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_resumable(tmp_path, demo_data):
    mount = _small_filesystem(tmp_path, 12)
    try:
        run = (mount or tmp_path) / "run"
        env = os.environ.copy() if mount else _enospc_hook(tmp_path, saves=3)  # one checkpoint's files
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "rigtrain",
                "train",
                "--out",
                str(run),
                "--steps",
                "40",
                "--set",
                *TINY,
                "train.ckpt_every=10",
                "train.keep_ckpts=5",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 1, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("rigtrain:")]
        assert len(lines) == 1 and "disk" in lines[0] and "free" in lines[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        saved = complete_steps(run)
        assert saved  # at least the first checkpoint fitted
        from rigtrain.train.checkpoints import newest_good

        assert newest_good(run / "checkpoints") == (saved[-1], f"step{saved[-1]:08d}")
    finally:
        if mount:
            subprocess.run(["umount", str(mount)])


def test_one_run_per_folder(tmp_path, demo_data):
    run = tmp_path / "run"
    process = start("train", "--out", str(run), "--steps", "4000", "--set", *TINY, "train.log_every=1")
    wait_for_step(run, 1, process)
    second = rigtrain("train", "--out", str(run), "--resume")
    assert second.returncode == 2 and f"process {process.pid}" in second.stderr
    process.kill()
    process.communicate()
    taken = rigtrain("train", "--out", str(run), "--resume", "--steps", "2")
    assert taken.returncode == 0 and "taking it over" in taken.stdout


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, demo_data):
    run = tmp_path / "run"
    assert (
        rigtrain(
            "train", "--out", str(run), "--steps", "6", "--set", *TINY, "train.ckpt_every=3", "train.log_every=1"
        ).returncode
        == 0
    )
    (run / "checkpoints" / "step00000006" / "complete.json").unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 1.2')  # what a crash in the middle of a write leaves
    resumed = rigtrain("train", "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "dropped 1 line(s)" in resumed.stdout
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_shards_checked_when_opened_and_when_they_shrink_under_a_run(tmp_path, demo_data):
    data = tmp_path / "shards"
    shutil.copytree(demo_data, data)
    video = sorted(data.glob("*/video.npy"))[0]
    with video.open("r+b") as f:
        f.truncate(video.stat().st_size - 100)
    opened = rigtrain("train", "--out", str(tmp_path / "a"), "--data", str(data), "--steps", "2")
    assert opened.returncode == 2 and str(video) in opened.stderr and "data prepare" in opened.stderr
    assert rigtrain("data", "bench", str(data)).returncode == 2

    shutil.rmtree(data)
    shutil.copytree(demo_data, data)
    run = tmp_path / "b"
    process = start(
        "train", "--out", str(run), "--data", str(data), "--steps", "4000", "--set", *TINY, "train.log_every=1"
    )
    wait_for_step(run, 2, process)
    for path in data.glob("*/video.npy"):
        with path.open("r+b") as f:
            f.truncate(1000)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err[-2000:]
    assert "became shorter while training" in err and "Traceback" not in err
    saved = complete_steps(run)  # the step it finished before the read failed, not lost
    assert saved and saved[-1] >= 2 and f"step {saved[-1]} is saved" in err


def test_videos_gone_mid_run_save_the_last_whole_step_and_say_so(tmp_path):
    """Training straight from a folder of videos on a drive that is unplugged (here: the
    folder deleted) mid-run: every video then fails, and the run stops with one line, exit
    2, after saving the last step it finished, resumable when the videos are back."""
    from test_ingest import write_h264_with_aac

    src = tmp_path / "videos"
    src.mkdir()
    for i in range(6):
        write_h264_with_aac(src / f"v{i}.mp4", seconds=3.0, size=(64, 48))
    run = tmp_path / "run"
    settings = [*TINY, "train.log_every=1", "train.ckpt_every=1000", "data.workers=1", "eval.during_training=false"]
    process = start("train", "--data", str(src), "--out", str(run), "--steps", "400", "--set", *settings)
    wait_for_step(run, 3, process)
    shutil.rmtree(src)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("rigtrain: error")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "video(s) in a row cannot be decoded" in errors[0] and "is saved (`rigtrain train --out" in errors[0]
    saved = complete_steps(run)
    assert saved and saved[-1] >= 3 and f"step {saved[-1]} is saved" in errors[0]


def test_data_gone_mid_accumulation_saves_the_last_whole_step(tmp_path):
    """The data vanishes after the first of a step's three micro-batches: only gradients had
    moved, so one process saves the step before, at the data position where that step
    ended (a resume reads the interrupted step's micro-batches again), and says so."""
    from conftest import run_script

    run = tmp_path / "run"
    settings = [*TINY_MODEL, "train.micro_batch_size=2", "train.grad_accum_steps=3", "eval.during_training=false"]
    made = rigtrain("train", "--out", str(run), "--steps", "1", "--set", *settings)
    assert made.returncode == 0, made.stderr[-2000:]
    probed = run_script(Path(__file__).parent / "data_gone_probe.py", str(run))
    lines = [line for line in probed.stdout.splitlines() if line.startswith("PROBE ")]
    assert probed.returncode == 0 and lines, probed.stdout[-2000:] + probed.stderr[-3000:]
    found = json.loads(lines[0][len("PROBE ") :])
    assert "the data folder is gone" in found["error"] and "step 2 is saved" in found["error"], found
    assert complete_steps(run) == [1, 2]
    meta = json.loads((run / "checkpoints" / "step00000002" / "trainer.json").read_text())
    assert meta["step"] == 2 and meta["micro_batches"] == found["step_end_position"] == 6, (meta, found)


# -- bad invocations ------------------------------------------------------------------------


def _bad_invocations(tmp: Path, demo_data: Path) -> list[list[str]]:
    (tmp / "binary.toml").write_bytes(b"\xff\xfe[train]\n")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfetrain:\n")
    (tmp / "section.toml").write_text("train = 5\n")
    (tmp / "section.yaml").write_text("train: 5\n")
    (tmp / "bad.toml").write_text("[train\nlr = 1\n")
    (tmp / "bad.yaml").write_text("train: [\n")
    (tmp / "unknown.toml").write_text("[train]\nlearning_rate = 1\n")
    (tmp / "a_file").write_text("")
    (tmp / "notes.txt").write_text("x")
    card = '"name": "RTX 3090", "memory_gib": 24, "compute_capability": [8, 6]'
    # Python's JSON reads Infinity and NaN: a rig file that says so is no rig
    (tmp / "infinite.rig.json").write_text(f'{{"gpus": [{{{card}, "memory_free_gib": Infinity}}]}}')
    (tmp / "nan.rig.json").write_text(f'{{"gpus": [{{{card}, "memory_free_gib": NaN}}]}}')
    (tmp / "software.rig.json").write_text(
        f'{{"gpus": [{{{card}}}], "software": {{"torch": 2, "torch_cuda": "13.0"}}}}'
    )
    # run folders whose config.json was edited into shapes `rigtrain train` never writes
    edited = {"plan": '"plan": true', "split": '"plan": {}, "split": [1]', "data_dir": '"plan": {}, "data_dir": 5'}
    for name, fields in edited.items():
        (tmp / f"edited-{name}").mkdir()
        extra = "" if name == "data_dir" else ', "data_dir": "/nowhere"'
        (tmp / f"edited-{name}" / "config.json").write_text(f'{{"config": {{"preset": "demo"}}, {fields}{extra}}}')
    truncated = tmp / "truncated"
    shutil.copytree(demo_data, truncated)
    video = sorted(truncated.glob("*/video.npy"))[0]
    with video.open("r+b") as f:
        f.truncate(video.stat().st_size // 2)
    zeroed = tmp / "zeroed"
    shutil.copytree(demo_data, zeroed)
    with sorted(zeroed.glob("*/audio.npy"))[0].open("r+b") as f:
        f.write(b"\0" * 64)
    (tmp / "videos").mkdir()
    (tmp / "videos" / "clip.mp4").write_text("a video's name is enough: the output folder is made first")
    out = str(tmp / "run")
    return [
        ["train", "--out", out, "--config", str(tmp / "binary.toml")],
        ["train", "--out", out, "--config", str(tmp / "binary.yaml")],
        ["train", "--out", out, "--config", str(tmp / "section.toml"), "--steps", "1"],
        ["train", "--out", out, "--config", str(tmp / "section.yaml"), "--steps", "1"],
        ["train", "--out", out, "--config", str(tmp / "bad.toml")],
        ["train", "--out", out, "--config", str(tmp / "bad.yaml")],
        ["train", "--out", out, "--config", str(tmp / "unknown.toml")],
        ["train", "--out", out, "--config", str(tmp / "notes.txt")],
        ["train", "--out", out, "--config", str(tmp / "missing.toml")],
        ["train", "--out", out, "--data", str(truncated), "--steps", "1"],
        ["train", "--out", out, "--data", str(zeroed), "--steps", "1"],
        ["train", "--out", out, "--data", str(tmp / "missing"), "--steps", "1"],
        ["train", "--out", "/proc/rigtrain-run", "--steps", "1"],
        ["train", "--out", str(tmp / "a_file"), "--steps", "1"],
        ["train", "--out", "", "--steps", "1"],
        ["train", "--out", out, "--preset", ""],
        ["train", "--out", out, "--preset", "huge"],
        ["train", "--out", out, "--set", "train.lr=inf"],
        ["train", "--out", out, "--set", "train.lr=1e400"],
        ["train", "--out", out, "--set", "train.lr=nan"],
        ["train", "--out", out, "--set", "train.lr=-1"],
        ["train", "--out", out, "--set", "data.fps=1e-320"],  # a clip that never ends
        ["train", "--out", out, "--set", "train.st\neps=3"],  # quoted back: still one line
        ["train", "--out", out, "--set", "train.steps=0"],
        ["train", "--out", out, "--set", "train.steps=2.5"],
        ["train", "--out", out, "--set", "train.divergence_factor=0.5"],
        ["train", "--out", out, "--set", "train.collective_timeout_min=0"],
        ["train", "--out", out, "--set", "model.d_model"],
        ["train", "--out", out, "--set", "nosuch.key=1"],
        ["train", "--out", out, "--psu-watts", "-5"],
        ["train", "--out", out, "--psu-watts", "nan"],
        ["train", "--out", out, "--resume"],
        ["train", "--out", out, "--steps", "-3"],
        ["rig", "--psu-watts", "nan"],
        ["rig", "--psu-watts", "0"],
        ["rig", "--rig", str(tmp / "notes.txt")],
        ["rig", "--rig", str(tmp / "infinite.rig.json")],
        ["rig", "--rig", str(tmp / "nan.rig.json")],
        ["rig", "--rig", str(tmp / "software.rig.json")],
        ["data", "bench", str(truncated)],
        ["eval", str(tmp / "missing")],
        *[["eval", str(tmp / f"edited-{name}")] for name in edited],
        *[["train", "--out", str(tmp / f"edited-{name}"), "--resume"] for name in edited],
        ["eval", ""],
        ["data", "synth", "/proc/rigtrain-data"],  # folders that cannot be made
        ["data", "prepare", str(tmp / "videos"), "/proc/rigtrain-data"],
        ["sweep", str(Path(__file__).parents[1] / "examples" / "sweep-demo.toml"), "--out", "/proc/rigtrain-sweep"],
    ]


def test_every_bad_invocation_is_exit_2_with_one_line(tmp_path, demo_data):
    failures = []
    for args in _bad_invocations(tmp_path, demo_data):
        result = run_cli(*args, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if result.returncode != 2 or len(lines) != 1 or "Traceback" in result.stderr:
            failures.append((args, result.returncode, result.stderr[-600:]))
    assert not failures, "\n".join(map(repr, failures))


def test_a_command_that_fails_before_its_run_writes_anything_leaves_no_folder(tmp_path, demo_data):
    """A mistake found after the run folder was made (here: a micro-batch larger than the
    data) left an empty runs/DATE-TIME-PRESET behind at every try. Folders the command made
    go again; a folder the user made stays, and so does one with anything written in it."""
    too_big = ["--data", str(demo_data), "--set", "train.micro_batch_size=5000"]
    for command in (["train"], ["tune", "--budget-s", "60"], ["profile"]):
        result = run_cli(*command, *too_big, cwd=tmp_path)
        assert result.returncode == 2 and "fewer than one batch" in result.stderr, result.stderr[-2000:]
        assert list((tmp_path / "runs").iterdir()) == [], command
    result = run_cli("train", *too_big, "--out", str(tmp_path / "new" / "run"))
    assert result.returncode == 2 and not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    result = run_cli("train", *too_big, "--out", str(tmp_path / "mine"))
    assert result.returncode == 2 and (tmp_path / "mine").is_dir()
