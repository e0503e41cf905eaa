"""From a profiled run's trace to a verdict: where each step's wall time went, why the GPU
was idle, and what to change. Pure: trace events and a few facts about the run in, a
summary out, so it is tested with hand-made traces.

The step-time breakdown (fractions of the recorded steps' wall time, summing to 1):
- data_wait      the train loop waiting for the next batch (rigtrain/data_wait spans)
- communication  collective operations (NCCL kernels on a GPU; gloo/c10d calls on the CPU)
- optimizer      the optimizer step (rigtrain/optimizer), less its communication
- compute        forward and backward: GPU kernels on a GPU, the spans on the CPU
- host           on a GPU: time the GPU sat idle while Python launched work; on the CPU:
                 the loop's own bookkeeping outside the spans
- other          what no category claims
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Collectives by name; "broadcast" alone would also take aten::broadcast_tensors (every
# elementwise op with a loss on mismatched shapes), which moves no data between ranks.
COMM = re.compile(
    r"nccl|gloo|c10d::|all_?reduce|all_?gather|reduce_?scatter|broadcast(?!_tensors|_to|_shapes)|record_param_comms",
    re.IGNORECASE,
)
CATEGORIES = ("data_wait", "host", "compute", "communication", "optimizer", "other")

# The verdict's thresholds (fractions of step time). Input: torch-tb-profiler flags a
# DataLoader share above 5% for more workers; a fifth of every step spent waiting is a
# pipeline that cannot keep up, not noise. Communication: its 10% flag is for tuning;
# a quarter of the step is the point where ZeRO stage and links decide speed.
INPUT_BOUND = 0.20
COMMUNICATION_BOUND = 0.25
HOST_BOUND = 0.35


@dataclass
class RunFacts:
    """What the analysis cannot read from the trace."""

    device: str  # "cuda" | "cpu"
    clips_per_step: int  # all ranks together
    world_size: int
    loader_threads: int
    cpu_threads: int
    data_is_raw_videos: bool
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int = 1
    compiled: bool = False
    largest_micro_batch: int | None = None  # what the plan found to fit (plan_types.Plan)
    flops_per_clip: float | None = None
    peak_tflops: float | None = None
    gpu_name: str | None = None
    pcie: str | None = None
    extra: dict = field(default_factory=dict)


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _clip(intervals, start: float, end: float) -> list[tuple[float, float]]:
    return [(max(a, start), min(b, end)) for a, b in intervals if b > start and a < end]


def _intersect(a_list, b_list) -> float:
    total = 0.0
    for a0, a1 in a_list:
        for b0, b1 in b_list:
            total += max(0.0, min(a1, b1) - max(a0, b0))
    return total


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
# On a GPU, Kineto draws each ProfilerStep#N again on the GPU's timeline (category
# gpu_user_annotation, from its first kernel to its last). A step is the host's range: counting
# both made an H200 trace's 3 steps 6 and halved every figure per step.
GPU_STEP_RANGE = "gpu_user_annotation"


def timeline_events(events: list[dict]) -> list[dict]:
    """The events the breakdown and the charts read: complete ranges of the recorded steps,
    of rigtrain's phases and loader threads, GPU work, and collectives. A trace's other
    events, every CPU op (40 thousand a step for the base preset), are dropped in one pass
    here instead of being scanned by each of the breakdown's."""
    kept = []
    for e in events:
        if e.get("ph") != "X" or "ts" not in e or "dur" not in e:
            continue
        name, category = str(e.get("name", "")), e.get("cat")
        if category == GPU_STEP_RANGE:
            continue
        if (
            name.startswith(("ProfilerStep#", "rigtrain/"))
            or category in GPU_WORK
            or (category == "cpu_op" and COMM.search(name))
        ):
            kept.append(e)
    return kept


def breakdown(events: list[dict], device: str) -> tuple[dict[str, float], dict]:
    """Fractions per category over the ProfilerStep windows, and the raw numbers."""
    complete = timeline_events(events)
    steps = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in complete if str(e.get("name", "")).startswith("ProfilerStep#")
    )
    if not steps:
        raise ValueError("the trace has no ProfilerStep ranges: was the profiler stepped?")

    def spans(name: str):
        return _merge([(e["ts"], e["ts"] + e["dur"]) for e in complete if e.get("name") == f"rigtrain/{name}"])

    wall = sum(b - a for a, b in steps)
    windows = _merge(steps)
    data_wait, forward, backward, optimizer = (spans(n) for n in ("data_wait", "forward", "backward", "optimizer"))
    within = lambda iv: [x for s, t in windows for x in _clip(iv, s, t)]  # noqa: E731
    data_wait, forward, backward, optimizer = map(within, (data_wait, forward, backward, optimizer))
    if device == "cuda":
        kernels = [e for e in complete if e.get("cat") in GPU_WORK]
        comm = within(_merge([(e["ts"], e["ts"] + e["dur"]) for e in kernels if COMM.search(e.get("name", ""))]))
        work = within(_merge([(e["ts"], e["ts"] + e["dur"]) for e in kernels if not COMM.search(e.get("name", ""))]))
        opt_work = _intersect(work, optimizer)
        parts = {
            "compute": _length(work) - opt_work,
            "optimizer": opt_work,
            "communication": _length(comm) - _intersect(comm, work),
            "data_wait": _length(data_wait),
        }
        busy_or_waiting = _merge(work + comm + data_wait)
        parts["host"] = max(0.0, wall - _length(busy_or_waiting))  # the GPU idle, not for data
        # Holistic Trace Analysis's "idle" (its temporal breakdown): no kernel, copy or
        # collective on any stream, from the first GPU work of the recorded steps to the last
        gpu_busy = _merge(work + comm)
        span = gpu_busy[-1][1] - gpu_busy[0][0] if gpu_busy else 0.0
        gpu_idle = (span - _length(gpu_busy)) / span if span else 1.0
    else:
        comm = within(
            _merge(
                [
                    (e["ts"], e["ts"] + e["dur"])
                    for e in complete
                    if e.get("cat") == "cpu_op" and COMM.search(e.get("name", ""))
                ]
            )
        )
        in_opt = _intersect(comm, optimizer)
        gpu_idle = None
        parts = {
            "data_wait": _length(data_wait),
            "communication": _length(comm),
            "optimizer": max(0.0, _length(optimizer) - in_opt),
            "compute": max(0.0, _length(forward) + _length(backward) - (_length(comm) - in_opt)),
        }
        parts["host"] = max(0.0, wall - sum(parts.values()))
    claimed = sum(parts.values())
    if claimed > wall:  # overlaps counted twice (asynchronous GPU work): scale to the wall time
        parts = {k: v * wall / claimed for k, v in parts.items()}
        claimed = wall
    parts["other"] = wall - claimed
    fractions = {k: parts.get(k, 0.0) / wall for k in CATEGORIES}
    numbers = {
        "gpu_idle_share": None if gpu_idle is None else round(gpu_idle, 4),
        "steps": len(steps),
        "step_ms": wall / len(steps) / 1000,
        "ms_per_step": {k: round(parts.get(k, 0.0) / len(steps) / 1000, 3) for k in CATEGORIES},
    }
    loader = [e for e in complete if str(e.get("name", "")).startswith("rigtrain/loader_")]
    if loader:
        busy_s = sum(e["dur"] for e in loader) / 1e6
        clips = sum(e.get("args", {}).get("clips", 0) for e in loader)
        threads = len({e["tid"] for e in loader})
        numbers["loader"] = {
            "batches": len(loader),
            "threads_seen": threads,
            "clips_per_s_per_thread": round(clips / busy_s, 2) if busy_s else None,
            "ms_per_batch": round(busy_s * 1000 / len(loader), 2),
        }
    return fractions, numbers


def verdict(fractions: dict[str, float]) -> tuple[str, str]:
    f = fractions
    if f["data_wait"] >= INPUT_BOUND:
        return "input-bound", f"waiting for data is {f['data_wait']:.0%} of step time (>= {INPUT_BOUND:.0%})"
    if f["communication"] >= COMMUNICATION_BOUND:
        return (
            "communication-bound",
            f"communication is {f['communication']:.0%} of step time (>= {COMMUNICATION_BOUND:.0%})",
        )
    if f["host"] >= HOST_BOUND:
        return "host-bound", f"the host's own work is {f['host']:.0%} of step time (>= {HOST_BOUND:.0%})"
    return "compute-bound", (
        f"compute and optimizer are {f['compute'] + f['optimizer']:.0%} of step time; "
        f"data wait {f['data_wait']:.0%}, communication {f['communication']:.0%}, "
        f"host {f['host']:.0%}"
    )


def suggestions(kind: str, fractions: dict, numbers: dict, facts: RunFacts) -> list[str]:
    out: list[str] = []
    step_s = numbers["step_ms"] / 1000
    consumes = facts.clips_per_step / facts.world_size / step_s  # clips/s one process eats
    loader = numbers.get("loader", {})
    if kind == "input-bound":
        per_thread = loader.get("clips_per_s_per_thread")
        if per_thread:
            who = "reading in the train loop" if facts.loader_threads == 0 else "one loader thread"
            out.append(
                f"{who} delivers {per_thread:.1f} clips/s; this process consumes {consumes:.1f} "
                f"clips/s while waiting {numbers['ms_per_step']['data_wait']:.0f} ms per step"
            )
        if facts.data_is_raw_videos:
            out.append(
                "every clip is decoded from the videos on the fly: prepare them once with "
                "`rigtrain data prepare SRC_DIR OUT_DIR` and train with --data OUT_DIR "
                "(`rigtrain data bench OUT_DIR` shows the gain, typically hundreds of times)"
            )
        spare = max(0, facts.cpu_threads // facts.world_size - 1 - facts.loader_threads)
        if facts.loader_threads == 0:
            out.append(
                f"data.workers=0 reads in the train loop itself: set data.workers (this machine has "
                f"{facts.cpu_threads} hardware threads) so batches are read ahead"
            )
        elif spare > 0:
            out.append(
                f"{facts.loader_threads} loader thread(s) per process on {facts.cpu_threads} hardware threads: "
                f"try data.workers={facts.loader_threads + spare}"
            )
        if not facts.data_is_raw_videos and facts.loader_threads > 0:
            out.append(
                "the shards may not be in the page cache: put them on a faster disk (NVMe), or run "
                "`rigtrain data bench` to see what the disk delivers"
            )
    elif kind == "communication-bound":
        link = f" over {facts.pcie}" if facts.pcie else ""
        out.append(f"collectives take {fractions['communication']:.0%} of each step{link}")
        if facts.zero_stage >= 2:
            out.append(
                f"ZeRO-{facts.zero_stage} reduces gradients after every micro-step; ZeRO-1 with more "
                "accumulation (train.grad_accum_steps) communicates once per optimizer step"
            )
        out.append("raise train.grad_accum_steps so each exchange of gradients is amortised over more clips")
        out.append("check `rigtrain rig` for pcie_narrow / no_p2p warnings: an x4 slot or no P2P halves the bandwidth")
    elif kind == "host-bound":
        out.append(
            f"the GPU waits on Python for {fractions['host']:.0%} of each step: "
            + _larger_micro_batch(facts, "gives each kernel more work per launch")
        )
        if not facts.compiled:
            out.append("fewer, larger kernels: train.compile=true (torch.compile fuses the model's small operations)")
        out.append(
            "check your own changes for host syncs in the step (.item(), .cpu(), printing a tensor): "
            "tests/test_gpu_path.py counts them"
        )
    else:
        if facts.flops_per_clip and facts.peak_tflops:
            achieved = facts.flops_per_clip * consumes / 1e12
            out.append(
                f"{achieved:.1f} TFLOPS achieved of {facts.peak_tflops:g} peak "
                f"({achieved / facts.peak_tflops:.0%} MFU): the GPU is the limit, as it should be"
            )
        else:
            out.append("the model's own arithmetic is the limit, as it should be")
        if facts.device == "cuda":
            out.append(
                "to go faster: bf16 where the card has it, activation checkpointing off if it is on, or "
                + _larger_micro_batch(facts, "if memory allows (`rigtrain rig` shows the headroom)")
            )
        else:
            out.append("on the CPU that is expected; a GPU is where this model trains fast")
    return out


def _larger_micro_batch(facts: RunFacts, why: str) -> str:
    """What the config allows: with accumulation, a larger micro-batch and fewer micro-steps keep
    the experiment; without, the micro-batch already is the per-GPU share of the global batch,
    and growing it changes the experiment, not only its speed."""
    mb, accum, largest = facts.micro_batch_size, facts.grad_accum_steps, facts.largest_micro_batch
    if accum > 1:
        bigger = next((mb * k for k in range(2, accum + 1) if accum % k == 0), mb * accum)
        if largest is not None and bigger > largest:
            # an H200's base run was told to double a micro-batch the plan had found too large
            return (
                f"a larger micro-batch, but none that keeps the global batch fits: {bigger} is the next that "
                f"splits it evenly, and the plan found {largest} the largest that fits this card"
            )
        return (
            f"a larger micro-batch {why}: train.micro_batch_size={bigger} "
            f"train.grad_accum_steps={accum * mb // bigger} keeps the global batch of {facts.clips_per_step}"
        )
    return (
        f"a larger micro-batch {why}, but {mb} is already each GPU's whole share of the global batch "
        f"({facts.clips_per_step}): a larger one changes the experiment (train.global_batch_size, and the "
        "learning rate that suits it), not only its speed"
    )


def analyze(events: list[dict], facts: RunFacts) -> dict:
    fractions, numbers = breakdown(events, facts.device)
    kind, reason = verdict(fractions)
    step_s = numbers["step_ms"] / 1000
    summary = {
        "verdict": kind,
        "because": reason,
        "breakdown": {k: round(v, 4) for k, v in fractions.items()},
        "numbers": numbers,
        "suggestions": suggestions(kind, fractions, numbers, facts),
        "clips_per_s": round(facts.clips_per_step / step_s, 2),
    }
    if facts.flops_per_clip:
        achieved = facts.flops_per_clip * facts.clips_per_step / step_s / facts.world_size / 1e12
        summary["achieved_tflops_per_device"] = round(achieved, 3)
        if facts.peak_tflops:
            summary["mfu"] = round(achieved / facts.peak_tflops, 4)
            summary["peak_tflops"] = facts.peak_tflops
    return summary


def gpu_idle_line(share: float) -> str:
    return f"  GPU idle {share:.1%} of the time from its first kernel to its last (Holistic Trace Analysis's idle)"


def format_summary(summary: dict) -> str:
    n = summary["numbers"]
    lines = [
        f"verdict: {summary['verdict']} ({summary['because']})",
        f"{n['steps']} recorded step(s), {n['step_ms']:.1f} ms each, {summary['clips_per_s']:.1f} clips/s",
    ]
    width = max(len(k) for k in CATEGORIES)
    for key in CATEGORIES:
        share = summary["breakdown"][key]
        lines.append(f"  {key:<{width}}  {share:6.1%}  {n['ms_per_step'][key]:9.1f} ms  {'#' * round(share * 40)}")
    if n.get("gpu_idle_share") is not None:
        lines.append(gpu_idle_line(n["gpu_idle_share"]))
    if "achieved_tflops_per_device" in summary:
        mfu = f", MFU {summary['mfu']:.1%} of {summary['peak_tflops']:g} TFLOPS" if "mfu" in summary else ""
        lines.append(f"  achieved {summary['achieved_tflops_per_device']:.3f} TFLOPS per device{mfu}")
    lines += ["what to change:"] + [f"  - {s}" for s in summary["suggestions"]]
    return "\n".join(lines)
