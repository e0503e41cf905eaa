"""On a CUDA machine: the planned precision is used and GPU memory is logged. Skipped
without a GPU."""

import json

import pytest
import torch

from conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_demo_trains_on_the_gpu(tmp_path, demo_data):
    run = tmp_path / "run"
    result = run_cli("train", "--out", str(run), "--steps", "6", "--set", "rig.gpus=0", "train.ckpt_every=6")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "config.json").read_text())
    capability = torch.cuda.get_device_capability(0)
    assert record["plan"]["precision"] == ("bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gpu_mem_peak_gib"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
