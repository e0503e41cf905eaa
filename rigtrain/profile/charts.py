"""A profile you can see without a network: two matplotlib images of the recorded steps,
written to RUN_DIR/profile/ and into TensorBoard's profile run (the PyTorch Profiler tab
loads Google Charts from a CDN and never renders offline).

- breakdown.png: one stacked bar per recorded step, split into the verdict's categories;
- timeline.png: the recorded steps on one time axis, a row each for data wait, forward,
  backward, optimizer and communication, on a GPU one for the GPU's work (any kernel, copy
  or memset running: the gaps are the GPU waiting, which a host-bound run shows at a
  glance), and one per loader thread (each batch it read).

matplotlib is imported only here: without it (the GPU kit's offline box) the profile loses
these images and says so in one line, nothing else."""

from __future__ import annotations

from pathlib import Path

from rigtrain.profile.analysis import CATEGORIES, COMM, GPU_WORK, _merge, breakdown, timeline_events

COLOURS = {
    "data_wait": "#d62728",
    "host": "#7f7f7f",
    "compute": "#2ca02c",
    "communication": "#9467bd",
    "optimizer": "#ff7f0e",
    "other": "#c7c7c7",
    "forward": "#2ca02c",
    "backward": "#1f77b4",
    "GPU work": "#17becf",
}


def per_step(events: list[dict], device: str) -> list[tuple[str, dict[str, float]]]:
    """(step name, ms per category) for each recorded step, each analysed on its own."""
    steps = sorted((e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")), key=lambda e: e["ts"])
    others = [e for e in events if not str(e.get("name", "")).startswith("ProfilerStep#")]
    out = []
    for step in steps:
        fractions, numbers = breakdown([step, *others], device)
        out.append((step["name"].removeprefix("ProfilerStep"), numbers["ms_per_step"]))
    return out


def _rows(events: list[dict], device: str) -> dict[str, list[tuple[float, float]]]:
    """Timeline rows: (start, length) in ms from the first recorded step."""
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")]
    origin = min(e["ts"] for e in steps)
    end = max(e["ts"] + e["dur"] for e in steps)

    def spans(match) -> list[tuple[float, float]]:
        return [
            ((e["ts"] - origin) / 1000, e["dur"] / 1000)
            for e in events
            if e.get("ph") == "X" and match(e) and e["ts"] + e["dur"] > origin and e["ts"] < end
        ]

    rows = {
        phase: spans(lambda e, p=phase: e.get("name") == f"rigtrain/{p}")
        for phase in ("data_wait", "forward", "backward", "optimizer")
    }
    if device == "cuda":  # thousands of kernels a step: drawn as the time any of them runs
        busy = _merge([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK])
        rows["GPU work"] = [((a - origin) / 1000, (b - a) / 1000) for a, b in busy if b > origin and a < end]
    comm_cat = ("kernel",) if device == "cuda" else ("cpu_op",)
    rows["communication"] = spans(lambda e: e.get("cat") in comm_cat and bool(COMM.search(str(e.get("name", "")))))
    loader_threads = sorted({e["tid"] for e in events if str(e.get("name", "")).startswith("rigtrain/loader_")})
    for number, tid in enumerate(loader_threads):
        rows[f"loader thread {number}"] = spans(
            lambda e, t=tid: e.get("tid") == t and str(e.get("name", "")).startswith("rigtrain/loader_")
        )
    return rows


def write_charts(events: list[dict], device: str, out_dir: Path, writer=None) -> list[Path]:
    """breakdown.png and timeline.png in out_dir (and into a TensorBoard SummaryWriter)."""
    import matplotlib  # optional: only where the profile's images are drawn

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt  # optional: after choosing the backend

    written = []
    events = timeline_events(events)  # once, not in each step's breakdown and each row
    steps = per_step(events, device)
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(steps) + 2), 4))
    bottoms = [0.0] * len(steps)
    for category in CATEGORIES:
        heights = [ms[category] for _, ms in steps]
        axes.bar([name for name, _ in steps], heights, bottom=bottoms, label=category, color=COLOURS[category])
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes.set_xlabel("recorded step")
    axes.set_ylabel("ms")
    axes.set_title("where each recorded step's time went")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    figure.tight_layout()
    written.append(_save(figure, out_dir / "breakdown.png", writer, "profile/breakdown"))

    rows = {name: spans for name, spans in _rows(events, device).items() if spans}
    figure, axes = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.6))
    for y, (name, spans) in enumerate(reversed(list(rows.items()))):
        colour = COLOURS.get(name, "#8c564b")
        axes.broken_barh(spans, (y - 0.4, 0.8), facecolors=colour)
    axes.set_yticks(range(len(rows)), list(reversed(list(rows))))
    axes.set_xlabel("ms from the first recorded step")
    axes.set_title(
        "the recorded steps: train loop phases"
        + (", the GPU's work" if device == "cuda" else "")
        + " and loader threads"
    )
    figure.tight_layout()
    written.append(_save(figure, out_dir / "timeline.png", writer, "profile/timeline"))
    return written


def _save(figure, path: Path, writer, tag: str) -> Path:
    import matplotlib.pyplot as plt  # optional: present, since the figure was drawn with it

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    if writer is not None:
        writer.add_figure(tag, figure)  # closes the figure
    else:
        plt.close(figure)
    return path
