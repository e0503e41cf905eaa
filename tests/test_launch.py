"""Launch decisions, from torch's view of the machine (no process is started here)."""

import pytest

from rigtrain.config import load_config
from rigtrain.errors import UserError
from rigtrain.train.launch import WORKER_MODULE, launch_command
from rigtrain.train.setup import plan_launch

CPU_BOX = {"gpus": [], "cpu": {"cores": 2, "threads": 2}, "ram_gib": 24}


def gpus(*capabilities):
    return {"gpus": [{"name": "gpu", "memory_gib": 24, "compute_capability": list(c)} for c in capabilities],
            "cpu": {"cores": 16, "threads": 32}, "ram_gib": 64}


def test_cpu_box_trains_in_fp32_with_nproc_gloo_processes(tmp_path):
    plan = plan_launch(load_config("demo", overrides=["train.nproc=2"]), CPU_BOX)
    assert (plan.device, plan.world_size, plan.precision) == ("cpu", 2, "fp32")
    assert plan.env["OMP_NUM_THREADS"] == "1" and plan.env["DS_ACCELERATOR"] == "cpu"
    command = launch_command(tmp_path, plan, None)
    assert command[1:4] == ["-m", "torch.distributed.run", "--nnodes"] and "--nproc-per-node" in command
    assert command[command.index("--nproc-per-node") + 1] == "2" and WORKER_MODULE in command
    single = plan_launch(load_config("demo"), CPU_BOX)
    assert launch_command(tmp_path, single, None) is None  # one CPU process runs in-process


@pytest.mark.parametrize("capability, precision", [((8, 6), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp32")])
def test_precision_follows_compute_capability(capability, precision):
    plan = plan_launch(load_config("demo"), gpus(capability))
    assert plan.precision == precision and plan.reasons["precision"]


def test_mixed_cards_plan_for_the_oldest_and_user_precision_wins():
    assert plan_launch(load_config("demo"), gpus((8, 6), (7, 5))).precision == "fp16"
    plan = plan_launch(load_config("demo", overrides=["train.precision=fp32"]), gpus((8, 6)))
    assert plan.precision == "fp32" and "user" in plan.reasons["precision"]


def test_every_gpu_gets_a_process_and_rig_gpus_picks_cards(tmp_path):
    plan = plan_launch(load_config("demo", overrides=["rig.gpus=0,2"]), gpus((8, 6), (8, 6), (8, 9)))
    assert plan.world_size == 2 and plan.env["CUDA_VISIBLE_DEVICES"] == "0,2"
    assert plan.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # even one GPU runs in a fresh process, so CUDA_VISIBLE_DEVICES takes effect
    one = plan_launch(load_config("demo", overrides=["rig.gpus=1"]), gpus((8, 6), (8, 6)))
    assert launch_command(tmp_path, one, None) is not None
    with pytest.raises(UserError, match="rig.gpus"):
        plan_launch(load_config("demo", overrides=["rig.gpus=3"]), gpus((8, 6)))
    with pytest.raises(UserError, match="rig.gpus"):
        plan_launch(load_config("demo", overrides=["rig.gpus=0"]), CPU_BOX)


def test_hostfile_goes_to_deepspeeds_launcher(tmp_path):
    plan = plan_launch(load_config("demo"), gpus((8, 0)))
    command = launch_command(tmp_path, plan, "hosts.txt")
    # the venv's own DeepSpeed, whether or not the venv is on PATH
    assert command[1:6] == ["-m", "deepspeed.launcher.runner", "--hostfile", "hosts.txt", "--module"]
    assert command[6] == WORKER_MODULE


def test_loader_workers_follow_the_cores_unless_set():
    small = load_config("small")  # data.workers = -1: from the cores
    assert plan_launch(small, gpus((8, 6), (8, 6))).loader_workers == 8  # 32 threads / 2 GPUs, capped at 8
    assert plan_launch(small, gpus((8, 6))).loader_workers == 8
    twelve = {**CPU_BOX, "cpu": {"cores": 6, "threads": 12}}
    assert plan_launch(small, twelve).loader_workers == 8  # 12 threads, one process: capped at 8
    assert plan_launch(load_config("small", overrides=["train.nproc=4"]), twelve).loader_workers == 2  # 12 / 4 - 1
    assert plan_launch(small, CPU_BOX).loader_workers == 1  # never fewer than one
    plan = plan_launch(load_config("small", overrides=["data.workers=0"]), twelve)
    assert plan.loader_workers == 0 and "set by the config" in plan.reasons["data.workers"]
