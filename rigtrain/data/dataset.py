"""Reading prepared shards for training: a Dataset that checks the shard files and reads
clips from them, and the loader around it and the resumable sampler (data/order.py)."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset

from rigtrain.config import DataConfig
from rigtrain.data.order import ResumableSampler
from rigtrain.data.shards import (
    INDEX_FORMAT,
    LEGACY_PARAMS,
    PER_CLIP,
    WHOLE,
    index_problem,
    preparation_params,
    segments_problem,
    shard_values_problem,
    unfinished_prepare,
)
from rigtrain.errors import DataGone, UserError


def read_index(data_dir: Path) -> dict:
    path = Path(data_dir) / "index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"--data {data_dir}: "
            + (
                unfinished_prepare(Path(data_dir))
                or f"no index.json; prepare videos first with `rigtrain data prepare SRC_DIR {data_dir}`"
            )
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt ({err}); prepare the data again") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        got = index.get("format") if isinstance(index, dict) else None
        raise UserError(f"{path}: format {got} is not {INDEX_FORMAT}; prepare the data again")
    problem = index_problem(index)
    if problem:
        raise UserError(f"{path}: {problem}; it changed after `rigtrain data prepare`: prepare the data again")
    if str(index["params"].get("resize", "")).startswith("centre crop"):
        # Shards from before data.resize existed describe the crop in words; it is "crop".
        index["params"]["resize"] = "crop"
    for key, value in LEGACY_PARAMS.items():
        index["params"].setdefault(key, value)
    return index


def check_params(index: dict, data: DataConfig, data_dir: Path) -> None:
    """Shards are only usable with the clip shape they were cut for."""
    want = preparation_params(data)
    for key, value in index["params"].items():
        if key in want and want[key] != value:
            raise UserError(
                f"--data {data_dir}: prepared with {key}={value} but the config has "
                f"data.{key}={want[key]}; set data.{key}={value} or prepare the videos again"
            )


def segment_table(segments: np.ndarray, clips: int, per_clip: int) -> tuple[np.ndarray, np.ndarray]:
    """segments.npy rows (clip, start_s, end_s, offset, length) -> each clip's first
    `per_clip` segments (data.segments_per_clip; MIL-NCE's positives) as (offset, length)
    byte spans in its text: two int64 arrays (clips, per_clip), length 0 where a clip has
    fewer segments. A fixed count keeps batches rectangular."""
    offset = np.zeros((clips, per_clip), np.int64)
    length = np.zeros((clips, per_clip), np.int64)
    used = np.zeros(clips, np.int64)
    for row in segments:
        clip = int(row["clip"])
        if used[clip] < per_clip and row["length"] > 0:
            offset[clip, used[clip]], length[clip, used[clip]] = row["offset"], row["length"]
            used[clip] += 1
    return offset, length


def _npy_layout(path: Path, clips: int) -> tuple[int, tuple[int, ...], np.dtype]:
    """(where the data starts, shape, dtype) of a shard's .npy file, after checking that the
    file is as long as its header says and holds one row per clip of the index."""
    redo = "the shards changed after `rigtrain data prepare`; run it again"
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (
                np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
            )
            start = f.tell()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {redo}") from None
    except (ValueError, OSError, SyntaxError) as err:
        raise UserError(f"{path}: not a readable array (its header is damaged: {err}); {redo}") from None
    want = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != want:
        raise UserError(f"{path}: {size:,} bytes where its header promises {want:,}; {redo}")
    if not shape or shape[0] != clips:
        raise UserError(f"{path}: {shape[0] if shape else 0} clips where index.json says {clips}; {redo}")
    return start, tuple(shape), dtype


class _PerClipFile:
    """One per-clip array of a shard, read a row at a time into a given buffer."""

    def __init__(self, path: Path, clips: int):
        self.path = path
        self.start, self.shape, self.dtype = _npy_layout(path, clips)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        # a dataset opened only to check it (data/embedded.py) gives its descriptors back
        try:
            os.close(self.fd)
        except (AttributeError, OSError):  # never opened (the file failed its check), or closed
            pass

    def read_row(self, j: int, into: np.ndarray) -> None:
        view = memoryview(into).cast("B")
        try:
            got = os.preadv(self.fd, [view], self.start + j * self.row_bytes)
        except OSError as err:  # EIO: the drive went away under the run
            raise DataGone(f"{self.path}: clip {j} cannot be read ({err.strerror}); check the drive") from None
        if got != self.row_bytes:
            raise DataGone(
                f"{self.path}: clip {j} cannot be read ({got} of {self.row_bytes} bytes): the file became "
                "shorter while training; prepare the data again, then --resume"
            )


class ShardDataset(Dataset):
    """Clip i of all shards, as tensors: video uint8 (T, H, W, 3), audio int16 (S,),
    has_audio bool, text uint8 (L,), text_len int64, segment_offset and segment_len int64
    (data.segments_per_clip,): the narration segments' byte spans in text, labels int16 (3,)
    (-1 = none; evaluation only), index int64. Opening checks every shard file against
    index.json (a damaged or truncated one is exit 2, naming it); clips are read when a
    batch asks for them."""

    def __init__(self, data_dir: str | Path, data: DataConfig | None = None):
        self.dir = Path(data_dir)
        self.index = read_index(self.dir)
        if data is not None:
            check_params(self.index, data, self.dir)
        self.segments_per_clip = (data or DataConfig()).segments_per_clip
        self.shards = [s["dir"] for s in self.index["shards"]]
        self.offsets = np.cumsum([0] + [s["clips"] for s in self.index["shards"]])
        self._arrays: list[dict] | None = None
        self._open()  # check the files now, not halfway through a run

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open(self) -> list[dict]:
        if self._arrays is None:
            arrays = []
            for shard in self.index["shards"]:
                folder, clips = self.dir / shard["dir"], int(shard["clips"])
                a: dict = {n: _PerClipFile(folder / f"{n}.npy", clips) for n in PER_CLIP}
                for n in WHOLE:
                    _npy_layout(folder / f"{n}.npy", clips)
                    a[n] = np.load(folder / f"{n}.npy")
                try:
                    segments = np.load(folder / "segments.npy")
                except (OSError, ValueError) as err:
                    raise UserError(
                        f"{folder / 'segments.npy'}: cannot be read ({err}); the shards changed after "
                        "`rigtrain data prepare`; run it again"
                    ) from None
                text_bytes = a["text"].shape[1] if len(a["text"].shape) == 2 else -1
                problem = shard_values_problem(a, self.index, text_bytes) or segments_problem(
                    segments, clips, text_bytes
                )
                if problem:
                    raise UserError(
                        f"{folder}: {problem}; the shards changed after `rigtrain data prepare`; run it again"
                    )
                a["segment_offset"], a["segment_len"] = segment_table(segments, clips, self.segments_per_clip)
                arrays.append(a)
            self._arrays = arrays
        return self._arrays

    def clip_videos(self) -> list[str]:
        """Each clip's source video (file name relative to the source folder)."""
        names = [s["video"] for s in self.index["sources"]]
        return [names[int(i)] for a in self._open() for i in a["clips"]["source"]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.batch([i]).items()}

    def batch(self, indices: list[int], pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Clips `indices` as one batch, read straight from the shard files into the batch
        tensors (pinned when asked, so the copy to the GPU can run asynchronously): one
        copy per clip out of the page cache, no collate."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self.offsets, indices, side="right") - 1
        arrays = self._open()
        first = arrays[0]
        n = len(indices)
        out = {
            key: torch.empty((n, *first[key].shape[1:]), dtype=dtype, pin_memory=pin_memory)
            for key, dtype in (("video", torch.uint8), ("audio", torch.int16), ("text", torch.uint8))
        }
        has_audio = np.empty(n, np.bool_)
        text_len = np.empty(n, np.int64)
        small = {
            key: np.empty((n, *first[key].shape[1:]), first[key].dtype)
            for key in ("segment_offset", "segment_len", "labels")
        }
        for shard in np.unique(shards):
            rows = np.nonzero(shards == shard)[0]
            local = indices[rows] - int(self.offsets[shard])
            order = np.argsort(local, kind="stable")  # read each shard front to back
            rows, local = rows[order], local[order]
            a = arrays[shard]
            for key in PER_CLIP:
                target = out[key].numpy()
                for row, j in zip(rows, local):
                    a[key].read_row(int(j), target[row])
            has_audio[rows] = a["clips"]["has_audio"][local]
            text_len[rows] = a["text_len"][local]
            for key, target in small.items():
                target[rows] = a[key][local]
        out["has_audio"] = torch.from_numpy(has_audio)
        out["text_len"] = torch.from_numpy(text_len)
        out.update(
            {
                key: torch.from_numpy(value.astype(np.int64 if key != "labels" else np.int16))
                for key, value in small.items()
            }
        )
        out["index"] = torch.from_numpy(indices)
        return out

    def narrations(self, indices) -> list[str]:
        """The clips' narration text alone (no video read), for labelling plots."""
        arrays, out = self._open(), []
        for i in np.asarray(indices, dtype=np.int64).tolist():
            shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
            j, a = i - int(self.offsets[shard]), arrays[shard]
            row = np.empty(a["text"].shape[1:], np.uint8)
            a["text"].read_row(j, row)
            out.append(bytes(row[: int(a["text_len"][j])]).decode("utf-8", "replace"))
        return out

    def __getstate__(self) -> dict:
        # A pickled copy (a worker process) opens the files itself.
        return {**self.__dict__, "_arrays": None}


class ShardLoader:
    """Micro-batches of shard clips for one rank, read ahead by a pool of threads.

    Threads, not worker processes: reading a shard clip is a memory copy from the page
    cache, which releases the GIL, so threads run in parallel; and worker processes must
    hand every batch over through a new shared-memory segment, which costs more than the
    read itself (measured on the small preset's clips: 9.9 ms to allocate and fill 12 MB
    of shared memory, 1.1 ms to read it from the shards). Batches come out in sampler
    order whatever the thread count, so a run is reproducible and resumable."""

    def __init__(
        self,
        dataset: ShardDataset,
        sampler: Iterable[int],
        *,
        micro_batch: int,
        workers: int,
        prefetch: int,
        pin_memory: bool,
        on_batch: Callable[[int, int, int], None] | None = None,
    ):
        self.dataset, self.sampler, self.micro_batch = dataset, sampler, micro_batch
        self.on_batch = on_batch  # (start_ns, end_ns, clips) of every batch read: the profiler's loader rows
        self.workers, self.pin_memory = workers, pin_memory
        self.depth = max(1, workers) * prefetch  # batches read ahead
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="rigtrain-loader") if workers > 0 else None

    def __iter__(self):
        batches = iter(BatchSampler(self.sampler, self.micro_batch, drop_last=True))
        if self._pool is None:
            for indices in batches:
                yield self._read(indices)
            return
        ahead: deque = deque()
        try:
            while True:
                while len(ahead) < self.depth:
                    indices = next(batches, None)
                    if indices is None:
                        break
                    ahead.append(self._pool.submit(self._read, indices))
                if not ahead:
                    return
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()

    def _read(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if self.on_batch is None:
            return self.dataset.batch(indices, self.pin_memory)
        start = time.time_ns()
        batch = self.dataset.batch(indices, self.pin_memory)
        self.on_batch(start, time.time_ns(), len(indices))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def open_dataset(data_dir: str | Path, data: DataConfig) -> Dataset:
    """Prepared shards, or a folder of videos decoded on the fly (slow; what prepare is for)."""
    if (Path(data_dir) / "index.json").is_file():
        return ShardDataset(data_dir, data)
    from rigtrain.data.ondemand import DecodedClips  # decoding (OpenCV, PyAV) only for a folder of videos

    clips = DecodedClips.from_folder(Path(data_dir), data)
    if len(clips) == 0:
        raise UserError(f"--data {data_dir}: no video there gives a single clip; run `rigtrain data check {data_dir}`")
    return clips


def make_loader(
    dataset: Dataset,
    data: DataConfig,
    *,
    rank: int,
    world: int,
    micro_batch: int,
    seed: int,
    start_batch: int,
    workers: int,
    pin_memory: bool,
    on_batch: Callable[[int, int, int], None] | None = None,
    clips: np.ndarray | None = None,
) -> ShardLoader:
    """The training loader: the resumable sampler's clips (all, or the given indices) in
    micro-batches, `workers` threads reading prefetch_factor batches each ahead, uint8
    until on the device (4x less to copy than float32), pinned on a GPU machine."""
    sampler = ResumableSampler(
        len(dataset) if clips is None else clips,
        rank=rank,
        world=world,
        micro_batch=micro_batch,
        seed=seed,
        start_batch=start_batch,
    )
    return ShardLoader(
        dataset,
        sampler,
        micro_batch=micro_batch,
        workers=workers,
        prefetch=data.prefetch_factor,
        pin_memory=pin_memory,
        on_batch=on_batch,
    )
