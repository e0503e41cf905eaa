"""The `rigtrain` command. Only argparse and the config schema are imported up front, so
`rigtrain --help` is instant; each command imports what it uses.

Exit codes: 0 success, 2 bad input (one line naming the file or field), 1 internal error."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from rigtrain.errors import UserError


def nonempty(text: str) -> str:
    """An option value that names something: an empty string is a mistake, not a default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def watts(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of watts") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give the PSU's rating in watts, e.g. 1000")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from rigtrain.config import preset_names

    p.add_argument("--data", metavar="DIR", type=nonempty, help="prepared shards (rigtrain data prepare); default: the embedded "
                   "Shapes-world dataset, generated once into ~/.cache/rigtrain")
    p.add_argument("--out", metavar="RUN_DIR", type=nonempty, help="where the run is written (default: runs/DATE-TIME-PRESET)")
    p.add_argument("--preset", type=nonempty, help=f"one of: {', '.join(preset_names())} (default: demo)")
    p.add_argument("--config", metavar="FILE", type=nonempty, help="a TOML or YAML file with [model], [data], [train], [rig] keys")
    p.add_argument("--set", metavar="KEY=VALUE", nargs="+", action="extend", default=[], dest="overrides",
                   help="override config keys, e.g. --set train.zero_stage=2 data.workers=4 (see --help-config)")
    p.add_argument("--steps", type=int, help="optimizer steps in total (train.steps)")
    p.add_argument("--resume", action="store_true", help="continue --out RUN_DIR from its newest complete checkpoint")
    p.add_argument("--hostfile", metavar="FILE", type=nonempty, help="several machines: passed to DeepSpeed's launcher")
    p.add_argument("--rig", metavar="FILE", type=nonempty, help="this machine described by a rig file (docs/planner.md) instead of the probe, "
                   "e.g. a saved `rigtrain rig --json` with your PSU")
    p.add_argument("--psu-watts", type=watts, metavar="W", help="the power supply's rating, for the power warning")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and meaning")


def build_parser() -> Parser:
    parser = Parser(prog="rigtrain", description="Plan, train and profile a multimodal predictive-coding "
                    "Perceiver on the GPUs you own (or the CPU).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    train = commands.add_parser("train", help="train with DeepSpeed ZeRO on every local GPU (or the CPU)")
    _add_run_options(train)

    profile = commands.add_parser("profile", help="a short training run under torch.profiler, with a verdict on "
                                  "what limits it (input, compute, communication or host)")
    _add_run_options(profile)

    evaluate = commands.add_parser("eval", help="score a run's newest checkpoint on held-out clips: kNN and linear "
                                   "probe per label, text-video retrieval (writes RUN_DIR/eval.json)")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", type=nonempty, help="the --out of a training run")
    evaluate.add_argument("--data", metavar="DIR", help="evaluate on other data (default: the run's own, with the "
                          "held-out videos it recorded)")
    evaluate.add_argument("--json", action="store_true", help="print eval.json's content on stdout and nothing else")

    rig = commands.add_parser("rig", help="read the machine (or a rig file), plan a run and warn about the hardware")
    rig.add_argument("--rig", metavar="FILE", type=nonempty, help="plan for the machine this rig file describes (docs/planner.md), not this one")
    rig.add_argument("--psu-watts", type=watts, metavar="W", help="the power supply's rating, which no probe can read")
    rig.add_argument("--preset", type=nonempty, help="the model and clip shape to plan for (default: small on a GPU, demo without)")
    rig.add_argument("--config", metavar="FILE", type=nonempty, help="a TOML or YAML config file")
    rig.add_argument("--set", metavar="KEY=VALUE", nargs="+", action="extend", default=[], dest="overrides",
                     help="fix config keys; the plan keeps what you set")
    rig.add_argument("--json", action="store_true", help='print {"rig": ..., "plan": ..., "warnings": [...]} on stdout')

    data = commands.add_parser("data", help="make, prepare and inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=Parser, metavar="COMMAND")
    synth = data_commands.add_parser("synth", help="write the Shapes-world dataset (mp4 + wav + Whisper json)")
    synth.add_argument("out_dir", metavar="OUT_DIR", type=nonempty)
    synth.add_argument("--videos", type=int, default=48, help="number of videos (default 48)")
    synth.add_argument("--seed", type=int, default=0)
    prepare = data_commands.add_parser("prepare", help="decode a folder of videos into training shards")
    prepare.add_argument("src_dir", metavar="SRC_DIR", type=nonempty)
    prepare.add_argument("out_dir", metavar="OUT_DIR", type=nonempty)
    _add_clip_options(prepare)
    prepare.add_argument("--workers", type=int, help="decoding processes (default: CPU cores)")
    check = data_commands.add_parser("check", help="what prepare would make of a folder of videos (writes nothing)")
    check.add_argument("src_dir", metavar="SRC_DIR", type=nonempty)
    _add_clip_options(check)
    check.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    bench = data_commands.add_parser("bench", help="loader clips/s from shards vs decoding the source videos")
    bench.add_argument("data_dir", metavar="DATA_DIR", type=nonempty, help="prepared shards (their source videos must still exist)")
    bench.add_argument("--workers", type=int, help="loader workers (default: what training would use on this machine)")
    bench.add_argument("--batch", type=int, help="clips per batch (default: the matching preset's micro-batch)")
    bench.add_argument("--seconds", type=float, default=5.0, help="how long to time the shard loader (default 5)")
    bench.add_argument("--decode-clips", type=int, default=64, help="clips decoded from the videos (default 64)")
    bench.add_argument("--preset", type=nonempty, help="the model whose train step to compare with (default: the preset whose "
                       "clip shape the shards have)")
    bench.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    return parser


def _add_clip_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo", type=nonempty, help="the clip shape (fps, frame size, audio rate) to cut")
    p.add_argument("--set", metavar="KEY=VALUE", nargs="+", action="extend", default=[], dest="overrides",
                   help="override data.* keys, e.g. --set data.fps=10 data.resize=pad")


def _data_config(args: argparse.Namespace):
    from rigtrain.config import load_config

    for item in args.overrides:
        if not item.startswith("data."):
            raise UserError(f"--set {item}: data commands only take data.* keys")
    return load_config(args.preset, overrides=args.overrides).data


def _print_config_help(preset: str) -> None:
    import dataclasses

    from rigtrain.config import load_config
    from rigtrain.config.schema import SECTIONS, field_docs

    config = load_config(preset)
    print(f"config keys (values of preset '{preset}'):")
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        print(f"\n[{section}]  {cls.__doc__.strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(config, section), f.name)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else json.dumps(value)
            print(f"  {section}.{f.name} = {shown}\n      {docs.get(f.name, '')}")


def _run(args: argparse.Namespace, *, profile: bool) -> int:
    if args.help_config:
        _print_config_help(args.preset or "demo")
        return 0
    from rigtrain.train.launch import train

    return train(out=args.out, preset=args.preset, config_file=args.config, overrides=args.overrides,
                 steps=args.steps, data=args.data, resume=args.resume, hostfile=args.hostfile, rig_file=args.rig,
                 psu_w=args.psu_watts, profile=profile)


def cmd_train(args: argparse.Namespace) -> int:
    return _run(args, profile=False)


def cmd_profile(args: argparse.Namespace) -> int:
    """`rigtrain train` with the profiler on, by default just long enough to record it."""
    return _run(args, profile=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from rigtrain.evaluate import format_result
    from rigtrain.train.evaluation import evaluate_run

    record = evaluate_run(args.run_dir, args.data)
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    print(f"eval of {args.run_dir} at step {record['step']} on {record['clips']['heldout']} held-out clips "
          f"(kNN bank and probe: {record['clips']['bank']} training clips) in {record['seconds']:.1f} s")
    print(format_result(record))
    print(f"written to {Path(args.run_dir) / 'eval.json'}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from rigtrain.data.prepare import require_empty_dir
    from rigtrain.data.synth import synthesize

    out = Path(args.out_dir)
    if args.videos < 1:
        raise UserError("--videos must be at least 1")
    require_empty_dir(out, "data synth")

    def progress(done: int, total: int) -> None:
        print(f"\r[rigtrain] wrote {done}/{total} videos", end="" if done < total else "\n", flush=True)

    synthesize(out, videos=args.videos, seed=args.seed, progress=progress)
    print(f"Shapes world: {args.videos} videos with sound, narration and labels.json in {out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import os

    from rigtrain.data.prepare import prepare

    data = _data_config(args)
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    if workers < 1:
        raise UserError("--workers must be at least 1")

    started = time.perf_counter()

    def progress(done: int, total: int, name: str, clips: int) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (total - done)
        print(f"[rigtrain {elapsed:5.0f}s] {done}/{total} videos, {clips} clips, ETA {eta:.0f} s: {name}", flush=True)

    index = prepare(args.src_dir, args.out_dir, data, workers=workers, progress=progress,
                    log=lambda line: print(f"[rigtrain] {line}", flush=True))
    print(f"prepared {index['clips']} clips from {len(index['sources'])} video(s) into "
          f"{len(index['shards'])} shard(s) in {args.out_dir} ({index['seconds']} s, {workers} worker(s))")
    ends = sum(info["end_aligned_clip"] for info in index["sources"])
    tails = [info["unused_tail_s"] for info in index["sources"] if info["unused_tail_s"] > 0]
    if ends:
        print(f"{ends} video(s) end with a clip aligned to their last frame (it overlaps the clip before)")
    if tails:
        print(f"{len(tails)} video(s) end with less than half a clip left unused ({sum(tails):.2f} s in all)")
    notes = [(info["video"], p) for info in index["sources"] for p in info["problems"]]
    if notes:
        print(f"{len(notes)} problem(s) in files that were still used:")
        for video, problem in notes:
            print(f"  {video}: {problem}")
    if index["skipped"]:
        print(f"skipped {len(index['skipped'])} file(s):")
        for item in index["skipped"]:
            print(f"  {item['file']}: {item['reason']}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from rigtrain.data.check import check_folder, format_report

    def progress(done: int, total: int, name: str) -> None:
        print(f"[rigtrain] checked {done}/{total} {name}", file=sys.stderr, flush=True)

    report = check_folder(args.src_dir, _data_config(args), progress=None if args.json else progress)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _matching_preset(params: dict) -> str | None:
    from rigtrain.config import load_config, preset_names
    from rigtrain.data.prepare import preparation_params

    for name in preset_names():
        mine = preparation_params(load_config(name).data)
        if all(mine.get(k) == v for k, v in params.items() if k != "resize"):
            return name
    return None


def cmd_data_bench(args: argparse.Namespace) -> int:
    import os

    from rigtrain.config import load_config
    from rigtrain.data.bench import bench_loaders, data_config_of
    from rigtrain.data.dataset import ShardDataset, read_index
    from rigtrain.rig.peaks import REFERENCE_GPU, peak_tflops
    from rigtrain.train.flops import step_clips_per_s, train_flops_per_clip
    from rigtrain.rig.plan import loader_workers

    index = read_index(Path(args.data_dir))
    ShardDataset(args.data_dir)  # every shard file checked against index.json before any timing
    preset = args.preset or _matching_preset(index["params"])
    config = load_config(preset) if preset else None
    threads = len(os.sched_getaffinity(0))
    workers = args.workers if args.workers is not None else loader_workers(-1, threads, 1)[0]
    batch = args.batch or (config.train.micro_batch_size if config else 16)
    if workers < 0 or batch < 1:
        raise UserError("--workers must be 0 or more and --batch at least 1")
    if not args.json:
        print(f"[rigtrain] timing the shard loader ({args.seconds:g} s) and decoding {args.decode_clips} clips "
              f"from the videos, {workers} worker(s), batches of {batch}", file=sys.stderr, flush=True)
    result = bench_loaders(args.data_dir, workers=workers, batch=batch, seconds=args.seconds,
                           decode_clips=args.decode_clips)
    result["step"] = None
    if config is not None:
        import torch

        local = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        gpu = local if local and peak_tflops(local) else REFERENCE_GPU
        flops = train_flops_per_clip(config.model, data_config_of(index, config.data))
        rate = step_clips_per_s(flops, peak_tflops(gpu))
        result["step"] = {"preset": preset, "gpu": gpu, "measured_here": gpu == local,
                          "gflops_per_clip": round(flops / 1e9, 2), "peak_tflops": peak_tflops(gpu), "mfu": 0.4,
                          "clips_per_s": round(rate, 1),
                          "basis": f"forward+backward FLOPs of the {preset} model counted by FlopCounterMode, at "
                                   f"40% of the {gpu}'s {peak_tflops(gpu):g} dense bf16 TFLOPS"}
        result["step_clips_per_s"] = round(rate, 1)
        result["loader_vs_step"] = round(result["shards_clips_per_s"] / rate, 2)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    rows = [("", "clips/s", "MB/s"),
            ("shards (training loader)", f"{result['shards_clips_per_s']:.1f}", f"{result['shards_mb_per_s']:.1f}"),
            ("decoded from the videos", f"{result['decode_clips_per_s']:.2f}", f"{result['decode_mb_per_s']:.2f}")]
    step = result["step"]
    if step:
        rows.append((f"train step consumes ({step['gpu']}, est.)", f"{step['clips_per_s']:.1f}", ""))
    width = max(len(r[0]) for r in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>9}  {row[2]:>8}")
    print(f"\nshards are {result['ratio']:g}x faster than decoding, with {workers} worker(s) and batches of {batch}")
    if step:
        verdict = "keeps up" if result["loader_vs_step"] >= 1 else "is too slow"
        print(f"the loader delivers {result['loader_vs_step']:g}x what the step consumes: it {verdict}"
              + ("" if result["loader_vs_step"] >= 3 else "; aim for 3x (more data.workers, faster disk)"))
        print(f"step estimate: {step['basis']} = {step['gflops_per_clip']:g} GFLOP per clip")
    return 0


def cmd_rig(args: argparse.Namespace) -> int:
    from rigtrain.config import load_config
    from rigtrain.config.loading import user_keys
    from rigtrain.rig.report import format_report
    from rigtrain.train.planning import machine_rig, plan_run

    rig = machine_rig(["."], args.rig)
    preset = args.preset or ("small" if rig.gpus else "demo")
    config = load_config(preset, args.config, args.overrides)
    plan = plan_run(config, rig, user_keys=user_keys(args.config, args.overrides), psu_w=args.psu_watts)
    if args.psu_watts:
        import dataclasses

        rig = dataclasses.replace(rig, psu_w=args.psu_watts)
    if args.json:
        print(json.dumps({"rig": rig.to_dict(), "plan": plan.to_dict(),
                          "warnings": [w.to_dict() for w in plan.warnings]}, indent=1))
    else:
        print(f"planning the '{preset}' preset")
        print(format_report(rig, plan))
    return 0


COMMANDS = {("train", None): cmd_train, ("profile", None): cmd_profile, ("eval", None): cmd_eval, ("rig", None): cmd_rig, ("data", "synth"): cmd_data_synth, ("data", "prepare"): cmd_data_prepare,
            ("data", "check"): cmd_data_check, ("data", "bench"): cmd_data_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS[(args.command, getattr(args, "data_command", None))]
    try:
        return handler(args)
    except UserError as err:
        print(f"rigtrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rigtrain: interrupted", file=sys.stderr)
        return 130
