"""Shared fixtures. Every test session gets its own dataset cache, so tests never read or
write the user's ~/.cache/rigtrain.

Under pytest-xdist (`setup/test.sh` runs three workers) the workers share that cache (one
dataset build, one measurement of each step peak); the demo run and the tests that read it
go to one worker and start first, since it is the longest thing the suite does, while the
other workers run at a lower priority (yield_to_the_demo_run); and each worker and the
commands it runs in-process get their share of the cores as CPU threads (one each on a
2-core machine). A tiny model's step is no faster on two threads than on
one (measured: 40 steps in 6.0 s either way), while two workers each asking for both cores
made the demo run, whose threads wait on each other at every op, three times slower.
Processes started fresh (worker ranks, tune groups, sweep trials) take the threads their
plan gives them, as a user's do, and wait for each other's threads sleeping, not spinning
(OMP_WAIT_POLICY, below).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from preloaded_cli import PreloadedCli

SHARED = Path(__file__).resolve().parents[2] / "shared"
# A model with every part of the real one, small enough for several DeepSpeed runs a minute.
TINY_MODEL = ["model.d_model=32", "model.heads=2", "model.num_latents=8", "model.va_dim=32", "model.vt_dim=32"]


XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
USERS_THREADS = os.environ.get("OMP_NUM_THREADS")


# Test modules whose tests share something expensive: the demo run (test_demo_eval.py) or a
# module-scoped fixture. Under pytest-xdist each of these goes to one worker whole, so
# nothing is built twice; every other test is scheduled on its own. (pytest-xdist's own
# `xdist_group` marks do nothing under pytest 9, which renamed the node id they rewrite.)
SHARING_MODULES = {
    "test_demo_eval.py",
    "test_data.py",
    "test_damaged_checkpoints.py",
    "test_ingest.py",
    "test_multinode.py",
    "test_profile.py",
}


def uses_demo_run(item) -> bool:
    return "demo_run" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """The tests that read the demo run first (it is the longest thing the suite does), then
    the slow ones, and SHARING_MODULES kept true."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        shares = uses_demo_run(item) or (
            fixtures is not None
            and any(d.scope == "module" for defs in fixtures.name2fixturedefs.values() for d in defs)
        )
        if shares and item.path.name not in SHARING_MODULES:
            raise pytest.UsageError(
                f"{item.nodeid} shares a module-scoped fixture or the demo run: add "
                f"{item.path.name} to SHARING_MODULES in tests/conftest.py"
            )
    # Longest first, so that the short tests fill the end: the demo run's tests, then those
    # marked long (a minute or so each, several waiting on a timeout, a budget or ssh: they
    # start while the demo run trains, and their waits are filled by the other worker), then
    # slow (seconds each), then the rest; stable, otherwise in file order. In file order,
    # test_tune's minute-long tests came last and ran alone on one worker.
    items.sort(
        key=lambda item: (
            not uses_demo_run(item),
            item.get_closest_marker("long") is None,
            item.get_closest_marker("slow") is None,
        )
    )


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist (-p no:xdist) there is none
def pytest_xdist_make_scheduler(config, log):
    """Tests one by one to whichever worker is free, except SHARING_MODULES, a module at a
    time; in collection order (the demo run's tests first, then the slow ones)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharingModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if Path(module).name in SHARING_MODULES else nodeid

    config.option.loadscopereorder = False
    return SharingModulesTogether(config, log)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if XDIST_WORKER else base) / "rigtrain-cache"  # the parent: shared by the workers
    cache.mkdir(exist_ok=True)
    saved = {key: os.environ.get(key) for key in ("RIGTRAIN_CACHE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    os.environ["RIGTRAIN_CACHE"] = str(cache)
    if XDIST_WORKER:  # the cores shared out between the workers
        import torch

        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # A command a test runs (run_cli) gets the plan's threads, every core, as a user's
        # run would (a thread count left in its environment would win over the plan's), and
        # shares the cores with the other workers' tests: CPU threads that spin while they
        # wait at each op's end then burn the core their sibling needs. Measured with the
        # other core busy: 30 tiny-model steps on 2 threads in 11.1 s spinning, 4.4 s
        # sleeping (PASSIVE), 3.6 s on 1 thread. (Whether commands run faster here on this
        # worker's share is not settled: fresh-clone suites an hour apart measured 501 s
        # with the plan's threads and 547-607 s with the share or again with the plan's,
        # while the machine itself slowed by half.) Without a GPU or other load a user's
        # run keeps libgomp's default.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
    """`rigtrain train` with the demo preset, as the README runs it (a few minutes; under
    pytest-xdist on this worker's share of the cores): one run per test session, shared by
    every test that checks what a finished demo has."""
    run = tmp_path_factory.mktemp("demo") / "run"
    yield_to_the_demo_run(others=True)
    try:
        result = run_cli("train", "--out", str(run), timeout=1500)
    finally:
        yield_to_the_demo_run(others=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


# How far the other pytest-xdist workers step back while the demo run trains: at nice 10 a
# process gets about a tenth of the share of one at nice 0 on a busy core.
DEMO_PRIORITY_NICE = 10


def yield_to_the_demo_run(*, others: bool) -> None:
    """The demo run is the suite's longest path (one thread, four to five minutes); the
    other workers' tests wait on sleeps, timeouts and each other, and a third worker fills
    those gaps. While the demo trains the other workers (and the processes they started,
    and will start) run at a lower priority, so that it keeps a core; once it is done this
    worker steps back as far, and all run alike again. (Priority can only be lowered
    without privileges, so each worker lowers, never raises.)"""
    if not XDIST_WORKER:
        return
    import psutil  # only under pytest-xdist, where there are other workers to step back

    me = psutil.Process()
    if not others:
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), DEMO_PRIORITY_NICE))
        for child in me.children(recursive=True):  # this worker's preloaded_cli server
            _lower_priority(child)
        return
    for sibling in me.parent().children():
        if sibling.pid != me.pid:
            for process in (sibling, *sibling.children(recursive=True)):
                _lower_priority(process)


def _lower_priority(process) -> None:
    import psutil  # the caller's import; here for the exception type

    try:
        process.nice(max(process.nice(), DEMO_PRIORITY_NICE))
    except psutil.Error:  # gone, or not ours to change
        pass


PRELOADED = PreloadedCli()
# RIGTRAIN_TEST_FRESH=1: every command in a fresh interpreter, as a user's shell starts it
FRESH = os.environ.get("RIGTRAIN_TEST_FRESH") == "1"


def run_cli(
    *args: str,
    timeout: float = 600,
    cwd: Path | None = None,
    fresh: bool = False,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`rigtrain ARGS` as a user runs it, in its own process: forked from one that has
    already imported torch and DeepSpeed (tests/preloaded_cli.py says what that saves and
    what it does not prove), or with fresh=True a new interpreter. The command gets the CPU
    threads the plan gives a user's run (all the cores), not this worker's share, unless
    env_extra sets OMP_NUM_THREADS: a thread count in the environment wins over the plan's,
    as a user's does. env_extra: variables added to the command's environment (fault
    injection, a user's settings)."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if USERS_THREADS is not None:
        env["OMP_NUM_THREADS"] = USERS_THREADS
    env.update(env_extra or {})
    if fresh or FRESH:
        return subprocess.run(
            [sys.executable, "-m", "rigtrain", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
        )
    return PRELOADED.run(list(args), env=env, cwd=cwd, timeout=timeout)


def run_script(script: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in its own process, forked from the preloaded one as run_cli's
    commands are (RIGTRAIN_TEST_FRESH=1: a new interpreter)."""
    if FRESH:
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout)
    return PRELOADED.run(list(args), env=dict(os.environ), cwd=None, timeout=timeout, script=script)


def pytest_sessionfinish(session, exitstatus):
    PRELOADED.close()
