"""Optimizer updates skipped because the gradients were inf or NaN, counted for the rule that
stops a run which skips too many in a row (divergence.py) and for the save, which never
writes a step whose update was skipped.

From ZeRO-1 up DeepSpeed's optimizer wrapper takes the gradients' norm, decides on the host
and skips the update (`engine.skipped_steps`). At ZeRO-0, where the trainer clips the
gradients itself (engine.clips_gradients_itself; the plan for one GPU or one CPU process),
DeepSpeed hands the update to our optimizer as it is, and a single inf gradient made every
weight NaN: the run stopped at its next check and lost the steps since its last checkpoint,
where ZeRO-1 skipped that one update and trained on. torch's fused AdamW skips an update on
the device when its `found_inf` is set (as torch's GradScaler uses it: weights, moments and
step count untouched), so the clip's norm decides it there with no host sync, and the count
stays on the device until a logging step or a save reads it. One difference from DeepSpeed's
skip: the learning-rate schedule still moves on by a step. The 8-bit optimizer has no such
switch, so at ZeRO-0 it applies what it is given, as before.
"""

from __future__ import annotations

import torch


class SkippedUpdates:
    def __init__(self, engine, optimizer: torch.optim.Optimizer | None, device: torch.device):
        """optimizer: the one the trainer clips for (ZeRO-0), else None: DeepSpeed counts."""
        self.engine = engine
        fused = isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")
        self.optimizer = optimizer if fused else None
        self.seen, self.in_a_row = 0, 0  # DeepSpeed's count, or the device's as last read
        # float32 scalars on the device (exact to 2**24): found is 1.0 for a skipped update
        self.found, self.device_in_a_row, self.device_total = (
            torch.zeros((), dtype=torch.float32, device=device) for _ in range(3)
        )

    def guard(self, gradient_norm: torch.Tensor) -> None:
        """Before the optimizer step, with the norm the trainer's clip took: skip the update
        if that is not finite. norm - norm is 0 for a finite norm and NaN for inf or NaN: two
        small ops a step (the step's ops around the model are counted by a test)."""
        if self.optimizer is not None:
            self.found = torch.nan_to_num(gradient_norm - gradient_norm, nan=1.0)
            self.optimizer.found_inf = self.found

    def count(self) -> None:
        """After the optimizer step."""
        if self.optimizer is None:  # DeepSpeed decided on the host already: reading costs nothing
            skipped = self.engine.skipped_steps
            self.in_a_row = self.in_a_row + 1 if skipped > self.seen else 0
            self.seen = skipped
            return
        # in a row: (n + 1) * found, back to 0 after an update that was applied
        self.device_in_a_row = torch.addcmul(self.found, self.device_in_a_row, self.found)
        self.device_total.add_(self.found)

    def read(self) -> tuple[int, int]:
        """(in a row, in all); where the device counts, this waits for it."""
        if self.optimizer is not None:
            self.in_a_row, self.seen = (int(n) for n in torch.stack([self.device_in_a_row, self.device_total]).tolist())
        return self.in_a_row, self.seen
