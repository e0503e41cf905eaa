"""Where is motion lost? Probes every representation of a trained demo, the loss terms one by
one, and the future prediction against copying the present (issue 12).

    python bench/motion.py [--seeds 0,1,2] [--variants both,pc_only,contrastive_only]
                           [--out /tmp/motion] [--set KEY=VALUE ...]

For each variant and seed it trains the demo (`rigtrain train`, the preset's steps; a run
already finished in --out is reused), loads the newest checkpoint without DeepSpeed, and
measures on the run's held-out clips:

  - kNN and linear-probe top-1 of shape, colour and direction, read from: the raw pixels
    and the pixel change over the window (what the input alone gives), the video-only
    latent of the whole window pooled (what eval reads), the present window's latent and
    the evolver's predicted future latent (mean-pooled and whole), the predictive-coding
    path's joint latent (present video + audio + narration) and its evolved latent, and
    the contrastive heads' video-audio and video-text spaces;
  - the future-prediction error of every future video patch against two baselines:
    copying the present patch at the same place, and predicting the mean (error 1 on
    normalised targets). A model that learned dynamics beats copying by a clear margin.

Variants: both = the demo preset; pc_only = no contrastive terms; contrastive_only =
weight_pc 1e-3 (the config refuses 0: predictive coding is what trains the decoder).
Prints one table per measure and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rigtrain.config import build_config  # noqa: E402
from rigtrain.evaluate.evaluation import LABELS, spread  # noqa: E402
from rigtrain.evaluate.measures import label_scores  # noqa: E402
from rigtrain.model.losses import normalize_patches  # noqa: E402

VARIANTS = {
    "both": [],
    "pc_only": ["model.weight_va=0", "model.weight_vt=0"],
    "contrastive_only": ["model.weight_pc=0.001"],
}


def train(run_dir: Path, overrides: list[str], steps: int | None) -> float | None:
    """`rigtrain train` unless run_dir already holds a finished run; -> seconds taken (None:
    the finished run was reused)."""
    if (run_dir / "eval.json").is_file():
        return None
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "rigtrain", "train", "--out", str(run_dir)]
    if steps:
        cmd += ["--steps", str(steps)]
    if overrides:
        cmd += ["--set", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


@torch.no_grad()
def representations(model, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One batch -> ({name: (B, F) features}, {name: (B,) future-prediction squared error})."""
    B = batch["video"].shape[0]
    video, audio = model.patches(batch, 0)
    nvp, nap = model.video_present, model.audio_present
    start = model._start(B)
    out: dict[str, torch.Tensor] = {}

    frames = batch["video"][:, : model.geometry.frames].float() / 255.0  # (B, T, H, W, 3)
    out["pixels"] = frames.flatten(1)
    half = model.geometry.present_frames
    out["pixel change"] = (frames[:, half:].mean(1) - frames[:, :half].mean(1)).flatten(1)

    whole = model.encode(start, [(model._video_tokens(video), None, True)])
    out["window latent, pooled (eval)"] = model._pool(whole)
    out["window latent, all N"] = whole.flatten(1)
    present = model.encode(start, [(model._video_tokens(video[:, :nvp]), None, True)])
    evolved = model.evolve(present)
    out["present latent, mean"] = present.mean(1)
    out["evolved latent, mean"] = evolved.mean(1)
    out["present+evolved, mean"] = torch.cat([present.mean(1), evolved.mean(1)], 1)
    out["present latent, all N"] = present.flatten(1)
    out["evolved latent, all N"] = evolved.flatten(1)

    text = batch["text"]
    text_mask = torch.arange(text.shape[1])[None, :] < batch["text_len"][:, None]
    audio_mask = batch["has_audio"].bool()[:, None].expand(-1, nap)
    joint = model.encode(
        start,
        [
            (model._video_tokens(video[:, :nvp]), None, True),
            (model._audio_tokens(audio[:, :nap]), audio_mask, True),
            (model.text_tokenizer(text), text_mask, False),
        ],
    )
    joint_evolved = model.evolve(joint)
    out["joint present (PC path), mean"] = joint.mean(1)
    out["joint evolved (PC path), mean"] = joint_evolved.mean(1)
    if model.video_to_va is not None:
        va = model.video_to_va(model._pool(whole)).float()
        out["video-audio space"] = va
        if model.va_to_vt is not None:
            out["video-text space"] = model.va_to_vt(va)

    # Future prediction, every future video patch, on normalised targets.
    target = normalize_patches(video)
    future = torch.arange(nvp, video.shape[1]).expand(B, -1)
    no_audio = torch.zeros(B, 1, dtype=torch.long)
    predicted, _ = model.decode(joint_evolved, future, no_audio)
    from_present, _ = model.decode(joint, future, no_audio)
    per_frame_tokens = model.grid[1] * model.grid[2]
    # copy: each future tubelet <- the last present tubelet at the same (y, x)
    last_present = target[:, nvp - per_frame_tokens : nvp]
    repeats = (video.shape[1] - nvp) // per_frame_tokens
    copied = last_present.repeat(1, repeats, 1)
    truth = target[:, nvp:]
    errors = {
        "model (evolved latent)": ((predicted.float() - truth) ** 2).mean((1, 2)),
        "model, present latent (no evolver)": ((from_present.float() - truth) ** 2).mean((1, 2)),
        "copy the present": ((copied - truth) ** 2).mean((1, 2)),
        "predict the mean": (truth**2).mean((1, 2)),
    }
    return {k: v.float() for k, v in out.items()}, errors


def probe_run(run_dir: Path) -> dict:
    """probe_uncached's result, kept in RUN_DIR/motion.json for the next call."""
    stored = run_dir / "motion.json"
    if stored.is_file():
        return json.loads(stored.read_text())
    result = probe_uncached(run_dir)
    stored.write_text(json.dumps(result))
    return result


def probe_uncached(run_dir: Path) -> dict:
    from rigtrain.data.dataset import open_dataset
    from rigtrain.data.split import split_clips
    from rigtrain.model import build_model
    from rigtrain.train.eval_command import load_weights
    from rigtrain.train.run_record import read_run_record

    saved = read_run_record(run_dir, "bench/motion.py")
    config = build_config(saved["config"], source=str(run_dir / "config.json"))
    state, _, step = load_weights(run_dir, config)
    model = build_model(config.model, config.data)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    dataset = open_dataset(Path(saved["data_dir"]), config.data)
    split = split_clips(dataset.clip_videos(), saved["split"]["heldout_videos"])
    names = dataset.index["labels"]

    def gather(clips: np.ndarray):
        feats: dict[str, list] = {}
        errs: dict[str, list] = {}
        labels = []
        for start in range(0, len(clips), 64):
            batch = dataset.batch(clips[start : start + 64].tolist())
            labels.append(batch.pop("labels").numpy().astype(np.int64))
            batch.pop("index", None)
            f, e = representations(model, batch)
            for k, v in f.items():
                feats.setdefault(k, []).append(v)
            for k, v in e.items():
                errs.setdefault(k, []).append(v)
        return (
            {k: torch.cat(v) for k, v in feats.items()},
            {k: torch.cat(v) for k, v in errs.items()},
            np.concatenate(labels),
        )

    bank, _, bank_labels = gather(spread(split.train, config.eval.max_clips))
    held, errors, held_labels = gather(spread(split.heldout, config.eval.max_clips))
    scores: dict[str, dict] = {}
    for name in bank:
        scores[name] = {}
        for i, label in enumerate(LABELS):
            knn, probe = label_scores(
                bank[name],
                bank_labels[:, i],
                held[name],
                held_labels[:, i],
                names[label],
                k=config.eval.knn_k,
                temperature=config.eval.knn_temperature,
            )
            scores[name][label] = {"knn": knn["top1"], "probe": probe["top1"], "chance": knn["chance"]}
    future = {k: round(float(v.mean()), 4) for k, v in errors.items()}
    return {"step": step, "heldout_clips": len(held_labels), "scores": scores, "future_error": future}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="both,pc_only,contrastive_only")
    parser.add_argument("--out", default="/tmp/rigtrain-motion", help="runs go here (kept: a rerun reuses them)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--steps", type=int, help="train.steps of each run (default: the demo preset's)")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=[],
        metavar="RUN_DIR",
        help="probe these finished runs instead of training (variant = the folder's name)",
    )
    args = parser.parse_args()
    results = []
    for run_dir in map(Path, args.runs):
        entry = {"variant": run_dir.name, "seed": -1, "train_s": None, **probe_run(run_dir)}
        results.append(entry)
        print(f"[motion] {run_dir}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    for variant in [] if args.runs else args.variants.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            run_dir = Path(args.out) / f"{variant}-seed{seed}"
            seconds = train(run_dir, [*VARIANTS[variant], f"train.seed={seed}", *args.set], args.steps)
            took = None if seconds is None else round(seconds, 1)
            entry = {"variant": variant, "seed": seed, "train_s": took, **probe_run(run_dir)}
            results.append(entry)
            print(f"[motion] {variant} seed {seed}: {json.dumps(entry)}", file=sys.stderr, flush=True)

    def cell(entry, name, label, kind):
        s = entry["scores"].get(name, {}).get(label)
        return "-" if s is None else f"{s[kind]:.2f}"

    names = list(dict.fromkeys(n for e in results for n in e["scores"]))
    for label in LABELS:
        chance = np.mean([e["scores"][names[0]][label]["chance"] for e in results])
        print(f"\n{label}: kNN / probe top-1 per run (chance {chance:.2f} on average)")
        columns = [f"{e['variant']} s{e['seed']}" for e in results]
        width = max(len(n) for n in names)
        print(" " * width + "  " + "  ".join(c.rjust(11) for c in columns))
        for name in names:
            cells = [f"{cell(e, name, label, 'knn')}/{cell(e, name, label, 'probe')}" for e in results]
            print(name.ljust(width) + "  " + "  ".join(c.rjust(11) for c in cells))
    print("\nfuture video patches, mean squared error on normalised targets (lower is better)")
    kinds = list(results[0]["future_error"])
    width = max(len(k) for k in kinds)
    print(" " * width + "  " + "  ".join(f"{e['variant']} s{e['seed']}".rjust(11) for e in results))
    for kind in kinds:
        print(kind.ljust(width) + "  " + "  ".join(f"{e['future_error'][kind]:.3f}".rjust(11) for e in results))
    print(json.dumps({"runs": results}))


if __name__ == "__main__":
    main()
