"""NVIDIA cards the driver cannot reach (rig/driver_state.py): after a driver upgrade without
a restart, NVML fails with a version mismatch and CUDA sees nothing, and a run that took that
for a CPU machine would train on the CPU for as long as it was left."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

from rigtrain.errors import UserError
from rigtrain.rig import driver_state
from rigtrain.rig import probe as probe_module
from rigtrain.rig.driver_state import nvidia_cards_on_bus, why_unreachable, windows_driver_shared
from rigtrain.rig.rig_file import rig_from_dict
from rigtrain.rig.visible import restricted
from rigtrain.train.planning import check_torch_trains_here

ROOT = Path(__file__).resolve().parents[1]
BROKEN = {
    "gpus": [],
    "unreachable_gpus": 2,
    "cpu": {"cores": 16, "threads": 32},
    "ram_gib": 64.0,
    "software": {"nvml": "not available (NVMLError_LibRmVersionMismatch)"},
}


def _device(root, name, vendor, kind):
    folder = root / name
    folder.mkdir()
    (folder / "vendor").write_text(vendor + "\n")
    (folder / "class").write_text(kind + "\n")


def test_the_pci_bus_counts_nvidia_display_and_3d_controllers(tmp_path):
    _device(tmp_path, "0000:01:00.0", "0x10de", "0x030000")  # a GeForce (VGA)
    _device(tmp_path, "0000:01:00.1", "0x10de", "0x040300")  # its HDMI sound: not a GPU
    _device(tmp_path, "0000:41:00.0", "0x10de", "0x030200")  # a data-centre card (3D controller)
    _device(tmp_path, "0000:02:00.0", "0x1002", "0x030000")  # AMD's
    (tmp_path / "0000:03:00.0").mkdir()  # a device whose files cannot be read
    assert nvidia_cards_on_bus(tmp_path) == 2
    assert nvidia_cards_on_bus(tmp_path / "no-sysfs") == 0


@pytest.mark.parametrize(
    "error, counted",
    [("LibRmVersionMismatch", 2), ("DriverNotLoaded", 2), ("NoPermission", 2), ("LibraryNotFound", None)],
)
def test_the_probe_counts_the_cards_only_when_nvml_blames_the_driver(monkeypatch, error, counted):
    """A missing NVML library is a machine without NVIDIA's driver (or a container run
    without its GPUs, whose /sys still lists the host's cards): a CPU machine."""
    import pynvml

    codes = {
        "LibRmVersionMismatch": pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
        "DriverNotLoaded": pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        "NoPermission": pynvml.NVML_ERROR_NO_PERMISSION,
        "LibraryNotFound": pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    }

    def fails():
        raise pynvml.NVMLError(codes[error])

    monkeypatch.setattr(pynvml, "nvmlInit", fails)
    monkeypatch.setattr(driver_state, "nvidia_cards_on_bus", lambda: 2)
    monkeypatch.setattr(driver_state, "windows_driver_shared", lambda: False)
    gpus, driver, unreachable = probe_module.probe_gpus()
    assert gpus == () and driver == {"nvml": f"not available (NVMLError_{error})"} and unreachable == counted
    # under WSL2 no PCI bus lists the cards; Windows' driver sharing its libraries says they exist
    monkeypatch.setattr(driver_state, "nvidia_cards_on_bus", lambda: 0)
    monkeypatch.setattr(driver_state, "windows_driver_shared", lambda: True)
    assert probe_module.probe_gpus()[2] == 1


WSL_KERNEL = "5.15.167.4-microsoft-standard-WSL2"


def test_wsl2_knows_its_gpus_by_the_windows_drivers_libraries(tmp_path):
    assert not windows_driver_shared(WSL_KERNEL, tmp_path)  # WSL2 without an NVIDIA driver on Windows
    (tmp_path / "libnvidia-ml.so.1").write_bytes(b"")
    assert windows_driver_shared(WSL_KERNEL, tmp_path)
    assert not windows_driver_shared("6.8.0-49-generic", tmp_path)  # Linux on the machine itself


@pytest.mark.parametrize(
    "error, advice",
    [("LibraryNotFound", "`sudo ldconfig`"), ("DriverNotLoaded", "a Linux NVIDIA driver installed inside WSL")],
)
def test_under_wsl2_an_unreachable_gpu_gets_wsls_own_advice(monkeypatch, error, advice):
    """Under WSL2 the GPUs are Windows': NVML failing there is the loader's path or a Linux
    driver installed inside WSL over the Windows driver's libraries, not a kernel module or a
    restart; a run would otherwise train on the CPU without a word."""
    wsl = rig_from_dict(
        {
            **BROKEN,
            "unreachable_gpus": 1,
            "software": {"nvml": f"not available (NVMLError_{error})", "kernel": WSL_KERNEL},
        }
    )
    why = why_unreachable(wsl)
    assert why.startswith("Windows' NVIDIA driver shares its GPU(s) with WSL2") and f"({error})" in why
    assert advice in why and "PCI bus" not in why and "restart the machine" not in why
    assert [w.code for w in driver_state.driver_warning(wsl)] == ["driver_unreachable"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match="would train on the CPU instead"):
        check_torch_trains_here(restricted(wsl, None, None), None)


def test_rig_says_why_and_how_to_fix_it_and_train_will_not_fall_back_to_the_cpu(tmp_path, monkeypatch):
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(BROKEN))
    shown = run_cli("rig", "--rig", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    (warning,) = [w for w in report["warnings"] if w["code"] == "driver_unreachable"]
    assert warning["message"].startswith("2 NVIDIA GPU(s) are on the PCI bus but the driver cannot be reached")
    assert "(NVML: LibRmVersionMismatch)" in warning["message"] and "restart the machine" in warning["message"]
    assert report["rig"]["unreachable_gpus"] == 2 and report["plan"]["device"] == "cpu"

    rig = rig_from_dict(BROKEN)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError) as refused:
        check_torch_trains_here(restricted(rig, None, None), None)
    said = str(refused.value)
    assert "would train on the CPU instead" in said and "`CUDA_VISIBLE_DEVICES= rigtrain train ...`" in said
    # the CPU on purpose: an empty CUDA_VISIBLE_DEVICES hides the cards, and the complaint
    cpu = restricted(rig, "", None)
    check_torch_trains_here(cpu, None)
    assert why_unreachable(cpu) is None
    # a machine without NVIDIA's library is a CPU machine, whatever its bus holds
    library_missing = {**BROKEN, "software": {"nvml": "not available (NVMLError_LibraryNotFound)"}}
    assert why_unreachable(rig_from_dict(library_missing)) is None
    for advice, error in (("reinstall the driver for this kernel", "DriverNotLoaded"), ("group", "NoPermission")):
        other = rig_from_dict({**BROKEN, "software": {"nvml": f"not available (NVMLError_{error})"}})
        assert advice in why_unreachable(other)


def test_train_stops_in_one_line_before_it_starts(tmp_path, monkeypatch, capsys, demo_data):
    from rigtrain.cli import main

    monkeypatch.setattr(
        probe_module,
        "probe_gpus",
        lambda: ((), {"nvml": "not available (NVMLError_LibRmVersionMismatch)"}, 2),
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["train", "--data", str(demo_data), "--out", str(tmp_path / "run"), "--steps", "2"]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rigtrain:")]
    assert len(said) == 1 and "restart the machine" in said[0] and "would train on the CPU" in said[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_sweep_stops_before_its_first_trial(tmp_path, monkeypatch, capsys):
    """Every trial would stop on it (or, before, train on the CPU): the sweep says it once."""
    from rigtrain.cli import main

    monkeypatch.setattr(
        probe_module,
        "probe_gpus",
        lambda: ((), {"nvml": "not available (NVMLError_DriverNotLoaded)"}, 1),
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "sweep"
    assert main(["sweep", str(ROOT / "examples" / "sweep-demo.toml"), "--out", str(out), "--trials", "1"]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rigtrain:")]
    assert len(said) == 1 and "1 NVIDIA GPU(s) are on the PCI bus" in said[0] and "kernel module" in said[0]
    assert not list(out.glob("trial-*"))
