"""CUDA_VISIBLE_DEVICES, as a user sets it to keep a run off a card, is honoured: the plan
uses the GPUs it leaves visible and hands the run's processes the same cards (rig/visible.py).
Rig files stand in for the machine, as everywhere in rig/'s tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import run_cli

from rigtrain.config import load_config
from rigtrain.errors import UserError
from rigtrain.rig.rig_file import read_rig_file, rig_from_dict
from rigtrain.rig.visible import cuda_device_list, visible_gpus
from rigtrain.sweep.placement import trial_slots
from rigtrain.train.planning import machine_rig, plan_run

RIGS = Path(__file__).parent / "rigs"
TWO_3090 = RIGS / "two_3090_one_on_x4_850w.json"
MIXED = RIGS / "mixed_3090_3060.json"  # GPU 0 a 3090, GPU 1 a 3060


def _with_uuids(rig):
    uuids = [f"GPU-{i}aa1b2c3-0000-4000-8000-00000000000{i}" for i in range(len(rig.gpus))]
    return dataclasses.replace(rig, gpus=tuple(dataclasses.replace(g, uuid=u) for g, u in zip(rig.gpus, uuids)))


def test_numbers_uuids_and_the_end_of_the_list_read_as_cuda_reads_them():
    two = _with_uuids(read_rig_file(TWO_3090))
    assert visible_gpus(two, None, None) is None  # unset: every GPU
    assert visible_gpus(two, "1", None) == (1,)  # identical cards: CUDA's default order is the bus order
    assert visible_gpus(two, "1,0", None) == (1, 0)
    assert visible_gpus(two, "0,-1,1", None) == (0,)  # as in CUDA, a negative number ends the list
    assert visible_gpus(two, "", None) == ()  # every GPU hidden
    assert visible_gpus(two, "GPU-1aa1", None) == (1,)  # a unique UUID prefix
    assert visible_gpus(two, " 1aa1b2c3 ", None) == (1,)  # without the GPU- prefix, as CUDA accepts it
    for value, words in (
        ("2", "there is no GPU 2; this machine has GPUs 0-1"),
        ("0,0", "listed twice"),
        ("GPU-", "matches more than one GPU"),
        ("GPU-ffff", "matches no GPU here"),
        ("MIG-1aa1b2c3/1/0", "MIG instance"),
    ):
        with pytest.raises(UserError, match=words) as caught:
            visible_gpus(two, value, None)
        assert str(caught.value).startswith(f"CUDA_VISIBLE_DEVICES={value}:") and "\n" not in str(caught.value)


def test_on_a_rig_of_different_cards_a_number_needs_the_bus_order():
    """CUDA numbers the fastest card first by default: on a 3090 + 3060 rig "1" need not be
    nvidia-smi's GPU 1, so it is refused unless CUDA_DEVICE_ORDER=PCI_BUS_ID says it is."""
    mixed = read_rig_file(MIXED)
    with pytest.raises(UserError, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        visible_gpus(mixed, "1", None)
    with pytest.raises(UserError, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        visible_gpus(mixed, "1", "FASTEST_FIRST")
    assert visible_gpus(mixed, "1", "pci_bus_id") == (1,)


def test_the_plan_trains_on_the_cards_left_visible_and_hands_the_same_ones_on(monkeypatch):
    config = load_config("small")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    rig = machine_rig([], str(TWO_3090))
    assert rig.visible == (1,)
    plan = plan_run(config, rig, user_keys=set())
    assert plan.world_size == 1 and plan.gpus == (1,)
    # the run's processes get nvidia-smi's number under the bus order, the same card
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "1" and plan.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "left visible by CUDA_VISIBLE_DEVICES" in plan.reasons["world_size"]
    # rig.gpus in the config is explicit and wins over the environment
    chosen = plan_run(load_config("small", overrides=["rig.gpus=0"]), rig, user_keys={"rig.gpus"})
    assert chosen.gpus == (0,) and chosen.env["CUDA_VISIBLE_DEVICES"] == "0"
    # an empty value hides every GPU: the machine as CUDA sees it, a CPU run
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu = plan_run(config, machine_rig([], str(TWO_3090)), user_keys=set())
    assert cpu.device == "cpu" and "CUDA_VISIBLE_DEVICES" not in cpu.env
    # without it, both cards, as before
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert plan_run(config, machine_rig([], str(TWO_3090)), user_keys=set()).gpus == (0, 1)


def test_gpus_numbered_by_cuda_are_handed_on_by_uuid():
    """Without NVML the probe asks CUDA, which has already applied the user's list and
    numbers what it left from 0; the run's processes get the cards' UUIDs, which mean the
    same card whatever the order or the list."""
    rig = dataclasses.replace(_with_uuids(read_rig_file(TWO_3090)), numbered_by_cuda=True)
    assert cuda_device_list(rig, (1,)) == rig.gpus[1].uuid
    assert cuda_device_list(dataclasses.replace(rig, numbered_by_cuda=False), (0, 1)) == "0,1"


def test_a_sweep_places_trials_only_on_visible_cards():
    four = read_rig_file(RIGS / "four_4090_no_p2p.json")
    assert trial_slots(dataclasses.replace(four, visible=(3, 1))) == [(3,), (1,)]
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES leaves that many visible"):
        trial_slots(dataclasses.replace(four, visible=(2,)), gpus_per_trial=2)


def test_what_the_environment_shows_is_never_written_into_a_rig_file():
    rig = dataclasses.replace(read_rig_file(TWO_3090), visible=(1,))
    assert "visible" not in rig.to_dict()
    data = json.loads(TWO_3090.read_text())
    with pytest.raises(UserError, match="rig.json: visible is not a rig field"):
        rig_from_dict({**data, "visible": [1]}, "rig.json")


def test_rig_command_plans_for_the_visible_card_and_a_bad_value_is_one_line(tmp_path):
    one = {"CUDA_VISIBLE_DEVICES": "1"}
    shown = run_cli("rig", "--rig", str(TWO_3090), "--preset", "small", "--json", env_extra=one)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["plan"]["gpus"] == [1]
    bad = run_cli("rig", "--rig", str(TWO_3090), env_extra={"CUDA_VISIBLE_DEVICES": "7"})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "rigtrain: error: CUDA_VISIBLE_DEVICES=7: there is no GPU 7; this machine has GPUs 0-1 (nvidia-smi -L)"
    ]
