"""The planner: rig facts + the run's config -> a plan, each choice with its reason
(docs/planner.md, "The decisions, in order").

`make_plan` is a sequence of small named decisions: which GPUs, which precision, which ways
of running the step to try and in what order, the first that fits a useful micro-batch,
accumulation, then the reasons. The memory arithmetic is in rig/budget.py, the hardware
warnings in rig/warnings.py, the plan without a GPU in rig/cpu_plan.py. Pure: the only
outside input is `step_peak`, a function train/ provides that measures a training step's
peak bytes under FakeTensorMode, so plans are tested with rig files on a CPU. Imports no
part of rigtrain above rig/."""

from __future__ import annotations

import math

from rigtrain.rig.budget import (
    FRAGMENTATION,
    GIB,
    CardBudget,
    MicroBatchSearch,
    Setting,
    StepPeak,
    in_use_before_gib,
    kept_for_display,
    named_outside,
    optimizer_state_bytes,
    outside_allocator_gib,
    room_for_the_run,
    usable_gib,
)
from rigtrain.rig.choices import choose_precision, loader_workers, machines_reason
from rigtrain.rig.cpu_plan import cpu_plan
from rigtrain.rig.facts import Gpu, Rig
from rigtrain.rig.plan_types import Plan, PlanRequest
from rigtrain.rig.reasons import explain
from rigtrain.rig.visible import chosen_gpus, cuda_device_list
from rigtrain.rig.warnings import (
    RigWarning,
    hardware_warnings,
    offload_ram_warning,
    ram_warning,
)

GOOD_MICRO_BATCH = 8  # below this a GPU idles between small kernels; worth checkpointing to reach it
SETTING_KEYS = ("train.zero_stage", "model.activation_checkpointing", "train.optimizer", "train.offload_optimizer")


def _nccl_settings(world: int, hosts: tuple[int, ...], warnings, env: dict, reasons: dict) -> None:
    """NCCL's environment where it carries the gradients (several GPUs, or machines)."""
    if world > 1 or hosts:  # NCCL carries the gradients
        env["NCCL_DEBUG"] = "WARN"
        kept = "" if hosts else "; kept in RUN_DIR/train.log"  # the launcher relays its own ranks'
        reasons["env.NCCL_DEBUG"] = (
            "NCCL says what goes wrong (a P2P link or transport it gives up on, a CUDA error inside a "
            f"collective) rather than only failing{kept} (NCCL_DEBUG=INFO shows more)"
        )
    if world > 1 and any(w.code in ("no_p2p", "p2p_unreliable", "p2p_broken") for w in warnings):
        env["NCCL_P2P_DISABLE"] = "1"
        reasons["env.NCCL_P2P_DISABLE"] = (
            "P2P between these GPUs is absent, unreliable or failed its check: NCCL goes through host "
            "memory instead of risking hangs"
        )


def make_plan(rig: Rig, request: PlanRequest, step_peak: StepPeak) -> Plan:
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    reasons = {"env.CUDA_DEVICE_ORDER": "GPU indices follow the PCI bus, as nvidia-smi numbers them"}
    if not rig.gpus:
        return cpu_plan(rig, request, step_peak, hardware_warnings(rig, (), request.psu_w), reasons, env)
    chosen, chosen_how = chosen_gpus(rig, request.gpus)
    warnings = hardware_warnings(rig, chosen, request.psu_w)
    env["CUDA_VISIBLE_DEVICES"] = cuda_device_list(rig, chosen)
    reasons["world_size"] = f"one process per GPU: {len(chosen)} GPU(s) {chosen_how}"
    if request.hosts:
        reasons["world_size"] = machines_reason(request.hosts, f"{len(chosen)} GPU(s)")
    cards = _cards(request, {g: rig.gpus[g] for g in chosen}, step_peak, reasons, rig.software or {})
    fixed = request.fixed
    candidates = _candidates(cards, fixed)
    setting, micro_batch, tried = _first_that_fits(cards, candidates, fixed)
    fits = micro_batch > 0
    if not fits:  # plan the setting that needs least, so the report shows how far off it is
        micro_batch = fixed.get("train.micro_batch_size") or 1
        setting = min(candidates, key=lambda s: cards.search.peak(micro_batch, s[1]) - cards.step_budget(s))
        warnings.append(
            # the card the plan is made for: the one with least free memory (as _cards picks it)
            _does_not_fit(cards, cards.smallest_index, micro_batch, setting)
        )
    setting = _eight_bit_when_states_dominate(cards, setting, fits, fixed, reasons)
    largest_fitting = micro_batch
    # below the per-GPU share the search bracketed it, so peak(largest + 1) is already known;
    # at the share nothing larger keeps the experiment, and no step is measured to find out
    searched = fits and "train.micro_batch_size" not in fixed and largest_fitting < cards.share
    larger_fits = searched and cards.search.peak(largest_fitting + 1, setting[1]) <= cards.step_budget(setting)
    accum, micro_batch = _accumulation(cards, micro_batch, fixed, fits)
    total = cards.memory(micro_batch, setting)
    memory = _memory_breakdown(cards, total, request.clip_bytes * micro_batch)
    stage, checkpointing, optimizer, offload = setting
    reasons["usable_memory"] = cards.why_usable
    for key, reason in explain(
        cards, request, setting, micro_batch, largest_fitting, accum, fits, tried, total
    ).items():
        reasons.setdefault(key, reason)  # the 8-bit optimizer may have its reason already
    workers, reasons["dataloader_workers"] = loader_workers(request.loader_workers, rig.threads, cards.world)
    _nccl_settings(cards.world, request.hosts, warnings, env, reasons)
    ram = [
        offload_ram_warning(rig, optimizer_state_bytes(request.parameters, cards.precision, optimizer))
        if offload == "cpu"
        else None,
        ram_warning(
            rig, processes=cards.world, workers=workers, parameters=request.parameters, batch_bytes=request.batch_bytes
        ),
    ]
    warnings += [w for w in ram if w]
    return Plan(
        device="cuda",
        gpus=tuple(chosen),
        world_size=sum(request.hosts) or cards.world,
        precision=cards.precision,
        micro_batch_size=micro_batch,
        grad_accum_steps=accum,
        activation_checkpointing=checkpointing,
        zero_stage=stage,
        offload_optimizer=offload,
        optimizer=optimizer,
        dataloader_workers=workers,
        env=env,
        predicted_peak_gib=round(total["total_gib"], 3),
        usable_gib=round(cards.usable, 2),
        reasons=reasons,
        from_user=sorted(fixed),
        warnings=warnings,
        memory={k: round(v, 3) for k, v in memory.items()},
        largest_micro_batch=largest_fitting if searched and not larger_fits else None,
    )


def _does_not_fit(cards: CardBudget, fullest: int, micro_batch: int, setting: Setting) -> RigWarning:
    """What the user can do when no setting fits: a smaller model, or where the room kept
    beside torch's allocator already takes the card's free memory (another process holds
    the card, or it is a 2-4 GB card), another card or the CPU."""
    if cards.allocator_cap > 0:
        return RigWarning(
            "does_not_fit",
            None,
            f"even micro-batch {micro_batch} with ZeRO-{setting[0]}, checkpointing and offload is predicted "
            f"to need more than the {cards.usable:.1f} GiB usable; choose a smaller preset or model",
        )
    return RigWarning(
        "does_not_fit",
        fullest,
        f"GPU {fullest} ({cards.smallest.name}) has {cards.smallest.free_gib:.1f} GiB free, no more than the "
        f"room kept beside torch's allocator ({named_outside(cards.outside, 1)}{_desktop(cards.smallest)}): nothing "
        "is left to train in; "
        "free the card (nvidia-smi lists what holds it), pick other GPUs with --set rig.gpus=N, or train on the CPU "
        "(`CUDA_VISIBLE_DEVICES= rigtrain train ...`)",
    )


def _desktop(gpu: Gpu) -> str:
    return f", {kept_for_display(gpu):.1f} for the desktop it draws" if gpu.display_active else ""


def _memory_breakdown(cards: CardBudget, total: dict, batch_bytes: int) -> dict:
    """The allocator's peak term by term, and what the card holds beside it (GiB)."""
    memory = {
        **total,
        "input_batch_gib": batch_bytes / GIB,
        "fragmentation_gib": total["total_gib"] * FRAGMENTATION,
        **cards.outside,
        "allocator_cap_gib": cards.allocator_cap,
        "display_kept_gib": kept_for_display(cards.smallest),  # beside the run's total: the desktop's
    }
    # this run's own (its processes' share of the card), and with what the card held before
    # the run (the driver's reservation, a desktop, other programs: left out of the free
    # memory the plan starts from), what nvidia-smi shows for the whole card
    memory["run_total_gib"] = total["total_gib"] + memory["fragmentation_gib"] + sum(cards.outside.values())
    memory["in_use_before_gib"] = in_use_before_gib(cards.smallest)
    memory["card_total_gib"] = memory["run_total_gib"] + memory["in_use_before_gib"]
    return memory


def _cards(
    request: PlanRequest, by_index: dict[int, Gpu], step_peak: StepPeak, reasons: dict, software: dict
) -> CardBudget:
    """The precision (the oldest card decides) and the memory (the card with the least room
    decides). by_index: the run's cards by their index in the rig."""
    gpus = list(by_index.values())
    capability = min(g.compute_capability for g in gpus)
    if request.precision != "auto":
        precision, reasons["precision"] = request.precision, f"set by the user (train.precision={request.precision})"
    else:
        precision, reasons["precision"] = choose_precision(capability)
    if capability >= (8, 0):
        reasons["tf32"] = "on for the fp32 matmuls that remain (Ampere and newer; the trainer enables it in torch)"
    smallest_index = min(by_index, key=lambda g: room_for_the_run(by_index[g]))
    smallest = by_index[smallest_index]
    outside = outside_allocator_gib(
        world=len(gpus),
        profiling=request.profiling,
        lazy_loading=request.lazy_loading,
        measured=request.measured_outside_gib,
    )
    usable, allocator_cap, why_usable = usable_gib(smallest, outside)
    return CardBudget(
        gpus=gpus,
        precision=precision,
        capability=capability,
        smallest=smallest,
        smallest_index=smallest_index,
        outside=outside,
        usable=usable,
        allocator_cap=allocator_cap,
        why_usable=why_usable,
        # the global batch is shared by every process on every machine
        share=max(1, math.ceil(request.global_batch / (sum(request.hosts) or len(gpus)))),
        parameters=request.parameters,
        search=MicroBatchSearch(step_peak, precision),
        bitsandbytes=software.get("bitsandbytes", "assumed") is not None,  # None: the probe found none
    )


def _candidates(cards: CardBudget, fixed: dict) -> list[Setting]:
    """The ways to run the step, in order of preference, less those the user ruled out.

    The first one is free: ZeRO-1 costs nothing over plain data parallelism (the same bytes
    cross the link) and shards the optimizer states, so with several GPUs it beats ZeRO-0;
    one GPU has nothing to shard. Every other option costs speed: checkpointing a third more
    compute, ZeRO-2/3 a reduction every micro-step (worst on narrow links), the 8-bit
    optimizer a little accuracy, offload a lot of time. Those are used only to reach a
    useful micro-batch (GOOD_MICRO_BATCH), never beyond it: past that point accumulation is
    cheaper. This is also what makes the plan monotone: more memory never gives a smaller
    micro-batch."""
    world = cards.world
    free_stage = 1 if world > 1 else 0
    stages = [free_stage] + ([] if world == 1 else [2, 3] if not cards.narrow else [])
    late_stages = [2, 3] if cards.narrow else []
    optimizers = ["adamw"] + (["adamw8bit"] if cards.eight_bit else [])
    candidates: list[Setting] = []
    for optimizer in optimizers:
        for checkpointing in (False, True):
            candidates += [(s, checkpointing, optimizer, "none") for s in stages]
        candidates += [(s, True, optimizer, "none") for s in late_stages]
    for optimizer in optimizers:  # offload last; DeepSpeed offloads from ZeRO-1 up
        candidates += [(s, True, optimizer, "cpu") for s in ([2] if world == 1 else [2, 3])]
    wanted_stage = fixed.get("train.zero_stage")
    if wanted_stage is not None:
        # The user's stage in the same order of preference: every setting at that stage, so
        # that the cheaper ones (no checkpointing) come first even where the list reaches
        # that stage only late (ZeRO-2 after checkpointing on narrow links) or not at all
        # (ZeRO-0 beside ZeRO-1, ZeRO-2 on one GPU). DeepSpeed offloads from ZeRO-1 up.
        candidates = [(wanted_stage, *c[1:]) for c in candidates if wanted_stage >= 1 or c[3] == "none"]
    candidates = [c for c in dict.fromkeys(candidates) if all(fixed.get(k, v) == v for k, v in zip(SETTING_KEYS, c))]
    if not candidates:  # the user fixed a combination outside our preference list: use it as is
        candidates = [
            (
                fixed.get("train.zero_stage", 0),
                fixed.get("model.activation_checkpointing", False),
                fixed.get("train.optimizer", "adamw"),
                fixed.get("train.offload_optimizer", "none"),
            )
        ]
    return candidates


def _first_that_fits(cards: CardBudget, candidates: list[Setting], fixed: dict) -> tuple[Setting, int, dict]:
    """The first setting whose largest fitting micro-batch is useful (or the user's), else
    the one that fits the largest; with every setting tried and what fitted (0 = nothing)."""
    need = min(cards.share, GOOD_MICRO_BATCH)
    fixed_mb = fixed.get("train.micro_batch_size")
    free = candidates[0] if candidates[0][1:] == (False, "adamw", "none") else None
    best: tuple[Setting, int] | None = None
    tried: dict[Setting, int] = {}
    for setting in candidates:
        budget, checkpointing = cards.step_budget(setting), setting[1]
        if fixed_mb:
            largest = fixed_mb if cards.search.peak(fixed_mb, checkpointing) <= budget else 0
        else:  # a costly setting is worth only what reaches a useful micro-batch
            largest = cards.search.largest(checkpointing, budget, cards.share if setting == free else need)
        tried[setting] = largest
        if best is None or largest > best[1] or largest >= (fixed_mb or need):
            best = (setting, largest)
        if largest >= (fixed_mb or need):
            break
    return best[0], best[1], tried


def _eight_bit_when_states_dominate(
    cards: CardBudget, setting: Setting, fits: bool, fixed: dict, reasons: dict
) -> Setting:
    """The 8-bit optimizer also when AdamW's states take a large part of the card, not only
    to fit."""
    stage, checkpointing, optimizer, offload = setting
    sharded_over = cards.world if stage >= 1 else 1
    states_gib = optimizer_state_bytes(cards.parameters, cards.precision, "adamw") / sharded_over / GIB
    if (
        fits
        and optimizer == "adamw"
        and offload == "none"
        and "train.optimizer" not in fixed
        and cards.eight_bit
        and states_gib > 0.4 * cards.usable
    ):
        reasons["optimizer"] = (
            f"AdamW's states would take {states_gib:.1f} of {cards.usable:.1f} usable GiB; "
            "bitsandbytes' 8-bit AdamW keeps them in a quarter of that"
        )
        return (stage, checkpointing, "adamw8bit", offload)
    return setting


def _accumulation(cards: CardBudget, micro_batch: int, fixed: dict, fits: bool) -> tuple[int, int]:
    """(accumulation steps, micro-batch): enough micro-batches to reach each GPU's share of
    the global batch, spread evenly (2 x 64, not 91 + 91 for 128). Where the share does not
    divide, the step takes up to accum - 1 clips more per GPU (3 x 22 = 66 for 64) rather
    than a micro-batch a third smaller (4 x 16): the grad_accum_steps reason says the total."""
    if "train.grad_accum_steps" in fixed:
        return fixed["train.grad_accum_steps"], micro_batch
    accum = max(1, math.ceil(cards.share / micro_batch))
    if not fixed.get("train.micro_batch_size") and fits:
        micro_batch = math.ceil(cards.share / accum)
    return accum, micro_batch
