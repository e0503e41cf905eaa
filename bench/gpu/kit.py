"""The GPU run kit: every hardware path rigtrain has, run for real and measured, into one
report. Started by run.sh (which finds or builds the Python environment):

    bash bench/gpu/run.sh OUT_DIR          # a CUDA machine: under 9 minutes on one H100
    bash bench/gpu/run.sh --cpu OUT_DIR    # every step on the CPU, at toy sizes (the test suite runs it)

Steps, each recorded in OUT_DIR/report.json whether it worked or not:
1. the tests marked `gpu` (skipped on the CPU, and counted as such);
2. for demo, small and base: `rigtrain profile` for a few more steps than its window (it
   plans first, bf16 where the card has it; the same run gives the plan and its memory
   terms, the memory check after the first step, the profile verdict and the throughput),
   while this script samples what NVML says the run's processes use;
3. the first-step out-of-memory back-off for real: on a GPU another process takes all but
   90% of what `small` used and the run is told (by a rig file) the card is free as before;
   on the CPU the out-of-memory is injected (RIGTRAIN_FAULT_OOM_ABOVE_MICRO_BATCH);
4. the targets, each with its figure and whether it was met (null on the CPU).
GPU-only figures are null on the CPU; the report's shape is the same."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from backoff import oom_backoff  # the kit's modules, beside this file
from report import print_table, targets
from steps import PRESETS, ROOT, environment, gpu_tests, preset_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cpu", action="store_true", help="every step on the CPU, at toy sizes")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    args = parser.parse_args()
    import torch

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("bench/gpu/run.sh: no CUDA GPU here; use --cpu to run the kit's steps on the CPU", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {
        "kit": 1,
        "mode": "gpu" if gpu else "cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,
        "environment": environment(),
    }
    began = time.perf_counter()
    print(f"[kit] {report['mode']} mode, {report['environment']['gpus'] or 'no GPU'}; logs in {out / 'logs'}")
    print("[kit] the tests marked gpu", flush=True)
    report["gpu_tests"] = gpu_tests(out)
    report["presets"] = {}
    for preset in args.presets:
        print(f"[kit] {preset}: a planned, profiled bf16 run", flush=True)
        report["presets"][preset] = preset_run(out, preset, gpu)
    print("[kit] the first-step out-of-memory back-off", flush=True)
    report["oom_backoff"] = oom_backoff(out, gpu, report["presets"].get("small"))
    report["targets"] = targets(report, gpu)
    report["seconds"] = round(time.perf_counter() - began, 1)
    failures = [f"{p}: exit {r['exit_code']}" for p, r in report["presets"].items() if r["exit_code"] != 0]
    failures += [] if report["gpu_tests"]["ok"] else ["the gpu tests failed"]
    failures += [] if report["oom_backoff"]["ok"] else ["the out-of-memory back-off did not finish"]
    report["failures"] = failures
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"[kit] report: {out / 'report.json'} ({report['seconds']:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
