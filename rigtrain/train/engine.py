"""The DeepSpeed engine's set-up, without the training loop: the DeepSpeed config a run's
config and plan imply, the optimizer and its parameter groups, the learning-rate schedule,
seeding, and the process group. The launcher writes the DeepSpeed config into
RUN_DIR/config.json from here without importing the Trainer (docs/training.md, "The
DeepSpeed setup")."""

from __future__ import annotations

import datetime
import math
import os
import random
import sys
import types
import warnings

import numpy as np
import torch

from rigtrain.config import RunConfig
from rigtrain.errors import UserError
from rigtrain.rig.budget import BUCKET_ELEMENTS
from rigtrain.train.rendezvous import store_for_this_rank


def deepspeed_config(config: RunConfig, precision: str, world_size: int) -> dict:
    t = config.train
    # Bucket sizes the planner counts (rig.budget.BUCKET_ELEMENTS): DeepSpeed's defaults
    # (5e8 elements, 1 GB in bf16 per bucket) would not fit a home card beside the model.
    zero: dict = {
        "stage": t.zero_stage,
        "reduce_bucket_size": BUCKET_ELEMENTS,
        "allgather_bucket_size": BUCKET_ELEMENTS,
    }
    if t.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=BUCKET_ELEMENTS,
            stage3_max_live_parameters=2 * BUCKET_ELEMENTS,
            stage3_max_reuse_distance=2 * BUCKET_ELEMENTS,
        )
        if precision == "bf16":
            # DeepSpeed's "memory-efficient linear" replaces torch.nn.functional.linear for
            # the whole process: a matmul, then the bias added in place. Under autocast that
            # rounds the product to bf16 before the bias, and bf16 at ZeRO-3 fell behind
            # fp32 (demo seed 4: +21.6% loss at 600 steps; -1.6% without it). torch's own
            # linear keeps autocast's bf16 weight copy for the backward, which the planner's
            # measured step counts already (docs/training.md, "Precision").
            zero["memory_efficient_linear"] = False
    if t.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    extra = {}
    if precision == "bf16":
        # bf16 the way torch's AMP does it (docs/training.md, "Precision"): the weights,
        # gradients and optimizer stay fp32, and torch.autocast runs the matmuls and
        # attention in bf16; the residual streams and norms, the embeddings and the latent
        # array stay fp32. DeepSpeed's "bf16" section casts the whole module to bf16
        # instead, and on the demo that drifted from fp32's losses by up to a third
        # (bench/precision.py).
        extra["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if world_size == 1:
            # DeepSpeed averages Linear layers' gradients across GPUs in bf16 (half the
            # traffic; rig/speed.py counts 2 bytes). One process has nothing to average, but
            # ZeRO-3 still copies those gradients through bf16 buckets: keep them fp32.
            extra["torch_autocast"]["lower_precision_safe_modules"] = []
    return {
        **extra,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        # at ZeRO-0 the trainer clips, in multi-tensor kernels (see one_process_epilogue)
        "gradient_clipping": 0.0 if clips_gradients_itself(config, precision) else t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        # loss_scale 0 = dynamic loss scaling, which fp16 needs to avoid underflow.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our optimizer is built here (AdamW or bitsandbytes AdamW8bit); DeepSpeed would
        # otherwise insist on its own CPU Adam when offloading.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def clips_gradients_itself(config: RunConfig, precision: str) -> bool:
    """Whether the trainer clips the gradients rather than DeepSpeed: at ZeRO-0, outside fp16.
    DeepSpeed's clipping there (runtime/utils.py, clip_grad_norm_) takes a norm and a
    multiply per parameter, and all-reduces the norm even in one process: on a GPU three
    launches a parameter every step (`small` has 169), each a few microseconds of work
    behind its host time. torch's clip_grad_norm_ does the same sum in a few multi-tensor
    kernels. ZeRO-1 to 3 clip their flat partitions, and fp16's optimizer clips after
    unscaling: both stay DeepSpeed's. With train.grad_clip = 0 (no clipping) the trainer
    still takes the norm (max_gradient_norm): it is what decides that an update with
    inf/NaN gradients is skipped (skipping.py), which nothing else does at ZeRO-0."""
    return config.train.zero_stage == 0 and precision != "fp16"


def max_gradient_norm(config: RunConfig) -> float:
    """The trainer's clip: train.grad_clip, or no limit (the norm taken, the gradients left
    as they are) where it is 0."""
    return config.train.grad_clip or math.inf


def one_process_epilogue(engine, config: RunConfig, precision: str, world: int) -> list[torch.nn.Parameter]:
    """Leave out DeepSpeed's work after the backward that does nothing for this run, and return
    the parameters the trainer clips itself (none where DeepSpeed clips). At ZeRO-0 in one
    process (the plan's choice for one GPU) DeepSpeed would still flatten every gradient into
    a bucket, all-reduce it with itself and copy each gradient back: a copy kernel per
    parameter every step, on a step the first H200 run found host-bound."""
    if world == 1 and config.train.zero_stage == 0:
        engine.enable_backward_allreduce = False
    if not clips_gradients_itself(config, precision):
        return []
    return [p for p in engine.module.parameters() if p.requires_grad]


def compile_objective(model: torch.nn.Module) -> None:
    """train.compile: torch.compile the model's training objective (fused kernels, and far
    fewer launches for the host to issue), not DeepSpeed's engine.compile of the whole
    forward, which recompiled for every evaluation task and batch size (and evaluation
    would stop compiling at torch's limit of 8 versions, without a word). Shapes are fixed
    from step to step, so nothing is compiled for dynamic ones."""
    model.objective = torch.compile(model.objective, dynamic=False)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases, embeddings and the latent array keep
    their scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or name == "latents":
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = config.train
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional: only for train.optimizer=adamw8bit
        except ImportError:
            raise UserError(
                "train.optimizer=adamw8bit needs bitsandbytes, which is not installed here: "
                "pip install bitsandbytes, or set train.optimizer=adamw"
            ) from None

        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=t.betas)
    # fused: one kernel for the whole update, and its step counts stay on the device, where
    # the default implementation reads each one back to the host every step.
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=True)


def lr_lambda(config: RunConfig):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at train.steps."""
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed(plan: dict, local_rank: int, timeout_min: float = 30.0) -> torch.device:
    """The process group (NCCL on GPUs, gloo on the CPU) and this rank's device, set up for
    the plan: TF32, attention kernels, and torch's allocator capped at the plan's share of
    the card. A collective that waits longer than timeout_min for another rank fails (gloo
    raises; NCCL's watchdog aborts the process) instead of waiting for ever."""
    without_deepspeed_muon()
    without_deprecation_lines_from_deepspeed()
    import deepspeed  # heavy: only the processes that train import it

    if plan["device"] == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for any fp32 matmul left
        torch.backends.cudnn.allow_tf32 = True
        # Attention through Flash or memory-efficient kernels, not cuDNN's: on the first
        # H200 run cuDNN attention spent 3.6-5.7 ms of CPU per call building execution
        # plans (55% of the step's host time), and SDPA otherwise prefers it on Hopper.
        torch.backends.cuda.enable_cudnn_sdp(False)
        cap = (plan.get("memory") or {}).get("allocator_cap_gib")
        if cap and cap > 0:  # 0: the plan found no room on the card (and said so); torch's default then
            # torch's allocator may take what the plan gave the step, and no more: the
            # rest of the card is left to the CUDA context, NCCL and cuDNN, which
            # allocate outside it. Past the cap, torch raises an out-of-memory error the
            # first-step back-off can catch, instead of NCCL failing at a barrier later.
            total = torch.cuda.get_device_properties(local_rank).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), local_rank)
    else:
        device = torch.device("cpu")
        backend = "gloo"
        without_deepspeed_shm_kernel()
    timeout = datetime.timedelta(minutes=timeout_min)
    # The groups DeepSpeed makes after the world's (its data-parallel group, a clone of the
    # world) are made without a timeout and took torch's default, 30 minutes: a gradient
    # all-reduce waited that long for a rank stopped with SIGSTOP while the world's
    # collectives gave up in time. Torch reads this default when a group is made.
    from torch.distributed import distributed_c10d  # where torch keeps that default, as a global

    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    # Once per process: a tune worker's trials each build a Trainer in the group it made.
    store = None if torch.distributed.is_initialized() else store_for_this_rank(timeout)
    if store is not None:  # DeepSpeed then takes the process group as it is
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        # The GPU bound to the group where there are peers, as DeepSpeed's own init does
        # (comm/torch.py: NCCL then knows each rank's device, and splits later groups from it).
        bound = {"device_id": device} if device.type == "cuda" and world > 1 else {}
        torch.distributed.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=timeout, **bound
        )
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    return device


# DeepSpeed's name for its C++ shared-memory all-reduce on the CPU (op_builder/cpu/comm.py).
DEEPSPEED_SHM_OP = "deepspeed_shm_comm"


DEEPSPEED_MUON = "deepspeed.runtime.zero.muon"


def without_deepspeed_muon() -> None:
    """Every deepspeed.initialize with ZeRO asks whether the optimizer is DeepSpeed's Muon
    (`from ...muon.muon_optimizer import MuonWithAuxAdam`, then isinstance: zero/utils.py,
    stage_1_and_2.py, stage3.py, bf16_optimizer.py), and ZeRO-1/2 import Muon's update
    function on every gradient reduction, to call it only for Muon's parameters. Both
    modules torch.compile their functions as they are imported, which imports torch's
    compiler (torch._inductor): 3.4 s of each training process's start on a 2-core CPU,
    for an optimizer rigtrain never builds (build_optimizer). Stand-ins give DeepSpeed the
    same answers: a class no optimizer here is an instance of, an update never called. A
    DeepSpeed that imported anything else from them would fail at initialize or the first
    step with an ImportError naming it (the tests that train would say so at once); where
    the real modules are imported already (a script of the user's), they stay."""
    if f"{DEEPSPEED_MUON}.muon_optimizer" in sys.modules or f"{DEEPSPEED_MUON}.original_muon" in sys.modules:
        return

    class MuonWithAuxAdam:  # DeepSpeed's name; no optimizer rigtrain builds is one
        pass

    def muon_update(*args, **kwargs):
        raise RuntimeError(
            "DeepSpeed called its Muon update, which rigtrain leaves out (train/engine.py, "
            "without_deepspeed_muon): rigtrain's optimizers are AdamW and AdamW8bit"
        )

    for name, attribute in (("muon_optimizer", MuonWithAuxAdam), ("original_muon", muon_update)):
        stand_in = types.ModuleType(f"{DEEPSPEED_MUON}.{name}", "rigtrain's stand-in: train/engine.py")
        setattr(stand_in, attribute.__name__, attribute)
        sys.modules[stand_in.__name__] = stand_in


# torch 2.13 deprecated two collectives that DeepSpeed 0.19's ZeRO-3 calls at every gather
# and gradient reduction (all_gather_into_tensor, reduce_scatter_tensor). Python's once-per-
# place rule did not hold them back: a 30-step ZeRO-3 run on one CPU rank printed 35 such
# lines, four steps on two ranks 18, between the run's own. Nothing the user can change.
DEEPSPEED_DEPRECATED_CALLS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def without_deprecation_lines_from_deepspeed() -> None:
    warnings.filterwarnings("ignore", message=DEEPSPEED_DEPRECATED_CALLS, category=FutureWarning)


def without_deepspeed_shm_kernel() -> None:
    """DeepSpeed's CPU backend compiles a C++ shared-memory all-reduce as its process group
    starts, unless told the kernel is unavailable. Only DeepSpeed's inference all-reduce
    calls it; training reduces through gloo. Compiling it cost a first CPU run 25 s on 2
    cores (and again whenever the compiler's command changed), and where no C++ compiler is
    installed it stopped every CPU run with a build error."""
    import deepspeed.ops  # heavy: only the processes that train import it

    # the probed table DeepSpeed keeps, and reads before it builds an op (ops/__init__.py)
    deepspeed.ops.__compatible_ops__[DEEPSPEED_SHM_OP] = False


def apply_optimizer_config(config: RunConfig, schedule) -> None:
    """The checkpoint brought back the optimizer's hyperparameters and the schedule's base
    rate as they were; a resumed run trains with what its config says now (--set
    train.lr=... on --resume takes effect), at the schedule's position it had reached."""
    t = config.train
    factor = lr_lambda(config)(schedule.last_epoch)
    schedule.base_lrs = [t.lr for _ in schedule.base_lrs]
    for group in schedule.optimizer.param_groups:
        group["lr"] = t.lr * factor
        group["betas"] = tuple(t.betas)
        if group.get("weight_decay", 0) > 0:  # the group of matrices (param_groups)
            group["weight_decay"] = t.weight_decay
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
