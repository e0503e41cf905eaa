"""What a sweep leaves (docs/sweep.md): SWEEP_DIR/sweep.json (every trial: settings, metric,
steps run, state), best.toml (the best trial's config for `train --config`), sweep.png (the
metric per trial and each trial's curve), TensorBoard hparams rows in SWEEP_DIR/tb, and the
table on the terminal."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rigtrain.config.loading import parse_overrides, read_config_file
from rigtrain.files import write_json

BEST_FILE = "best.toml"


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": dict(t.params),
                "value": t.value,
                "steps": t.user_attrs.get("steps", max(t.intermediate_values, default=0)),
                "curve": {int(k): v for k, v in sorted(t.intermediate_values.items())},
                "run_dir": t.user_attrs.get("run_dir"),
                "error": t.user_attrs.get("error"),
            }
        )
    return rows


def format_table(rows: list[dict], metric: str, best: int | None) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    header = f"{'trial':>5}  " + "  ".join(f"{k:>14}" for k in keys) + f"  {metric:>18} {'steps':>6}  state"
    lines = [header]
    for r in rows:
        values = "  ".join(f"{_short(r['params'].get(k)):>14}" for k in keys)
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        state = r["state"] + ("  <- best" if r["number"] == best else "") + (f": {r['error']}" if r["error"] else "")
        lines.append(f"{r['number']:>5}  {values}  {value:>18} {r['steps']:>6}  {state}")
    return "\n".join(lines)


def _short(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_sweep_results(study, spec, sweep_dir: Path, *, as_json: bool, stopped: str | None) -> int:
    rows = trial_rows(study)
    complete = [r for r in rows if r["state"] == "complete"]
    best = None
    if complete:
        pick = min if spec.direction == "minimize" else max
        best = pick(complete, key=lambda r: r["value"])
    record = {
        "spec": str(spec.path),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "metric": spec.metric,
        "direction": spec.direction,
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "stopped_by": stopped,
        "best": best["number"] if best else None,
        "best_config": BEST_FILE if best else None,
        "trials": rows,
    }
    if best:
        _write_best(sweep_dir / BEST_FILE, spec, best)
    write_json(sweep_dir / "sweep.json", record)
    _write_hparams(sweep_dir / "tb", rows, spec.metric)
    picture = _draw(sweep_dir / "sweep.png", rows, spec)
    if as_json:
        print(json.dumps(record, indent=1))
    else:
        print(format_table(rows, spec.metric, record["best"]), flush=True)
        counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
        print(
            f"{len(rows)} trials: {counts['complete']} complete, {counts['pruned']} pruned early, "
            f"{counts['fail']} failed" + (f", {counts['running']} to resume" if counts["running"] else "")
        )
        if best:
            print(
                f"best: trial {best['number']} with {spec.metric} {best['value']:.4g}; its config: "
                f"rigtrain train --preset {spec.preset} --config {sweep_dir / BEST_FILE}"
            )
        print(
            f"written: {sweep_dir / 'sweep.json'}"
            + (f", {picture}" if picture else "")
            + f"; compare the trials: tensorboard --logdir {sweep_dir}"
        )
    if best is None and not stopped:
        print("rigtrain: no trial completed; see each trial's sweep-trial.log in its folder", file=sys.stderr)
        return 1
    return 0


def _write_best(path: Path, spec, best: dict) -> None:
    """The spec's config file, its --set values and the best trial's settings, as the best
    run's config.json holds them (typed), in one TOML file."""
    import tomli_w  # the TOML writer (tomllib only reads)

    keys: set[str] = set(best["params"])
    if spec.config_file:
        raw = read_config_file(spec.config_file)
        keys |= {f"{s}.{k}" for s, values in raw.items() if isinstance(values, dict) for k in values}
    keys |= {f"{s}.{k}" for s, values in parse_overrides(list(spec.overrides)).items() for k in values}
    config = json.loads((Path(best["run_dir"]) / "config.json").read_text())["config"]
    sections: dict[str, dict] = {}
    for key in sorted(keys):
        section, name = key.split(".")
        if section == "rig":
            continue  # where the trial ran, not what it was
        value = config[section][name]
        sections.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    header = (
        f"# rigtrain sweep {spec.path.name}: trial {best['number']}, {spec.metric} {best['value']:.6g} "
        f"({spec.direction})\n# Use it with: rigtrain train --preset {spec.preset} --config {path.name}\n\n"
    )
    path.write_text(header + tomli_w.dumps(sections))


def _write_hparams(logdir: Path, rows: list[dict], metric: str) -> None:
    from torch.utils.tensorboard import SummaryWriter  # heavy (TensorBoard): once, at the end

    with SummaryWriter(str(logdir)) as writer:
        for r in rows:
            if r["state"] == "running":
                continue
            hparams = {k: v for k, v in r["params"].items()}
            hparams["state"] = r["state"]
            last = r["value"] if r["value"] is not None else (list(r["curve"].values())[-1] if r["curve"] else 0.0)
            writer.add_hparams(
                hparams, {f"sweep/{metric}": last, "sweep/steps": r["steps"]}, run_name=f"trial-{r['number']:04d}"
            )


def _draw(path: Path, rows: list[dict], spec) -> Path | None:
    """The metric per trial (pruned ones at their last reported value, marked) and every
    trial's curve over steps."""
    try:
        import matplotlib  # optional: the picture only

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: the picture only
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if not r["curve"]:
            continue
        last = r["value"] if r["value"] is not None else list(r["curve"].values())[-1]
        marker = {"complete": "o", "pruned": "x", "fail": "s"}.get(r["state"], ".")
        left.scatter([r["number"]], [last], marker=marker, color="tab:blue" if r["state"] == "complete" else "tab:red")
        right.plot(list(r["curve"]), list(r["curve"].values()), label=f"trial {r['number']} ({r['state']})")
    left.set_xlabel("trial")
    left.set_ylabel(spec.metric)
    left.set_title(f"{spec.metric} per trial (x: pruned)")
    right.set_xlabel("step")
    right.set_ylabel(spec.metric)
    right.set_title("each trial's curve")
    if rows:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
