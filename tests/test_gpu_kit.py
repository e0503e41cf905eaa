"""The GPU run kit (bench/gpu/) proves itself on the CPU: `bash bench/gpu/run.sh --cpu OUT`
runs every step a GPU box runs (the gpu tests, a plan and a profiled bf16 run per preset,
the first-step out-of-memory back-off) at toy sizes, into a report of the same shape with
the GPU-only figures null."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))  # the kit's modules import each other by name
import steps  # noqa: E402  (the kit's steps module, found through the path above)


def run_kit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`bash bench/gpu/run.sh ARGS` with this interpreter, as a user runs it."""
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu" / "run.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.long
def test_the_kit_runs_every_step_on_the_cpu(tmp_path, demo_data):
    out = tmp_path / "kit"
    result = run_kit("--cpu", str(out), "--deadline-s", "3000", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cpu" and report["failures"] == [] and report["complete"] and report["skipped"] == []
    tests = report["gpu_tests"]
    assert tests["ok"] and tests["failed"] == 0 and tests["skipped"] >= 2  # collected, and skipped without a GPU
    assert set(report["presets"]) == {"demo", "small", "base"}
    for preset, run in report["presets"].items():
        assert run["exit_code"] == 0, (preset, run.get("error"))
        assert run["plan"]["precision"] == "bf16" and run["plan"]["micro_batch_size"] == 4
        assert run["throughput"]["clips_per_s"] > 0 and run["throughput"]["steps_logged"] == 8
        assert run["profile"]["verdict"] in ("input-bound", "host-bound", "compute-bound", "communication-bound")
        assert 0 <= run["profile"]["data_wait_share"] < 1 and run["profile"]["breakdown"]
        assert run["memory"]["predicted_peak_gib"] > 0
        # what only a GPU can say is null, not made up
        gpu_only = ("max_memory_allocated_gib", "max_memory_reserved_gib", "nvml_process_max_gib")
        assert all(run["memory"][k] is None for k in gpu_only)
        assert run["throughput"]["mfu"] is None and run["telemetry"]["nvml_fields_missing"] is None
        # measured and judged by the kit (a target, not a timed test: toy runs of seconds on a
        # busy machine put it near 1%)
        assert 0 <= run["telemetry"]["sampler_cost"] < 1
        assert report["targets"][f"{preset}: telemetry sampler < 1% of wall time"]["met"] in (True, False)
        assert (out / "logs" / f"{preset}-train.log").is_file()
    # the main job as a user first runs it, in the plan's bf16 and in fp32, judged by what it learned
    for key, precision in (("main_job", "bf16"), ("main_job_fp32", "fp32")):
        job = report[key]
        assert job["exit_code"] == 0 and job["plan"]["precision"] == precision, job
        assert job["steps"] == 8 and 0 < job["train_seconds"] < job["seconds"]
        assert 0 < job["median_step_s"] < job["train_seconds"] / 4  # steps 4, 6 and 8, past the start
        assert job["loss_end_mean"] > 0 and 0 <= job["eval"]["t2v_r5"] <= 1 and job["eval"]["knn_colour_top1"] > 0
    assert (
        report["targets"]["demo main job: bf16 ends within 5% of fp32's loss"]["met"] is None
    )  # 8 toy steps judge nothing
    assert isinstance(report["targets"]["demo main job: bf16 ends within 5% of fp32's loss"]["value"], float)
    assert "main_job_fp32: fp32 ZeRO-0 mb 4, 8 steps in" in result.stdout
    fast = report["targets"]["demo main job: a step's median under 25 ms"]
    assert fast["value"] == report["main_job"]["median_step_s"] and fast["met"] is None  # a CPU judges nothing
    backoff = report["oom_backoff"]
    assert backoff["ok"] and backoff["tried_micro_batches"] == [48] and backoff["finished_at_micro_batch"] == 42
    assert backoff["steps_logged"] == [1, 2, 3]
    targets = report["targets"]
    assert targets["first-step out-of-memory: backs off and finishes"]["met"] is True
    assert targets["small: MFU >= 35% (goal on an H100)"]["met"] is None
    assert "| base | bf16 mb 4x1 ZeRO-0 |" in result.stdout and "targets:" in result.stdout
    # what to send from someone else's card: all but the checkpoints, profiler traces included
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "kit-results/report.json" in names and "kit-results/logs/base-train.log" in names
    assert "kit-results/runs/small/metrics.jsonl" in names and "kit-results/runs/small/config.json" in names
    assert any(n.startswith("kit-results/runs/base/tb/profile/") and ".pt.trace.json" in n for n in names)
    assert not any("checkpoints" in n or n.endswith(".lock") for n in names)


def test_a_kit_past_its_deadline_reports_what_it_skipped(tmp_path):
    out = tmp_path / "kit"
    result = run_kit("--cpu", str(out), "--deadline-s", "0")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    skipped = ["gpu_tests", "demo", "small", "base", "main_job", "oom_backoff", "main_job_fp32"]
    assert report["skipped"] == skipped and report["failures"] == []
    assert all(target["met"] is None for target in report["targets"].values())  # nothing judged that never ran
    assert f"INCOMPLETE: {', '.join(skipped)} skipped at the deadline" in result.stdout
    assert (out / "results.tar.gz").is_file()


SAVES_ON_SIGTERM = """
import signal, sys, time
def stop(*_):
    print("saving the step in flight", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("training", flush=True)
time.sleep(60)
"""

IGNORES_SIGTERM_WITH_A_RANK = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited: the rank ignores it too
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(rank.pid, flush=True)
time.sleep(60)
"""


def test_a_step_at_its_time_limit_is_stopped_as_a_user_would(tmp_path, monkeypatch):
    # SIGTERM first: rigtrain finishes the step in flight, saves and exits 143
    finished = steps.command(tmp_path, "saves", [sys.executable, "-c", SAVES_ON_SIGTERM], None, timeout=2)
    assert finished.code == 143 and "saving the step in flight" in finished.output
    assert "[kit] stopped after 2 s, its time limit" in (tmp_path / "logs" / "saves.log").read_text()
    # what does not stop after the grace is killed, with every process it started
    monkeypatch.setattr(steps, "STOP_GRACE_S", 1)
    began = time.monotonic()
    finished = steps.command(tmp_path, "stuck", [sys.executable, "-c", IGNORES_SIGTERM_WITH_A_RANK], None, timeout=2)
    assert finished.code == -9 and time.monotonic() - began < 30
    rank = int(finished.output.split()[0])
    for _ in range(100):  # SIGKILL is delivered when the rank is next scheduled
        if not psutil.pid_exists(rank) or psutil.Process(rank).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the rank {rank} outlived the kit's stop")


def test_a_fault_in_a_kit_step_is_that_steps_failure(tmp_path, capsys):
    import kit  # the kit's main module, beside steps (the path above)
    import report

    def broken():
        return {}["predicted_peak_gib"]

    record = kit._guarded(tmp_path, "demo", broken)
    assert record["ok"] is False and "KeyError" in record["error"]
    assert "Traceback" in (tmp_path / "logs" / "kit-demo.traceback").read_text()
    result = {"kit": 1, "mode": "gpu", "date": "-", "commit": None, "deadline_s": None, "skipped": []}
    result |= {"environment": {"gpus": ["NVIDIA H200"], "driver": "580", "torch": "2.11.0", "cuda": "13.0"}}
    result |= {"presets": {"demo": record}, "gpu_tests": kit._guarded(tmp_path, "gpu_tests", broken)}
    result["oom_backoff"] = {"ok": False, "error": "the small run left no memory figure to size the shortage from"}
    kit._save(tmp_path, result, 0.0, gpu=True)
    assert result["failures"] == [
        "demo: exit None",
        "the gpu tests failed",
        "the out-of-memory back-off did not finish",
    ]
    report.print_table(result)  # a table still, with the errors in it
    printed = capsys.readouterr().out
    assert "| demo | failed: the kit's step failed: KeyError" in printed and "FAILED: demo: exit None" in printed


def test_the_deadline_leaves_each_command_time_to_stop():
    assert steps.NO_DEADLINE.limit(900) == 900 and steps.NO_DEADLINE.allows_a_step()
    deadline = steps.Deadline(200)
    assert 200 - steps.STOP_GRACE_S - 2 < deadline.limit(900) <= 200 - steps.STOP_GRACE_S
    assert deadline.limit(30) == 30 and deadline.allows_a_step()
    assert not steps.Deadline(steps.MIN_STEP_S - 1).allows_a_step() and steps.Deadline(0).limit(900) == 1.0


@pytest.mark.slow
def test_the_kit_says_what_is_missing_in_one_line(tmp_path):
    result = run_kit(str(tmp_path / "kit"))
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the kit's GPU mode runs here")
    assert result.returncode == 2 and "no CUDA GPU here; use --cpu" in result.stderr, result.stderr[-2000:]
