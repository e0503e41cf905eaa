import json
import os
import shutil

import numpy as np
import pytest

from rigtrain.config import load_config
from rigtrain.data.dataset import ShardDataset
from rigtrain.data.media import MediaError, clip_starts, fit_frame, read_video
from rigtrain.data.narration import clip_text, read_whisper_json
from rigtrain.data.order import ResumableSampler, resume_batch
from rigtrain.data.prepare import prepare
from rigtrain.data.synth import synthesize
from rigtrain.errors import UserError


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synthesize(out, videos=8, seed=3)
    return out


def test_synth_writes_real_files_deterministically(small_world, tmp_path):
    names = sorted(p.name for p in small_world.iterdir())
    assert "labels.json" in names and "shapes_0000.mp4" in names and "shapes_0000.wav" in names
    assert "shapes_0007.wav" not in names and "shapes_0006.json" not in names  # missing modalities exist
    again = synthesize(tmp_path / "again", videos=8, seed=3)
    assert json.loads((again / "labels.json").read_text()) == json.loads((small_world / "labels.json").read_text())
    config = load_config("demo")
    a, _ = read_video(small_world / "shapes_0001.mp4", config.data.fps, config.data.frame_size)
    b, _ = read_video(again / "shapes_0001.mp4", config.data.fps, config.data.frame_size)
    assert np.array_equal(a, b)
    narration = read_whisper_json(small_world / "shapes_0000.json")
    event = json.loads((small_world / "labels.json").read_text())["videos"]["shapes_0000"][0]
    assert narration[0].text == f"a {event['colour']} {event['shape']} moves {event['direction']}"


def test_prepare_synth_round_trip(small_world, tmp_path):
    config = load_config("demo", overrides=["data.shard_clips=20"])
    index = prepare(small_world, tmp_path / "prep", config.data, workers=2)
    assert index["clips"] == 8 * 6  # 6-second videos, 1-second clips
    assert [s["clips"] for s in index["shards"]] == [20, 20, 8]
    assert index["skipped"] == []
    dataset = ShardDataset(tmp_path / "prep", config.data)
    item = dataset[7]
    assert item["video"].shape == (8, 32, 32, 3) and str(item["video"].dtype) == "torch.uint8"
    assert item["audio"].shape == (8000,)
    clips = np.concatenate([np.load(tmp_path / "prep" / s["dir"] / "clips.npy") for s in index["shards"]])
    sources = [s["video"] for s in index["sources"]]
    # video 7 has no .wav: its clips are marked, and their audio is silence, not noise
    no_audio = clips["source"] == sources.index("shapes_0007.mp4")
    assert not clips["has_audio"][no_audio].any() and clips["has_audio"][~no_audio].all()
    no_text = clips["source"] == sources.index("shapes_0006.mp4")
    assert not clips["has_text"][no_text].any()
    # narration bytes and their times survive the round trip, to the millisecond
    labels = json.loads((small_world / "labels.json").read_text())
    segments = np.load(tmp_path / "prep" / "shard-00000" / "segments.npy")
    first = segments[segments["clip"] == 0][0]
    event = labels["videos"]["shapes_0000"][0]
    assert abs(first["start_s"] - event["start"]) < 1e-3 and abs(first["end_s"] - event["end"]) < 1e-3
    text = bytes(dataset[0]["text"][: dataset[0]["text_len"]].tolist()).decode()
    assert text == f"a {event['colour']} {event['shape']} moves {event['direction']}"
    # in every shard (sources span shard borders at 20 clips), each segment points at a clip
    # it overlaps, and at that clip's bytes
    for shard in index["shards"]:
        path = tmp_path / "prep" / shard["dir"]
        shard_clips, texts = np.load(path / "clips.npy"), np.load(path / "text.npy")
        for seg in np.load(path / "segments.npy"):
            start = shard_clips[seg["clip"]]["start_s"]
            assert seg["start_s"] < start + 1.0 and seg["end_s"] > start
            words = bytes(texts[seg["clip"]][seg["offset"] : seg["offset"] + seg["length"]]).decode().split()
            assert words[0] == "a" and words[3] == "moves"
    # Shapes-world labels travel with the clips (for evaluation)
    assert np.load(tmp_path / "prep" / "shard-00000" / "labels.npy")[0].tolist() == [
        labels[k + "s"].index(event[k]) for k in ("shape", "colour", "direction")
    ]


def test_real_h264_videos(shared_data, tmp_path):
    import cv2

    config = load_config("demo")
    src = tmp_path / "videos"
    src.mkdir()
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(shared_data / "videos" / name, src)
    index = prepare(src, tmp_path / "prep", config.data, workers=1)
    by_name = {s["video"]: s for s in index["sources"]}
    assert by_name["bikes.mp4"]["clips"] == 10  # 10 s at 25 fps -> ten 1-second clips
    assert by_name["carphone_pristine.mp4"]["clips"] == 4  # 4.004 s at 29.97 fps
    assert by_name["bikes.mp4"]["audio"] is None  # no audio track: masked, not invented
    # a frame read back from the shards is the frame OpenCV decodes, resized the same way
    dataset = ShardDataset(tmp_path / "prep", config.data)
    source = [s["video"] for s in index["sources"]].index("bikes.mp4")
    clips = np.load(tmp_path / "prep" / "shard-00000" / "clips.npy")
    first = int(np.nonzero(clips["source"] == source)[0][1])  # the clip starting at 1.0 s
    cap = cv2.VideoCapture(str(src / "bikes.mp4"))
    for _ in range(25 + 3 * 25 // 8 + 1):  # frame 3 of that clip at 8 fps = source frame 25 + floor(3*25/8)
        ok, frame = cap.read()
    expected = fit_frame(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), 32, 32)
    got = dataset[first]["video"][3].numpy()
    mse = np.mean((got.astype(float) - expected.astype(float)) ** 2)
    assert mse == 0 or 10 * np.log10(255**2 / mse) >= 40


def test_real_whisper_transcripts(shared_data):
    for name in ("cheapest_dl_hardware.json", "vision_transformer.json"):
        segments = read_whisper_json(shared_data / "transcripts" / name)
        assert len(segments) > 5 and all(s.end >= s.start for s in segments)
    segments = read_whisper_json(shared_data / "transcripts" / "cheapest_dl_hardware.json")
    text, placed = clip_text(segments, 0.0, 10.0, 64)
    assert len(text) <= 64 and text.decode("utf-8").startswith("Okay, so you started")
    assert placed[0][0].start == 0.0


def test_narration_cut_keeps_whole_utf8_characters():
    from rigtrain.data.narration import Segment

    text, _ = clip_text([Segment(0, 1, "héllo wörld ñ")], 0, 1, 8)
    assert len(text) <= 8 and text.decode("utf-8") == "héllo w"


def test_bad_files_are_skipped_with_their_reason(small_world, tmp_path):
    import soundfile as sf

    src = tmp_path / "src"
    shutil.copytree(small_world, src)
    data = (src / "shapes_0002.mp4").read_bytes()
    (src / "shapes_0002.mp4").write_bytes(data[: len(data) // 20])  # truncated
    (src / "shapes_0003.json").write_text(json.dumps({"hello": "not narration"}))
    sf.write(src / "shapes_0004.wav", np.zeros(16000 * 2, np.float32), 16000)  # 2 s of sound for a 6 s video
    (src / "notes.txt").write_text("stray file")
    config = load_config("demo")
    index = prepare(src, tmp_path / "prep", config.data, workers=1)
    reasons = {s["file"]: s["reason"] for s in index["skipped"]}
    sources = {s["video"]: s for s in index["sources"]}
    # a bad sidecar is skipped, its video is kept without that modality
    assert "not narration" in reasons["shapes_0003.json"] and sources["shapes_0003.mp4"]["narration"] is None
    assert "audio lasts 2.00 s but the video 6.00 s" in reasons["shapes_0004.wav"]
    assert sources["shapes_0004.mp4"]["audio"] is None and sources["shapes_0001.mp4"]["audio"] == "shapes_0001.wav"
    assert "notes.txt" in reasons
    # a truncated mp4 either decodes fewer frames (kept, shorter) or is skipped with a reason
    assert "shapes_0002.mp4" in reasons or sources["shapes_0002.mp4"]["clips"] < 6
    assert len(index["sources"]) + sum(1 for f in reasons if f.endswith(".mp4")) == 8
    shard = tmp_path / "prep" / index["shards"][0]["dir"]
    clips = np.load(shard / "clips.npy")
    source_ids = {s["video"]: i for i, s in enumerate(index["sources"])}
    assert not clips["has_audio"][clips["source"] == source_ids["shapes_0004.mp4"]].any()
    assert not clips["has_text"][clips["source"] == source_ids["shapes_0003.mp4"]].any()


def test_prepare_refuses_to_overwrite(small_world, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an empty folder"):
        prepare(small_world, tmp_path / "out", load_config("demo").data)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="no video"):
        prepare(tmp_path / "out", tmp_path / "out2", load_config("demo").data)


def test_shards_of_a_prepare_still_writing_are_refused_saying_so(small_world, tmp_path):
    """Not "no index.json; prepare videos first": a prepare has them in hand."""
    from rigtrain.data.dataset import read_index

    said = []

    def while_it_writes(out):
        with pytest.raises(UserError) as refused:
            read_index(out)
        said.append(str(refused.value))

    prepare(small_world, tmp_path / "out", load_config("demo").data, on_start=while_it_writes)
    assert said == [
        f"--data {tmp_path / 'out'}: a `rigtrain data prepare` is writing into {tmp_path / 'out'} now; "
        "train on it once it has finished"
    ]
    assert read_index(tmp_path / "out")["clips"] > 0  # and once it has


def test_a_prepare_says_early_when_the_rest_will_not_fit_on_the_disk(small_world, tmp_path, monkeypatch):
    """After a few videos (3 of these 8), the clips per video so far times the videos left,
    at a clip's size in shards, against the disk's free space: said once, as a warning."""
    import collections

    from rigtrain.data import prepare as preparing
    from rigtrain.data.shards import clip_bytes

    data = load_config("demo").data
    per_video = 6 * clip_bytes(data)  # Shapes world: 6-second videos, 1-second clips (the demo preset)
    usage = collections.namedtuple("usage", "total used free")
    for free, warned in ((4 * per_video, True), (6 * per_video, False)):  # the 5 left need about 5 videos' worth
        monkeypatch.setattr(preparing.shutil, "disk_usage", lambda path, free=free: usage(0, 0, free))
        said = []
        out = tmp_path / f"free-{free}"
        prepare(small_world, out, data, log=said.append)
        warnings = [line for line in said if line.startswith("warning:")]
        assert len(warnings) == int(warned), said
        if warned:
            assert warnings[0].startswith(
                "warning: at the clips per video so far, the 5 video(s) still to do make about"
            )
            assert f"the disk of {out} has" in warnings[0] and "the same command then goes on" in warnings[0]


def test_shards_must_match_the_clip_shape(demo_data):
    with pytest.raises(UserError, match="data.fps"):
        ShardDataset(demo_data, load_config("demo", overrides=["data.fps=4"]).data)


def test_a_file_that_is_no_video_says_why(tmp_path):
    """Empty, not a video at all, or a container with sound but no picture: each says which."""
    import av

    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "zeros.mp4").write_bytes(b"\x00" * 1000)
    with av.open(str(tmp_path / "sound.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, 1024 * i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    says = {"empty.mp4": "the file is empty", "zeros.mp4": "Invalid data", "sound.mp4": "has no video stream"}
    for name, reason in says.items():
        with pytest.raises(MediaError, match=reason):
            read_video(tmp_path / name, 8.0, (32, 32))


def test_clip_starts_use_the_end_of_a_video():
    assert clip_starts(48, 8, 8) == [0, 8, 16, 24, 32, 40]  # 6 s at 8 fps: six 1-second clips
    assert clip_starts(33, 8, 8) == [0, 8, 16, 24]  # 1 frame left: reported unused, not a near-copy
    assert clip_starts(45, 8, 8) == [0, 8, 16, 24, 32, 37]  # 5 frames left: a clip ending on the last frame
    assert clip_starts(7, 8, 8) == []
    assert clip_starts(24, 8, 4) == [0, 4, 8, 12, 16]
    assert clip_starts(20, 8, 2.5) == [0, 2, 5, 8, 10, 12]  # a fractional stride rounds each start


def test_sampler_is_deterministic_disjoint_and_resumable():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    a = ResumableSampler(50, rank=0, world=2, micro_batch=4, seed=1)
    b = ResumableSampler(50, rank=1, world=2, micro_batch=4, seed=1)
    assert a.batches_per_epoch == 6
    epoch_a, epoch_b = take(a, 24), take(b, 24)
    assert not set(epoch_a) & set(epoch_b)  # ranks see different clips in an epoch
    assert take(ResumableSampler(50, rank=0, world=2, micro_batch=4, seed=1), 24) == epoch_a
    assert take(ResumableSampler(50, rank=0, world=2, micro_batch=4, seed=2), 24) != epoch_a
    full = take(a, 80)  # crosses into later epochs, each reshuffled
    assert full[24:48] != full[:24]
    resumed = ResumableSampler(50, rank=0, world=2, micro_batch=4, seed=1, start_batch=9)
    assert take(resumed, 80 - 36) == full[36:]
    with pytest.raises(UserError, match="fewer than one batch"):
        ResumableSampler(7, rank=0, world=2, micro_batch=4, seed=0)


@pytest.mark.parametrize("before, now", [((1, 4), (1, 2)), ((1, 3), (1, 8)), ((2, 4), (1, 3)), ((1, 5), (3, 2))])
def test_a_resume_with_another_micro_batch_or_rank_count_reads_on_where_the_epoch_was(before, now):
    """(ranks, micro-batch size) before and after the resume: the rest of the epoch is read,
    none of it skipped, and fewer clips than one new step read twice."""
    clips, epoch = 50, 1

    def read(sizes, start: int, count: int) -> list[int]:  # every rank's next `count` micro-batches
        ranks, size = sizes
        out = []
        for rank in range(ranks):
            it = iter(ResumableSampler(clips, rank=rank, world=ranks, micro_batch=size, seed=3, start_batch=start))
            out += [next(it) for _ in range(count * size)]
        return out

    order = ResumableSampler(clips, rank=0, world=1, micro_batch=1, seed=3).epoch_order(epoch)  # the permutation
    batches = clips // before[0] // before[1]
    for done in range(batches):  # a checkpoint after every micro-batch of the epoch
        position = epoch * batches + done
        start = resume_batch(position, clips, before=before, now=now)
        assert resume_batch(position, clips, before=before, now=before) == position
        already = set(order[: done * before[0] * before[1]])
        rest = clips // now[0] // now[1] - (start - epoch * (clips // now[0] // now[1]))
        after = read(now, start, rest)
        usable = set(order[: (clips // now[0] // now[1]) * now[0] * now[1]])  # the new sizes' drop_last epoch
        assert usable - already <= set(after), (done, sorted(usable - already - set(after)))  # none skipped
        assert len(set(after) & already) < now[0] * now[1]  # read again: less than one new step


def test_shards_from_before_data_resize_still_load(demo_data, tmp_path):
    """Earlier shards describe their centre crop in words; they are `crop` shards."""
    old = tmp_path / "old"
    shutil.copytree(demo_data, old)
    index = json.loads((old / "index.json").read_text())
    index["params"]["resize"] = "centre crop to the target aspect, then INTER_AREA"
    (old / "index.json").write_text(json.dumps(index))
    assert len(ShardDataset(old, load_config("demo").data)) == index["clips"]
    with pytest.raises(UserError, match="data.resize"):
        ShardDataset(old, load_config("demo", overrides=["data.resize=pad"]).data)


def test_sampler_draws_only_the_clips_it_is_given():
    train = np.array([0, 2, 3, 5, 7, 8, 11, 13, 17, 19])
    sampler = iter(ResumableSampler(train, rank=0, world=1, micro_batch=2, seed=0))
    drawn = [next(sampler) for _ in range(50)]
    assert set(drawn) == set(train.tolist())  # every training clip, and never a held-out one


def test_batches_carry_narration_segments_and_labels(demo_data, demo_config):
    """Each segment's byte span in the clip's text, as segments.npy records it, and the
    Shapes-world labels (for evaluation only)."""
    from dataclasses import replace

    dataset = ShardDataset(demo_data, replace(demo_config.data, segments_per_clip=4))
    index = json.loads((demo_data / "index.json").read_text())
    segments = np.load(demo_data / index["shards"][0]["dir"] / "segments.npy")
    narrated = sorted({int(s["clip"]) for s in segments})[:6]
    batch = dataset.batch(narrated)
    assert batch["segment_offset"].shape == batch["segment_len"].shape == (6, 4)  # data.segments_per_clip slots
    assert ShardDataset(demo_data, demo_config.data).batch(narrated)["segment_len"].shape == (6, 1)  # the demo's
    for row, clip in enumerate(narrated):
        spans = [(int(s["offset"]), int(s["length"])) for s in segments if s["clip"] == clip]
        text = bytes(batch["text"][row, : batch["text_len"][row]].tolist())
        for k, (offset, length) in enumerate(spans[:4]):
            assert (batch["segment_offset"][row, k].item(), batch["segment_len"][row, k].item()) == (offset, length)
            words = text[offset : offset + length].decode()
            assert words.startswith("a ") and " moves " in words  # one whole Shapes-world sentence
        assert (batch["segment_len"][row, len(spans) :] == 0).all()
    labels = batch["labels"].numpy()
    assert labels.dtype == np.int16 and labels.shape == (6, 3) and (labels >= 0).all()
    names = index["labels"]
    first = bytes(batch["text"][0, : batch["text_len"][0]].tolist()).decode()
    assert names["colour"][labels[0, 1]] in first and names["direction"][labels[0, 2]] in first


def crash_on_three(job: int) -> int:
    """A decoder that dies on one damaged file: the process ends by SIGSEGV, as FFmpeg's did."""
    import os
    import signal

    if job == 3:
        os.kill(os.getpid(), signal.SIGSEGV)
    return job * 10


@pytest.mark.parametrize("workers, isolate", [(2, False), (1, True)])
def test_a_video_that_crashes_its_decoder_is_left_out_and_the_rest_go_on(workers, isolate):
    """A segfault in FFmpeg on one damaged file ended the whole prepare, and the same
    command again ended the same way. The job that kills its process is run again alone
    (a worker killed for memory beside others may well finish alone), and when it dies
    alone too, that file gets its reason and every other job its result, in order."""
    from rigtrain.data.processes import in_order

    results = list(in_order(crash_on_three, list(range(8)), workers, lambda job: f"crashed {job}", isolate))
    assert results == [0, 10, 20, "crashed 3", 40, 50, 60, 70]


@pytest.mark.parametrize(
    "content", ["{not json", '{"videos": {"a": 1}}', '{"videos": [{"file": "a.mp4"}]}', '{"shapes": [], "videos": {}}']
)
def test_a_labels_json_that_is_not_shapes_world_labels_is_named_not_a_crash(tmp_path, content):
    """labels.json is Shapes world's (data synth); a user's folder can hold another file of
    that name, a labelling tool's export or a broken one. It crashed prepare (a JSON error,
    a KeyError in a worker); it is left out, named with the reason, and labels nothing."""
    from rigtrain.data.prepare import prepare
    from rigtrain.data.synth import synthesize

    synthesize(tmp_path / "world", videos=2, seed=1)
    src = tmp_path / "mine"
    src.mkdir()
    shutil.copy(next((tmp_path / "world").glob("*.mp4")), src / "a.mp4")
    (src / "labels.json").write_text(content)
    index = prepare(src, tmp_path / "prep", load_config("demo").data)
    assert index["labels"] is None and index["clips"] > 0
    assert {"file": "labels.json", "reason": "not Shapes-world labels (as `data synth` writes them)"} in index[
        "skipped"
    ]
    assert prepare(tmp_path / "world", tmp_path / "world-prep", load_config("demo").data)["labels"] is not None


def _edit_index(edit):
    def apply(folder):
        index = json.loads((folder / "index.json").read_text())
        edit(index)
        (folder / "index.json").write_text(json.dumps(index))

    return apply


def _edit_array(name, edit):
    def apply(folder):
        path = folder / "shard-00000" / f"{name}.npy"
        array = np.load(path)
        edit(array)
        np.save(path, array)

    return apply


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda f: (f / "index.json").write_bytes(b'{"format": 1, "x": "\xb1"}'), "corrupt"),
        (_edit_index(lambda i: i.update(params=[])), "params are missing"),
        (_edit_index(lambda i: i["params"].update(fps="8")), "params.fps"),
        (_edit_index(lambda i: i["shards"][0].update(dir="../elsewhere")), "list of shards"),
        (_edit_index(lambda i: i["shards"][0].update(clips=-1)), "list of shards"),
        (_edit_index(lambda i: i["sources"].append(3)), "source videos"),
        (_edit_index(lambda i: i["labels"].pop("shape")), "label names"),
        (_edit_array("clips", lambda a: a["source"].__setitem__(0, 10**6)), "names a source video"),
        (_edit_array("text_len", lambda a: a.__setitem__(0, 10**4)), "text_len.npy"),
        (_edit_array("segments", lambda a: a["offset"].__setitem__(0, 10**6)), "segments.npy row 0"),
        (_edit_array("labels", lambda a: a.__setitem__((0, 1), 9)), "labels.npy"),
    ],
)
def test_shards_edited_after_prepare_are_one_line_naming_the_file(demo_data, tmp_path, damage, says):
    """index.json and the shards' small arrays index each other and have no checksums: a
    value out of range (a disk, an editor, a half-copied folder) is found when the data is
    opened and named, not met later as an IndexError in the loader or the evaluation."""
    folder = tmp_path / "data"
    # the small files copied, the large ones linked: this edits only the small ones
    shutil.copytree(
        demo_data,
        folder,
        ignore=shutil.ignore_patterns("*.lock"),
        copy_function=lambda src, dst: (
            os.symlink(src, dst) if src.endswith(("video.npy", "audio.npy")) else shutil.copy2(src, dst)
        ),
    )
    damage(folder)
    with pytest.raises(UserError, match=says) as caught:
        ShardDataset(folder, load_config("demo").data)
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)


def test_a_damaged_cache_of_the_embedded_dataset_is_built_again(tmp_path, monkeypatch):
    """The Shapes-world cache is rigtrain's own: a damaged one is rebuilt (and said), never
    an error telling the user to run a `data prepare` they never ran."""
    from rigtrain.data.embedded import embedded_dataset

    monkeypatch.setenv("RIGTRAIN_CACHE", str(tmp_path))
    data = load_config("demo", overrides=["data.synth_videos=6"]).data
    said = []
    first = embedded_dataset(data, log=said.append)
    clips = len(ShardDataset(first, data))
    assert embedded_dataset(data, log=said.append) == first and not any("is damaged" in s for s in said)
    video = first / "shard-00000" / "video.npy"
    with video.open("r+b") as f:
        f.truncate(video.stat().st_size // 2)
    again = embedded_dataset(data, log=said.append)
    assert again == first and len(ShardDataset(again, data)) == clips
    assert [s for s in said if "is damaged" in s] == [
        f"the cached Shapes-world dataset is damaged ({video}: {video.stat().st_size // 2:,} bytes where its "
        f"header promises {video.stat().st_size:,}); building it again"
    ]
    assert not [p.name for p in tmp_path.iterdir() if ".damaged" in p.name]  # nothing left beside it
