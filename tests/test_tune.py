"""`rigtrain tune`: candidates planned and pruned before anything runs (rig files, the step
peak stubbed), the step-time model's ordering, and real tunes of a tiny model on the CPU
with faults injected: an out-of-memory on every rank and on one rank only, a hang, the
budget running out, and the result file going back into `rigtrain train`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, run_cli

from rigtrain.config import load_config
from rigtrain.rig.rig_file import read_rig_file
from rigtrain.rig.speed import SpeedFacts, Way, accumulation_ladder, step_seconds
from rigtrain.tune.candidates import TUNED_KEYS, make_candidates

RIGS = Path(__file__).parent / "rigs"


def test_accumulation_ladder_keeps_each_ranks_clips_per_step():
    assert accumulation_ladder(48) == [(48, 1), (24, 2), (12, 4), (6, 8)]
    for share in (7, 37, 100):
        for micro, accum in accumulation_ladder(share):
            assert micro * accum >= share and (micro - 1) * accum < share  # spread evenly, never short


def test_step_time_model_orders_the_costly_ways_after_the_free_one():
    gpu = SpeedFacts("cuda", 300_000_000, 5e11, "bf16", 16, peak_tflops=71.0, link_bytes_s=3e9, host_link_bytes_s=24e9)
    free = Way(world=2, micro_batch=16, accum=2)
    total = step_seconds(gpu, free)["total"]
    assert step_seconds(gpu, Way(world=2, micro_batch=16, accum=2, checkpointing=True))["total"] > total
    assert step_seconds(gpu, Way(world=2, micro_batch=16, accum=2, zero_stage=3))["total"] > total
    offload = Way(world=2, micro_batch=16, accum=2, zero_stage=2, offload="cpu", checkpointing=True)
    assert step_seconds(gpu, offload)["total"] > 2 * total
    # a small micro-batch leaves the GPU idle between kernels: more steps for the same clips
    assert step_seconds(gpu, Way(world=2, micro_batch=2, accum=16))["total"] > total
    # on a link 10x faster ZeRO-3's gathers cost less
    fast = SpeedFacts("cuda", 300_000_000, 5e11, "bf16", 16, peak_tflops=71.0, link_bytes_s=3e10)
    three = Way(world=2, micro_batch=16, accum=2, zero_stage=3)
    assert step_seconds(fast, three)["communication"] < step_seconds(gpu, three)["communication"]


def _stub_step_peak(monkeypatch, bytes_per_clip: float):
    """A step whose activations grow with the micro-batch (a third with checkpointing), in
    place of the FakeTensor measurement: the pruning logic under test, not the model."""
    from rigtrain.train import planning

    def step_peak_function(config):
        return lambda micro, checkpointing, precision: int(micro * bytes_per_clip / (3 if checkpointing else 1))

    monkeypatch.setattr(planning, "step_peak_function", step_peak_function)


@pytest.mark.parametrize("rig_file", ["rtx4060_8gb.json", "two_3090_one_on_x4_850w.json"])
def test_candidates_predicted_not_to_fit_are_pruned_before_they_run(monkeypatch, rig_file):
    _stub_step_peak(monkeypatch, 2**30)  # 1 GiB per clip: 24 clips cannot fit a 24 GiB card
    rig = read_rig_file(RIGS / rig_file)
    candidates = make_candidates(load_config("demo"), rig, set())
    baseline, rest = candidates[0], candidates[1:]
    assert baseline.baseline and baseline.pruned is None and baseline.index == 0
    too_big = [c for c in candidates if c.predicted_peak_gib > c.usable_gib]
    assert too_big, "the stub should make the largest micro-batches too big for this card"
    for c in too_big:
        assert c.pruned and c.pruned.startswith("predicted not to fit"), c
    for c in candidates:
        if c.pruned is None:
            assert c.predicted_peak_gib <= c.usable_gib
        clips = c.values["train.micro_batch_size"] * c.values["train.grad_accum_steps"] * c.world
        base = baseline.values["train.micro_batch_size"] * baseline.values["train.grad_accum_steps"] * baseline.world
        assert base <= clips < base + c.world * c.values["train.grad_accum_steps"]  # the global batch is kept
    runnable = [c for c in rest if c.pruned is None]
    speeds = [c.predicted_clips_per_s for c in runnable]
    assert speeds == sorted(speeds, reverse=True)  # measured fastest-predicted first
    assert all(c.pruned for c in rest[len(runnable) :])  # pruned ones last, never queued
    # GPU candidates vary what a GPU run can change: checkpointing, offload, compile
    varied = {k for c in candidates for k in TUNED_KEYS if c.values[k] != baseline.values[k]}
    assert {"model.activation_checkpointing", "train.compile", "train.micro_batch_size"} <= varied
    if len(rig.gpus) > 1:
        assert {c.values["train.zero_stage"] for c in candidates} >= {1, 2, 3}
    offloaded = [c for c in candidates if c.values["train.offload_optimizer"] == "cpu"]
    assert offloaded
    for c in offloaded:  # predicted slower than the same way without offload
        same = [
            o.predicted_clips_per_s
            for o in candidates
            if o.values["train.offload_optimizer"] == "none"
            and all(
                o.values[k] == c.values[k]
                for k in TUNED_KEYS
                if k not in ("train.offload_optimizer", "train.zero_stage")
            )
        ]
        assert same and max(same) > c.predicted_clips_per_s


def test_the_first_round_moves_one_setting_at_a_time_from_the_fastest(monkeypatch):
    """Two 3090s: far more combinations fit than a few minutes hold. The phases try each
    setting around the fastest so far, move to a phase's winner only past the noise, and
    reach a combination of winners that the plan's own choice is several settings from."""
    from rigtrain.tune.phases import PHASES, neighbours, phase_winner

    _stub_step_peak(monkeypatch, 2**24)
    rig = read_rig_file(RIGS / "two_3090_one_on_x4_850w.json")
    candidates = make_candidates(load_config("small"), rig, set())
    runnable = [c for c in candidates if c.pruned is None]
    by_index = {c.index: c for c in candidates}
    # a made-up machine: compiled is 20% faster, ZeRO-2 5%, two loader threads 10%, and
    # micro-batches below the plan's lose 10% a halving
    base = candidates[0]

    def speed(c) -> float:
        v = c.values
        s = 100.0 * (1.2 if v["train.compile"] else 1.0) * (1.05 if v["train.zero_stage"] == 2 else 1.0)
        s *= 1.1 if v["data.workers"] == 2 else 1.0
        s *= 0.9 ** max(0, base.values["train.micro_batch_size"] // v["train.micro_batch_size"] - 1)
        return s

    center, tried = base, {base.index}
    for _, keys in PHASES:
        indices = neighbours(candidates, center, keys, tried)
        for i in indices:
            assert set(by_index[i].changed(center)) <= keys | {"train.zero_stage"}
        tried.update(indices)
        speeds = {i: speed(by_index[i]) for i in [center.index, *indices]}
        center = by_index[phase_winner(center.index, indices, speeds)]
    assert len(runnable) > 100 and len(tried) < 30, (len(runnable), len(tried))
    v = center.values
    assert (v["train.compile"], v["train.zero_stage"], v["data.workers"]) == (True, 2, 2)
    assert v["train.micro_batch_size"] == base.values["train.micro_batch_size"]
    # within the noise the fastest so far stays; a failed one gives way to what ran
    assert phase_winner(0, [5], {0: 100.0, 5: 102.0}) == 0
    assert phase_winner(0, [5, 6], {5: 90.0, 6: 95.0}) == 6
    assert phase_winner(0, [5], {0: 100.0}) == 0


def test_the_plan_measured_again_gets_a_trial_of_its_own(monkeypatch, tmp_path):
    """When another trial leads, the plan's own choice is measured once more as a new trial,
    numbered after every candidate (pruned ones included, which must never get a folder)
    and every confirmation; with the budget spent, not at all."""
    from rigtrain.files import write_json
    from rigtrain.tune.records import trial_dir
    from rigtrain.tune.search import Search, Timing

    _stub_step_peak(monkeypatch, 2**30)  # 1 GiB per clip: the largest micro-batches are pruned
    candidates = make_candidates(load_config("demo"), read_rig_file(RIGS / "rtx4060_8gb.json"), set())
    assert candidates[-1].pruned and candidates[1].pruned is None
    for index, steps in ((0, 10), (1, 20)):  # trial 1 twice as fast as the plan's own
        trial_dir(tmp_path, index).mkdir(parents=True)
        write_json(trial_dir(tmp_path, index) / "config.json", {})
        c = candidates[index]
        clips = c.values["train.micro_batch_size"] * c.values["train.grad_accum_steps"] * c.world
        record = {"status": "ok", "steps": steps, "seconds": 1.0, "clips_per_step": clips, "data_wait_s": 0.0}
        write_json(trial_dir(tmp_path, index) / "result.json", {**record, "peak_gib": 1.0})
    search = Search(tmp_path, candidates, Timing(90), time.time() + 100, lambda line: None)
    rounds = []
    monkeypatch.setattr(search, "_round", lambda indices, *args, **kw: rounds.append(indices))
    search._measure_plan_again(9.0, 9)
    assert rounds == [[len(candidates)]] and search.plan_again == len(candidates)
    assert (trial_dir(tmp_path, len(candidates)) / "config.json").exists()
    assert not any(trial_dir(tmp_path, c.index).exists() for c in candidates if c.pruned)
    late = Search(tmp_path, candidates, Timing(90), time.time() - 1, lambda line: None)
    late._measure_plan_again(9.0, 9)
    assert late.plan_again is None


def test_keys_the_user_sets_are_not_tuned(monkeypatch):
    _stub_step_peak(monkeypatch, 2**20)
    rig = read_rig_file(RIGS / "rtx4060_8gb.json")
    config = load_config("demo", overrides=["data.workers=3", "train.compile=true"])
    candidates = make_candidates(config, rig, {"data.workers", "train.compile"})
    assert {c.values["data.workers"] for c in candidates} == {3}
    assert {c.values["train.compile"] for c in candidates} == {True}


def _ram_that_prunes(tmp_path) -> Path:
    """A CPU rig file (2 threads) with RAM enough for the plan's own choice but not for
    every loader-thread count: found by planning, so the test follows the RAM model."""
    for tenths in range(15, 60):
        path = tmp_path / f"ram-{tenths}.json"
        path.write_text(json.dumps({"gpus": [], "cpu": {"cores": 2, "threads": 2}, "ram_gib": tenths / 10}))
        config = load_config("demo", overrides=[*TINY_MODEL, "train.nproc=1"])
        candidates = make_candidates(
            config, read_rig_file(path), {*(k.split("=")[0] for k in TINY_MODEL), "train.nproc"}
        )
        if candidates[0].pruned is None and any(c.pruned for c in candidates):
            return path
    pytest.fail("no RAM size prunes some candidates and not the plan's own")


def test_a_plan_that_cannot_run_stops_the_tune_with_one_line_and_leaves_no_worker(tmp_path):
    """The first worker group starts as soon as the plan's own choice is planned, before
    the tune knows it cannot run (here too little RAM in the rig file): the tune ends with
    exit 2 and one line, and the group it started is gone with it."""
    import psutil

    rig = tmp_path / "small-ram.json"
    rig.write_text(json.dumps({"gpus": [], "cpu": {"cores": 2, "threads": 2}, "ram_gib": 0.3}))
    out = tmp_path / "tune"
    out.mkdir()  # the user's: kept after the failure (a folder the tune made, nothing written in it, would go)
    result = run_cli("tune", "--out", str(out), "--rig", str(rig), "--budget-s", "60")
    assert result.returncode == 2 and "cannot run here" in result.stderr and "RAM" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "logs" / "group-1-rank-0.log").exists()  # the early group was started
    assert not (out / "logs" / "group-1-store").exists()  # where its ranks would have met
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
        if not left:
            break
        time.sleep(0.1)
    assert not left, [p.info["cmdline"] for p in left]


def _trials(tune_dir: Path) -> list[dict]:
    return json.loads((tune_dir / "tune.json").read_text())["trials"]


@pytest.mark.slow
@pytest.mark.long
def test_tune_keeps_its_budget_and_never_runs_a_pruned_candidate(tmp_path):
    """One process: the plan's own choice and the next measure, the third hangs until the
    budget ends it, the rest are not reached; candidates predicted not to fit in the rig
    file's RAM never get a trial folder. In a folder where a tune was killed before: the
    same command starts again, that tune's trials set aside."""
    rig = _ram_that_prunes(tmp_path)
    out = tmp_path / "tune"
    _unfinished_tune(out)  # killed there before: set aside, and measured afresh
    budget = 45  # room for two trials before the hang beside the rest of the suite (about 20 s)
    started = time.monotonic()
    result = run_cli(
        "tune", "--out", str(out), "--rig", str(rig), "--budget-s", str(budget), "--trial-seconds", "1",
        "--set", *TINY_MODEL, "train.nproc=1",
        env_extra={"RIGTRAIN_FAULT_HANG_MICRO_BATCH": "24"},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert elapsed < budget + 10, f"a {budget} s budget took {elapsed:.0f} s"
    trials = _trials(out)
    status = {t["index"]: t["status"] for t in trials}
    assert status[0] == "ok" and trials[0]["clips_per_s"] < 1e9  # measured now, not the killed tune's
    (aside,) = out.glob("unfinished-*")
    assert (aside / "trials" / "000" / "result.json").exists() and "did not finish" in result.stdout
    hung = [t for t in trials if t["values"]["train.micro_batch_size"] == 24 and t["status"] != "pruned"]
    assert hung[0]["status"] == "cut off", status
    assert "not run" in status.values()
    assert any("fit in RAM" in (t["pruned"] or "") for t in trials)
    for t in trials:
        folder = out / "trials" / f"{t['index']:03d}"
        if t["status"] == "pruned":
            assert not folder.exists()
        if t["status"] == "not run":
            assert not (folder / "started.json").exists()


@pytest.mark.slow
@pytest.mark.long
def test_tune_survives_out_of_memory_on_one_rank_and_a_hang_and_its_result_trains(tmp_path):
    """Two processes of the demo model, sharing its global batch of 48. Rank 1 alone runs out
    of memory above micro-batch 12 (rank 0 is then
    stuck in a collective: the trial is recorded as out of memory on rank 1 and the group
    restarted); the 12-clip trial hangs past --trial-timeout-s (40 s: a real trial of the demo
    on two processes, one round of long windows, took over 20 s beside the rest of the suite
    on a slow evening, and 20 failed it). The tune goes on, picks the
    fastest trial that ran, and its tuned.toml and `train --tuned` give that configuration."""
    out = tmp_path / "tune"
    result = run_cli(
        "tune", "--out", str(out), "--budget-s", "150", "--trial-seconds", "1", "--trial-timeout-s", "40",
        "--set", "train.nproc=2", "data.workers=0",
        env_extra={
            "RIGTRAIN_FAULT_OOM_ABOVE_MICRO_BATCH": "12",
            "RIGTRAIN_FAULT_RANKS": "1",
            "RIGTRAIN_FAULT_HANG_MICRO_BATCH": "12",
        },
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "tune.json").read_text())
    by_micro = {t["values"]["train.micro_batch_size"]: t for t in record["trials"]}
    assert by_micro[24]["status"] == "oom" and by_micro[24]["ranks"] == [1]  # the plan's own: 24 a process
    assert by_micro[12]["status"] == "timeout"
    # before the hung group was killed, each rank wrote where it was into its log: rank 1 in
    # the injected hang, rank 0 waiting for it
    stacks = Path(by_micro[12]["error"].rsplit("its Python stacks: ", 1)[1].rstrip(")"))
    logs = {p.name[-5]: p.read_text() for p in stacks.parent.glob(stacks.name)}
    assert sorted(logs) == ["0", "1"] and all("(most recent call first)" in text for text in logs.values()), logs
    assert "in _inject_faults" in logs["1"] and "in _inject_faults" not in logs["0"]
    assert by_micro[3]["status"] == "pruned"  # 3 x 8: predicted over 2x slower per clip
    ran = [t for t in record["trials"] if t["status"] == "ok"]
    assert [(t["values"]["train.micro_batch_size"], t["values"]["train.grad_accum_steps"]) for t in ran] == [(6, 4)]
    best = max(ran, key=lambda t: t["clips_per_s"])
    assert record["best"] == best["index"] and record["speedup_vs_plan"] is None  # the plan's own failed
    # three candidates to run, all finalists: one round with the long windows, no confirmation trials
    assert record["chosen_on"] == "one long round" and not any("confirmation" in t for t in record["trials"])
    planned = [f"{t['index']:03d}" for t in record["trials"] if t["status"] != "pruned"]
    assert sorted(p.name for p in (out / "trials").iterdir()) == planned
    assert "trial" in result.stdout and "fastest" in result.stdout
    assert not list((out / "logs").glob("*-store"))  # where its groups' ranks met: gone with them
    # TensorBoard's hparams view: one run per trial that ran or failed
    runs = sorted(p.name for p in (out / "tb").iterdir() if p.is_dir())
    assert runs == [
        f"trial-{t['index']:03d}" for t in record["trials"] if t["status"] not in ("pruned", "not run", "skipped")
    ]

    # the TOML file round-trips into a config, and --tuned trains with it (user keys win)
    tuned = load_config("demo", str(out / "tuned.toml"))
    for key, value in best["values"].items():
        section, name = key.split(".")
        assert getattr(getattr(tuned, section), name) == value, key
    run = tmp_path / "run"
    trained = run_cli(
        "train", "--tuned", str(out), "--out", str(run), "--steps", "1",
        "--set", "train.nproc=1", "eval.during_training=false",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["train"]["nproc"] == 1  # the user's --set wins over the tune
    assert config["train"]["micro_batch_size"] == best["values"]["train.micro_batch_size"]
    assert config["data"]["workers"] == 0  # the keys the tune was run with come along
    wrong = run_cli("train", "--tuned", str(out), "--preset", "small", "--steps", "1")
    assert wrong.returncode == 2 and "tuned for --preset demo" in wrong.stderr


def _row(index: int, first: float | None, again: float | None = None) -> dict:
    row = {"index": index, "baseline": index == 0, "status": "ok" if first else "oom"}
    if first:
        row["clips_per_s"] = first
    if again:
        row["confirmation"] = {"status": "ok", "clips_per_s": again}
    return row


def test_the_choice_is_made_on_the_confirmation_round_and_keeps_the_plan_within_the_noise():
    from rigtrain.tune.report import NOISE_MARGIN, choose

    # the first round's winner lost when measured again: the confirmation decides
    best, speedup, basis, kept = choose([_row(0, 200, 210), _row(1, 215, 205), _row(2, 190, 230)])
    assert (best["index"], basis, kept) == (2, "confirmation", False) and speedup == pytest.approx(230 / 210, abs=1e-3)
    # a gain inside the noise margin is no reason to change the run
    best, speedup, _, kept = choose([_row(0, 200, 200), _row(1, 230, 200 * (1 + NOISE_MARGIN / 2))])
    assert (best["index"], kept, speedup) == (0, True, 1.0)
    # the plan's own choice measured once more after the others counts at its better figure
    rows = [_row(0, 200, 200), _row(1, 230, 212)]
    assert choose(rows)[0]["index"] == 1
    rows[0]["plan_again"] = {"status": "ok", "clips_per_s": 210.0}
    best, speedup, _, kept = choose(rows)
    assert (best["index"], kept, speedup) == (0, True, 1.0)  # 212 is within the noise of 210
    rows[0]["plan_again"] = {"status": "ok", "clips_per_s": 190.0}  # slower the second time: the first counts
    assert choose(rows)[:2] == (rows[1], 1.06)
    rows[0]["plan_again"] = {"status": "not run"}
    assert choose(rows)[0]["index"] == 1
    # without a confirmation round (the budget ran out), the first round decides
    best, _, basis, _ = choose([_row(0, 200), _row(1, 240)])
    assert (best["index"], basis) == (1, "first round")
    # the plan's own choice failed: the fastest that ran, and no speed-up to claim
    best, speedup, _, _ = choose([_row(0, None), _row(1, 150), _row(2, 170)])
    assert (best["index"], speedup) == (2, None)
    assert choose([_row(0, None)])[0] is None


def test_the_outcome_is_said_when_only_some_trials_were_measured_again(tmp_path, capsys):
    """The plan kept within the noise, on a confirmation round that did not reach every
    trial (the budget): the message names the fastest other that was measured again."""
    from rigtrain.tune.report import _say_outcome, choose

    rows = [_row(0, 200, 210), _row(1, 230, 212), _row(2, 240), _row(3, None)]
    for r in rows:
        r.update(pruned=None, status=r["status"])
    best, speedup, basis, kept = choose(rows)
    record = {
        "trials": rows,
        "elapsed_s": 50.0,
        "budget_s": 60.0,
        "stopped_by": None,
        "chosen_on": basis,
        "kept_plan_within_noise": kept,
        "speedup_vs_plan": speedup,
        "preset": "demo",
    }
    _say_outcome(tmp_path, record, best)
    said = capsys.readouterr().out
    assert "kept the plan's own choice" in said and "trial 1 at 212.0" in said


def test_the_table_says_which_trials_stopped_early_and_against_which():
    from rigtrain.tune.report import format_table

    values = {k: 0 for k in TUNED_KEYS} | {"train.offload_optimizer": "none"}
    rows = []
    for index in range(3):
        row = _row(index, 300 - 50 * index) | {"world": 1, "values": values, "predicted_clips_per_s": 100.0}
        rows.append(row)
    rows[2].update(raced_out=True, against=0)
    rows[1]["confirmation"] = {"status": "ok", "clips_per_s": 240.0, "raced_out": True, "against": 0}
    lines = format_table({"trials": rows, "best": 0}).splitlines()[1:]
    assert "stopped" not in lines[0]
    assert lines[1].endswith("ok, again stopped early (slower than #0 again)")
    assert lines[2].endswith("ok, stopped early (slower than #0)")


@pytest.mark.slow
def test_one_worker_group_runs_every_zero_stage_one_after_another(tmp_path, demo_data):
    """The CPU stand-in for a GPU tune's trials: ZeRO-3, then ZeRO-1, then ZeRO-2, built and
    torn down in the same two processes (DeepSpeed's state from one stage must not leak
    into the next), without a restart between them."""
    from rigtrain.rig.facts import Cpu, Rig
    from rigtrain.rig.speed import facts_for
    from rigtrain.train.launch import check_data, write_run_config
    from rigtrain.train.planning import PLANNED, apply_plan, plan_run
    from rigtrain.tune.candidates import planned_candidate, values_of, with_values
    from rigtrain.tune.records import trial_dir
    from rigtrain.tune.search import TRIAL_SETTINGS, Search, Timing

    rig = Rig(cpu=Cpu(cores=2, threads=2), ram_gib=16.0)
    config = load_config("demo", overrides=[*TINY_MODEL, "train.nproc=2", "data.workers=0", "train.micro_batch_size=8"])
    plan = plan_run(config, rig, user_keys={"train.nproc", "data.workers", "train.micro_batch_size"})
    base = apply_plan(config, plan)
    facts = facts_for(rig, (), 10**6, 1e9, "fp32")
    keys = set(PLANNED) | {"train.nproc", "data.workers", "train.compile"}
    candidates = []
    for index, stage in enumerate((3, 1, 2)):
        c = planned_candidate(base, rig, {**values_of(base, plan), "train.zero_stage": stage}, keys, None, facts)
        c.index, c.baseline = index, index == 0
        trial_config = with_values(c.config, TRIAL_SETTINGS)
        _, split = check_data(demo_data, trial_config, c.world)
        write_run_config(trial_dir(tmp_path, index), trial_config, demo_data, rig, c.plan, {"split": split.to_dict()})
        candidates.append(c)
    search = Search(tmp_path, candidates, Timing(90, timed_s=0.5), time.time() + 110, lambda line: None)
    search._round([0, 1, 2], time.time() + 110, 0.5, 3, False)
    results = [search.result(i) for i in range(3)]
    assert [r["status"] for r in results] == ["ok", "ok", "ok"], results
    assert search.groups_started == 1  # no restart between the stages
    stages = [json.loads((trial_dir(tmp_path, i) / "config.json").read_text())["plan"]["deepspeed"] for i in range(3)]
    assert [s["zero_optimization"]["stage"] for s in stages] == [3, 1, 2]


def test_a_trial_stops_early_only_when_every_chunk_trails_its_rounds_fastest():
    from rigtrain.tune.records import (
        NOISE_MARGIN,
        RACE_CLEAR_CHUNKS,
        RACE_CLEAR_MARGIN,
        RACE_MIN_CHUNKS,
        next_chunk_steps,
        round_leader,
        window_verdict,
    )

    assert RACE_CLEAR_CHUNKS < RACE_MIN_CHUNKS and RACE_CLEAR_MARGIN > NOISE_MARGIN
    bar = 100.0  # clips/s of the round's fastest finished trial

    def chunks(clips_per_s: float, n: int) -> list[tuple[int, float]]:
        return [(2, 2 * 10 / clips_per_s)] * n  # 10 clips a step

    # trailing past the noise margin but not by far: RACE_MIN_CHUNKS chunks to say so
    behind = bar * (1 - (NOISE_MARGIN + RACE_CLEAR_MARGIN) / 2)
    assert window_verdict(chunks(behind, RACE_MIN_CHUNKS), 10, 3.0, 3, 200, bar) == "raced out"
    assert window_verdict(chunks(behind, RACE_MIN_CHUNKS - 1), 10, 3.0, 3, 200, bar) is None
    # trailing by far (here 20%): fewer chunks say so, but never one alone
    far = bar * (1 - 2 * RACE_CLEAR_MARGIN)
    assert window_verdict(chunks(far, RACE_CLEAR_CHUNKS), 10, 3.0, 3, 200, bar) == "raced out"
    assert window_verdict(chunks(far, RACE_CLEAR_CHUNKS - 1), 10, 3.0, 3, 200, bar) is None
    slow = chunks(far, RACE_MIN_CHUNKS)
    assert window_verdict(slow, 10, 3.0, 3, 200, None) is None  # nothing to race against
    # one chunk within the noise margin of the bar keeps it going: it could yet be the fastest
    close = [*slow[:-1], (2, 2 * 10 / (bar * (1 - NOISE_MARGIN / 2)))]
    assert window_verdict(close, 10, 3.0, 3, 200, bar) is None
    # one chunk only a little behind makes the far-behind rule not apply: RACE_MIN_CHUNKS then
    mixed = [*chunks(far, RACE_CLEAR_CHUNKS - 1), *chunks(behind, 1)]
    assert window_verdict(mixed, 10, 3.0, 3, 200, bar) is None
    assert window_verdict([*mixed, *chunks(far, RACE_MIN_CHUNKS - len(mixed))], 10, 3.0, 3, 200, bar) == "raced out"
    # a full window is done, raced or not; so is max_steps
    assert window_verdict([(10, 3.1)], 10, 3.0, 3, 200, bar) == "done"
    assert window_verdict([(2, 0.1)] * 3, 10, 3.0, 3, 6, None) == "done"
    # chunks: one step first, then about a quarter second's worth, never past max_steps
    assert next_chunk_steps([], 200) == 1
    assert next_chunk_steps([(1, 0.05)], 200) == 5 and next_chunk_steps([(1, 0.05)], 3) == 2
    assert next_chunk_steps([(1, 2.0)], 200) == 1
    # the bar: the fastest finished trial, never one stopped early or failed
    records = {
        0: {"status": "ok", "clips_per_step": 48, "steps": 20, "seconds": 4.0},  # 240 clips/s
        1: {"status": "ok", "clips_per_step": 48, "steps": 25, "seconds": 4.0},  # 300
        2: {"status": "ok", "clips_per_step": 48, "steps": 30, "seconds": 4.0, "raced_out": True},
        3: {"status": "oom"},
    }
    assert round_leader(records) == (1, 300.0)
    assert round_leader({3: {"status": "oom"}}) is None


@pytest.mark.slow
def test_a_clearly_slower_trial_is_stopped_early_and_the_fastest_runs_its_whole_window(
    tmp_path, demo_data, monkeypatch
):
    """Three micro-batch splits of one global batch in one process of the tiny model, one
    round: the plan's own (12 x 4) sets the bar with a short window, 48 x 1 (the fastest)
    runs its whole long window; 3 x 16 trails in every chunk and stops after the fewest
    chunks that can say so. The plan's own never stops early, and since 48 x 1 beat it, it
    is measured once more at the end, with the long window. Their order is made certain
    (RIGTRAIN_FAULT_SLOW_MICRO_BATCH: 0.3 s more a step for 12 x 4, 1 s for 3 x 16): by their
    own speeds, 48 x 1 and 12 x 4 are a few percent apart, and a loaded machine swapped them
    (48 x 1 raced out after 2 steps; or no re-measurement of the plan's own)."""
    from rigtrain.tune.search import Search, Timing
    from rigtrain.tune.worker import FAULT_SLOW

    monkeypatch.setenv(FAULT_SLOW, "12:0.3,3:1.0")

    candidates = _tiny_candidates(tmp_path, demo_data, [(12, 4, 0), (48, 1, 0), (3, 16, 0)])
    window_s = 4.0  # the long windows of one round: 3 x Timing.timed_s
    search = Search(tmp_path, candidates, Timing(90, timed_s=window_s / 3), time.time() + 110, lambda line: None)
    search.run()
    assert search.one_round
    plans_own, larger, smaller = (search.result(i) for i in range(3))
    assert [r["status"] for r in (plans_own, larger, smaller)] == ["ok", "ok", "ok"]
    assert not plans_own.get("raced_out") and window_s / 3 <= plans_own["seconds"] < window_s
    assert not larger.get("raced_out") and larger["seconds"] >= window_s
    speed = {i: r["clips_per_step"] * r["steps"] / r["seconds"] for i, r in enumerate((plans_own, larger, smaller))}
    assert speed[1] > speed[2] * 1.1, speed  # the premise: the injected second a step
    assert smaller["raced_out"] and smaller["against"] == max((0, 1), key=speed.get), smaller
    # stopped after a few chunks (a step, then at least a step each), before its window was
    # full: 4 s and 9 steps
    assert smaller["seconds"] < window_s or smaller["steps"] < 3 * Timing(90).min_steps, smaller
    assert smaller["steps"] < larger["steps"], (smaller, larger)
    # 48 x 1 leads, so the plan's own choice is measured once more, after it, whole window
    assert search.plan_again == 3
    again = search.result(3)
    assert again["status"] == "ok" and not again.get("raced_out") and again["seconds"] >= window_s
    assert json.loads((tmp_path / "trials" / "003" / "config.json").read_text()) == json.loads(
        (tmp_path / "trials" / "000" / "config.json").read_text()
    )


def test_the_hparams_view_has_one_row_per_trial_with_its_outcome(tmp_path):
    """Read back as TensorBoard reads it: each trial's run carries its settings and outcome
    (a trial stopped early says so), and its clips/s."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    from rigtrain.tune.report import _write_hparams

    values = {k: 1 for k in TUNED_KEYS} | {"train.offload_optimizer": "none"}
    rows = [_row(i, 300.0 - 50 * i) | {"world": 1, "values": values, "predicted_clips_per_s": 250.0} for i in range(3)]
    rows[1].update(raced_out=True, against=0)
    rows[2].update(status="oom", error="out of memory")
    _write_hparams(tmp_path, rows)
    outcomes, speeds = {}, {}
    for events_file in sorted(tmp_path.glob("trial-*/events.out.tfevents.*")):
        run = events_file.parent.name
        for event in EventFileLoader(str(events_file)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    content = value.metadata.plugin_data.content
                    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
                    outcomes[run] = info.hparams["outcome"].string_value
                elif value.tag == "tune/clips_per_s":
                    speeds[run] = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
    assert outcomes == {"trial-000": "ok", "trial-001": "ok, stopped early", "trial-002": "oom"}
    assert speeds["trial-000"] == pytest.approx(300.0) and speeds["trial-001"] == pytest.approx(250.0)


def test_the_confirmation_round_takes_no_trial_that_was_stopped_early(tmp_path, demo_data):
    """A trial stopped early trails a finished one by more than the noise: it is not measured
    again, even when its short window's speed would rank it among the fastest."""
    from rigtrain.tune.search import Search, Timing

    variants = [(12, 4, 0), (48, 1, 0), (3, 16, 0), (12, 4, 1), (48, 1, 1), (3, 16, 1)]  # shapes in the shipped table
    search = Search(tmp_path, _tiny_candidates(tmp_path, demo_data, variants), Timing(90), time.time() + 100, [].append)
    steps = {0: 20, 1: 40, 2: 35, 3: 30, 4: 25}  # clips/s = 48 * steps / 4 s
    for index, n in steps.items():
        search._record(
            index,
            {
                "status": "ok",
                "clips_per_step": 48,
                "steps": n,
                "seconds": 4.0,
                "warmup_s": 0.1,
                "data_wait_s": 0.0,
                "peak_gib": 0.1,
                "reserved_gib": 0.1,
            },
        )
    search._record(2, {**search.result(2), "raced_out": True, "against": 1})
    search._record(5, {"status": "oom", "error": "out of memory"})
    assert [c.index for c in search._finalists()] == [0, 1, 3, 4]


def _tiny_candidates(tmp_path: Path, data: Path, variants: list[tuple[int, int, int]]) -> list:
    """Candidates of the tiny model in one process, (micro-batch, accumulation, loader
    threads) each, the first the plan's own, their trial folders written as a tune does."""
    from rigtrain.rig.facts import Cpu, Rig
    from rigtrain.rig.speed import facts_for
    from rigtrain.train.launch import check_data, write_run_config
    from rigtrain.train.planning import PLANNED, apply_plan, plan_run
    from rigtrain.tune.candidates import planned_candidate, values_of, with_values
    from rigtrain.tune.records import trial_dir
    from rigtrain.tune.search import TRIAL_SETTINGS

    rig = Rig(cpu=Cpu(cores=2, threads=2), ram_gib=16.0)
    micro, accum, workers = variants[0]
    user = {"train.nproc": 1, "data.workers": workers, "train.micro_batch_size": micro, "train.grad_accum_steps": accum}
    config = load_config("demo", overrides=[*TINY_MODEL, *(f"{k}={v}" for k, v in user.items())])
    plan = plan_run(config, rig, user_keys=set(user))
    base = apply_plan(config, plan)
    facts = facts_for(rig, (), 10**6, 1e9, "fp32")
    keys = set(PLANNED) | {"train.nproc", "data.workers", "train.compile"}
    candidates = []
    for index, (micro, accum, workers) in enumerate(variants):
        values = {
            **values_of(base, plan),
            "train.micro_batch_size": micro,
            "train.grad_accum_steps": accum,
            "data.workers": workers,
        }
        c = planned_candidate(base, rig, values, keys, None, facts)
        c.index, c.baseline = index, index == 0
        trial_config = with_values(c.config, TRIAL_SETTINGS)
        _, split = check_data(data, trial_config, c.world)
        write_run_config(trial_dir(tmp_path, index), trial_config, data, rig, c.plan, {"split": split.to_dict()})
        candidates.append(c)
    return candidates


@pytest.mark.slow
def test_the_first_round_moves_to_a_phases_winner_and_skips_what_is_never_one_setting_away(tmp_path, demo_data):
    """A real tune's search over six candidates of the tiny model: the micro-batch phase
    picks its winner (48 x 1 as a rule, one step not four; a busy machine has measured 12 x 4
    faster), the loader-thread phase then varies that winner, and the combinations of a
    losing micro-batch with the other loader-thread count are skipped, never started."""
    from rigtrain.tune.phases import phase_winner
    from rigtrain.tune.records import finished_speed
    from rigtrain.tune.search import Search, Timing

    variants = [(12, 4, 0), (48, 1, 0), (3, 16, 0), (12, 4, 1), (48, 1, 1), (3, 16, 1)]
    candidates = _tiny_candidates(tmp_path, demo_data, variants)
    said: list[str] = []
    search = Search(tmp_path, candidates, Timing(90, timed_s=0.3), time.time() + 100, said.append)
    try:
        search._first_round(list(search.measures), time.time() + 70)
    finally:
        search.close_group()
    status = {i: search.result(i)["status"] for i in range(6)}
    speeds = {i: v for i in range(3) if (v := finished_speed(search.result(i))) is not None}
    winner = phase_winner(0, [1, 2], speeds)  # what the micro-batch phase measured fastest
    losers = [3 + i for i in range(3) if i != winner]
    assert status == {0: "ok", 1: "ok", 2: "ok", 3 + winner: "ok", **{i: "skipped" for i in losers}}, (status, said)
    assert any(line.startswith(f"loader threads: 1 around trial {winner}") for line in said), said
    for index in losers:
        assert not (tmp_path / "trials" / f"{index:03d}" / "started.json").exists()
        assert "one setting" in search.result(index)["error"]
    # the confirmation round's trials: the plan's own (0) and the others that ran their whole
    # window (the winner's loader-thread variant among them: 4 when 48 x 1 won, 3 when 12 x 4)
    finished = [i for i in sorted({1, 2, 3 + winner}) if not search.result(i).get("raced_out")]
    assert sorted(c.index for c in search._finalists()) == [0, *finished], said


@pytest.mark.slow
def test_a_tune_stopped_by_a_closed_terminal_keeps_what_it_measured_and_leaves_no_worker(tmp_path):
    """SIGHUP (a closed terminal, a dropped ssh session) in the middle of the trials: the
    workers are stopped, what was measured is written and chosen from, the exit code says
    which signal, and no traceback stands in for the sentence. SIGTERM (a scheduler, `kill`)
    and Ctrl-C take the same handler (train.stopping.stop_signals)."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    out = tmp_path / "tune"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "rigtrain", "tune", "--out", str(out), "--budget-s", "120", "--trial-seconds", "1"]
    tune = subprocess.Popen(
        [*command, "--set", *TINY_MODEL, "train.nproc=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),  # heard even if the suite runs under nohup
    )
    try:
        deadline = time.monotonic() + 90
        while len(list(out.glob("trials/*/started.json"))) < 2:  # the plan's own, then one more
            assert tune.poll() is None and time.monotonic() < deadline, "the tune never reached its second trial"
            time.sleep(0.05)
        tune.send_signal(signal.SIGHUP)  # the worker groups are sessions of their own
        stdout, stderr = tune.communicate(timeout=60)
    finally:
        tune.kill()
    assert tune.returncode == 128 + signal.SIGHUP, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    record = json.loads((out / "tune.json").read_text())
    assert record["stopped_by"] == "SIGHUP" and "stopped by SIGHUP" in stdout
    said = (out / "tune.log").read_text()  # kept beside the results, past the terminal
    assert said.startswith("=== ") and "stopped by SIGHUP" in said and "not reached before SIGHUP" in said
    status = {t["index"]: t["status"] for t in record["trials"]}
    assert status[0] == "ok" and record["best"] is not None and (out / "tuned.toml").exists()
    cut = [t for t in record["trials"] if t["status"] == "cut off"]  # the second trial, a second long
    assert [t["error"] for t in cut] == ["stopped by SIGHUP during it"], status
    for t in record["trials"]:
        if t["status"] == "not run":
            assert t["error"] == "the tune was stopped by SIGHUP before it", t
    assert "not reached before SIGHUP" in stdout
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
    assert not list((out / "logs").glob("*-store"))  # nor where its ranks met


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(best=7),  # no trial 7
        lambda r: r.update(best="0"),
        lambda r: r.update(trials=[[0]]),
        lambda r: r["trials"][0].update(values=[1]),
        lambda r: r.update(preset=None),
        lambda r: r.pop("machine"),
        lambda r: r.update(fixed_by_user=[]),
        lambda r: r.update(speedup_vs_plan="fast"),
    ],
)
def test_a_hand_edited_tune_json_is_one_line_for_tuned(tmp_path, edit):
    from rigtrain.errors import UserError
    from rigtrain.tune.applying import tuned_overrides

    record = {
        "preset": "demo",
        "machine": "demo | no GPU | 2 threads",
        "best": 0,
        "speedup_vs_plan": 1.2,
        "fixed_by_user": {},
        "trials": [{"index": 0, "values": {"train.micro_batch_size": 24}, "clips_per_s": 100.0}],
    }
    edit(record)
    (tmp_path / "tune.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="damaged"):
        tuned_overrides(str(tmp_path), None, None, [], None, print)


def _unfinished_tune(out: Path) -> None:
    """What a tune killed with SIGKILL leaves: trials/NNN/result.json measured for the
    candidates of then, its groups' queues and logs, no tune.json, and lock.json naming a
    process that is gone."""
    (out / "trials" / "000").mkdir(parents=True)
    (out / "trials" / "000" / "result.json").write_text('{"status": "ok", "clips_per_s": 1e9}')
    (out / "logs").mkdir()
    (out / "group-1.json").write_text("[]")
    (out / "lock.json").write_text('{"pid": 999999999, "host": "gone"}')


def test_a_tune_folder_in_use_is_refused_and_an_unfinished_tune_is_set_aside_never_continued(tmp_path):
    """While a tune holds its folder (the lock `rigtrain train` holds on a run's), a second
    tune there is refused in one line naming the holder. Once nothing holds it, a folder
    whose tune did not finish is moved aside, never deleted and never continued: the
    workers would take its results as measured for whatever the candidates are now.
    (test_tune_keeps_its_budget_... runs a whole tune in such a folder.)"""
    import subprocess
    import sys

    from rigtrain.tune.command import _set_aside_an_unfinished_tune

    out = tmp_path / "tune"
    _unfinished_tune(out)
    hold = "import sys, time; from pathlib import Path; from rigtrain.train.processes import RunLock\n"
    hold += "with RunLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert "left by process 999999999, which is gone; taking it over" in holder.stdout.readline()
        assert holder.stdout.readline().strip() == "held"
        result = run_cli("tune", "--out", str(out), "--budget-s", "30")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "a tune or a run is already running there" in result.stderr
        assert f"process {holder.pid} on" in result.stderr
        assert (out / "trials" / "000" / "result.json").exists()  # nothing of it moved while it was held
    finally:
        holder.kill()
        holder.wait()
    said = []
    _set_aside_an_unfinished_tune(out, said.append)
    (aside,) = out.glob("unfinished-*")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "lock.json", aside.name]
    assert sorted(p.name for p in aside.iterdir()) == ["group-1.json", "logs", "trials"]
    assert json.loads((aside / "trials" / "000" / "result.json").read_text())["clips_per_s"] == 1e9
    assert len(said) == 1 and str(aside) in said[0] and "starts again" in said[0]


def test_a_worker_that_crashes_in_native_code_is_reported_by_the_line_before_its_stacks(tmp_path):
    """A tune worker keeps its Python stacks in its log when it crashes in native code; the
    line that reports it is the last one the worker said, not the end of the dump."""
    import subprocess
    import sys

    from rigtrain.train.processes import last_line

    log = tmp_path / "group-1-rank-0.log"
    crash = (
        "import ctypes\n"
        "from rigtrain.train.stopping import keep_native_crash_stacks\n"
        "keep_native_crash_stacks(None)\n"
        "print('trial 3: building the model', flush=True)\n"
        "def build(): ctypes.string_at(0)\n"
        "build()\n"
    )
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-c", crash], stdout=out, stderr=subprocess.STDOUT, timeout=60)
    assert code.returncode == -11
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text and "in build" in text, text
    assert last_line(log) == f"trial 3: building the model (log, with its Python stacks: {log})"


def test_a_tune_on_a_folder_of_videos_opens_it_once(tmp_path, shared_data, monkeypatch, capsys):
    """Every candidate's data check opened the folder again, probing each video (about 0.1 s
    a video here: for a thousand videos, minutes per candidate before the first trial, out
    of the tune's budget); now the folder is opened once, and what it leaves out said once."""
    import shutil

    from rigtrain.data.ondemand import DecodedClips
    from rigtrain.tune.command import _plan_trials

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(shared_data / "videos" / name, videos)
    (videos / "cut.mp4").write_bytes((videos / "bikes.mp4").read_bytes()[:100_000])
    opened = []
    from_folder = DecodedClips.from_folder.__func__

    def counted(cls, folder, data):
        opened.append(folder)
        return from_folder(cls, folder, data)

    monkeypatch.setattr(DecodedClips, "from_folder", classmethod(counted))
    settings = [*TINY_MODEL, "train.micro_batch_size=2", "train.global_batch_size=4", "eval.holdout=0"]
    planned = _plan_trials("demo", None, settings, str(videos), str(tmp_path / "tune"), None, None, quiet=False)
    candidates = [c for c in planned[-1] if c.pruned is None]
    assert len(candidates) > 1 and len(opened) == 1, (len(candidates), opened)
    assert capsys.readouterr().out.count("[rigtrain] cut.mp4 left out: cannot be opened as a video") == 1
