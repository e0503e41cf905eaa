"""A resumed run on another number of processes than its checkpoint was saved by (a GPU
taken out of the rig, or one added) at ZeRO-1 to 3, where each process saved its own part
of the optimizer and DeepSpeed loads the parts only into as many. DeepSpeed's way across
is its "universal" checkpoint: `deepspeed.checkpoint.ds_to_universal` merges the parts
into one folder per parameter (fp32 weights, Adam's moments, the step), which any number
of processes loads (`checkpoint.load_universal`). The launcher converts the checkpoint the
run resumes from into RUN_DIR/universal/TAG before any process starts; the processes load
from there; the run's first save at the new count makes it needless, and it is removed.
ZeRO-0 keeps the whole optimizer in one file every process reads and needs none of this
(resuming.fit_to_processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rigtrain.errors import UserError
from rigtrain.files import sync_folder, sync_tree, write_json
from rigtrain.terminal import terminate_with_parent

UNIVERSAL = "universal"  # RUN_DIR/universal/TAG: the converted checkpoint
# What ds_to_universal requires in a checkpoint's client state; Megatron-DeepSpeed puts its
# tensor-parallel layout there, and a model without tensor parallelism has none to give.
UNIVERSAL_INFO = "universal_checkpoint_info"


def universal_dir(run_dir: Path, tag: str) -> Path:
    return Path(run_dir) / UNIVERSAL / tag


def reshape_problem(train, meta: dict) -> str | None:
    """Why a checkpoint (its trainer.json, `meta`) of a run with these train.* settings (a
    TrainConfig) cannot be loaded by another number of processes, or None."""
    if train.optimizer != "adamw":
        return f"its optimizer is {train.optimizer}, whose 8-bit states DeepSpeed's universal checkpoint does not carry"
    if train.offload_optimizer != "none":
        return "its optimizer states were offloaded to the CPU, which DeepSpeed's universal checkpoint does not take"
    if not meta.get(UNIVERSAL_INFO):
        return (
            "its newest checkpoint was saved by a rigtrain from before 2026-12-06, which DeepSpeed cannot "
            "convert; resume once on the same count, and the checkpoints saved from then on can move"
        )
    return None


def convert_for_processes(run_dir: Path, tag: str, say) -> Path:
    """RUN_DIR/universal/TAG made from RUN_DIR/checkpoints/TAG (kept if already made): written
    under a temporary name and renamed when whole, so an interrupted conversion is made
    again, never loaded half-made. DeepSpeed's converter runs in a process of its own, its
    output kept in RUN_DIR/universal/convert.log."""
    out = universal_dir(Path(run_dir).resolve(), tag)  # absolute: the converter runs in another folder
    source = Path(run_dir).resolve() / "checkpoints" / tag
    made_from = (source / "complete.json").read_text()  # the checkpoint's files and checksums
    try:
        if json.loads((out / "done.json").read_text())["complete"] == made_from:
            return out
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not made, or made from another save of this step: made again
    shutil.rmtree(out, ignore_errors=True)
    need = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < need * 1.1:
        raise UserError(
            f"--resume: converting checkpoint {tag} for another number of processes needs about {need:,} bytes "
            f"in {out.parent}, and {free:,} are free; free some space and run the same command again"
        )
    for stale in out.parent.glob(f"{tag}.partial-*"):  # a conversion interrupted before
        shutil.rmtree(stale, ignore_errors=True)
    # a name of its own: a converter left over from a killed launcher never writes into it
    partial = out.with_name(f"{tag}.partial-{os.getpid()}")
    log = out.parent / "convert.log"
    say(f"converting checkpoint {tag} into DeepSpeed's universal layout ({out}), which any number of processes loads")
    started = time.monotonic()
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source)]
    command += ["--output_folder", str(partial), "--num_extract_workers", workers, "--num_merge_workers", workers]
    with log.open("w") as output:
        # it ends with the launcher, however the launcher ends
        done = subprocess.run(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=out.parent, preexec_fn=terminate_with_parent
        )
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(
            f"--resume: DeepSpeed could not convert checkpoint {tag} for another number of processes (its output "
            f"is in {log}); resume on the number it was saved by, or start a new run from its weights: "
            f"rigtrain train --init-from {run_dir} --out NEW_DIR"
        )
    sync_tree(partial)  # on the disk before it is named whole: a power cut leaves it partial
    seconds = time.monotonic() - started
    write_json(partial / "done.json", {"from": str(source), "complete": made_from, "seconds": seconds}, durable=True)
    partial.rename(out)
    sync_folder(out.parent)
    say(f"converted in {seconds:.1f} s")
    return out


def remove_conversions(run_dir: Path) -> None:
    """After a save, any conversion is needless: the run resumes from that save (and one
    made for a resume that then failed, or was not needed after all, goes too)."""
    folder = Path(run_dir) / UNIVERSAL
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
