"""`rigtrain sweep SPEC`: an Optuna study over config keys, each trial a normal training run
in SWEEP_DIR/trial-NNNN, pruned early on its own logged metrics (docs/sweep.md).

The driver asks Optuna for a trial, starts `rigtrain train` for it (a fresh process per
trial, on its own GPU(s) when the rig has several), reads the run's metrics.jsonl as it
grows and reports the metric at every step it is logged; when the pruner says stop, the run
gets SIGTERM (it saves a checkpoint and exits) and the trial is told PRUNED. The study
lives in SWEEP_DIR/study.db (SQLite) or the spec's storage URL, so the same command after
an interruption continues: trials that were running are resumed from their checkpoints,
the count goes on where it stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from rigtrain.config.loading import as_set_value
from rigtrain.errors import UserError
from rigtrain.sweep.placement import trial_slots
from rigtrain.sweep.spec import SweepSpec, read_spec
from rigtrain.terminal import command_header, copy_output_to, pausing_together
from rigtrain.train.launch import prepare_run_dir
from rigtrain.train.processes import last_line, new_run_dir, terminate_with_parent
from rigtrain.train.stopping import stop_signals

STUDY = "rigtrain-sweep"
SWEEP_LOG = "sweep.log"  # every line the sweep prints, appended by each command run on the folder
POLL_S = 0.5


def _say(line: str) -> None:
    print(f"[sweep] {line}", flush=True)


@dataclass
class RunningTrial:
    trial: object  # optuna.trial.Trial
    run_dir: Path
    process: subprocess.Popen
    slot: int
    read: int = 0  # bytes of metrics.jsonl read so far
    last_step: int = 0
    last_value: float | None = None
    pruning: bool = False
    log: object = field(default=None, repr=False)


class Sweep:
    def __init__(self, spec: SweepSpec, sweep_dir: Path, trials: int, budget_s: float | None, say=_say):
        import optuna  # heavy (SQLAlchemy): only when a sweep runs

        self.optuna, self.spec, self.sweep_dir, self.total = optuna, spec, sweep_dir, trials
        self.say = say
        self.deadline = time.time() + budget_s if budget_s else None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = spec.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
        try:
            self.study = optuna.create_study(
                study_name=STUDY,
                storage=storage,
                load_if_exists=True,
                direction=spec.direction,
                sampler=_sampler(optuna, spec, trials),
                pruner=_pruner(optuna, spec),
            )
        except (ImportError, ValueError, OSError) as err:  # a bad URL, a missing driver, an unwritable file
            raise UserError(
                f"sweep spec {spec.path}: storage {storage!r} cannot be opened ({err}); fix storage"
            ) from None
        except Exception as err:
            if type(err).__module__.startswith("sqlalchemy"):  # the database refused
                raise UserError(
                    f"sweep spec {spec.path}: storage {storage!r}: {str(err).splitlines()[0]}; a damaged "
                    "database file moved aside starts the study afresh"
                ) from None
            raise
        from rigtrain.train.planning import check_torch_trains_here, machine_rig  # NVML, torch: once the spec is read

        rig = machine_rig([sweep_dir])
        check_torch_trains_here(rig, None)  # else every trial would stop on it, or train on the CPU
        self.slots = trial_slots(rig, spec.gpus_per_trial)
        self.running: dict[int, RunningTrial] = {}  # slot -> its trial
        self.stopped: str | None = None

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        states = self.optuna.trial.TrialState
        # trials an interrupted sweep left running: resumed first, as slots come free
        left = list(self.study.get_trials(deepcopy=False, states=(states.RUNNING,)))
        while True:
            while left and self._free_slot() is not None:
                frozen = left.pop(0)
                trial = self.optuna.trial.Trial(self.study, frozen._trial_id)
                self.say(f"trial {frozen.number}: resuming the run an interrupted sweep left")
                self._start(trial, self._free_slot(), resume=True, reported=max(frozen.intermediate_values, default=0))
            done = len(self.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL)))
            time_left = self.deadline is None or time.time() < self.deadline
            while done + len(self.running) + len(left) < self.total and time_left and self._free_slot() is not None:
                self._start(self.study.ask(), self._free_slot(), resume=False)
            if not self.running and not left:
                return
            for slot, running in list(self.running.items()):
                self._follow(running)
                if running.process.poll() is not None:
                    self._finish(running)
                    del self.running[slot]
            time.sleep(POLL_S)

    def stop(self, why: str) -> None:
        """Ctrl-C or SIGTERM: every running trial saves and stops; they stay RUNNING in the
        study, so the same command resumes them."""
        self.stopped = why
        for running in self.running.values():
            if running.process.poll() is None:
                running.process.send_signal(signal.SIGTERM)
        for running in self.running.values():
            running.process.wait()
            self._close(running)
        self.running.clear()

    def _free_slot(self) -> int | None:
        return next((i for i in range(len(self.slots)) if i not in self.running), None)

    # -- one trial ------------------------------------------------------------------------------
    def _start(self, trial, slot: int, resume: bool, reported: int = 0) -> None:
        run_dir = self.sweep_dir / f"trial-{trial.number:04d}"
        values = {p.key: p.suggest(trial) for p in self.spec.space}
        params = [f"{key}={as_set_value(value)}" for key, value in values.items()]
        gpus = self.slots[slot]
        placement = [f"rig.gpus={','.join(map(str, gpus))}"] if gpus else []
        command = [sys.executable, "-m", "rigtrain", "train", "--out", str(run_dir), "--preset", self.spec.preset]
        if self.spec.config_file:
            command += ["--config", self.spec.config_file]
        if resume:
            _wait_for_the_old_run(run_dir)
        if resume and (run_dir / "checkpoints").is_dir():
            command.append("--resume")
        elif resume:  # it died before its first checkpoint: start it again
            for stale in ("config.json", "metrics.jsonl"):
                (run_dir / stale).unlink(missing_ok=True)
        command += ["--set", *self.spec.overrides, *params, *placement]
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "sweep-trial.log", "a")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=terminate_with_parent
        )
        trial.set_user_attr("run_dir", str(run_dir))
        if not resume:
            where = f" on GPU {','.join(map(str, gpus))}" if gpus else ""
            shown = " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={as_set_value(v)}" for k, v in values.items()
            )
            self.say(f"trial {trial.number}{where}: {shown}")
        # a resumed trial's metrics.jsonl repeats the steps it reported before: not again
        self.running[slot] = RunningTrial(trial, run_dir, process, slot, last_step=reported, log=log)

    def _follow(self, running: RunningTrial) -> None:
        """Report every new value of the metric; prune when the pruner says so."""
        path = running.run_dir / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(running.read)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # whole lines only: the last may be half written
        running.read += end
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            value, step = row.get(self.spec.metric), row.get("step")
            if value is None or step is None or step <= running.last_step:
                continue
            running.last_step, running.last_value = step, float(value)
            running.trial.report(float(value), step)
            if not running.pruning and running.trial.should_prune():
                running.pruning = True
                self.say(f"trial {running.trial.number}: pruned at step {step} ({self.spec.metric} {value:.4g})")
                running.process.send_signal(signal.SIGTERM)

    def _finish(self, running: RunningTrial) -> None:
        self._follow(running)
        self._close(running)
        states = self.optuna.trial.TrialState
        code, trial = running.process.returncode, running.trial
        trial.set_user_attr("steps", running.last_step)
        if running.pruning:
            self.study.tell(trial, state=states.PRUNED)
        elif code == 0 and running.last_value is not None:
            self.study.tell(trial, running.last_value)
            self.say(
                f"trial {trial.number}: {self.spec.metric} {running.last_value:.4g} after {running.last_step} steps"
            )
        else:
            why = (
                f"the run logged no {self.spec.metric}"
                if code == 0
                else f"the run ended with exit code {code}: {last_line(running.run_dir / 'sweep-trial.log')}"
            )
            trial.set_user_attr("error", why)
            self.study.tell(trial, state=states.FAIL)
            self.say(f"trial {trial.number}: failed: {why}")

    def _close(self, running: RunningTrial) -> None:
        if running.log is not None:
            running.log.close()
            running.log = None


def _wait_for_the_old_run(run_dir: Path, timeout_s: float = 120.0) -> None:
    """An interrupted sweep's run got SIGTERM when the sweep died and is saving: its lock
    goes when it exits. Resuming before that would be refused as a second run."""
    lock = FileLock(str(run_dir / ".lock"), timeout=timeout_s)
    try:
        lock.acquire()
        lock.release()
    except Timeout:
        raise UserError(
            f"{run_dir} is still held by the run an interrupted sweep started (its lock.json says which "
            "process); stop it, then run the sweep again"
        ) from None


def _sampler(optuna, spec: SweepSpec, trials: int):
    if spec.sampler == "grid":

        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values) -> None:
                """Optuna's grid stops the study from inside study.optimize once every point is
                taken, and raises outside it; this driver counts its trials itself."""

        return Grid({p.key: p.grid() for p in spec.space}, seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=max(2, trials // 3))


def _trial_count(spec: SweepSpec, asked: int | None) -> int:
    """The trials to run: --trials, else the spec's; a grid has no more than its points."""
    count = asked or spec.trials
    if spec.sampler == "grid":
        points = 1
        for p in spec.space:
            points *= len(p.grid())
        count = min(count, points)
    return count


def _pruner(optuna, spec: SweepSpec):
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    # The step is the resource: the first rung at prune_after_steps, where the losses have
    # left their common start (at step 1 every trial has the same loss, give or take noise).
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.prune_after_steps, reduction_factor=3)
    return optuna.pruners.HyperbandPruner(min_resource=spec.prune_after_steps, reduction_factor=3)


def sweep(spec_path: str, *, out: str | None, trials: int | None, budget_s: float | None, as_json: bool) -> int:
    spec = read_spec(spec_path)
    sweep_dir = Path(out) if out else new_run_dir(f"sweep-{spec.path.stem}")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UserError(f"--out {sweep_dir}: a file of that name exists; give a folder for the sweep")
    prepare_run_dir(sweep_dir)  # made and writable, or one line
    say = (lambda line: print(f"[sweep] {line}", file=sys.stderr, flush=True)) if as_json else _say
    with copy_output_to(sweep_dir / SWEEP_LOG, command_header()):  # what it says outlives the terminal
        return _sweep(spec, sweep_dir, trials, budget_s, as_json, say)


def _sweep(spec, sweep_dir: Path, trials: int | None, budget_s: float | None, as_json: bool, say) -> int:
    from rigtrain.sweep.report import write_sweep_results  # matplotlib, TensorBoard: once the trials are done

    runner = Sweep(spec, sweep_dir, _trial_count(spec, trials), budget_s, say)
    say(
        f"sweep {spec.path.name} into {sweep_dir}: {runner.total} trials of preset {spec.preset}, "
        f"{spec.metric} ({spec.direction}), {spec.sampler} sampler, {spec.pruner} pruner, "
        f"{len(runner.slots)} at a time; the study is in {spec.storage or sweep_dir / 'study.db'}"
    )

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def paused(count: int) -> str:
        return f"[sweep] paused (Ctrl-Z) with its {count} trial process(es); `fg` or `bg` continues them all"

    def pause_is_not_budget(seconds: float) -> None:
        if runner.deadline is not None:
            runner.deadline += seconds  # --budget-s is time the sweep had to run trials

    previous = {s: signal.signal(s, interrupted) for s in stop_signals()}  # a closed terminal too
    try:
        with pausing_together(paused, on_continue=pause_is_not_budget):  # the trials pause with it
            runner.run()
    except KeyboardInterrupt as why:
        runner.stop(str(why) or "SIGINT")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = write_sweep_results(runner.study, spec, sweep_dir, as_json=as_json, stopped=runner.stopped)
    if runner.stopped:
        say(f"stopped by {runner.stopped}; continue with the same command (its --out: {sweep_dir})")
        return 128 + getattr(signal, runner.stopped if runner.stopped.startswith("SIG") else "SIGINT").value
    return code
