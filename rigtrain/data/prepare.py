"""`rigtrain data prepare`: a folder of videos -> memory-mapped shards.

    OUT_DIR/index.json            sources, skipped files and why, the preparation parameters
    OUT_DIR/shard-00000/video.npy     uint8 (N, T, H, W, 3)
                        audio.npy     int16 (N, S) mono PCM at data.sample_rate
                        text.npy      uint8 (N, max_text_bytes) narration overlapping the clip
                        text_len.npy  int32 (N,)
                        clips.npy     per clip: source, start_s, has_audio, has_text
                        segments.npy  per narration segment: clip, start_s, end_s, offset, length
                        labels.npy    int16 (N, 3) shape/colour/direction (Shapes world only)

Shards are written to a temporary folder and renamed when complete, and index.json is
written last, so a prepare that is interrupted never leaves data that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rigtrain.config import DataConfig
from rigtrain.data import media
from rigtrain.data.narration import NARRATION_SUFFIXES, clip_text, read_whisper_json
from rigtrain.errors import UserError

INDEX_FORMAT = 1
CLIP_DTYPE = np.dtype([("source", np.int32), ("start_s", np.float64), ("has_audio", np.bool_), ("has_text", np.bool_)])
SEGMENT_DTYPE = np.dtype([("clip", np.int32), ("start_s", np.float64), ("end_s", np.float64),
                          ("offset", np.int32), ("length", np.int32)])
LABEL_KEYS = ("shape", "colour", "direction")


def require_empty_dir(path: Path, command: str) -> None:
    """Output goes only into a new or empty folder: nothing of the user's is overwritten."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{command}: {path} is not an empty folder; choose an empty or new one (nothing was written)")
    path.mkdir(parents=True, exist_ok=True)


def preparation_params(data: DataConfig) -> dict:
    """What a shard depends on; training refuses shards made with other values."""
    return {"fps": data.fps, "frame_size": list(data.frame_size), "present_frames": data.present_frames,
            "future_frames": data.future_frames, "sample_rate": data.sample_rate,
            "clip_stride_s": data.stride_seconds, "max_text_bytes": data.max_text_bytes,
            "resize": "centre crop to the target aspect, then INTER_AREA"}


@dataclass
class Source:
    video: Path
    audio: Path | None = None  # a sidecar; None = the container's own track, if any
    narration: Path | None = None


@dataclass
class SourceClips:
    """One video's clips, ready to append to a shard."""

    video: np.ndarray
    audio: np.ndarray
    text: np.ndarray
    text_len: np.ndarray
    clips: np.ndarray
    segments: list[tuple[int, float, float, int, int]]  # clip is local to this source
    labels: np.ndarray
    info: dict = field(default_factory=dict)

    ARRAYS = ("video", "audio", "text", "text_len", "clips", "labels")

    def __len__(self) -> int:
        return len(self.clips)

    def split(self, k: int) -> tuple["SourceClips", "SourceClips"]:
        """The first k clips and the rest, narration segments re-numbered to match."""
        def part(sl: slice, keep, shift: int) -> SourceClips:
            return SourceClips(**{key: getattr(self, key)[sl] for key in self.ARRAYS},
                               segments=[(c - shift, *rest) for c, *rest in self.segments if keep(c)])
        return part(slice(None, k), lambda c: c < k, 0), part(slice(k, None), lambda c: c >= k, k)


def find_sources(src_dir: Path) -> tuple[list[Source], list[dict]]:
    """Videos with their sidecars (same stem). Files that belong to no video are reported,
    not silently ignored."""
    files = sorted(p for p in src_dir.iterdir() if p.is_file())
    videos = [p for p in files if p.suffix.lower() in media.VIDEO_SUFFIXES]
    stems = {p.stem for p in videos}
    by_kind: dict[tuple[str, str], Path] = {}  # (stem, "audio" | "narration") -> the first such file
    for p in files:
        kind = "audio" if p.suffix.lower() in media.AUDIO_SUFFIXES else \
            "narration" if p.suffix.lower() in NARRATION_SUFFIXES else None
        if kind:
            by_kind.setdefault((p.stem, kind), p)
    sources = [Source(v, by_kind.get((v.stem, "audio")), by_kind.get((v.stem, "narration"))) for v in videos]
    unused = [{"file": p.name, "reason": "no video with this name"} for p in files
              if p.suffix.lower() not in media.VIDEO_SUFFIXES and p.stem not in stems and p.name != "labels.json"]
    return sources, unused


def read_labels(src_dir: Path) -> dict | None:
    """Shapes-world labels.json, when the folder has one (evaluation only)."""
    path = src_dir / "labels.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) and "videos" in data else None


def ingest(source: Source, data: DataConfig, labels: dict | None) -> SourceClips:
    """Decode one video with its audio and narration into whole clips."""
    frames, info = media.read_video(source.video, data.fps, tuple(data.frame_size))
    duration = len(frames) / data.fps
    if source.audio is not None:
        audio = media.read_audio_file(source.audio, data.sample_rate)
        audio_from = source.audio.name
    else:
        audio = media.read_container_audio(source.video, data.sample_rate)
        audio_from = "container" if audio is not None else None
    segments = read_whisper_json(source.narration) if source.narration else []

    n = media.clip_count(duration, data.clip_seconds, data.stride_seconds)
    T, S, L = data.clip_frames, data.clip_samples, data.max_text_bytes
    out = SourceClips(video=np.zeros((n, T, *data.frame_size, 3), np.uint8), audio=np.zeros((n, S), np.int16),
                      text=np.zeros((n, L), np.uint8), text_len=np.zeros(n, np.int32),
                      clips=np.zeros(n, CLIP_DTYPE), segments=[], labels=np.full((n, 3), -1, np.int16))
    events = (labels or {}).get("videos", {}).get(source.video.stem, [])
    for i in range(n):
        start_s = i * data.stride_seconds
        f0 = round(start_s * data.fps)
        out.video[i] = frames[f0 : f0 + T]
        has_audio = False
        if audio is not None:
            s0 = round(start_s * data.sample_rate)
            piece = audio[s0 : s0 + S]
            # Audio a few ms shorter than the video (encoder padding) is padded with silence;
            # a clip with no audio at all is marked missing, never filled in.
            has_audio = len(piece) > 0
            out.audio[i, : len(piece)] = media.to_pcm16(piece)
        text, placed = clip_text(segments, start_s, start_s + data.clip_seconds, L)
        out.text[i, : len(text)] = np.frombuffer(text, np.uint8)
        out.text_len[i] = len(text)
        out.clips[i] = (0, start_s, has_audio, len(text) > 0)
        out.segments += [(i, seg.start, seg.end, off, length) for seg, off, length in placed]
        middle = start_s + data.clip_seconds / 2
        for event in events:
            if event["start"] <= middle < event["end"]:
                out.labels[i] = [labels[key + "s"].index(event[key]) for key in LABEL_KEYS]
    out.info = {"video": source.video.name, "audio": audio_from,
                "narration": source.narration.name if source.narration else None,
                "duration_s": round(duration, 3), "source_fps": round(info.fps, 3),
                "source_size": [info.height, info.width], "clips": n,
                "unused_tail_s": round(duration - (n - 1) * data.stride_seconds - data.clip_seconds, 3) if n else round(duration, 3),
                "narration_segments": len(segments)}
    return out


def _ingest_or_reason(args: tuple[Source, DataConfig, dict | None]) -> SourceClips | str:
    source, data, labels = args
    try:
        return ingest(source, data, labels)
    except media.MediaError as err:
        return str(err)


class ShardWriter:
    """Collects sources' clips and writes them out as shards of shard_clips clips (the last
    may be smaller); a source may span two shards."""

    def __init__(self, out_dir: Path, shard_clips: int):
        self.out_dir, self.shard_clips = out_dir, shard_clips
        self.pending: list[SourceClips] = []
        self.shards: list[dict] = []
        self.total = 0

    def add(self, source_index: int, clips: SourceClips) -> None:
        clips.clips["source"] = source_index
        self.pending.append(clips)
        while sum(map(len, self.pending)) >= self.shard_clips:
            self._write_shard()

    def close(self) -> None:
        while self.pending:
            self._write_shard()

    def _write_shard(self) -> None:
        taken: list[SourceClips] = []
        count = 0
        while self.pending and count < self.shard_clips:
            head, rest = self.pending[0].split(self.shard_clips - count)
            taken.append(head)
            count += len(head)
            if len(rest):
                self.pending[0] = rest
            else:
                self.pending.pop(0)
        segments, offset = [], 0
        for part in taken:
            segments += [(offset + clip, *rest) for clip, *rest in part.segments]
            offset += len(part)
        name = f"shard-{len(self.shards):05d}"
        tmp = self.out_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for key in SourceClips.ARRAYS:
            np.save(tmp / f"{key}.npy", np.concatenate([getattr(part, key) for part in taken]))
        np.save(tmp / "segments.npy", np.array(segments, dtype=SEGMENT_DTYPE))
        os.replace(tmp, self.out_dir / name)
        self.shards.append({"dir": name, "clips": count})
        self.total += count


def prepare(src_dir: str | Path, out_dir: str | Path, data: DataConfig, *, workers: int = 1,
            progress=None) -> dict:
    """Prepare every video in src_dir into shards in out_dir; returns the index."""
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise UserError(f"data prepare: {src} is not a folder; give the folder that holds your videos")
    sources, unused = find_sources(src)
    if not sources:
        raise UserError(f"data prepare: {src} holds no video ({', '.join(media.VIDEO_SUFFIXES)}); "
                        "point it at a folder of videos")
    if (out / "index.json").is_file():
        raise UserError(f"data prepare: {out} already holds prepared data; choose a new folder or delete it first")
    require_empty_dir(out, "data prepare")
    labels = read_labels(src)
    started = time.perf_counter()
    writer = ShardWriter(out, data.shard_clips)
    kept, skipped = [], list(unused)
    jobs = [(s, data, labels) for s in sources]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(_ingest_or_reason, jobs) if pool else map(_ingest_or_reason, jobs)
        for done, (source, result) in enumerate(zip(sources, results), 1):
            if isinstance(result, str):
                skipped.append({"file": source.video.name, "reason": result})
            elif len(result.clips) == 0:
                skipped.append({"file": source.video.name,
                                "reason": f"shorter ({result.info['duration_s']} s) than one clip ({data.clip_seconds} s)"})
            else:
                writer.add(len(kept), result)
                kept.append(result.info)
            if progress:
                progress(done, len(sources), source.video.name)
        writer.close()
    finally:
        if pool:
            pool.shutdown()
    if writer.total == 0:
        raise UserError(f"data prepare: no clip could be made from {src}: "
                        + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3]))
    index = {"format": INDEX_FORMAT, "params": preparation_params(data), "source_dir": str(src.resolve()),
             "sources": kept, "skipped": skipped, "shards": writer.shards, "clips": writer.total,
             "labels": {k: labels[k + "s"] for k in LABEL_KEYS} if labels else None,
             "seconds": round(time.perf_counter() - started, 2)}
    tmp = out / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "index.json")
    return index
