"""`rigtrain data bench`: how fast the training loader delivers clips from shards, against
decoding the same clips from their source videos on the fly, with the same workers."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rigtrain.config import DataConfig
from rigtrain.data.dataset import ShardDataset, ShardLoader, read_index
from rigtrain.data.ondemand import DecodedClips
from rigtrain.errors import UserError


def data_config_of(index: dict, base: DataConfig | None = None) -> DataConfig:
    """The clip shape the shards were cut with, as a DataConfig."""

    p = index["params"]
    return dataclasses.replace(
        base or DataConfig(),
        fps=p["fps"],
        frame_size=tuple(p["frame_size"]),
        present_frames=p["present_frames"],
        future_frames=p["future_frames"],
        sample_rate=p["sample_rate"],
        clip_stride_s=p["clip_stride_s"],
        max_text_bytes=p["max_text_bytes"],
        resize=p.get("resize", "crop"),
    )


def clip_bytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in batch.values())


def _time(batches, min_seconds: float, max_batches: int) -> dict:
    """Clips/s and MB/s from the first request, start-up included: parallel workers finish
    several batches together, so timing from the first batch would flatter them."""
    clips = size = 0
    started = time.perf_counter()
    for k, item in enumerate(batches, 1):
        clips += len(item["index"])
        size += clip_bytes(item)
        if k >= max_batches or (k >= 4 and time.perf_counter() - started >= min_seconds):
            break
    elapsed = time.perf_counter() - started
    return {
        "clips": clips,
        "seconds": round(elapsed, 3),
        "clips_per_s": clips / elapsed,
        "mb_per_s": size / elapsed / 1e6,
    }


def measure_shards(dataset: ShardDataset, order: list[int], *, batch: int, workers: int, seconds: float) -> dict:
    """The training loader itself (ShardLoader), over `order` repeated."""
    loader = ShardLoader(
        dataset,
        itertools.cycle(order),
        micro_batch=batch,
        workers=workers,
        prefetch=4,
        pin_memory=torch.cuda.is_available(),
    )
    try:
        return _time(iter(loader), seconds, max_batches=10**9)
    finally:
        loader.close()


def measure_decoding(dataset: DecodedClips, order: list[int], *, batch: int, workers: int) -> dict:
    """Decoding the clips of `order` from their videos in worker processes (a decoder holds
    the GIL for part of its work, so processes, as any video loader uses)."""
    batches = [order[k : k + batch] for k in range(0, len(order) - batch + 1, batch)]
    loader = DataLoader(
        _BatchesOf(dataset),
        sampler=batches,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    return _time(loader, 0.0, max_batches=len(batches))


class _BatchesOf(Dataset):
    def __init__(self, clips: DecodedClips):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.clips.batch(indices)


def bench_loaders(
    data_dir: str | Path, *, workers: int, batch: int, seconds: float = 5.0, decode_clips: int = 64, seed: int = 0
) -> dict:
    """The shard loader and on-the-fly decoding over the same randomly chosen clips."""
    data_dir = Path(data_dir)
    index = read_index(data_dir)
    data = data_config_of(index)
    shards = ShardDataset(data_dir, data)
    decoded = DecodedClips.from_index(data_dir, index, data)
    missing = sorted({str(ref.video) for ref in decoded.clips if not ref.video.is_file()})
    if missing:
        raise UserError(
            f"data bench: {missing[0]} (a source of {data_dir}) is gone; the comparison decodes "
            "the source videos, so they must still be where data prepare read them"
        )
    order = np.random.default_rng(seed).permutation(len(shards)).tolist()
    batch = min(batch, len(order))
    # Decoding is slow, so it reads the first n_decode clips of a random order; the shard
    # loader reads the whole order (those clips and the rest, as training does), repeated.
    n_decode = max(batch, min(decode_clips, len(order)) // batch * batch)  # whole batches
    from_shards = measure_shards(shards, order, batch=batch, workers=workers, seconds=seconds)
    from_video = measure_decoding(decoded, order[:n_decode], batch=batch, workers=workers)
    return {
        "data_dir": str(data_dir),
        "clip": {"frames": data.clip_frames, "frame_size": list(data.frame_size), "sample_rate": data.sample_rate},
        "workers": workers,
        "batch": batch,
        "shards_clips_per_s": round(from_shards["clips_per_s"], 1),
        "shards_mb_per_s": round(from_shards["mb_per_s"], 1),
        "decode_clips_per_s": round(from_video["clips_per_s"], 2),
        "decode_mb_per_s": round(from_video["mb_per_s"], 2),
        "ratio": round(from_shards["clips_per_s"] / from_video["clips_per_s"], 1),
        "measured": {"shards": from_shards, "decode": from_video},
    }
