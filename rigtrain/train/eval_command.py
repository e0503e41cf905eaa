"""`rigtrain eval RUN_DIR [--data DIR]`: the newest complete checkpoint of a run, frozen,
scored by rigtrain.evaluate on held-out clips; the result goes to RUN_DIR/eval.json.

The weights come straight from DeepSpeed's checkpoint files, without starting DeepSpeed:
stages 0-2 keep the whole module in mp_rank_00_model_states.pt; ZeRO-3 splits it across
ranks, and DeepSpeed's own zero_to_fp32 puts it back together.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from rigtrain.config import RunConfig, build_config
from rigtrain.data.dataset import ShardDataset, open_dataset
from rigtrain.data.split import clips_digest, heldout_videos, split_clips
from rigtrain.errors import UserError
from rigtrain.evaluate import evaluate, extract_features
from rigtrain.evaluate.evaluation import EVAL_MIN_BATCH, needs_bank, spread
from rigtrain.evaluate.pictures import geometry_of, picture_clips, prediction_pictures, save_pictures
from rigtrain.files import write_json
from rigtrain.model import build_model
from rigtrain.rig.torch_builds import kernels_in
from rigtrain.terminal import counter
from rigtrain.train import checkpoints
from rigtrain.train.run_record import read_run_record


def load_weights(run_dir: Path, config: RunConfig, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str, int]:
    """The module's state dict from the newest complete checkpoint, or the one tagged `tag`
    (already checked): (state, tag, step)."""
    ckpt_dir = run_dir / "checkpoints"
    if tag is not None:
        found = (int(json.loads((ckpt_dir / tag / "trainer.json").read_text())["step"]), tag)
    else:
        found = checkpoints.newest_good(ckpt_dir, warn=lambda line: print(f"rigtrain: {line}", file=sys.stderr))
    if found is None and checkpoints.damaged_only(ckpt_dir):
        raise UserError(f"eval: every checkpoint in {ckpt_dir} is damaged (see above); nothing to score")
    if found is None:
        raise UserError(
            f"eval: {run_dir} has no complete checkpoint yet; train it (or let it reach "
            f"train.ckpt_every={config.train.ckpt_every}) first"
        )
    step, tag = found
    tag_dir = run_dir / "checkpoints" / tag
    if config.train.zero_stage == 3:
        # DeepSpeed prints (and binds its logger) to stdout; --json promises stdout holds
        # nothing but the result.
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils.zero_to_fp32 import (
                get_fp32_state_dict_from_zero_checkpoint,
            )  # heavy: only for a ZeRO-3 checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag), tag, step
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"], tag, step


def evaluate_run(run_dir: str | Path, data: str | None = None) -> dict:
    run_dir = Path(run_dir)
    saved = read_run_record(run_dir, "eval")
    config = build_config(saved["config"], source=str(run_dir / "config.json"))
    state, tag, step = load_weights(run_dir, config)
    if not data and "data_dir" not in saved:
        raise UserError(f"eval: {run_dir / 'config.json'} names no data folder; give the data to score on with --data")
    data_dir = Path(data).resolve() if data else Path(saved["data_dir"])
    if not data_dir.is_dir():
        raise UserError(
            f"eval: --data {data_dir}: no such folder; give prepared shards or a folder of videos (the run's own "
            "data's new place with --data, if it moved)"
        )
    dataset = open_dataset(data_dir, config.data)
    for line in getattr(dataset, "said_of_the_folder", []):  # a folder of videos: what prepare would report
        print(f"rigtrain: {line}", file=sys.stderr)
    videos = dataset.clip_videos()
    recorded = saved.get("split") or {}
    # the run's own data where it was, or moved elsewhere (the same clips)
    own_data = "data_dir" in saved and (
        data_dir == Path(saved["data_dir"]) or recorded.get("clips_xxh3") == clips_digest(videos)
    )
    # The run's own data: its recorded split. Other data: the same rule (a hash of each
    # video's name), since the run never saw that data anyway.
    heldout = recorded.get("heldout_videos", []) if own_data else heldout_videos(videos, config.eval.holdout)
    split = split_clips(videos, heldout)
    if hasattr(dataset, "keep_apart"):  # videos decoded on demand stand in for one another
        dataset.keep_apart(heldout)
    if len(split.heldout) == 0:
        raise UserError(
            f"eval: {data_dir} has no held-out clips (eval.holdout={config.eval.holdout} of "
            f"{len(set(videos))} videos); evaluate on other data with --data"
        )
    labels = dataset.index.get("labels") if isinstance(dataset, ShardDataset) else None
    if len(split.train) == 0 and needs_bank(labels):
        raise UserError(f"eval: every clip of {data_dir} is held out, so kNN has no bank; give more videos")

    model = build_model(config.model, config.data)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    device = evaluation_device()
    model.to(device).eval()

    started = time.perf_counter()
    # without labels no kNN or probe: the training clips are not embedded at all
    bank_clips = spread(split.train, config.eval.max_clips) if needs_bank(labels) else split.train[:0]
    heldout_clips = spread(split.heldout, config.eval.max_clips)
    total = len(bank_clips) + len(heldout_clips)

    embedded = counter(lambda done, _: f"[rigtrain] eval: embedded {done}/{total} clips", sys.stderr)

    def progress(offset: int):
        return lambda done, _: embedded(offset + done, total)

    embed = lambda batch: model(batch, task="embed")  # noqa: E731
    size = max(config.train.micro_batch_size, EVAL_MIN_BATCH)  # the model alone: room for more
    bank = None
    if len(bank_clips):
        bank = extract_features(embed, dataset, bank_clips, batch_size=size, device=device, progress=progress(0))
    held = extract_features(
        embed, dataset, heldout_clips, batch_size=size, device=device, progress=progress(len(bank_clips))
    )
    result = evaluate(bank, held, labels, config.eval)
    record = {
        "step": step,
        "checkpoint": tag,
        "data_dir": str(data_dir),
        **result,
        "split": {**split.to_dict(), "from": "the run" if own_data else "eval.holdout of the run's config"},
        "seconds": round(time.perf_counter() - started, 2),
    }
    clips = picture_clips(split.heldout)
    batch = {k: v.to(device) for k, v in dataset.batch(clips.tolist()).items() if k not in ("labels", "index")}
    with torch.no_grad():
        pictures = prediction_pictures(model(batch, task="predict"), geometry_of(model))
    record["pictures"] = [str(p.relative_to(run_dir)) for p in save_pictures(pictures, run_dir / "eval")]
    write_json(run_dir / "eval.json", record)
    return record


def evaluation_device() -> torch.device:
    """The first GPU where torch has kernels for it (PyPI's CUDA 13 torch has none for a
    Pascal or Volta card: the first kernel would fail), else the CPU, saying why."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    arch_list, capability = torch.cuda.get_arch_list(), torch.cuda.get_device_capability(0)
    if not arch_list or not torch.version.cuda or kernels_in(arch_list, capability):
        return torch.device("cuda", 0)
    print(
        f"[rigtrain] eval: torch {torch.__version__} has no kernels for GPU 0 ({torch.cuda.get_device_name(0)}, "
        f"compute capability {capability[0]}.{capability[1]}); evaluating on the CPU (`rigtrain rig` says which "
        "build of torch has them)",
        file=sys.stderr,
        flush=True,
    )
    return torch.device("cpu")
