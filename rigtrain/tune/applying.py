"""`rigtrain train --tuned [TUNE_DIR]`: a tune's fastest configuration as the run's config,
under what the user sets (docs/tune.md)."""

from __future__ import annotations

import json
from pathlib import Path

from rigtrain.config.loading import as_set_value, user_keys
from rigtrain.errors import UserError
from rigtrain.tune.report import machine_key, newest_tune


def tuned_overrides(
    tuned: str, preset: str | None, config_file: str | None, overrides: list[str], rig_file: str | None, say
) -> tuple[str, list[str]]:
    """(preset, overrides): the tune's preset and its best trial's keys (with the keys the
    tune was run with), before the user's --set, less every key the user set."""
    from rigtrain.train.planning import machine_rig  # NVML and torch: only when --tuned is given

    if tuned:
        tune_dir = Path(tuned)
        if tune_dir.name == "tune.json" or tune_dir.suffix == ".toml":
            tune_dir = tune_dir.parent
    else:
        rig = machine_rig([], rig_file)
        tune_dir = newest_tune(preset or "demo", rig)
        if tune_dir is None:
            raise UserError(
                f"--tuned: no tune of preset {preset or 'demo'} on this machine yet; run "
                f"`rigtrain tune --preset {preset or 'demo'}` first, or give --tuned TUNE_DIR"
            )
    path = tune_dir / "tune.json"
    try:
        record = json.loads(path.read_text())
        best = record["best"]
        trials = {t["index"]: t for t in record["trials"]}
        if not _in_shape(record, trials):
            raise ValueError("out of shape")
    except OSError:
        raise UserError(f"--tuned {tune_dir}: no tune.json there; give the --out of a `rigtrain tune`") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"--tuned {path}: damaged (not the JSON `rigtrain tune` writes); tune again") from None
    if best is None:
        raise UserError(f"--tuned {tune_dir}: that tune measured no configuration; tune again with a larger --budget-s")
    if preset and preset != record["preset"]:
        raise UserError(
            f"--tuned {tune_dir} was tuned for --preset {record['preset']}, not {preset}; "
            f"drop --preset or tune {preset} (`rigtrain tune --preset {preset}`)"
        )
    preset = record["preset"]
    mine = user_keys(config_file, overrides)
    chosen = {**record.get("fixed_by_user", {}), **trials[best]["values"]}
    kept = {k: v for k, v in chosen.items() if k not in mine}
    if tuned:  # a named tune from another machine is allowed, and said
        here = machine_key(preset, machine_rig([], rig_file))
        if here != record["machine"]:
            say(f"warning: --tuned {tune_dir} was measured on {record['machine']}, not this machine ({here})")
    shown = ", ".join(f"{k}={as_set_value(v)}" for k, v in kept.items())
    say(
        f"--tuned: trial {best} of {tune_dir} ({trials[best].get('clips_per_s')} clips/s"
        + (f", {record['speedup_vs_plan']:.2f}x the plan's own choice" if record.get("speedup_vs_plan") else "")
        + f"): {shown}"
    )
    return preset, [f"{k}={as_set_value(v)}" for k, v in kept.items()] + list(overrides)


def _in_shape(record: dict, trials: dict) -> bool:
    """Whether the parts of tune.json that --tuned reads are what `rigtrain tune` writes (a
    hand-edited or damaged file is refused in one line, not met with a traceback)."""
    best = record["best"]
    return (
        isinstance(record["preset"], str)
        and isinstance(record["machine"], str)
        and isinstance(record.get("fixed_by_user", {}), dict)
        and (best is None or (isinstance(best, int) and isinstance(trials.get(best), dict)))
        and (best is None or isinstance(trials[best].get("values"), dict))
        and isinstance(record.get("speedup_vs_plan") or 0, (int, float))
    )
