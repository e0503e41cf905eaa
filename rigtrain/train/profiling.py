"""Profiling inside a run: the FLOPs and peak behind the MFU logged on a GPU, and the end of
a profiled window: the trace written, then analysed into profile/summary.json and
TensorBoard (docs/profile.md). A mixin of the Trainer."""

from __future__ import annotations

import json
import os

import torch

from rigtrain.profile.analysis import RunFacts, analyze, format_summary, timeline_events
from rigtrain.profile.charts import write_charts
from rigtrain.profile.recorder import StepProfiler
from rigtrain.rig.peaks import peak_tflops
from rigtrain.train.flops import train_flops_per_clip


class StepProfiling:
    def _start_profiler(self) -> None:

        self.profiler = StepProfiler(
            self.config.profile,
            self.run_dir / "tb" / "profile",
            rank=self.rank,
            cuda=self.device.type == "cuda",
            timeline=self.timeline,
        )
        if self.log:
            p = self.config.profile
            self.log.say(
                f"profiling steps {p.start_step + p.wait + p.warmup + 1}-{p.last_step} (after "
                f"{p.start_step} + {p.wait} skipped and {p.warmup} warm-up) into {self.run_dir / 'tb' / 'profile'}"
            )

    def _flops_and_peak(self) -> tuple[float | None, float | None]:
        """On a GPU in the peak table: FLOPs per clip (counted once) and the card's peak,
        for the MFU logged with every metrics line."""
        if self.device.type != "cuda":
            return None, None

        peak = peak_tflops(torch.cuda.get_device_name(self.device))
        return (train_flops_per_clip(self.config.model, self.config.data), peak) if peak else (None, None)

    def _finish_profile(self) -> None:
        """Stop the profiler (its trace is written), then rank 0 analyses its own trace."""

        self.profiler.stop()
        path, events, self.profiler = self.profiler.trace_path, self.profiler.trace_events, None
        if not self.log:
            return
        if path is None:
            self.log.say("warning: the profiler wrote no trace; no profile summary")
            return
        t = self.config.train
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        facts = RunFacts(
            device=self.device.type,
            clips_per_step=t.micro_batch_size * t.grad_accum_steps * self.world,
            world_size=self.world,
            loader_threads=self.plan.get("dataloader_workers", 0),
            cpu_threads=len(os.sched_getaffinity(0)),
            data_is_raw_videos=self.raw_videos,
            zero_stage=t.zero_stage,
            micro_batch_size=t.micro_batch_size,
            grad_accum_steps=t.grad_accum_steps,
            compiled=t.compile,
            largest_micro_batch=self.plan.get("largest_micro_batch"),
            flops_per_clip=train_flops_per_clip(self.config.model, self.config.data),
            peak_tflops=peak_tflops(gpu) if gpu else None,
            gpu_name=gpu,
        )
        events = timeline_events(events)  # once, for the breakdown and the charts
        summary = analyze(events, facts)
        summary["trace"] = str(path.relative_to(self.run_dir))
        out = self.run_dir / "profile"
        out.mkdir(exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        text = format_summary(summary)
        self.log.say("profile summary (also in profile/summary.json and TensorBoard's profile run):\n" + text)
        self.log.write_text("profile", "summary", "\n".join("    " + line for line in text.splitlines()))
        self._draw_profile(events, out)

    def _draw_profile(self, events: list[dict], out) -> None:
        """The step breakdown and the timeline as images (profile/charts.py), if matplotlib is here."""
        from torch.utils.tensorboard import SummaryWriter  # heavy (TensorBoard): only on rank 0 when it writes

        try:  # write_charts imports matplotlib, which an offline GPU box may not have
            with SummaryWriter(str(self.run_dir / "tb" / "profile")) as writer:
                written = write_charts(events, self.device.type, out, writer)
        except ImportError:
            self.log.say("profile images skipped: matplotlib is not installed (pip install matplotlib)")
            return
        self.log.say(
            f"profile images: {', '.join(str(p.relative_to(self.run_dir)) for p in written)} (and TensorBoard)"
        )
