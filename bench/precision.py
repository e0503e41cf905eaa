"""bf16 against fp32: the demo trained from the same seed for the same steps in fp32 and in bf16
at ZeRO 0, 1 and 3 (one CPU process each; DeepSpeed trains bf16 on the CPU), then the final
loss and the held-out evaluation side by side.

    python bench/precision.py                       # 600 steps, seeds 0 1: 10 runs of 1.5-3 min on 2 cores
    python bench/precision.py --steps 150 --seeds 0 --json
    python bench/precision.py --rounded-init        # and fp32 from the weights rounded to bf16 once
    python bench/precision.py --nproc 2 --kinds bf16-zero1   # two processes: gradients averaged as between GPUs

bf16 is the plan's bf16: fp32 weights under autocast (docs/training.md, "Precision"). fp32
at ZeRO-0 runs beside them as a control; with --rounded-init, so does fp32 ZeRO-1 from the
initial weights rounded to bf16 (see ROUNDED_INIT). Each run's folder is kept under --out, and
running the bench again with the same --out reuses the runs it finished. The loss compared is the mean of the last 50
steps' logged losses (one logged step is noisy:
contrastive losses jump between batches), for each bf16 run against the fp32 run of the same
seed. Several seeds, because two runs of the same model differ in their last bits and the
demo's contrastive terms amplify that: what matters is whether bf16 is worse on average, not
one trajectory. It prints a table and, with --json, one JSON document.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# fp32 at ZeRO-0 is the control: the same arithmetic as fp32 at ZeRO-1 but for DeepSpeed's
# optimizer wrapper, so its distance from fp32 ZeRO-1 is what last-bit differences alone do
# to the demo over these steps.
RUNS = (("fp32", 1), ("fp32", 0), ("bf16", 0), ("bf16", 1), ("bf16", 3))
# With --rounded-init, a second control: fp32 at ZeRO-1 from the initial weights rounded to
# bf16 and back, every later step in fp32. Its distance from fp32 is what one perturbation
# of bf16's size does to the demo: how finely the demo's final loss can tell two runs apart.
# (DeepSpeed's bf16 section, which rigtrain used before autocast, started every run there.)
ROUNDED_INIT = ("fp32-bf16init", 1)
# Only by name with --kinds: fp32 at ZeRO-3, the control for bf16 at ZeRO-3 (whose six-seed
# mean leaned above fp32's, README "Precision and the GPU path").
ON_REQUEST = (("fp32", 3),)
# `rigtrain train` in this process (one process on the CPU trains in-process) with the model
# builder wrapped to round the initial weights; it says so, and the bench checks it did.
ROUNDED_TRAIN = """
import sys, torch
import rigtrain.train.trainer as trainer
from rigtrain.cli import main
build = trainer.build_model
def rounded(*args):
    model = build(*args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    print("bench: initial weights rounded to bf16", file=sys.stderr, flush=True)
    return model
trainer.build_model = rounded
sys.exit(main(sys.argv[1:]))
"""
EVAL_KEYS = ("knn_shape_top1", "knn_colour_top1", "knn_direction_top1", "t2v_r5")


def _finished(out: Path, steps: int) -> bool:
    try:
        return json.loads((out / "eval.json").read_text())["step"] == steps
    except (OSError, ValueError, KeyError):
        return False


def train(out: Path, precision: str, stage: int, seed: int, steps: int, nproc: int = 1) -> dict:
    """One run, or the numbers of one that an earlier call of this bench finished in `out`
    (run it again with the same --out and it continues where it stopped)."""
    started = time.perf_counter()
    if not _finished(out, steps):
        shutil.rmtree(out, ignore_errors=True)
        launcher = ["-c", ROUNDED_TRAIN] if precision == ROUNDED_INIT[0] else ["-m", "rigtrain"]
        command = [
            sys.executable,
            *launcher,
            "train",
            "--out",
            str(out),
            "--steps",
            str(steps),
            "--set",
            f"train.precision={'fp32' if precision == ROUNDED_INIT[0] else precision}",
            f"train.zero_stage={stage}",
            f"train.seed={seed}",
            f"train.ckpt_every={steps}",
            f"train.nproc={nproc}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        if precision == ROUNDED_INIT[0] and "initial weights rounded" not in result.stderr:
            raise SystemExit(f"{out}: the run did not build its model in this process; nothing was rounded")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tail = [r["loss"] for r in rows if r["step"] > steps - 50]
    last_eval = json.loads((out / "eval.json").read_text())
    evaluation = {f"knn_{label}_top1": last_eval["knn"][label]["top1"] for label in ("shape", "colour", "direction")}
    evaluation["t2v_r5"] = last_eval["retrieval"]["t2v"]["r5"]
    return {
        "precision": precision,
        "zero_stage": stage,
        "seed": seed,
        "nproc": nproc,
        "loss_last50": statistics.fmean(tail),
        "loss_final": rows[-1]["loss"],
        "eval": evaluation,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--rounded-init", action="store_true", help="add fp32 ZeRO-1 from the initial weights rounded to bf16"
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        metavar="NAME",
        help="only these runs, by the table's names (e.g. fp32-zero1 bf16-zero1 fp32-bf16init-zero1); "
        "fp32-zero1 is always run, the others are compared with it",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes per run (train.nproc; gloo on the CPU, as GPUs would be): with 2 or more, "
        "DeepSpeed averages Linear layers' gradients in bf16 as it does between GPUs",
    )
    args = parser.parse_args()
    if args.nproc > 1 and (args.rounded_init or "fp32-bf16init-zero1" in (args.kinds or ())):
        parser.error("--rounded-init rounds the model built in this process: it needs --nproc 1")
    kinds = RUNS + ((ROUNDED_INIT,) if args.rounded_init else ())
    if args.kinds:
        every = {f"{p}-zero{z}": (p, z) for p, z in (*RUNS, ROUNDED_INIT, *ON_REQUEST)}
        unknown = sorted(set(args.kinds) - set(every))
        if unknown:
            parser.error(f"--kinds: no run named {', '.join(unknown)}; the runs are {', '.join(every)}")
        kinds = tuple(k for name, k in every.items() if k == RUNS[0] or name in args.kinds)

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rigtrain-precision-"))
    runs = []
    for seed in args.seeds:
        for precision, stage in kinds:
            out = root / f"{precision}-zero{stage}-seed{seed}"
            runs.append(train(out, precision, stage, seed, args.steps, args.nproc))
            if not args.json:
                r = runs[-1]
                print(
                    f"  {precision} ZeRO-{stage} seed {seed}: loss {r['loss_last50']:.3f} ({r['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    reference = {r["seed"]: r for r in runs if (r["precision"], r["zero_stage"]) == RUNS[0]}
    for r in runs:
        ref = reference[r["seed"]]
        r["loss_vs_fp32"] = r["loss_last50"] / ref["loss_last50"] - 1
    summary = {}
    for precision, stage in kinds:
        mine = [r for r in runs if (r["precision"], r["zero_stage"]) == (precision, stage)]
        summary[f"{precision}-zero{stage}"] = {
            "loss_last50_mean": statistics.fmean(r["loss_last50"] for r in mine),
            "loss_vs_fp32_mean": statistics.fmean(r["loss_vs_fp32"] for r in mine),
            # how far single runs scatter around fp32's: set against the controls' scatter
            "loss_vs_fp32_rms": statistics.fmean(r["loss_vs_fp32"] ** 2 for r in mine) ** 0.5,
            # the run furthest from fp32's: what "within 5% run by run" is about
            "loss_vs_fp32_worst": max((r["loss_vs_fp32"] for r in mine), key=abs),
            **{key: statistics.fmean(r["eval"][key] for r in mine) for key in EVAL_KEYS},
        }
    report = {
        "steps": args.steps,
        "seeds": args.seeds,
        "nproc": args.nproc,
        "runs": runs,
        "summary": summary,
        "folder": str(root),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"demo, {args.steps} steps, {args.nproc} process(es) per run, seeds {' '.join(map(str, args.seeds))}; "
        "loss = mean of the last 50 steps"
    )
    header = f"{'run':<20}{'seed':>5}{'loss':>8}{'vs fp32':>9}" + "".join(
        f"{k.replace('_top1', ''):>16}" for k in EVAL_KEYS
    )
    print(header)
    for r in runs:
        print(
            f"{r['precision'] + '-zero' + str(r['zero_stage']):<20}{r['seed']:>5}{r['loss_last50']:>8.3f}"
            f"{r['loss_vs_fp32']:>+9.1%}" + "".join(f"{r['eval'][k]:>16.3f}" for k in EVAL_KEYS)
        )
    print("mean over seeds")
    for name, s in summary.items():
        print(
            f"{name:<20}{'':>5}{s['loss_last50_mean']:>8.3f}{s['loss_vs_fp32_mean']:>+9.1%}"
            + "".join(f"{s[k]:>16.3f}" for k in EVAL_KEYS)
        )
    print("single runs against fp32's loss, over the seeds: root mean square, furthest")
    for name, s in summary.items():
        print(f"{name:<20}{'':>5}{'':>8}{s['loss_vs_fp32_rms']:>9.1%}{s['loss_vs_fp32_worst']:>+9.1%}")
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
