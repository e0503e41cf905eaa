"""Decoding video: frames with OpenCV, a container's packets and last frames with PyAV. The
sound is in data/sound.py."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# MediaError and open_container live with the other PyAV readers; imported here as well,
# where most of the data package takes them from
from rigtrain.data.container import MediaError, field_order_of, kept_field, open_container
from rigtrain.data.timestamps import NeedEveryFrame, SeekedTooFar, frames_from_capture

# OpenCV's FFmpeg backend prints its own errors ("moov atom not found") to stderr; rigtrain
# reports every unreadable file itself, with its name, so FFmpeg is asked to stay quiet
# (AV_LOG_QUIET) unless the user chose a level.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

# .mts/.m2ts: camcorders (AVCHD); .ts: TV and screen recordings; .m4v, .3gp: Apple and
# phones; .mpg/.mpeg: MPEG program streams (DVD rips, digitised tapes, older camcorders).
VIDEO_SUFFIXES = (
    ".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".3gp", ".ts", ".mts", ".m2ts", ".flv", ".wmv", ".mpg", ".mpeg",
)  # fmt: skip
# Sidecar sound: what libsndfile reads (a recorder's WAV or BWF, FLAC, Ogg Vorbis or Opus,
# MP3, a Mac's AIFF), and AAC (a phone's voice memo .m4a, a recorder's .aac), which FFmpeg
# decodes (data/sound.py).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aif", ".aiff", ".m4a", ".aac")


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int
    width: int
    height: int
    # a pixel's width over its height (the stream's sample aspect ratio): 32/27 on a
    # widescreen DVD or DV tape stored at 720x480, 4/3 on HDV stored at 1440x1080
    pixel_aspect: float = 1.0
    # an interlaced video's field that is kept, as its rows (0: the even rows, the top
    # field; 1: the odd rows); None for progressive video (kept_field)
    field: int | None = None


def open_video(path: Path):
    """An open cv2.VideoCapture and its VideoInfo; MediaError when it is no readable video."""
    import cv2  # OpenCV: only where frames are decoded or written

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise MediaError(_why_not_a_video(path))
    info = VideoInfo(
        fps=float(cap.get(cv2.CAP_PROP_FPS) or 0.0),
        frames=int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
        width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        pixel_aspect=_pixel_aspect(
            cap.get(cv2.CAP_PROP_SAR_NUM), cap.get(cv2.CAP_PROP_SAR_DEN), cap.get(cv2.CAP_PROP_ORIENTATION_META)
        ),
        # a camcorder's 90-degree display rotation never comes with interlacing: its fields
        # would be columns after OpenCV turns the picture upright
        field=None if round(cap.get(cv2.CAP_PROP_ORIENTATION_META)) % 180 == 90 else kept_field(field_order_of(path)),
    )
    if info.fps <= 0 or info.width <= 0 or info.height <= 0:
        cap.release()
        raise MediaError("has no readable video stream (fps or frame size missing)")
    return cap, info


def _pixel_aspect(num: float, den: float, rotation: float = 0) -> float:
    """The sample aspect ratio as one number; 1 (square pixels) when the stream leaves it
    unset (0:1) or gives one no camera writes. OpenCV turns a picture stored with a display
    rotation of 90 or 270 degrees upright, and its pixels' shape turns with it."""
    if not (num > 0 and den > 0 and 0.25 <= num / den <= 4):
        return 1.0
    return den / num if round(rotation) % 180 == 90 else num / den


def _why_not_a_video(path: Path) -> str:
    """Why OpenCV could not open `path`, as far as FFmpeg (through PyAV) can tell."""
    if path.stat().st_size == 0:
        return "cannot be opened as a video: the file is empty"
    try:
        with open_container(path) as container:
            if not container.streams.video:
                return "has no video stream (sound only?)"
    except MediaError as err:
        return f"cannot be opened as a video, corrupt or not a video ({err})"
    return "cannot be opened as a video (an unsupported codec, or corrupt)"


def fit_frame(frame: np.ndarray, height: int, width: int, mode: str = "crop", pixel_aspect: float = 1.0) -> np.ndarray:
    """Resize to (height, width) keeping the aspect ratio the video is shown at (its stored
    size with pixels `pixel_aspect` times as wide as high): "crop" cuts the centre to the
    target aspect first; "pad" letterboxes the whole frame in black. INTER_AREA is the
    right filter for shrinking. Nothing is ever stretched."""
    import cv2  # OpenCV: only where frames are decoded or written

    h, w = frame.shape[:2]
    shown_w = w * pixel_aspect  # the width the picture is shown at, in units of its rows
    target = width / height
    if mode == "pad":
        scale = min(width / shown_w, height / h)
        new_w, new_h = max(1, round(shown_w * scale)), max(1, round(h * scale))
        out = np.zeros((height, width, *frame.shape[2:]), frame.dtype)
        y0, x0 = (height - new_h) // 2, (width - new_w) // 2
        out[y0 : y0 + new_h, x0 : x0 + new_w] = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA)
        return out
    if shown_w / h > target:  # too wide: crop the sides
        new_w = max(1, round(h * target / pixel_aspect))
        x0 = (w - new_w) // 2
        frame = frame[:, x0 : x0 + new_w]
    elif shown_w / h < target:  # too tall: crop top and bottom
        new_h = max(1, round(shown_w / target))
        y0 = (h - new_h) // 2
        frame = frame[y0 : y0 + new_h]
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


# How far before a clip an on-demand read seeks, in periods of the average frame rate: the
# frame showing at the clip's first instant must be decoded too, and OpenCV lands within
# half a period of where it is asked. Where the rate is locally lower than the average (a
# variable frame rate), that can be too little, and the read seeks SEEK_BACK_FAR_S instead,
# then from the start.
SEEK_BACK_PERIODS = 2.0
SEEK_BACK_FAR_S = 2.0

# A clip read on demand seeks a capture this thread already holds open for the video: a new
# one pays for its first picture again, and for HDR video that is FFmpeg setting up its tone
# mapping, 1.1 s (against 1 ms for the next picture) for a 320x240 clip. Per thread, since a
# capture is not safe to share; a read from the very start opens a fresh one, as before.
OPEN_CAPTURES_PER_THREAD = 4
_this_thread = threading.local()


def _capture_to_seek(path: Path):
    """An open capture of `path` and its info, kept for the next clip of it (most recently
    used first out of OPEN_CAPTURES_PER_THREAD)."""
    held = getattr(_this_thread, "captures", None)
    if held is None:
        held = _this_thread.captures = OrderedDict()
    key = str(path)
    if key in held:
        held.move_to_end(key)
        return held[key]
    held[key] = open_video(path)
    while len(held) > OPEN_CAPTURES_PER_THREAD:
        held.popitem(last=False)[1][0].release()
    return held[key]


def frame_fitter(size: tuple[int, int], mode: str, info: VideoInfo):
    """The function that turns one decoded picture (OpenCV's BGR) into an output frame: RGB,
    fitted to size=(H, W). Of an interlaced picture (two fields woven, 1/50 or 1/60 s apart)
    only info.field's rows are kept, their pixels twice as high: shrunk whole, the woven
    picture would show everything that moves twice, one copy on every other row."""
    import cv2  # OpenCV: only where frames are decoded or written

    if info.field is None:
        return lambda frame: fit_frame(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), *size, mode, info.pixel_aspect)
    rows, aspect = slice(info.field, None, 2), info.pixel_aspect / 2
    return lambda frame: fit_frame(cv2.cvtColor(frame[rows], cv2.COLOR_BGR2RGB), *size, mode, aspect)


def output_frames_of(path: Path, fps: float, size: tuple[int, int], mode: str = "crop"):
    """The video's info, and its frames resampled in time to `fps` and fitted to size, one
    at a time (read_video's frames, without holding them all). Only the pictures that show
    are converted (timestamps.LOOK_AHEAD_GAPS); where that guess was wrong the video is
    read again with every picture, from the first output frame not yet given."""
    cap, info = open_video(path)
    fit = frame_fitter(size, mode, info)

    def frames():
        nonlocal cap
        made, must = 0, []
        while True:
            try:
                for frame in frames_from_capture(cap, info.fps, fps, made, None, fit, False, must):
                    made += 1
                    yield frame
                return
            except NeedEveryFrame as passed_over:
                must.append(passed_over.at_s)
            finally:
                cap.release()
            cap, _ = open_video(path)

    return info, frames()


def read_video(path: Path, fps: float, size: tuple[int, int], mode: str = "crop") -> tuple[np.ndarray, VideoInfo]:
    """All frames resampled in time to `fps` (the source frame showing at each output time,
    by the frames' own timestamps) and fitted to size=(H, W): uint8 RGB (T, H, W, 3)."""
    info, output = output_frames_of(path, fps, size, mode)
    frames = list(output)
    if not frames:
        raise MediaError("no frame could be decoded (truncated or corrupt)")
    return np.stack(frames), info


def read_video_clip(
    path: Path, start_frame: int, count: int, fps: float, size: tuple[int, int], mode: str = "crop"
) -> np.ndarray:
    """Output frames start_frame .. start_frame+count-1 of read_video(path, fps, size),
    decoded on demand: seek a little before the clip's first instant and decode only as
    far as the clip goes (further back, then from the start, when the seek lands past it).
    This is what a loader without shards has to do for every clip."""
    import cv2  # OpenCV: only where frames are decoded or written

    backs, must = [None, SEEK_BACK_FAR_S, float("inf")], []
    while backs:
        cap, info = _capture_to_seek(path)
        fit = frame_fitter(size, mode, info)
        seek_s = start_frame / fps - (SEEK_BACK_PERIODS / info.fps if backs[0] is None else backs[0])
        from_start = seek_s <= 0
        if from_start:
            cap, info = open_video(path)
        try:
            if not from_start:
                cap.set(cv2.CAP_PROP_POS_MSEC, seek_s * 1000.0)
            try:
                frames = list(frames_from_capture(cap, info.fps, fps, start_frame, count, fit, seek_s > 0, must))
            except NeedEveryFrame as passed_over:  # it showed after all: this read again, converting it
                must.append(passed_over.at_s)
                continue
            except SeekedTooFar:
                backs.pop(0)
                continue
            if len(frames) == count or seek_s <= 0:
                break
            # short after a seek: OpenCV's seek trusts the header's frame count, which a
            # .webm lacks or estimates, and can land at the end or nowhere; read from further back
            backs.pop(0)
        finally:
            if from_start:
                cap.release()
    if len(frames) < count:
        raise MediaError(f"only {len(frames)} of {count} frames from frame {start_frame} could be decoded")
    return np.stack(frames)


def clip_starts(frames: int, clip_frames: int, stride_frames: float) -> list[int]:
    """First frame of every clip of a video with `frames` frames: one every stride_frames,
    plus, when at least half a clip is left over at the end, one clip aligned to the last
    frame (it overlaps the clip before it), so the end of a video is used, not dropped.
    A shorter tail would mostly repeat the clip before; prepare reports it as unused."""
    if frames < clip_frames:
        return []
    starts, k = [], 0
    while (start := round(k * stride_frames)) + clip_frames <= frames:
        starts.append(start)
        k += 1
    if frames - (starts[-1] + clip_frames) >= clip_frames / 2:
        starts.append(frames - clip_frames)
    return starts
