"""Shapes world, the embedded dataset (docs/model.md). Each video holds a few events; an event is
a coloured shape moving in one direction over a noisy background, a tone whose pitch names
the shape and whose glide follows the motion, and a narration segment that says it.

It writes real files through the path users take (.mp4 via OpenCV, .wav via soundfile,
Whisper-style .json), so the embedded default also tests ingestion. Labels go to
labels.json for evaluation only; training never reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}  # RGB
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PITCH_HZ = {"circle": 330.0, "square": 440.0, "triangle": 587.0, "cross": 784.0}
# How the pitch glides over an event: horizontal motion bends it a little, vertical a lot,
# so direction is audible too.
GLIDE = {"left": 0.8, "right": 1.25, "up": 1.6, "down": 0.6}

FRAME_SIZE = 64
FPS = 16
SAMPLE_RATE = 16000
EVENT_SECONDS = 2.0
EVENTS_PER_VIDEO = 3


def _draw(frame: np.ndarray, shape: str, colour: tuple[int, int, int], cx: float, cy: float, r: float) -> None:
    import cv2  # OpenCV: only where frames are decoded or written

    c, center = tuple(int(v) for v in colour), (int(round(cx)), int(round(cy)))
    ir = int(round(r))
    if shape == "circle":
        cv2.circle(frame, center, ir, c, thickness=-1, lineType=cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(frame, (center[0] - ir, center[1] - ir), (center[0] + ir, center[1] + ir), c, thickness=-1)
    elif shape == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]]).round().astype(np.int32)
        cv2.fillPoly(frame, [pts], c, lineType=cv2.LINE_AA)
    else:  # cross
        t = max(2, ir // 2)
        cv2.rectangle(
            frame, (center[0] - ir, center[1] - t // 2), (center[0] + ir, center[1] + t // 2), c, thickness=-1
        )
        cv2.rectangle(
            frame, (center[0] - t // 2, center[1] - ir), (center[0] + t // 2, center[1] + ir), c, thickness=-1
        )


def _background(rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture that stays for the whole event. Per-pixel noise alone would
    be unpredictable by construction, and per-patch normalised targets (norm_pix) would
    magnify it to the whole loss; a persistent texture is something a model can predict."""
    import cv2  # OpenCV: only where frames are decoded or written

    coarse = rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32)
    texture = cv2.resize(coarse, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_CUBIC)
    # +-15 levels: enough texture that a clip's background is its own, little enough that
    # the shape (not the background) is what differs most between clips at 32x32.
    return rng.integers(70, 130, size=3) + 15.0 * texture


def _event_audio(rng: np.random.Generator, shape: str, direction: str, seconds: float) -> np.ndarray:
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    freq = PITCH_HZ[shape] * GLIDE[direction] ** (t / seconds)  # exponential glide
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    envelope = np.minimum(1.0, np.minimum(t, seconds - t) / 0.05)  # 50 ms fades: no clicks
    return 0.5 * envelope * np.sin(phase) + 0.02 * rng.standard_normal(n)


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    import cv2  # OpenCV: only where frames are decoded or written

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (FRAME_SIZE, FRAME_SIZE))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write mp4v video: is opencv-python-headless installed with FFmpeg?")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def synthesize(out_dir: str | Path, *, videos: int = 48, seed: int = 0, progress=None) -> Path:
    """Write `videos` Shapes-world videos with their sound, narration and labels.json.
    Every 8th video has no sound and every 8th (another) no narration, so that training
    meets missing modalities the way user data has them. Deterministic for a seed."""
    import soundfile as sf  # only where audio files are read or written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels: dict[str, list[dict]] = {}
    frames_per_event = int(EVENT_SECONDS * FPS)
    for v in range(videos):
        name = f"shapes_{v:04d}"
        frames, audio, segments, events = [], [], [], []
        for e in range(EVENTS_PER_VIDEO):
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
            dx, dy = DIRECTIONS[direction]
            r = rng.uniform(11, 15)  # a radius of 5-7 pixels at the demo's 32x32, so the shape is legible
            travel = FRAME_SIZE - 2 * r - 8  # the shape crosses most of the frame in an event
            along = rng.uniform(r + 4, FRAME_SIZE - r - 4)  # position across the motion
            background = _background(rng)
            for k in range(frames_per_event):
                s = r + 4 + travel * k / (frames_per_event - 1)
                pos = s if (dx > 0 or dy > 0) else FRAME_SIZE - s
                cx, cy = (pos, along) if dx else (along, pos)
                frame = np.clip(background + rng.normal(0, 4, background.shape), 0, 255).astype(np.uint8)
                _draw(frame, shape, COLOURS[colour], cx, cy, r)
                frames.append(frame)
            audio.append(_event_audio(rng, shape, direction, EVENT_SECONDS))
            start, end = e * EVENT_SECONDS, (e + 1) * EVENT_SECONDS
            segments.append({"id": e, "start": start, "end": end, "text": f" a {colour} {shape} moves {direction}"})
            events.append({"start": start, "end": end, "shape": shape, "colour": colour, "direction": direction})
        _write_video(out / f"{name}.mp4", frames)
        if v % 8 != 7:
            sf.write(str(out / f"{name}.wav"), np.concatenate(audio).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        if v % 8 != 6:
            text = "".join(s["text"] for s in segments).strip()
            (out / f"{name}.json").write_text(
                json.dumps({"text": text, "segments": segments, "language": "en"}, indent=1)
            )
        labels[name] = events
        if progress:
            progress(v + 1, videos)
    (out / "labels.json").write_text(
        json.dumps(
            {"shapes": SHAPES, "colours": list(COLOURS), "directions": list(DIRECTIONS), "videos": labels}, indent=1
        )
    )
    return out
