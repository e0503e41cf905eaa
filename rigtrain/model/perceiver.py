"""The multimodal predictive-coding Perceiver (docs/model.md).

Predictive coding, for each window i of a clip (recurrent_windows of them, a step apart):
    tokens(present video, present audio, narration) --DropToken--> encoder(start_i) --> latent z_i
    evolver(z_i) --> z_i' (the predicted latent of the future window; start_{i+1} = z_i')
    decoder(Fourier queries of present positions, z_i)  --> present patches
    decoder(Fourier queries of sampled future positions, z_i') --> future patches
start_0 is the learned latent array; windows before model.blind_windows are not scored.

Contrastive (VATT), on the clip's first window: each modality through the same encoder on
its own, mean-pooled, then the FAC heads: video -> video-audio space -> video-text space,
audio -> video-audio space, each narration segment -> video-text space.

Shapes: B clips, D = d_model, N = num_latents, P = patch size of a modality.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rigtrain.config import DataConfig, ModelConfig
from rigtrain.model.blocks import CrossAttentionBlock, SelfAttentionBlock, run_block
from rigtrain.model.clips import ClipGeometry, drop_tokens, gather_tokens, random_subset
from rigtrain.model.contrastive import (
    Float32LayerNorm,
    Float32Linear,
)
from rigtrain.model.encodings import ContrastiveEncodings
from rigtrain.model.fourier import feature_size, fourier_features, grid_positions
from rigtrain.model.losses import masked_mse, normalize_patches, predictive_coding_loss
from rigtrain.model.tokenizers import PatchTokenizer, TextTokenizer, to_segments, to_tubelets

# Frames arrive as uint8 and are normalised on the device (mean/std of natural images), so
# only bytes cross the PCIe bus.
PIXEL_MEAN, PIXEL_STD = 0.45, 0.225

# The contrastive embeddings' running means (buffers mean_<name>), kept in float32.
RUNNING_MEANS = ("video_va", "audio_va", "video_vt", "text_vt")


class PredictiveCodingPerceiver(ContrastiveEncodings, nn.Module):
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
        video_pos = grid_positions(*self.grid)  # (Nv, 3): time spans one window, whichever it is
        audio_pos = grid_positions(self.audio_tokens)  # (Na, 1)
        self.video_tokenizer = PatchTokenizer(
            patch_dim=t * h * w * 3, positions=video_pos, bands=video_bands, d_model=d
        )
        self.audio_tokenizer = PatchTokenizer(
            patch_dim=c.audio_segment, positions=audio_pos, bands=audio_bands, d_model=d
        )
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

        # VATT's FAC heads, built only for the losses that are on (a head without a loss
        # would get no gradient). Video gets two layers, as in VATT, since its space must
        # serve audio and text; the others are linear.
        contrastive = c.weight_va > 0 or c.weight_vt > 0
        # From the pooled latent on, they compute in float32 (see Float32Linear for why).
        self.pool_norm = Float32LayerNorm(d) if contrastive else None
        self.video_to_va = (
            nn.Sequential(Float32Linear(d, c.va_dim), nn.GELU(), Float32Linear(c.va_dim, c.va_dim))
            if contrastive
            else None
        )
        self.audio_to_va = Float32Linear(d, c.va_dim) if c.weight_va > 0 else None
        self.va_to_vt = Float32Linear(c.va_dim, c.vt_dim) if c.weight_vt > 0 else None
        self.text_to_vt = Float32Linear(d, c.vt_dim) if c.weight_vt > 0 else None
        # Each modality's mean embedding, subtracted before L2 normalisation (see
        # `_centre`): the batch's in training, these running means in evaluation.
        for name in RUNNING_MEANS:
            self.register_buffer(f"mean_{name}", torch.zeros(c.va_dim if name.endswith("_va") else c.vt_dim))
        self.register_buffer("mean_updates", torch.zeros((), dtype=torch.long))
        self.apply(self._init_weights)

    def _apply(self, fn, recurse: bool = True):
        """As nn.Module's, but the running means stay float32 when the module is cast to
        bf16/fp16 (DeepSpeed does so for mixed precision): an exponential average with rate
        0.1 in bf16 would round every update away once the mean is 256 times the update."""
        super()._apply(fn, recurse)
        for name in RUNNING_MEANS:
            buffer = self._buffers.get(f"mean_{name}")
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[f"mean_{name}"] = buffer.float()
        return self

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

    def patches(self, batch: dict[str, torch.Tensor], window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 video (B, T, H, W, 3) and int16 audio (B, S) -> the float patches of one
        window: video (B, Nv, t*h*w*3) in [0, 1] and audio (B, Na, s) in [-1, 1]."""
        g, (t, h, w) = self.geometry, self.config.tubelet
        f0, s0 = window * g.step_frames, window * g.step_samples
        video = batch["video"][:, f0 : f0 + g.frames].float() / 255.0
        audio = batch["audio"][:, s0 : s0 + g.samples].float() / 32768.0
        return to_tubelets(video, t, h, w), to_segments(audio, self.config.audio_segment)

    def _video_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """The first n video patches (B, n, P) of a window -> tokens (B, n, D)."""
        pixels = ((video - PIXEL_MEAN) / PIXEL_STD).to(self.latents.dtype)
        return self.video_tokenizer(pixels, slice(0, video.shape[1]))

    def _audio_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        return self.audio_tokenizer(audio.to(self.latents.dtype), slice(0, audio.shape[1]))

    def encode(
        self,
        start: torch.Tensor,
        inputs: list[tuple[torch.Tensor, torch.Tensor | None, bool]],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Latents start (B, N, D) read the inputs -> latent (B, N, D).

        inputs: (tokens (B, n, D), key mask (B, n) or None, DropToken applies). Re-exposure:
        `exposures` rounds of cross-attention + self-attention, each on a fresh DropToken draw
        (or the first draw again with same_droptoken_draw)."""
        return self.encode_each([(start, inputs)], generator)[0]

    def encode_each(
        self,
        jobs: list[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor | None, bool]]]],
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Several encodings that do not depend on each other (the contrastive side encodes
        video, sound and narration each alone): each job's latents read its own tokens in
        the cross-attention block (their token counts differ), then the latents of every job
        go through the self-attention blocks as one batch. Those blocks treat each sample
        alone, so the result is `encode` of each job; a GPU launches their kernels once
        instead of once a job (the training step was host-bound on the first GPU runs)."""
        keep = self.config.droptoken_keep if self.training else 1.0
        latents = [start for start, _ in jobs]
        draws: list[list | None] = [None] * len(jobs)
        for _ in range(self.config.exposures):
            for j, (start, inputs) in enumerate(jobs):
                if draws[j] is None or not self.config.same_droptoken_draw:
                    B, device = start.shape[0], start.device
                    draws[j] = [
                        drop_tokens(tokens.shape[1], keep, B, device, generator) if drop and keep < 1.0 else None
                        for tokens, _, drop in inputs
                    ]
                latents[j] = self._block(self.encoder_cross, latents[j], *self._context(inputs, draws[j]))
            sizes = [latent.shape[0] for latent in latents]
            latent = torch.cat(latents) if len(latents) > 1 else latents[0]
            latents.clear()  # the stacked copy is what the blocks read: the parts go now, not after them
            for block in self.encoder_self:
                latent = self._block(block, latent)
            latents = list(latent.split(sizes)) if len(sizes) > 1 else [latent]
        return latents

    @staticmethod
    def _context(
        inputs: list[tuple[torch.Tensor, torch.Tensor | None, bool]], draws: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens (B, n, D) the latents read, DropToken's draw applied, and their key mask
        (B, n), or None when no input has one: attention without a mask can use the Flash
        kernel on a GPU."""
        parts, masks = [], []
        for (tokens, mask, _), draw in zip(inputs, draws):
            if draw is not None:
                tokens = gather_tokens(tokens, draw)
                mask = None if mask is None else torch.gather(mask, 1, draw)
            parts.append(tokens)
            masks.append(mask)
        if all(m is None for m in masks):
            return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], None
        mask = torch.cat(
            [
                torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
                for t, m in zip(parts, masks)
            ],
            dim=1,
        )
        return torch.cat(parts, dim=1), mask

    def _start(self, batch_size: int) -> torch.Tensor:
        return self.latents.expand(batch_size, -1, -1)

    def _pool(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D): the mean latent (normalised when the heads exist)."""
        if self.pool_norm is None:
            return latent.mean(dim=1)
        return self.pool_norm(latent.float().mean(dim=1))  # float32: see Float32Linear

    def evolve(self, latent: torch.Tensor) -> torch.Tensor:
        """Present latent -> predicted future latent (B, N, D)."""
        for i in range(self.config.evo_layers):
            latent = self._block(self.evolver[0 if self.config.evolver_shared else i], latent)
        return latent

    def decode(
        self, latent: torch.Tensor, video_index: torch.Tensor, audio_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the patches at the given positions (B, kv) and (B, ka) from a latent."""
        dtype = latent.dtype
        # Pick the positions' codes first, then project: the projection's gradient is then a
        # matmul. Projecting every position and picking after would make it an index_add
        # over the picked rows, whose order of additions varies between CPU threads: the
        # same run twice gave different losses from step 20 on.
        vq = self.video_query(self.video_query_codes[video_index].to(dtype))  # (B, kv, D)
        aq = self.audio_query(self.audio_query_codes[audio_index].to(dtype))  # (B, ka, D)
        # The residual stream in the weights' dtype, as the encoder's: under bf16 autocast a
        # projection returns bf16, and the decoder's blocks would then add their updates in
        # bf16 and normalise bf16 (on the CPU; CUDA's autocast upcasts the norms only).
        queries = torch.cat([vq, aq], dim=1).to(dtype)
        for block in self.decoder:
            queries = self._block(block, queries, latent)
        queries = self.decoder_norm(queries)
        kv = video_index.shape[1]
        return self.video_head(queries[:, :kv]), self.audio_head(queries[:, kv:])

    def _future_index(
        self, start: int, end: int, batch: int, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Future positions to score: each with probability q in expectation; a fixed count
        ceil(q * n) per sample (at least one) keeps the batch rectangular."""
        n = end - start
        k = n if not self.training else max(1, math.ceil(self.config.future_query_prob * n))
        return start + random_subset(n, k, batch, device, generator)

    # -- training objective ---------------------------------------------------------------------
    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None, task: str = "train"
    ) -> dict[str, torch.Tensor]:
        """task "train": a batch of clips -> {"loss": scalar, and each loss term}.
        task "embed": -> the clips' features for evaluation (see `embed`); task "predict": the
        decoder's picture of the last window (see `predict`). All go through
        forward, so DeepSpeed's hooks (ZeRO-3 parameter gathering) see every call."""
        if task == "embed":
            return self.embed(batch)
        if task == "predict":
            return self.predict(batch)
        return self.objective(batch, generator)

    def objective(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The training loss and its terms. train.compile compiles this alone: one graph for
        the training step, while evaluation's tasks run as written (compiling forward whole
        recompiled it for each task and each evaluation batch size)."""
        terms = self._predictive_coding(batch, generator)
        c = self.config
        total = c.weight_pc * terms["loss_pc"]
        if c.weight_va > 0 or c.weight_vt > 0:
            terms.update(self._contrastive(batch, generator))
            if c.weight_va > 0:
                total = total + c.weight_va * terms["loss_va_nce"]
            if c.weight_vt > 0:
                total = total + c.weight_vt * terms["loss_vt_milnce"]
        terms["loss"] = total
        return terms

    def _windows(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None):
        """Each window in turn: (index, video patches, audio patches, its latent, the evolved
        latent that predicts its future and starts the next window)."""
        B, device = batch["video"].shape[0], batch["video"].device
        nvp, nap = self.video_present, self.audio_present
        text = batch["text"]
        text_tokens = self.text_tokenizer(text)  # (B, L, D): the clip's narration, read in every window
        text_mask = torch.arange(text.shape[1], device=device)[None, :] < batch["text_len"][:, None]  # (B, L)
        audio_mask = batch["has_audio"].bool()[:, None].expand(-1, nap)
        start = self._start(B)
        for window in range(self.geometry.windows):
            video, audio = self.patches(batch, window)
            inputs = [
                (self._video_tokens(video[:, :nvp]), None, True),
                (self._audio_tokens(audio[:, :nap]), audio_mask, True),
                (text_tokens, text_mask, False),
            ]
            latent = self.encode(start, inputs, generator)
            start = future_latent = self.evolve(latent)  # the next window starts from the prediction
            yield window, video, audio, latent, future_latent

    def _predictive_coding(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """The predictive-coding terms, averaged over the scored windows."""
        B, device = batch["video"].shape[0], batch["video"].device
        nvp, nap = self.video_present, self.audio_present
        has_audio = batch["has_audio"].bool()
        present_v = torch.arange(nvp, device=device).expand(B, -1)
        present_a = torch.arange(nap, device=device).expand(B, -1)

        sums: dict[str, torch.Tensor] = {}
        scored = range(self.config.blind_windows, self.geometry.windows)
        for window, video, audio, latent, future_latent in self._windows(batch, generator):
            if window not in scored:
                continue
            future_v = self._future_index(nvp, video.shape[1], B, device, generator)
            future_a = self._future_index(nap, audio.shape[1], B, device, generator)
            pred_pv, pred_pa = self.decode(latent, present_v, present_a)
            pred_fv, pred_fa = self.decode(future_latent, future_v, future_a)
            video_t, audio_t = normalize_patches(video), normalize_patches(audio)
            window_terms = {
                "pc_video_present": masked_mse(pred_pv, video_t[:, :nvp]),
                "pc_video_future": masked_mse(pred_fv, gather_tokens(video_t, future_v)),
                "pc_audio_present": masked_mse(pred_pa, audio_t[:, :nap], has_audio),
                "pc_audio_future": masked_mse(pred_fa, gather_tokens(audio_t, future_a), has_audio),
            }
            for key, value in window_terms.items():
                sums[key] = sums.get(key, 0.0) + value
        terms = {key: value / len(scored) for key, value in sums.items()}
        present = terms["pc_video_present"] + terms["pc_audio_present"]
        future = terms["pc_video_future"] + terms["pc_audio_future"]
        terms["loss_pc"] = predictive_coding_loss(present, future, self.config.alpha)
        return terms

    # -- contrastive (VATT) -----------------------------------------------------------------------
    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the model expects, for pictures: in the last window, the decoder's prediction
        at every video and audio position (present ones from the window's latent, future
        ones from the evolved latent), beside that window's patches. Predictions are in the
        per-patch normalised space the loss scores; "video" (B, Nv, t*h*w*3) in [0, 1] and
        "audio" (B, Na, s) in [-1, 1] are the ground truth."""
        B, device = batch["video"].shape[0], batch["video"].device
        nvp, nap = self.video_present, self.audio_present
        *_, (_, video, audio, latent, future_latent) = self._windows(batch, None)  # the last window's
        positions = lambda a, b: torch.arange(a, b, device=device).expand(B, -1)  # noqa: E731
        pred_pv, pred_pa = self.decode(latent, positions(0, nvp), positions(0, nap))
        pred_fv, pred_fa = self.decode(future_latent, positions(nvp, video.shape[1]), positions(nap, audio.shape[1]))
        return {
            "video": video.float(),
            "audio": audio.float(),
            "video_pred": torch.cat([pred_pv, pred_fv], dim=1).float(),
            "audio_pred": torch.cat([pred_pa, pred_fa], dim=1).float(),
        }

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Features of a batch for evaluation (no DropToken in eval mode): "video" (B, D) the
        pooled video latent; with the text head, "video_vt" (B, vt) and "text_vt" (B, vt), the
        clip's whole narration, both centred by the running means and L2-normalised."""
        pooled = self.encode_video(batch)
        out = {"video": pooled.float()}
        if self.va_to_vt is not None:
            out["video_vt"] = self._centre(self.va_to_vt(self.video_to_va(pooled)).float(), "video_vt")
            text = self.text_to_vt(self.encode_text(batch["text"], batch["text_len"].clamp(min=1)))
            out["text_vt"] = self._centre(text.float(), "text_vt")
        return out


def build_model(model: ModelConfig, data: DataConfig) -> PredictiveCodingPerceiver:
    return PredictiveCodingPerceiver(model, ClipGeometry.from_data(data))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
