"""The order clips are trained in: each epoch one permutation of the training clips, cut
into equal parts per rank, and where in it a resumed run starts."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from rigtrain.errors import UserError


class ResumableSampler(Sampler[int]):
    """An endless stream of clip indices for one rank: each epoch is a permutation seeded by
    (seed, epoch), cut into equal parts per rank so every rank runs the same number of full
    micro-batches. Starting at micro-batch `start_batch` resumes exactly where a run stopped;
    the trainer only has to count micro-batches."""

    def __init__(
        self, clips: int | np.ndarray, *, rank: int, world: int, micro_batch: int, seed: int, start_batch: int = 0
    ):
        # `clips`: a count (all clips) or the clip indices to draw from (the training side
        # of the held-out split).
        self.clips = np.arange(clips) if isinstance(clips, int) else np.asarray(clips, np.int64)
        self.size, self.rank, self.world, self.micro_batch = len(self.clips), rank, world, micro_batch
        self.seed, self.start_batch = seed, start_batch
        self.batches_per_epoch = self.size // world // micro_batch
        if self.batches_per_epoch == 0:
            raise UserError(
                f"data: {self.size} training clips are fewer than one batch on every process "
                f"({world} process(es) x train.micro_batch_size={micro_batch}); "
                "lower train.micro_batch_size or add videos"
            )

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator)
        per_rank = self.batches_per_epoch * self.micro_batch
        return self.clips[order[self.rank : per_rank * self.world : self.world].numpy()].tolist()

    def __iter__(self):
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            yield from order[batch * self.micro_batch :]
            epoch, batch = epoch + 1, 0


def resume_batch(micro_batches: int, clips: int, *, before: tuple[int, int], now: tuple[int, int]) -> int:
    """The micro-batch a rank starts at when a run resumes with another micro-batch size or
    number of ranks than its checkpoint counted `micro_batches` in (before, now: (ranks,
    micro-batch size)): the same epoch, and in it the same share of the epoch's clips read,
    in whole micro-batches of the new size (rounded down: a few clips may be read again,
    none is skipped). Each epoch is the same permutation whatever the sizes, so the rest of
    the epoch is the clips not yet read."""
    if before == now:
        return micro_batches
    (ranks_before, size_before), (ranks_now, size_now) = before, now
    epoch, batch = divmod(micro_batches, clips // ranks_before // size_before)
    read = batch * size_before * ranks_before  # of this epoch's clips, by every rank together
    return epoch * (clips // ranks_now // size_now) + read // (size_now * ranks_now)
