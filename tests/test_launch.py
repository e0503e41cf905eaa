"""Launch decisions from rig facts (no process is started here): devices, world size,
precision, environment and loader threads, as the planner makes them for train."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rigtrain.config import load_config
from rigtrain.config.loading import user_keys
from rigtrain.errors import UserError
from rigtrain.rig.facts import Cpu, Gpu, Rig
from rigtrain.train.planning import plan_run
from rigtrain.train.processes import WORKER_MODULE, launch_command

CPU_BOX = Rig(cpu=Cpu(cores=2, threads=2), ram_gib=24.0)


def gpus(*capabilities, threads=32):
    return Rig(
        gpus=tuple(Gpu(name="gpu", memory_gib=24.0, compute_capability=c) for c in capabilities),
        cpu=Cpu(cores=threads // 2, threads=threads),
        ram_gib=64.0,
    )


def plan(rig, preset="demo", overrides=()):
    return plan_run(load_config(preset, overrides=list(overrides)), rig, user_keys=user_keys(None, list(overrides)))


def test_cpu_box_trains_in_fp32_with_nproc_gloo_processes(tmp_path):
    two = plan(CPU_BOX, overrides=["train.nproc=2"])
    assert (two.device, two.world_size, two.precision) == ("cpu", 2, "fp32")
    assert two.env["OMP_NUM_THREADS"] == "1" and two.env["DS_ACCELERATOR"] == "cpu"
    command = launch_command(tmp_path, two, None)  # one worker's command, started once per rank
    assert command[1:3] == ["-m", WORKER_MODULE] and command[-2] == "--run-dir"
    assert launch_command(tmp_path, plan(CPU_BOX), None) is None  # one CPU process runs in-process


@pytest.mark.parametrize("capability, precision", [((8, 6), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp32")])
def test_precision_follows_compute_capability(capability, precision):
    chosen = plan(gpus(capability))
    assert chosen.precision == precision and chosen.reasons["precision"]


def test_mixed_cards_plan_for_the_oldest_and_user_precision_wins():
    assert plan(gpus((8, 6), (7, 5))).precision == "fp16"
    chosen = plan(gpus((8, 6)), overrides=["train.precision=fp32"])
    assert chosen.precision == "fp32" and "user" in chosen.reasons["precision"]


def test_rig_gpus_selects_cards_and_bad_choices_are_user_errors(tmp_path):
    chosen = plan(gpus((8, 6), (8, 6), (8, 9)), overrides=["rig.gpus=0,2"])
    assert chosen.world_size == 2 and chosen.env["CUDA_VISIBLE_DEVICES"] == "0,2"
    assert launch_command(tmp_path, chosen, None)[1:3] == ["-m", WORKER_MODULE]
    one = plan(gpus((8, 6), (8, 6)), overrides=["rig.gpus=1"])
    assert one.world_size == 1 and launch_command(tmp_path, one, None) is not None  # a GPU run gets a fresh process
    with pytest.raises(UserError, match="rig.gpus"):
        plan(gpus((8, 6)), overrides=["rig.gpus=3"])
    with pytest.raises(UserError, match="rig.gpus"):
        plan(CPU_BOX, overrides=["rig.gpus=0"])


def test_hostfile_goes_to_deepspeeds_launcher(tmp_path):
    command = launch_command(tmp_path, plan(gpus((8, 0))), "hosts.txt")
    assert command[1:5] == ["-m", "deepspeed.launcher.runner", "--hostfile", "hosts.txt"]
    assert "--module" in command and WORKER_MODULE in command


def test_loader_threads_follow_the_cores_unless_set():
    small = ["data.workers=-1"]
    assert plan(gpus((8, 6), (8, 6)), overrides=small).dataloader_workers == 8  # 32 threads / 2 GPUs, capped at 8
    twelve = Rig(cpu=Cpu(cores=6, threads=12), ram_gib=64.0)
    assert plan(twelve, overrides=small).dataloader_workers == 8  # 12 threads, one process: capped at 8
    assert plan(twelve, overrides=[*small, "train.nproc=4"]).dataloader_workers == 2  # 12 / 4 - 1
    assert plan(CPU_BOX, overrides=small).dataloader_workers == 1  # never fewer than one
    fixed = plan(twelve, overrides=["data.workers=0"])
    assert fixed.dataloader_workers == 0 and "set by the config" in fixed.reasons["dataloader_workers"]


def test_deepspeed_config_carries_the_buckets_the_planner_counts():
    from rigtrain.rig.budget import BUCKET_ELEMENTS
    from rigtrain.train.engine import deepspeed_config

    zero = deepspeed_config(load_config("base", overrides=["train.zero_stage=3"]), "bf16", 2)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == BUCKET_ELEMENTS
    assert zero["stage3_max_live_parameters"] == 2 * BUCKET_ELEMENTS


def test_the_users_thread_count_and_p2p_setting_win_over_the_plans():
    """As with torchrun: OMP_NUM_THREADS or NCCL_P2P_DISABLE set in the user's environment is
    what the run gets, and the plan says so beside what it would have set (tests/test_train.py
    starts a run with it)."""
    from rigtrain.rig.rig_file import read_rig_file
    from rigtrain.train.planning import with_user_environment

    two = plan(CPU_BOX, overrides=["train.nproc=2"])  # the plan: one thread per process
    mine = with_user_environment(two, {"OMP_NUM_THREADS": "2", "NCCL_P2P_DISABLE": "0"})
    assert mine.env["OMP_NUM_THREADS"] == "2" and "NCCL_P2P_DISABLE" not in mine.env  # the plan set no P2P here
    assert mine.reasons["env.OMP_NUM_THREADS"].startswith("set in your environment (the plan would set 1: 2 hardware")
    no_p2p = plan(read_rig_file(Path(__file__).parent / "rigs" / "four_4090_no_p2p.json"), preset="small")
    assert no_p2p.env["NCCL_P2P_DISABLE"] == "1"
    kept = with_user_environment(no_p2p, {"NCCL_P2P_DISABLE": "0", "CUDA_VISIBLE_DEVICES": "1"})
    assert kept.env["NCCL_P2P_DISABLE"] == "0" and "set in your environment" in kept.reasons["env.NCCL_P2P_DISABLE"]
    louder = with_user_environment(no_p2p, {"NCCL_DEBUG": "INFO"})
    assert louder.env["NCCL_DEBUG"] == "INFO" and "the plan would set WARN" in louder.reasons["env.NCCL_DEBUG"]
    assert kept.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # the selection is machine_rig's (rig/visible.py)
    assert with_user_environment(plan(CPU_BOX), {}).env["OMP_NUM_THREADS"] == "2"  # nothing set: the plan's


MALLOC_STEP = """
import os, resource, sys
import numpy as np
from rigtrain.train.worker import apply_malloc_settings
os.environ.update(json.loads(sys.argv[1]))
apply_malloc_settings()
def faults_of_a_step():  # a 64 MiB activation made and freed, as each step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = np.ones(16 << 20, dtype=np.float32)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step()
print(max(faults_of_a_step() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_on_the_cpu_freed_tensors_stay_in_the_heap_for_the_next_step():
    """No caching allocator on the CPU: glibc gave every large freed tensor back to the
    kernel, and the next step faulted the same pages in again (5x the page faults of a demo
    step). The CPU plan sets malloc's thresholds; the worker applies them in its own process,
    which started before the plan; a user's own values win."""
    import subprocess

    from rigtrain.train.planning import with_user_environment

    planned = plan(CPU_BOX)
    settings = {k: planned.env[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    assert settings == {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    assert "heap" in planned.reasons["env.MALLOC_MMAP_THRESHOLD_"]
    mine = with_user_environment(plan(CPU_BOX), {"MALLOC_TRIM_THRESHOLD_": "0"})
    assert (
        mine.env["MALLOC_TRIM_THRESHOLD_"] == "0"
        and "set in your environment" in mine.reasons["env.MALLOC_TRIM_THRESHOLD_"]
    )
    gpu_plan = plan(gpus((8, 6)))
    assert not any(k.startswith("MALLOC_") for k in gpu_plan.env)  # torch's CUDA allocator caches already

    def faults(env: dict) -> int:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        code = "import json\n" + MALLOC_STEP
        out = subprocess.run([sys.executable, "-c", code, json.dumps(env)], capture_output=True, text=True, env=clean)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout)

    as_it_was, planned_faults = faults({}), faults(settings)
    assert as_it_was >= 16 and planned_faults <= as_it_was // 10, (as_it_was, planned_faults)


def test_a_run_trained_with_deepspeeds_bf16_weights_is_not_resumed_but_can_seed_a_new_one(tmp_path):
    """Runs from before bf16 moved to autocast hold bf16 weights and BF16_Optimizer's states:
    --resume says so in one line (exit 2) and names --init-from, which loads their weights."""
    import json

    from conftest import run_cli

    run = tmp_path / "old"
    run.mkdir()
    plan = {"precision": "bf16", "deepspeed": {"bf16": {"enabled": True}}}
    (run / "config.json").write_text(json.dumps({"config": load_config("demo").to_dict(), "plan": plan}))
    result = run_cli("train", "--out", str(run), "--resume", "--steps", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "DeepSpeed's bf16 weights" in result.stderr and f"--init-from {run}" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # nothing written


WORKER_ENDING = """
import atexit, sys
import json
from pathlib import Path
atexit.register(lambda: Path(sys.argv[1]).write_text("teardown ran"))
print("said before the end", end="")  # no newline: still in the buffer when the worker ends
from rigtrain.train.stopping import exit_without_teardown
exit_without_teardown(3)
"""


@pytest.mark.parametrize("module", ["rigtrain/train/worker.py", "rigtrain/tune/worker.py"])
def test_workers_end_with_their_code_and_output_but_without_the_interpreters_teardown(tmp_path, module):
    """The teardown destroys what gloo's and DeepSpeed's threads still hold and now and then
    aborts a worker whose run had finished and saved (SIGABRT): a worker ends with
    os._exit once everything is written, its exit code and buffered output kept."""
    import subprocess
    import sys

    marker = tmp_path / "atexit"
    ended = subprocess.run(
        [sys.executable, "-c", WORKER_ENDING, str(marker)], capture_output=True, text=True, timeout=60
    )
    assert ended.returncode == 3 and ended.stdout == "said before the end"
    assert not marker.exists()  # atexit and the rest of the teardown were skipped
    source = (Path(__file__).parents[1] / module).read_text()
    assert "exit_without_teardown(main())" in source.split('if __name__ == "__main__":')[1]


def test_a_process_that_dies_after_the_last_checkpoint_leaves_a_complete_run(tmp_path, capsys):
    """A rank that aborts while shutting down, after the run's last checkpoint is complete,
    is reported as such and the command succeeds; before that, it asks for --resume."""
    from rigtrain.train.launch import _finish

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"train": {"steps": 4}}}))

    def saved(step: int) -> None:
        tag = run / "checkpoints" / f"step{step:08d}"
        tag.mkdir()
        (tag / "complete.json").write_text(json.dumps({"step": step, "files": {}}))

    saved(2)
    assert _finish(run, -6, 1) == 1
    said = capsys.readouterr().err
    assert said.startswith("rigtrain: training process rank 1 was killed by SIGABRT (a library gave up: NCCL's")
    assert said.endswith(
        f"the last complete checkpoint is step 2; continue with: rigtrain train --out {run} --resume\n"
    )
    saved(4)
    assert _finish(run, -6) == 0
    said = capsys.readouterr()
    assert "a training process was killed by SIGABRT" in said.err
    assert "after the run had finished and saved its last checkpoint (step 4)" in said.err
    assert "--resume" not in said.err and f"run: {run}" in said.out


def test_the_rank_that_brought_a_run_down_is_the_one_named():
    """The survivors of a dead rank exit with 1 when their collective breaks, so a rank
    killed by a signal is the cause before one that exited, whatever their order."""
    from rigtrain.train.processes import how_it_ended, the_first_to_fail

    assert the_first_to_fail([1, -9]) == 1
    assert the_first_to_fail([None, -11, 1]) == 1
    assert the_first_to_fail([1, None, 1]) == 0  # exits alone: the lowest rank
    assert the_first_to_fail([None, 0, None]) is None
    assert how_it_ended(-9, 3).startswith("training process rank 3 was killed by SIGKILL (on Linux most often the")
    assert (
        how_it_ended(-11)
        == "a training process was killed by SIGSEGV (a crash in native code: a driver or a library's kernel)"
    )
    assert how_it_ended(-64) in (
        "a training process was killed by SIGRTMAX",
        "a training process was killed by signal 64",
    )
    assert how_it_ended(3, 0) == "training process rank 0 ended with exit code 3"


FAILING_RANK = """
import os, sys
from rigtrain.train.worker import say_failure
say_failure(f"the disk is full (rank {os.environ['RANK']})")
sys.exit(1)
"""


def test_ranks_that_meet_the_same_fault_say_it_once(capfd, tmp_path, monkeypatch):
    """A full disk, data gone, a loss no longer finite: every rank meets it, and the user
    reads one line, the first rank's, not one per rank."""
    from rigtrain.train.processes import run_local_ranks
    from rigtrain.train.worker import FAULT_SAID, say_failure

    code, rank = run_local_ranks([sys.executable, "-c", FAILING_RANK], 3, dict(os.environ))
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("rigtrain:")]
    assert (code, len(said)) == (1, 1), said  # (the rank named: whichever exit the launcher saw first)
    assert said[0].startswith("rigtrain: the disk is full (rank ")
    # a rank on another machine has no launcher's folder here: it says its line
    monkeypatch.setenv(FAULT_SAID, str(tmp_path / "not-here" / "fault-said"))
    say_failure("one")
    say_failure("two")
    assert capfd.readouterr().err == "rigtrain: one\nrigtrain: two\n"


# DeepSpeed's per-machine launch process, as it starts its ranks on one node of a
# multi-node run: CROSS_RANK set, our launcher's FAULT_SAID not (the runner does not
# forward it to other machines)
NODE_LAUNCHER = """
import os, subprocess, sys
env = {k: v for k, v in os.environ.items() if k != "RIGTRAIN_FAULT_SAID"}
ranks = [subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={**env, "CROSS_RANK": "1", "RANK": str(r)})
         for r in range(3)]
sys.exit(max(p.wait() for p in ranks))
"""


@pytest.mark.parametrize(
    "command, said",
    [
        (["rigtrain", "train", "--hostfile", "hosts.txt", "--out", "RUN"], " --hostfile hosts.txt"),
        (["rigtrain", "train", "--hostfile=my hosts", "--resume"], " --hostfile 'my hosts'"),
        (["rigtrain", "train", "--preset", "small"], ""),
        (None, ""),  # no config.json (or one that cannot be read)
    ],
)
def test_the_resume_command_a_run_is_told_keeps_its_machines(tmp_path, command, said):
    """Every line that says how to go on: a run of several machines resumed without its
    hostfile would be planned for this machine alone."""
    from rigtrain.train.run_record import resume_command

    run = tmp_path / "a run"
    run.mkdir()
    if command is not None:
        (run / "config.json").write_text(json.dumps({"config": {}, "command": command}))
    assert resume_command(run) == f"rigtrain train --out '{run}' --resume{said}"
    assert resume_command(run, "--set", "train.lr=...").endswith(f"--resume{said} --set train.lr=...")


def test_what_a_launcher_killed_with_sigkill_left_in_tmp_goes_at_the_next_launch(tmp_path, monkeypatch):
    """Its ranks' folder (a port file, the fault mark) and a multi-node fault mark, where the
    process that made them is gone; a live launcher's, and names of other kinds, stay."""
    import tempfile

    from rigtrain.train.processes import run_local_ranks
    from rigtrain.train.rendezvous import LAUNCHER_LOCK

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()  # its id is free now
    left = {
        f"rigtrain-ranks-{gone.pid}-x1y2": False,  # before launchers took a lock: its process is gone
        f"rigtrain-ranks-{os.getpid()}-x1y2": True,  # alive (this process)
        f"rigtrain-ranks-{os.getpid()}-free": False,  # its lock free: gone, whatever its id says
        f"rigtrain-ranks-{gone.pid}-held": True,  # its lock held (another PID namespace's launcher)
        f"rigtrain-fault-said-{gone.pid}-4242": False,
        f"rigtrain-fault-said-{os.getpid()}-4242": True,
        "rigtrain-ranks-x1y2": True,  # no process id in its name: not ours to judge
    }
    for name in left:
        if "ranks" in name:
            (tmp_path / name).mkdir()
            (tmp_path / name / "port").write_text("29500")
        else:
            (tmp_path / name).touch()
    (tmp_path / f"rigtrain-ranks-{os.getpid()}-free" / LAUNCHER_LOCK).touch()
    hold = "import fcntl, sys, time; f = open(sys.argv[1], 'wb'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"  # noqa: E501
    held_lock = tmp_path / f"rigtrain-ranks-{gone.pid}-held" / LAUNCHER_LOCK
    holder = subprocess.Popen([sys.executable, "-c", hold, str(held_lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_local_ranks([sys.executable, "-c", "pass"], 1, dict(os.environ)) == (0, None)
    finally:
        holder.kill()
        holder.wait()
    assert {p.name for p in tmp_path.iterdir()} == {name for name, stays in left.items() if stays}


def test_ranks_deepspeeds_launcher_started_on_one_machine_say_a_fault_once(tmp_path):
    """A multi-node run: one line per machine, not one per rank, and a later launch on the
    same machine (a new parent) says its own."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the machine's mark is left
    for launch in range(1, 3):
        node = subprocess.run(
            [sys.executable, "-c", NODE_LAUNCHER, FAILING_RANK], capture_output=True, text=True, env=env
        )
        said = [line for line in node.stderr.splitlines() if line.startswith("rigtrain:")]
        assert node.returncode == 1 and len(said) == 1, node.stderr[-2000:]
        assert said[0].startswith("rigtrain: the disk is full (rank ")
        assert len(list(tmp_path.glob("rigtrain-fault-said-*"))) == launch


def test_a_collective_broken_by_a_dead_peer_is_recognised_only_with_peers(monkeypatch):
    from rigtrain.train.worker import lost_peer

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:2949: Connection reset by peer.")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_peer(gloo) == "connection reset by peer"
    assert lost_peer(RuntimeError("NCCL error: remote process exited or there was a network error")) is not None
    assert lost_peer(RuntimeError("mat1 and mat2 must have the same dtype")) is None  # a bug keeps its traceback
    assert lost_peer(ValueError("connection reset by peer")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lost_peer(gloo) is None


def test_a_collective_that_waited_too_long_is_one_line_with_the_checkpoint(monkeypatch, tmp_path):
    from rigtrain.train.worker import peer_trouble

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    waited = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1800000ms for recv operation")
    said = peer_trouble(tmp_path, None, waited)
    assert said.startswith("rank 1 stopped while starting: it waited longer than train.collective_timeout_min for")
    assert said.endswith(f"no checkpoint was complete yet; continue with: rigtrain train --out {tmp_path} --resume")
    gone = peer_trouble(tmp_path, None, RuntimeError("Connection closed by peer [127.0.0.1]:4242"))
    assert (
        gone
        == "rank 1 stopped while starting: the connection to another training process broke (connection closed by peer)"
    )
    assert peer_trouble(tmp_path, None, RuntimeError("mat1 and mat2 must have the same dtype")) is None


def test_a_machine_that_does_not_answer_never_hangs_a_multi_node_stop(tmp_path):
    """The first Ctrl-C of a --hostfile run goes to every machine through pdsh; a machine
    that stopped answering left pdsh waiting, and the launcher with it, for ever. Here pdsh
    never returns: the launcher gives up on it after PDSH_TIMEOUT_S, waits for DeepSpeed's
    launcher as before, and exits 130 without a traceback."""
    from conftest import run_script

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pdsh").write_text("#!/bin/sh\nexec sleep 600\n")
    (fake / "pdsh").chmod(0o755)
    script = tmp_path / "stop.py"
    script.write_text(f"""
import os, signal, sys, threading, time
from pathlib import Path
from rigtrain.train import processes

processes.PDSH_TIMEOUT_S = 1.0
os.environ["PATH"] = "{fake}:" + os.environ["PATH"]
runner = [sys.executable, "-c", "import time; time.sleep(4)"]  # DeepSpeed's launcher, ending on its own
def ctrl_c_once_it_listens():
    # Ctrl-C once run_on_machines has its own handler (not Python's, nor SIG_IGN where the
    # suite runs in the background): a timer fixed at 0.5 s landed, on a busy machine, while
    # Popen was still starting the runner, where the command line says "interrupted" in one
    # line, which is not what this test is about
    while (handler := signal.getsignal(signal.SIGINT)) is signal.default_int_handler or not callable(handler):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=ctrl_c_once_it_listens, daemon=True).start()
started = time.monotonic()
code = processes.run_on_machines(runner, Path("{tmp_path / "run"}"), ["node1", "node2"], dict(os.environ))
print("CODE", code, round(time.monotonic() - started, 1))
""")
    result = run_script(script, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    code, seconds = result.stdout.split("CODE ")[1].split()
    assert int(code) == 130 and float(seconds) < 30, result.stdout


def test_a_multi_node_stop_signals_the_workers_and_not_deepspeeds_launchers(tmp_path):
    """The first Ctrl-C of a --hostfile run is sent by pkill to each machine's workers, which
    save. DeepSpeed's runner and per-node launchers name the worker module too, and run on the
    machine a run starts from: a signal to the runner sets off its own handler, which killed
    the workers while they saved (and printed a traceback). Real processes with those command
    lines, matched by pgrep, pkill's own matcher."""
    import subprocess
    import sys

    from rigtrain.train.processes import worker_pattern

    run = (tmp_path / "run").resolve()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    lines = {
        "worker": ["-u", "-m", WORKER_MODULE, "--local_rank=0", "--run-dir", str(run)],
        "runner": [
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            "h",
            "--module",
            WORKER_MODULE,
            "--run-dir",
            str(run),
        ],
        "node launcher": ["-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--node_rank=0", "--module"]
        + ["--enable_each_rank_log=None", WORKER_MODULE, "--run-dir", str(run)],
        "another run's worker": ["-u", "-m", WORKER_MODULE, "--local_rank=0", "--run-dir", f"{run}-2"],
    }
    processes = {name: subprocess.Popen(sleeper + args) for name, args in lines.items()}
    try:
        found = subprocess.run(["pgrep", "-f", worker_pattern(run)], capture_output=True, text=True)
        pids = {int(pid) for pid in found.stdout.split()}
        assert pids == {processes["worker"].pid}, {name: p.pid for name, p in processes.items()}
    finally:
        for process in processes.values():
            process.kill()
            process.wait()


def test_commands_started_in_the_same_second_get_run_folders_of_their_own(tmp_path, monkeypatch):
    """Without --out a run goes to runs/DATE-TIME-PRESET. Two commands started in the same
    second (a script starting several; the test suite's workers did) took the same folder,
    and the second was refused as a second run in a live folder. Making the folder is the
    claim now: eight processes at once get eight folders."""
    import subprocess
    import sys

    from rigtrain.train.processes import new_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20261205-120000")
    assert [new_run_dir("demo").as_posix() for _ in range(3)] == [
        "runs/20261205-120000-demo",
        "runs/20261205-120000-demo-2",
        "runs/20261205-120000-demo-3",
    ]
    claim = "import time; time.strftime = lambda *a: 'X'; from rigtrain.train.processes import new_run_dir; "
    claim += "print(new_run_dir('many'))"
    processes = [
        subprocess.Popen([sys.executable, "-c", claim], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        for _ in range(8)
    ]
    made = [p.communicate(timeout=60)[0].strip() for p in processes]
    assert len(set(made)) == 8 and all(Path(tmp_path, m).is_dir() for m in made), made
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot make a run folder in .*file.*; give one with --out"):
        new_run_dir("demo", parent=tmp_path / "file")


@pytest.mark.parametrize("content, kept", [(b"", False), (b"x", True)])
def test_only_a_folder_with_nothing_written_in_it_is_removed(tmp_path, content, kept):
    from rigtrain.train.processes import RunLock

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    with pytest.raises(UserError), RunLock(run, made_here=True):
        (run / "logs" / "rank-0.log").write_bytes(content)
        raise UserError("the data is too small")
    assert run.is_dir() == kept
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError), RunLock(tmp_path / "mine"):  # not made by this command: kept, even empty
        raise UserError("the data is too small")
    assert (tmp_path / "mine").is_dir()


MEET_AND_SUM = """
import os, torch, torch.distributed as dist
from rigtrain.train.engine import init_distributed
init_distributed({"device": "cpu"}, int(os.environ["LOCAL_RANK"]), timeout_min=1.0)
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: {total.item():g}", flush=True)
dist.destroy_process_group()
# as a training worker ends: the interpreter's teardown of gloo's threads now and then aborts
# after all is done ("terminate called without an active exception", seen here in CI)
from rigtrain.train.stopping import exit_without_teardown
exit_without_teardown(0)
"""


@pytest.mark.parametrize("world", [1, 2])
def test_ranks_meet_on_a_port_of_their_own_even_where_master_port_is_taken(tmp_path, world):
    """Rank 0's store binds a port the kernel gives it and tells the others through the
    launcher's folder (rendezvous.py): a port chosen ahead and taken meanwhile by another
    process (EADDRINUSE at start-up, seen when several runs started at once) cannot stop it."""
    import socket  # a listener of another program's, on the port the environment names

    from rigtrain.train.rendezvous import port_file_env

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **os.environ,
            **port_file_env(tmp_path),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(taken.getsockname()[1]),
            "WORLD_SIZE": str(world),
            "DS_ACCELERATOR": "cpu",
        }
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", MEET_AND_SUM],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(world)
        ]
        outputs = [p.communicate(timeout=120)[0] for p in ranks]
    expected = sum(range(1, world + 1))
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, output
        assert f"rank {rank} of {world}: {expected}" in output
