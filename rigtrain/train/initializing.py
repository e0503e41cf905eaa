"""`rigtrain train --init-from RUN_DIR`: a new run whose model starts from another run's
newest complete checkpoint, with a different shape allowed (docs/training.md, "Growing a
model"). Every parameter whose name and shape match is loaded; new ones keep their fresh
initialisation; ones the new model no longer has are dropped; ones whose shape changed are
left fresh and listed. The optimizer, the schedule and the step count start afresh.

The launcher checks the source and records it in RUN_DIR/config.json ("init_from"); each
training process loads the weights into its model before DeepSpeed wraps it (after, the
optimizer's fp32 master copies would still hold the fresh values)."""

from __future__ import annotations

import json
from pathlib import Path

from rigtrain.config import build_config
from rigtrain.errors import UserError
from rigtrain.files import write_json

INIT_FILE = "init_from.json"  # in the new run: what was loaded, new, dropped, shape-mismatched


def check_source(run_dir: str | Path) -> dict:
    """The record config.json keeps: the source run and the checkpoint to start from."""
    from rigtrain.train import checkpoints  # torch: only when a run is initialised from another

    source = Path(run_dir).resolve()
    saved = source / "config.json"
    if not saved.is_file():
        raise UserError(f"--init-from {run_dir}: not a run (no config.json); give the --out of a `rigtrain train`")
    found = checkpoints.newest_good(source / "checkpoints", warn=lambda line: print(f"[rigtrain] {line}", flush=True))
    if found is None:
        raise UserError(
            f"--init-from {run_dir}: no complete checkpoint to start from; train it until it saves one "
            "(train.ckpt_every, or the last step)"
        )
    step, tag = found
    return {"run_dir": str(source), "tag": tag, "step": step}


def source_weights(record: dict) -> dict:
    """The source checkpoint's module weights (fp32), whatever ZeRO stage wrote them."""
    from rigtrain.train.eval_command import load_weights  # the checkpoint reader `rigtrain eval` uses

    source = Path(record["run_dir"])
    config = build_config(json.loads((source / "config.json").read_text())["config"], source=str(source))
    state, _, _ = load_weights(source, config, tag=record["tag"])
    return state


def load_matching(model, state: dict) -> dict[str, list[str]]:
    """Copy every tensor of `state` whose name and shape the model has; say what happened
    to each name."""
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "new": [], "dropped": [], "shape_mismatched": []}
    matching = {}
    for name, tensor in state.items():
        if name not in own:
            report["dropped"].append(name)
        elif tuple(own[name].shape) != tuple(tensor.shape):
            report["shape_mismatched"].append(
                f"{name}: {tuple(tensor.shape)} in the checkpoint, {tuple(own[name].shape)} now"
            )
        else:
            matching[name] = tensor.to(own[name].dtype)
            report["loaded"].append(name)
    report["new"] = [name for name in own if name not in state]
    model.load_state_dict(matching, strict=False)
    return report


def initialize_from(model, record: dict, run_dir: Path, report: bool = False) -> dict[str, list[str]]:
    """Load what matches; with `report` (rank 0) write INIT_FILE and print the counts."""
    loaded = load_matching(model, source_weights(record))
    if not report:
        return loaded
    write_json(run_dir / INIT_FILE, {**record, **loaded})
    counts = ", ".join(f"{len(v)} {k.replace('_', '-')}" for k, v in loaded.items())
    lines = [
        f"initialised from {record['run_dir']} at step {record['step']}: {counts} "
        f"(names in {run_dir / INIT_FILE}); the optimizer starts fresh",
        *(f"  shape changed, left fresh: {line}" for line in loaded["shape_mismatched"][:5]),
    ]
    for line in lines:
        print(f"[rigtrain] {line}", flush=True)
    return loaded
