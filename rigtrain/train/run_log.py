"""What rank 0 writes while training: metrics.jsonl, the TensorBoard runs tb/setup and
tb/train, and a progress line on the terminal."""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from rigtrain.errors import TrainingFault
from rigtrain.train.run_record import resume_command


def telemetry(process: psutil.Process) -> dict[str, float]:
    """Readings at each logged step: this process's memory, and on a GPU the memory torch
    holds. (Utilisation, power, clocks and PCIe come from profile/telemetry's sampler.)"""
    out = {"host_rss_gib": process.memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["gpu_mem_alloc_gib"] = torch.cuda.memory_allocated() / 2**30
        out["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _markdown_json(value) -> str:
    # TensorBoard renders text as Markdown: indent JSON so it shows as a code block.
    return "\n".join("    " + line for line in json.dumps(value, indent=2).splitlines())


class MetricsLog:
    def __init__(self, run_dir: Path, *, resume_step: int, total_steps: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # heavy (TensorBoard): only on rank 0 when it writes

        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.notes: list[str] = []
        self._truncate_after(resume_step)
        # purge_step hides events a crashed run logged after its last checkpoint.
        self.train_writer = SummaryWriter(str(run_dir / "tb" / "train"), purge_step=resume_step + 1)
        self.file = self.path.open("a")
        self.started = time.perf_counter()
        self.total_steps = total_steps
        self._first_logged: tuple[int, float] | None = None  # (step, time): where the ETA's rate starts
        self._on_continue_before: list = []  # the SIGCONT handler this replaced, if it did
        if threading.current_thread() is threading.main_thread():
            # After Ctrl-Z and `fg` (terminal.pausing_together) the pace since the first step
            # would count the pause: the ETA's pace starts again at the next logged step.
            self._on_continue_before.append(signal.signal(signal.SIGCONT, self._pace_from_here))
        self._layout_written = self.layout_has_eval = False
        for note in self.notes:
            self.say(note)
        self.process = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first reading is meaningless; prime it

    def _truncate_after(self, step: int) -> None:
        """Keep the lines up to `step` (a resumed run logs the rest again). A line that is
        not whole JSON, what a crash or a full disk leaves at the end, is dropped and said."""
        if not self.path.is_file():
            return
        keep, torn = [], []
        for number, line in enumerate(self.path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row_step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                torn.append(number)
                continue
            if row_step <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)
        if torn:
            self.notes.append(
                f"note: dropped {len(torn)} line(s) of {self.path} that were not whole (line "
                f"{', '.join(map(str, torn))}; a crash or a full disk cuts the last one short)"
            )

    def write_setup(self, saved: dict, parameters: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy (TensorBoard): only on rank 0 when it writes

        with SummaryWriter(str(self.run_dir / "tb" / "setup")) as writer:
            writer.add_text("config", _markdown_json(saved["config"]))
            writer.add_text("rig", _markdown_json(saved["rig"]))
            writer.add_text(
                "plan",
                "\n\n".join(f"**{k}**: {v}" for k, v in saved["plan"]["reasons"].items())
                + "\n\n"
                + _markdown_json(saved["plan"]),
            )
            if saved.get("warnings"):
                writer.add_text(
                    "warnings",
                    "\n\n".join(f"**{w['code']}** (GPU {w['gpu']}): {w['message']}" for w in saved["warnings"]),
                )
            hparams = {
                f"{section}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                for section in ("model", "data", "train")
                for k, v in saved["config"][section].items()
            }
            hparams["parameters"] = parameters
            writer.add_hparams(hparams, {"hparam/parameters_m": parameters / 1e6}, run_name=".")

    def write_text(self, run: str, tag: str, text: str) -> None:
        """A text note in one of the TensorBoard runs (setup, train)."""
        from torch.utils.tensorboard import SummaryWriter  # heavy (TensorBoard): only on rank 0 when it writes

        with SummaryWriter(str(self.run_dir / "tb" / run)) as writer:
            writer.add_text(tag, text)

    def write(self, metrics: dict[str, float]) -> None:
        metrics = {**telemetry(self.process), **metrics}  # the sampler's means win over one reading
        step = int(metrics["step"])
        try:
            self._write_layout(metrics)
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
            for key, value in metrics.items():
                if key != "step":
                    self.train_writer.add_scalar(
                        key if key == "loss" or "/" in key else f"{_group(key)}/{key}", value, step
                    )
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise TrainingFault(
                f"the disk is full: writing the metrics of step {step} into {self.run_dir} failed "
                f"({shutil.disk_usage(self.run_dir).free:,} bytes free); free some space and resume "
                f"with `{resume_command(self.run_dir)}`"
            ) from None
        terms = " ".join(
            f"{k.removeprefix('pc_').removeprefix('loss_')} {metrics[k]:.3f}"
            for k in sorted(metrics)
            if k.startswith("pc_") or k.startswith("loss_") and k != "loss_pc"
        )
        self.say(
            f"step {step:>5}  loss {metrics['loss']:.4f}  ({terms})  lr {metrics['lr']:.2e}  "
            f"{metrics['samples_per_s']:.1f} clips/s  data wait {metrics['data_wait_s'] * 1000:.0f} ms"
            f"{self._eta(step)}"
        )

    def _pace_from_here(self, signum=None, frame=None) -> None:
        self._first_logged = None

    def _eta(self, step: int) -> str:
        """How long the rest of the run takes at the pace since the first step this process
        logged, evaluations and checkpoints included (they are part of the time to wait), or
        since the first one logged after a pause (Ctrl-Z, then `fg`)."""
        now = time.perf_counter()
        if self._first_logged is None:
            self._first_logged = (step, now)
        first_step, first_time = self._first_logged
        if not self.total_steps or step <= first_step or step >= self.total_steps:
            return ""
        return f"  ETA {duration_words((now - first_time) / (step - first_step) * (self.total_steps - step))}"

    def _write_layout(self, metrics: dict) -> None:
        """TensorBoard's Custom Scalars charts: at the first logged step the loss with its
        terms, at the first evaluation also each evaluation beside its chance."""
        has_eval = any(k.startswith("eval/") for k in metrics)
        if self.layout_has_eval or (self._layout_written and not has_eval):
            return
        self.train_writer.add_custom_scalars(chart_layout(metrics))
        self._layout_written, self.layout_has_eval = True, has_eval

    def write_histograms(self, values: dict, step: int) -> None:
        """TensorBoard histograms (weights/..., gradients/..., latent/...) at this step."""
        for tag, tensor in values.items():
            self.train_writer.add_histogram(tag, tensor, step)
        self.train_writer.flush()

    def write_pictures(self, pictures: dict | None, step: int) -> None:
        """The decoder's predictions beside the truth (evaluate/pictures.py): the frame grid
        always, the audio plot where matplotlib is installed."""
        if pictures is None:
            return
        self.train_writer.add_image("predictions/video", pictures["video"], step, dataformats="HWC")
        try:
            from rigtrain.evaluate.pictures import audio_figure  # matplotlib inside: optional

            figure = audio_figure(*pictures["audio"], pictures["present_samples"])
        except ImportError:
            return
        self.train_writer.add_figure("predictions/audio", figure, step)

    def write_embedding(self, features, metadata: tuple[list[str], list[list[str]]], step: int) -> None:
        """The held-out clips' pooled video features into TensorBoard's projector, with
        their labels and narration as metadata, so the map can be coloured by label."""
        header, rows = metadata
        clean = [[" ".join(str(cell).split()) or "-" for cell in row] for row in rows]  # TSV: no tabs, no newlines
        self.train_writer.add_embedding(
            features, metadata=clean, metadata_header=header, global_step=step, tag="heldout_video"
        )

    def say(self, line: str) -> None:
        print(f"[rigtrain {time.perf_counter() - self.started:7.1f}s] {line}", file=sys.stdout, flush=True)

    def close(self) -> None:
        for handler in self._on_continue_before:
            signal.signal(signal.SIGCONT, handler if handler is not None else signal.SIG_DFL)
        self.file.close()
        self.train_writer.close()


def duration_words(seconds: float) -> str:
    """A wait as a person reads it: "40 s", "12 min 5 s", "3 h 07 min", "2 d 4 h"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s} s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {m:02d} min"
    days, h = divmod(hours, 24)
    return f"{days} d {h} h"


def chart_layout(keys) -> dict:
    """Custom Scalars: one chart per question. Each label's kNN and linear-probe top-1 with
    its chance level ("is it above chance?" on one chart, not three), each retrieval
    direction's R@5 with its chance, and the loss with all its terms. Tags are regular
    expressions there, so each is anchored."""
    keys = list(keys)

    def exact(tag: str) -> str:
        return f"^{re.escape(tag)}$"

    labels = sorted(
        k[len("eval/knn_") : -len("_top1")] for k in keys if k.startswith("eval/knn_") and k.endswith("_top1")
    )
    directions = sorted(
        k[len("eval/") : -len("_r5")] for k in keys if k.startswith("eval/") and k.endswith("_r5") and "chance" not in k
    )
    evaluation = {
        f"{label}: kNN and linear-probe top-1 against chance": [
            "Multiline",
            [exact(f"eval/knn_{label}_top1"), exact(f"eval/probe_{label}_top1"), exact(f"eval/knn_{label}_chance")],
        ]
        for label in labels
    }
    for direction in directions:
        evaluation[f"{direction} retrieval R@5 against chance"] = [
            "Multiline",
            [exact(f"eval/{direction}_r5"), exact(f"eval/{direction}_chance_r5")],
        ]
    layout = {"Loss": {"the loss and each of its terms": ["Multiline", ["^loss$", "^loss/"]]}}
    if evaluation:
        layout["Held-out evaluation"] = evaluation
    return layout


def _group(key: str) -> str:
    if key.startswith(("loss", "pc_")):
        return "loss"
    if key.startswith(("host_", "gpu_")):
        return "telemetry"
    return "train"
