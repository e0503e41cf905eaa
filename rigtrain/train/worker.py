"""Entry point of one training process (`python -m rigtrain.train.worker --run-dir DIR`),
as torchrun or DeepSpeed's launcher start it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

from rigtrain.errors import TrainingFault, UserError, one_line
from rigtrain.train.run_record import resume_command

# A worker writes it into RUN_DIR when the first steps run out of GPU memory; the launcher
# reads it, backs off one micro-batch size and starts again.
OOM_MARKER = "oom.json"

# Set by the launcher for the ranks it starts on this machine: a file that only the first
# rank to say why the run failed creates, so ranks that meet the same fault (a full disk,
# data gone, a loss that is no longer finite) print one line between them, not one each.
FAULT_SAID = "RIGTRAIN_FAULT_SAID"


def deepspeed_node_mark() -> str | None:
    """FAULT_SAID's file for the ranks DeepSpeed's launcher started on this machine (a
    multi-node run), which our launcher's variable does not reach: named after their common
    parent, DeepSpeed's per-machine launch process, and its start time, so that a later
    launcher given the same process id never finds it made. It stays in /tmp after a fault
    (empty). None outside DeepSpeed's launcher, or where /proc cannot say."""
    if "CROSS_RANK" not in os.environ:  # set by deepspeed.launcher.launch for each rank it starts
        return None
    parent = os.getppid()
    try:
        # field 22 of /proc/PID/stat, the start time; the name (field 2) may hold spaces
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return str(Path(tempfile.gettempdir()) / f"rigtrain-fault-said-{parent}-{started}")


def say_failure(line: str) -> None:
    """`rigtrain: LINE` on stderr, unless another rank of this machine has said why already."""
    mark = os.environ.get(FAULT_SAID) or deepspeed_node_mark()
    if mark:
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        except OSError:
            pass  # the launcher's folder is not on this machine (another node's rank): say it
    print(f"rigtrain: {line}", file=sys.stderr, flush=True)


def apply_plan_env(run_dir: Path) -> None:
    """The plan's environment (NCCL settings, device order, CPU threads), set here as well
    as by the launcher, because DeepSpeed's multi-node launcher forwards only some variables
    to other machines. Values already set (by the launcher, or by the user on that machine)
    win, and the GPU selection is left to the launcher. The plan already holds the user's
    own values where theirs win (train/planning.py, with_user_environment)."""
    plan_env = json.loads((run_dir / "config.json").read_text())["plan"]["env"]
    for key, value in plan_env.items():
        if key != "CUDA_VISIBLE_DEVICES":
            os.environ.setdefault(key, value)


# glibc's names for what MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set (malloc.h)
MALLOPT_OF = {"MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}


def apply_malloc_settings() -> None:
    """The plan's malloc thresholds (rig/cpu_plan.py) in this process too: glibc reads them
    from the environment only at start-up, and a single CPU process trains in the process
    that planned it. Nothing where the C library is not glibc."""
    settings = {MALLOPT_OF[k]: os.environ[k] for k in MALLOPT_OF if os.environ.get(k, "").isdigit()}
    if not settings or not sys.platform.startswith("linux"):
        return
    import ctypes  # only on Linux, and only for a CPU plan

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # musl and others: their own allocator, left as it is
    for parameter, value in settings.items():
        mallopt(parameter, int(value))


def run(run_dir: str | Path) -> int:
    apply_plan_env(Path(run_dir))  # before torch is imported: OMP_NUM_THREADS, NCCL settings
    apply_malloc_settings()
    from rigtrain.train.stopping import GracefulStop, StopRequested  # with the Trainer, after the plan's environment
    from rigtrain.train.trainer import Trainer  # after apply_plan_env: OMP_NUM_THREADS must be set before torch loads

    trainer, code = None, 1
    stop = GracefulStop(Path(run_dir))
    quiet_storage_failures_in_threads(Path(run_dir))
    try:
        trainer = Trainer(run_dir, stop=stop)
        trainer.fit()
        code = 0
    except StopRequested as stopped:
        code = stopped.code
    except UserError as err:
        say_failure(f"error: {one_line(err)}")
        code = 2
    except (FloatingPointError, TrainingFault) as err:
        say_failure(one_line(err))
    except Exception as err:
        if not out_of_memory(err):
            said = peer_trouble(run_dir, trainer, err) or storage_trouble(run_dir, trainer, err)
            say_failure(said or crash_report(run_dir, trainer, err))
        else:
            # In the first steps (the first two steps, one evaluation batch and the collectives a
            # save uses: rehearsal.py) the plan's micro-batch was too large: tell the launcher, which backs off
            # one size and starts again. Later, it is a failure the user has to act on.
            first = trainer is not None and not trainer.settled
            if first:
                (Path(run_dir) / OOM_MARKER).write_text(json.dumps({"rank": trainer.rank, "error": str(err)[:500]}))
            say_failure(oom_message(run_dir, trainer, err, first))
    finally:
        code = close_trainer(trainer, run_dir, code)
        stop.restore()
    return code


def crash_report(run_dir, trainer, err: BaseException) -> str:
    """One line for an error nothing else explains (a bug, a driver's or GPU's fault), its
    whole traceback kept in the run folder for a bug report rather than printed over the
    run's output; printed after all where it cannot be kept."""
    import traceback  # only for a crash

    from rigtrain.train.checkpoints import last_complete_in_words  # torch: only to word a failure

    rank = os.environ.get("RANK", "0")
    report = Path(run_dir) / f"crash-rank{rank}.txt"
    try:
        report.write_text("".join(traceback.format_exception(err)))
        kept = f"its traceback is in {report}, for a bug report"
    except OSError:
        traceback.print_exception(err)
        kept = "its traceback is above"
    first = (str(err).strip().splitlines() or [""])[0][:200]
    hint = ""
    if "cuda" in first.lower() or "cublas" in first.lower() or "cudnn" in first.lower():
        hint = " (whether the GPU or its driver failed: `nvidia-smi -q`, and Xid lines in `sudo dmesg`)"
    saved = last_complete_in_words(Path(run_dir) / "checkpoints")
    return (
        f"rank {rank} failed {_when(trainer)} with {type(err).__name__}: {first}{hint}; {kept}; {saved}; once "
        f"the cause is gone, continue with: {resume_command(run_dir)}"
    )


def _when(trainer) -> str:
    return f"in step {trainer.step + 1}" if trainer is not None else "while starting"


def close_trainer(trainer, run_dir, code: int) -> int:
    """trainer.close(), and the exit code after it: a write the run folder's disk refuses
    while closing (the last metrics, TensorBoard's last events) is one line, and a failure
    if the run had none; after another failure it was said already."""
    if trainer is None:
        return code
    try:
        trainer.close()
    except Exception as err:
        said = storage_trouble(run_dir, trainer, err)
        if said is None:
            raise
        if code == 0:
            say_failure(said)
            return 1
    return code


def quiet_storage_failures_in_threads(run_dir: Path) -> None:
    """A thread that meets a vanished or refused run folder (TensorBoard's event writer)
    ends without its traceback: the training thread says it in one line, at its next
    write or when it closes the writer, which raises the thread's error again."""
    default = threading.excepthook

    def hook(args) -> None:
        from rigtrain.train.saving import storage_failure  # torch: loaded by now, in a training process

        if storage_failure(args.exc_value, run_dir) is None:
            default(args)

    threading.excepthook = hook


def out_of_memory(err: BaseException) -> bool:
    """torch's allocator ran out, or a library that allocates on its own (NCCL, cuBLAS)
    could not: NCCL says "Failed to CUDA calloc" inside a DistBackendError."""
    import torch  # heavy: only on the paths that need it

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        k in text
        for k in ("out of memory", "failed to cuda calloc", "cudaerrormemoryallocation", "cublas_status_alloc_failed")
    )


# How a collective says that the process at its other end is gone: gloo's TCP pairs, NCCL,
# torch's TCP store (the run's rendezvous), a socket written after the peer closed it.
LOST_PEER_WORDS = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "remote process exited",
    "socket closed",
    "nccl communicator was aborted",
)


# How a collective says that it waited too long for another rank: gloo's, NCCL's watchdog
# (when it raises rather than aborts), the rendezvous's store.
PEER_TIMEOUT_WORDS = ("timed out", "collective operation timeout")


def peer_trouble(run_dir, trainer, err: BaseException) -> str | None:
    """One line for a collective that failed because of another rank, in place of this
    one's traceback; None for any other error. A rank that is gone (killed, crashed) is
    named by the launcher, with the checkpoint to resume from; one that hangs is not gone,
    so a rank that waited for it too long says all of it here."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not isinstance(err, RuntimeError):
        return None  # one process alone has no peer
    at = f"stopped {_when(trainer)}"
    rank = os.environ.get("RANK", "?")
    lost = lost_peer(err)
    if lost is not None:
        return f"rank {rank} {at}: the connection to another training process broke ({lost})"
    text = str(err).lower()
    if not any(words in text for words in PEER_TIMEOUT_WORDS):
        return None
    from rigtrain.train.checkpoints import last_complete_in_words  # torch: only to word a failure

    saved = last_complete_in_words(Path(run_dir) / "checkpoints")
    limit = f" ({trainer.config.train.collective_timeout_min:g} min)" if trainer is not None else ""
    return (
        f"rank {rank} {at}: it waited longer than train.collective_timeout_min{limit} for another training "
        f"process that did not answer (a hung GPU, a P2P link that hangs: try NCCL_P2P_DISABLE=1, a stalled "
        f"disk); {saved}; continue with: {resume_command(run_dir)}"
    )


def storage_trouble(run_dir, trainer, err: BaseException) -> str | None:
    """One line for a write the run folder's disk refused outside a save (metrics, logs),
    or for any failure once the folder is gone; None for other errors."""
    from rigtrain.train.saving import storage_failure  # torch: only to word a failure

    trouble = storage_failure(err, Path(run_dir))
    if trouble is None:
        return None
    return (
        f"the run stopped {_when(trainer)}: {trouble}; once the disk and the folder are back, resume with "
        f"`{resume_command(run_dir)}`"
    )


def lost_peer(err: BaseException) -> str | None:
    """How the error said that another rank's process is gone, when a collective or the
    rendezvous failed for that in a run of several processes; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not isinstance(err, RuntimeError):
        return None  # one process alone has no peer to lose
    text = str(err).lower()
    return next((words for words in LOST_PEER_WORDS if words in text), None)


def oom_message(run_dir, trainer, err: BaseException, first: bool) -> str:
    """One line: where it happened, what is saved, what to change."""
    from rigtrain.train.checkpoints import last_complete_in_words  # torch: only to word an out-of-memory message

    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if trainer is None:
        return f"out of GPU memory while starting ({first_line}); lower train.micro_batch_size"
    step = trainer.step + 1
    saved = last_complete_in_words(Path(run_dir) / "checkpoints")
    micro = trainer.config.train.micro_batch_size
    advice = (
        f"lower train.micro_batch_size (now {micro}) or set model.activation_checkpointing=true"
        if not trainer.config.model.activation_checkpointing
        else f"lower train.micro_batch_size (now {micro}) or use train.zero_stage=3"
    )
    then = (
        "the launcher backs off"
        if first
        else f"then continue with `{resume_command(run_dir, '--set', 'train.micro_batch_size=N')}`"
    )
    memory = "GPU memory" if trainer.device.type == "cuda" else "memory"
    return f"out of {memory} at step {step} on rank {trainer.rank} ({first_line}); {saved}; {advice}; {then}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="set by DeepSpeed's launcher; LOCAL_RANK wins")
    args = parser.parse_args()
    from rigtrain.output_relay import OUTPUT_RELAYED  # before torch, as below
    from rigtrain.terminal import copy_output_to, outlive_the_terminal  # before torch, as below
    from rigtrain.train.run_record import RUN_LOG  # before torch, like the rest of this entry point
    from rigtrain.train.stopping import die_with_launcher, keep_native_crash_stacks  # before torch, too

    die_with_launcher()
    outlive_the_terminal()
    # beside the launcher's lines; where the launcher passes on this process's output it copies it too
    log = Path(args.run_dir) / RUN_LOG
    keep_native_crash_stacks(log)
    with contextlib.nullcontext() if os.environ.get(OUTPUT_RELAYED) else copy_output_to(log):
        return run(args.run_dir)


if __name__ == "__main__":
    from rigtrain.train.stopping import exit_without_teardown  # the run is closed and saved by now

    exit_without_teardown(main())
