"""`rigtrain data prepare`: a folder of videos -> shards in the format of data/shards.py.

Shards are written to a temporary folder and renamed when complete, and index.json is
written last, so a prepare that is interrupted never leaves data that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rigtrain.config import DataConfig
from rigtrain.data import media
from rigtrain.data.narration import clip_text, read_narration
from rigtrain.data.processes import in_order
from rigtrain.data.shards import (
    ARRAYS,
    CLIP_DTYPE,
    INDEX_FORMAT,
    LABEL_KEYS,
    LEGACY_PARAMS,
    SEGMENT_DTYPE,
    preparation_params,
)
from rigtrain.data.sources import Source, audio_mismatch, fingerprint, read_labels, sources_in
from rigtrain.errors import UserError
from rigtrain.files import write_json


def require_empty_dir(path: Path, command: str) -> None:
    """Output goes only into a new or empty folder: nothing of the user's is overwritten."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{command}: {path} is not an empty folder; choose an empty or new one (nothing was written)")
    path.mkdir(parents=True, exist_ok=True)


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


def ingest(source: Source, data: DataConfig, labels: dict | None, skip_clips: int = 0) -> SourceClips:
    """Decode one video with its audio and narration into clips. A bad sidecar leaves that
    modality out (and is reported in info["skipped"]); a bad video raises MediaError."""
    frames, info = media.read_video(source.video, data.fps, tuple(data.frame_size), data.resize)
    duration = len(frames) / data.fps
    skipped: list[dict] = []
    problems: list[str] = []
    audio, audio_from = _sound_of(source, data, duration, skipped, problems)
    segments = _narration_of(source, skipped, problems)
    starts = media.clip_starts(len(frames), data.clip_frames, data.stride_frames)
    n = len(starts)
    T, S, L = data.clip_frames, data.clip_samples, data.max_text_bytes
    out = SourceClips(
        video=np.zeros((n, T, *data.frame_size, 3), np.uint8),
        audio=np.zeros((n, S), np.int16),
        text=np.zeros((n, L), np.uint8),
        text_len=np.zeros(n, np.int32),
        clips=np.zeros(n, CLIP_DTYPE),
        segments=[],
        labels=np.full((n, 3), -1, np.int16),
    )
    events = (labels or {}).get("videos", {}).get(source.video.stem, [])
    for i, f0 in enumerate(starts):
        start_s = f0 / data.fps
        out.video[i] = frames[f0 : f0 + T]
        has_audio = False
        if audio is not None:
            s0 = round(start_s * data.sample_rate)
            piece = audio[s0 : s0 + S]
            # Audio a few ms shorter than the video (encoder padding) is padded with silence;
            # a clip with little or no sound is marked missing, never filled in.
            has_audio = len(piece) >= 0.9 * S
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
    out.info = {
        "video": source.name,
        "audio": audio_from,
        "narration": source.named(source.narration) if source.narration and segments else None,
        "duration_s": round(duration, 3),
        "source_fps": round(info.fps, 3),
        "source_size": [info.height, info.width],
        "clips": n,
        "end_aligned_clip": n > 0 and starts[-1] != round((n - 1) * data.stride_frames),
        "unused_tail_s": round((len(frames) - starts[-1] - T) / data.fps, 3) if n else round(duration, 3),
        "narration_segments": len(segments),
        "skipped": skipped,
        "problems": problems,
        "fingerprint": fingerprint(source.video),
    }
    if skip_clips:  # resuming a source whose first clips are already in a shard
        info, out = out.info, out.split(skip_clips)[1]
        out.info = info
    return out


def _sound_of(source: Source, data: DataConfig, duration: float, skipped: list, problems: list):
    """(samples or None, where they came from): the sidecar when it is usable, else the
    container's own track; what was left out is added to `skipped` or `problems`."""
    audio, audio_from = None, None
    if source.audio is not None:
        try:
            audio = media.read_audio_file(source.audio, data.sample_rate)
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
            audio = media.read_container_audio(source.video, data.sample_rate)
        except media.MediaError as err:
            problems.append(f"audio track left out: {err}")
            audio = None
        audio_from = "container" if audio is not None else None
    return audio, audio_from


def _narration_of(source: Source, skipped: list, problems: list) -> list:
    """The narration sidecar's segments, or none (a bad sidecar is added to `skipped`)."""
    if source.narration is None:
        return []
    try:
        narration = read_narration(source.narration)
    except media.MediaError as err:
        skipped.append(
            {"file": source.named(source.narration), "reason": f"{err}; {source.name} is used without narration"}
        )
        return []
    problems += [f"{source.named(source.narration)} {p}" for p in narration.problems]
    return narration.segments


def _ingest_or_reason(job: tuple[Source, DataConfig, dict | None, int]) -> SourceClips | str:
    try:
        return ingest(*job)
    except media.MediaError as err:
        return str(err)


class ShardWriter:
    """Collects sources' clips and writes them out as shards of shard_clips clips (the last
    may be smaller); a source may span two shards. After every shard, `on_shard` gets the
    sources that are now completely written and the one that is partly written, which is
    what a resumed prepare needs to know."""

    def __init__(self, out_dir: Path, shard_clips: int, shards: list[dict], on_shard):
        self.out_dir, self.shard_clips, self.on_shard = out_dir, shard_clips, on_shard
        self.pending: list[tuple[int, SourceClips]] = []  # (source id, clips not yet written)
        self.shards = list(shards)
        self.total = sum(s["clips"] for s in shards)

    def add(self, source_id: int, clips: SourceClips) -> None:
        clips.clips["source"] = source_id
        self.pending.append((source_id, clips))
        while sum(len(c) for _, c in self.pending) >= self.shard_clips:
            self._write_shard()

    def close(self) -> None:
        while self.pending:
            self._write_shard()

    def _write_shard(self) -> None:
        taken: list[SourceClips] = []
        count = 0
        while self.pending and count < self.shard_clips:
            source_id, clips = self.pending[0]
            head, rest = clips.split(self.shard_clips - count)
            taken.append(head)
            count += len(head)
            if len(rest):
                self.pending[0] = (source_id, rest)
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
        first_unwritten = self.pending[0][0] if self.pending else None
        self.on_shard(first_unwritten, len(self.pending[0][1]) if self.pending else 0)


STATE_FILE = ".prepare-state.json"


def _load_state(src: Path, out: Path, data: DataConfig) -> dict | None:
    """What an earlier prepare into `out` finished: the journal of an interrupted one, or the
    index of a complete one. None for a new (or empty) folder."""
    for name in (STATE_FILE, "index.json"):
        path = out / name
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise UserError(f"data prepare: {path} is corrupt ({err}); prepare into a new folder") from None
            break
    else:
        return None
    params = preparation_params(data)
    for key, value in {**LEGACY_PARAMS, **state.get("params", {})}.items():
        if params.get(key) != value:
            raise UserError(
                f"data prepare: {out} was prepared with {key}={value}, not {params.get(key)}; "
                f"use the same preset and --set values to continue it, or a new folder"
            )
    for info in state["sources"]:
        video = src / info["video"]
        if not video.is_file():
            raise UserError(
                f"data prepare: {info['video']} is in {out} but no longer in {src}; "
                "put it back, or prepare into a new folder"
            )
        if info.get("fingerprint") and fingerprint(video) != info["fingerprint"]:
            raise UserError(
                f"data prepare: {video} changed since it was prepared into {out}; prepare into a new folder"
            )
    state.setdefault("partial", None)
    return state


def _start_or_continue(src: Path, out: Path, data: DataConfig) -> dict:
    """The journal of an interrupted or earlier prepare into `out` (its leftovers removed:
    half-written shards, and shards renamed into place after the journal's last update,
    which are written again from the sources), or a new one in an empty folder."""
    state = _load_state(src, out, data)
    if state is not None:
        known = {s["dir"] for s in state["shards"]}
        for path in out.iterdir():
            if path.is_dir() and (
                path.name.startswith(".shard-") or (path.name.startswith("shard-") and path.name not in known)
            ):
                shutil.rmtree(path)
        return state
    require_empty_dir(out, "data prepare")
    state = {
        "format": INDEX_FORMAT,
        "params": preparation_params(data),
        "source_dir": str(src.resolve()),
        "shards": [],
        "sources": [],
        "partial": None,
    }
    write_json(out / STATE_FILE, state)
    return state


def _too_short(source: Source, result: SourceClips, data: DataConfig) -> dict:
    seconds = result.info["duration_s"]
    return {"file": source.name, "reason": f"shorter ({seconds} s) than one clip ({data.clip_seconds} s)"}


def prepare(
    src_dir: str | Path, out_dir: str | Path, data: DataConfig, *, workers: int = 1, progress=None, log=None
) -> dict:
    """Prepare every video in src_dir into shards in out_dir; returns the index.

    Running it again on the same folders continues: an interrupted prepare resumes after
    its last complete shard, and a complete one only adds the videos that are new."""
    src, out = Path(src_dir), Path(out_dir)
    sources, unused = sources_in(src, "data prepare", skip=out)
    state = _start_or_continue(src, out, data)
    labels = read_labels(src)
    started = time.perf_counter()
    partial = state["partial"]
    done_names = {info["video"] for info in state["sources"]}
    finished = [info for info in state["sources"] if not partial or info["video"] != partial["video"]]
    todo = [s for s in sources if s.name not in done_names]
    if partial:
        todo.insert(0, next(s for s in sources if s.name == partial["video"]))
    added: list[dict] = list(finished)  # source id -> info, for everything handed to the writer
    interrupted = (out / STATE_FILE).is_file() and bool(state["sources"])
    if not todo and not interrupted and (out / "index.json").is_file():
        if log:
            log(f"all {len(sources)} video(s) of {src} are already prepared in {out}; nothing to do")
        return json.loads((out / "index.json").read_text())
    if log and state["sources"]:
        part = f" and {partial['written']} clips of {partial['video']}" if partial else ""
        log(
            f"{'continuing an interrupted prepare' if interrupted else 'adding to'} {out}: "
            f"{len(finished)} video(s){part} already in {len(state['shards'])} shard(s), {len(todo)} to do"
        )

    def journal(first_unwritten: int | None, remaining: int) -> None:
        complete = added if first_unwritten is None else added[:first_unwritten]
        state["sources"] = complete + ([added[first_unwritten]] if first_unwritten is not None else [])
        state["partial"] = (
            None
            if first_unwritten is None
            else {"video": added[first_unwritten]["video"], "written": added[first_unwritten]["clips"] - remaining}
        )
        state["shards"] = writer.shards
        if first_unwritten is not None and state["partial"]["written"] == 0:
            state["sources"].pop()
            state["partial"] = None
        write_json(out / STATE_FILE, state)

    writer = ShardWriter(out, data.shard_clips, state["shards"], journal)
    skipped = list(unused)
    jobs = [(s, data, labels, partial["written"] if partial and s.name == partial["video"] else 0) for s in todo]
    for done, (source, result) in enumerate(zip(todo, in_order(_ingest_or_reason, jobs, workers)), 1):
        if isinstance(result, str):
            skipped.append({"file": source.name, "reason": result})
        elif result.info["clips"] == 0:
            skipped.append(_too_short(source, result, data))
        else:
            added.append(result.info)
            writer.add(len(added) - 1, result)
        if progress:
            progress(done, len(todo), source.name, writer.total + sum(len(c) for _, c in writer.pending))
    writer.close()
    if writer.total == 0:
        raise UserError(
            f"data prepare: no clip could be made from {src}: "
            + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        )
    skipped += [item for info in added for item in info["skipped"]]
    index = {
        "format": INDEX_FORMAT,
        "params": preparation_params(data),
        "source_dir": str(src.resolve()),
        "sources": added,
        "skipped": skipped,
        "shards": writer.shards,
        "clips": writer.total,
        "labels": {k: labels[k + "s"] for k in LABEL_KEYS} if labels else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out / "index.json", index)
    (out / STATE_FILE).unlink(missing_ok=True)
    return index
