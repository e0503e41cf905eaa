"""The training process: one per GPU (or per `train.nproc` on a CPU), started by the launcher
with RANK/WORLD_SIZE in its environment. It reads everything from RUN_DIR/config.json.

    Trainer(run_dir)  -> distributed init, model, DeepSpeed engine, loader, resume
    .fit()            -> train_step() until train.steps, logging and checkpointing
    .close()          -> flush logs, leave the process group (always called)
"""

from __future__ import annotations

import json
import math
import os
import random
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
from rigtrain.rig.plan import BUCKET_ELEMENTS
from rigtrain.train import checkpoints
from rigtrain.train.metrics import MetricsLog, write_json

# Stop a run whose loss stays NaN/inf this many steps in a row: it will not recover, and
# the checkpoints it would write are worthless.
MAX_NONFINITE_STEPS = 5


def deepspeed_config(config: RunConfig, precision: str, world_size: int) -> dict:
    t = config.train
    # Bucket sizes the planner counts (rig.plan.BUCKET_ELEMENTS): DeepSpeed's defaults
    # (5e8 elements, 1 GB in bf16 per bucket) would not fit a home card beside the model.
    zero: dict = {"stage": t.zero_stage, "reduce_bucket_size": BUCKET_ELEMENTS,
                  "allgather_bucket_size": BUCKET_ELEMENTS}
    if t.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=BUCKET_ELEMENTS, stage3_max_live_parameters=2 * BUCKET_ELEMENTS,
                    stage3_max_reuse_distance=2 * BUCKET_ELEMENTS)
    if t.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
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
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


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


class Trainer:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
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
        # Each rank draws its own DropToken masks.
        seed_everything(t.seed + 1000 * (self.rank + 1))

        self.step = 0
        self.micro_batches = 0  # consumed by this rank: the data position to resume from
        self.ckpt_dir = self.run_dir / "checkpoints"
        resume_tag = self._resume_tag()
        if resume_tag:
            self.step, self.micro_batches = self._load_meta(resume_tag)

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
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
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
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        deepspeed.init_distributed(dist_backend=backend)

    def _resume_tag(self) -> str | None:
        tags = checkpoints.complete_tags(self.ckpt_dir)
        return tags[-1][1] if tags else None

    def _load_meta(self, tag: str) -> tuple[int, int]:
        meta = json.loads((self.ckpt_dir / tag / "trainer.json").read_text())
        return meta["step"], meta["micro_batches"]

    def _load_checkpoint(self, tag: str) -> None:
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.ckpt_dir / tag}")
        checkpoints.load_rank_state(self.ckpt_dir / tag, self.rank)

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
        DeepSpeed steps the optimizer and LR schedule at the accumulation boundary."""
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses; the schedule moves on after it
        data_wait = 0.0
        totals: dict[str, torch.Tensor] = {}
        accum = self.config.train.grad_accum_steps
        for _ in range(accum):
            batch, waited = self._next_batch()
            data_wait += waited
            with span("forward"):
                terms = self.engine(batch)
            with span("backward"):
                self.engine.backward(terms["loss"])
            with span("optimizer"):
                self.engine.step()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / accum
        self.step += 1
        logging = (self.step % self.config.train.log_every == 0 or self.step == self.config.train.steps
                   or self.step in self.eval_steps)
        metrics: dict[str, float] = {}
        if logging:
            # Averaged over ranks; every rank takes part, since all reach the same steps.
            names = sorted(totals)
            stacked = torch.stack([totals[k] for k in names]).to(self.device)
            if self.world > 1:
                torch.distributed.all_reduce(stacked)
                stacked /= self.world
            metrics = dict(zip(names, stacked.tolist()))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - started
        if logging:
            global_batch = self.config.train.micro_batch_size * accum * self.world
            metrics.update(step=self.step, lr=lr, step_time_s=step_time,
                           samples_per_s=global_batch / step_time, data_wait_s=data_wait)
        self._check_finite(totals["loss"].item(), metrics)
        return metrics

    def _check_finite(self, loss: float, metrics: dict[str, float]) -> None:
        """Every step (not only logged ones): a NaN is said, counted and logged."""
        if math.isfinite(loss):
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if metrics:
            metrics["nonfinite_steps"] = self.nonfinite_total
        if self.log:
            self.log.say(f"warning: step {self.step} loss is {loss} on rank 0 "
                         f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)")
        if self.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
            raise FloatingPointError(
                f"the loss was not finite for {MAX_NONFINITE_STEPS} steps in a row at step {self.step}; "
                "lower train.lr or use train.precision=fp32, then --resume from the last checkpoint")

    def save_checkpoint(self) -> None:
        tag = checkpoints.tag_for(self.step)
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag)
        tag_dir = self.ckpt_dir / tag
        checkpoints.save_rank_state(tag_dir, self.rank)
        torch.distributed.barrier()  # every rank's part is on disk before the tag counts
        if self.is_main:
            (tag_dir / "trainer.json").write_text(json.dumps({"step": self.step, "micro_batches": self.micro_batches}))
            checkpoints.mark_complete(tag_dir, self.step)
            removed = checkpoints.prune(self.ckpt_dir, self.config.train.keep_ckpts)
            self.log.say(f"checkpoint {tag_dir}" + (f" (removed {', '.join(removed)})" if removed else ""))
        torch.distributed.barrier()

    def fit(self) -> None:
        t = self.config.train
        first_step, losses = self.step, []
        started = time.perf_counter()
        while self.step < t.steps:
            metrics = self.train_step()
            if self.profiler:
                self.profiler.step()
                if self.step >= self.config.profile.last_step:
                    self._finish_profile()
            for event in self.telemetry.events():
                print(f"[rigtrain] warning (rank {self.rank}): {event}", flush=True)
            if metrics:
                metrics.update(self.telemetry.snapshot())
            if self.step == first_step + 1 and self.device.type == "cuda":
                self._check_memory()
            if self.step in self.eval_steps:
                result = self.evaluate()
                if result is not None:
                    metrics.update(flat_metrics(result))
            if metrics and self.log:
                self.log.write(metrics)
                losses.append(metrics["loss"])
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                self.save_checkpoint()
        if self.log and self.step == first_step:
            self.log.say(f"the run is already at step {self.step} of {t.steps}: nothing to do "
                         f"(give --steps N with N > {self.step} to train on)")
        elif self.log:
            change = f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
            self.log.say(f"done: steps {first_step + 1}-{self.step} in {time.perf_counter() - started:.1f} s"
                         f"{change}; run in {self.run_dir}")

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

    def _check_memory(self) -> None:
        """The plan's predicted peak against what the first step really allocated, kept in
        config.json and shown in TensorBoard's setup run."""
        measured = torch.cuda.max_memory_allocated(self.device) / 2**30
        peak = torch.tensor([measured], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        measured = float(peak)
        predicted = self.plan.get("predicted_peak_gib")
        if not self.log:
            return
        error = f" ({(predicted - measured) / measured:+.1%} predicted vs measured)" if predicted and measured else ""
        self.log.say(f"memory: first step peaked at {measured:.2f} GiB per GPU; the plan predicted "
                     f"{predicted if predicted is None else f'{predicted:.2f}'} GiB{error}")
        path = self.run_dir / "config.json"
        record = json.loads(path.read_text())
        record["memory_check"] = {"predicted_peak_gib": predicted, "measured_peak_gib": round(measured, 3),
                                  "micro_batch_size": self.config.train.micro_batch_size}
        write_json(path, record)
        self.log.write_text("setup", "memory", f"predicted {predicted} GiB, measured {measured:.3f} GiB "
                            f"(torch.cuda.max_memory_allocated after the first step){error}")

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
