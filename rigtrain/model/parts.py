"""The model's parts by name, for statistics per part (gradient norms, histograms): the
tokenizers, the encoder (learned latents, cross-attention, self-attention), the evolver,
the decoder (queries, blocks, heads that predict patches and audio) and the contrastive
heads (MODEL.md's sections in docs/model.md)."""

from __future__ import annotations

import torch
from torch import nn

PARTS: dict[str, tuple[str, ...]] = {
    "tokenizers": ("video_tokenizer", "audio_tokenizer", "text_tokenizer"),
    "encoder": ("latents", "encoder_cross", "encoder_self"),
    "evolver": ("evolver",),
    "decoder": ("video_query", "audio_query", "decoder", "decoder_norm", "video_head", "audio_head"),
    "heads": ("pool_norm", "video_to_va", "audio_to_va", "va_to_vt", "text_to_vt"),
}


def part_of(parameter_name: str) -> str:
    top = parameter_name.split(".")[0]
    return next((part for part, names in PARTS.items() if top in names), "other")


def parameter_parts(model: nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Each part's trainable parameters, in the model's order; parts without any are left out."""
    parts: dict[str, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parts.setdefault(part_of(name), []).append(parameter)
    return parts
