"""Narration sidecars: Whisper JSON (a list of {start, end, text} segments, or an object with
`segments`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rigtrain.data.media import MediaError

NARRATION_SUFFIXES = (".json",)


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


def read_whisper_json(path: Path) -> list[Segment]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MediaError(f"not valid JSON: {err}") from None
    items = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise MediaError("not narration: expected a list of {start, end, text} segments or an object with 'segments'")
    segments = []
    for i, item in enumerate(items):
        try:
            start, end, text = float(item["start"]), float(item["end"]), str(item["text"])
        except (KeyError, TypeError, ValueError):
            raise MediaError(f"not narration: segment {i} lacks a numeric start/end or a text") from None
        if end < start:
            raise MediaError(f"segment {i} ends ({end}) before it starts ({start})")
        segments.append(Segment(start, end, text.strip()))
    return segments


def clip_text(segments: list[Segment], start: float, end: float, max_bytes: int) -> tuple[bytes, list[tuple[Segment, int, int]]]:
    """The narration overlapping [start, end): the segment texts joined by spaces as UTF-8,
    cut to max_bytes at a character boundary, and for each segment its (offset, length)
    in those bytes."""
    out = b""
    placed = []
    for seg in segments:
        if seg.end <= start or seg.start >= end or not seg.text:
            continue
        piece = seg.text.encode("utf-8")
        offset = len(out) + (1 if out else 0)
        room = max_bytes - offset
        if room <= 0:
            break
        piece = piece[:room].decode("utf-8", errors="ignore").encode("utf-8")  # whole characters only
        out = (out + b" " if out else b"") + piece
        placed.append((seg, offset, len(piece)))
    return out, placed
