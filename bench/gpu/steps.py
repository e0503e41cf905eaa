"""The kit's steps (kit.py runs them): each runs `python -m rigtrain` as a user would and
reads what the run left behind."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ("demo", "small", "base")
GPU_STEPS = {"demo": 30, "small": 24, "base": 14}  # the profile window ends at step 6
# small once more with train.compile=true: torch.compile's fused kernels against the eager
# run's launches (the first GPU runs were host-bound); on a GPU only unless asked for with
# --only, since compiling the model takes minutes on a small CPU
COMPILED = "small-compiled"
CPU_STEPS = 8
# The CPU mode's toy sizes: every part of the model, each preset's data, steps of a second.
CPU_SETTINGS = ["model.d_model=32", "model.heads=2", "model.num_latents=8", "model.va_dim=32", "model.vt_dim=32"]
CPU_SETTINGS += ["train.micro_batch_size=4", "train.grad_accum_steps=1", "train.global_batch_size=0"]
CPU_SETTINGS += ["train.precision=bf16"]  # DeepSpeed trains bf16 on the CPU: the GPU's precision path
# One recorded step, not three: base's trace is 40 thousand CPU ops a step, seconds to save
# and read back on the CPU, and one step shows the verdict and its breakdown as well.
CPU_SETTINGS += ["profile.active=1"]
# What the telemetry sampler writes into metrics.jsonl on a GPU (rigtrain/profile/telemetry.py).
NVML_FIELDS = (
    "gpu_util_percent",
    "gpu_mem_used_gib",
    "gpu_mem_used_max_gib",
    "gpu_power_w",
    "gpu_temp_c",
    "gpu_temp_max_c",
    "gpu_sm_clock_mhz",
    "gpu_pcie_rx_mb_s",
    "gpu_pcie_tx_mb_s",
    "gpu_pcie_width",
    "gpu_throttled",
)
GIB = 2**30
# The goals on one H100 in bf16 (MFU counted with FlopCounterMode, rigtrain/train/flops.py)
MFU_GOALS = {"small": 0.35, "base": 0.45, "small-compiled": 0.35}


@dataclass
class Finished:
    code: int
    output: str
    nvml_peak_gib: float | None  # the most NVML saw its processes use, summed over GPUs


class Deadline:
    """The kit's time limit (--deadline-s), for a machine lent for a fixed time: a step starts
    only with a minute left, and what it runs is stopped in time for the report to be written,
    so the steps that finished are reported rather than lost with the ones that did not."""

    def __init__(self, seconds: float | None):
        self._ends = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self._ends is None else max(0.0, self._ends - time.monotonic())

    def allows_a_step(self) -> bool:
        return self.left() >= MIN_STEP_S

    def limit(self, seconds: float) -> float:
        """A command's time limit: its own, or what is left less the time it gets to stop."""
        return max(1.0, min(seconds, self.left() - STOP_GRACE_S))


NO_DEADLINE = Deadline(None)
MIN_STEP_S = 60  # less than this left: the step would be stopped before it measured anything
STOP_GRACE_S = 20  # after SIGTERM a training run finishes its step, saves and exits; then SIGKILL


def command(out: Path, name: str, argv: list[str], env: dict | None, timeout: float) -> Finished:
    """ARGV run from the repository's root, its output kept in OUT/logs/NAME.log; stopped at
    TIMEOUT seconds as a user would stop it (SIGTERM, then SIGKILL for its whole group)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env or os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the ranks it starts are stopped with it
    )
    with NvmlProcessMemory(started.pid) as memory:
        try:
            text, _ = started.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            text = _stop(started) + f"\n[kit] stopped after {timeout:.0f} s, its time limit"
    (out / "logs" / f"{name}.log").write_text(text)
    return Finished(started.returncode, text, memory.peak_gib)


def _stop(process: subprocess.Popen) -> str:
    # SIGTERM to the top process alone: rigtrain forwards it to its ranks once, and they save
    # and exit; a second signal to each rank would make them exit without saving.
    process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=STOP_GRACE_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()[0]


def rigtrain(out: Path, name: str, *args: str, env: dict | None = None, deadline: Deadline = NO_DEADLINE) -> Finished:
    """`python -m rigtrain ARGS`, as a user runs it (at most 15 minutes, or to the deadline)."""
    return command(out, name, [sys.executable, "-m", "rigtrain", *args], env, deadline.limit(900))


class NvmlProcessMemory:
    """The most NVML saw in use by a process and its children, summed over the GPUs (what
    nvidia-smi lists per process: the CUDA context, NCCL and the caching allocator's pool).
    None without NVML or where the container hides the processes' PIDs from it."""

    def __init__(self, pid: int):
        self.pid, self.peak_gib = pid, None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVIDIA driver: the CPU mode
            self._nvml, self._handles = None, []

    def __enter__(self) -> NvmlProcessMemory:
        if self._handles:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._handles:
            self._thread.join(timeout=5)

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            try:
                root = psutil.Process(self.pid)
                pids = {self.pid} | {p.pid for p in root.children(recursive=True)}
            except psutil.Error:
                return
            used = 0
            for handle in self._handles:
                try:
                    processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                except Exception:
                    continue
                used += sum(p.usedGpuMemory or 0 for p in processes if p.pid in pids)
            if used:
                self.peak_gib = max(self.peak_gib or 0.0, used / GIB)


def environment() -> dict:
    import importlib.util

    import torch

    facts = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    for package in ("deepspeed", "bitsandbytes", "av", "soundfile", "torch_tb_profiler", "pynvml", "matplotlib"):
        facts[package] = importlib.util.find_spec(package) is not None
    try:
        import pynvml

        pynvml.nvmlInit()
        facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        facts["driver"] = None
    return facts


def gpu_tests(out: Path, deadline: Deadline = NO_DEADLINE) -> dict:
    """The tests marked gpu, with their own pass/fail/skip counts."""
    started = time.perf_counter()
    junit = out / "gpu-tests.xml"
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    finished = command(out, "gpu-tests", argv + ["--junitxml", str(junit), "tests"], None, deadline.limit(600))
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        tests, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        counts = {"passed": tests - failed - int(suite.get("skipped", 0)), "failed": failed}
        counts["skipped"] = int(suite.get("skipped", 0))
    ok = finished.code in (0, 5) and counts["failed"] == 0  # 5: nothing collected is not a failure here
    return {**counts, "ok": ok, "exit_code": finished.code, "seconds": round(time.perf_counter() - started, 1)}


def rows_of(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def median_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return round(statistics.median(values), 4) if values else None


def preset_run(
    out: Path, preset: str, gpu: bool, deadline: Deadline = NO_DEADLINE, name: str | None = None, extra: tuple = ()
) -> dict:
    """One profiled training run, as `rigtrain profile` plans and runs it: the plan with its
    memory terms (config.json), memory, throughput, verdict, telemetry. NAME (default the
    preset's) names its run folder and log; EXTRA are further `--set` settings."""
    settings = ([] if gpu else CPU_SETTINGS) + list(extra)
    if not gpu and preset == "base":  # its 192 embedded videos feed a GPU's 256-clip steps, not 4
        settings.append("data.synth_videos=48")
    steps = GPU_STEPS[preset] if gpu else CPU_STEPS
    name = name or preset
    run = out / "runs" / name
    started = time.perf_counter()
    trained = rigtrain(
        out,
        f"{name}-train",
        "profile",
        "--preset",
        preset,
        "--out",
        str(run),
        "--steps",
        str(steps),
        "--set",
        *settings,
        "train.log_every=1",
        f"train.ckpt_every={steps}",
        "eval.during_training=false",
        deadline=deadline,
    )
    record = {"exit_code": trained.code, "seconds": round(time.perf_counter() - started, 1)}
    if trained.code != 0:
        record["error"] = last_line(trained.output)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    used_plan = config.get("plan", {})
    rows = rows_of(run)
    after_window = [r for r in rows if r.get("step", 0) > 7] or rows  # past the profiler's window
    summary_path = run / "profile" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    check = config.get("memory_check") or {}
    record.update(
        plan={
            k: used_plan.get(k)
            for k in ("precision", "micro_batch_size", "grad_accum_steps", "zero_stage", "activation_checkpointing")
        }
        | {"dataloader_workers": used_plan.get("dataloader_workers"), "memory_terms": used_plan.get("memory")},
        memory={
            "predicted_peak_gib": used_plan.get("predicted_peak_gib"),
            "max_memory_allocated_gib": check.get("measured_peak_gib"),
            "max_memory_reserved_gib": check.get("reserved_peak_gib"),
            "card_used_after_first_step_gib": check.get("card_used_gib"),
            "nvml_process_max_gib": _round(trained.nvml_peak_gib),
            "predicted_card_total_gib": (used_plan.get("memory") or {}).get("card_total_gib"),
            "predicted_run_total_gib": (used_plan.get("memory") or {}).get("run_total_gib"),
        },
        throughput={
            "clips_per_s": median_of(after_window, "samples_per_s"),
            "tflops_per_gpu": median_of(after_window, "tflops_per_gpu"),
            "mfu": median_of(after_window, "mfu"),
            "steps_logged": len(rows),
        },
        profile={
            "verdict": summary.get("verdict"),
            "because": summary.get("because"),
            "breakdown": summary.get("breakdown"),
            "data_wait_share": (summary.get("breakdown") or {}).get("data_wait"),
            "achieved_tflops_per_device": summary.get("achieved_tflops_per_device"),
            "mfu": summary.get("mfu"),
            "suggestions": summary.get("suggestions"),
        },
        telemetry=telemetry_of(rows, gpu),
    )
    return record


def telemetry_of(rows: list[dict], gpu: bool) -> dict:
    present = sorted({k for r in rows for k in r if k in NVML_FIELDS})
    costs = [r["telemetry_cost"] for r in rows if isinstance(r.get("telemetry_cost"), (int, float))]
    return {
        "nvml_fields_missing": sorted(set(NVML_FIELDS) - set(present)) if gpu else None,
        "sampler_cost": max(costs) if costs else None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"
