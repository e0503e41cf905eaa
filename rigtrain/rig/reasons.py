"""The wording of a GPU plan's reasons: a sentence per choice that says why, from the
numbers the planner decided on. Kept apart from the decisions (rig/plan.py) so that each
reads on its own."""

from __future__ import annotations

from rigtrain.rig.budget import CardBudget, Setting


def explain(
    cards: CardBudget,
    request,
    setting: Setting,
    micro_batch: int,
    largest_fitting: int,
    accum: int,
    fits: bool,
    tried: dict,
    total: dict,
) -> dict[str, str]:
    """A sentence per choice of a GPU plan, in the order `rigtrain rig` prints them."""
    fixed = request.fixed
    stage, checkpointing, optimizer, offload = setting
    reasons = {
        "micro_batch_size": micro_batch_reason(
            cards, request, setting, micro_batch, largest_fitting, accum, fits, total["total_gib"]
        ),
        "grad_accum_steps": (
            "set by the user"
            if "train.grad_accum_steps" in fixed
            else accumulation_reason(cards, request, micro_batch, accum)
        ),
    }
    if "model.activation_checkpointing" in fixed:
        reasons["activation_checkpointing"] = "set by the user"
    elif not checkpointing:
        reasons["activation_checkpointing"] = (
            "the micro-batch fits without recomputing activations (which costs a third more compute)"
        )
    elif not fits:
        reasons["activation_checkpointing"] = "nothing fits; recomputing activations in backward needs least"
    else:
        without = tried.get((stage, False, optimizer, offload))
        reasons["activation_checkpointing"] = (
            f"micro-batch {micro_batch} does not fit without it"
            if fixed.get("train.micro_batch_size") or not without
            else f"without it only micro-batch {without} fits; recomputing activations in backward buys {micro_batch}"
        )
    reasons["zero_stage"] = "set by the user" if "train.zero_stage" in fixed else zero_reason(cards, stage, offload)
    reasons["offload_optimizer"] = (
        "set by the user"
        if "train.offload_optimizer" in fixed
        else "nothing else fits: the optimizer states live in RAM and steps run on the CPU (slower)"
        if offload == "cpu"
        else "the optimizer states fit on the GPU"
    )
    reasons["optimizer"] = (
        "set by the user"
        if "train.optimizer" in fixed
        else "8-bit AdamW: needed to fit the micro-batch"
        if optimizer == "adamw8bit"
        else "its states fit"
    )
    return reasons


def micro_batch_reason(
    cards: CardBudget,
    request,
    setting: Setting,
    micro_batch: int,
    largest_fitting: int,
    accum: int,
    fits: bool,
    total_gib: float,
) -> str:
    usable, fixed_mb = cards.usable, request.fixed.get("train.micro_batch_size")
    if fixed_mb:
        return f"set by the user (train.micro_batch_size={fixed_mb})" + ("" if fits else "; predicted NOT to fit")
    if not fits:
        return (
            f"nothing fits: micro-batch 1 is predicted at {total_gib:.2f} of {usable:.2f} usable GiB even with "
            "the options that need least"
        )
    if micro_batch == cards.share:
        return (
            f"{micro_batch} is the whole per-GPU share of the global batch ({request.global_batch} / "
            f"{cards.world}) and fits: predicted {total_gib:.2f} of {usable:.2f} usable GiB"
        )
    larger_fits = cards.search.peak(largest_fitting + 1, setting[1]) <= cards.step_budget(setting)
    if micro_batch == largest_fitting and larger_fits:
        # the planner stops a costly setting's search at a useful micro-batch (plan.py,
        # GOOD_MICRO_BATCH), which keeps the plan monotone in memory
        return (
            f"{micro_batch} reaches a useful size (predicted {total_gib:.2f} of {usable:.2f} usable GiB), which is "
            f"all {_costly(setting)} is used for; accumulation makes up the per-GPU share of {cards.share} "
            "(set train.micro_batch_size to go larger)"
        )
    if micro_batch == largest_fitting:
        return (
            f"the largest that fits: {micro_batch} is predicted at {total_gib:.2f} of {usable:.2f} usable GiB on "
            f"the smallest card, {cards.smallest_named}; {micro_batch + 1} would not fit"
        )
    over = accum * micro_batch - cards.share
    how = "evenly" if over == 0 else f"with {over} over (grad_accum_steps says what that costs)"
    return (
        f"up to {largest_fitting} fits on the smallest card, {cards.smallest_named}; {accum} micro-batches of "
        f"{micro_batch} cover the per-GPU share of {cards.share} {how} (predicted {total_gib:.2f} of "
        f"{usable:.2f} usable GiB)"
    )


def accumulation_reason(cards: CardBudget, request, micro_batch: int, accum: int) -> str:
    """How the step reaches the global batch; where equal micro-batches overshoot it, by how
    much, and the micro-batch that would make it exact (a run compared with one on another
    rig may want exactly the same batch)."""
    processes = sum(request.hosts) or cards.world  # every process on every machine
    wanted = request.global_batch
    per_step = accum * micro_batch * processes
    said = f"{accum} x {micro_batch} clips x {processes} GPU(s) = {per_step} per step"
    if per_step <= wanted:
        return f"{said}, the global batch of {wanted}"
    over = f"{said}: {per_step - wanted} over the global batch of {wanted} ({(per_step - wanted) / wanted:.1%})"
    if cards.share * processes != wanted:
        return f"{over}, which does not divide over {processes} GPUs"
    exact = max(d for d in range(1, micro_batch + 1) if cards.share % d == 0)
    return (
        f"{over}, since equal micro-batches of {micro_batch} cannot make {cards.share} per GPU; "
        f"--set train.micro_batch_size={exact} makes it exactly {wanted}"
    )


def _costly(setting: Setting) -> str:
    """What makes a setting slower than plain data parallelism, in words."""
    stage, checkpointing, optimizer, offload = setting
    parts = ["activation checkpointing"] if checkpointing else []
    parts += [f"ZeRO-{stage}"] if stage >= 2 else []
    parts += ["the 8-bit optimizer"] if optimizer == "adamw8bit" else []
    parts += ["the optimizer's offload"] if offload != "none" else []
    return " and ".join(parts) or "this setting"


def zero_reason(cards: CardBudget, stage: int, offload: str) -> str:
    if cards.world == 1:
        if offload == "cpu":
            return f"one GPU: ZeRO-{stage} only to offload the optimizer to the CPU"
        return "one GPU: ZeRO has nothing to shard"
    if stage == 1:
        return (
            "ZeRO-1 shards the optimizer states for the same communication as plain data parallelism (once per "
            "optimizer step)"
        )
    return f"ZeRO-{stage}: ZeRO-1 cannot fit a useful micro-batch; it communicates every micro-step" + (
        " (slow on these narrow links, so it came after checkpointing)" if cards.narrow else ""
    )
