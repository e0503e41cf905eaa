"""The run's plan: rig facts (a probe or a rig file) and the config go to rig/'s planner,
with a train step it can measure; the plan's choices go back into the config, except the
keys the user set."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import sys
from pathlib import Path

from rigtrain.config import RunConfig
from rigtrain.errors import UserError
from rigtrain.rig.budget import checkpoint_bytes_per_parameter
from rigtrain.rig.disk_warnings import checkpoint_disk_warning
from rigtrain.rig.driver_state import why_unreachable
from rigtrain.rig.facts import Gpu, Rig
from rigtrain.rig.plan import Plan, PlanRequest, make_plan
from rigtrain.rig.plan_types import RigWarning
from rigtrain.rig.rig_file import read_rig_file
from rigtrain.rig.torch_builds import PYTORCH_INDEX, build_for_cards, driver_runs, kernels_in, torch_for_driver
from rigtrain.rig.visible import VARIABLE, chosen_gpus, restricted, visible_indices
from rigtrain.train.memory_record import recalled, run_kind
from rigtrain.train.step_peaks import measured, step_shapes

# config key -> the plan's field
PLANNED = {
    "train.micro_batch_size": "micro_batch_size",
    "train.grad_accum_steps": "grad_accum_steps",
    "train.zero_stage": "zero_stage",
    "train.offload_optimizer": "offload_optimizer",
    "train.optimizer": "optimizer",
    "model.activation_checkpointing": "activation_checkpointing",
}


def config_value(config: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def machine_rig(paths: list[str | Path] = (), rig_file: str | None = None, *, fresh_p2p_check: bool = False) -> Rig:
    """A rig file when given; otherwise the probe (NVML), completed from torch when NVML
    cannot be read but CUDA works (a container without the NVML library). Either way with
    the GPUs the user's CUDA_VISIBLE_DEVICES leaves visible (rig/visible.py). A probed rig
    has P2P checked between the visible GPUs that offer it (rig/p2p_check.py): measured
    again when `fresh_p2p_check`, else the last check of these cards where there is one."""
    if rig_file:
        return restricted(read_rig_file(rig_file), os.environ.get(VARIABLE), os.environ.get("CUDA_DEVICE_ORDER"))
    from rigtrain.rig.probe import probe  # NVML and psutil: only without a rig file

    rig = probe(paths)
    software = rig.software or {}
    # a CPU build of torch sees no GPU either, nor a CUDA build without the driver's
    # library: nothing to ask it then (importing it takes 2-3 s)
    if not rig.gpus and (software.get("torch_hip") or software.get("torch_cuda") and _cuda_driver_loads()):
        cuda = _gpus_from_cuda()
        if cuda:  # CUDA applied CUDA_VISIBLE_DEVICES itself, and numbered what it left
            return dataclasses.replace(rig, gpus=cuda, numbered_by_cuda=True)
    rig = restricted(rig, os.environ.get(VARIABLE), os.environ.get("CUDA_DEVICE_ORDER"))
    if len(visible_indices(rig)) > 1:
        from rigtrain.data.embedded import cache_root  # the cache folder the datasets and step peaks use
        from rigtrain.rig.p2p_check import checked  # only with GPUs to check between

        cache = cache_root() / "p2p"
        rig = checked(rig, visible_indices(rig), cache_dir=cache, fresh=fresh_p2p_check, log=_say_on_stderr)
    return rig


def _say_on_stderr(line: str) -> None:
    """A line before the run has its log (stdout may carry --json)."""
    print(f"[rigtrain] {line}", file=sys.stderr, flush=True)


def check_torch_trains_here(rig: Rig, rig_file: str | None, wanted: tuple[int, ...] = ()) -> None:
    """A run trains on this machine, on the GPUs the rig holds: a rig file (which may add
    what no probe reads, like the PSU) must have this machine's GPU count, and GPUs that
    NVML sees must be usable by the torch installed here. A CPU-only torch on a GPU machine
    is the usual slip (pip chose a CPU wheel, or the venv was made on another machine);
    it would otherwise fail inside every rank. So is a torch with no kernels for the run's
    cards (`wanted`: rig.gpus; all when empty): PyPI's CUDA 13 build on a Pascal card fails
    at its first kernel. Without a rig file or a GPU, torch is not imported: there is
    nothing to ask it."""
    if not rig_file and (why := why_unreachable(rig)):
        raise UserError(
            f"{why}. This run would train on the CPU instead, hundreds of times slower: fix that first, or train "
            "on the CPU on purpose with `CUDA_VISIBLE_DEVICES= rigtrain train ...`"
        )
    described = len(visible_indices(rig))
    if not rig_file and not described:
        return
    import torch  # heavy: only where there are GPUs to ask it about (a rank imports it anyway)

    here = torch.cuda.device_count() if torch.cuda.is_available() else 0  # as CUDA_VISIBLE_DEVICES leaves them
    if rig_file and described != here:
        raise UserError(
            f"--rig {rig_file} describes {described} GPU(s) but this machine has {here}"
            f"{_why_torch_sees_none(torch) if here == 0 else ''}; to plan for another machine use "
            "`rigtrain rig --rig FILE`"
        )
    if described and here == 0:
        driver = (rig.software or {}).get("driver_cuda")
        names = ", ".join(sorted({rig.gpus[i].name for i in visible_indices(rig)}))
        capabilities = tuple(rig.gpus[i].compute_capability for i in visible_indices(rig))
        raise UserError(
            f"this machine has {described} GPU(s) ({names}) but torch cannot use them"
            f"{_why_torch_sees_none(torch, driver)}; {_torch_that_can(torch, driver, capabilities)}, "
            "or train on the CPU with `CUDA_VISIBLE_DEVICES= rigtrain train ...`"
        )
    if here and torch.version.cuda and (arch_list := torch.cuda.get_arch_list()):  # [] for a build that names none
        _check_kernels_for(rig, chosen_gpus(rig, wanted)[0], arch_list, torch.__version__)


def _check_kernels_for(rig: Rig, chosen: tuple[int, ...], arch_list: list[str], torch_version: str) -> None:
    cards = [(i, rig.gpus[i].name, rig.gpus[i].compute_capability) for i in chosen]
    lacking = [c for c in cards if not kernels_in(arch_list, c[2])]
    if lacking:
        others = [c for c in cards if c not in lacking]
        i, name, (major, minor) = lacking[0]
        advice = build_for_cards(lacking, others, (rig.software or {}).get("driver_cuda"), torch_version)
        raise UserError(
            f"GPU {i} ({name}) has compute capability {major}.{minor}, and torch {torch_version} has no kernels "
            f"for it (built for {' '.join(arch_list)}); {advice}"
        )


def _torch_that_can(torch, driver_cuda: str | None, capabilities: tuple[tuple[int, int], ...]) -> str:
    """What to do. A CPU-only (or ROCm) torch: PyPI's torch for Linux is a CUDA build. A
    CUDA build newer than the driver runs (NVML's figure): a newer driver, or PyTorch's
    build for the driver's CUDA. A build the driver does run: the GPUs are not reachable."""
    if not torch.version.cuda:
        return (
            "install torch's CUDA build (`.venv/bin/pip uninstall -y torch` then `bash setup/install.sh`: "
            "PyPI's torch for Linux is one)"
        )
    runs = driver_runs(driver_cuda, torch.version.cuda)
    if runs is None:
        return (
            "update the NVIDIA driver, or install torch's build for the CUDA the driver runs (nvidia-smi's "
            f"'CUDA Version'): `TORCH_INDEX_URL={PYTORCH_INDEX}cuXY bash setup/install.sh` (cu126 for 12.6)"
        )
    if not runs:
        return torch_for_driver(driver_cuda, torch.__version__, capabilities)
    return (
        "check that this shell reaches the GPUs (`nvidia-smi`; a container needs `--gpus all`); "
        "`.venv/bin/python -c 'import torch; torch.cuda.init()'` says why torch cannot"
    )


def _why_torch_sees_none(torch, driver_cuda: str | None = None) -> str:
    if torch.version.cuda is None and torch.version.hip is None:
        return f": torch {torch.__version__} is a CPU-only build"
    if torch.version.cuda:
        if driver_runs(driver_cuda, torch.version.cuda) is False:
            return f": torch {torch.__version__} is built for CUDA {torch.version.cuda}, the driver runs {driver_cuda}"
        return (
            f": torch {torch.__version__} is built for CUDA {torch.version.cuda}, which the driver here cannot "
            "start (a driver older than that CUDA needs, or a container started without the GPUs)"
        )
    return f": torch {torch.__version__} (ROCm {torch.version.hip}) cannot start HIP here"


def _cuda_driver_loads() -> bool:
    """Whether the CUDA driver's library loads here, as torch would load it: PyPI's default
    torch is a CUDA build, on CPU-only machines too."""
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _gpus_from_cuda() -> tuple[Gpu, ...]:
    import torch  # heavy: only on the paths that need it

    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(
            Gpu(
                name=p.name,
                memory_gib=round(total / 2**30, 2),
                memory_free_gib=round(free / 2**30, 2),
                compute_capability=(p.major, p.minor),
                uuid=f"GPU-{p.uuid}" if getattr(p, "uuid", None) else None,
            )
        )
    return tuple(gpus)


def _step_shapes(config: RunConfig) -> str:
    """The model and clip shape as far as a step's tensors depend on them, checkpointing
    apart (a step peak's key names it)."""
    return step_shapes(dataclasses.replace(config.model, activation_checkpointing=False), config.data)


# torch, imported only when a step is measured: a plan whose steps were measured before
# (the shipped table, the user's cache) is made without it, so `rigtrain tune` starts its
# first workers, which import torch themselves, 2-3 s sooner.
def fake_step_peak_bytes(build) -> int:
    from rigtrain.rig.step_memory import fake_step_peak_bytes as measure  # torch: see above

    return measure(build)


def train_step_builder(model, data, **step):
    from rigtrain.train.measured_step import train_step_builder as builder  # torch: see above

    return builder(model, data, **step)


def parameter_count(model, data) -> int:
    from rigtrain.train.measured_step import parameter_count as count  # torch: see above

    return count(model, data)


def step_peak_function(config: RunConfig):
    shapes = _step_shapes(config)

    def step_peak(micro_batch: int, checkpointing: bool, precision: str) -> int:
        return measured(
            f"step peak {shapes} micro_batch={micro_batch} checkpointing={checkpointing} {precision}",
            lambda: fake_step_peak_bytes(
                train_step_builder(
                    config.model, config.data, micro_batch=micro_batch, checkpointing=checkpointing, precision=precision
                )
            ),
        )

    return step_peak


def cached_parameter_count(config: RunConfig) -> int:
    """The model's parameter count (counting builds it on the meta device, whose first use
    costs a second of imports)."""
    return measured(f"parameters {_step_shapes(config)}", lambda: parameter_count(config.model, config.data))


def plan_run(
    config: RunConfig,
    rig: Rig,
    *,
    user_keys: set[str],
    psu_w: float | None = None,
    hosts: tuple[int, ...] = (),
    checkpoints_saved: int = 0,
) -> Plan:
    """hosts: with --hostfile, the processes (slots) of each machine; checkpoints_saved: the
    complete ones a resumed run has on its disk already (its free space is what is left)."""
    t = config.train
    fixed = {key: config_value(config, key) for key in PLANNED if key in user_keys}
    if "train.precision" in user_keys or t.precision != "auto":
        precision = t.precision
    else:
        precision = "auto"
    d = config.data
    batch_bytes = (
        d.clip_frames * d.frame_size[0] * d.frame_size[1] * 3
        + d.clip_samples * 2
        + d.max_text_bytes
        + 2 * 8 * d.segments_per_clip
        + 8
        + 1
    )  # uint8 video, int16 audio, text, segment spans, flags
    profiling = config.profile.enabled
    lazy = os.environ.get("CUDA_MODULE_LOADING", "LAZY").upper() != "EAGER"
    request = PlanRequest(
        parameters=cached_parameter_count(config),
        global_batch=t.global_batch_size or t.micro_batch_size * t.grad_accum_steps,
        precision=precision,
        fixed=fixed,
        config={key: config_value(config, key) for key in PLANNED},
        gpus=tuple(config.rig.gpus),
        cpu_processes=t.nproc,
        loader_workers=d.workers,
        psu_w=psu_w,
        batch_bytes=batch_bytes * t.micro_batch_size,
        clip_bytes=batch_bytes,
        profiling=profiling,
        lazy_loading=lazy,
        hosts=hosts,
        measured_outside_gib=_measured_outside(rig, tuple(config.rig.gpus), hosts, profiling, lazy),
    )
    plan = make_plan(rig, request, step_peak_function(config))
    if t.compile and plan.zero_stage == 3:
        plan.warnings.append(RigWarning("compile_zero3", None, COMPILE_AT_ZERO3))
    saves = math.ceil(t.steps / t.ckpt_every)  # every ckpt_every steps, and the last step
    per_checkpoint = request.parameters * checkpoint_bytes_per_parameter(
        plan.precision, plan.optimizer, plan.zero_stage
    )
    held = min(t.keep_ckpts + 1, saves)
    if low_disk := checkpoint_disk_warning(rig, per_checkpoint, held, t.keep_ckpts, checkpoints_saved):
        plan.warnings.append(low_disk)
    return plan


# What apply_plan does with train.compile at ZeRO-3, and why (seen on the CPU: a graph break
# at every layer, 2 minutes of compiling for a step slower than uncompiled).
COMPILE_AT_ZERO3 = (
    "train.compile is off at ZeRO-3: DeepSpeed gathers each layer's parameters in hooks that "
    "torch.compile cannot trace, so the graph would break at every layer (minutes of compiling for "
    "no gain); ZeRO-0 to 2 compile"
)


def _measured_outside(
    rig: Rig, wanted: tuple[int, ...], hosts: tuple[int, ...], profiling: bool, lazy: bool
) -> float | None:
    """What an earlier run's first steps measured beside the allocator on the card this plan
    is for (the one with the least free memory), for the same kind of run; None if none did."""
    if not rig.gpus:
        return None
    gpus = [rig.gpus[i] for i in chosen_gpus(rig, wanted)[0]]
    world = sum(hosts) or len(gpus)
    kind = run_kind(
        card=min(gpus, key=lambda g: g.free_gib).name,
        software=rig.software,
        world=world,
        profiling=profiling,
        lazy_loading=lazy,
    )
    record = recalled(kind)
    return None if record is None else record["outside_allocator_gib"]


# Variables the plan sets that a user may have set on purpose (a thread count for a shared
# machine, P2P back on for a board they know): as with torchrun and DeepSpeed's launcher,
# the user's value wins, and the plan says so beside its own. The GPU selection is not one
# of them: the plan already follows the user's CUDA_VISIBLE_DEVICES (rig/visible.py) and
# hands it on in the bus order it sets.
USER_ENVIRONMENT_WINS = (
    "OMP_NUM_THREADS",
    "NCCL_P2P_DISABLE",
    "NCCL_DEBUG",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
)


def with_user_environment(plan: Plan, environ=None) -> Plan:
    """The plan as a run started from this environment gets it (train, tune and `rigtrain
    rig` of this machine; a plan for a rig file of another machine is left as planned)."""
    environ = os.environ if environ is None else environ
    for key in USER_ENVIRONMENT_WINS:
        planned, yours = plan.env.get(key), environ.get(key)
        if planned is not None and yours is not None and yours != planned:
            why = plan.reasons.get(f"env.{key}", "")
            plan.env[key] = yours
            plan.reasons[f"env.{key}"] = f"set in your environment (the plan would set {planned}: {why})"
    return plan


def apply_plan(config: RunConfig, plan: Plan) -> RunConfig:
    """The config with the plan's choices (keys the user set are already the plan's)."""
    model = dataclasses.replace(config.model, activation_checkpointing=plan.activation_checkpointing)
    train = dataclasses.replace(
        config.train,
        micro_batch_size=plan.micro_batch_size,
        grad_accum_steps=plan.grad_accum_steps,
        zero_stage=plan.zero_stage,
        offload_optimizer=plan.offload_optimizer,
        optimizer=plan.optimizer,
        compile=config.train.compile and plan.zero_stage != 3,  # COMPILE_AT_ZERO3
    )
    return dataclasses.replace(config, model=model, train=train)
