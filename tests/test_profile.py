"""profile/: the verdict from hand-made traces, then from real runs made to be input-bound
and compute-bound on this CPU, and the TensorBoard plugin reading the trace."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

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
        for name, dur in (
            ("data_wait", data_wait),
            ("forward", forward),
            ("backward", backward),
            ("optimizer", optimizer),
        ):
            events.append(X(f"rigtrain/{name}", t, dur))
            if name == "backward" and comm:
                events.append(X("c10d::allreduce_", t + 1, comm, cat="cpu_op"))
            t += dur
    return events


FACTS = RunFacts(
    device="cpu",
    clips_per_step=16,
    world_size=1,
    loader_threads=1,
    cpu_threads=2,
    data_is_raw_videos=True,
    zero_stage=1,
    micro_batch_size=16,
)


@pytest.mark.parametrize(
    "trace, expected",
    [
        (cpu_trace(50, 20, 20, 5), "input-bound"),
        (cpu_trace(2, 40, 40, 10), "compute-bound"),
        (cpu_trace(2, 20, 50, 5, comm=40), "communication-bound"),
        (cpu_trace(2, 10, 10, 5), "host-bound"),  # 73% of each step outside the train step's spans
    ],
)
def test_verdict_on_made_up_cpu_traces(trace, expected):
    summary = analyze(trace, FACTS)
    assert summary["verdict"] == expected, summary
    assert sum(summary["breakdown"].values()) == pytest.approx(1.0, abs=1e-6)
    assert summary["suggestions"]


def test_gpu_breakdown_from_kernels():
    events = [
        X("ProfilerStep#1", 0, 100),
        X("rigtrain/data_wait", 0, 10),
        X("rigtrain/forward", 10, 30),
        X("rigtrain/backward", 40, 40),
        X("rigtrain/optimizer", 80, 20),
        X("ampere_sgemm", 12, 30, cat="kernel", tid=7),
        X("ampere_sgemm", 45, 30, cat="kernel", tid=7),
        X("ncclKernel_AllReduce_RING", 70, 15, cat="kernel", tid=8),
        X("multi_tensor_apply_kernel", 85, 10, cat="kernel", tid=7),
    ]
    fractions, numbers = breakdown(events, "cuda")
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert fractions["data_wait"] == pytest.approx(0.10)
    assert fractions["compute"] == pytest.approx(0.60) and fractions["optimizer"] == pytest.approx(0.10)
    assert fractions["communication"] == pytest.approx(0.10)  # 15 of NCCL, 5 of them hidden under a GEMM
    assert verdict(fractions)[0] == "compute-bound"
    facts = RunFacts(
        device="cuda",
        clips_per_step=32,
        world_size=1,
        loader_threads=4,
        cpu_threads=16,
        data_is_raw_videos=False,
        zero_stage=1,
        micro_batch_size=32,
        flops_per_clip=1e9,
        peak_tflops=71.0,
    )
    summary = analyze(events, facts)
    # 32 clips in 100 us -> 320,000 clips/s x 1 GFLOP = 320 TFLOPS: the arithmetic, not a real card
    assert summary["achieved_tflops_per_device"] == pytest.approx(320.0) and summary["mfu"] == pytest.approx(
        320 / 71, rel=1e-3
    )


def _summary(run: Path) -> dict:
    return json.loads((run / "profile" / "summary.json").read_text())


@pytest.fixture(scope="module")
def raw_720p(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw720")
    for k in range(2):
        write_h264_with_aac(folder / f"clip{k}.mp4", seconds=3.0, fps=30, size=(1280, 720), tone_hz=300 + 100 * k)
    return folder


@pytest.mark.slow
def test_raw_720p_videos_without_workers_are_input_bound(raw_720p, tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        "profile",
        "--data",
        str(raw_720p),
        "--out",
        str(run),
        "--set",
        "data.workers=0",
        "train.micro_batch_size=4",
        "eval.holdout=0",
        timeout=600,
    )
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
    result = run_cli(
        "profile",
        "--out",
        str(run),
        "--set",
        "model.d_model=256",
        "model.num_latents=64",
        "data.workers=1",
        "eval.during_training=true",  # a profile run asked to evaluate: TensorBoard gets every tab's data
        "log.histograms_every=3",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_profile_is_drawn_offline(compute_bound_run, monkeypatch, tmp_path):
    from rigtrain.profile.charts import per_step

    summary = _summary(compute_bound_run)
    for name in ("breakdown.png", "timeline.png"):
        image = (compute_bound_run / "profile" / name).read_bytes()
        assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 5000
    trace = json.loads((compute_bound_run / summary["trace"]).read_text())["traceEvents"]
    steps = per_step(trace, "cpu")  # each bar is one step's own breakdown; together, the summary's
    assert len(steps) == 3
    mean = {k: sum(ms[k] for _, ms in steps) / 3 for k in CATEGORIES}
    assert mean == pytest.approx(summary["numbers"]["ms_per_step"], rel=0.02, abs=0.05)
    # without matplotlib (the GPU kit's offline box) the images are skipped in one line
    from rigtrain.train.profiling import StepProfiling

    said = []
    stub = SimpleNamespace(run_dir=tmp_path, device=SimpleNamespace(type="cpu"), log=SimpleNamespace(say=said.append))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    StepProfiling._draw_profile(stub, trace, tmp_path / "profile")
    assert said == ["profile images skipped: matplotlib is not installed (pip install matplotlib)"]
    assert not list(tmp_path.glob("profile/*.png"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_the_trace_and_the_scalars(compute_bound_run):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(compute_bound_run / "tb"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, runs, tags, layout = time.time() + 90, [], {}, {}
        while time.time() < deadline:
            try:
                runs = _get(f"{base}/data/plugin/pytorch_profiler/runs")
                tags = _get(f"{base}/data/plugin/scalars/tags")
                layout = _get(f"{base}/data/plugin/custom_scalars/layout")
                images = _get(f"{base}/data/plugin/images/tags")
                histograms = _get(f"{base}/data/plugin/histograms/tags")
                projector = _get(f"{base}/data/plugin/projector/runs")
                ready = runs and (runs.get("runs") if isinstance(runs, dict) else runs) and "train" in tags
                if ready and layout and images and histograms and projector:
                    break
            except OSError:
                pass
            time.sleep(1)
        listed = runs.get("runs") if isinstance(runs, dict) else runs
        assert listed and "profile" in listed, runs
        assert "loss" in tags["train"], tags
        # Custom Scalars: the loss and its terms on one chart, each evaluation beside its chance
        charts = {chart["title"]: chart["multiline"]["tag"] for c in layout["category"] for chart in c["chart"]}
        assert charts["the loss and each of its terms"] == ["^loss$", "^loss/"], layout
        assert charts["direction: kNN and linear-probe top-1 against chance"][-1] == "^eval/knn_direction_chance$"
        assert sum(tag == "loss" or tag.startswith("loss/") for tag in tags["train"]) >= 5  # what the chart shows
        assert {f"grad_norm/{part}" for part in ("encoder", "decoder", "heads")} <= set(tags["train"])
        # the profile as images, for a machine where the PyTorch Profiler tab cannot load its charts
        assert {"profile/breakdown", "profile/timeline"} <= set(images.get("profile", {})), images
        assert {"predictions/video", "predictions/audio"} <= set(images.get("train", {})), images
        assert {"weights/encoder", "gradients/decoder", "latent/encoder"} <= set(histograms.get("train", {}))
        assert projector == ["train"]  # the held-out clips' features with their labels and narration
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- throttling: the rule of profile/throttle.py on replayed samples -----------------------------


def _h200_power_cap_samples():
    """What the first H200 run saw under `base` (../shared/gpu/MEASURED.md): the power-cap reason
    in the first sample, taken as the load began (143 W, 43 C, clocks still at their maximum),
    then from step 4 on 560-616 W of the 700 W limit at 1790-1910 of 1980 MHz, reason held."""
    from rigtrain.profile.throttle import Sample

    cap = frozenset({"sw_power_cap"})
    samples = [Sample(t=0.0, util_pct=100, power_w=143, sm_clock_mhz=1980, temp_c=43, reasons=cap)]
    powers = [560, 590, 616, 600, 575, 610, 585, 595, 570, 605, 580, 598]
    clocks = [1910, 1850, 1790, 1820, 1880, 1800, 1860, 1840, 1900, 1810, 1870, 1845]
    for k, (p, c) in enumerate(zip(powers, clocks)):
        samples.append(Sample(t=0.5 * (k + 1), util_pct=100, power_w=p, sm_clock_mhz=c, temp_c=52 + k % 3, reasons=cap))
    return samples


def _replay(samples, **limits):
    from rigtrain.profile.throttle import CardLimits, ThrottleJudge

    judge = ThrottleJudge(CardLimits(gpu=0, **limits))
    return [r for s in samples for r in judge.add(s)]


H200 = dict(power_limit_w=700, max_power_limit_w=700, sm_clock_max_mhz=1980, slowdown_temp_c=87)


def test_power_cap_under_load_is_one_report_with_its_figures_and_no_cooling_advice():
    reports = _replay(_h200_power_cap_samples(), **H200)
    assert len(reports) == 1
    r = reports[0]
    assert r.reason == "sw_power_cap"
    assert 560 <= r.power_w <= 616 and 1790 <= r.sm_clock_mhz <= 1910  # the load's figures, not the 143 W start
    assert r.clock_lost == pytest.approx(1 - r.sm_clock_mhz / 1980)
    text = r.message
    assert "of its 700 W limit" in text and "of 1980 MHz" in text and "slows down at 87 C" in text
    assert f"{r.clock_lost:.0%} below its maximum clock" in text
    assert "cool" not in text.lower() and "airflow" not in text.lower()
    assert "normal" in text and "already the card's maximum" in text  # H200: limit 700 of max 700


def test_power_cap_with_room_to_raise_says_how():
    r = _replay(_h200_power_cap_samples(), power_limit_w=350, max_power_limit_w=400, sm_clock_max_mhz=1980)[0]
    assert "sudo nvidia-smi -i 0 -pl 400" in r.message
    # under WSL2 the card is Windows' driver's: its own nvidia-smi sets the limit, WSL's only reads
    wsl = _replay(_h200_power_cap_samples(), power_limit_w=350, max_power_limit_w=400, wsl=True)[0]
    assert "`nvidia-smi -i 0 -pl 400` in an administrator PowerShell on Windows" in wsl.message
    assert "sudo" not in wsl.message


def test_a_reason_seen_once_at_a_load_change_is_not_reported():
    from dataclasses import replace

    samples = _h200_power_cap_samples()
    samples = samples[:1] + [replace(s, reasons=frozenset()) for s in samples[1:]]
    assert _replay(samples, **H200) == []
    # nor while the GPU is idle, however long the reason shows
    idle = [replace(s, util_pct=5) for s in _h200_power_cap_samples()]
    assert _replay(idle, **H200) == []


def test_thermal_throttle_advises_cooling():
    from dataclasses import replace

    hot = [replace(s, reasons=frozenset({"sw_thermal"}), temp_c=91) for s in _h200_power_cap_samples()]
    r = _replay(hot, **H200)
    assert [x.reason for x in r] == ["sw_thermal"]
    assert "heat" in r[0].message and "airflow" in r[0].message and "91 C" in r[0].message


def test_without_utilisation_the_power_draw_says_when_the_card_is_busy():
    """Under WSL2 NVML reports no utilisation: the H200's samples without it still give one
    power-cap report, and the 143 W reading as the load begins (a fifth of the limit) stays out."""
    from dataclasses import replace

    samples = [replace(s, util_pct=None) for s in _h200_power_cap_samples()]
    (report,) = _replay(samples, **H200)
    assert report.reason == "sw_power_cap" and 560 <= report.power_w <= 616 and report.busy_samples == 5
    assert _replay([replace(s, power_w=None) for s in samples], **H200) == []  # nothing says it is busy
    # a card that reports no clock or temperature: the report says what it has
    (bare,) = _replay([replace(s, sm_clock_mhz=None, temp_c=None) for s in samples], **H200)
    assert "of its 700 W limit" in bare.message and "MHz" not in bare.message and bare.clock_lost is None


class _NotSupported(Exception):
    pass


_NotSupported.__name__ = "NVMLError_NotSupported"  # as pynvml names the class it raises


def _fake_nvml(unsupported: set, mask: int = 0x4):
    """NVML for one busy, power-capped card, where the readings in `unsupported` are not."""

    def reading(name, value):
        def read(*args):
            if name in unsupported:
                raise _NotSupported()
            return value

        return read

    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: "handle",
        nvmlDeviceGetUtilizationRates=reading("util", SimpleNamespace(gpu=97, memory=40)),
        nvmlDeviceGetMemoryInfo=reading("memory", SimpleNamespace(used=20 * 2**30, total=24 * 2**30)),
        nvmlDeviceGetPowerUsage=reading("power", 340_000),
        nvmlDeviceGetTemperature=reading("temp", 71),
        nvmlDeviceGetClockInfo=reading("clock", 1695),
        nvmlDeviceGetPcieThroughput=reading("pcie", 52_000),
        nvmlDeviceGetCurrPcieLinkWidth=reading("width", 16),
        nvmlDeviceGetCurrentClocksEventReasons=reading("reasons", mask),
        nvmlDeviceGetEnforcedPowerLimit=reading("limit", 350_000),
        nvmlDeviceGetPowerManagementLimitConstraints=reading("constraints", (100_000, 400_000)),
        nvmlDeviceGetMaxClockInfo=reading("max clock", 2100),
        nvmlDeviceGetTemperatureThreshold=reading("slowdown", 93),
        NVML_TEMPERATURE_GPU=0,
        NVML_CLOCK_SM=1,
        NVML_PCIE_UTIL_RX_BYTES=1,
        NVML_PCIE_UTIL_TX_BYTES=0,
        NVML_TEMPERATURE_THRESHOLD_SLOWDOWN=1,
    )


@pytest.mark.parametrize(
    "unsupported, missing, reports",
    [
        (set(), set(), 1),
        ({"util", "pcie", "width"}, {"gpu_util_percent", "gpu_pcie_rx_mb_s", "gpu_pcie_tx_mb_s", "gpu_pcie_width"}, 1),
        ({"power"}, {"gpu_power_w"}, 1),
        ({"util", "power"}, {"gpu_util_percent", "gpu_power_w"}, 0),
    ],
)
def test_a_reading_the_card_does_not_report_leaves_the_others(monkeypatch, unsupported, missing, reports):
    """One NVML reading that a card or platform does not support (utilisation and PCIe under
    WSL2, power on some laptop GPUs) used to throw the whole sample away, every time: no GPU
    telemetry at all and no throttle report. Now it is left out, said once, and the rest is
    recorded and judged."""
    from rigtrain.profile.telemetry import TelemetrySampler

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(unsupported))
    sampler = TelemetrySampler(0.001, gpu_index=0)  # its thread waits 1000 s: the test reads by hand
    try:
        samples = [sampler._read() for _ in range(6)]
        everything = {"gpu_util_percent", "gpu_mem_used_gib", "gpu_power_w", "gpu_temp_c", "gpu_sm_clock_mhz"}
        everything |= {"gpu_pcie_rx_mb_s", "gpu_pcie_tx_mb_s", "gpu_pcie_width", "gpu_throttled"}
        assert all(set(s) - {"host_cpu_percent", "host_rss_gib"} == everything - missing for s in samples)
        assert samples[-1]["gpu_temp_c"] == 71.0 and samples[-1]["gpu_throttled"] == 1.0
        events = sampler.events()
        said = [e for e in events if "does not report" in e]
        assert len(said) == (1 if missing else 0)  # once, not every sample
        if missing:
            assert all(name in said[0] for name in missing) and said[0].startswith("GPU 0 does not report")
        capped = [e for e in events if "power limit" in e]
        # busy by utilisation, or (without it) by 340 of 350 W; without power either, nothing says so
        assert len(capped) == reports, events
    finally:
        sampler.close()


def test_host_bound_advice_stays_within_the_experiment():
    """The first GPU run was told "a larger micro-batch (now 64)" when 64 was the preset's whole
    global batch: the advice must say what keeps the experiment and what changes it."""
    from dataclasses import replace

    trace = cpu_trace(2, 10, 10, 5)
    whole = analyze(trace, replace(FACTS, micro_batch_size=64, clips_per_step=64, grad_accum_steps=1))
    assert whole["verdict"] == "host-bound"
    assert any("changes the experiment" in s and "global batch (64)" in s for s in whole["suggestions"])
    assert any("train.compile=true" in s for s in whole["suggestions"])
    split = analyze(trace, replace(FACTS, micro_batch_size=32, clips_per_step=128, grad_accum_steps=4, compiled=True))
    assert any(
        "train.micro_batch_size=64 train.grad_accum_steps=2 keeps the global batch of 128" in s
        for s in split["suggestions"]
    )
    assert not any("train.compile" in s for s in split["suggestions"])


def test_compute_bound_advice_offers_only_a_micro_batch_the_plan_found_to_fit():
    """base on an H200 (micro-batch 128 x 2, the plan's largest 206) was told to try
    train.micro_batch_size=256, which the plan had already found too large for the card."""
    from dataclasses import replace

    from rigtrain.profile.analysis import suggestions

    fractions = {"data_wait": 0.0, "host": 0.08, "compute": 0.87, "communication": 0.0, "optimizer": 0.05}
    base = replace(FACTS, device="cuda", micro_batch_size=128, grad_accum_steps=2, clips_per_step=256)
    advice = " ".join(suggestions("compute-bound", fractions, {"step_ms": 940}, replace(base, largest_micro_batch=206)))
    assert "train.micro_batch_size=256" not in advice
    assert "none that keeps the global batch fits" in advice and "206" in advice
    roomy = " ".join(suggestions("compute-bound", fractions, {"step_ms": 940}, replace(base, largest_micro_batch=300)))
    assert "train.micro_batch_size=256 train.grad_accum_steps=1 keeps the global batch of 256" in roomy
    unknown = " ".join(suggestions("compute-bound", fractions, {"step_ms": 940}, base))  # a plan that did not search
    assert "train.micro_batch_size=256" in unknown


def test_the_loader_timeline_goes_into_the_trace_then_stops_recording(tmp_path, capfd):
    """The loader thread's batches inside the recorded steps become rows of the saved
    trace; once it is saved the timeline keeps nothing more (a long run profiled at its
    start would otherwise hold a record of every batch it ever read)."""
    import torch

    from rigtrain.config.schema import ProfileConfig
    from rigtrain.profile.recorder import LoaderTimeline, StepProfiler

    timeline = LoaderTimeline("read")
    config = ProfileConfig(enabled=True, start_step=1, wait=0, warmup=1, active=2)
    profiler = StepProfiler(config, tmp_path / "profile", rank=0, cuda=False, timeline=timeline)
    for _ in range(6):
        start = time.time_ns()
        torch.ones(64, 64) @ torch.ones(64, 64)
        timeline.record(start, time.time_ns(), 4)
        profiler.step()
    profiler.stop()
    rows = [e for e in profiler.trace_events if e.get("name") == "rigtrain/loader_read"]
    assert 1 <= len(rows) <= 3 and profiler.trace_path.is_file()  # the recorded steps' batches, not all six
    assert timeline.between(0, time.time_ns() + 10**9) == []
    timeline.record(time.time_ns(), time.time_ns() + 1, 4)
    assert timeline.between(0, time.time_ns() + 10**9) == []
    assert "USDT:" not in capfd.readouterr().err  # Kineto's probe markers (torch 2.13) are not shown


def test_while_the_profiler_changes_state_only_kinetos_probe_lines_are_dropped(capfd):
    import os

    from rigtrain.profile.recorder import _without_kineto_probe_lines

    with _without_kineto_probe_lines():
        os.write(2, b"USDT:2026-12-03 08:52:24 16888:16888 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"[W kineto] a warning that matters\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "[W kineto] a warning that matters" in err
