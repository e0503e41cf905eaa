"""On a CUDA machine: the planned precision is used and GPU memory is logged. Skipped
without a GPU."""

import json

import pytest
import torch
from conftest import run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_demo_trains_on_the_gpu(tmp_path, demo_data):
    run = tmp_path / "run"
    result = run_cli("train", "--out", str(run), "--steps", "6", "--set", "rig.gpus=0", "train.ckpt_every=6")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "config.json").read_text())
    capability = torch.cuda.get_device_capability(0)
    assert record["plan"]["precision"] == (
        "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32"
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gpu_mem_peak_gib"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    check = record["memory_check"]  # the plan's prediction against the first steps' real peak
    assert check["measured_peak_gib"] > 0 and check["predicted_peak_gib"] > 0
    assert 0.75 <= check["predicted_peak_gib"] / check["measured_peak_gib"] <= 1.25, check
    # never OOM-unsafe: the plan's figure for the whole card is not below what the card used
    assert check["predicted_card_total_gib"] >= check["card_used_gib"], check
    from rigtrain.rig.peaks import peak_tflops

    if peak_tflops(torch.cuda.get_device_name(0)):
        assert 0 < rows[-1]["mfu"] < 1 and rows[-1]["tflops_per_gpu"] > 0


def test_probe_reads_every_gpu_through_nvml():
    result = run_cli("rig", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["rig"]["gpus"]) == torch.cuda.device_count()
    first = report["rig"]["gpus"][0]
    assert first["memory_gib"] > 0 and first["pcie"]["width"] >= 1 and "power" in first
    assert report["plan"]["device"] == "cuda" and report["plan"]["predicted_peak_gib"] > 0


def test_the_p2p_check_copies_on_the_gpu():
    """rig/p2p_check.py's CUDA path: on one card, its copies to itself and through pinned host
    memory (the pattern made on the card, the syncs, the timing); with two or more, the
    child process checks GPUs 0 and 1 as `rigtrain rig` would."""
    from rigtrain.rig import p2p_check

    rates = p2p_check._one_way(torch, 0, 0, lambda: torch.cuda.synchronize(0), cpu=False)
    assert not isinstance(rates, p2p_check.PairCheck), rates  # the data arrived
    assert rates[0] > 0 and rates[1] > 0
    if torch.cuda.device_count() >= 2:
        check = p2p_check.run_checks([(0, 1)], ["0", "1"])[(0, 1)]
        assert check.result in ("ok", "slow", "unavailable"), check
