"""The README's demo, trained whole, then `rigtrain eval`: is it learning? (issue 4's targets)."""

import json
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_data) -> Path:
    """`rigtrain train` with the demo preset as the README runs it (about 4 minutes)."""
    run = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli("train", "--out", str(run), timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


def test_the_demo_learns_what_it_was_never_told(demo_run):
    """Held-out clips, labels never seen in training: colour and retrieval at least twice
    chance (issue 4's target). Measured over runs on this 2-core machine: colour kNN 0.97-0.98
    against 0.37, t2v R@5 0.25-0.42 against 0.10. Shape (0.33-0.50 against 0.30) and
    direction (0.38-0.43) vary too much from run to run to hold a 2x line; they are not
    asserted here, and the README says so."""
    record = json.loads((demo_run / "eval.json").read_text())
    assert record["step"] == 600
    knn, retrieval = record["knn"], record["retrieval"]
    shown = json.dumps({k: record[k] for k in ("knn", "probe", "retrieval")})
    assert knn["colour"]["top1"] >= 2 * knn["colour"]["chance"], shown
    assert record["probe"]["colour"]["top1"] >= 2 * record["probe"]["colour"]["chance"], shown
    for direction in ("t2v", "v2t"):
        r = retrieval[direction]
        assert r["r5"] >= 2 * r["chance_r5"], shown
        assert r["medr"] < r["chance_medr"] / 2, shown


def test_the_split_is_recorded_and_evaluations_are_logged(demo_run):
    config = json.loads((demo_run / "config.json").read_text())
    split = config["split"]
    assert split["heldout_videos"] and split["heldout_clips"] > 0
    assert split["train_clips"] + split["heldout_clips"] == 288
    rows = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in rows if "eval/knn_direction_top1" in r]
    assert evaluated == [75, 150, 300, 600]  # first_step 75, each wait twice the last, and the end
    assert all({"loss_va_nce", "loss_vt_milnce", "loss_pc"} <= set(r) for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(demo_run / "tb" / "train")).Reload().Tags()["scalars"]
    assert {"eval/knn_shape_top1", "eval/t2v_r5", "loss/loss_va_nce", "loss/loss_vt_milnce"} <= set(tags)


def test_eval_command_rescores_the_checkpoint(demo_run):
    """`rigtrain eval` loads the newest checkpoint without DeepSpeed and reproduces what the
    trainer measured at that step."""
    during = json.loads((demo_run / "eval.json").read_text())
    result = run_cli("eval", str(demo_run), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    after = json.loads(result.stdout)  # --json: one document on stdout, nothing else
    assert after["checkpoint"] == "step00000600"
    for kind in ("knn", "probe"):
        for label in ("shape", "colour", "direction"):
            assert after[kind][label]["top1"] == pytest.approx(during[kind][label]["top1"], abs=0.02), (kind, label)
    assert after["retrieval"]["t2v"]["r5"] == pytest.approx(during["retrieval"]["t2v"]["r5"], abs=0.03)
    assert json.loads((demo_run / "eval.json").read_text())["checkpoint"] == "step00000600"
    table = run_cli("eval", str(demo_run))
    assert table.returncode == 0 and "kNN top-1" in table.stdout and "t2v" in table.stdout


def test_eval_refuses_what_is_not_a_finished_run(tmp_path):
    result = run_cli("eval", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "no config.json" in result.stderr and len(result.stderr.splitlines()) == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {}, "data_dir": str(tmp_path)}))
    result = run_cli("eval", str(run))
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr
