"""Where the test suite's CPU time goes, test by test: what to look at before making CI
faster. On 2 cores the suite under its three workers keeps the machine busy nearly all the
time, so only doing less shortens it, and this says where "less" would count.

    python bench/suite_cpu.py                      # the whole suite, one test at a time
    python bench/suite_cpu.py tests/test_tune.py   # pytest arguments narrow it
    python bench/suite_cpu.py --top 20 --json OUT.json

Each test runs alone (pytest without its workers, libgomp's threads sleeping while they
wait, as under the workers), and its CPU is the whole machine's busy time (/proc/stat)
from its start to its end: the test process, the commands and worker ranks it starts and
the ssh daemons of the two-node test alike, which a process's own accounting would miss
(ranks reparented, daemons not ours). Nothing else should run on the machine meanwhile.
The wall time beside it shows what is waiting (a timeout, a budget, a signal) rather than
working. Prints a table, the total and one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORD_ENV = "RIGTRAIN_SUITE_CPU_RECORD"  # where the plugin half of this file appends its rows


def machine_busy_seconds() -> float:
    """CPU seconds the machine has spent not idle since boot, all cores together."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


# The plugin half: pytest loads this module with `-p suite_cpu` (bench/ on PYTHONPATH).
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of one test, timed together (a fixture's cost goes to the
    first test that needs it, as in a real run)."""
    started, busy = time.monotonic(), machine_busy_seconds()
    yield
    row = {"test": item.nodeid, "wall_s": time.monotonic() - started, "cpu_s": machine_busy_seconds() - busy}
    with open(os.environ[RECORD_ENV], "a") as record:
        record.write(json.dumps(row) + "\n")


def run_suite(pytest_args: list[str]) -> tuple[list[dict], int]:
    with tempfile.TemporaryDirectory() as folder:
        record = Path(folder) / "tests.jsonl"
        record.touch()
        env = {
            **os.environ,
            RECORD_ENV: str(record),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")])),
            "OMP_WAIT_POLICY": "PASSIVE",  # as tests/conftest.py sets it under the workers
        }
        command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "suite_cpu", "-q", *pytest_args]
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
        rows = [json.loads(line) for line in record.read_text().splitlines()]
    return rows, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=25, help="rows in the table (default 25)")
    parser.add_argument("--json", type=Path, help="also write every test's row here")
    args, pytest_args = parser.parse_known_args()
    if not Path("/proc/stat").is_file():
        sys.exit("bench/suite_cpu.py reads /proc/stat: it runs on Linux")
    started = time.monotonic()
    rows, code = run_suite(pytest_args)
    if not rows:
        sys.exit(f"bench/suite_cpu.py: pytest ran no test (exit code {code})")
    rows.sort(key=lambda row: -row["cpu_s"])
    total = sum(row["cpu_s"] for row in rows)
    print(f"{'CPU s':>7}{'wall s':>8}{'cumul.':>8}  test")
    running = 0.0
    for row in rows[: args.top]:
        running += row["cpu_s"]
        print(f"{row['cpu_s']:>7.1f}{row['wall_s']:>8.1f}{running / total:>8.0%}  {row['test']}")
    wall = time.monotonic() - started
    print(f"{len(rows)} tests: {total:.0f} s of CPU in {wall:.0f} s ({os.cpu_count()} cores); pytest exit code {code}")
    summary = {"tests": len(rows), "cpu_s": round(total, 1), "wall_s": round(wall, 1), "pytest_exit_code": code}
    summary["top"] = [
        {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for row in rows[: args.top]
    ]
    if args.json:
        args.json.write_text(json.dumps({**summary, "all": rows}, indent=1))
    print(json.dumps(summary))
    sys.exit(0 if code == 0 else 1)


if __name__ == "__main__":
    main()
