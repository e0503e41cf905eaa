"""The configurations `rigtrain tune` may try: every combination of the keys it tunes, each
planned like a run (rig/plan.py), so that one predicted not to fit is pruned before it
runs; the rest ordered by the step-time model (rig/speed.py), with those predicted far
slower than the plan's own choice pruned too (docs/tune.md).

The global batch (clips per optimizer step) is never changed: a faster configuration that
trained a different optimisation problem would not be the same run. Keys the user set (in
--config or --set) are not tuned."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from rigtrain.config import RunConfig
from rigtrain.errors import UserError
from rigtrain.rig.facts import Rig
from rigtrain.rig.speed import SpeedFacts, Way, accumulation_ladder, facts_for, step_seconds

TUNED_KEYS = (
    "train.nproc",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "model.activation_checkpointing",
    "train.zero_stage",
    "train.offload_optimizer",
    "data.workers",
    "train.compile",
)
# Not tried when predicted this many times slower per clip than the plan's own choice.
PRUNE_SLOWER_THAN = 2.0
MICRO_BATCH_RUNGS = 4  # micro-batches tried per way of running the step: share, /2, /4, /8


@dataclass
class Candidate:
    index: int
    values: dict  # config key -> value, every key in TUNED_KEYS
    world: int
    baseline: bool = False  # the plan's own choice, always measured first
    predicted_s: dict = field(default_factory=dict)  # step_seconds' terms
    predicted_clips_per_s: float = 0.0
    predicted_peak_gib: float | None = None
    usable_gib: float | None = None
    pruned: str | None = None  # why it is not run
    config: RunConfig | None = field(default=None, repr=False)  # planned, ready to train
    plan: object = field(default=None, repr=False)

    def changed(self, baseline: Candidate) -> list[str]:
        return [k for k in TUNED_KEYS if self.values[k] != baseline.values[k]]

    def describe(self) -> str:
        v = self.values
        parts = [
            f"{v['train.micro_batch_size']}x{v['train.grad_accum_steps']}",
            f"{'ckpt' if v['model.activation_checkpointing'] else 'no-ckpt'}",
            f"ZeRO-{v['train.zero_stage']}",
        ]
        if v["train.offload_optimizer"] != "none":
            parts.append("offload")
        parts.append(f"workers {v['data.workers']}")
        if v["train.compile"]:
            parts.append("compiled")
        return f"{self.world} proc, " + ", ".join(parts)


def with_values(config: RunConfig, values: dict) -> RunConfig:
    """The config with SECTION.NAME keys set."""
    sections: dict[str, dict] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(
        config, **{s: dataclasses.replace(getattr(config, s), **kw) for s, kw in sections.items()}
    )


def values_of(config: RunConfig, plan) -> dict:
    values = {key: getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in TUNED_KEYS}
    values["data.workers"] = plan.dataloader_workers  # -1 in the config means "from the cores"
    return values


def make_candidates(
    config: RunConfig, rig: Rig, fixed: set[str], *, psu_w: float | None = None, on_baseline=None
) -> list[Candidate]:
    """Every candidate, the baseline first, then the rest in predicted order (pruned ones
    last). `on_baseline(plan)` is called as soon as the plan's own choice is planned (the
    tune starts its first worker group then, to import while the rest is planned)."""
    from rigtrain.train.planning import PLANNED, apply_plan, cached_parameter_count, plan_run  # the planner

    base_plan = plan_run(config, rig, user_keys=fixed, psu_w=psu_w)  # torch only if a step is measured
    if on_baseline is not None:
        on_baseline(base_plan)
    from rigtrain.train.flops import train_flops_per_clip  # torch: after the first workers started importing it

    base_config = apply_plan(config, base_plan)
    base_values = values_of(base_config, base_plan)
    facts = facts_for(
        rig,
        tuple(base_plan.gpus),
        cached_parameter_count(config),
        train_flops_per_clip(config.model, config.data),
        base_plan.precision,
    )
    clips_per_step = (
        base_values["train.micro_batch_size"] * base_values["train.grad_accum_steps"] * base_plan.world_size
    )
    options = _options(base_values, base_plan, rig, fixed, clips_per_step)
    seen: set[tuple] = set()
    out: list[Candidate] = []
    for values in [base_values, *options]:
        key = tuple(values[k] for k in TUNED_KEYS)
        if key in seen:
            continue
        seen.add(key)
        # planned from the plan's own choice, so what is not tuned (the optimizer) stays as it chose
        candidate = planned_candidate(base_config, rig, values, fixed | set(TUNED_KEYS) | set(PLANNED), psu_w, facts)
        candidate.baseline = not out
        out.append(candidate)
    baseline = out[0]
    per_clip = baseline.predicted_s["total"] / _clips(baseline)
    for c in out[1:]:
        slower = c.predicted_s["total"] / _clips(c) / per_clip
        if c.pruned is None and slower > PRUNE_SLOWER_THAN:
            c.pruned = f"predicted {slower:.1f}x slower per clip than the plan's choice"
    rest = sorted(
        out[1:],
        key=lambda c: (c.pruned is not None, -round(c.predicted_clips_per_s, 1), len(c.changed(baseline))),
    )
    ordered = [baseline, *rest]
    for i, c in enumerate(ordered):
        c.index = i
    return ordered


def _clips(c: Candidate) -> int:
    return c.values["train.micro_batch_size"] * c.values["train.grad_accum_steps"] * c.world


def _options(base: dict, plan, rig: Rig, fixed: set[str], clips_per_step: int) -> list[dict]:
    """The combinations to plan, before any is pruned."""

    def choices(key: str, values: list) -> list:
        return [base[key]] if key in fixed else list(dict.fromkeys([base[key], *values]))

    gpu = plan.device == "cuda"
    threads = rig.threads
    if gpu:
        worlds = [plan.world_size]  # every GPU the plan chose; fewer would only be slower
        stages = choices("train.zero_stage", [2, 3] if plan.world_size > 1 else [])
        checkpointing = choices("model.activation_checkpointing", [False, True])
        offloads = choices("train.offload_optimizer", ["none", "cpu"])
        compiled = choices("train.compile", [False, True])
    else:
        # On the CPU only what changes its speed: processes, micro-batch, loader threads.
        # Checkpointing only costs there, ZeRO stages move the same bytes through shared
        # memory, and torch.compile needs a compiler and minutes per trial.
        worlds = choices("train.nproc", [n for n in (1, 2, 4) if n <= threads])
        stages, checkpointing = [base["train.zero_stage"]], [base["model.activation_checkpointing"]]
        offloads, compiled = [base["train.offload_optimizer"]], [base["train.compile"]]
    out = []
    for world in worlds:
        share = -(-clips_per_step // world)
        ladder = (
            [(base["train.micro_batch_size"], base["train.grad_accum_steps"])]
            if {"train.micro_batch_size", "train.grad_accum_steps"} & fixed
            else accumulation_ladder(share, MICRO_BATCH_RUNGS)
        )
        per_process = max(1, threads // world)
        workers = choices("data.workers", sorted({0, 1, 2, max(1, base["data.workers"] // 2), per_process // 2}))
        workers = [w for w in workers if w <= max(2, per_process) or w == base["data.workers"]]
        for (micro, accum), stage, ckpt, offload, loader, compile_ in itertools.product(
            ladder, stages, checkpointing, offloads, workers, compiled
        ):
            if offload == "cpu" and not (gpu and ckpt):
                continue  # the planner offloads only once checkpointing is on
            if offload == "cpu" and stage < 2 and world == 1:
                stage = 2  # DeepSpeed's offload path on one GPU, as the planner takes it
            if offload == "cpu" and stage == 0:
                continue  # DeepSpeed offloads from ZeRO-1 up
            if compile_ and stage == 3:
                continue  # not compiled at ZeRO-3 (train/planning.py, COMPILE_AT_ZERO3)
            out.append(
                {
                    "train.nproc": world if not gpu else base["train.nproc"],
                    "train.micro_batch_size": micro,
                    "train.grad_accum_steps": accum,
                    "model.activation_checkpointing": ckpt,
                    "train.zero_stage": stage,
                    "train.offload_optimizer": offload,
                    "data.workers": loader,
                    "train.compile": compile_,
                }
            )
    return out


def planned_candidate(config: RunConfig, rig: Rig, values: dict, keys: set[str], psu_w, facts: SpeedFacts) -> Candidate:
    """A candidate planned like a run with these keys set: its memory against the card (or
    the RAM), and its predicted step time."""
    # torch: imported once candidates are planned
    from rigtrain.train.planning import apply_plan, plan_run, with_user_environment

    wanted = with_values(config, values)
    try:
        plan = with_user_environment(plan_run(wanted, rig, user_keys=keys, psu_w=psu_w))
    except UserError as err:  # a combination DeepSpeed or the planner refuses
        return Candidate(0, values, values["train.nproc"], pruned=f"not plannable: {err}")
    world = plan.world_size
    way = Way(
        world=world,
        micro_batch=values["train.micro_batch_size"],
        accum=values["train.grad_accum_steps"],
        checkpointing=values["model.activation_checkpointing"],
        zero_stage=values["train.zero_stage"],
        offload=values["train.offload_optimizer"],
        loader_workers=values["data.workers"],
        compiled=values["train.compile"],
    )
    terms = step_seconds(facts, way)
    candidate = Candidate(
        0,
        values,
        world,
        predicted_s=terms,
        predicted_clips_per_s=way.micro_batch * way.accum * world / terms["total"],
        predicted_peak_gib=plan.predicted_peak_gib,
        usable_gib=plan.usable_gib,
        config=apply_plan(wanted, plan),
        plan=plan,
    )
    codes = {w.code: w.message for w in plan.warnings}
    if "does_not_fit" in codes:
        candidate.pruned = (
            f"predicted not to fit: {plan.predicted_peak_gib:.2f} GiB per GPU of {plan.usable_gib:.2f} usable"
        )
    elif "low_ram" in codes:
        candidate.pruned = f"predicted not to fit in RAM: {codes['low_ram'].split(';')[0]}"
    return candidate
