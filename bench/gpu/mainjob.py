"""The kit's main-job step: the demo as a user first runs it (`rigtrain train --preset demo`:
900 steps with its evaluations, on the plan's precision), timed and judged by what it
learned, and the same run in fp32, so bf16 is seen to learn as well as fp32 on this card.

On the CPU both run 8 steps at the kit's toy sizes: the step proves itself, its figures say
nothing about learning."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from steps import CPU_SETTINGS, NO_DEADLINE, Deadline, last_line, rigtrain, rows_of

CPU_STEPS = 8
DONE = re.compile(r"done: steps (\d+)-(\d+) in ([0-9.]+) s")  # rigtrain/train/trainer.py's last line
EVAL_FIGURES = ("knn_shape_top1", "knn_colour_top1", "knn_direction_top1", "t2v_r5", "v2t_r5")


def main_job(
    out: Path, gpu: bool, deadline: Deadline = NO_DEADLINE, precision: str | None = None, compiled: bool = False
) -> dict:
    """PRECISION None: the plan's (bf16 on a card that has it); else train.precision=PRECISION.
    compiled: with train.compile=true (its first steps compile)."""
    name = "main-job" + (f"-{precision}" if precision else "") + ("-compiled" if compiled else "")
    run = out / "runs" / name
    settings = [] if gpu else [s for s in CPU_SETTINGS if not s.startswith("profile.")]  # bf16, as on a GPU
    settings += [] if gpu else ["train.log_every=2"]  # a few step times past the first, of the 8 steps
    if precision is not None:
        settings = [s for s in settings if not s.startswith("train.precision=")] + [f"train.precision={precision}"]
    if compiled:
        settings.append("train.compile=true")
    steps = [] if gpu else ["--steps", str(CPU_STEPS)]
    started = time.perf_counter()
    args = ["train", "--preset", "demo", "--out", str(run), *steps]
    finished = rigtrain(out, name, *args, *(["--set", *settings] if settings else []), deadline=deadline)
    record: dict = {"exit_code": finished.code, "seconds": round(time.perf_counter() - started, 1)}
    if finished.code != 0:
        record["error"] = last_line(finished.output)
    done = DONE.findall(finished.output)
    record["train_seconds"] = float(done[-1][2]) if done else None  # the steps alone, start-up excluded
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    plan = config.get("plan", {})
    record["plan"] = {k: plan.get(k) for k in ("precision", "micro_batch_size", "grad_accum_steps", "zero_stage")}
    rows = rows_of(run)
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    record["steps"] = rows[-1]["step"] if rows else 0
    # a step's own time, past the first logged stretch (which holds the start, and compiling):
    # the median of the logged step times, evaluations and saves excluded
    times = sorted(r["step_time_s"] for r in rows[1:] if isinstance(r.get("step_time_s"), (int, float)))
    record["median_step_s"] = round(times[len(times) // 2], 5) if times else None
    record["loss_first"], record["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
    # the end of the run, not one noisy step: the mean of the last 20 logged losses
    record["loss_end_mean"] = round(sum(losses[-20:]) / len(losses[-20:]), 4) if losses else None
    evaluation = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    record["eval"] = _eval_figures(evaluation)
    return record


def _eval_figures(evaluation: dict) -> dict:
    knn, retrieval = evaluation.get("knn") or {}, evaluation.get("retrieval") or {}
    figures = {f"knn_{k}_top1": (v or {}).get("top1") for k, v in knn.items()}
    for direction in ("t2v", "v2t"):
        figures[f"{direction}_r5"] = (retrieval.get(direction) or {}).get("r5")
    return {k: figures.get(k) for k in EVAL_FIGURES}
