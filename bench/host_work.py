"""The host's work per training step, on the CPU: what a GPU's host must issue before the GPU
can work, measured where no GPU is. On the first H200 runs `small` and the demo were
host-bound (3-4% MFU): each step launches well over a thousand kernels, each a few
microseconds of GPU work behind its host time. This counts the ops one step dispatches (a
GPU launches a kernel for nearly each; views launch none), part by part, and times steps at
micro-batch 1. The counts carry over to a GPU; the times are this CPU's, where bf16's
arithmetic (without bf16 matrix units) is much of a step even at micro-batch 1.

    python bench/host_work.py [--presets demo small] [--steps 40] [--repeats 3]

Each preset is planned as on one GPU (bf16 under autocast, ZeRO-0, one process) and trained
one step on the embedded data, then a process of its own opens that run's Trainer and
measures, alternating, two ways of finishing the backward:
- "rigtrain": as the trainer does (no all-reduce of a process with itself; clipping in
  multi-tensor kernels: train/engine.py, one_process_epilogue);
- "deepspeed": DeepSpeed's own (the gradients flattened, all-reduced and copied back one by
  one; a norm and a multiply per parameter to clip);
- with --compile, also "compiled": rigtrain's, with the training objective compiled as
  train.compile does (its first step's time, the compiling, is reported apart; its ops are
  not counted, since inductor's kernels do not pass through torch's dispatcher).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ONE_GPU_PLAN = ["train.precision=bf16", "train.zero_stage=0", "train.micro_batch_size=1", "eval.during_training=false"]
PARTS = ("forward", "backward", "gradients", "optimizer", "trainer")


def prepare(run: Path, preset: str) -> None:
    command = [sys.executable, "-m", "rigtrain", "train", "--preset", preset, "--out", str(run), "--steps", "1"]
    result = subprocess.run([*command, "--set", *ONE_GPU_PLAN], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")


def probe(run: Path, steps: int, repeats: int, compiled: bool) -> dict:
    """In this process: the run's Trainer, its ops per part and its step times both ways."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class PartCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.part, self.ops = "trainer", Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[self.part] += not func.is_view  # a view launches no kernel
            return func(*args, **(kwargs or {}))

    record = json.loads((run / "config.json").read_text())
    record["config"]["train"].update(steps=10**6, log_every=10**6, ckpt_every=10**6)  # no logging or saving step
    (run / "config.json").write_text(json.dumps(record))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.update(record["plan"]["env"])
    from rigtrain.train.engine import compile_objective
    from rigtrain.train.trainer import Trainer

    trainer = Trainer(run)
    engine, counter = trainer.engine, PartCounter()
    own_clipped, grad_clip = trainer.clipped, trainer.config.train.grad_clip

    model, compiled_objective = trainer.model, None

    def set_way(way: str) -> None:
        nonlocal compiled_objective
        ours = way != "deepspeed"
        engine.enable_backward_allreduce = not ours
        trainer.clipped = own_clipped if ours else []
        engine._config.gradient_clipping = 0.0 if ours else grad_clip
        model.__dict__.pop("objective", None)  # the class's method: uncompiled
        if way == "compiled":
            if compiled_objective is None:
                compile_objective(model)
                compiled_objective = model.objective
            model.objective = compiled_objective

    def in_part(name: str, part: str) -> None:
        function = getattr(engine, name)

        def counted(*args, **kwargs):
            outer, counter.part = counter.part, part
            try:
                return function(*args, **kwargs)
            finally:
                counter.part = outer

        setattr(engine, name, counted)

    for name, part in (("forward", "forward"), ("backward", "backward"), ("allreduce_gradients", "gradients")):
        in_part(name, part)
    in_part("step", "optimizer")
    out = {"parameters": sum(1 for _ in engine.module.parameters()), "ways": {}}
    try:
        times: dict[str, list[float]] = {"rigtrain": [], "deepspeed": [], **({"compiled": []} if compiled else {})}
        for way in times:
            set_way(way)
            started = time.perf_counter()
            trainer.train_step()  # warm: the first steps allocate (and compile)
            first = time.perf_counter() - started
            trainer.train_step()
            out["ways"][way] = {"first_step_s": first, "ops": {}}
            if way == "compiled":
                continue
            counter.ops = Counter()
            with counter:
                trainer.train_step()
            out["ways"][way]["ops"] = {part: counter.ops[part] for part in PARTS}
        for _ in range(repeats):  # alternating, so a noisy machine slows both alike
            for way in times:
                set_way(way)
                started = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                times[way].append((time.perf_counter() - started) / steps * 1e3)
        for way, measured in times.items():
            out["ways"][way]["ms_per_step"] = statistics.median(measured)
            if out["ways"][way]["ops"]:
                out["ways"][way]["ops"]["total"] = sum(out["ways"][way]["ops"].values())
        out["threads"] = torch.get_num_threads()
    finally:
        trainer.close()
    return out


def table(results: dict) -> str:
    lines = [
        f"{'preset':<7} {'way':<10} {'params':>6} "
        + " ".join(f"{p:>9}" for p in (*PARTS, "total"))
        + f" {'ms/step':>8} {'vs deepspeed':>12} {'first step s':>12}"
    ]
    for preset, r in results.items():
        base = r["ways"]["deepspeed"]
        for way, w in r["ways"].items():
            ratio = w["ms_per_step"] / base["ms_per_step"]
            lines.append(
                f"{preset:<7} {way:<10} {r['parameters']:>6} "
                + " ".join(f"{w['ops'].get(p, '-'):>9}" for p in (*PARTS, "total"))
                + f" {w['ms_per_step']:>8.1f} {ratio:>11.2f}x {w['first_step_s']:>12.1f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["demo", "small"])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed stretch")
    parser.add_argument("--repeats", type=int, default=3, help="timed stretches per way")
    parser.add_argument("--compile", action="store_true", help="also time the compiled objective")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # the measuring process
    args = parser.parse_args()
    if args.probe:
        print("PROBE " + json.dumps(probe(args.probe, args.steps, args.repeats, args.compile)), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            run = Path(tmp) / preset
            prepare(run, preset)
            command = [sys.executable, __file__, "--probe", str(run), "--steps", str(args.steps)]
            command += ["--repeats", str(args.repeats), *(["--compile"] if args.compile else [])]
            # a cache of its own: the compiling is timed from nothing, as a user's first run
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / f"inductor-{preset}")}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"measuring {preset} failed:\n{done.stderr[-3000:]}")
            results[preset] = json.loads(lines[-1][len("PROBE ") :])
    print(table(results))
    print(json.dumps({"host_work": results}))


if __name__ == "__main__":
    main()
