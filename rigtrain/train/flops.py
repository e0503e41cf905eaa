"""FLOPs of a training step, counted on the real model: torch's FlopCounterMode over a
forward and backward pass on the meta device (no memory, no compute, any size)."""

from __future__ import annotations

import torch

from rigtrain.config import DataConfig, ModelConfig
from rigtrain.model.perceiver import build_model


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
    2 per multiply-add; elementwise work is not counted, as in MFU conventions)."""
    from torch.utils.flop_counter import FlopCounterMode  # heavy: only when FLOPs are counted

    batch = 2
    with torch.device("meta"):
        network = build_model(model, data)
        counter = FlopCounterMode(display=False)
        with counter:
            network(meta_batch(data, batch))["loss"].backward()
    return counter.get_total_flops() / batch


# The share of a card's peak a well-fed train step reaches, for estimates where nothing was
# measured (`rigtrain data bench` on a machine without the GPU): 40% is what dense
# transformer training commonly reaches in bf16 on one card (this model's `base` reached
# 26% on the first H200 run, before its host-side fixes; the GPU kit aims at 35%).
ASSUMED_MFU = 0.4


def step_clips_per_s(flops_per_clip: float, peak_tflops: float, mfu: float = ASSUMED_MFU) -> float:
    """Clips per second one GPU trains at `mfu` of its peak."""
    return peak_tflops * 1e12 * mfu / flops_per_clip
