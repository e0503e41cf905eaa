"""P2P, checked (rig/p2p_check.py): a copy between two GPUs that NVML says can talk
directly, in a child process with deadlines. On a CPU the same child copies between CPU
buffers, with faults injected as a broken link shows them (wrong data, a copy that never
ends, a link slower than host memory); the planner's side runs from rig files."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from conftest import run_cli

from rigtrain.config import load_config
from rigtrain.rig import p2p_check
from rigtrain.rig.p2p_check import FAULT, PairCheck, checked, run_checks
from rigtrain.rig.report import format_report
from rigtrain.rig.rig_file import RigFileError, rig_from_dict
from rigtrain.rig.speed import facts_for
from rigtrain.train.planning import plan_run


def workstation(p2p_check_rows=None) -> dict:
    """Three RTX A6000s: P2P offered between GPUs 0 and 1 and between 1 and 2, not 0-2."""
    offered = [[True, True, False], [True, True, True], [False, True, True]]
    gpus = []
    for i in range(3):
        gpu = {
            "name": "NVIDIA RTX A6000",
            "memory_gib": 48.0,
            "compute_capability": [8, 6],
            "pcie": {"gen": 4, "width": 16, "max_gen": 4, "max_width": 16},
            "p2p": offered[i],
            "uuid": f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
        }
        if p2p_check_rows:
            gpu["p2p_check"] = p2p_check_rows[i]
        gpus.append(gpu)
    return {"gpus": gpus, "cpu": {"cores": 32, "threads": 64}, "ram_gib": 256.0, "software": {"driver": "580.1"}}


@pytest.mark.parametrize(
    "fault, want",
    [("", ("ok", "slow")), ("slow", ("slow",)), ("wrong_data", ("wrong_data",))],
)
def test_the_child_copies_and_judges_each_pair(monkeypatch, fault, want):
    monkeypatch.setenv(FAULT, fault)
    results = run_checks([(0, 1), (1, 2)], ["0", "1", "2"], cpu=True)
    # on the CPU both paths are the same memcpy, so a clean pair's verdict is the timing's
    # noise on a busy machine: either, by the rule below, but never wrong data
    assert {results[pair].result for pair in ((0, 1), (1, 2))} <= set(want)
    for check in results.values():
        if check.result in ("ok", "slow"):
            assert check.gb_s > 0 and check.host_gb_s > 0
            # the verdict is the measured rule, not the injected label
            assert (check.result == "slow") == (check.gb_s < p2p_check.SLOW_AGAINST_HOST * check.host_gb_s)
        else:
            assert "words differ" in check.detail


def test_a_copy_that_never_ends_is_hung_after_its_deadline_and_the_child_is_gone(monkeypatch):
    monkeypatch.setenv(FAULT, "hang")
    started = time.monotonic()
    results = run_checks([(0, 1), (1, 2)], ["0", "1", "2"], cpu=True, start_deadline_s=60, pair_deadline_s=1.5)
    assert time.monotonic() - started < 30  # the pair's deadline, not the start's
    assert results[(0, 1)].result == "hung"
    assert results[(1, 2)].result == "failed"  # never reached: nothing concluded


def test_a_check_that_cannot_start_concludes_nothing(monkeypatch):
    monkeypatch.setenv(FAULT, "")
    results = run_checks([(0, 1)], ["0", "1"], cpu=True, start_deadline_s=0.01)
    assert results[(0, 1)].result == "failed" and "did not start" in results[(0, 1)].detail
    # without --cpu on a machine whose torch has no CUDA: one line of why, no verdict
    results = run_checks([(0, 1)], ["0", "1"])
    assert results[(0, 1)].result == "failed" and results[(0, 1)].detail


def measured(pairs):
    """What the child answers (its own tests are above), by the fault the test sets."""
    if os.environ.get(FAULT) == "slow":
        return {pair: PairCheck("slow", 1.2, 16.3) for pair in pairs}
    return {pair: PairCheck("ok", 17.3, 17.7) for pair in pairs}


def test_checked_rows_are_cached_per_pair_and_rigtrain_rig_measures_again(monkeypatch, tmp_path):
    cache = tmp_path / "cache" / "p2p"
    monkeypatch.setenv(FAULT, "slow")
    calls = []

    def on_the_cpu(pairs, devices, **kwargs):
        calls.append(pairs)
        assert devices == [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(3)]  # by UUID
        return measured(pairs)

    monkeypatch.setattr(p2p_check, "run_checks", on_the_cpu)
    rig = rig_from_dict(workstation())
    said = []
    first = checked(rig, (0, 1, 2), fresh=False, log=said.append, cache_dir=cache)
    assert calls == [[(0, 1), (1, 2)]]  # 0-2 offers no P2P: nothing to check
    assert said == ["checking P2P between GPUs 0-1, 1-2 (copies of 64 MiB)"]
    rows = [g.p2p_check for g in first.gpus]
    assert rows[0][2] is None and rows[0][0] is None and rows[0][1] == rows[1][0]
    assert rows[0][1]["result"] == "slow" and rows[0][1]["gb_s"] < rows[0][1]["host_gb_s"]
    again = checked(rig, (0, 1, 2), fresh=False, cache_dir=cache)
    assert len(calls) == 1 and again == first  # the cards' last check
    only_two = checked(rig, (0, 1), fresh=False, cache_dir=cache)  # CUDA_VISIBLE_DEVICES=0,1
    assert len(calls) == 1 and only_two.gpus[1].p2p_check[2] is None
    monkeypatch.setenv(FAULT, "")
    fresh = checked(rig, (0, 1, 2), fresh=True, cache_dir=cache)
    assert len(calls) == 2 and fresh.gpus[0].p2p_check[1]["result"] == "ok"
    assert checked(rig, (0, 1, 2), fresh=False, cache_dir=cache) == fresh  # the newest check is the one kept
    for damage in ('{"result": "ok", "gb_s": "fast"}', "{not json", '["ok"]'):  # measured again, never a crash
        for path in cache.iterdir():
            path.write_text(damage)
        assert checked(rig, (0, 1, 2), fresh=False, cache_dir=cache).gpus[0].p2p_check[1]["result"] == "ok"
    assert len(calls) == 5
    # a rig file round-trips the rows; a check that could not run is not kept
    assert rig_from_dict(fresh.to_dict(), "again").gpus == fresh.gpus
    monkeypatch.setattr(
        p2p_check, "run_checks", lambda pairs, devices: {p: PairCheck("failed", detail="x") for p in pairs}
    )
    for path in (tmp_path / "cache" / "p2p").iterdir():
        path.unlink()
    said.clear()
    checked(rig, (0, 1, 2), fresh=False, log=said.append, cache_dir=cache)
    assert not list((tmp_path / "cache" / "p2p").iterdir())
    assert "could not be checked (x); NVML's answer stands" in said[-1]


def plan(rows, gpus="0,1"):
    config = load_config("small", overrides=[f"rig.gpus={gpus}"])
    return plan_run(config, rig_from_dict(workstation(rows), "workstation.json"), user_keys={"rig.gpus"})


def rows_with(pair, entry):
    rows = [[None] * 3 for _ in range(3)]
    a, b = pair
    rows[a][b] = rows[b][a] = entry
    return rows


def test_a_pair_that_fails_its_check_keeps_nccl_off_p2p_and_says_what_was_seen():
    sound = plan(rows_with((0, 1), {"result": "ok", "gb_s": 24.1, "host_gb_s": 12.3}))
    assert "NCCL_P2P_DISABLE" not in sound.env and not {w.code for w in sound.warnings} & {"p2p_broken", "no_p2p"}
    slow = plan(rows_with((0, 1), {"result": "slow", "gb_s": 3.1, "host_gb_s": 11.8}))
    assert slow.env["NCCL_P2P_DISABLE"] == "1" and "failed its check" in slow.reasons["env.NCCL_P2P_DISABLE"]
    (warning,) = [w for w in slow.warnings if w.code == "p2p_broken"]
    assert "GPUs 0-1" in warning.message and "3.1 GB/s" in warning.message and "11.8 GB/s" in warning.message
    assert "ACS" in warning.message and "rigtrain rig" in warning.message
    for result, seen in (("wrong_data", "wrong data"), ("hung", "never finished")):
        broken = plan(rows_with((0, 1), {"result": result}))
        assert broken.env["NCCL_P2P_DISABLE"] == "1"
        assert any(w.code == "p2p_broken" and seen in w.message for w in broken.warnings)
    refused = plan(rows_with((0, 1), {"result": "unavailable"}))
    assert refused.env["NCCL_P2P_DISABLE"] == "1" and "no_p2p" in {w.code for w in refused.warnings}
    # a broken pair the run does not use changes nothing for it
    elsewhere = plan(rows_with((1, 2), {"result": "hung"}), gpus="0,1")
    assert "NCCL_P2P_DISABLE" not in elsewhere.env
    # and the speed model takes the host path for a failed pair, as NCCL will
    link = {
        result: facts_for(rig_from_dict(workstation(rows_with((0, 1), {"result": result}))), (0, 1), 1, 1.0, "bf16")
        for result in ("ok", "slow", "unavailable")
    }
    assert link["slow"].link_bytes_s == link["unavailable"].link_bytes_s < link["ok"].link_bytes_s


def test_the_report_shows_each_checked_pair():
    rig = rig_from_dict(workstation(rows_with((0, 1), {"result": "slow", "gb_s": 3.1, "host_gb_s": 11.8})))
    config = load_config("small")
    text = format_report(rig, plan_run(config, rig, user_keys=set()))
    assert "what a copy between the cards found" in text
    assert "SLOW 3.1 GB/s (host 11.8)" in text


def test_a_wrong_p2p_check_row_in_a_rig_file_is_one_line(tmp_path):
    for row, field in (
        ([None, {"result": "fast"}, None], "gpus[0].p2p_check[1]"),
        ([None, {"result": "ok", "speed": 3}, None], "gpus[0].p2p_check[1].speed"),
        ([None, {"result": "ok", "gb_s": -1}, None], "gpus[0].p2p_check[1].gb_s"),
        ([None, None], "gpus[0].p2p_check"),
    ):
        rows = [row, [None] * 3, [None] * 3]
        with pytest.raises(RigFileError, match=re.escape(field)):
            rig_from_dict(workstation(rows), "w.json")
    path = tmp_path / "w.json"
    path.write_text(json.dumps(workstation([[None, {"result": "fast"}, None], [None] * 3, [None] * 3])))
    result = run_cli("rig", "--rig", str(path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "gpus[0].p2p_check[1]" in result.stderr and "Traceback" not in result.stderr


def test_a_probed_rig_is_checked_between_the_visible_gpus_and_a_rig_file_never(monkeypatch, tmp_path, capsys):
    from rigtrain.rig import probe as probe_module
    from rigtrain.train.planning import machine_rig

    monkeypatch.setenv("RIGTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(FAULT, "")
    monkeypatch.setattr(probe_module, "probe", lambda paths=(): rig_from_dict(workstation(), "probe"))
    asked = []

    def on_the_cpu(pairs, devices, **kwargs):
        asked.append(pairs)
        return measured(pairs)

    monkeypatch.setattr(p2p_check, "run_checks", on_the_cpu)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    rig = machine_rig([], fresh_p2p_check=True)
    assert asked == [[(1, 2)]] and rig.gpus[1].p2p_check[2]["result"] == "ok" and rig.gpus[0].p2p_check is None
    assert "[rigtrain] checking P2P between GPUs 1-2" in capsys.readouterr().err
    machine_rig([])  # a training start: the last check of these cards
    assert len(asked) == 1
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(workstation()))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert machine_rig([], str(path)).gpus[0].p2p_check is None and len(asked) == 1


def test_a_stopped_command_takes_its_check_with_it(monkeypatch):
    """Ctrl-C while the child copies: the child is in its own session (the terminal's signal
    reaches only the command), so the command kills it on the way out."""
    monkeypatch.setenv(FAULT, "hang")
    children = []

    def interrupted(child, events, *deadlines):
        children.append(child)
        while not events:  # the child is copying
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(p2p_check, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_checks([(0, 1)], ["0", "1"], cpu=True)
    assert children[0].wait(timeout=10) == -9


def test_a_killed_command_leaves_no_check_behind(tmp_path):
    """`kill -9` of the command while its check hangs: the child (in its own session, which
    no terminal signal reaches) is killed with it."""
    import signal
    import subprocess
    import sys

    pids = tmp_path / "child"
    script = (
        "import os, subprocess\n"
        "from rigtrain.rig import p2p_check\n"
        "popen = subprocess.Popen\n"
        "def recorded(*args, **kwargs):\n"
        "    child = popen(*args, **kwargs)\n"
        f"    open({str(pids)!r}, 'w').write(str(child.pid))\n"
        "    return child\n"
        "p2p_check.subprocess.Popen = recorded\n"
        "p2p_check.run_checks([(0, 1)], ['0', '1'], cpu=True)\n"
    )
    command = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, FAULT: "hang"})
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pids.read_text())
    time.sleep(3)  # the child is past its start, in its hung copy
    command.send_signal(signal.SIGKILL)
    command.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # gone (reaped by init)
        if state == "Z":
            break  # dead, waiting to be reaped
        time.sleep(0.1)
    else:
        pytest.fail(f"the check's child {child} outlived the killed command")
