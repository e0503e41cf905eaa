"""profile/: the verdict from hand-made traces, then from real runs made to be input-bound
and compute-bound on this CPU, and the TensorBoard plugin reading the trace."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli
from test_ingest import write_h264_with_aac

from rigtrain.profile.analysis import CATEGORIES, RunFacts, analyze, breakdown, verdict


def X(name, ts, dur, cat="user_annotation", tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": tid}


def cpu_trace(data_wait, forward, backward, optimizer, comm=0.0, steps=3):
    """Steps of 100 units: the given spans in sequence, the rest unclaimed."""
    events = []
    for k in range(steps):
        t = k * 100.0
        events.append(X(f"ProfilerStep#{k}", t, 100.0))
        for name, dur in (("data_wait", data_wait), ("forward", forward), ("backward", backward), ("optimizer", optimizer)):
            events.append(X(f"rigtrain/{name}", t, dur))
            if name == "backward" and comm:
                events.append(X("c10d::allreduce_", t + 1, comm, cat="cpu_op"))
            t += dur
    return events


FACTS = RunFacts(device="cpu", clips_per_step=16, world_size=1, loader_threads=1, cpu_threads=2,
                 data_is_raw_videos=True, zero_stage=1, micro_batch_size=16)


@pytest.mark.parametrize("trace, expected", [
    (cpu_trace(50, 20, 20, 5), "input-bound"),
    (cpu_trace(2, 40, 40, 10), "compute-bound"),
    (cpu_trace(2, 20, 50, 5, comm=40), "communication-bound"),
    (cpu_trace(2, 10, 10, 5), "host-bound"),  # 73% of each step outside the train step's spans
])
def test_verdict_on_made_up_cpu_traces(trace, expected):
    summary = analyze(trace, FACTS)
    assert summary["verdict"] == expected, summary
    assert sum(summary["breakdown"].values()) == pytest.approx(1.0, abs=1e-6)
    assert summary["suggestions"]


def test_gpu_breakdown_from_kernels():
    events = [X("ProfilerStep#1", 0, 100), X("rigtrain/data_wait", 0, 10), X("rigtrain/forward", 10, 30),
              X("rigtrain/backward", 40, 40), X("rigtrain/optimizer", 80, 20),
              X("ampere_sgemm", 12, 30, cat="kernel", tid=7), X("ampere_sgemm", 45, 30, cat="kernel", tid=7),
              X("ncclKernel_AllReduce_RING", 70, 15, cat="kernel", tid=8), X("multi_tensor_apply_kernel", 85, 10,
                                                                                  cat="kernel", tid=7)]
    fractions, numbers = breakdown(events, "cuda")
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert fractions["data_wait"] == pytest.approx(0.10)
    assert fractions["compute"] == pytest.approx(0.60) and fractions["optimizer"] == pytest.approx(0.10)
    assert fractions["communication"] == pytest.approx(0.10)  # 15 of NCCL, 5 of them hidden under a GEMM
    assert verdict(fractions)[0] == "compute-bound"
    facts = RunFacts(device="cuda", clips_per_step=32, world_size=1, loader_threads=4, cpu_threads=16,
                     data_is_raw_videos=False, zero_stage=1, micro_batch_size=32, flops_per_clip=1e9, peak_tflops=71.0)
    summary = analyze(events, facts)
    # 32 clips in 100 us -> 320,000 clips/s x 1 GFLOP = 320 TFLOPS: the arithmetic, not a real card
    assert summary["achieved_tflops_per_device"] == pytest.approx(320.0) and summary["mfu"] == pytest.approx(320 / 71, rel=1e-3)


def _summary(run: Path) -> dict:
    return json.loads((run / "profile" / "summary.json").read_text())


@pytest.fixture(scope="module")
def raw_720p(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw720")
    for k in range(2):
        write_h264_with_aac(folder / f"clip{k}.mp4", seconds=3.0, fps=30, size=(1280, 720), tone_hz=300 + 100 * k)
    return folder


def test_raw_720p_videos_without_workers_are_input_bound(raw_720p, tmp_path):
    run = tmp_path / "run"
    result = run_cli("profile", "--data", str(raw_720p), "--out", str(run),
                     "--set", "data.workers=0", "train.micro_batch_size=4", "eval.holdout=0", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(run)
    assert summary["verdict"] == "input-bound", summary
    assert summary["breakdown"]["data_wait"] > 0.5
    assert sum(summary["breakdown"].values()) == pytest.approx(1.0, abs=0.02)
    advice = " ".join(summary["suggestions"])
    assert "rigtrain data prepare" in advice and "data.workers" in advice
    assert "verdict: input-bound" in result.stdout


@pytest.fixture(scope="module")
def compute_bound_run(tmp_path_factory, demo_data):
    run = tmp_path_factory.mktemp("profiled") / "run"
    result = run_cli("profile", "--out", str(run), "--set", "model.d_model=256", "model.num_latents=64",
                     "data.workers=1", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_shards_with_a_loader_thread_and_a_larger_model_are_compute_bound(compute_bound_run):
    summary = _summary(compute_bound_run)
    assert summary["verdict"] == "compute-bound", summary
    assert set(summary["breakdown"]) == set(CATEGORIES)
    assert sum(summary["breakdown"].values()) == pytest.approx(1.0, abs=0.02)
    assert summary["numbers"]["steps"] == 3 and summary["achieved_tflops_per_device"] > 0
    trace = json.loads((compute_bound_run / summary["trace"]).read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    # the train loop's phases and the loader thread's reads on the same timeline
    assert {"rigtrain/data_wait", "rigtrain/forward", "rigtrain/backward", "rigtrain/loader_read"} <= names
    rows = [json.loads(line) for line in (compute_bound_run / "metrics.jsonl").read_text().splitlines()]
    assert all("host_cpu_percent" in r and r["telemetry_cost"] < 0.01 for r in rows)  # the sampler costs < 1%


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_trace_and_the_scalars(compute_bound_run):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(compute_bound_run / "tb"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, runs, tags = time.time() + 90, [], {}
        while time.time() < deadline:
            try:
                runs = _get(f"{base}/data/plugin/pytorch_profiler/runs")
                tags = _get(f"{base}/data/plugin/scalars/tags")
                if runs and (runs.get("runs") if isinstance(runs, dict) else runs) and "train" in tags:
                    break
            except OSError:
                pass
            time.sleep(1)
        listed = runs.get("runs") if isinstance(runs, dict) else runs
        assert listed and "profile" in listed, runs
        assert "loss" in tags["train"], tags
    finally:
        server.terminate()
        server.wait(timeout=30)
