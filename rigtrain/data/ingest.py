"""One video into clips, in a worker of `data prepare`, in bounded memory.

The picture is decoded frame by frame and each clip is cut as soon as its last frame is in;
clips go to part files on disk (PART_BYTES at most each) rather than to memory, so an
hour-long lecture at `base`'s 224x224 (5 GiB of clips) costs a worker one part, and the
process that writes shards reads one part at a time. Sound, narration and labels are small
(an hour of `base`'s sound is 115 MB) and come back with the result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rigtrain.config import DataConfig
from rigtrain.data import container, media, sound
from rigtrain.data.narration import clip_text
from rigtrain.data.shards import ARRAYS, CLIP_DTYPE, LABEL_KEYS
from rigtrain.data.sources import Source, audio_mismatch, fingerprint
from rigtrain.data.subtitles import CONTAINER, narration_of

# The most bytes of clips a worker holds before writing them out as a part.
PART_BYTES = 64 * 2**20


@dataclass
class SourceClips:
    """One video's clips (or a run of them), ready to append to a shard."""

    video: np.ndarray
    audio: np.ndarray
    text: np.ndarray
    text_len: np.ndarray
    clips: np.ndarray
    segments: list[tuple[int, float, float, int, int]]  # clip is local to these clips
    labels: np.ndarray

    ARRAYS = ARRAYS

    def __len__(self) -> int:
        return len(self.clips)

    def split(self, k: int) -> tuple[SourceClips, SourceClips]:
        """The first k clips and the rest, narration segments re-numbered to match."""

        def part(sl: slice, keep, shift: int) -> SourceClips:
            return SourceClips(
                **{key: getattr(self, key)[sl] for key in self.ARRAYS},
                segments=[(c - shift, *rest) for c, *rest in self.segments if keep(c)],
            )

        return part(slice(None, k), lambda c: c < k, 0), part(slice(k, None), lambda c: c >= k, k)


@dataclass
class Ingested:
    """A video's clips from `skip` on: the pictures in part files (path, clips in it), the
    rest in `clips` (its video array empty); info describes the whole video."""

    clips: SourceClips
    parts: list[tuple[Path, int]]
    info: dict

    def pieces(self):
        """The clips, one part at a time (each part file removed once read)."""
        for path, count in self.parts:
            head, self.clips = self.clips.split(count)
            head.video = np.load(path)
            path.unlink()
            yield head


class _Parts:
    """Clips cut from the frames as they are decoded, written out every `per_part` clips."""

    def __init__(self, prefix: Path, clip_shape: tuple, skip: int):
        self.prefix, self.skip, self.made, self.written = prefix, skip, 0, []
        self.per_part = max(1, PART_BYTES // math.prod(clip_shape))
        self.buffer = np.zeros((self.per_part, *clip_shape), np.uint8)
        self.filled = 0

    def add(self, clip: list[np.ndarray]) -> None:
        self.made += 1
        if self.made <= self.skip:  # resuming: these clips are in a shard already
            return
        self.buffer[self.filled] = np.stack(clip)
        self.filled += 1
        if self.filled == self.per_part:
            self.flush()

    def flush(self) -> None:
        if self.filled:
            path = self.prefix.with_name(f"{self.prefix.name}-{len(self.written):05d}.npy")
            np.save(path, self.buffer[: self.filled])
            self.written.append((path, self.filled))
            self.filled = 0


def _cut_clips(source: Source, data: DataConfig, parts: _Parts) -> tuple[int, list[int], media.VideoInfo]:
    """Decode the video once, handing each clip to `parts` as soon as its frames are in:
    every stride_frames, then (clip_starts' rule, once the length is known) one aligned to
    the end from the frames kept for it. Returns the output frame count, the clip starts
    and the video's info."""
    T, stride = data.clip_frames, data.stride_frames
    info, output = media.output_frames_of(source.video, data.fps, tuple(data.frame_size), data.resize)
    kept: list[np.ndarray] = []  # frames kept_from, kept_from + 1, ...
    kept_from, frames, regular = 0, 0, 0
    try:
        for frame in output:
            kept.append(frame)
            frames += 1
            while (start := round(regular * stride)) + T <= frames:
                parts.add(kept[start - kept_from : start - kept_from + T])
                regular += 1
            # keep what the next clip needs, and the last T frames for a clip aligned to the end
            drop = min(round(regular * stride), frames - T) - kept_from
            if drop > 0:
                del kept[:drop]
                kept_from += drop
    finally:
        output.close()  # the capture is released even when a part cannot be written
    if frames == 0:
        raise media.MediaError("no frame could be decoded (truncated or corrupt)")
    starts = media.clip_starts(frames, T, stride)
    if len(starts) > regular:  # the end-aligned clip
        parts.add(kept[frames - T - kept_from :])
    parts.flush()
    return frames, starts, info


def ingest(source: Source, data: DataConfig, labels: dict | None, skip_clips: int, part_prefix: Path) -> Ingested:
    """Decode one video with its audio and narration into clips, from clip skip_clips on (a
    resumed prepare). A bad sidecar leaves that modality out (and is reported in
    info["skipped"]); a bad video raises MediaError, with no part left behind."""
    parts = _Parts(part_prefix, (data.clip_frames, *data.frame_size, 3), skip_clips)
    try:
        frames, starts, info = _cut_clips(source, data, parts)
    except BaseException:
        for path, _ in parts.written:
            path.unlink(missing_ok=True)
        raise
    duration = frames / data.fps
    skipped: list[dict] = []
    problems: list[str] = []
    audio, audio_from = _sound_of(source, data, duration, skipped, problems)
    segments, narration_from = _narration_of(source, duration, skipped, problems)
    clips = _sound_text_and_labels(data, starts, audio, segments, (labels or {}), source.video.stem)
    n, T = len(starts), data.clip_frames
    whole = {
        "video": source.name,
        "audio": audio_from,
        "narration": narration_from,
        "duration_s": round(duration, 3),
        "source_fps": round(info.fps, 3),
        "source_size": [info.height, info.width],
        "interlaced": container.field_order_of(source.video),
        "clips": n,
        "end_aligned_clip": n > 0 and starts[-1] != round((n - 1) * data.stride_frames),
        "unused_tail_s": round((frames - starts[-1] - T) / data.fps, 3) if n else round(duration, 3),
        "narration_segments": len(segments),
        "skipped": skipped,
        "problems": problems,
        "fingerprint": fingerprint(source.video),
    }
    return Ingested(clips.split(skip_clips)[1] if skip_clips else clips, parts.written, whole)


def _sound_text_and_labels(
    data: DataConfig, starts: list[int], audio, segments, labels: dict, stem: str
) -> SourceClips:
    """Everything of the clips but their pictures (those are in the parts)."""
    n, S, L = len(starts), data.clip_samples, data.max_text_bytes
    out = SourceClips(
        video=np.zeros((n, 0), np.uint8),
        audio=np.zeros((n, S), np.int16),
        text=np.zeros((n, L), np.uint8),
        text_len=np.zeros(n, np.int32),
        clips=np.zeros(n, CLIP_DTYPE),
        segments=[],
        labels=np.full((n, 3), -1, np.int16),
    )
    events = labels.get("videos", {}).get(stem, [])
    for i, f0 in enumerate(starts):
        start_s = f0 / data.fps
        has_audio = False
        if audio is not None:
            s0 = round(start_s * data.sample_rate)
            piece = audio[s0 : s0 + S]
            # Audio a few ms shorter than the video (encoder padding) is padded with silence;
            # a clip with little or no sound is marked missing, never filled in.
            has_audio = len(piece) >= 0.9 * S
            out.audio[i, : len(piece)] = sound.to_pcm16(piece)
        text, placed = clip_text(segments, start_s, start_s + data.clip_seconds, L)
        out.text[i, : len(text)] = np.frombuffer(text, np.uint8)
        out.text_len[i] = len(text)
        out.clips[i] = (0, start_s, has_audio, len(text) > 0)
        out.segments += [(i, seg.start, seg.end, off, length) for seg, off, length in placed]
        middle = start_s + data.clip_seconds / 2
        for event in events:
            if event["start"] <= middle < event["end"]:
                out.labels[i] = [labels[key + "s"].index(event[key]) for key in LABEL_KEYS]
    return out


def _sound_of(source: Source, data: DataConfig, duration: float, skipped: list, problems: list):
    """(samples or None, where they came from): the sidecar when it is usable, else the
    container's own track; what was left out is added to `skipped` or `problems`."""
    audio, audio_from = None, None
    if source.audio is not None:
        try:
            audio = sound.read_audio_file(source.audio, data.sample_rate)
            mismatch = audio_mismatch(len(audio) / data.sample_rate, duration)
            if mismatch:
                raise media.MediaError(mismatch)
            audio_from = source.named(source.audio)
        except media.MediaError as err:
            audio = None
            skipped.append(
                {"file": source.named(source.audio), "reason": f"{err}; {source.name} is used without sound"}
            )
    if source.audio is None or (audio is None and skipped):
        # No (usable) sidecar: the container's own track, when there is one.
        try:
            audio = sound.read_container_audio(source.video, data.sample_rate)
        except media.MediaError as err:
            problems.append(f"audio track left out: {err}")
            audio = None
        audio_from = "container" if audio is not None else None
    return audio, audio_from


def _narration_of(source: Source, duration: float, skipped: list, problems: list) -> tuple[list, str | None]:
    """The narration's segments and where they came from (index.json's "narration"; see
    subtitles.narration_of); each one that does not read is added to `skipped`, and what is
    wrong with the one used (broken cues, speech after the video's end) to `problems`."""
    narration, narration_from, failed = narration_of(source, duration)
    track = f"{source.name} subtitle track"
    if narration:
        where = track if narration_from == CONTAINER else narration_from
        problems += [f"{where} {p}" for p in narration.problems]
    then = "narrated by its subtitle track" if narration_from == CONTAINER else "used without narration"
    skipped += [{"file": file or track, "reason": f"{why}; {source.name} is {then}"} for file, why in failed]
    return (narration.segments if narration else []), narration_from


def ingest_or_reason(job: tuple) -> Ingested | str:
    """ingest(*job), or why the video cannot be used (for the worker processes)."""
    try:
        return ingest(*job)
    except media.MediaError as err:
        return str(err)
