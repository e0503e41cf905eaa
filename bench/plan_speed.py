"""How long planning takes: the probe plus the memory search, per rig file in tests/rigs,
for a preset (default base). Issue 5's target: under 30 s for `base` on a 2-core CPU.

    python bench/plan_speed.py [--preset base]

Prints a table and one JSON line. Each plan runs `rigtrain rig` in a fresh process, so
imports and the first FakeTensorMode step are included, as a user sees them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    args = parser.parse_args()
    rows, results = [], {}
    targets = [("this machine (probe)", [])] + [
        (p.name, ["--rig", str(p)]) for p in sorted((ROOT / "tests" / "rigs").glob("*.json"))
    ]
    for name, extra in targets:
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "rigtrain", "rig", "--preset", args.preset, "--json", *extra],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"rigtrain rig {' '.join(extra)} failed:\n{result.stderr}")
        plan = json.loads(result.stdout)["plan"]
        results[name] = round(seconds, 1)
        rows.append(
            (
                name,
                f"{seconds:.1f} s",
                f"micro-batch {plan['micro_batch_size']} x {plan['grad_accum_steps']}",
                f"ZeRO-{plan['zero_stage']}",
                "ckpt" if plan["activation_checkpointing"] else "-",
                plan["optimizer"],
                f"{plan['predicted_peak_gib']:.2f} GiB",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(
        json.dumps(
            {
                "preset": args.preset,
                "seconds": results,
                "max_s": max(results.values()),
                "target_s": 30,
                "pass": max(results.values()) < 30,
            }
        )
    )


if __name__ == "__main__":
    main()
