"""Which build of torch starts on this driver and has kernels for these cards, and what to
install when the one here does not: facts of NVIDIA's toolkits and of the builds
pytorch.org ships. `rigtrain rig` warns with them (rig/warnings.py) and `rigtrain train`
refuses to start with them (train/planning.py), each with the command that installs a
build that works. Pure: no torch, no NVML."""

from __future__ import annotations

PYTORCH_INDEX = "https://download.pytorch.org/whl/"


def driver_runs(driver_cuda: str | None, build_cuda: str | None) -> bool | None:
    """Whether a driver that runs CUDA `driver_cuda` (NVML's figure, nvidia-smi's "CUDA
    Version") starts a build for `build_cuda`. CUDA's minor-version compatibility lets a
    12.x driver run any 12.x build; a newer major needs a newer driver. None: not known."""
    try:
        return int(str(driver_cuda).split(".")[0]) >= int(str(build_cuda).split(".")[0])
    except ValueError:
        return None


# The oldest build pytorch.org keeps for each CUDA major, which any driver of that major
# runs: torch 2.10 to 2.13 all ship cu126 (beside cu130 and cu132; cu128 until 2.11; none
# for CUDA 11 since 2.8), per pytorch.org's wheel index and RELEASE.md's support matrix.
# The driver's own minor (cu122 for a 12.2 driver) has no build for a current torch.
OLDEST_BUILD_FOR_CUDA = {12: "cu126", 13: "cu130"}

# Compute capabilities that a build's toolkit cannot compile for, so no torch built with
# it carries their kernels. CUDA 13.0 removed offline compilation for Maxwell, Pascal and
# Volta (below 7.5; NVIDIA's CUDA 13.0 release notes), so PyPI's torch (a CUDA 13 build
# since 2.11) has nothing for a GTX 1080 Ti, a Tesla P40 or a V100; pytorch.org's cu126
# build is the one that keeps them (5.0, 6.0, 7.0 and on: RELEASE.md). Blackwell (10.x,
# 12.x: B200, RTX 50 series) arrived with CUDA 12.8, and the cu126 build has neither its
# kernels nor PTX to compile for it.
FIRST_CAPABILITY_OF_CUDA_13 = (7, 5)
FIRST_BLACKWELL_MAJOR = 10
FIRST_CUDA_FOR_BLACKWELL = (12, 8)
OLDEST_DRIVER_FOR_CUDA_13 = "580"  # the driver series that runs CUDA 13.0 (and still Pascal)


def _version(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = (str(text).split(".") + ["0"])[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def kernels_in(arch_list: list[str] | tuple[str, ...], capability: tuple[int, int]) -> bool:
    """Whether a torch whose build holds `arch_list` (torch.cuda.get_arch_list(): sm_XY for
    machine code, compute_XY for PTX) runs on a card of `capability`: machine code for the
    same major and an equal or lower minor (sm_80 runs on an 8.6 or 8.9 card), or PTX of an
    equal or lower capability, which the driver compiles for the card at the first use."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == major and built[1] <= minor:
            return True
        if kind == "compute" and built <= (major, minor):
            return True
    return False


def build_has_kernels(build_cuda: str | None, capability: tuple[int, int]) -> bool:
    """What the build's CUDA alone says (no torch to ask for its list): False where that
    toolkit cannot compile for the card at all, True otherwise."""
    build = _version(build_cuda)
    if build is None:
        return True
    if build[0] >= 13 and tuple(capability) < FIRST_CAPABILITY_OF_CUDA_13:
        return False
    return not (build < FIRST_CUDA_FOR_BLACKWELL and capability[0] >= FIRST_BLACKWELL_MAJOR)


def _named(cards: list[tuple[int, str, tuple[int, int]]]) -> str:
    return ", ".join(f"GPU {i} ({name}, compute capability {c[0]}.{c[1]})" for i, name, c in cards)


def build_for_cards(
    lacking: list[tuple[int, str, tuple[int, int]]],
    others: list[tuple[int, str, tuple[int, int]]],
    driver_cuda: str | None,
    torch_version: str,
) -> str:
    """What to do when the installed torch has no kernels for the cards in `lacking` (index,
    name, compute capability); `others` are the run's cards it does run on."""
    release = torch_version.split("+")[0]
    old = [c for c in lacking + others if tuple(c[2]) < FIRST_CAPABILITY_OF_CUDA_13]
    new = [c for c in lacking + others if c[2][0] >= FIRST_BLACKWELL_MAJOR]
    rest = f", or train on the others: `--set rig.gpus={','.join(str(c[0]) for c in others)}`" if others else ""
    if old and new:
        return (
            f"no build of torch {release} runs both {_named(old[:1])} and {_named(new[:1])} (CUDA 13 has no "
            f"kernels for the first, CUDA 12.6 none for the second): train on one kind with `--set rig.gpus=...`"
        )
    if any(c[2] < (5, 0) for c in lacking):
        return f"torch {release} has no build for compute capability below 5.0: train on other cards{rest}"
    if old:
        return (
            f"install torch's build for CUDA 12.6, the one that keeps Maxwell, Pascal and Volta: "
            f"`TORCH_INDEX_URL={PYTORCH_INDEX}cu126 bash setup/install.sh`{rest}"
        )
    if new:
        driver = _version(driver_cuda)
        first = ""
        if driver is not None and driver[0] < 13:
            series = OLDEST_DRIVER_FOR_CUDA_13
            first = f"update the NVIDIA driver (it runs CUDA {driver_cuda}) to the {series} series or later, then "
        install = f"`TORCH_INDEX_URL={PYTORCH_INDEX}cu130 bash setup/install.sh`"
        return f"{first}install torch's build for CUDA 13.0: {install}{rest}"
    return (
        f"install a build of torch {release} with kernels for compute capability "
        f"{lacking[0][2][0]}.{lacking[0][2][1]} (pytorch.org's install page lists them){rest}"
    )


def torch_for_driver(driver_cuda: str, torch_version: str, capabilities: tuple[tuple[int, int], ...] = ()) -> str:
    """What to do about a torch built for a newer CUDA than the driver runs, for cards of
    `capabilities`: the build for the driver's CUDA major where that has their kernels."""
    major = int(driver_cuda.split(".")[0])
    build = OLDEST_BUILD_FOR_CUDA.get(major)
    if build is None:
        return (
            f"update the NVIDIA driver: torch {torch_version.split('+')[0]} has no build for CUDA {major}.x "
            "(a driver of the 525 series or later runs CUDA 12)"
        )
    build_cuda = f"{build[2:-1]}.{build[-1]}"
    if not all(build_has_kernels(build_cuda, c) for c in capabilities):
        return (
            f"update the NVIDIA driver to the {OLDEST_DRIVER_FOR_CUDA_13} series or later: torch's build for "
            f"CUDA {major}.x ({build}) has no kernels for these cards"
        )
    return (
        f"update the NVIDIA driver, or install torch's build for CUDA {major}.x, which this driver runs: "
        f"`TORCH_INDEX_URL={PYTORCH_INDEX}{build} bash setup/install.sh`"
    )
