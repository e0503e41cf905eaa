"""rig/: rig files in, plans and warnings out (no GPU needed), the memory measurement
against real execution, and the NVML probe against a stand-in NVML."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from rigtrain.config import load_config
from rigtrain.errors import UserError
from rigtrain.rig.budget import weight_bytes
from rigtrain.rig.facts import Gpu, Rig
from rigtrain.rig.plan import PlanRequest, make_plan
from rigtrain.rig.rig_file import read_rig_file, rig_from_dict
from rigtrain.rig.step_memory import PeakBytes, fake_step_peak_bytes
from rigtrain.train.measured_step import train_step_builder
from rigtrain.train.planning import machine_rig, plan_run

RIGS = Path(__file__).parent / "rigs"


def plan_for(rig_name: str, preset: str = "base", overrides=(), psu_w=None, hosts=()):
    from rigtrain.config.loading import user_keys

    return plan_run(
        load_config(preset, overrides=list(overrides)),
        read_rig_file(RIGS / rig_name),
        user_keys=user_keys(None, list(overrides)),
        psu_w=psu_w,
        hosts=hosts,
    )


def codes(plan):
    return {w.code for w in plan.warnings}


def test_rtx4060_fits_small_without_help_base_with_checkpointing_and_a_big_model_with_8bit():
    small = plan_for("rtx4060_8gb.json", preset="small")
    assert (small.precision, small.zero_stage, small.activation_checkpointing, small.optimizer) == (
        "bf16",
        0,
        False,
        "adamw",
    )
    assert "nothing to shard" in small.reasons["zero_stage"]  # one GPU
    # base: 8 GB less the CUDA context (1.7 GiB) and 10% for fragmentation leave 5.7 GiB, in
    # which 8 clips of 32 frames at 224x224 (two narration rows each) fit only with recomputation
    plan = plan_for("rtx4060_8gb.json")
    assert (plan.precision, plan.zero_stage, plan.activation_checkpointing, plan.optimizer) == (
        "bf16",
        0,
        True,
        "adamw",
    )
    assert plan.predicted_peak_gib <= plan.usable_gib and plan.micro_batch_size >= 8
    assert plan.micro_batch_size * plan.grad_accum_steps >= 256  # reaches the global batch
    big = plan_for("rtx4060_8gb.json", overrides=["model.d_model=1024", "model.enc_layers=18", "model.heads=16"])
    assert big.activation_checkpointing and big.optimizer == "adamw8bit" and big.offload_optimizer == "none"
    assert "fits" in big.reasons["activation_checkpointing"] and big.predicted_peak_gib <= big.usable_gib
    assert codes(plan) == set()  # a single card on its native x8 link is not "downtrained"


def test_two_3090s_one_on_x4_with_an_850w_psu():
    plan = plan_for("two_3090_one_on_x4_850w.json")
    assert plan.world_size == 2 and plan.precision == "bf16"
    assert {"pcie_narrow", "pcie_downtrained", "no_p2p", "psu_headroom"} <= codes(plan)
    narrow = next(w for w in plan.warnings if w.code == "pcie_narrow")
    assert narrow.gpu == 1 and "x4" in narrow.message
    psu = next(w for w in plan.warnings if w.code == "psu_headroom")
    assert "850 W PSU" in psu.message and "-pl 195" in psu.message  # (850 - 105 - 75) / (2 x 1.7) rounded to 5 W
    assert "56% of the default 350 W" in psu.message and "a 3090 kept" in psu.message
    assert "`sudo nvidia-smi -i N -pl 195`" in psu.message
    wsl = dataclasses.replace(
        read_rig_file(RIGS / "two_3090_one_on_x4_850w.json"), software={"kernel": "6.6.87.2-microsoft-standard-WSL2"}
    )
    (psu,) = [w for w in plan_run(load_config("base"), wsl, user_keys=set()).warnings if w.code == "psu_headroom"]
    assert "`nvidia-smi -i N -pl 195` in an administrator PowerShell on Windows" in psu.message  # WSL's only reads
    assert plan.env["NCCL_P2P_DISABLE"] == "1"
    assert plan.zero_stage == 1 and "same communication" in plan.reasons["zero_stage"]
    # NCCL's warnings are printed (and kept in train.log) where it carries the gradients
    assert plan.env["NCCL_DEBUG"] == "WARN" and "train.log" in plan.reasons["env.NCCL_DEBUG"]
    for one in (plan_for("two_3090_one_on_x4_850w.json", overrides=["rig.gpus=0"]), plan_for("cpu_only.json")):
        assert "NCCL_DEBUG" not in one.env  # one GPU, or gloo: no NCCL


def test_a_power_limit_left_well_below_the_default_is_said_with_the_limit_to_go_back_to():
    """3090s limited to 200 W (57% of 350), perhaps for another job and forgotten: each trains
    at lower clocks. The warning gives the limit to go back to: the default where the PSU
    allows it, what the PSU allows where it does not, and nothing where the PSU needs the
    cap about where it is. 280 W (80%), the usual efficient cap, is not worth a word."""
    raw = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    for gpu in raw["gpus"]:
        gpu["power"]["limit_w"] = 200

    def low(psu_w, **changes):
        rig = rig_from_dict({**raw, "psu_w": psu_w, **changes})
        return [w for w in plan_run(load_config("small"), rig, user_keys=set()).warnings if w.code == "power_limit_low"]

    generous = low(1600)
    assert [w.gpu for w in generous] == [0, 1]
    assert generous[0].message.startswith(
        "GPU 0 (NVIDIA GeForce RTX 3090) is limited to 200 W, 57% of its default 350 W"
    )
    assert "`sudo nvidia-smi -i N -pl 350`" in generous[0].message and "PSU allows" not in generous[0].message
    # (1200 - 105 - 75) / (2 x 1.7) = 300: the PSU's cap, not the default
    assert "the 1200 W PSU allows 300 W for each card" in low(1200)[0].message
    assert "-pl 300`" in low(1200)[0].message
    assert low(850) == []  # 850 W needs 195 W: the cap is right where it is
    one = low(1600, gpus=raw["gpus"][:1] + [dict(raw["gpus"][1], power={**raw["gpus"][1]["power"], "limit_w": 280})])
    assert [w.gpu for w in one] == [0] and "`sudo nvidia-smi -i 0 -pl 350`" in one[0].message  # one card: its index
    assert low(1600, gpus=[]) == []  # a CPU machine with a PSU (a CUDA_VISIBLE_DEVICES= run): once a division by 0
    under_wsl = low(1600, software={"kernel": "6.6.87.2-microsoft-standard-WSL2"})[0]
    assert "`nvidia-smi -i N -pl 350` in an administrator PowerShell on Windows" in under_wsl.message


def test_two_cards_at_x8_of_x16_are_the_boards_lane_split_not_a_bad_seat():
    """Most desktop boards give two cards x8 each from the CPU's 16 lanes, and NVML's maximum
    width is the card's x16: both cards at x8 are the board's design, said once with the cost
    and what the plan does about it. One card alone at x8 of x16 still says to reseat it."""
    raw = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    for gpu in raw["gpus"]:
        gpu["pcie"] = {"gen": 1, "width": 8, "max_gen": 4, "max_width": 16}  # idle: Gen1
    raw["psu_w"] = 1600
    plan_for_rig = lambda rig: plan_run(load_config("base"), rig, user_keys=set())  # noqa: E731
    plan = plan_for_rig(rig_from_dict(raw))
    (split,) = [w for w in plan.warnings if w.code.startswith("pcie")]
    assert split.code == "pcie_split" and split.gpu is None
    assert split.message.startswith("GPUs 0 and 1 run at x8 of x16 lanes each") and "by design" in split.message
    assert "about 12 GB/s each way against 24 at x16" in split.message  # Gen4, as under load
    assert plan.zero_stage == 1 and "reseat" not in split.message and "prefers ZeRO-0/1" in split.message
    for gpu in raw["gpus"]:
        gpu["p2p"], gpu["nvlink"] = [True, True], [False, False]
    raw["gpus"][0]["nvlink"][1] = raw["gpus"][1]["nvlink"][0] = True  # two 3090s and their bridge
    (bridged,) = [w for w in plan_for_rig(rig_from_dict(raw)).warnings if w.code.startswith("pcie")]
    assert "the gradients go over NVLink between these cards" in bridged.message
    assert bridged.message.endswith("input batch (a few MB): nothing to change")  # once cut off mid-sentence
    raw["gpus"][0]["nvlink"][1] = raw["gpus"][1]["nvlink"][0] = False

    raw["gpus"][0]["pcie"]["width"] = 16  # x16 + x8: the second card's link is the odd one
    (alone,) = [w for w in plan_for_rig(rig_from_dict(raw)).warnings if w.code.startswith("pcie")]
    assert alone.code == "pcie_downtrained" and alone.gpu == 1 and "reseat the card" in alone.message

    raw["gpus"] += [json.loads(json.dumps(raw["gpus"][1])) for _ in range(2)]  # four cards: x16/x8/x8/x8
    for gpu in raw["gpus"]:
        gpu["p2p"], gpu["nvlink"] = [True] * 4, [False] * 4
    raw["psu_w"] = 3000
    (split,) = [w for w in plan_for_rig(rig_from_dict(raw)).warnings if w.code.startswith("pcie")]
    assert split.message.startswith("GPUs 1, 2 and 3 run at x8 of x16 lanes each")


def test_an_idle_cards_pcie_generation_is_not_the_one_it_trains_at():
    """Probed before training, a card is idle and has dropped its link to a low generation
    to save power (a 3090 idles at Gen1 x16); under load it runs at NVML's max, which counts
    the slot. The plan's host link and the narrow-link warning use that; a busy card's
    generation below the max is what it runs at, and is a warning of its own."""
    from rigtrain.rig.links import pcie_gb_s
    from rigtrain.rig.report import format_rig
    from rigtrain.rig.speed import facts_for
    from rigtrain.rig.warnings import hardware_warnings

    raw = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    raw["gpus"][0]["pcie"].update(gen=1, width=16, max_gen=4, max_width=16)
    raw["gpus"][1]["pcie"].update(gen=1, width=4, max_gen=4, max_width=16)
    idle = rig_from_dict(raw)
    assert [g.link_under_load for g in idle.gpus] == [(4, 16), (4, 4)]
    assert facts_for(idle, (0,), 10**6, 1e9, "bf16").host_link_bytes_s == pcie_gb_s(4, 16) * 1e9  # not Gen1's
    narrow = next(w for w in hardware_warnings(idle, (0, 1)) if w.code == "pcie_narrow")
    assert "runs on PCIe Gen4 x4 under load (Gen1 now, idle): about 6 GB/s against 24 at x16" in narrow.message
    assert not any(w.code == "pcie_downtrained" and "under load" in w.message for w in hardware_warnings(idle, (0, 1)))
    assert "Gen1 (idle) x16 / Gen4 x16" in "\n".join(format_rig(idle))

    raw["gpus"][0]["pcie"]["gen"] = 3
    raw["gpus"][0]["utilization_pct"] = 97.0
    busy = rig_from_dict(raw)
    assert busy.gpus[0].link_under_load == (3, 16)
    assert any(
        w.code == "pcie_downtrained" and "Gen3 of Gen4 under load" in w.message for w in hardware_warnings(busy, (0, 1))
    )


def test_four_4090s_without_p2p():
    plan = plan_for("four_4090_no_p2p.json")
    assert plan.world_size == 4 and plan.env["NCCL_P2P_DISABLE"] == "1"
    assert {"no_p2p", "p2p_unreliable", "throttling", "psu_headroom"} <= codes(plan)
    assert next(w for w in plan.warnings if w.code == "throttling").gpu == 2
    # the global batch, reached with less than one clip more per micro-batch (22 x 3 x 4 =
    # 264 where 16 x 4 x 4 would make 256 with micro-batches a third smaller)
    per_step = plan.micro_batch_size * plan.grad_accum_steps * 4
    assert 256 <= per_step < 256 + 4 * plan.grad_accum_steps
    assert f"= {per_step} per step" in plan.reasons["grad_accum_steps"]
    # the reason says what the overshoot is and which micro-batch makes the batch exact
    assert "264 per step: 8 over the global batch of 256 (3.1%)" in plan.reasons["grad_accum_steps"]
    assert "--set train.micro_batch_size=16 makes it exactly 256" in plan.reasons["grad_accum_steps"]
    exact = plan_for("four_4090_no_p2p.json", overrides=["train.micro_batch_size=16"])
    assert (exact.micro_batch_size, exact.grad_accum_steps) == (16, 4)
    assert exact.reasons["grad_accum_steps"].endswith("= 256 per step, the global batch of 256")


def synthetic_step(act_gib: float, ckpt_act_gib: float, parameters: float):
    """A step whose peak is weights + gradients (in the training precision's width) +
    activations per clip: the planner's logic, fast, with numbers chosen to land between
    its options."""

    def step_peak(b, checkpointing, precision):
        width = weight_bytes(precision)
        return int(parameters * 2 * width + 0.2 * 2**30 + b * (ckpt_act_gib if checkpointing else act_gib) * 2**30)

    return step_peak


def test_narrow_links_checkpoint_before_zero2_and_wide_links_the_other_way():
    request = PlanRequest(parameters=int(1.0e9), global_batch=256)
    step = synthetic_step(act_gib=1.0, ckpt_act_gib=0.2, parameters=1.0e9)
    narrow = make_plan(read_rig_file(RIGS / "two_3090_one_on_x4_850w.json"), request, step)
    assert (narrow.zero_stage, narrow.activation_checkpointing) == (1, True)
    assert narrow.micro_batch_size == 8 and narrow.grad_accum_steps == 16  # checkpointing buys 8, not more
    wide = make_plan(
        read_rig_file(RIGS / "four_4090_no_p2p.json"),
        PlanRequest(parameters=int(1.0e9), global_batch=256, gpus=(0, 1)),
        step,
    )
    # a sharding stage instead of recomputation (ZeRO-3 here: in bf16, ZeRO-2's fp32 gradient
    # buffer is as large as ZeRO-1's, so only ZeRO-3 makes room)
    assert (wide.zero_stage, wide.activation_checkpointing) == (3, False)
    assert "every micro-step" in wide.reasons["zero_stage"]


def test_eight_bit_and_offload_come_last():
    rig = read_rig_file(RIGS / "rtx4060_8gb.json")
    # 0.4 B parameters: fp32 weights and gradients (8 bytes each) and AdamW's moments (8) do not
    # fit the 5.2 GiB an 8 GB card leaves; with 8-bit moments (2) they do
    plan = make_plan(rig, PlanRequest(parameters=int(0.4e9), global_batch=64), synthetic_step(0.1, 0.05, 0.4e9))
    assert plan.optimizer == "adamw8bit" and plan.offload_optimizer == "none"
    # the same where the probe found no bitsandbytes (the GPU kit's offline box): never
    # planned, so the run does not fail at its start; offload does the job instead
    bare = dataclasses.replace(rig, software={**(rig.software or {}), "bitsandbytes": None})
    plan = make_plan(bare, PlanRequest(parameters=int(0.4e9), global_batch=64), synthetic_step(0.1, 0.05, 0.4e9))
    assert plan.optimizer == "adamw" and plan.offload_optimizer == "cpu"
    # 0.55 B: even 8-bit states do not fit: offload them (ZeRO-2 with one GPU), with a RAM check
    plan = make_plan(rig, PlanRequest(parameters=int(0.55e9), global_batch=64), synthetic_step(0.1, 0.05, 0.55e9))
    assert plan.offload_optimizer == "cpu" and plan.zero_stage == 2 and plan.activation_checkpointing
    assert "offload" in plan.reasons["zero_stage"]
    # 3 B: nothing fits; the plan says so instead of pretending
    plan = make_plan(rig, PlanRequest(parameters=int(3e9), global_batch=64), synthetic_step(0.1, 0.05, 3e9))
    assert "does_not_fit" in codes(plan) and plan.predicted_peak_gib > plan.usable_gib


def test_rtx2080ti_trains_fp16_and_gtx1080ti_fp32():
    turing = plan_for("rtx2080ti.json")
    assert turing.precision == "fp16" and "loss scaling" in turing.reasons["precision"]
    pascal = plan_for("gtx1080ti.json")
    assert pascal.precision == "fp32"
    assert "no_bf16" in codes(turing) and "no_bf16" in codes(pascal)
    # fp32 weights and activations take more room: a smaller micro-batch on the same 11 GB
    assert pascal.micro_batch_size < turing.micro_batch_size


@pytest.mark.parametrize(
    "capability, precision, why",
    [
        ((8, 9), "bf16", "has native bf16"),
        ((7, 0), "fp16", "fp16 tensor cores but no bf16"),
        ((6, 1), "fp32", "fp16 runs at a small fraction of fp32 speed"),  # GTX 10 series, P40
        ((6, 0), "fp32", "no tensor cores: fp16 matmuls, which torch accumulates in fp32, run at fp32's rate"),  # P100
    ],
)
def test_the_precision_and_its_reason_fit_the_card(capability, precision, why):
    from rigtrain.rig.choices import choose_precision

    chosen, reason = choose_precision(capability)
    assert chosen == precision and why in reason, reason


def test_a100_takes_the_global_batch_in_even_micro_batches():
    # base's 256 clips: over 86 but not 128 fit in bf16 (fp32 weights and residual stream
    # under autocast), so three even micro-batches: 3 x 86 = 258
    plan = plan_for("a100_80gb.json")
    assert (plan.precision, plan.micro_batch_size, plan.grad_accum_steps) == ("bf16", 86, 3)
    largest = int(re.search(r"up to (\d+) fits", plan.reasons["micro_batch_size"]).group(1))
    assert 86 <= largest < 128
    assert "share of 256 with 2 over" in plan.reasons["micro_batch_size"]  # 258 clips, said as such
    assert codes(plan) == set()


def test_mixed_cards_plan_for_the_smallest_and_rig_gpus_chooses():
    plan = plan_for("mixed_3090_3060.json")
    assert "mixed_gpus" in codes(plan) and "RTX 3060" in plan.reasons["micro_batch_size"]
    assert plan.usable_gib < 12
    alone = plan_for("mixed_3090_3060.json", overrides=["rig.gpus=0"])
    assert alone.world_size == 1 and "mixed_gpus" not in codes(alone) and alone.usable_gib > 19
    assert alone.env["CUDA_VISIBLE_DEVICES"] == "0"


def test_cpu_only_box_keeps_the_config_and_shares_its_global_batch():
    config = load_config("demo")
    one = plan_for("cpu_only.json", preset="demo")
    assert one.micro_batch_size == config.train.micro_batch_size
    # the preset's ZeRO-1 has nothing to shard in one process (as on one GPU); a stage the
    # user sets, or the optimizer's offload (ZeRO-1 and up), is kept
    assert (config.train.zero_stage, one.zero_stage) == (1, 0) and "nothing to shard" in one.reasons["zero_stage"]
    for overrides, stage in ((["train.zero_stage=1"], 1), (["train.offload_optimizer=cpu"], 1)):
        assert plan_for("cpu_only.json", preset="demo", overrides=overrides).zero_stage == stage, overrides
    # a choice the user made is said to be theirs, as the GPU plan says it; the rest is the config's
    mine = plan_for(
        "cpu_only.json", preset="demo", overrides=["train.zero_stage=1", "model.activation_checkpointing=true"]
    )
    assert mine.reasons["zero_stage"] == mine.reasons["activation_checkpointing"] == "set by the user"
    assert mine.reasons["optimizer"] == "no GPU to plan for: the config's value"
    plan = plan_for("cpu_only.json", preset="demo", overrides=["train.nproc=2", "data.workers=-1"])
    assert (plan.device, plan.world_size, plan.precision) == ("cpu", 2, "fp32")
    # two processes train the same global batch in halves, as two GPUs would (not twice the batch)
    assert plan.micro_batch_size * plan.grad_accum_steps * 2 == config.train.micro_batch_size
    assert "shared by 2 processes" in plan.reasons["micro_batch_size"]
    assert plan.zero_stage == config.train.zero_stage
    assert plan.env["OMP_NUM_THREADS"] == "8" and plan.dataloader_workers == 7
    # base's global batch of 256 over 4 processes at accumulation 2: 32 x 2 each
    four = plan_for("cpu_only.json", preset="base", overrides=["train.nproc=4", "train.grad_accum_steps=2"])
    assert (four.micro_batch_size, four.grad_accum_steps) == (32, 2)
    five = plan_for("cpu_only.json", preset="demo", overrides=["train.nproc=5"])  # 48 does not split in 5
    assert five.micro_batch_size == 10 and "50 in all" in five.reasons["micro_batch_size"]
    # a micro-batch the user sets is kept, and then the global batch grows with the processes
    mine = plan_for("cpu_only.json", preset="demo", overrides=["train.nproc=2", "train.micro_batch_size=48"])
    assert (mine.micro_batch_size, mine.grad_accum_steps, mine.world_size) == (48, 1, 2)


def test_a_hostfile_shares_the_global_batch_over_every_machine():
    # base's 256 clips over two A100 machines: 128 per process, two micro-batches each, where
    # one machine takes three (test_a100_takes_the_global_batch_in_even_micro_batches)
    two = plan_for("a100_80gb.json", hosts=(1, 1))
    assert (two.world_size, two.micro_batch_size, two.grad_accum_steps) == (2, 64, 2)
    assert "2 machine(s), 2 process(es)" in two.reasons["world_size"]
    # NCCL between the machines says what goes wrong, through pdsh (no relay into this train.log)
    assert two.env["NCCL_DEBUG"] == "WARN" and "train.log" not in two.reasons["env.NCCL_DEBUG"]
    # the step counts every machine's processes, not this machine's GPU alone
    assert two.reasons["grad_accum_steps"] == "2 x 64 clips x 2 GPU(s) = 256 per step, the global batch of 256"
    three = plan_for("a100_80gb.json", hosts=(1, 1, 1))  # 256 cannot be shared by 3 equally
    assert three.micro_batch_size * three.grad_accum_steps == 86
    assert three.reasons["grad_accum_steps"].endswith(
        "2 over the global batch of 256 (0.8%), which does not divide over 3 GPUs"
    )
    # on CPUs the slots say how many processes each machine runs (not train.nproc), and a
    # machine's cores are shared by its own processes only
    cpus = plan_for("cpu_only.json", preset="demo", overrides=["train.nproc=4"], hosts=(2, 2, 2))
    assert cpus.world_size == 6 and cpus.env["OMP_NUM_THREADS"] == "8"


def test_what_the_user_sets_wins_and_the_plan_says_so():
    plan = plan_for("rtx2080ti.json", overrides=["train.micro_batch_size=4", "train.zero_stage=0"])
    assert plan.micro_batch_size == 4 and plan.from_user == ["train.micro_batch_size", "train.zero_stage"]
    assert "set by the user" in plan.reasons["micro_batch_size"]
    assert plan.grad_accum_steps == 64  # 256 / 4
    assert plan_for("a100_80gb.json", overrides=["train.precision=fp32"]).precision == "fp32"


def test_a_stage_the_user_sets_still_tries_the_cheaper_settings_first():
    """On narrow links ZeRO-2 comes only after checkpointing in the preference list; a user
    who sets it still gets checkpointing off when the micro-batch fits without it."""
    plan = plan_for("two_3090_one_on_x4_850w.json", overrides=["train.zero_stage=2"])
    assert plan.zero_stage == 2 and not plan.activation_checkpointing
    assert plan.micro_batch_size > 8 and plan.predicted_peak_gib <= plan.usable_gib
    assert "set by the user" in plan.reasons["zero_stage"]
    # cards where nothing fits: at ZeRO-1 the plan ends at offload; at ZeRO-0 (not in the
    # two-GPU list at all) never, since DeepSpeed offloads from ZeRO-1 up
    rig = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    rig["gpus"] = [dict(gpu, memory_gib=3.0) for gpu in rig["gpus"]]
    small_cards = {}
    for stage in (0, 1):
        config = load_config("base", overrides=[f"train.zero_stage={stage}"])
        small_cards[stage] = plan_run(config, rig_from_dict(rig), user_keys={"train.zero_stage"})
    assert small_cards[1].offload_optimizer == "cpu" and "does_not_fit" in codes(small_cards[1])
    assert small_cards[0].zero_stage == 0 and small_cards[0].offload_optimizer == "none"
    assert "does_not_fit" in codes(small_cards[0])


def test_a_micro_batch_stopped_at_a_useful_size_does_not_claim_the_next_would_not_fit():
    """base on an 8 GB card: checkpointing is needed for 8 clips, and the search stops at 8
    though more would fit; the reason says so rather than '9 would not fit'."""
    plan = plan_for("rtx4060_8gb.json")
    assert plan.activation_checkpointing and plan.micro_batch_size == 8
    reason = plan.reasons["micro_batch_size"]
    assert "would not fit" not in reason and "useful size" in reason and "activation checkpointing" in reason
    # on a 3.5 GiB card nothing reaches 8 even with offload: there it is the largest that fits
    rig = json.loads((RIGS / "rtx4060_8gb.json").read_text())
    rig["gpus"][0]["memory_gib"] = 3.5
    small_card = plan_run(load_config("base"), rig_from_dict(rig), user_keys=set())
    assert small_card.offload_optimizer == "cpu" and 1 < small_card.micro_batch_size < 8
    assert f"{small_card.micro_batch_size + 1} would not fit" in small_card.reasons["micro_batch_size"]


def test_a_card_with_less_free_than_the_room_beside_the_allocator_says_so_and_is_not_capped_below_zero():
    """Another process holds most of GPU 1 (1.5 GiB free of 24; 2.3 GiB are kept for the
    CUDA context's 1.7 and NCCL's 0.6): nothing is left to train in. The plan says which card and
    what to do, and keeps no negative cap (torch's allocator refuses a negative fraction)."""
    from rigtrain.rig.report import format_report

    rig = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    rig["gpus"][1]["memory_free_gib"] = 1.5
    plan = plan_run(load_config("demo"), rig_from_dict(rig), user_keys=set())
    assert plan.usable_gib == 0 and plan.memory["allocator_cap_gib"] == 0
    [warning] = [w for w in plan.warnings if w.code == "does_not_fit"]
    assert warning.gpu == 1 and warning.message.startswith("GPU 1 (NVIDIA GeForce RTX 3090) has 1.5 GiB free")
    assert "1.7 for the CUDA context" in warning.message and "0.6 for NCCL" in warning.message
    assert "free the card" in warning.message and "CUDA_VISIBLE_DEVICES= rigtrain train" in warning.message
    assert "allocator is left uncapped" in format_report(rig_from_dict(rig), plan)
    # with room on the card, the other advice: a smaller model
    rig["gpus"][1]["memory_free_gib"] = 2.7  # 0.4 GiB for the allocator: base needs more
    plan = plan_run(load_config("base"), rig_from_dict(rig), user_keys=set())
    [warning] = [w for w in plan.warnings if w.code == "does_not_fit"]
    assert plan.memory["allocator_cap_gib"] > 0 and "choose a smaller preset or model" in warning.message


def test_more_memory_never_gives_a_smaller_micro_batch():
    """On the real `small` model (measured steps), from a card where little fits to one
    where the whole batch does, through the memory sizes where checkpointing switches on
    and off."""
    base = json.loads((RIGS / "rtx4060_8gb.json").read_text())
    config = load_config("small", overrides=["train.global_batch_size=256"])
    previous, chosen = 0, []
    for memory in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 24.0):
        rig = dict(base, gpus=[dict(base["gpus"][0], memory_gib=memory)])
        plan = plan_run(config, rig_from_dict(rig), user_keys=set())
        size = plan.micro_batch_size if plan.predicted_peak_gib <= plan.usable_gib else 0
        chosen.append((memory, size, plan.activation_checkpointing))
        assert size >= previous, f"{memory} GiB gave micro-batch {size} after {previous}: {chosen}"
        previous = size
    assert previous == 256 and any(c for _, _, c in chosen) and not chosen[-1][2]


def test_search_finds_the_largest_fitting_micro_batch_with_few_measurements():
    """Against an exhaustive scan of a step whose peak is not affine (a jump where another
    buffer appears), the search returns the same size and measures a handful of steps."""
    from rigtrain.rig.budget import MicroBatchSearch

    def bytes_at(b):
        return 1000 + 37 * b + (400 if b > 50 else 0) + (b * b // 40)

    def peak(b, checkpointing, precision):
        calls.append(b)
        return bytes_at(b)

    for budget in (900, 1100, 2500, 3300, 4000, 9000, 20000):
        calls = []
        found = MicroBatchSearch(peak, "bf16").largest(False, budget, 256)
        expected = max([b for b in range(1, 257) if bytes_at(b) <= budget], default=0)
        assert found == expected, budget
        assert len(set(calls)) <= 10, (budget, len(set(calls)))


def test_hardware_warnings_judge_link_generation_only_under_load():
    def rig(utilization):
        return rig_from_dict(
            {
                "gpus": [
                    {
                        "name": "NVIDIA GeForce RTX 3090",
                        "memory_gib": 24.0,
                        "compute_capability": [8, 6],
                        "utilization_pct": utilization,
                        "pcie": {"gen": 1, "width": 16, "max_gen": 4, "max_width": 16},
                    }
                ]
            }
        )

    config = load_config("small")
    assert "pcie_downtrained" not in codes(plan_run(config, rig(0), user_keys=set()))  # idle: Gen1 is normal
    busy = plan_run(config, rig(95), user_keys=set())
    assert "pcie_downtrained" in codes(busy) and "Gen1 of Gen4 under load" in busy.warnings[0].message


def test_psu_watts_from_the_command_line():
    plan = plan_for("a100_80gb.json", psu_w=400)
    assert "psu_headroom" in codes(plan)
    psu = next(w for w in plan.warnings if w.code == "psu_headroom")
    assert "3090" not in psu.message and "before and after" in psu.message  # one card's figure is not another's
    assert "psu_headroom" not in codes(plan_for("a100_80gb.json", psu_w=2000))


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r["gpus"][0].update(memory_gib=-8), "gpus[0].memory_gib"),
        (lambda r: r["gpus"][0]["pcie"].update(width=0), "gpus[0].pcie.width"),
        (lambda r: r["gpus"][1]["pcie"].update(width=3), "gpus[1].pcie.width must be a lane count"),
        (lambda r: r["gpus"][0]["pcie"].update(gen=9, max_gen=9), "gpus[0].pcie.gen must be a PCIe generation"),
        (lambda r: r["gpus"][0].update(colour="green"), "gpus[0].colour"),
        (lambda r: r.update(ram=64), "ram"),
        (lambda r: r["gpus"][0].update(compute_capability="8.6"), "gpus[0].compute_capability"),
        (lambda r: r["gpus"][0].update(p2p=[True]), "gpus[0].p2p"),
        (lambda r: r.update(ram_gib=0), "ram_gib must be more than 0"),
        (lambda r: r.update(ram_gib=16, ram_free_gib=60), "ram_free_gib (60) is more than ram_gib (16)"),
        (lambda r: r["cpu"].update(cores=16, threads=8), "cpu.threads (8) is fewer than cpu.cores (16)"),
    ],
)
def test_invalid_rig_files_name_the_field(tmp_path, change, field):
    rig = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    change(rig)
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(rig))
    with pytest.raises(UserError, match=re.escape(field)):
        read_rig_file(path)
    result = run_cli("rig", "--rig", str(path))
    assert result.returncode == 2 and field in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_rig_file_that_is_not_an_object_says_so(tmp_path):
    path = tmp_path / "rig.json"
    path.write_text("[1, 2]")
    result = run_cli("rig", "--rig", str(path))
    assert result.returncode == 2 and "rig.json: the top level must be an object with gpus" in result.stderr


def test_null_in_a_rig_file_is_unknown_as_a_field_left_out(tmp_path):
    """What NVML cannot say (PCIe, power and P2P under WSL2) a hand-written rig file may give
    as null: planned as if left out, not refused; a required field's null is still missing."""
    rig = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    for gpu in rig["gpus"]:
        gpu.update(pcie=None, power=None, p2p=None, nvlink=None, temperature_c=None, memory_free_gib=None)
    rig["psu_w"] = None
    left_out = json.loads(json.dumps(rig))
    for gpu in left_out["gpus"]:
        for key in [k for k, v in gpu.items() if v is None]:
            del gpu[key]
    del left_out["psu_w"]
    (tmp_path / "nulls.json").write_text(json.dumps(rig))
    assert read_rig_file(tmp_path / "nulls.json") == rig_from_dict(left_out, str(tmp_path / "nulls.json"))
    result = run_cli("rig", "--rig", str(tmp_path / "nulls.json"), "--preset", "small", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["plan"]["precision"] == "bf16"
    rig["gpus"][0]["memory_gib"] = None
    (tmp_path / "nulls.json").write_text(json.dumps(rig))
    with pytest.raises(UserError, match=r"gpus\[0\]\.memory_gib is missing"):
        read_rig_file(tmp_path / "nulls.json")


def test_rig_command_json_round_trips_as_a_rig_file(tmp_path):
    result = run_cli("rig", "--rig", str(RIGS / "two_3090_one_on_x4_850w.json"), "--preset", "small", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"rig", "plan", "warnings"}
    for key in (
        "precision",
        "micro_batch_size",
        "grad_accum_steps",
        "activation_checkpointing",
        "zero_stage",
        "offload_optimizer",
        "optimizer",
        "dataloader_workers",
        "env",
        "predicted_peak_gib",
        "reasons",
    ):
        assert key in report["plan"], key
    assert all(set(w) == {"code", "gpu", "message"} for w in report["warnings"])
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(report["rig"]))
    again = json.loads(run_cli("rig", "--rig", str(saved), "--preset", "small", "--json").stdout)
    assert again["plan"]["micro_batch_size"] == report["plan"]["micro_batch_size"]
    assert [w["code"] for w in again["warnings"]] == [w["code"] for w in report["warnings"]]
    text = run_cli("rig", "--rig", str(RIGS / "two_3090_one_on_x4_850w.json"), "--psu-watts", "1600")
    assert "[pcie_narrow]" in text.stdout and "PSU 1600 W" in text.stdout and "P2P" in text.stdout


def test_probe_this_machine_is_a_cpu_rig():
    result = run_cli("rig", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert report["rig"]["gpus"] == [] and report["plan"]["device"] == "cpu"
    assert report["rig"]["cpu"]["threads"] >= 1 and report["rig"]["ram_gib"] > 0


PLAN_WITHOUT_TORCH = """
import json, sys
from rigtrain.config import load_config
from rigtrain.train.planning import machine_rig, plan_run
rig = machine_rig()
probed = "torch" in sys.modules
plan = plan_run(load_config("demo"), rig, user_keys=set())
print(json.dumps({"after_probe": probed, "after_plan": "torch" in sys.modules, "software": rig.software,
                  "micro": plan.micro_batch_size}))
"""


def test_this_machine_is_probed_and_planned_without_importing_torch():
    """`rigtrain train` and `tune` start the processes that import torch once the plan is
    made; the planning process itself need not import it (2-3 s) when the plan's steps are
    in the shipped table: the probe reads torch's version and CUDA build from its files
    (torch/version.py), as torch reports them, and a CPU build of torch is not asked for GPUs."""
    if torch.cuda.is_available():
        pytest.skip("a GPU plan's steps are not all in the shipped table")
    result = subprocess.run([sys.executable, "-c", PLAN_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert not found["after_probe"]  # a CUDA build of torch too: without the driver there is nothing to ask it
    assert found["software"]["torch"] == torch.__version__ and found["software"]["torch_cuda"] == torch.version.cuda
    assert found["micro"] == plan_run(load_config("demo"), machine_rig(), user_keys=set()).micro_batch_size
    from rigtrain.train import step_peaks

    if json.loads(step_peaks.SHIPPED.read_text())["torch"] == torch.__version__:
        assert not found["after_plan"]  # the demo's steps are in the shipped table, measured with this torch


def test_torch_is_asked_for_gpus_only_where_the_cuda_driver_loads(monkeypatch):
    """A container without NVML's library but with CUDA: torch finds the GPUs. Without the
    driver's library (PyPI's default torch on a CPU machine) it is not imported to say so."""
    from rigtrain.rig import probe as probe_module
    from rigtrain.train import planning

    no_nvml = Rig(gpus=(), software={"torch": "2.11.0+cu130", "torch_cuda": "13.0"})
    monkeypatch.setattr(probe_module, "probe", lambda paths: no_nvml)
    found = (Gpu(name="NVIDIA H200", memory_gib=139.8, memory_free_gib=139.2, compute_capability=(9, 0)),)
    asked = []
    monkeypatch.setattr(planning, "_gpus_from_cuda", lambda: asked.append(1) or found)
    monkeypatch.setattr(planning, "_cuda_driver_loads", lambda: False)
    assert planning.machine_rig().gpus == () and asked == []
    monkeypatch.setattr(planning, "_cuda_driver_loads", lambda: True)
    assert planning.machine_rig().gpus == found and asked == [1]


# -- memory ------------------------------------------------------------------------------------


def test_fake_peak_equals_the_same_step_run_for_real_and_memtracker():
    """FakeTensorMode changes nothing in the accounting: the same tiny step run for real on
    the CPU (same tracker) peaks at the same bytes, and MemTracker agrees."""
    from torch.distributed._tools.mem_tracker import MemTracker

    config = load_config("demo")
    build = train_step_builder(config.model, config.data, micro_batch=4, checkpointing=False, precision="fp32")
    fake = fake_step_peak_bytes(build)

    from rigtrain.model import build_model
    from rigtrain.train.flops import meta_batch

    torch.manual_seed(0)
    model = build_model(config.model, config.data)
    batch = {
        k: torch.zeros(v.shape, dtype=v.dtype) if k != "text_len" else torch.full(v.shape, config.data.max_text_bytes)
        for k, v in meta_batch(config.data, 4).items()
    }
    batch["segment_len"][:, 0] = 20  # one narration segment per clip, as the fake step counts
    tracker = PeakBytes([*model.parameters(), *model.buffers()])
    with tracker:
        model(batch)["loss"].backward()
    assert fake == tracker.peak
    model.zero_grad(set_to_none=True)
    with MemTracker() as mem:
        model(batch)["loss"].backward()
    assert abs(list(mem.get_tracker_snapshot("peak").values())[0]["Total"] - fake) <= 0.01 * fake


def test_memory_estimate_matches_the_saved_tensor_bytes_of_a_real_cpu_run():
    """What autograd keeps for backward (saved-tensor hooks on a real CPU forward) is what
    the fake measurement says is alive at the end of the forward, less the parameters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    )
    x = torch.randn(32, 64)
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    real = sum(saved.values())

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_model = torch.nn.Sequential(
            *[
                torch.nn.Linear(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else torch.nn.GELU()
                for m in model
            ]
        )
        fx = torch.empty(32, 64)
        tracker = PeakBytes([*fake_model.parameters(), fx])
        with tracker:
            out = fake_model(fx).sum()
        resident = sum(p.nbytes for p in fake_model.parameters()) + fx.nbytes
        alive = tracker.live - resident - out.nbytes
    assert loss.requires_grad
    assert abs(alive - (real - x.nbytes)) <= 0.02 * real


# -- the probe -------------------------------------------------------------------------------


def fake_nvml(gpus: int = 2):
    """A stand-in for pynvml with two RTX 3090s, the second on x4 and throttling."""
    nvml = types.SimpleNamespace()

    class NVMLError(Exception):
        pass

    nvml.NVMLError = NVMLError
    for name, value in dict(
        NVML_PCIE_UTIL_RX_BYTES=1,
        NVML_PCIE_UTIL_TX_BYTES=0,
        NVML_CLOCK_SM=1,
        NVML_CLOCK_MEM=2,
        NVML_TEMPERATURE_GPU=0,
        NVML_P2P_CAPS_INDEX_READ=0,
        NVML_P2P_CAPS_INDEX_NVLINK=2,
        NVML_P2P_STATUS_OK=0,
        nvmlClocksEventReasonSwThermalSlowdown=0x20,
        nvmlClocksEventReasonSwPowerCap=0x4,
        nvmlClocksEventReasonHwSlowdown=0x8,
        nvmlClocksEventReasonHwThermalSlowdown=0x40,
        nvmlClocksEventReasonHwPowerBrakeSlowdown=0x80,
    ).items():
        setattr(nvml, name, value)
    memory = types.SimpleNamespace(total=24 * 2**30, free=23 * 2**30, used=2**30)
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: gpus
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nvml.nvmlDeviceGetName = lambda h: b"NVIDIA GeForce RTX 3090"
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-{h[1]}c9a4e2f-71b3-4d2a-9e0f-5b6c7d8e9f0{h[1]}"
    nvml.nvmlDeviceGetMemoryInfo = lambda h: memory
    nvml.nvmlDeviceGetCudaComputeCapability = lambda h: (8, 6)
    nvml.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 4
    nvml.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16 if h[1] == 0 else 4
    nvml.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 4
    nvml.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    nvml.nvmlDeviceGetPcieThroughput = lambda h, kind: 1500
    nvml.nvmlDeviceGetPowerManagementLimit = lambda h: 350_000
    nvml.nvmlDeviceGetPowerManagementDefaultLimit = lambda h: 350_000
    nvml.nvmlDeviceGetPowerManagementLimitConstraints = lambda h: (100_000, 400_000)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 31_500
    nvml.nvmlDeviceGetDisplayActive = lambda h: 1 if h[1] == 0 else 0  # the desktop on GPU 0
    running = types.SimpleNamespace  # GPU 1: this process (left out), a notebook and one NVML may not measure
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: (
        [running(pid=os.getpid(), usedGpuMemory=2**30), running(pid=os.getppid(), usedGpuMemory=int(17.5 * 2**30))]
        + [running(pid=2**22 + 7, usedGpuMemory=None)]
        if h[1] == 1
        else []
    )

    def unsupported(*args):
        raise NVMLError("Not Supported")

    nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x20 if h[1] == 1 else 0x1  # 0x1: idle, not throttling
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = unsupported
    nvml.nvmlDeviceGetClockInfo = lambda h, kind: 210
    nvml.nvmlDeviceGetMaxClockInfo = lambda h, kind: 2100
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=3, memory=1)
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 41 if h[1] == 0 else 88
    nvml.nvmlDeviceGetP2PStatus = lambda a, b, cap: 0 if cap == 0 else 1  # P2P over PCIe, no NVLink
    nvml.nvmlSystemGetDriverVersion = lambda: "560.35.03"
    nvml.nvmlSystemGetCudaDriverVersion = unsupported
    return nvml


def test_probe_reads_nvml(monkeypatch):
    from rigtrain.rig.probe import probe

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    rig = probe(["."])
    assert len(rig.gpus) == 2
    first, second = rig.gpus
    assert (first.name, first.memory_gib, first.memory_free_gib, first.compute_capability) == (
        "NVIDIA GeForce RTX 3090",
        24.0,
        23.0,
        (8, 6),
    )
    assert (second.pcie.width, second.pcie.max_width, second.pcie.rx_mb_s) == (4, 16, 1.5)
    assert (first.power.limit_w, first.power.max_limit_w, first.power.draw_w) == (350, 400, 31.5)
    assert first.throttle_reasons == () and second.throttle_reasons == ("sw_thermal",)
    assert first.p2p == (True, True) and first.nvlink == (False, False)
    assert (first.uuid, second.uuid) == (
        "GPU-0c9a4e2f-71b3-4d2a-9e0f-5b6c7d8e9f00",
        "GPU-1c9a4e2f-71b3-4d2a-9e0f-5b6c7d8e9f01",
    )
    assert rig.software["driver"] == "560.35.03" and "driver_cuda" not in rig.software  # unsupported: left out
    assert (first.display_active, second.display_active) == (True, False)
    assert first.processes == () and [(p.pid, p.used_gib) for p in second.processes] == [
        (os.getppid(), 17.5),
        (2**22 + 7, None),
    ]
    parent = " ".join(w.decode() for w in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if w)
    assert second.processes[0].name == (parent[:77] + "..." if len(parent) > 80 else parent)  # its command line
    assert second.processes[1].name is None  # a PID this machine does not show (another namespace)
    plan = plan_run(load_config("small"), rig, user_keys=set())
    assert {"pcie_narrow", "pcie_downtrained", "throttling", "display_gpu", "gpu_in_use"} <= codes(plan)
    (in_use,) = [w for w in plan.warnings if w.code == "gpu_in_use"]
    assert in_use.gpu == 1 and in_use.message.startswith("GPU 1 (NVIDIA GeForce RTX 3090) is in use by 2 other")
    assert f"PID {os.getppid()} (" in in_use.message and "holding 17.5 GiB; PID 4194311." in in_use.message
    # and the probe's rig is a valid rig file
    again = rig_from_dict(json.loads(json.dumps(rig.to_dict())))
    assert again.gpus[1].pcie.width == 4 and again.gpus[1].uuid == second.uuid
    assert (again.gpus[0].display_active, again.gpus[1].display_active) == (True, False)
    assert again.gpus[1].processes == second.processes

    # a virtual GPU's link that no slot has (a sentinel width, generation 0) is left unknown,
    # so the probe's rig file still reads back
    nvml = fake_nvml()
    nvml.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 0xFFFFFFFF if h[1] == 1 else 16
    nvml.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 0
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    odd = probe(["."])
    assert odd.gpus[1].pcie is None and odd.gpus[0].pcie.width == 16 and odd.gpus[0].pcie.max_gen is None
    assert rig_from_dict(json.loads(json.dumps(odd.to_dict()))).gpus[1].pcie is None

    # under WSL2 NVML's process list holds Windows' programs (the desktop's), by Windows' PIDs
    # that name other processes here, without their memory: not read, and no gpu_in_use
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    real_uname = os.uname()
    wsl = type(real_uname)((*real_uname[:2], "6.6.87.2-microsoft-standard-WSL2", *real_uname[3:]))
    monkeypatch.setattr(os, "uname", lambda: wsl)
    under_wsl = probe(["."])
    assert under_wsl.wsl and all(g.processes is None for g in under_wsl.gpus)
    assert "gpu_in_use" not in codes(plan_run(load_config("small"), under_wsl, user_keys=set()))


def test_train_with_a_rig_file_of_another_machine_is_refused(tmp_path):
    if torch.cuda.is_available() and torch.cuda.device_count() == 2:
        pytest.skip("this machine has the two GPUs the file describes")
    result = run_cli(
        "train", "--rig", str(RIGS / "two_3090_one_on_x4_850w.json"), "--steps", "1", "--out", str(tmp_path / "run")
    )
    assert result.returncode == 2 and "describes 2 GPU(s)" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_plan_warns_of_a_cpu_only_torch_on_a_machine_with_gpus():
    rig = json.loads((RIGS / "h200.json").read_text())
    assert "torch_cpu_build" not in codes(plan_run(load_config("small"), rig_from_dict(rig), user_keys=set()))
    rig["software"].update(torch="2.13.0+cpu", torch_cuda=None)
    plan = plan_run(load_config("small"), rig_from_dict(rig), user_keys=set())
    (warning,) = [w for w in plan.warnings if w.code == "torch_cpu_build"]
    assert "torch 2.13.0+cpu is a CPU-only build" in warning.message and "setup/install.sh" in warning.message
    rig["gpus"] = []  # a CPU machine: the CPU wheel is the right one
    assert "torch_cpu_build" not in codes(plan_run(load_config("demo"), rig_from_dict(rig), user_keys=set()))


def test_the_plan_warns_of_a_torch_built_for_a_newer_cuda_than_the_driver_runs():
    """A home rig's driver lags: torch built for CUDA 13 cannot start on a driver of CUDA 12.6
    (NVML's figure), while any 12.x build runs on it (CUDA's minor-version compatibility)."""
    rig = json.loads((RIGS / "h200.json").read_text())
    rig["software"].update(torch="2.13.0", torch_cuda="13.0", driver_cuda="12.6")
    plan = plan_run(load_config("small"), rig_from_dict(rig), user_keys=set())
    (warning,) = [w for w in plan.warnings if w.code == "torch_newer_than_driver"]
    assert "torch 2.13.0 is built for CUDA 13.0, but the driver runs CUDA 12.6" in warning.message
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash setup/install.sh" in warning.message
    for torch_cuda, driver_cuda in (("12.8", "12.6"), ("13.0", "13.0"), ("12.8", None), ("12.8", "garbled")):
        rig["software"].update(torch_cuda=torch_cuda, driver_cuda=driver_cuda)
        plan = plan_run(load_config("small"), rig_from_dict(rig), user_keys=set())
        assert "torch_newer_than_driver" not in codes(plan), (torch_cuda, driver_cuda)


@pytest.mark.parametrize(
    "driver_cuda, advice",
    [
        # Ubuntu 22.04's 535 driver: torch has no cu122 build; its cu126 runs on any 12.x driver
        (
            "12.2",
            "build for CUDA 12.x, which this driver runs: "
            "`TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash setup/install.sh`",
        ),
        ("11.8", "update the NVIDIA driver: torch 2.13.0 has no build for CUDA 11.x"),
    ],
)
def test_the_build_advised_for_an_older_driver_is_one_pytorch_ships(driver_cuda, advice):
    rig = json.loads((RIGS / "h200.json").read_text())
    rig["software"].update(torch="2.13.0", torch_cuda="13.0", driver_cuda=driver_cuda)
    (warning,) = [
        w
        for w in plan_run(load_config("small"), rig_from_dict(rig), user_keys=set()).warnings
        if w.code == "torch_newer_than_driver"
    ]
    assert advice in warning.message
    assert f"cu{driver_cuda.replace('.', '')}" not in warning.message


# torch.cuda.get_arch_list() of torch 2.13's Linux builds (pytorch.org's RELEASE.md matrix)
ARCHS_CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
ARCHS_CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize(
    "arch_list, capability, runs",
    [
        (ARCHS_CU130, (8, 9), True),  # an RTX 4090 runs sm_86's machine code
        (ARCHS_CU130, (12, 1), True),  # sm_120's, and compute_120's PTX
        (ARCHS_CU130, (6, 1), False),  # GTX 1080 Ti, Tesla P40
        (ARCHS_CU130, (7, 0), False),  # V100, Titan V
        (ARCHS_CU126, (6, 1), True),  # sm_60's machine code runs on 6.1
        (ARCHS_CU126, (12, 0), False),  # RTX 5090: no sm_120, no PTX
        (["sm_86"], (8, 0), False),  # machine code of a higher minor does not run
        (["compute_90"], (12, 0), True),  # PTX compiles for any later card
        (["sm_90a", "garbled", "sm_"], (9, 0), False),  # names it cannot read count for nothing
    ],
)
def test_which_cards_a_torch_build_has_kernels_for(arch_list, capability, runs):
    from rigtrain.rig.torch_builds import kernels_in

    assert kernels_in(arch_list, capability) is runs


def pascal_beside_a_3090(torch_version="2.13.0+cu130", torch_cuda="13.0", driver_cuda="13.0") -> dict:
    """Two cards of a home rig, the second a GTX 1080 Ti, with PyPI's torch as `software`."""
    rig = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    rig["gpus"][1].update(name="NVIDIA GeForce GTX 1080 Ti", compute_capability=[6, 1], memory_gib=11.0)
    rig["gpus"][1]["memory_free_gib"] = 11.0
    rig["software"] = {"torch": torch_version, "torch_cuda": torch_cuda, "driver_cuda": driver_cuda}
    return rig


def rtx5090_warnings(code: str, **software: str) -> list:
    """The plan's warnings of `code` for one RTX 5090 (Blackwell, 12.0) with `software`."""
    rig = json.loads((RIGS / "h200.json").read_text())
    rig["gpus"][0].update(name="NVIDIA GeForce RTX 5090", compute_capability=[12, 0])
    rig["software"].update(software)
    return [w for w in plan_run(load_config("small"), rig_from_dict(rig), user_keys=set()).warnings if w.code == code]


def test_the_plan_warns_of_a_card_that_the_installed_torch_has_no_kernels_for():
    """PyPI's torch is a CUDA 13 build since 2.11, and CUDA 13 compiles nothing for Pascal or
    Volta: on a GTX 1080 Ti it would fail at the first kernel. The warning names the card and
    the build that has its kernels, and the cards it can train on meanwhile."""
    rig = pascal_beside_a_3090()
    plan = plan_run(load_config("small"), rig_from_dict(rig), user_keys=set())
    (warning,) = [w for w in plan.warnings if w.code == "torch_lacks_kernels"]
    assert warning.gpu == 1
    assert warning.message.startswith(
        "GPU 1 (NVIDIA GeForce GTX 1080 Ti, compute capability 6.1): torch 2.13.0+cu130, built for CUDA 13.0, "
        "has no kernels for it"
    )
    assert "`TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash setup/install.sh`" in warning.message
    assert warning.message.endswith("or train on the others: `--set rig.gpus=0`")
    one = plan_run(load_config("small", overrides=["rig.gpus=0"]), rig_from_dict(rig), user_keys={"rig.gpus"})
    assert "torch_lacks_kernels" not in codes(one)  # the 3090 alone
    rig["software"].update(torch="2.13.0+cu126", torch_cuda="12.6")
    assert "torch_lacks_kernels" not in codes(plan_run(load_config("small"), rig_from_dict(rig), user_keys=set()))
    rig["software"]["torch"] = None  # a rig file that leaves it unknown: nothing to judge
    assert not {c for c in codes(plan_run(load_config("small"), rig_from_dict(rig), user_keys=set())) if "torch" in c}
    # but a Kepler card (a Tesla K80, 3.7) is older than every build: said whatever is installed
    rig["gpus"][1].update(name="Tesla K80", compute_capability=[3, 7])
    (kepler,) = [
        w for w in plan_run(load_config("small"), rig_from_dict(rig), user_keys=set()).warnings if "torch" in w.code
    ]
    assert kepler.code == "torch_lacks_kernels" and kepler.gpu == 1
    assert kepler.message.startswith("GPU 1 (Tesla K80, compute capability 3.7): no build of torch has kernels for it")

    # an RTX 5090 under the cu126 build on a CUDA 12.8 driver: that build lacks Blackwell,
    # and the one that has it needs a newer driver first
    (warning,) = rtx5090_warnings("torch_lacks_kernels", torch="2.13.0+cu126", torch_cuda="12.6", driver_cuda="12.8")
    assert "update the NVIDIA driver (it runs CUDA 12.8) to the 580 series or later, then install" in warning.message
    assert "whl/cu130 bash setup/install.sh`" in warning.message and "--set rig.gpus" not in warning.message


def test_no_torch_build_advised_for_an_old_driver_lacks_the_cards_kernels():
    """torch's only build for a CUDA 12 driver is cu126, which has nothing for Blackwell: an
    RTX 5090 on a 12.8 driver under PyPI's CUDA 13 torch needs a newer driver, not cu126."""
    (warning,) = rtx5090_warnings(
        "torch_newer_than_driver", torch="2.13.0+cu130", torch_cuda="13.0", driver_cuda="12.8"
    )
    assert (
        "update the NVIDIA driver to the 580 series or later: torch's build for CUDA 12.x (cu126) has no kernels"
        in warning.message
    )
    assert "TORCH_INDEX_URL" not in warning.message


@pytest.mark.parametrize(
    "arch_list, wanted, expected",
    [
        (
            ARCHS_CU130,
            (),
            "GPU 1 (NVIDIA GeForce GTX 1080 Ti) has compute capability 6.1, and torch 2.13.0+cu130 has no kernels for "
            "it (built for sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 compute_120); install torch's build for CUDA 12.6",
        ),
        (ARCHS_CU130, (0,), None),  # the 3090 alone, as the line says
        (ARCHS_CU126, (), None),
        (["sm_90"], (0,), "install a build of torch 2.13.0 with kernels for compute capability 8.6"),
    ],
)
def test_train_refuses_a_card_that_the_installed_torch_has_no_kernels_for(monkeypatch, arch_list, wanted, expected):
    """What torch itself says it was built for decides, before any process starts: a rank
    would otherwise die at its first kernel with "no kernel image is available"."""
    from rigtrain.train.planning import check_torch_trains_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu130")
    rig = rig_from_dict(pascal_beside_a_3090())
    if expected is None:
        check_torch_trains_here(rig, None, wanted)
        return
    with pytest.raises(UserError) as err:
        check_torch_trains_here(rig, None, wanted)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("capability, device", [((6, 1), "cpu"), ((8, 6), "cuda")])
def test_eval_uses_the_gpu_only_where_torch_has_kernels_for_it(monkeypatch, capsys, capability, device):
    from rigtrain.train.eval_command import evaluation_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ARCHS_CU130)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA GeForce GTX 1080 Ti")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert evaluation_device().type == device
    said = capsys.readouterr().err
    if device == "cpu":
        assert (
            "no kernels for GPU 0 (NVIDIA GeForce GTX 1080 Ti, compute capability 6.1); evaluating on the CPU" in said
        )
    else:
        assert said == ""


def test_train_on_a_card_without_kernels_stops_before_any_process_starts(tmp_path):
    """The whole command, on a machine whose CUDA torch (a CUDA 13 build, faked in by a
    sitecustomize: this machine has no GPU) sees the two cards of the rig file: one line,
    exit 2, and no run folder, where a rank would have died at its first kernel."""
    rig_file = tmp_path / "pascal_beside_a_3090.json"
    rig_file.write_text(json.dumps(pascal_beside_a_3090()))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _AfterTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'rigtrain.train.planning' and 'torch' not in sys.modules:\n"
        "            import torch\n"
        "            torch.cuda.is_available = lambda: True\n"
        "            torch.cuda.device_count = lambda: 2\n"
        f"            torch.cuda.get_arch_list = lambda: {ARCHS_CU130!r}\n"
        "            torch.version.cuda = '13.0'\n"
        "        return None\n"
        "sys.meta_path.insert(0, _AfterTorch())\n"
    )
    result = run_cli(
        "train", "--rig", str(rig_file), "--steps", "1", "--out", str(tmp_path / "run"),
        fresh=True, env_extra={"PYTHONPATH": str(site)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "GPU 1 (NVIDIA GeForce GTX 1080 Ti) has compute capability 6.1" in line
    assert "whl/cu126 bash setup/install.sh`, or train on the others: `--set rig.gpus=0`" in line
    assert not (tmp_path / "run").exists()


def test_a_warning_that_several_gpus_share_is_said_once_and_kept_for_each_in_json():
    """Four cards on x4 risers: one line for each kind of warning, naming the other cards,
    instead of each line four times; --json keeps one warning per GPU."""
    from rigtrain.rig.report import format_report

    rig = json.loads((RIGS / "four_4090_no_p2p.json").read_text())
    for gpu in rig["gpus"]:
        gpu["pcie"]["width"] = 4
    rig["gpus"][3]["pcie"]["width"] = 8  # another width: another message, said apart
    plan = plan_run(load_config("small"), rig_from_dict(rig), user_keys=set())
    narrow = [w for w in plan.warnings if w.code == "pcie_narrow"]
    assert [w.gpu for w in narrow] == [0, 1, 2]
    report = format_report(rig_from_dict(rig), plan)
    (line,) = [line for line in report.splitlines() if "[pcie_narrow]" in line]
    assert line.startswith("  [pcie_narrow] GPU 0 (") and line.endswith("; the same for GPUs 1 and 2")
    downtrained = [line for line in report.splitlines() if "[pcie_downtrained]" in line]
    assert len(downtrained) == 2 and downtrained[0].endswith("; the same for GPUs 1 and 2")
    assert "x8 of x16" in downtrained[1] and "the same for" not in downtrained[1]
    shown = [line for line in report.splitlines() if line.startswith("  [")]
    assert f"{len(shown)} warning(s) ({len(plan.warnings)} in --json, one per GPU):" in report


def test_a_card_that_draws_the_desktop_keeps_room_for_it():
    """A desktop's memory grows as windows open, and torch's allocator, capped at the plan's
    share, cannot give way: the plan keeps a GiB free on a display card, plans for the card
    with the least room once that is kept, and says so. A headless card keeps nothing."""
    from rigtrain.rig.budget import DISPLAY_KEPT_GIB
    from rigtrain.rig.report import format_report

    rig = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    rig["gpus"][0]["memory_free_gib"] = 22.0  # the desktop holds 2 GiB of GPU 0
    rig["gpus"][1]["memory_free_gib"] = 21.5  # another job 2.5 of GPU 1
    headless = plan_run(load_config("base"), rig_from_dict(rig), user_keys=set())
    assert "display_gpu" not in codes(headless) and headless.memory["display_kept_gib"] == 0
    rig["gpus"][0]["display_active"] = True
    shown = plan_run(load_config("base"), rig_from_dict(rig), user_keys=set())
    # GPU 0 now has the least room (22.0 - 1.0 < 21.5): the plan is made for it
    assert shown.usable_gib == pytest.approx(headless.usable_gib - 0.5 / 1.1, abs=0.01)
    assert shown.memory["allocator_cap_gib"] == pytest.approx(headless.memory["allocator_cap_gib"] - 0.5, abs=0.01)
    assert shown.memory["display_kept_gib"] == DISPLAY_KEPT_GIB
    assert "1.00 kept for the desktop it draws" in shown.reasons["usable_memory"]
    # the micro-batch's reason names the card it was sized for, by its index: both are 3090s
    assert "the smallest card, GPU 1 (NVIDIA GeForce RTX 3090)" in headless.reasons["micro_batch_size"]
    assert "the smallest card, GPU 0 (NVIDIA GeForce RTX 3090)" in shown.reasons["micro_batch_size"]
    (warning,) = [w for w in shown.warnings if w.code == "display_gpu"]
    assert warning.gpu == 0 and "draws a desktop, which holds 2.0 GiB of it now" in warning.message
    report = format_report(rig_from_dict(rig), shown)
    assert "NVIDIA GeForce RTX 3090 (display)" in report and "kept free beside it for the desktop" in report
    one = plan_run(load_config("base", overrides=["rig.gpus=1"]), rig_from_dict(rig), user_keys={"rig.gpus"})
    assert "display_gpu" not in codes(one) and one.memory["display_kept_gib"] == 0
    small = json.loads((RIGS / "rtx4060_8gb.json").read_text())
    small["gpus"][0].update(name="NVIDIA GeForce GTX 1650", memory_gib=4.0, memory_free_gib=3.6, display_active=True)
    (warning,) = [
        w
        for w in plan_run(load_config("small"), rig_from_dict(small), user_keys=set()).warnings
        if w.code == "display_gpu"
    ]
    assert "the plan keeps 0.4 GiB free for it" in warning.message  # a tenth of a 4 GB card, not a quarter
    rig["gpus"][0]["display_active"] = "yes"
    with pytest.raises(UserError, match=r"gpus\[0\]\.display_active must be true or false"):
        rig_from_dict(rig)


def test_a_docker_sized_dev_shm_is_a_warning_when_gpus_talk_through_it():
    rig = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    rig["shm_gib"] = 0.0625  # Docker's default 64 MiB
    plan = plan_run(load_config("small"), rig_from_dict(rig), user_keys=set())
    (warning,) = [w for w in plan.warnings if w.code == "small_shm"]
    assert "/dev/shm holds 64 MiB" in warning.message and "--ipc=host" in warning.message
    from rigtrain.rig.report import format_report

    assert "RAM 64.0 GiB; /dev/shm 64 MiB" in format_report(rig_from_dict(rig), plan)
    rig["shm_gib"] = 16.0
    assert "small_shm" not in codes(plan_run(load_config("small"), rig_from_dict(rig), user_keys=set()))
    rig["shm_gib"] = 0.0625
    one_gpu = plan_run(load_config("small", overrides=["rig.gpus=0"]), rig_from_dict(rig), user_keys={"rig.gpus"})
    assert one_gpu.world_size == 1 and "small_shm" not in codes(one_gpu)  # one GPU: NCCL has no peer


def test_gpus_that_this_torch_cannot_use_are_one_line_that_says_what_to_install():
    """NVML sees the cards but pip chose torch's CPU wheel: every rank would fail inside
    torch.cuda.set_device with an AssertionError. Hidden with CUDA_VISIBLE_DEVICES= the
    machine trains on its CPU, as the message says it may."""
    if torch.cuda.is_available():
        pytest.skip("this torch can use a GPU")
    from rigtrain.rig.visible import restricted
    from rigtrain.train.planning import check_torch_trains_here

    rig = read_rig_file(RIGS / "two_3090_one_on_x4_850w.json")
    with pytest.raises(UserError) as err:
        check_torch_trains_here(rig, None)
    message = str(err.value)
    assert message.startswith("this machine has 2 GPU(s) (NVIDIA GeForce RTX 3090) but torch cannot use them")
    expected_reason = "is a CPU-only build" if torch.version.cuda is None else "which the driver here cannot start"
    assert expected_reason in message and "CUDA_VISIBLE_DEVICES= rigtrain train" in message
    check_torch_trains_here(restricted(rig, "", None), None)  # every GPU hidden: the CPU, no error


@pytest.mark.parametrize(
    "cuda, hip, driver_cuda, reason, remedy",
    [
        (
            "13.0",
            None,
            "12.6",
            "is built for CUDA 13.0, the driver runs 12.6",
            "update the NVIDIA driver, or install torch's build for CUDA 12.x, which this driver runs: "
            "`TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash setup/install.sh`",
        ),
        (
            "12.8",  # a build the driver runs, and still no GPU: a container without them
            None,
            "12.6",
            "is built for CUDA 12.8, which the driver here cannot start (a driver older than",
            "check that this shell reaches the GPUs (`nvidia-smi`; a container needs `--gpus all`)",
        ),
        ("13.0", None, None, "is built for CUDA 13.0", "nvidia-smi's 'CUDA Version'"),
        (None, "6.4", "12.6", "(ROCm 6.4) cannot start HIP here", "install torch's CUDA build"),
    ],
)
def test_a_gpu_build_of_torch_that_cannot_start_its_driver_says_so(monkeypatch, cuda, hip, driver_cuda, reason, remedy):
    """The other reason torch sees no GPU NVML sees: a CUDA build newer than the driver (a
    home rig's driver lags a fresh wheel), or a container started without the GPUs. The
    line names the build and the cause, not "CPU-only", and the build of torch that the
    driver NVML reports can run (setup/install.sh takes PyTorch's index for it)."""
    from rigtrain.train.planning import check_torch_trains_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)
    rig = read_rig_file(RIGS / "two_3090_one_on_x4_850w.json")
    rig = dataclasses.replace(rig, software={**(rig.software or {}), "driver_cuda": driver_cuda} if driver_cuda else {})
    with pytest.raises(UserError) as err:
        check_torch_trains_here(rig, None)
    message = str(err.value)
    assert reason in message and remedy in message and "CPU-only" not in message and "\n" not in message, message


def test_the_installer_takes_torch_from_the_index_it_is_given(tmp_path):
    """TORCH_INDEX_URL (what the line above tells a user with an older driver) replaces a
    torch of another build, and leaves one of that build alone."""
    fake_bin = tmp_path / "venv" / "bin"
    fake_bin.mkdir(parents=True)
    (tmp_path / "fake" / "torch").mkdir(parents=True)
    calls = tmp_path / "calls"
    # the venv's python: its questions (-c) answered by a python that imports a fake torch,
    # its pip commands recorded
    (fake_bin / "python").write_text(
        f'#!/bin/bash\nif [ "$1" = "-c" ]; then PYTHONPATH={tmp_path / "fake"} exec python3 "$@"; fi\n'
        f'echo "$@" >> {calls}\n'
    )
    (fake_bin / "python").chmod(0o755)

    def installed(version: str) -> None:
        (tmp_path / "fake" / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")

    repo = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "RIGTRAIN_VENV": str(tmp_path / "venv"), "HOME": str(tmp_path)}
    installed("2.13.0")
    run = lambda **extra: subprocess.run(  # noqa: E731
        ["bash", str(repo / "setup" / "install.sh")], env={**env, **extra}, capture_output=True, text=True
    )
    first = run(TORCH_INDEX_URL="https://download.pytorch.org/whl/cu126")
    assert first.returncode == 0, first.stderr
    pip = [line for line in calls.read_text().splitlines() if line != "-m pip --version"]
    assert pip[0].startswith("-m pip uninstall") and "torch" in pip[0]
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in pip[1]
    calls.unlink()
    installed("2.13.0+cu126")
    again = run(TORCH_INDEX_URL="https://download.pytorch.org/whl/cu126/")
    assert "torch 2.13.0+cu126 already installed" in again.stdout
    assert not calls.exists() or "torch" not in calls.read_text()


# -- the memory model against a real card ------------------------------------------------------
# tests/rigs/h200.json is the machine of the first GPU run as its probe read it; the figures are
# what that run measured (torch.cuda.max_memory_allocated after the first step; NVML's use).
# That run trained with DeepSpeed's bf16, which casts the module: 2-byte weights, gradients and
# activations, fp32 master weights and moments. rigtrain's fp16 has that layout (DeepSpeed's
# fp16 casts the module the same way), so the memory model is checked against those figures
# in fp16; bf16 now trains fp32 weights under autocast, which no GPU has measured yet.
H200 = "h200.json"


@pytest.mark.parametrize(
    "preset, overrides, measured_gib, tolerance",
    [
        # the demo as it was on that run (it now has 16 latents and 2x MLPs)
        ("demo", ["train.micro_batch_size=48", "model.num_latents=32", "model.mlp_ratio=4"], 0.20, 0.05 / 0.20),
        ("small", ["train.micro_batch_size=64", "model.activation_checkpointing=false"], 4.24, 0.05),
        ("base", ["train.micro_batch_size=256", "model.activation_checkpointing=false"], 126.65, 0.05),
    ],
)
def test_predicted_peak_matches_the_h200(preset, overrides, measured_gib, tolerance):
    plan = plan_for(H200, preset=preset, overrides=[*overrides, "train.precision=fp16", "train.zero_stage=1"])
    assert plan.precision == "fp16"
    assert plan.predicted_peak_gib == pytest.approx(measured_gib, rel=tolerance)


def test_what_crashed_on_the_h200_is_no_longer_planned_as_safe():
    """base at micro-batch 256 filled the card (NVML 140.2 of 140.4 GiB) and NCCL could not get
    608 bytes at the first checkpoint: the plan must call it too big, and its own choice must
    leave room for every term outside the step."""
    crashed = plan_for(H200, overrides=["train.micro_batch_size=256", "model.activation_checkpointing=false"])
    assert "does_not_fit" in codes(crashed) and crashed.predicted_peak_gib > crashed.usable_gib
    assert crashed.memory["card_total_gib"] > 139.8  # more than the card had free
    plan = plan_for(H200)
    m = plan.memory
    assert plan.micro_batch_size < 256 and plan.predicted_peak_gib <= plan.usable_gib
    for term in ("cuda_context_gib", "fragmentation_gib", "cublas_workspaces_gib", "input_batch_gib"):
        assert m[term] > 0, term
    assert m["run_total_gib"] <= read_rig_file(RIGS / H200).gpus[0].free_gib
    assert m["card_total_gib"] == pytest.approx(m["run_total_gib"] + 0.6)  # 140.4 GiB, 139.8 free when probed
    assert m["allocator_cap_gib"] + m["cuda_context_gib"] == pytest.approx(139.8, abs=0.01)


def test_memory_terms_arithmetic():
    from rigtrain.rig.budget import (
        CUDA_CONTEXT_GIB,
        FRAGMENTATION,
        NCCL_GIB,
        PROFILER_GIB,
        cublas_workspace_bytes,
        fp32_copy_bytes,
        outside_allocator_gib,
        peak_bytes,
        usable_gib,
        weight_bytes,
    )

    assert cublas_workspace_bytes((9, 0)) == 2 * 32 * 2**20  # Hopper: 32 MiB per handle, two threads
    assert cublas_workspace_bytes((12, 0)) == 2 * 32 * 2**20  # consumer Blackwell too
    assert cublas_workspace_bytes((8, 6)) == 2 * (4096 * 1024 * 2 + 16 * 1024 * 8)
    assert cublas_workspace_bytes(None) == 0
    n = 1_000_000
    for precision in ("fp32", "bf16"):  # bf16's weights are fp32 (autocast): the same buffers
        assert fp32_copy_bytes(n, precision, 2, 2, "none") == 2 * n  # ZeRO-1/2's copy of its partition
        assert fp32_copy_bytes(n, precision, 2, 1, "cpu") == 0  # offloaded: in RAM
        assert fp32_copy_bytes(n, precision, 1, 0, "none") == 0
        assert fp32_copy_bytes(n, precision, 4, 3, "none") == 0
    assert fp32_copy_bytes(n, "fp16", 2, 1, "none") == 0  # its fp32 master is in the optimizer states
    assert weight_bytes("bf16") == weight_bytes("fp32") == 4 and weight_bytes("fp16") == 2
    assert outside_allocator_gib(world=1) == {
        "cuda_context_gib": CUDA_CONTEXT_GIB,
        "nccl_gib": 0.0,
        "profiler_gib": 0.0,
    }
    assert outside_allocator_gib(world=2, profiling=True)["nccl_gib"] == NCCL_GIB
    assert outside_allocator_gib(world=2, profiling=True)["profiler_gib"] == PROFILER_GIB
    assert outside_allocator_gib(world=1, lazy_loading=False)["cuda_context_gib"] > CUDA_CONTEXT_GIB
    gpu = read_rig_file(RIGS / "rtx4060_8gb.json").gpus[0]
    usable, cap, why = usable_gib(gpu, outside_allocator_gib(world=1))
    assert cap == pytest.approx(gpu.free_gib - CUDA_CONTEXT_GIB) and usable == pytest.approx(cap / (1 + FRAGMENTATION))
    assert "CUDA context" in why and "fragmentation" in why
    terms = peak_bytes(
        10 * 2**30,
        parameters=n,
        precision="bf16",
        world=1,
        stage=1,
        optimizer="adamw",
        offload="none",
        capability=(8, 6),
    )
    parts = (
        terms["step_gib"]
        - terms["zero_saving_gib"]
        + terms["optimizer_states_gib"]
        + terms["fp32_copies_gib"]
        + terms["buckets_gib"]
        + terms["cublas_workspaces_gib"]
    )
    assert terms["total_gib"] == pytest.approx(parts)
    assert terms["optimizer_states_gib"] == pytest.approx(8 * n / 2**30)  # Adam's moments; the weights are fp32
    fp16 = peak_bytes(10 * 2**30, parameters=n, precision="fp16", world=1, stage=1, optimizer="adamw", offload="none")
    assert fp16["optimizer_states_gib"] == pytest.approx(12 * n / 2**30)  # moments + fp32 master


def test_rig_prints_every_memory_term():
    result = run_cli("rig", "--rig", str(RIGS / H200), "--preset", "small")
    assert result.returncode == 0, result.stderr
    for words in (
        "the train step, measured with FakeTensorMode",
        "of which the input batch",
        "cuBLAS workspaces",
        "allocator peak",
        "fragmentation",
        "CUDA context and libraries",
        "on the card",
    ):
        assert words in result.stdout, words


def test_a_measured_residual_replaces_the_published_figures_for_that_card(tmp_path, monkeypatch):
    """After a first step on a GPU, what the card held beside the allocator is kept for the
    next plan of the same kind on the same card model, driver and torch (and only that)."""
    from rigtrain.train import memory_record

    monkeypatch.setattr(memory_record, "records_dir", lambda: tmp_path)
    before = plan_for(H200, preset="demo")
    assert "measured_outside_gib" not in before.memory and before.memory["cuda_context_gib"] == 1.7
    rig = read_rig_file(RIGS / H200)
    kind = dict(card=rig.gpus[0].name, software=rig.software, world=1, profiling=False, lazy_loading=True)
    memory_record.remember(memory_record.run_kind(**kind), 1.1, tmp_path / "run")
    after = plan_for(H200, preset="demo")
    assert after.memory["measured_outside_gib"] == 1.1 and "cuda_context_gib" not in after.memory
    assert after.usable_gib == pytest.approx(before.usable_gib + 0.6 / 1.1, abs=0.02)  # 1.7 - 1.1, less 10%
    assert "an earlier run measured" in after.reasons["usable_memory"]
    # another driver, or a profiled run (the profiler's buffers), is another kind: the figures again
    other = {**kind, "software": {**rig.software, "driver": "999.1"}}
    memory_record.remember(memory_record.run_kind(**other), 0.5, tmp_path / "run")
    assert plan_for(H200, preset="demo").memory["measured_outside_gib"] == 1.1
    profiled = plan_for(H200, preset="demo", overrides=["profile.enabled=true"])
    assert "measured_outside_gib" not in profiled.memory and profiled.memory["profiler_gib"] == 0.5
    # a damaged record is not trusted: the published figures again
    memory_record._path(memory_record.run_kind(**kind)).write_text("{not json")
    assert plan_for(H200, preset="demo").memory["cuda_context_gib"] == 1.7
    # a record from before 2026-12-08 held what the card had in use before its run (a
    # desktop's memory, counted twice): it is another kind, and not used
    old_kind = {k: v for k, v in memory_record.run_kind(**kind).items() if k != "measured"}
    memory_record.remember(old_kind, 3.2, tmp_path / "run")
    assert plan_for(H200, preset="demo").memory["cuda_context_gib"] == 1.7


def test_the_card_total_holds_what_the_card_had_before_the_run_and_the_plan_does_not_count_it_twice():
    """A 3090 that draws a desktop holding 1.5 GiB: the plan starts from the 22.5 GiB free
    and plans the run's own memory there; nvidia-smi's figure for the card adds those 1.5."""
    raw = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    raw["gpus"] = raw["gpus"][:1]
    raw["gpus"][0].update(memory_free_gib=24.0, p2p=[False], nvlink=[False])
    raw["psu_w"] = 1600
    idle = plan_run(load_config("small"), rig_from_dict(raw), user_keys=set())
    raw["gpus"][0]["memory_free_gib"] = 22.5
    desktop = plan_run(load_config("small"), rig_from_dict(raw), user_keys=set())
    assert idle.memory["in_use_before_gib"] == 0 and desktop.memory["in_use_before_gib"] == pytest.approx(1.5)
    assert desktop.usable_gib == pytest.approx(idle.usable_gib - 1.5 / 1.1, abs=0.01)  # once, in the free memory
    m = desktop.memory
    assert m["run_total_gib"] == pytest.approx(idle.memory["run_total_gib"])
    assert m["card_total_gib"] == pytest.approx(m["run_total_gib"] + 1.5)
    from rigtrain.rig.report import format_report

    assert "1.50  in use on the card before the run" in format_report(rig_from_dict(raw), desktop)


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA RTX A6000", 154.8),
        ("NVIDIA RTX 6000 Ada Generation", 364.2),
        ("NVIDIA GeForce RTX 5090", 209.5),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 4080", 97.5),
        ("NVIDIA GeForce RTX 3090 Ti", 80.0),
        ("NVIDIA GeForce RTX 3090", 71.0),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("NVIDIA GeForce RTX 3060", 25.5),
        ("NVIDIA GeForce RTX 3060 Ti", 32.4),
        ("NVIDIA GeForce RTX 4070 Ti SUPER", 88.2),
        ("NVIDIA GeForce RTX 4070 Ti", 80.2),
        ("NVIDIA GeForce RTX 4070", 58.3),
        ("NVIDIA GeForce RTX 4060", 30.2),
        ("NVIDIA RTX A5000", 111.1),
        ("NVIDIA GeForce RTX 2070 SUPER", 36.2),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 503.8),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A40", 149.7),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", None),  # another chip than the desktop card
        ("NVIDIA GeForce RTX 2080 with Max-Q Design", None),
        ("NVIDIA GeForce GTX 1080 Ti", None),
        ("cpu", None),
    ],
)
def test_peak_table_matches_whole_names(name, tflops):
    """ "h20" must not match "h200", nor "a10" "a100", nor "l40" "l40s"."""
    from rigtrain.rig.peaks import peak_tflops

    assert peak_tflops(name) == tflops


def test_step_peaks_are_measured_once_and_kept_on_disk(tmp_path, monkeypatch):
    """A plan's step measurements go to RIGTRAIN_CACHE/step-peaks: the next process (a
    resume, `rigtrain rig` then train) reads them instead of measuring again; a damaged
    entry is measured again, never trusted."""
    from rigtrain.config import load_config
    from rigtrain.train import planning, step_peaks

    monkeypatch.setenv("RIGTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(step_peaks, "shipped_table", dict)  # as a change to the model leaves it: no table
    config = load_config("demo")
    measured = []
    real = planning.fake_step_peak_bytes
    monkeypatch.setattr(planning, "fake_step_peak_bytes", lambda build: measured.append(1) or real(build))
    monkeypatch.setattr(step_peaks, "_MEASURED", {})
    first = planning.step_peak_function(config)(5, False, "fp32")
    assert len(measured) == 1 and len(list((tmp_path / "step-peaks").glob("*.json"))) == 1
    monkeypatch.setattr(step_peaks, "_MEASURED", {})  # a new process: only the disk remembers
    assert planning.step_peak_function(config)(5, False, "fp32") == first and len(measured) == 1
    other_data = load_config("demo", overrides=["data.workers=3", "data.synth_seed=4"])  # not the step's shape
    assert planning.step_peak_function(other_data)(5, False, "fp32") == first and len(measured) == 1
    for entry in (tmp_path / "step-peaks").glob("*.json"):
        entry.write_text("{not json")
    monkeypatch.setattr(step_peaks, "_MEASURED", {})
    assert planning.step_peak_function(config)(5, False, "fp32") == first and len(measured) == 2
    assert planning.step_peak_function(config)(6, False, "fp32") > first and len(measured) == 3


def test_flops_per_clip_are_counted_once_per_shape_and_kept_on_disk(tmp_path, monkeypatch):
    """Counting FLOPs builds the model on the meta device (2.5 s of a tune's planning on a
    2-core CPU): counted once per model and clip shape, then read back, in this process and
    the next; another model is counted again."""
    from rigtrain.config import load_config
    from rigtrain.train import flops, step_peaks

    monkeypatch.setenv("RIGTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(step_peaks, "shipped_table", dict)
    monkeypatch.setattr(step_peaks, "_MEASURED", {})
    counted = []
    real = flops._count
    monkeypatch.setattr(flops, "_count", lambda *args: counted.append(args) or real(*args))
    config = load_config("demo")
    first = flops.train_flops_per_clip(config.model, config.data)
    assert len(counted) == 1 and first == real(config.model, config.data, 2) / 2 > 0
    monkeypatch.setattr(step_peaks, "_MEASURED", {})  # a new process: only the disk remembers
    assert flops.train_flops_per_clip(config.model, config.data) == first and len(counted) == 1
    other_data = load_config("demo", overrides=["data.workers=3", "data.synth_seed=4"])  # not the step's shape
    assert flops.train_flops_per_clip(other_data.model, other_data.data) == first and len(counted) == 1
    wider = load_config("demo", overrides=[f"model.d_model={2 * config.model.d_model}"])
    assert flops.train_flops_per_clip(wider.model, wider.data) > first and len(counted) == 2


def test_the_shipped_step_peaks_are_current_and_are_what_a_measurement_gives(monkeypatch):
    """rigtrain/train/measured_step_peaks.json, written by bench/step_peaks.py: measured with
    this code (else every plan measures again, and the suite takes minutes longer), used
    without measuring, and equal to a fresh measurement (the demo's CPU plan, checked here)."""
    from rigtrain.train import planning, step_peaks

    record = json.loads(step_peaks.SHIPPED.read_text())
    if record["torch"] != torch.__version__:
        pytest.skip(f"the shipped step peaks were measured with torch {record['torch']}, this is {torch.__version__}")
    assert record["fingerprint"] == step_peaks.code_fingerprint(), (
        "rigtrain/train/measured_step_peaks.json was measured with other model or measuring code: "
        "run python bench/step_peaks.py"
    )
    config = load_config("demo")
    monkeypatch.setattr(step_peaks, "_MEASURED", {})
    monkeypatch.setattr(planning, "fake_step_peak_bytes", lambda build: pytest.fail("measured a shipped shape"))
    shipped = planning.step_peak_function(config)(48, False, "fp32")  # what the demo's CPU plan asks
    from rigtrain.train import flops  # the demo's FLOPs too: `rigtrain tune` counts them

    monkeypatch.setattr(flops, "_count", lambda *args: pytest.fail("counted the demo's FLOPs"))
    assert flops.train_flops_per_clip(config.model, config.data) > 0
    monkeypatch.undo()
    fresh = planning.fake_step_peak_bytes(
        planning.train_step_builder(config.model, config.data, micro_batch=48, checkpointing=False, precision="fp32")
    )
    assert shipped == fresh


def test_the_installer_says_what_debian_lacks_when_it_cannot_make_a_venv(tmp_path):
    """Debian and Ubuntu ship python3 without ensurepip (the python3-venv package): `python3
    -m venv` fails, leaving a venv without pip that a second run used to take as made. The
    installer says which package to install, in one line, and a folder that is no venv is
    never cleared."""
    repo = Path(__file__).resolve().parents[1]
    python = tmp_path / "python3"
    python.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then\n'
        '  echo "The virtual environment was not created successfully because ensurepip is not available." >&2\n'
        "  exit 1\nfi\n"
        'exec python3 "$@"\n'
    )
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "RIGTRAIN_VENV": str(tmp_path / "venv")}
    result = subprocess.run(["bash", str(repo / "setup" / "install.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert f"sudo apt install python{minor}-venv, then run this again" in line, line

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    env["RIGTRAIN_VENV"] = str(tmp_path / "mine")
    result = subprocess.run(["bash", str(repo / "setup" / "install.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "is not a virtual environment" in result.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


def test_the_installer_says_what_to_do_when_pip_finds_no_torch(tmp_path):
    """A Python that torch's release has no wheel for (or no network): pip's own words, then
    one line of rigtrain's naming the Python and what to run instead."""
    repo = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (bin_dir / "python").write_text(
        "#!/bin/bash\n"
        'if [ "$1" = "-c" ]; then exec python3 "$@"; fi\n'
        'if [ "$3" = "--version" ]; then echo "pip 24.0"; exit 0; fi\n'
        'echo "ERROR: No matching distribution found for torch==2.13.0" >&2; exit 1\n'
    )
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "RIGTRAIN_VENV": str(tmp_path / "venv"), "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(["bash", str(repo / "setup" / "install.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    pips, ours = result.stderr.strip().splitlines()
    assert pips.startswith("ERROR: No matching distribution")
    assert ours.startswith("setup/install.sh: pip could not install torch 2.13.0 for Python 3.") and "PYTHON=" in ours


def test_compile_is_turned_off_at_zero3_with_a_warning_and_kept_below():
    """DeepSpeed's ZeRO-3 gathers parameters in per-layer hooks that break torch.compile's graph
    at every layer: the plan says so and the run trains uncompiled; ZeRO-0 to 2 compile."""
    from rigtrain.train.planning import apply_plan

    for stage in (0, 1, 2, 3):
        overrides = [f"train.zero_stage={stage}", "train.compile=true"]
        plan = plan_for("two_3090_one_on_x4_850w.json", preset="small", overrides=overrides)
        assert plan.zero_stage == stage
        assert ("compile_zero3" in codes(plan)) is (stage == 3)
        assert apply_plan(load_config("small", overrides=overrides), plan).train.compile is (stage != 3)
    uncompiled = plan_for("two_3090_one_on_x4_850w.json", preset="small", overrides=["train.zero_stage=3"])
    assert "compile_zero3" not in codes(uncompiled)


def test_data_and_runs_on_a_windows_drive_or_the_network_are_named_with_where_to_keep_them(tmp_path):
    """Under WSL2 a Windows drive (/mnt/c) is a 9p share, many times slower than WSL's own
    disk: shards or a run there are named, with where to put them. A network filesystem
    says to compare with `data bench`; a VM's 9p share without WSL says so; ext4 says
    nothing. The mount type travels in the rig file, and under WSL2 too little RAM names
    .wslconfig, where Linux gets half of Windows' RAM by default."""
    raw = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    raw["disk"] = [
        {"path": "/mnt/d/shards", "free_gib": 900, "filesystem": "9p"},
        {"path": "/nas/runs", "free_gib": 900, "filesystem": "nfs4"},
        {"path": "/home/me/runs", "free_gib": 900, "filesystem": "ext4"},
    ]
    raw["software"] = {"kernel": "6.6.87.2-microsoft-standard-WSL2"}
    raw["ram_gib"], raw["ram_free_gib"] = 4.0, 3.0
    wsl = plan_run(load_config("small"), rig_from_dict(raw), user_keys=set())
    slow = [w for w in wsl.warnings if w.code == "slow_filesystem"]
    assert [w.message.split(" is on ")[0] for w in slow] == ["/mnt/d/shards", "/nas/runs"]
    assert "a Windows drive (9p: WSL2 reads it through a file share" in slow[0].message and "under ~" in slow[0].message
    assert "network filesystem (nfs4)" in slow[1].message and "`rigtrain data bench`" in slow[1].message
    (low_ram,) = [w for w in wsl.warnings if w.code == "low_ram"]
    assert ".wslconfig" in low_ram.message and "wsl --shutdown" in low_ram.message

    raw["software"] = {"kernel": "6.8.0-49-generic"}  # the same mounts in a plain Linux VM
    linux = plan_run(load_config("small"), rig_from_dict(raw), user_keys=set())
    slow = [w for w in linux.warnings if w.code == "slow_filesystem"]
    assert "a 9p share (a virtual machine's shared folder" in slow[0].message and "WSL" not in slow[0].message
    assert not any(".wslconfig" in w.message for w in linux.warnings)

    saved = tmp_path / "rig.json"
    saved.write_text(json.dumps(raw))
    shown = run_cli("rig", "--rig", str(saved), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [d["filesystem"] for d in json.loads(shown.stdout)["rig"]["disk"]] == ["9p", "nfs4", "ext4"]
    assert "disk /mnt/d/shards: 900 GiB free (9p)" in run_cli("rig", "--rig", str(saved)).stdout
    raw["disk"][0]["filesystem"] = 9
    saved.write_text(json.dumps(raw))
    bad = run_cli("rig", "--rig", str(saved))
    assert bad.returncode == 2 and "disk.filesystem must be a mount type as text" in bad.stderr


def test_the_probe_reads_the_mount_each_path_lies_on(tmp_path, monkeypatch):
    """The deepest mount point holding the path (or the folder it would be made in), and
    where two mounts share a point, the one mounted last (it hides the other)."""
    import psutil

    from rigtrain.rig.probe import disks

    Mount = types.SimpleNamespace
    mounts = [
        Mount(mountpoint="/", fstype="ext4"),
        Mount(mountpoint=str(tmp_path), fstype="tmpfs"),
        Mount(mountpoint=str(tmp_path / "c"), fstype="drvfs"),
        Mount(mountpoint=str(tmp_path / "c"), fstype="9p"),
        Mount(mountpoint=str(tmp_path / "cc"), fstype="nfs4"),
    ]
    monkeypatch.setattr(psutil, "disk_partitions", lambda **_: mounts)
    (tmp_path / "c" / "videos").mkdir(parents=True)
    (tmp_path / "cc").mkdir()
    found = disks([tmp_path / "c" / "videos" / "shards-to-be", tmp_path / "cc", tmp_path / "other", "/"])
    assert [d.filesystem for d in found] == ["9p", "nfs4", "tmpfs", "ext4"]


def test_prepare_into_a_windows_drive_says_so_before_it_starts(tmp_path, monkeypatch, capsys):
    import psutil

    from rigtrain.cli import main
    from rigtrain.data.synth import synthesize

    synthesize(tmp_path / "src", videos=1, seed=0)
    out = tmp_path / "mnt" / "c" / "shards"
    out.parent.mkdir(parents=True)
    monkeypatch.setattr(
        psutil, "disk_partitions", lambda **_: [types.SimpleNamespace(mountpoint=str(out.parent), fstype="9p")]
    )
    wsl = {k: getattr(os.uname(), k) for k in ("sysname", "nodename", "version", "machine")}
    wsl["release"] = "6.6.87.2-microsoft-standard-WSL2"  # WSL2's kernel
    monkeypatch.setattr(os, "uname", lambda: types.SimpleNamespace(**wsl))
    assert main(["data", "prepare", str(tmp_path / "src"), str(out), "--workers", "1"]) == 0
    said = capsys.readouterr().out.splitlines()
    (note,) = [i for i, line in enumerate(said) if "is on a Windows drive" in line]
    assert said[note].startswith(f"[rigtrain] note: {out} is on a Windows drive (9p")
    assert note < min(i for i, line in enumerate(said) if line.startswith("prepared "))


def test_checkpoints_that_would_not_fit_on_the_runs_disk_are_said_before_the_run():
    """A checkpoint is the weights, Adam's moments and the fp32 master copy (16 bytes a
    parameter in bf16 at ZeRO-1, measured against saved checkpoints in test_gpu_path); a run
    holds train.keep_ckpts of them and the one being saved, or fewer when it saves fewer.
    Against the free space of the disk the run is written to (the rig's last), said once."""
    from rigtrain.config.loading import user_keys
    from rigtrain.train.planning import cached_parameter_count

    raw = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    raw["disk"] = [{"path": "/data/videos", "free_gib": 5000}, {"path": "/home/me/runs", "free_gib": 5.0}]

    def low_disk(*overrides, saved=0):
        config = load_config("base", overrides=list(overrides))
        plan = plan_run(config, rig_from_dict(raw), user_keys=user_keys(None, list(overrides)), checkpoints_saved=saved)
        found = [w for w in plan.warnings if w.code == "low_disk"]
        return plan, cached_parameter_count(config), found[0].message if found else None

    plan, parameters, said = low_disk()
    assert (plan.precision, plan.zero_stage) == ("bf16", 1)
    each = parameters * 16 / 2**30
    assert f"about {each:.2f} GiB each, and up to 3 are on disk at once (train.keep_ckpts=2" in said
    assert f"{3 * each:.2f} GiB, but /home/me/runs has 5.00 GiB free" in said and 3 * each > 5 > each
    assert 2 * each < 5 and low_disk("train.keep_ckpts=1")[2] is None  # two held fit
    assert low_disk("train.steps=40", "train.ckpt_every=50")[2] is None  # one save: the last step's
    _, _, zero3 = low_disk("train.zero_stage=3", "train.keep_ckpts=4")  # no module weights at ZeRO-3
    assert f"about {parameters * 12 / 2**30:.2f} GiB each, and up to 5" in zero3
    # resumed with two saved, whose space is taken: one more is needed, then the oldest goes
    raw["disk"][1]["free_gib"] = 1.0
    assert f"2 of them there already: {each:.2f} GiB more, but /home/me/runs has 1.00 GiB free" in low_disk(saved=2)[2]
    raw["disk"][1]["free_gib"] = 2.5
    assert low_disk(saved=2)[2] is None and low_disk(saved=1)[2] is not None  # one to keep, one being saved
    raw["disk"][1]["free_gib"] = 500
    assert low_disk()[2] is None


def test_a_run_and_its_resume_say_the_disk_is_short_before_they_train(tmp_path, demo_data):
    """train hands the plan the run folder's disk (the rig's last) and, resumed, the
    checkpoints it holds already; the warning is said with the plan, and the run goes on."""
    from conftest import TINY_MODEL

    rig = json.loads((RIGS / "cpu_only.json").read_text())
    rig["cpu"] = {"cores": os.cpu_count(), "threads": os.cpu_count()}
    rig["disk"] = {"path": str(tmp_path), "free_gib": 0.0001}  # about 100 KiB
    rig_file = tmp_path / "rig.json"
    rig_file.write_text(json.dumps(rig))
    run = tmp_path / "run"
    common = ["--data", str(demo_data), "--out", str(run), "--rig", str(rig_file)]
    settings = ["--set", *TINY_MODEL, "train.micro_batch_size=2", "train.ckpt_every=1", "eval.during_training=false"]
    first = run_cli("train", *common, "--steps", "3", *settings)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (said,) = [line for line in first.stdout.splitlines() if "warning [low_disk]" in line]
    assert "up to 3 are on disk at once (train.keep_ckpts=2, and the one being saved)" in said
    again = run_cli("train", *common, "--steps", "4", "--resume")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    (said,) = [line for line in again.stdout.splitlines() if "warning [low_disk]" in line]
    assert "2 of them there already" in said


def test_other_programs_on_a_card_are_named_and_a_rig_file_lists_them_checked():
    """A notebook holding 17.5 GiB of a 3090: the plan fits the 6.2 GiB left and says who
    holds the rest; the most memory first, three at most. A rig file's process list is
    checked like every other field."""
    rig = json.loads((RIGS / "two_3090_one_on_x4_850w.json").read_text())
    rig["gpus"][1]["memory_free_gib"] = 6.2
    rig["gpus"][1]["processes"] = [
        {"pid": 11, "name": "nvtop"},
        {"pid": 4242, "name": "python -m ipykernel_launcher", "used_gib": 17.5},
        {"pid": 12, "used_gib": 0.1},
        {"pid": 13, "used_gib": 0.2},
    ]
    plan = plan_run(load_config("small"), rig_from_dict(rig), user_keys=set())
    (in_use,) = [w for w in plan.warnings if w.code == "gpu_in_use"]
    assert in_use.message.startswith(
        "GPU 1 (NVIDIA GeForce RTX 3090) is in use by 4 other process(es): PID 4242 (python -m ipykernel_launcher) "
        "holding 17.5 GiB; PID 13 holding 0.2 GiB; PID 12 holding 0.1 GiB and 1 more. The plan fits what is left "
        "(6.2 of 24.0 GiB free)"
    )
    assert plan.usable_gib < 6.2  # sized for what is left on GPU 1
    rig["gpus"][1]["processes"] = []  # NVML read, and nobody there
    assert "gpu_in_use" not in codes(plan_run(load_config("small"), rig_from_dict(rig), user_keys=set()))
    for bad, says in (
        ({"pid": "x"}, r"gpus\[1\]\.processes\[0\]\.pid must be a whole number"),
        ({"name": "python"}, r"gpus\[1\]\.processes\[0\]\.pid is missing"),
        ({"pid": 1, "used_gib": -1}, r"gpus\[1\]\.processes\[0\]\.used_gib must be at least 0"),
        ({"pid": 1, "user": "me"}, r"gpus\[1\]\.processes\[0\]\.user is not a rig field"),
    ):
        rig["gpus"][1]["processes"] = [bad]
        with pytest.raises(UserError, match=says):
            rig_from_dict(rig)
