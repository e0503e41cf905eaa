"""Typed configs, one per part of rigtrain: the run's sections (train, rig, profile, eval), the
RunConfig that holds them all, and the model and clip sections from model_and_clips.py.
Field docstrings (the string under each field) are what `rigtrain train --help-config`
prints, so they say what a value means and when to change it. Every section validates
itself in `__post_init__` with a message naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field

from rigtrain.config.checks import ConfigError
from rigtrain.config.checks import require as _require
from rigtrain.config.model_and_clips import DataConfig, ModelConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ProfileConfig",
    "LogConfig",
    "RigConfig",
    "RunConfig",
    "TrainConfig",
    "SECTIONS",
    "field_docs",
]


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit")
OFFLOADS = ("none", "cpu")


@dataclass
class TrainConfig:
    """The DeepSpeed training run."""

    steps: int = 60
    "optimizer steps in total (a resumed run continues up to this number)"
    micro_batch_size: int = 16
    "clips per process per forward pass"
    grad_accum_steps: int = 1
    "micro-batches per optimizer step"
    global_batch_size: int = 0
    (
        "clips per optimizer step over all GPUs, which the plan reaches by accumulation; "
        "0 = micro_batch_size x grad_accum_steps"
    )
    lr: float = 1e-3
    "peak learning rate"
    min_lr_ratio: float = 0.1
    "the cosine schedule ends at lr * min_lr_ratio"
    warmup_steps: int = 10
    "linear warm-up steps"
    weight_decay: float = 0.05
    "AdamW weight decay (not applied to norms, biases and embeddings)"
    betas: tuple[float, float] = (0.9, 0.95)
    "AdamW betas"
    grad_clip: float = 1.0
    "clip the global gradient norm to this (0 = off)"
    precision: str = "auto"
    "auto | bf16 | fp16 | fp32; auto = bf16 on compute capability >= 8.0, fp16 on 7.x, else fp32"
    zero_stage: int = 1
    "DeepSpeed ZeRO stage 0-3"
    offload_optimizer: str = "none"
    "none | cpu: keep optimizer states in CPU RAM (ZeRO 1-3)"
    optimizer: str = "adamw"
    "adamw | adamw8bit (bitsandbytes)"
    nproc: int = 1
    "training processes on a CPU-only machine (gloo); GPUs always get one process each"
    ckpt_every: int = 50
    "save a checkpoint every this many steps (and at the end)"
    keep_ckpts: int = 2
    "complete checkpoints to keep; older ones are deleted"
    log_every: int = 1
    "write metrics every this many steps"
    seed: int = 0
    "seed of weights, data order and DropToken draws"
    max_nonfinite_steps: int = 5
    "stop when the loss is NaN/inf this many steps in a row (checked at logging steps)"
    max_skipped_steps: int = 20
    "stop when DeepSpeed skips the update (inf/NaN gradients, fp16 overflow) this many steps in a row"
    divergence_factor: float = 10.0
    "stop when a logged loss is above this many times the median of the last 10 logged; 0 = off"
    collective_timeout_min: float = 30.0
    (
        "stop when a rank has waited this many minutes for the others in one collective (a hung GPU, P2P link "
        "or disk on another rank); the first step, an evaluation and a checkpoint save must fit in it"
    )
    compile: bool = False
    (
        "torch.compile the training objective (the model's loss; evaluation runs uncompiled): fewer, fused "
        "kernels, after the first step spends minutes compiling; off at ZeRO-3"
    )

    def __post_init__(self) -> None:
        _require(self.global_batch_size >= 0, "train.global_batch_size", "must be 0 (from the micro-batch) or more")
        for key in ("steps", "micro_batch_size", "grad_accum_steps", "nproc", "ckpt_every", "keep_ckpts", "log_every"):
            _require(getattr(self, key) >= 1, f"train.{key}", "must be at least 1")
        _require(self.lr > 0, "train.lr", "must be positive")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be 0 or more")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be 0 or more")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be at least 1")
        _require(self.max_skipped_steps >= 1, "train.max_skipped_steps", "must be at least 1")
        _require(self.collective_timeout_min > 0, "train.collective_timeout_min", "must be more than 0 minutes")
        _require(
            self.divergence_factor == 0 or self.divergence_factor > 1,
            "train.divergence_factor",
            "must be more than 1, or 0 to switch the rule off",
        )
        _require(self.precision in PRECISIONS, "train.precision", f"choose one of {', '.join(PRECISIONS)}")
        _require(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "choose 0, 1, 2 or 3")
        _require(self.offload_optimizer in OFFLOADS, "train.offload_optimizer", f"choose one of {', '.join(OFFLOADS)}")
        _require(
            not (self.offload_optimizer == "cpu" and self.zero_stage == 0),
            "train.offload_optimizer",
            "CPU offload needs ZeRO stage 1 or more: also set train.zero_stage",
        )
        _require(self.optimizer in OPTIMIZERS, "train.optimizer", f"choose one of {', '.join(OPTIMIZERS)}")


@dataclass
class RigConfig:
    """Which hardware a run uses."""

    gpus: tuple[int, ...] = ()
    "GPU indices to train on, e.g. 0,2 (PCI bus order); empty = all"

    def __post_init__(self) -> None:
        _require(all(g >= 0 for g in self.gpus), "rig.gpus", "GPU indices are 0 or more, e.g. 0,2")
        _require(len(set(self.gpus)) == len(self.gpus), "rig.gpus", "a GPU is listed twice")


@dataclass
class ProfileConfig:
    """Profiling: torch.profiler over a few steps of a run, and GPU telemetry in every run."""

    enabled: bool = False
    "record steps into tb/profile and write profile/summary.json (rigtrain profile turns it on)"
    start_step: int = 2
    "optimizer steps skipped before the schedule starts (start-up is not what a run looks like)"
    wait: int = 0
    "steps of the schedule that are skipped"
    warmup: int = 1
    "steps traced but thrown away (the profiler's own start-up)"
    active: int = 3
    "steps recorded and analysed"
    record_shapes: bool = True
    "record operator input shapes (cheap; the Operator view groups by them)"
    with_stack: bool = False
    "record Python stacks (costly: off unless you need the source lines)"
    profile_memory: bool = False
    "record allocations for the Memory view (costly)"
    telemetry_hz: float = 2.0
    "how often the background sampler reads GPU (or host) telemetry"

    def __post_init__(self) -> None:
        _require(self.start_step >= 0, "profile.start_step", "must be 0 or more")
        _require(self.wait >= 0, "profile.wait", "must be 0 or more")
        _require(
            self.warmup >= 1,
            "profile.warmup",
            "must be at least 1 (the first traced step carries the profiler's own start-up)",
        )
        _require(
            1 <= self.active <= 50, "profile.active", "must be 1 to 50 (long traces make the TensorBoard plugin hang)"
        )
        _require(0 < self.telemetry_hz <= 20, "profile.telemetry_hz", "must be more than 0 and at most 20")

    @property
    def last_step(self) -> int:
        """The last optimizer step the schedule records."""
        return self.start_step + self.wait + self.warmup + self.active


@dataclass
class LogConfig:
    """What is logged beside the metrics, for looking inside the model while it trains."""

    grad_norms: bool = True
    (
        "at every logged step, the L2 norm of each part's gradient (tokenizers, encoder, evolver, decoder, "
        "heads; from the last micro-batch, averaged over ranks)"
    )
    histograms_every: int = 500
    (
        "every this many steps: histograms of each part's weights and gradients and of the encoder's latent "
        "in TensorBoard; 0 = never"
    )

    def __post_init__(self) -> None:
        _require(
            isinstance(self.histograms_every, int) and self.histograms_every >= 0,
            "log.histograms_every",
            "must be a whole number, 0 or more (0 = no histograms)",
        )


@dataclass
class EvalConfig:
    """Evaluation: held-out clips, kNN and linear probe per label, text-video retrieval."""

    holdout: float = 0.2
    (
        "fraction of source videos held out (never trained on), picked by a hash of the file name, so adding "
        "videos never moves one across"
    )
    during_training: bool = True
    "evaluate while training, on a schedule that spaces out, and at the last step"
    first_step: int = 10
    "the first evaluation during training; later ones at first_step x growth^k"
    growth: float = 2.0
    (
        "how much longer each wait between evaluations is than the last (an exponential schedule: frequent "
        "early, when the curve moves fast)"
    )
    knn_k: int = 20
    "neighbours of the weighted kNN (DINO: 20)"
    knn_temperature: float = 0.07
    "temperature of the kNN vote weights exp(similarity / T) (DINO: 0.07)"
    max_clips: int = 4096
    "at most this many training clips (the kNN bank and probe set) and held-out clips are encoded"

    def __post_init__(self) -> None:
        _require(0.0 <= self.holdout < 1.0, "eval.holdout", "must be in [0, 1); 0 = no held-out clips, no eval")
        _require(self.first_step >= 1, "eval.first_step", "must be at least 1")
        _require(self.growth >= 1.0, "eval.growth", "must be 1 (evenly spaced) or more")
        _require(self.knn_k >= 1, "eval.knn_k", "must be at least 1")
        _require(0.0 < self.knn_temperature <= 1.0, "eval.knn_temperature", "must be in (0, 1]")
        _require(self.max_clips >= 2, "eval.max_clips", "must be at least 2")

    def steps(self, total: int) -> list[int]:
        """Steps after which to evaluate during a run of `total` steps: first_step x growth^k
        (each wait `growth` times the last; growth 1 = every first_step steps), then the last."""
        out, k = [], 0
        while True:
            step = round(self.first_step * self.growth**k) if self.growth > 1.0 else self.first_step * (k + 1)
            if step >= total:
                return out + [total]
            if not out or step > out[-1]:
                out.append(step)
            k += 1


@dataclass
class RunConfig:
    """Everything a run needs; what config.json records."""

    preset: str = "demo"
    "the preset this config started from"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rig: RigConfig = field(default_factory=RigConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _require(
            not self.profile.enabled or self.profile.last_step <= self.train.steps,
            "profile.active",
            f"the schedule ends at step {self.profile.last_step} (start_step + wait + warmup + active) "
            f"but train.steps is {self.train.steps}; train longer or shorten the schedule",
        )
        # Checks that involve two sections: the tubelet must tile the clip exactly, or the
        # decoder would predict positions that do not exist.
        t, h, w = self.model.tubelet
        height, width = self.data.frame_size
        for key, frames in (
            ("data.present_frames", self.data.present_frames),
            ("data.future_frames", self.data.future_frames),
        ):
            _require(frames % t == 0, key, f"{frames} frames are not a multiple of model.tubelet t={t}")
        _require(
            height % h == 0 and width % w == 0,
            "data.frame_size",
            f"{height}x{width} is not a multiple of the tubelet {h}x{w} (model.tubelet)",
        )
        present, future = self.data.present_samples, self.data.window_samples - self.data.present_samples
        seg = self.model.audio_segment
        _require(
            present % seg == 0 and future % seg == 0,
            "model.audio_segment",
            f"the present ({present}) and future ({future}) audio samples must be multiples of "
            f"{seg}; change model.audio_segment or data.sample_rate",
        )
        d = self.data
        if d.recurrent_windows > 1:
            _require(
                d.window_step % t == 0,
                "data.window_step_frames",
                f"the window step of {d.window_step} frames is not a multiple of model.tubelet t={t}",
            )
            exact = d.window_step / d.fps * d.sample_rate
            _require(
                abs(exact - round(exact)) < 1e-6 and round(exact) % seg == 0,
                "data.window_step_frames",
                f"a step of {d.window_step} frames is {exact:g} audio samples, which must be a whole multiple "
                f"of model.audio_segment={seg}",
            )
        _require(
            self.model.blind_windows < d.recurrent_windows,
            "model.blind_windows",
            f"{self.model.blind_windows} blind windows leave none of the {d.recurrent_windows} scored; "
            "lower it or raise data.recurrent_windows",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "rig": RigConfig,
    "profile": ProfileConfig,
    "eval": EvalConfig,
    "log": LogConfig,
}


def field_docs(cls: type) -> dict[str, str]:
    """The string under each field, read from the source, so `--help-config` and the code
    cannot disagree."""

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value
    return docs
