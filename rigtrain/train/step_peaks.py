"""Measured step peaks by (model, clip shape, micro-batch, checkpointing, precision), and
parameter counts and FLOPs per clip, remembered so that the same shape is measured once.

Each step measurement runs a whole training step under FakeTensorMode: 2 s for the demo on
a 2-core CPU, 5-10 s for `base` at a large micro-batch, and planning one run takes several
of them. The same shapes are planned again and again (the back-off loop, `rigtrain rig`
then train, every resume and every run of a preset), so a measurement is looked up, in
order, in:

1. this process;
2. the table shipped with rigtrain (measured_step_peaks.json beside this file): what the
   presets and the project's own rig files and tests plan, measured ahead by
   `python bench/step_peaks.py`. A fresh install plans `base` on a 24 GB card at once;
3. the user's cache, RIGTRAIN_CACHE/step-peaks, one small file per measurement.

Every key starts with a fingerprint of what a step's memory depends on besides its config
(torch's version and our code that builds and measures the step), so an edit to the model
or a different torch measures again: the shipped table then simply no longer applies.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import xxhash

from rigtrain.config import DataConfig, ModelConfig
from rigtrain.files import write_json

SHIPPED = Path(__file__).with_name("measured_step_peaks.json")
_MEASURED: dict[str, int] = {}


# DataConfig fields that do not change a step's tensors
DATA_FIELDS_OFF_THE_STEP = (
    "dir",
    "workers",
    "prefetch_factor",
    "shard_clips",
    "synth_videos",
    "synth_seed",
    "clip_stride_s",
    "resize",
)


def step_shapes(model: ModelConfig, data: DataConfig) -> str:
    """The model and clip shape as far as a step's tensors depend on them: a key's config part."""
    data = dataclasses.replace(data, **{k: getattr(DataConfig(), k) for k in DATA_FIELDS_OFF_THE_STEP})
    return f"{model!r} {data!r}"


@functools.cache
def code_fingerprint() -> str:
    """torch's version and the source of the code that builds and measures a step."""
    from rigtrain.rig.probe import torch_build  # torch's version without importing it (2-3 s)

    digest = xxhash.xxh3_64(torch_build()["version"].encode())
    package = Path(__file__).resolve().parents[1]
    measuring = ["rig/step_memory.py", "train/measured_step.py", "train/flops.py"]
    for path in sorted([*(package / "model").glob("*.py"), *(package / name for name in measuring)]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key_digest(key: str) -> str:
    """The shipped table's name for a key (the keys themselves are a few KB of config text)."""
    return xxhash.xxh3_128_hexdigest(key.encode())


@functools.cache
def shipped_table() -> dict[str, int]:
    """The shipped measurements, when they were measured with this code and this torch."""
    try:
        record = json.loads(SHIPPED.read_text())
        if record.get("fingerprint") != code_fingerprint():
            return {}
        return {digest: int(value) for digest, value in record["peaks"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or unreadable: everything is measured, as without a table


def _cache_path(key: str) -> Path:
    from rigtrain.data.embedded import cache_root  # the cache folder the datasets use

    return cache_root() / "step-peaks" / f"{xxhash.xxh3_64_hexdigest(key.encode())}.json"


def _stored(key: str) -> int | None:
    path = _cache_path(key)
    try:
        record = json.loads(path.read_text())
        return int(record["value"]) if record.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # not measured yet, or unreadable: measure again


def _store(key: str, value: int) -> None:
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "value": value}, indent=None)  # whole, for a process reading it at once
    except OSError:
        pass  # a cache that cannot be written costs the next run a measurement, nothing more


def measured(key: str, measure: Callable[[], int]) -> int:
    """measure()'s value for this key: from this process, the shipped table, the user's
    cache, or measured now (and then kept in the cache)."""
    key = f"{code_fingerprint()} {key}"
    if key not in _MEASURED:
        value = shipped_table().get(key_digest(key))
        if value is None:
            value = _stored(key)
        if value is None:
            value = measure()
            _store(key, value)
        _MEASURED[key] = value
    return _MEASURED[key]


def cached_entries(cache: Path) -> dict[str, int]:
    """Every measurement in a cache folder made with this code: {key digest: value}, for
    bench/step_peaks.py to ship."""
    prefix = code_fingerprint() + " "
    entries = {}
    for path in sorted((cache / "step-peaks").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            if str(record["key"]).startswith(prefix):
                entries[key_digest(record["key"])] = int(record["value"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return entries
