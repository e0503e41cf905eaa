"""`rigtrain data check`: what `data prepare` would make of a folder, without decoding
everything and without writing anything.

Each video is opened with the same decoders prepare uses (OpenCV for frames, PyAV for the
container's audio, soundfile for sidecars), its first and last frames are decoded, and the
sidecars are parsed, so the reasons given here are the reasons prepare would give."""

from __future__ import annotations

import math
from pathlib import Path

from rigtrain.config import DataConfig
from rigtrain.data import media, sound
from rigtrain.data.container import (
    field_order_of,
    frame_times,
    hdr_transfer,
    kept_field,
    last_decodable_s,
    open_container,
    tag,
)
from rigtrain.data.shards import clip_bytes
from rigtrain.data.sources import Source, audio_mismatch, sources_in
from rigtrain.data.subtitles import CONTAINER, narration_of, subtitle_track
from rigtrain.data.timestamps import SAME_INSTANT_S, shown_until

# A header's frame count past this (46 hours at 60 fps) is garbage, not a video (a streamed
# .webm's reads as 2.8e17): never build a list that long from it.
MOST_FRAMES_A_HEADER_IS_BELIEVED = 10**7


def _probe_video(path: Path) -> dict:
    """The video's frames and how long it shows, from its packets' timestamps (the header's
    frame count can be missing, an estimate, or nonsense); its first frame and the frames
    at its end decoded, as prepare will decode them."""
    cap, info = media.open_video(path)
    try:
        ok, _ = cap.read()
        if not ok:
            raise media.MediaError("no frame could be decoded (truncated or corrupt)")
        times = frame_times(path)
        if len(times) < 2:  # no timestamps in the packets: the header's word for it, if sane
            header_frames = info.frames if 0 < info.frames <= MOST_FRAMES_A_HEADER_IS_BELIEVED else 1
            times = [i / info.fps for i in range(header_frames)]
        end_decodes = True
        if len(times) > 1:
            last_ok = last_decodable_s(path, times[-1])
            end_decodes = last_ok is not None and last_ok >= times[-1] - SAME_INSTANT_S
            if last_ok is not None and not end_decodes:  # truncated: prepare gets what decodes
                times = [t for t in times if t <= last_ok + SAME_INSTANT_S]
    finally:
        cap.release()
    duration = shown_until(times, info.fps)
    return {
        "fps": round(len(times) / duration, 3),
        "fps_range": _fps_range(times),
        "frames": len(times),
        "width": info.width,
        "height": info.height,
        "pixel_aspect": round(info.pixel_aspect, 4),
        "duration_s": round(duration, 6),  # to the microsecond: the clip count depends on it
        "end_decodes": end_decodes,
        "hdr": hdr_transfer(path),
        "interlaced": field_order_of(path),
    }


def _shown_size(video: dict) -> str:
    """The stored size, and the size it is shown at when its pixels are not square (a DVD's
    720x480 is shown 853x480): prepare fits the picture as it is shown."""
    stored = f"{video['width']}x{video['height']}"
    aspect = video.get("pixel_aspect", 1.0)
    return stored if abs(aspect - 1) < 0.01 else f"{stored} shown {round(video['width'] * aspect)}x{video['height']}"


def _fps_range(times: list[float]) -> list[float] | None:
    """The frame rate's 5th and 95th percentiles: a phone's variable rate shows here, a
    single dropped frame does not."""
    intervals = sorted(b - a for a, b in zip(times, times[1:]))
    if not intervals:
        return None
    return [
        round(1 / intervals[int(0.95 * (len(intervals) - 1))], 2),
        round(1 / intervals[int(0.05 * (len(intervals) - 1))], 2),
    ]


def _probe_container_audio(path: Path) -> dict | None:
    with open_container(path) as container:
        stream = sound.sound_track(container)
        if stream is None:
            return None
        seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
        starts_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        return {
            "from": "container",
            "codec": stream.codec_context.name,
            "rate": stream.rate,
            "channels": stream.channels,
            "duration_s": round(seconds, 3),
            # when the track starts, from the first video frame: prepare keeps them in sync
            "offset_s": round(starts_s - sound.video_start_s(container), 3),
            "tracks": len(container.streams.audio),
            "track": _track_name(container, stream),
        }


def _track_name(container, stream) -> str:
    """'track 2 (eng, "Main", default)': which of a container's sound tracks it is, in the
    words a player's menu uses."""
    number = [s.index for s in container.streams.audio].index(stream.index) + 1
    language, title = tag(stream, "language"), tag(stream, "title")
    words = [language] if language and language != "und" else []
    words += [f'"{title}"'] if title else []
    words += ["default"] if stream.disposition & type(stream.disposition).default else []
    return f"{number} ({', '.join(words)})" if words else str(number)


def _offset_note(offset_s: float) -> str | None:
    """A track more than a frame or two out of step with the picture is worth a line: the
    user may not know their muxer delayed it, and prepare's silence or cut is deliberate."""
    if abs(offset_s) < 0.05:
        return None
    if offset_s > 0:
        return (
            f"the sound starts {offset_s:.2f} s after the first frame; prepare puts silence before it to stay in sync"
        )
    return f"the sound starts {-offset_s:.2f} s before the first frame; prepare cuts that part to stay in sync"


def _probe_sidecar_audio(path: Path) -> dict:
    if sound.read_by_ffmpeg(path):
        track = _probe_container_audio(path)
        if track is None:
            raise media.MediaError("holds no sound track")
        if path.suffix.lower() == ".aac":
            # from its packets: a raw .aac has no header, and FFmpeg's guess from the first
            # packets' bit rate was 14 s for a 3 s file that starts quiet (an .m4a's header
            # is exact, where its packets count the encoder's priming too)
            track["duration_s"] = round(sound.packets_seconds(path), 3)
        return {"from": path.name, **{key: track[key] for key in ("codec", "rate", "channels", "duration_s")}}
    import soundfile as sf  # only where audio files are read or written

    try:
        info = sf.info(str(path))
    except Exception as err:  # soundfile raises its own LibsndfileError and RuntimeError
        raise sound.unreadable_audio(err) from None
    return {
        "from": path.name,
        "codec": info.subtype,
        "rate": info.samplerate,
        "channels": info.channels,
        "duration_s": round(info.duration, 3),
    }


MOST_NOTES_PRINTED = 40


def _probe_narration(source: Source, video_s: float, notes: list[str], skipped: list[str]) -> dict | None:
    """The narration prepare will take (subtitles.narration_of), read whole as prepare reads
    it, with "from": "container" for the video's own subtitle track, and the problems
    prepare will report; a note for each that will be skipped."""
    narration, narration_from, failed = narration_of(source, video_s)
    left_out = [f"{file or 'its subtitle track'} will be skipped: {why}" for file, why in failed]
    skipped += left_out
    notes += left_out
    if narration is None:
        return None
    entry = {"file": narration_from, "segments": len(narration.segments), "problems": narration.problems}
    if narration_from == CONTAINER:
        entry["file"], entry["from"] = f"subtitle track ({subtitle_track(source.video)})", CONTAINER
    return entry


def frames_after_resampling(duration_s: float, fps: float) -> int:
    """How many frames read_video gives for a video that shows for duration_s: one every
    1/fps seconds while a source frame shows."""
    return max(0, math.ceil((duration_s - SAME_INSTANT_S) * fps))


def check_source(source: Source, data: DataConfig) -> dict:
    entry: dict = {"file": source.name, "ok": False}
    try:
        video = _probe_video(source.video)
    except media.MediaError as err:
        return {**entry, "reason": str(err)}
    entry.update(ok=True, **video, notes=[], skipped=[])  # skipped: the sidecars left out, also in notes
    if video["hdr"]:
        entry["notes"].append(
            f"HDR ({video['hdr']}): read as a screen without HDR shows it; highlights above reference white clip"
        )
    if video["interlaced"]:
        kept = "top" if kept_field(video["interlaced"]) == 0 else "bottom"
        entry["notes"].append(
            f"interlaced ({video['interlaced']}): prepare keeps the {kept} field of each frame, half its rows, "
            "so what moves is not shown twice"
        )
    if not video["end_decodes"]:
        entry["notes"].append("the last frames do not decode (truncated?); prepare keeps the frames that do")
    entry["audio"] = None
    if source.audio is not None:
        try:
            audio = {**_probe_sidecar_audio(source.audio), "from": source.named(source.audio)}
            mismatch = audio_mismatch(audio["duration_s"], video["duration_s"])
            if mismatch:
                raise media.MediaError(mismatch)
            entry["audio"] = audio
        except media.MediaError as err:
            entry["skipped"].append(f"{source.named(source.audio)} will be skipped: {err}")
            entry["notes"].append(entry["skipped"][-1])
    if entry["audio"] is None:
        try:
            entry["audio"] = _probe_container_audio(source.video)
            note = _offset_note(entry["audio"]["offset_s"]) if entry["audio"] else None
            entry["notes"] += [note] if note else []
            if entry["audio"] and entry["audio"]["tracks"] > 1:
                entry["notes"].append(
                    f"{entry['audio']['tracks']} sound tracks: prepare takes track {entry['audio']['track']}, "
                    "the one a player plays; the others are left out"
                )
        except media.MediaError as err:
            entry["notes"].append(f"audio track left out: {err}")
    entry["narration"] = _probe_narration(source, video["duration_s"], entry["notes"], entry["skipped"])
    low, high = video["fps_range"] or (0, 0)
    if low and high > 1.1 * low:
        entry["notes"].append(f"variable frame rate ({low:g}-{high:g} fps): frames are placed by their timestamps")
    frames_out = frames_after_resampling(video["duration_s"], data.fps)
    entry["clips"] = len(media.clip_starts(frames_out, data.clip_frames, data.stride_frames))
    if entry["clips"] == 0:
        entry["notes"].append(f"shorter than one clip ({data.clip_seconds} s): prepare will skip it")
    return entry


def check_folder(src_dir: str | Path, data: DataConfig, progress=None) -> dict:
    src = Path(src_dir)
    sources, unused = sources_in(src, "data check")
    videos = []
    for done, source in enumerate(sources, 1):
        videos.append(check_source(source, data))
        if progress:
            progress(done, len(sources), source.name)
    usable = [v for v in videos if v["ok"] and v["clips"] > 0]
    return {
        "source_dir": str(src.resolve()),
        "clip": {
            "fps": data.fps,
            "frame_size": list(data.frame_size),
            "seconds": data.clip_seconds,
            "stride_s": data.stride_seconds,
            "sample_rate": data.sample_rate,
            "resize": data.resize,
        },
        "videos": videos,
        "unused": unused,
        "summary": {
            "videos": len(videos),
            "usable": len(usable),
            "unreadable": sum(not v["ok"] for v in videos),
            "clips": sum(v["clips"] for v in usable),
            "hours": round(sum(v["duration_s"] for v in usable) / 3600, 3),
            "with_audio": sum(v["audio"] is not None for v in usable),
            "with_narration": sum(v["narration"] is not None for v in usable),
            "shard_bytes": sum(v["clips"] for v in usable) * clip_bytes(data),
        },
    }


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def format_report(report: dict) -> str:
    rows = [("file", "duration", "fps", "size", "audio", "narration", "clips")]
    notes = []
    for v in report["videos"]:
        if not v["ok"]:
            rows.append((v["file"], "-", "-", "-", "-", "-", "skip"))
            notes.append(f"{v['file']}: cannot be used: {v['reason']}")
            continue
        audio = v["audio"]
        narration = v["narration"]
        rows.append(
            (
                v["file"],
                f"{v['duration_s']:.1f} s",
                f"{v['fps']:g}",
                _shown_size(v),
                f"{audio['from']} ({audio['codec']}, {audio['rate']} Hz)" if audio else "none",
                f"{narration['file']} ({narration['segments']} segments)" if narration else "none",
                str(v["clips"]),
            )
        )
        notes += [f"{v['file']}: {n}" for n in v["notes"]]
        notes += [f"{v['file']}: {narration['file']} {p}" for p in (narration or {}).get("problems", [])]
    notes += [f"{u['file']}: not used: {u['reason']}" for u in report["unused"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    s, c = report["summary"], report["clip"]
    length = f"{s['hours']:.1f} h" if s["hours"] >= 1 else f"{s['hours'] * 60:.1f} min"
    lines.append(
        f"\n{s['usable']} of {s['videos']} video(s) usable ({length}): {s['clips']} clips of "
        f"{c['seconds']:g} s at {c['fps']:g} fps, {c['frame_size'][0]}x{c['frame_size'][1]} ({c['resize']}); "
        f"{s['with_audio']} with sound, {s['with_narration']} with narration; "
        f"about {_size(s['shard_bytes'])} of shards once prepared"
    )
    if notes:
        lines.append(f"{len(notes)} note(s):")
        lines += [f"  {n}" for n in notes[:MOST_NOTES_PRINTED]]
        if len(notes) > MOST_NOTES_PRINTED:  # a folder tree with thousands of other files
            lines.append(f"  ... and {len(notes) - MOST_NOTES_PRINTED} more: every one is in `data check --json`")
    return "\n".join(lines)
