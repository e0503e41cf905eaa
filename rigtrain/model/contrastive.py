"""VATT's contrastive objectives (docs/model.md, "The loss terms"): NCE between video and audio, MIL-NCE
between video and the narration segments that overlap it, on L2-normalised embeddings
with temperature tau. A clip missing a modality is masked out of the loss, never filled in.

Negatives come from every rank: `gather_across_ranks` all-gathers the embeddings with their
gradients, and each rank computes the loss over the whole gathered batch, so two GPUs see
twice the negatives. Every rank then holds the same loss value L. all_gather's backward sums
the gradient over ranks, so rank r's embeddings get world x dL/dx_r; DeepSpeed averages the
parameter gradients over ranks, which divides that factor away: the update is exactly the
gradient of L over the whole batch (tested against one rank with the whole batch).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Masked logits: far below any real one (|similarity / tau| <= 1 / 0.07 < 15), but finite, so
# a row with nothing valid yields a finite loss and zero gradient rather than NaN.
MASKED = -1e4


class Float32Linear(nn.Linear):
    """A Linear that computes in float32 whatever dtype its weights are stored in.

    Why: the contrastive embeddings of different clips share a large common part (the
    shared encoder starts every clip from the same latent array), and what tells clips
    apart is a small difference on top of it. bf16 keeps 8 bits of mantissa, so rounding
    the pooled latent or a head's output to bf16 adds noise of about 0.4% of the common
    part, which swamps that difference once the batch mean is subtracted (measured: the
    demo's NCE and MIL-NCE stalled in bf16 while predictive coding trained). The weights
    stay in the training dtype (DeepSpeed keeps fp32 master copies); only the activations
    from the pooled latent to the loss are float32. The upcast happens inside forward, after
    ZeRO-3 has gathered the parameters, and autocast is off there: under bf16 training it
    would otherwise run this matmul in bf16 whatever its inputs are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with without_autocast(x):
            return F.linear(x.float(), self.weight.float(), bias)


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (see Float32Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with without_autocast(x):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


# Asked once, here: torch 2.11's torch.compile cannot trace torch.amp.is_autocast_available
# (a C builtin), and broke the compiled graph at every float32 island (seen on an H200).
AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d))


def without_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """torch.autocast switched off for x's device: what runs inside computes in the dtypes
    it is given (the float32 islands of bf16 training, docs/training.md "Precision").
    Nothing to switch off on devices autocast does not know (meta, where the planner and
    the FLOP count build the model)."""
    if x.device.type not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradient over ranks (all_reduce) and keeps
    this rank's slice. Ours rather than torch.distributed.nn's, whose gloo backward (an
    all-to-all) scrambled the gradient of 3-d tensors in our two-rank test, and which is
    deprecated; embeddings are small, so the all_reduce costs nothing that matters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, with gradients flowing back to
    each rank's own part. The identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGradient.apply(x)


def nce_loss(video: torch.Tensor, audio: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NCE (InfoNCE) between paired embeddings.

    video, audio (B, E), L2-normalised; valid (B,) bool: the clip has both. For each valid
    clip i, with s_ij = video_i . audio_j / tau over valid j:
        L = 1/2 mean_i [ -log softmax_j(s_ij)[i]  -log softmax_j(s_ji)[i] ]
    Clips that are not valid are neither anchors nor negatives. Zero when no clip is valid."""
    video, audio, valid = video.float(), audio.float(), valid.bool()
    with without_autocast(video):  # float32 similarities, also under bf16 training
        logits = video @ audio.T / temperature  # (B, B)
    pair = valid[:, None] & valid[None, :]
    logits = logits.masked_fill(~pair, MASKED)
    diagonal = logits.diagonal()
    video_to_audio = torch.logsumexp(logits, dim=1) - diagonal  # (B,)
    audio_to_video = torch.logsumexp(logits, dim=0) - diagonal
    per_clip = torch.where(valid, 0.5 * (video_to_audio + audio_to_video), torch.zeros_like(diagonal))
    return per_clip.sum() / valid.sum().clamp(min=1)


def mil_nce_loss(video: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """MIL-NCE (Miech et al. 2020) between clips and their narration segments.

    video (B, E) and text (B, M, E), L2-normalised; text_valid (B, M): segment k of clip i
    exists. With s(i, j, k) = video_i . text_jk / tau, each clip i with a segment scores
        L_i = -log( sum_k exp s(i,i,k) / [ sum_{j,k} exp s(i,j,k) + sum_{j != i, k} exp s(j,i,k) ] )
    over valid segments only: its own segments are the positives (several: a clip overlaps
    more than one), every other clip's segments are negatives for its video, and every other
    clip's video is a negative for its segments. L = mean_i L_i; zero when no clip has text."""
    video, text, text_valid = video.float(), text.float(), text_valid.bool()
    B, M, _ = text.shape
    with without_autocast(video):  # float32 similarities, also under bf16 training
        scores = torch.einsum("ie,jke->ijk", video, text) / temperature  # (B, B, M): video i vs segment k of clip j
    scores = scores.masked_fill(~text_valid[None, :, :], MASKED)
    own = torch.eye(B, dtype=torch.bool, device=video.device)
    positives = torch.logsumexp(scores.diagonal(dim1=0, dim2=1).T, dim=1)  # (B,): over clip i's segments
    video_side = scores.reshape(B, B * M)  # clip i's video against every segment
    text_side = (
        scores.transpose(0, 1).masked_fill(own[:, :, None], MASKED).reshape(B, B * M)
    )  # others' videos vs i's segments
    denominator = torch.logsumexp(torch.cat([video_side, text_side], dim=1), dim=1)
    has_text = text_valid.any(dim=1)
    per_clip = torch.where(has_text, denominator - positives, torch.zeros_like(positives))
    return per_clip.sum() / has_text.sum().clamp(min=1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
