"""What FFmpeg reads from a container through PyAV, beside OpenCV's frames (data/media.py):
the video packets' times, the last frame that decodes, HDR and field order, and tags; and
the one way every reader opens a container."""

from __future__ import annotations

import functools
from pathlib import Path

from rigtrain.data.timestamps import SAME_INSTANT_S


class MediaError(Exception):
    """A file that cannot be used; the message says why. Prepare skips it and counts it."""


def frame_times(path: Path) -> list[float]:
    """Every video frame's presentation time in seconds from the first frame, read from the
    container's packets without decoding them: the truth where the header has no frame
    count (a browser's or a recorder's .webm) or an estimate of it (Matroska), and where the
    rate varies. A damaged file gives the packets before the damage. Empty when the
    packets carry no timestamps."""
    import av  # PyAV: only where a container is read

    with open_container(path) as container:
        if not container.streams.video:
            return []
        stream = container.streams.video[0]
        stamps = set()
        try:
            for packet in container.demux(stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is not None and packet.size and not packet.is_discard:
                    stamps.add(stamp)
        except av.error.FFmpegError:
            pass  # truncated or damaged: what came before is what a decoder gets too
        origin = stream.start_time if stream.start_time is not None else min(stamps, default=0)
        base = stream.time_base
    return sorted(t for t in (float((s - origin) * base) for s in stamps) if t >= -SAME_INSTANT_S)


# FFmpeg's transfer characteristics that mean high dynamic range (AVCOL_TRC_*): a phone's
# HDR video is HLG (an iPhone's Dolby Vision 8.4 carries an HLG base layer), a grading or a
# streaming export PQ.
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}


def hdr_transfer(path: Path) -> str | None:
    """ "HLG" or "PQ" for a video recorded in high dynamic range, None for SDR. OpenCV's
    FFmpeg converts such frames to SDR as a screen without HDR shows them, reference white
    (203 cd/m2) at full scale (checked from opencv-python-headless 4.14 on; docs/data.md)."""
    with open_container(path) as container:
        if not container.streams.video:
            return None
        codec = container.streams.video[0].codec_context  # None where FFmpeg has no decoder for it
        return HDR_TRANSFERS.get(int(getattr(codec, "color_trc", 0) or 0))


# FFmpeg's field orders (AVFieldOrder, in the stream's codec parameters) by the field shown
# first: TB is coded top first and shown bottom first, BT the other way round. 0 is unset,
# 1 progressive.
FIELD_ORDERS = {2: "top field first", 3: "bottom field first", 4: "bottom field first", 5: "top field first"}
ORDER_UNSET = "field order unset"


def field_order(path: Path) -> str | None:
    """How an interlaced video's fields are shown (FIELD_ORDERS, or ORDER_UNSET where the
    stream does not say but its first picture is flagged interlaced, as a DV tape's .avi
    does), None for progressive video. Interlaced: a camcorder's 1080i AVCHD or HDV, a DVD,
    a digitised tape."""
    import av  # PyAV: only where a container is read

    try:
        with open_container(path) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            order = int(getattr(stream.codec_context, "field_order", 0) or 0)  # no context: no decoder
            if order != 0:
                return FIELD_ORDERS.get(order)
            for frame in container.decode(stream):
                return ORDER_UNSET if frame.interlaced_frame else None
    except (MediaError, av.error.FFmpegError):
        return None  # OpenCV may still read it; progressive is what it would show
    return None


def kept_field(order: str | None) -> int | None:
    """The rows (0 even, 1 odd) of the field rigtrain keeps: the one shown first, the top
    where the order is unset (the choice moves the picture by half a frame in time, and
    changes nothing else)."""
    return None if order is None else 1 if order == "bottom field first" else 0


@functools.lru_cache(maxsize=1024)
def _field_order_cached(path: str, size: int, mtime_ns: int) -> str | None:
    return field_order(Path(path))


def field_order_of(path: Path) -> str | None:
    """field_order, asked once per file (an on-demand loader opens the same video for every
    clip); a file replaced in place is asked again."""
    stat = Path(path).stat()
    return _field_order_cached(str(path), stat.st_size, stat.st_mtime_ns)


def last_decodable_s(path: Path, last_s: float) -> float | None:
    """The time of the last frame that decodes, from the keyframe before last_s - 0.5 s
    (last_s: frame_times' last) to the end or the first error: a truncated file's index can
    promise frames its data no longer holds, and a cut packet is counted but not decoded.
    None when no frame decodes from there. PyAV, not OpenCV: OpenCV's seek relies on the
    header's frame count, which a .webm lacks or estimates; both decode with FFmpeg and
    stop at the same frame."""
    import av  # PyAV: only where a container is read

    last = None
    for seek in (True, False):  # from the start where a seek lands nowhere (MPEG-TS, one keyframe)
        with open_container(path) as container:
            stream = container.streams.video[0]
            origin = stream.start_time or 0
            try:
                if seek:
                    at = origin + int(max(0.0, last_s - 0.5) / stream.time_base)
                    container.seek(at, stream=stream, backward=True)
                for frame in container.decode(stream):
                    if frame.pts is not None:
                        last = max(last or 0.0, float((frame.pts - origin) * stream.time_base))
            except av.error.FFmpegError:
                pass  # the damage: what decoded before it is what prepare gets
        if last is not None:
            return last
    return None


def open_container(path: Path):
    """A PyAV container (use it as a context manager); MediaError when FFmpeg cannot open it."""
    import av  # PyAV: only where a container's audio is read

    try:
        try:
            # PyAV up to 18 decodes tags as strict UTF-8 and refuses a file whose title is
            # Latin-1 (an old camcorder's, a Windows tool's); 19 has no such option and keeps
            # the bytes as surrogates (tag() makes them printable)
            return av.open(str(path), metadata_errors="replace")
        except TypeError:
            return av.open(str(path))
    except av.error.FFmpegError as err:
        raise MediaError(f"cannot be opened by FFmpeg: {ffmpeg_says(err)}") from None


def ffmpeg_says(err: Exception) -> str:
    """FFmpeg's own words for an error (its strerror), without the errno, the function and
    the path that PyAV adds: "Invalid data found when processing input"."""
    return getattr(err, "strerror", None) or str(err)


def tag(stream, key: str) -> str | None:
    """A stream's tag ("language", "title") as text any file or terminal takes: bytes that
    are not UTF-8 become U+FFFD."""
    value = (stream.metadata or {}).get(key)
    return None if value is None else value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
