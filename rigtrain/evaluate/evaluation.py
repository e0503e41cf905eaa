"""From a model's embed call and a dataset to eval.json's numbers.

    extract_features(embed, dataset, clips)  -> Features of those clips (batch by batch)
    evaluate(bank, heldout, label_names, cfg) -> {"knn", "probe", "retrieval", ...}

kNN and the probe learn from the bank (training clips: the model saw them, their labels it
never did) and are scored on held-out clips; retrieval runs among held-out clips only. Data
without labels (a user's own videos) has no use for a bank, so none is embedded
(`needs_bank`): on videos decoded on demand that halves an evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rigtrain.config import EvalConfig
from rigtrain.evaluate.measures import label_scores, retrieval

LABELS = ("shape", "colour", "direction")


@dataclass
class Features:
    video: torch.Tensor  # (n, D) pooled video latent
    video_vt: torch.Tensor | None  # (n, vt) video in the video-text space (None without a text head)
    text_vt: torch.Tensor | None  # (n, vt) the clip's narration in that space
    has_text: np.ndarray  # (n,) bool
    labels: np.ndarray  # (n, 3) int, -1 = none

    def __len__(self) -> int:
        return len(self.video)

    def select(self, rows: np.ndarray) -> Features:
        pick = torch.from_numpy(rows)
        return Features(
            self.video[pick],
            None if self.video_vt is None else self.video_vt[pick],
            None if self.text_vt is None else self.text_vt[pick],
            self.has_text[rows],
            self.labels[rows],
        )

    @staticmethod
    def concat(parts: list[Features]) -> Features:
        parts = [p for p in parts if len(p)]
        vt = parts[0].video_vt is not None
        return Features(
            torch.cat([p.video for p in parts]),
            torch.cat([p.video_vt for p in parts]) if vt else None,
            torch.cat([p.text_vt for p in parts]) if vt else None,
            np.concatenate([p.has_text for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )


def needs_bank(label_names: dict | None) -> bool:
    """Whether training clips are embedded at all: only kNN and the probe use them, and
    they need labels (index.json's "labels"; only Shapes-world shards carry them)."""
    return bool(label_names)


# The fewest clips in an evaluation batch where memory is not what limits it (`rigtrain
# eval`, and evaluation while training on a CPU). Each forward costs the same Python and
# hooks whatever its size: 1152 clips at ZeRO-3 on a CPU took 7.3 s in batches of 4, 2.6 s
# in batches of 16 (2.4 s and 1.1 s at ZeRO-1).
EVAL_MIN_BATCH = 16


def eval_batch_size(micro_batch: int, device: torch.device) -> int:
    """Clips per batch of evaluation during training. On a GPU the micro-batch: the plan sized
    it to the card, and the first steps rehearse one such batch, so an evaluation that does
    not fit makes the launcher back off the micro-batch (a fixed larger size would fail at
    every micro-batch the back-off tried)."""
    return micro_batch if device.type == "cuda" else max(micro_batch, EVAL_MIN_BATCH)


def spread(clips: np.ndarray, most: int) -> np.ndarray:
    """At most `most` of the clips, evenly spaced (deterministic, and every video keeps a share)."""
    if len(clips) <= most:
        return clips
    return clips[np.linspace(0, len(clips) - 1, most).round().astype(np.int64)]


def extract_features(
    embed: Callable[[dict], dict],
    dataset,
    clips: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> Features:
    """Run `embed` (the model's task="embed" call) over the clips, batch by batch."""
    parts = []
    for start in range(0, len(clips), batch_size):
        batch = dataset.batch(clips[start : start + batch_size].tolist())
        on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in ("labels", "index")}
        out = {k: v.float().cpu() for k, v in embed(on_device).items()}
        parts.append(
            Features(
                out["video"],
                out.get("video_vt"),
                out.get("text_vt"),
                batch["text_len"].numpy() > 0,
                batch["labels"].numpy().astype(np.int64),
            )
        )
        if progress:
            progress(min(start + batch_size, len(clips)), len(clips))
    return Features.concat(parts)


def evaluate(
    bank: Features | None, heldout: Features, label_names: dict[str, list[str]] | None, config: EvalConfig
) -> dict:
    """eval.json's measures. `label_names` (index.json's "labels") is None for data without
    labels: then kNN and the probe are empty, "notes" says why, and `bank` may be None."""
    result: dict = {
        "knn": {},
        "probe": {},
        "retrieval": {},
        "notes": [],
        "clips": {"bank": len(bank) if bank is not None else 0, "heldout": len(heldout)},
    }
    if label_names and bank is not None:
        for i, key in enumerate(LABELS):
            knn, probe = label_scores(
                bank.video,
                bank.labels[:, i],
                heldout.video,
                heldout.labels[:, i],
                label_names[key],
                k=config.knn_k,
                temperature=config.knn_temperature,
            )
            if knn:
                result["knn"][key], result["probe"][key] = knn, probe
    else:
        result["notes"].append("no labels in this data (only Shapes-world shards carry them): no kNN or probe")
    if heldout.video_vt is None:
        result["notes"].append("model.weight_vt is 0, so there is no text head: no retrieval")
    else:
        rows = np.nonzero(heldout.has_text)[0]
        if len(rows) >= 2:
            with_text = heldout.select(rows)
            result["retrieval"] = {
                "t2v": retrieval(with_text.text_vt, with_text.video_vt),
                "v2t": retrieval(with_text.video_vt, with_text.text_vt),
            }
        else:
            result["notes"].append(f"{len(rows)} held-out clip(s) with narration: no retrieval")
    return result


def flat_metrics(result: dict) -> dict[str, float]:
    """eval/... scalars for metrics.jsonl and TensorBoard."""
    out = {}
    for kind in ("knn", "probe"):
        for label, scores in result[kind].items():
            out[f"eval/{kind}_{label}_top1"] = scores["top1"]
            out[f"eval/{kind}_{label}_chance"] = scores["chance"]
    for direction, scores in result["retrieval"].items():
        for key in ("r1", "r5", "r10", "medr", "chance_r5"):
            out[f"eval/{direction}_{key}"] = scores[key]
    return out


def format_result(result: dict) -> str:
    """The terminal table."""
    lines = []
    if result["knn"]:
        lines.append(f"{'label':<10} {'kNN top-1':>10} {'probe top-1':>12} {'chance':>8} {'clips':>6}")
        for label, knn in result["knn"].items():
            probe = result["probe"][label]
            lines.append(
                f"{label:<10} {knn['top1']:>10.3f} {probe['top1']:>12.3f} {knn['chance']:>8.3f} {knn['clips']:>6}"
            )
    if result["retrieval"]:
        lines.append(f"{'retrieval':<10} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'medR':>7}   chance R@1/R@5/medR")
        for direction, r in result["retrieval"].items():
            lines.append(
                f"{direction:<10} {r['r1']:>7.3f} {r['r5']:>7.3f} {r['r10']:>7.3f} {r['medr']:>7.1f}   "
                f"{r['chance_r1']:.3f}/{r['chance_r5']:.3f}/{r['chance_medr']:.1f} ({r['clips']} clips)"
            )
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)
