"""Where the run reads and writes: checkpoints against the free space of the run's disk,
and data or runs on a mount that reads through a share or the network."""

from __future__ import annotations

from rigtrain.rig.budget import GIB
from rigtrain.rig.facts import Rig
from rigtrain.rig.plan_types import RigWarning


def checkpoint_disk_warning(rig: Rig, per_checkpoint: int, held: int, keep: int, saved: int = 0) -> RigWarning | None:
    """The run's checkpoints against the free space where it is written: the last disk the
    rig lists (the probe reads the data's, then the run folder's; `rigtrain rig` reads the
    folder it runs in). `held`: how many are on disk at once, `keep` and the one being saved
    (fewer in a short run); `saved`: how many a resumed run has there already, whose space
    is taken (a save needs room for one more at least). A save checks again, with the size
    of the last one."""
    if not rig.disk or per_checkpoint <= 0:
        return None
    disk, more = rig.disk[-1], max(1, held - saved) if saved else held
    need = per_checkpoint * more / GIB
    if need <= disk.free_gib:
        return None
    already = f", {saved} of them there already: {_size(need)} more" if saved else f": {_size(need)}"
    return RigWarning(
        "low_disk",
        None,
        f"the run's checkpoints take about {_size(per_checkpoint / GIB)} each, and up to {held} are on disk at "
        f"once (train.keep_ckpts={keep}, and the one being saved){already}, but {disk.path} has "
        f"{_size(disk.free_gib)} free; free some space, lower train.keep_ckpts, or give --out a folder on a "
        "larger disk (a save that finds no room stops the run, keeping the checkpoints before it)",
    )


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


# Mounts whose every read crosses to another machine or OS. 9p is how WSL2 shows Windows'
# drives (/mnt/c), many times slower than WSL's own ext4 disk (Microsoft's WSL docs: keep
# project files in the Linux filesystem); network filesystems send each read over the wire.
SHARED_MOUNTS = ("9p", "drvfs")
NETWORK_MOUNTS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "fuse.rclone")


def filesystem_warnings(rig: Rig) -> list[RigWarning]:
    """The data or the run on a mount that reads through a share or the network."""
    out = []
    for disk in rig.disk:
        kind = (disk.filesystem or "").lower()
        if kind in SHARED_MOUNTS and rig.wsl:
            where = f"a Windows drive ({kind}: WSL2 reads it through a file share, many times slower than its own disk)"
            advice = (
                "keep shards and runs in WSL's own filesystem, under ~ (`rigtrain data prepare "
                "/mnt/c/videos ~/shards`, `--out ~/runs/NAME`)"
            )
        elif kind in SHARED_MOUNTS:
            where = f"a {kind} share (a virtual machine's shared folder: every read crosses to the host)"
            advice = "keep shards and runs on the machine's own disk"
        elif kind in NETWORK_MOUNTS:
            where = f"a network filesystem ({kind}): shards there are read over the network every epoch"
            advice = "if `rigtrain data bench` shows the loader behind the step, copy them to a local disk"
        else:
            continue
        out.append(RigWarning("slow_filesystem", None, f"{disk.path} is on {where}; {advice}"))
    return out
