"""NVIDIA cards in the machine that the driver cannot reach. NVML failing to start usually
means a machine without NVIDIA's driver, a CPU machine; but when the library is there and
says the driver is in a bad state, and the PCI bus holds NVIDIA cards, the GPUs exist and a
run would go to the CPU without them, hundreds of times slower, for as long as it is left.
The usual causes on a home machine: the driver was upgraded (unattended upgrades) and the
old one is still loaded until a restart; a new kernel without the driver's module built for
it, or Secure Boot refusing an unsigned module; a user outside the group that owns
/dev/nvidia*. Under WSL2 the cards are Windows', shared through its NVIDIA driver's libraries
in /usr/lib/wsl/lib, and the usual cause is a Linux driver installed inside WSL over them."""

from __future__ import annotations

from pathlib import Path

from rigtrain.rig.facts import Rig
from rigtrain.rig.plan_types import RigWarning
from rigtrain.wsl import wsl_kernel

# NVML's errors that say the driver, not the machine, is missing (pynvml's class names, as
# the probe records them in software.nvml), and what fixes each
DRIVER_STATE_ERRORS = {
    "NVMLError_LibRmVersionMismatch": (
        "the driver's library is newer than the driver still loaded (it was upgraded): restart the machine"
    ),
    "NVMLError_DriverNotLoaded": (
        "the driver's kernel module is not loaded (a new kernel it was not built for, or Secure Boot refusing "
        "it; `sudo dmesg | grep -i nvidia` says which): reinstall the driver for this kernel, or enroll its "
        "signing key, and restart"
    ),
    "NVMLError_NoPermission": (
        "this user may not open /dev/nvidia*: add it to the group that owns them (`ls -l /dev/nvidia*`) and log "
        "in again"
    ),
    "NVMLError_GpuIsLost": (
        "a GPU fell off the bus (power, a riser, heat; `sudo dmesg | grep -i xid` says which): power the machine "
        "off and on"
    ),
}
# Under WSL2 Windows' NVIDIA driver puts its libraries (libcuda, NVML, nvidia-smi) in this
# folder; WSL lists it for the loader in /etc/ld.so.conf.d/ld.wsl.conf. NVIDIA's CUDA on WSL
# guide: install no Linux driver inside WSL, whose libraries would hide these.
WSL_DRIVER_LIBRARIES = Path("/usr/lib/wsl/lib")
WSL_ADVICE = {
    "NVMLError_LibraryNotFound": (
        "the loader does not look in /usr/lib/wsl/lib: run `sudo ldconfig` (WSL lists the folder in "
        "/etc/ld.so.conf.d/ld.wsl.conf), or add it to LD_LIBRARY_PATH"
    ),
}
WSL_OTHERWISE = (
    "a Linux NVIDIA driver installed inside WSL hides the Windows driver's libraries (NVIDIA's CUDA on WSL "
    "guide: install none there; the CUDA toolkit alone is fine): remove it (`dpkg -l | grep -i nvidia` lists "
    "it), or update the NVIDIA driver on Windows, then run `wsl --shutdown` from Windows"
)
NVIDIA_VENDOR = "0x10de"
DISPLAY_CLASSES = ("0x0300", "0x0302")  # VGA-compatible and 3D controllers (data-centre cards are 3D)


def nvidia_cards_on_bus(devices: Path = Path("/sys/bus/pci/devices")) -> int:
    """NVIDIA display and 3D controllers the PCI bus lists, whatever their driver's state."""
    count = 0
    try:
        for device in devices.iterdir():
            try:
                vendor = (device / "vendor").read_text().strip()
                kind = (device / "class").read_text().strip()[:6]
            except OSError:
                continue
            count += vendor == NVIDIA_VENDOR and kind in DISPLAY_CLASSES
    except OSError:  # no sysfs (WSL2 shows its GPUs another way; NVML works there)
        return 0
    return count


def windows_driver_shared(release: str | None = None, libraries: Path | None = None) -> bool:
    """Linux under WSL2 (its kernel's release names Microsoft's build) with Windows' NVIDIA
    driver sharing its libraries: the machine has NVIDIA GPUs, whatever NVML says here."""
    return wsl_kernel(release) and ((libraries or WSL_DRIVER_LIBRARIES) / "libnvidia-ml.so.1").exists()


def unreachable_cards(error: str) -> int | None:
    """After NVML failed to start with `error`: how many NVIDIA cards it leaves out of reach
    (at least one under WSL2, whose GPUs no PCI bus lists), or None for a CPU machine."""
    if error.startswith("NVMLError") and windows_driver_shared():  # not a missing nvidia-ml-py
        return 1
    return (nvidia_cards_on_bus() or None) if error in DRIVER_STATE_ERRORS else None


def nvml_error(rig: Rig) -> str | None:
    """The NVML error the probe recorded ("not available (NVMLError_...)"), if any."""
    said = str((rig.software or {}).get("nvml") or "")
    return said[said.find("(") + 1 : said.rfind(")")] if "(" in said else None


def why_unreachable(rig: Rig) -> str | None:
    """Why NVIDIA cards this machine holds are out of reach, with the fix; None if none are."""
    error = nvml_error(rig)
    if rig.gpus or not rig.unreachable_gpus or not error:
        return None
    name = error.removeprefix("NVMLError_")
    if rig.wsl:
        return (
            f"Windows' NVIDIA driver shares its GPU(s) with WSL2 ({WSL_DRIVER_LIBRARIES}/libnvidia-ml.so.1 is "
            f"there) but NVML cannot start here ({name}): {WSL_ADVICE.get(error, WSL_OTHERWISE)}; then "
            "`nvidia-smi` lists them"
        )
    if error not in DRIVER_STATE_ERRORS:
        return None
    return (
        f"{rig.unreachable_gpus} NVIDIA GPU(s) are on the PCI bus but the driver cannot be reached "
        f"(NVML: {name}): {DRIVER_STATE_ERRORS[error]}; then `nvidia-smi` lists them"
    )


def driver_warning(rig: Rig) -> list[RigWarning]:
    why = why_unreachable(rig)
    return [RigWarning("driver_unreachable", None, why + "; until then the plan is the CPU's")] if why else []
