"""`rigtrain tune` as a command: the arguments checked, the candidates planned and their
trial folders written, the search run under the budget (search.py), the results written
(report.py), and a Ctrl-C or SIGTERM that stops the workers but keeps what was measured."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import time
from pathlib import Path

from rigtrain.config import load_config
from rigtrain.config.loading import user_keys
from rigtrain.errors import UserError
from rigtrain.terminal import command_header, copy_output_to, pausing_together
from rigtrain.train.stopping import stop_signals
from rigtrain.tune.groups import kill, meeting_place, start_group
from rigtrain.tune.records import Timing, trial_dir
from rigtrain.tune.search import TRIAL_SETTINGS, Search, say_progress

TUNE_LOG = "tune.log"  # every line a tune prints once it has planned, appended by each tune in the folder


class Interrupted(Exception):
    pass


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _paused(going_on: int) -> str:
    return (
        f"rigtrain tune: paused (Ctrl-Z); its {going_on} worker process(es) finish what they are measuring (a pause "
        "in the middle of a measurement would count as slowness) and wait; `fg` continues, Ctrl-C stops the tune "
        "and keeps what was measured"
    )


def tune(
    *,
    preset: str | None,
    config_file: str | None,
    overrides: list[str],
    data: str | None,
    out: str | None,
    rig_file: str | None,
    psu_w: float | None,
    budget_s: float,
    trial_timeout_s: float | None,
    as_json: bool,
    trial_s: float = 3.0,
) -> int:
    from rigtrain.tune.report import write_results  # TensorBoard's writer: only once the trials are done

    began = time.time()
    if budget_s < 20:
        raise UserError(
            f"--budget-s {budget_s:g}: a tune needs at least 20 s (a trial starts the engine and its loader)"
        )
    say = (lambda line: None) if as_json else say_progress
    preset = preset or "demo"
    # The tune's folder is locked from the moment it is made until the results are written.
    with contextlib.ExitStack() as held:
        first_group = FirstGroup()
        try:
            config, fixed, tune_dir, rig, candidates = _plan_trials(
                preset, config_file, overrides, data, out, rig_file, psu_w,
                quiet=as_json, first_group=first_group, hold=held,
            )  # fmt: skip
        except BaseException:
            first_group.stop()
            raise
        held.enter_context(copy_output_to(tune_dir / TUNE_LOG, command_header()))  # what it says from here on, kept
        device = candidates[0].plan.device if candidates[0].plan else "cpu"
        runnable = sum(c.pruned is None for c in candidates)
        say(
            f"{len(candidates)} configurations of preset {preset} planned in {time.time() - began:.0f} s: "
            f"{runnable} to measure, {len(candidates) - runnable} pruned; budget {budget_s:.0f} s, "
            f"trials of {trial_s:g} s after {Timing.warmup_steps} warm-up step "
            f"({Timing.compiled_warmup_steps} compiled) (in {tune_dir})"
        )
        timing = Timing(trial_timeout_s or (300.0 if device == "cuda" else 120.0), timed_s=trial_s)
        finishing_s = 5.0  # the results, the TOML and TensorBoard's hparams, after the last trial
        search = Search(tune_dir, candidates, timing, began + budget_s - finishing_s, say, first_group.adoptable())
        previous = {s: signal.signal(s, _interrupt) for s in stop_signals()}  # a closed terminal too
        stopped = None
        try:
            with pausing_together(_paused, children=False):
                search.run()
        except Interrupted as why:
            stopped = str(why)
            search.close_group()  # its workers, and where they met
            search.mark_stopped(stopped)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        code = write_results(
            tune_dir,
            candidates,
            {c.index: search.result(c.index) for c in candidates if c.pruned is None},
            search.confirmation_results(),
            one_round=search.one_round,
            plan_again=search.result(search.plan_again) if search.plan_again is not None else None,
            preset=preset,
            fixed={k: _value(config, k) for k in sorted(fixed)},
            rig=rig,
            budget_s=budget_s,
            elapsed_s=time.time() - began,
            stopped=stopped,
            as_json=as_json,
        )
        return 128 + getattr(signal, stopped).value if stopped else code


class FirstGroup:
    """The first worker group, started as soon as the plan's own choice is planned: its
    processes import torch and torch._dynamo (which DeepSpeed's first initialize needs) while
    the driver counts FLOPs and plans the other candidates (about 2 s of a short CPU tune),
    then wait for their queue (search.py)."""

    def __init__(self):
        self.world, self.processes, self.tune_dir = 0, [], None

    def start(self, tune_dir: Path, plan) -> None:
        from rigtrain.train.planning import with_user_environment  # torch: the planner has it by now

        env = with_user_environment(copy.deepcopy(plan)).env
        self.world, self.tune_dir = plan.world_size, tune_dir
        self.processes = start_group(tune_dir, tune_dir / "group-1.json", self.world, env, "group-1")

    def stop(self) -> None:
        """The planning failed or was stopped: the group goes, and where its ranks met."""
        kill(self.processes)
        if self.tune_dir is not None:
            shutil.rmtree(meeting_place(self.tune_dir, "group-1"), ignore_errors=True)

    def adoptable(self) -> tuple[int, list] | None:
        return (self.world, self.processes) if self.processes else None


def _plan_trials(
    preset, config_file, overrides, data, out, rig_file, psu_w, *, quiet: bool, first_group=None, hold=None
):
    """The config, the keys the user set, the tune folder (locked for as long as `hold`, an
    ExitStack, lasts), the rig, and the candidates, each one to run with its trial folder
    written (a run's config.json, as `train` writes it)."""
    from rigtrain.data.dataset import open_dataset  # torch, numpy: after the arguments are checked

    # torch, through the planner and the data checks: after the arguments are checked
    from rigtrain.train.launch import (
        check_data,
        prepare_run_dir,
        resolve_data,
        write_run_config,
    )
    from rigtrain.train.planning import check_torch_trains_here, machine_rig  # torch: after the arguments are checked
    from rigtrain.train.processes import RunLock, new_run_dir  # with launch's, after the arguments are checked
    from rigtrain.tune.candidates import make_candidates, with_values  # the planner (torch)

    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # before anything starts CUDA, as train does
    if data is not None:
        overrides = [*overrides, f"data.dir={Path(data).resolve()}"]
    config = load_config(preset, config_file, overrides)
    fixed = user_keys(config_file, overrides)
    made_here = out is None or not Path(out).exists()  # removed again if the tune fails before it measures
    tune_dir = Path(out) if out else new_run_dir(f"{preset}-tune")
    if (tune_dir / "tune.json").exists() or (tune_dir / "config.json").exists():
        raise UserError(f"--out {tune_dir} already holds a tune or a run; choose another --out")
    prepare_run_dir(tune_dir)
    log = (lambda line: None) if quiet else (lambda line: print(f"[rigtrain] {line}", flush=True))
    if hold is not None:
        hold.enter_context(RunLock(tune_dir, busy=TUNE_BUSY, made_here=made_here))
    _set_aside_an_unfinished_tune(tune_dir, log)
    data_dir = resolve_data(config, log=log)
    rig = machine_rig([data_dir, tune_dir], rig_file)
    check_torch_trains_here(rig, rig_file, config.rig.gpus)
    start = (lambda plan: first_group.start(tune_dir, plan)) if first_group is not None else None
    candidates = make_candidates(config, rig, fixed, psu_w=psu_w, on_baseline=start)
    if candidates[0].pruned:
        raise UserError(
            f"the plan's own configuration cannot run here ({candidates[0].pruned}); "
            "`rigtrain rig` says why; choose a smaller preset or fix the keys it names"
        )
    dataset = open_dataset(data_dir, config.data)  # once: the candidates differ in how they read it, not in what
    for c in candidates:
        if c.pruned is None:
            trial_config = with_values(c.config, TRIAL_SETTINGS)
            say = log if c is candidates[0] else None
            _, split = check_data(data_dir, trial_config, c.world, say=say, dataset=dataset)
            write_run_config(
                trial_dir(tune_dir, c.index), trial_config, data_dir, rig, c.plan, {"split": split.to_dict()}
            )
    return config, fixed, tune_dir, rig, candidates


def _value(config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


TUNE_BUSY = "a tune or a run is already running there ({who}); wait for it to end, or choose another --out"


def _set_aside_an_unfinished_tune(tune_dir: Path, log) -> None:
    """A tune killed where it could not write its results (SIGKILL, a power cut, the machine
    gone) leaves trials/ without tune.json. The same command starts it again: its trials
    were measured in another session, perhaps for other candidates (the workers would take
    a trial with a result as measured), and a tune compares trials within one go. They are
    moved aside into unfinished-TIME/, never deleted."""
    if not (tune_dir / "trials").exists():
        return
    aside = tune_dir / f"unfinished-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for item in sorted(tune_dir.iterdir()):
        if item.name not in (".lock", "lock.json") and not item.name.startswith("unfinished-"):
            item.rename(aside / item.name)
    log(
        f"--out {tune_dir} held a tune that did not finish (no tune.json); its trials are kept in {aside}, "
        "and the tune starts again (trials are compared within one go)"
    )
