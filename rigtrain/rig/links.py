"""The PCIe links of the cards a run uses, and what is wrong with them: a card on four lanes or
fewer, a link trained below what the card and the slot allow, a generation held low under load,
and the lanes a desktop board splits between its slots when several hold cards."""

from __future__ import annotations

from rigtrain.rig.facts import Gpu
from rigtrain.rig.plan_types import RigWarning


def pcie_gb_s(gen: int, width: int) -> float:
    """Usable bandwidth per direction, as NCCL models it: Gen4 x16 about 24 GB/s."""
    per_lane = {1: 0.2, 2: 0.4, 3: 0.75, 4: 1.5, 5: 3.0, 6: 6.0, 7: 12.0}.get(gen, 1.5)
    return per_lane * width


def link_warnings(gpus: list[tuple[int, Gpu]]) -> list[RigWarning]:
    """Each card's link, and the lane split between several (`gpus`: index, card)."""
    split = _split_lanes(gpus)
    out = [_split_warning(split)] if split else []
    for i, gpu in gpus:
        out += _card_link_warnings(i, gpu, lanes_shared=any(i == j for j, _ in split))
    return out


def _split_lanes(gpus: list[tuple[int, Gpu]]) -> list[tuple[int, Gpu]]:
    """Cards at x8 or more but below their maximum, where there are two or more of them. NVML
    documents its maximum width as what the card and the system allow, but where that is read
    from the card's own link capability it says x16 in a slot wired x8; and a desktop board's
    16 CPU lanes go x8/x8 once its second long slot holds a card (x8/x4/x4 or x8/x8/x8/x8 on
    others): two such cards at half width are the board's design, where one alone is a link
    that trained narrower than it should."""
    below = [(i, g) for i, g in gpus if g.pcie and g.pcie.max_width and 8 <= g.pcie.width < g.pcie.max_width]
    return below if len(below) >= 2 else []


def _split_warning(split: list[tuple[int, Gpu]]) -> RigWarning:
    links = [g.link_under_load for _, g in split]
    widths = sorted({f"x{g.pcie.width} of x{g.pcie.max_width}" for _, g in split})
    slowest = min(pcie_gb_s(gen, width) for gen, width in links)
    full = min(pcie_gb_s(gen, 16) for gen, _ in links)
    names = ", ".join(str(i) for i, _ in split[:-1]) + f" and {split[-1][0]}"
    indices = [i for i, _ in split]
    bridged = all(g.nvlink and g.nvlink[j] for i, g in split for j in indices if j != i)
    cost = (
        "but the gradients go over NVLink between these cards, and the lanes carry only each step's input "
        "batch (a few MB): nothing to change"
        if bridged
        else "which slows only the exchange of gradients: the plan prefers ZeRO-0/1 with accumulation, which "
        "communicates least, and takes ZeRO-2/3 only where memory needs them"
    )
    return RigWarning(
        "pcie_split",
        None,
        f"GPUs {names} run at {' and '.join(widths)} lanes each: a desktop board divides its CPU's PCIe "
        "lanes between its slots once several hold cards (x8/x8 for two), by design, not a fault (the "
        f"board's manual lists it); about {slowest:.0f} GB/s each way against {full:.0f} at x16, {cost}",
    )


def _card_link_warnings(i: int, gpu: Gpu, lanes_shared: bool) -> list[RigWarning]:
    """One card's link: four lanes or fewer, trained narrower than its maximum (unless the board
    splits its lanes between this card and another), a low generation while busy."""
    pcie = gpu.pcie
    if not pcie:
        return []
    out: list[RigWarning] = []
    gen, width = gpu.link_under_load
    if width <= 4:
        idle = f" (Gen{pcie.gen} now, idle)" if gen != pcie.gen else ""
        out.append(
            RigWarning(
                "pcie_narrow",
                i,
                f"GPU {i} ({gpu.name}) runs on PCIe Gen{gen} x{width} under load{idle}: about "
                f"{pcie_gb_s(gen, width):.0f} GB/s against {pcie_gb_s(gen, 16):.0f} at x16; move it to a x16/x8 "
                "slot (often the chipset slot is x4), or keep ZeRO at 0/1 with accumulation (planned)",
            )
        )
    if pcie.max_width and pcie.width < pcie.max_width and not lanes_shared:
        out.append(
            RigWarning(
                "pcie_downtrained",
                i,
                f"GPU {i} ({gpu.name}) link trained at x{pcie.width} of "
                f"x{pcie.max_width}: reseat the card, check the slot's lane sharing (M.2, "
                "other cards) and the riser",
            )
        )
    if pcie.max_gen and pcie.gen < pcie.max_gen and gpu.busy:
        out.append(
            RigWarning(
                "pcie_downtrained",
                i,
                f"GPU {i} ({gpu.name}) runs PCIe Gen{pcie.gen} of "
                f"Gen{pcie.max_gen} under load: check the BIOS PCIe setting and the riser "
                "(idle cards drop the generation by design; this one is busy)",
            )
        )
    return out
