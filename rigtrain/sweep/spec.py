"""A sweep's spec file (docs/sweep.md): the runs' base (preset, config file, --set values),
the search space over config keys, the metric and its direction, the sampler, the pruner,
the trial count. Every mistake is a UserError naming the file and the key.

    preset = "demo"
    set = ["train.steps=150"]
    metric = "loss"                 # "loss", a term "loss_...", or "eval/..." (metrics.jsonl)
    direction = "minimize"
    sampler = "tpe"                 # tpe | random | grid
    pruner = "hyperband"            # hyperband | successive_halving | none
    prune_after_steps = 15          # no trial stopped before this step (default: train.steps / 10)
    trials = 6
    [space]
    "train.lr" = { log = [1e-4, 3e-3] }
    "model.num_latents" = { choices = [16, 32] }
    "train.warmup_steps" = { range = [5, 50] }
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Ubuntu 22.04's): tomli is what 3.11 took in as tomllib
    import tomli as tomllib

from rigtrain.config import load_config
from rigtrain.config.schema import ConfigError
from rigtrain.errors import UserError

TOP_KEYS = {
    "preset",
    "config",
    "set",
    "metric",
    "direction",
    "sampler",
    "pruner",
    "trials",
    "gpus_per_trial",
    "storage",
    "seed",
    "prune_after_steps",
    "space",
}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("hyperband", "successive_halving", "none")


@dataclass(frozen=True)
class Param:
    key: str  # SECTION.NAME
    kind: str  # "choices", "int", "float", "log"
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0

    def suggest(self, trial):
        if self.kind == "choices":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def grid(self) -> list:
        return list(self.choices) if self.kind == "choices" else list(range(int(self.low), int(self.high) + 1))


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    preset: str = "demo"
    config_file: str | None = None
    overrides: tuple[str, ...] = ()
    metric: str = "loss"
    direction: str = "minimize"
    sampler: str = "tpe"
    pruner: str = "hyperband"
    trials: int = 6
    gpus_per_trial: int = 1
    storage: str | None = None
    seed: int = 0
    prune_after_steps: int = 1  # no trial is pruned before this step (default: a tenth of train.steps)
    space: tuple[Param, ...] = field(default_factory=tuple)


def _fail(where: str, message: str):
    raise UserError(f"{where}: {message}")


def read_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    where = f"sweep spec {path}"
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        _fail(where, f"cannot be read ({err.strerror or err}); give a TOML sweep spec")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        _fail(where, f"not valid TOML: {err}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        _fail(where, f"unknown key(s) {', '.join(unknown)}; a spec has {', '.join(sorted(TOP_KEYS))}")
    preset = _typed(raw, "preset", str, "demo", where)
    config_file = _typed(raw, "config", str, None, where)
    if config_file is not None:
        config_file = str((path.parent / config_file).resolve())
    overrides = _typed(raw, "set", list, [], where)
    if not all(isinstance(o, str) for o in overrides):
        _fail(where, 'set: a list of "KEY=VALUE" strings, as --set takes them')
    metric = _typed(raw, "metric", str, "loss", where)
    if not (metric == "loss" or metric.startswith(("loss_", "eval/"))):
        _fail(where, f"metric {metric!r}: give 'loss', a loss term 'loss_...', or an evaluation metric 'eval/...'")
    direction = _choice(
        raw, "direction", ("minimize", "maximize"), "minimize" if "loss" in metric else "maximize", where
    )
    sampler = _choice(raw, "sampler", SAMPLERS, "tpe", where)
    pruner = _choice(raw, "pruner", PRUNERS, "hyperband", where)
    trials = _typed(raw, "trials", int, 6, where)
    gpus_per_trial = _typed(raw, "gpus_per_trial", int, 1, where)
    if trials < 1 or gpus_per_trial < 1:
        _fail(where, "trials and gpus_per_trial must be 1 or more")
    space_raw = _typed(raw, "space", dict, None, where)
    if not space_raw:
        _fail(where, '[space] is missing or empty; add keys to search, e.g. "train.lr" = { log = [1e-4, 3e-3] }')
    space = tuple(_param(key, value, f"{where}: space.{key}") for key, value in space_raw.items())
    try:  # the base, and each key with a value of its range, build a config
        base = load_config(preset, config_file, list(overrides))
        for p in space:
            sample = p.choices[0] if p.kind == "choices" else (int(p.low) if p.kind == "int" else p.low)
            value = ",".join(map(str, sample)) if isinstance(sample, list) else str(sample).lower()
            load_config(preset, config_file, [*overrides, f"{p.key}={value}"])
    except ConfigError as err:
        _fail(where, str(err))
    if sampler == "grid" and any(p.kind in ("float", "log") for p in space):
        _fail(where, "sampler = 'grid' needs choices or integer ranges in [space]; use tpe or random for float ranges")
    prune_after = _typed(raw, "prune_after_steps", int, max(1, base.train.steps // 10), where)
    if prune_after < 1:
        _fail(where, "prune_after_steps must be 1 or more")
    return SweepSpec(
        path=path.resolve(),
        prune_after_steps=prune_after,
        preset=preset,
        config_file=config_file,
        overrides=tuple(overrides),
        metric=metric,
        direction=direction,
        sampler=sampler,
        pruner=pruner,
        trials=trials,
        gpus_per_trial=gpus_per_trial,
        storage=_typed(raw, "storage", str, None, where) or None,
        seed=_typed(raw, "seed", int, 0, where),
        space=space,
    )


def _typed(raw: dict, key: str, kind: type, default, where: str):
    if key not in raw:
        return default
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(where, f"{key} must be {'a ' + kind.__name__ if kind is not list else 'a list'}, got {value!r}")
    return value


def _choice(raw: dict, key: str, allowed: tuple, default: str, where: str) -> str:
    value = _typed(raw, key, str, default, where)
    if value not in allowed:
        _fail(where, f"{key} = {value!r}: one of {', '.join(allowed)}")
    return value


def _param(key: str, value, where: str) -> Param:
    if key.count(".") != 1:
        _fail(where, "keys look like SECTION.NAME, e.g. train.lr")
    if not isinstance(value, dict) or len(value) != 1:
        _fail(where, "give one of { choices = [...] }, { range = [low, high] }, { log = [low, high] }")
    ((kind, bounds),) = value.items()
    if kind == "choices":
        if not isinstance(bounds, list) or not bounds:
            _fail(where, "choices must be a non-empty list")
        return Param(key, "choices", choices=tuple(bounds))
    if kind not in ("range", "log"):
        _fail(where, f"unknown kind {kind!r}; use choices, range or log")
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
        or not bounds[0] < bounds[1]
    ):
        _fail(where, f"{kind} must be [low, high] with low < high, got {bounds!r}")
    if kind == "log":
        if bounds[0] <= 0:
            _fail(where, "log ranges must be above 0")
        return Param(key, "log", low=float(bounds[0]), high=float(bounds[1]))
    whole = all(isinstance(b, int) for b in bounds)
    return Param(key, "int" if whole else "float", low=bounds[0], high=bounds[1])
