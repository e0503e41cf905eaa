"""Fourier position codes of the Perceiver: for a position p in [-1, 1] on one axis, K bands
with frequencies linspace(1, mu/2, K) give [p, sin(pi f p), cos(pi f p)] (2K+1 numbers)."""

from __future__ import annotations

import math

import torch


def axis_positions(n: int) -> torch.Tensor:
    """n evenly spaced positions covering [-1, 1] (one point sits at 0)."""
    return torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1)


def fourier_features(positions: torch.Tensor, bands: list[tuple[int, float]]) -> torch.Tensor:
    """positions (N, A) in [-1, 1], one (K, mu) per axis -> (N, sum_a 2*K_a + 1)."""
    assert positions.shape[-1] == len(bands), "one (K, mu) per axis"
    parts = []
    for axis, (num_bands, max_freq) in enumerate(bands):
        pos = positions[:, axis : axis + 1]  # (N, 1)
        freqs = torch.linspace(1.0, max_freq / 2.0, num_bands, dtype=positions.dtype)  # (K,)
        angles = math.pi * pos * freqs  # (N, K)
        parts += [pos, torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=-1)


def feature_size(bands: list[tuple[int, float]]) -> int:
    return sum(2 * k + 1 for k, _ in bands)


def grid_positions(*sizes: int) -> torch.Tensor:
    """All points of a grid, row-major (last axis fastest): (prod(sizes), len(sizes))."""
    axes = torch.meshgrid(*[axis_positions(n) for n in sizes], indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=-1)
