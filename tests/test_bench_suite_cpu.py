"""bench/suite_cpu.py, on two hand-made tests: one that works and one that waits. Their CPU
figures are the whole machine's, which other pytest-xdist workers share, so only what a
busy machine cannot blur is checked: every test has its row, the wait shows in the wall
time, a failing test makes the exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "suite_cpu.py"

HAND_MADE = """
import time

def test_works():
    total = 0
    for i in range(300_000):
        total += i * i
    assert total

def test_waits():
    time.sleep(0.3)
"""


def test_every_test_gets_a_row_with_its_wall_time_and_a_failure_is_exit_1(tmp_path):
    tests = tmp_path / "test_hand_made.py"
    tests.write_text(HAND_MADE)
    out = tmp_path / "cpu.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), str(tests), "--top", "5", "--json", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = {row["test"].split("::")[-1]: row for row in record["all"]}
    assert set(rows) == {"test_works", "test_waits"} and record["tests"] == 2
    assert rows["test_waits"]["wall_s"] >= 0.3 and all(row["cpu_s"] >= 0 for row in rows.values())
    assert record["cpu_s"] == round(sum(row["cpu_s"] for row in rows.values()), 1)
    assert "CPU s" in result.stdout and "test_hand_made.py::test_waits" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["pytest_exit_code"] == 0

    tests.write_text(HAND_MADE + "\ndef test_fails():\n    assert False\n")
    failed = subprocess.run([sys.executable, str(BENCH), str(tests)], capture_output=True, text=True)
    assert failed.returncode == 1 and "pytest exit code 1" in failed.stdout
