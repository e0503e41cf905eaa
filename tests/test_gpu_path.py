"""The GPU path's stand-ins on the CPU. The first real GPU run (an H200) crashed in bf16 at
step 1, ran out of memory at its first checkpoint and spent most of each step on the host;
none of that showed on the CPU because no test ran bf16, and nothing looked at shapes or host
syncs. These do, without a GPU:

- every op of a training step has the same shapes from one batch to the next (cuDNN and the
  caching allocator plan per shape; a shape that follows the data re-plans every step);
- the step makes no host sync outside DeepSpeed's optimizer step, and DeepSpeed's own are
  counted;
- bf16 trains fp32 weights under autocast at every ZeRO stage, with fp32 gradients, fp32
  running means and float32 contrastive heads and losses, and fp16 is configured with
  dynamic loss scaling and its half-precision module steps with fp32 running means;
- fp32 and bf16 at ZeRO-1 and ZeRO-3 each train, resume, evaluate and profile.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, run_cli, run_script
from torch.utils._python_dispatch import TorchDispatchMode

from rigtrain.config import load_config
from rigtrain.model import build_model
from rigtrain.rig.budget import checkpoint_bytes_per_parameter
from rigtrain.train.measured_step import parameter_count

PROBE = Path(__file__).parent / "step_probe.py"
# A model small enough for several DeepSpeed runs in a minute, with every part of the real one.
TINY = [*TINY_MODEL, "train.micro_batch_size=4"]


class ShapeRecorder(TorchDispatchMode):
    """Every op's name and output shapes, in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((func._schema.name, tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))))
        return out


def two_different_batches(demo_data, config):
    """Two batches of the same size whose data differ in what used to decide shapes: which
    clips have sound, and how many narration segments each has."""
    from rigtrain.data.dataset import ShardDataset

    dataset = ShardDataset(demo_data, config.data)
    first = dataset.batch(list(range(8)))
    second = {k: v.clone() for k, v in dataset.batch(list(range(8, 16))).items()}
    second["has_audio"][::2] = False
    second["segment_len"][1::3] = 0  # clips without narration
    assert not torch.equal(first["segment_len"] > 0, second["segment_len"] > 0)
    return first, second


def test_every_op_has_the_same_shapes_from_batch_to_batch(demo_data):
    config = load_config("demo", overrides=["data.segments_per_clip=2"])
    torch.manual_seed(0)
    model = build_model(config.model, config.data)
    records = []
    for batch in two_different_batches(demo_data, config):
        model.zero_grad(set_to_none=True)
        recorder = ShapeRecorder()
        with recorder:
            model(batch)["loss"].backward()
        records.append(recorder.ops)
    attention = [op for op in records[0] if "scaled_dot_product" in op[0]]
    assert len(attention) >= 8  # the encoder, decoder and contrastive passes all attend
    assert records[0] == records[1]


def test_the_model_step_makes_no_host_sync(demo_data):
    from step_probe import SyncCounter

    config = load_config("demo")
    torch.manual_seed(0)
    model = build_model(config.model, config.data)
    batch = two_different_batches(demo_data, config)[1]
    counter = SyncCounter()
    with counter:
        model(batch)["loss"].backward()
    assert counter.counts == {}


@pytest.mark.slow  # tracing and AOT autograd: 20 s on a 2-core CPU
def test_the_training_objective_compiles_as_one_graph_and_evaluation_stays_eager(demo_data):
    """train.compile's path, without a compiler: torch.compile traces the objective under bf16
    autocast into one graph with its backward (fullgraph: a graph break fails), the next batch
    reuses it, and evaluation's tasks compile nothing (compiling forward whole recompiled it
    for every task and evaluation batch size). aot_eager runs what inductor would be given."""
    from torch._dynamo.utils import counters

    from rigtrain.train.engine import compile_objective

    config = load_config("demo", overrides=[*TINY_MODEL, "data.segments_per_clip=2"])
    torch.manual_seed(0)
    model = build_model(config.model, config.data)
    torch._dynamo.reset()
    counters.clear()
    objective = torch.compile(model.objective, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in two_different_batches(demo_data, config):
            objective(batch)["loss"].backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"]
    compile_objective(model)  # what the trainer does: only the objective is wrapped
    model.eval()
    batch = two_different_batches(demo_data, config)[0]
    small = {k: v[:3] for k, v in batch.items()}  # an evaluation's last, smaller batch
    for task_batch in (batch, small):
        model(task_batch, task="embed")
        model(task_batch, task="predict")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def probe(run: Path) -> dict:
    result = run_script(PROBE, str(run))
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(lines[0][len("PROBE ") :])


# DeepSpeed's optimizer at each (precision, ZeRO stage): bf16 takes the same ones as fp32,
# since its weights are fp32 (autocast computes in bf16); ZeRO-0 steps ours (AdamW) as is.
OPTIMIZER = {
    ("fp32", 1): "DeepSpeedZeroOptimizer",
    ("bf16", 0): "AdamW",
    ("bf16", 1): "DeepSpeedZeroOptimizer",
    ("bf16", 2): "DeepSpeedZeroOptimizer",
    ("fp32", 3): "DeepSpeedZeroOptimizer_Stage3",
    ("bf16", 3): "DeepSpeedZeroOptimizer_Stage3",
}


def check_step_syncs_and_precision(run: Path, precision: str, stage: int) -> None:
    """A real Trainer's step on the run's checkpoint (tests/step_probe.py): no host sync
    outside DeepSpeed's optimizer step (which checks the gradient norm for inf/NaN and clips
    it, a read-back each: counted, at most 4); fp32 weights, optimizer copies, gradients
    and running means whatever the precision, and in bf16 the step's matmuls in bf16
    (autocast) but its contrastive heads in float32."""
    found = probe(run)
    outside = {k: v for k, v in found["syncs"].items() if not k.startswith("optimizer:")}
    assert outside == {}, found["syncs"]
    assert sum(found["syncs"].values()) <= 4, found["syncs"]
    assert found["optimizer"] == OPTIMIZER[precision, stage]
    assert found["module_dtype"] == "torch.float32"
    # a logged step's gradient norms at ZeRO-0 (one GPU): a few kernels per part, not three per
    # parameter (on an H200 those took 11-20 ms of `small`'s ~150 ms step). From ZeRO-1 on each
    # parameter's full gradient is DeepSpeed's to assemble (safe_get_full_grad), op by op.
    if stage == 0:
        assert found["parameters"] > 40 and found["statistics_ops"] <= 12 * found["statistics_parts"], found
        # and around the model, a step dispatches a few dozen ops, none per parameter: DeepSpeed's
        # all-reduce of one process with itself (a copy per parameter) is left out, and the
        # clipping is multi-tensor (DeepSpeed's: a norm and a multiply per parameter)
        assert found["outside_model_ops"] <= 40, found
    assert found["master_dtypes"] == ["torch.float32"] and found["grad_accumulation_dtype"] == "torch.float32"
    assert found["running_mean_dtype"] == "torch.float32"
    # one process: no gradient is rounded to bf16 on its way to the optimizer (ZeRO-3's
    # buckets did, for a communication that one process does not have)
    assert set(found["gradient_bucket_dtypes"]) <= {"torch.float32"}, found["gradient_bucket_dtypes"]
    matmuls = found["matmul_output_dtypes"]
    if precision == "bf16":
        # not DeepSpeed's memory-efficient linear: under autocast it rounds before the bias
        assert found["functional_linear"] == "linear", found["functional_linear"]
        assert matmuls["torch.bfloat16"] > 10 * matmuls.get("torch.float32", 0), matmuls  # the encoder's
        assert found["head_output_dtype"] == "torch.float32"
    else:
        assert set(matmuls) == {"torch.float32"}, matmuls


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_at_zero0_and_zero2_steps_without_syncs_and_keeps_fp32(tmp_path, demo_data, stage):
    """ZeRO-0 (what the plan takes on one GPU) and ZeRO-2, which test_train_resume_eval_profile
    does not run: one step, then the probe."""
    run = tmp_path / "run"
    made = run_cli(
        "train", "--out", str(run), "--steps", "1", "--set", "train.precision=bf16", f"train.zero_stage={stage}", *TINY
    )
    assert made.returncode == 0, made.stderr[-3000:]
    check_step_syncs_and_precision(run, "bf16", stage)


def test_deepspeed_config_per_precision():
    from rigtrain.train.engine import deepspeed_config

    config = load_config("demo", overrides=["train.zero_stage=1"])
    fp16 = deepspeed_config(config, "fp16", 1)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0 = dynamic scaling
    assert not fp16["bf16"]["enabled"] and "torch_autocast" not in fp16
    for stage in (0, 1, 2, 3):  # bf16: autocast over fp32 weights, never DeepSpeed's bf16 module
        config = load_config("demo", overrides=[f"train.zero_stage={stage}"])
        bf16 = deepspeed_config(config, "bf16", 1)
        # one process: no module's gradients communicated (or bucketed) in bf16
        assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        assert not bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"] and "data_types" not in bf16
        assert deepspeed_config(config, "bf16", 2)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
        assert bf16["zero_optimization"].get("memory_efficient_linear", True) is (stage != 3)
    assert "torch_autocast" not in deepspeed_config(config, "fp32", 1)


def test_zero0_clips_in_the_trainer_and_skips_the_all_reduce_of_one_process():
    """At ZeRO-0 the trainer clips (multi-tensor kernels) and DeepSpeed does not; fp16 and
    ZeRO-1 to 3 clip in DeepSpeed's optimizers. One process at ZeRO-0 all-reduces nothing."""
    from types import SimpleNamespace

    from rigtrain.train.engine import deepspeed_config, max_gradient_norm, one_process_epilogue

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    module[1].bias.requires_grad_(False)
    for precision, stage, world, deepspeed_clips, all_reduces in [
        ("bf16", 0, 1, False, False),
        ("fp32", 0, 1, False, False),
        ("bf16", 0, 2, False, True),  # two processes: their gradients are averaged
        ("fp16", 0, 1, True, False),
        ("bf16", 1, 1, True, True),
        ("bf16", 3, 2, True, True),
    ]:
        config = load_config("demo", overrides=[f"train.zero_stage={stage}", "train.grad_clip=0.5"])
        assert deepspeed_config(config, precision, world)["gradient_clipping"] == (0.5 if deepspeed_clips else 0.0)
        engine = SimpleNamespace(enable_backward_allreduce=True, module=module)
        clipped = one_process_epilogue(engine, config, precision, world)
        assert engine.enable_backward_allreduce is all_reduces, (precision, stage, world)
        assert len(clipped) == (0 if deepspeed_clips else 3), (precision, stage)  # the parameters with gradients
    # without clipping the trainer still takes the norm, which skips an inf/NaN update, and
    # leaves the gradients as they are
    no_clip = load_config("demo", overrides=["train.zero_stage=0", "train.grad_clip=0"])
    engine = SimpleNamespace(enable_backward_allreduce=True, module=module)
    assert len(one_process_epilogue(engine, no_clip, "bf16", 1)) == 3
    assert max_gradient_norm(no_clip) == math.inf and max_gradient_norm(config) == 0.5


def test_float32_islands_hold_under_autocast():
    """Under bf16 autocast the contrastive losses and the Float32 heads compute exactly what
    they compute without it: a bf16 similarity there would swamp what tells clips apart."""
    from rigtrain.model.contrastive import Float32LayerNorm, Float32Linear, l2_normalize, mil_nce_loss, nce_loss

    torch.manual_seed(0)
    video, audio = l2_normalize(torch.randn(6, 16)), l2_normalize(torch.randn(6, 16))
    text, text_valid = l2_normalize(torch.randn(6, 3, 16)), torch.rand(6, 3) > 0.3
    valid = torch.tensor([True, True, False, True, True, True])
    head, norm = Float32Linear(16, 8), Float32LayerNorm(16)
    plain = (nce_loss(video, audio, valid, 0.07), mil_nce_loss(video, text, text_valid, 0.07), head(video), norm(video))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.Linear(16, 8)(video).dtype == torch.bfloat16  # autocast is on
        cast = (
            nce_loss(video, audio, valid, 0.07),
            mil_nce_loss(video, text, text_valid, 0.07),
            head(video),
            norm(video),
        )
    for a, b in zip(plain, cast):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_every_norm_sees_an_fp32_residual_stream_under_autocast(demo_data):
    """Under bf16 autocast a projection returns bf16; a residual stream that starts from one
    (the decoder's queries did) then adds every block's update in bf16, and the CPU's
    autocast normalises bf16 in bf16 where CUDA's upcasts. Every norm's input is fp32, so
    the streams keep fp32 and the CPU computes what the GPU does."""
    config = load_config("demo", overrides=TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(config.model, config.data)
    seen: dict[str, torch.dtype] = {}

    def note_input(name):
        def hook(module, args):
            seen.setdefault(name, args[0].dtype)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_pre_hook(note_input(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(two_different_batches(demo_data, config)[0])["loss"].backward()
    assert any(name.startswith("decoder") for name in seen) and len(seen) >= 8, seen
    assert {name: dtype for name, dtype in seen.items() if dtype != torch.float32} == {}


def test_a_half_precision_module_trains_as_deepspeeds_fp16_casts_it(demo_data):
    """fp16 (what the plan picks for a Turing card such as the RTX 2080 Ti) is DeepSpeed's
    module.half(): every weight fp16, the batch as the loader gives it. The step runs with no
    dtype mismatch (what crashed bf16 at step 1 on the H200), the running means stay fp32,
    the losses are fp32 and every gradient is finite. The CPU computes fp16 as a GPU would,
    only slowly; DeepSpeed's fp16 optimizer needs CUDA, so tests/test_gpu.py runs the rest."""
    config = load_config("demo", overrides=TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(config.model, config.data).half()
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    means = {name: b for name, b in model.named_buffers() if name.startswith("mean_") and b.is_floating_point()}
    assert means and {b.dtype for b in means.values()} == {torch.float32}
    before = {name: b.clone() for name, b in means.items()}
    out = model(two_different_batches(demo_data, config)[0])
    losses = {k: v for k, v in out.items() if k.startswith("loss")}
    assert len(losses) >= 3 and {v.dtype for v in losses.values()} == {torch.float32}, losses
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert sum(p.grad is not None for p in model.parameters()) > 0.9 * len(list(model.parameters()))
    assert any(not torch.equal(before[n], b) for n, b in means.items())  # updated, in fp32
    assert {b.dtype for b in means.values()} == {torch.float32}


def test_the_plan_takes_zero0_for_bf16_on_one_gpu():
    from test_rig import codes, plan_for

    plan = plan_for("rtx4060_8gb.json", preset="demo")
    assert (plan.precision, plan.zero_stage) == ("bf16", 0) and "nothing to shard" in plan.reasons["zero_stage"]
    assert codes(plan) == set()


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("precision, stage", [("fp32", 1), ("bf16", 1), ("fp32", 3), ("bf16", 3)])
def test_train_resume_eval_profile(tmp_path, demo_data, precision, stage):
    """Each precision at ZeRO-1 and ZeRO-3 through everything a run does: train with the
    profiler on and a checkpoint at step 2, resume to step 4, `rigtrain eval`, then a step
    on the finished run measured for host syncs and the optimizer's dtypes."""
    run = tmp_path / "run"
    common = [
        f"train.precision={precision}",
        f"train.zero_stage={stage}",
        *TINY,
        "train.log_every=1",
        "profile.enabled=true",
        "profile.start_step=0",
        "profile.warmup=1",
        "profile.active=1",
    ]
    first = run_cli("train", "--out", str(run), "--steps", "3", "--set", "train.ckpt_every=2", *common)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    (run / "checkpoints" / "step00000003" / "complete.json").unlink()  # as if it died after step 2's save
    resumed = run_cli("train", "--out", str(run), "--resume", "--steps", "4")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming at step 2/4" in resumed.stdout
    for result in (first, resumed):  # rigtrain's lines, not the warnings of the libraries under it
        # (torch 2.13 deprecated collectives DeepSpeed's ZeRO-3 calls: a line at every step)
        warned = re.findall(r"^.*\w+Warning: .*$", result.stdout + result.stderr, re.MULTILINE)
        assert not warned, warned[:3]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 for r in rows)  # finite
    assert json.loads((run / "config.json").read_text())["plan"]["precision"] == precision
    summary = json.loads((run / "profile" / "summary.json").read_text())
    assert summary["verdict"] and summary["breakdown"]
    scored = run_cli("eval", str(run), "--json")
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout)
    assert result["step"] == 4 and 0 <= result["knn"]["colour"]["top1"] <= 1
    # the size the plan's disk check (low_disk) gives a checkpoint, against the one saved
    config = load_config(overrides=[f"train.precision={precision}", *TINY])
    predicted = parameter_count(config.model, config.data) * checkpoint_bytes_per_parameter(precision, "adamw", stage)
    saved = sum(f.stat().st_size for f in (run / "checkpoints" / "step00000004").glob("*states.pt"))
    assert abs(saved - predicted) < 0.02 * predicted + 100_000, (saved, predicted)  # + buffers, metadata
    check_step_syncs_and_precision(run, precision, stage)


def test_the_residual_a_run_keeps_leaves_out_what_the_card_held_before_it(monkeypatch):
    """What a GPU run keeps for the next plan (train/rehearsal.py): its own process's memory
    as NVML lists it, less torch's reserved; where NVML lists no processes, the card's use
    less what the card held when the run was planned. The plan starts from the free memory,
    so a desktop's 1.5 GiB counted in the residual too would be taken away twice."""
    import os
    import sys
    from types import SimpleNamespace

    from rigtrain.train.rehearsal import in_use_before_run, own_use_gib

    rig = {"gpus": [{"memory_gib": 24.0, "memory_free_gib": 22.5}, {"memory_gib": 24.0, "memory_free_gib": 23.7}]}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # local rank 0 trains on GPU 1
    assert in_use_before_run(rig, 0) == pytest.approx(0.3) and in_use_before_run(rig, 1) == pytest.approx(1.5)
    assert in_use_before_run({"gpus": [{"memory_gib": 24.0}]}, 1) == 0  # a rig file without free memory
    assert in_use_before_run(None, 0) == 0 and in_use_before_run(rig | {"gpus": []}, 0) == 0

    listed = []
    fake = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: listed,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    listed[:] = [SimpleNamespace(pid=1, usedGpuMemory=2**30), SimpleNamespace(pid=os.getpid(), usedGpuMemory=7 * 2**30)]
    assert own_use_gib(0) == pytest.approx(7.0)
    listed[:] = [SimpleNamespace(pid=1, usedGpuMemory=2**30)]  # another PID namespace: not found
    assert own_use_gib(0) is None

    def fails():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fails
    assert own_use_gib(0) is None
