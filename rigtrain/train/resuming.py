"""What `--resume` may change. Every `--set` and `--config` value given with --resume takes
effect, and the run says what changed against the config the checkpoint was trained with.
What the checkpoint itself fixes cannot change: the model's shape (the weights would not
load), the clip shape the data was prepared for, and how DeepSpeed laid out the optimizer
(ZeRO stage, optimizer, precision, offload). Those are exit 2, naming the key and what
to do instead. The number of processes may change (fit_to_processes). data.dir may
change to where the same data moved (check_resumed_data compares the clips), not to other
data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rigtrain.config import RunConfig
from rigtrain.errors import UserError
from rigtrain.train.reshaping import convert_for_processes, reshape_problem

# key -> why it cannot change on resume
FIXED_BY_CHECKPOINT = {
    **{
        f"model.{k}": "the model's shape is in the checkpoint"
        for k in (
            "tubelet",
            "audio_segment",
            "d_model",
            "num_latents",
            "heads",
            "mlp_ratio",
            "enc_layers",
            "evo_layers",
            "evolver_shared",
            "dec_layers",
            "va_dim",
            "vt_dim",
            "fourier_space",
            "fourier_time",
            "fourier_text",
        )
    },
    **{
        f"data.{k}": "the checkpoint's model and data position are for this clip shape"
        for k in (
            "fps",
            "frame_size",
            "resize",
            "present_frames",
            "future_frames",
            "recurrent_windows",
            "window_step_frames",
            "sample_rate",
            "max_text_bytes",
            "synth_videos",
            "synth_seed",
        )
    },
    "train.zero_stage": "DeepSpeed's checkpoint is laid out for this ZeRO stage",
    "train.optimizer": "the optimizer's states in the checkpoint are this optimizer's",
    "train.offload_optimizer": "DeepSpeed's checkpoint is laid out for this offload setting",
    "train.precision": "the checkpoint holds this precision's optimizer states",
    "train.seed": "the data order of the run so far follows this seed",
    "eval.holdout": "the run keeps the held-out videos it started with",
}


def _flat(config: RunConfig) -> dict:
    out = {}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def resume_changes(before: RunConfig, after: RunConfig, run_dir="RUN_DIR") -> list[str]:
    """The keys whose values differ, as "key old -> new"; a key the checkpoint fixes is a
    UserError. A contrastive head may not appear or disappear (its weights would be missing
    or left over): model.weight_va/weight_vt may change, but not to or from 0."""
    old, new = _flat(before), _flat(after)
    changes = []
    for key in sorted(old):
        if key == "preset" or old[key] == new.get(key):
            continue
        if key in FIXED_BY_CHECKPOINT:
            raise UserError(
                f"--resume: {key} cannot change from {old[key]!r} to {new[key]!r}: "
                f"{FIXED_BY_CHECKPOINT[key]}; to change it, start a new run from these weights: "
                f"rigtrain train --init-from {run_dir} --out NEW_DIR --set {key}={new[key]}"
            )
        if key in ("model.weight_va", "model.weight_vt") and (old[key] == 0) != (new[key] == 0):
            raise UserError(
                f"--resume: {key} cannot go {'from' if old[key] == 0 else 'to'} 0: that adds or removes a "
                "contrastive head the checkpoint does not have; start a new run with another --out"
            )
        changes.append(f"{key} {old[key]!r} -> {new[key]!r}")
    return changes


def check_checkpoint_layout(saved_plan: dict, run_dir) -> None:
    """A run trained with DeepSpeed's bf16 section (rigtrain before bf16 moved to autocast,
    docs/training.md "Precision") holds bf16 weights and BF16_Optimizer's states, which
    today's fp32-weight engine cannot load: say so, and how to keep its weights."""
    if (saved_plan.get("deepspeed") or {}).get("bf16", {}).get("enabled"):
        raise UserError(
            f"--resume: {run_dir} was trained with DeepSpeed's bf16 weights, an optimizer layout this version "
            "no longer uses (bf16 now trains fp32 weights under autocast); start a new run from its weights "
            f"with: rigtrain train --init-from {run_dir} --out NEW_DIR"
        )


def fit_to_processes(saved_plan: dict, config: RunConfig, world_size: int, run_dir, say) -> RunConfig:
    """The resumed run's config for the processes the plan for this machine now has. The
    same number as it trained with: unchanged. Another (a GPU taken out, hidden by
    CUDA_VISIBLE_DEVICES, or added): the global batch is kept (each process's share in
    micro-batches no larger than the run's, accumulation for the rest), the data position
    is converted (data/order.py) and each new process gets a random stream of its own
    (train/checkpoints.py). At ZeRO-0 every process reads the whole optimizer from one
    file; at ZeRO-1 to 3 each saved its own part, and the checkpoint is converted into
    DeepSpeed's universal layout first (reshaping.py). What cannot be is refused before
    anything starts, saying why."""
    before = saved_plan.get("world_size")  # none for a new run ({})
    if before is None or before == world_size:
        return config
    where = "GPU(s)" if saved_plan.get("device") == "cuda" else "process(es)"
    t = config.train
    # the run's global batch as it trained (a micro-batch size given now is only a limit)
    global_batch = saved_plan.get("micro_batch_size", t.micro_batch_size) * before
    global_batch *= saved_plan.get("grad_accum_steps", t.grad_accum_steps)
    stage = saved_plan.get("zero_stage", t.zero_stage)
    problem, newest = None, None
    if global_batch % world_size:
        problem = f"its global batch of {global_batch} clips cannot be shared equally by {world_size}"
    elif stage > 0:
        from rigtrain.train import checkpoints  # torch: only for a resume on another number of processes

        newest = checkpoints.newest_good(Path(run_dir) / "checkpoints", warn=lambda line: None)
        if newest is not None:
            meta = json.loads((Path(run_dir) / "checkpoints" / newest[1] / "trainer.json").read_text())
            problem = reshape_problem(t, meta)
    if problem:
        raise UserError(
            f"--resume: {run_dir} was trained on {before} {where}, and this machine now gives it {world_size}: "
            f"{problem}; make the same {before} {where} available (CUDA_VISIBLE_DEVICES, --set rig.gpus=...) to "
            f"resume, or continue from its weights in a new run: rigtrain train --init-from {run_dir} --out NEW_DIR"
        )
    share = global_batch // world_size
    size = max(d for d in range(1, min(share, t.micro_batch_size) + 1) if share % d == 0)
    how = "each reads the whole optimizer" if stage == 0 else "the optimizer's parts merged and cut again"
    say(
        f"resuming on {world_size} {where} instead of {before} (at ZeRO-{stage} {how}): "
        f"{share // size} x {size} clips each, the global batch of {global_batch} as before"
    )
    if newest is not None:
        convert_for_processes(Path(run_dir), newest[1], say)
    return dataclasses.replace(
        config, train=dataclasses.replace(t, micro_batch_size=size, grad_accum_steps=share // size)
    )


def check_resumed_data(trained_on: dict, data_dir: Path, split, say) -> None:
    """A resumed run's data may have moved (another disk, another mount point) if it is the
    same data; other data in another folder is a new run's (--init-from). Data changed in
    its own folder (videos added and prepared again) is trained on as it is now, said."""
    recorded, before = trained_on["split"], trained_on["data_dir"]
    counts = [recorded.get(key) for key in ("train_clips", "heldout_clips")]
    if not all(isinstance(n, int) for n in counts) or split.same_data_as(recorded):  # none: a run from before them
        if before and str(data_dir) != before:
            say(f"--resume: the run's data moved from {before} to {data_dir} (the same clips); training goes on")
        return
    now = f"{len(split.train) + len(split.heldout)} clips"
    then = f"{sum(counts)}"
    if before and str(data_dir) != before:
        raise UserError(
            f"--resume --data {data_dir}: not the data this run trained on ({now} where it had {then}, or other "
            f"videos); give its own data (it was at {before}), or train on this in a new run from these weights: "
            f"rigtrain train --init-from {trained_on['run_dir']} --out NEW_DIR --data {data_dir}"
        )
    say(
        f"--resume: the data in {data_dir} changed since the run last started ({now} where there were {then}); "
        "training goes on over it as it is now, with the same held-out videos"
    )
