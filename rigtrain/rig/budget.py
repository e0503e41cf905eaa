"""The plan's memory budget: the bytes a training step needs on each GPU beside the step
itself (optimizer states, ZeRO's fp32 weight copies, buckets, workspaces), what lives outside
torch's allocator, how much of a card the allocator may use, and the search for the
largest micro-batch that fits. docs/planner.md, "The memory model", lists every term with
its source. Pure arithmetic on facts; imports nothing from rigtrain but rig/facts.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rigtrain.rig.facts import Gpu

GIB = 2**30
BUCKET_ELEMENTS = 50_000_000  # DeepSpeed reduce/allgather bucket, set in the run's DeepSpeed config

StepPeak = Callable[[int, bool, str], int]  # (micro_batch, checkpointing, precision) -> bytes


def weight_bytes(precision: str) -> int:
    """Bytes per weight (and per gradient) on the card. bf16 trains fp32 weights under
    torch.autocast, which casts them to bf16 as each matmul runs (those copies live inside
    the measured step); fp16 trains the weights themselves in fp16 (DeepSpeed's fp16)."""
    return 2 if precision == "fp16" else 4


def optimizer_state_bytes(parameters: int, precision: str, optimizer: str) -> int:
    """What the optimizer keeps per parameter, before ZeRO shards it: Adam's two moments in
    fp32 (bitsandbytes' 8-bit AdamW: one byte each, plus block-wise scales, ~1%) and, when
    the weights train in fp16, the fp32 master copy of every weight (DeepSpeed's memory
    model: 2 + 2 + 12 bytes per parameter in all). bf16's weights are fp32 already."""
    moments = 2 if optimizer == "adamw8bit" else 8
    master = 4 if precision == "fp16" else 0
    return parameters * (moments + master)


def checkpoint_bytes_per_parameter(precision: str, optimizer: str, stage: int) -> int:
    """What a DeepSpeed checkpoint keeps per parameter: the module's weights (fp16's in fp16,
    else fp32; none at ZeRO-3, whose ranks save only their partitions), Adam's moments and,
    from ZeRO-1 up or in fp16, the fp32 master weights the optimizer steps. Measured on the
    CPU with 1.60M parameters: fp32 ZeRO-0 19.3 MB (12 bytes a parameter), bf16 ZeRO-1
    25.6 MB (16), bf16 ZeRO-3 19.2 MB (12)."""
    module = 0 if stage == 3 else weight_bytes(precision)
    master = 4 if stage >= 1 and precision != "fp16" else 0  # fp16's is among its optimizer states
    return module + optimizer_state_bytes(1, precision, optimizer) + master


def fp32_copy_bytes(parameters: int, precision: str, world: int, stage: int, offload: str) -> int:
    """fp32 buffers DeepSpeed keeps beside fp32 weights: ZeRO-1/2 copy their partition of
    the weights into the flat fp32 groups the optimizer steps (the master copy an fp16 run
    has in its optimizer states); offloaded, that copy lives in RAM. bf16's weights are fp32
    (autocast), so it keeps the same."""
    if precision in ("fp32", "bf16") and stage in (1, 2) and offload == "none":
        return parameters * 4 // world
    return 0


def cublas_workspace_bytes(capability: tuple[int, int] | None) -> int:
    """cuBLAS workspaces, taken from torch's allocator: one per thread that runs matmuls
    (the training thread and autograd's backward thread), each 32 MiB on Hopper and
    Blackwell (compute capability 9.x, 10.x, 12.x) and 4096 KiB x 2 + 16 KiB x 8 before
    (torch's CublasHandlePool.cpp, CUBLAS_WORKSPACE_CONFIG unset). Measured: the demo's
    first step on an H200 allocated 0.07 GiB more than its step, these 64 MiB and the batch."""
    if capability is None:
        return 0
    per_handle = 4096 * 8 * 1024 if capability[0] in (9, 10, 12) else 4096 * 1024 * 2 + 16 * 1024 * 8
    return 2 * per_handle


def peak_bytes(
    step_peak: int,
    *,
    parameters: int,
    precision: str,
    world: int,
    stage: int,
    optimizer: str,
    offload: str,
    capability: tuple[int, int] | None = None,
) -> dict:
    """Per-GPU peak of torch's allocator (what torch.cuda.max_memory_allocated reports):
    the measured step (the input batch, weights and gradients (weight_bytes wide),
    activations, temporaries) with ZeRO's partitioning applied, plus the optimizer states,
    ZeRO's fp32 weight copies, DeepSpeed's communication buckets and cuBLAS's workspaces."""
    width = weight_bytes(precision)
    weights = parameters * width
    saved = 0
    if stage >= 2:  # gradients partitioned: each rank keeps 1/world of them
        saved += weights * (world - 1) // world
    if stage >= 3:  # parameters partitioned too; layers are gathered as they run
        saved += weights * (world - 1) // world - min(parameters, 2 * BUCKET_ELEMENTS) * width
    states = (
        0
        if offload == "cpu"
        else optimizer_state_bytes(parameters, precision, optimizer) // (world if stage >= 1 else 1)
    )
    fp32_copies = fp32_copy_bytes(parameters, precision, world, stage, offload)
    buckets = 2 * BUCKET_ELEMENTS * width if world > 1 and stage >= 1 else 0
    buckets = min(buckets, 2 * weights)
    workspaces = cublas_workspace_bytes(capability)
    total = step_peak - max(0, saved) + states + fp32_copies + buckets + workspaces
    return {
        "step_gib": step_peak / GIB,
        "zero_saving_gib": max(0, saved) / GIB,
        "optimizer_states_gib": states / GIB,
        "fp32_copies_gib": fp32_copies / GIB,
        "buckets_gib": buckets / GIB,
        "cublas_workspaces_gib": workspaces / GIB,
        "total_gib": total / GIB,
    }


# What lives on the card outside torch's allocator, and the allocator's own slack. Each
# is a named term of the plan's memory breakdown (`rigtrain rig` prints them).
#
# CUDA context and libraries: the context, the kernels of torch, cuBLAS, cuDNN and NCCL
# that are loaded into it, and their handles. Measured by the GPU kit on an H200 (driver
# 580, CUDA 13, torch 2.11, lazy module loading, one process, its collectives warmed up
# over NCCL; 2026-12-04, README): NVML's figure for the run's own process less torch's
# reserved was 1.68 GiB for the demo (1.84 - 0.16), 1.67 for `small` (7.02 - 5.35) and 1.66
# for `base` (81.49 - 79.83): the same whatever the model. Published figures for the bare
# context are 0.3 GiB with lazy loading and 0.7 GiB without; the libraries' kernels make
# the rest. The plan starts from the free memory, which already leaves out what the card
# held before the run (0.6 GiB on the H200: its driver's own reservation), so that is not
# counted here. Until 2026-12-08 this was 2.3, taken from the whole card's use on the
# first GPU run, which held those 0.6 as well.
CUDA_CONTEXT_GIB = 1.7
CUDA_CONTEXT_EAGER_EXTRA_GIB = 0.4  # CUDA_MODULE_LOADING=EAGER loads every kernel up front
# NCCL's buffers, allocated with cudaMalloc at a communicator's first use: 0.5-0.7 GB per
# process group on A100s (published measurements); one group (data parallel) per run. A
# run of one process has no peers to keep buffers for (its communicator is in the figure
# above).
NCCL_GIB = 0.6
# Reserved beyond allocated: the caching allocator keeps freed blocks for reuse, and
# blocks of one size cannot always serve another. Measured on the H200: 4% of the peak for
# `small` (static shapes), at least 9% for `base` when the text batch changed shape every
# step (it ran into the card's limit there). The plan keeps 10%.
FRAGMENTATION = 0.10
# torch.profiler's CUPTI activity buffers, outside the allocator, while a profile records.
PROFILER_GIB = 0.5
# Kept free on a card a desktop draws on (X or Wayland: NVML's display-active state), for
# what the desktop takes while the run trains: its use grows with what it shows (a browser
# drawing with the GPU, a video), and torch's allocator, capped at the rest, cannot give
# way. A judgement, not a measurement of rigtrain's; the warning `display_gpu` says it. At
# most a tenth of the card: on a 4 GB card a whole GiB would be a quarter of it, and the
# plan would offload the optimizer for room the desktop rarely takes.
DISPLAY_KEPT_GIB = 1.0
DISPLAY_KEPT_SHARE = 0.10


def kept_for_display(gpu: Gpu) -> float:
    return min(DISPLAY_KEPT_GIB, DISPLAY_KEPT_SHARE * gpu.memory_gib) if gpu.display_active else 0.0


def in_use_before_gib(gpu: Gpu) -> float:
    """What the card held when it was probed (the driver's own reservation, a desktop, other
    programs): outside the free memory the plan starts from, but on the card nvidia-smi shows."""
    return max(0.0, gpu.memory_gib - gpu.memory_free_gib) if gpu.memory_free_gib is not None else 0.0


def room_for_the_run(gpu: Gpu) -> float:
    """The card's free memory less what is kept for its desktop: what the run may plan on."""
    return gpu.free_gib - kept_for_display(gpu)


def outside_allocator_gib(
    *, world: int, profiling: bool = False, lazy_loading: bool = True, measured: float | None = None
) -> dict:
    """The named room the plan leaves outside torch's allocator, per GPU. measured: what an
    earlier run's first steps found there on this card, for this kind of run (NVML's used
    less torch's reserved: train/memory_record.py), which replaces the figures above."""
    if measured is not None:
        return {"measured_outside_gib": measured}
    return {
        "cuda_context_gib": CUDA_CONTEXT_GIB + (0.0 if lazy_loading else CUDA_CONTEXT_EAGER_EXTRA_GIB),
        "nccl_gib": NCCL_GIB if world > 1 else 0.0,
        "profiler_gib": PROFILER_GIB if profiling else 0.0,
    }


OUTSIDE_NAMES = {
    "cuda_context_gib": "the CUDA context and libraries",
    "nccl_gib": "NCCL",
    "profiler_gib": "the profiler",
    "measured_outside_gib": "what an earlier run measured beside the allocator on this card",
}


def named_outside(outside: dict, digits: int = 2) -> str:
    """The room outside the allocator, term by term: "2.30 for the CUDA context and libraries, ..."."""
    return ", ".join(f"{v:.{digits}f} for {OUTSIDE_NAMES.get(k, k)}" for k, v in outside.items() if v)


def usable_gib(gpu: Gpu, outside: dict) -> tuple[float, float, str]:
    """(what the allocator's peak may reach, the allocator's cap, why): the free memory less
    the room outside the allocator is the allocator's cap; the peak may take all of it but
    the fragmentation share. A card with less free than that room leaves nothing (0, not a
    negative cap that torch's allocator would refuse: the plan then says nothing fits)."""
    cap = max(0.0, room_for_the_run(gpu) - sum(outside.values()))
    usable = cap / (1 + FRAGMENTATION)
    named = named_outside(outside)
    desktop = f"{kept_for_display(gpu):.2f} kept for the desktop it draws, " if gpu.display_active else ""
    return (
        usable,
        cap,
        (
            f"{gpu.free_gib:.1f} GiB free on the smallest card, less {desktop}{named} leaves {cap:.2f} GiB for "
            f"torch's allocator; its peak may use {usable:.2f} of it, "
            f"{FRAGMENTATION:.0%} being kept for fragmentation"
        ),
    )


class MicroBatchSearch:
    """Largest micro-batch whose step fits a byte budget, measuring as few steps as it
    can: the peak is close to affine in the micro-batch (every activation scales with it),
    so interpolating between a size that fits and one that does not lands on or next to
    the answer, and each guess is measured, never assumed."""

    def __init__(self, step_peak: StepPeak, precision: str):
        self.step_peak, self.precision = step_peak, precision
        self.cache: dict[tuple[int, bool], int] = {}

    def peak(self, micro_batch: int, checkpointing: bool) -> int:
        key = (micro_batch, checkpointing)
        if key not in self.cache:
            self.cache[key] = self.step_peak(micro_batch, checkpointing, self.precision)
        return self.cache[key]

    def largest(self, checkpointing: bool, budget: float, cap: int) -> int:
        """The largest b in 1..cap with peak(b) <= budget, or 0."""
        peak = lambda b: self.peak(b, checkpointing)  # noqa: E731
        if peak(1) > budget:
            return 0
        if peak(cap) <= budget:
            return cap
        low, high = 1, cap  # peak(low) fits, peak(high) does not
        while high - low > 1:
            slope = (peak(high) - peak(low)) / (high - low)
            guess = low + int((budget - peak(low)) / slope) if slope > 0 else low + 1
            guess = min(high - 1, max(low + 1, guess))
            if peak(guess) <= budget:
                low = guess
                if guess + 1 < high and peak(guess + 1) > budget:  # the interpolation was exact
                    high = guess + 1
            else:
                high = guess
        return low


Setting = tuple[int, bool, str, str]  # one way to run the step: (ZeRO stage, checkpointing, optimizer, offload)


@dataclass
class CardBudget:
    """What every decision of a GPU plan shares: the cards, the precision and the memory."""

    gpus: list[Gpu]
    precision: str
    capability: tuple[int, int]  # the oldest card's
    smallest: Gpu  # the card with the least free memory: ZeRO runs one micro-batch on every rank
    outside: dict  # room outside torch's allocator, by term (GiB)
    usable: float  # GiB the allocator's peak may reach on the smallest card
    allocator_cap: float
    why_usable: str
    share: int  # clips per GPU per optimizer step: the largest micro-batch worth having
    parameters: int
    search: MicroBatchSearch
    bitsandbytes: bool = True  # installed (or, in a rig file that does not say, assumed)
    smallest_index: int = 0  # the rig's index of `smallest`

    @property
    def smallest_named(self) -> str:
        return f"GPU {self.smallest_index} ({self.smallest.name})"

    @property
    def world(self) -> int:
        return len(self.gpus)

    @property
    def narrow(self) -> bool:  # a link of 8 lanes or fewer between several GPUs
        return self.world > 1 and min((g.pcie.width for g in self.gpus if g.pcie), default=16) <= 8

    @property
    def eight_bit(self) -> bool:  # bitsandbytes' 8-bit optimizers: Pascal and newer, when installed
        return self.bitsandbytes and all(g.compute_capability >= (6, 0) for g in self.gpus)

    def memory(self, micro_batch: int, setting: Setting) -> dict:
        """The allocator's peak for this micro-batch and setting, term by term (GiB)."""
        stage, checkpointing, optimizer, offload = setting
        step = self.search.peak(micro_batch, checkpointing) if micro_batch else 0
        return peak_bytes(
            step,
            parameters=self.parameters,
            precision=self.precision,
            world=self.world,
            stage=stage,
            optimizer=optimizer,
            offload=offload,
            capability=self.capability,
        )

    def step_budget(self, setting: Setting) -> float:
        """Bytes the measured step may take once the rest of the setting's memory is counted."""
        return (self.usable - self.memory(0, setting)["total_gib"]) * GIB
