"""The GPU-idle share `rigtrain profile analyze` reports, beside Holistic Trace Analysis's
temporal breakdown of the same torch.profiler traces (HTA, Meta's trace analyser, which
PyTorch's tutorials point to). The target: within a few points on real GPU traces.

    pip install --no-deps HolisticTraceAnalysis && pip install pandas plotly networkx pydot tabulate
    python bench/trace_vs_hta.py TRACE_OR_FOLDER... [--json OUT.json]

(HTA's own requirements add jupyterlab, which the comparison does not need.) A GPU kit's
results.tar.gz has the traces of its three presets under kit-results/runs/*/tb/profile/.

What each counts: HTA's idle is the time no kernel, copy or collective runs on any stream,
from the first GPU kernel to the last, of the kernels launched within the profiler steps
(every step here: by default HTA leaves the last one out); rigtrain's is the same for the
GPU work inside the recorded steps' windows (ProfilerStep#N, the host's view of a step).
They differ where a kernel launched in a step runs on past its window. The table prints
both, their difference in points, and HTA's compute and non-compute (memory,
communication) shares."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

INSTALL = "pip install --no-deps HolisticTraceAnalysis && pip install pandas plotly networkx pydot tabulate"
try:
    from tabulate import tabulate  # the table; like HTA, not a dependency of rigtrain
except ImportError:
    sys.exit(f"bench/trace_vs_hta.py needs tabulate and HTA: {INSTALL}")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rigtrain.errors import UserError  # noqa: E402
from rigtrain.profile.trace_file import analyze_trace, trace_files  # noqa: E402  (the checkout, above)


def hta_temporal_breakdown(trace: Path) -> dict:
    """HTA's figures for one trace file (HTA reads folders: it gets one with the file alone)."""
    try:
        from hta.trace_analysis import TraceAnalysis  # optional: only this comparison uses HTA
    except ImportError:
        sys.exit(f"bench/trace_vs_hta.py needs HTA: {INSTALL}")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(trace, Path(folder) / trace.name)
        # every recorded step, as rigtrain reads them (HTA leaves the last one out by default)
        analysis = TraceAnalysis(trace_dir=folder, include_last_profiler_step=True)
        frame = analysis.get_temporal_breakdown(visualize=False)
    row = frame.iloc[0]
    return {
        "idle_share": round(float(row["idle_time_pctg"]) / 100, 4),
        "compute_share": round(float(row["compute_time_pctg"]) / 100, 4),
        "non_compute_share": round(float(row["non_compute_time_pctg"]) / 100, 4),
        "kernel_span_ms": round(float(row["kernel_time(us)"]) / 1000, 3),
    }


def compare(trace: Path) -> dict:
    ours = analyze_trace(trace)
    if ours["device"] != "cuda":
        return {"trace": str(trace), "error": "no GPU kernels in this trace: HTA's breakdown is of GPU streams"}
    hta = hta_temporal_breakdown(trace)
    idle = ours["numbers"]["gpu_idle_share"]
    return {
        "trace": str(trace),
        "rigtrain": {"gpu_idle_share": idle, "verdict": ours["verdict"], "steps": ours["numbers"]["steps"]},
        "hta": hta,
        "idle_difference_points": round(100 * (idle - hta["idle_share"]), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="trace files or folders searched for them")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    try:
        traces = [t for p in args.paths for t in trace_files(p)]
    except UserError as err:
        print(f"bench/trace_vs_hta.py: {err}", file=sys.stderr)
        return 2
    results = [compare(t) for t in traces]
    rows = [
        [r["trace"][-60:], r["error"], "", "", "", ""]
        if "error" in r
        else [
            r["trace"][-60:],
            f"{r['rigtrain']['gpu_idle_share']:.1%}",
            f"{r['hta']['idle_share']:.1%}",
            f"{r['idle_difference_points']:+.1f}",
            f"{r['hta']['compute_share']:.1%}",
            f"{r['hta']['non_compute_share']:.1%}",
        ]
        for r in results
    ]
    headers = ["trace", "rigtrain GPU idle", "HTA idle", "points apart", "HTA compute", "HTA non-compute"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
