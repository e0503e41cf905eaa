"""Optimizer updates skipped because the gradients were inf or NaN, counted for the rule that
stops a run which skips too many in a row (divergence.py) and for the save, which never
writes a step whose update was skipped.

From ZeRO-1 up DeepSpeed's optimizer wrapper takes the gradients' norm, decides on the host
and skips the update (`engine.skipped_steps`). At ZeRO-0, where the trainer clips the
gradients itself (engine.clips_gradients_itself; the plan for one GPU or one CPU process),
DeepSpeed hands the update to our optimizer as it is, and a single inf gradient made every
weight NaN: the run stopped at its next check and lost the steps since its last checkpoint,
where ZeRO-1 skipped that one update and trained on. So at ZeRO-0 the clip's norm decides:

- torch's fused AdamW skips an update on the device when its `found_inf` is set (as torch's
  GradScaler uses it: weights, moments and step count untouched), with no host sync; the
  count stays on the device until a logging step or a save reads it. One difference from
  DeepSpeed's skip: the learning-rate schedule still moves on by a step.
- bitsandbytes' 8-bit AdamW has no such switch (its kernels apply whatever gradient they
  are given, and it is what the plan picks for one GPU whose optimizer states would crowd
  the card), so the host reads the norm, in the optimizer's span, and skips its step: one
  wait a step, as DeepSpeed's own skip has from ZeRO-1 up, and like that one it holds the
  schedule, through DeepSpeed's `optimizer.overflow`.

The total is kept in DeepSpeed's checkpoints (`skipped_steps`), so a resumed run goes on
counting from it and does not take the resumed total for a new skip.
"""

from __future__ import annotations

import torch


class SkippedUpdates:
    def __init__(self, engine, optimizer: torch.optim.Optimizer | None, device: torch.device):
        """optimizer: the one the trainer clips for (ZeRO-0), else None: DeepSpeed counts."""
        self.engine = engine
        fused = isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")
        self.on_device = optimizer if fused else None
        self.on_host = optimizer if optimizer is not None and not fused else None
        if self.on_host is not None:
            _skip_steps_on_overflow(self.on_host)
        self.seen, self.in_a_row = 0, 0  # DeepSpeed's count, or the device's as last read
        # float32 scalars on the device (exact to 2**24): found is 1.0 for a skipped update
        self.found, self.device_in_a_row, self.device_total = (
            torch.zeros((), dtype=torch.float32, device=device) for _ in range(3)
        )

    def guard(self, gradient_norm: torch.Tensor) -> None:
        """Before the optimizer step, with the norm the trainer's clip took: skip the update
        if that is not finite. norm - norm is 0 for a finite norm and NaN for inf or NaN: two
        small ops a step (the step's ops around the model are counted by a test)."""
        if self.on_device is not None:
            self.found = torch.nan_to_num(gradient_norm - gradient_norm, nan=1.0)
            self.on_device.found_inf = self.found
        elif self.on_host is not None:
            self.on_host.overflow = not bool(torch.isfinite(gradient_norm))  # the one host wait

    def count(self) -> None:
        """After the optimizer step."""
        if self.on_device is None:  # DeepSpeed decided on the host already: reading costs nothing
            skipped = self.engine.skipped_steps
            self.in_a_row = self.in_a_row + 1 if skipped > self.seen else 0
            self.seen = skipped
            return
        # in a row: (n + 1) * found, back to 0 after an update that was applied
        self.device_in_a_row = torch.addcmul(self.found, self.device_in_a_row, self.found)
        self.device_total.add_(self.found)

    def read(self) -> tuple[int, int]:
        """(in a row, in all); where the device counts, this waits for it, and hands the total
        to DeepSpeed, whose checkpoints keep it."""
        if self.on_device is not None:
            self.in_a_row, self.seen = (int(n) for n in torch.stack([self.device_in_a_row, self.device_total]).tolist())
            self.engine.skipped_steps = self.seen
        return self.in_a_row, self.seen

    def resumed(self) -> None:
        """After DeepSpeed loaded a checkpoint: its total is where this run's count goes on."""
        self.seen = self.engine.skipped_steps
        self.device_total.fill_(self.seen)


def _skip_steps_on_overflow(optimizer: torch.optim.Optimizer) -> None:
    """Make `optimizer.step()` do nothing while `optimizer.overflow` is set, the attribute
    DeepSpeed's engine reads after the step to count a skipped update and hold the schedule
    (runtime/engine.py, _take_model_step)."""
    step = optimizer.step
    optimizer.overflow = False

    def step_unless_overflow(*args, **kwargs):
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.step = step_unless_overflow
