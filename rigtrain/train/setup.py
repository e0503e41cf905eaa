"""What the launcher decides before any process starts: the devices, the world size, the
precision, and the environment of the training processes, each with its reason.

This is the minimal, hardware-blind part of planning (torch's view of the devices); the
rig/ planner (NVML facts, memory search, PCIe and power) takes over these choices."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rigtrain.config import RunConfig
from rigtrain.errors import UserError
from rigtrain.rig.plan import loader_workers


@dataclass
class LaunchPlan:
    device: str  # "cuda" | "cpu"
    world_size: int
    precision: str
    loader_workers: int = 0
    env: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"device": self.device, "world_size": self.world_size, "precision": self.precision,
                "loader_workers": self.loader_workers, "env": self.env, "reasons": self.reasons}


def local_devices() -> dict:
    """The machine as torch and psutil see it."""
    # Before CUDA starts: number GPUs by PCI bus (as nvidia-smi does), not fastest-first.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    import psutil
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 2),
                         "compute_capability": [p.major, p.minor]})
    return {"gpus": gpus,
            "cpu": {"cores": psutil.cpu_count(logical=False) or os.cpu_count(), "threads": os.cpu_count()},
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 2),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def plan_launch(config: RunConfig, devices: dict) -> LaunchPlan:
    gpus = devices["gpus"]
    reasons: dict[str, str] = {}
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    reasons["env.CUDA_DEVICE_ORDER"] = "GPU indices follow the PCI bus, as nvidia-smi numbers them"
    if gpus:
        chosen = list(config.rig.gpus) or list(range(len(gpus)))
        bad = [g for g in chosen if g >= len(gpus)]
        if bad:
            raise UserError(f"rig.gpus: GPU {bad[0]} does not exist; this machine has GPUs 0-{len(gpus) - 1}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, chosen))
        world = len(chosen)
        reasons["world_size"] = (f"one process per GPU: {world} GPU(s) "
                                 + ("chosen by rig.gpus" if config.rig.gpus else "found"))
        if config.train.nproc != 1:
            reasons["world_size"] += f"; train.nproc={config.train.nproc} applies only to CPU-only machines"
        capability = min(tuple(gpus[g]["compute_capability"]) for g in chosen)
        precision, why = _precision_for(capability)
        device = "cuda"
    else:
        if config.rig.gpus:
            raise UserError("rig.gpus: this machine has no GPU that torch can use; remove rig.gpus to train on the CPU")
        world = config.train.nproc
        reasons["world_size"] = f"no GPU: {world} CPU process(es) (train.nproc), DeepSpeed on gloo"
        precision, why = "fp32", "no GPU: fp32 (DeepSpeed's CPU path trains in fp32)"
        device = "cpu"
        env["DS_ACCELERATOR"] = "cpu"
        # Each process would otherwise start as many threads as there are cores and the
        # processes fight over them; an even split keeps steps steady.
        threads = max(1, (devices["cpu"]["threads"] or 1) // world)
        env["OMP_NUM_THREADS"] = str(threads)
        reasons["env.OMP_NUM_THREADS"] = f"{devices['cpu']['threads']} hardware threads shared by {world} process(es)"
    if config.train.precision != "auto":
        precision, why = config.train.precision, f"set by the user (train.precision={config.train.precision})"
    reasons["precision"] = why
    workers, reasons["data.workers"] = loader_workers(config.data.workers, devices["cpu"]["threads"] or 1, world)
    return LaunchPlan(device=device, world_size=world, precision=precision, loader_workers=workers, env=env,
                      reasons=reasons)


def _precision_for(capability: tuple[int, int]) -> tuple[str, str]:
    """bf16 needs compute capability 8.0 (Ampere); 7.x has fast fp16 tensor cores that need
    loss scaling; Pascal's consumer fp16 is crippled, so fp32 there."""
    if capability >= (8, 0):
        return "bf16", f"compute capability {capability[0]}.{capability[1]} >= 8.0 has native bf16"
    if capability >= (7, 0):
        return "fp16", f"compute capability {capability[0]}.{capability[1]}: fp16 tensor cores, dynamic loss scaling"
    return "fp32", f"compute capability {capability[0]}.{capability[1]} < 7.0: fp16 is slow there, fp32"
