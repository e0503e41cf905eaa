import dataclasses
import re

import pytest
import torch

from rigtrain.config import ConfigError, load_config, preset_names
from rigtrain.config.loading import parse_overrides, read_config_file
from rigtrain.config.schema import SECTIONS, field_docs
from rigtrain.model import build_model, count_parameters
from rigtrain.train.flops import meta_batch


@pytest.mark.parametrize("name", ["demo", "small", "base"])
def test_every_shipped_preset_parses_and_builds(name):
    assert name in preset_names()
    config = load_config(name)
    with torch.device("meta"):  # base is 140M parameters: no memory needed to check shapes
        model = build_model(config.model, config.data)
    assert count_parameters(model) > 0


@pytest.mark.parametrize("name", ["demo", "small", "base"])
def test_every_preset_runs_a_train_step_on_the_meta_device(name):
    """Forward and backward with the preset's real clip shape, without allocating memory:
    every tubelet, audio segment and query lines up."""
    config = load_config(name)
    d = config.data
    with torch.device("meta"):
        model = build_model(config.model, d)
        out = model(meta_batch(d, 2))
        out["loss"].backward()
    assert out["loss"].shape == ()
    assert model.video_head.weight.grad is not None


def test_base_follows_vatt_base_video_tower():
    config = load_config("base")
    assert (config.model.d_model, config.model.enc_layers, config.model.heads) == (768, 12, 12)
    assert config.model.tubelet == (4, 16, 16)
    assert (config.data.clip_frames, *config.data.frame_size) == (32, 224, 224)


def test_set_overrides_are_typed_and_repeatable():
    config = load_config(
        "demo",
        overrides=[
            "train.steps=7",
            "train.lr=3e-4",
            "model.evolver_shared=true",
            "rig.gpus=0,2",
            "model.tubelet=2,8,8",
            "train.precision=fp32",
        ],
    )
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.train.lr == pytest.approx(3e-4)
    assert config.model.evolver_shared is True
    assert config.rig.gpus == (0, 2)
    assert config.train.precision == "fp32"


@pytest.mark.parametrize(
    "items, fragment",
    [
        (["train.stepz=3"], "unknown key 'train.stepz' (did you mean 'train.steps'?)"),
        (["trian.steps=3"], "unknown section 'trian' (did you mean 'train'?)"),
        (["model.mystery=3"], "unknown key 'model.mystery'; known keys"),  # nothing close: no guess
        (["train.steps=abc"], "train.steps"),
        (["train.steps"], "KEY=VALUE"),
        (["steps=3"], "SECTION.NAME"),
        (["model.droptoken_keep=1.5"], "model.droptoken_keep"),
        (["train.zero_stage=4"], "train.zero_stage"),
        (["model.evolver_shared=maybe"], "model.evolver_shared"),
        (["data.frame_size=30,32"], "data.frame_size"),
        (["model.tubelet=3,8,8"], "data.present_frames"),
        (["train.offload_optimizer=cpu", "train.zero_stage=0"], "train.offload_optimizer"),
    ],
)
def test_bad_overrides_name_the_key(items, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config("demo", overrides=items)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="demo, small") as err:
        load_config("huge")
    assert "--preset huge" in str(err.value)


def test_parse_overrides_nests_by_section():
    assert parse_overrides(["a.b=1", "a.c=x=y"]) == {"a": {"b": "1", "c": "x=y"}}


def test_toml_and_yaml_config_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nsteps = 11\nzero_stage = 2\n[data]\nworkers = 0\n")
    yaml = tmp_path / "run.yaml"
    yaml.write_text("train:\n  steps: 12\nmodel:\n  heads: 8\n")
    assert load_config("demo", str(toml)).train.zero_stage == 2
    config = load_config("demo", str(yaml), overrides=["train.steps=13"])
    assert (config.train.steps, config.model.heads) == (13, 8)  # --set wins over the file


def test_config_file_errors(tmp_path):
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("[train]\nsteps = 3\nbogus = 1\n")
    with pytest.raises(ConfigError, match="train.bogus"):
        load_config("demo", str(bad_key))
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("train:\n  steps: ten\n")
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("demo", str(bad_type))
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(broken)
    with pytest.raises(ConfigError, match="no such file"):
        read_config_file(tmp_path / "missing.toml")


def test_every_config_key_is_documented():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a doc string: {missing}"


def test_config_round_trips_through_json():
    import json

    from rigtrain.config import build_config

    config = load_config("small", overrides=["rig.gpus=1"])
    again = build_config(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_python_3_10_reads_toml_through_tomli(tmp_path):
    """Python 3.10 (Ubuntu 22.04's python3) has no tomllib: every command once died on its
    import. There rigtrain reads TOML with tomli, the package 3.11 took in as tomllib;
    here 3.10 is played by hiding tomllib and handing its code over as tomli."""
    import subprocess
    import sys

    (tmp_path / "run.toml").write_text("[train]\nsteps = 7\n")
    script = f"""
import sys, tomllib
sys.modules["tomli"], sys.modules["tomllib"] = tomllib, None
from rigtrain.config import load_config
from rigtrain.train import curriculum
from rigtrain.sweep import spec
assert load_config("demo", config_file={str(tmp_path / "run.toml")!r}).train.steps == 7
assert spec.tomllib is curriculum.tomllib is sys.modules["tomli"]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
