"""The held-out split: whole source videos are kept out of training, so no clip of a video
that eval scores was ever trained on (clips of one video share backgrounds, speakers and
scenes, which would leak).

A video is held out when a hash of its file name falls below the fraction. The choice
depends on nothing but the name, so adding videos to a dataset never moves one across the
split, and any machine makes the same split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def name_hash(name: str) -> float:
    """A stable number in [0, 1) for a file name: SHA-256, not Python's salted hash(), and not
    crc32, whose values for names that differ in one digit are correlated."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def heldout_videos(names: list[str], fraction: float) -> list[str]:
    """The held-out video names. With a fraction above 0 and at least two videos, at least
    one is held out (the one with the smallest hash) and at least one is trained on."""
    unique = sorted(set(names))
    if fraction <= 0 or len(unique) < 2:
        return []
    chosen = [n for n in unique if name_hash(n) < fraction]
    if not chosen:
        chosen = [min(unique, key=name_hash)]
    if len(chosen) == len(unique):
        chosen.remove(max(chosen, key=name_hash))
    return chosen


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # clip indices trained on
    heldout: np.ndarray  # clip indices of held-out videos
    heldout_videos: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "heldout_videos": list(self.heldout_videos),
            "train_clips": len(self.train),
            "heldout_clips": len(self.heldout),
        }


def split_clips(clip_videos: list[str], heldout: list[str] | tuple[str, ...]) -> Split:
    """Clip indices on each side of the split, given each clip's source video name."""
    out = np.isin(np.asarray(clip_videos, dtype=object), list(heldout)) if heldout else np.zeros(len(clip_videos), bool)
    return Split(train=np.nonzero(~out)[0], heldout=np.nonzero(out)[0], heldout_videos=tuple(sorted(heldout)))


def lopsided_split_note(split: Split, fraction: float) -> str | None:
    """A sentence when whole videos of very different lengths put far more than `fraction`
    of the clips out of training (two videos, the hour-long one held out, trains on a few
    minutes), else None."""
    total = len(split.train) + len(split.heldout)
    share = len(split.heldout) / total if total else 0.0
    if share <= max(0.5, 2 * fraction):
        return None
    return (
        f"the held-out video(s) hold {share:.0%} of the clips: eval.holdout={fraction:g} holds out whole "
        f"videos, and there are few; add videos, or --set eval.holdout=0 to train on every clip (no evaluation)"
    )
