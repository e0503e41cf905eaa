"""Evaluation during training: every rank embeds its share of the training bank and the
held-out clips, rank 0 scores them (kNN, linear probe, retrieval) and writes eval.json
(docs/model.md, "Evaluation"). A mixin of the Trainer."""

from __future__ import annotations

import time

import numpy as np
import torch

from rigtrain.evaluate import Features, evaluate, extract_features, format_result
from rigtrain.evaluate.evaluation import eval_batch_size, needs_bank, spread
from rigtrain.evaluate.pictures import geometry_of, picture_clips, prediction_pictures
from rigtrain.files import write_json


class HeldOutEvaluation:
    def evaluate_held_out(self) -> dict | None:
        """Every rank embeds its share of the bank (training clips, where there are labels
        for kNN and the probe) and the held-out clips; rank 0 gathers them, scores kNN, probe
        and retrieval, and writes eval.json. Returns the result on rank 0, None elsewhere."""
        started = time.perf_counter()
        cfg, module = self.config.eval, self.engine.module
        labels = self.dataset.index.get("labels") if not self.raw_videos else None
        sets = (self.split.train, self.split.heldout) if needs_bank(labels) else (self.split.heldout,)
        was_training = module.training
        module.eval()
        try:
            parts = [self._embed_share(spread(clips, cfg.max_clips)) for clips in sets]
            pictures = self._predictions(module)
        finally:
            module.train(was_training)
        if self.world > 1:
            gathered = [None] * self.world if self.is_main else None
            torch.distributed.gather_object(parts, gathered, dst=0)
            if not self.is_main:
                return None
            parts = [Features.concat([g[i] for g in gathered]) for i in range(len(sets))]
        bank, held = (None, *parts) if len(parts) == 1 else parts
        result = evaluate(bank, held, labels, cfg)
        record = {
            "step": self.step,
            **result,
            "split": self.split.to_dict(),
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(self.run_dir / "eval.json", record)
        self.log.say(
            f"eval after step {self.step} ({record['seconds']:.1f} s; also in eval.json):\n"
            + "\n".join("    " + line for line in format_result(result).splitlines())
        )
        heldout = spread(self.split.heldout, cfg.max_clips)
        order = np.concatenate([heldout[r :: self.world] for r in range(self.world)])  # as gathered
        if getattr(self, "projector_metadata", None) is None:  # the held-out clips are the run's: read once
            self.projector_metadata = self._clip_metadata(order, held.labels)
        self.log.write_embedding(held.video, self.projector_metadata, self.step)
        self.log.write_pictures(pictures, self.step)
        return result

    def _predictions(self, module) -> dict | None:
        """Every rank runs the decoder on the same few held-out clips (ZeRO-3 gathers the
        weights in lockstep); rank 0 draws them (evaluate/pictures.py)."""
        clips = picture_clips(self.split.heldout)
        if not len(clips):
            return None
        batch = self.dataset.batch(clips.tolist())
        on_device = {k: v.to(self.device) for k, v in batch.items() if k not in ("labels", "index")}
        predicted = module(on_device, task="predict")
        return prediction_pictures(predicted, geometry_of(module)) if self.is_main else None

    def _clip_metadata(self, clips: np.ndarray, labels: np.ndarray) -> tuple[list[str], list[list[str]]]:
        """(header, a row per clip) for TensorBoard's projector: the clip's video, its labels
        by name where the dataset has them, and its narration."""
        names = self.dataset.index.get("labels") if not self.raw_videos else None
        videos = self.dataset.clip_videos()
        header = ["video", *(names or {}), "narration"]
        rows = []
        for position, (clip, text) in enumerate(zip(clips.tolist(), self.dataset.narrations(clips))):
            named = [
                values[int(labels[position, k])] if 0 <= int(labels[position, k]) < len(values) else "none"
                for k, values in enumerate((names or {}).values())
            ]
            rows.append([videos[clip], *named, text or "(no narration)"])
        return header, rows

    def _embed_share(self, clips) -> Features:
        """This rank's share of the clips, padded so every rank runs the same number of
        batches (ZeRO-3 gathers parameters in lockstep), the padding dropped after."""
        share = clips[self.rank :: self.world]
        per_rank = -(-len(clips) // self.world)
        padded = np.resize(share if len(share) else clips[:1], per_rank)
        features = extract_features(
            lambda batch: self.engine.module(batch, task="embed"),
            self.dataset,
            padded,
            batch_size=eval_batch_size(self.config.train.micro_batch_size, self.device),
            device=self.device,
        )
        return features.select(np.arange(len(share)))
