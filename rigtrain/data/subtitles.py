"""A video's own subtitle track as its narration, where no sidecar gives one: yt-dlp's
`--embed-subs`, an MKV from a media library, a screen recording's captions, an MP4's
mov_text. The cues are read with PyAV and parsed by the sidecar's own SubRip parser, so
tags, rolling captions and cues that do not read are handled alike, and a drone's
telemetry track (DJI writes one into the MP4 as well) is left out as its sidecar is."""

from __future__ import annotations

import re
from pathlib import Path

from rigtrain.data.media import MediaError, open_container
from rigtrain.data.narration import Narration, flight_log_error, is_flight_log, parse_subtitles, read_narration
from rigtrain.data.sound import video_start_s
from rigtrain.data.sources import Source

# Subtitle codecs that FFmpeg decodes to text; DVD and Blu-ray subtitles (dvd_subtitle,
# hdmv_pgs_subtitle) are pictures of text, with nothing to read.
TEXT_SUBTITLE_CODECS = ("subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text")

# index.json's "narration" for a video narrated by its own subtitle track
CONTAINER = "container"

_ASS_OVERRIDE = re.compile(r"\{[^}]*\}")  # {\i1}, {\an8}, {\pos(10,20)}: styling, not words


def _text_track(container):
    """The subtitle stream to read: the default one, else the first that is not "forced"
    (a forced track holds only the foreign-language lines), else the first; text only."""
    tracks = [s for s in container.streams.subtitles if s.codec_context.name in TEXT_SUBTITLE_CODECS]
    if not tracks:
        return None

    def flags(stream) -> tuple[bool, bool]:
        disposition = int(getattr(stream, "disposition", 0) or 0)
        return bool(disposition & 0x1), bool(disposition & 0x40)  # AV_DISPOSITION_DEFAULT, _FORCED

    return next(
        (s for s in tracks if flags(s) == (True, False)),
        next((s for s in tracks if not flags(s)[1]), tracks[0]),
    )


def subtitle_track(path: Path) -> str | None:
    """The text subtitle track read_container_subtitles would read, as "srt, eng"; None
    when the video has none."""
    with open_container(path) as container:
        track = _text_track(container)
        if track is None:
            return None
        language = (track.metadata or {}).get("language") or getattr(track, "language", None)
        return track.codec_context.name + (f", {language}" if language and language != "und" else "")


def _srt_time(seconds: float) -> str:
    ms = round(max(0.0, seconds) * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def read_container_subtitles(path: Path) -> Narration | None:
    """The video's text subtitle track as narration, its times from the first video frame
    (the clips' zero, as for the sound); None when it has none. MediaError when the track
    cannot be read, has no cue that reads, or is a drone's telemetry."""
    import av  # PyAV: only where a container is read

    with open_container(path) as container:
        track = _text_track(container)
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
            raise MediaError(f"its subtitle track cannot be read: {getattr(err, 'strerror', None) or err}") from None
    if not cues:
        raise MediaError("its subtitle track holds no text cue")
    narration = parse_subtitles("\n".join(cues), webvtt=False)
    if is_flight_log(narration.segments):
        raise flight_log_error("into the video too")
    return narration


def narration_of(source: Source) -> tuple[Narration | None, str | None, list[tuple[str | None, str]]]:
    """The narration prepare takes for a video, and where from: the sidecar's name, else
    CONTAINER for the video's own text subtitle track, else None; and (file, why) for each
    of the two that did not read, file None for the track (a broken sidecar gives way to
    the track)."""
    failed: list[tuple[str | None, str]] = []
    if source.narration is not None:
        try:
            return read_narration(source.narration), source.named(source.narration), failed
        except MediaError as err:
            failed.append((source.named(source.narration), str(err)))
    try:
        narration = read_container_subtitles(source.video)
    except MediaError as err:
        failed.append((None, str(err)))
        return None, None, failed
    return narration, (CONTAINER if narration else None), failed
