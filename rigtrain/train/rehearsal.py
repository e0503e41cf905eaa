"""The first steps' rehearsal of what later steps need, so that a plan that does not fit
fails where the launcher can back off the micro-batch: every collective before the first
step, then after it one batch of evaluation and the save's barrier. The window closes after
the second step, the first whose activations live beside the optimizer's states (the
optimizer makes them in the first step's update, after its activations are freed: on an
H200, `small`'s second step peaked 0.24 GiB above its first, its states' size); then, on a
GPU, the plan's predicted memory is checked against what the steps used (docs/planner.md).
A mixin of the Trainer."""

from __future__ import annotations

import json
import os

import torch

from rigtrain.evaluate.evaluation import eval_batch_size
from rigtrain.files import write_json
from rigtrain.profile.telemetry import physical_gpu_index  # CUDA's index -> NVML's
from rigtrain.train.memory_record import remember, run_kind

# Fault injection (the GPU kit's --cpu mode, the tests): the first steps "run out of memory"
# when the micro-batch is above this, as on a card with less free than the plan was told,
# so the launcher's back-off runs for real on any machine.
FAULT_OOM_ABOVE = "RIGTRAIN_FAULT_OOM_ABOVE_MICRO_BATCH"


def own_use_gib(local_rank: int) -> float | None:
    """This process's memory on its card as NVML counts it (its context, libraries, NCCL and
    torch's allocator), or None where NVML cannot say (PIDs of another namespace in a
    container; WSL2 lists no processes)."""
    try:
        import pynvml  # optional: as for telemetry

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(physical_gpu_index(local_rank))
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == os.getpid() and process.usedGpuMemory:
                    return process.usedGpuMemory / 2**30
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, or it cannot list processes here
        return None
    return None


def in_use_before_run(rig: dict | None, local_rank: int) -> float:
    """What this rank's card held when the run was planned (the rig in config.json, read by
    the probe before any rank started: the driver's reservation, a desktop, other programs)."""
    gpus = (rig or {}).get("gpus") or []
    index = physical_gpu_index(local_rank)
    if index >= len(gpus):  # a rig of another machine (a node of a multi-node run): nothing known
        return 0.0
    total, free = gpus[index].get("memory_gib"), gpus[index].get("memory_free_gib")
    return max(0.0, total - free) if total is not None and free is not None else 0.0


class FirstStepRehearsal:
    def _warm_up_collectives(self) -> None:
        """Every collective the run uses later, once now: NCCL allocates its buffers outside
        torch's allocator at a communicator's first use, and on the first real GPU run that
        first use was the barrier before the first checkpoint, when the allocator held the
        whole card (608 bytes could not be had, and every step was lost)."""
        probe = torch.ones(1, device=self.device)
        torch.distributed.all_reduce(probe)
        torch.distributed.all_gather([torch.empty_like(probe) for _ in range(self.world)], probe)
        torch.distributed.barrier()

    def _rehearse_later_needs(self) -> None:
        """After the first step, what later steps need beyond a train step, done once while
        an out-of-memory still makes the launcher back off: a batch of evaluation and the
        collectives of a save. Then the plan is checked against the card."""
        if self.eval_steps:
            module = self.engine.module
            module.eval()
            try:
                batch = eval_batch_size(self.config.train.micro_batch_size, self.device)
                self._embed_share(self.split.heldout[: batch * self.world])  # one batch a rank
            finally:
                module.train()
        torch.distributed.barrier()

    def _settle(self) -> None:
        """After the second step (or a run's only step): the first steps' peak is the run's,
        so an out-of-memory from here on is not the launcher's to back off from."""
        limit = os.environ.get(FAULT_OOM_ABOVE)  # injected as late as a real one can come
        if limit and self.config.train.micro_batch_size > int(limit):
            raise torch.OutOfMemoryError(
                f"out of memory at micro-batch {self.config.train.micro_batch_size} "
                f"(injected: {FAULT_OOM_ABOVE}={limit})"
            )
        if self.device.type == "cuda":
            self._check_memory()
        self.settled = True

    def _check_memory(self) -> None:
        """The plan's predicted peak against what the first steps really used, kept in
        config.json and shown in TensorBoard's setup run: torch's allocated peak (what the
        plan predicts), what its allocator reserved, and what NVML sees for the card (the
        CUDA context, NCCL and library workspaces too). What the card holds beside the
        allocator (the worst rank's) is also kept for the next plan on this card
        (memory_record.py): this process's use as NVML lists it, less torch's reserved; where
        NVML lists no processes, the card's use less reserved and less what the card held
        before the run. The plan starts from the free memory, which leaves that out already
        (until 2026-12-08 it was kept in: a desktop's memory was counted twice)."""
        gib = 2**30
        free, total = torch.cuda.mem_get_info(self.device)
        path = self.run_dir / "config.json"
        record = json.loads(path.read_text())
        reserved_now = torch.cuda.memory_reserved(self.device) / gib
        own = own_use_gib(self.device.index or 0)
        before = in_use_before_run(record.get("rig"), self.device.index or 0)
        outside = own - reserved_now if own is not None else (total - free) / gib - reserved_now - before
        numbers = torch.tensor(
            [
                torch.cuda.max_memory_allocated(self.device) / gib,
                torch.cuda.max_memory_reserved(self.device) / gib,
                (total - free) / gib,
                max(0.0, outside),
            ],
            device=self.device,
        )
        if self.world > 1:
            torch.distributed.all_reduce(numbers, op=torch.distributed.ReduceOp.MAX)
        allocated, reserved, used, outside = numbers.tolist()
        predicted = self.plan.get("predicted_peak_gib")
        predicted_total = (self.plan.get("memory") or {}).get("card_total_gib")
        if not self.log:
            return
        error = (
            f" ({(predicted - allocated) / allocated:+.1%} predicted vs measured)" if predicted and allocated else ""
        )
        self.log.say(
            f"memory: the first steps peaked at {allocated:.2f} GiB allocated per GPU ({reserved:.2f} reserved by "
            f"torch, {used:.2f} in use on the card); the plan predicted "
            f"{predicted if predicted is None else f'{predicted:.2f}'} GiB{error}"
            + (f" and {predicted_total:.2f} GiB on the card" if predicted_total else "")
        )
        record["memory_check"] = {
            "predicted_peak_gib": predicted,
            "measured_peak_gib": round(allocated, 3),
            "reserved_peak_gib": round(reserved, 3),
            "card_used_gib": round(used, 3),
            "predicted_card_total_gib": predicted_total,
            "outside_allocator_gib": round(outside, 3),
            "in_use_before_gib": round(before, 3),
            "predicted_outside_allocator_gib": _planned_outside(self.plan.get("memory") or {}),
            "micro_batch_size": self.config.train.micro_batch_size,
        }
        write_json(path, record)
        remember(
            run_kind(
                card=torch.cuda.get_device_name(self.device),
                software=(record.get("rig") or {}).get("software"),
                world=self.world,
                profiling=self.config.profile.enabled,
                lazy_loading=os.environ.get("CUDA_MODULE_LOADING", "LAZY").upper() != "EAGER",
            ),
            outside,
            self.run_dir,
        )
        self.log.write_text(
            "setup",
            "memory",
            f"predicted {predicted} GiB, measured {allocated:.3f} GiB allocated, "
            f"{reserved:.3f} reserved, {used:.3f} GiB used on the card after the first steps{error}",
        )


def _planned_outside(memory: dict) -> float | None:
    terms = [memory.get(k) for k in ("cuda_context_gib", "nccl_gib", "profiler_gib", "measured_outside_gib")]
    return round(sum(t for t in terms if t), 3) if any(terms) else None
