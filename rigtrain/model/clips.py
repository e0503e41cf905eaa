"""What the model knows of a clip's shape (ClipGeometry, from the DataConfig), and the random
draws over tokens: DropToken's kept tokens and the future positions scored in training.
Every draw keeps a fixed count per sample, so a batch stays rectangular and every step has
the same shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rigtrain.config import DataConfig


@dataclass(frozen=True)
class ClipGeometry:
    """What the model needs to know about a clip's shape. A window is present + future;
    a clip holds `windows` of them, each `step_frames` (`step_samples`) after the last."""

    present_frames: int
    future_frames: int
    height: int
    width: int
    present_samples: int
    future_samples: int
    max_text_bytes: int
    windows: int = 1
    step_frames: int = 0
    step_samples: int = 0

    @classmethod
    def from_data(cls, data: DataConfig) -> ClipGeometry:
        return cls(
            present_frames=data.present_frames,
            future_frames=data.future_frames,
            height=data.frame_size[0],
            width=data.frame_size[1],
            present_samples=data.present_samples,
            future_samples=data.window_samples - data.present_samples,
            max_text_bytes=data.max_text_bytes,
            windows=data.recurrent_windows,
            step_frames=data.window_step,
            step_samples=data.window_step_samples,
        )

    @property
    def frames(self) -> int:
        """Frames of one window."""
        return self.present_frames + self.future_frames

    @property
    def samples(self) -> int:
        """Audio samples of one window."""
        return self.present_samples + self.future_samples


def random_subset(
    num_tokens: int, k: int, batch: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each sample its own k of num_tokens indices, uniformly without replacement: (B, k)."""
    scores = torch.rand(batch, num_tokens, device=device, generator=generator)
    return scores.argsort(dim=1)[:, :k]


def drop_tokens(
    num_tokens: int, keep: float, batch: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DropToken (VATT): the indices (B, k) of the k = round(keep * n) tokens each sample
    keeps. A fixed k keeps the batch rectangular."""
    return random_subset(num_tokens, max(1, round(keep * num_tokens)), batch, device, generator)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, n, P), index (B, k) -> (B, k, P)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
