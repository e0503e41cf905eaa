"""The training process: one per GPU (or per `train.nproc` on a CPU), started by the launcher
with RANK/WORLD_SIZE in its environment. It reads everything from RUN_DIR/config.json.

    Trainer(run_dir)  -> distributed init, model, DeepSpeed engine, loader, resume
    .fit()            -> train_step() until train.steps, logging and checkpointing
    .close()          -> flush logs, leave the process group (always called)
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rigtrain.config import RunConfig, build_config
from rigtrain.data.dataset import ShardDataset, make_loader, open_dataset
from rigtrain.data.split import split_clips
from rigtrain.evaluate import Features, evaluate, extract_features, flat_metrics, format_result
from rigtrain.evaluate.evaluation import spread
from rigtrain.profile.recorder import LoaderTimeline, StepProfiler, span
from rigtrain.profile.telemetry import TelemetrySampler, physical_gpu_index
from rigtrain.model import build_model, count_parameters
from rigtrain.rig.budget import BUCKET_ELEMENTS
from rigtrain.errors import TrainingFault, UserError
from rigtrain.train import checkpoints
from rigtrain.train.metrics import MetricsLog, write_json

def deepspeed_config(config: RunConfig, precision: str, world_size: int) -> dict:
    t = config.train
    # Bucket sizes the planner counts (rig.budget.BUCKET_ELEMENTS): DeepSpeed's defaults
    # (5e8 elements, 1 GB in bf16 per bucket) would not fit a home card beside the model.
    zero: dict = {"stage": t.zero_stage, "reduce_bucket_size": BUCKET_ELEMENTS,
                  "allgather_bucket_size": BUCKET_ELEMENTS}
    if t.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=BUCKET_ELEMENTS, stage3_max_live_parameters=2 * BUCKET_ELEMENTS,
                    stage3_max_reuse_distance=2 * BUCKET_ELEMENTS)
    if t.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    extra = {}
    if precision == "bf16" and t.zero_stage >= 1 and t.offload_optimizer == "none":
        # Gradients add up in fp32: at ZeRO-1 DeepSpeed's BF16_Optimizer, at ZeRO-2 and 3 its
        # ZeRO optimizers with an fp32 accumulation buffer. ZeRO-0 has no such path (DeepSpeed
        # refuses the setting there), which is why the plan takes ZeRO-1 for bf16.
        extra["data_types"] = {"grad_accum_dtype": "fp32"}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling, which fp16 needs to avoid underflow.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our optimizer is built here (AdamW or bitsandbytes AdamW8bit); DeepSpeed would
        # otherwise insist on its own CPU Adam when offloading.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases, embeddings and the latent array keep
    their scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or name == "latents":
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = config.train
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=t.betas)
    # fused: one kernel for the whole update, and its step counts stay on the device, where
    # the default implementation reads each one back to the host every step.
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=True)


def lr_lambda(config: RunConfig):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at train.steps."""
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


class Trainer:
    def __init__(self, run_dir: str | Path, stop=None):
        self.run_dir = Path(run_dir)
        self.stop = stop  # stopping.GracefulStop: a stop signal this process received
        saved = json.loads((self.run_dir / "config.json").read_text())
        self.config: RunConfig = build_config(saved["config"], source=str(self.run_dir / "config.json"))
        self.plan = saved["plan"]
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.log: MetricsLog | None = None
        self._init_distributed()

        t = self.config.train
        seed_everything(t.seed)  # identical initial weights on every rank
        self.model = build_model(self.config.model, self.config.data)
        self.parameters = count_parameters(self.model)  # before ZeRO-3 partitions the tensors
        optimizer = build_optimizer(self.config, self.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.config))
        import deepspeed

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.config, self.plan["precision"], self.world))
        if t.compile:
            self.engine.compile()
        self._warm_up_collectives()
        # Ranks agree on stopping through a CPU (gloo) group: a flag read every step must
        # not make the host wait for the GPU, as an NCCL collective read back would.
        self.control_group = None
        if self.world > 1:
            self.control_group = (torch.distributed.new_group(backend="gloo") if self.device.type == "cuda"
                                  else torch.distributed.group.WORLD)
        # Each rank draws its own DropToken masks.
        seed_everything(t.seed + 1000 * (self.rank + 1))

        self.step = 0
        self.settled = False  # past the first steps, where running out of memory makes the launcher back off
        self.micro_batches = 0  # consumed by this rank: the data position to resume from
        self.ckpt_dir = self.run_dir / "checkpoints"
        resume_tag = self._resume_tag()
        if resume_tag:
            self.step, self.micro_batches = self._load_meta(resume_tag)
        self.saved_step = self.step  # the step the newest complete checkpoint holds

        self.dataset = open_dataset(saved["data_dir"], self.config.data)
        self.raw_videos = not isinstance(self.dataset, ShardDataset)
        # The held-out videos the launcher recorded: their clips are never trained on.
        self.split = split_clips(self.dataset.clip_videos(), saved.get("split", {}).get("heldout_videos", []))
        self.eval_steps = set(self.config.eval.steps(t.steps)) \
            if self.config.eval.during_training and len(self.split.heldout) else set()
        profiling = self.config.profile.enabled and self.step < self.config.profile.last_step
        self.timeline = LoaderTimeline("decode" if self.raw_videos else "read") if profiling else None
        self.loader = make_loader(self.dataset, self.config.data, rank=self.rank, world=self.world,
                                  micro_batch=t.micro_batch_size, seed=t.seed, start_batch=self.micro_batches,
                                  workers=self.plan.get("dataloader_workers", max(0, self.config.data.workers)),
                                  pin_memory=self.device.type == "cuda",
                                  on_batch=self.timeline.record if self.timeline else None,
                                  clips=self.split.train)
        self.batches = iter(self.loader)
        if resume_tag:
            self._load_checkpoint(resume_tag)
        if self.is_main:
            # Metrics past the checkpoint (or all of them, when a run died before its first
            # checkpoint) are dropped: they will be logged again.
            self.log = MetricsLog(self.run_dir, resume_step=self.step)
            if not resume_tag:
                self.log.write_setup(saved, self.parameters)
            self.log.say(f"{'resuming at' if resume_tag else 'starting'} step {self.step}/{t.steps}: "
                         f"{self.world} process(es) on {self.device.type}, {self.plan['precision']}, "
                         f"ZeRO-{t.zero_stage}, {self.parameters / 1e6:.2f}M parameters, "
                         f"{len(self.split.train)} training clips ({len(self.split.heldout)} held out)")
            if self.eval_steps:
                self.log.say(f"evaluating after steps {', '.join(map(str, sorted(self.eval_steps)))}")
        # Counted on the device, read at logging steps: reading the loss every step would
        # make the host wait for the GPU every step.
        self.nonfinite_in_a_row = torch.zeros((), dtype=torch.int64, device=self.device)
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.nonfinite_reported = 0
        self.skipped_seen, self.skipped_in_a_row = 0, 0  # optimizer steps DeepSpeed skipped
        self.first_step = self.step
        self.recent_losses: list[float] = []  # logged losses, for the explosion rule
        self.diverged: str | None = None  # why the run must stop, once its metrics are written
        self._restart_step_clock()
        self.flops_per_clip, self.peak_tflops = self._flops_and_peak()
        self.telemetry = TelemetrySampler(self.config.profile.telemetry_hz,
                                          gpu_index=physical_gpu_index(self.local_rank) if self.device.type == "cuda"
                                          else None)
        self.profiler = None
        if profiling:
            self.profiler = StepProfiler(self.config.profile, self.run_dir / "tb" / "profile", rank=self.rank,
                                         cuda=self.device.type == "cuda", timeline=self.timeline)
            if self.log:
                p = self.config.profile
                self.log.say(f"profiling steps {p.start_step + p.wait + p.warmup + 1}-{p.last_step} "
                             f"(after {p.start_step} + {p.wait} skipped and {p.warmup} warm-up) into {self.run_dir / 'tb' / 'profile'}")
        if self.raw_videos and self.log:
            self.log.say(f"training straight from the videos in {saved['data_dir']}: every clip is decoded on "
                         "the fly, which is slow; `rigtrain data prepare` makes shards once")

    # -- setup ------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        import deepspeed

        if self.plan["device"] == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            backend = "nccl"
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for any fp32 matmul left
            torch.backends.cudnn.allow_tf32 = True
            # Attention through Flash or memory-efficient kernels, not cuDNN's: on the first
            # H200 run cuDNN attention spent 3.6-5.7 ms of CPU per call building execution
            # plans (55% of the step's host time), and SDPA otherwise prefers it on Hopper.
            torch.backends.cuda.enable_cudnn_sdp(False)
            cap = (self.plan.get("memory") or {}).get("allocator_cap_gib")
            if cap:
                # torch's allocator may take what the plan gave the step, and no more: the
                # rest of the card is left to the CUDA context, NCCL and cuDNN, which
                # allocate outside it. Past the cap, torch raises an out-of-memory error the
                # first-step back-off can catch, instead of NCCL failing at a barrier later.
                total = torch.cuda.get_device_properties(self.local_rank).total_memory / 2**30
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.local_rank)
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        deepspeed.init_distributed(dist_backend=backend)

    def _resume_tag(self) -> str | None:
        """The newest complete checkpoint whose files match their checksums, chosen by rank 0
        (which says which damaged ones it skipped) for every rank."""
        choice = [None]
        if self.is_main:
            found = checkpoints.newest_good(self.ckpt_dir, warn=lambda line: print(f"[rigtrain] {line}", flush=True))
            if found is None and checkpoints.damaged_only(self.ckpt_dir):
                choice = ["damaged"]
            else:
                choice = [found[1] if found else None]
        if self.world > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        if choice[0] == "damaged":
            raise UserError(f"--resume: every checkpoint in {self.ckpt_dir} is damaged (see above); restore the files "
                            "or start a new run with another --out")
        return choice[0]

    def _load_meta(self, tag: str) -> tuple[int, int]:
        meta = json.loads((self.ckpt_dir / tag / "trainer.json").read_text())
        return meta["step"], meta["micro_batches"]

    def _load_checkpoint(self, tag: str) -> None:
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.ckpt_dir / tag}")
        checkpoints.load_rank_state(self.ckpt_dir / tag, self.rank)
        self._apply_optimizer_config()

    def _apply_optimizer_config(self) -> None:
        """The checkpoint brought back the optimizer's hyperparameters and the schedule's base
        rate as they were; a resumed run trains with what its config says now (--set
        train.lr=... on --resume takes effect), at the schedule's position it had reached."""
        t = self.config.train
        schedule = self.scheduler
        factor = lr_lambda(self.config)(schedule.last_epoch)
        schedule.base_lrs = [t.lr for _ in schedule.base_lrs]
        for group in schedule.optimizer.param_groups:
            group["lr"] = t.lr * factor
            group["betas"] = tuple(t.betas)
            if group.get("weight_decay", 0) > 0:  # the group of matrices (param_groups)
                group["weight_decay"] = t.weight_decay
        schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]

    # -- the loop -------------------------------------------------------------------------
    def _next_batch(self) -> tuple[dict[str, torch.Tensor], float]:
        started = time.perf_counter()
        with span("data_wait"):
            batch = next(self.batches)
        waited = time.perf_counter() - started
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.micro_batches += 1
        return batch, waited

    def train_step(self) -> dict[str, float]:
        """One optimizer step: grad_accum_steps micro-batches, forward/backward each, then
        DeepSpeed steps the optimizer and LR schedule at the accumulation boundary.

        Between logging steps nothing here waits for the GPU: no `.item()`, no
        synchronize, no branch on a tensor's value, so the host queues the next step's
        work while the GPU runs this one. Logging steps read the metrics (one wait), and
        the time per step is measured over the steps since the last one."""
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses; the schedule moves on after it
        totals: dict[str, torch.Tensor] = {}
        accum = self.config.train.grad_accum_steps
        for _ in range(accum):
            batch, waited = self._next_batch()
            self.data_wait_since_log += waited
            with span("forward"):
                terms = self.engine(batch)
            with span("backward"):
                self.engine.backward(terms["loss"])
            with span("optimizer"):
                self.engine.step()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / accum
        # DeepSpeed skips an update whose gradient norm is inf/NaN (fp16 overflow, or worse);
        # it decided that on the host already, so reading its count costs nothing.
        skipped = self.engine.skipped_steps
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped > self.skipped_seen else 0
        self.skipped_seen = skipped
        self.step += 1
        finite = torch.isfinite(totals["loss"])
        self.nonfinite_in_a_row = torch.where(finite, 0, self.nonfinite_in_a_row + 1)
        self.nonfinite_total += (~finite).long()
        t = self.config.train
        # Checkpoint steps are logging steps, so the divergence rules look at a step before it is saved.
        logging = (self.step % t.log_every == 0 or self.step == t.steps or self.step in self.eval_steps
                   or self.step % t.ckpt_every == 0 or self.step == self.first_step + 1)  # the first: a baseline
        if not logging:
            return {}
        # Averaged over ranks; every rank takes part, since all reach the same steps.
        names = sorted(totals)
        stacked = torch.stack([totals[k] for k in names])
        counts = torch.stack([self.nonfinite_in_a_row, self.nonfinite_total])
        if self.world > 1:
            torch.distributed.all_reduce(stacked)
            stacked /= self.world
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)  # the worst rank's
        metrics = dict(zip(names, stacked.tolist()))  # the wait for the GPU: everything queued so far has run
        in_a_row, total = counts.tolist()
        steps = self.step - self.clock_step
        step_time = (time.perf_counter() - self.clock_started) / steps
        global_batch = self.config.train.micro_batch_size * accum * self.world
        metrics.update(step=self.step, lr=lr, step_time_s=step_time, samples_per_s=global_batch / step_time,
                       data_wait_s=self.data_wait_since_log / steps)
        if self.peak_tflops:
            achieved = self.flops_per_clip * global_batch / step_time / self.world / 1e12
            metrics.update(tflops_per_gpu=achieved, mfu=achieved / self.peak_tflops)
        self._restart_step_clock()
        self._check_divergence(in_a_row, total, metrics)
        return metrics

    def _restart_step_clock(self) -> None:
        """Step times count from here (after a logging step, an evaluation or a save)."""
        self.clock_started, self.clock_step, self.data_wait_since_log = time.perf_counter(), self.step, 0.0

    def _flops_and_peak(self) -> tuple[float | None, float | None]:
        """On a GPU in the peak table: FLOPs per clip (counted once) and the card's peak,
        for the MFU logged with every metrics line."""
        if self.device.type != "cuda":
            return None, None
        from rigtrain.rig.peaks import peak_tflops
        from rigtrain.train.flops import train_flops_per_clip

        peak = peak_tflops(torch.cuda.get_device_name(self.device))
        return (train_flops_per_clip(self.config.model, self.config.data), peak) if peak else (None, None)

    def _check_divergence(self, in_a_row: int, total: int, metrics: dict[str, float]) -> None:
        """At each logging step (every checkpoint step is one), the rules that stop a run
        which can no longer learn, before it saves: the loss not finite for
        train.max_nonfinite_steps steps in a row; DeepSpeed skipping the update (an inf/NaN
        gradient) for train.max_skipped_steps steps in a row; the loss above
        train.divergence_factor times the median of the last 10 logged losses. Every rank
        sees the same figures, so all stop after the same step."""
        t = self.config.train
        if total != self.nonfinite_reported:
            metrics["nonfinite_steps"] = total
            if self.log:
                self.log.say(f"warning: {total - self.nonfinite_reported} step(s) up to step {self.step} had a loss "
                             f"that is not finite ({in_a_row} in a row now, {total} in all)")
            self.nonfinite_reported = total
        if self.skipped_seen:
            metrics["skipped_steps"] = self.skipped_seen
        loss = metrics.get("loss", 0.0)
        recent = sorted(self.recent_losses[-10:])
        median = recent[len(recent) // 2] if recent else None
        why = None
        if in_a_row >= t.max_nonfinite_steps:
            why = f"the loss was not finite for {in_a_row} steps in a row up to step {self.step}"
        elif self.skipped_in_a_row >= t.max_skipped_steps:
            why = (f"DeepSpeed skipped the last {self.skipped_in_a_row} updates up to step {self.step} (their gradients "
                   "were inf or NaN)")
        elif t.divergence_factor and median and math.isfinite(loss) and loss > t.divergence_factor * median:
            why = (f"the loss exploded at step {self.step}: {loss:.4g}, more than {t.divergence_factor:g} times the "
                   f"median of the last {len(recent)} logged ({median:.4g}; train.divergence_factor)")
        if math.isfinite(loss):
            self.recent_losses.append(loss)
        if why:
            self.diverged = (f"{why}; {self._last_good()}; lower train.lr (now {t.lr:g}) or raise "
                             f"train.warmup_steps, then `rigtrain train --out {self.run_dir} --resume --set train.lr=...`")

    def save_checkpoint(self) -> bool:
        """Save this step; False (nothing written) when the weights or optimizer states are
        no longer finite, since such a checkpoint could only be resumed into the same
        failure. A full disk is one line, before the save when the last checkpoint's size
        says it will not fit, and during it otherwise; the previous checkpoint stays whole."""
        if not self._states_finite():
            last = self._last_good()
            self.diverged = (f"the weights or optimizer states are not finite at step {self.step}, so no checkpoint "
                             f"was written; {last}; lower train.lr (now {self.config.train.lr:g}) and resume with "
                             f"`rigtrain train --out {self.run_dir} --resume --set train.lr=...`")
            return False
        tag = checkpoints.tag_for(self.step)
        tag_dir = self.ckpt_dir / tag
        self._check_disk_space(tag_dir)
        if self.is_main:  # a tag saved again (a resumed run) is incomplete until its new list is written
            (tag_dir / checkpoints.COMPLETE).unlink(missing_ok=True)
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag)
            checkpoints.save_rank_state(tag_dir, self.rank)
            torch.distributed.barrier()  # every rank's part is on disk before the tag counts
            if self.is_main:
                write_json(tag_dir / "trainer.json", {"step": self.step, "micro_batches": self.micro_batches,
                                                      "config": self.config.to_dict()})
                checkpoints.mark_complete(tag_dir, self.step)
                removed = checkpoints.prune(self.ckpt_dir, self.config.train.keep_ckpts)
                self.log.say(f"checkpoint {tag_dir}" + (f" (removed {', '.join(removed)})" if removed else ""))
        except (OSError, RuntimeError) as err:
            if not _disk_full(err, self.ckpt_dir):
                raise
            shutil.rmtree(tag_dir, ignore_errors=True)  # incomplete: never resumed, and it holds space
            free = shutil.disk_usage(self.ckpt_dir).free
            raise TrainingFault(f"the disk is full: saving step {self.step} into {tag_dir} failed with {free:,} bytes "
                                f"free; {self._last_good()}; free some space and resume with "
                                f"`rigtrain train --out {self.run_dir} --resume`") from None
        torch.distributed.barrier()
        self.saved_step = self.step
        return True

    def _states_finite(self) -> bool:
        """Every rank's weights (its partitions under ZeRO-3) and optimizer tensors (fp32
        master weights and moments) are finite; one read-back per save."""
        tensors = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        optimizer = self.engine.basic_optimizer
        tensors += [p for group in optimizer.param_groups for p in group["params"]]
        tensors += [v for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
        bad = torch.zeros((), dtype=torch.int64, device=self.device)
        for t in tensors:
            if t.numel():
                bad += (~torch.isfinite(t)).any().to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(bad)
        return int(bad) == 0

    def _last_good(self) -> str:
        tags = checkpoints.complete_tags(self.ckpt_dir)
        return (f"the last good checkpoint is step {tags[-1][0]} ({self.ckpt_dir / tags[-1][1]})" if tags
                else "there is no checkpoint yet")

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
            raise TrainingFault(f"not enough disk space to save step {self.step} into {tag_dir}: about {need:,} bytes "
                                f"needed, {free:,} free; {self._last_good()}; free some space (or lower "
                                f"train.keep_ckpts) and resume with `rigtrain train --out {self.run_dir} --resume`")

    def fit(self) -> None:
        t = self.config.train
        first_step, losses = self.step, []
        self.first_step = first_step
        started = time.perf_counter()
        while self.step < t.steps:
            signum = self._stop_signal()
            if signum:
                self._stop(signum)
            metrics = self.train_step()
            if self.profiler:
                self.profiler.step()
                if self.step >= self.config.profile.last_step:
                    self._finish_profile()
            for event in self.telemetry.events():
                print(f"[rigtrain] warning (rank {self.rank}): {event}", flush=True)
            if metrics:
                metrics.update(self.telemetry.snapshot())
            if self.step == first_step + 1:
                self._rehearse_later_needs()
            if self.step in self.eval_steps:
                result = self.evaluate()
                if result is not None:
                    metrics.update(flat_metrics(result))
                self._restart_step_clock()
            if metrics and self.log:
                self.log.write(metrics)
                losses.append(metrics["loss"])
            if self.diverged:
                raise FloatingPointError(self.diverged)
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                if self.skipped_in_a_row:
                    if self.log:
                        self.log.say(f"warning: step {self.step} is not saved: DeepSpeed skipped its update (inf or "
                                     f"NaN gradients); {self._last_good()}")
                elif not self.save_checkpoint():
                    raise FloatingPointError(self.diverged)
                self._restart_step_clock()
        if self.log and self.step == first_step:
            self.log.say(f"the run is already at step {self.step} of {t.steps}: nothing to do "
                         f"(give --steps N with N > {self.step} to train on)")
        elif self.log:
            change = f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
            self.log.say(f"done: steps {first_step + 1}-{self.step} in {time.perf_counter() - started:.1f} s"
                         f"{change}; run in {self.run_dir}")

    def _stop_signal(self) -> int:
        """The stop signal any rank has received (0 if none), the same on every rank."""
        signum = self.stop.signum if self.stop else 0
        if self.world > 1:
            flag = torch.tensor([signum], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.control_group)
            signum = int(flag)
        return signum

    def _stop(self, signum: int) -> None:
        """Stopped on request between two steps: save what was trained since the last
        checkpoint, say where it stopped and how to go on, and end with 128 + the signal."""
        import signal

        from rigtrain.train.stopping import StopRequested

        if self.step > self.saved_step:
            self.save_checkpoint()
        name = signal.Signals(signum).name
        where = (f"after step {self.step}; checkpoint {self.ckpt_dir / checkpoints.tag_for(self.step)} is complete"
                 if self.step > 0 else "before its first step; nothing was trained")
        message = (f"stopped by {name} {where}. Continue with: rigtrain train --out {self.run_dir} --resume"
                   if self.step > 0 else f"stopped by {name} {where}")
        if self.log:
            self.log.say(message)
        raise StopRequested(128 + signum, message)

    def evaluate(self) -> dict | None:
        """Every rank embeds its share of the bank (training clips) and the held-out clips;
        rank 0 gathers them, scores kNN, probe and retrieval, and writes eval.json. Returns
        the result on rank 0, None elsewhere."""
        started = time.perf_counter()
        cfg, module = self.config.eval, self.engine.module
        was_training = module.training
        module.eval()
        try:
            parts = [self._embed_share(spread(clips, cfg.max_clips)) for clips in (self.split.train, self.split.heldout)]
        finally:
            module.train(was_training)
        if self.world > 1:
            gathered = [None] * self.world if self.is_main else None
            torch.distributed.gather_object(parts, gathered, dst=0)
            if not self.is_main:
                return None
            parts = [Features.concat([g[i] for g in gathered]) for i in range(2)]
        result = evaluate(parts[0], parts[1], self.dataset.index.get("labels") if not self.raw_videos else None, cfg)
        record = {"step": self.step, **result, "split": self.split.to_dict(),
                  "seconds": round(time.perf_counter() - started, 2)}
        write_json(self.run_dir / "eval.json", record)
        self.log.say(f"eval after step {self.step} ({record['seconds']:.1f} s; also in eval.json):\n"
                     + "\n".join("    " + line for line in format_result(result).splitlines()))
        return result

    def _embed_share(self, clips) -> Features:
        """This rank's share of the clips, padded so every rank runs the same number of
        batches (ZeRO-3 gathers parameters in lockstep), the padding dropped after."""
        share = clips[self.rank :: self.world]
        per_rank = -(-len(clips) // self.world)
        padded = np.resize(share if len(share) else clips[:1], per_rank)
        features = extract_features(lambda batch: self.engine.module(batch, task="embed"), self.dataset, padded,
                                    batch_size=self.config.train.micro_batch_size, device=self.device)
        return features.select(np.arange(len(share)))

    def _warm_up_collectives(self) -> None:
        """Every collective the run uses later, once now: NCCL allocates its buffers outside
        torch's allocator at a communicator's first use, and on the first real GPU run that
        first use was the barrier before the first checkpoint, when the allocator held the
        whole card (608 bytes could not be had, and every step was lost)."""
        probe = torch.ones(1, device=self.device)
        torch.distributed.all_reduce(probe)
        torch.distributed.all_gather([torch.empty_like(probe) for _ in range(self.world)], probe)
        torch.distributed.barrier()

    def _rehearse_later_needs(self) -> None:
        """After the first step, what later steps need beyond a train step, done once while
        an out-of-memory still makes the launcher back off: a batch of evaluation and the
        collectives of a save. Then the plan is checked against the card."""
        if self.eval_steps:
            module = self.engine.module
            module.eval()
            try:
                self._embed_share(self.split.heldout[: self.config.train.micro_batch_size * self.world])
            finally:
                module.train()
        torch.distributed.barrier()
        if self.device.type == "cuda":
            self._check_memory()
        self.settled = True

    def _check_memory(self) -> None:
        """The plan's predicted peak against what the first step really used, kept in
        config.json and shown in TensorBoard's setup run: torch's allocated peak (what the
        plan predicts), what its allocator reserved, and what NVML sees for the card (the
        CUDA context, NCCL and library workspaces too)."""
        gib = 2**30
        free, total = torch.cuda.mem_get_info(self.device)
        numbers = torch.tensor([torch.cuda.max_memory_allocated(self.device) / gib,
                                torch.cuda.max_memory_reserved(self.device) / gib, (total - free) / gib],
                               device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(numbers, op=torch.distributed.ReduceOp.MAX)
        allocated, reserved, used = numbers.tolist()
        predicted = self.plan.get("predicted_peak_gib")
        predicted_total = (self.plan.get("memory") or {}).get("card_total_gib")
        if not self.log:
            return
        error = f" ({(predicted - allocated) / allocated:+.1%} predicted vs measured)" if predicted and allocated else ""
        self.log.say(f"memory: the first step peaked at {allocated:.2f} GiB allocated per GPU ({reserved:.2f} reserved by "
                     f"torch, {used:.2f} in use on the card); the plan predicted "
                     f"{predicted if predicted is None else f'{predicted:.2f}'} GiB{error}"
                     + (f" and {predicted_total:.2f} GiB on the card" if predicted_total else ""))
        path = self.run_dir / "config.json"
        record = json.loads(path.read_text())
        record["memory_check"] = {"predicted_peak_gib": predicted, "measured_peak_gib": round(allocated, 3),
                                  "reserved_peak_gib": round(reserved, 3), "card_used_gib": round(used, 3),
                                  "predicted_card_total_gib": predicted_total,
                                  "micro_batch_size": self.config.train.micro_batch_size}
        write_json(path, record)
        self.log.write_text("setup", "memory", f"predicted {predicted} GiB, measured {allocated:.3f} GiB allocated, "
                            f"{reserved:.3f} reserved, {used:.3f} GiB used on the card after the first step{error}")

    def _finish_profile(self) -> None:
        """Stop the profiler (its trace is written), then rank 0 analyses its own trace."""
        from rigtrain.profile.analysis import RunFacts, analyze, format_summary
        from rigtrain.rig.peaks import peak_tflops
        from rigtrain.train.flops import train_flops_per_clip

        self.profiler.stop()
        path, self.profiler = self.profiler.trace_path, None
        if not self.log:
            return
        if path is None:
            self.log.say("warning: the profiler wrote no trace; no profile summary")
            return
        t = self.config.train
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        facts = RunFacts(device=self.device.type, clips_per_step=t.micro_batch_size * t.grad_accum_steps * self.world,
                         world_size=self.world, loader_threads=self.plan.get("dataloader_workers", 0),
                         cpu_threads=len(os.sched_getaffinity(0)), data_is_raw_videos=self.raw_videos,
                         zero_stage=t.zero_stage, micro_batch_size=t.micro_batch_size,
                         grad_accum_steps=t.grad_accum_steps, compiled=t.compile,
                         flops_per_clip=train_flops_per_clip(self.config.model, self.config.data),
                         peak_tflops=peak_tflops(gpu) if gpu else None, gpu_name=gpu)
        summary = analyze(json.loads(path.read_text())["traceEvents"], facts)
        summary["trace"] = str(path.relative_to(self.run_dir))
        out = self.run_dir / "profile"
        out.mkdir(exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        text = format_summary(summary)
        self.log.say("profile summary (also in profile/summary.json and TensorBoard's profile run):\n" + text)
        self.log.write_text("profile", "summary", "\n".join("    " + line for line in text.splitlines()))

    def close(self) -> None:
        if getattr(self, "profiler", None) is not None:
            self.profiler.stop()
        if getattr(self, "telemetry", None) is not None:
            self.telemetry.close()
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        if self.log:
            self.log.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
