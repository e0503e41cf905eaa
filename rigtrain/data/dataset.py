"""Reading prepared shards for training: a memory-mapped Dataset, a deterministic and
resumable sampler, and the DataLoader around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rigtrain.config import DataConfig
from rigtrain.data.prepare import INDEX_FORMAT, preparation_params
from rigtrain.errors import UserError


def read_index(data_dir: Path) -> dict:
    path = Path(data_dir) / "index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--data {data_dir}: no index.json; prepare videos first with "
                        f"`rigtrain data prepare SRC_DIR {data_dir}`") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: corrupt ({err}); prepare the data again") from None
    if index.get("format") != INDEX_FORMAT:
        raise UserError(f"{path}: format {index.get('format')} is not {INDEX_FORMAT}; prepare the data again")
    return index


def check_params(index: dict, data: DataConfig, data_dir: Path) -> None:
    """Shards are only usable with the clip shape they were cut for."""
    want = preparation_params(data)
    for key, value in index["params"].items():
        if key in want and want[key] != value:
            raise UserError(f"--data {data_dir}: prepared with {key}={value} but the config has "
                            f"data.{key}={want[key]}; set data.{key}={value} or prepare the videos again")


class ShardDataset(Dataset):
    """Clip i of all shards, as tensors: video uint8 (T, H, W, 3), audio int16 (S,),
    has_audio bool, text uint8 (L,), text_len int64, index int64. Arrays are opened lazily
    with mmap in each worker, so forking workers copies no data."""

    def __init__(self, data_dir: str | Path, data: DataConfig | None = None):
        self.dir = Path(data_dir)
        self.index = read_index(self.dir)
        if data is not None:
            check_params(self.index, data, self.dir)
        self.shards = [s["dir"] for s in self.index["shards"]]
        self.offsets = np.cumsum([0] + [s["clips"] for s in self.index["shards"]])
        self._arrays: list[dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open(self) -> list[dict[str, np.ndarray]]:
        if self._arrays is None:
            names = ("video", "audio", "text", "text_len", "clips", "labels")
            self._arrays = [{n: np.load(self.dir / s / f"{n}.npy", mmap_mode="r") for n in names} for s in self.shards]
        return self._arrays

    def locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return shard, i - int(self.offsets[shard])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shard, j = self.locate(i)
        a = self._open()[shard]
        return {"video": torch.from_numpy(np.array(a["video"][j])),
                "audio": torch.from_numpy(np.array(a["audio"][j])),
                "has_audio": torch.tensor(bool(a["clips"][j]["has_audio"])),
                "text": torch.from_numpy(np.array(a["text"][j])),
                "text_len": torch.tensor(int(a["text_len"][j]), dtype=torch.int64),
                "index": torch.tensor(i, dtype=torch.int64)}

    def __getstate__(self) -> dict:
        # Workers reopen the memory maps themselves.
        return {**self.__dict__, "_arrays": None}


class ResumableSampler(Sampler[int]):
    """An endless stream of clip indices for one rank: each epoch is a permutation seeded by
    (seed, epoch), cut into equal parts per rank so every rank runs the same number of full
    micro-batches. Starting at micro-batch `start_batch` resumes exactly where a run stopped;
    the trainer only has to count micro-batches."""

    def __init__(self, size: int, *, rank: int, world: int, micro_batch: int, seed: int, start_batch: int = 0):
        self.size, self.rank, self.world, self.micro_batch = size, rank, world, micro_batch
        self.seed, self.start_batch = seed, start_batch
        self.batches_per_epoch = size // world // micro_batch
        if self.batches_per_epoch == 0:
            raise UserError(f"data: {size} clips are fewer than one batch on every process "
                            f"({world} process(es) x train.micro_batch_size={micro_batch}); "
                            "lower train.micro_batch_size or add videos")

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator)
        per_rank = self.batches_per_epoch * self.micro_batch
        return order[self.rank : per_rank * self.world : self.world].tolist()

    def __iter__(self):
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            yield from order[batch * self.micro_batch :]
            epoch, batch = epoch + 1, 0


def make_loader(dataset: ShardDataset, data: DataConfig, *, rank: int, world: int, micro_batch: int,
                seed: int, start_batch: int, pin_memory: bool) -> DataLoader:
    """Workers decode nothing (shards are already pixels), so a few suffice; persistent so
    they are not re-forked, prefetching so the step never waits when they keep up."""
    sampler = ResumableSampler(len(dataset), rank=rank, world=world, micro_batch=micro_batch, seed=seed,
                               start_batch=start_batch)
    workers = data.workers
    return DataLoader(dataset, batch_size=micro_batch, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=data.prefetch_factor if workers > 0 else None)
