"""Power: the cards' transient peaks against the power supply, and a power limit set well
below a card's default and perhaps forgotten. rigtrain never changes a card's settings: it
says the `nvidia-smi -pl` command for the user to run (rigtrain/wsl.py, power_limit_command)."""

from __future__ import annotations

import math

from rigtrain.rig.facts import Gpu, Rig
from rigtrain.rig.plan_types import RigWarning
from rigtrain.wsl import power_limit_command


# Transient draw over the power limit, for a few milliseconds: what trips a PSU's
# over-current protection. RTX 3090: ~600 W spikes at a 350 W limit (a builder's
# measurement, "How to Build a Deep Learning Machine"); Ada and later consumer cards spike
# less; data-centre cards hold their limit tightly.
def transient_factor(name: str) -> float:
    lower = name.lower()
    if "rtx 30" in lower:
        return 1.7
    if any(k in lower for k in ("a100", "h100", "h200", "a6000", "l40")):
        return 1.2
    return 1.5


REST_OF_SYSTEM_W = 75  # board, drives, fans, pumps
DEFAULT_CPU_W = 150  # when the rig does not say the CPU's TDP


def psu_warnings(rig: Rig, gpus: list[tuple[int, Gpu]], psu: float) -> list[RigWarning]:
    """The cards' transient peaks at their power limits, with the CPU and the rest, against the PSU."""
    out: list[RigWarning] = []
    cpu_w = rig.cpu.tdp_w or DEFAULT_CPU_W
    limits = [(g.power.limit_w if g.power and g.power.limit_w else None) for _, g in gpus]
    if all(limits):
        spikes = sum(limit * transient_factor(g.name) for limit, (_, g) in zip(limits, gpus))
        peak = spikes + cpu_w + REST_OF_SYSTEM_W
        if peak > psu:
            limit = _allowed_limit(rig, gpus, psu)
            floor = max((g.power.min_limit_w or 0) for _, g in gpus if g.power)
            advice = (
                f"cap each GPU at {limit:.0f} W ({power_limit_command('N', limit, rig.wsl)}{_cap_context(limit, gpus)})"
                if limit >= floor and limit > 0
                else "no power limit the cards allow fits: use a bigger PSU or fewer GPUs"
            )
            out.append(
                RigWarning(
                    "psu_headroom",
                    None,
                    f"transient peaks of {len(gpus)} GPU(s) "
                    f"(~{spikes:.0f} W at their limits) + CPU {cpu_w:.0f} W + {REST_OF_SYSTEM_W} W "
                    f"for the rest reach ~{peak:.0f} W on a {psu:.0f} W PSU; {advice}",
                )
            )
    return out


# Measured by the builder cited above: an RTX 3090 capped at 280 W (80% of its 350 W)
# kept more than 95% of its training throughput. No comparable figure for other cards, so
# for them the cap is put against their own default and left for the user to measure.
def _cap_context(limit: float, gpus: list[tuple[int, Gpu]]) -> str:
    defaults = {g.power.default_limit_w for _, g in gpus if g.power and g.power.default_limit_w}
    share = f", {limit / max(defaults):.0%} of the default {max(defaults):.0f} W" if defaults else ""
    if all("rtx 3090" in g.name.lower() for _, g in gpus):
        return f"{share}; a 3090 kept >95% of its throughput at 280 W, 80% of its default"
    return f"{share}; compare clips/s in `rigtrain train` before and after"


# A limit this far below the default is a choice someone made (`nvidia-smi -pl`, or a
# service at boot), often for another job or another PSU, and then forgotten: it costs
# clocks for as long as it stays. Above it lies the usual efficient cap (a 3090 at 280 W,
# 80% of its default, kept >95% of its throughput), which is not worth a word.
LOW_LIMIT_SHARE = 0.75


def power_limit_warnings(rig: Rig, gpus: list[tuple[int, Gpu]], psu: float | None) -> list[RigWarning]:
    """Cards limited well below their default power, with the limit to go back to: the
    default, or less where the PSU needs a cap (psu_warnings' figure), and nothing said
    where that is no more than a tenth above today's limit."""
    if not gpus:  # a CPU run: nothing to limit
        return []
    out = []
    allowed = _allowed_limit(rig, gpus, psu) if psu else None
    low = [
        (i, g, g.power.limit_w, g.power.default_limit_w)
        for i, g in gpus
        if g.power and g.power.limit_w and g.power.default_limit_w
        if g.power.limit_w < LOW_LIMIT_SHARE * g.power.default_limit_w
    ]
    for i, g, limit, default in low:
        target = min(default, allowed) if allowed is not None else default
        if target < 1.1 * limit:
            continue  # the PSU needs it about where it is
        room = f"; the {psu:.0f} W PSU allows {target:.0f} W for each card" if target < default else ""
        out.append(
            RigWarning(
                "power_limit_low",
                i,
                f"GPU {i} ({g.name}) is limited to {limit:.0f} W, {limit / default:.0%} of its default "
                f"{default:.0f} W (set with `nvidia-smi -pl` or by a service at boot, maybe for another job): it "
                f"trains at lower clocks for as long as that stays{room}; if the limit was not meant for this run, "
                # N where several cards are: the report then says the line once for all
                f"{power_limit_command(i if len(low) == 1 else 'N', target, rig.wsl)}",
            )
        )
    return out


def _allowed_limit(rig: Rig, gpus: list[tuple[int, Gpu]], psu: float) -> float:
    """The power limit per card whose transients, with the CPU and the rest, fit the PSU."""
    room = psu - (rig.cpu.tdp_w or DEFAULT_CPU_W) - REST_OF_SYSTEM_W
    return math.floor(room / sum(transient_factor(g.name) for _, g in gpus) / 5) * 5
