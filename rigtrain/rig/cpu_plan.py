"""The plan on a machine without a GPU: the config's choices on `train.nproc` gloo processes
(or a hostfile's slots), which share the global batch as GPUs do; memory is RAM."""

from __future__ import annotations

import math

from rigtrain.errors import UserError
from rigtrain.rig.budget import StepPeak, peak_bytes
from rigtrain.rig.choices import loader_workers, machines_reason
from rigtrain.rig.facts import Rig
from rigtrain.rig.plan_types import Plan, PlanRequest
from rigtrain.rig.warnings import ram_warning

# On the CPU torch has no caching allocator: glibc's malloc serves each tensor, hands every
# freed block above its mmap threshold (128 KiB, rising to at most 32 MiB) back to the
# kernel, and the next step faults the same pages in again, zeroed. Kept in the heap, a
# step reuses them: 100 demo steps had 4x fewer page faults (580k -> 145k) and half the
# kernel time (1.8 -> 0.9 s); a short tiny-model run 0.36 -> 0.15 s of it (2026-12-05,
# docs/training.md). glibc reads these at start-up, and
# train/worker.py applies them with mallopt in a process that started before the plan.
HEAP_THRESHOLD_BYTES = 1 << 30
HEAP_KEEPS_FREED_TENSORS = {
    "MALLOC_MMAP_THRESHOLD_": (
        "tensors up to 1 GiB come from the heap, not a fresh mmap each step (no caching allocator on the CPU)"
    ),
    "MALLOC_TRIM_THRESHOLD_": "freed memory stays in the heap for the next step instead of going back to the kernel",
}


def _shared_micro_batch(request: PlanRequest, world: int, micro_batch: int, accum: int) -> tuple[int, str | None]:
    """The config's micro-batch for CPU processes, or, with several and none set by the user,
    their share of the global batch, with the reason. The global batch is the experiment:
    shared by the processes as it is by GPUs, so that --set train.nproc=2 trains the same run
    in two halves, not twice the batch."""
    if world == 1 or "train.micro_batch_size" in request.fixed:
        return micro_batch, None
    shared = max(1, math.ceil(math.ceil(request.global_batch / world) / accum))
    total = shared * accum * world
    over = "" if total == request.global_batch else f", {total} in all"
    return shared, (
        f"the global batch of {request.global_batch} shared by {world} processes: {accum} x {shared} "
        f"clips each{over} (no GPU to plan memory for)"
    )


def _one_process_stage(request: PlanRequest, world: int, stage: int, offload: str) -> tuple[int, str | None]:
    """ZeRO-0 for a single process, as for a single GPU: ZeRO has nothing to shard, and its
    bookkeeping cost the demo 9% of its step time on a 2-core CPU (396 -> 434 clips/s over
    120 steps, the losses equal to 4 digits; 2026-12-07). A stage the user set (--set or a
    config file), or offload (which needs ZeRO-1 or more), stays."""
    if world > 1 or stage == 0 or offload != "none" or "train.zero_stage" in request.fixed:
        return stage, None
    return 0, "one process: ZeRO has nothing to shard (as on one GPU)"


def _config_choices(fixed: dict) -> dict[str, str]:
    """Why each choice a GPU plan would make is what it is without a GPU: the user's (--set,
    a config file), in the GPU plan's words, or else the preset's."""
    chosen = ("train.micro_batch_size", "train.grad_accum_steps", "train.zero_stage", "train.optimizer",
              "train.offload_optimizer", "model.activation_checkpointing")  # fmt: skip
    return {
        dotted.split(".")[1]: "set by the user" if dotted in fixed else "no GPU to plan for: the config's value"
        for dotted in chosen
    }


def cpu_plan(rig: Rig, request: PlanRequest, step_peak: StepPeak, warnings, reasons, env) -> Plan:
    """No GPU: the config's choices, on `train.nproc` gloo processes sharing the global batch;
    memory is RAM."""
    if request.gpus:
        raise UserError("rig.gpus: this machine has no GPU; remove rig.gpus to train on the CPU")
    fixed = request.fixed
    # with a hostfile its slots say how many processes each machine runs, not train.nproc
    world = sum(request.hosts) or request.cpu_processes
    here = max(request.hosts, default=world)  # processes sharing this machine's cores
    precision = "fp32" if request.precision == "auto" else request.precision
    reasons["precision"] = (
        "no GPU: fp32 (DeepSpeed's CPU path trains in fp32)"
        if request.precision == "auto"
        else f"set by the user (train.precision={precision})"
    )
    reasons["world_size"] = (
        machines_reason(request.hosts, "no GPU, DeepSpeed on gloo")
        if request.hosts
        else f"no GPU: {world} CPU process(es) (train.nproc), DeepSpeed on gloo"
    )
    env["DS_ACCELERATOR"] = "cpu"
    threads = max(1, rig.threads // here)
    env["OMP_NUM_THREADS"] = str(threads)
    reasons["env.OMP_NUM_THREADS"] = f"{rig.threads} hardware threads shared by {here} process(es)"
    for key, why in HEAP_KEEPS_FREED_TENSORS.items():
        env[key], reasons[f"env.{key}"] = str(HEAP_THRESHOLD_BYTES), why
    config = request.config
    micro_batch, stage = config["train.micro_batch_size"], config["train.zero_stage"]
    accum = config["train.grad_accum_steps"]
    checkpointing, optimizer = config["model.activation_checkpointing"], config["train.optimizer"]
    offload = config["train.offload_optimizer"]
    micro_batch, shared = _shared_micro_batch(request, world, micro_batch, accum)
    stage, stage_reason = _one_process_stage(request, world, stage, offload)
    total = peak_bytes(
        step_peak(micro_batch, checkpointing, "fp32"),
        parameters=request.parameters,
        precision="fp32",
        world=world,
        stage=stage,
        optimizer=optimizer,
        offload=offload,
    )
    reasons.update(_config_choices(fixed))
    if shared:
        reasons["micro_batch_size"] = shared
    if stage_reason:
        reasons["zero_stage"] = stage_reason
    workers, reasons["dataloader_workers"] = loader_workers(request.loader_workers, rig.threads, here)
    low_ram = ram_warning(
        rig,
        processes=here,
        workers=workers,
        parameters=request.parameters,
        batch_bytes=request.batch_bytes,
        host_model_gib=total["total_gib"],
    )
    warnings += [low_ram] if low_ram else []
    return Plan(
        device="cpu",
        gpus=(),
        world_size=world,
        precision=precision,
        micro_batch_size=micro_batch,
        grad_accum_steps=accum,
        activation_checkpointing=checkpointing,
        zero_stage=stage,
        offload_optimizer=offload,
        optimizer=optimizer,
        dataloader_workers=workers,
        env=env,
        predicted_peak_gib=round(total["total_gib"], 3),
        usable_gib=None,
        reasons=reasons,
        from_user=sorted(fixed),
        warnings=warnings,
        memory={k: round(v, 3) for k, v in total.items()},
    )
