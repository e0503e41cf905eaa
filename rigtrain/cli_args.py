"""The pieces of the command line's argument parsing that every command shares: a parser
whose usage errors are one line and exit code 2, and the types of option values."""

from __future__ import annotations

import argparse
import math
import sys


def nonempty(text: str) -> str:
    """An option value that names something: an empty string is a mistake, not a default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _positive(text: str, unit: str, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give {example}")
    return value


def watts(text: str) -> float:
    return _positive(text, "watts", "the PSU's rating in watts, e.g. 1000")


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit code 2."""

    def error(self, message: str, prog: str | None = None) -> None:  # type: ignore[override]
        prog = prog or self.prog
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    # argparse reports a word no parser took from the top parser, whose --help does not list
    # the subcommand's options: `rigtrain data prepare SRC OUT --out X` said "see rigtrain
    # --help". The deepest parser left with extra words is remembered, and named instead.
    _LEFT_OVER = "_parser_left_with_extra_words"

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not hasattr(namespace, self._LEFT_OVER):
            setattr(namespace, self._LEFT_OVER, self.prog)  # a subcommand's parser finishes first
        return namespace, extras

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        prog = namespace.__dict__.pop(self._LEFT_OVER, None)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}", prog)
        return namespace


def add_set_option(parser: argparse.ArgumentParser, description: str) -> None:
    """`--set KEY=VALUE ...`, repeatable, each taking one or more pairs, into args.overrides."""
    parser.add_argument(
        "--set", metavar="KEY=VALUE", nargs="+", action="extend", default=[], dest="overrides", help=description
    )


def seconds(text: str) -> float:
    return _positive(text, "seconds", "a number of seconds above 0, e.g. 300")


def version_line() -> str:
    """`rigtrain --version`: rigtrain's version and the libraries a bug report needs, read
    from the installed packages' metadata without importing them (instant, like --help)."""
    import platform  # only for --version
    from importlib import metadata  # only for --version

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "deepspeed", "nvidia-ml-py"))
    return f"rigtrain {installed('rigtrain')} ({libraries}; Python {platform.python_version()})"


class VersionAction(argparse.Action):
    """--version: the line is made only when asked for, so other commands pay nothing for it."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()
