"""What the `[log]` statistics cost: the same training run with gradient norms and
histograms at their defaults and with both off, measured in one process each, one after
the other on this machine. The target: under 1% of step time at the defaults.

    python bench/tensor_stats.py [--preset demo] [--steps 200] [--repeats 2] [--set KEY=VALUE ...]

Step time is the mean of metrics.jsonl's step_time_s over the run (each row is the mean of
the steps since the row before, so logged steps, where the statistics are taken, count
with the rest). Prints a table and one JSON line."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "defaults": [],
    "off": ["log.grad_norms=false", "log.histograms_every=0"],
    "histograms every logged step": ["log.histograms_every=10"],
}


def step_time(out: Path, preset: str, steps: int, extra: list[str]) -> float:
    command = [sys.executable, "-m", "rigtrain", "train", "--preset", preset, "--out", str(out), "--steps", str(steps)]
    command += ["--set", f"train.ckpt_every={steps}", "eval.during_training=false", *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench/tensor_stats.py: the run failed:\n{result.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.fmean(r["step_time_s"] for r in rows[1:])  # the first row carries start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", nargs="+", default=[], dest="extra")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # interleaved, so drift in the machine hits every setting
            for name, settings in SETTINGS.items():
                out = Path(tmp) / f"{name.replace(' ', '-')}-{repeat}"
                times[name].append(step_time(out, args.preset, args.steps, [*settings, *args.extra]))
    off = statistics.median(times["off"])
    print(f"{'setting':<30} {'step ms':>9} {'vs off':>8}")
    result = {}
    for name, values in times.items():
        median = statistics.median(values)
        result[name] = {"step_ms": round(median * 1000, 2), "overhead": round(median / off - 1, 4)}
        print(f"{name:<30} {median * 1000:9.1f} {median / off - 1:+8.2%}")
    print(json.dumps({"preset": args.preset, "steps": args.steps, "repeats": args.repeats, "results": result}))


if __name__ == "__main__":
    main()
