"""A config value that is wrong: the error type and the check every config section uses in
its `__post_init__`, so each message names the key and says what to set."""

from __future__ import annotations

from rigtrain.errors import UserError


class ConfigError(UserError):
    """A config key or value is wrong; the message names the key."""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key}: {message}")
