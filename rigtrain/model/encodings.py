"""The Perceiver's contrastive side (VATT, docs/model.md "The loss terms"): each modality
encoded alone by the shared encoder, pooled, projected by the FAC heads into the
video-audio and video-text spaces, centred by running means, and scored by NCE and MIL-NCE.
A mixin of PredictiveCodingPerceiver, which owns the encoder, the heads and the buffers."""

from __future__ import annotations

import torch

from rigtrain.model.contrastive import gather_across_ranks, l2_normalize, mil_nce_loss, nce_loss


class ContrastiveEncodings:
    def encode_video(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The clip's first window (present and future) alone -> pooled (B, D)."""
        video, _ = self.patches(batch, 0)
        return self._pool(self.encode(self._start(video.shape[0]), [self._video_input(video)], generator))

    def encode_text(self, text: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Byte strings (K, L) of `length` (K,) bytes alone -> pooled (K, D)."""
        return self._pool(self.encode(self._start(text.shape[0]), [self._text_input(text, length)]))

    def _video_input(self, video: torch.Tensor) -> tuple[torch.Tensor, None, bool]:
        return self._video_tokens(video), None, True

    def _audio_input(self, audio: torch.Tensor) -> tuple[torch.Tensor, None, bool]:
        """A clip without sound is encoded from its (silent) samples all the same and masked
        out of the loss."""
        return self._audio_tokens(audio), None, True

    def _text_input(self, text: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        mask = torch.arange(text.shape[1], device=text.device)[None, :] < length[:, None]
        return self.text_tokenizer(text), mask, False

    def _encoded_alone(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """What the contrastive terms compare, each modality encoded alone and pooled, in one
        pass through the encoder's self-attention (encode_each): "video" (B, D), the first
        window; "audio" (B, D) with the video-audio term; "text" (B*M, D), every narration
        segment slot, with the video-text term (see text_embeddings)."""
        c = self.config
        video, audio = self.patches(batch, 0)
        B = video.shape[0]
        jobs = {"video": (self._start(B), [self._video_input(video)])}
        if c.weight_va > 0:
            jobs["audio"] = (self._start(B), [self._audio_input(audio)])
        if c.weight_vt > 0:
            segments = self._segments(batch)
            flat = segments.reshape(-1, segments.shape[-1])
            length = batch["segment_len"].reshape(-1).clamp(min=1)  # an empty slot reads one zero byte
            jobs["text"] = (self._start(len(flat)), [self._text_input(flat, length)])
        del video, audio  # float patches, read into tokens: gone before the encoder's activations pile up
        latents = self.encode_each(list(jobs.values()), generator)
        return {name: self._pool(latent) for name, latent in zip(jobs, latents)}

    def _segments(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each clip's narration segments as their own byte strings, moved to the start and
        zero past their length: (B, M, L) bytes."""
        text, offset, length = batch["text"], batch["segment_offset"], batch["segment_len"]
        L = text.shape[1]
        index = (offset[:, :, None] + torch.arange(L, device=text.device)).clamp(max=L - 1)  # (B, M, L)
        segments = torch.gather(text[:, None, :].expand(-1, offset.shape[1], -1), 2, index)
        inside = torch.arange(L, device=text.device) < length[:, :, None]
        return segments * inside

    def text_embeddings(
        self, batch: dict[str, torch.Tensor], pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every narration segment slot of the batch in the video-text space, before centring
        and normalising: (B, M, vt_dim), zero where (B, M) valid is False; pooled (B*M, D):
        the slots encoded alone (_encoded_alone).

        All B*M slots are encoded, the empty ones too (as one zero byte, so attention has a
        key), and masked after: the text batch has the same shape in every step. Encoding
        only the real segments would save that work but give the attention kernels a new
        shape each step (cuDNN built a new plan for each: 55% of a step's host time on an
        H200), make the step wait for the GPU to count them (`nonzero`), and leave the
        memory the step needs to the data."""
        valid = batch["segment_len"] > 0
        B, M = valid.shape
        return self.text_to_vt(pooled).float().reshape(B, M, -1) * valid[..., None], valid

    def _centre(self, x: torch.Tensor, name: str, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., E) minus the modality's mean embedding, then L2-normalised.

        Why: the encoder is shared by all modalities and starts every clip from the same
        latent array, so its pooled outputs share a large common part. Cosine similarity
        of uncentred embeddings is dominated by it, and the contrastive gradient then grows
        it until every clip looks alike (measured: retrieval fell to exact chance within 10
        steps on the demo). Subtracting the batch mean, as VATT's batch-norm heads do, gives
        that common part no gradient. Training uses the (gathered) batch's mean and keeps a
        running mean, which evaluation uses."""
        buffer = getattr(self, f"mean_{name}")
        if not self.training:
            return l2_normalize(x - buffer.float())
        flat = x.reshape(-1, x.shape[-1])
        weights = torch.ones(len(flat), 1, device=x.device) if valid is None else valid.reshape(-1, 1).float()
        mean = (flat * weights).sum(0) / weights.sum().clamp(min=1)
        with torch.no_grad():
            # A plain average over the first 10 updates, then an exponential one (0.1).
            rate = (1.0 / (self.mean_updates + 1).float()).clamp(min=0.1)
            buffer.lerp_(mean.detach().to(buffer.dtype), rate.to(buffer.dtype))
        return l2_normalize(x - mean)

    def _contrastive(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        c = self.config
        # The encoders run under bf16 autocast when training in bf16; the heads, the
        # centring, the gather and the losses work in float32 (see Float32Linear).
        pooled = self._encoded_alone(batch, generator)
        video_va = self.video_to_va(pooled["video"])  # (B, va)
        terms = {}
        if c.weight_va > 0:
            audio_va = self.audio_to_va(pooled["audio"]).float()
            valid = gather_across_ranks(batch["has_audio"].float()) > 0
            video, audio = gather_across_ranks(video_va.float()), gather_across_ranks(audio_va)
            terms["loss_va_nce"] = nce_loss(
                self._centre(video, "video_va", valid), self._centre(audio, "audio_va", valid), valid, c.temperature
            )
        if c.weight_vt > 0:
            text_vt, text_valid = self.text_embeddings(batch, pooled["text"])
            video = gather_across_ranks(self.va_to_vt(video_va).float())
            text, text_valid = gather_across_ranks(text_vt), gather_across_ranks(text_valid.float()) > 0
            terms["loss_vt_milnce"] = mil_nce_loss(
                self._centre(video, "video_vt"), self._centre(text, "text_vt", text_valid), text_valid, c.temperature
            )
        with torch.no_grad():
            self.mean_updates += 1
        return terms
