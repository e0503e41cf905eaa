"""The kit's out-of-memory step: a run planned for more memory than the card has must run
out on its first step, back off and finish (rigtrain/train/launch.py's loop).

On a GPU the shortage is real: a second process takes all but 90% of what the `small` run
used on GPU 0, and the run gets a rig file read before that, so its plan believes the card
is as free as before. On the CPU nothing can run out, so the worker is told to raise
torch's OutOfMemoryError above a micro-batch (RIGTRAIN_FAULT_OOM_ABOVE_MICRO_BATCH) and
the launcher's back-off runs the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from steps import CPU_SETTINGS, GIB, NO_DEADLINE, Deadline, last_line, rigtrain, rows_of

HOLD = """
import sys, torch
keep = int(sys.argv[1])
free, _ = torch.cuda.mem_get_info(0)  # after this process's own CUDA context
block = torch.empty(max(0, free - keep), dtype=torch.uint8, device="cuda:0")
print(f"holding {block.numel() / 2**30:.2f} GiB", flush=True)
sys.stdin.read()  # until the kit closes it
"""
CPU_LIMIT = 44  # the demo's micro-batch of 48 "does not fit" above this: 48 -> 42, then it trains


def oom_backoff(out: Path, gpu: bool, small: dict | None, deadline: Deadline = NO_DEADLINE) -> dict:
    started = time.perf_counter()
    run = out / "runs" / "oom-backoff"
    common = ["--out", str(run), "--steps", "3", "--set", "train.log_every=1", "train.ckpt_every=3"]
    common += ["eval.during_training=false"]
    if not gpu:
        toy = [s for s in CPU_SETTINGS if not s.startswith(("train.micro_batch_size", "train.grad_accum"))]
        env = {**os.environ, "RIGTRAIN_FAULT_OOM_ABOVE_MICRO_BATCH": str(CPU_LIMIT)}
        finished = rigtrain(out, "oom-backoff", "train", "--preset", "demo", *common, *toy, env=env, deadline=deadline)
        return _result(run, finished, started, held_gib=None)
    memory = (small or {}).get("memory") or {}
    used = memory.get("nvml_process_max_gib") or memory.get("card_used_after_first_step_gib")
    if not used:
        return {"ok": False, "error": "the small run left no memory figure to size the shortage from"}
    probed = rigtrain(out, "oom-rig", "rig", "--json", "--preset", "small", deadline=deadline)
    if probed.code != 0:
        return {"ok": False, "error": last_line(probed.output)}
    rig_file = out / "oom-rig.json"  # the card as free as it is now, before the holder takes its share
    # the JSON document on stdout; warnings on stderr (merged into the output) may come before or after it
    start = probed.output.find("{")
    if start < 0:
        return {"ok": False, "error": f"`rigtrain rig --json` printed no JSON: {last_line(probed.output)}"}
    report, _ = json.JSONDecoder().raw_decode(probed.output[start:])
    rig_file.write_text(json.dumps(report["rig"]))
    keep = int(0.9 * used * GIB)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(keep)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        held = holder.stdout.readline().strip()
        finished = rigtrain(
            out,
            "oom-backoff",
            "train",
            "--preset",
            "small",
            "--rig",
            str(rig_file),
            *common,
            "rig.gpus=0",
            deadline=deadline,
        )
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    result = _result(run, finished, started, held_gib=held)
    result["left_free_gib"] = round(keep / GIB, 2)
    return result


def _result(run: Path, finished, started: float, held_gib) -> dict:
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    backed_off = config.get("backed_off_from", [])
    steps = [r.get("step") for r in rows_of(run)]
    result = {
        "ok": finished.code == 0 and bool(backed_off) and steps[-1:] == [3],
        "exit_code": finished.code,
        "tried_micro_batches": backed_off,
        "finished_at_micro_batch": config.get("config", {}).get("train", {}).get("micro_batch_size"),
        "steps_logged": steps,
        "held": held_gib,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if finished.code != 0:
        result["error"] = last_line(finished.output)
    return result
