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
