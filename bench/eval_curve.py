"""The learning curve of the demo: full demo runs at 1x, 2x and 4x the demo preset's steps,
each followed by `rigtrain eval`, with kNN top-1 per label and text->video R@5 beside
their chance levels. Issue 4's target: after the 1x run (the README's demo), every kNN
top-1 and t2v R@5 at least 2x chance.

    python bench/eval_curve.py [--multiples 1,2,4] [--out /tmp/eval-curve]

Prints a table and one JSON line. Each run is a separate `rigtrain train` (so each has the
learning-rate schedule a user's run of that length has), on the embedded dataset."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rigtrain.config import load_config  # noqa: E402

LABELS = ("shape", "colour", "direction")


def run(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "rigtrain", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"rigtrain {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiples", default="1,2,4", help="multiples of the demo preset's train.steps")
    parser.add_argument("--out", help="where the runs go (default: a temporary folder, removed after)")
    args = parser.parse_args()
    demo_steps = load_config("demo").train.steps
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rigtrain-eval-curve-"))
    rows, results = [], []
    try:
        for multiple in [int(m) for m in args.multiples.split(",")]:
            steps = demo_steps * multiple
            run_dir = out / f"demo-x{multiple}"
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.perf_counter()
            run(["train", "--out", str(run_dir), "--steps", str(steps)])
            train_s = time.perf_counter() - started
            record = json.loads(run(["eval", str(run_dir), "--json"]))
            t2v = record["retrieval"]["t2v"]
            entry = {"multiple": multiple, "steps": steps, "train_s": round(train_s, 1),
                     **{f"knn_{k}": record["knn"][k]["top1"] for k in LABELS},
                     **{f"knn_{k}_chance": record["knn"][k]["chance"] for k in LABELS},
                     **{f"probe_{k}": record["probe"][k]["top1"] for k in LABELS},
                     "t2v_r5": t2v["r5"], "t2v_r5_chance": t2v["chance_r5"],
                     "v2t_r5": record["retrieval"]["v2t"]["r5"]}
            entry["target_met"] = all(entry[f"knn_{k}"] >= 2 * entry[f"knn_{k}_chance"] for k in LABELS) \
                and entry["t2v_r5"] >= 2 * entry["t2v_r5_chance"]
            results.append(entry)
            print(f"[eval_curve] {multiple}x ({steps} steps, {train_s:.0f} s): {json.dumps(entry)}", file=sys.stderr,
                  flush=True)
            rows.append((f"{multiple}x", str(steps), f"{train_s:.0f} s",
                         *[f"{entry[f'knn_{k}']:.2f} ({entry[f'knn_{k}_chance']:.2f})" for k in LABELS],
                         *[f"{entry[f'probe_{k}']:.2f}" for k in LABELS],
                         f"{entry['t2v_r5']:.2f} ({entry['t2v_r5_chance']:.2f})", "yes" if entry["target_met"] else "no"))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    header = ("run", "steps", "time", "kNN shape", "kNN colour", "kNN direction", "probe s", "probe c", "probe d",
              "t2v R@5", "2x chance")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("(chance in brackets: the most common held-out class; for R@5, 5 / held-out clips with narration)")
    print(json.dumps({"demo_steps": demo_steps, "runs": results}))


if __name__ == "__main__":
    main()
