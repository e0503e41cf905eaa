"""`rigtrain data prepare`: a folder of videos -> shards in the format of data/shards.py.

Shards are written to a temporary folder and renamed when complete, and index.json is
written last, so a prepare that is interrupted never leaves data that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from rigtrain.config import DataConfig
from rigtrain.data.ingest import SourceClips, ingest_or_reason
from rigtrain.data.processes import in_order, not_in_a_starting_worker
from rigtrain.data.shards import (
    INDEX_FORMAT,
    LABEL_KEYS,
    LEGACY_PARAMS,
    PREPARE_JOURNAL,
    PREPARE_LOCK,
    SEGMENT_DTYPE,
    clip_bytes,
    preparation_params,
)
from rigtrain.data.sources import Source, fingerprint, read_labels, sources_in
from rigtrain.errors import UserError
from rigtrain.files import sync_tree, write_json


def require_empty_dir(path: Path, command: str, ignore=lambda name: False) -> None:
    """Output goes only into a new or empty folder: nothing of the user's is overwritten.
    `ignore(name)`: a file of the command's own that does not count."""
    if path.exists() and (not path.is_dir() or any(not ignore(p.name) for p in path.iterdir())):
        raise UserError(f"{command}: {path} is not an empty folder; choose an empty or new one (nothing was written)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only disk, another user's folder, /proc
        raise UserError(
            f"{command}: cannot make {path} ({err.strerror or err}); choose a folder you can write to"
        ) from None


class ShardWriter:
    """Collects sources' clips and writes them out as shards of shard_clips clips (the last
    may be smaller); a source may span several shards, and arrive in pieces. After every
    shard, `on_shard` gets the first source not completely written and how many of its
    clips are not (the pending ones and those still to come), which is what a resumed
    prepare needs to know."""

    def __init__(self, out_dir: Path, shard_clips: int, shards: list[dict], on_shard):
        self.out_dir, self.shard_clips, self.on_shard = out_dir, shard_clips, on_shard
        self.pending: list[tuple[int, SourceClips]] = []  # (source id, clips not yet written)
        self.to_come: tuple[int, int] = (-1, 0)  # (source id, its clips not yet added)
        self.shards = list(shards)
        self.total = sum(s["clips"] for s in shards)

    def add(self, source_id: int, clips: SourceClips, to_come: int = 0) -> None:
        """A source's clips (or the next piece of them, with `to_come` clips after it)."""
        clips.clips["source"] = source_id
        self.pending.append((source_id, clips))
        self.to_come = (source_id, to_come)
        while sum(len(c) for _, c in self.pending) >= self.shard_clips:
            self._write_shard()

    @property
    def clips(self) -> int:  # handed to it so far: in shards, and waiting for the next
        return self.total + sum(len(c) for _, c in self.pending)

    def unwritten(self) -> tuple[int | None, int]:
        """The first source not completely in a shard, and how many of its clips are not."""
        first = self.pending[0][0] if self.pending else self.to_come[0] if self.to_come[1] else None
        if first is None:
            return None, 0
        later = self.to_come[1] if self.to_come[0] == first else 0
        return first, sum(len(c) for source, c in self.pending if source == first) + later

    def close(self) -> None:
        while self.pending:
            self._write_shard()

    def _write_shard(self) -> None:
        taken: list[SourceClips] = []
        count = 0
        while self.pending and count < self.shard_clips:
            source_id, clips = self.pending[0]
            head, rest = clips.split(self.shard_clips - count)
            taken.append(head)
            count += len(head)
            if len(rest):
                self.pending[0] = (source_id, rest)
            else:
                self.pending.pop(0)
        segments, offset = [], 0
        for part in taken:
            segments += [(offset + clip, *rest) for clip, *rest in part.segments]
            offset += len(part)
        name = f"shard-{len(self.shards):05d}"
        tmp = self.out_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for key in SourceClips.ARRAYS:
            _save_joined(tmp / f"{key}.npy", [getattr(part, key) for part in taken])
        np.save(tmp / "segments.npy", np.array(segments, dtype=SEGMENT_DTYPE))
        sync_tree(tmp)  # on the disk before its name and the journal say it is there (a power cut)
        os.replace(tmp, self.out_dir / name)
        self.shards.append({"dir": name, "clips": count})
        self.total += count
        self.on_shard(*self.unwritten())


def _save_joined(path: Path, pieces: list[np.ndarray]) -> None:
    """np.save(path, np.concatenate(pieces)), the same bytes, without joining them in memory
    first: a shard of `base` clips is 1.2 GB, and joined it was held twice."""
    first = pieces[0]
    shape = (sum(len(p) for p in pieces), *first.shape[1:])
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False, "shape": shape}
        )
        for piece in pieces:
            file.write(np.ascontiguousarray(piece, dtype=first.dtype).data)


def _own_file(name: str) -> bool:
    """The lock, and what a prepare killed while writing its journal or index leaves
    (write_json's NAME.tmpPID, never renamed): no data, and under the lock no living
    process's."""
    return name == PREPARE_LOCK or name.startswith((f"{PREPARE_JOURNAL}.tmp", "index.json.tmp"))


@contextmanager
def _one_prepare_at_a_time(out: Path):
    """An exclusive lock on OUT/.prepare.lock (flock, through filelock) while a prepare
    writes into OUT: two at once would each append shards to the journal. The kernel drops
    it when its process ends, however it ends. Taken only in a folder that is new, empty or
    a prepare's, so a folder of the user's gets nothing written into it."""
    if not (out.is_dir() and ((out / PREPARE_JOURNAL).exists() or (out / "index.json").exists())):
        require_empty_dir(out, "data prepare", ignore=_own_file)
    lock = FileLock(str(out / PREPARE_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"data prepare: another `rigtrain data prepare` is writing into {out} now; wait for it to end "
            "(the same command run again after it continues or adds to what it wrote)"
        ) from None
    try:
        for path in out.iterdir():
            if path.name != PREPARE_LOCK and _own_file(path.name):
                path.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


# How sound and pictures are decoded; a folder prepared before a change keeps the number it
# was made with (1 where it has none). 2 (2026-12-03): a track's channels averaged to mono
# (FFmpeg's downmix had made stereo 3 dB louder and clipped 5.1), and non-square pixels
# fitted as shown. 3 (2026-12-03, afternoon): a video without a narration sidecar is
# narrated by its own text subtitle track (data/subtitles.py). 4 (2026-12-03, evening): an
# interlaced video's frames are its first field, not both fields woven (data/media.py);
# of several sound tracks, the one a player plays, not the first (data/sound.py).
DECODING = 4
PARTS_DIR = ".parts"


def _load_state(src: Path, out: Path, data: DataConfig) -> dict | None:
    """What an earlier prepare into `out` finished: the journal of an interrupted one, or the
    index of a complete one. None for a new (or empty) folder."""
    for name in (PREPARE_JOURNAL, "index.json"):
        path = out / name
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise UserError(f"data prepare: {path} is corrupt ({err}); prepare into a new folder") from None
            break
    else:
        return None
    params = preparation_params(data)
    for key, value in {**LEGACY_PARAMS, **state.get("params", {})}.items():
        if params.get(key) != value:
            raise UserError(
                f"data prepare: {out} was prepared with {key}={value}, not {params.get(key)}; "
                f"use the same preset and --set values to continue it, or a new folder"
            )
    for info in state["sources"]:
        video = src / info["video"]
        if not video.is_file():
            raise UserError(
                f"data prepare: {info['video']} is in {out} but no longer in {src}; "
                "put it back, or prepare into a new folder"
            )
        if info.get("fingerprint") and fingerprint(video) != info["fingerprint"]:
            raise UserError(
                f"data prepare: {video} changed since it was prepared into {out}; prepare into a new folder"
            )
    state.setdefault("partial", None)
    return state


def _start_or_continue(src: Path, out: Path, data: DataConfig) -> dict:
    """The journal of an interrupted or earlier prepare into `out` (its leftovers removed:
    half-written shards, and shards renamed into place after the journal's last update,
    which are written again from the sources), or a new one in an empty folder."""
    state = _load_state(src, out, data)
    if state is not None:
        known = {s["dir"] for s in state["shards"]}
        for path in out.iterdir():
            if path.is_dir() and (
                path.name.startswith(".shard-")
                or path.name == PARTS_DIR
                or (path.name.startswith("shard-") and path.name not in known)
            ):
                shutil.rmtree(path)
        return state
    require_empty_dir(out, "data prepare", ignore=_own_file)
    state = {
        "format": INDEX_FORMAT,
        "params": preparation_params(data),
        "decoding": DECODING,
        "source_dir": str(src.resolve()),
        "shards": [],
        "sources": [],
        "partial": None,
    }
    write_json(out / PREPARE_JOURNAL, state)
    return state


def _say_continuing(log, out: Path, interrupted: bool, finished: list, partial, state: dict, todo: list) -> None:
    part = f" and {partial['written']} clips of {partial['video']}" if partial else ""
    log(
        f"{'continuing an interrupted prepare' if interrupted else 'adding to'} {out}: "
        f"{len(finished)} video(s){part} already in {len(state['shards'])} shard(s), {len(todo)} to do"
    )
    if state.get("decoding", 1) != DECODING:
        log(
            f"note: {out} was prepared by an earlier rigtrain, which decoded sound, pictures or subtitles "
            'differently (docs/data.md, "Decoders"); the videos added now are decoded as today, those in it '
            "stay as they are: prepare into a new folder to have every video alike"
        )


def _decoder_crashed(job: tuple) -> str:
    """The reason for a video whose decoding killed its process, even alone: FFmpeg or
    OpenCV crashing on a damaged file."""
    return "decoding it crashed its worker process, also alone (a damaged file?); left out"


def _hand_over(source: Source, result, writer: ShardWriter, added: list, skipped: list, data: DataConfig) -> None:
    """One video's result to the writer, a piece at a time, or to `skipped` with its reason."""
    if isinstance(result, str):
        skipped.append({"file": source.name, "reason": result})
    elif result.info["clips"] == 0:
        skipped.append(_too_short(source, result.info, data))
    else:
        added.append(result.info)
        to_come = len(result.clips)
        for piece in result.pieces():
            to_come -= len(piece)
            writer.add(len(added) - 1, piece, to_come)


def _too_short(source: Source, info: dict, data: DataConfig) -> dict:
    seconds = info["duration_s"]
    return {"file": source.name, "reason": f"shorter ({seconds} s) than one clip ({data.clip_seconds} s)"}


def prepare(
    src_dir: str | Path,
    out_dir: str | Path,
    data: DataConfig,
    *,
    workers: int = 1,
    isolate: bool = False,
    progress=None,
    log=None,
    on_start=None,
) -> dict:
    """Prepare every video in src_dir into shards in out_dir; returns the index. The videos
    are decoded in `workers` processes (here, for one, unless isolate: a decoder that
    crashes on a damaged file then takes only that file with it).

    Running it again on the same folders continues: an interrupted prepare resumes after
    its last complete shard, and a complete one only adds the videos that are new. One
    prepare at a time writes into a folder. on_start(out), if given, is called once the
    folder is this prepare's (locked, its journal written), before anything is decoded."""
    not_in_a_starting_worker()
    src, out = Path(src_dir), Path(out_dir)
    sources, unused = sources_in(src, "data prepare", skip=out)
    with _one_prepare_at_a_time(out):
        state = _start_or_continue(src, out, data)
        if on_start:
            on_start(out)
        return _prepare(src, out, data, state, sources, unused, workers, isolate, progress, log)


def _prepare(src: Path, out: Path, data: DataConfig, state, sources, unused, workers, isolate, progress, log) -> dict:
    labels = read_labels(src)
    started = time.perf_counter()
    partial = state["partial"]
    done_names = {info["video"] for info in state["sources"]}
    finished = [info for info in state["sources"] if not partial or info["video"] != partial["video"]]
    todo = [s for s in sources if s.name not in done_names]
    if partial:
        todo.insert(0, next(s for s in sources if s.name == partial["video"]))
    added: list[dict] = list(finished)  # source id -> info, for everything handed to the writer
    interrupted = (out / PREPARE_JOURNAL).is_file() and bool(state["sources"])
    if not todo and not interrupted and (out / "index.json").is_file():
        if log:
            log(f"all {len(sources)} video(s) of {src} are already prepared in {out}; nothing to do")
        return json.loads((out / "index.json").read_text())
    if log and state["sources"]:
        _say_continuing(log, out, interrupted, finished, partial, state, todo)

    def journal(first_unwritten: int | None, remaining: int) -> None:
        complete = added if first_unwritten is None else added[:first_unwritten]
        state["sources"] = complete + ([added[first_unwritten]] if first_unwritten is not None else [])
        state["partial"] = (
            None
            if first_unwritten is None
            else {"video": added[first_unwritten]["video"], "written": added[first_unwritten]["clips"] - remaining}
        )
        state["shards"] = writer.shards
        if first_unwritten is not None and state["partial"]["written"] == 0:
            state["sources"].pop()
            state["partial"] = None
        write_json(out / PREPARE_JOURNAL, state, durable=True)

    writer = ShardWriter(out, data.shard_clips, state["shards"], journal)
    skipped = list(unused)
    parts = out / PARTS_DIR  # the workers' clips on their way to a shard
    parts.mkdir(exist_ok=True)
    jobs = [
        (s, data, labels, partial["written"] if partial and s.name == partial["video"] else 0, parts / f"{i:06d}")
        for i, s in enumerate(todo)
    ]
    if log and todo:  # an hour of video decodes for minutes before its line
        log(f"decoding {len(todo)} video(s) with {workers} worker(s); each is listed when done")
    # results through .parts too: what a killed prepare leaves there, the next one removes
    results = in_order(ingest_or_reason, jobs, workers, _decoder_crashed, isolate, scratch=parts)
    before = writer.clips
    judge_at = max(3, len(todo) // 20) if log else 0  # videos done before the rest's size is judged
    for done, (source, result) in enumerate(zip(todo, results), 1):
        _hand_over(source, result, writer, added, skipped, data)
        if progress:
            progress(done, len(todo), source.name, writer.clips)
        if done == judge_at < len(todo):
            rest = (writer.clips - before) / done * (len(todo) - done)
            _say_if_the_disk_will_fill(out, data, rest, len(todo) - done, log)
    writer.close()
    shutil.rmtree(parts, ignore_errors=True)
    return _write_index(src, out, data, state, labels, writer, added, skipped, started)


def _say_if_the_disk_will_fill(out: Path, data: DataConfig, clips_to_come: float, videos: int, log) -> None:
    """Said once, early: the rest needs more room than the disk has (decoded clips take far
    more than the videos; a full disk after hours stops cleanly, but is better known now)."""
    need, free = int(clips_to_come * clip_bytes(data)), shutil.disk_usage(out).free
    if need > free:
        log(
            f"warning: at the clips per video so far, the {videos} video(s) still to do make about "
            f"{need / 2**30:.1f} GiB of shards, and the disk of {out} has {free / 2**30:.1f} GiB free: the "
            "prepare will stop when it is full; free some space (the same command then goes on after its "
            "last complete shard), or prepare into a folder on a larger disk"
        )


def _write_index(src: Path, out: Path, data: DataConfig, state, labels, writer, added, skipped, started) -> dict:
    """index.json for what was written (the journal removed): a prepare's last act."""
    if writer.total == 0:
        raise UserError(
            f"data prepare: no clip could be made from {src}: "
            + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        )
    skipped += [item for info in added for item in info["skipped"]]
    index = {
        "format": INDEX_FORMAT,
        "params": preparation_params(data),
        "decoding": state.get("decoding", 1),
        "source_dir": str(src.resolve()),
        "sources": added,
        "skipped": skipped,
        "shards": writer.shards,
        "clips": writer.total,
        "labels": {k: labels[k + "s"] for k in LABEL_KEYS} if labels else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out / "index.json", index, durable=True)
    (out / PREPARE_JOURNAL).unlink(missing_ok=True)
    return index
