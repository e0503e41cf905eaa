"""Evaluation: kNN, probe and retrieval on hand-made features, the held-out split, the
schedule of evaluations during training, and recurrent windows in the model."""

import numpy as np
import pytest
import torch
from test_model import random_batch

from rigtrain.config import EvalConfig, load_config
from rigtrain.data.split import heldout_videos, lopsided_split_note, name_hash, split_clips
from rigtrain.evaluate.evaluation import EVAL_MIN_BATCH, Features, eval_batch_size, evaluate, flat_metrics, spread
from rigtrain.evaluate.measures import knn_predict, linear_probe, majority_rate, retrieval
from rigtrain.model import build_model


def clusters(labels, dim=8, noise=0.1, seed=0):
    """Features around one direction per class (the same directions whatever the seed)."""
    centres = torch.randn(8, dim, generator=torch.Generator().manual_seed(100))
    g = torch.Generator().manual_seed(seed)
    return centres[torch.as_tensor(labels)] + noise * torch.randn(len(labels), dim, generator=g)


def test_weighted_knn_follows_the_neighbours_votes():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # Two near neighbours of class 0 outvote one of class 1 at k = 3...
    assert knn_predict(bank, labels, torch.tensor([[0.6, 0.4]]), classes=2, k=3).item() == 0
    # ...but a query right on the class-1 point wins by its weight exp(1 / T).
    assert knn_predict(bank, labels, torch.tensor([[0.0, 1.0]]), classes=2, k=3).item() == 1
    assert knn_predict(bank, labels, torch.tensor([[0.0, 1.0]]), classes=2, k=1).item() == 1


def test_knn_and_probe_read_clustered_labels_and_chance_is_the_majority_rate():
    train_labels = np.array([0, 1, 2, 3] * 10)
    test_labels = np.array([0, 0, 0, 1, 2, 3])
    train, test = clusters(train_labels), clusters(test_labels, seed=1)
    assert (knn_predict(train, torch.from_numpy(train_labels), test, classes=4).numpy() == test_labels).all()
    assert (linear_probe(train, torch.from_numpy(train_labels), test, classes=4).numpy() == test_labels).all()
    assert majority_rate(test_labels) == 0.5  # always guessing 0 scores 3 of 6


def test_retrieval_ranks_and_chance():
    perfect = torch.eye(5)
    r = retrieval(perfect, perfect)
    assert (r["r1"], r["r5"], r["medr"]) == (1.0, 1.0, 1.0)
    assert r["chance_r1"] == 0.2 and r["chance_r5"] == 1.0 and r["chance_medr"] == 3.0
    # Query 0 ranks its item second; query 1 ranks its item behind all four others.
    items = torch.eye(4)
    queries = torch.tensor([[0.9, 1.0, 0, 0], [0.9, 0.0, 0.8, 0.7], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    r = retrieval(queries, items)
    assert r["r1"] == 0.5 and r["r5"] == 1.0
    # Two identical items tie: the right one is first half of the time.
    twins = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert retrieval(twins, twins)["r1"] == 0.5


def features(n, labels, vt=True, seed=0):
    video = clusters(labels[:, 0], seed=seed)
    embed = torch.nn.functional.normalize(video, dim=1)
    return Features(video, embed if vt else None, embed if vt else None, np.ones(n, bool), labels)


def test_evaluate_writes_the_contract_keys():
    labels = np.stack([np.arange(40) % 4] * 3, axis=1)
    bank, held = features(40, labels), features(12, labels[:12], seed=1)
    names = {k: ["a", "b", "c", "d"] for k in ("shape", "colour", "direction")}
    result = evaluate(bank, held, names, EvalConfig())
    for kind in ("knn", "probe"):
        assert set(result[kind]) == {"shape", "colour", "direction"}
        assert {"top1", "chance"} <= set(result[kind]["shape"])
        assert result[kind]["shape"]["top1"] == 1.0
    for direction in ("t2v", "v2t"):
        assert {"r1", "r5", "r10", "medr", "chance_r1"} <= set(result["retrieval"][direction])
    assert "eval/knn_direction_top1" in flat_metrics(result)
    # No labels (user videos) and no text head: said, not invented.
    bare = evaluate(features(40, labels, vt=False), features(12, labels[:12], vt=False), None, EvalConfig())
    assert bare["knn"] == {} and bare["retrieval"] == {} and len(bare["notes"]) == 2


def test_a_gopros_chapters_of_one_recording_stay_on_one_side_of_the_split():
    """A long GoPro recording is several chapter files; one scene runs on across them, so a
    chapter held out while its neighbour trains would score the model on what it saw."""
    from rigtrain.data.split import recording_of

    names = [f"day{d}/GX{c:02d}{n:04d}.MP4" for d in (1, 2) for n in range(40, 52) for c in range(1, 4)]
    names += [f"old/GOPR{n:04d}.MP4" for n in range(7, 19)] + [
        f"old/GP{c:02d}{n:04d}.MP4" for n in range(7, 19) for c in (1, 2)
    ]
    names += [f"phone_{i}.mp4" for i in range(20)]
    held = set(heldout_videos(names, 0.3))
    recordings = {}
    for name in names:
        recordings.setdefault(recording_of(name), set()).add(name)
    assert len(recordings) == 2 * 12 + 12 + 20  # a recording of 3 chapters, of 1 + 2, and 20 phone videos
    for chapters in recordings.values():
        assert chapters <= held or not chapters & held, chapters  # all held out, or none
    assert 0 < len(held) < len(names)
    assert heldout_videos(["GX010001.MP4", "GX020001.MP4"], 0.5) == []  # one recording: nothing to hold out


def test_the_split_holds_out_whole_videos_and_is_stable_when_videos_are_added():
    names = [f"video_{i:03d}.mp4" for i in range(40)]
    held = heldout_videos(names, 0.25)
    assert 4 <= len(held) <= 16
    assert set(held) <= set(heldout_videos(names + [f"new_{i}.mp4" for i in range(30)], 0.25))
    assert all(name_hash(n) < 0.25 for n in held)
    clips = [n for n in names for _ in range(3)]  # three clips per video
    split = split_clips(clips, held)
    assert not set(split.train) & set(split.heldout)
    assert len(split.train) + len(split.heldout) == len(clips)
    assert {clips[i] for i in split.heldout} == set(held)
    # Tiny datasets: at least one video on each side; a single video cannot be split.
    assert len(heldout_videos(["a.mp4", "b.mp4"], 0.01)) == 1
    assert len(heldout_videos(["a.mp4", "b.mp4"], 0.99)) == 1
    assert heldout_videos(["a.mp4"], 0.5) == [] and heldout_videos(names, 0.0) == []
    # whole videos of unequal lengths: the run says so when most clips end up held out
    assert lopsided_split_note(split, 0.25) is None
    lecture = ["lecture.mp4"] * 90 + ["intro.mp4"] * 10
    for held_out, says in ((["lecture.mp4"], True), (["intro.mp4"], False)):
        note = lopsided_split_note(split_clips(lecture, held_out), 0.2)
        assert (note is not None) == says and (not says or "90% of the clips" in note and "eval.holdout=0" in note)


def test_evaluations_space_out_exponentially():
    assert EvalConfig(first_step=10, growth=2.0).steps(60) == [10, 20, 40, 60]
    assert EvalConfig(first_step=5, growth=1.0).steps(16) == [5, 10, 15, 16]
    assert EvalConfig(first_step=100).steps(60) == [60]
    assert list(spread(np.arange(100), 5)) == [0, 25, 50, 74, 99]


def test_recurrent_windows_carry_the_latent_and_skip_blind_windows():
    base = ["model.droptoken_keep=1.0", "model.future_query_prob=1.0", "model.weight_va=0", "model.weight_vt=0"]
    two = load_config("demo", overrides=base + ["data.recurrent_windows=2"])
    assert two.data.clip_frames == 8 + 4 and two.data.clip_samples == 12000  # one step (= present) more
    torch.manual_seed(0)
    model = build_model(two.model, two.data).eval()
    batch = random_batch(two.data)
    both = model(batch)
    blind = build_model(
        load_config("demo", overrides=base + ["data.recurrent_windows=2", "model.blind_windows=1"]).model, two.data
    ).eval()
    blind.load_state_dict(model.state_dict())
    second = blind(batch)
    # Window 0 alone is what a one-window model sees on the clip's first 8 frames.
    one = load_config("demo", overrides=base)
    single = build_model(one.model, one.data).eval()
    single.load_state_dict(model.state_dict())
    first = single({**batch, "video": batch["video"][:, :8], "audio": batch["audio"][:, :8000]})
    for key in ("pc_video_present", "pc_video_future", "pc_audio_present"):
        assert both[key].item() == pytest.approx((first[key].item() + second[key].item()) / 2, rel=1e-5), key
    # The second window starts from the first one's prediction: frames only the blind
    # window 0 sees still change the loss (at initialisation only slightly, but on the CPU
    # the same inputs give bit-identical results, so any change is the carried latent).
    changed = {**batch, "video": batch["video"].clone()}
    changed["video"][:, :4] = 255 - changed["video"][:, :4]
    assert blind(changed)["loss"].item() != second["loss"].item()
    assert blind({**batch})["loss"].item() == second["loss"].item()


def test_window_settings_are_checked():
    with pytest.raises(Exception, match="model.blind_windows"):
        load_config("demo", overrides=["model.blind_windows=1"])
    with pytest.raises(Exception, match="data.window_step_frames"):
        load_config("demo", overrides=["data.recurrent_windows=2", "data.window_step_frames=3"])
    with pytest.raises(Exception, match="eval.holdout"):
        load_config("demo", overrides=["eval.holdout=1.0"])


def test_evaluation_batches_are_the_micro_batch_on_a_gpu_and_no_smaller_than_16_on_a_cpu():
    """On a GPU the plan sized the micro-batch to the card and the first steps rehearse one
    evaluation batch of it; on a CPU a small micro-batch would pay each forward's fixed cost
    again and again (ZeRO-3, 1152 clips: 7.3 s in batches of 4, 2.6 s in batches of 16)."""
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [eval_batch_size(m, gpu) for m in (1, 4, 48)] == [1, 4, 48]
    assert [eval_batch_size(m, cpu) for m in (1, 4, 48)] == [EVAL_MIN_BATCH, EVAL_MIN_BATCH, 48]
