"""Measure ahead the step peaks rigtrain's planner needs for the presets, the rig files in
tests/rigs and the test suite's configurations, and write them to the table shipped with
rigtrain (rigtrain/train/measured_step_peaks.json; see rigtrain/train/step_peaks.py).

    python bench/step_peaks.py                  # measure (a few CPU-minutes) and add to the table
    python bench/step_peaks.py --from-cache DIR # add what a RIGTRAIN_CACHE folder measured

After a run of the whole suite, its cache holds what the table lacked (the training tests
plan too); `--from-cache /tmp/pytest-of-$USER/pytest-current/rigtrain-cache` adds it.

What is measured: everything the planner measures while the tests that plan run
(tests/test_rig.py, test_launch.py, test_config.py and test_tune.py's planning tests), in
a fresh cache and with the table set aside; then the table's current entries and the new
measurements are written together.
A measurement is a pure function of the key (model, clip shape, micro-batch,
checkpointing, precision) and the code fingerprint, so the table is correct for as long as
the fingerprint matches; after an edit to rigtrain/model/, rig/step_memory.py or
train/measured_step.py, or a new torch, it no longer applies (tests/test_rig.py says so)
and this script writes it again. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rigtrain.files import write_json  # noqa: E402
from rigtrain.train.step_peaks import SHIPPED, cached_entries, code_fingerprint, shipped_table  # noqa: E402

# The tests whose plans the table covers; -m "not slow" leaves out those that train for real.
PLANNING_TESTS = ["tests/test_rig.py", "tests/test_launch.py", "tests/test_config.py", "tests/test_tune.py"]


def measure_through_the_tests(base: Path) -> Path:
    """Run the planning tests in one process with a fresh cache; returns the cache folder.
    The table is set aside meanwhile, so that everything is measured again, and put back
    if the tests fail."""
    aside = SHIPPED.with_suffix(".json.aside")
    if SHIPPED.exists():
        SHIPPED.replace(aside)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"]
    # the tests that read the table itself cannot run while it is set aside
    reading_the_table = "not shipped_step_peaks and not without_importing_torch"
    command += ["--basetemp", str(base), "-m", "not slow", "-k", reading_the_table, *PLANNING_TESTS]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    finally:
        if aside.exists():
            aside.replace(SHIPPED)  # the old table stays until a new one is written whole
    if result.returncode != 0:
        sys.exit(f"bench/step_peaks.py: the planning tests failed; fix them first:\n{result.stdout[-3000:]}")
    return base / "rigtrain-cache"  # tests/conftest.py's session cache without xdist


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-cache", type=Path, help="a RIGTRAIN_CACHE folder to take the measurements from")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rigtrain-step-peaks-") as tmp:
        cache = args.from_cache or measure_through_the_tests(Path(tmp) / "pytest")
        # what the table holds stays while it is current: a value is a function of its key
        peaks = {**shipped_table(), **cached_entries(cache)}
    if not peaks:
        print(f"bench/step_peaks.py: no measurements made with this code in {cache / 'step-peaks'}", file=sys.stderr)
        return 2
    import torch  # the version the table was measured with, for tests/test_rig.py to compare

    record = {"fingerprint": code_fingerprint(), "torch": torch.__version__, "peaks": dict(sorted(peaks.items()))}
    write_json(SHIPPED, record, indent=1)  # whole or not at all
    took = time.monotonic() - started
    print("| fingerprint | measurements | seconds |\n|---|---:|---:|")
    print(f"| {record['fingerprint']} | {len(peaks)} | {took:.0f} |")
    print(json.dumps({"fingerprint": record["fingerprint"], "measurements": len(peaks), "seconds": round(took, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
