"""A video's own subtitle track as its narration, where no sidecar gives one: yt-dlp's
`--embed-subs`, an MKV from a media library, a screen recording's captions, an MP4's
mov_text. The cues are read with PyAV (narration.read_subtitle_stream, which also reads
an .ass sidecar) and parsed by the sidecar's own SubRip parser, so
tags, rolling captions and cues that do not read are handled alike, and a drone's
telemetry track (DJI writes one into the MP4 as well) is left out as its sidecar is."""

from __future__ import annotations

from pathlib import Path

from rigtrain.data.container import MediaError, open_container, tag
from rigtrain.data.narration import (
    Narration,
    flight_log_error,
    is_flight_log,
    read_narration,
    read_subtitle_stream,
    runs_past_the_video,
    text_subtitle_stream,
)
from rigtrain.data.sources import Source

# index.json's "narration" for a video narrated by its own subtitle track
CONTAINER = "container"


def subtitle_track(path: Path) -> str | None:
    """The text subtitle track read_container_subtitles would read, as "srt, eng"; None
    when the video has none."""
    with open_container(path) as container:
        track = text_subtitle_stream(container)
        if track is None:
            return None
        language = tag(track, "language") or getattr(track, "language", None)
        return track.codec_context.name + (f", {language}" if language and language != "und" else "")


def read_container_subtitles(path: Path) -> Narration | None:
    """The video's text subtitle track as narration (narration.read_subtitle_stream); None
    when it has none. MediaError when the track cannot be read, has no cue that reads, or
    is a drone's telemetry."""
    narration = read_subtitle_stream(path)
    if narration is not None and is_flight_log(narration.segments):
        raise flight_log_error("into the video too")
    return narration


def narration_of(source: Source, video_s: float) -> tuple[Narration | None, str | None, list[tuple[str | None, str]]]:
    """The narration prepare takes for a video that shows for video_s, and where from: the
    sidecar's name, else CONTAINER for the video's own text subtitle track, else None; and
    (file, why) for each of the two that did not read, file None for the track (a broken
    sidecar gives way to the track). A sidecar that runs past the video has that among its
    problems (narration.runs_past_the_video; a track was cut with its video)."""
    failed: list[tuple[str | None, str]] = []
    if source.narration is not None:
        try:
            narration = read_narration(source.narration)
            if past_the_end := runs_past_the_video(narration.segments, video_s):
                narration.problems.append(past_the_end)
            return narration, source.named(source.narration), failed
        except MediaError as err:
            failed.append((source.named(source.narration), str(err)))
    try:
        narration = read_container_subtitles(source.video)
    except MediaError as err:
        failed.append((None, str(err)))
        return None, None, failed
    return narration, (CONTAINER if narration else None), failed
