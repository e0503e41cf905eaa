"""What `--resume` may change. Every `--set` and `--config` value given with --resume takes
effect, and the run says what changed against the config the checkpoint was trained with.
What the checkpoint itself fixes cannot change: the model's shape (the weights would not
load), the clip shape the data was prepared for, and how DeepSpeed laid out the optimizer
(ZeRO stage, optimizer, precision, offload, number of processes). Those are exit 2, naming
the key and what to do instead. data.dir may change to where the same data moved
(launch.check_data compares the clips), not to other data."""

from __future__ import annotations

from rigtrain.config import RunConfig
from rigtrain.errors import UserError

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
    "train.nproc": "the checkpoint holds one part of the optimizer and one RNG state per process",
    "train.seed": "the data order of the run so far follows this seed",
    "rig.gpus": "the checkpoint holds one part of the optimizer and one RNG state per GPU",
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


def check_same_processes(saved_plan: dict, world_size: int, run_dir) -> None:
    """The plan for this machine now has as many processes as the run was trained with:
    ZeRO splits the optimizer's states between them, one file each, and each keeps its own
    RNG state. A GPU taken out (or hidden by CUDA_VISIBLE_DEVICES) since would otherwise
    fail inside DeepSpeed's load."""
    before = saved_plan.get("world_size")  # none for a new run ({})
    if before is None or before == world_size:
        return
    where = "GPU(s)" if saved_plan.get("device") == "cuda" else "process(es)"
    raise UserError(
        f"--resume: {run_dir} was trained on {before} {where}, and this machine now gives it {world_size}: "
        f"its checkpoint holds one part of the optimizer per process; make the same {before} {where} available "
        f"(CUDA_VISIBLE_DEVICES, --set rig.gpus=...) to resume, or continue from its weights in a new run: "
        f"rigtrain train --init-from {run_dir} --out NEW_DIR"
    )
