"""Shared fixtures. Every test session gets its own dataset cache, so tests never read or
write the user's ~/.cache/rigtrain."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("rigtrain-cache")
    old = os.environ.get("RIGTRAIN_CACHE")
    os.environ["RIGTRAIN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("RIGTRAIN_CACHE", None)
    else:
        os.environ["RIGTRAIN_CACHE"] = old


@pytest.fixture(scope="session")
def demo_config():
    from rigtrain.config import load_config

    return load_config("demo")


@pytest.fixture(scope="session")
def demo_data(demo_config, isolated_cache) -> Path:
    """The embedded Shapes-world dataset, prepared for the demo preset (built once)."""
    from rigtrain.data.embedded import embedded_dataset

    return embedded_dataset(demo_config.data, log=lambda line: None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is missing: the real test videos live in ../shared beside the repository")
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_data) -> Path:
    """`rigtrain train` with the demo preset, exactly as the README runs it (a few minutes):
    one run per test session, shared by every test that checks what a finished demo has."""
    run = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli("train", "--out", str(run), timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`rigtrain ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "rigtrain", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=os.environ.copy())
