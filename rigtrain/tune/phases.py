"""The first round's order: one setting at a time from the best so far (a coordinate
search), not every combination (docs/tune.md, "The first round").

Two GPUs and the `small` preset plan 360 combinations, 172 of them predicted to fit and to
be within 2x of the plan's speed: more trials than a few minutes hold, and the step-time
model, which cannot tell loader-thread counts apart, would spend the budget on compiled
variants that differ only in them. The settings act mostly on different parts of the
step (the micro-batch and memory on the kernels' efficiency, the ZeRO stage on the
communication, compilation on the kernels, loader threads on the input), so each phase
varies one of them around the best configuration measured so far, and the next phase
starts from its winner. Light (no torch): the driver and the tests use it."""

from __future__ import annotations

from rigtrain.tune.records import NOISE_MARGIN

# (what a phase varies, the keys it may change), in order: the shape of the step first
# (it decides what the others work with), then the ZeRO stage, compilation, the loader.
PHASES = (
    (
        "micro-batch, checkpointing, offload and processes",
        {
            "train.nproc",
            "train.micro_batch_size",
            "train.grad_accum_steps",
            "model.activation_checkpointing",
            "train.offload_optimizer",
        },
    ),
    ("ZeRO stage", {"train.zero_stage"}),
    ("torch.compile", {"train.compile"}),
    ("loader threads", {"data.workers"}),
)
SKIPPED = (
    "not tried: the first round changed one setting at a time from the fastest so far, "
    "and this combination was never one setting away from it"
)


def neighbours(candidates: list, center, keys: set[str], tried: set[int]) -> list[int]:
    """The runnable candidates not tried yet that differ from `center` only in `keys`, in
    the candidates' order (fastest predicted first). Offload on one GPU comes with ZeRO-2
    (as the planner offloads), so an offload candidate may differ in the stage too."""
    out = []
    for c in candidates:
        if c.pruned is not None or c.index in tried:
            continue
        changed = set(c.changed(center))
        if changed and changed <= keys:
            out.append(c.index)
        elif "train.offload_optimizer" in changed and changed <= keys | {"train.zero_stage"}:
            out.append(c.index)
    return out


def phase_winner(center: int, indices: list[int], speeds: dict[int, float]) -> int:
    """The phase's fastest measured trial if it beats `center` by more than the noise (or
    `center` failed), else `center`. `speeds`: clips/s of the trials that finished their
    windows (one stopped early trails a finished one, so it never wins)."""
    measured = [i for i in indices if i in speeds]
    if not measured:
        return center
    best = max(measured, key=speeds.get)
    if center not in speeds:
        return best
    return best if speeds[best] > speeds[center] * (1 + NOISE_MARGIN) else center
