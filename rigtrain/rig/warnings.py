"""The hardware warnings of a plan: what the machine itself puts at risk, each a
RigWarning with a code, the GPU it concerns and a message that says what to do
(docs/planner.md, "Warnings"). Warnings take the rig and the GPUs the run uses, never a
plan or its request, so the planner imports this module and nothing here imports back."""

from __future__ import annotations

from rigtrain.rig.budget import GIB, kept_for_display
from rigtrain.rig.disk_warnings import filesystem_warnings
from rigtrain.rig.driver_state import driver_warning
from rigtrain.rig.facts import Gpu, Rig
from rigtrain.rig.links import link_warnings
from rigtrain.rig.plan_types import RigWarning
from rigtrain.rig.power_warnings import power_limit_warnings, psu_warnings
from rigtrain.rig.torch_builds import build_for_cards, build_has_kernels, driver_runs, torch_for_driver

RAM_PER_WORKER_GIB = 0.25  # a loader thread's batches in flight (small-preset clips) and its stack


def ram_warning(
    rig: Rig, *, processes: int, workers: int, parameters: int, batch_bytes: int, host_model_gib: float = 0.0
) -> RigWarning | None:
    """Pinned batches in flight, loader threads and (on the CPU) the model itself, per
    process, against the RAM there is."""
    if rig.ram_gib is None:
        return None
    per_process = (
        host_model_gib
        + parameters * 4 / GIB  # the fp32 model built on the host first
        + workers * (RAM_PER_WORKER_GIB + 4 * batch_bytes / GIB)
    )
    need = per_process * processes + 2.0  # and the OS, Python, CUDA's host side
    have = rig.ram_free_gib if rig.ram_free_gib is not None else rig.ram_gib
    if need <= have:
        return None
    return RigWarning(
        "low_ram",
        None,
        f"{processes} process(es) with {workers} loader thread(s) each need about "
        f"{need:.1f} GiB of RAM but {have:.1f} GiB is available; lower data.workers or "
        "train.micro_batch_size, or add RAM" + _wsl_ram(rig),
    )


def _wsl_ram(rig: Rig) -> str:
    """WSL2 gives Linux half of Windows' RAM unless told otherwise."""
    if not rig.wsl:
        return ""
    return (
        " (under WSL2, Linux gets half of Windows' RAM by default: raise memory= under [wsl2] in "
        "%UserProfile%\\.wslconfig, then `wsl --shutdown` from Windows)"
    )


def offload_ram_warning(rig: Rig, states_bytes: int) -> RigWarning | None:
    """Optimizer states offloaded to the CPU, plus their pinned staging copy, against the RAM."""
    need = states_bytes * 2 / GIB
    if rig.ram_gib is None or need <= 0.8 * rig.ram_gib:
        return None
    return RigWarning(
        "low_ram",
        None,
        f"offloaded optimizer states need about {need:.1f} GiB of RAM of "
        f"{rig.ram_gib:.0f}; add RAM or use a smaller model" + _wsl_ram(rig),
    )


def hardware_warnings(rig: Rig, chosen: tuple[int, ...], psu_w: float | None = None) -> list[RigWarning]:
    """What the machine itself puts at risk, for the GPUs the run uses (`chosen`; all when
    empty): narrow or downtrained links, no bf16, heat or a power brake already at the
    probe, no or unreliable P2P, mixed cards, and power transients against the PSU
    (`psu_w` overrides the rig's figure)."""
    chosen = chosen or tuple(range(len(rig.gpus)))
    gpus = [(i, rig.gpus[i]) for i in chosen if i < len(rig.gpus)]
    out = _torch_build_warnings(rig, gpus) if gpus else driver_warning(rig)
    out += filesystem_warnings(rig)
    out += link_warnings(gpus)
    for i, gpu in gpus:
        out += _card_warnings(i, gpu) + _display_warnings(i, gpu) + _others_on_the_card(i, gpu)
    if len(gpus) > 1:
        out += _between_cards_warnings(gpus)
        out += _shared_memory_warnings(rig)
    psu = psu_w or rig.psu_w
    out += power_limit_warnings(rig, gpus, psu)
    if psu and gpus:
        out += psu_warnings(rig, gpus, psu)
    return out


def _torch_build_warnings(rig: Rig, gpus: list[tuple[int, Gpu]]) -> list[RigWarning]:
    """torch's CPU-only wheel on a machine with GPUs (the probe reads the build from torch's
    files): the usual slip when pip picks the wheel, and `rigtrain train` refuses to start.
    Or a CUDA build newer than the driver runs: a home rig's driver lags a fresh wheel. Or
    a build with no kernels for a card: PyPI's CUDA 13 torch on a Pascal or Volta card."""
    software = rig.software or {}
    if software.get("torch_hip"):
        return []
    if not software.get("torch"):  # none read (a rig file of another machine): what no build can run
        return _beyond_every_build(gpus)
    if software.get("torch_cuda"):
        driver, build = software.get("driver_cuda"), software["torch_cuda"]
        if driver_runs(driver, build) is not False:
            return _no_kernels_warnings(software, gpus)
        return [
            RigWarning(
                "torch_newer_than_driver",
                None,
                f"torch {software['torch']} is built for CUDA {build}, but the driver runs CUDA {driver}: torch "
                "cannot use these GPUs and `rigtrain train` will not start on them; "
                + torch_for_driver(driver, software["torch"], tuple(gpu.compute_capability for _, gpu in gpus)),
            )
        ]
    return [
        RigWarning(
            "torch_cpu_build",
            None,
            f"torch {software['torch']} is a CPU-only build: it cannot use these GPUs, and `rigtrain train` "
            "will not start on them; `.venv/bin/pip uninstall -y torch`, then `bash setup/install.sh` "
            "(PyPI's torch for Linux is a CUDA build)",
        )
    ]


def _beyond_every_build(gpus: list[tuple[int, Gpu]]) -> list[RigWarning]:
    """Cards older than every torch build: pytorch.org's oldest (cu126) starts at compute
    capability 5.0 (Maxwell), so a Kepler card (a Tesla K80, 3.7) has none, whatever is
    installed."""
    return [
        RigWarning(
            "torch_lacks_kernels",
            i,
            f"GPU {i} ({gpu.name}, compute capability {gpu.compute_capability[0]}.{gpu.compute_capability[1]}): no "
            "build of torch has kernels for it (the oldest, for CUDA 12.6, starts at 5.0), and `rigtrain train` "
            "will not start on it: train on other cards with `--set rig.gpus=...`, or on the CPU",
        )
        for i, gpu in gpus
        if (0, 0) < tuple(gpu.compute_capability) < (5, 0)
    ]


def _no_kernels_warnings(software: dict, gpus: list[tuple[int, Gpu]]) -> list[RigWarning]:
    """The cards the installed torch's CUDA cannot have kernels for (rig/torch_builds.py):
    each would fail at its first kernel ("no kernel image is available")."""
    cards = [(i, gpu.name, gpu.compute_capability) for i, gpu in gpus]
    lacking = [c for c in cards if not build_has_kernels(software["torch_cuda"], c[2])]
    if not lacking:
        return []
    others = [c for c in cards if c not in lacking]
    advice = build_for_cards(lacking, others, software.get("driver_cuda"), software["torch"])
    return [
        RigWarning(
            "torch_lacks_kernels",
            i,
            f"GPU {i} ({name}, compute capability {cc[0]}.{cc[1]}): torch {software['torch']}, built for CUDA "
            f"{software['torch_cuda']}, has no kernels for it, and `rigtrain train` will not start on it; {advice}",
        )
        for i, name, cc in lacking
    ]


# NCCL moves data between GPUs of one machine through /dev/shm whenever P2P is off (most
# consumer cards), and sets up segments there in any case; a Docker container's default
# /dev/shm is 64 MiB, and NVIDIA's own containers advise --ipc=host or more than that.
SHM_ENOUGH_GIB = 1.0


def _shared_memory_warnings(rig: Rig) -> list[RigWarning]:
    if rig.shm_gib is None or rig.shm_gib >= SHM_ENOUGH_GIB:
        return []
    return [
        RigWarning(
            "small_shm",
            None,
            f"/dev/shm holds {rig.shm_gib * 1024:.0f} MiB (a Docker container's default is 64): NCCL passes "
            "data between the GPUs through it and fails when it cannot grow a segment; start the container "
            "with --ipc=host (or --shm-size=1g)",
        )
    ]


def _display_warnings(i: int, gpu: Gpu) -> list[RigWarning]:
    """A card that draws the desktop: the plan keeps room for it (rig/budget.py)."""
    if not gpu.display_active:
        return []
    return [
        RigWarning(
            "display_gpu",
            i,
            f"GPU {i} ({gpu.name}) draws a desktop, which holds {gpu.memory_gib - gpu.free_gib:.1f} GiB of it now "
            f"and takes more as windows open: the plan keeps {kept_for_display(gpu):.1f} GiB free for it; for the "
            "whole card, draw the desktop on another GPU or the CPU's graphics, or train on other cards with "
            "--set rig.gpus=...",
        )
    ]


def _others_on_the_card(i: int, gpu: Gpu) -> list[RigWarning]:
    """Other programs computing on a card the run uses: their memory is not the run's (the
    plan fits what is left) and they share its compute. Often forgotten: a notebook's kernel
    keeps its GPU memory until it is shut down, and a run stopped badly can leave a process."""
    if not gpu.processes:
        return []
    shown = [
        f"PID {p.pid}"
        + (f" ({p.name})" if p.name else "")
        + (f" holding {p.used_gib:.1f} GiB" if p.used_gib is not None else "")
        for p in sorted(gpu.processes, key=lambda p: -(p.used_gib or 0))[:3]
    ]
    more = f" and {len(gpu.processes) - 3} more" if len(gpu.processes) > 3 else ""
    return [
        RigWarning(
            "gpu_in_use",
            i,
            f"GPU {i} ({gpu.name}) is in use by {len(gpu.processes)} other process(es): {'; '.join(shown)}{more}. "
            f"The plan fits what is left ({gpu.free_gib:.1f} of {gpu.memory_gib:.1f} GiB free) and the card's "
            "compute is shared; stop them for the whole card (`nvidia-smi` lists them; a notebook keeps its GPU "
            "memory until its kernel is shut down), or train on other cards with --set rig.gpus=...",
        )
    ]


def _card_warnings(i: int, gpu: Gpu) -> list[RigWarning]:
    """One card's precision and clocks."""
    out: list[RigWarning] = []
    if gpu.compute_capability < (8, 0):
        out.append(
            RigWarning(
                "no_bf16",
                i,
                f"GPU {i} ({gpu.name}, compute capability "
                f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}) has no bf16: "
                + (
                    "fp16 with loss scaling is planned; watch for overflow skips in the log"
                    if gpu.compute_capability >= (7, 0)
                    else "fp32 is planned (fp16 is no faster here)"
                ),
            )
        )
    # The probe reads one sample, usually of an idle card: a power cap in it says nothing
    # (training telemetry judges that under load, profile/throttle.py); heat or a
    # power brake while idle is already a problem.
    thermal = [r for r in gpu.throttle_reasons if r in ("sw_thermal", "hw_thermal", "hw_slowdown")]
    brake = [r for r in gpu.throttle_reasons if r == "hw_power_brake"]
    if thermal:
        out.append(
            RigWarning(
                "throttling",
                i,
                f"GPU {i} ({gpu.name}) is already slowing its clocks for heat "
                f"({', '.join(thermal)}"
                + (f", {gpu.temperature_c:.0f} C" if gpu.temperature_c else "")
                + ") before training: improve airflow or spacing between cards, or lower its power limit",
            )
        )
    if brake:
        out.append(
            RigWarning(
                "throttling",
                i,
                f"GPU {i} ({gpu.name}) is held by its power-brake signal before "
                "training: check the power supply's capacity and that every GPU power cable is seated",
            )
        )
    return out


def _between_cards_warnings(gpus: list[tuple[int, Gpu]]) -> list[RigWarning]:
    """Several cards: P2P between them, and cards that differ."""
    out: list[RigWarning] = []
    indices = [i for i, _ in gpus]
    checked = {(a, b): ga.p2p_check[b] for a, ga in gpus for b in indices if b > a and ga.p2p_check and ga.p2p_check[b]}
    missing = [(a, b) for a, ga in gpus for b in indices if b != a and ga.p2p is not None and not ga.p2p[b]]
    missing += [pair for pair, entry in checked.items() if entry["result"] == "unavailable"]  # CUDA refused it
    if missing:
        pairs = sorted({tuple(sorted(p)) for p in missing})
        out.append(
            RigWarning(
                "no_p2p",
                None,
                "no peer-to-peer between GPUs "
                + ", ".join(f"{a}-{b}" for a, b in pairs)
                + ": NCCL copies through host memory (NCCL_P2P_DISABLE=1 is set); prefer ZeRO-0/1 "
                "with accumulation, which communicates least",
            )
        )
    out += _broken_p2p_warnings(checked)
    consumer_ada = [i for i, g in gpus if any(k in g.name.lower() for k in ("rtx 40", "rtx 50"))]
    if consumer_ada:
        out.append(
            RigWarning(
                "p2p_unreliable",
                None,
                f"GPUs {', '.join(map(str, consumer_ada))} are consumer RTX "
                "40/50 cards: P2P is disabled in their drivers or can hang NCCL even when reported; "
                "NCCL_P2P_DISABLE=1 is set",
            )
        )
    kinds = {(g.name, round(g.memory_gib)) for _, g in gpus}
    if len(kinds) > 1:
        smallest = min(gpus, key=lambda ig: ig[1].free_gib)
        out.append(
            RigWarning(
                "mixed_gpus",
                None,
                "different cards ("
                + ", ".join(sorted(k[0] for k in kinds))
                + f"): ZeRO needs one micro-batch on every rank, so the plan is made for the smallest, "
                f"GPU {smallest[0]} ({smallest[1].name}); the faster card waits for the slower "
                "(choose cards with --set rig.gpus=...)",
            )
        )
    return out


def _broken_p2p_warnings(checked: dict) -> list[RigWarning]:
    """Pairs that offer P2P but failed its check (rig/p2p_check.py), with what was seen."""
    out = []
    for (a, b), entry in sorted(checked.items()):
        seen = {
            "slow": f"ran at {entry.get('gb_s', 0):.1f} GB/s, slower than through host memory "
            f"({entry.get('host_gb_s', 0):.1f} GB/s)",
            "wrong_data": "delivered wrong data",
            "hung": "never finished",
        }.get(entry["result"])
        if seen:
            out.append(
                RigWarning(
                    "p2p_broken",
                    None,
                    f"GPUs {a}-{b} offer P2P, but a copy between them {seen}: NCCL_P2P_DISABLE=1 is set "
                    "(NCCL goes through host memory). The usual cause is PCIe ACS or an IOMMU in the path "
                    "(a PCIe switch, a virtual machine): turn ACS off in the BIOS or boot with iommu=pt, "
                    "then run `rigtrain rig` to check again",
                )
            )
    return out
