"""Linux under Windows (WSL2): how its kernel release tells it, and the command that differs
there. Both rig/ (the plan's warnings) and profile/ (the throttle report) say it, and
neither imports the other, so it lives here, below both."""

from __future__ import annotations

import os


def wsl_kernel(release: str | None = None) -> bool:
    """A kernel release of Linux under Windows ("5.15.167.4-microsoft-standard-WSL2"); this
    machine's when none is given."""
    return "microsoft" in (os.uname().release if release is None else release).lower()


def power_limit_command(gpu: int | str, watts: float | str, wsl: bool) -> str:
    """The command that sets a card's power limit, for the user to run: rigtrain never
    changes a card's settings. Under WSL2 the card belongs to Windows' driver, whose own
    nvidia-smi sets it from an administrator shell; WSL's copy only reads."""
    watts = f"{watts:.0f}" if isinstance(watts, float | int) else watts
    if wsl:
        return f"`nvidia-smi -i {gpu} -pl {watts}` in an administrator PowerShell on Windows"
    return f"`sudo nvidia-smi -i {gpu} -pl {watts}`"
