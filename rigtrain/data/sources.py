"""What a folder of videos holds, before anything is decoded: each video with its sidecar
sound and narration (docs/run-folder.md, "Data a user brings"), the files that cannot be
used and why, Shapes world's labels, and a file's fingerprint for resuming a prepare."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rigtrain.data import media
from rigtrain.data.narration import NARRATION_SUFFIXES, read_narration
from rigtrain.data.shards import LABEL_KEYS
from rigtrain.errors import UserError


@dataclass
class Source:
    video: Path
    audio: Path | None = None  # a sidecar; None = the container's own track, if any
    narration: Path | None = None
    root: Path | None = None  # the folder the user named; files are named by their path in it

    def named(self, path: Path) -> str:
        """A file of this source as the user knows it: its path within the folder
        ("2024/trip/GX010001.MP4"), which tells apart cameras that reuse file names."""
        return path.relative_to(self.root).as_posix() if self.root else path.name

    @property
    def name(self) -> str:
        return self.named(self.video)


def _is_rigtrain_output(folder: Path) -> bool:
    """Shards (a prepare into a folder inside the videos' folder) or a run: never read as
    videos, and their hundreds of files not listed one by one."""
    if (folder / ".prepare-state.json").is_file():
        return True
    if (folder / "config.json").is_file() and (
        (folder / "metrics.jsonl").is_file() or (folder / "checkpoints").is_dir()
    ):
        return True
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and "shards" in index and "params" in index


def _files_under(src_dir: Path, skip: Path | None) -> tuple[list[Path], list[dict]]:
    """Every file in src_dir and the folders under it, hidden ones (".git") left out, and the
    folders of rigtrain's own output reported, not read. Links to folders are not followed
    (a loop would never end)."""
    files, outputs = [], []
    for folder, subfolders, names in os.walk(src_dir):
        here = Path(folder)
        kept = []
        for sub in sorted(subfolders):
            path = here / sub
            if sub.startswith("."):
                continue
            if (skip is not None and path.resolve() == skip) or _is_rigtrain_output(path):
                outputs.append({"file": f"{path.relative_to(src_dir).as_posix()}/", "reason": "rigtrain's own output"})
                continue
            kept.append(sub)
        subfolders[:] = kept
        files += [here / n for n in names if not n.startswith(".") and (here / n).is_file()]
    return sorted(files, key=lambda p: p.relative_to(src_dir).as_posix()), outputs


# A language tag before a subtitle's suffix, as yt-dlp names them: NAME.en.vtt, NAME.pt-BR.srt,
# NAME.en-orig.vtt.
LANGUAGE_TAG = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*", re.IGNORECASE)


def _sidecar_key(path: Path, stems: set[Path]) -> tuple[Path, str] | None:
    """(the video's folder/stem, "audio" | "narration") that `path` would belong to, or None
    when it is no sidecar kind. Narration may carry a language tag (NAME.en.vtt)."""
    suffix = path.suffix.lower()
    kind = "audio" if suffix in media.AUDIO_SUFFIXES else "narration" if suffix in NARRATION_SUFFIXES else None
    if kind is None:
        return None
    stem = path.with_suffix("")
    if kind == "narration" and stem not in stems and LANGUAGE_TAG.fullmatch(stem.suffix[1:]):
        stem = stem.with_suffix("")
    return stem, kind


def _choose_sidecars(
    candidates: dict[tuple[Path, str], list[Path]], stems: set[Path]
) -> tuple[dict[tuple[Path, str], Path], dict[Path, str]]:
    """One sidecar of each kind per video: the first by name, except that of several
    narration files (a Whisper .json and a downloaded .srt) the first that reads is taken,
    rather than a broken one leaving the video without narration. Returns the choice, and
    why each narration file that does not read does not (checked only where there is a
    choice; the chosen one's error, when none reads, is reported where it is used)."""
    chosen, unreadable = {}, {}
    for (stem, kind), paths in candidates.items():
        chosen[stem, kind] = paths[0]
        if kind != "narration" or len(paths) == 1 or stem not in stems:
            continue
        for path in paths:
            try:
                read_narration(path)
            except media.MediaError as err:
                unreadable[path] = str(err)
                continue
            chosen[stem, kind] = path
            break
    return chosen, unreadable


def find_sources(src_dir: Path, skip: Path | None = None) -> tuple[list[Source], list[dict]]:
    """Videos with their sidecars (same folder, same stem), in src_dir and every folder under
    it. Files that belong to no video are reported, not silently ignored. skip: a folder
    left out (the output of the command that asks)."""
    files, unused = _files_under(src_dir, skip.resolve() if skip is not None else None)
    rel = lambda p: p.relative_to(src_dir).as_posix()  # noqa: E731
    videos = [p for p in files if p.suffix.lower() in media.VIDEO_SUFFIXES]
    stems = {p.with_suffix("") for p in videos}
    candidates: dict[tuple[Path, str], list[Path]] = {}  # (folder/stem, "audio" | "narration") -> files
    for p in files:
        key = _sidecar_key(p, stems)
        if key:
            candidates.setdefault(key, []).append(p)
    for (stem, _), paths in candidates.items():
        paths.sort(key=lambda p: p.with_suffix("") != stem)  # NAME.srt before NAME.en.vtt; else by name
    by_kind, unreadable = _choose_sidecars(candidates, stems)
    sources = [
        Source(v, by_kind.get((v.with_suffix(""), "audio")), by_kind.get((v.with_suffix(""), "narration")), src_dir)
        for v in videos
    ]
    used = {p for s in sources for p in (s.audio, s.narration) if p}
    for p in files:
        if p.suffix.lower() in media.VIDEO_SUFFIXES or p in used:
            continue
        if rel(p) == "labels.json" and "labels.json" not in {rel(s.video.with_suffix(".json")) for s in sources}:
            if read_labels(src_dir) is None:
                unused.append(
                    {"file": "labels.json", "reason": "not Shapes-world labels (as `data synth` writes them)"}
                )
            continue
        key = _sidecar_key(p, stems)
        first = by_kind.get(key) if key else None
        reason = (
            "not a video, audio or narration file"
            if key is None
            else "no video with this name"
            if key[0] not in stems
            else f"{unreadable[p]}; {rel(first)} is used instead"
            if p in unreadable and first not in unreadable
            else unreadable[p]
            if p in unreadable
            else f"{rel(first)} comes first for this video (one sidecar of each kind, the first by name)"
        )
        unused.append({"file": rel(p), "reason": reason})
    return sources, unused


def sources_in(src: Path, command: str, skip: Path | None = None) -> tuple[list[Source], list[dict]]:
    """find_sources for a folder the user named, with the errors a wrong one deserves."""
    if not src.is_dir():
        raise UserError(f"{command}: {src} is not a folder; give the folder that holds your videos")
    sources, unused = find_sources(src, skip)
    if not sources:
        raise UserError(
            f"{command}: {src} holds no video ({', '.join(media.VIDEO_SUFFIXES)}); point it at a folder of videos"
        )
    return sources, unused


def read_labels(src_dir: Path) -> dict | None:
    """Shapes-world labels.json, when the folder has one (evaluation only); None for any
    other file of that name (a labelling tool's export, a broken file): it labels nothing."""
    path = src_dir / "labels.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if _shapes_world_labels(data) else None


def _shapes_world_labels(data) -> bool:
    """{"shapes": [...], "colours": [...], "directions": [...], "videos": {name: [event]}},
    each event's start and end numbers and its shape, colour and direction in the lists."""
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
        return False
    names = {key: data.get(key + "s") for key in LABEL_KEYS}
    if not all(isinstance(v, list) for v in names.values()):
        return False
    for events in data["videos"].values():
        if not isinstance(events, list):
            return False
        for event in events:
            if not (
                isinstance(event, dict)
                and all(
                    isinstance(event.get(k), (int, float)) and not isinstance(event.get(k), bool)
                    for k in ("start", "end")
                )
                and all(event.get(key) in names[key] for key in LABEL_KEYS)
            ):
                return False
    return True


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
