"""Two machines for real, on one: DeepSpeed's multi-node launcher (pdsh over ssh) starts one
CPU/gloo process on each of two "nodes", 127.0.0.1 and 127.0.0.2, reached through an sshd
that tests/multinode/loopback_nodes.sh starts on the loopback (installing Debian's
openssh-server and pdsh when they are missing and it may). The run trains, checkpoints,
is paused with Ctrl-Z and continued, is stopped with SIGTERM, resumes, and its losses equal
a one-machine two-rank run's, bit for bit. Without sshd and pdsh, and no way to install
them, the test is skipped saying so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, run_cli
from test_faults import complete_steps, losses, pause_and_continue, wait_for_step, workers_of

pytestmark = pytest.mark.slow
NODES_SCRIPT = Path(__file__).parent / "multinode" / "loopback_nodes.sh"
STEPS = 40  # long enough that the stop lands mid-run: a step takes a fraction of a second
COMMON = ["--steps", str(STEPS), "--set", *TINY_MODEL, "train.micro_batch_size=4", "train.log_every=1"]
COMMON += ["train.ckpt_every=3", "train.warmup_steps=2", "eval.during_training=false"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(hostfile, environment whose PATH finds the nodes' ssh)."""
    where = tmp_path_factory.mktemp("nodes")
    started = subprocess.run(["bash", str(NODES_SCRIPT), str(where)], capture_output=True, text=True, timeout=300)
    if started.returncode == 3:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stderr[-2000:]
    env = {**os.environ, "PATH": f"{where / 'bin'}:{os.environ['PATH']}"}
    yield started.stdout.strip(), env
    subprocess.run(["bash", str(NODES_SCRIPT), "--stop", str(where)], timeout=30)


@pytest.mark.long
def test_two_nodes_train_stop_resume_and_match_one_machine(tmp_path, demo_data, two_nodes):
    hostfile, env = two_nodes
    run = tmp_path / "two-nodes"
    process = subprocess.Popen(
        [sys.executable, "-m", "rigtrain", "train", "--out", str(run), "--hostfile", hostfile, *COMMON],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_for_step(run, 4, process, timeout=240)
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert plan["world_size"] == 2 and "2 machine(s)" in plan["reasons"]["world_size"]
    # Ctrl-Z: the workers on both machines, reached by ssh, pause with the launcher; `fg` goes on
    from rigtrain.train.processes import worker_pattern

    found = subprocess.run(["pgrep", "-f", worker_pattern(run)], capture_output=True, text=True).stdout.split()
    assert len(found) == 2, found  # the workers, not DeepSpeed's launchers nor ssh's clients
    pause_and_continue(process, run, [int(pid) for pid in found])
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 143, out[-2000:] + err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "paused (Ctrl-Z) with the run's workers on 2 machine(s)" in err, err[-3000:]
    # how to go on, as this run needs it: on its machines
    assert f"Continue with: rigtrain train --out {run} --resume --hostfile {hostfile}" in out + err, out[-2000:]
    stopped_at = complete_steps(run)[-1]
    assert 3 <= stopped_at < STEPS
    assert (run / "checkpoints" / f"step{stopped_at:08d}" / "rng_rank1.pt").is_file()  # the second node saved too
    time.sleep(1)
    assert workers_of(run) == []  # neither node left a worker behind

    resumed = subprocess.run(
        [sys.executable, "-m", "rigtrain", "train", "--out", str(run), "--hostfile", hostfile, "--resume"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    # The same run on one machine, two ranks, each with the CPU threads a node's rank had
    # (every "node" here has all of this machine's cores; a matmul's sums depend on how many
    # threads share them), described by a rig file with twice the threads.
    threads = int(json.loads((run / "config.json").read_text())["plan"]["env"]["OMP_NUM_THREADS"])
    rig = tmp_path / "rig.json"
    rig.write_text(json.dumps({"gpus": [], "cpu": {"threads": 2 * threads}}))
    one_machine = tmp_path / "one-machine"
    reference = subprocess.run(
        [sys.executable, "-m", "rigtrain", "train", "--out", str(one_machine), "--rig", str(rig), *COMMON]
        + ["train.nproc=2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    two, one = losses(run), losses(one_machine)
    assert sorted(two) == list(range(1, STEPS + 1))
    assert [two[s] for s in range(1, STEPS + 1)] == [one[s] for s in range(1, STEPS + 1)]  # bit for bit


def test_a_host_without_passwordless_ssh_is_one_line(tmp_path, demo_data, two_nodes):
    _, env = two_nodes
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.3 slots=1\n")  # no sshd listens on 127.0.0.3
    path = {"PATH": env["PATH"]}  # the nodes' ssh
    result = run_cli("train", "--out", str(tmp_path / "run"), "--hostfile", str(hostfile), env_extra=path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot ssh to 127.0.0.3" in result.stderr and "Traceback" not in result.stderr
    hostfile.write_text("127.0.0.1 slots=one\n")
    result = run_cli("train", "--out", str(tmp_path / "run"), "--hostfile", str(hostfile), env_extra=path, timeout=120)
    assert result.returncode == 2 and f"--hostfile {hostfile}" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
