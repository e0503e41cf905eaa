"""bench/fuzz_inputs.py runs (its video part is a test of test_ingest.py, run again here
with another seed) and finds nothing in a short round of every input."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_fuzz_of_every_input_finds_nothing():
    result = subprocess.run(
        # every part but runs, data and profiles (whole commands a case: fuzz_inputs.py --only runs data profiles)
        [
            sys.executable,
            str(ROOT / "bench" / "fuzz_inputs.py"),
            "--rounds",
            "150",
            "--seed",
            "11",
            "--json",
            "--only",
            "rigs",
            "sets",
            "specs",
            "narration",
            "configs",
            "videos",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["input"] for r in report["results"]] == [
        "rig files -> plan",
        "--set KEY=VALUE",
        "sweep specs and curricula",
        "narration files",
        "--config files and hostfiles",
        "damaged videos and sidecars (check, prepare, on demand)",
    ]
    assert all(r["cases"] > 0 and not r["findings"] for r in report["results"]), report
    assert result.returncode == 0, result.stderr[-2000:]
