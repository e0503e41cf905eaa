"""`rigtrain tune`: measure the configurations the planner predicts to fit, fastest-predicted
first, within a time budget, and keep the fastest (docs/tune.md).

The driver (this process) plans the candidates and writes each one's run config, then
starts one worker group per process count (a GPU rig has one: every GPU), which runs its
queue of trials without restarting (tune/worker.py). The driver only watches: it reads
each trial's record as it lands, cuts off a trial that hangs (a timeout) or whose rank
failed while the others wait in a collective, starts a fresh group for the trials left,
and stops everything when the budget is spent."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from rigtrain.files import write_json
from rigtrain.tune.groups import LiveGroup, WorkerGroups
from rigtrain.tune.phases import PHASES, SKIPPED, neighbours, phase_winner
from rigtrain.tune.records import (
    Timing,
    clips_per_step,
    finished_speed,
    outcome_words,
    read_result,
    read_started,
    trial_dir,
)
from rigtrain.tune.report import choose, trial_row

# The first round's share of the budget (every candidate, short windows); the rest confirms
# the plan's own choice and the CONFIRM_TOP fastest with windows CONFIRM_WINDOW times longer,
# which the choice is made on: a short window favours loader threads, whose prefetched
# batches were made during the warm-up, and one trial's noise can pass for a gain.
SCREEN_SHARE = 0.7
CONFIRM_TOP = 3
CONFIRM_WINDOW = 3
NOT_RUN = {"status": "not run", "error": "the budget ran out before it"}
# A trial's own settings, beside the configuration it measures: no evaluation, checkpoint,
# profile or logging step inside the timed window (a logging step waits for the GPU).
TRIAL_SETTINGS = {
    "train.steps": 10**6,
    "train.ckpt_every": 10**6,
    "train.log_every": 10**6,
    "eval.during_training": False,
    "profile.enabled": False,
}


def say_progress(line: str) -> None:
    print(f"[tune] {line}", flush=True)


class Search(WorkerGroups):
    def __init__(self, tune_dir: Path, candidates: list, timing: Timing, deadline: float, say=None, first_group=None):
        self.tune_dir, self.candidates, self.timing = tune_dir, candidates, timing
        self.say = say or say_progress
        self.deadline = deadline  # time.time() by which all trials end
        self.printed: set[int] = set()
        self.groups_started = 0
        self.processes: list[subprocess.Popen] = []
        self.live: LiveGroup | None = None  # the group that is up, between trials or rounds
        # trial index -> the candidate it measures: candidates' own indices, then confirmations
        self.measures = {c.index: c for c in candidates if c.pruned is None}
        self.confirmations: dict[int, int] = {}  # candidate index -> its confirmation trial's index
        self.one_round = False  # every candidate was a finalist: each ran once, with long windows
        self.plan_again: int | None = None  # the trial measuring the plan's own choice after the others
        if first_group is not None:
            self._adopt(*first_group)

    # -- the two rounds -----------------------------------------------------------------------
    def run(self) -> None:
        """Every candidate once with short windows, then the plan's own choice and the
        fastest few again with longer ones, for the choice (docs/tune.md, "The choice").
        When there are no more candidates than finalists, each runs once with the long windows."""
        screen = list(self.measures)
        long_s, long_steps = self.timing.timed_s * CONFIRM_WINDOW, self.timing.min_steps * CONFIRM_WINDOW
        if len(screen) <= 1 + CONFIRM_TOP:
            # every candidate would be a finalist: a short first round would only order them.
            # The plan's own choice sets the bar with a short window; the others run the long
            # one, a loser stopping early, and one that leads has the plan's own measured again
            # with the long window, after it (the choice never rests on a short window alone).
            self.one_round = True
            self.say(
                f"all {len(screen)} are finalists: one round, the plan's own choice setting the bar, "
                "the others with the confirmation's longer windows"
            )
            self._round(screen[:1], self.deadline, self.timing.timed_s, self.timing.min_steps, True, rivals=screen)
            self._round(screen[1:], self.deadline, long_s, long_steps, True, rivals=screen)
            self._mark_not_run(screen)
            self._measure_plan_again(long_s, long_steps)
            return
        now = time.time()
        self._first_round(screen, now + (self.deadline - now) * SCREEN_SHARE)
        finalists = self._finalists()
        if len(finalists) < 2:
            self.close_group()
            return
        first = len(self.candidates)
        for n, candidate in enumerate(finalists):
            index = first + n
            self.measures[index], self.confirmations[candidate.index] = candidate, index
            folder = trial_dir(self.tune_dir, index)
            folder.mkdir(parents=True)
            shutil.copy(trial_dir(self.tune_dir, candidate.index) / "config.json", folder / "config.json")
        self.say(
            f"confirming the plan's own choice and the {len(finalists) - 1} fastest "
            f"({', '.join(str(c.index) for c in finalists)}) with {CONFIRM_WINDOW}x longer windows"
        )
        self._round(list(self.confirmations.values()), self.deadline, long_s, long_steps, True)
        self._measure_plan_again(long_s, long_steps)

    def _measure_plan_again(self, long_s: float, long_steps: int) -> None:
        """When another configuration beat the plan's own choice, the plan's own is measured
        once more, after it, and counts at the better of its measurements (report.choose): a
        machine that sped up while the trials ran would otherwise pass for a gain, and a
        change of configuration needs to be a gain."""
        try:
            confirmations = self.confirmation_results()
            rows = [
                trial_row(c, self.result(c.index), confirmations.get(c.index))
                for c in self.candidates
            ]  # fmt: skip
            best, _, _, kept = choose(rows)
            if best is None or best["baseline"] or kept or rows[0]["status"] != "ok" or time.time() >= self.deadline:
                return
            # after every candidate's index (pruned ones have theirs, with no folder) and confirmation
            index = max(len(self.candidates) - 1, *self.measures) + 1
            self.measures[index], self.plan_again = self.candidates[0], index
            trial_dir(self.tune_dir, index).mkdir(parents=True)
            shutil.copy(trial_dir(self.tune_dir, 0) / "config.json", trial_dir(self.tune_dir, index) / "config.json")
            self.say(f"trial {best['index']} leads: measuring the plan's own choice once more, after it")
            self._round([index], self.deadline, long_s, long_steps, False)
            self._mark_not_run([index])
        finally:
            self.close_group()

    def _first_round(self, screen: list[int], deadline: float) -> None:
        """The plan's own choice, then each phase's neighbours of the fastest so far
        (phases.py), short windows, every trial racing against the round's fastest. What no
        phase reached is `skipped` when the phases ended, `not run` when the budget did."""
        short = (self.timing.timed_s, self.timing.min_steps)
        baseline = self.candidates[0]
        self._round([baseline.index], deadline, *short, True, rivals=screen)
        center, tried = baseline, {baseline.index}
        for name, keys in PHASES:
            if time.time() >= deadline:
                break
            indices = neighbours(self.candidates, center, keys, tried)
            if not indices:
                continue
            self.say(f"{name}: {len(indices)} around trial {center.index}")
            tried.update(indices)
            self._round(indices, deadline, *short, True, rivals=screen)
            speeds = {i: v for i in [center.index, *indices] if (v := finished_speed(self.result(i))) is not None}
            center = self.measures[phase_winner(center.index, indices, speeds)]
        self._mark_not_run(sorted(tried))
        finished = time.time() < deadline
        for index in screen:
            if index not in tried:
                self._record(index, {"status": "skipped", "error": SKIPPED} if finished else NOT_RUN)

    def mark_stopped(self, signal_name: str) -> None:
        """After a Ctrl-C or SIGTERM: the trial in flight was cut off by it, the rest never ran."""
        cut = {"status": "cut off", "error": f"stopped by {signal_name} during it"}
        never = {"status": "not run", "error": f"the tune was stopped by {signal_name} before it"}
        for index in self.measures:
            if self.result(index) is None:
                self._record(index, cut if self.started(index) else never)

    def _mark_not_run(self, indices: list[int]) -> None:
        for index in indices:
            if self.result(index) is None:
                self._record(index, NOT_RUN)

    def _finalists(self) -> list:
        """The plan's own choice (if it ran) and the fastest others of the first round that
        ran their whole window: one stopped early already trails a finished trial by more
        than the noise, so measuring it again would spend the budget on a known loser."""
        ok = [c for c in self.candidates if c.pruned is None and (self.result(c.index) or {}).get("status") == "ok"]
        speed = {
            c.index: clips_per_step(c) * self.result(c.index)["steps"] / self.result(c.index)["seconds"] for c in ok
        }
        contenders = (c for c in ok if not c.baseline and not self.result(c.index).get("raced_out"))
        others = sorted(contenders, key=lambda c: -speed[c.index])[:CONFIRM_TOP]
        baseline = [c for c in ok if c.baseline]
        return baseline + others if baseline else []

    def _round(
        self,
        indices: list[int],
        deadline: float,
        timed_s: float,
        min_steps: int,
        keep_open: bool,
        rivals: list[int] | None = None,
    ) -> None:
        """Every trial of `indices`, one group per process count. The group that is still up
        from the round before goes first and takes its trials; with keep_open, the round's
        last group stays up afterwards for the next round. Each trial races against the
        fastest finished trial of `rivals` (default: `indices`)."""
        worlds = list(dict.fromkeys(self.measures[i].world for i in indices))  # the baseline's first
        if self.live and self.live.world in worlds:
            worlds.remove(self.live.world)
            worlds.insert(0, self.live.world)
        for n, world in enumerate(worlds):
            queue = [i for i in indices if self.measures[i].world == world]
            left = [i for i in indices if self.measures[i].world in worlds[n:]]
            # the time left, shared by the groups left in proportion to their trials
            group_deadline = time.time() + (deadline - time.time()) * len(queue) / len(left)
            stay = keep_open and n == len(worlds) - 1
            while True:
                remaining = [i for i in queue if self.result(i) is None]
                if not remaining or time.time() >= group_deadline:
                    break
                timing = {str(i): self._window(i, rivals or indices, timed_s, min_steps) for i in remaining}
                outcome = self._run_on_group(world, remaining, group_deadline, timing, stay)
                if outcome != "restart":
                    break
            if not stay:
                self.close_group()

    def _window(self, index: int, round_indices: list[int], timed_s: float, min_steps: int) -> dict:
        """A trial's window: its length, and the trials of its round it races against (any
        that finished before it; worker.py). The plan's own choice never stops early: the
        speed-up is measured against it."""
        rivals = [] if self.measures[index].baseline else [i for i in round_indices if i != index]
        return {"timed_s": timed_s, "min_steps": min_steps, "race_against": rivals}

    # -- records ------------------------------------------------------------------------------
    def started(self, index: int) -> float | None:
        return read_started(self.tune_dir, index)

    def result(self, index: int) -> dict | None:
        return read_result(self.tune_dir, index)

    def confirmation_results(self) -> dict[int, dict | None]:
        """Candidate -> its confirmation trial's record, a trial it trailed named by its
        candidate (the table shows candidates; trial 24 may be trial 0 measured again)."""
        out = {}
        for candidate, index in self.confirmations.items():
            result = self.result(index)
            if result and result.get("raced_out"):
                result = {**result, "against": self.measures[result["against"]].index}
            out[candidate] = result
        return out

    def _record(self, index: int, record: dict) -> None:
        write_json(trial_dir(self.tune_dir, index) / "result.json", record)
        self._print_new()

    def _print_new(self) -> None:
        for index, c in self.measures.items():
            if index not in self.printed:
                result = self.result(index)
                if result is not None:
                    self.printed.add(index)
                    if result["status"] == "skipped":
                        continue  # counted under the table, not announced one by one
                    again = f" again (trial {c.index})" if index != c.index else ""
                    if result.get("raced_out") and result["against"] != self.measures[result["against"]].index:
                        result = {
                            **result,
                            "against": f"{result['against']} (trial {self.measures[result['against']].index} again)",
                        }
                    self.say(f"trial {index}{again}: {c.describe()}: {outcome_words(c, result)}")
