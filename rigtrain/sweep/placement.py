"""Where a sweep's trials run at once (docs/sweep.md): on a rig with GPUs, one trial per
group of `gpus_per_trial` cards (each trial planned for its own cards through rig.gpus);
on the CPU one trial at a time, since a trial already uses every core. Pure: a function of
the rig, tested with rig files."""

from __future__ import annotations

from rigtrain.errors import UserError
from rigtrain.rig.facts import Rig
from rigtrain.rig.visible import visible_indices


def _linked(rig: Rig, a: int, b: int) -> bool:
    """NVLink or P2P between two cards (a pair without either goes through host memory)."""
    gpu = rig.gpus[a]
    for row in (gpu.nvlink, gpu.p2p):
        if row is not None and b < len(row) and row[b]:
            return True
    return False


def trial_slots(rig: Rig, gpus_per_trial: int = 1) -> list[tuple[int, ...]]:
    """The card groups trials run on at the same time; [()] on the CPU (one trial at a
    time, all cores). Groups prefer cards linked to each other; cards left over are unused."""
    if not rig.gpus:
        return [()]
    free = list(visible_indices(rig))
    if gpus_per_trial > len(free):
        left = " (CUDA_VISIBLE_DEVICES leaves that many visible)" if rig.visible is not None else ""
        raise UserError(
            f"gpus_per_trial = {gpus_per_trial}, but this machine has {len(free)} GPU(s){left}; "
            f"lower gpus_per_trial in the sweep spec"
        )
    slots = []
    while len(free) >= gpus_per_trial:
        group = [free.pop(0)]
        # the cards best linked to the first, then any
        for candidate in sorted(free, key=lambda g: not _linked(rig, group[0], g)):
            if len(group) == gpus_per_trial:
                break
            group.append(candidate)
        for g in group[1:]:
            free.remove(g)
        slots.append(tuple(sorted(group)))
    return slots
