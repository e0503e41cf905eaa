"""Which GPUs a run may use: `rig.gpus` when the config names them, else the ones the
user's CUDA_VISIBLE_DEVICES leaves visible, else all of them.

The rig lists GPUs as NVML numbers them, by PCI bus (nvidia-smi's numbers), and every
rigtrain run sets CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA numbers them the same way. A user's
CUDA_VISIBLE_DEVICES may have been written for CUDA's default order instead (fastest
first), which can differ from the bus order on a rig of different cards; this module reads
it as CUDA would and maps it to the rig's numbers, or says in one line why it cannot."""

from __future__ import annotations

import dataclasses

from rigtrain.errors import UserError
from rigtrain.rig.facts import Rig

VARIABLE = "CUDA_VISIBLE_DEVICES"


def visible_gpus(rig: Rig, value: str | None, device_order: str | None) -> tuple[int, ...] | None:
    """The rig's indices of the GPUs `CUDA_VISIBLE_DEVICES=value` leaves visible, in its order;
    None when it is unset (every GPU). As in CUDA, a negative number ends the list, and an
    empty value hides every GPU. Entries are numbers or UUIDs (GPU-..., a unique prefix is
    enough); MIG instances are refused: rigtrain plans whole cards."""
    if value is None:
        return None
    chosen: list[int] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        if entry.lstrip("-").isdigit():
            number = int(entry)
            if number < 0:
                break
            index = _by_number(rig, number, value, device_order)
        else:
            index = _by_uuid(rig, entry, value)
        if index in chosen:
            raise UserError(f"{VARIABLE}={value}: GPU {entry} is listed twice; list each GPU once")
        chosen.append(index)
    return tuple(chosen)


def _by_number(rig: Rig, number: int, value: str, device_order: str | None) -> int:
    if number >= len(rig.gpus):
        have = f"GPUs 0-{len(rig.gpus) - 1}" if rig.gpus else "no GPU"
        raise UserError(f"{VARIABLE}={value}: there is no GPU {number}; this machine has {have} (nvidia-smi -L)")
    by_bus = (device_order or "").strip().upper() == "PCI_BUS_ID"
    if not by_bus and len({(g.name, g.compute_capability) for g in rig.gpus}) > 1:
        # CUDA's default order puts the fastest card first; on a rig of different cards its
        # numbers need not be nvidia-smi's, and guessing would train on the wrong card
        raise UserError(
            f"{VARIABLE}={value}: on a rig of different cards CUDA numbers GPUs fastest first, which need not "
            "be nvidia-smi's order; set CUDA_DEVICE_ORDER=PCI_BUS_ID as well (then the numbers are "
            "nvidia-smi's), name the GPUs by UUID (nvidia-smi -L), or choose them with --set rig.gpus=..."
        )
    return number


def _by_uuid(rig: Rig, entry: str, value: str) -> int:
    if entry.upper().startswith("MIG-"):
        raise UserError(
            f"{VARIABLE}={value}: {entry} is a MIG instance; rigtrain plans whole GPUs, so name whole "
            "cards (numbers or GPU-... UUIDs from nvidia-smi -L)"
        )
    wanted = entry if entry.upper().startswith("GPU-") else f"GPU-{entry}"
    matches = [i for i, g in enumerate(rig.gpus) if g.uuid and g.uuid.lower().startswith(wanted.lower())]
    if len(matches) != 1:
        found = "matches more than one GPU" if matches else "matches no GPU here"
        raise UserError(f"{VARIABLE}={value}: {entry} {found}; use the UUIDs nvidia-smi -L prints, or GPU numbers")
    return matches[0]


def restricted(rig: Rig, value: str | None, device_order: str | None) -> Rig:
    """The rig with the GPUs the environment leaves visible recorded in `visible`; with
    none visible (an empty CUDA_VISIBLE_DEVICES), a machine without GPUs, as CUDA sees it."""
    visible = visible_gpus(rig, value, device_order)
    if visible == ():  # the CPU on purpose: cards the driver cannot reach do not matter either
        return dataclasses.replace(rig, gpus=(), unreachable_gpus=None)
    return dataclasses.replace(rig, visible=visible)


def visible_indices(rig: Rig) -> tuple[int, ...]:
    """The rig's GPUs a run here may use: those CUDA_VISIBLE_DEVICES left, else every one."""
    return rig.visible if rig.visible is not None else tuple(range(len(rig.gpus)))


def chosen_gpus(rig: Rig, wanted: tuple[int, ...]) -> tuple[tuple[int, ...], str]:
    """The GPUs a run uses and what chose them: `rig.gpus`, CUDA_VISIBLE_DEVICES, or all."""
    for g in wanted:
        if g >= len(rig.gpus):
            raise UserError(f"rig.gpus: GPU {g} does not exist; the rig has GPUs 0-{len(rig.gpus) - 1}")
    if wanted:
        return wanted, "chosen by rig.gpus"
    return visible_indices(rig), f"left visible by {VARIABLE}" if rig.visible is not None else "found"


def cuda_device_list(rig: Rig, chosen: tuple[int, ...]) -> str:
    """CUDA_VISIBLE_DEVICES for the run's processes: the rig's numbers (bus order, which the
    run sets), or the cards' UUIDs where the rig's numbers are CUDA's own (the probe could
    not read NVML and asked CUDA, under the user's CUDA_VISIBLE_DEVICES)."""
    if rig.numbered_by_cuda:
        return ",".join(rig.gpus[i].uuid or str(i) for i in chosen)
    return ",".join(map(str, chosen))
