"""The machine as facts: what a probe reads, or what a rig file describes (docs/planner.md, "The rig file").

A rig file is JSON in the shape `rigtrain rig --json` prints under "rig". Fields a probe
cannot read are optional; an unknown field, a wrong type or an impossible value is a
RigFileError that names the field (exit code 2)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rigtrain.errors import UserError


class RigFileError(UserError):
    pass


# What a PCIe link can train to (the spec's link widths; generations to 7.0, 2025)
PCIE_GENERATIONS = (1, 2, 3, 4, 5, 6, 7)
PCIE_WIDTHS = (1, 2, 4, 8, 12, 16, 32)


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
        return "microsoft" in str((self.software or {}).get("kernel") or "").lower()

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


# -- reading and checking ------------------------------------------------------------------


def _fail(where: str, field_name: str, what: str) -> RigFileError:
    return RigFileError(f"{where}: {field_name or 'the top level'} {what}")


def _number(
    where: str, name: str, value, *, minimum: float | None = None, integer: bool = False, above: float | None = None
):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise _fail(where, name, f"must be {'a whole number' if integer else 'a number'}, not {json.dumps(value)}")
    if not math.isfinite(value):  # JSON's 1e999, or Python's json reading Infinity and NaN
        raise _fail(where, name, f"must be a finite number, not {value}")
    if minimum is not None and value < minimum:
        raise _fail(where, name, f"must be at least {minimum:g}, not {value}")
    if above is not None and value <= above:
        raise _fail(where, name, f"must be more than {above:g}, not {value}")
    return int(value) if integer else float(value)


def _object(where: str, name: str, value, cls) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, name, f"must be an object with {', '.join(f.name for f in fields(cls))}")
    known = {f.name for f in fields(cls)} - set(ENVIRONMENT_FIELDS)
    for key in value:
        if key not in known:
            raise _fail(
                where,
                f"{name}.{key}" if name else key,
                f"is not a rig field; known fields here: {', '.join(sorted(known))}",
            )
    # null is "not known", as the probe leaves what NVML cannot say (PCIe, power and P2P
    # under WSL2, for one): the same as leaving the field out
    return {key: item for key, item in value.items() if item is not None}


def _pcie(where: str, name: str, value) -> Pcie:
    value = _object(where, name, value, Pcie)
    for key in ("gen", "width"):
        if key not in value:
            raise _fail(where, f"{name}.{key}", "is missing (e.g. gen 4, width 16)")
    out = {}
    for key in ("gen", "width", "max_gen", "max_width"):
        if key in value:
            out[key] = _number(where, f"{name}.{key}", value[key], minimum=1, integer=True)
    for key in ("rx_mb_s", "tx_mb_s"):
        if key in value:
            out[key] = _number(where, f"{name}.{key}", value[key], minimum=0)
    for key in ("gen", "max_gen"):
        if key in out and out[key] not in PCIE_GENERATIONS:
            raise _fail(
                where, f"{name}.{key}", f"must be a PCIe generation, 1 to {PCIE_GENERATIONS[-1]}, not {out[key]}"
            )
    for key in ("width", "max_width"):
        if key in out and out[key] not in PCIE_WIDTHS:
            raise _fail(
                where, f"{name}.{key}", f"must be a lane count ({', '.join(map(str, PCIE_WIDTHS))}), not {out[key]}"
            )
    pcie = Pcie(**out)
    if pcie.max_width is not None and pcie.width > pcie.max_width:
        raise _fail(where, f"{name}.width", f"({pcie.width}) is more than max_width ({pcie.max_width})")
    if pcie.max_gen is not None and pcie.gen > pcie.max_gen:
        raise _fail(where, f"{name}.gen", f"({pcie.gen}) is more than max_gen ({pcie.max_gen})")
    return pcie


def _gpu(where: str, index: int, value, count: int) -> Gpu:
    name = f"gpus[{index}]"
    value = _object(where, name, value, Gpu)
    for key in ("name", "memory_gib", "compute_capability"):
        if key not in value:
            raise _fail(where, f"{name}.{key}", "is missing")
    if not isinstance(value["name"], str) or not value["name"]:
        raise _fail(where, f"{name}.name", 'must be the GPU\'s name, e.g. "NVIDIA GeForce RTX 3090"')
    out: dict = {
        "name": value["name"],
        "memory_gib": _number(where, f"{name}.memory_gib", value["memory_gib"], above=0),
    }
    cc = value["compute_capability"]
    if not (isinstance(cc, list) and len(cc) == 2 and all(isinstance(c, int) and c >= 0 for c in cc) and cc[0] >= 1):
        raise _fail(where, f"{name}.compute_capability", f"must be [major, minor], e.g. [8, 6], not {json.dumps(cc)}")
    out["compute_capability"] = (cc[0], cc[1])
    if "memory_free_gib" in value:
        out["memory_free_gib"] = _number(where, f"{name}.memory_free_gib", value["memory_free_gib"], minimum=0)
        if out["memory_free_gib"] > out["memory_gib"]:
            raise _fail(where, f"{name}.memory_free_gib", "is more than memory_gib")
    if "pcie" in value:
        out["pcie"] = _pcie(where, f"{name}.pcie", value["pcie"])
    if "power" in value:
        power = _object(where, f"{name}.power", value["power"], Power)
        out["power"] = Power(**{k: _number(where, f"{name}.power.{k}", v, minimum=0) for k, v in power.items()})
    for key in ("temperature_c", "utilization_pct"):
        if key in value:
            out[key] = _number(where, f"{name}.{key}", value[key], minimum=0)
    if "clocks_mhz" in value:
        out["clocks_mhz"] = _object(where, f"{name}.clocks_mhz", value["clocks_mhz"], _Clocks)
    if "throttle_reasons" in value:
        reasons = value["throttle_reasons"]
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise _fail(where, f"{name}.throttle_reasons", "must be a list of reason names")
        out["throttle_reasons"] = tuple(reasons)
    if "uuid" in value:
        if not isinstance(value["uuid"], str) or not value["uuid"].startswith("GPU-"):
            raise _fail(where, f"{name}.uuid", 'must be the GPU\'s UUID as nvidia-smi -L prints it, "GPU-..."')
        out["uuid"] = value["uuid"]
    if "display_active" in value:
        if not isinstance(value["display_active"], bool):
            raise _fail(where, f"{name}.display_active", "must be true or false: whether a desktop draws on this GPU")
        out["display_active"] = value["display_active"]
    for key in ("p2p", "nvlink"):
        if key in value:
            row = value[key]
            if not isinstance(row, list) or len(row) != count or not all(isinstance(b, bool) for b in row):
                raise _fail(where, f"{name}.{key}", f"must be a row of {count} true/false values, one per GPU")
            out[key] = tuple(row)
    if "p2p_check" in value:
        out["p2p_check"] = _p2p_check_row(where, f"{name}.p2p_check", value["p2p_check"], count)
    return Gpu(**out)


P2P_CHECK_RESULTS = ("ok", "slow", "wrong_data", "hung", "unavailable", "failed")  # rig/p2p_check.py's
P2P_BROKEN = ("slow", "wrong_data", "hung")  # offered, but unsafe or harmful: NCCL is kept off it


def _p2p_check_row(where: str, name: str, row, count: int) -> tuple:
    if not isinstance(row, list) or len(row) != count:
        raise _fail(where, name, f"must be a row of {count} entries, one per GPU (null where not checked)")
    out = []
    for j, entry in enumerate(row):
        if entry is None:
            out.append(None)
            continue
        if not isinstance(entry, dict) or entry.get("result") not in P2P_CHECK_RESULTS:
            raise _fail(
                where, f"{name}[{j}]", f'must be null or {{"result": one of {", ".join(P2P_CHECK_RESULTS)}, ...}}'
            )
        for key in entry:
            if key not in ("result", "gb_s", "host_gb_s"):
                raise _fail(
                    where, f"{name}[{j}].{key}", "is not a rig field; known fields here: gb_s, host_gb_s, result"
                )
        rates = {
            k: _number(where, f"{name}[{j}].{k}", v, minimum=0)
            for k, v in entry.items()
            if k != "result" and v is not None
        }
        out.append({"result": entry["result"], **rates})
    return tuple(out)


@dataclass(frozen=True)
class _Clocks:  # the fields clocks_mhz may hold
    sm: float = 0
    memory: float = 0
    sm_max: float = 0
    memory_max: float = 0


def rig_from_dict(data, where: str = "rig") -> Rig:
    data = _object(where, "", data, Rig)
    gpus_in = data.get("gpus", [])
    if not isinstance(gpus_in, list):
        raise _fail(where, "gpus", "must be a list (empty for a CPU-only machine)")
    gpus = tuple(_gpu(where, i, g, len(gpus_in)) for i, g in enumerate(gpus_in))
    out: dict = {"gpus": gpus, "source": where}
    if "cpu" in data:
        cpu = _object(where, "cpu", data["cpu"], Cpu)
        out["cpu"] = Cpu(
            model=cpu.get("model"),
            **{
                k: _number(where, f"cpu.{k}", cpu[k], minimum=1, integer=True) for k in ("cores", "threads") if k in cpu
            },
            **({"tdp_w": _number(where, "cpu.tdp_w", cpu["tdp_w"], minimum=0)} if "tdp_w" in cpu else {}),
        )
        if "cores" in cpu and "threads" in cpu and out["cpu"].threads < out["cpu"].cores:
            raise _fail(where, "cpu.threads", f"({cpu['threads']}) is fewer than cpu.cores ({cpu['cores']})")
    for key in ("ram_gib", "ram_free_gib", "swap_gib", "shm_gib"):
        if key in data:
            # a machine with no RAM at all cannot have run the probe
            out[key] = _number(where, key, data[key], **({"above": 0} if key == "ram_gib" else {"minimum": 0}))
    if out.get("ram_free_gib", 0) > out.get("ram_gib", math.inf):
        raise _fail(where, "ram_free_gib", f"({out['ram_free_gib']:g}) is more than ram_gib ({out['ram_gib']:g})")
    if "psu_w" in data:
        out["psu_w"] = _number(where, "psu_w", data["psu_w"], above=0)
    if "unreachable_gpus" in data:
        out["unreachable_gpus"] = _number(where, "unreachable_gpus", data["unreachable_gpus"], minimum=0, integer=True)
    if "disk" in data:
        disks = data["disk"] if isinstance(data["disk"], list) else [data["disk"]]
        parsed = []
        for disk in disks:
            disk = _object(where, "disk", disk, Disk)
            if not isinstance(disk.get("path"), str) or "free_gib" not in disk:
                raise _fail(where, "disk", "needs a path and free_gib")
            filesystem = disk.get("filesystem")
            if filesystem is not None and not isinstance(filesystem, str):
                raise _fail(
                    where, "disk.filesystem", f'must be a mount type as text, e.g. "ext4", not {json.dumps(filesystem)}'
                )
            parsed.append(Disk(disk["path"], _number(where, "disk.free_gib", disk["free_gib"], minimum=0), filesystem))
        out["disk"] = tuple(parsed)
    if "software" in data:
        if not isinstance(data["software"], dict):
            raise _fail(where, "software", "must be an object")
        for key, version in data["software"].items():  # as the probe writes them: "2.13.0+cu130", "13.0"
            if version is not None and not isinstance(version, str):
                raise _fail(
                    where, f"software.{key}", f'must be a version as text, e.g. "13.0", not {json.dumps(version)}'
                )
        out["software"] = data["software"]
    return Rig(**out)


def read_rig_file(path: str | Path) -> Rig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RigFileError(
            f"--rig {path}: no such file; save one with `rigtrain rig --json` or write one as in docs/planner.md"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RigFileError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and "rig" in data and "plan" in data:
        data = data["rig"]  # a whole `rigtrain rig --json` output: its rig part
    return rig_from_dict(data, str(path))
