"""Decoding sound: a sidecar file with soundfile, a video container's own track with PyAV,
both resampled to mono at the clip's rate with libswresample (through PyAV), and kept on the
clock of the video's first frame (docs/data.md, "One clock")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rigtrain.data.container import MediaError, ffmpeg_says, open_container


def unreadable_audio(err: Exception) -> MediaError:
    """libsndfile's reason in the words the rest of the line uses: soundfile writes "Error
    opening 'PATH': Format not recognised.", and the line already names the file."""
    reason = str(err)
    if reason.startswith("Error opening") and "': " in reason:
        reason = reason.split("': ", 1)[1]
    return MediaError(f"unreadable audio: {reason.strip().rstrip('.')}")


# Sample rates from a telephone's 8 kHz down to 1 kHz, up to a studio's 768 kHz
SANE_RATES = (1000, 768_000)


def _mono_resampler(rate: int, target_rate: int):
    """A function from (S, channels) float32 blocks at `rate` to mono float32 at target_rate,
    and None for the end. The channels are averaged here, for every source alike: FFmpeg's
    own downmix adds them (stereo at 0.71 each, 5.1 to 1.7 times a channel's level, which
    clips in 16-bit shards), and a video's track and a sidecar of the same sound must come
    out equally loud. The rate is changed by libswresample, which keeps its state between
    blocks: the blocks' output joined is the whole's."""
    import av  # PyAV: only where a container's audio is read

    if not SANE_RATES[0] <= rate <= SANE_RATES[1]:  # a damaged header: 1 Hz would come out 16,000 times longer
        raise MediaError(f"a sample rate of {rate} Hz, which no recording has (damaged?)")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)

    def resample(block: np.ndarray | None) -> list[np.ndarray]:
        frame = None
        if block is not None:
            block = np.asarray(block, dtype=np.float32)
            mono = block.mean(axis=1) if block.ndim == 2 else block
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono[None, :]), format="fltp", layout="mono")
            frame.sample_rate = rate
        try:
            return [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        except av.error.FFmpegError as err:  # a damaged track's rate (FFmpeg: "Cannot allocate memory")
            raise MediaError(f"sound at {rate} Hz cannot be resampled: {ffmpeg_says(err)}") from None

    return resample


# full scale of each integer sample format FFmpeg decodes to (planar or packed)
_FULL_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0**31, "s64": 2.0**63}


# More samples than any codec puts in one frame (FLAC's largest block is 65,535)
MOST_SAMPLES_PER_FRAME = 1 << 20


def frame_samples(frame) -> np.ndarray:
    """A decoded PyAV AudioFrame as (samples, channels) float32 in [-1, 1], whatever its
    sample format: PCM in a .mov or FLAC in a .mkv decode to integers, AAC and Opus to floats.
    A damaged frame is silence for its length: FFmpeg's AAC decoder can return one whose
    channel count (23, read from a corrupt header) disagrees with its planes, and PyAV's
    to_ndarray then reads past them and crashes the process."""
    channels = len(frame.layout.channels)
    if not 0 < frame.samples <= MOST_SAMPLES_PER_FRAME:
        return np.zeros((0, 1), np.float32)
    if len(frame.planes) != (channels if frame.format.is_planar else 1):
        return np.zeros((frame.samples, 1), np.float32)
    array = frame.to_ndarray()
    samples = array.T if frame.format.is_planar else array.reshape(-1, len(frame.layout.channels))
    kind = frame.format.name.removesuffix("p")
    if kind == "u8":
        return (samples.astype(np.float32) - 128.0) / _FULL_SCALE["u8"]
    if kind in _FULL_SCALE:
        return (samples / _FULL_SCALE[kind]).astype(np.float32)
    return samples.astype(np.float32)


def resample_audio(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """(S,) or (S, channels) float -> mono float32 at target_rate, via libswresample."""
    samples = np.asarray(samples, dtype=np.float32)
    resample = _mono_resampler(rate, target_rate)
    out = resample(samples) + resample(None)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


SIDECAR_BLOCK_S = 10  # a sidecar is read this many seconds at a time
# Sidecars libsndfile cannot open (AAC): decoded by FFmpeg as a video's own track is, the
# file's first sample at the video's first frame.
FFMPEG_SIDECARS = (".m4a", ".aac")


def read_by_ffmpeg(sidecar: Path) -> bool:
    return sidecar.suffix.lower() in FFMPEG_SIDECARS


def packets_seconds(path: Path) -> float:
    """How long the sound track lasts, from its first packet to the end of its last, read
    without decoding."""
    import av  # PyAV: only where a container's audio is read

    with open_container(path) as container:
        stream = sound_track(container)
        if stream is None:
            return 0.0
        first = end = None
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size:
                    first = packet.pts if first is None else min(first, packet.pts)
                    end = max(end or packet.pts, packet.pts + (packet.duration or 0))
        except av.error.FFmpegError:
            pass  # damaged: what came before is what a decoder gets too
        return float((end - first) * stream.time_base) if first is not None else 0.0


def read_audio_file(path: Path, target_rate: int) -> np.ndarray:
    """A sidecar (media.AUDIO_SUFFIXES) -> mono float32 at target_rate, read SIDECAR_BLOCK_S
    at a time (an hour of 48 kHz stereo is 1.4 GB as float32; its mono 16 kHz, 230 MB)."""
    if read_by_ffmpeg(path):
        audio = read_container_audio(path, target_rate)
        if audio is None:
            raise MediaError("holds no sound track")
        return audio
    import soundfile as sf  # only where audio files are read or written

    try:
        with sf.SoundFile(str(path)) as file:
            resample = _mono_resampler(file.samplerate, target_rate)
            out = []
            for block in file.blocks(blocksize=SIDECAR_BLOCK_S * file.samplerate, dtype="float32", always_2d=True):
                out += resample(block)
            out += resample(None)
    except Exception as err:  # soundfile raises its own LibsndfileError and RuntimeError
        raise unreadable_audio(err) from None
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def video_start_s(container) -> float:
    """When the first video frame shows, in seconds of the container's clock: the zero of
    the clip times (OpenCV counts frames from that frame), and so of the audio too."""
    if not container.streams.video:
        return 0.0
    stream = container.streams.video[0]
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def sound_track(container):
    """The audio track a player plays, None when there is none: FFmpeg's own choice
    (av_find_best_stream), which takes the track marked default over the others and leaves
    an audio description (a DVD's or a film's track for the visually impaired) to last, as
    a player does; a camcorder's or a phone's only track either way."""
    tracks = [s for s in container.streams.audio if s.codec_context is not None]  # None: no decoder for it
    if not tracks:
        return None
    best = container.streams.best("audio")
    return best if any(best is s for s in tracks) else tracks[0]


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
        stream = sound_track(container)
        if stream is None:
            return None
        zero_s = video_start_s(container)
        chunks, offset_s, resample, pending, pending_samples = [], None, None, [], 0
        try:
            # After the first frame, samples are counted, not timed: the timestamps of
            # damaged files can jump.
            for frame in container.decode(stream):
                if offset_s is None and frame.pts is not None:
                    offset_s = float(frame.pts * frame.time_base) - zero_s
                    offset_s = min(offset_s, _longest_lead_s(container))
                if resample is None:
                    resample = _mono_resampler(frame.sample_rate, target_rate)
                    block = SIDECAR_BLOCK_S * frame.sample_rate
                pending.append(frame_samples(frame).mean(axis=1))
                pending_samples += frame.samples
                if pending_samples >= block:  # resampled in blocks, not a call per frame
                    chunks += resample(np.concatenate(pending))
                    pending, pending_samples = [], 0
        except av.error.FFmpegError as err:
            raise MediaError(f"audio track cannot be decoded: {ffmpeg_says(err)}") from None
        if resample is not None:
            chunks += resample(np.concatenate(pending)) if pending else []
            chunks += resample(None)
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
    if sidecar is not None and read_by_ffmpeg(sidecar):
        window = read_audio_window(sidecar, None, start_s, seconds, target_rate)
        if window is None:
            raise MediaError("holds no sound track")
        return window
    if sidecar is not None:
        import soundfile as sf  # only where audio files are read or written

        try:
            with sf.SoundFile(str(sidecar)) as f:
                f.seek(min(f.frames, round(start_s * f.samplerate)))
                samples = f.read(round(seconds * f.samplerate), dtype="float32", always_2d=True)
                rate = f.samplerate
        except Exception as err:  # soundfile raises its own LibsndfileError and RuntimeError
            raise unreadable_audio(err) from None
        return resample_audio(samples, rate, target_rate)
    import av  # PyAV: only where a container's audio is read

    with open_container(video) as container:
        stream = sound_track(container)
        if stream is None:
            return None
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
                pieces.append(frame_samples(frame).mean(axis=1, keepdims=True))  # a track may change its channels
                if t + frame.samples / rate >= start_s + seconds + margin:
                    break
        except av.error.FFmpegError as err:
            raise MediaError(f"audio track cannot be decoded: {ffmpeg_says(err)}") from None
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
