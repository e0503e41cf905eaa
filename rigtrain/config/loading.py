"""Build a RunConfig from a preset, an optional TOML/YAML file and `--set KEY=VALUE`
overrides, in that order. Unknown keys and wrong types are errors that name the key."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Ubuntu 22.04's): tomli is what 3.11 took in as tomllib
    import tomli as tomllib

from rigtrain.config.schema import SECTIONS, ConfigError, RunConfig

PRESET_PACKAGE = "rigtrain.config.presets"


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml") for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".toml")
    )


def read_preset(name: str) -> dict:
    if name not in preset_names():
        raise ConfigError(f"--preset {name}: unknown preset; choose one of {', '.join(preset_names())}")
    return tomllib.loads(resources.files(PRESET_PACKAGE).joinpath(f"{name}.toml").read_text())


def read_config_file(path: str | Path) -> dict:
    """A TOML (.toml) or YAML (.yaml/.yml) file with the same sections as a preset."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; give a .toml or .yaml config file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"--config {path}: not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}); "
            "save it as UTF-8 TOML or YAML"
        ) from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml  # only for .yaml config files

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"--config {path}: unknown file type; use .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--config {path}: not valid {path.suffix[1:].upper()}: {err}") from None
    except Exception as err:  # yaml.YAMLError, imported lazily
        if type(err).__module__.startswith("yaml"):
            raise ConfigError(f"--config {path}: not valid YAML: {str(err).splitlines()[0]}") from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected sections like [train] at the top level")
    _check_keys({k: v for k, v in data.items() if k != "preset"}, f"--config {path}")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        inner = args[0].__name__
        return f"list of {inner}s" if args[-1] is Ellipsis else f"{len(args)} {inner}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """A value from TOML/YAML/JSON (already typed) or from --set (a string) as type tp."""
    wrong = ConfigError(f"config: {key}: expected {_type_name(tp)}, got {value!r}")
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise wrong
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise wrong
        return tuple(_coerce(v, args[0], key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise wrong
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:
                raise wrong from None
        # bool is an int in Python, and 2.5 is no integer: both are mistakes here.
        allowed = (int,) if tp is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise wrong
        if not math.isfinite(value):  # inf, nan, and 1e400 (which parses as inf)
            raise ConfigError(f"config: {key}: {value!r} is not a finite number; give a value like 3e-4")
        return tp(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"unsupported config type {tp} for {key}")


def as_set_value(value) -> str:
    """A typed config value as `--set KEY=VALUE` takes it back (floats exactly)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


def parse_overrides(items: list[str]) -> dict:
    """`--set a.b=1 c.d=x` → nested dict of raw strings; the schema types them later."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.steps=100")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"--set {item}: keys look like SECTION.NAME, e.g. train.steps; sections: {', '.join(SECTIONS)}"
            )
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def build_config(raw: dict, *, source: str = "config") -> RunConfig:
    """A RunConfig from nested plain values; unknown keys and wrong types name the key."""
    _check_keys({k: v for k, v in raw.items() if k != "preset"}, source)
    kwargs: dict[str, Any] = {}
    if "preset" in raw:
        kwargs["preset"] = _coerce(raw["preset"], str, "preset")
    for section, values in raw.items():
        if section != "preset":
            types = _field_types(SECTIONS[section])
            kwargs[section] = SECTIONS[section](
                **{k: _coerce(v, types[k], f"{section}.{k}") for k, v in values.items()}
            )
    return RunConfig(**kwargs)


def load_config(
    preset: str = "demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    *,
    base: dict | None = None,
) -> RunConfig:
    """preset < config file < --set. With `base` (a saved config.json, for --resume), the
    preset is not read: the run goes on with the config it started with."""
    raw = base if base is not None else {"preset": preset, **read_preset(preset)}
    if config_file:
        raw = _merge(raw, read_config_file(config_file))
    if overrides:
        # --set values go through the same typed path; the "source" names the flag.
        set_raw = parse_overrides(overrides)
        _check_keys(set_raw, "--set")
        raw = _merge(raw, set_raw)
    return build_config(raw, source="--config " + config_file if config_file else "config")


def user_keys(config_file: str | None, overrides: list[str] | None) -> set[str]:
    """The keys the user chose (in --config or --set), as "section.name": the planner
    leaves those alone, whatever the preset says."""
    raw: dict = {}
    if config_file:
        raw = _merge(raw, read_config_file(config_file))
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    return {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict) for key in values}


def _check_keys(raw: dict, source: str) -> None:
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section '{section}'{_did_you_mean(section, SECTIONS)}; "
                f"sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a table of keys")
        types = _field_types(SECTIONS[section])
        for key in values:
            if key not in types:
                raise ConfigError(
                    f"{source}: unknown key '{section}.{key}'{_did_you_mean(key, types, f'{section}.')}; "
                    f"known keys in [{section}]: {', '.join(types)}"
                )


def _did_you_mean(name: str, known, prefix: str = "") -> str:
    """A typo's likely meaning, as difflib finds it among the known names; empty when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""
