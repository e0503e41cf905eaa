"""`rigtrain tune` and `rigtrain sweep`: the two commands that search configurations, one
by measuring speed on this machine (tune/), one by training to a metric (sweep/). Like the
rest of the command line, each imports what it uses inside its function."""

from __future__ import annotations

import argparse

from rigtrain.cli_args import add_set_option, nonempty, seconds, watts
from rigtrain.errors import UserError


def add_sweep_command(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="many runs over config keys (Optuna: grid, random or TPE), pruned early on their logged metric, "
        "resumable with the same command",
    )
    sweep.add_argument("spec", metavar="SPEC", type=nonempty, help="the sweep spec (TOML; docs/sweep.md)")
    sweep.add_argument(
        "--out", metavar="SWEEP_DIR", type=nonempty, help="where the trials go (default: runs/DATE-TIME-sweep-SPEC)"
    )
    sweep.add_argument("--trials", type=int, metavar="N", help="trials in all (default: the spec's)")
    sweep.add_argument("--budget-s", type=seconds, metavar="S", help="start no trial after this many seconds")
    sweep.add_argument("--json", action="store_true", help="print sweep.json's content on stdout and nothing else")


def add_tune_command(commands) -> None:
    tune = commands.add_parser(
        "tune",
        help="measure the configurations predicted to fit this machine (micro-batch, accumulation, "
        "checkpointing, ZeRO stage, offload, loader threads, compile; processes on a CPU) and keep the fastest",
        description="Measures the plan's own configuration, then one setting at a time around the fastest so "
        "far (micro-batch and memory, ZeRO stage, compile, loader threads), each trial a few seconds of real "
        "steps with the real loader, a trial that clearly loses stopping early; then the fastest few again with "
        "longer windows. Writes TUNE_DIR/tune.json and tuned.toml; `rigtrain train --tuned` uses it. "
        "docs/tune.md has the details.",
    )
    tune.add_argument("--preset", type=nonempty, help="the preset to tune (default: demo)")
    tune.add_argument("--config", metavar="FILE", type=nonempty, help="a TOML or YAML config file")
    add_set_option(tune, "fix config keys: keys you set are not tuned, e.g. --set data.workers=2")
    tune.add_argument("--data", metavar="DIR", type=nonempty, help="prepared shards (default: the embedded dataset)")
    tune.add_argument(
        "--out",
        metavar="TUNE_DIR",
        type=nonempty,
        help="where the tune is written (default: runs/DATE-TIME-PRESET-tune)",
    )
    tune.add_argument("--rig", metavar="FILE", type=nonempty, help="this machine described by a rig file")
    tune.add_argument("--psu-watts", type=watts, metavar="W", help="the power supply's rating")
    tune.add_argument(
        "--budget-s", type=seconds, default=300.0, metavar="S", help="the whole tune's time limit (default 300)"
    )
    tune.add_argument(
        "--trial-timeout-s",
        type=seconds,
        metavar="S",
        help="a trial with no result after this long is cut off as hung (default 120 on a CPU, 300 on GPUs)",
    )
    tune.add_argument(
        "--trial-seconds",
        type=seconds,
        default=3.0,
        metavar="S",
        help="each trial's timed window, in whole steps after its warm-up (default 3; longer is less noisy)",
    )
    tune.add_argument("--json", action="store_true", help="print tune.json's content on stdout and nothing else")


def cmd_tune(args: argparse.Namespace) -> int:
    from rigtrain.tune.command import tune

    return tune(
        preset=args.preset,
        config_file=args.config,
        overrides=args.overrides,
        data=args.data,
        out=args.out,
        rig_file=args.rig,
        psu_w=args.psu_watts,
        budget_s=args.budget_s,
        trial_timeout_s=args.trial_timeout_s,
        trial_s=args.trial_seconds,
        as_json=args.json,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from rigtrain.sweep.search import sweep

    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials {args.trials}: give 1 or more")
    return sweep(args.spec, out=args.out, trials=args.trials, budget_s=args.budget_s, as_json=args.json)
