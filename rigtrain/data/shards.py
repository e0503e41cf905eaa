"""The shard format: what `data prepare` writes, the training dataset reads, and the on-demand
decoder imitates. One module that all of them import, so the writer and the readers cannot
disagree, and none of them imports another for the format.

    OUT_DIR/index.json            format, sources, skipped files and why, the preparation
                                  parameters, the shards and their clip counts, label names
    OUT_DIR/shard-00000/video.npy     uint8 (N, T, H, W, 3)
                        audio.npy     int16 (N, S) mono PCM at data.sample_rate
                        text.npy      uint8 (N, max_text_bytes) narration overlapping the clip
                        text_len.npy  int32 (N,)
                        clips.npy     CLIP_DTYPE per clip: source, start_s, has_audio, has_text
                        segments.npy  SEGMENT_DTYPE per narration segment: clip, start_s, end_s,
                                      offset, length (its bytes within the clip's text row)
                        labels.npy    int16 (N, 3) LABEL_KEYS (Shapes world only)
"""

from __future__ import annotations

import fcntl
import json
import shlex
from pathlib import Path

import numpy as np

from rigtrain.config import DataConfig

INDEX_FORMAT = 1
CLIP_DTYPE = np.dtype([("source", np.int32), ("start_s", np.float64), ("has_audio", np.bool_), ("has_text", np.bool_)])
SEGMENT_DTYPE = np.dtype(
    [("clip", np.int32), ("start_s", np.float64), ("end_s", np.float64), ("offset", np.int32), ("length", np.int32)]
)
LABEL_KEYS = ("shape", "colour", "direction")
ARRAYS = ("video", "audio", "text", "text_len", "clips", "labels")  # one .npy per shard each (and segments.npy)
# Read per clip into each batch (with pread: nothing stays memory-mapped, so a file that
# shrinks under a running job is a short read and a sentence, not SIGBUS), and small arrays
# loaded whole when the dataset opens.
PER_CLIP = ("video", "audio", "text")
WHOLE = ("text_len", "clips", "labels")

# What shards prepared before a parameter existed were made with.
LEGACY_PARAMS = {"recurrent_windows": 1, "window_step_frames": 0}
# A prepare in progress (or stopped) keeps its journal beside the shards, and holds the lock
# while it writes; index.json appears only when it has finished (data/prepare.py).
PREPARE_JOURNAL = ".prepare-state.json"
PREPARE_LOCK = ".prepare.lock"
PREPARE_LOG = "prepare.log"  # what each `rigtrain data prepare` into the folder said (cli_data.py)


def unfinished_prepare(data_dir: Path) -> str | None:
    """Why data_dir, which has no index.json, cannot be trained on yet, where it is a
    prepare's output: one writing into it now, or one stopped before it finished (the same
    command again finishes it). None where it is not."""
    if not (data_dir / PREPARE_JOURNAL).is_file():
        return None
    try:
        source = json.loads((data_dir / PREPARE_JOURNAL).read_text())["source_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        source = "SRC_DIR"
    try:
        with open(data_dir / PREPARE_LOCK, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only a prepare holds it: not one now
    except BlockingIOError:
        return f"a `rigtrain data prepare` is writing into {data_dir} now; train on it once it has finished"
    except OSError:
        pass  # no lock file: no prepare has it
    return (
        f"{data_dir} is a `rigtrain data prepare` that was stopped before it finished; run it again to "
        f"finish it: rigtrain data prepare {shlex.join([source, str(data_dir)])} (with the same --preset and --set)"
    )


def clip_bytes(data: DataConfig) -> int:
    """What one clip takes in shards: its frames, its sound, its text and its row of the
    small arrays (within a few bytes)."""
    h, w = data.frame_size
    return data.clip_frames * h * w * 3 + data.clip_samples * 2 + data.max_text_bytes + 40


def preparation_params(data: DataConfig) -> dict:
    """What a shard depends on; training refuses shards made with other values."""
    return {
        "fps": data.fps,
        "frame_size": list(data.frame_size),
        "present_frames": data.present_frames,
        "future_frames": data.future_frames,
        "sample_rate": data.sample_rate,
        "clip_stride_s": data.stride_seconds,
        "max_text_bytes": data.max_text_bytes,
        "resize": data.resize,
        "recurrent_windows": data.recurrent_windows,
        "window_step_frames": data.window_step if data.recurrent_windows > 1 else 0,
    }


# index.json's parameters and the JSON types the readers rely on (the values themselves
# are compared with the config's by the dataset)
_PARAM_KINDS = {
    "fps": (int, float),
    "frame_size": list,
    "present_frames": int,
    "future_frames": int,
    "sample_rate": int,
    "clip_stride_s": (int, float),
    "max_text_bytes": int,
    "resize": str,
    "recurrent_windows": int,
    "window_step_frames": int,
}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def index_problem(index) -> str | None:
    """What is out of shape in an index.json that `data prepare` wrote and something (a disk,
    an editor) changed since, or None: checked once when shards are opened, so every reader
    after that can trust the fields it reads."""
    if not isinstance(index, dict):
        return "it is not the JSON object `rigtrain data prepare` writes"
    params = index.get("params")
    if not isinstance(params, dict):
        return "its params are missing"
    for key, kinds in _PARAM_KINDS.items():
        value = params.get(key, LEGACY_PARAMS.get(key))
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"params.{key} is missing or of the wrong kind"
    if not (isinstance(params["frame_size"], list) and len(params["frame_size"]) == 2):
        return "params.frame_size is not [height, width]"
    shards, sources = index.get("shards"), index.get("sources")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("dir"), str)
        and s["dir"].startswith("shard-")
        and "/" not in s["dir"]
        and _whole(s.get("clips"))
        for s in shards
    ):
        return "its list of shards is out of shape (each is {dir: shard-NNNNN, clips: N})"
    if not isinstance(sources, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("video"), str)
        and all(isinstance(s.get(k), (str, type(None))) for k in ("audio", "narration"))
        for s in sources
    ):
        return "its list of source videos is out of shape"
    if not isinstance(index.get("source_dir"), str):
        return "its source_dir is missing"
    labels = index.get("labels")
    if labels is not None and not (
        isinstance(labels, dict)
        and set(labels) == set(LABEL_KEYS)
        and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in labels.values())
    ):
        return "its label names are out of shape"
    return None


def shard_values_problem(arrays: dict, index: dict, text_bytes: int) -> str | None:
    """What in a shard's small arrays points outside the shard (a source video that is not in
    the index, narration longer than its row, a segment outside its clip's text), or None.
    The arrays have no checksums; these are the values that index others."""
    try:
        source = arrays["clips"]["source"]
    except (ValueError, KeyError, IndexError):
        return "clips.npy does not hold clip records"
    if source.size and (source.min() < 0 or source.max() >= len(index["sources"])):
        return "clips.npy names a source video index.json does not list"
    text_len = arrays["text_len"]
    if text_len.size and (text_len.min() < 0 or text_len.max() > text_bytes):
        return f"text_len.npy has a length outside 0..{text_bytes}"
    labels, names = arrays["labels"], index.get("labels")
    if names and labels.size:  # -1 is "none"; anything else names a class of index.json
        counts = np.array([len(names[key]) for key in LABEL_KEYS])
        if labels.ndim != 2 or labels.shape[1] != len(LABEL_KEYS) or (labels < -1).any() or (labels >= counts).any():
            return "labels.npy has a label index.json does not name"
    return None


def segments_problem(segments: np.ndarray, clips: int, text_bytes: int) -> str | None:
    """A narration segment row that points outside the shard's clips or its clip's text."""
    try:
        clip, offset, length = segments["clip"], segments["offset"], segments["length"]
    except (ValueError, KeyError, IndexError):
        return "segments.npy does not hold narration segments"
    if segments.ndim != 1:
        return "segments.npy does not hold narration segments"
    bad = (clip < 0) | (clip >= clips) | (offset < 0) | (length < 0) | (offset.astype(np.int64) + length > text_bytes)
    if bad.any():
        return f"segments.npy row {int(np.argmax(bad))} points outside its clip or its text"
    return None
