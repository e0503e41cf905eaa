"""FLOPs of a training step, counted on the real model: torch's FlopCounterMode over a
forward and backward pass on the meta device (no memory, no compute, any size)."""

from __future__ import annotations

import torch

from rigtrain.config import DataConfig, ModelConfig
from rigtrain.model.perceiver import build_model
from rigtrain.train.step_peaks import measured, step_shapes


def meta_batch(data: DataConfig, size: int) -> dict[str, torch.Tensor]:
    return {
        "video": torch.empty(size, data.clip_frames, *data.frame_size, 3, dtype=torch.uint8),
        "audio": torch.empty(size, data.clip_samples, dtype=torch.int16),
        "has_audio": torch.ones(size, dtype=torch.bool),
        "text": torch.empty(size, data.max_text_bytes, dtype=torch.uint8),
        "text_len": torch.full((size,), data.max_text_bytes),
        "segment_offset": torch.zeros(size, data.segments_per_clip, dtype=torch.int64),
        "segment_len": torch.zeros(size, data.segments_per_clip, dtype=torch.int64),
    }


def train_flops_per_clip(model: ModelConfig, data: DataConfig) -> float:
    """Forward + backward FLOPs per clip (matmuls and attention, as FlopCounterMode counts:
    2 per multiply-add; elementwise work is not counted, as in MFU conventions). Counted
    once per model and clip shape: counting builds the model on the meta device, whose
    first use imports torch._dynamo (2.5 s of a tune's 6 s of planning on a 2-core CPU),
    so the count is remembered as a step peak is (step_peaks.measured)."""
    batch = 2
    return measured(f"train flops batch={batch} {step_shapes(model, data)}", lambda: _count(model, data, batch)) / batch


def _count(model: ModelConfig, data: DataConfig, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode  # heavy: only when FLOPs are counted

    with torch.device("meta"):
        network = build_model(model, data)
        counter = FlopCounterMode(display=False)
        with counter:
            network(meta_batch(data, batch))["loss"].backward()
    return int(counter.get_total_flops())


# The share of a card's peak a well-fed train step reaches, for estimates where nothing was
# measured (`rigtrain data bench` on a machine without the GPU): 40% is what dense
# transformer training commonly reaches in bf16 on one card (this model's `base` reached
# 26% on the first H200 run, before its host-side fixes; the GPU kit aims at 35%).
ASSUMED_MFU = 0.4


def step_clips_per_s(flops_per_clip: float, peak_tflops: float, mfu: float = ASSUMED_MFU) -> float:
    """Clips per second one GPU trains at `mfu` of its peak."""
    return peak_tflops * 1e12 * mfu / flops_per_clip
