"""Figures in the README that come from the code are regenerated from it, never typed by hand:
this fails when they no longer match."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_flops_table_is_what_the_code_counts():
    flops = _bench("flops")
    current = flops.current_readme_block((ROOT / "README.md").read_text())
    assert current is not None, "README.md lost its flops-table markers"
    assert current == flops.readme_block(flops.measure()), "run `python bench/flops.py --readme`"
