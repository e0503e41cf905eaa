"""Fuzzing what users hand rigtrain: each kind of input, mutated many times, must come back
as a result or a one-line UserError (or, for a video, a reason it is skipped), never a
traceback. The fixed-seed, CI-sized version of the video part is
tests/test_ingest.py::test_damaged_copies_of_every_kind_of_file_cost_only_themselves; this
runs more of everything, and found the bugs listed in docs/testing.md ("Fuzzing").

    python bench/fuzz_inputs.py [--seed S] [--rounds N] [--run-rounds N] [--only PART ...] [--json]

Inputs: rig files (tests/rigs) through the planner; every config key through --set
values; sweep specs and curricula (examples/, a two-stage curriculum); Whisper JSON,
SRT, VTT and ASS narration; --config files and hostfiles; a folder of damaged videos and
sidecars through `rigtrain data check`, `data prepare` and on-demand reading, each in its
own process (a crash there is a finding, not the end of the fuzz); and what rigtrain wrote
itself, damaged: run folders through `train --resume` and `eval`, prepared shards through
`data bench` and `train`, profile runs through `profile analyze` (--run-rounds cases
each, one or two processes a case). --only picks
parts. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEIRD = [None, -1, 0, 1e308, float("nan"), float("inf"), "", "x", [], {}, True, 10**30, "12.6", [1, 2], 1e-300]


def mutate(obj, rng: random.Random) -> None:
    """One change somewhere in a JSON-like value: a key dropped, a value replaced, an item doubled."""
    if isinstance(obj, dict) and obj:
        key = rng.choice(list(obj))
        roll = rng.random()
        if roll < 0.15:
            del obj[key]
        elif roll < 0.6 and isinstance(obj[key], (dict, list)) and obj[key]:
            mutate(obj[key], rng)
        else:
            obj[key] = copy.deepcopy(rng.choice(WEIRD))  # a list of its own: JSON has no shared values
    elif isinstance(obj, list) and obj:
        i = rng.randrange(len(obj))
        roll = rng.random()
        if roll < 0.2:
            del obj[i]
        elif roll < 0.3:
            obj.append(copy.deepcopy(obj[i]))
        elif isinstance(obj[i], (dict, list)) and obj[i]:
            mutate(obj[i], rng)
        else:
            obj[i] = copy.deepcopy(rng.choice(WEIRD))


def mutate_text(text: str, rng: random.Random, tokens: list[str]) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        at, roll = rng.randrange(len(chars) + 1), rng.random()
        if roll < 0.4:
            chars[at:at] = list(rng.choice(tokens))
        elif roll < 0.7:
            del chars[at : at + rng.randint(1, 12)]
        elif chars:
            chars[min(at, len(chars) - 1)] = rng.choice(tokens)
    return "".join(chars)


def run_cases(name: str, cases, check) -> dict:
    """check(case) for each; what is neither a result nor a one-line UserError is a finding."""
    from rigtrain.errors import UserError

    findings: dict[str, str] = {}
    count = 0
    for case in cases:
        count += 1
        try:
            check(case)
        except UserError as err:
            if "\n" in str(err).strip():
                findings.setdefault("UserError over several lines", str(err)[:200])
        except Exception as err:  # what the fuzz is for: everything else is a finding
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{type(err).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            findings.setdefault(where, str(err)[:200])
    return {"input": name, "cases": count, "findings": findings}


def rig_files(rng: random.Random, rounds: int) -> dict:
    from rigtrain.config import load_config
    from rigtrain.rig.report import format_report
    from rigtrain.rig.rig_file import rig_from_dict
    from rigtrain.rig.visible import restricted
    from rigtrain.train.planning import plan_run

    bases = [json.loads(p.read_text()) for p in sorted((ROOT / "tests" / "rigs").glob("*.json"))]
    configs = {name: load_config(name) for name in ("demo", "small", "base")}

    software = next(base["software"] for base in bases if base.get("software"))

    def cases():
        for _ in range(rounds):
            rig = copy.deepcopy(rng.choice(bases))
            if "software" not in rig and rng.random() < 0.5:  # so torch's build is judged against every card
                rig["software"] = copy.deepcopy(software)
            if rng.random() < 0.3:  # where the run reads and writes, WSL2 and a driver out of reach
                mounts = ("ext4", "9p", "drvfs", "nfs4", "cifs", "fuse.sshfs", "zfs")
                rig["disk"] = [
                    {"path": f"/d{i}", "free_gib": rng.choice([0.001, 1.5, 40, 900]), "filesystem": rng.choice(mounts)}
                    for i in range(rng.randint(1, 2))
                ]
                rig.setdefault("software", {})["kernel"] = rng.choice(["6.6.87.2-microsoft-standard-WSL2", "6.8.0"])
                if not rig.get("gpus"):
                    rig["unreachable_gpus"] = rng.randint(0, 4)
                    rig["software"]["nvml"] = "not available (NVMLError_LibRmVersionMismatch)"
                for gpu in rig.get("gpus", []):  # other programs on the cards
                    gpu["processes"] = [
                        {"pid": rng.randint(1, 99999), "name": "python", "used_gib": rng.choice([None, 0.3, 17.5])}
                        for _ in range(rng.randint(0, 5))
                    ]
            if rng.random() < 0.3:  # a power supply for every kind of machine, the CPU-only one too
                rig["psu_w"] = rng.choice([450, 850, 1600])
            for _ in range(rng.randint(1, 4)):
                mutate(rig, rng)
            yield rig

    def check(data):
        rig = rig_from_dict(data)
        if rng.random() < 0.2:  # the cards CUDA_VISIBLE_DEVICES leaves: none (a CPU run on a GPU rig), or some
            rig = restricted(rig, rng.choice(["", "0", "1,0", "GPU-0"]), None)
        plan = plan_run(configs[rng.choice(list(configs))], rig, user_keys=set())
        format_report(rig, plan)

    return run_cases("rig files -> plan", cases(), check)


def config_values(rng: random.Random, rounds: int) -> dict:
    import dataclasses

    from rigtrain.config import load_config

    config = load_config("demo")
    keys = [
        f"{part.name}.{f.name}"
        for part in dataclasses.fields(config)
        if dataclasses.is_dataclass(getattr(config, part.name))
        for f in dataclasses.fields(getattr(config, part.name))
    ]
    values = ["", "0", "-1", "1e400", "nan", "inf", "true", "x", "1,2", "1,2,3,4", "2.5", "1e-320", "none", "🙂", "3"]

    def check(overrides):
        data = load_config(rng.choice(["demo", "small", "base"]), overrides=overrides).data
        # the sizes a run derives: an overflow here was a finding (data.fps=1e-320)
        assert min(data.clip_samples, data.stride_frames, data.window_step_samples, data.present_samples) >= 0

    cases = ([f"{rng.choice(keys)}={rng.choice(values)}" for _ in range(rng.randint(1, 3))] for _ in range(rounds))
    return run_cases("--set KEY=VALUE", cases, check)


CURRICULUM = """preset = "demo"

[[stage]]
name = "short"
steps = 50
set = ["data.recurrent_windows=1"]

[[stage]]
name = "long"
steps = 100
set = ["data.recurrent_windows=2", "train.lr=1e-4"]
"""
TOML_TOKENS = ['"', "[", "]", "{", "}", "=", ",", "\n", "0", "-1", "1e400", "nan", "inf", "true", '"x"', "[]", "#"]


def specs(rng: random.Random, rounds: int, folder: Path) -> dict:
    from rigtrain.sweep.spec import read_spec
    from rigtrain.train.curriculum import read_curriculum

    sweep = (ROOT / "examples" / "sweep-demo.toml").read_text()
    path = folder / "spec.toml"

    def check(case):
        is_sweep, text = case
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        read_spec(path) if is_sweep else read_curriculum(path)

    cases = (
        (is_sweep, mutate_text(sweep if is_sweep else CURRICULUM, rng, TOML_TOKENS))
        for is_sweep in (rng.random() < 0.5 for _ in range(rounds))
    )
    return run_cases("sweep specs and curricula", cases, check)


def config_files(rng: random.Random, rounds: int, folder: Path) -> dict:
    """--config files (a preset's own TOML, and the same as YAML and JSON) with their text
    mutated, through load_config; and hostfiles through read_hostfile (DeepSpeed's parser)."""
    import yaml  # the YAML form of the preset

    from rigtrain.config import load_config
    from rigtrain.config.loading import read_preset
    from rigtrain.train.hosts import read_hostfile

    preset = read_preset("demo")
    forms = {
        ".toml": (ROOT / "rigtrain" / "config" / "presets" / "demo.toml").read_text(),
        ".yaml": yaml.safe_dump(preset),
        ".json": json.dumps(preset, indent=1),
        "hostfile": "# two machines\nnode-a slots=2\nnode-b slots=2\n",
    }
    tokens = [
        *TOML_TOKENS,
        ":",
        "- ",
        "  ",
        "slots=",
        "slots=-1",
        "\t",
        "\x00",
        "&a",
        "*a",
        "!!python/object:os.system",
    ]

    def check(case):
        suffix, text = case
        path = folder / (f"config{suffix}" if suffix != "hostfile" else "hostfile")
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        read_hostfile(str(path)) if suffix == "hostfile" else load_config("demo", str(path))

    cases = ((s, mutate_text(forms[s], rng, tokens)) for s in (rng.choice(list(forms)) for _ in range(rounds)))
    return run_cases("--config files and hostfiles", cases, check)


NARRATION = {
    ".json": '{"segments": [{"start": 0.0, "end": 2.0, "text": " hello"}, {"start": 2, "end": 4, "text": "bike"}]}',
    ".srt": "1\n00:00:00,500 --> 00:00:02,000\nhello there\n\n2\n00:00:02,500 --> 00:00:04,000\na red bike\n",
    ".vtt": "WEBVTT\n\n00:00:00.500 --> 00:00:02.000\nhello <b>there</b>\n\n00:02.500 --> 00:04.000\na bike\n",
    ".ass": "[Script Info]\nScriptType: v4.00+\n\n[Events]\nFormat: Layer, Start, End, Style, Name, MarginL, MarginR, "
    "MarginV, Effect, Text\nDialogue: 0,0:00:00.50,0:00:02.00,Default,,0,0,0,,{\\i1}hello{\\i0} there\n",
}


def narration(rng: random.Random, rounds: int, folder: Path) -> dict:
    from rigtrain.data.container import MediaError
    from rigtrain.data.narration import read_narration

    tokens = ["{", "}", "[", "]", '"', ":", ",", "-->", "\n", "0", "-1", "1e999", "NaN", ".", "\\N", "{\\b1}", "\x00"]

    def check(case):
        suffix, text = case
        path = folder / f"narration{suffix}"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            read_narration(path)
        except MediaError:
            pass  # the reason prepare gives when it skips the file

    suffixes = list(NARRATION)
    cases = ((s, mutate_text(NARRATION[s], rng, tokens)) for s in (rng.choice(suffixes) for _ in range(rounds)))
    return run_cases("narration files", cases, check)


def video_folder(seed: int, folder: Path) -> dict:
    """The test's folder of damaged videos and sidecars, damaged from `seed`, through data
    check, prepare and the on-demand reader, in a pytest process of its own (a decoder's
    crash there is a finding, not the end of the fuzz)."""
    import os  # the seed reaches the test through its environment

    test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(folder / "pytest"),
         f"{ROOT / 'tests' / 'test_ingest.py'}::test_damaged_copies_of_every_kind_of_file_cost_only_themselves"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RIGTRAIN_FUZZ_SEED": str(seed)},
    )  # fmt: skip
    findings = {} if test.returncode == 0 else {"the damaged-folder test failed": test.stdout[-400:]}
    return {"input": "damaged videos and sidecars (check, prepare, on demand)", "cases": 18, "findings": findings}


def _damage(run: Path, rng: random.Random) -> str:
    """One thing wrong with a run folder, as a disk, a careless hand or an editor leaves it:
    a JSON file with a value changed, a text file edited, a file cut short, bytes flipped,
    a file or folder gone. Returns what was done, for the finding."""
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.name != ".lock")
    records = [p for p in files if p.suffix in (".json", ".jsonl") or p.name == "latest"]
    # half the cases edit the records: their values are read and trusted, where a
    # damaged .pt is caught whole by its checksum
    path = rng.choice(records if rng.random() < 0.5 else files)
    name = path.relative_to(run).as_posix()
    roll = rng.random()
    if path.suffix == ".json" and roll < 0.5:
        data = json.loads(path.read_text())
        for _ in range(rng.randint(1, 3)):
            mutate(data, rng)
        path.write_text(json.dumps(data))
        return f"{name}: values changed"
    if path.suffix in (".json", ".jsonl", "") and roll < 0.7:
        text = path.read_text(errors="surrogateescape")
        path.write_bytes(
            mutate_text(text, rng, ['"', "{", "}", ",", "\n", "0", "-1", "nan", "\x00"]).encode(
                "utf-8", "surrogateescape"
            )
        )
        return f"{name}: text edited"
    if roll < 0.8:
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.truncate(rng.randrange(size) if size else 0)
        return f"{name}: cut short"
    if roll < 0.9:
        data = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        return f"{name}: bits flipped"
    victim = path if rng.random() < 0.7 else path.parent
    shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
    return f"{victim.relative_to(run).as_posix() or '.'}: removed"


class Judge:
    """Runs rigtrain commands on damaged folders: each must end with its result (exit 0) or a
    one-line error (exit 2), never a traceback. Counts the outcomes (both must occur, or the
    damage missed) and keeps the first finding of each kind."""

    def __init__(self, folder: Path):
        import os  # the commands' environment: one thread each

        self.folder, self.env = folder, {**os.environ, "OMP_NUM_THREADS": "1"}
        self.findings: dict[str, str] = {}
        self.outcomes: dict[str, int] = {}

    def run(self, command: list[str], what: str, name: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "rigtrain", *command], capture_output=True, text=True,
                              env=self.env, cwd=self.folder, timeout=600)  # fmt: skip
        outcome = f"{name} exit {done.returncode}"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        said = done.stdout + done.stderr
        errors = [line for line in said.splitlines() if line.startswith("rigtrain: error")]
        if "Traceback" in said or done.returncode not in (0, 2) or (done.returncode == 2 and not errors):
            self.findings.setdefault(f"{name} after {what}", f"exit {done.returncode}: {said[-300:]}")
        return done

    def result(self, input_name: str, cases: int) -> dict:
        return {"input": input_name, "cases": cases, "findings": self.findings, "outcomes": self.outcomes}


def _tag_bytes(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in (run / "checkpoints").glob("step*/*") if p.is_file()}


def run_folders(rng: random.Random, rounds: int, folder: Path) -> dict:
    """A 4-step demo run with checkpoints at steps 2 and 4, damaged one way at a time, then
    `train --resume` one step further and `eval`, each in its own process: each ends with
    its result or a one-line error (exit 2), never a traceback; and a resume that fails
    leaves every checkpoint file as it found it."""
    judge, name, good = Judge(folder), "damaged run folders (resume, eval)", folder / "run-good"
    command = ["train", "--preset", "demo", "--steps", "4", "--out", str(good), "--set", "train.ckpt_every=2"]
    if judge.run([*command, "eval.first_step=4"], "nothing", "the first run").returncode != 0:
        return judge.result(name, 0)
    for case in range(rounds):
        run = folder / f"run-{case}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(good, run)
        what = _damage(run, rng)
        before = _tag_bytes(run)
        for command in (["train", "--resume", "--out", str(run), "--steps", "5"], ["eval", str(run)]):
            done = judge.run(command, what, command[0])
            if command[0] == "train" and done.returncode != 0:
                lost = [n for n, b in before.items() if not (run / n).is_file() or (run / n).read_bytes() != b]
                if lost:
                    judge.findings.setdefault(f"train lost checkpoint files after {what}", ", ".join(lost[:3]))
        shutil.rmtree(run, ignore_errors=True)
    return judge.result(name, rounds)


def profile_folders(rng: random.Random, rounds: int, folder: Path) -> dict:
    """A 6-step `rigtrain profile` run (its checkpoints left out: analyze never reads them),
    damaged one way at a time, through `profile analyze`: its verdict or a one-line error
    (exit 2), never a traceback."""
    judge, name, good = Judge(folder), "damaged profile runs (analyze)", folder / "profile-good"
    if judge.run(
        ["profile", "--preset", "demo", "--steps", "6", "--out", str(good)], "nothing", "the profile"
    ).returncode:
        return judge.result(name, 0)
    shutil.rmtree(good / "checkpoints")
    for case in range(rounds):
        run = folder / f"profile-{case}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(good, run)
        judge.run(["profile", "analyze", str(run), "--json"], _damage(run, rng), "analyze")
        shutil.rmtree(run, ignore_errors=True)
    return judge.result(name, rounds)


def data_folders(rng: random.Random, rounds: int, folder: Path) -> dict:
    """The demo's prepared shards, damaged one way at a time (index.json edited, a shard file
    cut short, bits flipped, a file gone), then `data bench` and two steps of `train` with an
    evaluation, each in its own process: each ends with its result or a one-line error (exit
    2), never a traceback."""
    from rigtrain.config import load_config
    from rigtrain.data.embedded import embedded_dataset

    judge = Judge(folder)
    good = embedded_dataset(load_config("demo").data, log=lambda line: None)
    for case in range(rounds):
        data, run = folder / f"data-{case}", folder / f"run-{case}"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(good, data, ignore=shutil.ignore_patterns("*.lock"))
        what = _damage(data, rng)
        judge.run(["data", "bench", str(data), "--seconds", "1", "--workers", "0"], what, "data bench")
        judge.run(["train", "--data", str(data), "--out", str(run), "--steps", "2",
                   "--set", "eval.first_step=2", "data.workers=0"], what, "train")  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    return judge.result("damaged prepared data (bench, train)", rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1500, help="cases per input (the rig files are slower)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["rigs", "sets", "specs", "narration", "configs", "videos", "runs", "data", "profiles"],
    )
    parser.add_argument(
        "--run-rounds",
        type=int,
        default=12,
        help="damaged run folders, prepared data and profile runs (one or two processes each)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts = {
            "rigs": lambda: rig_files(rng, args.rounds),
            "sets": lambda: config_values(rng, args.rounds),
            "specs": lambda: specs(rng, args.rounds, folder),
            "narration": lambda: narration(rng, args.rounds, folder),
            "configs": lambda: config_files(rng, args.rounds, folder),
            "videos": lambda: video_folder(args.seed, folder),
            "runs": lambda: run_folders(rng, args.run_rounds, folder),
            "data": lambda: data_folders(rng, args.run_rounds, folder),
            "profiles": lambda: profile_folders(rng, args.run_rounds, folder),
        }
        results = [run() for name, run in parts.items() if not args.only or name in args.only]
    if not args.json:
        width = max(len(r["input"]) for r in results)
        print(f"{'input':<{width}}  cases  findings")
        for r in results:
            print(f"{r['input']:<{width}}  {r['cases']:>5}  {len(r['findings'])}")
            if r.get("outcomes"):
                print(f"{'':<{width}}         " + ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items())))
            for where, message in r["findings"].items():
                print(f"{'':<{width}}         {where}: {message}")
    print(json.dumps({"seed": args.seed, "results": results}))
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
