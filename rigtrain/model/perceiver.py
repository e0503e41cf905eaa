"""The multimodal predictive-coding Perceiver (MODEL.md, seed documents 000 and 004).

    tokens(present video, present audio, narration) --DropToken--> encoder --> latent z
    evolver(z) --> z' (the predicted latent of the future window)
    decoder(Fourier queries of present positions, z)  --> present patches
    decoder(Fourier queries of sampled future positions, z') --> future patches

Shapes: B clips, D = d_model, N = num_latents, P = patch size of a modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rigtrain.config import DataConfig, ModelConfig
from rigtrain.model.blocks import CrossAttentionBlock, SelfAttentionBlock, run_block
from rigtrain.model.fourier import feature_size, fourier_features, grid_positions
from rigtrain.model.losses import masked_mse, normalize_patches, predictive_coding_loss
from rigtrain.model.tokenizers import PatchTokenizer, TextTokenizer, to_segments, to_tubelets

# Frames arrive as uint8 and are normalised on the device (mean/std of natural images), so
# only bytes cross the PCIe bus.
PIXEL_MEAN, PIXEL_STD = 0.45, 0.225


@dataclass(frozen=True)
class ClipGeometry:
    """What the model needs to know about a clip's shape."""

    present_frames: int
    future_frames: int
    height: int
    width: int
    present_samples: int
    future_samples: int
    max_text_bytes: int

    @classmethod
    def from_data(cls, data: DataConfig) -> "ClipGeometry":
        return cls(present_frames=data.present_frames, future_frames=data.future_frames,
                   height=data.frame_size[0], width=data.frame_size[1],
                   present_samples=data.present_samples,
                   future_samples=data.clip_samples - data.present_samples,
                   max_text_bytes=data.max_text_bytes)

    @property
    def frames(self) -> int:
        return self.present_frames + self.future_frames

    @property
    def samples(self) -> int:
        return self.present_samples + self.future_samples


def random_subset(num_tokens: int, k: int, batch: int, device: torch.device,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """For each sample its own k of num_tokens indices, uniformly without replacement: (B, k)."""
    scores = torch.rand(batch, num_tokens, device=device, generator=generator)
    return scores.argsort(dim=1)[:, :k]


def drop_tokens(num_tokens: int, keep: float, batch: int, device: torch.device,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DropToken (VATT): the indices (B, k) of the k = round(keep * n) tokens each sample
    keeps. A fixed k keeps the batch rectangular."""
    return random_subset(num_tokens, max(1, round(keep * num_tokens)), batch, device, generator)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, n, P), index (B, k) -> (B, k, P)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


class PredictiveCodingPerceiver(nn.Module):
    def __init__(self, config: ModelConfig, geometry: ClipGeometry):
        super().__init__()
        self.config, self.geometry = config, geometry
        c, g = config, geometry
        t, h, w = c.tubelet
        d = c.d_model
        self.grid = (g.frames // t, g.height // h, g.width // w)  # tubelets along (time, y, x)
        self.video_present = (g.present_frames // t) * self.grid[1] * self.grid[2]
        self.audio_tokens = g.samples // c.audio_segment
        self.audio_present = g.present_samples // c.audio_segment

        video_bands = [tuple(c.fourier_time), tuple(c.fourier_space), tuple(c.fourier_space)]
        audio_bands = [tuple(c.fourier_time)]
        video_pos = grid_positions(*self.grid)  # (Nv, 3): time spans the whole clip
        audio_pos = grid_positions(self.audio_tokens)  # (Na, 1)
        self.video_tokenizer = PatchTokenizer(patch_dim=t * h * w * 3, positions=video_pos, bands=video_bands, d_model=d)
        self.audio_tokenizer = PatchTokenizer(patch_dim=c.audio_segment, positions=audio_pos, bands=audio_bands, d_model=d)
        self.text_tokenizer = TextTokenizer(max_bytes=g.max_text_bytes, bands=tuple(c.fourier_text), d_model=d)

        block = dict(d_model=d, heads=c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout)
        self.latents = nn.Parameter(torch.randn(c.num_latents, d) * 0.02)  # learned initial latent
        self.encoder_cross = CrossAttentionBlock(**block)
        self.encoder_self = nn.ModuleList(SelfAttentionBlock(**block) for _ in range(c.enc_layers))
        n_evo = min(1, c.evo_layers) if c.evolver_shared else c.evo_layers
        self.evolver = nn.ModuleList(SelfAttentionBlock(**block) for _ in range(n_evo))

        # Decoder queries: the same Fourier codes as the inputs, projected by their own
        # Linear, plus a learned query vector per modality.
        self.register_buffer("video_query_codes", fourier_features(video_pos, video_bands), persistent=False)
        self.register_buffer("audio_query_codes", fourier_features(audio_pos, audio_bands), persistent=False)
        self.video_query = nn.Linear(feature_size(video_bands), d)
        self.audio_query = nn.Linear(feature_size(audio_bands), d)
        self.decoder = nn.ModuleList(CrossAttentionBlock(**block) for _ in range(c.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.video_head = nn.Linear(d, t * h * w * 3)
        self.audio_head = nn.Linear(d, c.audio_segment)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # -- pieces -------------------------------------------------------------------------------
    def _block(self, block: nn.Module, *args) -> torch.Tensor:
        return run_block(block, *args, checkpointed=self.config.activation_checkpointing)

    def patches(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 video (B, T, H, W, 3) and int16 audio (B, S) -> float patches
        video (B, Nv, t*h*w*3) in [0, 1] and audio (B, Na, s) in [-1, 1]."""
        t, h, w = self.config.tubelet
        video = batch["video"].float() / 255.0
        audio = batch["audio"].float() / 32768.0
        return to_tubelets(video, t, h, w), to_segments(audio, self.config.audio_segment)

    def encode(self, batch: dict[str, torch.Tensor], video: torch.Tensor, audio: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Present-window patches (+ narration) -> latent (B, N, D)."""
        dtype = self.latents.dtype
        B, device = video.shape[0], video.device
        video_tok = self.video_tokenizer(((video - PIXEL_MEAN) / PIXEL_STD).to(dtype), slice(0, video.shape[1]))
        audio_tok = self.audio_tokenizer(audio.to(dtype), slice(0, audio.shape[1]))
        text = batch["text"]
        text_tok = self.text_tokenizer(text)  # (B, L, D)
        text_mask = torch.arange(text.shape[1], device=device)[None, :] < batch["text_len"][:, None]  # (B, L)
        has_audio = batch["has_audio"].bool()

        latent = self.latents.expand(B, -1, -1)
        keep = self.config.droptoken_keep if self.training else 1.0
        draw = None
        for _ in range(self.config.exposures):
            if draw is None or not self.config.same_droptoken_draw:
                draw = (drop_tokens(video_tok.shape[1], keep, B, device, generator),
                        drop_tokens(audio_tok.shape[1], keep, B, device, generator))
            v, a = _gather(video_tok, draw[0]), _gather(audio_tok, draw[1])
            tokens = torch.cat([v, a, text_tok], dim=1)  # (B, kv + ka + L, D)
            mask = torch.cat([torch.ones(v.shape[:2], dtype=torch.bool, device=device),
                              has_audio[:, None].expand(-1, a.shape[1]), text_mask], dim=1)
            latent = self._block(self.encoder_cross, latent, tokens, mask)
            for block in self.encoder_self:
                latent = self._block(block, latent)
        return latent

    def evolve(self, latent: torch.Tensor) -> torch.Tensor:
        """Present latent -> predicted future latent (B, N, D)."""
        for i in range(self.config.evo_layers):
            latent = self._block(self.evolver[0 if self.config.evolver_shared else i], latent)
        return latent

    def decode(self, latent: torch.Tensor, video_index: torch.Tensor, audio_index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the patches at the given positions (B, kv) and (B, ka) from a latent."""
        dtype = latent.dtype
        vq = self.video_query(self.video_query_codes.to(dtype))[video_index]  # (B, kv, D)
        aq = self.audio_query(self.audio_query_codes.to(dtype))[audio_index]  # (B, ka, D)
        queries = torch.cat([vq, aq], dim=1)
        for block in self.decoder:
            queries = self._block(block, queries, latent)
        queries = self.decoder_norm(queries)
        kv = video_index.shape[1]
        return self.video_head(queries[:, :kv]), self.audio_head(queries[:, kv:])

    def _future_index(self, start: int, end: int, batch: int, device: torch.device,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Future positions to score: each with probability q in expectation; a fixed count
        ceil(q * n) per sample (at least one) keeps the batch rectangular."""
        n = end - start
        k = n if not self.training else max(1, math.ceil(self.config.future_query_prob * n))
        return start + random_subset(n, k, batch, device, generator)

    # -- training objective ---------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
        """A batch of clips -> {"loss": scalar, and each loss term}."""
        video, audio = self.patches(batch)
        B, device = video.shape[0], video.device
        nvp, nap = self.video_present, self.audio_present
        latent = self.encode(batch, video[:, :nvp], audio[:, :nap], generator)
        future_latent = self.evolve(latent)

        present_v = torch.arange(nvp, device=device).expand(B, -1)
        present_a = torch.arange(nap, device=device).expand(B, -1)
        future_v = self._future_index(nvp, video.shape[1], B, device, generator)
        future_a = self._future_index(nap, audio.shape[1], B, device, generator)
        pred_pv, pred_pa = self.decode(latent, present_v, present_a)
        pred_fv, pred_fa = self.decode(future_latent, future_v, future_a)

        has_audio = batch["has_audio"].bool()
        video_t, audio_t = normalize_patches(video), normalize_patches(audio)
        terms = {
            "pc_video_present": masked_mse(pred_pv, video_t[:, :nvp]),
            "pc_video_future": masked_mse(pred_fv, _gather(video_t, future_v)),
            "pc_audio_present": masked_mse(pred_pa, audio_t[:, :nap], has_audio),
            "pc_audio_future": masked_mse(pred_fa, _gather(audio_t, future_a), has_audio),
        }
        present = terms["pc_video_present"] + terms["pc_audio_present"]
        future = terms["pc_video_future"] + terms["pc_audio_future"]
        terms["loss_pc"] = predictive_coding_loss(present, future, self.config.alpha)
        terms["loss"] = terms["loss_pc"]
        return terms


def build_model(model: ModelConfig, data: DataConfig) -> PredictiveCodingPerceiver:
    return PredictiveCodingPerceiver(model, ClipGeometry.from_data(data))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
