"""`rigtrain profile analyze PATH`: the breakdown, verdict and suggestions for any
torch.profiler trace (`*.pt.trace.json`, or `.json.gz`), rigtrain's or one from your own
training script.

A trace is read as a stream: the `traceEvents` array is decoded one event at a time and
only the events the breakdown uses are kept (step ranges, rigtrain's spans, DataLoader and
optimizer spans, collectives, GPU kernels and copies), so a trace of hundreds of MB is
analysed in memory proportional to those, with progress on stderr.

A trace without rigtrain's spans is mapped onto the same breakdown: the DataLoader's
`__next__` spans are the data wait, `Optimizer.step#...` spans the optimizer; on a GPU the
kernels are compute and the GPU's idle time outside data wait is the host's; on the CPU
everything else in a step is counted as compute, and the summary says what it could not
see."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

from rigtrain.errors import UserError
from rigtrain.profile.analysis import COMM, GPU_STEP_RANGE, _merge, breakdown, gpu_idle_line, verdict

CHUNK = 1 << 20
DATALOADER = re.compile(r"enumerate\(DataLoader\)#.*__next__")
OPTIMIZER = re.compile(r"^Optimizer\.step#")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.name.endswith((".pt.trace.json", ".pt.trace.json.gz")))
        if found:
            return found
        raise UserError(f"{path}: no torch.profiler traces (*.pt.trace.json or .json.gz) in this folder")
    raise UserError(f"{path}: no such file or folder; give a *.pt.trace.json[.gz] file or a folder holding them")


def _wanted(event: dict) -> bool:
    if event.get("ph") != "X" or "ts" not in event or "dur" not in event:
        return False
    name, cat = str(event.get("name", "")), event.get("cat")
    if cat == GPU_STEP_RANGE:  # a step's copy on the GPU's timeline: the host's range is the step
        return False
    return (
        cat in GPU_CATEGORIES
        or name.startswith(("ProfilerStep#", "rigtrain/"))
        or bool(DATALOADER.search(name) or OPTIMIZER.search(name))
        or (cat == "cpu_op" and bool(COMM.search(name)))
    )


def read_events(path: Path, progress=None) -> list[dict]:
    """The events the breakdown uses, decoded one at a time from the traceEvents array."""
    opener = gzip.open if path.name.endswith(".gz") else open
    size = path.stat().st_size
    kept: list[dict] = []
    decoder = json.JSONDecoder()
    try:
        with opener(path, "rt", encoding="utf-8") as stream:
            buffer, position, reported = "", -1, 0
            while position < 0:  # find the array
                chunk = stream.read(CHUNK)
                if not chunk:
                    raise UserError(f"{path}: not a torch.profiler trace (no traceEvents array)")
                buffer += chunk
                found = re.search(r'"traceEvents"\s*:\s*\[', buffer)
                if found:
                    position = found.end()
                elif len(buffer) > 4 * CHUNK:
                    buffer = buffer[-64:]
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n,":
                    position += 1
                if position < len(buffer) and buffer[position] == "]":
                    return kept
                try:
                    event, end = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        raise UserError(f"{path}: the trace ends in the middle of an event (cut short?)") from None
                    buffer = buffer[position:] + chunk
                    position = 0
                    if progress and size > 50 * CHUNK:
                        done = stream.buffer.tell() if hasattr(stream, "buffer") else 0
                        share = min(1.0, done / size) if not path.name.endswith(".gz") else None
                        if share is not None and share - reported >= 0.1:
                            reported = share
                            progress(f"{path.name}: {share:.0%} read, {len(kept)} events kept")
                    continue
                if isinstance(event, dict) and _wanted(event):
                    args = event.get("args") or {}
                    slim = {k: event[k] for k in ("ph", "name", "cat", "ts", "dur", "tid") if k in event}
                    if "clips" in args:
                        slim["args"] = {"clips": args["clips"]}
                    kept.append(slim)
                position = end
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise UserError(f"{path}: cannot be read as a trace ({err})") from None


def _subtract(windows, holes):
    """windows less holes, both lists of merged (start, end)."""
    out = []
    for start, end in windows:
        cursor = start
        for a, b in holes:
            if b <= cursor or a >= end:
                continue
            if a > cursor:
                out.append((cursor, a))
            cursor = max(cursor, b)
        if cursor < end:
            out.append((cursor, end))
    return out


def as_rigtrain_spans(events: list[dict]) -> tuple[list[dict], str, list[str]]:
    """(events with foreign spans mapped onto rigtrain's, device, what could not be seen)."""
    unseen: list[str] = []
    names = {e["name"] for e in events}
    ours = any(n.startswith("rigtrain/") for n in names)
    device = "cuda" if any(e.get("cat") in GPU_CATEGORIES for e in events) else "cpu"
    out = list(events)
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    if not steps:
        start = min((e["ts"] for e in events), default=0)
        end = max((e["ts"] + e["dur"] for e in events), default=0)
        if end <= start:
            raise UserError("the trace holds no timed events the breakdown can use")
        out.append({"ph": "X", "name": "ProfilerStep#0", "ts": start, "dur": end - start})
        steps = [out[-1]]
        unseen.append("no ProfilerStep ranges (prof.step() was not called): the whole trace is one window")
    if ours:
        return out, device, unseen
    renamed = []
    for e in out:
        if DATALOADER.search(e["name"]):
            renamed.append({**e, "name": "rigtrain/data_wait"})
        elif OPTIMIZER.search(e["name"]):
            renamed.append({**e, "name": "rigtrain/optimizer"})
        else:
            renamed.append(e)
    if not any(DATALOADER.search(n) for n in names):
        unseen.append("no DataLoader spans: time waiting for data, if any, is counted elsewhere")
    if not any(OPTIMIZER.search(n) for n in names):
        unseen.append("no Optimizer.step spans: the optimizer's time is counted as compute")
    if device == "cpu":
        windows = _merge([(e["ts"], e["ts"] + e["dur"]) for e in steps])
        claimed = _merge(
            [
                (e["ts"], e["ts"] + e["dur"])
                for e in renamed
                if e["name"] in ("rigtrain/data_wait", "rigtrain/optimizer")
            ]
        )
        for a, b in _subtract(windows, claimed):
            renamed.append({"ph": "X", "name": "rigtrain/forward", "ts": a, "dur": b - a})
        unseen.append("on the CPU without rigtrain's spans the loop's own work cannot be told from compute")
    return renamed, device, unseen


def generic_suggestions(kind: str, fractions: dict, device: str) -> list[str]:
    """What to change in a PyTorch training script in general (no rigtrain config to name)."""
    if kind == "input-bound":
        return [
            f"the loop waits for data {fractions['data_wait']:.0%} of each step: raise the DataLoader's "
            "num_workers (with persistent_workers=True and prefetch_factor), pin_memory=True with "
            "non_blocking copies on a GPU",
            "decode or augment less per sample (prepare the data once), and check what the disk delivers",
        ]
    if kind == "communication-bound":
        return [
            f"collectives take {fractions['communication']:.0%} of each step: accumulate gradients over more "
            "micro-batches per exchange (no_sync), larger buckets, or fewer shards (ZeRO-1 before 2/3)",
            "check the links: an x4 slot or no P2P between GPUs halves the bandwidth",
        ]
    if kind == "host-bound":
        return [
            f"the GPU waits on Python for {fractions['host']:.0%} of each step: larger batches, torch.compile "
            "(fewer, fused kernels) or CUDA graphs",
            "look for host syncs in the step: .item(), .cpu(), printing a tensor, nonzero()",
        ]
    if device == "cuda":
        return ["the GPU's arithmetic is the limit: bf16 or TF32, torch.compile, fused optimizers"]
    return ["the CPU's arithmetic is the limit: a GPU, or a smaller model or batch"]


def analyze_trace(path: Path, progress=None) -> dict:
    events = read_events(path, progress)
    mapped, device, unseen = as_rigtrain_spans(events)
    try:
        fractions, numbers = breakdown(mapped, device)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    kind, because = verdict(fractions)
    return {
        "trace": str(path),
        "device": device,
        "rigtrain_spans": any(e["name"].startswith("rigtrain/") for e in events),
        "verdict": kind,
        "because": because,
        "breakdown": {k: round(v, 4) for k, v in fractions.items()},
        "numbers": numbers,
        "unseen": unseen,
        "suggestions": generic_suggestions(kind, fractions, device),
        "events_used": len(events),
    }


def format_trace_summary(summary: dict) -> str:
    n = summary["numbers"]
    lines = [
        f"{summary['trace']} ({summary['device']}, {summary['events_used']} events used)",
        f"verdict: {summary['verdict']} ({summary['because']})",
        f"{n['steps']} step(s), {n['step_ms']:.1f} ms each",
    ]
    for key, share in summary["breakdown"].items():
        lines.append(f"  {key:<13}  {share:6.1%}  {n['ms_per_step'][key]:9.1f} ms  {'#' * round(share * 40)}")
    if n.get("gpu_idle_share") is not None:
        lines.append(gpu_idle_line(n["gpu_idle_share"]))
    lines += [f"could not see: {note}" for note in summary["unseen"]]
    lines += ["what to change:"] + [f"  - {s}" for s in summary["suggestions"]]
    return "\n".join(lines)


def analyze_path(path: str, as_json: bool) -> int:
    """The command: every trace under PATH, one summary each."""
    summaries = []
    for file in trace_files(path):
        summaries.append(analyze_trace(file, progress=lambda line: print(f"[rigtrain] {line}", file=sys.stderr)))
    if as_json:
        print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=1))
    else:
        print("\n\n".join(format_trace_summary(s) for s in summaries))
    return 0
