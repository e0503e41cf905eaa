"""`rigtrain train --curriculum FILE`: stages run in sequence, each a normal run initialised
from the one before (--init-from), each with its own overrides and steps (docs/training.md,
"Growing a model"). A curriculum file:

    preset = "demo"                 # optional; --preset wins
    [[stage]]
    name = "small-frames"
    steps = 200
    set = ["data.frame_size=32,32", "model.evo_layers=1"]
    [[stage]]
    name = "two-evolver-layers"
    steps = 300
    set = ["model.evo_layers=2"]

OUT/stage-N-NAME is each stage's run folder; `--resume` skips the stages whose last step is
saved and continues the first that is not, from its own checkpoint."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Ubuntu 22.04's): tomli is what 3.11 took in as tomllib
    import tomli as tomllib

from rigtrain.config import load_config
from rigtrain.config.schema import ConfigError
from rigtrain.errors import UserError
from rigtrain.files import write_json

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
PLAN_FILE = "curriculum.json"


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    overrides: tuple[str, ...]


def read_curriculum(path: str | Path) -> tuple[str | None, list[Stage]]:
    """(preset or None, stages); a mistake is a UserError naming the file, stage and field."""
    path = Path(path)
    where = f"--curriculum {path}"
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{where}: cannot be read ({err.strerror or err}); give a TOML curriculum file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: not valid TOML: {err}") from None
    unknown = set(raw) - {"preset", "stage"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a curriculum has preset and [[stage]]")
    preset = raw.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise UserError(f'{where}: preset must be a preset\'s name, e.g. preset = "demo"')
    tables = raw.get("stage")
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{where}: no stages; add [[stage]] tables with name, steps and set")
    stages, names = [], set()
    for n, table in enumerate(tables, 1):
        at = f"{where}: stage {n}"
        extra = set(table) - {"name", "steps", "set"}
        if extra:
            raise UserError(f"{at}: unknown key(s) {', '.join(sorted(extra))}; a stage has name, steps and set")
        name = table.get("name", f"stage{n}")
        if not isinstance(name, str) or not NAME.match(name) or name in names:
            raise UserError(f"{at}: name must be unique letters, digits, '-', '_' or '.', got {name!r}")
        steps = table.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserError(f"{at} ({name}): steps must be a whole number of optimizer steps above 0, got {steps!r}")
        overrides = table.get("set", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise UserError(f'{at} ({name}): set must be a list of "KEY=VALUE" strings')
        try:
            load_config(preset or "demo", None, overrides)  # every key and value checked now, not at stage N
        except ConfigError as err:
            raise UserError(f"{at} ({name}): {err}") from None
        names.add(name)
        stages.append(Stage(name, steps, tuple(overrides)))
    return preset, stages


def stage_dir(root: Path, number: int, stage: Stage) -> Path:
    return root / f"stage-{number}-{stage.name}"


def finished(folder: Path, steps: int) -> bool:
    from rigtrain.train.checkpoints import complete_tags  # torch: once a curriculum runs

    return any(step >= steps for step, _ in complete_tags(folder / "checkpoints"))


def run_curriculum(file: str, *, out: str | None, preset: str | None, resume: bool, train, **options) -> int:
    """Every stage through `train` (launch.train), in order; the first failure ends it."""
    from rigtrain.train.processes import new_run_dir  # the run folders' naming

    file_preset, stages = read_curriculum(file)
    preset = preset or file_preset or "demo"
    root = Path(out) if out else new_run_dir(f"{preset}-curriculum")
    plan = root / PLAN_FILE
    if plan.exists() and not resume:
        raise UserError(f"--out {root} already holds a curriculum; add --resume to continue it or choose another --out")
    if resume and not plan.exists():
        raise UserError(f"--resume: {root} holds no curriculum (no {PLAN_FILE}); give the --out of one")
    root.mkdir(parents=True, exist_ok=True)
    write_json(
        plan,
        {
            "file": str(Path(file).resolve()),
            "preset": preset,
            "stages": [s.__dict__ | {"overrides": list(s.overrides)} for s in stages],
        },
    )
    previous = options.pop("init_from", None)
    overrides = options.pop("overrides")
    for number, stage in enumerate(stages, 1):
        folder = stage_dir(root, number, stage)
        if finished(folder, stage.steps):
            print(f"[rigtrain] curriculum stage {number} ({stage.name}) is done: {folder}", flush=True)
            previous = str(folder)
            continue
        again = (folder / "config.json").exists()
        print(
            f"[rigtrain] curriculum stage {number}/{len(stages)} ({stage.name}): {stage.steps} steps, "
            f"{' '.join(stage.overrides) or 'no overrides'}"
            + (", resumed" if again else f", from {previous}" if previous else ""),
            flush=True,
        )
        code = train(
            out=str(folder),
            preset=preset,
            overrides=[*overrides, *stage.overrides],
            steps=stage.steps,
            resume=again,
            init_from=None if again else previous,
            fresh_process=number > 1,  # one process holds one DeepSpeed run: later stages get their own
            **options,
        )
        if code != 0:
            if code not in (1, 2):
                print(
                    f"[rigtrain] continue the curriculum with: rigtrain train --curriculum {file} --out {root} --resume"
                )
            return code
        previous = str(folder)
    print(f"[rigtrain] curriculum done: {len(stages)} stage(s) in {root}", flush=True)
    return 0
