"""What a folder of videos holds, before anything is decoded: each video with its sidecar
sound and narration (docs/run-folder.md, "Data a user brings"), the files that cannot be
used and why, Shapes world's labels, and a file's fingerprint for resuming a prepare."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rigtrain.data import media
from rigtrain.data.narration import NARRATION_SUFFIXES
from rigtrain.errors import UserError


@dataclass
class Source:
    video: Path
    audio: Path | None = None  # a sidecar; None = the container's own track, if any
    narration: Path | None = None


def find_sources(src_dir: Path) -> tuple[list[Source], list[dict]]:
    """Videos with their sidecars (same stem). Files that belong to no video are reported,
    not silently ignored."""
    files = sorted(p for p in src_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    videos = [p for p in files if p.suffix.lower() in media.VIDEO_SUFFIXES]
    stems = {p.stem for p in videos}
    by_kind: dict[tuple[str, str], Path] = {}  # (stem, "audio" | "narration") -> the first such file
    for p in files:
        kind = (
            "audio"
            if p.suffix.lower() in media.AUDIO_SUFFIXES
            else "narration"
            if p.suffix.lower() in NARRATION_SUFFIXES
            else None
        )
        if kind:
            by_kind.setdefault((p.stem, kind), p)
    sources = [Source(v, by_kind.get((v.stem, "audio")), by_kind.get((v.stem, "narration"))) for v in videos]
    used = {p for s in sources for p in (s.audio, s.narration) if p}
    unused = []
    for p in files:
        if p.suffix.lower() in media.VIDEO_SUFFIXES or p in used or p.name == "labels.json":
            continue
        reason = (
            "no video with this name"
            if p.stem not in stems
            else f"{by_kind[(p.stem, 'audio' if p.suffix.lower() in media.AUDIO_SUFFIXES else 'narration')].name} "
            "comes first for this video (one sidecar of each kind, the first by name)"
            if p.suffix.lower() in media.AUDIO_SUFFIXES + NARRATION_SUFFIXES
            else "not a video, audio or narration file"
        )
        unused.append({"file": p.name, "reason": reason})
    return sources, unused


def sources_in(src: Path, command: str) -> tuple[list[Source], list[dict]]:
    """find_sources for a folder the user named, with the errors a wrong one deserves."""
    if not src.is_dir():
        raise UserError(f"{command}: {src} is not a folder; give the folder that holds your videos")
    sources, unused = find_sources(src)
    if not sources:
        raise UserError(
            f"{command}: {src} holds no video ({', '.join(media.VIDEO_SUFFIXES)}); point it at a folder of videos"
        )
    return sources, unused


def read_labels(src_dir: Path) -> dict | None:
    """Shapes-world labels.json, when the folder has one (evaluation only)."""
    path = src_dir / "labels.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) and "videos" in data else None


def audio_mismatch(audio_s: float, video_s: float) -> str | None:
    """A sidecar must be the sound of its video. Encoders pad audio by a few frames, so
    small differences are normal; a sidecar off by more than 0.5 s (or 5%) is another
    recording, or cut differently, and would put sound at the wrong frames."""
    if abs(audio_s - video_s) <= max(0.5, 0.05 * video_s):
        return None
    return f"audio lasts {audio_s:.2f} s but the video {video_s:.2f} s"


def fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
