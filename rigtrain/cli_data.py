"""`rigtrain data synth|prepare|check|bench`: their options and what each does. Like the
rest of the command line, each command imports what it uses inside its function, so
`rigtrain --help` and a bad invocation answer at once, without torch, OpenCV or PyAV."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from rigtrain.cli_args import Parser, add_set_option, nonempty
from rigtrain.errors import StoppedBySignal, UserError
from rigtrain.terminal import command_header, copy_output_to, counter
from rigtrain.train.stopping import stop_signals


def add_data_commands(commands) -> None:
    """`rigtrain data` and its four commands, under the main parser's `commands`."""
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
    bench.add_argument(
        "data_dir", metavar="DATA_DIR", type=nonempty, help="prepared shards (their source videos must still exist)"
    )
    bench.add_argument("--workers", type=int, help="loader workers (default: what training would use on this machine)")
    bench.add_argument("--batch", type=int, help="clips per batch (default: the matching preset's micro-batch)")
    bench.add_argument("--seconds", type=float, default=5.0, help="how long to time the shard loader (default 5)")
    bench.add_argument("--decode-clips", type=int, default=64, help="clips decoded from the videos (default 64)")
    bench.add_argument(
        "--preset",
        type=nonempty,
        help="the model whose train step to compare with (default: the preset whose clip shape the shards have)",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _add_clip_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default="demo", type=nonempty, help="the clip shape (fps, frame size, audio rate) to cut"
    )
    add_set_option(p, "override data.* keys, e.g. --set data.fps=10 data.resize=pad")


def _data_config(args: argparse.Namespace):
    from rigtrain.config import load_config

    for item in args.overrides:
        if not item.startswith("data."):
            raise UserError(f"--set {item}: data commands only take data.* keys")
    return load_config(args.preset, overrides=args.overrides).data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from rigtrain.data.prepare import require_empty_dir
    from rigtrain.data.synth import synthesize

    out = Path(args.out_dir)
    if args.videos < 1:
        raise UserError("--videos must be at least 1")
    require_empty_dir(out, "data synth")

    progress = counter(lambda done, total: f"[rigtrain] wrote {done}/{total} videos")
    synthesize(out, videos=args.videos, seed=args.seed, progress=progress)
    print(f"Shapes world: {args.videos} videos with sound, narration and labels.json in {out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import os

    from rigtrain.data.prepare import prepare
    from rigtrain.data.shards import PREPARE_LOG
    from rigtrain.rig.disk_warnings import filesystem_warnings
    from rigtrain.rig.facts import Rig
    from rigtrain.rig.probe import disks

    data = _data_config(args)
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    if workers < 1:
        raise UserError("--workers must be at least 1")

    for warning in filesystem_warnings(Rig(disk=disks([args.out_dir]), software={"kernel": os.uname().release})):
        print(f"[rigtrain] note: {warning.message}", flush=True)  # before hours of decoding into it
    started = time.perf_counter()
    for stop in stop_signals():  # `kill PID` and a closed terminal stop it as a Ctrl-C does
        if stop != signal.SIGINT:
            signal.signal(stop, StoppedBySignal.raise_it)

    def progress(done: int, total: int, name: str, clips: int) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (total - done)
        print(f"[rigtrain {elapsed:5.0f}s] {done}/{total} videos, {clips} clips, ETA {eta:.0f} s: {name}", flush=True)

    index = prepare(
        args.src_dir,
        args.out_dir,
        data,
        workers=workers,
        isolate=True,  # one worker too: a decoder crashing on a damaged file takes only that file
        progress=progress,
        log=lambda line: print(f"[rigtrain] {line}", flush=True),
        # from the moment the folder is this prepare's, what it says (its last line too:
        # main) is also appended to OUT_DIR/prepare.log, for a prepare left alone for hours
        on_start=lambda out: args.kept_output.enter_context(copy_output_to(out / PREPARE_LOG, command_header())),
    )
    print(
        f"prepared {index['clips']} clips from {len(index['sources'])} video(s) into "
        f"{len(index['shards'])} shard(s) in {args.out_dir} ({index['seconds']} s, {workers} worker(s))"
    )
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
        from rigtrain.data.check import MOST_NOTES_PRINTED  # with the rest of data check's report

        print(f"skipped {len(index['skipped'])} file(s):")
        for item in index["skipped"][:MOST_NOTES_PRINTED]:
            print(f"  {item['file']}: {item['reason']}")
        if len(index["skipped"]) > MOST_NOTES_PRINTED:
            more = len(index["skipped"]) - MOST_NOTES_PRINTED
            print(f"  ... and {more} more: every one is in {args.out_dir}/index.json")
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
    from rigtrain.data.shards import preparation_params

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
    from rigtrain.rig.choices import loader_workers
    from rigtrain.rig.peaks import REFERENCE_GPU, peak_tflops
    from rigtrain.train.flops import ASSUMED_MFU, step_clips_per_s, train_flops_per_clip

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
        print(
            f"[rigtrain] timing the shard loader ({args.seconds:g} s) and decoding {args.decode_clips} clips "
            f"from the videos, {workers} worker(s), batches of {batch}",
            file=sys.stderr,
            flush=True,
        )
    result = bench_loaders(
        args.data_dir, workers=workers, batch=batch, seconds=args.seconds, decode_clips=args.decode_clips
    )
    result["step"] = None
    if config is not None:
        import torch

        local = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        gpu = local if local and peak_tflops(local) else REFERENCE_GPU
        flops = train_flops_per_clip(config.model, data_config_of(index, config.data))
        rate = step_clips_per_s(flops, peak_tflops(gpu))
        result["step"] = {
            "preset": preset,
            "gpu": gpu,
            "measured_here": gpu == local,
            "gflops_per_clip": round(flops / 1e9, 2),
            "peak_tflops": peak_tflops(gpu),
            "mfu": ASSUMED_MFU,
            "clips_per_s": round(rate, 1),
            "basis": f"forward+backward FLOPs of the {preset} model counted by FlopCounterMode, at "
            f"{ASSUMED_MFU:.0%} of the {gpu}'s {peak_tflops(gpu):g} dense bf16 TFLOPS",
        }
        result["step_clips_per_s"] = round(rate, 1)
        result["loader_vs_step"] = round(result["shards_clips_per_s"] / rate, 2)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    rows = [
        ("", "clips/s", "MB/s"),
        ("shards (training loader)", f"{result['shards_clips_per_s']:.1f}", f"{result['shards_mb_per_s']:.1f}"),
        ("decoded from the videos", f"{result['decode_clips_per_s']:.2f}", f"{result['decode_mb_per_s']:.2f}"),
    ]
    step = result["step"]
    if step:
        rows.append((f"train step consumes ({step['gpu']}, est.)", f"{step['clips_per_s']:.1f}", ""))
    width = max(len(r[0]) for r in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>9}  {row[2]:>8}")
    print(f"\nshards are {result['ratio']:g}x faster than decoding, with {workers} worker(s) and batches of {batch}")
    if step:
        verdict = "keeps up" if result["loader_vs_step"] >= 1 else "is too slow"
        print(
            f"the loader delivers {result['loader_vs_step']:g}x what the step consumes: it {verdict}"
            + ("" if result["loader_vs_step"] >= 3 else "; aim for 3x (more data.workers, faster disk)")
        )
        print(f"step estimate: {step['basis']} = {step['gflops_per_clip']:g} GFLOP per clip")
    return 0
