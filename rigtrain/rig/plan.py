"""The planner: rig facts + the run's config -> a plan, each choice with its reason.

Pure: the only outside input is `step_peak`, a function train/ provides that measures a
training step's peak bytes for (micro_batch, checkpointing, precision) under
FakeTensorMode. Everything else is arithmetic on facts, so plans are tested with rig
files on a CPU."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from rigtrain.rig.facts import Gpu, Rig

GIB = 2**30
BUCKET_ELEMENTS = 50_000_000  # DeepSpeed reduce/allgather bucket, set in the run's DeepSpeed config
GOOD_MICRO_BATCH = 8  # below this a GPU idles between small kernels; worth checkpointing to reach it
RAM_PER_WORKER_GIB = 0.25  # a loader thread's batches in flight (small-preset clips) and its stack

StepPeak = Callable[[int, bool, str], int]  # (micro_batch, checkpointing, precision) -> bytes


@dataclass(frozen=True)
class PlanRequest:
    """What the planner needs from the config: the choices left to it and those the user fixed."""

    parameters: int
    global_batch: int  # clips per optimizer step, all GPUs together
    precision: str = "auto"  # "auto" or fixed
    fixed: dict = field(default_factory=dict)  # key -> value the user set (train.micro_batch_size, ...)
    config: dict = field(default_factory=dict)  # the same keys' values in the config (used without a GPU)
    gpus: tuple[int, ...] = ()  # rig.gpus; () = all
    cpu_processes: int = 1  # train.nproc, on a machine without GPUs
    loader_workers: int = -1  # data.workers; -1 = from the cores
    psu_w: float | None = None  # --psu-watts: what no probe can read
    batch_bytes: int = 0  # one micro-batch of uint8 clips, for pinned-memory and RAM estimates
    clip_bytes: int = 0  # one clip's input tensors (video, audio, text), to show the batch's share
    profiling: bool = False  # profile.enabled: the profiler's buffers need room on the card
    lazy_loading: bool = True  # CUDA_MODULE_LOADING is not EAGER: kernels load as they are first used


@dataclass
class Warning:
    code: str
    gpu: int | None
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "gpu": self.gpu, "message": self.message}


@dataclass
class Plan:
    device: str
    gpus: tuple[int, ...]
    world_size: int
    precision: str
    micro_batch_size: int
    grad_accum_steps: int
    activation_checkpointing: bool
    zero_stage: int
    offload_optimizer: str
    optimizer: str
    dataloader_workers: int
    env: dict[str, str]
    predicted_peak_gib: float | None
    usable_gib: float | None
    reasons: dict[str, str]
    from_user: list[str]
    warnings: list[Warning]
    memory: dict = field(default_factory=dict)  # the breakdown behind predicted_peak_gib

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "warnings"}
        out["gpus"] = list(self.gpus)
        return out


# -- precision -----------------------------------------------------------------------------

def choose_precision(capability: tuple[int, int]) -> tuple[str, str]:
    """bf16 needs compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() says yes
    on older cards through emulation that is slower than fp32. 7.x has fp16 tensor cores
    that need dynamic loss scaling; Pascal's consumer fp16 is crippled, so fp32 there."""
    major, minor = capability
    if capability >= (8, 0):
        return "bf16", f"compute capability {major}.{minor} >= 8.0 has native bf16"
    if capability >= (7, 0):
        return "fp16", f"compute capability {major}.{minor} has fp16 tensor cores but no bf16: fp16 with dynamic loss scaling"
    return "fp32", f"compute capability {major}.{minor} < 7.0: fp16 runs at a fraction of fp32 speed on this card, so fp32"


# -- memory --------------------------------------------------------------------------------

def optimizer_state_bytes(parameters: int, precision: str, optimizer: str) -> int:
    """What the optimizer keeps per parameter, before ZeRO shards it: Adam's two moments in
    fp32 (bitsandbytes' 8-bit AdamW: one byte each, plus block-wise scales, ~1%) and, when
    the weights train in bf16/fp16, the fp32 master copy of every weight (DeepSpeed's
    memory model: 2 + 2 + 12 bytes per parameter in all)."""
    moments = 2 if optimizer == "adamw8bit" else 8
    master = 4 if precision in ("bf16", "fp16") else 0
    return parameters * (moments + master)


def fp32_gradient_bytes(parameters: int, precision: str, world: int, stage: int, offload: str) -> int:
    """fp32 gradients kept beside the training-dtype ones when bf16 accumulates in fp32 (the
    trainer's data_types.grad_accum_dtype): DeepSpeed's BF16_Optimizer (ZeRO-1) and ZeRO-2
    keep a full fp32 buffer, ZeRO-3 each rank's partition. And fp32 ZeRO-1/2 keep an fp32
    copy of their partition of the weights (the master copy a mixed-precision run has in its
    optimizer states)."""
    if precision == "bf16" and stage in (1, 2) and offload == "none":
        return parameters * 4
    if precision == "bf16" and stage == 3 and offload == "none":
        return parameters * 4 // world
    if precision == "fp32" and stage in (1, 2):
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


def peak_bytes(step_peak: int, *, parameters: int, precision: str, world: int, stage: int, optimizer: str,
               offload: str, capability: tuple[int, int] | None = None) -> dict:
    """Per-GPU peak of torch's allocator (what torch.cuda.max_memory_allocated reports):
    the measured step (the input batch, parameters and gradients in the training dtype,
    activations, temporaries) with ZeRO's partitioning applied, plus the optimizer states,
    fp32 gradient buffers, DeepSpeed's communication buckets and cuBLAS's workspaces."""
    width = 4 if precision == "fp32" else 2
    weights = parameters * width
    saved = 0
    if stage >= 2:  # gradients partitioned: each rank keeps 1/world of them
        saved += weights * (world - 1) // world
    if stage >= 3:  # parameters partitioned too; layers are gathered as they run
        saved += weights * (world - 1) // world - min(parameters, 2 * BUCKET_ELEMENTS) * width
    states = 0 if offload == "cpu" else optimizer_state_bytes(parameters, precision, optimizer) // (world if stage >= 1 else 1)
    fp32_grads = fp32_gradient_bytes(parameters, precision, world, stage, offload)
    buckets = 2 * BUCKET_ELEMENTS * width if world > 1 and stage >= 1 else 0
    buckets = min(buckets, 2 * weights)
    workspaces = cublas_workspace_bytes(capability)
    total = step_peak - max(0, saved) + states + fp32_grads + buckets + workspaces
    return {"step_gib": step_peak / GIB, "zero_saving_gib": max(0, saved) / GIB, "optimizer_states_gib": states / GIB,
            "fp32_gradients_gib": fp32_grads / GIB, "buckets_gib": buckets / GIB,
            "cublas_workspaces_gib": workspaces / GIB, "total_gib": total / GIB}


# What lives on the card outside torch's allocator, and the allocator's own slack. Each
# is a named term of the plan's memory breakdown (`rigtrain rig` prints them).
#
# CUDA context and libraries: the context, the kernels of torch, cuBLAS, cuDNN and NCCL
# that are loaded into it, and their handles. Measured on the first GPU run (H200, driver
# 580, CUDA 13, torch 2.11, lazy module loading): NVML showed 2.5 GiB in use for the demo,
# whose allocator peaked at 0.20 GiB, and 6.7 GiB for `small` at 4.24 GiB. Published
# figures for the bare context are 0.3 GiB with lazy loading and 0.7 GiB without; the
# libraries' kernels make the rest, so the measured figure is what is planned.
CUDA_CONTEXT_GIB = 2.3
CUDA_CONTEXT_EAGER_EXTRA_GIB = 0.4  # CUDA_MODULE_LOADING=EAGER loads every kernel up front
# NCCL's buffers, allocated with cudaMalloc at a communicator's first use: 0.5-0.7 GB per
# process group on A100s (published measurements); one group (data parallel) per run.
NCCL_GIB = 0.6
# Reserved beyond allocated: the caching allocator keeps freed blocks for reuse, and
# blocks of one size cannot always serve another. Measured on the H200: 4% of the peak for
# `small` (static shapes), at least 9% for `base` when the text batch changed shape every
# step (it ran into the card's limit there). The plan keeps 10%.
FRAGMENTATION = 0.10
# torch.profiler's CUPTI activity buffers, outside the allocator, while a profile records.
PROFILER_GIB = 0.5


def outside_allocator_gib(*, world: int, profiling: bool = False, lazy_loading: bool = True) -> dict:
    """The named room the plan leaves outside torch's allocator, per GPU."""
    return {"cuda_context_gib": CUDA_CONTEXT_GIB + (0.0 if lazy_loading else CUDA_CONTEXT_EAGER_EXTRA_GIB),
            "nccl_gib": NCCL_GIB if world > 1 else 0.0,
            "profiler_gib": PROFILER_GIB if profiling else 0.0}


def usable_gib(gpu: Gpu, outside: dict) -> tuple[float, float, str]:
    """(what the allocator's peak may reach, the allocator's cap, why): the free memory less
    the room outside the allocator is the allocator's cap; the peak may take all of it but
    the fragmentation share."""
    cap = gpu.free_gib - sum(outside.values())
    usable = cap / (1 + FRAGMENTATION)
    named = ", ".join(f"{v:.2f} for {k.removesuffix('_gib').replace('_', ' ')}" for k, v in outside.items() if v)
    return usable, cap, (f"{gpu.free_gib:.1f} GiB free on the smallest card, less {named} leaves {cap:.2f} GiB for "
                         f"torch's allocator; its peak may use {usable:.2f} of it, "
                         f"{FRAGMENTATION:.0%} being kept for fragmentation")


class _Search:
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


# -- the plan ------------------------------------------------------------------------------

def loader_workers(configured: int, threads: int, processes: int) -> tuple[int, str]:
    """Loader threads per training process: shards need no decoding, so threads only copy
    clips out of the page cache; a few per process are plenty, and one thread per
    process is left for the process itself."""
    if configured >= 0:
        return configured, f"set by the config (data.workers={configured})"
    workers = max(1, min(8, threads // processes - 1))
    return workers, (f"{threads} hardware threads / {processes} training process(es), one kept for each "
                     f"process's own work, at most 8: {workers} loader thread(s) per process")


def _bnb_supported(gpu: Gpu) -> bool:
    return gpu.compute_capability >= (6, 0)  # bitsandbytes' 8-bit optimizers: Pascal and newer


def make_plan(rig: Rig, request: PlanRequest, step_peak: StepPeak) -> Plan:
    warnings = hardware_warnings(rig, request)
    reasons: dict[str, str] = {}
    fixed = request.fixed
    from_user = sorted(fixed)
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    reasons["env.CUDA_DEVICE_ORDER"] = "GPU indices follow the PCI bus, as nvidia-smi numbers them"

    if not rig.gpus:
        return _cpu_plan(rig, request, step_peak, warnings, reasons, env)

    chosen = request.gpus or tuple(range(len(rig.gpus)))
    for g in chosen:
        if g >= len(rig.gpus):
            from rigtrain.errors import UserError
            raise UserError(f"rig.gpus: GPU {g} does not exist; the rig has GPUs 0-{len(rig.gpus) - 1}")
    gpus = [rig.gpus[g] for g in chosen]
    world = len(gpus)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, chosen))
    reasons["world_size"] = f"one process per GPU: {world} GPU(s) " + ("chosen by rig.gpus" if request.gpus else "found")

    capability = min(g.compute_capability for g in gpus)
    if request.precision != "auto":
        precision, reasons["precision"] = request.precision, f"set by the user (train.precision={request.precision})"
    else:
        precision, reasons["precision"] = choose_precision(capability)
    if capability >= (8, 0):
        reasons["tf32"] = "on for the fp32 matmuls that remain (Ampere and newer; the trainer enables it in torch)"

    smallest = min(gpus, key=lambda g: g.free_gib)
    outside = outside_allocator_gib(world=world, profiling=request.profiling, lazy_loading=request.lazy_loading)
    usable, allocator_cap, why_usable = usable_gib(smallest, outside)
    cap = max(1, math.ceil(request.global_batch / world))
    narrow = min((g.pcie.width for g in gpus if g.pcie), default=16) <= 8 and world > 1
    search = _Search(step_peak, precision)

    def step_budget(stage: int, optimizer: str, offload: str) -> float:
        """Bytes the measured step may take once ZeRO's share of the states is counted."""
        extras = peak_bytes(0, parameters=request.parameters, precision=precision, world=world, stage=stage,
                            optimizer=optimizer, offload=offload, capability=capability)["total_gib"]
        return (usable - extras) * GIB

    # Candidates in order of preference. The first one is free: ZeRO-1 costs nothing over
    # plain data parallelism (the same bytes cross the link) and shards the optimizer
    # states, so with several GPUs it beats ZeRO-0; one GPU has nothing to shard. Every
    # other option costs speed: checkpointing a third more compute, ZeRO-2/3 a reduction
    # every micro-step (worst on narrow links), the 8-bit optimizer a little accuracy,
    # offload a lot of time. Those are used only to reach a useful micro-batch
    # (GOOD_MICRO_BATCH), never beyond it: past that point accumulation is cheaper. This
    # is also what makes the plan monotone: more memory never gives a smaller micro-batch.
    #
    # In bf16 the weights train in bf16 but their gradients must add up in fp32, or small
    # updates are rounded away. DeepSpeed does that from ZeRO-1 up (the trainer sets
    # data_types.grad_accum_dtype=fp32), not at ZeRO-0, so bf16 takes ZeRO-1 even on one GPU,
    # where it shards nothing and costs the same bytes and communication.
    bf16 = precision == "bf16"
    free_stage = 1 if world > 1 or bf16 else 0
    stages = [free_stage] + ([] if world == 1 else [2, 3] if not narrow else [])
    late_stages = [2, 3] if narrow and world > 1 else []
    optimizers = ["adamw"] + (["adamw8bit"] if all(_bnb_supported(g) for g in gpus) else [])
    candidates = []
    for optimizer in optimizers:
        for checkpointing in (False, True):
            candidates += [(s, checkpointing, optimizer, "none") for s in stages]
        candidates += [(s, True, optimizer, "none") for s in late_stages]
    for optimizer in optimizers:  # offload last; DeepSpeed offloads from ZeRO-1 up
        candidates += [(s, True, optimizer, "cpu") for s in ([2] if world == 1 else [2, 3])]
    wanted_stage = fixed.get("train.zero_stage")
    if wanted_stage is not None and all(c[0] != wanted_stage for c in candidates):
        # A stage the preference list skips (ZeRO-0 beside ZeRO-1, ZeRO-2 in bf16): the same
        # candidates at the user's stage.
        candidates = [(wanted_stage, *c[1:]) for c in candidates]

    def allowed(stage, checkpointing, optimizer, offload) -> bool:
        wanted = {"train.zero_stage": stage, "model.activation_checkpointing": checkpointing,
                  "train.optimizer": optimizer, "train.offload_optimizer": offload}
        return all(fixed.get(k, v) == v for k, v in wanted.items())

    candidates = [c for c in dict.fromkeys(candidates) if allowed(*c)]
    if not candidates:  # the user fixed a combination outside our preference list: use it as is
        candidates = [(fixed.get("train.zero_stage", 0), fixed.get("model.activation_checkpointing", False),
                       fixed.get("train.optimizer", "adamw"), fixed.get("train.offload_optimizer", "none"))]
    free = candidates[0] if candidates[0][1:] == (False, "adamw", "none") else None
    need = min(cap, GOOD_MICRO_BATCH)
    fixed_mb = fixed.get("train.micro_batch_size")
    best = None
    tried = []
    for stage, checkpointing, optimizer, offload in candidates:
        budget = step_budget(stage, optimizer, offload)
        if fixed_mb:
            largest = fixed_mb if search.peak(fixed_mb, checkpointing) <= budget else 0
        else:
            costly = (stage, checkpointing, optimizer, offload) != free
            largest = search.largest(checkpointing, budget, min(cap, need) if costly else cap)
        tried.append(((stage, checkpointing, optimizer, offload), largest))
        if best is None or largest > best[1]:
            best = ((stage, checkpointing, optimizer, offload), largest)
        if largest >= (fixed_mb or need):
            best = ((stage, checkpointing, optimizer, offload), largest)
            break
    (stage, checkpointing, optimizer, offload), micro_batch = best
    fits_at_all = micro_batch > 0
    if not fits_at_all:
        # Nothing fits: plan the candidate that needs least, so the report shows how far off it is.
        micro_batch = fixed_mb or 1

        def need(candidate) -> float:
            s_, c_, o_, f_ = candidate
            return search.peak(micro_batch, c_) - step_budget(s_, o_, f_)
        stage, checkpointing, optimizer, offload = min(candidates, key=need)
        warnings.append(Warning("does_not_fit", None,
                                f"even micro-batch {micro_batch} with ZeRO-{stage}, checkpointing and offload is predicted "
                                f"to need more than the {usable:.1f} GiB usable; choose a smaller preset or model"))

    # The 8-bit optimizer also when the states dominate memory, not only to fit.
    states_gib = optimizer_state_bytes(request.parameters, precision, "adamw") / (world if stage >= 1 else 1) / GIB
    if (fits_at_all and optimizer == "adamw" and offload == "none" and "train.optimizer" not in fixed
            and "adamw8bit" in optimizers and states_gib > 0.4 * usable):
        optimizer = "adamw8bit"
        reasons["optimizer"] = (f"AdamW's states would take {states_gib:.1f} of {usable:.1f} usable GiB; bitsandbytes' "
                                "8-bit AdamW keeps them in a quarter of that")
    largest_fitting = micro_batch
    if "train.grad_accum_steps" in fixed:
        accum = fixed["train.grad_accum_steps"]
    else:
        accum = max(1, math.ceil(cap / micro_batch))
        if not fixed_mb and fits_at_all:  # spread the share evenly: 2 x 64, not 91 + 91 for 128
            micro_batch = math.ceil(cap / accum)
    total = peak_bytes(search.peak(micro_batch, checkpointing), parameters=request.parameters, precision=precision,
                       world=world, stage=stage, optimizer=optimizer, offload=offload, capability=capability)
    memory = {**total, "input_batch_gib": request.clip_bytes * micro_batch / GIB,
              "fragmentation_gib": total["total_gib"] * FRAGMENTATION, **outside,
              "allocator_cap_gib": allocator_cap}
    memory["card_total_gib"] = total["total_gib"] + memory["fragmentation_gib"] + sum(outside.values())
    if precision == "bf16" and (stage == 0 or offload == "cpu"):
        warnings.append(Warning("bf16_gradients", None, f"bf16 at ZeRO-{stage}"
                                + (" with CPU offload" if offload == "cpu" else "")
                                + ": DeepSpeed adds gradients up in bf16 here, which rounds small ones away; "
                                + ("without offload, ZeRO-1 to 3 add them in fp32" if offload == "cpu" else
                                   "ZeRO-1 adds them in fp32, for the same memory and communication")))
    reasons["usable_memory"] = why_usable
    if fixed_mb:
        reasons["micro_batch_size"] = f"set by the user (train.micro_batch_size={fixed_mb})" + (
            "" if fits_at_all else "; predicted NOT to fit")
    elif not fits_at_all:
        reasons["micro_batch_size"] = (f"nothing fits: micro-batch 1 is predicted at {total['total_gib']:.2f} of "
                                       f"{usable:.2f} usable GiB even with the options that need least")
    elif micro_batch == cap:
        reasons["micro_batch_size"] = (f"{micro_batch} is the whole per-GPU share of the global batch "
                                       f"({request.global_batch} / {world}) and fits: predicted {total['total_gib']:.2f} "
                                       f"of {usable:.2f} usable GiB")
    elif micro_batch == largest_fitting:
        reasons["micro_batch_size"] = (f"the largest that fits: {micro_batch} is predicted at {total['total_gib']:.2f} of "
                                       f"{usable:.2f} usable GiB on the smallest card ({smallest.name}); "
                                       f"{micro_batch + 1} would not fit")
    else:
        reasons["micro_batch_size"] = (f"up to {largest_fitting} fits on the smallest card ({smallest.name}); {accum} "
                                       f"micro-batches of {micro_batch} cover the per-GPU share of {cap} evenly "
                                       f"(predicted {total['total_gib']:.2f} of {usable:.2f} usable GiB)")
    reasons["grad_accum_steps"] = ("set by the user" if "train.grad_accum_steps" in fixed else
                                   f"{accum} x {micro_batch} clips x {world} GPU(s) = {accum * micro_batch * world} per step, "
                                   f"reaching the global batch of {request.global_batch}")
    no_ckpt = dict(tried).get((stage, False, optimizer, offload))
    reasons["activation_checkpointing"] = (
        "set by the user" if "model.activation_checkpointing" in fixed else
        ("nothing fits; recomputing activations in backward needs least" if not fits_at_all else
         f"micro-batch {micro_batch} does not fit without it" if fixed_mb or not no_ckpt else
         f"without it only micro-batch {no_ckpt} fits; recomputing activations in backward buys {micro_batch}")
        if checkpointing else "the micro-batch fits without recomputing activations (which costs a third more compute)")
    reasons["zero_stage"] = ("set by the user" if "train.zero_stage" in fixed else
                             f"one GPU: ZeRO-{stage} only to offload the optimizer to the CPU" if world == 1 and offload == "cpu"
                             else "one GPU, bf16: ZeRO-1 shards nothing here, but with it DeepSpeed adds gradients "
                             "up in fp32 (its BF16_Optimizer); at ZeRO-0 it adds them in bf16"
                             if world == 1 and stage == 1 else
                             "one GPU: ZeRO has nothing to shard" if world == 1 else
                             "ZeRO-1 shards the optimizer states for the same communication as plain data "
                             "parallelism (once per optimizer step)" if stage == 1 else
                             f"ZeRO-{stage}: ZeRO-1 cannot fit a useful micro-batch; it communicates every "
                             "micro-step" + (" (slow on these narrow links, so it came after checkpointing)"
                                             if narrow else ""))
    reasons["offload_optimizer"] = ("set by the user" if "train.offload_optimizer" in fixed else
                                    "nothing else fits: the optimizer states live in RAM and steps run on the CPU (slower)"
                                    if offload == "cpu" else "the optimizer states fit on the GPU")
    reasons.setdefault("optimizer", "set by the user" if "train.optimizer" in fixed else
                       "8-bit AdamW: needed to fit the micro-batch" if optimizer == "adamw8bit" else
                       "its states fit")
    workers, reasons["dataloader_workers"] = loader_workers(request.loader_workers, rig.threads, world)

    if world > 1:
        no_p2p = any(w.code in ("no_p2p", "p2p_unreliable") for w in warnings)
        if no_p2p:
            env["NCCL_P2P_DISABLE"] = "1"
            reasons["env.NCCL_P2P_DISABLE"] = ("P2P between these GPUs is absent or unreliable: NCCL goes through "
                                               "host memory instead of risking hangs")
    if offload == "cpu":
        need_ram = optimizer_state_bytes(request.parameters, precision, optimizer) * 2 / GIB  # states + pinned staging
        if rig.ram_gib is not None and need_ram > 0.8 * rig.ram_gib:
            warnings.append(Warning("low_ram", None, f"offloaded optimizer states need about {need_ram:.1f} GiB of "
                                    f"RAM of {rig.ram_gib:.0f}; add RAM or use a smaller model"))
    _ram_warning(rig, request, world, workers, warnings)
    return Plan(device="cuda", gpus=tuple(chosen), world_size=world, precision=precision, micro_batch_size=micro_batch,
                grad_accum_steps=accum, activation_checkpointing=checkpointing, zero_stage=stage,
                offload_optimizer=offload, optimizer=optimizer, dataloader_workers=workers, env=env,
                predicted_peak_gib=round(total["total_gib"], 3), usable_gib=round(usable, 2), reasons=reasons,
                from_user=from_user, warnings=warnings, memory={k: round(v, 3) for k, v in memory.items()})


def _cpu_plan(rig: Rig, request: PlanRequest, step_peak: StepPeak, warnings, reasons, env) -> Plan:
    """No GPU: the config's choices, on `train.nproc` gloo processes; memory is RAM."""
    if request.gpus:
        from rigtrain.errors import UserError
        raise UserError("rig.gpus: this machine has no GPU; remove rig.gpus to train on the CPU")
    fixed = request.fixed
    world = request.cpu_processes
    precision = "fp32" if request.precision == "auto" else request.precision
    reasons["precision"] = ("no GPU: fp32 (DeepSpeed's CPU path trains in fp32)" if request.precision == "auto"
                            else f"set by the user (train.precision={precision})")
    reasons["world_size"] = f"no GPU: {world} CPU process(es) (train.nproc), DeepSpeed on gloo"
    env["DS_ACCELERATOR"] = "cpu"
    threads = max(1, rig.threads // world)
    env["OMP_NUM_THREADS"] = str(threads)
    reasons["env.OMP_NUM_THREADS"] = f"{rig.threads} hardware threads shared by {world} process(es)"
    config = request.config
    micro_batch, stage = config["train.micro_batch_size"], config["train.zero_stage"]
    checkpointing, optimizer = config["model.activation_checkpointing"], config["train.optimizer"]
    offload = config["train.offload_optimizer"]
    total = peak_bytes(step_peak(micro_batch, checkpointing, "fp32"), parameters=request.parameters, precision="fp32",
                       world=world, stage=stage, optimizer=optimizer, offload=offload)
    for key in ("micro_batch_size", "grad_accum_steps", "zero_stage", "optimizer", "offload_optimizer"):
        reasons[key] = "no GPU to plan for: the config's value"
    reasons["activation_checkpointing"] = "no GPU to plan for: the config's value"
    workers, reasons["dataloader_workers"] = loader_workers(request.loader_workers, rig.threads, world)
    _ram_warning(rig, request, world, workers, warnings, host_model_gib=total["total_gib"])
    return Plan(device="cpu", gpus=(), world_size=world, precision=precision, micro_batch_size=micro_batch,
                grad_accum_steps=config["train.grad_accum_steps"], activation_checkpointing=checkpointing,
                zero_stage=stage, offload_optimizer=offload, optimizer=optimizer, dataloader_workers=workers, env=env,
                predicted_peak_gib=round(total["total_gib"], 3), usable_gib=None, reasons=reasons,
                from_user=sorted(fixed), warnings=warnings,
                memory={k: round(v, 3) for k, v in total.items()})


def _ram_warning(rig: Rig, request: PlanRequest, world: int, workers: int, warnings: list,
                 host_model_gib: float = 0.0) -> None:
    """Pinned batches in flight, loader threads and (on the CPU) the model itself, per
    process, against the RAM there is."""
    if rig.ram_gib is None:
        return
    per_process = (host_model_gib + request.parameters * 4 / GIB  # the fp32 model built on the host first
                   + workers * (RAM_PER_WORKER_GIB + 4 * request.batch_bytes / GIB))
    need = per_process * world + 2.0  # and the OS, Python, CUDA's host side
    have = rig.ram_free_gib if rig.ram_free_gib is not None else rig.ram_gib
    if need > have:
        warnings.append(Warning("low_ram", None, f"{world} process(es) with {workers} loader thread(s) each need about "
                                f"{need:.1f} GiB of RAM but {have:.1f} GiB is available; lower data.workers or "
                                "train.micro_batch_size, or add RAM"))


# -- warnings ------------------------------------------------------------------------------

# Transient draw over the power limit, for a few milliseconds: what trips a PSU's
# over-current protection. RTX 3090: ~600 W spikes at a 350 W limit (seed 002); Ada and
# later consumer cards spike less; data-centre cards hold their limit tightly.
def transient_factor(name: str) -> float:
    lower = name.lower()
    if "rtx 30" in lower:
        return 1.7
    if any(k in lower for k in ("a100", "h100", "h200", "a6000", "l40")):
        return 1.2
    return 1.5


REST_OF_SYSTEM_W = 75  # board, drives, fans, pumps
DEFAULT_CPU_W = 150  # when the rig does not say the CPU's TDP


def hardware_warnings(rig: Rig, request: PlanRequest) -> list[Warning]:
    out: list[Warning] = []
    chosen = request.gpus or tuple(range(len(rig.gpus)))
    gpus = [(i, rig.gpus[i]) for i in chosen if i < len(rig.gpus)]
    for i, gpu in gpus:
        pcie = gpu.pcie
        if pcie:
            if pcie.width <= 4:
                out.append(Warning("pcie_narrow", i, f"GPU {i} ({gpu.name}) runs on PCIe Gen{pcie.gen} x{pcie.width}: about "
                                   f"{_pcie_gb_s(pcie.gen, pcie.width):.0f} GB/s against {_pcie_gb_s(pcie.max_gen or pcie.gen, 16):.0f} "
                                   "at x16; move it to a x16/x8 "
                                   "slot (often the chipset slot is x4), or keep ZeRO at 0/1 with accumulation (planned)"))
            if pcie.max_width and pcie.width < pcie.max_width:
                out.append(Warning("pcie_downtrained", i, f"GPU {i} ({gpu.name}) link trained at x{pcie.width} of "
                                   f"x{pcie.max_width}: reseat the card, check the slot's lane sharing (M.2, "
                                   "other cards) and the riser"))
            loaded = (gpu.utilization_pct or 0) >= 50 or (gpu.power and gpu.power.draw_w and gpu.power.limit_w
                                                          and gpu.power.draw_w >= 0.5 * gpu.power.limit_w)
            if pcie.max_gen and pcie.gen < pcie.max_gen and loaded:
                out.append(Warning("pcie_downtrained", i, f"GPU {i} ({gpu.name}) runs PCIe Gen{pcie.gen} of "
                                   f"Gen{pcie.max_gen} under load: check the BIOS PCIe setting and the riser "
                                   "(idle cards drop the generation by design; this one is busy)"))
        if gpu.compute_capability < (8, 0):
            out.append(Warning("no_bf16", i, f"GPU {i} ({gpu.name}, compute capability "
                               f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}) has no bf16: "
                               + ("fp16 with loss scaling is planned; watch for overflow skips in the log"
                                  if gpu.compute_capability >= (7, 0) else "fp32 is planned (fp16 is slow here)")))
        # The probe reads one sample, usually of an idle card: a power cap in it says nothing
        # (training telemetry judges that under load, profile/throttle.py); heat or a
        # power brake while idle is already a problem.
        thermal = [r for r in gpu.throttle_reasons if r in ("sw_thermal", "hw_thermal", "hw_slowdown")]
        brake = [r for r in gpu.throttle_reasons if r == "hw_power_brake"]
        if thermal:
            out.append(Warning("throttling", i, f"GPU {i} ({gpu.name}) is already slowing its clocks for heat "
                               f"({', '.join(thermal)}"
                               + (f", {gpu.temperature_c:.0f} C" if gpu.temperature_c else "")
                               + ") before training: improve airflow or spacing between cards, or lower its power limit"))
        if brake:
            out.append(Warning("throttling", i, f"GPU {i} ({gpu.name}) is held by its power-brake signal before "
                               "training: check the power supply's capacity and that every GPU power cable is seated"))
    if len(gpus) > 1:
        indices = [i for i, _ in gpus]
        missing = [(a, b) for a, ga in gpus for b in indices if b != a and ga.p2p is not None and not ga.p2p[b]]
        if missing:
            pairs = sorted({tuple(sorted(p)) for p in missing})
            out.append(Warning("no_p2p", None, "no peer-to-peer between GPUs "
                               + ", ".join(f"{a}-{b}" for a, b in pairs)
                               + ": NCCL copies through host memory (NCCL_P2P_DISABLE=1 is set); prefer ZeRO-0/1 "
                               "with accumulation, which communicates least"))
        consumer_ada = [i for i, g in gpus if any(k in g.name.lower() for k in ("rtx 40", "rtx 50"))]
        if consumer_ada:
            out.append(Warning("p2p_unreliable", None, f"GPUs {', '.join(map(str, consumer_ada))} are consumer RTX "
                               "40/50 cards: P2P is disabled in their drivers or can hang NCCL even when reported; "
                               "NCCL_P2P_DISABLE=1 is set"))
        kinds = {(g.name, round(g.memory_gib)) for _, g in gpus}
        if len(kinds) > 1:
            smallest = min(gpus, key=lambda ig: ig[1].free_gib)
            out.append(Warning("mixed_gpus", None, "different cards (" + ", ".join(sorted(k[0] for k in kinds))
                               + f"): ZeRO needs one micro-batch on every rank, so the plan is made for the smallest, "
                               f"GPU {smallest[0]} ({smallest[1].name}); the faster card waits for the slower "
                               "(choose cards with --set rig.gpus=...)"))
    psu = request.psu_w or rig.psu_w
    if psu and gpus:
        cpu_w = rig.cpu.tdp_w or DEFAULT_CPU_W
        limits = [(g.power.limit_w if g.power and g.power.limit_w else None) for _, g in gpus]
        if all(limits):
            spikes = sum(limit * transient_factor(g.name) for limit, (_, g) in zip(limits, gpus))
            peak = spikes + cpu_w + REST_OF_SYSTEM_W
            if peak > psu:
                room = psu - cpu_w - REST_OF_SYSTEM_W
                factors = [transient_factor(g.name) for _, g in gpus]
                limit = math.floor(room / sum(factors) / 5) * 5
                floor = max((g.power.min_limit_w or 0) for _, g in gpus if g.power)
                advice = (f"cap each GPU at {limit:.0f} W (`sudo nvidia-smi -i N -pl {limit:.0f}`; a 3090 kept >95% of "
                          "its throughput at 280 W)" if limit >= floor and limit > 0 else
                          "no power limit the cards allow fits: use a bigger PSU or fewer GPUs")
                out.append(Warning("psu_headroom", None, f"transient peaks of {len(gpus)} GPU(s) "
                                   f"(~{spikes:.0f} W at their limits) + CPU {cpu_w:.0f} W + {REST_OF_SYSTEM_W} W "
                                   f"for the rest reach ~{peak:.0f} W on a {psu:.0f} W PSU; {advice}"))
    return out


def _pcie_gb_s(gen: int, width: int) -> float:
    """Usable bandwidth per direction, as NCCL models it: Gen4 x16 about 24 GB/s."""
    per_lane = {1: 0.2, 2: 0.4, 3: 0.75, 4: 1.5, 5: 3.0, 6: 6.0}.get(gen, 1.5)
    return per_lane * width
