"""A step-time model for ordering and pruning tune candidates (docs/tune.md): how long one
optimizer step should take for a way of running it, term by term, from the FLOPs the model
does, the recompute checkpointing adds, the bytes ZeRO moves over the links this rig has,
the optimizer's memory traffic and offload's host round trip.

It is a prior, not a measurement: its constants are round figures (a GPU reaches about 40%
of its peak on this model's kernels, a small micro-batch less), good enough to say that
offloading is several times slower than not, or that ZeRO-3 on a PCIe x4 link costs more
than it saves, and to try the likely-fast configurations first. `rigtrain tune` measures
every configuration it keeps. Pure: imports nothing above rig/."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rigtrain.rig.facts import P2P_BROKEN, Rig
from rigtrain.rig.links import pcie_gb_s
from rigtrain.rig.peaks import peak_tflops

# The share of the card's dense peak this model's kernels reach at a large micro-batch
# (attention and small matmuls: the first H200 run measured MFU in the tens of percent).
GPU_EFFICIENCY = 0.4
# The micro-batch at which a GPU reaches half that: below it the step is launch-bound.
GPU_HALF_EFFICIENCY_MICRO_BATCH = 4
# What a CPU hardware thread sustains on these matmuls in fp32 (AVX2 at a few GHz): the
# demo preset measured ~190 clips/s on 2 threads (`rigtrain tune`, 2026-11-30).
CPU_FLOPS_PER_THREAD = 6e10
# Host time per micro-step: Python, DeepSpeed's hooks and kernel launches (GPU), or
# DeepSpeed's bookkeeping and the autograd engine (CPU).
GPU_MICRO_STEP_OVERHEAD_S = 3e-3
CPU_MICRO_STEP_OVERHEAD_S = 2e-2
COMPILED_SPEEDUP = 0.85  # fused kernels: a compiled step's compute and launches, relative
RECOMPUTE = 4 / 3  # activation checkpointing runs the forward twice: 3 passes become 4
GPU_MEMORY_BYTES_S = 1e12  # the fused AdamW's update streams its states at HBM/GDDR speed
CPU_MEMORY_BYTES_S = 5e9
ADAM_BYTES_PER_PARAMETER = 16  # fp32 master, two moments and the gradient, read and written
CPU_ADAM_BYTES_S = 2e9  # an offloaded optimizer step on the host's cores
GLOO_BYTES_S = 1e9  # gloo's allreduce between processes of one machine
NVLINK_BYTES_S = 50e9
HOST_BOUNCE_BYTES_S = 6e9  # no P2P: NCCL goes through host memory
LOADER_SERIAL_S_PER_BATCH = 5e-3  # data.workers=0: reading and collating in the step's thread
LOADER_THREAD_COST = 0.25  # a CPU loader thread takes this share of a core from the step


@dataclass(frozen=True)
class SpeedFacts:
    """What the model needs about the rig and the model, shared by every candidate."""

    device: str  # "cuda" or "cpu"
    parameters: int
    flops_per_clip: float  # forward + backward, without recompute
    precision: str
    cpu_threads: int
    peak_tflops: float | None = None  # the slowest chosen card's dense bf16/fp16 peak
    link_bytes_s: float | None = None  # between GPUs, per direction
    host_link_bytes_s: float | None = None  # GPU <-> host (offload)


@dataclass(frozen=True)
class Way:
    """One way of running the step, as far as its speed goes."""

    world: int
    micro_batch: int
    accum: int
    checkpointing: bool = False
    zero_stage: int = 1
    offload: str = "none"
    loader_workers: int = 1
    compiled: bool = False


def facts_for(rig: Rig, gpus: tuple[int, ...], parameters: int, flops_per_clip: float, precision: str) -> SpeedFacts:
    if not rig.gpus:
        return SpeedFacts("cpu", parameters, flops_per_clip, precision, rig.threads)
    indices = tuple(gpus or range(len(rig.gpus)))
    chosen = [rig.gpus[i] for i in indices]
    peaks = [peak_tflops(g.name) for g in chosen]
    # a card missing from the peak table: a modest card's figure, so the terms keep their scale
    peak = min((p for p in peaks if p), default=30.0)
    # at the generation the link trains at, not the one an idle card dropped to when probed
    host = min((pcie_gb_s(*g.link_under_load) * 1e9 for g in chosen if g.pcie), default=pcie_gb_s(4, 16) * 1e9)
    link = None
    if len(chosen) > 1:
        if _p2p_check_failed(rig, indices):  # NCCL_P2P_DISABLE=1: through host memory
            link = min(host, HOST_BOUNCE_BYTES_S)
        elif all(rig.gpus[a].nvlink and rig.gpus[a].nvlink[b] for a in indices for b in indices if a != b):
            link = NVLINK_BYTES_S
        elif all(rig.gpus[a].p2p is None or rig.gpus[a].p2p[b] for a in indices for b in indices):  # the run's pairs
            link = host
        else:
            link = min(host, HOST_BOUNCE_BYTES_S)
    return SpeedFacts("cuda", parameters, flops_per_clip, precision, rig.threads, peak, link, host)


def _p2p_check_failed(rig: Rig, indices: tuple[int, ...]) -> bool:
    """A pair of these GPUs offered P2P and failed its check (rig/p2p_check.py)."""
    for a in indices:
        row = rig.gpus[a].p2p_check
        if row and any(row[b] and row[b]["result"] in (*P2P_BROKEN, "unavailable") for b in indices if b != a):
            return True
    return False


def step_seconds(facts: SpeedFacts, way: Way) -> dict[str, float]:
    """Predicted seconds per optimizer step, by term, and their sum under "total"."""
    clips = way.micro_batch * way.accum  # per rank
    work = facts.flops_per_clip * clips * (RECOMPUTE if way.checkpointing else 1.0)
    grad_bytes = facts.parameters * (2 if facts.precision in ("bf16", "fp16") else 4)
    if facts.device == "cuda":
        efficiency = GPU_EFFICIENCY * way.micro_batch / (way.micro_batch + GPU_HALF_EFFICIENCY_MICRO_BATCH)
        compute = work / ((facts.peak_tflops or 30.0) * 1e12 * efficiency)
        overhead = GPU_MICRO_STEP_OVERHEAD_S * way.accum
        memory_bytes_s = GPU_MEMORY_BYTES_S
        link = facts.link_bytes_s or HOST_BOUNCE_BYTES_S
        # a GPU's loader threads run beside the step; with none, each batch is read in its thread
        data = 0.0 if way.loader_workers else LOADER_SERIAL_S_PER_BATCH * way.accum
    else:
        threads = max(0.5, facts.cpu_threads / way.world - LOADER_THREAD_COST * way.loader_workers)
        compute = work / (CPU_FLOPS_PER_THREAD * threads * way.micro_batch / (way.micro_batch + 1))
        overhead = CPU_MICRO_STEP_OVERHEAD_S * way.accum
        memory_bytes_s = CPU_MEMORY_BYTES_S
        link = GLOO_BYTES_S
        data = 0.0 if way.loader_workers else LOADER_SERIAL_S_PER_BATCH * way.accum
    if way.compiled:
        compute *= COMPILED_SPEEDUP
        overhead *= COMPILED_SPEEDUP
    sharded = way.world if way.zero_stage >= 1 else 1
    optimizer = facts.parameters * ADAM_BYTES_PER_PARAMETER / sharded / memory_bytes_s
    communication = _communication(way, grad_bytes, link)
    offload = 0.0
    if way.offload == "cpu":
        optimizer = facts.parameters * ADAM_BYTES_PER_PARAMETER / sharded / CPU_ADAM_BYTES_S
        offload = 2 * grad_bytes / sharded / (facts.host_link_bytes_s or pcie_gb_s(4, 16) * 1e9)
    terms = {
        "compute": compute,
        "overhead": overhead,
        "optimizer": optimizer,
        "communication": communication,
        "offload": offload,
        "data": data,
    }
    terms["total"] = sum(terms.values())
    return terms


def _communication(way: Way, grad_bytes: int, link_bytes_s: float) -> float:
    """Ring collectives move (w-1)/w of the tensor per direction for a reduce-scatter or an
    all-gather; an all-reduce is both."""
    if way.world == 1:
        return 0.0
    part = (way.world - 1) / way.world * grad_bytes / link_bytes_s
    if way.zero_stage <= 1:
        return 2 * part  # one all-reduce of the gradients per optimizer step
    # ZeRO-2: a reduce-scatter every micro-step, then the updated shards gathered once
    seconds = part * way.accum + part
    if way.zero_stage == 3:
        seconds += 2 * part * way.accum  # the parameters gathered for the forward and again for the backward
    return seconds


def accumulation_ladder(share: int, rungs: int = 4) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs that keep a rank's clips per step at `share`,
    halving the micro-batch each rung (spread evenly: 2 x 24, not 32 + 16)."""
    out: list[tuple[int, int]] = []
    accum = 1
    while len(out) < rungs and accum <= share:
        micro = math.ceil(share / accum)
        if micro not in [m for m, _ in out]:
            out.append((micro, math.ceil(share / micro)))
        accum *= 2
    return out
