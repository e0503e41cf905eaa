"""VATT tokenizers: video tubelets and raw audio segments through a Linear, text bytes through
an Embedding; each token gets a projected Fourier position code and a modality embedding."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from rigtrain.model.fourier import feature_size, fourier_features, grid_positions


def to_tubelets(video: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    """(B, T, H, W, C) -> (B, T/t * H/h * W/w, t*h*w*C), time-major, so the first tokens
    are the earliest in the clip."""
    return rearrange(video, "b (nt t) (nh h) (nw w) c -> b (nt nh nw) (t h w c)", t=t, h=h, w=w)


def to_segments(audio: torch.Tensor, s: int) -> torch.Tensor:
    """(B, S) -> (B, S/s, s)."""
    return rearrange(audio, "b (n s) -> b n s", s=s)


class PatchTokenizer(nn.Module):
    """Linear patch embedding + Linear(Fourier code of the patch position) + modality vector.
    The Fourier codes of every position of a clip are computed once (a buffer)."""

    def __init__(self, *, patch_dim: int, positions: torch.Tensor, bands: list[tuple[int, float]], d_model: int):
        super().__init__()
        self.patch = nn.Linear(patch_dim, d_model)
        self.register_buffer("codes", fourier_features(positions, bands), persistent=False)  # (N, F)
        self.position = nn.Linear(feature_size(bands), d_model)
        self.modality = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.modality, std=0.02)

    def forward(self, patches: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
        """patches (B, n, P) at positions codes[index] -> tokens (B, n, D). `index` is a
        slice (the same positions for every sample) or (B, n) indices."""
        pos = self.position(self.codes.to(patches.dtype))[index]  # (n, D) or (B, n, D)
        return self.patch(patches) + pos + self.modality


class TextTokenizer(nn.Module):
    """Raw UTF-8 bytes (Perceiver IO: no vocabulary to download, any language) -> tokens."""

    def __init__(self, *, max_bytes: int, bands: tuple[int, float], d_model: int):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.register_buffer("codes", fourier_features(grid_positions(max_bytes), [bands]), persistent=False)
        self.position = nn.Linear(feature_size([bands]), d_model)
        self.modality = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.modality, std=0.02)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, L) byte values -> (B, L, D)."""
        pos = self.position(self.codes[: text.shape[1]].to(self.embed.weight.dtype))
        return self.embed(text.long()) + pos + self.modality
