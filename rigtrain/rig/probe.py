"""Reading the machine: NVML (nvidia-ml-py's `pynvml`) for every GPU, psutil for the CPU,
RAM, swap and disks, and the versions of the software that trains.

No NVML (no driver or no GPU) is a normal case: the rig then has no GPUs. Each NVML query
is asked on its own, and one that a card or driver does not support leaves that field
out, rather than failing the whole probe."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
from importlib import metadata
from pathlib import Path

from rigtrain.rig.driver_state import unreachable_cards
from rigtrain.rig.facts import PCIE_GENERATIONS, PCIE_WIDTHS, Cpu, Disk, Gpu, GpuProcess, Pcie, Power, Rig
from rigtrain.wsl import wsl_kernel

# NVML clock-event reasons that mean lost throughput (idle and application clocks do not)
THROTTLE_REASONS = {
    "nvmlClocksEventReasonSwPowerCap": "sw_power_cap",
    "nvmlClocksEventReasonHwSlowdown": "hw_slowdown",
    "nvmlClocksEventReasonSwThermalSlowdown": "sw_thermal",
    "nvmlClocksEventReasonHwThermalSlowdown": "hw_thermal",
    "nvmlClocksEventReasonHwPowerBrakeSlowdown": "hw_power_brake",
}


def _ask(call, *args, default=None):
    """One NVML query; None when the card, driver or permissions do not allow it."""
    import pynvml  # optional: absent or failing on machines without NVIDIA's driver

    try:
        return call(*args)
    except (pynvml.NVMLError, AttributeError, TypeError):
        return default


def _flag(nvml, query: str, handle) -> bool | None:
    """An NVML on/off state (NVML_FEATURE_ENABLED is 1); None where it cannot be read."""
    value = _ask(getattr(nvml, query, None), handle)
    return None if value is None else bool(value)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_gpu(nvml, handle, index: int, handles: list) -> Gpu:
    memory = _ask(nvml.nvmlDeviceGetMemoryInfo, handle)
    cc = _ask(nvml.nvmlDeviceGetCudaComputeCapability, handle) or (0, 0)
    pcie = None
    gen, width = (
        _ask(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        _ask(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
    )
    # a virtual or passed-through GPU can report a link no slot has (0, or a sentinel):
    # left unknown, so the probe never writes a rig file it cannot read back
    known = lambda value, allowed: value if value in allowed else None  # noqa: E731
    gen, width = known(gen, PCIE_GENERATIONS), known(width, PCIE_WIDTHS)
    if gen and width:
        rx = _ask(nvml.nvmlDeviceGetPcieThroughput, handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
        tx = _ask(nvml.nvmlDeviceGetPcieThroughput, handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
        max_gen = known(_ask(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle), PCIE_GENERATIONS)
        max_width = known(_ask(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle), PCIE_WIDTHS)
        pcie = Pcie(
            gen=gen,
            width=width,
            max_gen=max_gen if max_gen is None or max_gen >= gen else None,
            max_width=max_width if max_width is None or max_width >= width else None,
            rx_mb_s=rx / 1000 if rx is not None else None,  # NVML reports KB/s
            tx_mb_s=tx / 1000 if tx is not None else None,
        )
    milliwatts = lambda v: v / 1000 if v is not None else None  # noqa: E731
    constraints = _ask(nvml.nvmlDeviceGetPowerManagementLimitConstraints, handle) or (None, None)
    power = Power(
        limit_w=milliwatts(_ask(nvml.nvmlDeviceGetPowerManagementLimit, handle)),
        default_limit_w=milliwatts(_ask(nvml.nvmlDeviceGetPowerManagementDefaultLimit, handle)),
        min_limit_w=milliwatts(constraints[0]),
        max_limit_w=milliwatts(constraints[1]),
        draw_w=milliwatts(_ask(nvml.nvmlDeviceGetPowerUsage, handle)),
    )
    reasons_mask = _ask(nvml.nvmlDeviceGetCurrentClocksEventReasons, handle)
    if reasons_mask is None:
        reasons_mask = _ask(nvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle) or 0
    reasons = tuple(name for attr, name in THROTTLE_REASONS.items() if reasons_mask & getattr(nvml, attr, 0))
    clocks = {
        key: _ask(nvml.nvmlDeviceGetClockInfo, handle, kind)
        for key, kind in (("sm", nvml.NVML_CLOCK_SM), ("memory", nvml.NVML_CLOCK_MEM))
    }
    clocks.update(
        {
            key: _ask(nvml.nvmlDeviceGetMaxClockInfo, handle, kind)
            for key, kind in (("sm_max", nvml.NVML_CLOCK_SM), ("memory_max", nvml.NVML_CLOCK_MEM))
        }
    )
    utilization = _ask(nvml.nvmlDeviceGetUtilizationRates, handle)
    p2p = nvlink = None
    if len(handles) > 1:
        p2p = tuple(
            other is handle
            or _ask(nvml.nvmlDeviceGetP2PStatus, handle, other, nvml.NVML_P2P_CAPS_INDEX_READ)
            == nvml.NVML_P2P_STATUS_OK
            for other in handles
        )
        nvlink = tuple(
            other is not handle
            and _ask(nvml.nvmlDeviceGetP2PStatus, handle, other, nvml.NVML_P2P_CAPS_INDEX_NVLINK)
            == nvml.NVML_P2P_STATUS_OK
            for other in handles
        )
    return Gpu(
        name=_text(_ask(nvml.nvmlDeviceGetName, handle, default=f"GPU {index}")),
        memory_gib=round(memory.total / 2**30, 2) if memory else 0.0,
        memory_free_gib=round(memory.free / 2**30, 2) if memory else None,
        compute_capability=(int(cc[0]), int(cc[1])),
        pcie=pcie,
        power=power,
        temperature_c=_ask(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        clocks_mhz={k: v for k, v in clocks.items() if v is not None} or None,
        utilization_pct=getattr(utilization, "gpu", None),
        throttle_reasons=reasons,
        p2p=p2p,
        nvlink=nvlink,
        uuid=_text(uuid) if (uuid := _ask(getattr(nvml, "nvmlDeviceGetUUID", None), handle)) else None,
        display_active=_flag(nvml, "nvmlDeviceGetDisplayActive", handle),  # a desktop set up its screen there
        processes=_compute_processes(nvml, handle),
    )


def _compute_processes(nvml, handle) -> tuple[GpuProcess, ...] | None:
    """Other programs computing on the card (a notebook's kernel keeps its memory until it is
    shut down; a run left behind): NVML's list, less this process. None where NVML cannot say,
    and under WSL2, where the list holds Windows' programs (the desktop's, by Windows' PIDs,
    which name other processes here) without their memory: nothing to warn about."""
    if wsl_kernel():
        return None
    found = _ask(getattr(nvml, "nvmlDeviceGetComputeRunningProcesses", None), handle)
    if found is None:
        return None
    out = []
    for process in found:
        if process.pid == os.getpid():
            continue
        used = getattr(process, "usedGpuMemory", None)  # None where NVML may not say
        out.append(
            GpuProcess(process.pid, _command_line(process.pid), None if used is None else round(used / 2**30, 2))
        )
    return tuple(out)


def _command_line(pid: int) -> str | None:
    """A process's command line, shortened; None where it cannot be read (another PID
    namespace: a container sees the host's PIDs in NVML's list)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    line = " ".join(w.decode(errors="replace") for w in words if w)
    return (line[:77] + "...") if len(line) > 80 else line or None


def probe_gpus() -> tuple[tuple[Gpu, ...], dict, int | None]:
    """Every GPU NVML sees, in PCI bus order (as nvidia-smi and CUDA_DEVICE_ORDER=PCI_BUS_ID
    number them), the driver's versions and, where NVML says the driver is in a bad state,
    the NVIDIA cards on the PCI bus it leaves out of reach (rig/driver_state.py)."""
    try:
        import pynvml  # optional: absent or failing on machines without NVIDIA's driver

        pynvml.nvmlInit()
    except Exception as err:  # no library, no driver, no device: a CPU machine, unless NVML says otherwise
        said = type(err).__name__
        return (), {"nvml": f"not available ({said})"}, unreachable_cards(said)
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = tuple(probe_gpu(pynvml, h, i, handles) for i, h in enumerate(handles))
        driver = {"driver": _text(_ask(pynvml.nvmlSystemGetDriverVersion, default="unknown"))}
        cuda = _ask(pynvml.nvmlSystemGetCudaDriverVersion)
        if cuda:
            driver["driver_cuda"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        return gpus, driver, None
    finally:
        pynvml.nvmlShutdown()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def software(gpus_found: bool = True) -> dict:
    """What trains: torch and its CUDA build, DeepSpeed and its ops, bitsandbytes, NCCL,
    read from the installed packages' files: importing torch takes 2-3 s, which `rigtrain
    train` and `tune` would spend before starting the processes that import it themselves."""
    build = torch_build()
    info: dict = {"torch": build["version"], "torch_cuda": build["cuda"]}
    if build["hip"]:
        info["torch_hip"] = build["hip"]
    if gpus_found and (build["cuda"] or build["hip"]):
        info["nccl"] = _nccl_version(build["cuda"])
    for package in ("deepspeed", "bitsandbytes"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    info["deepspeed_ops"] = _deepspeed_prebuilt_ops()
    info["kernel"] = os.uname().release  # "...-microsoft-standard-WSL2" under Windows
    return info


def torch_build() -> dict:
    """torch's version and the CUDA (or ROCm) it was built for, from torch/version.py, which
    its build writes; imported only when that file cannot be read (heavy)."""
    fields = _constants_in("torch", "version.py", ("__version__", "cuda", "hip"))
    if not isinstance(fields.get("__version__"), str):
        import torch  # version.py missing or unreadable: ask torch itself

        fields = {"__version__": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip}
    return {"version": fields["__version__"], "cuda": fields.get("cuda"), "hip": fields.get("hip")}


def _constants_in(package: str, file: str, names: tuple[str, ...]) -> dict:
    """The literal values a file of an installed package assigns to `names` (`x = 1` or
    `x: T = 1`), read without importing the package; {} when it cannot be read."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / file
    found = {}
    try:
        for node in ast.parse(path.read_text()).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            name = getattr(target, "id", "")
            if name in names and getattr(node, "value", None) is not None:
                found[name] = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        return {}
    return found


def _nccl_version(cuda: str | None) -> str | None:
    """The NCCL torch loads: the nvidia-nccl package its wheel depends on, else (a build
    with NCCL inside) torch's own answer."""
    majors = [cuda.split(".")[0]] if cuda else []
    for major in dict.fromkeys([*majors, "13", "12", "11"]):
        try:
            return metadata.version(f"nvidia-nccl-cu{major}")
        except metadata.PackageNotFoundError:
            continue
    import torch  # heavy: a torch built with its own NCCL, on a machine with GPUs

    try:
        return ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception:  # a build without NCCL
        return None


def _deepspeed_prebuilt_ops() -> str | None:
    """Which DeepSpeed ops were compiled at install time, read from the file its installer
    writes (importing deepspeed itself takes seconds and logs to stderr). Ops that were not
    prebuilt are JIT-compiled on first use (the CPU comm op: ~30 s, once)."""
    ops = _constants_in("deepspeed", "git_version_info_installed.py", ("installed_ops",)).get("installed_ops")
    if not isinstance(ops, dict):
        return None
    built = sorted(name for name, ok in ops.items() if ok)
    return ", ".join(built) + " prebuilt" if built else "none prebuilt (JIT-compiled on first use)"


def filesystem_of(path: Path, mounts: list) -> str | None:
    """The type of the mount `path` lies on (psutil's partitions: the deepest mount point
    that holds it, the last one mounted where two share a point)."""
    best = None
    for mount in mounts:
        point = Path(mount.mountpoint)
        if (path == point or point in path.parents) and (best is None or len(point.parts) >= len(best[0].parts)):
            best = (point, mount.fstype)
    return best[1] if best else None


def disks(paths: list[str | Path]) -> tuple[Disk, ...]:
    """The free space and the mount type where each path is (or would be created)."""
    import psutil  # only when the host is read, as in probe()

    try:
        mounts = psutil.disk_partitions(all=True) if paths else []
    except OSError:  # no readable mount table (a locked-down container): types unknown
        mounts = []
    out = []
    for path in paths:
        existing = Path(path).resolve()
        while not existing.exists():
            existing = existing.parent
        out.append(Disk(str(path), round(shutil.disk_usage(existing).free / 2**30, 1), filesystem_of(existing, mounts)))
    return tuple(out)


def probe(paths: list[str | Path] = ()) -> Rig:
    """The machine this runs on. `paths` (data, output) get their free disk space read."""
    import psutil  # only when the host is read

    gpus, driver, unreachable = probe_gpus()
    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    return Rig(
        gpus=gpus,
        cpu=Cpu(
            model=_cpu_model(),
            cores=psutil.cpu_count(logical=False) or os.cpu_count(),
            threads=len(os.sched_getaffinity(0)),
        ),
        ram_gib=round(memory.total / 2**30, 2),
        ram_free_gib=round(memory.available / 2**30, 2),
        swap_gib=round(swap.total / 2**30, 2),
        shm_gib=round(shutil.disk_usage("/dev/shm").total / 2**30, 3) if Path("/dev/shm").is_dir() else None,
        disk=disks(paths),
        software={**driver, **software(gpus_found=bool(gpus))},
        unreachable_gpus=unreachable,
        source="probe",
    )
