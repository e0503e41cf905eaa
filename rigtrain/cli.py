"""The `rigtrain` command. Only argparse and the config schema are imported up front, so
`rigtrain --help` is instant; each command imports what it uses.

Exit codes: 0 success, 2 bad input (one line naming the file or field), 1 internal error."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import signal
import sys
from pathlib import Path

from rigtrain.cli_args import Parser, VersionAction, add_set_option, nonempty, watts
from rigtrain.cli_data import (
    add_data_commands,
    cmd_data_bench,
    cmd_data_check,
    cmd_data_prepare,
    cmd_data_synth,
)
from rigtrain.cli_search import add_sweep_command, add_tune_command, cmd_sweep, cmd_tune
from rigtrain.errors import StoppedBySignal, UserError, one_line
from rigtrain.terminal import outlive_the_terminal


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from rigtrain.config import preset_names

    p.add_argument(
        "--data",
        metavar="DIR",
        type=nonempty,
        help="prepared shards (rigtrain data prepare); default: the embedded "
        "Shapes-world dataset, generated once into ~/.cache/rigtrain",
    )
    p.add_argument(
        "--out", metavar="RUN_DIR", type=nonempty, help="where the run is written (default: runs/DATE-TIME-PRESET)"
    )
    p.add_argument("--preset", type=nonempty, help=f"one of: {', '.join(preset_names())} (default: demo)")
    p.add_argument(
        "--config", metavar="FILE", type=nonempty, help="a TOML or YAML file with [model], [data], [train], [rig] keys"
    )
    add_set_option(p, "override config keys, e.g. --set train.zero_stage=2 data.workers=4 (see --help-config)")
    p.add_argument("--steps", type=int, help="optimizer steps in total (train.steps)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue --out RUN_DIR from its newest complete checkpoint, on the GPUs there are now (a card taken "
        "out or added: the same global batch)",
    )
    p.add_argument("--hostfile", metavar="FILE", type=nonempty, help="several machines: passed to DeepSpeed's launcher")
    p.add_argument(
        "--rig",
        metavar="FILE",
        type=nonempty,
        help="this machine described by a rig file (docs/planner.md) instead of the probe, "
        "e.g. a saved `rigtrain rig --json` with your PSU",
    )
    p.add_argument("--psu-watts", type=watts, metavar="W", help="the power supply's rating, for the power warning")
    p.add_argument(
        "--help-config", action="store_true", help="list every config key with its type, default and meaning"
    )


def _add_train_only_options(train: argparse.ArgumentParser) -> None:
    """train's options that profile has not: growing a model, a curriculum, a tune's result."""
    train.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        type=nonempty,
        help="start a new run from another run's newest complete checkpoint: parameters whose name and shape "
        "match are loaded, the rest start fresh (a different model shape is allowed); the optimizer starts fresh",
    )
    train.add_argument(
        "--curriculum",
        metavar="FILE",
        type=nonempty,
        help="stages in sequence (a TOML file of [[stage]] name, steps, set), each initialised from the one "
        "before, into OUT/stage-N-NAME; --resume continues at the first unfinished stage",
    )
    train.add_argument(
        "--tuned",
        metavar="TUNE_DIR",
        nargs="?",
        const="",
        help="use what `rigtrain tune` found fastest: that tune's, or without TUNE_DIR the newest tune of "
        "this preset on this machine; keys you set in --config or --set still win",
    )


def build_parser() -> Parser:
    parser = Parser(
        prog="rigtrain",
        description="Plan, train and profile a multimodal predictive-coding "
        "Perceiver on the GPUs you own (or the CPU).",
    )
    parser.add_argument("--version", action=VersionAction, help="rigtrain's version, its main libraries' and Python's")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    train = commands.add_parser("train", help="train with DeepSpeed ZeRO on every local GPU (or the CPU)")
    _add_run_options(train)
    _add_train_only_options(train)

    add_tune_command(commands)
    add_sweep_command(commands)

    profile = commands.add_parser(
        "profile",
        help="a short training run under torch.profiler, with a verdict on "
        "what limits it (input, compute, communication or host)",
    )
    _add_run_options(profile)
    analyses = profile.add_subparsers(dest="profile_command", parser_class=Parser, metavar="[analyze PATH]")
    analyze = analyses.add_parser(
        "analyze",
        help="the breakdown, verdict and suggestions for any torch.profiler trace (*.pt.trace.json[.gz]) "
        "or a folder of them, your own training script's too",
    )
    analyze.add_argument("path", type=nonempty, help="a trace file, or a folder searched for them")
    analyze.add_argument("--json", action="store_true", help="print the summary as JSON")

    evaluate = commands.add_parser(
        "eval",
        help="score a run's newest checkpoint on held-out clips: kNN and linear "
        "probe per label, text-video retrieval (writes RUN_DIR/eval.json)",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR", type=nonempty, help="the --out of a training run")
    evaluate.add_argument(
        "--data",
        metavar="DIR",
        help="evaluate on other data (default: the run's own, with the held-out videos it recorded)",
    )
    evaluate.add_argument("--json", action="store_true", help="print eval.json's content on stdout and nothing else")

    rig = commands.add_parser("rig", help="read the machine (or a rig file), plan a run and warn about the hardware")
    rig.add_argument(
        "--rig",
        metavar="FILE",
        type=nonempty,
        help="plan for the machine this rig file describes (docs/planner.md), not this one",
    )
    rig.add_argument("--psu-watts", type=watts, metavar="W", help="the power supply's rating, which no probe can read")
    rig.add_argument(
        "--preset", type=nonempty, help="the model and clip shape to plan for (default: small on a GPU, demo without)"
    )
    rig.add_argument("--config", metavar="FILE", type=nonempty, help="a TOML or YAML config file")
    add_set_option(rig, "fix config keys; the plan keeps what you set")
    rig.add_argument("--json", action="store_true", help='print {"rig": ..., "plan": ..., "warnings": [...]} on stdout')

    add_data_commands(commands)
    return parser


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

    preset, overrides = args.preset, args.overrides
    tuned = getattr(args, "tuned", None)  # train's option, not profile's
    if tuned is not None:
        if args.resume:
            raise UserError("--tuned starts a new run; a resumed run keeps the configuration it has (drop --tuned)")
        from rigtrain.tune.applying import tuned_overrides

        preset, overrides = tuned_overrides(
            tuned, preset, args.config, overrides, args.rig, lambda line: print(f"[rigtrain] {line}", flush=True)
        )
    options = dict(
        config_file=args.config,
        data=args.data,
        hostfile=args.hostfile,
        rig_file=args.rig,
        psu_w=args.psu_watts,
        profile=profile,
        init_from=getattr(args, "init_from", None),
    )
    curriculum = getattr(args, "curriculum", None)
    if curriculum:
        if args.steps is not None:
            raise UserError("--steps with --curriculum: each stage's steps are in the curriculum file")
        from rigtrain.train.curriculum import run_curriculum

        return run_curriculum(
            curriculum, out=args.out, preset=preset, resume=args.resume, train=train, overrides=overrides, **options
        )
    return train(out=args.out, preset=preset, overrides=overrides, steps=args.steps, resume=args.resume, **options)


def cmd_train(args: argparse.Namespace) -> int:
    return _run(args, profile=False)


def cmd_profile(args: argparse.Namespace) -> int:
    """`rigtrain train` with the profiler on, by default just long enough to record it."""
    return _run(args, profile=True)


def cmd_profile_analyze(args: argparse.Namespace) -> int:
    from rigtrain.profile.trace_file import analyze_path

    return analyze_path(args.path, args.json)


def cmd_eval(args: argparse.Namespace) -> int:
    from rigtrain.evaluate import format_result
    from rigtrain.train.eval_command import evaluate_run

    record = evaluate_run(args.run_dir, args.data)
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    bank = record["clips"]["bank"]
    print(
        f"eval of {args.run_dir} at step {record['step']} on {record['clips']['heldout']} held-out clips"
        f"{f' (kNN bank and probe: {bank} training clips)' if bank else ''} in {record['seconds']:.1f} s"
    )
    print(format_result(record))
    print(f"written to {Path(args.run_dir) / 'eval.json'}")
    if record.get("pictures"):
        print(f"the decoder's predictions beside the truth: {', '.join(record['pictures'])} (in {args.run_dir})")
    return 0


def cmd_rig(args: argparse.Namespace) -> int:
    from rigtrain.config import load_config
    from rigtrain.config.loading import user_keys
    from rigtrain.rig.report import format_report
    from rigtrain.train.planning import machine_rig, plan_run, with_user_environment

    rig = machine_rig(["."], args.rig, fresh_p2p_check=True)  # asked for the machine as it is now
    preset = args.preset or ("small" if rig.gpus else "demo")
    config = load_config(preset, args.config, args.overrides)
    plan = plan_run(config, rig, user_keys=user_keys(args.config, args.overrides), psu_w=args.psu_watts)
    if not args.rig:  # this machine, as a run started here would get it
        plan = with_user_environment(plan)
    if args.psu_watts:
        import dataclasses

        rig = dataclasses.replace(rig, psu_w=args.psu_watts)
    if args.json:
        print(
            json.dumps(
                {"rig": rig.to_dict(), "plan": plan.to_dict(), "warnings": [w.to_dict() for w in plan.warnings]},
                indent=1,
            )
        )
    else:
        print(f"planning the '{preset}' preset")
        print(format_report(rig, plan))
    return 0


COMMANDS = {
    ("train", None): cmd_train,
    ("tune", None): cmd_tune,
    ("sweep", None): cmd_sweep,
    ("profile", None): cmd_profile,
    ("profile", "analyze"): cmd_profile_analyze,
    ("eval", None): cmd_eval,
    ("rig", None): cmd_rig,
    ("data", "synth"): cmd_data_synth,
    ("data", "prepare"): cmd_data_prepare,
    ("data", "check"): cmd_data_check,
    ("data", "bench"): cmd_data_bench,
}


def run() -> int:
    """The program (`rigtrain`, `python -m rigtrain`): main, then an exit that leaves the
    objects torch and the command made to the OS. The interpreter's teardown would collect
    them one by one, 1.1 s after `import torch` alone and 1.9 s after a tune, on a 2-core
    CPU, with the work done and its files closed. Frozen (gc.freeze), they are skipped;
    atexit handlers still run and the streams are still flushed."""
    outlive_the_terminal()
    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS[(args.command, getattr(args, "data_command", None) or getattr(args, "profile_command", None))]
    # A command that keeps what it says in its output folder (data prepare's prepare.log)
    # enters the copy here, so that it also keeps the last line below: why it stopped.
    with contextlib.ExitStack() as args.kept_output:
        return _run_command(handler, args)


def _run_command(handler, args: argparse.Namespace) -> int:
    """The command's exit code; a bad input, a stop and a full disk each said in one line."""
    try:
        return handler(args)
    except UserError as err:
        print(f"rigtrain: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        by = f"stopped by {signal.Signals(stop.signum).name}" if isinstance(stop, StoppedBySignal) else "interrupted"
        again = (
            "; the same command again goes on after its last complete shard"
            if getattr(args, "data_command", None) == "prepare"
            else ""
        )
        print(f"rigtrain: {by}{again}", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk is the machine's state, not a bug: one line (training has its own,
        # which also names the checkpoint it keeps)
        where = f" writing {err.filename}" if err.filename else ""
        again = (
            " (it goes on after its last complete shard)" if getattr(args, "data_command", None) == "prepare" else ""
        )
        print(
            f"rigtrain: error: the disk is full{where}: free some space and run the same command again{again}",
            file=sys.stderr,
        )
        return 1
