"""One process of a tune's worker group (`python -m rigtrain.tune.worker --tune-dir D --queue Q`):
it joins the process group once, then runs the queue's trials one after another, each a
real Trainer (engine, data loader, step) built from the trial's config.json, timed over
whole steps after its warm-up, and torn down before the next (docs/tune.md).

A trial that fails on a rank (out of memory, an error) is written down by that rank at once
(TRIALS/NNN/rank-R.json), then every rank exchanges its outcome through a gloo group before
the next trial: all agree on the same record. If a rank failed where the others were still
inside a collective, they cannot reach that exchange; the driver sees the rank's record,
stops the group after a few seconds and starts a new one for the trials left."""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import psutil
import torch

from rigtrain.files import write_json
from rigtrain.train.engine import init_distributed
from rigtrain.train.rehearsal import FAULT_OOM_ABOVE
from rigtrain.train.stopping import die_with_launcher, exit_without_teardown, keep_native_crash_stacks
from rigtrain.train.trainer import Trainer
from rigtrain.train.worker import out_of_memory
from rigtrain.tune.records import (
    LEAKED_EXIT,
    combine,
    next_chunk_steps,
    read_result,
    round_leader,
    trial_dir,
    window_verdict,
)

# Fault injection for the tests (like rehearsal.FAULT_OOM_ABOVE, which trials honour too):
# a trial with this micro-batch never returns from its first step, as a hung collective.
FAULT_HANG = "RIGTRAIN_FAULT_HANG_MICRO_BATCH"
FAULT_RANKS = "RIGTRAIN_FAULT_RANKS"  # "1" or "0,2": only these ranks fail (default: all)
# "12:0.3,3:1.0": each step of a trial with micro-batch 12 takes 0.3 s more, of 3 1.0 s more,
# so that the tests' races have a known outcome on a machine whose speed varies by half
FAULT_SLOW = "RIGTRAIN_FAULT_SLOW_MICRO_BATCH"
LEAK_TOLERANCE_BYTES = 256 * 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tune-dir", required=True)
    parser.add_argument("--queue", required=True)
    args = parser.parse_args()
    die_with_launcher()
    keep_native_crash_stacks(None)  # a crash's stacks, or a hung trial's, in this rank's log (its stderr)
    tune_dir, queue = Path(args.tune_dir), wait_for_queue(Path(args.queue))
    # The plan's environment (OMP_NUM_THREADS, NCCL settings) came from the driver, which
    # set it before this process imported torch.
    first = json.loads((trial_dir(tune_dir, queue["trials"][0]) / "config.json").read_text())
    return TrialRunner(tune_dir, Path(args.queue), queue, first["plan"]).run()


def wait_for_queue(queue_file: Path) -> dict:
    """The group's queue. The first group is started while the driver still plans (it
    writes the queue once the trials are known): meanwhile this process has imported torch,
    and imports DeepSpeed and torch._dynamo, which torch's optimizers import as the first
    one is made (2.2 s of the first trial's build on this 2-core CPU). DeepSpeed's Muon
    modules are not imported: init_distributed puts stand-ins in their place before any
    engine is made (engine.without_deepspeed_muon). The process was started with the
    plan's environment (DS_ACCELERATOR, OMP_NUM_THREADS), which DeepSpeed reads."""
    import deepspeed  # noqa: F401 - the imports are the point: see above
    import torch._dynamo  # noqa: F401

    # What the imports made lives as long as the process: frozen, the collection after
    # each trial (TrialRunner.run) and those during its steps leave it alone. It took
    # 0.33-0.43 s a trial on this CPU, as long as a losing trial's timed steps.
    gc.freeze()

    while not queue_file.exists():
        time.sleep(0.05)  # the driver writes it atomically (files.write_json)
    return json.loads(queue_file.read_text())


class TrialRunner:
    def __init__(self, tune_dir: Path, queue_file: Path, queue: dict, plan: dict):
        self.tune_dir, self.queue_file, self.queue = tune_dir, queue_file, queue
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = init_distributed(plan, int(os.environ.get("LOCAL_RANK", "0")))
        self.control = torch.distributed.new_group(backend="gloo") if self.world > 1 else None
        self.longest_s = 0.0  # the longest trial so far: one that cannot finish in time is not begun

    def run(self) -> int:
        baseline = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        code, position = 0, 0
        while True:
            trials = self.queue["trials"]
            if position == len(trials):
                if self.queue.get("open"):
                    # the driver may add trials (the next round); it stops this group when it
                    # has none, and the group dies with the driver however the driver ends
                    time.sleep(0.2)
                    self.queue = self._shared_queue()
                    continue
                break
            index = trials[position]
            position += 1
            folder = trial_dir(self.tune_dir, index)
            if (folder / "result.json").exists():
                continue  # done before this group started (a group restarted after a failure)
            time_left = self.queue["deadline"] - time.time()
            if not self._all(time_left > self.longest_s * 1.2):
                break  # the budget would cut it short: the driver reports the rest as not run
            started = time.time()
            if self.rank == 0:
                write_json(folder / "started.json", {"time": started})
            window = {
                "timed_s": self.queue["timed_s"],
                "min_steps": self.queue["min_steps"],
                **self.queue.get("timing", {}).get(str(index), {}),
            }
            window["bar"] = self._bar(window.get("race_against", []))
            outcome = self._trial(folder, window)
            outcomes = self._gather(outcome)
            self.longest_s = max(self.longest_s, time.time() - started)
            if self.rank == 0:
                write_json(folder / "result.json", combine(outcomes))
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                kept = torch.cuda.memory_allocated(self.device) - baseline
                if not self._all(kept <= LEAK_TOLERANCE_BYTES):
                    code = LEAKED_EXIT
                    break
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return code

    def _bar(self, rivals: list[int]) -> tuple[int, float] | None:
        """The fastest finished trial of this trial's round, as rank 0 reads the records: the
        bar this trial races against (records.window_verdict)."""
        if not rivals:
            return None
        mine = None
        if self.rank == 0:
            mine = round_leader({index: read_result(self.tune_dir, index) for index in rivals})
        return mine if self.world == 1 else self._gather(mine)[0]

    def _shared_queue(self) -> dict:
        """The queue file as rank 0 reads it now, the same on every rank (each reading the
        file itself could see two versions of it)."""
        mine = json.loads(self.queue_file.read_text()) if self.rank == 0 else None
        return mine if self.world == 1 else self._gather(mine)[0]

    # -- agreement through the gloo group ------------------------------------------------------
    def _gather(self, outcome: dict) -> list[dict]:
        if self.world == 1:
            return [outcome]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, outcome, group=self.control)
        return out

    def _all(self, flag: bool) -> bool:
        return all(o for o in self._gather(bool(flag)))

    def _max(self, value: float) -> float:
        return max(self._gather(float(value)))

    # -- one trial ----------------------------------------------------------------------------
    def _trial(self, folder: Path, window: dict) -> dict:
        """This rank's outcome: the timed steps' seconds, data wait and peak memory, or the
        failure. Whatever happens, the trial's engine and loader are gone afterwards."""
        trainer = None
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            # torch.compile keeps up to 8 compiled versions per function, then runs the rest
            # eagerly without a word: each compiled trial starts from an empty cache.
            torch._dynamo.reset()
            trainer = TrialTrainer(folder, self.control)
            self._inject_faults(trainer)
            return self._timed(trainer, window)
        except Exception as err:  # noqa: BLE001 - every failure is a trial's result, not the tune's end
            status = "oom" if out_of_memory(err) else "failed"
            line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            record = {"status": status, "rank": self.rank, "error": f"{type(err).__name__}: {line}"}
            write_json(folder / f"rank-{self.rank}.json", record)
            del err  # its traceback holds the trial's tensors
            return record
        finally:
            if trainer is not None:
                trainer.close()
                engine = getattr(trainer, "engine", None)
                if engine is not None and hasattr(engine, "destroy"):
                    engine.destroy()  # DeepSpeed's hooks and partitioned tensors
                del trainer

    def _inject_faults(self, trainer: TrialTrainer) -> None:
        ranks = os.environ.get(FAULT_RANKS)
        if ranks and str(self.rank) not in ranks.split(","):
            return
        micro_batch = trainer.config.train.micro_batch_size
        slower = dict(pair.split(":") for pair in os.environ.get(FAULT_SLOW, "").split(",") if pair)
        if str(micro_batch) in slower:
            step, extra_s = trainer.train_step, float(slower[str(micro_batch)])
            trainer.train_step = lambda: (step(), time.sleep(extra_s))[0]
        if os.environ.get(FAULT_HANG) == str(micro_batch):
            while True:
                time.sleep(3600)
        limit = os.environ.get(FAULT_OOM_ABOVE)
        if limit and micro_batch > int(limit):
            raise torch.OutOfMemoryError(
                f"out of memory at micro-batch {micro_batch} (injected: {FAULT_OOM_ABOVE}={limit})"
            )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, trainer: TrialTrainer, window: dict) -> dict:
        """Warm-up steps (allocations, the loader's start, compilation), then the timed
        window: whole steps, data included, every rank starting together, timed in chunks
        (the slowest rank's time of each counts) until the window is full or the trial
        trails its round's fastest in every chunk (records.window_verdict)."""
        process = psutil.Process()
        started = time.perf_counter()
        compiled = trainer.config.train.compile
        for _ in range(self.queue["compiled_warmup_steps" if compiled else "warmup_steps"]):
            trainer.train_step()
        self._sync()
        warmup_s = time.perf_counter() - started
        t = trainer.config.train
        clips_per_step = t.micro_batch_size * t.grad_accum_steps * self.world
        bar = window.get("bar")
        if self.control is not None:
            torch.distributed.barrier(group=self.control)
        rss = process.memory_info().rss
        trainer._restart_step_clock()  # data wait counts from here
        chunks: list[tuple[int, float]] = []
        while True:
            steps = next_chunk_steps(chunks, self.queue["max_steps"])
            began = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
                if self.device.type != "cuda":
                    rss = max(rss, process.memory_info().rss)
            self._sync()
            chunks.append((steps, self._max(time.perf_counter() - began)))
            verdict = window_verdict(
                chunks, clips_per_step, window["timed_s"], window["min_steps"], self.queue["max_steps"],
                bar[1] if bar else None,
            )  # fmt: skip
            if verdict:
                break
        gib = 2**30
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / gib
            reserved = torch.cuda.max_memory_reserved(self.device) / gib
        else:
            peak = reserved = rss / gib
        outcome = {
            "status": "ok",
            "rank": self.rank,
            "seconds": sum(s for _, s in chunks),
            "steps": sum(n for n, _ in chunks),
            "clips_per_step": clips_per_step,
            "data_wait_s": trainer.data_wait_since_log,
            "warmup_s": warmup_s,
            "peak_gib": peak,
            "reserved_gib": reserved,
        }
        if verdict == "raced out":
            outcome.update(raced_out=True, against=bar[0], bar_clips_per_s=round(bar[1], 2))
        return outcome


class TrialTrainer(Trainer):
    """The Trainer of a run, in a group it does not own: it takes the group's control group
    instead of making one, leaves the process group up when it closes, and logs nothing
    (the tune records the trial)."""

    owns_process_group = False

    def __init__(self, run_dir, control_group):
        self._shared_control = control_group
        super().__init__(run_dir)

    def _make_control_group(self):
        return self._shared_control

    def _set_up_log(self, saved: dict, resumed: bool) -> None:
        self.log = None


if __name__ == "__main__":
    exit_without_teardown(main())  # every trial's record is written by now
