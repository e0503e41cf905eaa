"""The training process: one per GPU (or per `train.nproc` on a CPU), started by the launcher
with RANK/WORLD_SIZE in its environment. It reads everything from RUN_DIR/config.json
(docs/training.md).

    Trainer(run_dir)  -> distributed init, model, DeepSpeed engine, loader, resume
    .fit()            -> train_step() until train.steps, logging and checkpointing
    .close()          -> flush logs, leave the process group (always called)

This file holds the loop; the Trainer's other ideas live beside it as mixins: saving.py
(checkpoints: saving, and the one to resume from), divergence.py (the rules that stop a run that can no longer learn),
evaluating.py (evaluation during training), rehearsal.py (the first steps' rehearsal and
memory check), profiling.py (the profiled window, MFU). The engine's set-up is engine.py.
None of them imports this file.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
from torch.nn.utils import clip_grad_norm_

from rigtrain.config import RunConfig, build_config
from rigtrain.data.dataset import ShardDataset, make_loader, open_dataset
from rigtrain.data.split import split_clips
from rigtrain.errors import DataGone, UserError
from rigtrain.evaluate import flat_metrics
from rigtrain.model import build_model, count_parameters
from rigtrain.profile.recorder import LoaderTimeline, span
from rigtrain.profile.telemetry import TelemetrySampler, physical_gpu_index
from rigtrain.train import checkpoints
from rigtrain.train.divergence import DivergenceRules, recent_losses
from rigtrain.train.engine import (
    build_optimizer,
    compile_objective,
    init_distributed,
    lr_lambda,
    max_gradient_norm,
    one_process_epilogue,
    seed_everything,
)
from rigtrain.train.evaluating import HeldOutEvaluation
from rigtrain.train.initializing import initialize_from
from rigtrain.train.profiling import StepProfiling
from rigtrain.train.rehearsal import FirstStepRehearsal
from rigtrain.train.run_log import MetricsLog
from rigtrain.train.run_record import resume_command
from rigtrain.train.saving import Checkpointing
from rigtrain.train.skipping import SkippedUpdates
from rigtrain.train.stopping import StopRequested
from rigtrain.train.tensor_stats import TensorStatisticsLogging


class Trainer(
    Checkpointing, DivergenceRules, HeldOutEvaluation, FirstStepRehearsal, StepProfiling, TensorStatisticsLogging
):
    # A tune's trials build one Trainer after another in the same processes and group.
    owns_process_group = True

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
        self.device = init_distributed(self.plan, self.local_rank, self.config.train.collective_timeout_min)
        self.ckpt_dir = self.run_dir / "checkpoints"
        resume_tag = self._resume_tag()
        self._set_up_engine(None if resume_tag else saved.get("init_from"))  # until it has a checkpoint of its own
        self.step = 0
        self.settled = False  # past the first steps, where running out of memory makes the launcher back off
        self.micro_batches = 0  # consumed by this rank: the data position to resume from
        if resume_tag:
            self.step, self.micro_batches = self._load_meta(resume_tag)
        self.saved_step = self.step  # the step the newest complete checkpoint holds
        profiling = self.config.profile.enabled and self.step < self.config.profile.last_step
        self._set_up_data(saved, profiling)
        if resume_tag:
            self._load_checkpoint(resume_tag)
        if self.is_main:
            self._set_up_log(saved, resumed=bool(resume_tag))
        # Counted on the device, read at logging steps: reading the loss every step would
        # make the host wait for the GPU every step.
        self.nonfinite_in_a_row = torch.zeros((), dtype=torch.int64, device=self.device)
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.nonfinite_reported = 0
        self.first_step = self.step
        self.recent_losses = recent_losses()  # the explosion rule's
        self.diverged: str | None = None  # why the run must stop, once its metrics are written
        self._restart_step_clock()
        self.flops_per_clip, self.peak_tflops = self._flops_and_peak()
        self.telemetry = TelemetrySampler(
            self.config.profile.telemetry_hz,
            gpu_index=physical_gpu_index(self.local_rank) if self.device.type == "cuda" else None,
        )
        self.profiler = None
        if profiling:
            self._start_profiler()
        if self.raw_videos and self.log:
            self.log.say(
                f"training straight from the videos in {saved['data_dir']}: every clip is decoded on "
                "the fly, which is slow; `rigtrain data prepare` makes shards once"
            )

    # -- setup ------------------------------------------------------------------------------
    def _set_up_engine(self, init_from: dict | None = None) -> None:
        """The model (with another run's weights where they fit, for --init-from), its
        optimizer and schedule in DeepSpeed's engine, the collectives warmed up, and the
        group ranks agree on stopping through."""
        t = self.config.train
        seed_everything(t.seed)  # identical initial weights on every rank
        self.model = build_model(self.config.model, self.config.data)
        if init_from:
            initialize_from(self.model, init_from, self.run_dir, report=self.is_main)
        self.parameters = count_parameters(self.model)  # before ZeRO-3 partitions the tensors
        optimizer = build_optimizer(self.config, self.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.config))
        import deepspeed  # heavy: only training processes import it

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self._engine_config(),  # saving.py: loading a universal checkpoint where it must
        )
        self.clipped = one_process_epilogue(self.engine, self.config, self.plan["precision"], self.world)
        self.skipped = SkippedUpdates(self.engine, optimizer if self.clipped else None, self.device)
        if t.compile:
            compile_objective(self.model)
        self._setup_statistics()
        self._warm_up_collectives()
        self.control_group = self._make_control_group()
        # Each rank draws its own DropToken masks.
        seed_everything(t.seed + 1000 * (self.rank + 1))

    def _make_control_group(self):
        """The group ranks agree on stopping through: gloo, since a flag read every step must
        not make the host wait for the GPU as an NCCL collective would. None with one process."""
        if self.world == 1:
            return None
        return (
            torch.distributed.new_group(backend="gloo") if self.device.type == "cuda" else torch.distributed.group.WORLD
        )

    def _set_up_data(self, saved: dict, profiling: bool) -> None:
        """The dataset, the held-out split the launcher recorded (never trained on), the
        evaluation steps, and this rank's loader from the data position to resume at."""
        t = self.config.train
        self.dataset = open_dataset(saved["data_dir"], self.config.data)
        self.raw_videos = not isinstance(self.dataset, ShardDataset)
        heldout = (saved.get("split") or {}).get("heldout_videos", [])
        self.split = split_clips(self.dataset.clip_videos(), heldout)
        if hasattr(self.dataset, "keep_apart"):  # videos decoded on demand stand in for one another
            self.dataset.keep_apart(heldout)
        self.eval_steps = (
            set(self.config.eval.steps(t.steps))
            if self.config.eval.during_training and len(self.split.heldout)
            else set()
        )
        self.timeline = LoaderTimeline("decode" if self.raw_videos else "read") if profiling else None
        self.loader = make_loader(
            self.dataset,
            self.config.data,
            rank=self.rank,
            world=self.world,
            micro_batch=t.micro_batch_size,
            seed=t.seed,
            start_batch=self._data_position(len(self.split.train)),
            workers=self.plan.get("dataloader_workers", max(0, self.config.data.workers)),
            pin_memory=self.device.type == "cuda",
            on_batch=self.timeline.record if self.timeline else None,
            clips=self.split.train,
        )
        self.batches = iter(self.loader)

    def _set_up_log(self, saved: dict, resumed: bool) -> None:
        """Rank 0's metrics.jsonl and TensorBoard. Metrics past the checkpoint (or all of them,
        when a run died before its first checkpoint) are dropped: they will be logged again."""
        t = self.config.train
        self.log = MetricsLog(self.run_dir, resume_step=self.step, total_steps=t.steps)
        if not resumed:
            self.log.write_setup(saved, self.parameters)
        self.log.say(
            f"{'resuming at' if resumed else 'starting'} step {self.step}/{t.steps}: "
            f"{self.world} process(es) on {self.device.type}, {self.plan['precision']}, "
            f"ZeRO-{t.zero_stage}, {self.parameters / 1e6:.2f}M parameters, "
            f"{len(self.split.train)} training clips ({len(self.split.heldout)} held out)"
        )
        if self.eval_steps:
            steps = ", ".join(map(str, sorted(self.eval_steps)))
            self.log.say(f"evaluating after step{'s' * (',' in steps)} {steps}")

    # -- the loop ---------------------------------------------------------------------------
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
        summed: torch.Tensor | None = None  # the loss terms, stacked in sorted order
        accum = self.config.train.grad_accum_steps
        histograms, logged = self._histogram_step(self.step + 1), self._logs(self.step + 1)
        for micro in range(accum):
            try:
                batch, waited = self._next_batch()
            except DataGone as gone:  # mid-accumulation only .grad moved: the weights are the last step's
                self.micro_batches -= micro  # which a resume reads again, with this step's other micro-batches
                raise DataGone(str(gone), between_steps=True) from None
            self.data_wait_since_log += waited
            last = micro == accum - 1
            if last and histograms:
                self._arm_statistics()
            with span("forward"):
                terms = self.engine(batch)
            with span("backward"):
                self.engine.backward(terms["loss"])
            if last and logged:
                self._take_gradients(histograms)
            with span("optimizer"):
                if last and self.clipped:
                    self.skipped.guard(clip_grad_norm_(self.clipped, max_gradient_norm(self.config), foreach=True))
                self.engine.step()
            # two kernels a micro-batch, not two per loss term
            stacked = torch.stack([terms[k].detach().float() for k in sorted(terms)])
            summed = stacked if summed is None else summed + stacked
        self.skipped.count()  # an update whose gradient norm was inf/NaN was skipped (skipping.py)
        self.step += 1
        totals = dict(zip(sorted(terms), (summed / accum if accum > 1 else summed).unbind()))
        finite = torch.isfinite(totals["loss"])
        self.nonfinite_in_a_row = torch.where(finite, 0, self.nonfinite_in_a_row + 1)
        self.nonfinite_total += (~finite).long()
        totals.update(self._gradient_norms())
        if histograms:
            self._write_histograms()
        logging = self._logs(self.step)
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
        metrics.update(
            step=self.step,
            lr=lr,
            step_time_s=step_time,
            samples_per_s=global_batch / step_time,
            data_wait_s=self.data_wait_since_log / steps,
        )
        if self.peak_tflops:
            achieved = self.flops_per_clip * global_batch / step_time / self.world / 1e12
            metrics.update(tflops_per_gpu=achieved, mfu=achieved / self.peak_tflops)
        self._restart_step_clock()
        self._check_divergence(in_a_row, total, metrics)
        return metrics

    def _restart_step_clock(self) -> None:
        """Step times count from here (after a logging step, an evaluation or a save)."""
        self.clock_started, self.clock_step, self.data_wait_since_log = time.perf_counter(), self.step, 0.0

    def fit(self) -> None:
        t = self.config.train
        first_step, losses = self.step, []
        self.first_step = first_step
        started = time.perf_counter()
        while self.step < t.steps:
            signum = self._stop_signal()
            if signum:
                self._stop(signum)
            try:
                metrics = self.train_step()
            except DataGone as gone:
                raise UserError(self._after_data_gone(gone)) from None
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
            if not self.settled and (self.step >= first_step + 2 or self.step == t.steps):
                self._settle()
            if self.step in self.eval_steps:
                try:
                    result = self.evaluate_held_out()
                except DataGone as gone:  # after a whole step: it can be saved
                    raise UserError(self._after_data_gone(DataGone(str(gone), between_steps=True))) from None
                if result is not None:
                    metrics.update(flat_metrics(result))
                self._restart_step_clock()
            if metrics and self.log:
                self.log.write(metrics)
                losses.append(metrics["loss"])
            if self.diverged:
                raise FloatingPointError(self.diverged)
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                if self.skipped.read()[0]:
                    if self.log:
                        self.log.say(
                            f"warning: step {self.step} is not saved: its update was skipped (inf or NaN "
                            f"gradients); {self._last_good()}"
                        )
                elif not self.save_checkpoint():
                    raise FloatingPointError(self.diverged)
                self._restart_step_clock()
        if self.log and self.step == first_step:
            self.log.say(
                f"the run is already at step {self.step} of {t.steps}: nothing to do "
                f"(give --steps N with N > {self.step} to train on)"
            )
        elif self.log:
            change = f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
            self.log.say(
                f"done: steps {first_step + 1}-{self.step} in {time.perf_counter() - started:.1f} s"
                f"{change}; run in {self.run_dir}"
            )

    def _after_data_gone(self, gone: DataGone) -> str:
        """What a run whose data vanished keeps: one process between two steps saves the
        step it finished (ranks that might be inside a collective cannot all save)."""
        if gone.between_steps and self.world == 1 and self.step > self.saved_step and self.save_checkpoint():
            return (
                f"{gone}; step {self.step} is saved (`{resume_command(self.run_dir)}` continues "
                "from it once the data reads again)"
            )
        return f"{gone}; {self._last_good()}"

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

        if self.step > self.saved_step:
            self.save_checkpoint()
        name = signal.Signals(signum).name
        where = (
            f"after step {self.step}; checkpoint {self.ckpt_dir / checkpoints.tag_for(self.step)} is complete"
            if self.step > 0
            else "before its first step; nothing was trained"
        )
        message = (
            f"stopped by {name} {where}. Continue with: {resume_command(self.run_dir)}"
            if self.step > 0
            else f"stopped by {name} {where}"
        )
        if self.log:
            self.log.say(message)
        raise StopRequested(128 + signum, message)

    def close(self) -> None:
        if getattr(self, "profiler", None) is not None:
            self.profiler.stop()
        if getattr(self, "telemetry", None) is not None:
            self.telemetry.close()
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        if self.log:
            self.log.close()
        if self.owns_process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
