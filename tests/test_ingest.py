"""Ingestion of a user's folder: subtitles, container audio, any frame size, parallel and
resumable prepare, `data check`."""

import codecs
import itertools
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from rigtrain.config import load_config
from rigtrain.data.media import MediaError, fit_frame, read_video, read_video_clip
from rigtrain.data.narration import Segment, parse_subtitles, read_narration
from rigtrain.data.prepare import DECODING, prepare
from rigtrain.data.shards import PREPARE_JOURNAL
from rigtrain.data.sound import read_audio_window, read_container_audio
from rigtrain.data.synth import synthesize

SRT_WITH_A_BAD_LINE = """1
00:00:00,500 --> 00:00:01,800
the first <i>cue</i>

2
00:00:02,000 -> 00:00:03,000
an arrow with one dash

3
00:00:03,250 --> 00:00:04,900
the third cue
on two lines
"""

VTT_WITH_A_BAD_LINE = """WEBVTT - made by hand

NOTE a comment, not narration

intro
00:00.500 --> 00:01.800 align:start position:10%
<v Speaker>the first cue</v>

00:00:02.000 --> 00:00:0x.000
a broken time

00:00:03.250 --> 00:00:04.900
the third cue
"""


def write_h264_with_aac(
    path: Path,
    seconds: float = 3.0,
    fps: int = 25,
    size=(320, 180),
    tone_hz: float = 440.0,
    audio: bool = True,
    audio_pts_s: float = 0.0,
    video_pts_s: float = 0.0,
    silent_s: float = 0.0,
) -> None:
    """An H.264 + AAC mp4 written by PyAV: a moving gradient (its first frame stamped
    video_pts_s) and a sine tone after silent_s of silence (its first sample stamped
    audio_pts_s)."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = container.add_stream("aac", rate=44100, layout="stereo") if audio else None
        x = np.arange(width)[None, :, None]
        for i in range(round(seconds * fps)):
            image = np.broadcast_to(((x + 4 * i) % 256).astype(np.uint8), (height, width, 3)).copy()
            image[:, :, 1] = (i * 7) % 256
            picture = av.VideoFrame.from_ndarray(image, format="rgb24")
            picture.pts, picture.time_base = i + round(video_pts_s * fps), Fraction(1, fps)
            for packet in video.encode(picture):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            t = np.arange(round(seconds * 44100)) / 44100
            wave = (0.5 * np.sin(2 * np.pi * tone_hz * t) * (t >= silent_s)).astype(np.float32)
            for k in range(0, len(wave), 1024):
                chunk = np.stack([wave[k : k + 1024]] * 2)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = 44100, k + round(audio_pts_s * 44100)
                frame.time_base = Fraction(1, 44100)
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory, shared_data):
    """A folder as a user brings it: real H.264 (no audio) from ../shared, an H.264 + AAC
    video written by PyAV with an SRT, one with a VTT, a truncated mp4, a real Whisper
    transcript."""
    src = tmp_path_factory.mktemp("videos")
    shutil.copy(shared_data / "videos" / "bikes.mp4", src / "bikes.mp4")
    shutil.copy(shared_data / "transcripts" / "cheapest_dl_hardware.json", src / "bikes.json")
    shutil.copy(shared_data / "videos" / "carphone_pristine.mp4", src / "carphone.mp4")
    write_h264_with_aac(src / "tone.mp4")
    (src / "tone.srt").write_text(SRT_WITH_A_BAD_LINE)
    write_h264_with_aac(src / "wide.mp4", seconds=5.0, size=(640, 160), tone_hz=880.0)
    (src / "wide.vtt").write_text(VTT_WITH_A_BAD_LINE)
    data = (shared_data / "videos" / "bikes.mp4").read_bytes()
    (src / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return src


def test_subtitles_keep_good_cues_and_name_bad_lines():
    srt = parse_subtitles(SRT_WITH_A_BAD_LINE, webvtt=False)
    assert [(s.start, s.end, s.text) for s in srt.segments] == [
        (0.5, 1.8, "the first cue"),
        (3.25, 4.9, "the third cue on two lines"),
    ]
    assert len(srt.problems) == 1 and srt.problems[0].startswith("line 6: ")
    vtt = parse_subtitles(VTT_WITH_A_BAD_LINE, webvtt=True)
    assert [(s.start, s.end, s.text) for s in vtt.segments] == [
        (0.5, 1.8, "the first cue"),
        (3.25, 4.9, "the third cue"),
    ]
    assert len(vtt.problems) == 1 and vtt.problems[0].startswith("line 9: ")
    with pytest.raises(MediaError, match="WEBVTT"):
        parse_subtitles("1\n00:00:01.000 --> 00:00:02.000\nno header\n", webvtt=True)
    with pytest.raises(MediaError, match="no readable cue"):
        parse_subtitles("just some text\n", webvtt=False)


# YouTube's automatic captions as yt-dlp saves them: a line of one space (·) inside the cues,
# words timed inline, and rolling cues that show the line before again (a 10 ms cue alone).
YOUTUBE_AUTO_VTT = """WEBVTT
Kind: captions
Language: en

00:00:00.030 --> 00:00:02.070 align:start position:0%
·
hey<00:00:00.359><c> guys</c><00:00:00.659><c> welcome</c>

00:00:02.070 --> 00:00:02.080 align:start position:0%
hey guys welcome
·

00:00:02.080 --> 00:00:04.789 align:start position:0%
hey guys welcome
to<00:00:02.399><c> another</c><00:00:02.639><c> video</c>

00:00:04.789 --> 00:00:04.799 align:start position:0%
to another video
·
00:00:04.799 --> 00:00:07.000 align:start position:0%
to another video
today<00:00:05.100><c> we</c><c> build</c>
""".replace("·", " ")


ASS_SUBTITLES = """[Script Info]
ScriptType: v4.00+

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
Dialogue: 0,0:00:00.50,0:00:01.20,Default,,0,0,0,,{\\i1}hello{\\i0} there
Dialogue: 0,0:00:01.50,0:00:02.80,Default,,0,0,0,,a red bike\\Ngoes by
"""


@pytest.mark.parametrize("suffix, bom", [(".ass", ""), (".ssa", "\ufeff")])
def test_an_advanced_substation_sidecar_is_narration(tmp_path, suffix, bom):
    """Aegisub's and fansubs' .ass (and the older .ssa) beside a video: its dialogue, without
    the styling in braces, is the narration; one that does not read is named and skipped."""
    from rigtrain.data.check import check_folder, format_report

    write_h264_with_aac(tmp_path / "ride.mp4", audio=False)
    (tmp_path / f"ride{suffix}").write_text(bom + ASS_SUBTITLES, encoding="utf-8")
    assert read_narration(tmp_path / f"ride{suffix}").segments == [
        Segment(0.5, 1.2, "hello there"),
        Segment(1.5, 2.8, "a red bike goes by"),
    ]
    write_h264_with_aac(tmp_path / "broken.mp4", audio=False)
    (tmp_path / f"broken{suffix}").write_text("not a subtitle file\n")
    index = prepare(tmp_path, tmp_path / "prep", load_config("demo").data)
    narrated = {v["video"]: v["narration"] for v in index["sources"]}
    assert narrated == {"ride.mp4": f"ride{suffix}", "broken.mp4": None}
    assert any(s["file"] == f"broken{suffix}" for s in index["skipped"])
    assert f"broken.mp4: broken{suffix} will be skipped: cannot be opened by FFmpeg" in format_report(
        check_folder(tmp_path, load_config("demo").data)
    )


def test_youtube_automatic_captions_are_read_once_each():
    """Every phrase once, at the cue that brings it, and no line reported: a line of one
    space is cue text in WebVTT, not the end of the cue (read as one, each cue's words were
    lost as a block without a timing), and a '-->' line starts the next cue."""
    vtt = parse_subtitles(YOUTUBE_AUTO_VTT, webvtt=True)
    assert vtt.problems == []
    assert [(s.start, s.end, s.text) for s in vtt.segments] == [
        (0.03, 2.07, "hey guys welcome"),
        (2.08, 4.789, "to another video"),
        (4.799, 7.0, "today we build"),
    ]
    # a subtitle that repeats nothing keeps every line, and SRT's blank line may hold spaces
    srt = parse_subtitles(
        "1\n00:00:01,000 --> 00:00:02,000\nNo.\n   \n2\n00:00:02,000 --> 00:00:03,000\nNo!\n", webvtt=False
    )
    assert [s.text for s in srt.segments] == ["No.", "No!"]


def test_whisper_list_form(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"start": 0, "end": 1.5, "text": " hello "}]))
    assert [(s.start, s.end, s.text) for s in read_narration(path).segments] == [(0.0, 1.5, "hello")]


def test_whisper_cpp_json(tmp_path):
    """whisper.cpp's `-oj` output: `transcription` entries timed in milliseconds (`offsets`)
    beside the same times as text (`timestamps`), under its system info and parameters."""
    path = tmp_path / "talk.json"
    entries = [
        ("00:00:00,000", "00:00:02,320", 0, 2320, " Okay, I'm super excited."),
        ("00:00:02,320", "00:00:05,520", 2320, 5520, " It's called ViT."),
    ]
    path.write_text(
        json.dumps(
            {
                "systeminfo": "AVX = 1 | NEON = 0",
                "model": {"type": "base"},
                "params": {"model": "models/ggml-base.en.bin", "language": "en", "translate": False},
                "result": {"language": "en"},
                "transcription": [
                    {"timestamps": {"from": a, "to": b}, "offsets": {"from": f, "to": t}, "text": text}
                    for a, b, f, t, text in entries
                ],
            }
        )
    )
    segments = read_narration(path).segments
    assert [(s.start, s.end, s.text) for s in segments] == [
        (0.0, 2.32, "Okay, I'm super excited."),
        (2.32, 5.52, "It's called ViT."),
    ]
    path.write_text(json.dumps({"transcription": [{"timestamps": {"from": "00:00:00,000"}, "text": "no offsets"}]}))
    with pytest.raises(MediaError, match=r"transcription 0 lacks offsets"):
        read_narration(path)


def test_a_long_sidecar_is_resampled_a_block_at_a_time(tmp_path, monkeypatch):
    """A sidecar is read and resampled a block at a time (10 s; 1 s here): the same samples as
    the whole file resampled at once, without holding it (an hour of 48 kHz stereo is 1.4 GB)."""
    import tracemalloc

    import soundfile as sf

    from rigtrain.data import sound
    from rigtrain.data.sound import read_audio_file, resample_audio

    monkeypatch.setattr(sound, "SIDECAR_BLOCK_S", 1)

    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal((48000 * 65, 2))).astype(np.float32)
    sf.write(tmp_path / "talk.wav", samples, 48000, subtype="FLOAT")
    tracemalloc.start()
    blocks = read_audio_file(tmp_path / "talk.wav", 16000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(blocks, resample_audio(samples, 48000, 16000)) and len(blocks) == 16000 * 65
    assert peak < 0.5 * samples.nbytes, (peak, samples.nbytes)  # the output (twice, joined) and a block


def test_container_aac_track_is_decoded_and_resampled(user_folder):
    audio = read_container_audio(user_folder / "tone.mp4", 16000)
    assert abs(len(audio) / 16000 - 3.0) < 0.1
    spectrum = np.abs(np.fft.rfft(audio[4000:12000]))
    assert abs(np.argmax(spectrum) * 16000 / 8000 - 440) < 4  # the tone survives AAC and resampling
    window = read_audio_window(user_folder / "tone.mp4", None, 1.0, 0.5, 16000)
    assert len(window) == 8000
    assert np.abs(window - audio[16000:24000]).max() < 0.05  # a seek reads the same samples
    assert read_container_audio(user_folder / "bikes.mp4", 16000) is None


def write_film(path: Path, main_title: str = "Main") -> None:
    """One second of black with two sound tracks: an audio description (440 Hz) first, then
    the main track (880 Hz, marked default, titled main_title)."""
    import av
    from av.stream import Disposition

    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        tracks = []
        for tone, disposition, title in (
            (440, Disposition.visual_impaired, "Audio description"),
            (880, Disposition.default, main_title),
        ):
            track = container.add_stream("aac", rate=48000)
            track.layout, track.disposition = "mono", disposition
            track.metadata["title"], track.metadata["language"] = title, "eng"
            tracks.append((track, tone))
        for _ in range(50):
            for packet in video.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for track, tone in tracks:
            for k in range(2 * 48000 // 1024):
                t = (k * 1024 + np.arange(1024)) / 48000
                frame = av.AudioFrame.from_ndarray(
                    np.sin(2 * np.pi * tone * t).astype(np.float32)[None], format="fltp", layout="mono"
                )
                frame.sample_rate, frame.pts = 48000, k * 1024
                for packet in track.encode(frame):
                    container.mux(packet)
            for packet in track.encode():
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)


def tone_of(audio):  # one second at 8 kHz: the spectrum's bins are 1 Hz apart
    return np.argmax(np.abs(np.fft.rfft(audio[:8000])))


def test_of_several_sound_tracks_the_one_a_player_plays_is_taken(tmp_path):
    """A film or DVD rip can carry an audio description (for the visually impaired) or a
    commentary before its main track: prepare, the on-demand window and data check take the
    track a player plays (marked default), not the first."""
    from rigtrain.data.check import check_folder, format_report

    write_film(tmp_path / "film.mkv")
    assert tone_of(read_container_audio(tmp_path / "film.mkv", 8000)) == pytest.approx(880, abs=4)
    assert tone_of(read_audio_window(tmp_path / "film.mkv", None, 0.5, 1.0, 8000)) == pytest.approx(880, abs=4)
    report = check_folder(tmp_path, load_config("demo").data)
    assert report["videos"][0]["audio"]["track"] == '2 (eng, "Main", default)'
    assert 'film.mkv: 2 sound tracks: prepare takes track 2 (eng, "Main", default)' in format_report(report)


def test_tags_that_are_not_utf8_are_read_not_refused(tmp_path):
    """An old camcorder or a Windows tool writes its tags in Latin-1: PyAV 18 refused to open
    such a file at all (a traceback from data check), PyAV 19 keeps the bytes as surrogates,
    which no terminal prints. The file is used, and the tag shown with U+FFFD for the byte."""
    from rigtrain.data.check import check_folder, format_report

    write_film(tmp_path / "film.mkv", main_title="Musique")
    data = (tmp_path / "film.mkv").read_bytes()
    (tmp_path / "film.mkv").write_bytes(data.replace(b"Musique", b"Musiqu\xe9"))  # same length: the sizes hold
    assert tone_of(read_container_audio(tmp_path / "film.mkv", 8000)) == pytest.approx(880, abs=4)
    report = check_folder(tmp_path, load_config("demo").data)
    assert report["videos"][0]["ok"] and report["videos"][0]["audio"]["track"] == '2 (eng, "Musiqu\ufffd", default)'
    format_report(report).encode("utf-8")  # prints: no lone surrogate left
    json.dumps(report, ensure_ascii=False).encode("utf-8")
    index = prepare(tmp_path, tmp_path / "prep", load_config("demo").data)
    assert index["sources"][0]["audio"] == "container" and not index["skipped"]


@pytest.mark.parametrize("audio_pts_s", [0.0, 0.5])
def test_a_window_at_the_start_of_a_track_is_whole(tmp_path, audio_pts_s):
    """The first clip's audio, decoded on demand, is the same second prepare reads: also
    when the track's timestamps start late (a muxer's offset), and whatever FFmpeg does
    with the first frame after a seek (PyAV 19 drops it). It came back a few hundred
    samples long, and the clip without sound."""
    video = tmp_path / "late.mp4"
    write_h264_with_aac(video, size=(64, 64), audio_pts_s=audio_pts_s)
    whole = read_container_audio(video, 16000)
    for start_s in (0.0, 0.1):
        window = read_audio_window(video, None, start_s, 1.0, 16000)
        assert len(window) == 16000, (start_s, len(window))
        s0 = round(start_s * 16000)
        assert np.median(np.abs(window - whole[s0 : s0 + 16000])) < 0.01, start_s


@pytest.mark.parametrize(
    ("audio_pts_s", "video_pts_s", "silent_s", "check_says"),
    [
        (0.5, 0.0, 0.0, "the sound starts 0.48 s after the first frame"),  # 0.48: AAC's 1024 priming samples
        (0.0, 0.4, 0.9, "the sound starts 0.40 s before the first frame"),
        (0.0, 0.0, 0.5, None),
    ],
    ids=["audio-starts-late", "video-starts-late", "in-step"],
)
def test_sound_and_picture_stay_in_sync(tmp_path, audio_pts_s, video_pts_s, silent_s, check_says):
    """The tone begins 0.5 s after the first frame in all three files; prepare and the
    on-demand loader both hear it there, and `data check` says when a track is offset. A
    track that starts late (a muxer's offset) was read from its own first sample, so its
    sound came 0.5 s early in every clip."""
    from rigtrain.data.check import check_folder  # the report's note on the offset

    video = tmp_path / "sync.mp4"
    write_h264_with_aac(video, size=(64, 64), audio_pts_s=audio_pts_s, video_pts_s=video_pts_s, silent_s=silent_s)

    def onset_s(audio: np.ndarray) -> float:
        return np.flatnonzero(np.abs(audio) > 0.1)[0] / 16000

    assert abs(onset_s(read_container_audio(video, 16000)) - 0.5) < 0.015
    assert abs(onset_s(read_audio_window(video, None, 0.0, 1.0, 16000)) - 0.5) < 0.015
    assert abs(0.3 + onset_s(read_audio_window(video, None, 0.3, 1.0, 16000)) - 0.5) < 0.015
    notes = check_folder(tmp_path, load_config("demo").data)["videos"][0]["notes"]
    offset_notes = [n for n in notes if n.startswith("the sound starts")]
    if check_says is None:
        assert offset_notes == []
    else:
        assert len(offset_notes) == 1 and offset_notes[0].startswith(check_says), notes


def write_variable_rate_h264(
    path: Path, times_ms: list[int], size=(64, 64), codec: str = "libx264", options: dict | None = None
) -> None:
    """A video whose frame i is stamped times_ms[i] and is grey level 3 * i, as a phone
    records: the frame rate follows the light and the load. H.264 in mp4 by default;
    codec="libvpx" and a .webm path for what a browser or a screen recorder writes
    (options={"live": "1"}: streamed, with no duration or frame count in the header)."""
    import av

    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_ms):
            picture = av.VideoFrame.from_ndarray(np.full((*size, 3), 3 * i, np.uint8), format="rgb24")
            picture.pts, picture.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_variable_frame_rate_video_is_resampled_by_its_timestamps(tmp_path, monkeypatch):
    """25 fps, then 10 fps for two seconds, then 25 fps again (the average is 17.5 fps). Each
    output frame is the source frame showing at its time, read whole or on demand; by index
    over the average rate the picture was up to 0.43 s off its time (and its sound)."""
    times = [40 * i for i in range(25)] + [1000 + 100 * i for i in range(20)] + [3000 + 40 * i for i in range(25)]
    video = tmp_path / "phone.mp4"
    write_variable_rate_h264(video, times)
    fps = 8.0
    frames, info = read_video(video, fps, (32, 32))
    assert len(frames) == 32  # 4 s at 8 fps: the last frame shows for 40 ms, as the one before it
    shown = [max(i for i, t in enumerate(times) if t <= 1000 * k / fps + 0.1) for k in range(len(frames))]
    assert np.abs(frames[:, 16, 16, 0].astype(int) - 3 * np.array(shown)).max() <= 3, frames[:, 16, 16, 0]
    for start in (0, 7, 13, 24):  # in the fast part, the slow part, across, and the end
        clip = read_video_clip(video, start, 8, fps, (32, 32))
        assert np.array_equal(clip, frames[start : start + 8]), start
    # a seek that lands past the clip's first frame reads again from further back
    from rigtrain.data import media

    monkeypatch.setattr(media, "SEEK_BACK_PERIODS", 0.0)
    monkeypatch.setattr(media, "SEEK_BACK_FAR_S", 0.0)
    for start in (7, 13, 24):
        assert np.array_equal(read_video_clip(video, start, 8, fps, (32, 32)), frames[start : start + 8]), start


class _CountingCapture:
    """An OpenCV capture that counts the pictures converted (read, or retrieve after grab)."""

    converted = 0

    def __init__(self, cap):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(self.cap, name)

    def read(self):
        ok, picture = self.cap.read()
        _CountingCapture.converted += ok
        return ok, picture

    def retrieve(self):
        ok, picture = self.cap.retrieve()
        _CountingCapture.converted += ok
        return ok, picture


def _count_conversions(monkeypatch):
    from rigtrain.data import media

    opened = media.open_video
    monkeypatch.setattr(_CountingCapture, "converted", 0)
    monkeypatch.setattr(media, "open_video", lambda path: (lambda c, i: (_CountingCapture(c), i))(*opened(path)))


def test_only_the_pictures_that_show_are_converted(tmp_path, monkeypatch):
    """Converting a picture (YUV to RGB, for HDR video the tone mapping: 5x the decoding at
    4K) is done for the frames that show at an output instant, not for all: 60 fps to 8
    converts about one in four. The frames are those of a read that converts every one."""
    from rigtrain.data import timestamps

    video = tmp_path / "phone60.mp4"
    write_variable_rate_h264(video, [round(1000 * i / 60) for i in range(84)])  # 1.4 s at 60 fps
    _count_conversions(monkeypatch)
    frames, _ = read_video(video, 8.0, (32, 32))
    assert len(frames) == 12 and _CountingCapture.converted <= 0.35 * 84, _CountingCapture.converted
    monkeypatch.setattr(timestamps, "MOST_PASSED_OVER", 0)  # every picture converted
    monkeypatch.setattr(_CountingCapture, "converted", 0)
    every, _ = read_video(video, 8.0, (32, 32))
    assert _CountingCapture.converted == 84 and np.array_equal(frames, every)


def test_a_picture_passed_over_that_shows_after_a_gap_is_read_again(tmp_path, monkeypatch):
    """A phone's rate drops: no frame for almost a second after the one at 1.04 s, which was
    passed over (the next output instant, 1.125 s, is more than two gaps of 40 ms away) and
    shows for seven output frames after all. The read is made again from there, converting
    it, and gives the frames of a read that converts every picture: whole, on demand, and
    cut into clips by prepare."""
    from rigtrain.data import timestamps

    times = [40 * i for i in range(27)] + [2000 + 40 * i for i in range(26)]
    video = tmp_path / "dusk.mp4"
    write_variable_rate_h264(video, times)
    passed_over = []
    original = timestamps.NeedEveryFrame.__init__

    def spy(self, at_s):
        passed_over.append(at_s)
        original(self, at_s)

    monkeypatch.setattr(timestamps.NeedEveryFrame, "__init__", spy)
    frames, _ = read_video(video, 8.0, (32, 32))
    assert passed_over and abs(passed_over[0] - 1.04) < 1e-3, passed_over
    shown = [max(i for i, t in enumerate(times) if t <= 125 * k + 0.1) for k in range(len(frames))]
    assert np.abs(frames[:, 16, 16, 0].astype(int) - 3 * np.array(shown)).max() <= 3, frames[:, 16, 16, 0]
    clips = [read_video_clip(video, start, 8, 8.0, (32, 32)) for start in (4, 9, 16)]
    monkeypatch.setattr(timestamps, "MOST_PASSED_OVER", 0)
    every, _ = read_video(video, 8.0, (32, 32))
    assert np.array_equal(frames, every)
    for start, clip in zip((4, 9, 16), clips):
        assert np.array_equal(clip, every[start : start + 8]), start


def test_data_check_and_the_on_demand_reader_agree_with_prepare_without_a_frame_count(tmp_path):
    """A recorder's .webm has no frame count in its header (OpenCV reported -2.8e17 frames,
    and check called a 2.6 s video negative and "shorter than one clip") or an estimate of
    it (80 for 75 frames: "the last frames do not decode (truncated?)"), and OpenCV cannot
    seek in either. Check counts the packets instead, and the on-demand reader falls back
    to reading from the start when a seek lands nowhere. An mp4 cut after its index was
    checked as whole (4 clips where prepare made 3), with no note."""
    from rigtrain.data.check import check_folder, frames_after_resampling
    from rigtrain.data.dataset import ShardDataset
    from rigtrain.data.ondemand import DecodedClips

    src = tmp_path / "videos"
    src.mkdir()
    times = [sum(33 if i % 3 else 40 for i in range(k)) for k in range(75)]  # 25-30 fps, 2.6 s
    write_variable_rate_h264(src / "streamed.webm", times, codec="libvpx", options={"live": "1"})
    write_variable_rate_h264(src / "recorded.webm", times, codec="libvpx")
    write_variable_rate_h264(src / "phone.mp4", [40 * i for i in range(25)] + [1000 + 100 * i for i in range(20)])
    # its index first (faststart), then cut: the index promises 4 s, the data holds less
    write_variable_rate_h264(tmp_path / "whole.mp4", [50 * i for i in range(80)], options={"movflags": "faststart"})
    whole = (tmp_path / "whole.mp4").read_bytes()
    (src / "cut.mp4").write_bytes(whole[: len(whole) * 7 // 10])
    data = load_config("demo").data
    report = check_folder(src, data)
    index = prepare(src, tmp_path / "prep", data)
    checked = {v["file"]: v for v in report["videos"]}
    assert {s["video"]: s["clips"] for s in index["sources"]} == {name: v["clips"] for name, v in checked.items()}
    assert checked["streamed.webm"]["clips"] == 3 and checked["streamed.webm"]["duration_s"] == pytest.approx(2.65)
    assert checked["phone.mp4"]["fps_range"] == [10.0, 25.0]
    for name, entry in checked.items():
        truncated, variable = name == "cut.mp4", name != "cut.mp4"
        assert any("do not decode" in n for n in entry["notes"]) == truncated, (name, entry["notes"])
        assert any(n.startswith("variable frame rate") for n in entry["notes"]) == variable, (name, entry["notes"])
    assert checked["cut.mp4"]["clips"] < 4  # what the data holds, not what the index promised
    for name, entry in checked.items():  # to the frame, the truncated file too
        frames, _ = read_video(src / name, data.fps, (32, 32))
        assert frames_after_resampling(entry["duration_s"], data.fps) == len(frames), name
    shards = ShardDataset(tmp_path / "prep", data)
    for decoded in (DecodedClips.from_index(tmp_path / "prep", index, data), DecodedClips.from_folder(src, data)):
        assert len(decoded) == len(shards)
        for i in range(len(shards)):
            assert np.array_equal(shards[i]["video"].numpy(), decoded[i]["video"].numpy()), i


@pytest.mark.parametrize(
    "name, muxer, codec",
    [
        ("camcorder.MTS", "mpegts", "libx264"),  # AVCHD: MPEG-TS, a 0.08 s start, where a seek lands nowhere
        ("recording.ts", "mpegts", "libx264"),
        ("iphone.m4v", "mp4", "libx264"),
        ("phone.3gp", "3gp", "libx264"),
        ("stream.flv", "flv", "libx264"),
        ("windows.wmv", "asf", "wmv2"),
        ("digitised_tape.mpg", "mpeg", "mpeg2video"),  # MPEG program stream: DVD rips, older camcorders
        ("capture.MPEG", "mpeg", "mpeg1video"),
    ],
)
def test_camcorder_recorder_and_phone_containers(tmp_path, name, muxer, codec):
    """Containers beyond mp4/mkv/webm/avi/mov, each with sound: found as videos, checked
    whole (a seek that lands nowhere in MPEG-TS read as "the last frames do not decode"),
    check counts the frames the reader gives, and a clip read on demand is the same clip
    (an MPEG-2 program stream repeats a frame's stamp: a repeat once pushed every later
    frame a period late in a whole read, and less after a seek)."""
    import av

    from rigtrain.data.check import check_folder, frames_after_resampling

    with av.open(str(tmp_path / name), "w", format=muxer) as container:
        video = container.add_stream(codec, rate=25)
        video.width, video.height, video.pix_fmt = 128, 96, "yuv420p"
        sound = container.add_stream("mp2" if muxer in ("asf", "mpeg") else "aac", rate=48000)
        sound.layout, planar, sample = "stereo", sound.codec_context.format.is_planar, 0
        for i in range(100):  # 4 s
            picture = av.VideoFrame.from_ndarray(np.full((96, 128, 3), (5 * i) % 256, np.uint8), format="rgb24")
            for packet in video.encode(picture):
                container.mux(packet)
            while sample < (i + 1) * 48000 // 25:
                n = sound.codec_context.frame_size or 1152
                silence = np.zeros((2, n), np.float32) if planar else np.zeros((1, 2 * n), np.int16)
                frame = av.AudioFrame.from_ndarray(silence, format=sound.codec_context.format.name, layout="stereo")
                frame.sample_rate, frame.pts, sample = 48000, sample, sample + n
                for packet in sound.encode(frame):
                    container.mux(packet)
        for stream in (video, sound):
            for packet in stream.encode():
                container.mux(packet)
    data = load_config("demo").data
    entry = check_folder(tmp_path, data)["videos"][0]
    assert entry["ok"] and entry["end_decodes"] and entry["notes"] == [] and entry["audio"], entry
    frames, _ = read_video(tmp_path / name, data.fps, (32, 32))
    assert frames_after_resampling(entry["duration_s"], data.fps) == len(frames) == 32
    assert entry["clips"] == 4
    for start in range(0, 32 - 8 + 1, 3):  # a clip decoded on demand, after a seek, is the same clip
        np.testing.assert_array_equal(
            read_video_clip(tmp_path / name, start, 8, data.fps, (32, 32)), frames[start : start + 8]
        )


def test_a_header_count_that_is_garbage_is_not_believed(tmp_path, monkeypatch):
    """Packets without timestamps leave check the header's frame count; one like a streamed
    .webm's (2.8e17) would have built a list of that many frame times."""
    import dataclasses

    from rigtrain.data import check, media

    video = tmp_path / "odd.mp4"
    write_h264_with_aac(video, size=(64, 64), audio=False)
    opened = media.open_video

    def garbage_count(path):
        cap, info = opened(path)
        return cap, dataclasses.replace(info, frames=277_000_000_000_000_000)

    monkeypatch.setattr(media, "open_video", garbage_count)
    monkeypatch.setattr(check, "frame_times", lambda path: [])
    probed = check._probe_video(video)
    assert probed["frames"] == 1 and probed["end_decodes"]


def test_fit_frame_keeps_the_aspect():
    frame = np.full((100, 400, 3), 200, np.uint8)
    padded = fit_frame(frame, 64, 64, "pad")
    assert padded.shape == (64, 64, 3)
    assert padded[:20].max() == 0 and padded[-20:].max() == 0 and padded[32, 32, 0] == 200  # letterboxed
    assert fit_frame(frame, 64, 64, "crop").min() == 200  # the centre fills the frame


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_a_widescreen_dvd_stored_at_720x480_keeps_its_shape(tmp_path, mode):
    """A 16:9 DVD, DV tape or HDV file stores narrower pixels than it shows (a sample aspect
    ratio of 32:27 here): a disc that is round on screen must come out round, not 16%
    narrow as the stored pixels would draw it. Prepare and the on-demand clip read the
    ratio from the stream, as players do."""
    import av

    sar = Fraction(32, 27)
    rows, cols = np.mgrid[0:480, 0:720]
    # a disc of radius 150 rows as shown: stored, it is an ellipse 150 / sar columns wide
    disc = (((cols - 360) * sar / 150) ** 2 + ((rows - 240) / 150) ** 2 <= 1).astype(np.uint8) * 255
    path = tmp_path / "wedding.mpg"
    with av.open(str(path), "w", format="mpeg") as container:
        video = container.add_stream("mpeg2video", rate=25)
        video.width, video.height, video.pix_fmt = 720, 480, "yuv420p"
        video.codec_context.sample_aspect_ratio = sar
        for i in range(25):
            picture = av.VideoFrame.from_ndarray(np.repeat(disc[:, :, None], 3, axis=2), format="rgb24")
            picture.pts, picture.time_base = i, Fraction(1, 25)
            for packet in video.encode(picture):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    for frames in (read_video(path, 8.0, (64, 64), mode)[0][:8], read_video_clip(path, 0, 8, 8.0, (64, 64), mode)):
        lit = frames[4, :, :, 0] > 128
        ys, xs = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
        wide, high = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert abs(wide / high - 1) < 0.08, (mode, wide, high)  # stored pixels would give 0.84
    if mode == "pad":  # 16:9 shown in a square: black bands of (64 - 36) / 2 rows
        assert frames[4, :12].max() < 20 and frames[4, -12:].max() < 20 and frames[4, 16:48].max() > 200
        from rigtrain.data.check import check_folder, format_report

        report = check_folder(tmp_path, load_config("demo").data)
        assert report["videos"][0]["pixel_aspect"] == pytest.approx(32 / 27, abs=1e-3)
        assert "720x480 shown 853x480" in format_report(report)


def write_interlaced(path: Path, codec: str, fmt: str, options: dict, frames: int = 25) -> None:
    """320x240 at 25 fps whose two fields show a bar in different places: the top field's
    (even rows) at x = 40, the bottom field's (odd rows) at x = 200, 1/50 s apart as a
    camcorder records something that moves."""
    import av

    picture = np.zeros((240, 320, 3), np.uint8)
    picture[0::2, 40:80] = 255
    picture[1::2, 200:240] = 255
    with av.open(str(path), "w", format=fmt) as container:
        video = container.add_stream(codec, rate=25)
        video.width, video.height, video.pix_fmt, video.options = 320, 240, "yuv420p", options
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)


@pytest.mark.parametrize(
    "name, codec, fmt, options, field, bar",
    [
        # 1080i AVCHD and HDV record interlaced H.264 top field first; a DVD's MPEG-2 as
        # FFmpeg writes it here is bottom field first
        ("camcorder.mp4", "libx264", "mp4", {"x264-params": "interlaced=1:tff=1", "crf": "12"}, "top", (40, 80)),
        ("tape.mpg", "mpeg2video", "mpeg", {"flags": "+ilme+ildct", "b": "4M"}, "bottom", (200, 240)),
    ],
)
def test_an_interlaced_video_is_read_one_field_at_a_time(tmp_path, name, codec, fmt, options, field, bar):
    """An interlaced picture weaves two moments: shrunk whole, everything that moves would
    show twice at half strength. Prepare, the on-demand clip and data check keep the field
    shown first, so the bar shows once, whole, where that field has it."""
    from rigtrain.data.check import check_folder, format_report

    write_interlaced(tmp_path / name, codec, fmt, options)
    scale = 64 / 320  # pad: 320x240 (4:3) into 48x64 rows x columns
    for frames in (
        read_video(tmp_path / name, 5.0, (48, 64), "pad")[0][:4],
        read_video_clip(tmp_path / name, 0, 4, 5.0, (48, 64), "pad"),
    ):
        columns = frames[2, 8:40, :, 1].mean(axis=0)
        lit = np.flatnonzero(columns > 128)
        assert columns.max() > 200, columns.max()  # whole, not half of a woven pair
        assert lit.min() == pytest.approx(bar[0] * scale, abs=1) and lit.max() == pytest.approx(
            bar[1] * scale - 1, abs=1
        )
        assert frames.shape == (4, 48, 64, 3)  # the field's rows are twice as high: still 4:3
    report = check_folder(tmp_path, load_config("demo").data)
    assert report["videos"][0]["interlaced"] == f"{field} field first"
    assert f"interlaced ({field} field first): prepare keeps the {field} field" in format_report(report)


def test_a_progressive_video_keeps_every_row(tmp_path):
    """The same picture recorded progressive is one moment: both bars are real and kept
    (the rows of each are averaged with the black rows between them)."""
    from rigtrain.data.check import check_folder
    from rigtrain.data.container import field_order

    write_interlaced(tmp_path / "phone.mp4", "libx264", "mp4", {"crf": "12"})
    assert field_order(tmp_path / "phone.mp4") is None
    columns = read_video(tmp_path / "phone.mp4", 5.0, (48, 64), "pad")[0][2, 8:40, :, 1].mean(axis=0)
    assert 60 < columns[8:16].mean() < 200 and 60 < columns[40:48].mean() < 200
    assert check_folder(tmp_path, load_config("demo").data)["videos"][0]["interlaced"] is None


def test_a_dv_tape_says_it_is_interlaced_only_in_its_pictures(tmp_path):
    """A DV tape's .avi leaves the field order unset in the stream; its pictures carry the
    interlaced flag, and the top field is kept."""
    import av

    from rigtrain.data.check import check_folder, format_report
    from rigtrain.data.container import ORDER_UNSET, field_order

    with av.open(str(tmp_path / "tape.avi"), "w") as container:
        video = container.add_stream("dvvideo", rate=25)
        video.width, video.height, video.pix_fmt = 720, 576, "yuv420p"
        for packet in video.encode(av.VideoFrame.from_ndarray(np.zeros((576, 720, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    with av.open(str(tmp_path / "tape.avi")) as container:
        assert container.streams.video[0].codec_context.field_order == 0  # unknown: the case tested
    assert field_order(tmp_path / "tape.avi") == ORDER_UNSET
    report = format_report(check_folder(tmp_path, load_config("demo").data))
    assert "tape.avi: interlaced (field order unset): prepare keeps the top field" in report


def test_a_phone_video_recorded_upright_is_read_upright(tmp_path):
    """A phone stores a portrait video as landscape pictures plus a display rotation: every
    reader (prepare, the on-demand clip, data check's size) turns the picture as a player
    would, rather than training on clips lying on their side."""
    import av

    coded = np.zeros((48, 96, 3), np.uint8)
    coded[:, :48] = (200, 0, 0)  # the stored picture's left half is red
    src = tmp_path / "videos"
    src.mkdir()
    with av.open(str(src / "portrait.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise, as ffmpeg and the players read it
        for _ in range(20):
            for packet in stream.encode(av.VideoFrame.from_ndarray(coded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    upright = fit_frame(np.ascontiguousarray(np.rot90(coded)), 32, 32, "pad")  # red at the bottom
    frames, _ = read_video(src / "portrait.mp4", 10.0, (32, 32), "pad")
    assert len(frames) == 20
    assert np.abs(frames.astype(int) - upright).mean() < 4, frames[0, :, 16, 0]
    assert np.array_equal(read_video_clip(src / "portrait.mp4", 5, 4, 10.0, (32, 32), "pad"), frames[5:9])
    from rigtrain.data.check import check_folder

    entry = check_folder(src, load_config("demo").data)["videos"][0]
    assert (entry["width"], entry["height"]) == (48, 96)

    # pixels 4/3 as wide as high, stored 96x48 and turned: shown 48 wide and 128 high, so a
    # 32x32 letterbox holds a picture 12 wide
    with av.open(str(tmp_path / "anamorphic_portrait.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(4, 3)
        stream.set_display_rotation(90)
        for _ in range(10):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full_like(coded, 200), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames, _ = read_video(tmp_path / "anamorphic_portrait.mp4", 10.0, (32, 32), "pad")
    lit = np.flatnonzero(frames[0, 16, :, 0] > 100)
    assert lit.max() - lit.min() + 1 == 12 and (frames[0, :, 16, 0] > 100).all()


def test_clip_decoded_on_demand_equals_the_full_decode(shared_data):
    path = shared_data / "videos" / "bikes.mp4"
    full, _ = read_video(path, 8.0, (64, 64))
    clip = read_video_clip(path, 37, 8, 8.0, (64, 64))
    assert np.array_equal(clip, full[37:45])


def test_clips_read_on_demand_seek_one_open_capture(shared_data, tmp_path, monkeypatch):
    """The on-demand reader keeps a video open between its clips (a new capture pays for its
    first picture again: 1.1 s for a phone's HDR clip): clips in any order are the clips of
    the whole read, and the video is opened once (a read from the very start, a fresh one)."""
    from rigtrain.data import media

    path = tmp_path / "bikes.mp4"
    shutil.copy(shared_data / "videos" / "bikes.mp4", path)
    full, _ = read_video(path, 8.0, (64, 64))
    opened, open_video = [], media.open_video
    monkeypatch.setattr(media, "open_video", lambda p: opened.append(p) or open_video(p))
    for start in (37, 5, 60, 20, 0, 44):
        assert np.array_equal(read_video_clip(path, start, 8, 8.0, (64, 64)), full[start : start + 8]), start
    assert len(opened) == 2, opened  # the held capture, and a fresh one for the clip at 0


def test_prepare_a_users_folder(user_folder, tmp_path):
    config = load_config("demo", overrides=["data.shard_clips=7"])
    index = prepare(user_folder, tmp_path / "prep", config.data, workers=2)
    sources = {s["video"]: s for s in index["sources"]}
    skipped = {s["file"]: s["reason"] for s in index["skipped"]}
    assert set(sources) == {"bikes.mp4", "carphone.mp4", "tone.mp4", "wide.mp4"} | (
        {"truncated.mp4"} if "truncated.mp4" not in skipped else set()
    )
    assert sources["tone.mp4"]["audio"] == "container" and sources["bikes.mp4"]["audio"] is None
    assert sources["tone.mp4"]["narration"] == "tone.srt" and sources["tone.mp4"]["narration_segments"] == 2
    assert any(p.startswith("tone.srt line 6:") for p in sources["tone.mp4"]["problems"])
    assert any(p.startswith("wide.vtt line 9:") for p in sources["wide.mp4"]["problems"])
    assert sources["bikes.mp4"]["narration_segments"] > 10  # the real Whisper transcript
    # 5 s at 8 fps = 40 frames -> five 1-second clips; 4.004 s -> four, the 1-frame tail reported
    assert sources["wide.mp4"]["clips"] == 5 and sources["carphone.mp4"]["clips"] == 4
    assert sources["carphone.mp4"]["unused_tail_s"] == 0.125
    assert index["params"]["resize"] == "crop"
    # clips from the container's AAC track are marked as having sound; bikes has none
    clips = np.concatenate([np.load(tmp_path / "prep" / s["dir"] / "clips.npy") for s in index["shards"]])
    ids = {s["video"]: i for i, s in enumerate(index["sources"])}
    assert clips["has_audio"][clips["source"] == ids["tone.mp4"]].all()
    assert not clips["has_audio"][clips["source"] == ids["bikes.mp4"]].any()
    # parallel and serial prepares write the same shards
    serial = prepare(user_folder, tmp_path / "serial", config.data, workers=1)
    assert serial["shards"] == index["shards"]
    for shard in index["shards"]:
        for name in ("video", "audio", "text", "clips", "segments"):
            assert np.array_equal(
                np.load(tmp_path / "prep" / shard["dir"] / f"{name}.npy"),
                np.load(tmp_path / "serial" / shard["dir"] / f"{name}.npy"),
            )


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("shard-*/*.npy"))}


UNGUARDED_SCRIPT = """
import sys
from pathlib import Path
from rigtrain.config import load_config
from rigtrain.data.prepare import prepare
from rigtrain.errors import UserError
try:  # no `if __name__ == "__main__":` around it: each worker, importing this script, runs it too
    prepare(Path(sys.argv[1]), Path(sys.argv[2]), load_config("demo").data, workers=2)
except UserError as err:
    print(f"UserError: {err}")
"""


def test_a_worker_that_dies_is_one_sentence_that_says_what_to_do(tmp_path):
    """Workers start clean (a fork server, not a fork of a process holding threads), so they
    import the calling script: unguarded, each dies. That, or the kernel killing one for
    memory, is a sentence, not a BrokenProcessPool traceback."""
    src = tmp_path / "world"
    synthesize(src, videos=4, seed=3)
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(src), str(tmp_path / "prep")], capture_output=True, text=True, timeout=300
    )
    says = "UserError: data preparation worker processes die before they finish a single video, even one alone"
    assert says in result.stdout, result.stderr
    assert 'if __name__ == "__main__":' in result.stdout and "Traceback" not in result.stdout


@pytest.mark.parametrize("one_clip_parts", [False, True])
def test_interrupted_prepare_resumes_to_the_same_shards(tmp_path, monkeypatch, one_clip_parts):
    """Stopped between videos, or (a video's clips handed over a part at a time, as a long
    video's are) after a shard in the middle of one: the journal names what is written, and
    going on makes the same shards as a prepare never stopped."""
    from rigtrain.data import ingest
    from rigtrain.data.prepare import ShardWriter

    src = tmp_path / "world"
    synthesize(src, videos=6, seed=11)
    data = load_config("demo", overrides=["data.shard_clips=4"]).data  # 6 clips per video: sources span shards
    straight = prepare(src, tmp_path / "straight", data)
    if one_clip_parts:
        monkeypatch.setattr(ingest, "PART_BYTES", data.clip_frames * 32 * 32 * 3)

    class Stop(Exception):
        pass

    def stop_after(n):
        def progress(done, total, name, clips):
            if done == n:
                raise Stop

        return progress

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        if one_clip_parts:  # after the 5th shard: 20 clips, the third video's second
            write_shard = ShardWriter._write_shard

            def write_then_stop(writer):
                write_shard(writer)
                if len(writer.shards) == 5:
                    raise Stop

            monkeypatch.setattr(ShardWriter, "_write_shard", write_then_stop)
            prepare(src, out, data)
        else:
            prepare(src, out, data, progress=stop_after(3))
    monkeypatch.undo()
    state = json.loads((out / PREPARE_JOURNAL).read_text())
    assert not (out / "index.json").exists()  # an interrupted prepare never looks complete
    assert state["partial"] is not None  # it stopped inside a source that spans two shards
    if one_clip_parts:
        assert state["partial"] == {"video": "shapes_0003.mp4", "written": 2} and len(state["shards"]) == 5
        assert (out / ".parts").is_dir()  # parts on their way, removed when it goes on
    # a crash between renaming a shard and updating the journal, and a half-written shard
    shutil.copytree(out / state["shards"][0]["dir"], out / f"shard-{len(state['shards']):05d}")
    (out / ".shard-00099.tmp").mkdir()
    seen = []
    index = prepare(src, out, data, progress=lambda done, total, name, clips: seen.append(name))
    assert len(seen) == 6 - len(state["sources"]) + 1  # finished videos are not decoded again
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "straight")
    assert {k: v for k, v in index.items() if k != "seconds"} == {k: v for k, v in straight.items() if k != "seconds"}
    assert not (out / PREPARE_JOURNAL).exists() and not (out / ".shard-00099.tmp").exists()
    assert not (out / ".parts").exists()


def test_a_long_video_is_cut_in_bounded_memory(tmp_path, monkeypatch):
    """A worker holds one part of a video's clips at a time (an hour-long lecture at base's
    224x224 is 5 GiB of clips, and a prepare holds several videos at once), and the parts
    make the clips the whole decode makes, the last one aligned to the video's end."""
    import tracemalloc

    import av

    from rigtrain.data import ingest
    from rigtrain.data.sources import Source

    video = tmp_path / "lecture.mp4"
    with av.open(str(video), "w") as container:  # 121 s at 25 fps, every frame its own grey
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
        for i in range(25 * 121):
            picture = av.VideoFrame.from_ndarray(np.full((96, 96, 3), (7 * i) % 256, np.uint8), format="rgb24")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = load_config("demo", overrides=["data.frame_size=64,64", "data.fps=16", "data.clip_stride_s=0.75"]).data
    clip_bytes = data.clip_frames * 64 * 64 * 3
    monkeypatch.setattr(ingest, "PART_BYTES", 4 * clip_bytes)
    tracemalloc.start()
    result = ingest.ingest(Source(video), data, None, 0, tmp_path / "part")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = result.info["clips"]
    assert n == 162 and result.info["end_aligned_clip"] and len(result.parts) == 41  # 40 of 4 clips, and 2
    # a part, the frames the next clips need, a decoded frame or two: all clips at once were 3 times them
    assert peak < 4 * ingest.PART_BYTES + 2**21 < 0.25 * n * clip_bytes, (peak, n * clip_bytes)
    frames, _ = read_video(video, data.fps, (64, 64))
    starts = [12 * k for k in range(161)] + [len(frames) - data.clip_frames]  # every 0.75 s, and the end
    clips = np.concatenate([piece.video for piece in result.pieces()])
    assert np.array_equal(clips, np.stack([frames[s : s + data.clip_frames] for s in starts]))
    assert not list(tmp_path.glob("part-*"))  # each part removed once read


def test_clips_cut_as_frames_come_in_are_the_clips_of_the_whole(tmp_path, monkeypatch):
    """The streaming cut (clips handed over as their last frame arrives, a few frames kept
    for the next and for the clip aligned to the end) equals slicing the whole video at
    clip_starts, for overlapping, fractional and gapped strides, resumed from any clip, in
    parts of one clip or all of them. Frames stand in for a decoder: frame i is grey i."""
    from types import SimpleNamespace

    from rigtrain.data import ingest, media
    from rigtrain.data.sources import Source

    def cut(frames: int, T: int, stride: float, skip: int) -> np.ndarray:
        video = [np.full((1, 1, 3), i % 251, np.uint8) for i in range(frames)]
        monkeypatch.setattr(media, "output_frames_of", lambda *args: (info, (frame for frame in video)))
        parts = ingest._Parts(tmp_path / "part", (T, 1, 1, 3), skip)
        data = SimpleNamespace(clip_frames=T, stride_frames=stride, frame_size=(1, 1), resize="crop", fps=8.0)
        made, starts, _ = ingest._cut_clips(Source(tmp_path / "v.mp4"), data, parts)
        assert made == frames and starts == media.clip_starts(frames, T, stride)
        out = [np.load(path) for path, _ in parts.written]
        for path, _ in parts.written:
            path.unlink()
        return np.concatenate(out) if out else np.zeros((0, T, 1, 1, 3), np.uint8)

    info = media.VideoInfo(fps=25.0, frames=0, width=1, height=1)
    for frames, T, stride in itertools.product([1, 7, 8, 17, 41], [1, 8], [0.5, 2.5, 8, 8.5, 20]):
        starts = media.clip_starts(frames, T, stride)
        for skip, part_bytes in itertools.product({0, 1, len(starts) // 2}, (3 * T, 10**9)):
            monkeypatch.setattr(ingest, "PART_BYTES", part_bytes)
            whole = [np.stack([np.full((1, 1, 3), i % 251, np.uint8) for i in range(s, s + T)]) for s in starts]
            want = np.stack(whole[skip:]) if whole[skip:] else np.zeros((0, T, 1, 1, 3), np.uint8)
            assert np.array_equal(cut(frames, T, stride, skip), want), (frames, T, stride, skip, part_bytes)


def test_a_full_disk_during_prepare_is_one_line_and_it_goes_on_when_there_is_room(tmp_path, monkeypatch, capsys):
    """The disk fills while the third shard is written: one line naming it (no traceback),
    exit 1; with room again the same command finishes the same shards as a prepare that
    never stopped."""
    import errno

    from rigtrain.cli import main

    src = tmp_path / "world"
    synthesize(src, videos=4, seed=3)
    straight = tmp_path / "straight"
    prepare(src, straight, load_config("demo", overrides=["data.shard_clips=4"]).data)
    save = np.save

    def full_disk(path, array, *args, **kwargs):
        if ".shard-00002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", full_disk)
    command = ["data", "prepare", str(src), str(tmp_path / "out"), "--workers", "1", "--set", "data.shard_clips=4"]
    assert main(command) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rigtrain:")]
    assert len(said) == 1 and "disk is full writing" in said[0] and "goes on after its last complete shard" in said[0]
    monkeypatch.undo()
    assert main(command) == 0
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(straight)


def test_a_shard_is_written_piece_by_piece(tmp_path):
    """The writer puts a shard's pieces (a video's parts, several videos) into its files one
    after the other, the bytes np.save gives the joined arrays, without joining them in
    memory first (a shard of base clips is 1.2 GB, and it was held twice)."""
    import tracemalloc

    from rigtrain.data.ingest import SourceClips
    from rigtrain.data.prepare import ShardWriter
    from rigtrain.data.shards import CLIP_DTYPE

    rng = np.random.default_rng(0)

    def piece(n: int) -> SourceClips:
        return SourceClips(
            video=rng.integers(0, 255, (n, 8, 64, 64, 3), dtype=np.uint8),
            audio=rng.integers(-99, 99, (n, 800), dtype=np.int16),
            text=rng.integers(0, 255, (n, 16), dtype=np.uint8),
            text_len=np.full(n, 16, np.int32),
            clips=np.zeros(n, CLIP_DTYPE),
            segments=[(0, 0.0, 1.0, 0, 16)],
            labels=np.full((n, 3), -1, np.int16),
        )

    pieces = [piece(n) for n in (10, 7, 13, 2)]  # 32 clips, 3 MB of pictures
    writer = ShardWriter(tmp_path, 32, [], lambda *unwritten: None)
    for source, p in enumerate(pieces[:-1]):
        writer.add(source, p, 0)
    tracemalloc.start()
    writer.add(3, pieces[-1], 0)  # completes the shard
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.2 * sum(p.video.nbytes for p in pieces), peak
    joined = {key: np.concatenate([getattr(p, key) for p in pieces]) for key in SourceClips.ARRAYS}
    for key, array in joined.items():  # (the writer has set each piece's source id)
        np.save(tmp_path / "joined.npy", array)
        assert (tmp_path / "shard-00000" / f"{key}.npy").read_bytes() == (tmp_path / "joined.npy").read_bytes(), key


def _world_with_one_video_held_back(tmp_path: Path, videos: int, seed: int) -> tuple[Path, Path]:
    """A Shapes world whose last video (and its sidecars) waits in another folder, to be
    added after a first prepare: (the world, the folder it waits in)."""
    src, later = tmp_path / "world", tmp_path / "later"
    synthesize(src, videos=videos, seed=seed)
    later.mkdir()
    for p in src.glob(f"shapes_{videos - 1:04d}.*"):
        shutil.move(p, later / p.name)
    return src, later


def _bring_back(later: Path, src: Path) -> None:
    for p in later.iterdir():
        shutil.move(p, src / p.name)


def test_new_videos_are_added_to_a_prepared_folder(tmp_path):
    from rigtrain.data.dataset import ShardDataset

    src, later = _world_with_one_video_held_back(tmp_path, videos=4, seed=2)
    data = load_config("demo").data
    first = prepare(src, tmp_path / "prep", data)
    before = _shard_bytes(tmp_path / "prep")
    _bring_back(later, src)
    seen = []
    index = prepare(src, tmp_path / "prep", data, progress=lambda done, total, name, clips: seen.append(name))
    assert seen == ["shapes_0003.mp4"]
    assert index["clips"] == first["clips"] + 6 and len(index["shards"]) == 2
    after = _shard_bytes(tmp_path / "prep")
    assert all(after[k] == v for k, v in before.items())  # earlier shards are reused as they are
    assert len(ShardDataset(tmp_path / "prep", data)) == index["clips"]
    assert first["decoding"] == index["decoding"] == DECODING


def test_adding_to_a_folder_an_earlier_rigtrain_prepared_says_they_differ(tmp_path):
    """Before 2026-12-03 a stereo track came out 3 dB louder and a DVD's picture narrower:
    videos added to such a folder are decoded as today, and the prepare says so."""
    src, later = _world_with_one_video_held_back(tmp_path, videos=3, seed=4)
    data = load_config("demo").data
    prepare(src, tmp_path / "prep", data)
    old = json.loads((tmp_path / "prep" / "index.json").read_text())
    del old["decoding"]  # as an earlier rigtrain wrote it
    (tmp_path / "prep" / "index.json").write_text(json.dumps(old))
    _bring_back(later, src)
    said = []
    index = prepare(src, tmp_path / "prep", data, log=said.append)
    assert any("prepared by an earlier rigtrain" in line and "a new folder" in line for line in said), said
    assert index["decoding"] == 1 and len(index["sources"]) == 3  # the folder still holds earlier decodes


def test_videos_in_folders_under_the_one_named_are_found_by_their_path(tmp_path):
    """A camera's folders of a day each (two GX010001.MP4), sidecars beside their video, a
    hidden folder and a link back up left alone, and shards prepared inside the folder
    itself: every video is named by its path in the folder, the same by prepare, check,
    the on-demand reader and the held-out split, and the shards are not read as videos."""
    from rigtrain.data.check import check_folder
    from rigtrain.data.dataset import ShardDataset
    from rigtrain.data.ondemand import DecodedClips

    src = tmp_path / "camera"
    for folder in ("day1", "day2", ".thumbnails"):
        (src / folder).mkdir(parents=True)
        write_variable_rate_h264(src / folder / "GX010001.MP4", [100 * i for i in range(21)])
    write_variable_rate_h264(src / "top.mp4", [125 * i for i in range(17)])
    (src / "day1" / "GX010001.srt").write_text("1\n00:00:00,000 --> 00:00:01,500\nthe first day\n")
    (src / "day2" / "notes.txt").write_text("which lens")
    (src / "day2" / "back-up").symlink_to(src)  # followed, it would never end
    data = load_config("demo").data
    index = prepare(src, src / "prepared", data)
    names = ["day1/GX010001.MP4", "day2/GX010001.MP4", "top.mp4"]
    assert [s["video"] for s in index["sources"]] == names
    assert index["sources"][0]["narration"] == "day1/GX010001.srt" and index["sources"][1]["narration"] is None
    assert {s["file"]: s["reason"] for s in index["skipped"]} == {
        "day2/notes.txt": "not a video, audio or narration file"
    }
    report = check_folder(src, data)
    assert [v["file"] for v in report["videos"]] == names
    assert {u["file"]: u["reason"] for u in report["unused"]} == {
        "prepared/": "rigtrain's own output",
        "day2/notes.txt": "not a video, audio or narration file",
    }
    assert prepare(src, src / "prepared", data) == index  # nothing new: every name is known
    for i in range(50):  # the rest of a camera's card: a flood of other files is counted, not printed
        (src / "day2" / f"IMG_{i:04d}.JPG").write_bytes(b"")
    shown = run_cli("data", "check", str(src))
    assert shown.returncode == 0 and "52 note(s):" in shown.stdout, shown.stdout[-2000:]
    assert "  ... and 12 more: every one is in `data check --json`" in shown.stdout
    shards, decoded = ShardDataset(src / "prepared", data), DecodedClips.from_folder(src, data)
    assert (
        shards.clip_videos()
        == decoded.clip_videos()
        == DecodedClips.from_index(src / "prepared", index, data).clip_videos()
    )
    assert sorted(set(shards.clip_videos())) == names
    from rigtrain.train.launch import resolve_data

    shutil.rmtree(src / "prepared")
    (src / "top.mp4").unlink()  # only videos in folders under it: still a folder of videos to train on
    assert resolve_data(load_config("demo", overrides=[f"data.dir={src}"]), log=lambda line: None) == src.resolve()


def test_a_narration_file_that_does_not_read_gives_way_to_one_that_does(tmp_path):
    """A Whisper .json cut short beside a downloaded .srt: the .srt narrates the video (the
    .json came first by name, and the video went without narration), and the .json is
    listed with its reason. When none reads, the first is reported where it is used."""
    from rigtrain.data.check import check_folder

    src = tmp_path / "talks"
    src.mkdir()
    for name in ("talk", "lecture"):
        write_variable_rate_h264(src / f"{name}.mp4", [100 * i for i in range(21)])
        (src / f"{name}.json").write_text('[{"start": 0, "end": 1.5, "te')  # cut short
    (src / "talk.srt").write_text("1\n00:00:00,500 --> 00:00:01,800\nthe talk\n")
    (src / "talk.vtt").write_text("WEBVTT\n\n00:00.500 --> 00:01.800\nthe same talk\n")
    (src / "lecture.srt").write_bytes(b"\xe9t\xe9 not UTF-8")  # Latin-1
    data = load_config("demo").data
    index = prepare(src, tmp_path / "prep", data)
    assert {s["video"]: s["narration"] for s in index["sources"]} == {"lecture.mp4": None, "talk.mp4": "talk.srt"}
    reasons = {s["file"]: s["reason"] for s in index["skipped"]}
    assert reasons["talk.json"].startswith("not valid JSON") and reasons["talk.json"].endswith(
        "talk.srt is used instead"
    )
    assert reasons["talk.vtt"].startswith("talk.srt comes first")
    assert reasons["lecture.json"].endswith("lecture.mp4 is used without narration")
    assert reasons["lecture.srt"].startswith("not UTF-8") and "instead" not in reasons["lecture.srt"]
    checked = {v["file"]: v for v in check_folder(src, data)["videos"]}
    assert checked["talk.mp4"]["narration"]["file"] == "talk.srt" and checked["lecture.mp4"]["narration"] is None


def test_a_transcript_of_another_video_is_named_where_it_is_checked_and_prepared(tmp_path, shared_data):
    """A real Whisper transcript (25 minutes of a talk) beside a real 10-second video, as when
    a transcript is saved under the wrong name: `data check` and `data prepare` both say it
    runs past the video and how much of it is left out; the speech of the first 10 s still
    narrates the clips (a video cut short at its end keeps its transcript's start). A
    transcript whose last words end just after the picture, as Whisper's do, says nothing."""
    from rigtrain.data.check import check_folder, format_report

    src = tmp_path / "videos"
    src.mkdir()
    shutil.copy(shared_data / "videos" / "bikes.mp4", src / "bikes.mp4")
    shutil.copy(shared_data / "transcripts" / "vision_transformer.json", src / "bikes.json")
    write_variable_rate_h264(src / "talk.mp4", [100 * i for i in range(21)])  # 2.1 s
    (src / "talk.json").write_text(
        json.dumps([{"start": 0.2, "end": 1.5, "text": "a"}, {"start": 1.6, "end": 2.6, "text": "b"}])
    )
    data = load_config("demo").data
    said = "bikes.json runs to 1508.0 s but the video lasts 10.0 s (458 of 463 segments start after its end"
    report = check_folder(src, data)
    assert said in format_report(report), format_report(report)
    assert [v["narration"]["problems"] for v in report["videos"] if v["file"] == "talk.mp4"] == [[]]
    index = prepare(src, tmp_path / "prep", data)
    problems = {s["video"]: s["problems"] for s in index["sources"]}
    assert problems["talk.mp4"] == [] and len(problems["bikes.mp4"]) == 1 and said in problems["bikes.mp4"][0]
    bikes = next(s for s in index["sources"] if s["video"] == "bikes.mp4")
    assert bikes["narration"] == "bikes.json" and bikes["narration_segments"] == 463


def test_a_run_from_a_folder_of_videos_says_what_prepare_would(tmp_path, capsys, shared_data):
    """Training straight from videos (no prepare) names, once, in the run's log, what
    prepare would report: a video it leaves out (damaged, or shorter than a clip), a
    sidecar it skips, a transcript that runs past its video, a file it does not use (a
    transcript named unlike its video); not how a video is read (a variable frame rate).
    A folder with many of them gets ten lines, the last saying where the rest are."""
    from rigtrain.data.ondemand import MOST_NOTES_SAID, DecodedClips
    from rigtrain.train.launch import check_data

    src = tmp_path / "videos"
    src.mkdir()
    shutil.copy(shared_data / "videos" / "bikes.mp4", src / "bikes.mp4")
    shutil.copy(shared_data / "transcripts" / "vision_transformer.json", src / "bikes.json")
    (src / "broken.mp4").write_bytes((src / "bikes.mp4").read_bytes()[:100_000])  # a download cut short
    write_variable_rate_h264(src / "phone.mp4", [0, 100, 150, 300, 350, 500, 550, 700, 750, 900, 950, 1100])
    (src / "phone.wav").write_bytes(b"RIFF not a wav")
    write_variable_rate_h264(src / "short.mp4", [0, 100, 200, 300])
    (src / "short_transcript.srt").write_text("1\n00:00:00,000 --> 00:00:00,300\nhello\n")
    config = load_config("demo", overrides=["eval.holdout=0", "train.micro_batch_size=2"])
    clips, _ = check_data(src, config, 1, say=lambda line: print(f"[said] {line}"))
    said = [line[len("[said] ") :] for line in capsys.readouterr().out.splitlines() if line.startswith("[said]")]
    assert clips == 11 and len(said) == 5, said
    assert said[0].startswith("bikes.mp4: bikes.json runs to 1508.0 s but the video lasts 10.0 s")
    assert said[1].startswith("broken.mp4 left out: cannot be opened as a video"), said
    assert said[2].startswith("phone.mp4: phone.wav will be skipped: "), said
    assert said[3] == "short.mp4 left out: shorter than one clip (1.0 s)", said
    assert said[4] == "short_transcript.srt: not used: no video with this name", said
    assert not any("variable frame rate" in line for line in said)
    for k in range(10):
        (src / f"cut{k}.mp4").write_bytes(b"")
    lines = DecodedClips.from_folder(src, config.data).said_of_the_folder
    assert len(lines) == MOST_NOTES_SAID and lines[-1] == f"... and 6 more: `rigtrain data check {src}` lists every one"


def test_subtitles_named_with_a_language_as_yt_dlp_writes_them(tmp_path):
    """yt-dlp names subtitles NAME.LANG.vtt (`--write-subs`, `--write-auto-subs`): they narrate
    NAME.mp4; a sidecar named exactly like the video comes before them, and of several
    languages the first by name; its metadata (NAME.info.json) is no narration."""
    from rigtrain.data.sources import find_sources

    talk = "A talk [dQw4w9WgXcQ]"
    for name in (f"{talk}.mp4", f"{talk}.info.json", "lecture.mp4"):
        (tmp_path / name).write_bytes(b"")
    for name in (f"{talk}.en.vtt", f"{talk}.pt-BR.vtt", "lecture.en-orig.vtt"):
        (tmp_path / name).write_text("WEBVTT\n\n00:00.000 --> 00:01.000\nwords\n")
    (tmp_path / "lecture.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nmine\n")
    sources, unused = find_sources(tmp_path)
    assert {s.name: s.named(s.narration) for s in sources} == {
        f"{talk}.mp4": f"{talk}.en.vtt",
        "lecture.mp4": "lecture.srt",
    }
    reasons = {u["file"]: u["reason"] for u in unused}
    assert reasons[f"{talk}.pt-BR.vtt"].startswith(f"{talk}.en.vtt comes first")
    assert reasons["lecture.en-orig.vtt"].startswith("lecture.srt comes first")
    assert reasons[f"{talk}.info.json"] == "no video with this name"


def test_data_check_predicts_what_prepare_makes(user_folder, tmp_path):
    from rigtrain.data.check import check_folder

    data = load_config("demo").data
    before = sorted(p.name for p in user_folder.iterdir())
    report = check_folder(user_folder, data)
    assert sorted(p.name for p in user_folder.iterdir()) == before  # nothing written
    index = prepare(user_folder, tmp_path / "prep", data)
    checked = {v["file"]: v for v in report["videos"]}
    for source in index["sources"]:
        entry = checked[source["video"]]
        assert entry["clips"] == source["clips"], source["video"]
        assert (entry["audio"] or {}).get("from") == source["audio"]
        assert (entry["narration"] or {}).get("file") == source["narration"]
        assert (entry["narration"] or {}).get("segments", 0) == source["narration_segments"]
    for skipped in index["skipped"]:
        if skipped["file"].endswith(".mp4"):
            assert not checked[skipped["file"]]["ok"] and checked[skipped["file"]]["reason"] == skipped["reason"]
    assert report["summary"]["clips"] == index["clips"]
    written = sum(f.stat().st_size for f in (tmp_path / "prep").glob("shard-*/*.npy"))
    assert abs(report["summary"]["shard_bytes"] - written) < 0.02 * written + 4096 * len(index["shards"])
    assert checked["bikes.mp4"]["fps"] == 25 and (checked["bikes.mp4"]["width"], checked["bikes.mp4"]["height"]) == (
        640,
        272,
    )
    assert checked["tone.mp4"]["audio"]["codec"] == "aac"


def test_data_check_command(user_folder):
    result = run_cli("data", "check", str(user_folder), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is one JSON document and nothing else
    assert report["summary"]["videos"] == 5
    text = run_cli("data", "check", str(user_folder))
    assert "tone.srt line 6:" in text.stdout and "truncated.mp4: cannot be used" in text.stdout
    bad = run_cli("data", "check", str(user_folder / "nothing-here"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_decoded_clips_match_the_shards(user_folder, tmp_path):
    """On-the-fly decoding (the baseline of data bench) reads the same clips as prepare."""
    from rigtrain.data.dataset import ShardDataset
    from rigtrain.data.ondemand import DecodedClips

    data = load_config("demo").data
    index = prepare(user_folder, tmp_path / "prep", data)
    shards = ShardDataset(tmp_path / "prep", data)
    decoded = DecodedClips.from_index(tmp_path / "prep", index, data)
    assert len(decoded) == len(shards)
    for i in range(len(shards)):
        a, b = shards[i], decoded[i]
        assert np.array_equal(a["video"].numpy(), b["video"].numpy()), i
        assert a["has_audio"] == b["has_audio"] and a["text_len"] == b["text_len"], i
        assert np.array_equal(a["text"].numpy(), b["text"].numpy()), i
        if a["has_audio"]:  # the window is resampled on its own: equal but for a few edge samples
            diff = np.abs(a["audio"].numpy().astype(np.int32) - b["audio"].numpy())
            assert np.median(diff) <= 2 and np.mean(diff[200:-200] > 300) < 0.01, i


def test_loader_threads_give_the_same_batches_in_the_same_order(tmp_path):
    from rigtrain.data.dataset import ShardDataset, make_loader

    src = tmp_path / "world"
    synthesize(src, videos=4, seed=5)
    data = load_config("demo").data
    prepare(src, tmp_path / "prep", data)
    dataset = ShardDataset(tmp_path / "prep", data)

    def first_batches(workers, start_batch=0, n=5):
        loader = make_loader(
            dataset,
            data,
            rank=0,
            world=1,
            micro_batch=4,
            seed=9,
            start_batch=start_batch,
            workers=workers,
            pin_memory=False,
        )
        batches = iter(loader)
        out = [next(batches) for _ in range(n)]
        loader.close()
        return out

    serial, threaded = first_batches(0), first_batches(3)
    for a, b in zip(serial, threaded):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(first_batches(3, start_batch=2, n=1)[0]["index"], serial[2]["index"])  # resumable
    clip = dataset[int(serial[0]["index"][1])]
    assert torch.equal(clip["video"], serial[0]["video"][1]) and clip["video"].dtype == torch.uint8


def test_data_bench_command(tmp_path):
    src = tmp_path / "world"
    synthesize(src, videos=4, seed=1)
    assert run_cli("data", "prepare", str(src), str(tmp_path / "prep")).returncode == 0
    result = run_cli(
        "data",
        "bench",
        str(tmp_path / "prep"),
        "--json",
        "--seconds",
        "0.5",
        "--decode-clips",
        "8",
        "--batch",
        "4",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("shards_clips_per_s", "decode_clips_per_s", "ratio", "workers"):
        assert report[key] > 0, key
    assert report["ratio"] == pytest.approx(report["shards_clips_per_s"] / report["decode_clips_per_s"], rel=0.01)
    assert report["measured"]["decode"]["clips"] == 8
    step = report["step"]  # the demo preset matches these shards: its step is estimated from its FLOPs
    assert step["preset"] == "demo" and step["gpu"] == "NVIDIA GeForce RTX 3090" and step["peak_tflops"] == 71.0
    assert report["step_clips_per_s"] == pytest.approx(71e12 * 0.4 / (step["gflops_per_clip"] * 1e9), rel=0.01)
    shutil.rmtree(src)  # without the source videos there is nothing to compare with
    gone = run_cli("data", "bench", str(tmp_path / "prep"))
    assert gone.returncode == 2 and "is gone" in gone.stderr


def test_flop_count_matches_the_analytic_count_of_a_linear_stack():
    """FlopCounterMode counts 2 FLOPs per multiply-add, forward and backward (3x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 8 * 64 * 32


def test_an_unreadable_sidecar_is_named_once_and_the_video_kept(tmp_path, shared_data):
    from rigtrain.data.check import check_folder

    shutil.copy(shared_data / "videos" / "carphone_pristine.mp4", tmp_path / "carphone.mp4")
    (tmp_path / "carphone.wav").write_bytes((shared_data / "videos" / "bikes.mp4").read_bytes()[:3000])
    entry = check_folder(tmp_path, load_config("demo").data)["videos"][0]
    assert entry["ok"] and not entry["audio"]
    (note,) = [n for n in entry["notes"] if "carphone.wav" in n]
    # libsndfile's "Error opening 'PATH': Format not recognised." without the path again
    assert note.endswith("carphone.wav will be skipped: unreadable audio: Format not recognised"), note


@pytest.mark.parametrize(
    "name, muxer, codec, pixels",
    [
        ("iphone_hdr.mov", "mov", "libx265", "yuv420p10le"),  # a phone's 10-bit HEVC
        ("browser.webm", "webm", "libvpx-vp9", "yuv420p"),
        ("screen.mkv", "matroska", "libsvtav1", "yuv420p"),  # AV1
        ("edit.mov", "mov", "prores_ks", "yuv422p10le"),  # an editor's export
    ],
)
def test_modern_codecs_decode_to_the_right_frames(tmp_path, name, muxer, codec, pixels):
    """What phones, browsers and editors write now decodes through the OpenCV wheel we ship:
    every output frame is the source frame of its instant (the grey level says which), and a
    clip read on demand is the same clip."""
    import av

    path = tmp_path / name
    with av.open(str(path), "w", format=muxer) as container:
        video = container.add_stream(codec, rate=25)
        video.width, video.height, video.pix_fmt = 128, 96, pixels
        for i in range(100):  # 4 s; frame i has grey level 2i
            picture = av.VideoFrame.from_ndarray(np.full((96, 128, 3), 2 * i, np.uint8), format="rgb24")
            for packet in video.encode(picture.reformat(format=pixels)):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    frames, _ = read_video(path, 8.0, (32, 32))
    assert len(frames) == 32
    shown = [2 * (k * 25 // 8) for k in range(32)]  # output frame k at k/8 s shows source frame floor(k*25/8)
    np.testing.assert_allclose(frames.reshape(32, -1).mean(axis=1), shown, atol=2.0)
    for start in (0, 9, 24):
        np.testing.assert_array_equal(read_video_clip(path, start, 8, 8.0, (32, 32)), frames[start : start + 8])


def _sdr_level_of_hdr_signal(signal: np.ndarray, transfer: str) -> np.ndarray:
    """BT.2100's display light for an HDR signal in [0, 1] (HLG on a 1000 cd/m2 screen, system
    gamma 1.2; PQ absolute), with reference white (203 cd/m2, BT.2408) at SDR's full scale,
    encoded for an SDR screen (BT.1886, gamma 2.4): 8-bit levels. Greys only, so no gamut
    mapping enters."""
    if transfer == "HLG":
        a, b, c = 0.17883277, 0.28466892, 0.55991073
        scene = np.where(signal <= 0.5, signal**2 / 3, (np.exp((signal - c) / a) + b) / 12)
        nits = 1000 * scene**1.2
    else:
        m1, m2, c1, c2, c3 = 0.1593017578125, 78.84375, 0.8359375, 18.8515625, 18.6875
        p = signal ** (1 / m2)
        nits = 10000 * (np.maximum(p - c1, 0) / (c2 - c3 * p)) ** (1 / m1)
    return 255 * np.clip(nits / 203, 0, 1) ** (1 / 2.4)


@pytest.mark.parametrize("transfer, trc", [("HLG", 18), ("PQ", 16)])
def test_an_hdr_phone_video_is_read_as_an_sdr_screen_shows_it(tmp_path, transfer, trc):
    """A phone records HDR by default (10-bit HEVC, BT.2020, HLG); its code values read as
    if they were SDR look flat and washed out, and PQ's look dark. Every reader gives the
    frames as a screen without HDR shows them (the OpenCV wheel's FFmpeg converts by the
    stream's colour tags), and data check says the video is HDR."""
    import av

    from rigtrain.data.check import check_folder, format_report

    signal = np.arange(16) / 16  # a grey ramp of HDR signal levels, one 8-column bar each
    ramp = np.repeat(np.round(signal * 65535).astype(np.uint16), 8)
    picture = np.repeat(np.repeat(ramp[None, :, None], 32, axis=0), 3, axis=2)
    path = tmp_path / f"phone_{transfer}.mov"
    with av.open(str(path), "w", format="mov") as container:
        video = container.add_stream("libx265", rate=10, options={"x265-params": "log-level=error:lossless=1"})
        video.width, video.height, video.pix_fmt = 128, 32, "yuv444p10le"
        tags = video.codec_context
        tags.colorspace, tags.color_primaries, tags.color_trc, tags.color_range = 9, 9, trc, 1
        for _ in range(20):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb48le").reformat(
                format="yuv444p10le", dst_colorspace="BT2020"
            )
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    frames, _ = read_video(path, 10.0, (32, 128), "pad")
    bars = frames[10, 16, 4::8].astype(float)  # the middle of each bar, every channel alike
    expected = _sdr_level_of_hdr_signal(signal, transfer)
    np.testing.assert_allclose(bars, np.repeat(expected[:, None], 3, axis=1), atol=3.0)
    # read as SDR the mid-grey bar would be 128: HLG's is 144 on an SDR screen, PQ's 185
    assert abs(bars[8, 1] - 128) > 12
    np.testing.assert_array_equal(read_video_clip(path, 5, 4, 10.0, (32, 128), "pad"), frames[5:9])
    report = check_folder(tmp_path, load_config("demo").data)
    assert report["videos"][0]["hdr"] == transfer
    assert f"HDR ({transfer}): read as a screen without HDR shows it" in format_report(report)


@pytest.mark.parametrize(
    "name, muxer, codec, layout",
    [
        ("camera.mov", "mov", "pcm_s16le", "stereo"),  # integer PCM: came back on demand as 23,000, not 0.7
        ("film.mkv", "matroska", "ac3", "5.1"),  # FFmpeg's downmix added six channels to 1.7: clipped
        ("master.mkv", "matroska", "flac", "stereo"),
        ("phone.mp4", "mp4", "aac", "stereo"),
    ],
)
def test_a_track_is_as_loud_prepared_on_demand_and_as_a_sidecar(tmp_path, name, muxer, codec, layout):
    """Every channel carries a tone at 0.5: the mono sound is their mean, 0.5, whether the
    track is read whole (prepare), a window on demand, or the same samples come from a WAV
    sidecar; whatever the codec's sample format."""
    import av
    import soundfile as sf

    from rigtrain.data.sound import read_audio_file

    rate, seconds = 48000, 2.0
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    with av.open(str(tmp_path / name), "w", format=muxer) as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        sound = container.add_stream(codec, rate=rate, layout=layout)
        for i in range(int(25 * seconds)):
            picture = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            picture.pts, picture.time_base = i, Fraction(1, 25)
            for packet in video.encode(picture):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        fmt, n = sound.codec_context.format, sound.codec_context.frame_size or 1024
        channels = sound.codec_context.layout.nb_channels
        scale = {"s16": 32767, "s32": 2**31 - 1}.get(fmt.name.removesuffix("p"))
        for k in range(0, len(tone) - n + 1, n):
            block = np.repeat(tone[k : k + n, None], channels, axis=1)
            block = (block * scale).astype(np.int16 if scale == 32767 else np.int32) if scale else block
            array = block.T.copy() if fmt.is_planar else block.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(array, format=fmt.name, layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, k, Fraction(1, rate)
            for packet in sound.encode(frame):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    whole = read_container_audio(tmp_path / name, 16000)
    window = read_audio_window(tmp_path / name, None, 1.0, 0.5, 16000)
    sf.write(tmp_path / "sidecar.wav", np.repeat(tone[:, None], 2, axis=1), rate, subtype="FLOAT")
    sidecar = read_audio_file(tmp_path / "sidecar.wav", 16000)
    for sound_read in (whole[8000:24000], window, sidecar[8000:24000]):
        assert np.abs(sound_read).max() == pytest.approx(0.5, abs=0.03)


def write_sound(path: Path, sound: np.ndarray, rate: int) -> None:
    """A sidecar as a recorder or a phone writes it: libsndfile's formats with soundfile,
    AAC (.m4a, raw .aac) with PyAV."""
    import av
    import soundfile as sf

    if path.suffix not in (".m4a", ".aac"):
        sf.write(path, sound, rate, **({"subtype": "OPUS", "format": "OGG"} if path.suffix == ".opus" else {}))
        return
    with av.open(str(path), "w", format="ipod" if path.suffix == ".m4a" else "adts") as container:
        track = container.add_stream("aac", rate=rate, layout="mono")
        for k in range(0, len(sound), 1024):
            block = np.pad(sound[k : k + 1024], (0, max(0, k + 1024 - len(sound))))
            frame = av.AudioFrame.from_ndarray(block[None].astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, k, Fraction(1, rate)
            for packet in track.encode(frame):
                container.mux(packet)
        for packet in track.encode():
            container.mux(packet)


@pytest.mark.parametrize("suffix", [".mp3", ".opus", ".aiff", ".m4a", ".aac"])
def test_a_sidecar_from_a_phone_or_a_recorder_is_the_videos_sound(tmp_path, suffix):
    """A screen recording's voice taken on a phone (.m4a), a recorder's MP3 or AAC, a Mac's
    AIFF, an Opus export: the silent video's sound, in step with it (a tone from 1.0 s),
    read whole for prepare and a window on demand alike, and named by data check."""
    from rigtrain.data.check import check_folder
    from rigtrain.data.sound import read_audio_file

    rate = 48000
    t = np.arange(3 * rate) / rate
    write_h264_with_aac(tmp_path / "talk.mp4", audio=False)
    write_sound(tmp_path / f"talk{suffix}", (0.5 * np.sin(2 * np.pi * 440 * t) * (t >= 1.0)).astype(np.float32), rate)

    def onset_s(sound):  # where the tone's loudness over 10 ms first passes half of it
        loudness = np.sqrt(np.convolve(sound**2, np.ones(160) / 160, "same"))
        return np.argmax(loudness > 0.5 * 0.354) / 16000

    whole = read_audio_file(tmp_path / f"talk{suffix}", 16000)
    assert len(whole) / 16000 == pytest.approx(3.0, abs=0.06)
    # raw ADTS has no record of the encoder's 1024 samples of delay: 21 ms late, as in players
    assert onset_s(whole) == pytest.approx(1.0, abs=0.025 if suffix == ".aac" else 0.005)
    window = read_audio_window(tmp_path / "talk.mp4", tmp_path / f"talk{suffix}", 0.5, 1.0, 16000)
    np.testing.assert_allclose(window, whole[8000:24000], atol=0.02)
    report = check_folder(tmp_path, load_config("demo").data)
    assert report["videos"][0]["audio"]["from"] == f"talk{suffix}"
    assert report["videos"][0]["audio"]["duration_s"] == pytest.approx(3.0, abs=0.06)
    if suffix == ".m4a":  # and prepare takes it
        index = prepare(tmp_path, tmp_path / "prep", load_config("demo").data)
        assert index["sources"][0]["audio"] == "talk.m4a" and not index["skipped"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-8-sig", "utf-8", "cp1252"])
def test_a_subtitle_in_unicode_from_a_windows_tool_is_read(tmp_path, encoding):
    """Windows tools save "Unicode" SRT as UTF-16 with a BOM: read. A BOM-less legacy code
    page is not guessed (the same bytes are other letters in another one): it is named."""
    srt = (
        "1\r\n00:00:00,000 --> 00:00:02,000\r\nCafé crème, déjà vu\r\n\r\n"
        "2\r\n00:00:02,000 --> 00:00:04,000\r\nNaïve façade\r\n"
    )
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    (tmp_path / "talk.srt").write_bytes(bom + srt.encode(encoding))
    if encoding == "cp1252":
        with pytest.raises(MediaError, match="not UTF-8 text .*; save it as UTF-8"):
            read_narration(tmp_path / "talk.srt")
        return
    narration = read_narration(tmp_path / "talk.srt")
    assert [s.text for s in narration.segments] == ["Café crème, déjà vu", "Naïve façade"]
    assert narration.problems == []
    if encoding.startswith("utf-16"):  # cut short by a byte: named as what its BOM claims
        (tmp_path / "talk.srt").write_bytes((bom + srt.encode(encoding))[:-1])
        with pytest.raises(MediaError, match="not UTF-16 text, as its byte-order mark says"):
            read_narration(tmp_path / "talk.srt")


_DJI_SETTINGS = (
    "[iso: 100] [shutter: 1/1000.0] [fnum: 1.7] [ev: 0] [ct: 5600] [focal_len: 24.00] "
    "[latitude: 46.81234] [longitude: 8.22711] [rel_alt: 1.300 abs_alt: 1204.512] </font>"
)
DJI_MINI_SRT = "".join(  # as a DJI Mini or Air writes it, one cue a frame
    f"{k}\n00:00:00,{33 * (k - 1):03d} --> 00:00:00,{33 * k:03d}\n"
    f'<font size="28">FrameCnt: {k}, DiffTime: 33ms\n2024-05-04 11:02:13.{512 + 33 * k}\n{_DJI_SETTINGS}\n\n'
    for k in range(1, 4)
)

DJI_PHANTOM_SRT = """1
00:00:01,000 --> 00:00:02,000
HOME(149.0251,-20.2532) 2017.08.05 14:11:51
GPS(149.0251,-20.2533,16) BAROMETER:1.9
ISO:100 Shutter:60 EV:0 Fnum:F2.2
"""


@pytest.mark.parametrize("telemetry", [DJI_MINI_SRT, DJI_PHANTOM_SRT], ids=["mini", "phantom"])
def test_a_drones_flight_log_beside_its_video_is_not_narration(tmp_path, telemetry):
    """DJI drones write DJI_0001.SRT beside DJI_0001.MP4 with GPS, ISO and shutter for every
    frame: named for what it is and left out, the video used without narration; a real
    subtitle that mentions GPS once is still narration."""
    from rigtrain.data.check import check_folder

    write_variable_rate_h264(tmp_path / "DJI_0001.MP4", [100 * i for i in range(21)])
    (tmp_path / "DJI_0001.SRT").write_text(telemetry)
    entry = check_folder(tmp_path, load_config("demo").data)["videos"][0]
    assert entry["ok"] and entry["narration"] is None
    assert any("DJI_0001.SRT will be skipped: a drone's flight log" in note for note in entry["notes"]), entry["notes"]
    (tmp_path / "talk.srt").write_text(
        "1\n00:00:00,500 --> 00:00:01,800\nturn the GPS (on the left) on\n\n"
        "2\n00:00:02,000 --> 00:00:03,000\nthen take off\n"
    )
    assert len(read_narration(tmp_path / "talk.srt").segments) == 2


SUBTITLE_CUES = [(0.5, 2.0, "hello there"), (2.5, 4.0, "a red bike goes by")]
ASS_HEADER = (
    "[Script Info]\nScriptType: v4.00+\n\n[V4+ Styles]\nFormat: Name, Fontname, Fontsize, PrimaryColour, "
    "SecondaryColour, OutlineColour, BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, "
    "Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding\n"
    "Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0\n\n"
)


def _ass_time(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds // 60 % 60):02d}:{seconds % 60:05.2f}"


def write_video_with_subtitles(path: Path, kind: str, cues=SUBTITLE_CUES, seconds: int = 5) -> None:
    """A video with a text subtitle track of `cues`, as yt-dlp --embed-subs or a media library
    writes them: SubRip or ASS in Matroska, WebVTT in WebM, mov_text in MP4. PyAV cannot
    encode subtitles, so the SubRip, ASS and WebVTT packets come from a sidecar read as a
    container, and mov_text's (a length and the text) are written by hand."""
    import struct

    import av

    sidecar = None
    if kind in ("srt", "ass", "vtt"):
        sidecar = path.with_name(f"cues-{path.stem}.{kind}")
        if kind == "ass":
            events = "".join(
                f"Dialogue: 0,{_ass_time(a)},{_ass_time(b)},Default,,0,0,0,,{{\\i1}}{t}{{\\i0}}\n" for a, b, t in cues
            )
            events = events.replace("hello there", "hello\\Nthere")
            sidecar.write_text(ASS_HEADER + "[Events]\nFormat: Layer, Start, End, Style, Name, MarginL, MarginR, "
                               "MarginV, Effect, Text\n" + events)  # fmt: skip
        else:
            stamp = (lambda s: _srt_stamp(s)) if kind == "srt" else (lambda s: _srt_stamp(s).replace(",", "."))
            body = "".join(f"{i + 1}\n{stamp(a)} --> {stamp(b)}\n{t}\n\n" for i, (a, b, t) in enumerate(cues))
            sidecar.write_text(("WEBVTT\n\n" if kind == "vtt" else "") + body)
    muxer = {"srt": "matroska", "ass": "matroska", "vtt": "webm", "mov_text": "mp4"}[kind]
    with av.open(str(path), "w", format=muxer) as container:
        video = container.add_stream("libvpx-vp9" if muxer == "webm" else "libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        if sidecar is not None:
            source = av.open(str(sidecar))
            track = container.add_stream_from_template(source.streams.subtitles[0])
        else:
            track = container.add_stream("mov_text")
            track.codec_context.subtitle_header = ASS_HEADER.encode()
        for i in range(10 * seconds):
            picture = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
            for packet in video.encode(picture):
                container.mux(packet)
        if sidecar is not None:
            for packet in source.demux(source.streams.subtitles[0]):
                if packet.size:
                    packet.stream = track
                    container.mux(packet)
            source.close()
            sidecar.unlink()
        else:
            for a, b, text in cues:
                packet = av.Packet(struct.pack(">H", len(text.encode())) + text.encode())
                packet.stream, packet.time_base = track, Fraction(1, 1000)
                packet.pts = packet.dts = round(a * 1000)
                packet.duration = round((b - a) * 1000)
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)


def _srt_stamp(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


@pytest.mark.parametrize(
    "name, kind",
    [("talk.mkv", "srt"), ("anime.mkv", "ass"), ("lecture.webm", "vtt"), ("download.mp4", "mov_text")],
)
def test_a_videos_own_subtitle_track_narrates_it(tmp_path, name, kind):
    """yt-dlp's --embed-subs and media libraries put the subtitles inside the video: with no
    sidecar beside it, the track is the narration, in data check, prepare and the on-demand
    reader alike, with ASS styling ({\\i1}) dropped and its line breaks read as spaces."""
    from rigtrain.data.check import check_folder, format_report
    from rigtrain.data.dataset import ShardDataset
    from rigtrain.data.ondemand import DecodedClips

    src = tmp_path / "videos"
    src.mkdir()
    write_video_with_subtitles(src / name, kind)
    data = load_config("demo").data
    report = check_folder(src, data)
    entry = report["videos"][0]
    assert entry["narration"]["from"] == "container" and entry["narration"]["segments"] == 2, entry
    assert "subtitle track (" in entry["narration"]["file"]
    assert f"{entry['narration']['file']} (2 segments)" in format_report(report)
    index = prepare(src, tmp_path / "prep", data)
    (source,) = index["sources"]
    assert source["narration"] == "container" and source["narration_segments"] == 2
    shards = ShardDataset(tmp_path / "prep", data)
    texts = [bytes(shards[i]["text"][: int(shards[i]["text_len"])].numpy()).decode() for i in range(len(shards))]
    assert texts == ["hello there", "hello there", "a red bike goes by", "a red bike goes by", ""], texts
    for decoded in (DecodedClips.from_index(tmp_path / "prep", index, data), DecodedClips.from_folder(src, data)):
        assert decoded.narrations(range(len(decoded))) == texts


def test_a_sidecar_wins_over_the_track_and_a_drones_telemetry_track_is_left_out(tmp_path):
    """The user's own narration file beside the video is taken over the track inside it; a
    DJI drone writes its flight log into the MP4 as a subtitle track too, and that is no
    narration."""
    from rigtrain.data.check import check_folder

    src = tmp_path / "videos"
    src.mkdir()
    write_video_with_subtitles(src / "talk.mkv", "srt")
    (src / "talk.srt").write_text("1\n00:00:00,000 --> 00:00:04,000\nmy own words\n")
    telemetry = [
        (k * 0.5, k * 0.5 + 0.5, f"F/2.8, SS 1000, ISO 100, EV 0, GPS (8.1, 47.3, 19) , D {k}m, H 3.2m")
        for k in range(8)
    ]
    write_video_with_subtitles(src / "DJI_0042.MP4", "mov_text", cues=telemetry)
    data = load_config("demo").data
    videos = {v["file"]: v for v in check_folder(src, data)["videos"]}
    assert videos["talk.mkv"]["narration"]["file"] == "talk.srt"
    assert videos["DJI_0042.MP4"]["narration"] is None
    assert any(
        n.startswith("its subtitle track will be skipped: a drone's flight log")
        for n in videos["DJI_0042.MP4"]["notes"]
    )
    index = prepare(src, tmp_path / "prep", data)
    sources = {s["video"]: s for s in index["sources"]}
    assert sources["talk.mkv"]["narration"] == "talk.srt" and sources["DJI_0042.MP4"]["narration"] is None
    (skip,) = sources["DJI_0042.MP4"]["skipped"]
    assert skip["file"] == "DJI_0042.MP4 subtitle track" and skip["reason"].endswith("is used without narration")


def test_a_clip_that_cannot_be_decoded_mid_run_gives_way_to_the_next(tmp_path, capsys, monkeypatch):
    """Training straight from a folder, a clip can fail at its read long after data check
    passed the file: a damaged stretch in the middle, a sound track that breaks, a video
    deleted or a drive unplugged. The clip is replaced by the first clip of the next video
    that decodes (a missing sound is left out of that clip instead), the file named once;
    when the folder itself is gone, the run stops with one line, not a traceback."""
    from rigtrain.data import media, ondemand, sound
    from rigtrain.data.ondemand import DecodedClips
    from rigtrain.errors import UserError

    src = tmp_path / "videos"
    src.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        write_h264_with_aac(src / name, seconds=3.0, size=(64, 64))
    data = load_config("demo").data
    decoded = DecodedClips.from_folder(src, data)
    first = {name: next(i for i, ref in enumerate(decoded.clips) if ref.name == name) for name in ("b.mp4", "c.mp4")}
    whole = decoded[first["b.mp4"]]

    (src / "a.mp4").unlink()  # gone while the run reads it
    for i in range(first["b.mp4"]):
        assert int(decoded[i]["index"]) == first["b.mp4"]  # the first clip of the next video
    torch.testing.assert_close(decoded[0]["video"], whole["video"])
    warned = capsys.readouterr().err
    assert warned.count("a.mp4: the clip at") == 1 and "the next video that decodes takes the place" in warned

    read_clip = media.read_video_clip

    def damaged_after_its_first_second(path, start_frame, *args):
        if path.name == "b.mp4" and start_frame > 0:
            raise MediaError(f"only 0 of 8 frames from frame {start_frame} could be decoded")
        return read_clip(path, start_frame, *args)

    monkeypatch.setattr(media, "read_video_clip", damaged_after_its_first_second)
    assert int(decoded[first["b.mp4"] + 1]["index"]) == first["c.mp4"]  # not b's next clip, damaged too
    assert "b.mp4: the clip at 1.0 s cannot be decoded (only 0 of 8 frames" in capsys.readouterr().err

    def broken_sound(*args):
        raise MediaError("audio track cannot be decoded: Invalid data found when processing input")

    monkeypatch.setattr(sound, "read_audio_window", broken_sound)
    clip = decoded[first["c.mp4"] + 1]
    assert int(clip["index"]) == first["c.mp4"] + 1 and not clip["has_audio"] and int(clip["audio"].abs().max()) == 0
    assert "c.mp4: sound left out where it cannot be decoded" in capsys.readouterr().err

    for name in ("b.mp4", "c.mp4"):
        (src / name).unlink()  # the whole folder gone: the drive unplugged
    # (first clips: they are read from a new capture, where the loader's open ones would
    # still read a deleted file, as an unplugged drive's would not)
    with pytest.raises(UserError, match=r"^data: 3 video\(s\) in a row cannot be decoded, the last .*check that "):
        decoded[first["c.mp4"]]
    monkeypatch.setattr(ondemand, "MOST_FAILED_IN_A_ROW", 2)
    with pytest.raises(UserError, match=r"^data: 2 video\(s\) in a row cannot be decoded"):
        decoded[first["b.mp4"]]


@pytest.mark.parametrize("rate", [1, 2**31 - 1])
def test_a_damaged_sample_rate_is_a_reason_not_a_crash(rate):
    """A damaged header's rate: 1 Hz would have come out 16,000 times longer at 16 kHz, and
    FFmpeg cannot allocate for 2**31 - 1 Hz ("Cannot allocate memory"); each is one reason."""
    from rigtrain.data.sound import resample_audio

    with pytest.raises(MediaError, match=f"^(a sample rate of {rate} Hz|sound at {rate} Hz)"):
        resample_audio(np.zeros(1024, np.float32), rate, 16000)


def test_damaged_frames_and_streams_are_passed_over_not_read():
    """What damaged files hand PyAV: an AAC frame whose header claims 23 channels over
    fewer planes (to_ndarray reads past them and the process dies: a segfault in a prepare
    worker), and streams with no decoder (no codec context). The frame is silence for its
    length, without touching its data; the streams are not chosen."""
    from types import SimpleNamespace as Fake

    from rigtrain.data.narration import text_subtitle_stream
    from rigtrain.data.sound import frame_samples, sound_track

    def untouchable():
        raise AssertionError("a damaged frame's data was read")

    damaged = Fake(
        samples=1024,
        layout=Fake(channels=[0] * 23),
        planes=[0] * 29,
        format=Fake(is_planar=True, name="fltp"),
        to_ndarray=untouchable,
    )
    assert frame_samples(damaged).shape == (1024, 1) and not frame_samples(damaged).any()
    assert frame_samples(Fake(**{**vars(damaged), "samples": 0})).shape == (0, 1)
    no_decoder = Fake(codec_context=None, index=1)
    aac = Fake(codec_context=Fake(name="aac"), index=2)
    container = Fake(streams=Fake(audio=[no_decoder, aac], subtitles=[no_decoder], best=lambda kind: no_decoder))
    assert sound_track(container) is aac
    assert text_subtitle_stream(container) is None
    assert sound_track(Fake(streams=Fake(audio=[no_decoder], best=lambda kind: no_decoder))) is None


def test_damaged_copies_of_every_kind_of_file_cost_only_themselves(tmp_path):
    """Fuzzing: copies of the kinds of files a folder holds (H.264 + AAC, MKV with subtitles
    or two sound tracks, interlaced MPEG-2, AAC and ASS sidecars) with bytes flipped, cut short
    or zeroed. data check, prepare and the on-demand reader give each a reason or use what
    decodes; nothing raises but a one-line UserError. (Fuzzing found five ways to a
    traceback or a segfault, fixed; bench-sized runs of it: docs/data.md.)"""
    import random

    from rigtrain.data.check import check_folder, format_report
    from rigtrain.data.ondemand import DecodedClips
    from rigtrain.errors import UserError

    good = tmp_path / "good"
    good.mkdir()
    write_h264_with_aac(good / "talk.mp4", seconds=3.0, size=(64, 48))
    write_video_with_subtitles(good / "film.mkv", "ass", seconds=3)
    write_film(good / "two.mkv")
    write_interlaced(good / "tape.mpg", "mpeg2video", "mpeg", {"flags": "+ilme+ildct"}, frames=50)
    t = np.arange(3 * 48000) / 48000
    write_sound(good / "voice.m4a", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 48000)
    (good / "subs.ass").write_text(ASS_SUBTITLES)
    # bench/fuzz_inputs.py runs this with other seeds
    rng, src = random.Random(int(os.environ.get("RIGTRAIN_FUZZ_SEED", "20261203"))), tmp_path / "damaged"
    src.mkdir()
    originals = sorted(p for p in good.iterdir() if p.suffix in (".mp4", ".mkv", ".mpg"))
    for i in range(18):
        data = bytearray(rng.choice(originals).read_bytes())
        kind = ("flip", "cut", "zero")[i % 3]
        if kind == "flip":
            for _ in range(rng.randint(1, 40)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "cut":
            data = data[: rng.randrange(len(data))]
        else:
            at = rng.randrange(len(data))
            data[at : at + 2048] = bytes(len(data[at : at + 2048]))
        name = f"v{i:02d}_{kind}{originals[i % len(originals)].suffix}"
        (src / name).write_bytes(bytes(data))
        if i % 4 == 0:  # a damaged sidecar beside it
            side = bytearray((good / ("voice.m4a" if i % 8 == 0 else "subs.ass")).read_bytes())
            for _ in range(20):
                side[rng.randrange(len(side))] = rng.randrange(256)
            (src / f"{Path(name).stem}{'.m4a' if i % 8 == 0 else '.ass'}").write_bytes(bytes(side))
    data = load_config("demo").data
    report = check_folder(src, data)
    format_report(report).encode("utf-8")
    assert all(v["ok"] or v["reason"] for v in report["videos"])
    try:  # in a worker process: a decoder crash costs its file, not the test
        index = prepare(src, tmp_path / "prep", data, workers=1, isolate=True)
        assert index["clips"] > 0
    except UserError as err:
        assert "\n" not in str(err)
    decoded = DecodedClips.from_folder(src, data)
    for i in range(len(decoded)):
        try:
            assert decoded[i]["video"].shape == (data.clip_frames, *data.frame_size, 3)
        except UserError as err:
            assert "\n" not in str(err)


def test_a_held_out_clip_is_stood_in_for_by_a_held_out_one(tmp_path):
    """In an evaluation, a held-out clip that fails is replaced from another held-out video,
    never by a clip the run trains on (and a training clip by a training one); only where
    its side has no other video does the other side stand in."""
    from rigtrain.data.ondemand import DecodedClips

    src = tmp_path / "videos"
    src.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        write_h264_with_aac(src / name, seconds=2.0, size=(64, 48))
    decoded = DecodedClips.from_folder(src, load_config("demo").data)
    first = {name: decoded.clip_videos().index(name) for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4")}
    decoded.keep_apart(["a.mp4", "c.mp4"])  # held out: a and c; trained on: b and d
    (src / "a.mp4").unlink()
    assert int(decoded[first["a.mp4"]]["index"]) == first["c.mp4"]  # not b, the next video
    (src / "b.mp4").unlink()
    assert int(decoded[first["b.mp4"]]["index"]) == first["d.mp4"]  # not c
    (src / "d.mp4").unlink()
    assert int(decoded[first["d.mp4"]]["index"]) == first["c.mp4"]  # no training video left: the other side
