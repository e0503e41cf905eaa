"""Shards vs on-the-fly decoding, and the loader vs what a GPU's train step consumes
(issue 3's targets), measured in one run on this machine.

    python bench/data_loader.py [--videos 8] [--seconds 10] [--workers N] [--out DIR]

Makes 720p H.264 + AAC videos from ../shared/data/videos/bikes.mp4 (real footage,
centre-cropped to 16:9 and scaled up; a synthetic pattern when ../shared is absent),
prepares them at the `small` preset (16 frames of 112x112, 16 kHz), runs
`rigtrain data bench`, and prints a table and one JSON line. Targets:
  ratio          >= 20   shards vs decoding the same clips, same workers
  loader_vs_step >= 3    loader clips/s vs the small model's step on an RTX 3090 (FLOPs at 40% of 71 TFLOPS)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "videos" / "bikes.mp4"


def source_frames(count: int, size=(1280, 720)) -> list[np.ndarray]:
    import cv2

    frames = []
    if SOURCE.is_file():
        cap = cv2.VideoCapture(str(SOURCE))
        while len(frames) < count:
            ok, frame = cap.read()
            if not ok:
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)  # loop the clip
                continue
            h, w = frame.shape[:2]
            crop_w = round(h * 16 / 9)
            x0 = (w - crop_w) // 2
            frames.append(
                cv2.cvtColor(
                    cv2.resize(frame[:, x0 : x0 + crop_w], size, interpolation=cv2.INTER_CUBIC), cv2.COLOR_BGR2RGB
                )
            )
        cap.release()
    else:
        y, x = np.mgrid[: size[1], : size[0]]
        frames = [
            np.stack([(x + 3 * i) % 256, (y + 2 * i) % 256, (x + y + i) % 256], -1).astype(np.uint8)
            for i in range(count)
        ]
    return frames


def write_720p(path: Path, frames: list[np.ndarray], fps: int = 30, seed: int = 0) -> None:
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        video.width, video.height, video.pix_fmt = 1280, 720, "yuv420p"
        audio = container.add_stream("aac", rate=48000, layout="stereo")
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        samples = round(len(frames) / fps * 48000)
        wave = (0.1 * rng.standard_normal((2, samples))).astype(np.float32)
        for k in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[:, k : k + 1024]), format="fltp", layout="stereo"
            )
            chunk.sample_rate, chunk.pts, chunk.time_base = 48000, k, Fraction(1, 48000)
            for packet in audio.encode(chunk):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)


def rigtrain(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rigtrain", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"rigtrain {' '.join(args)} failed:\n{result.stderr}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each video")
    parser.add_argument("--workers", type=int, help="loader workers (default: rigtrain's choice for this machine)")
    parser.add_argument("--out", type=Path, help="keep the videos and shards here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="rigtrain-bench-"))
    src, shards = work / "videos", work / "shards"
    src.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    frames = source_frames(round(args.seconds * 30) * args.videos)
    per_video = round(args.seconds * 30)
    for v in range(args.videos):
        write_720p(src / f"clip_{v:02d}.mp4", frames[v * per_video : (v + 1) * per_video], seed=v)
    made_s = time.perf_counter() - started

    started = time.perf_counter()
    rigtrain("data", "prepare", str(src), str(shards), "--preset", "small")
    prepare_s = time.perf_counter() - started
    bench_args = ["data", "bench", str(shards), "--json"] + (
        ["--workers", str(args.workers)] if args.workers is not None else []
    )
    result = json.loads(rigtrain(*bench_args).stdout)

    step = result["step"]
    rows = [
        ("source videos", f"{args.videos} x {args.seconds:g} s, 1280x720 H.264 + AAC ({made_s:.0f} s to make)"),
        ("prepare (small preset)", f"{prepare_s:.1f} s"),
        ("shards: clips/s (MB/s)", f"{result['shards_clips_per_s']:.0f} ({result['shards_mb_per_s']:.0f})"),
        ("decode: clips/s (MB/s)", f"{result['decode_clips_per_s']:.2f} ({result['decode_mb_per_s']:.2f})"),
        ("ratio (target >= 20)", f"{result['ratio']:g}x  {'PASS' if result['ratio'] >= 20 else 'FAIL'}"),
        (
            "step consumes, clips/s",
            f"{step['clips_per_s']:.0f}  ({step['gflops_per_clip']:g} GFLOP/clip, "
            f"{step['gpu']}, 40% of {step['peak_tflops']:g} TFLOPS)",
        ),
        (
            "loader / step (target >= 3)",
            f"{result['loader_vs_step']:g}x  {'PASS' if result['loader_vs_step'] >= 3 else 'FAIL'}",
        ),
        ("workers, batch", f"{result['workers']}, {result['batch']}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    summary = {
        k: result[k]
        for k in (
            "shards_clips_per_s",
            "decode_clips_per_s",
            "ratio",
            "workers",
            "batch",
            "shards_mb_per_s",
            "step_clips_per_s",
            "loader_vs_step",
        )
    }
    summary.update(prepare_s=round(prepare_s, 1), videos=args.videos, video_seconds=args.seconds)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
