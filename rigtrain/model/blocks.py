"""Pre-LayerNorm attention blocks. Attention runs through scaled_dot_product_attention, which
picks the Flash or memory-efficient kernel on a GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    def __init__(self, *, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) attends to context (B, M, D); key_mask (B, M) is True where a key is real."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h n d -> b n (h d)"))


class MLP(nn.Sequential):
    def __init__(self, *, d_model: int, ratio: int, dropout: float):
        super().__init__(
            nn.Linear(d_model, ratio * d_model), nn.GELU(), nn.Linear(ratio * d_model, d_model), nn.Dropout(dropout)
        )


class CrossAttentionBlock(nn.Module):
    """Queries x read from a context: the encoder (latents <- tokens) and decoder
    (position queries <- latents) both use it."""

    def __init__(self, *, d_model: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.attn = Attention(d_model=d_model, heads=heads, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model=d_model, ratio=mlp_ratio, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context), key_mask)
        return x + self.mlp(self.norm_mlp(x))


class SelfAttentionBlock(nn.Module):
    def __init__(self, *, d_model: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model=d_model, heads=heads, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model=d_model, ratio=mlp_ratio, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.norm_mlp(x))


def run_block(block: nn.Module, *args: torch.Tensor | None, checkpointed: bool) -> torch.Tensor:
    """Run a block, recomputing its activations in the backward pass when `checkpointed`:
    only its inputs are kept, which is what lets the rig planner trade compute for batch."""
    if checkpointed and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
