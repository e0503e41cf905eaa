"""`rigtrain sweep`: the spec (bad ones name the key), where trials run (rig files), the
pruning hook on a run's metrics, and a real sweep of a tiny demo on the CPU that prunes,
is killed, resumes with the same command and picks a best trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, run_cli

from rigtrain.config import load_config
from rigtrain.errors import UserError
from rigtrain.rig.rig_file import read_rig_file
from rigtrain.sweep.placement import trial_slots
from rigtrain.sweep.spec import read_spec

RIGS = Path(__file__).parent / "rigs"
ROOT = Path(__file__).resolve().parents[1]

GOOD = """
preset = "demo"
set = ["train.steps=20"]
metric = "loss"
trials = 4
[space]
"train.lr" = { log = [1e-5, 1e-2] }
"model.num_latents" = { choices = [8, 16] }
"train.warmup_steps" = { range = [1, 5] }
"""


def test_a_spec_reads_into_a_search_space(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(GOOD)
    spec = read_spec(path)
    assert (spec.metric, spec.direction, spec.sampler, spec.pruner, spec.trials) == (
        "loss",
        "minimize",
        "tpe",
        "hyperband",
        4,
    )
    kinds = {p.key: p.kind for p in spec.space}
    assert kinds == {"train.lr": "log", "model.num_latents": "choices", "train.warmup_steps": "int"}
    assert read_spec(ROOT / "examples" / "sweep-demo.toml").trials >= 6


@pytest.mark.parametrize(
    "change, named",
    [
        (("trials = 4", "trials = 0"), "trials"),
        (('metric = "loss"', 'metric = "accuracy"'), "metric"),
        (('"train.lr"', '"train.nope"'), "train.nope"),
        (("{ log = [1e-5, 1e-2] }", "{ log = [0, 1e-2] }"), "space.train.lr"),
        (("{ range = [1, 5] }", "{ range = [5, 1] }"), "space.train.warmup_steps"),
        (("{ choices = [8, 16] }", "{ choices = ['x'] }"), "model.num_latents"),
        (('preset = "demo"', 'preset = "demo"\nsampler = "bayes"'), "sampler"),
        (('preset = "demo"', 'preset = "demo"\nbudget = 3'), "budget"),
        (('set = ["train.steps=20"]', 'set = ["train.stepz=20"]'), "train.stepz"),
    ],
)
def test_bad_specs_are_one_line_naming_the_key(tmp_path, change, named):
    path = tmp_path / "s.toml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        read_spec(path)


def test_grid_needs_a_countable_space(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(GOOD.replace('metric = "loss"', 'metric = "loss"\nsampler = "grid"'))
    with pytest.raises(UserError, match="grid"):
        read_spec(path)


def test_trials_run_one_per_gpu_or_group_and_one_at_a_time_on_the_cpu():
    assert trial_slots(read_rig_file(RIGS / "cpu_only.json")) == [()]
    four = read_rig_file(RIGS / "four_4090_no_p2p.json")
    assert trial_slots(four) == [(0,), (1,), (2,), (3,)]
    assert trial_slots(four, 2) == [(0, 1), (2, 3)]
    assert trial_slots(read_rig_file(RIGS / "mixed_3090_3060.json")) == [(0,), (1,)]  # each planned for its card
    assert trial_slots(read_rig_file(RIGS / "h200.json"), 1) == [(0,)]
    with pytest.raises(UserError, match="gpus_per_trial"):
        trial_slots(four, 5)


def test_the_pruning_hook_reports_each_logged_value_and_stops_the_run(tmp_path):
    import optuna

    from rigtrain.sweep.search import RunningTrial, Sweep

    class FakeRun:
        signals: list = []

        def send_signal(self, signum):
            self.signals.append(signum)

        def poll(self):
            return None

    spec_path = tmp_path / "s.toml"
    spec_path.write_text(GOOD)
    sweep = Sweep.__new__(Sweep)
    sweep.spec, sweep.say = read_spec(spec_path), lambda line: None
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=5.0))
    run_dir = tmp_path / "trial"
    run_dir.mkdir()
    running = RunningTrial(study.ask(), run_dir, FakeRun(), 0)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 2, "loss": 4.0}) + "\n" + '{"step": 4, "lo')  # the last line half written
    sweep._follow(running)
    assert running.last_step == 2 and not running.pruning and FakeRun.signals == []
    metrics.write_text(json.dumps({"step": 2, "loss": 4.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n")
    sweep._follow(running)
    assert study.trials[0].intermediate_values == {2: 4.0, 4: 9.0}
    assert running.pruning and FakeRun.signals == [signal.SIGTERM]


SWEEP = """
preset = "demo"
set = {base}
metric = "loss"
sampler = "grid"
pruner = "successive_halving"
trials = 4
[space]
"train.lr" = {{ choices = [1e-6, 1e-5, 1e-3, 1e-2] }}
"""


def _sweep_command(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rigtrain", "sweep", str(spec), "--out", str(out)]


@pytest.mark.slow
@pytest.mark.long
def test_a_sweep_prunes_is_killed_resumes_and_picks_a_best_trial(tmp_path):
    base = [*TINY_MODEL, "data.workers=0", "eval.during_training=false", "train.steps=24", "train.log_every=2"]
    base += ["train.ckpt_every=6", "train.warmup_steps=1", "log.histograms_every=0"]
    spec = tmp_path / "sweep.toml"
    spec.write_text(SWEEP.format(base=json.dumps(base)))
    out = tmp_path / "sweep"
    # killed hard once the first trial (which no pruner stops: it has no others to lose to) has
    # saved: its run saves again on the SIGTERM its parent's death sends, and stays RUNNING
    driver = subprocess.Popen(_sweep_command(spec, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while not list((out / "trial-0000" / "checkpoints").glob("*/complete.json")):
        assert driver.poll() is None and time.monotonic() < deadline, "the sweep ended before trial 0 saved"
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(3)  # the orphaned run finishes its save and exits
    result = run_cli("sweep", str(spec), "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    states = [t["state"] for t in record["trials"]]
    assert len(states) == 4 and "running" not in states
    assert "pruned" in states, states
    assert record["best"] is not None and "resuming" in result.stdout
    assert "resuming at step" in (out / "trial-0000" / "sweep-trial.log").read_text()
    best = record["trials"][record["best"]]
    config = load_config("demo", str(out / "best.toml"))
    assert config.train.lr == pytest.approx(best["params"]["train.lr"]) and config.train.steps == 24
    assert (out / "sweep.png").is_file() and (out / "tb").is_dir()
    assert all((out / f"trial-{n:04d}" / "tb").is_dir() for n in range(4))  # tensorboard --logdir SWEEP_DIR


def _hear_hangup_and_ctrl_z() -> None:
    for signum in (signal.SIGHUP, signal.SIGTSTP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.slow
def test_a_closed_terminal_stops_a_sweep_politely_and_it_says_how_to_continue(tmp_path):
    """SIGHUP (or Ctrl-C, SIGTERM: the same handler) while a trial trains: the trial's run is
    sent SIGTERM and saves, the study keeps it running for the same command to resume, and
    the sweep writes its results and says how to go on, exit 129. Before that, Ctrl-Z pauses
    the trial with the sweep, and SIGCONT (`fg`) continues it."""
    base = [*TINY_MODEL, "data.workers=0", "eval.during_training=false", "train.steps=400", "train.log_every=1"]
    base += ["train.ckpt_every=1000", "log.histograms_every=0"]
    spec = tmp_path / "sweep.toml"
    spec.write_text(SWEEP.format(base=json.dumps(base)))
    out = tmp_path / "sweep"
    driver = subprocess.Popen(
        _sweep_command(spec, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_hear_hangup_and_ctrl_z,  # even if the suite runs under nohup
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        metrics = out / "trial-0000" / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # the trial trains
            assert driver.poll() is None and time.monotonic() < deadline, "the first trial never trained"
            time.sleep(0.1)
        # Ctrl-Z and `fg` first: the trial, in a session of its own, pauses with the sweep
        import psutil

        trial = psutil.Process(driver.pid).children()
        driver.send_signal(signal.SIGTSTP)
        while psutil.Process(driver.pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.05)
        # SIGSTOP takes effect when a process is next scheduled: the trial may stop a moment after
        while any(p.status() != psutil.STATUS_STOPPED for p in trial) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.status() for p in trial] == [psutil.STATUS_STOPPED]
        steps = metrics.read_text().count("\n")
        time.sleep(1.0)
        assert metrics.read_text().count("\n") == steps  # no step while paused
        driver.send_signal(signal.SIGCONT)
        while metrics.read_text().count("\n") < steps + 2:
            assert driver.poll() is None and time.monotonic() < deadline, "the trial never went on"
            time.sleep(0.1)
        driver.send_signal(signal.SIGHUP)
        stdout, stderr = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 128 + signal.SIGHUP, stdout[-2000:] + stderr[-2000:]
    assert "[sweep] paused (Ctrl-Z) with its 1 trial process(es)" in stderr
    assert "Traceback" not in stderr and "stopped by SIGHUP; continue with the same command" in stdout
    assert "stopped by SIGTERM after step" in (out / "trial-0000" / "sweep-trial.log").read_text()
    said = (out / "sweep.log").read_text()  # what it said, kept beside the study
    assert said.startswith("=== ") and "stopped by SIGHUP; continue with the same command" in said
    assert list((out / "trial-0000" / "checkpoints").glob("*/complete.json"))  # saved on the way out
    record = json.loads((out / "sweep.json").read_text())
    assert record["trials"][0]["state"] == "running"  # for the same command to resume


def test_a_damaged_study_database_is_one_line_saying_what_to_do(tmp_path):
    spec = tmp_path / "sweep.toml"
    spec.write_text(GOOD)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "study.db").write_bytes(bytes(range(256)) * 8)  # not SQLite: a disk's damage, a stray file
    result = run_cli("sweep", str(spec), "--out", str(out))
    lines = [line for line in result.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "study.db" in lines[0] and "not a database" in lines[0] and "moved aside" in lines[0]
