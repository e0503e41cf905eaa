"""The machine as facts: what a probe reads (rig/probe.py), or what a rig file describes
(rig/rig_file.py reads and checks one; docs/planner.md, "The rig file")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rigtrain.wsl import wsl_kernel

# What a PCIe link can train to (the spec's link widths; generations to 7.0, 2025)
PCIE_GENERATIONS = (1, 2, 3, 4, 5, 6, 7)
PCIE_WIDTHS = (1, 2, 4, 8, 12, 16, 32)
P2P_CHECK_RESULTS = ("ok", "slow", "wrong_data", "hung", "unavailable", "failed")  # rig/p2p_check.py's
P2P_BROKEN = ("slow", "wrong_data", "hung")  # offered, but unsafe or harmful: NCCL is kept off it


@dataclass(frozen=True)
class Pcie:
    gen: int
    width: int
    max_gen: int | None = None
    max_width: int | None = None
    rx_mb_s: float | None = None  # throughput when probed (NVML samples ~20 ms)
    tx_mb_s: float | None = None


@dataclass(frozen=True)
class Power:
    limit_w: float | None = None
    default_limit_w: float | None = None
    min_limit_w: float | None = None
    max_limit_w: float | None = None
    draw_w: float | None = None


@dataclass(frozen=True)
class GpuProcess:
    """Another program computing on a card when it was probed (nvidia-smi's process list)."""

    pid: int
    name: str | None = None  # its command line, where this user may read it
    used_gib: float | None = None  # None where NVML may not say (some containers, WSL2)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    compute_capability: tuple[int, int]
    memory_free_gib: float | None = None
    pcie: Pcie | None = None
    power: Power | None = None
    temperature_c: float | None = None
    clocks_mhz: dict | None = None
    utilization_pct: float | None = None
    throttle_reasons: tuple[str, ...] = ()
    p2p: tuple[bool, ...] | None = None  # this GPU's row of the P2P matrix
    nvlink: tuple[bool, ...] | None = None
    # P2P as a copy between the cards found it (rig/p2p_check.py): per other GPU, null or
    # {"result": "ok" | "slow" | "wrong_data" | "hung" | "unavailable" | "failed", "gb_s", "host_gb_s"}
    p2p_check: tuple[dict | None, ...] | None = None
    uuid: str | None = None  # "GPU-...", as nvidia-smi -L prints it and CUDA_VISIBLE_DEVICES accepts
    display_active: bool | None = None  # a desktop (X, Wayland) draws on it: NVML's display-active state
    processes: tuple[GpuProcess, ...] | None = None  # other programs computing on it (not the desktop's)

    @property
    def free_gib(self) -> float:
        return self.memory_free_gib if self.memory_free_gib is not None else self.memory_gib

    @property
    def busy(self) -> bool:
        """Working when it was probed (half its power limit, or half utilised)."""
        power = self.power
        return (self.utilization_pct or 0) >= 50 or bool(
            power and power.draw_w and power.limit_w and power.draw_w >= 0.5 * power.limit_w
        )

    @property
    def link_under_load(self) -> tuple[int, int] | None:
        """(PCIe generation, width) the card runs at while it trains. An idle card drops its
        link to a lower generation to save power (a 3090 idles at Gen1) and goes back to the
        highest the card and the board allow under load: NVML's max, which counts the slot.
        A busy card's generation is the one it runs at (below the max: the BIOS, a riser)."""
        if self.pcie is None:
            return None
        gen = self.pcie.gen if self.busy or not self.pcie.max_gen else max(self.pcie.gen, self.pcie.max_gen)
        return gen, self.pcie.width


@dataclass(frozen=True)
class Cpu:
    model: str | None = None
    cores: int | None = None
    threads: int | None = None
    tdp_w: float | None = None


@dataclass(frozen=True)
class Disk:
    path: str
    free_gib: float
    filesystem: str | None = None  # the mount's type: "ext4", "9p" (a Windows drive under WSL2), "nfs4"...


# Rig fields that describe where it was read, not the machine: never in a rig file
ENVIRONMENT_FIELDS = ("source", "visible", "numbered_by_cuda")


@dataclass(frozen=True)
class Rig:
    gpus: tuple[Gpu, ...] = ()
    cpu: Cpu = field(default_factory=Cpu)
    ram_gib: float | None = None
    ram_free_gib: float | None = None
    swap_gib: float | None = None
    shm_gib: float | None = None  # /dev/shm's size: NCCL's transport between GPUs on one machine
    psu_w: float | None = None
    disk: tuple[Disk, ...] = ()
    software: dict | None = None
    unreachable_gpus: int | None = None  # NVIDIA cards on the PCI bus whose driver NVML could not reach
    source: str = "probe"  # "probe" or the rig file's path
    # Facts about the environment, not the machine (never in a rig file): the GPUs the
    # user's CUDA_VISIBLE_DEVICES leaves visible (rig/visible.py), and whether the GPUs'
    # numbers are CUDA's own (the probe asked CUDA because NVML could not be read).
    visible: tuple[int, ...] | None = None
    numbered_by_cuda: bool = False

    @property
    def threads(self) -> int:
        return self.cpu.threads or self.cpu.cores or 1

    @property
    def wsl(self) -> bool:
        """Linux under Windows (WSL2): its kernel's release names Microsoft's build."""
        return wsl_kernel(str((self.software or {}).get("kernel") or ""))

    def to_dict(self) -> dict:
        """The rig file's shape (what `rigtrain rig --json` prints as "rig", and a rig file holds)."""

        def clean(value):
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items() if v is not None and v != ()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        out = clean(asdict(self))
        for key in ENVIRONMENT_FIELDS:
            out.pop(key, None)
        out["gpus"] = out.get("gpus", [])  # an empty list is a fact: a CPU-only machine
        if len(self.disk) == 1:
            out["disk"] = out["disk"][0]
        return out
