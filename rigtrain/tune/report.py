"""What a tune leaves behind (docs/tune.md): TUNE_DIR/tune.json (every candidate, measured,
failed or pruned, and why), TUNE_DIR/tuned.toml (the fastest, as a file `rigtrain train
--config` accepts), TensorBoard's hparams view in TUNE_DIR/tb (one row per trial), the
table on the terminal, and where `rigtrain train --tuned` finds the newest tune of a preset
on this machine."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import xxhash

from rigtrain.files import write_json
from rigtrain.rig.visible import visible_indices
from rigtrain.tune.candidates import TUNED_KEYS
from rigtrain.tune.records import NOISE_MARGIN

TUNED_FILE = "tuned.toml"


def machine_key(preset: str, rig) -> str:
    """The same preset on the same cards and CPU: what a tune result is good for."""
    cards = ",".join(rig.gpus[i].name for i in visible_indices(rig)) or "no GPU"
    return f"{preset} | {cards} | {rig.threads} threads"


def _index_path(key: str) -> Path:
    from rigtrain.data.embedded import cache_root  # the cache folder the datasets use

    return cache_root() / "tuned" / f"{xxhash.xxh3_64_hexdigest(key.encode())}.json"


def newest_tune(preset: str, rig) -> Path | None:
    try:
        record = json.loads(_index_path(machine_key(preset, rig)).read_text())
        return Path(record["tune_dir"])
    except (OSError, ValueError, KeyError, TypeError):  # a damaged cache entry: as if there were none
        return None


def _remember(key: str, tune_dir: Path) -> None:
    """The newest tune of this preset on this machine, for `train --tuned` without a folder."""
    path = _index_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "tune_dir": str(tune_dir.resolve())})
    except OSError:
        pass  # an unwritable cache costs `--tuned` without a folder, nothing more


def _measured(candidate, result: dict) -> dict:
    """A trial's record with clips/s and the data-wait share worked out."""
    out = dict(result)
    if result.get("status") == "ok":
        clips = candidate.values["train.micro_batch_size"] * candidate.values["train.grad_accum_steps"]
        out["clips_per_s"] = round(clips * candidate.world * result["steps"] / result["seconds"], 2)
        out["data_wait_fraction"] = round(result["data_wait_s"] / result["seconds"], 4)
    return out


def trial_row(candidate, result: dict | None, confirmation: dict | None = None, plan_again: dict | None = None) -> dict:
    row = {
        "index": candidate.index,
        "baseline": candidate.baseline,
        "world": candidate.world,
        "values": candidate.values,
        "predicted_clips_per_s": round(candidate.predicted_clips_per_s, 2),
        "predicted_step_s": {k: round(v, 5) for k, v in candidate.predicted_s.items()},
        "predicted_peak_gib": candidate.predicted_peak_gib,
        "usable_gib": candidate.usable_gib,
        "pruned": candidate.pruned,
        "status": "pruned" if candidate.pruned else (result or {}).get("status", "not run"),
    }
    if result:
        row.update({k: v for k, v in _measured(candidate, result).items() if k != "status"})
    if confirmation:
        row["confirmation"] = _measured(candidate, confirmation)
    if plan_again:
        row["plan_again"] = _measured(candidate, plan_again)
    return row


def choose(rows: list[dict]) -> tuple[dict | None, float | None, str, bool]:
    """(the best row, its speed-up over the plan's own choice, what it was chosen on, whether
    the plan's own choice was kept because the best was within the noise of it). On the
    confirmation round when the plan's own choice and another were measured again, else on
    the first round. The plan's own choice counts at the better of its measurements when it
    was measured once more after the others (search.py, `_measure_plan_again`)."""
    confirmed = {
        r["index"]: r["confirmation"]["clips_per_s"]
        for r in rows
        if (r.get("confirmation") or {}).get("status") == "ok"
    }
    if 0 in confirmed and len(confirmed) >= 2:
        score, basis = confirmed, "confirmation"
    else:
        score, basis = {r["index"]: r["clips_per_s"] for r in rows if r["status"] == "ok"}, "first round"
    if not score:
        return None, None, basis, False
    again = rows[0].get("plan_again") or {}
    if 0 in score and again.get("status") == "ok":
        score = {**score, 0: max(score[0], again["clips_per_s"])}
    best = max(score, key=score.get)
    kept = False
    if 0 in score and best != 0 and score[best] < score[0] * (1 + NOISE_MARGIN):
        best, kept = 0, True  # within a trial's noise of the plan's own choice: no reason to change the run
    speedup = round(score[best] / score[0], 3) if 0 in score else None
    return rows[best], speedup, basis, kept


def write_results(
    tune_dir: Path,
    candidates: list,
    results: dict,
    confirmations: dict,
    *,
    one_round: bool = False,
    plan_again: dict | None = None,
    preset: str,
    fixed: dict,
    rig,
    budget_s: float,
    elapsed_s: float,
    stopped: str | None,
    as_json: bool,
) -> int:
    rows = [
        trial_row(c, results.get(c.index), confirmations.get(c.index), plan_again if c.baseline else None)
        for c in candidates
    ]
    best, speedup, basis, kept_plan = choose(rows)
    if one_round:
        basis = "one long round"  # every candidate was a finalist: one round, the others' windows long
    record = {
        "preset": preset,
        "device": candidates[0].plan.device if candidates[0].plan else "cpu",
        "machine": machine_key(preset, rig),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget_s": budget_s,
        "elapsed_s": round(elapsed_s, 1),
        "stopped_by": stopped,
        "fixed_by_user": fixed,
        "baseline": 0,
        "best": best["index"] if best else None,
        "chosen_on": basis,
        "kept_plan_within_noise": kept_plan,
        "noise_margin": NOISE_MARGIN,
        "speedup_vs_plan": speedup,
        "tuned_config": TUNED_FILE if best else None,
        "trials": rows,
    }
    if best:
        _write_toml(tune_dir / TUNED_FILE, best, fixed, record)
        _remember(record["machine"], tune_dir)
    write_json(tune_dir / "tune.json", record)
    _write_hparams(tune_dir / "tb", rows)
    if as_json:
        print(json.dumps(record, indent=1))
    else:
        print(format_table(record), flush=True)
        _say_outcome(tune_dir, record, best)
    if best is None and not stopped:
        print(
            f"rigtrain: no configuration could be measured (see the outcomes above and {tune_dir / 'logs'}); "
            "a larger --budget-s, or `rigtrain rig` for what the plan expects",
            file=sys.stderr,
        )
        return 1
    return 0


def _say_outcome(tune_dir: Path, record: dict, best: dict | None) -> None:
    rows = record["trials"]
    pruned = [r for r in rows if r["status"] == "pruned"]
    fit = sum("fit" in (r["pruned"] or "") for r in pruned)
    print(
        f"{len(rows)} configurations: {sum(r['status'] == 'ok' for r in rows)} measured, "
        f"{sum(r['status'] in ('oom', 'failed', 'timeout', 'cut off') for r in rows)} failed or cut off, "
        f"{sum(r['status'] == 'not run' for r in rows)} not reached "
        f"{'before ' + record['stopped_by'] if record['stopped_by'] else 'in the budget'}, "
        f"{sum(r['status'] == 'skipped' for r in rows)} skipped (never one setting from the fastest), "
        f"{len(pruned)} pruned ({fit} predicted not to fit, {len(pruned) - fit} predicted far slower); "
        f"{record['elapsed_s']:.0f} s of a {record['budget_s']:.0f} s budget"
    )
    if record["stopped_by"]:
        print(f"stopped by {record['stopped_by']}: the choice is made on what was measured before it")
    if best is None:
        return
    confirmed = record["chosen_on"] == "confirmation"

    def speed(row: dict) -> float:
        return row["confirmation"]["clips_per_s"] if confirmed else row["clips_per_s"]

    on = {
        "confirmation": " (measured again, with longer windows)",
        "one long round": " (one round: the others with the confirmation's longer windows)",
    }.get(record["chosen_on"], "")
    base = rows[0]
    again = (base.get("plan_again") or {}).get("clips_per_s")
    after = f", {again:.1f} measured after the others" if again else ""
    if record["kept_plan_within_noise"]:
        measured = [r for r in rows if ((r.get("confirmation") or {}) if confirmed else r).get("status") == "ok"]
        fastest = max((r for r in measured if not r["baseline"]), key=speed)
        print(
            f"kept the plan's own choice (trial 0, {speed(base):.1f} clips/s{on}{after}): the fastest other, trial "
            f"{fastest['index']} at {speed(fastest):.1f}, is within {NOISE_MARGIN:.0%} of it, a trial's noise"
        )
    elif best["baseline"]:
        print(f"fastest: the plan's own choice (trial 0) at {speed(best):.1f} clips/s{on}{after}")
    elif record["speedup_vs_plan"]:
        print(
            f"fastest: trial {best['index']} at {speed(best):.1f} clips/s{on}, "
            f"{record['speedup_vs_plan']:.2f}x the plan's own choice (trial 0: {speed(base):.1f}{after})"
        )
    else:
        print(
            f"fastest: trial {best['index']} at {speed(best):.1f} clips/s; the plan's own choice did not run "
            f"({base['status']})"
        )
    print(
        f"written: {tune_dir / 'tune.json'}, {tune_dir / TUNED_FILE}; TensorBoard's HPARAMS tab: "
        f"tensorboard --logdir {tune_dir / 'tb'}"
    )
    print(
        f"train with it: rigtrain train --tuned {tune_dir}  "
        f"(or --preset {record['preset']} --config {tune_dir / TUNED_FILE})"
    )


def format_table(record: dict) -> str:
    header = (
        f"{'#':>3} {'procs':>5} {'micro x accum':>13} {'ckpt':>5} {'ZeRO':>4} {'offload':>7} {'workers':>7} "
        f"{'compile':>7} {'predicted':>9} {'clips/s':>8} {'again':>8} {'data wait':>9} {'peak GiB':>8}  outcome"
    )
    lines = [header]
    for r in record["trials"]:
        if r["status"] in ("pruned", "skipped"):
            continue  # counted below the table; tune.json has them
        v = r["values"]
        measured = r.get("clips_per_s")
        outcome = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"[:90]
        if r.get("raced_out"):
            outcome += f", stopped early (slower than #{r['against']})"
        if (r.get("confirmation") or {}).get("raced_out"):
            outcome += f", again stopped early (slower than #{r['confirmation']['against']} again)"
        if r["index"] == record["best"]:
            outcome += "  <- fastest"
        if r["baseline"]:
            outcome += "  (the plan's own choice)"
            if (r.get("plan_again") or {}).get("status") == "ok":
                outcome += f", {r['plan_again']['clips_per_s']} clips/s when measured after the others"
        lines.append(
            f"{r['index']:>3} {r['world']:>5} {v['train.micro_batch_size']:>6} x {v['train.grad_accum_steps']:<4}"
            f" {'yes' if v['model.activation_checkpointing'] else 'no':>5} {v['train.zero_stage']:>4}"
            f" {v['train.offload_optimizer']:>7} {v['data.workers']:>7} {'yes' if v['train.compile'] else 'no':>7}"
            f" {r['predicted_clips_per_s']:>9.1f} {measured if measured is not None else '-':>8}"
            f" {(r.get('confirmation') or {}).get('clips_per_s', '-'):>8}"
            f" {_pct(r.get('data_wait_fraction')):>9} {_gib(r.get('peak_gib')):>8}  {outcome}"
        )
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _gib(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _write_toml(path: Path, best: dict, fixed: dict, record: dict) -> None:
    """The fastest configuration's tuned keys, with the keys the user set for the tune (so
    the file alone reproduces what was measured, given the same preset)."""
    import tomli_w  # the TOML writer (tomllib only reads)

    sections: dict[str, dict] = {}
    for key, value in {**fixed, **{k: best["values"][k] for k in TUNED_KEYS}}.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    speed = f"{best['clips_per_s']:.1f} clips/s"
    if record["speedup_vs_plan"]:
        speed += f", {record['speedup_vs_plan']:.2f}x the plan's own choice"
    header = (
        f"# rigtrain tune, {record['date']}: the fastest of {len(record['trials'])} configurations of preset "
        f"'{record['preset']}'\n# on {record['machine']}: {speed}.\n"
        f"# Use it with: rigtrain train --preset {record['preset']} --config {path.name}\n\n"
    )
    path.write_text(header + tomli_w.dumps(sections))


def _write_hparams(logdir: Path, rows: list[dict]) -> None:
    """One hparams row per trial that ran (pruned ones never did): its settings and outcome,
    measured against predicted speed."""
    from torch.utils.tensorboard import SummaryWriter  # heavy (TensorBoard): once, at the end

    with SummaryWriter(str(logdir)) as writer:
        for r in rows:
            if r["status"] in ("pruned", "not run", "skipped"):
                continue
            hparams = {k: v for k, v in r["values"].items()}
            hparams["processes"] = r["world"]
            hparams["outcome"] = f"{r['status']}, stopped early" if r.get("raced_out") else r["status"]
            metrics = {
                "tune/clips_per_s": r.get("clips_per_s", 0.0),
                "tune/predicted_clips_per_s": r["predicted_clips_per_s"],
                "tune/data_wait_fraction": r.get("data_wait_fraction", 0.0),
                "tune/peak_gib": r.get("peak_gib", 0.0),
            }
            writer.add_hparams(hparams, metrics, run_name=f"trial-{r['index']:03d}")
