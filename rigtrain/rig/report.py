"""`rigtrain rig` as text: the GPUs, their links and power, the plan with its reasons, and
the warnings, each with what to do."""

from __future__ import annotations

from rigtrain.rig.facts import Rig
from rigtrain.rig.plan import Plan


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _opt(value, fmt: str = "{}", none: str = "?") -> str:
    return none if value is None else fmt.format(value)


def format_rig(rig: Rig) -> list[str]:
    lines = [f"machine ({'probed' if rig.source == 'probe' else rig.source}):"]
    cpu = rig.cpu
    lines.append(
        f"  CPU {cpu.model or '?'}: {_opt(cpu.cores)} cores, {_opt(cpu.threads)} threads"
        + (f", {cpu.tdp_w:.0f} W" if cpu.tdp_w else "")
        + f"; RAM {_opt(rig.ram_gib, '{:.1f}')} GiB"
        + (f" ({rig.ram_free_gib:.1f} free)" if rig.ram_free_gib else "")
        + (f"; /dev/shm {_shm_words(rig.shm_gib)}" if rig.shm_gib is not None else "")
        + (f"; PSU {rig.psu_w:.0f} W" if rig.psu_w else "")
    )
    for disk in rig.disk:
        lines.append(
            f"  disk {disk.path}: {disk.free_gib:.0f} GiB free" + (f" ({disk.filesystem})" if disk.filesystem else "")
        )
    software = rig.software or {}
    if software:
        lines.append("  software: " + ", ".join(f"{k} {v}" for k, v in software.items() if v))
    if not rig.gpus:
        lines.append("  no GPU: training runs on the CPU")
        return lines
    rows = [("GPU", "name", "memory GiB", "cc", "PCIe now/max", "power W", "temp", "throttle")]
    for i, g in enumerate(rig.gpus):
        pcie = g.pcie
        link = "?"
        if pcie:
            idle = " (idle)" if g.link_under_load[0] != pcie.gen else ""  # an idle card's power saving
            link = f"Gen{pcie.gen}{idle} x{pcie.width} / Gen{_opt(pcie.max_gen)} x{_opt(pcie.max_width)}"
        power = g.power
        watts = f"{_opt(power.draw_w, '{:.0f}')} of {_opt(power.limit_w, '{:.0f}')}" if power else "?"
        rows.append(
            (
                str(i),
                g.name + (" (display)" if g.display_active else ""),
                f"{g.free_gib:.1f} free of {g.memory_gib:.1f}",
                f"{g.compute_capability[0]}.{g.compute_capability[1]}",
                link,
                watts,
                _opt(g.temperature_c, "{:.0f} C"),
                ", ".join(g.throttle_reasons) or "-",
            )
        )
    lines += ["  " + line for line in _table(rows)]
    if rig.visible is not None:
        lines.append(f"  CUDA_VISIBLE_DEVICES leaves GPU(s) {', '.join(map(str, rig.visible))} visible to the run")
    if len(rig.gpus) > 1 and any(g.p2p is not None for g in rig.gpus):
        checked = any(g.p2p_check for g in rig.gpus)
        lines.append(
            "  P2P (NVLink marked N" + ("; after it, what a copy between the cards found" if checked else "") + "):"
        )
        header = ("", *[str(i) for i in range(len(rig.gpus))])
        matrix = [header]
        for i, g in enumerate(rig.gpus):
            cells = []
            for j in range(len(rig.gpus)):
                if i == j:
                    cells.append("-")
                    continue
                if g.nvlink and g.nvlink[j]:
                    cell = "N"
                elif g.p2p is None:
                    cell = "?"
                else:
                    cell = "yes" if g.p2p[j] else "no"
                entry = g.p2p_check[j] if g.p2p_check else None
                cells.append(f"{cell} {_p2p_check_cell(entry)}" if entry else cell)
            matrix.append((str(i), *cells))
        lines += ["    " + line for line in _table(matrix)]
    return lines


def _p2p_check_cell(entry: dict) -> str:
    """A checked pair: "ok 24.1 GB/s", "SLOW 3.1 GB/s (host 11.8)", "WRONG DATA", "HUNG"."""
    result = entry["result"]
    if result == "ok":
        return f"ok {entry.get('gb_s', 0):.1f} GB/s"
    if result == "slow":
        return f"SLOW {entry.get('gb_s', 0):.1f} GB/s (host {entry.get('host_gb_s', 0):.1f})"
    return {"wrong_data": "WRONG DATA", "hung": "HUNG", "unavailable": "refused by CUDA"}.get(result, "not checked")


def _plural(unit: str, count: int) -> str:
    """The ending of `unit` for `count` of them: GPU -> GPUs, process -> processes."""
    if count <= 1:
        return ""
    return "es" if unit.endswith("s") else "s"


def format_plan(plan: Plan) -> list[str]:
    unit = "GPU" if plan.device == "cuda" else "CPU process"
    lines = [f"plan ({plan.world_size} {unit}{_plural(unit, plan.world_size)}):"]
    choices = [
        ("precision", plan.precision),
        ("micro_batch_size", plan.micro_batch_size),
        ("grad_accum_steps", plan.grad_accum_steps),
        ("activation_checkpointing", "on" if plan.activation_checkpointing else "off"),
        ("zero_stage", plan.zero_stage),
        ("offload_optimizer", plan.offload_optimizer),
        ("optimizer", plan.optimizer),
        ("dataloader_workers", plan.dataloader_workers),
    ]
    for key, value in choices:
        lines.append(f"  {key} = {value}: {plan.reasons.get(key, '')}")
    if plan.predicted_peak_gib is not None:
        lines += format_memory(plan)
    for key, value in plan.env.items():
        reason = plan.reasons.get(f"env.{key}")
        lines.append(f"  {key}={value}" + (f": {reason}" if reason else ""))
    if plan.from_user:
        lines.append(f"  set by you (the plan keeps them): {', '.join(plan.from_user)}")
    return lines


# (key of plan.memory, what it is): the allocator's peak, then the room outside it
ALLOCATED_TERMS = (
    (
        "step_gib",
        "the train step, measured with FakeTensorMode: weights and gradients (fp32; fp16 in fp16), "
        "activations, temporaries and the input batch",
    ),
    ("input_batch_gib", "  of which the input batch (uint8 video, int16 audio, text)"),
    ("zero_saving_gib", "less what ZeRO's partitioning saves"),
    ("optimizer_states_gib", "optimizer states (Adam's moments; in fp16 the fp32 master weights too)"),
    ("fp32_copies_gib", "fp32 copies of the weights (ZeRO-1/2 step their partition in fp32)"),
    ("buckets_gib", "DeepSpeed's communication buckets"),
    ("cublas_workspaces_gib", "cuBLAS workspaces (forward and backward threads)"),
)
OUTSIDE_TERMS = (
    ("fragmentation_gib", "the caching allocator's fragmentation"),
    ("cuda_context_gib", "CUDA context and libraries (outside torch's allocator)"),
    ("nccl_gib", "NCCL buffers (outside torch's allocator)"),
    ("profiler_gib", "profiler buffers (outside torch's allocator)"),
    ("measured_outside_gib", "measured on this card by an earlier run's first steps: context, libraries, NCCL"),
)


def format_memory(plan: Plan) -> list[str]:
    m = plan.memory
    if plan.device != "cuda":
        return [
            f"  predicted peak {plan.predicted_peak_gib:.2f} GiB of RAM per process (step {m['step_gib']:.2f} "
            f"measured with FakeTensorMode, optimizer states {m['optimizer_states_gib']:.2f})"
        ]
    lines = [
        f"  memory per GPU: predicted allocator peak {plan.predicted_peak_gib:.2f} GiB of {plan.usable_gib:.2f} usable "
        f"(torch.cuda.max_memory_allocated)"
    ]
    for key, what in ALLOCATED_TERMS:
        if m.get(key):
            sign = "-" if key == "zero_saving_gib" else " " if key == "input_batch_gib" else "+"
            lines.append(
                f"    {sign} {m[key]:8.2f}  {what.strip()}" if sign != " " else f"      {m[key]:8.2f}    {what.strip()}"
            )
    lines.append(f"    = {plan.predicted_peak_gib:8.2f}  allocator peak")
    for key, what in OUTSIDE_TERMS:
        if m.get(key):
            lines.append(f"    + {m[key]:8.2f}  {what}")
    if m.get("in_use_before_gib"):
        lines.append(
            f"    + {m['in_use_before_gib']:8.2f}  in use on the card before the run (the driver's own, other programs)"
        )
    if "card_total_gib" in m:
        cap = m["allocator_cap_gib"]
        # no room left: the trainer leaves torch's allocator as it is (train/engine.py)
        capped = f"capped at {cap:.2f}" if cap > 0 else "left uncapped (the card has no room for it)"
        lines.append(
            f"    = {m['card_total_gib']:8.2f}  on the card (what nvidia-smi would show); torch's allocator is {capped}"
        )
    if m.get("display_kept_gib"):
        lines.append(f"      {m['display_kept_gib']:8.2f}  kept free beside it for the desktop the card draws")
    return lines


def format_report(rig: Rig, plan: Plan) -> str:
    lines = format_rig(rig) + [""] + format_plan(plan)
    if plan.warnings:
        said = warnings_said_once(plan.warnings)
        each = f" ({len(plan.warnings)} in --json, one per GPU)" if len(said) < len(plan.warnings) else ""
        lines += ["", f"{len(said)} warning(s){each}:"]
        lines += [f"  [{code}] {message}" for code, message in said]
    else:
        lines += ["", "no warnings"]
    return "\n".join(lines)


def warnings_said_once(warnings) -> list[tuple[str, str]]:
    """(code, message) of each warning, where several GPUs have the same one said once, for
    the first, naming the others ("; the same for GPUs 2 and 3"): a rig of four cards on
    risers would repeat each line four times. --json keeps one warning per GPU."""
    groups: dict[tuple[str, str], list] = {}
    for w in warnings:
        prefix = f"GPU {w.gpu} "
        alike = w.message[len(prefix) :] if w.gpu is not None and w.message.startswith(prefix) else id(w)
        groups.setdefault((w.code, alike), []).append(w)
    said = []
    for first, *others in groups.values():
        names = [str(w.gpu) for w in others]
        alike = f"; the same for GPU{'s' if len(names) > 1 else ''} {_listed(names)}" if names else ""
        said.append((first.code, first.message + alike))
    return said


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _shm_words(gib: float) -> str:
    return f"{gib * 1024:.0f} MiB" if gib < 1 else f"{gib:.1f} GiB"
