"""A tune's worker groups as processes: started like the training launcher starts ranks
(one per rank, each in its own session, dying with the driver), stopped with their loader
workers, and what a dead one last said; and the Search's side of them (WorkerGroups, a
mixin): a group kept up between rounds and given more trials, and the watch that cuts off
a trial that hangs or whose rank failed while the others wait in a collective."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rigtrain.files import write_json
from rigtrain.train.processes import last_line
from rigtrain.train.rendezvous import port_file_env
from rigtrain.train.stopping import LAUNCHER_PID, show_their_stacks
from rigtrain.tune.records import LEAKED_EXIT, rank_failures

WORKER_MODULE = "rigtrain.tune.worker"


def start_group(tune_dir: Path, queue_file: Path, world: int, plan_env: dict, name: str) -> list[subprocess.Popen]:
    """One worker per rank, each in its own session (so a kill reaches its loader workers
    too) and dying with this process, as the training launcher starts them."""
    (tune_dir / "logs").mkdir(exist_ok=True)
    meeting = meeting_place(tune_dir, name)
    shutil.rmtree(meeting, ignore_errors=True)  # a port from an earlier group of this name is no one's now
    meeting.mkdir()
    shared = {
        **os.environ,
        **plan_env,
        **port_file_env(meeting),
        "MASTER_ADDR": "127.0.0.1",
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        LAUNCHER_PID: str(os.getpid()),
    }
    command = [sys.executable, "-m", WORKER_MODULE, "--tune-dir", str(tune_dir.resolve()), "--queue", str(queue_file)]
    processes = []
    for rank in range(world):
        with open(tune_dir / "logs" / f"{name}-rank-{rank}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return processes


def meeting_place(tune_dir: Path, name: str) -> Path:
    """Where rank 0 of group NAME tells the others its store's port (a group of one has no
    need of it); removed with the group."""
    return tune_dir / "logs" / f"{name}-store"


def kill(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in processes:
        p.wait()


def exit_words(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


# After a rank records a failure, the others have this long to agree on it before the
# driver decides they are stuck in a collective the failed rank will never join.
FAILURE_GRACE_S = 5.0


@dataclasses.dataclass
class LiveGroup:
    """A worker group that is up: its processes and its queue (which the driver may extend)."""

    world: int
    processes: list
    queue_file: Path
    queue: dict
    logs: list


class WorkerGroups:
    """The Search's worker groups: the one that is up (`live`), run, watched and closed."""

    def _run_on_group(self, world: int, remaining: list[int], deadline: float, timing: dict, stay: bool) -> str:
        """The trials left on the group that is up for this process count (they are added to
        its queue), or on a new one. Returns how the watch ended: "done" (every trial has its
        record and the group stays up), "exited", "deadline", or "restart" (a fresh group for
        the rest)."""
        live = self.live
        if live and live.world == world and all(p.poll() is None for p in live.processes):
            live.queue.update(trials=live.queue["trials"] + remaining, open=stay, deadline=deadline)
            live.queue["timing"].update(timing)
            write_json(live.queue_file, live.queue)
        else:
            self.close_group()
            self.groups_started += 1
            name = f"group-{self.groups_started}"
            queue = self._new_queue(remaining, timing, stay, deadline)
            queue_file = self.tune_dir / f"{name}.json"
            write_json(queue_file, queue)
            env = self.measures[remaining[0]].plan.env
            processes = start_group(self.tune_dir, queue_file, world, env, name)
            logs = [self.tune_dir / "logs" / f"{name}-rank-{r}.log" for r in range(world)]
            self.live = LiveGroup(world, processes, queue_file, queue, logs)
        self.processes = self.live.processes
        outcome = self._watch(remaining, deadline, self.live.logs, stay)
        if outcome != "done":
            self.close_group()
        return outcome

    def _adopt(self, world: int, processes: list) -> None:
        """The group the driver started while it planned (command.py), for the plan's own
        process count: it is importing meanwhile, and waits for its queue file, which the
        first round writes. If the first round wants another process count, it is stopped."""
        self.groups_started += 1
        name = f"group-{self.groups_started}"
        queue = self._new_queue([], {}, True, self.deadline)
        logs = [self.tune_dir / "logs" / f"{name}-rank-{r}.log" for r in range(world)]
        self.live = LiveGroup(world, processes, self.tune_dir / f"{name}.json", queue, logs)
        self.processes = processes

    def _new_queue(self, trials: list[int], timing: dict, stay: bool, deadline: float) -> dict:
        return {
            "trials": trials,
            "timing": timing,
            "open": stay,
            "deadline": deadline,
            "warmup_steps": self.timing.warmup_steps,
            "compiled_warmup_steps": self.timing.compiled_warmup_steps,
            "timed_s": self.timing.timed_s,
            "min_steps": self.timing.min_steps,
            "max_steps": self.timing.max_steps,
        }

    def close_group(self) -> None:
        """Stop the group that is up, if any (between trials it is only waiting for work)."""
        if self.live:
            kill(self.live.processes)
            # the port it named is no one's now (group-N.json: group-N)
            shutil.rmtree(meeting_place(self.tune_dir, self.live.queue_file.stem), ignore_errors=True)
            self.live, self.processes = None, []

    def _watch(self, remaining: list[int], deadline: float, logs: list[Path], open_ended: bool) -> str:
        while True:
            self._print_new()
            if open_ended and all(self.result(i) is not None for i in remaining):
                return "done"
            codes = [p.poll() for p in self.processes]
            current = next((i for i in remaining if self.started(i) and self.result(i) is None), None)
            now = time.time()
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if not bad:
                    return "exited"
                if all(c == LEAKED_EXIT for _, c in bad):
                    self.say("the workers kept memory after a trial; starting a fresh group for the rest")
                    return "restart"
                rank, code = bad[0]
                victim = current if current is not None else next(i for i in remaining if self.result(i) is None)
                self._record(
                    victim,
                    {
                        "status": "failed",
                        "error": f"worker rank {rank} {exit_words(code)}: {last_line(logs[rank])}",
                        "ranks": [r for r, _ in bad],
                    },
                )
                return "restart"
            if current is not None:
                failures = rank_failures(self.tune_dir, current)
                if failures and now - min(f["at"] for f in failures) > FAILURE_GRACE_S:
                    # the failed rank waits to agree; the others wait inside a collective for it
                    record = {
                        "status": "oom" if any(f["status"] == "oom" for f in failures) else "failed",
                        "ranks": sorted(f["rank"] for f in failures),
                        "error": failures[0]["error"],
                        "note": "the other ranks were left waiting in a collective; the workers were restarted",
                    }
                    self._record(current, record)
                    return "restart"
                if now - self.started(current) > self.timing.trial_timeout_s:
                    show_their_stacks(self.live.processes)  # where each rank waited, in its log
                    self._record(
                        current,
                        {
                            "status": "timeout",
                            "error": f"no result after {self.timing.trial_timeout_s:.0f} s "
                            f"(--trial-timeout-s); the workers were restarted (where each rank was, its Python "
                            f"stacks: {logs[0].with_name(logs[0].name.replace('-rank-0', '-rank-*'))})",
                        },
                    )
                    return "restart"
            if now >= deadline:
                if current is not None:
                    self._record(current, {"status": "cut off", "error": "the budget ran out during it"})
                return "deadline"
            time.sleep(0.2)
