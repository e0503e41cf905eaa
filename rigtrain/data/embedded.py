"""The embedded default dataset: Shapes world, generated once into a cache and prepared
through the same `data prepare` path as user videos."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

from rigtrain.config import DataConfig
from rigtrain.data.prepare import prepare
from rigtrain.data.shards import preparation_params
from rigtrain.data.synth import synthesize
from rigtrain.errors import UserError

SYNTH_VERSION = 3  # bump when the generator changes what it draws


def cache_root() -> Path:
    return Path(os.environ.get("RIGTRAIN_CACHE") or Path.home() / ".cache" / "rigtrain")


def embedded_dataset(data: DataConfig, log=print) -> Path:
    """Prepared shards of Shapes world for this clip shape; built on first use. Both steps
    write to a temporary folder and rename it, so a crash never leaves half a dataset, and
    a lock makes a second process that wants the same dataset (two runs started at once)
    wait for the first one's build instead of building it again beside it."""
    raw = cache_root() / f"shapes-world-v{SYNTH_VERSION}-n{data.synth_videos}-seed{data.synth_seed}"
    key = hashlib.sha1(json.dumps(preparation_params(data), sort_keys=True).encode()).hexdigest()[:10]
    prepared = raw.with_name(raw.name + f"-prepared-{key}")
    if (prepared / "index.json").is_file() and _damage(prepared, data) is None:
        return prepared

    prepared.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(prepared) + ".lock"):
        return _build(raw, prepared, data, log)


def _damage(prepared: Path, data: DataConfig) -> str | None:
    """What is wrong with the cached shards (the checks training makes when it opens them),
    or None."""
    from rigtrain.data.dataset import ShardDataset  # torch: only once a dataset is wanted

    try:
        ShardDataset(prepared, data)
    except UserError as err:
        return str(err)
    return None


def _build(raw: Path, prepared: Path, data: DataConfig, log) -> Path:
    if (prepared / "index.json").is_file():  # built by the process that held the lock before us
        problem = _damage(prepared, data)
        if problem is None:
            return prepared
        # The cache is rigtrain's own, made from nothing the user gave: built again, not a
        # "prepare it again" the user never ran. The videos go too (a damaged one would be
        # skipped, and the dataset would quietly be smaller); both are deterministic.
        log(f"the cached Shapes-world dataset is damaged ({problem.split('; ')[0]}); building it again")
        _remove(prepared)
        _remove(raw)
    if not (raw / "labels.json").is_file():
        log(f"generating the Shapes-world dataset ({data.synth_videos} videos) into {raw}")
        tmp = raw.with_name(raw.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        synthesize(tmp, videos=data.synth_videos, seed=data.synth_seed)
        _publish(tmp, raw)
    log(f"preparing it into shards at {prepared}")
    tmp = prepared.with_name(prepared.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    prepare(raw, tmp, data, workers=1)
    _publish(tmp, prepared)
    return prepared


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:  # another process published it first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Out of the way by a rename first (atomic: a process that looks meanwhile finds no
    index.json and waits on the lock), then deleted."""
    if folder.exists():
        gone = folder.with_name(folder.name + f".damaged{os.getpid()}")
        os.rename(folder, gone)
        shutil.rmtree(gone, ignore_errors=True)
