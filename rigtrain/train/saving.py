"""A running Trainer's checkpoints. Saving: only finite weights and optimizer states, only
when the disk has room, every rank's part on disk before the tag is marked complete, and a
full disk as one line (docs/training.md, "Checkpoints"). Resuming: the newest complete and
undamaged one, chosen by rank 0 for all. A mixin of the Trainer: it uses the Trainer's
engine, ranks, run folder and log."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from rigtrain.data.order import resume_batch
from rigtrain.errors import TrainingFault, UserError
from rigtrain.files import write_json
from rigtrain.train import checkpoints
from rigtrain.train.engine import apply_optimizer_config, deepspeed_config
from rigtrain.train.reshaping import UNIVERSAL_INFO, remove_conversions, universal_dir
from rigtrain.train.run_record import resume_command


def _disk_full(err: BaseException, folder: Path) -> bool:
    """An error while writing that means the disk (or quota) is full. torch.save does not
    say so: its zip writer fails with "basic_ios::clear: iostream error", then "unexpected
    pos", so with nothing errno-shaped in the chain the disk is asked directly."""
    chain, seen = err, 0
    while chain is not None and seen < 10:
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        chain, seen = chain.__context__ or chain.__cause__, seen + 1
    text = str(err)
    if "unexpected pos" in text or "iostream error" in text or "failed writing" in text:
        try:
            return shutil.disk_usage(folder).free < (64 << 20)
        except OSError:
            return False
    return False


# What a disk says when it turned read-only (ext4 after an error), failed, went away (a USB
# drive, an NFS server) or lost its permissions, or when the run's folder was deleted.
STORAGE_ERRNOS = (
    errno.EROFS,
    errno.EIO,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.ESTALE,
    errno.ENODEV,
    errno.ENXIO,
)


def folder_gone(run_dir: Path) -> str | None:
    """In words, when the run folder is no longer there: its config.json, which every run
    folder holds from its start, is gone (DeepSpeed's save would make the folders again)."""
    if not (Path(run_dir) / "config.json").is_file():
        return f"the run folder {run_dir} is gone (deleted, or its disk unmounted)"
    return None


def storage_failure(err: BaseException, run_dir: Path) -> str | None:
    """What went wrong with the run folder's storage, in words, when `err` came from it;
    None for any other error (a bug keeps its traceback)."""
    if not isinstance(err, (OSError, RuntimeError)):
        return None
    gone = folder_gone(run_dir)
    if gone is not None:
        return gone
    chain, seen = err, 0
    while chain is not None and seen < 10:
        if isinstance(chain, OSError) and chain.errno in STORAGE_ERRNOS:
            where = f" ({chain.filename})" if chain.filename else ""
            if chain.errno in (errno.ENOENT, errno.ENOTDIR):  # deleted under the run
                return f"a folder of the run disappeared while it was written{where}"
            return f"the disk refused a write{where}: {os.strerror(chain.errno)}"
        chain, seen = chain.__context__ or chain.__cause__, seen + 1
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if "does not exist" in text and "directory" in text.lower():  # torch.save's zip writer: no errno
        return f"a folder of the run disappeared while it was written ({text[:200]})"
    return None


class Checkpointing:
    def save_checkpoint(self) -> bool:
        """Save this step; False (nothing written) when the weights or optimizer states are
        no longer finite, since such a checkpoint could only be resumed into the same
        failure. A full disk is one line, before the save when the last checkpoint's size
        says it will not fit, and during it otherwise; the previous checkpoint stays whole."""
        if not self._states_finite():
            last = self._last_good()
            restart = " (it starts again at step 0)" if "no checkpoint" in last else ""
            self.diverged = (
                f"the weights or optimizer states are not finite at step {self.step}, so no checkpoint "
                f"was written; {last}; lower train.lr (now {self.config.train.lr:g}) and resume with "
                f"`{resume_command(self.run_dir, '--set', 'train.lr=...')}`{restart}"
            )
            return False
        tag = checkpoints.tag_for(self.step)
        tag_dir = self.ckpt_dir / tag
        gone = folder_gone(self.run_dir)
        if gone is not None:
            raise TrainingFault(f"saving step {self.step} failed: {gone}; its checkpoints went with it")
        self._check_disk_space(tag_dir)
        if self.is_main:  # a tag saved again (a resumed run) is incomplete until its new list is written
            (tag_dir / checkpoints.COMPLETE).unlink(missing_ok=True)
        try:
            # an empty universal_checkpoint_info: what DeepSpeed's converter asks of a checkpoint
            # before it can be resumed on another number of processes (reshaping.py)
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={UNIVERSAL_INFO: {}})
            checkpoints.save_rank_state(tag_dir, self.rank)
            torch.distributed.barrier()  # every rank's part is on disk before the tag counts
            gone = folder_gone(self.run_dir)  # again: it may have gone while DeepSpeed wrote
            if gone is not None:
                shutil.rmtree(tag_dir, ignore_errors=True)  # never a complete checkpoint of a vanished run
                raise TrainingFault(f"saving step {self.step} failed: {gone}; its checkpoints went with it")
            if self.is_main:
                write_json(
                    tag_dir / "trainer.json",
                    {
                        "step": self.step,
                        "micro_batches": self.micro_batches,  # each rank's, the data position
                        "counted_in": [self.world, self.config.train.micro_batch_size],  # (ranks, clips each)
                        UNIVERSAL_INFO: True,  # DeepSpeed's converter can take it (reshaping.py)
                        "config": self.config.to_dict(),
                    },
                )
                checkpoints.mark_complete(tag_dir, self.step)
                remove_conversions(self.run_dir)  # a checkpoint at this number of processes now
                removed = checkpoints.prune(self.ckpt_dir, self.config.train.keep_ckpts)
                self.log.say(f"checkpoint {tag_dir}" + (f" (removed {', '.join(removed)})" if removed else ""))
        except (OSError, RuntimeError) as err:
            if not _disk_full(err, self.ckpt_dir):
                trouble = storage_failure(err, self.run_dir)
                if trouble is None:
                    raise
                shutil.rmtree(tag_dir, ignore_errors=True)  # incomplete: never resumed
                kept = "its checkpoints went with it" if folder_gone(self.run_dir) else self._last_good()
                raise TrainingFault(
                    f"saving step {self.step} failed: {trouble}; {kept}; once the disk and the "
                    f"folder are back, resume with `{resume_command(self.run_dir)}`"
                ) from None
            shutil.rmtree(tag_dir, ignore_errors=True)  # incomplete: never resumed, and it holds space
            free = shutil.disk_usage(self.ckpt_dir).free
            raise TrainingFault(
                f"the disk is full: saving step {self.step} into {tag_dir} failed with {free:,} bytes "
                f"free; {self._last_good()}; free some space and resume with "
                f"`{resume_command(self.run_dir)}`"
            ) from None
        torch.distributed.barrier()
        self.saved_step = self.step
        return True

    def _states_finite(self) -> bool:
        """Every rank's weights (its partitions under ZeRO-3) and optimizer tensors (fp32
        master weights and moments) are finite; one read-back per save."""
        tensors = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        optimizer = self.engine.basic_optimizer
        tensors += [p for group in optimizer.param_groups for p in group["params"]]
        tensors += [
            v
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        ]
        bad = torch.zeros((), dtype=torch.int64, device=self.device)
        for t in tensors:
            if t.numel():
                bad += (~torch.isfinite(t)).any().to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(bad)
        return int(bad) == 0

    def _last_good(self) -> str:
        tags = checkpoints.complete_tags(self.ckpt_dir)
        return (
            f"the last good checkpoint is step {tags[-1][0]} ({self.ckpt_dir / tags[-1][1]})"
            if tags
            else "there is no checkpoint yet"
        )

    def _check_disk_space(self, tag_dir: Path) -> None:
        """Before a save: the newest checkpoint's size (plus a tenth and 16 MiB for
        metrics and logs) must fit in what the disk has free."""
        need = checkpoints.checkpoint_bytes(self.ckpt_dir)
        if not need:
            return  # the first save: its size is not known yet; a full disk is caught while saving
        need = int(need * 1.1) + (16 << 20)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.ckpt_dir).free
        if free < need:
            raise TrainingFault(
                f"not enough disk space to save step {self.step} into {tag_dir}: about {need:,} bytes "
                f"needed, {free:,} free; {self._last_good()}; free some space (or lower "
                f"train.keep_ckpts) and resume with `{resume_command(self.run_dir)}`"
            )

    # -- resuming ---------------------------------------------------------------------------
    def _resume_tag(self) -> str | None:
        """The newest complete checkpoint whose files match their checksums, chosen by rank 0
        (which says which damaged ones it skipped) for every rank."""
        choice, self.universal_from = [None], None
        if self.is_main:
            found = checkpoints.newest_good(self.ckpt_dir, warn=lambda line: print(f"[rigtrain] {line}", flush=True))
            if found is None and checkpoints.damaged_only(self.ckpt_dir):
                choice = ["damaged"]
            else:
                choice = [found[1] if found else None]
        if self.world > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        if choice[0] == "damaged":
            raise UserError(
                f"--resume: every checkpoint in {self.ckpt_dir} is damaged (see above); restore the files "
                "or start a new run with another --out"
            )
        if choice[0] is not None and self.config.train.zero_stage > 0:
            self._find_universal(choice[0])
        return choice[0]

    def _find_universal(self, tag: str) -> None:
        """At ZeRO-1 to 3, a checkpoint saved by another number of processes loads only from
        the universal checkpoint the launcher made of it (reshaping.py)."""
        self._load_meta(tag)
        if self.position_counted_in[0] != self.world:
            self.universal_from = universal_dir(self.run_dir, tag)
            if not (self.universal_from / "done.json").is_file():
                raise UserError(
                    f"--resume: checkpoint {tag} was saved by {self.position_counted_in[0]} process(es), this run "
                    f"has {self.world}, and {self.universal_from} (DeepSpeed's universal checkpoint of it) is not "
                    f"there; start it with `{resume_command(self.run_dir)}`, which converts it"
                )

    def _engine_config(self) -> dict:
        """DeepSpeed's config for this run, loading the universal checkpoint where one is needed."""
        config = deepspeed_config(self.config, self.plan["precision"], self.world)
        if self.universal_from is not None:
            config["checkpoint"] = {"load_universal": True}
        return config

    def _load_meta(self, tag: str) -> tuple[int, int]:
        meta = json.loads((self.ckpt_dir / tag / "trainer.json").read_text())
        counted = meta.get("counted_in")
        if not (isinstance(counted, list) and len(counted) == 2 and all(type(v) is int and v > 0 for v in counted)):
            # written before "counted_in": the checkpoint's own micro-batch size, and the
            # processes that saved it
            counted = (checkpoints.saved_ranks(self.ckpt_dir / tag), meta["config"]["train"]["micro_batch_size"])
        self.position_counted_in = tuple(counted)
        return meta["step"], meta["micro_batches"]

    def _data_position(self, clips: int) -> int:
        """The micro-batch this rank's loader starts at: the checkpoint's data position,
        converted when train.micro_batch_size or the number of processes changed on --resume
        (data/order.py, resume_batch), where its count would start elsewhere in the epoch."""
        before = getattr(self, "position_counted_in", None)
        now = (self.world, self.config.train.micro_batch_size)
        if before is None or before == now:
            return self.micro_batches
        converted = resume_batch(self.micro_batches, clips, before=before, now=now)
        if self.is_main:
            print(
                f"[rigtrain] data position: {self.micro_batches} micro-batch(es) of {before[1]} on {before[0]} "
                f"process(es) read, now {converted} of {now[1]} on {now[0]}: the same point of the same epoch",
                flush=True,
            )
        self.micro_batches = converted
        return converted

    def _load_checkpoint(self, tag: str) -> None:
        load_from = self.ckpt_dir if self.universal_from is None else self.universal_from.parent
        load_path, _ = self.engine.load_checkpoint(str(load_from), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.ckpt_dir / tag}")
        checkpoints.load_rank_state(self.ckpt_dir / tag, self.rank, self.config.train.seed)
        self.skipped.resumed()  # the run's count of skipped updates goes on from the checkpoint's
        apply_optimizer_config(self.config, self.scheduler)
