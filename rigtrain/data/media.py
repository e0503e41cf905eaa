"""Decoding: video frames with OpenCV, audio with soundfile (sidecar files) or PyAV (the
container's own track), resampled with libswresample through PyAV."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rigtrain.data.timestamps import SAME_INSTANT_S, SeekedTooFar, frames_at_output_times, timed_frames

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
    )
    if info.fps <= 0 or info.width <= 0 or info.height <= 0:
        cap.release()
        raise MediaError("has no readable video stream (fps or frame size missing)")
    return cap, info


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


RESIZE_MODES = ("crop", "pad")


def fit_frame(frame: np.ndarray, height: int, width: int, mode: str = "crop") -> np.ndarray:
    """Resize to (height, width) keeping the aspect ratio: "crop" cuts the centre to the
    target aspect first; "pad" letterboxes the whole frame in black. INTER_AREA is the
    right filter for shrinking. Nothing is ever stretched."""
    import cv2  # OpenCV: only where frames are decoded or written

    h, w = frame.shape[:2]
    target = width / height
    if mode == "pad":
        scale = min(width / w, height / h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        out = np.zeros((height, width, *frame.shape[2:]), frame.dtype)
        y0, x0 = (height - new_h) // 2, (width - new_w) // 2
        out[y0 : y0 + new_h, x0 : x0 + new_w] = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA)
        return out
    if w / h > target:  # too wide: crop the sides
        new_w = max(1, round(h * target))
        x0 = (w - new_w) // 2
        frame = frame[:, x0 : x0 + new_w]
    elif w / h < target:  # too tall: crop top and bottom
        new_h = max(1, round(w / target))
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


def frame_fitter(size: tuple[int, int], mode: str):
    import cv2  # OpenCV: only where frames are decoded or written

    return lambda frame: fit_frame(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), *size, mode)


def read_video(path: Path, fps: float, size: tuple[int, int], mode: str = "crop") -> tuple[np.ndarray, VideoInfo]:
    """All frames resampled in time to `fps` (the source frame showing at each output time,
    by the frames' own timestamps) and fitted to size=(H, W): uint8 RGB (T, H, W, 3)."""
    cap, info = open_video(path)
    try:
        frames = frames_at_output_times(
            timed_frames(cap, info.fps), info.fps, fps, 0, None, frame_fitter(size, mode), False
        )
    finally:
        cap.release()
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

    fit = frame_fitter(size, mode)
    for back_s in (None, SEEK_BACK_FAR_S, float("inf")):
        cap, info = open_video(path)
        try:
            seek_s = start_frame / fps - (SEEK_BACK_PERIODS / info.fps if back_s is None else back_s)
            if seek_s > 0:
                cap.set(cv2.CAP_PROP_POS_MSEC, seek_s * 1000.0)
            try:
                frames = frames_at_output_times(
                    timed_frames(cap, info.fps), info.fps, fps, start_frame, count, fit, seek_s > 0
                )
            except SeekedTooFar:
                continue
            if len(frames) == count or seek_s <= 0:
                break
            # short after a seek: OpenCV's seek trusts the header's frame count, which a
            # .webm lacks or estimates, and can land at the end or nowhere; read from further back
        finally:
            cap.release()
    if len(frames) < count:
        raise MediaError(f"only {len(frames)} of {count} frames from frame {start_frame} could be decoded")
    return np.stack(frames)


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


def last_decodable_s(path: Path, last_s: float) -> float | None:
    """The time of the last frame that decodes, from the keyframe before last_s - 0.5 s
    (last_s: frame_times' last) to the end or the first error: a truncated file's index can
    promise frames its data no longer holds, and a cut packet is counted but not decoded.
    None when no frame decodes from there. PyAV, not OpenCV: OpenCV's seek relies on the
    header's frame count, which a .webm lacks or estimates; both decode with FFmpeg and
    stop at the same frame."""
    import av  # PyAV: only where a container is read

    last = None
    with open_container(path) as container:
        stream = container.streams.video[0]
        origin = stream.start_time or 0
        try:
            container.seek(origin + int(max(0.0, last_s - 0.5) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts is not None:
                    last = max(last or 0.0, float((frame.pts - origin) * stream.time_base))
        except av.error.FFmpegError:
            pass  # the damage: what decoded before it is what prepare gets
    return last


def _mono_resampler(rate: int, channels: int, target_rate: int):
    """A function from (S, channels) float32 blocks at `rate` to mono float32 at target_rate
    (libswresample, which keeps its state between blocks: the blocks' output joined is the
    whole's), and None for the end."""
    import av  # PyAV: only where a container's audio is read

    layout = {1: "mono", 2: "stereo"}.get(channels, "mono")  # more channels: averaged ourselves
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)

    def resample(block: np.ndarray | None) -> list[np.ndarray]:
        if block is None:
            return [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        block = np.asarray(block, dtype=np.float32)
        if block.ndim == 1:
            block = block[:, None]
        if block.shape[1] > 2:
            block = block.mean(axis=1, keepdims=True)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block.T), format="fltp", layout=layout)
        frame.sample_rate = rate
        return [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]

    return resample


def resample_audio(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """(S,) or (S, channels) float -> mono float32 at target_rate, via libswresample."""
    samples = np.asarray(samples, dtype=np.float32)
    resample = _mono_resampler(rate, samples.shape[1] if samples.ndim == 2 else 1, target_rate)
    out = resample(samples) + resample(None)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


SIDECAR_BLOCK_S = 10  # a sidecar is read this many seconds at a time


def read_audio_file(path: Path, target_rate: int) -> np.ndarray:
    """A sidecar .wav/.flac/.ogg -> mono float32 at target_rate, read SIDECAR_BLOCK_S at a
    time (an hour of 48 kHz stereo is 1.4 GB as float32; its mono 16 kHz, 230 MB)."""
    import soundfile as sf  # only where audio files are read or written

    try:
        with sf.SoundFile(str(path)) as file:
            resample = _mono_resampler(file.samplerate, file.channels, target_rate)
            out = []
            for block in file.blocks(blocksize=SIDECAR_BLOCK_S * file.samplerate, dtype="float32", always_2d=True):
                out += resample(block)
            out += resample(None)
    except Exception as err:  # soundfile raises its own LibsndfileError and RuntimeError
        raise MediaError(f"unreadable audio: {err}") from None
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def open_container(path: Path):
    """A PyAV container (use it as a context manager); MediaError when FFmpeg cannot open it."""
    import av  # PyAV: only where a container's audio is read

    try:
        return av.open(str(path))
    except av.error.FFmpegError as err:
        # strerror: FFmpeg's own words, without the errno and the path the line already names
        raise MediaError(f"cannot be opened by FFmpeg: {getattr(err, 'strerror', None) or err}") from None


def video_start_s(container) -> float:
    """When the first video frame shows, in seconds of the container's clock: the zero of
    the clip times (OpenCV counts frames from that frame), and so of the audio too."""
    if not container.streams.video:
        return 0.0
    stream = container.streams.video[0]
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _longest_lead_s(container) -> float:
    """The most silence a track that starts late may be given: the container's length (a
    damaged file's start time can be anything; silence past the video is never used)."""
    return container.duration / 1e6 if container.duration else 3600.0


def read_container_audio(path: Path, target_rate: int) -> np.ndarray | None:
    """The video container's own audio track -> mono float32 at target_rate, or None when
    the container has no audio track. Sample 0 is the time of the first video frame: a
    track that starts later (a muxer's offset) begins with silence, one that starts
    earlier is cut, so sound and picture stay in sync."""
    import av  # PyAV: only where a container's audio is read

    with open_container(path) as container:
        if not container.streams.audio:
            return None
        zero_s = video_start_s(container)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
        chunks, offset_s = [], None
        try:
            for frame in container.decode(audio=0):
                if offset_s is None and frame.pts is not None:
                    offset_s = float(frame.pts * frame.time_base) - zero_s
                    offset_s = min(offset_s, _longest_lead_s(container))
                # after the first frame, resample by sample count: timestamps of damaged
                # files can jump
                frame.pts = None
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        except av.error.FFmpegError as err:
            raise MediaError(f"audio track cannot be decoded: {err}") from None
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    if not chunks:
        return None
    audio = np.concatenate(chunks)
    shift = round((offset_s or 0.0) * target_rate)
    if shift > 0:
        return np.concatenate([np.zeros(shift, audio.dtype), audio])
    return audio[-shift:]


def read_audio_window(
    video: Path, sidecar: Path | None, start_s: float, seconds: float, target_rate: int
) -> np.ndarray | None:
    """`seconds` of audio from start_s, decoded on demand (for loaders without shards):
    a sidecar is read from that sample on; a container track is seeked to the packet
    before start_s (or read from its start, for a window near it) and decoded forward,
    with silence where the track has not begun. None when there is no audio."""
    if sidecar is not None:
        import soundfile as sf  # only where audio files are read or written

        try:
            with sf.SoundFile(str(sidecar)) as f:
                f.seek(min(f.frames, round(start_s * f.samplerate)))
                samples = f.read(round(seconds * f.samplerate), dtype="float32", always_2d=True)
                rate = f.samplerate
        except Exception as err:  # soundfile raises its own LibsndfileError and RuntimeError
            raise MediaError(f"unreadable audio: {err}") from None
        return resample_audio(samples, rate, target_rate)
    import av  # PyAV: only where a container's audio is read

    with open_container(video) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        # Decode at the source rate from a little before start_s (AAC frames overlap their
        # neighbours, so the first frame after a seek is not exact), cut the window with a
        # margin, resample it in one piece, then drop the margin: the samples then match a
        # full read of the track.
        margin = 0.05
        zero_s = video_start_s(container)  # time 0 of the clips, as in read_container_audio
        track_start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else zero_s
        if zero_s + start_s - 0.2 > track_start_s:
            # not at the track's start: after a seek FFmpeg may drop the first frame it decodes
            container.seek(int((zero_s + start_s - 0.2) / stream.time_base), stream=stream, backward=True)
        pieces, first, rate = [], None, stream.rate
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base) - zero_s
                first = t if first is None else first
                rate = frame.sample_rate
                array = frame.to_ndarray()
                pieces.append(array.T if frame.format.is_planar else array.reshape(-1, len(frame.layout.channels)))
                if t + frame.samples / rate >= start_s + seconds + margin:
                    break
        except av.error.FFmpegError as err:
            raise MediaError(f"audio track cannot be decoded: {err}") from None
    if not pieces:
        return np.zeros(0, np.float32)
    if first >= start_s + seconds:  # the track begins after the window: all of it is silence
        return np.zeros(round(seconds * target_rate), np.float32)
    decoded = np.concatenate(pieces)
    if first > start_s - margin:  # the decoded audio begins inside the cut: silence before it
        silence = np.zeros((round((first - start_s + margin) * rate), decoded.shape[1]), decoded.dtype)
        decoded, first = np.concatenate([silence, decoded]), start_s - margin
    lead = round((start_s - margin - first) * rate)  # samples decoded before the cut
    source = decoded[lead : lead + round((margin + seconds + margin) * rate)]
    audio = resample_audio(source, rate, target_rate)
    skip = round(margin * target_rate)
    return audio[skip : skip + round(seconds * target_rate)]


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)


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
