"""The config sections that shape the model and the clips it reads: ModelConfig (the
Perceiver, docs/model.md) and DataConfig (how videos become clips, shared by `data prepare`
and training). Field docstrings (the string under each field) are what `--help-config`
prints."""

from __future__ import annotations

from dataclasses import dataclass

from rigtrain.config.checks import require as _require


@dataclass
class ModelConfig:
    """The multimodal predictive-coding Perceiver (docs/model.md)."""

    tubelet: tuple[int, int, int] = (2, 8, 8)
    "video token size in frames, pixels high, pixels wide (VATT tubelet t×h×w)"
    audio_segment: int = 200
    "audio samples per audio token"
    d_model: int = 128
    "width of latents and tokens"
    num_latents: int = 32
    "number of latent vectors N (the Perceiver bottleneck)"
    heads: int = 4
    "attention heads in every block"
    mlp_ratio: int = 4
    "MLP hidden width as a multiple of d_model"
    enc_layers: int = 2
    "latent self-attention blocks after each encoder cross-attention"
    evo_layers: int = 1
    "self-attention blocks of the latent evolver (present latent -> future latent)"
    evolver_shared: bool = False
    "apply one evolver block evo_layers times instead of distinct blocks"
    dec_layers: int = 1
    "decoder cross-attention blocks (queries attend to the latent)"
    exposures: int = 1
    "encoder rounds over the input, each with its own DropToken draw (re-exposure)"
    same_droptoken_draw: bool = False
    "re-use the first DropToken draw in every exposure instead of drawing again"
    droptoken_keep: float = 0.5
    "fraction of video and audio tokens kept in training (DropToken)"
    future_query_prob: float = 0.1
    "probability that a future token is decoded (and scored) in training"
    alpha: float = 0.7
    "loss weight of the present window; the future gets 1 - alpha"
    blind_windows: int = 0
    "recurrent windows at the start of a clip whose predictions are not scored (the latent is still warming up)"
    weight_pc: float = 1.0
    "weight of the predictive-coding loss in the total"
    weight_va: float = 1.0
    "weight of the video-audio NCE loss (0 = off: no audio head)"
    weight_vt: float = 1.0
    "weight of the video-narration MIL-NCE loss (0 = off: no text head, no retrieval in eval)"
    va_dim: int = 512
    "size of the video-audio space of the contrastive heads (VATT: 512)"
    vt_dim: int = 256
    "size of the video-text space, reached from the video-audio space (VATT's FAC: 256)"
    temperature: float = 0.07
    "softmax temperature of both contrastive losses"
    fourier_space: tuple[int, int] = (15, 20)
    "Fourier bands K and max frequency mu for the y and x axes"
    fourier_time: tuple[int, int] = (64, 200)
    "Fourier bands K and max frequency mu for time (video and audio)"
    fourier_text: tuple[int, int] = (32, 256)
    "Fourier bands K and max frequency mu for the byte index of narration"
    dropout: float = 0.0
    "dropout in attention and MLP outputs"
    activation_checkpointing: bool = False
    "recompute each block in the backward pass (less memory, about 30% more compute)"

    def __post_init__(self) -> None:
        _require(
            len(self.tubelet) == 3 and min(self.tubelet) >= 1,
            "model.tubelet",
            "give three positive sizes t,h,w, e.g. --set model.tubelet=2,8,8",
        )
        _require(self.audio_segment >= 1, "model.audio_segment", "must be at least 1")
        for key in ("d_model", "num_latents", "heads", "mlp_ratio", "exposures", "va_dim", "vt_dim"):
            _require(getattr(self, key) >= 1, f"model.{key}", "must be at least 1")
        for key in ("enc_layers", "evo_layers", "dec_layers"):
            _require(getattr(self, key) >= 0, f"model.{key}", "must be 0 or more")
        _require(self.dec_layers >= 1, "model.dec_layers", "the decoder needs at least 1 block")
        _require(
            self.d_model % self.heads == 0,
            "model.heads",
            f"d_model={self.d_model} must be divisible by heads={self.heads}",
        )
        _require(0.0 < self.droptoken_keep <= 1.0, "model.droptoken_keep", "must be in (0, 1]")
        _require(0.0 <= self.future_query_prob <= 1.0, "model.future_query_prob", "must be in [0, 1]")
        _require(0.0 <= self.alpha <= 1.0, "model.alpha", "must be in [0, 1]")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(self.blind_windows >= 0, "model.blind_windows", "must be 0 or more")
        _require(
            self.weight_pc > 0,
            "model.weight_pc",
            "must be positive: predictive coding is what trains the decoder and evolver (make it small rather than 0)",
        )
        for key in ("weight_va", "weight_vt"):
            _require(getattr(self, key) >= 0, f"model.{key}", "must be 0 (off) or positive")
        _require(0.0 < self.temperature <= 1.0, "model.temperature", "must be in (0, 1]; VATT uses 0.07")
        for key in ("fourier_space", "fourier_time", "fourier_text"):
            bands, mu = getattr(self, key)
            _require(bands >= 1 and mu >= 2, f"model.{key}", "give K>=1 bands and mu>=2, e.g. 15,20")


@dataclass
class DataConfig:
    """Clips: how videos become training samples (shared by `data prepare` and training)."""

    dir: str = ""
    "prepared shards or a folder of videos; empty = the embedded Shapes-world dataset"
    fps: float = 8.0
    "frames per second after resampling in time"
    frame_size: tuple[int, int] = (32, 32)
    "frame height, width after resizing (the aspect is kept: see data.resize)"
    resize: str = "crop"
    "crop = cut the centre to the target aspect; pad = letterbox the whole frame in black"
    present_frames: int = 4
    "frames in the present window of a clip"
    future_frames: int = 4
    "frames in the future window that follows it"
    recurrent_windows: int = 1
    "present+future windows per clip; the latent is carried from one to the next (a longer clip)"
    window_step_frames: int = 0
    (
        "frames from one window's start to the next (the window increment of predictive coding over a sliding "
        "window); 0 = present_frames"
    )
    sample_rate: int = 8000
    "audio samples per second after resampling"
    clip_stride_s: float = 0.0
    "seconds between clip starts; 0 = clips do not overlap"
    max_text_bytes: int = 128
    "narration bytes kept per clip (UTF-8; longer text is cut)"
    segments_per_clip: int = 2
    (
        "narration segments of a clip the video-narration loss reads (the first ones in time); each is a row of "
        "every step's text batch, used or not, so shapes stay the same from step to step"
    )
    workers: int = -1
    "dataloader worker processes per training process; -1 = from the CPU cores"
    prefetch_factor: int = 4
    "batches each worker prepares ahead"
    shard_clips: int = 256
    "clips per shard written by data prepare"
    synth_videos: int = 48
    "videos in the embedded Shapes-world dataset"
    synth_seed: int = 0
    "seed of the embedded Shapes-world dataset"

    def __post_init__(self) -> None:
        # a clip of 1e-320 fps lasts forever: an overflow, not a clip
        _require(0.01 <= self.fps <= 1000, "data.fps", "must be 0.01 to 1000 frames per second")
        _require(
            len(self.frame_size) == 2 and min(self.frame_size) >= 1,
            "data.frame_size",
            "give height,width, e.g. --set data.frame_size=32,32",
        )
        _require(self.present_frames >= 1, "data.present_frames", "must be at least 1")
        _require(self.future_frames >= 1, "data.future_frames", "must be at least 1")
        _require(self.recurrent_windows >= 1, "data.recurrent_windows", "must be at least 1")
        _require(self.window_step_frames >= 0, "data.window_step_frames", "must be 0 (= present_frames) or more")
        _require(self.sample_rate >= 1000, "data.sample_rate", "must be at least 1000 Hz")
        _require(self.clip_stride_s >= 0, "data.clip_stride_s", "must be 0 or positive")
        _require(self.max_text_bytes >= 1, "data.max_text_bytes", "must be at least 1")
        _require(1 <= self.segments_per_clip <= 8, "data.segments_per_clip", "must be 1 to 8")
        _require(self.resize in ("crop", "pad"), "data.resize", "must be crop or pad")
        _require(self.workers >= -1, "data.workers", "must be -1 (from the cores), 0 (in the training process) or more")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor", "must be at least 1")
        _require(self.shard_clips >= 1, "data.shard_clips", "must be at least 1")
        _require(self.synth_videos >= 1, "data.synth_videos", "must be at least 1")

    @property
    def window_frames(self) -> int:
        """Frames of one present+future window."""
        return self.present_frames + self.future_frames

    @property
    def window_step(self) -> int:
        return self.window_step_frames or self.present_frames

    @property
    def clip_frames(self) -> int:
        """Frames of a clip: one window, and a step more for every further recurrent window."""
        return self.window_frames + (self.recurrent_windows - 1) * self.window_step

    @property
    def window_samples(self) -> int:
        return round(self.window_frames / self.fps * self.sample_rate)

    @property
    def window_step_samples(self) -> int:
        return round(self.window_step / self.fps * self.sample_rate)

    @property
    def clip_seconds(self) -> float:
        return self.clip_frames / self.fps

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def present_samples(self) -> int:
        return round(self.present_frames / self.fps * self.sample_rate)

    @property
    def stride_seconds(self) -> float:
        return self.clip_stride_s or self.clip_seconds

    @property
    def stride_frames(self) -> float:
        return self.stride_seconds * self.fps
