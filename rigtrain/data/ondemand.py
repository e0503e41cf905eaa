"""Clips decoded from their source videos at every read: what a loader without shards has
to do. `data bench` measures it against the shards; it is also how a folder of videos that
was never prepared can still be read."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rigtrain.config import DataConfig
from rigtrain.data import media, sound
from rigtrain.data.check import check_source, frames_after_resampling
from rigtrain.data.narration import Segment, clip_text, read_narration
from rigtrain.data.sources import find_sources
from rigtrain.data.subtitles import CONTAINER, read_container_subtitles
from rigtrain.errors import DataGone

# A clip that cannot be decoded at a read (a damaged stretch inside a video, which data
# check's look at its first and last frames does not reach; a file deleted or a drive
# unplugged while a run reads it) is replaced by the first clip of the next video that
# decodes (the clips after a damaged one are often damaged too), and its file is named
# once; a sound or narration that cannot be read is left out of that clip, as for a video
# without it. This many videos failing in a row mean the folder itself is gone, and the run
# stops with one line.
MOST_FAILED_IN_A_ROW = 16

# A run from a folder of videos names what prepare would report (a video left out, a
# sidecar skipped, narration past its video's end, a file not used), up to this many
# lines: `rigtrain data check` lists every one.
MOST_NOTES_SAID = 10


@dataclass(frozen=True)
class ClipRef:
    video: Path
    start_frame: int
    audio: Path | None = None  # a sidecar file
    container_audio: bool = False
    narration: Path | None = None  # a sidecar file
    container_narration: bool = False  # the video's own subtitle track (data/subtitles.py)
    name: str = ""  # the video's path in its folder, as the index names it (the held-out split's key)


def _at_most(count: int, lines: list[str], where_the_rest_are: str) -> list[str]:
    if len(lines) <= count:
        return lines
    return lines[: count - 1] + [f"... and {len(lines) - count + 1} more: {where_the_rest_are}"]


@lru_cache(maxsize=64)
def _segments(path: Path, from_container: bool = False) -> tuple[Segment, ...]:
    if from_container:
        narration = read_container_subtitles(path)
        return tuple(narration.segments) if narration else ()
    return tuple(read_narration(path).segments)


def _narration_of(ref: ClipRef) -> list[Segment] | None:
    if ref.narration is not None:
        return list(_segments(ref.narration))
    if ref.container_narration:
        return list(_segments(ref.video, True))
    return None


class DecodedClips(Dataset):
    """The same samples as ShardDataset (video uint8 (T, H, W, 3), audio int16 (S,),
    has_audio, text, text_len, segment spans, labels, index), decoded on demand. Labels are
    -1: they exist only in prepared Shapes-world shards."""

    def __init__(self, clips: list[ClipRef], data: DataConfig):
        self.clips, self.data = clips, data
        self._said: set[tuple[str, str]] = set()  # (file, what): each problem named once
        self._broken: dict[int, str] = {}  # clips that failed, and why: not decoded again
        self._heldout: list[bool] | None = None  # each clip's side of the held-out split (keep_apart)
        self._first_clips: list[int] | None = None  # each video's first clip (_stand_ins)
        # what prepare would report of the folder (videos left out, sidecars skipped,
        # narration past a video's end, files not used): a run says it once (train.launch)
        self.said_of_the_folder: list[str] = []

    @classmethod
    def from_index(cls, data_dir: Path, index: dict, data: DataConfig) -> DecodedClips:
        """The clips of prepared shards, pointing back at the videos they were cut from."""
        source_dir = Path(index["source_dir"])
        refs = []
        for shard in index["shards"]:
            for clip in np.load(Path(data_dir) / shard["dir"] / "clips.npy"):
                source = index["sources"][int(clip["source"])]
                audio, narration = source["audio"], source["narration"]
                refs.append(
                    ClipRef(
                        video=source_dir / source["video"],
                        start_frame=round(float(clip["start_s"]) * data.fps),
                        audio=source_dir / audio if audio not in (None, "container") else None,
                        container_audio=audio == "container",
                        narration=source_dir / narration if narration not in (None, CONTAINER) else None,
                        container_narration=narration == CONTAINER,
                        name=source["video"],
                    )
                )
        return cls(refs, data)

    @classmethod
    def from_folder(cls, folder: Path, data: DataConfig) -> DecodedClips:
        """Every clip `data prepare` would cut from a folder of videos, without preparing it
        (for training straight from videos: slow, but it works). Videos that cannot be
        used are left out, as prepare leaves them out."""

        refs, said = [], []
        sources, unused = find_sources(Path(folder))
        for source in sources:
            entry = check_source(source, data)
            if not entry["ok"] or entry["clips"] == 0:
                said.append(
                    f"{source.name} left out: {entry.get('reason') or f'shorter than one clip ({data.clip_seconds} s)'}"
                )
                continue
            # what prepare would report (sidecars skipped, problems in the files used), not
            # check's notes on how a video is read (variable frame rate, HDR, interlacing)
            used = entry["narration"] or {}
            problems = [f"{used['file']} {problem}" for problem in used.get("problems", [])]
            said += [f"{source.name}: {note}" for note in entry["skipped"] + problems]
            frames = frames_after_resampling(entry["duration_s"], data.fps)
            audio, narration = entry["audio"], entry["narration"]
            for start in media.clip_starts(frames, data.clip_frames, data.stride_frames):
                refs.append(
                    ClipRef(
                        video=source.video,
                        start_frame=start,
                        audio=source.audio if audio and audio["from"] != "container" else None,
                        container_audio=bool(audio) and audio["from"] == "container",
                        narration=source.narration if narration and "from" not in narration else None,
                        container_narration=bool(narration) and narration.get("from") == CONTAINER,
                        name=source.name,
                    )
                )
        said += [f"{u['file']}: not used: {u['reason']}" for u in unused]  # a transcript named unlike its video
        clips = cls(refs, data)
        clips.said_of_the_folder = _at_most(MOST_NOTES_SAID, said, f"`rigtrain data check {folder}` lists every one")
        return clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Clip i, or where it cannot be decoded the first clip of the next video that can
        (_stand_ins, MOST_FAILED_IN_A_ROW)."""
        tried = []
        for j in self._stand_ins(i):
            if len(tried) == MOST_FAILED_IN_A_ROW:
                break
            ref = self.clips[j]
            tried.append(j)
            if j not in self._broken:
                try:
                    return self._decode(j)
                except (media.MediaError, OSError) as err:
                    why = str(err) if isinstance(err, media.MediaError) else f"{type(err).__name__}: {err}"
                    self._broken[j] = why
                    at_s = ref.start_frame / self.data.fps
                    self._say(ref, "video", f"the clip at {at_s:.1f} s cannot be decoded ({why}); the first clip "
                              "of the next video that decodes takes the place of each that fails")  # fmt: skip
        ref = self.clips[tried[-1]]
        raise DataGone(
            f"data: {len(tried)} video(s) in a row cannot be decoded, the last {ref.name or ref.video} "
            f"({self._broken[tried[-1]]}); check that {ref.video.parent} is still there, or run `rigtrain data "
            "prepare` on it, which names every video it cannot read"
        )

    def keep_apart(self, heldout_videos) -> None:
        """Take stand-ins from the failed clip's own side of the held-out split first: a clip
        the run trains on stands in for a held-out one in an evaluation (or the reverse) only
        when no other video of that side decodes."""
        held = set(heldout_videos)
        self._heldout = [name in held for name in self.clip_videos()]

    def _stand_ins(self, i: int):
        """Clip i, then the first clip of every other video, in order after i (wrapping
        around): those on i's side of the split first (keep_apart), then the others."""
        yield i
        if self._first_clips is None:
            self._first_clips = list({ref.video: c for c, ref in reversed(list(enumerate(self.clips)))}.values())
        n, video = len(self.clips), self.clips[i].video
        others = sorted((c for c in self._first_clips if self.clips[c].video != video), key=lambda c: (c - i) % n)
        if self._heldout is not None:
            others.sort(key=lambda c: self._heldout[c] != self._heldout[i])  # stable: the order after i stays
        yield from others

    def _say(self, ref: ClipRef, what: str, message: str) -> None:
        if (str(ref.video), what) not in self._said:
            self._said.add((str(ref.video), what))
            print(f"[rigtrain] warning: {ref.name or ref.video}: {message}", file=sys.stderr, flush=True)

    def _decode(self, i: int) -> dict[str, torch.Tensor]:
        d, ref = self.data, self.clips[i]
        video = media.read_video_clip(ref.video, ref.start_frame, d.clip_frames, d.fps, tuple(d.frame_size), d.resize)
        start_s = ref.start_frame / d.fps
        audio = np.zeros(d.clip_samples, np.int16)
        has_audio = False
        if ref.audio is not None or ref.container_audio:
            try:
                piece = sound.read_audio_window(ref.video, ref.audio, start_s, d.clip_seconds, d.sample_rate)
            except (media.MediaError, OSError) as err:
                self._say(ref, "sound", f"sound left out where it cannot be decoded ({err}), from {start_s:.1f} s")
                piece = None
            if piece is not None:
                audio[: len(piece)] = sound.to_pcm16(piece[: d.clip_samples])
                has_audio = len(piece) >= 0.9 * d.clip_samples
        text = np.zeros(d.max_text_bytes, np.uint8)
        length = 0
        segment_offset = np.zeros(d.segments_per_clip, np.int64)
        segment_len = np.zeros(d.segments_per_clip, np.int64)
        try:
            segments = _narration_of(ref)
        except (media.MediaError, OSError) as err:
            self._say(ref, "narration", f"narration left out: it cannot be read now ({err})")
            segments = None
        if segments is not None:
            words, placed = clip_text(segments, start_s, start_s + d.clip_seconds, d.max_text_bytes)
            text[: len(words)] = np.frombuffer(words, np.uint8)
            length = len(words)
            placed = [(off, n) for _, off, n in placed if n > 0][: d.segments_per_clip]
            for j, (off, n) in enumerate(placed):
                segment_offset[j], segment_len[j] = off, n
        return {
            "video": torch.from_numpy(video),
            "audio": torch.from_numpy(audio),
            "has_audio": torch.tensor(has_audio),
            "text": torch.from_numpy(text),
            "text_len": torch.tensor(length, dtype=torch.int64),
            "segment_offset": torch.from_numpy(segment_offset),
            "segment_len": torch.from_numpy(segment_len),
            "labels": torch.full((3,), -1, dtype=torch.int16),
            "index": torch.tensor(i, dtype=torch.int64),
        }

    def narrations(self, indices) -> list[str]:
        """The clips' narration text alone (no video decoded), for labelling plots."""
        d, out = self.data, []
        for i in indices:
            ref = self.clips[int(i)]
            start_s = ref.start_frame / d.fps
            words, segments = b"", _narration_of(ref)
            if segments is not None:
                words, _ = clip_text(segments, start_s, start_s + d.clip_seconds, d.max_text_bytes)
            out.append(words.decode("utf-8", "replace"))
        return out

    def clip_videos(self) -> list[str]:
        """Each clip's source video file name."""
        return [ref.name or ref.video.name for ref in self.clips]

    def batch(self, indices: list[int], pin_memory: bool = False) -> dict[str, torch.Tensor]:
        items = [self[i] for i in indices]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
