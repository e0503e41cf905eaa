"""What the planner is asked (PlanRequest) and what it answers (Plan); rig/plan.py decides."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RigWarning:
    """What the machine puts at risk (rig/warnings.py): a code, the GPU it concerns (None: the
    whole rig) and a message that says what to do."""

    code: str
    gpu: int | None
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "gpu": self.gpu, "message": self.message}


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
    hosts: tuple[int, ...] = ()  # --hostfile: processes (slots) per machine; () = this machine only
    measured_outside_gib: float | None = None  # an earlier first step's residual on this card (memory_record.py)


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
    warnings: list[RigWarning]
    memory: dict = field(default_factory=dict)  # the breakdown behind predicted_peak_gib
    # the largest micro-batch the plan found to fit in its setting, where it searched up to
    # one that does not (None: set by the user, the CPU, the whole per-GPU share fitting, or a
    # search stopped at a useful size)
    largest_micro_batch: int | None = None

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "warnings"}
        out["gpus"] = list(self.gpus)
        return out
