"""Decoding: video frames with OpenCV, audio with soundfile (sidecar files) or PyAV (the
container's own track), resampled with libswresample through PyAV."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# OpenCV's FFmpeg backend prints its own errors ("moov atom not found") to stderr; rigtrain
# reports every unreadable file itself, with its name, so FFmpeg is asked to stay quiet
# (AV_LOG_QUIET) unless the user chose a level.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class MediaError(Exception):
    """A file that cannot be used; the message says why. Prepare skips it and counts it."""


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int
    width: int
    height: int


def _open(path: Path):
    """An open cv2.VideoCapture and its VideoInfo; MediaError when it is no readable video."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise MediaError("cannot be opened as a video (corrupt or unsupported codec)")
    info = VideoInfo(fps=float(cap.get(cv2.CAP_PROP_FPS) or 0.0), frames=int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
                     width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    if info.fps <= 0 or info.width <= 0 or info.height <= 0:
        cap.release()
        raise MediaError("has no readable video stream (fps or frame size missing)")
    return cap, info


def center_crop_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop the centre to the target aspect ratio, then resize (INTER_AREA: the right
    filter for shrinking). Aspect is kept; nothing is stretched."""
    import cv2

    h, w = frame.shape[:2]
    target = width / height
    if w / h > target:  # too wide: crop the sides
        new_w = max(1, round(h * target))
        x0 = (w - new_w) // 2
        frame = frame[:, x0 : x0 + new_w]
    elif w / h < target:  # too tall: crop top and bottom
        new_h = max(1, round(w / target))
        y0 = (h - new_h) // 2
        frame = frame[y0 : y0 + new_h]
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


def read_video(path: Path, fps: float, size: tuple[int, int]) -> tuple[np.ndarray, VideoInfo]:
    """All frames resampled in time to `fps` (the source frame showing at each output time)
    and resized to size=(H, W): uint8 RGB (T, H, W, 3)."""
    import cv2

    cap, info = _open(path)
    frames: list[np.ndarray] = []
    src_index = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            # Output frame k shows time k/fps: it is source frame floor(k * src_fps / fps),
            # so frames are skipped when lowering fps and repeated when raising it.
            while math.floor(len(frames) * info.fps / fps + 1e-6) == src_index:
                frames.append(center_crop_resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), *size))
            src_index += 1
    finally:
        cap.release()
    if not frames:
        raise MediaError("no frame could be decoded (truncated or corrupt)")
    return np.stack(frames), info


def resample_audio(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """(S,) or (S, channels) float -> mono float32 at target_rate, via libswresample."""
    import av

    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]
    layout = {1: "mono", 2: "stereo"}.get(samples.shape[1])
    if layout is None:  # more channels than the named layouts: average them ourselves
        samples, layout = samples.mean(axis=1, keepdims=True), "mono"
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    out = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in out]) if out else np.zeros(0, np.float32)


def read_audio_file(path: Path, target_rate: int) -> np.ndarray:
    """A sidecar .wav/.flac/.ogg -> mono float32 at target_rate."""
    import soundfile as sf

    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises its own LibsndfileError and RuntimeError
        raise MediaError(f"unreadable audio: {err}") from None
    return resample_audio(samples, rate, target_rate)


def read_container_audio(path: Path, target_rate: int) -> np.ndarray | None:
    """The video container's own audio track -> mono float32 at target_rate, or None when
    the container has no audio track."""
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise MediaError(f"cannot be opened by FFmpeg: {err}") from None
    with container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
        chunks = []
        try:
            for frame in container.decode(audio=0):
                frame.pts = None  # resample by sample count: timestamps of damaged files can jump
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        except av.error.FFmpegError as err:
            raise MediaError(f"audio track cannot be decoded: {err}") from None
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks) if chunks else None


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def clip_count(duration_s: float, clip_s: float, stride_s: float) -> int:
    """Whole clips that fit in a video (a clip never reads past the last frame)."""
    if duration_s + 1e-6 < clip_s:
        return 0
    return int(math.floor((duration_s - clip_s) / stride_s + 1e-6)) + 1
