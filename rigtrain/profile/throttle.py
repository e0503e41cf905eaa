"""Judging GPU throttling from telemetry samples: when a clock-event reason is worth a
warning, what it costs, and what to do about it. Pure: samples in, messages out, so a
recorded sequence of samples can be replayed in a test.

The rule. NVML reports the reasons a GPU holds its clocks below the maximum at the moment
of a sample. One sample says little: a card that starts a heavy kernel meets its power
limit for a few milliseconds before the clocks settle (the first real GPU run warned of a
power cap "at 43 C, 143 W", a reading taken as the load began). So a reason is reported
only when, over the last WINDOW_S seconds, at least MIN_BUSY_SAMPLES samples were taken
while the GPU was busy (utilisation >= BUSY_UTIL_PCT; where NVML does not report
utilisation, as under WSL2, a power draw >= BUSY_POWER_SHARE of the limit) and the reason
was present in at least SHARE of them. The figures in the report are medians over those busy samples, so a
reading at a load change does not move them. Each reason is reported once per run.

Reasons and advice:
- sw_power_cap: the card's power limit holds the clocks down. At full load this is normal
  for many cards (data-centre cards are designed to run at their limit); it costs the
  clock shown, and the limit can be raised up to the card's maximum when the power supply
  has headroom (`nvidia-smi -pl`, which the user runs: rigtrain never changes card
  settings).
- hw_power_brake: an external signal (the power supply or the board) asked the card to
  slow down: check the PSU's capacity and the GPU's power cables.
- sw_thermal / hw_thermal: heat. Cooling, spacing or a lower power limit help.
- hw_slowdown: a hardware slowdown, from heat or power brake; check both.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rigtrain.wsl import power_limit_command

# NVML clock-event reason bits (nvmlClocksEventReason*) we judge; idle and application
# clock settings are not throttling.
REASON_BITS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}

WINDOW_S = 10.0  # seconds of samples a judgement rests on
BUSY_UTIL_PCT = 50.0  # a sample counts when the GPU was busy at least this much of its period
# Without utilisation: half the power limit is far above idle (a 3090 idles at 20-30 W of 350)
# and below a card working flat out, and the first H200 reading of a starting load (143 of
# 700 W) stays out.
BUSY_POWER_SHARE = 0.5
MIN_BUSY_SAMPLES = 5  # at the default 2 Hz: the reason held for at least 2.5 s of load
SHARE = 0.5  # of the busy samples in the window that must show the reason


def reasons_from_mask(mask: int) -> frozenset[str]:
    return frozenset(name for bit, name in REASON_BITS.items() if mask & bit)


@dataclass(frozen=True)
class Sample:
    """One telemetry reading of one GPU."""

    t: float  # seconds, monotonic
    util_pct: float | None  # None: a reading this card or platform does not report
    power_w: float | None
    sm_clock_mhz: float | None
    temp_c: float | None
    reasons: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CardLimits:
    """What the readings are judged against (NVML, read once); None when unknown."""

    gpu: int
    power_limit_w: float | None = None
    max_power_limit_w: float | None = None
    sm_clock_max_mhz: float | None = None
    slowdown_temp_c: float | None = None
    wsl: bool = False  # Linux under Windows: the power limit is set from Windows


def _median(values: list[float | None]) -> float | None:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class ThrottleReport:
    reason: str
    gpu: int
    power_w: float | None
    sm_clock_mhz: float | None
    temp_c: float | None
    clock_lost: float | None  # fraction of the maximum SM clock not reached
    busy_samples: int
    message: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ThrottleJudge:
    limits: CardLimits
    samples: deque = field(default_factory=deque)
    reported: set = field(default_factory=set)

    def add(self, sample: Sample) -> list[ThrottleReport]:
        """Take a sample; return the reports it completes (usually none)."""
        self.samples.append(sample)
        while self.samples and self.samples[0].t < sample.t - WINDOW_S:
            self.samples.popleft()
        busy = [s for s in self.samples if self._busy(s)]
        if len(busy) < MIN_BUSY_SAMPLES:
            return []
        out = []
        for reason in sorted(set().union(*(s.reasons for s in busy)) - self.reported):
            if sum(reason in s.reasons for s in busy) >= SHARE * len(busy):
                self.reported.add(reason)
                out.append(self._report(reason, busy))
        return out

    def _busy(self, s: Sample) -> bool:
        if s.util_pct is not None:
            return s.util_pct >= BUSY_UTIL_PCT
        limit = self.limits.power_limit_w
        return s.power_w is not None and bool(limit) and s.power_w >= BUSY_POWER_SHARE * limit

    def _report(self, reason: str, busy: list[Sample]) -> ThrottleReport:
        lim = self.limits
        power, clock, temp = (_median([getattr(s, k) for s in busy]) for k in ("power_w", "sm_clock_mhz", "temp_c"))
        lost = max(0.0, 1 - clock / lim.sm_clock_max_mhz) if lim.sm_clock_max_mhz and clock is not None else None
        report = ThrottleReport(
            reason=reason,
            gpu=lim.gpu,
            power_w=power,
            sm_clock_mhz=clock,
            temp_c=temp,
            clock_lost=lost,
            busy_samples=len(busy),
        )
        report.message = describe(report, lim)
        return report


def _figures(r: ThrottleReport, lim: CardLimits) -> str:
    """The readings the card reports, each against its limit where known."""
    said = []
    if r.power_w is not None:
        said.append(f"{r.power_w:.0f} W" + (f" of its {lim.power_limit_w:.0f} W limit" if lim.power_limit_w else ""))
    if r.sm_clock_mhz is not None:
        said.append(
            f"SM clock {r.sm_clock_mhz:.0f}"
            + (f" of {lim.sm_clock_max_mhz:.0f} MHz" if lim.sm_clock_max_mhz else " MHz")
        )
    if r.temp_c is not None:
        said.append(
            f"{r.temp_c:.0f} C" + (f" (it slows down at {lim.slowdown_temp_c:.0f} C)" if lim.slowdown_temp_c else "")
        )
    return ", ".join(said) or "no power, clock or temperature reported"


def describe(r: ThrottleReport, lim: CardLimits) -> str:
    """The one-line report: the reason, the figures that explain it, the cost, the advice."""
    cost = f"; it runs {r.clock_lost:.0%} below its maximum clock" if r.clock_lost is not None else ""
    head = f"GPU {r.gpu} {{what}} under load ({_figures(r, lim)}){cost}"
    if r.reason == "sw_power_cap":
        if lim.power_limit_w and lim.max_power_limit_w and lim.max_power_limit_w > lim.power_limit_w + 1:
            advice = (
                f"if the power supply has headroom, the limit can go up to {lim.max_power_limit_w:.0f} W "
                f"({power_limit_command(r.gpu, lim.max_power_limit_w, lim.wsl)})"
            )
        else:
            advice = "the limit is already the card's maximum; nothing to change"
        return (
            head.format(what="is held at its power limit") + ". At full load this is normal for many cards; " + advice
        )
    if r.reason in ("sw_thermal", "hw_thermal"):
        return (
            head.format(what="is slowing down for heat") + ": improve the airflow (case fans, spacing between "
            f"cards, the fan curve) or lower its power limit ({power_limit_command(r.gpu, 'W', lim.wsl)})"
        )
    if r.reason == "hw_power_brake":
        return (
            head.format(what="is slowed by its power-brake signal") + ": the power supply or the board asked it to "
            "slow down; check the PSU's capacity and that every GPU power cable is seated and separate"
        )
    return (
        head.format(what="is slowed by a hardware slowdown (heat or power brake)") + ": check its temperature "
        "and the power supply's capacity and cables"
    )
