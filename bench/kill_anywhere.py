"""`kill -9` at any moment costs only the steps since the last complete checkpoint, and the
run resumed after it ends exactly where an unbroken run ends: the same loss at every step,
bit for bit, and the same final checkpoint (weights, optimizer states, RNG states).

    python bench/kill_anywhere.py [--seed S] [--kills N] [--steps N] [--ckpt-every N]
                                  [--nproc N] [--zero-stage Z] [--json]

One run trains straight through; another, the same command, is killed with SIGKILL at
random moments (at any time after it starts, or within a moment of a step, so in
training, evaluating, saving or pruning a checkpoint)
and resumed with `rigtrain train --out RUN --resume` each time, until it finishes. After
every kill: no process of the run is left, the resumed run starts from the newest
checkpoint that was complete when it died (never an older one, never a half-written one)
and says nothing was damaged, and no traceback. At the end the two runs' metrics and final
weights are compared. Prints a table of the kills and, last, one JSON line. A short,
fixed-seed version runs in the suite (tests/test_kill_anywhere.py).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A small model with every part of the real one: steps of tens of milliseconds on a CPU.
TINY = [
    "model.d_model=32",
    "model.heads=2",
    "model.num_latents=8",
    "model.va_dim=32",
    "model.vt_dim=32",
    "train.micro_batch_size=8",
    "train.log_every=1",
]


def command(run: Path, args, resume: bool) -> list[str]:
    line = [sys.executable, "-m", "rigtrain", "train", "--out", str(run)]
    if resume:
        return [*line, "--resume"]
    return [
        *line,
        "--steps",
        str(args.steps),
        "--set",
        *TINY,
        f"train.ckpt_every={args.ckpt_every}",
        f"train.nproc={args.nproc}",
        f"train.zero_stage={args.zero_stage}",
    ]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a torn last line: what a kill in the middle of a write leaves
    return steps


def losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sigkill(process: subprocess.Popen) -> int:
    """SIGKILL the process alone, as `kill -9 PID` does; how many of the processes it had
    started (its workers, a forkserver, DeepSpeed's) are still alive 5 s later (then
    killed, so the next life starts clean)."""
    import psutil

    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline, alive = time.monotonic() + 5, family
    while alive and time.monotonic() < deadline:  # psutil.wait_procs notices late: it backs off
        alive = [p for p in alive if _running(p)]
        time.sleep(0.02)
    for orphan in alive:
        orphan.kill()
    return len(alive)


def saved_state(run: Path) -> tuple[int | None, list[str]]:
    """The newest checkpoint rigtrain would resume (None if none) and the tags that are
    not complete (a save or a prune cut short)."""
    from rigtrain.train import checkpoints

    ckpt = run / "checkpoints"
    good = checkpoints.newest_good(ckpt, warn=lambda line: None)
    partial = (
        sorted(p.name for p in ckpt.iterdir() if p.is_dir() and not (p / checkpoints.COMPLETE).is_file())
        if ckpt.is_dir()
        else []
    )
    return (good[0] if good else None), partial


def tensors(obj, prefix: str = "") -> dict:
    """Every tensor in a nested checkpoint object, by its path in it."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    found = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            found.update(tensors(value, f"{prefix}/{key}"))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found.update(tensors(value, f"{prefix}/{i}"))
    return found


def final_state(run: Path) -> dict:
    """The newest checkpoint's every tensor (weights, optimizer states of every rank, RNG
    states), by file and path."""
    import torch

    from rigtrain.train import checkpoints

    step, tag = checkpoints.newest_good(run / "checkpoints", warn=lambda line: None)
    found = {"step": step}
    for path in sorted((run / "checkpoints" / tag).rglob("*.pt")):
        found.update(tensors(torch.load(path, weights_only=False, map_location="cpu"), path.name))
    return found


def same_state(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        a[k] == b[k] if not isinstance(a[k], torch.Tensor) else torch.equal(a[k], b[k]) for k in a
    )


def one_life(run: Path, args, rng: random.Random, resume: bool, kill: bool) -> dict:
    """Start (or resume) the run; unless `kill` is False, SIGKILL it at a random moment."""
    before = logged_steps(run)
    started = time.monotonic()
    process = subprocess.Popen(command(run, args, resume), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    moment = "finished"
    if kill:
        if rng.random() < 0.2:
            moment = "any time"
            time.sleep(rng.uniform(0.3, 3.0))
        else:
            moment = "after a step"
            last = max(before, default=0)
            while process.poll() is None and max(logged_steps(run), default=0) <= last:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, args.window_s))
        left = sigkill(process) if process.poll() is None else 0
        if process.returncode != -signal.SIGKILL:
            moment = "finished"
    out, err = process.communicate(timeout=600)
    row = {"moment": moment, "returncode": process.returncode, "seconds": round(time.monotonic() - started, 2)}
    row["resumed_from"] = next(
        (
            int(line.split(" step ")[1].split("/")[0])
            for line in out.splitlines()
            if "resuming at step " in line or "starting step " in line
        ),
        None,
    )
    row["traceback"] = "Traceback" in err or "Traceback" in out
    row["damaged_warning"] = "damaged and skipped" in out + err
    row["last_logged"] = max(logged_steps(run), default=0)
    if moment != "finished":
        row["left_running"] = left
    row["good"], row["partial"] = saved_state(run)
    if process.returncode not in (0, -signal.SIGKILL):
        row["stderr"] = err[-1500:]
    return row


def chaos(args, folder: Path) -> dict:
    rng = random.Random(args.seed)
    straight = folder / "straight"
    done = subprocess.run(command(straight, args, False), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the straight run failed:\n{done.stderr[-3000:]}")
    run = folder / "killed"
    lives, problems = [], []
    good_at_kill = None
    for life in range(args.kills + 1):
        # killed before it wrote config.json, it is not a run yet: the same command again, as a user would
        resume = (run / "config.json").is_file()
        row = one_life(run, args, rng, resume=resume, kill=life < args.kills)
        row["life"] = life
        resumed = row["resumed_from"]  # None: killed before it said where it starts
        if life > 0 and resumed is not None and resumed != (good_at_kill or 0):
            problems.append(f"life {life}: resumed from step {row['resumed_from']}, but step {good_at_kill} was saved")
        if row["traceback"]:
            problems.append(f"life {life}: a traceback")
        if row["damaged_warning"]:
            problems.append(f"life {life}: a checkpoint was called damaged after a kill")
        if row.get("left_running"):
            problems.append(f"life {life}: {row['left_running']} process(es) of the run outlived the kill")
        if row["returncode"] not in (0, -signal.SIGKILL):
            problems.append(f"life {life}: exit {row['returncode']}: {row.get('stderr', '')[-300:]}")
        lives.append(row)
        good_at_kill = row["good"]
        if row["moment"] == "finished" and row["returncode"] == 0:
            break
    if lives[-1]["returncode"] != 0:
        problems.append("the killed run never finished")
    else:
        a, b = losses(straight), losses(run)
        differing = [s for s in a if a[s] != b.get(s)]
        if differing or sorted(b) != sorted(a):
            problems.append(
                f"losses differ from the straight run at steps {differing[:10]} (logged {len(b)} of {len(a)})"
            )
        if not same_state(final_state(straight), final_state(run)):
            problems.append(
                "the final checkpoint (weights, optimizer states, RNG states) differs from the straight run's"
            )
    trained = sum(r["last_logged"] - r["resumed_from"] for r in lives if r["resumed_from"] is not None)
    return {
        "seed": args.seed,
        "steps": args.steps,
        "ckpt_every": args.ckpt_every,
        "nproc": args.nproc,
        "zero_stage": args.zero_stage,
        "kills": sum(1 for r in lives if r["returncode"] == -signal.SIGKILL),
        "mid_save_or_prune": sum(1 for r in lives if r["partial"] and r["returncode"] == -signal.SIGKILL),
        "steps_redone": trained - args.steps,
        "lives": lives,
        "problems": problems,
    }


# -- data prepare ------------------------------------------------------------------------------


def prepare_command(world: Path, out: Path) -> list[str]:
    """Frames larger than the Shapes world's own: decoding takes long enough to be killed in."""
    settings = ["data.shard_clips=16", "data.frame_size=160,160", "data.fps=16"]
    return [
        sys.executable,
        "-m",
        "rigtrain",
        "data",
        "prepare",
        str(world),
        str(out),
        "--workers",
        "2",
        "--set",
        *settings,
    ]


def prepared_files(out: Path) -> dict[str, str]:
    """Every file a prepare leaves (but the lock, the log of what each said and the index's
    timing), with its checksum."""
    import xxhash

    found = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name not in (".prepare.lock", "prepare.log", "index.json"):
            found[path.relative_to(out).as_posix()] = xxhash.xxh3_64(path.read_bytes()).hexdigest()
    if (out / "index.json").is_file():
        index = json.loads((out / "index.json").read_text())
        index.pop("seconds", None)
        found["index.json"] = json.dumps(index, sort_keys=True)
    return found


def prepare_life(world: Path, out: Path, window: float | None, rng: random.Random) -> dict:
    """One `data prepare` into `out`, SIGKILLed within `window` seconds unless it is None."""
    started = time.monotonic()
    process = subprocess.Popen(prepare_command(world, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    left = 0
    if window is not None:
        time.sleep(rng.uniform(0.05, window))
        left = sigkill(process) if process.poll() is None else 0
    stdout, stderr = process.communicate(timeout=600)
    said = stdout.strip().splitlines() if process.returncode in (0, -signal.SIGKILL) else stderr.strip().splitlines()
    return {
        "returncode": process.returncode,
        "seconds": round(time.monotonic() - started, 2),
        "said": (said or [""])[-1][:90],
        "left_running": left,
        "traceback": "Traceback" in stdout + stderr,
    }


def chaos_prepare(args, folder: Path) -> dict:
    """`rigtrain data prepare` killed at random moments and run again until it finishes: it
    ends with the files of a prepare never killed, and no process of it outlives a kill."""
    rng = random.Random(args.seed)
    world = folder / "world"
    made = subprocess.run(
        [sys.executable, "-m", "rigtrain", "data", "synth", "--videos", str(args.videos), str(world)],
        capture_output=True,
        text=True,
    )
    started = time.monotonic()
    straight = subprocess.run(prepare_command(world, folder / "straight"), capture_output=True, text=True)
    window = (time.monotonic() - started) * 0.9  # kills land while it works, however fast the machine
    if made.returncode or straight.returncode:
        raise SystemExit(
            f"making the videos or the straight prepare failed:\n{made.stderr[-2000:]}{straight.stderr[-2000:]}"
        )
    want = prepared_files(folder / "straight")
    lives, problems, kills, round_ = [], [], 0, 0
    while kills < args.kills:  # rounds, each a fresh folder prepared to the end through its kills
        out, round_ = folder / f"killed-{round_}", round_ + 1
        for life in range(args.kills + 1):
            row = prepare_life(world, out, window if life < args.kills else None, rng)
            row.update({"round": round_, "life": life})
            lives.append(row)
            kills += row["returncode"] == -signal.SIGKILL
            where = f"round {round_}, life {life}"
            if row["left_running"]:
                problems.append(f"{where}: {row['left_running']} process(es) of the prepare outlived the kill")
            if row["traceback"] or row["returncode"] not in (0, -signal.SIGKILL):
                problems.append(f"{where}: exit {row['returncode']}: {row['said']}")
            if (out / "index.json").is_file() and prepared_files(out) != want:
                problems.append(f"{where}: index.json is there but the shards are not a finished prepare's")
            if row["returncode"] == 0:
                break
        got = prepared_files(out)
        if lives[-1]["returncode"] != 0:
            problems.append(f"round {round_}: the killed prepare never finished")
        elif got != want:
            differing = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            problems.append(f"round {round_}: the prepared files differ from a prepare never killed: {differing[:5]}")
    return {
        "videos": args.videos,
        "rounds": round_,
        "kills": kills,
        "lives": lives,
        "problems": problems,
    }


def print_table(result: dict) -> None:
    print(f"{'life':>4} {'killed':<13}{'exit':>5}{'s':>7}{'resumed from':>14}{'last logged':>13}{'saved':>7}", end="")
    print("  half-written")
    for r in result["lives"]:
        resumed = "-" if r["resumed_from"] is None else r["resumed_from"]
        good = "-" if r["good"] is None else r["good"]
        print(
            f"{r['life']:>4} {r['moment']:<13}{r['returncode']:>5}{r['seconds']:>7.1f}{resumed:>14}"
            f"{r['last_logged']:>13}{good:>7}  {' '.join(r['partial'])}"
        )
    verdict = "; ".join(result["problems"]) or "the same losses and final checkpoint"
    print(
        f"{result['kills']} kills ({result['mid_save_or_prune']} in a save or prune), "
        f"{result['steps_redone']} steps trained again; {verdict}"
    )


def print_prepare_table(result: dict) -> None:
    print(f"\n{'round':>5}{'life':>5}{'exit':>6}{'s':>7}  last line")
    for r in result["lives"]:
        print(f"{r['round']:>5}{r['life']:>5}{r['returncode']:>6}{r['seconds']:>7.1f}  {r['said']}")
    verdict = "; ".join(result["problems"]) or "the same shards and index as a prepare never killed"
    print(
        f"data prepare: {result['kills']} kills in {result['rounds']} prepares of {result['videos']} videos; {verdict}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--ckpt-every", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=1, help="training processes (ranks) on the CPU")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--window-s", type=float, default=0.6, help="a kill lands this long after a new step, at most")
    parser.add_argument("--videos", type=int, default=48, help="Shapes-world videos for the prepare part")
    parser.add_argument("--what", nargs="+", choices=["train", "prepare"], default=["train", "prepare"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {}
    with tempfile.TemporaryDirectory(prefix="rigtrain-kill-") as tmp:
        if "train" in args.what:
            (Path(tmp) / "train").mkdir()
            report["train"] = chaos(args, Path(tmp) / "train")
            if not args.json:
                print_table(report["train"])
        if "prepare" in args.what:
            (Path(tmp) / "prepare").mkdir()
            report["prepare"] = chaos_prepare(args, Path(tmp) / "prepare")
            if not args.json:
                print_prepare_table(report["prepare"])
    print(json.dumps({part: {k: v for k, v in r.items() if k != "lives"} for part, r in report.items()}))
    return 1 if any(r["problems"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
