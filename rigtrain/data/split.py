"""The held-out split: whole source videos are kept out of training, so no clip of a video
that eval scores was ever trained on (clips of one video share backgrounds, speakers and
scenes, which would leak).

A video is held out when a hash of its file name falls below the fraction. The choice
depends on nothing but the name, so adding videos to a dataset never moves one across the
split, and any machine makes the same split.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
import xxhash


def name_hash(name: str) -> float:
    """A stable number in [0, 1) for a file name: SHA-256, not Python's salted hash(), and not
    crc32, whose values for names that differ in one digit are correlated."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


# A GoPro cuts a long recording into chapter files of about 4 GB: GX010042.MP4,
# GX020042.MP4, ... (HERO6 and later; GH for H.264), or GOPR0042.MP4 then GP010042.MP4
# (HERO5 and earlier). The chapters are one recording, and one scene runs on across them.
GOPRO_CHAPTER = re.compile(r"^(?P<folder>.*/)?(?:(?P<kind>G[HX])\d{2}|GOPR|GP\d{2})(?P<number>\d{4})\.MP4$", re.I)


def recording_of(name: str) -> str:
    """The recording a video file belongs to: its own name, or for a GoPro chapter the
    recording's number, so that every chapter lands on the same side of the split."""
    chapter = GOPRO_CHAPTER.match(name)
    if chapter is None:
        return name
    kind = (chapter["kind"] or "GOPR").upper()
    return f"{chapter['folder'] or ''}{kind}{chapter['number']} (GoPro chapters)"


def heldout_videos(names: list[str], fraction: float) -> list[str]:
    """The held-out video names, whole recordings at a time (a GoPro's chapters together).
    With a fraction above 0 and at least two recordings, at least one is held out (the one
    with the smallest hash) and at least one is trained on."""
    recordings: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        recordings.setdefault(recording_of(name), []).append(name)
    if fraction <= 0 or len(recordings) < 2:
        return []
    chosen = [r for r in recordings if name_hash(r) < fraction]
    if not chosen:
        chosen = [min(recordings, key=name_hash)]
    if len(chosen) == len(recordings):
        chosen.remove(max(chosen, key=name_hash))
    return sorted(name for r in chosen for name in recordings[r])


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # clip indices trained on
    heldout: np.ndarray  # clip indices of held-out videos
    heldout_videos: tuple[str, ...]
    clips_digest: str = ""  # each clip's video, in order (clips_digest): what the data position indexes

    def to_dict(self) -> dict:
        return {
            "heldout_videos": list(self.heldout_videos),
            "train_clips": len(self.train),
            "heldout_clips": len(self.heldout),
            "clips_xxh3": self.clips_digest,
        }

    def same_data_as(self, recorded: dict) -> bool:
        """Whether `recorded` (a run's config.json "split") describes this data: the same
        clips of the same videos in the same order (runs from before the digest: the same
        held-out videos and clip counts)."""
        if recorded.get("clips_xxh3"):
            return recorded["clips_xxh3"] == self.clips_digest
        return (
            sorted(recorded.get("heldout_videos", [])) == list(self.heldout_videos)
            and recorded.get("train_clips") == len(self.train)
            and recorded.get("heldout_clips") == len(self.heldout)
        )


def clips_digest(clip_videos: list[str]) -> str:
    """A checksum of each clip's source video name, in clip order: the same for a dataset
    moved to another folder or disk, different for other data or another prepare of more
    or fewer videos."""
    digest = xxhash.xxh3_64()
    for name in clip_videos:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def split_clips(clip_videos: list[str], heldout: list[str] | tuple[str, ...]) -> Split:
    """Clip indices on each side of the split, given each clip's source video name."""
    out = np.isin(np.asarray(clip_videos, dtype=object), list(heldout)) if heldout else np.zeros(len(clip_videos), bool)
    return Split(
        train=np.nonzero(~out)[0],
        heldout=np.nonzero(out)[0],
        heldout_videos=tuple(sorted(heldout)),
        clips_digest=clips_digest(clip_videos),
    )


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
