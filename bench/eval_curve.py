"""The demo's learning, seed by seed: full demo runs (for each seed, at each multiple of the
demo preset's steps), each followed by `rigtrain eval`, with kNN top-1 per label and
text->video R@5 beside their chance levels. Issue 12's target, per run: every kNN top-1 at
least 2x chance (shape, colour and direction) and t2v R@5 at least 3x chance.

    python bench/eval_curve.py [--seeds 0,1,2] [--multiples 1] [--out /tmp/eval-curve]

Prints a table (one row per run), how many runs met the target, and one JSON line. Each
run is a separate `rigtrain train --set train.seed=S` (so each has the learning-rate
schedule a user's run of that length has), on the embedded dataset. With --out, runs
already finished there are scored again, not retrained."""

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
    parser.add_argument("--multiples", default="1", help="multiples of the demo preset's train.steps, e.g. 1,2,4")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed of each run")
    parser.add_argument("--out", help="where the runs go (default: a temporary folder, removed after)")
    args = parser.parse_args()
    demo_steps = load_config("demo").train.steps
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rigtrain-eval-curve-"))
    rows, results = [], []
    try:
        for multiple, seed in [(int(m), int(s)) for m in args.multiples.split(",") for s in args.seeds.split(",")]:
            steps = demo_steps * multiple
            run_dir = out / f"demo-x{multiple}-seed{seed}"
            started, reused = time.perf_counter(), (run_dir / "eval.json").is_file()
            if not reused:  # a finished run is kept; anything else starts over
                shutil.rmtree(run_dir, ignore_errors=True)
                run(["train", "--out", str(run_dir), "--steps", str(steps), "--set", f"train.seed={seed}"])
            train_s = None if reused else round(time.perf_counter() - started, 1)
            record = json.loads(run(["eval", str(run_dir), "--json"]))
            t2v = record["retrieval"]["t2v"]
            entry = {
                "multiple": multiple,
                "seed": seed,
                "steps": steps,
                "train_s": train_s,
                **{f"knn_{k}": record["knn"][k]["top1"] for k in LABELS},
                **{f"knn_{k}_chance": record["knn"][k]["chance"] for k in LABELS},
                **{f"probe_{k}": record["probe"][k]["top1"] for k in LABELS},
                "t2v_r5": t2v["r5"],
                "t2v_r5_chance": t2v["chance_r5"],
                "v2t_r5": record["retrieval"]["v2t"]["r5"],
            }
            entry["target_met"] = (
                all(entry[f"knn_{k}"] >= 2 * entry[f"knn_{k}_chance"] for k in LABELS)
                and entry["t2v_r5"] >= 3 * entry["t2v_r5_chance"]
            )
            results.append(entry)
            took = "reused" if train_s is None else f"{train_s:.0f} s"
            print(
                f"[eval_curve] {multiple}x seed {seed} ({steps} steps, {took}): {json.dumps(entry)}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(
                (
                    f"{multiple}x",
                    str(seed),
                    str(steps),
                    took,
                    *[f"{entry[f'knn_{k}']:.2f} ({entry[f'knn_{k}_chance']:.2f})" for k in LABELS],
                    *[f"{entry[f'probe_{k}']:.2f}" for k in LABELS],
                    f"{entry['t2v_r5']:.2f} ({entry['t2v_r5_chance']:.3f})",
                    "yes" if entry["target_met"] else "no",
                )
            )
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    header = (
        "run",
        "seed",
        "steps",
        "time",
        "kNN shape",
        "kNN colour",
        "kNN direction",
        "probe s",
        "probe c",
        "probe d",
        "t2v R@5",
        "target",
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("(chance in brackets: the most common held-out class; for R@5, 5 / held-out clips with narration;")
    print(" target: every kNN >= 2x chance and t2v R@5 >= 3x chance)")
    met = sum(r["target_met"] for r in results)
    print(f"target met in {met} of {len(results)} runs")
    print(json.dumps({"demo_steps": demo_steps, "runs": results, "target_met_runs": met}))


if __name__ == "__main__":
    main()
