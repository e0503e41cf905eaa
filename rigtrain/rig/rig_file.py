"""Reading a rig file (docs/planner.md, "The rig file"): JSON in the shape `rigtrain rig
--json` prints under "rig". Fields a probe cannot read are optional; an unknown field, a
wrong type or an impossible value is a RigFileError that names the field (exit code 2)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from rigtrain.errors import UserError
from rigtrain.rig.facts import (
    ENVIRONMENT_FIELDS,
    P2P_CHECK_RESULTS,
    PCIE_GENERATIONS,
    PCIE_WIDTHS,
    Cpu,
    Disk,
    Gpu,
    GpuProcess,
    Pcie,
    Power,
    Rig,
)


class RigFileError(UserError):
    pass


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
    if "processes" in value:
        out["processes"] = _processes(where, f"{name}.processes", value["processes"])
    return Gpu(**out)


def _processes(where: str, name: str, listed) -> tuple[GpuProcess, ...]:
    if not isinstance(listed, list):
        raise _fail(where, name, 'must be a list of {"pid": N, "name": "...", "used_gib": X}')
    out = []
    for k, entry in enumerate(listed):
        entry = _object(where, f"{name}[{k}]", entry, GpuProcess)
        if "pid" not in entry:
            raise _fail(where, f"{name}[{k}].pid", "is missing")
        if "name" in entry and not isinstance(entry["name"], str):
            raise _fail(where, f"{name}[{k}].name", "must be the process's command line as text")
        used = entry.get("used_gib")
        out.append(
            GpuProcess(
                pid=_number(where, f"{name}[{k}].pid", entry["pid"], minimum=0, integer=True),
                name=entry.get("name"),
                used_gib=None if used is None else _number(where, f"{name}[{k}].used_gib", used, minimum=0),
            )
        )
    return tuple(out)


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
