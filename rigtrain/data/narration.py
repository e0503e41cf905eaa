"""Narration sidecars: Whisper JSON (a list of {start, end, text} segments, or an object with
`segments`; or whisper.cpp's `transcription`), SubRip (.srt) and WebVTT (.vtt).

A subtitle file with a few broken cues is still useful: the cues that parse are kept, and
every line that does not is reported with its line number (`Narration.problems`). A file
with no usable cue at all is a MediaError, which skips the file (not the video)."""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rigtrain.data.container import MediaError, ffmpeg_says, open_container
from rigtrain.data.sound import video_start_s

# Whisper's JSON, SubRip, WebVTT; and Advanced SubStation (an Aegisub or fansub file),
# read by FFmpeg as a video's own ASS track is (data/subtitles.py)
NARRATION_SUFFIXES = (".json", ".srt", ".vtt", ".ass", ".ssa")


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Narration:
    segments: list[Segment]
    problems: list[str] = field(default_factory=list)  # "line 12: ..." for cues that were left out


def read_narration(path: Path) -> Narration:
    """Any supported sidecar, by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return Narration(read_whisper_json(path))
    if suffix in (".ass", ".ssa"):
        narration = read_subtitle_stream(Path(path))
        if narration is None:
            raise MediaError("holds no dialogue FFmpeg can read as text")
    else:
        narration = parse_subtitles(read_subtitle_text(Path(path)), webvtt=suffix == ".vtt")
    if is_flight_log(narration.segments):
        raise flight_log_error("beside each video")
    return narration


def flight_log_error(where: str) -> MediaError:
    return MediaError(
        f"a drone's flight log (DJI writes one {where}: GPS, ISO, shutter per frame), not narration; left out"
    )


# What a drone's subtitle track holds in every cue instead of speech: DJI's per-frame
# "FrameCnt: 1, DiffTime: 33ms ... [iso: 100] [latitude: ...]" (Mini, Air, Mavic 3) or the
# older "HOME(lon,lat) ... GPS(lon,lat,alt) BAROMETER:1.9 ISO:100" (Phantom, Mavic Pro).
FLIGHT_LOG = re.compile(r"FrameCnt|DiffTime|\[iso\s*:|\[latitude\s*:|\bGPS\s*\(|\bHOME\s*\(|BAROMETER", re.IGNORECASE)


def is_flight_log(segments: list[Segment]) -> bool:
    """Most cues (of the first 200) read as flight telemetry, not words."""
    sample = segments[:200]
    return bool(sample) and sum(bool(FLIGHT_LOG.search(s.text)) for s in sample) >= 0.8 * len(sample)


def read_subtitle_text(path: Path) -> str:
    """A subtitle file's text: UTF-8, with or without the BOM editors often write, or UTF-16
    when its BOM says so (Windows tools' "Unicode" SRT). Other encodings are not guessed: a
    Windows-1252 and a Windows-1251 file are the same bytes read differently."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        said = "UTF-16 text, as its byte-order mark says" if encoding == "utf-16" else "UTF-8 text"
        raise MediaError(f"not {said} ({err.reason} at byte {err.start}); save it as UTF-8") from None


def read_whisper_json(path: Path) -> list[Segment]:
    """Whisper's JSON (openai-whisper, faster-whisper, WhisperX: `segments` of {start, end,
    text} in seconds, or a bare list of them) or whisper.cpp's (`-oj`: `transcription` of
    {offsets: {from, to} in milliseconds, text})."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MediaError(f"not valid JSON: {err}") from None
    if isinstance(data, dict) and "segments" not in data and isinstance(data.get("transcription"), list):
        return _whisper_cpp_segments(data["transcription"])
    items = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise MediaError(
            "not narration: expected Whisper's segments (a list of {start, end, text}, or an object with "
            "'segments') or whisper.cpp's 'transcription'"
        )
    return _segments(
        items, "segment", "a numeric start and end", lambda item: (float(item["start"]), float(item["end"]))
    )


def _whisper_cpp_segments(items: list) -> list[Segment]:
    def times(item) -> tuple[float, float]:
        return float(item["offsets"]["from"]) / 1000, float(item["offsets"]["to"]) / 1000  # milliseconds

    return _segments(items, "transcription", "offsets {from, to}", times)


def _segments(items: list, kind: str, timed_by: str, times) -> list[Segment]:
    """Whisper's entries of either form -> segments; `times` reads an entry's (start, end)."""
    segments = []
    for i, item in enumerate(items):
        try:
            (start, end), text = times(item), str(item["text"])
        except (KeyError, TypeError, ValueError):
            raise MediaError(f"not narration: {kind} {i} lacks {timed_by} or a text") from None
        if end < start:
            raise MediaError(f"{kind} {i} ends ({end} s) before it starts ({start} s)")
        segments.append(Segment(start, end, text.strip()))
    return segments


# SRT writes "00:01:02,500", WebVTT "00:01:02.500" or "01:02.500" (hours optional).
_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{1,3})"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(?:\s+.*)?$")  # WebVTT may add cue settings
_TAG = re.compile(r"<[^>]*>")  # <i>, <b>, <c.colour>, <00:00:01.000> inline timestamps


def _seconds(h: str | None, m: str, s: str, frac: str) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(frac.ljust(3, "0")) / 1000


def _blocks(lines: list[str], webvtt: bool) -> list[list[tuple[int, str]]]:
    """The file's blocks as (line number, line) lists. SRT's end at a blank line. WebVTT's end
    at an empty line only, as its spec and the browsers read it: YouTube's captions put a line
    of one space inside a cue; and, also as the spec says, a line with '-->' after a cue's
    timing starts the next cue."""
    blocks: list[list[tuple[int, str]]] = []
    block: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if (line == "") if webvtt else (not line.strip()):
            if block:
                blocks.append(block)
            block = []
        elif webvtt and "-->" in line and any("-->" in earlier for _, earlier in block):
            blocks.append(block)
            block = [(number, line)]
        else:
            block.append((number, line))
    if block:
        blocks.append(block)
    return blocks


def _new_lines(words: list[str], before: list[str]) -> list[str]:
    """A cue's lines less those that repeat the end of the cue before: auto-generated
    captions (YouTube's) roll, each cue showing the last line again above the new one, and a
    10 ms cue repeating it alone; kept, every phrase would be narrated two or three times."""
    for k in range(min(len(words), len(before)), 0, -1):
        if words[:k] == before[-k:]:
            return words[k:]
    return words


def parse_subtitles(text: str, *, webvtt: bool) -> Narration:
    """SRT or WebVTT cues -> segments. In each block the timing line is found (a cue
    identifier may precede it) and the lines after it are the text. Blocks without a valid
    timing line are reported by line number and skipped."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    segments: list[Segment] = []
    problems: list[str] = []
    blocks = _blocks(lines, webvtt)
    if webvtt:
        if not blocks or not blocks[0][0][1].lstrip().startswith("WEBVTT"):
            raise MediaError("not WebVTT: the first line must be 'WEBVTT'")
        blocks = blocks[1:]
    shown: list[str] = []  # the lines of the cue before
    for block in blocks:
        first = block[0][1].strip()
        if webvtt and (first.startswith("NOTE") or first in ("STYLE", "REGION")):
            continue  # comments and style blocks carry no narration
        timing_at = next((k for k, (_, line) in enumerate(block[:2]) if "-->" in line), None)
        if timing_at is None:
            # The timing belongs on the cue's first line, or its second after an identifier.
            number, line = block[1] if len(block) > 1 and not _TIMING.match(block[0][1]) else block[0]
            problems.append(f"line {number}: expected 'start --> end', found {line.strip()!r}; cue left out")
            continue
        number, timing = block[timing_at]
        match = _TIMING.match(timing)
        if not match:
            problems.append(f"line {number}: cannot read the timing {timing.strip()!r}; cue left out")
            continue
        start, end = _seconds(*match.groups()[:4]), _seconds(*match.groups()[4:])
        if end < start:
            problems.append(f"line {number}: the cue ends before it starts; cue left out")
            continue
        words = [" ".join(_TAG.sub("", line).split()) for _, line in block[timing_at + 1 :]]
        words = [line for line in words if line]
        new = _new_lines(words, shown)
        shown = words or shown
        if new:
            segments.append(Segment(start, end, " ".join(new)))
    if not segments:
        detail = f" ({problems[0]})" if problems else ""
        raise MediaError(f"no readable cue{detail}")
    return Narration(segments, problems)


def runs_past_the_video(segments: list[Segment], video_s: float) -> str | None:
    """Why a narration file does not fit its video's length, or None. Speech that starts after the
    last frame is of another video, or of this one before it was cut: its text is not of
    these pictures (a clip has the words spoken while it shows). Whisper's last segment may
    end a little after the picture, so only a start past the end counts, with the same
    slack as a sound sidecar's length (sources.audio_mismatch). The narration is still used
    (its start may be right: a video cut short at its end); the note says what to check."""
    after = [s for s in segments if s.start > video_s + max(0.5, 0.05 * video_s)]
    if not after:
        return None
    return (
        f"runs to {max(s.end for s in segments):.1f} s but the video lasts {video_s:.1f} s "
        f"({len(after)} of {len(segments)} segments start after its end, and are left out): "
        "if it is another video's narration, rename or remove it"
    )


def clip_text(
    segments: list[Segment], start: float, end: float, max_bytes: int
) -> tuple[bytes, list[tuple[Segment, int, int]]]:
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


# Subtitle codecs that FFmpeg decodes to text; DVD and Blu-ray subtitles (dvd_subtitle,
# hdmv_pgs_subtitle) are pictures of text, with nothing to read.
TEXT_SUBTITLE_CODECS = ("subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text")
_ASS_OVERRIDE = re.compile(r"\{[^}]*\}")  # {\i1}, {\an8}, {\pos(10,20)}: styling, not words


def text_subtitle_stream(container):
    """The subtitle stream to read: the default one, else the first that is not "forced"
    (a forced track holds only the foreign-language lines), else the first; text only."""
    # a stream FFmpeg has no decoder for (a damaged one's codec id) has no codec context
    tracks = [s for s in container.streams.subtitles if getattr(s.codec_context, "name", None) in TEXT_SUBTITLE_CODECS]
    if not tracks:
        return None

    def flags(stream) -> tuple[bool, bool]:
        disposition = int(getattr(stream, "disposition", 0) or 0)
        return bool(disposition & 0x1), bool(disposition & 0x40)  # AV_DISPOSITION_DEFAULT, _FORCED

    return next(
        (s for s in tracks if flags(s) == (True, False)),
        next((s for s in tracks if not flags(s)[1]), tracks[0]),
    )


def _srt_time(seconds: float) -> str:
    ms = round(max(0.0, seconds) * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def read_subtitle_stream(path: Path) -> Narration | None:
    """A file's text subtitle stream as narration, read with PyAV: a video's own track, or
    an .ass/.ssa sidecar (FFmpeg reads it as a file of one stream). Times are from the first
    video frame (the clips' zero, as for the sound; 0 in a file without video); None when
    there is no text stream. MediaError when it cannot be read or no cue reads."""
    import av  # PyAV: only where a container is read

    with open_container(path) as container:
        track = text_subtitle_stream(container)
        if track is None:
            return None
        zero = video_start_s(container)
        cues = []
        try:
            for packet in container.demux(track):
                if packet.pts is None or not packet.size:
                    continue
                start = float(packet.pts * packet.time_base) - zero
                end = start + float((packet.duration or 0) * packet.time_base)
                for subtitle in packet.decode():
                    raw = getattr(subtitle, "dialogue", None) or getattr(subtitle, "text", b"") or b""
                    text = _ASS_OVERRIDE.sub("", raw.decode("utf-8", "replace")).replace("\\N", "\n").strip()
                    if text:
                        cues.append(f"{len(cues) + 1}\n{_srt_time(start)} --> {_srt_time(end)}\n{text}\n")
        except av.error.FFmpegError as err:
            raise MediaError(f"the subtitles cannot be read: {ffmpeg_says(err)}") from None
    if not cues:
        raise MediaError("the subtitles hold no text cue")
    return parse_subtitles("\n".join(cues), webvtt=False)
