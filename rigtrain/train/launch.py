"""`rigtrain train`: check everything a user can get wrong, write RUN_DIR/config.json, then
start the training processes.

- one process: in this process (no launcher start-up cost);
- several on this machine (GPUs, or train.nproc on a CPU): torch's own launcher (torchrun),
  which also tears every rank down when one fails;
- several machines: DeepSpeed's launcher with the user's `--hostfile`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from rigtrain.config import RunConfig, load_config
from rigtrain.errors import UserError

from rigtrain.train.worker import OOM_MARKER

WORKER_MODULE = "rigtrain.train.worker"


def default_run_dir(preset: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}"


def resolve_config(*, out: str | None, preset: str | None, config_file: str | None, overrides: list[str],
                   steps: int | None, data: str | None, resume: bool) -> tuple[RunConfig, Path]:
    if steps is not None:
        overrides = [*overrides, f"train.steps={steps}"]
    if data is not None:  # absolute, so that --resume works from any folder
        overrides = [*overrides, f"data.dir={Path(data).resolve()}"]
    if resume:
        if not out:
            raise UserError("--resume needs --out RUN_DIR: the run to continue")
        run_dir = Path(out)
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise UserError(f"--resume: {saved} does not exist; give the --out of a run that was started")
        if config_file or preset:
            raise UserError(f"--resume continues with the run's own config.json; drop --{'config' if config_file else 'preset'}"
                            " and use --set to change a value")
        base = json.loads(saved.read_text())["config"]
        return load_config(base=base, overrides=overrides), run_dir
    preset = preset or "demo"
    run_dir = Path(out) if out else default_run_dir(preset)
    if (run_dir / "config.json").exists():
        raise UserError(f"--out {run_dir} already holds a run; add --resume to continue it or choose another --out")
    return load_config(preset, config_file, overrides), run_dir


def resolve_data(config: RunConfig, log=print) -> Path:
    """The prepared shards to train on: the user's, or the embedded dataset (built once)."""
    if not config.data.dir:
        from rigtrain.data.embedded import embedded_dataset

        return embedded_dataset(config.data, log=log)
    path = Path(config.data.dir)
    if not path.is_dir():
        raise UserError(f"--data {path}: no such folder; give prepared shards (from `rigtrain data prepare`)")
    if not (path / "index.json").is_file():
        from rigtrain.data.media import VIDEO_SUFFIXES

        if not any(p.suffix.lower() in VIDEO_SUFFIXES for p in path.iterdir()):
            raise UserError(f"--data {path}: neither prepared shards (no index.json) nor videos; give a folder "
                            "of videos or the output of `rigtrain data prepare`")
        log(f"--data {path} holds videos, not shards: every clip will be decoded on the fly, which is slow; "
            f"`rigtrain data prepare {path} PREPARED_DIR` makes shards once")
    return path.resolve()


def check_data(data_dir: Path, config: RunConfig, world_size: int, heldout: list[str] | None = None):
    """The dataset's size and its held-out split (`heldout`: the videos a resumed run held
    out; None = split by eval.holdout). Raises when there is not one batch per rank."""
    from rigtrain.data.dataset import ResumableSampler, open_dataset
    from rigtrain.data.split import heldout_videos, split_clips

    dataset = open_dataset(data_dir, config.data)
    videos = dataset.clip_videos()
    split = split_clips(videos, heldout_videos(videos, config.eval.holdout) if heldout is None else heldout)
    ResumableSampler(split.train, rank=0, world=world_size, micro_batch=config.train.micro_batch_size, seed=0)
    return len(dataset), split


def write_run_config(run_dir: Path, config: RunConfig, data_dir: Path, rig, plan, extra: dict | None = None) -> None:
    from rigtrain.train.metrics import write_json
    from rigtrain.train.trainer import deepspeed_config

    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"config": config.to_dict(), "data_dir": str(data_dir), "rig": rig.to_dict(),
              "plan": {**plan.to_dict(), "deepspeed": deepspeed_config(config, plan.precision, plan.world_size)},
              "warnings": [w.to_dict() for w in plan.warnings], "command": sys.argv, **(extra or {})}
    write_json(run_dir / "config.json", record)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(run_dir: Path, plan, hostfile: str | None) -> list[str] | None:
    """The launcher command line, or None to run in this process. Only a single CPU process
    runs in-process: this process has already initialised CUDA (to read the GPUs), so a
    GPU run needs fresh processes for CUDA_VISIBLE_DEVICES (rig.gpus) to take effect."""
    if hostfile:
        # DeepSpeed's launcher chooses each node's GPUs itself (--include/--exclude).
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--module", WORKER_MODULE,
                "--run-dir", str(run_dir.resolve())]
    if plan.world_size == 1 and plan.device == "cpu":
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(plan.world_size),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            "-m", WORKER_MODULE, "--run-dir", str(run_dir.resolve())]


def _check_rig_file_matches(rig, rig_file: str | None) -> None:
    """--rig describes this machine (adding what no probe reads, like the PSU); training
    still runs here, so the GPU count must be this machine's."""
    if not rig_file:
        return
    import torch

    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(rig.gpus) != here:
        raise UserError(f"--rig {rig_file} describes {len(rig.gpus)} GPU(s) but this machine has {here}; "
                        "to plan for another machine use `rigtrain rig --rig FILE`")


def _say(line: str) -> None:
    print(f"[rigtrain] {line}", flush=True)


def train(*, out: str | None, preset: str | None, config_file: str | None, overrides: list[str], steps: int | None,
          data: str | None, resume: bool, hostfile: str | None, rig_file: str | None = None,
          psu_w: float | None = None, profile: bool = False) -> int:
    # Before anything starts CUDA: number GPUs by PCI bus, as nvidia-smi and NVML do.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    from rigtrain.config.loading import user_keys
    from rigtrain.train.planning import PLANNED, apply_plan, machine_rig, plan_run

    if profile:  # `rigtrain profile`: the same run with the profiler on, by default just long enough
        overrides = [*overrides, "profile.enabled=true"]
        if out is None and not resume:
            out = str(default_run_dir(preset or "demo")) + "-profile"
    config, run_dir = resolve_config(out=out, preset=preset, config_file=config_file, overrides=overrides,
                                     steps=steps, data=data, resume=resume)
    if profile and steps is None and not resume and "train.steps" not in user_keys(config_file, overrides):
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=config.profile.last_step))
    if hostfile and not Path(hostfile).is_file():
        raise UserError(f"--hostfile {hostfile}: no such file; list one 'HOST slots=N' line per machine")
    data_dir = resolve_data(config, log=_say)
    rig = machine_rig([data_dir, run_dir], rig_file)
    _check_rig_file_matches(rig, rig_file)
    # A resumed run keeps the plan it started with; otherwise what the user set is kept
    # and the rest is planned.
    fixed = set(PLANNED) if resume else user_keys(config_file, overrides)
    # A resumed run keeps its held-out videos (a run from before the split held none out).
    heldout = json.loads((run_dir / "config.json").read_text()).get("split", {}).get("heldout_videos", []) \
        if resume else None
    backed_off: list[int] = []
    while True:
        plan = plan_run(config, rig, user_keys=fixed, psu_w=psu_w)
        config = apply_plan(config, plan)
        clips, split = check_data(data_dir, config, plan.world_size, heldout)
        extra = {"split": {"holdout": config.eval.holdout, **split.to_dict()}}
        if backed_off:
            extra["backed_off_from"] = backed_off
        write_run_config(run_dir, config, data_dir, rig, plan, extra)
        _say(f"run {run_dir}: {clips} clips from {data_dir}; {len(split.heldout)} of them, from "
             f"{len(split.heldout_videos)} videos, held out for evaluation and never trained on")
        kept = []
        for key in ("world_size", "precision", "micro_batch_size", "grad_accum_steps", "activation_checkpointing",
                    "zero_stage", "optimizer", "offload_optimizer", "dataloader_workers"):
            value = getattr(plan, key, None)
            if plan.reasons.get(key, "").startswith("no GPU to plan for"):
                kept.append(f"{key} = {value}")
            elif key in plan.reasons:
                _say(f"  {key}{'' if value is None else f' = {value}'}: {plan.reasons[key]}")
        if kept:
            _say(f"  no GPU to plan for, the config's values: {', '.join(kept)}")
        if plan.device == "cuda" and plan.predicted_peak_gib is not None:
            _say(f"  predicted peak memory {plan.predicted_peak_gib:.2f} GiB per GPU of {plan.usable_gib:.2f} usable")
        for warning in plan.warnings:
            _say(f"  warning [{warning.code}] {warning.message}")
        (run_dir / OOM_MARKER).unlink(missing_ok=True)
        code = _launch(run_dir, plan, hostfile)
        oom = run_dir / OOM_MARKER
        if code == 0 or not oom.is_file():
            break
        # The first step ran out of memory: one size down, planned again, and said so.
        failed = plan.micro_batch_size
        if resume or failed <= 1 or "train.micro_batch_size" in user_keys(config_file, overrides):
            _say(f"out of GPU memory on the first step at micro-batch {failed}, which the plan may not change "
                 "(set by you, a resumed run, or already 1): lower train.micro_batch_size or use a smaller preset")
            break
        smaller = max(1, failed - max(1, failed // 8))
        backed_off.append(failed)
        _say(f"out of GPU memory on the first step at micro-batch {failed}: backing off to {smaller}")
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, micro_batch_size=smaller))
        fixed = fixed | {"train.micro_batch_size"}
        for path in (run_dir / "metrics.jsonl", run_dir / "tb"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if code == 0:
        print(f"\nrun: {run_dir}\nopen TensorBoard: tensorboard --logdir {run_dir / 'tb'}", flush=True)
        return 0
    print(f"rigtrain: training failed (exit code {code}); messages above say why. "
          f"Continue later with: rigtrain train --out {run_dir} --resume", file=sys.stderr)
    return 2 if code == 2 else 1


def _launch(run_dir: Path, plan, hostfile: str | None) -> int:
    command = launch_command(run_dir, plan, hostfile)
    if command is None:
        os.environ.update(plan.env)
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            os.environ[key] = value
        from rigtrain.train.worker import run

        return run(run_dir)
    env = {**os.environ, **plan.env}
    if hostfile:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(command, env=env).returncode
