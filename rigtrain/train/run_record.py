"""A run folder's config.json, read back for `--resume` and `rigtrain eval`: what
`rigtrain train` wrote (the config, the plan, the rig, the data and the held-out split).
It is a JSON file in the user's folder, and can be edited; one edited into a shape train
never writes is one sentence naming the field, not a traceback further on."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from rigtrain.errors import UserError

# The record's fields and the JSON types train writes them as (None where it may be null)
FIELDS: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "plan": (dict,),
    "rig": (dict,),
    "data_dir": (str,),
    "split": (dict, type(None)),
    "init_from": (dict, type(None)),
    "warnings": (list,),
    "command": (list,),
}
# Every line the run's processes print (the launcher's and each rank's), appended by each
# command that trains in the folder, so that what a run said outlives a closed terminal
RUN_LOG = "train.log"
# (a record with only its config is still read: --resume checks it against the command)
REQUIRED = ("config",)
JSON_NAMES = {dict: "an object", list: "a list", str: "text", type(None): "null", bool: "true/false", int: "a number"}


def read_run_record(run_dir: Path, command: str) -> dict:
    """The record, checked; a UserError starting with `command` when there is none, or it is
    damaged or edited out of shape."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{command}: {run_dir} is not a run (no config.json); give the --out of `rigtrain train`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{command}: {path} is damaged ({err}); the run cannot be read without it") from None
    problem = shape_problem(record)
    if problem:
        raise UserError(
            f"{command}: {path}: {problem}; `rigtrain train` writes this file: put back what was changed, "
            "or start a new run with another --out"
        )
    return record


def shape_problem(record) -> str | None:
    """What is out of shape in a record, or None."""
    if not isinstance(record, dict):
        return f"is {_json_name(record)}, not the object a run writes"
    for key in REQUIRED:
        if key not in record:
            return f"{key} is missing"
    for key, kinds in FIELDS.items():
        if key in record and not isinstance(record[key], kinds):
            wanted = " or ".join(JSON_NAMES[k] for k in kinds)
            return f"{key} is {_json_name(record[key])}, where a run writes {wanted}"
    plan = record.get("plan", {})
    env = plan.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        return "plan.env must map variable names to text"
    heldout = (record.get("split") or {}).get("heldout_videos", [])
    if not isinstance(heldout, list) or not all(isinstance(name, str) for name in heldout):
        return "split.heldout_videos must be a list of video names"
    for key in ("world_size", "micro_batch_size", "grad_accum_steps", "zero_stage"):
        value = plan.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"plan.{key} is {_json_name(value)}, where a run writes a whole number"
    return None


def _json_name(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return JSON_NAMES.get(type(value), type(value).__name__)


def resume_command(run_dir: Path, *extra: str) -> str:
    """`rigtrain train --out RUN --resume` as this run needs it, for the lines that say how
    to go on: with the --hostfile it was last started with (without it, a run of several
    machines would be planned for this one alone). extra: more words (`--set ...`)."""
    try:
        command = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))["command"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        command = []
    hostfile = []
    for i, word in enumerate(command if isinstance(command, list) else []):
        if word == "--hostfile" and i + 1 < len(command):
            hostfile = ["--hostfile", str(command[i + 1])]
        elif isinstance(word, str) and word.startswith("--hostfile="):
            hostfile = ["--hostfile", word.split("=", 1)[1]]
    return shlex.join(["rigtrain", "train", "--out", str(run_dir), "--resume", *hostfile, *extra])
