"""`rigtrain tune`'s targets (issue 15), measured in one run on this machine:

1. the tune finishes within its budget;
2. the configuration it picks is at least as fast as the plan's own choice, measured side
   by side afterwards: `rigtrain train` runs of each, alternated, the same steps each;
3. with --deepspeed-autotuner: the time to a result against DeepSpeed's autotuner over the
   micro-batch space both can search (one process; DeepSpeed's autotuner tunes neither the
   process count nor the loader), each with its own chosen configuration's throughput.

    python bench/tune.py [--preset demo] [--budget-s 300] [--steps 60] [--rounds 2]
                         [--deepspeed-autotuner] [--out DIR]

Prints a table and writes OUT/bench-tune.json. DeepSpeed's autotuner needs `tabulate`
(pip install tabulate) and starts its experiments through its launcher."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rigtrain(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "rigtrain", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    return result, time.perf_counter() - started


def check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        sys.exit(f"{what} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def clips_per_s(run: Path) -> float:
    """The median logged throughput of a run, its first logged step (start-up) left out."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]
    return statistics.median(speeds)


def side_by_side(out: Path, preset: str, tune_dir: Path, steps: int, rounds: int) -> dict:
    """The plan's own choice and the tune's, alternated, so that the machine's drift hits both."""
    common = ["--preset", preset, "--steps", str(steps), "--set", "eval.during_training=false", "train.log_every=5"]
    speeds: dict[str, list[float]] = {"plan": [], "tuned": []}
    for r in range(rounds):
        for name, extra in (("plan", []), ("tuned", ["--tuned", str(tune_dir)])):
            run = out / f"{name}-{r}"
            result, _ = rigtrain("train", "--out", str(run), *common, *extra)
            check(result, f"train ({name}, round {r})")
            speeds[name].append(clips_per_s(run))
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
    plan, tuned = statistics.median(speeds["plan"]), statistics.median(speeds["tuned"])
    return {"plan_clips_per_s": speeds["plan"], "tuned_clips_per_s": speeds["tuned"], "ratio": tuned / plan}


USER_SCRIPT = '''
"""A user's training script as DeepSpeed's autotuner runs it: rigtrain's model and loader,
deepspeed.initialize from --deepspeed_config, a plain loop."""
import argparse

import deepspeed

from rigtrain.config import load_config
from rigtrain.data.dataset import make_loader, open_dataset
from rigtrain.data.embedded import embedded_dataset
from rigtrain.model import build_model

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=0)
parser.add_argument("--preset", default="demo")
parser.add_argument("--steps", type=int, default=20)
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()
config = load_config(args.preset)
model = build_model(config.model, config.data)
engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
loader = make_loader(
    open_dataset(embedded_dataset(config.data, log=lambda line: None), config.data),
    config.data, rank=0, world=1, micro_batch=engine.train_micro_batch_size_per_gpu(), seed=0,
    start_batch=0, workers=1, pin_memory=False,
)
batches = iter(loader)
for _ in range(args.steps * engine.gradient_accumulation_steps()):
    loss = engine(next(batches))["loss"]
    engine.backward(loss)
    engine.step()
'''


def deepspeed_autotuner(out: Path, preset: str, micro_batches: list[int]) -> dict:
    """DeepSpeed's autotuner in fast mode (micro-batch only) over the same micro-batch sizes,
    the global batch kept: given a list, it runs each (accumulation = the largest // it) after
    a profiling run of the model. Given only a range, it derives its own list, which for the
    demo is the largest alone (one experiment), not the space rigtrain's tune measures."""
    folder = out / "deepspeed-autotuner"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_ds.py").write_text(USER_SCRIPT)
    config = {
        "train_micro_batch_size_per_gpu": sorted(micro_batches),
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
        "zero_optimization": {"stage": 1},
        "autotuning": {
            "enabled": True,
            "fast": True,
            "results_dir": str(folder / "results"),
            "exps_dir": str(folder / "exps"),
            "overwrite": True,
        },
    }
    (folder / "ds_config.json").write_text(json.dumps(config))
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "PATH": f"{launcher.parent}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run(
        [str(launcher), "--autotuning", "tune", "train_ds.py", "--preset", preset, "--deepspeed_config",
         "ds_config.json"],
        cwd=folder, capture_output=True, text=True, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    (folder / "autotuner.log").write_text(result.stdout + result.stderr)
    experiments = {}
    for metrics in (folder / "results").glob("*/metrics.json"):
        experiments[metrics.parent.name] = json.loads(metrics.read_text()).get("throughput")
    best = max(experiments.items(), key=lambda kv: kv[1] or 0, default=(None, None))
    return {
        "seconds": seconds,
        "exit_code": result.returncode,
        "experiments": experiments,
        "best": best[0],
        "best_throughput": best[1],
        "log": str(folder / "autotuner.log"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--steps", type=int, default=60, help="steps of each side-by-side train run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--deepspeed-autotuner", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.deepspeed_autotuner and importlib.util.find_spec("tabulate") is None:
        # DeepSpeed's autotuner imports it for its summary; found missing only after the
        # rest of the bench had run, it would fail at the end with a traceback in its log
        sys.exit("bench/tune.py --deepspeed-autotuner needs tabulate for DeepSpeed's autotuner: pip install tabulate")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "budget_s": args.budget_s}

    tune_dir = out / "tune"
    result, seconds = rigtrain(
        "tune", "--preset", args.preset, "--budget-s", str(args.budget_s), "--out", str(tune_dir)
    )
    check(result, "rigtrain tune")
    print(result.stdout)
    record = json.loads((tune_dir / "tune.json").read_text())
    best = record["trials"][record["best"]]
    report["tune"] = {
        "seconds": round(seconds, 1),
        "within_budget": seconds <= args.budget_s,
        "measured": sum(t["status"] == "ok" for t in record["trials"]),
        "stopped_early": sum(bool(t.get("raced_out")) for t in record["trials"]),
        "skipped": sum(t["status"] == "skipped" for t in record["trials"]),
        "configurations": len(record["trials"]),
        "best": best["index"],
        "best_values": best["values"],
        "tune_clips_per_s": best["clips_per_s"],
    }
    report["side_by_side"] = side_by_side(out, args.preset, tune_dir, args.steps, args.rounds)

    if args.deepspeed_autotuner:
        micro = [48, 24, 12, 6]
        space = ["--set", "train.nproc=1", "data.workers=1", "--trial-seconds", "1"]
        same, ours = rigtrain(
            "tune", "--preset", args.preset, "--budget-s", "600", "--out", str(out / "tune-micro"), *space
        )
        check(same, "rigtrain tune (micro-batch space)")
        mine = json.loads((out / "tune-micro" / "tune.json").read_text())
        theirs = deepspeed_autotuner(out, args.preset, micro)
        report["versus_deepspeed_autotuner"] = {
            "rigtrain_seconds": round(ours, 1),
            "rigtrain_trials": sum(t["status"] == "ok" for t in mine["trials"]),
            "rigtrain_best_clips_per_s": mine["trials"][mine["best"]]["clips_per_s"],
            "deepspeed": theirs,
            "time_ratio": round(ours / theirs["seconds"], 3),
        }

    sbs = report["side_by_side"]
    print(f"\nbench/tune.py, {report['date']}, preset {args.preset}")
    print(f"{'what':<46} {'value':>12}")
    print(f"{'tune wall time (s), budget ' + format(args.budget_s, 'g'):<46} {report['tune']['seconds']:>12}")
    print(f"{'configurations measured / planned':<46} {report['tune']['measured']:>5} / {len(record['trials']):<5}")
    early, skipped = report["tune"]["stopped_early"], report["tune"]["skipped"]
    print(f"{'  of them stopped early; skipped':<46} {early:>5} ; {skipped:<5}")
    print(f"{'plan own choice, clips/s (median of rounds)':<46} {statistics.median(sbs['plan_clips_per_s']):>12.1f}")
    print(f"{'tuned choice, clips/s (median of rounds)':<46} {statistics.median(sbs['tuned_clips_per_s']):>12.1f}")
    print(f"{'tuned / plan':<46} {sbs['ratio']:>12.3f}")
    if "versus_deepspeed_autotuner" in report:
        v = report["versus_deepspeed_autotuner"]
        print(f"{'micro-batch space: rigtrain tune (s)':<46} {v['rigtrain_seconds']:>12}")
        print(f"{'micro-batch space: DeepSpeed autotuner (s)':<46} {v['deepspeed']['seconds']:>12.1f}")
        print(f"{'time ratio (target <= 0.10)':<46} {v['time_ratio']:>12}")
    (out / "bench-tune.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
