"""The GPU run kit: every hardware path rigtrain has, run for real and measured, into one
report. Started by run.sh (which finds or builds the Python environment):

    bash bench/gpu/run.sh OUT_DIR          # a CUDA machine: under 9 minutes on one H100
    bash bench/gpu/run.sh --cpu OUT_DIR    # every step on the CPU, at toy sizes (the test suite runs it)

Steps, each recorded in OUT_DIR/report.json whether it worked or not:
1. the tests marked `gpu` (skipped on the CPU, and counted as such);
2. for demo, small and base: `rigtrain profile` for a few more steps than its window (it
   plans first, bf16 where the card has it; the same run gives the plan and its memory
   terms, the memory check after the first two steps, the profile verdict and the throughput),
   while this script samples what NVML says the run's processes use;
3. on a GPU, small once more with train.compile=true, right after the eager runs (on the
   CPU only with --only small-compiled: compiling takes minutes there);
4. the main job, the demo as a user first runs it (900 steps with its evaluations, bf16
   where the card has it), timed, with what it learned (mainjob.py); on a GPU, once more
   with train.compile=true (on the CPU only with --only main_job_compiled);
5. the first-step out-of-memory back-off for real: on a GPU another process takes all but
   90% of what `small` used and the run is told (by a rig file) the card is free as before;
   on the CPU the out-of-memory is injected (RIGTRAIN_FAULT_OOM_ABOVE_MICRO_BATCH);
6. the main job again in fp32, to show that bf16 learns as well;
7. the targets, each with its figure and whether it was met (null on the CPU).

--only KEY... runs some steps alone (a second try on a lent machine, say).
GPU-only figures are null on the CPU; the report's shape is the same.

report.json is written again after every step, and with --deadline-s SECONDS (a machine lent
for a fixed time) no step starts within a minute of the deadline and a step still running
at it is stopped (SIGTERM, then SIGKILL): the report has what finished and names what was
skipped. OUT_DIR/results.tar.gz holds the report, the logs and the run folders without
their checkpoints (profiler traces included), to send to whoever asked for the figures."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from backoff import oom_backoff  # the kit's modules, beside this file
from mainjob import main_job
from report import pack_results, print_table, targets
from steps import COMPILED, PRESETS, ROOT, Deadline, environment, gpu_tests, preset_run

MAIN_JOB_COMPILED = "main_job_compiled"
STEP_KEYS = ("gpu_tests", *PRESETS, COMPILED, "main_job", MAIN_JOB_COMPILED, "oom_backoff", "main_job_fp32")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cpu", action="store_true", help="every step on the CPU, at toy sizes")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument(
        "--only", nargs="+", choices=STEP_KEYS, help="run these steps alone (oom_backoff on a GPU needs small's)"
    )
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="finish within this many seconds, skipping what does not fit"
    )
    args = parser.parse_args()
    import torch

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("bench/gpu/run.sh: no CUDA GPU here; use --cpu to run the kit's steps on the CPU", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # --dirty: a copied working tree (a lent GPU box) can carry an older .git than its files
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    report = {
        "kit": 1,
        "mode": "gpu" if gpu else "cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,
        "environment": environment(),
        "deadline_s": args.deadline_s,
        "complete": False,
        "skipped": [],
    }
    began, deadline = time.perf_counter(), Deadline(args.deadline_s)
    print(f"[kit] {report['mode']} mode, {report['environment']['gpus'] or 'no GPU'}; logs in {out / 'logs'}")
    report["presets"] = {}
    steps = [("the tests marked gpu", "gpu_tests", lambda: gpu_tests(out, deadline))]
    for preset in args.presets:
        run = lambda preset=preset: preset_run(out, preset, gpu, deadline)  # noqa: E731  (bound per preset)
        steps.append((f"{preset}: a planned, profiled bf16 run", preset, run))
    # compiled right after the eager runs: the candidate fix for the host-bound presets, the
    # figure a lent machine's minutes are best spent on (on 2026-12-04 it came last and the
    # deadline stopped it while it compiled)
    compiled = lambda: preset_run(out, "small", gpu, deadline, name=COMPILED, extra=("train.compile=true",))  # noqa: E731
    if gpu or (args.only and COMPILED in args.only):
        steps.append(("small with train.compile=true", COMPILED, compiled))
    steps.append(
        ("demo, the main job: 900 steps with its evaluations", "main_job", lambda: main_job(out, gpu, deadline))
    )
    # the demo compiled: issue 18's 25 ms a step is a host-bound target (GPU only: compiling
    # takes minutes on a CPU)
    compiled_job = lambda: main_job(out, gpu, deadline, compiled=True)  # noqa: E731
    if gpu or (args.only and MAIN_JOB_COMPILED in args.only):
        steps.append(("demo, the main job with train.compile=true", MAIN_JOB_COMPILED, compiled_job))
    steps.append(
        (
            "the first-step out-of-memory back-off",
            "oom_backoff",
            lambda: oom_backoff(out, gpu, report["presets"].get("small"), deadline),
        )
    )
    fp32 = lambda: main_job(out, gpu, deadline, precision="fp32")  # noqa: E731
    steps.append(("demo, the main job in fp32 (bf16 must learn as well)", "main_job_fp32", fp32))
    if args.only:
        steps = [step for step in steps if step[1] in args.only]
    for title, key, step in steps:
        if deadline.allows_a_step():
            print(f"[kit] {title}", flush=True)
            result = _guarded(out, key, step)
        else:
            print(f"[kit] {title}: skipped, {deadline.left():.0f} s left before the deadline", flush=True)
            result = {"skipped": f"the kit's deadline ({args.deadline_s:.0f} s) came first"}
            report["skipped"].append(key)
        (report["presets"] if key in (*args.presets, COMPILED) else report)[key] = result
        _save(out, report, began, gpu)
    report["complete"] = True
    _save(out, report, began, gpu)
    print_table(report)
    archive = pack_results(out)
    print(f"[kit] report: {out / 'report.json'} ({report['seconds']:.0f} s)")
    print(f"[kit] to share: {archive} ({archive.stat().st_size / 2**20:.1f} MiB: everything but checkpoints)")
    return 1 if report["failures"] or report["skipped"] else 0


def _guarded(out: Path, key: str, step) -> dict:
    """The step's record; a fault in the kit's own code (a figure it did not expect, say) is
    that step's failure, with its traceback in OUT/logs, and the steps after it still run."""
    try:
        return step()
    except Exception as err:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / f"kit-{key}.traceback").write_text(traceback.format_exc())
        print(f"[kit] {key}: the kit's step failed ({type(err).__name__}: {err}); traceback in logs/", flush=True)
        return {"ok": False, "exit_code": None, "error": f"the kit's step failed: {type(err).__name__}: {err}"}


def _save(out: Path, report: dict, began: float, gpu: bool) -> None:
    """report.json as it stands: written after every step, so a kit stopped from outside
    still leaves what it measured."""
    report["targets"] = targets(report, gpu)
    report["seconds"] = round(time.perf_counter() - began, 1)
    runs = [(p, r) for p, r in report["presets"].items() if "skipped" not in r]
    failures = [f"{p}: exit {r['exit_code']}" for p, r in runs if r["exit_code"] != 0]
    tests, backoff = report.get("gpu_tests") or {}, report.get("oom_backoff") or {}
    failures += [] if tests.get("ok", True) or "skipped" in tests else ["the gpu tests failed"]
    failures += [] if backoff.get("ok", True) or "skipped" in backoff else ["the out-of-memory back-off did not finish"]
    for key in ("main_job", "main_job_fp32"):
        job = report.get(key) or {}
        failures += [f"{key}: exit {job['exit_code']}"] if job.get("exit_code") not in (None, 0) else []
    report["failures"] = failures
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
