"""`rigtrain train`: check everything a user can get wrong, write RUN_DIR/config.json, then
start the training processes.

How the processes start and are watched is train/processes.py: one process in this one,
several on this machine started and watched here, several machines through DeepSpeed's
launcher with the user's `--hostfile`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from rigtrain.config import RunConfig, build_config, load_config
from rigtrain.config.loading import user_keys
from rigtrain.errors import UserError
from rigtrain.files import write_json
from rigtrain.rig.report import warnings_said_once
from rigtrain.terminal import command_header, copy_output_to
from rigtrain.train.initializing import check_source
from rigtrain.train.processes import RunLock, how_it_ended, new_run_dir, start_processes
from rigtrain.train.resuming import check_checkpoint_layout, check_resumed_data, fit_to_processes, resume_changes
from rigtrain.train.run_record import RUN_LOG, read_run_record, resume_command
from rigtrain.train.stopping import NATIVE_CRASHES, STOP_EXIT_CODES
from rigtrain.train.worker import OOM_MARKER


def resolve_config(
    *,
    out: str | None,
    preset: str | None,
    config_file: str | None,
    overrides: list[str],
    steps: int | None,
    data: str | None,
    resume: bool,
) -> tuple[RunConfig, Path]:
    if steps is not None:
        overrides = [*overrides, f"train.steps={steps}"]
    if data is not None:  # absolute, so that --resume works from any folder
        overrides = [*overrides, f"data.dir={Path(data).resolve()}"]
    if resume:
        if not out:
            raise UserError("--resume needs --out RUN_DIR: the run to continue")
        run_dir = Path(out)
        saved = run_dir / "config.json"
        record = read_run_record(run_dir, "--resume")
        base = record["config"]
        if preset and preset != base.get("preset"):
            raise UserError(
                f"--resume: the run in {run_dir} was made with --preset {base.get('preset')}, not "
                f"--preset {preset}; drop --preset (or give {base.get('preset')}) to continue it"
            )
        config = load_config(base=base, config_file=config_file, overrides=overrides)
        check_checkpoint_layout(record.get("plan") or {}, run_dir)
        changes = resume_changes(build_config(base, source=str(saved)), config, run_dir)
        if changes:
            _say(f"resuming with changes to the run's config: {'; '.join(changes)}")
        return config, run_dir
    preset = preset or "demo"
    config = load_config(preset, config_file, overrides)  # a wrong key is said before any folder is made
    run_dir = Path(out) if out else new_run_dir(preset)
    if (run_dir / "config.json").exists():
        raise UserError(f"--out {run_dir} already holds a run; add --resume to continue it or choose another --out")
    return config, run_dir


def resolve_data(config: RunConfig, log=print) -> Path:
    """The prepared shards to train on: the user's, or the embedded dataset (built once)."""
    if not config.data.dir:
        from rigtrain.data.embedded import embedded_dataset  # the generator (OpenCV): only without --data

        return embedded_dataset(config.data, log=log)
    path = Path(config.data.dir)
    if not path.is_dir():
        raise UserError(
            f"--data {path}: no such folder; give prepared shards (from `rigtrain data prepare`), or their new "
            "place with --data if they moved"
        )
    if not (path / "index.json").is_file():
        from rigtrain.data.shards import unfinished_prepare  # the format's module: only for a folder without one
        from rigtrain.data.sources import find_sources  # the media readers: only for a folder of videos

        if unfinished := unfinished_prepare(path):
            raise UserError(f"--data {path}: {unfinished}")
        if not find_sources(path)[0]:  # videos in it or in folders under it
            raise UserError(
                f"--data {path}: neither prepared shards (no index.json) nor videos; give a folder "
                "of videos or the output of `rigtrain data prepare`"
            )
        log(
            f"--data {path} holds videos, not shards: every clip will be decoded on the fly, which is slow; "
            f"`rigtrain data prepare {path} PREPARED_DIR` makes shards once"
        )
    return path.resolve()


def check_data(
    data_dir: Path, config: RunConfig, world_size: int, trained_on: dict | None = None, say=None, dataset=None
):
    """The dataset's size and its held-out split: by eval.holdout, or for a resumed run
    (`trained_on`, _carried_over) the videos it held out (a run from before the split held
    none out), on the data it trained on. Raises when there is not one batch per rank. For
    a folder of videos, `say` (a run's log) gets what prepare would report of it. `dataset`:
    data_dir already opened (a tune checks it for each candidate; a folder of videos is
    probed video by video when opened)."""
    from rigtrain.data.dataset import open_dataset  # torch, numpy: only once there is data to check
    from rigtrain.data.order import ResumableSampler  # torch, numpy: only once there is data to check
    from rigtrain.data.split import heldout_videos, split_clips  # torch, numpy: only once there is data to check

    dataset = open_dataset(data_dir, config.data) if dataset is None else dataset
    for line in getattr(dataset, "said_of_the_folder", []) if say else []:
        say(line)
    videos = dataset.clip_videos()
    if trained_on is None:
        split = split_clips(videos, heldout_videos(videos, config.eval.holdout))
    else:
        split = split_clips(videos, trained_on["split"].get("heldout_videos", []))
        check_resumed_data(trained_on, data_dir, split, say or _say)
    ResumableSampler(split.train, rank=0, world=world_size, micro_batch=config.train.micro_batch_size, seed=0)
    return len(dataset), split


def write_run_config(run_dir: Path, config: RunConfig, data_dir: Path, rig, plan, extra: dict | None = None) -> None:
    from rigtrain.train.engine import deepspeed_config  # torch: only once the run is planned

    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config.to_dict(),
        "data_dir": str(data_dir),
        "rig": rig.to_dict(),
        "plan": {**plan.to_dict(), "deepspeed": deepspeed_config(config, plan.precision, plan.world_size)},
        "warnings": [w.to_dict() for w in plan.warnings],
        "command": sys.argv,
        **(extra or {}),
    }
    write_json(run_dir / "config.json", record, durable=True)  # the run cannot be resumed without it


def prepare_run_dir(run_dir: Path) -> None:
    """The run folder exists and can be written, or the user hears why in one line."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: a file of that name exists; give a folder for the run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"--out {run_dir}: cannot write there ({err.strerror or err}); give a folder you can write to"
        ) from None


def _say(line: str) -> None:
    print(f"[rigtrain] {line}", flush=True)


class _SaidBeforeTheLog(list):
    """_say that also keeps the line, for RUN_DIR/train.log once the folder is this run's
    (what is said of the data comes before it is: a bad input leaves no folder)."""

    def __call__(self, line: str) -> None:
        _say(line)
        self.append(f"[rigtrain] {line}")


def train(
    *,
    out: str | None,
    preset: str | None,
    config_file: str | None,
    overrides: list[str],
    steps: int | None,
    data: str | None,
    resume: bool,
    hostfile: str | None,
    rig_file: str | None = None,
    psu_w: float | None = None,
    profile: bool = False,
    init_from: str | None = None,
    fresh_process: bool = False,
) -> int:
    # Before anything starts CUDA: number GPUs by PCI bus, as nvidia-smi and NVML do.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    made_here = not resume and (out is None or not Path(out).exists())  # removed again if nothing runs
    if profile:  # `rigtrain profile`: the same run with the profiler on, by default just long enough
        overrides = [*overrides, "profile.enabled=true"]
        if not resume and "eval.during_training" not in user_keys(config_file, overrides):
            overrides.append("eval.during_training=false")  # a profile measures speed: no evaluation unless asked
        if out is None and not resume:
            out = str(new_run_dir(f"{preset or 'demo'}-profile"))
    config, run_dir = resolve_config(
        out=out, preset=preset, config_file=config_file, overrides=overrides, steps=steps, data=data, resume=resume
    )
    prepare_run_dir(run_dir)
    with RunLock(run_dir, made_here=made_here), contextlib.ExitStack() as output:
        return _train_locked(
            config,
            run_dir,
            output=output,
            preset=preset,
            config_file=config_file,
            overrides=overrides,
            steps=steps,
            resume=resume,
            hostfile=hostfile,
            rig_file=rig_file,
            psu_w=psu_w,
            profile=profile,
            init_from=init_from,
            fresh_process=fresh_process,
        )


def _say_split(run_dir: Path, clips: int, data_dir: Path, split, holdout: float) -> None:
    from rigtrain.data.split import lopsided_split_note  # numpy: only once there is data

    videos = len(split.heldout_videos)
    _say(
        f"run {run_dir}: {clips} clips from {data_dir}; {len(split.heldout)} of them, from "
        f"{videos} video{'' if videos == 1 else 's'}, held out for evaluation and never trained on"
    )
    if note := lopsided_split_note(split, holdout):
        _say(f"note: {note}")


def _train_locked(
    config: RunConfig,
    run_dir: Path,
    *,
    output: contextlib.ExitStack,
    preset,
    config_file,
    overrides,
    steps,
    resume,
    hostfile,
    rig_file,
    psu_w,
    profile,
    init_from,
    fresh_process,
) -> int:
    from rigtrain.train import planning  # torch: after the checks a user can fail

    initial, trained_on, trained_with, saved = _carried_over(run_dir, resume, init_from)  # --init-from: before data
    say_early = _SaidBeforeTheLog()
    if profile and steps is None and not resume and "train.steps" not in user_keys(config_file, overrides):
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=config.profile.last_step))
    machines: dict[str, int] = {}
    if hostfile:
        from rigtrain.train.hosts import check_hosts, read_hostfile  # DeepSpeed's launcher code: only with --hostfile

        machines = read_hostfile(hostfile)
        check_hosts(hostfile, machines)
    data_dir = resolve_data(config, log=say_early)
    rig = planning.machine_rig([data_dir, run_dir], rig_file)
    planning.check_torch_trains_here(rig, rig_file, config.rig.gpus)
    # a resumed run keeps the plan it started with; otherwise what the user set is kept, the rest planned
    fixed = set(planning.PLANNED) if resume else user_keys(config_file, overrides)
    backed_off: list[int] = []
    hosts = tuple(machines.values())
    while True:
        plan = planning.plan_run(config, rig, user_keys=fixed, psu_w=psu_w, hosts=hosts, checkpoints_saved=saved)
        if (fitted := fit_to_processes(trained_with, config, plan.world_size, run_dir, say_early)) is not config:
            config = fitted
            plan = planning.plan_run(config, rig, user_keys=fixed, psu_w=psu_w, hosts=hosts, checkpoints_saved=saved)
        plan = planning.with_user_environment(plan)
        config = planning.apply_plan(config, plan)
        clips, split = check_data(data_dir, config, plan.world_size, trained_on, say=None if backed_off else say_early)
        held_out = {"holdout": config.eval.holdout, **split.to_dict()}
        extra = {"split": held_out, "init_from": initial, "backed_off_from": backed_off}
        write_run_config(run_dir, config, data_dir, rig, plan, {k: v for k, v in extra.items() if v})  # what there is
        if not backed_off:  # the folder is a run from here: what is said about it is kept in it too
            output.enter_context(copy_output_to(run_dir / RUN_LOG, "\n".join([command_header(), *say_early])))
        _say_split(run_dir, clips, data_dir, split, config.eval.holdout)
        _say_plan(plan)
        (run_dir / OOM_MARKER).unlink(missing_ok=True)
        # a second run in this process (a retry, a curriculum's next stage) gets a fresh one:
        # the process group and DeepSpeed's state of the first cannot be built again here
        in_process = not backed_off and not fresh_process
        code, failed_rank = start_processes(run_dir, plan, hostfile, list(machines), in_process=in_process)
        oom = run_dir / OOM_MARKER
        if code == 0 or not oom.is_file():
            break
        # The first steps ran out of memory: one size down, planned again, and said so.
        failed = plan.micro_batch_size
        if resume or failed <= 1 or "train.micro_batch_size" in user_keys(config_file, overrides):
            _say(
                f"out of {_memory(plan)} in the first steps at micro-batch {failed}, which the plan may not change "
                "(set by you, a resumed run, or already 1): lower train.micro_batch_size or use a smaller preset"
            )
            break
        smaller = max(1, failed - max(1, failed // 8))
        backed_off.append(failed)
        _say(f"out of {_memory(plan)} in the first steps at micro-batch {failed}: backing off to {smaller}")
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, micro_batch_size=smaller))
        fixed = fixed | {"train.micro_batch_size"}
        for path in (run_dir / "metrics.jsonl", run_dir / "tb", run_dir / "checkpoints"):  # the failed try's
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return _finish(run_dir, code, failed_rank)


def _carried_over(run_dir: Path, resume: bool, init_from: str | None) -> tuple[dict | None, dict | None, dict, int]:
    """(the --init-from record, the data it trained on, the plan it was trained with, its
    complete checkpoints): a resumed run keeps the first two as it started (its held-out
    videos: check_data), its plan says how many processes its checkpoint is for, and its
    checkpoints take disk space already (the plan's low_disk); a new run's --init-from is
    checked now, before anything starts, and the trainer uses it until it has a checkpoint."""
    if init_from and resume:
        raise UserError("--init-from starts a new run from another's weights; drop it to --resume this one")
    if not resume:
        return (check_source(init_from) if init_from else None), None, {}, 0
    from rigtrain.train.checkpoints import complete_tags  # torch: a resumed run's processes import it anyway

    saved = read_run_record(run_dir, "--resume")
    trained_on = {"run_dir": run_dir, "data_dir": saved.get("data_dir"), "split": saved.get("split") or {}}
    return saved.get("init_from"), trained_on, saved.get("plan") or {}, len(complete_tags(run_dir / "checkpoints"))


def _memory(plan) -> str:
    return "GPU memory" if plan.device == "cuda" else "memory"


def _say_plan(plan) -> None:
    """Each choice with its reason (or, without a GPU, the config's values in one line), the
    predicted memory and the warnings."""
    kept = []
    for key in ("world_size", "precision", "micro_batch_size", "grad_accum_steps", "activation_checkpointing",
                "zero_stage", "optimizer", "offload_optimizer", "dataloader_workers"):  # fmt: skip
        value = getattr(plan, key, None)
        if plan.reasons.get(key, "").startswith("no GPU to plan for"):
            kept.append(f"{key} = {value}")
        elif key in plan.reasons:
            _say(f"  {key}{'' if value is None else f' = {value}'}: {plan.reasons[key]}")
    if kept:
        _say(f"  no GPU to plan for, the config's values: {', '.join(kept)}")
    if plan.device == "cuda" and plan.predicted_peak_gib is not None:
        _say(f"  predicted peak memory {plan.predicted_peak_gib:.2f} GiB per GPU of {plan.usable_gib:.2f} usable")
    for code, message in warnings_said_once(plan.warnings):
        _say(f"  warning [{code}] {message}")


def _saved_at_the_end(run_dir: Path) -> int | None:
    """The run's last step, if a checkpoint of it is marked complete; else None."""
    from rigtrain.train.checkpoints import complete_tags  # torch: only when a process failed

    try:
        steps = json.loads((run_dir / "config.json").read_text())["config"]["train"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    tags = complete_tags(run_dir / "checkpoints")
    return steps if tags and tags[-1][0] == steps else None


def _finish(run_dir: Path, code: int, rank: int | None = None) -> int:
    """The training processes' exit code as the command's: 0 with where to look, a stop on
    request as it was, 1 or 2 with the worker's own line, anything else (a rank killed by a
    signal: `rank`) said here."""
    if code == 0:
        print(f"\nrun: {run_dir}\nopen TensorBoard: tensorboard --logdir {run_dir / 'tb'}", flush=True)
        return 0
    if code in STOP_EXIT_CODES:
        return code  # stopped on request: the worker said where, and how to continue
    if code not in (1, 2):  # 1 and 2: the worker has said why, in one line
        how, last = how_it_ended(code, rank), _saved_at_the_end(run_dir)
        if last is not None:
            # A process that dies after the run's last checkpoint is complete (shutting down
            # the process group, say) cost nothing: there is nothing to resume.
            print(
                f"rigtrain: warning: {how} after the run had finished and saved its last "
                f"checkpoint (step {last}); the run is complete",
                file=sys.stderr,
            )
            return _finish(run_dir, 0)
        from rigtrain.train.checkpoints import last_complete_in_words  # torch: only when a process failed

        saved = last_complete_in_words(run_dir / "checkpoints")
        if -code in NATIVE_CRASHES:  # the rank wrote where it crashed into the run's log
            how += f"; its Python stacks are in {run_dir / RUN_LOG}"
        print(f"rigtrain: {how}; {saved}; continue with: {resume_command(run_dir)}", file=sys.stderr)
    return 2 if code == 2 else 1
