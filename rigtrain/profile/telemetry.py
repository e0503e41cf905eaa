"""GPU telemetry during every run: a background thread reads NVML a few times a second
(utilisation, memory, power, temperature, SM clock, PCIe rx/tx and width, throttle
reasons); the trainer takes the averages at each logged step. Without a GPU it reads the
host's CPU utilisation and this process's memory instead.

A PCIe link that narrows is reported the moment the sampler sees it (`events()`), and a
throttle reason once it has held under load for a few seconds (profile/throttle.py has the
rule), not at the end of the run. The sampler times itself, so
its cost is a number in the metrics (`telemetry_cost`), not a guess."""

from __future__ import annotations

import os
import threading
import time

from rigtrain.profile.throttle import CardLimits, Sample, ThrottleJudge, reasons_from_mask
from rigtrain.wsl import wsl_kernel


def physical_gpu_index(local_rank: int) -> int:
    """NVML numbers every GPU by PCI bus; CUDA numbers the visible ones (CUDA_DEVICE_ORDER
    is PCI_BUS_ID in every rigtrain run), so local rank i is the i-th visible GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    indices = [int(v) for v in visible.split(",") if v.strip().isdigit()]
    return indices[local_rank] if local_rank < len(indices) else local_rank


def card_limits(nvml, handle, gpu_index: int) -> CardLimits:
    """What a throttle report compares its readings with; each read on its own, since
    some boards do not report every one."""

    def read(fn, *args, scale=1.0):
        try:
            value = fn(handle, *args)
            return (value[1] if isinstance(value, tuple) else value) / scale
        except Exception:
            return None

    return CardLimits(
        gpu=gpu_index,
        power_limit_w=read(nvml.nvmlDeviceGetEnforcedPowerLimit, scale=1000),
        max_power_limit_w=read(nvml.nvmlDeviceGetPowerManagementLimitConstraints, scale=1000),
        sm_clock_max_mhz=read(nvml.nvmlDeviceGetMaxClockInfo, nvml.NVML_CLOCK_SM),
        slowdown_temp_c=read(nvml.nvmlDeviceGetTemperatureThreshold, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
        wsl=wsl_kernel(),
    )


def gpu_readers(n, h) -> dict:
    """What the sampler reads of one GPU, by the name it has in metrics.jsonl (and the mask
    of clock-event reasons, which the throttle judge reads)."""
    return {
        "gpu_util_percent": lambda: n.nvmlDeviceGetUtilizationRates(h).gpu,
        "gpu_mem_used_gib": lambda: n.nvmlDeviceGetMemoryInfo(h).used / 2**30,
        "gpu_power_w": lambda: n.nvmlDeviceGetPowerUsage(h) / 1000,
        "gpu_temp_c": lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
        "gpu_sm_clock_mhz": lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
        "gpu_pcie_rx_mb_s": lambda: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES) / 1000,
        "gpu_pcie_tx_mb_s": lambda: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES) / 1000,
        "gpu_pcie_width": lambda: n.nvmlDeviceGetCurrPcieLinkWidth(h),
        "clock_event_reasons": lambda: n.nvmlDeviceGetCurrentClocksEventReasons(h),
    }


class TelemetrySampler:
    def __init__(self, hz: float, *, gpu_index: int | None):
        self.interval = 1.0 / hz
        self._lock = threading.RLock()  # snapshot() may read (and report an event) while holding it
        self._sums: dict[str, float] = {}
        self._maxes: dict[str, float] = {}
        self._count = 0
        self._events: list[str] = []
        self._busy = 0.0  # CPU seconds spent sampling
        self._last: dict[str, float] = {}
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._nvml = self._handle = None
        self._first_width: float | None = None
        self._judge: ThrottleJudge | None = None
        self._readers: dict = {}
        self.throttle_reports: list = []
        if gpu_index is not None:
            try:
                import pynvml  # optional: absent or failing on machines without NVIDIA's driver

                pynvml.nvmlInit()
                self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
                self.gpu_index = gpu_index
                self._judge = ThrottleJudge(card_limits(pynvml, self._handle, gpu_index))
                self._readers = gpu_readers(pynvml, self._handle)
            except Exception:  # no NVML (a container without the library): host telemetry only
                self._nvml = None
        import psutil  # only when the host is read

        self._process = psutil.Process()
        psutil.cpu_percent(None)  # the first reading starts the interval; only this sampler reads it
        self._thread = threading.Thread(target=self._run, name="rigtrain-telemetry", daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, float]:
        import psutil  # only when the host is read

        host = {"host_cpu_percent": psutil.cpu_percent(None), "host_rss_gib": self._process.memory_info().rss / 2**30}
        if self._nvml is None:
            return host
        sample = {**host, **self._read_gpu()}
        mask = sample.pop("clock_event_reasons", None)
        reasons = reasons_from_mask(int(mask)) if mask is not None else frozenset()
        if mask is not None:
            sample["gpu_throttled"] = float(bool(reasons))
        width = sample.get("gpu_pcie_width")
        if width is not None and self._first_width is None:
            self._first_width = width
        elif width is not None and width < self._first_width:
            self._event(
                f"GPU {self.gpu_index}: PCIe link dropped from x{self._first_width:.0f} to x{width:.0f} during "
                "training (check the riser and the slot)"
            )
            self._first_width = width
        if mask is None:  # no clock-event reasons on this card: nothing to judge
            return sample
        for report in self._judge.add(
            Sample(
                t=time.monotonic(),
                util_pct=sample.get("gpu_util_percent"),
                power_w=sample.get("gpu_power_w"),
                sm_clock_mhz=sample.get("gpu_sm_clock_mhz"),
                temp_c=sample.get("gpu_temp_c"),
                reasons=reasons,
            )
        ):
            self.throttle_reports.append(report.to_dict())
            self._event(report.message)
        return sample

    def _read_gpu(self) -> dict[str, float]:
        """Each NVML reading on its own: a card or platform that does not report one (PCIe
        counters or utilisation under WSL2, power on some laptop GPUs) keeps the others. A
        reading NVML does not support is dropped for the rest of the run, said once; any
        other error skips it for this sample only."""
        out, dropped = {}, []
        for name, read in list(self._readers.items()):
            try:
                out[name] = float(read())
            except Exception as err:
                # never on this card (or a pynvml too old to ask): stop asking
                if type(err).__name__ == "NVMLError_NotSupported" or isinstance(err, AttributeError):
                    del self._readers[name]
                    dropped.append(name)
        if dropped:
            self._event(
                f"GPU {self.gpu_index} does not report {', '.join(dropped)} through NVML here (not supported); "
                "the rest of its telemetry is recorded"
            )
        return out

    def _event(self, message: str) -> None:
        with self._lock:
            self._events.append(message)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            began = time.thread_time()  # CPU time of this thread: waiting for the GIL is not its cost
            try:
                sample = self._read()
            except Exception:  # a transient NVML error: skip this sample
                continue
            with self._lock:
                self._last = sample
                for key, value in sample.items():
                    self._sums[key] = self._sums.get(key, 0.0) + value
                    self._maxes[key] = max(self._maxes.get(key, value), value)
                self._count += 1
                self._busy += time.thread_time() - began

    def snapshot(self) -> dict[str, float]:
        """Means since the last snapshot (and the peak memory and temperature), plus the
        sampler's own cost as a fraction of wall time."""
        with self._lock:
            if self._count:
                out = {key: round(total / self._count, 3) for key, total in self._sums.items()}
            else:  # steps faster than the sampler: its latest reading (or one now, the first time)
                if not self._last:
                    try:
                        self._last = self._read()
                    except Exception:
                        pass
                out = {key: round(value, 3) for key, value in self._last.items()}
            for key, name in (("gpu_mem_used_gib", "gpu_mem_used_max_gib"), ("gpu_temp_c", "gpu_temp_max_c")):
                if key in self._maxes:
                    out[name] = round(self._maxes[key], 3)
            # Over the whole run: a short interval between two logged steps says little.
            out["telemetry_cost"] = round(self._busy / max(1e-9, time.perf_counter() - self._started), 5)
            self._sums, self._maxes, self._count = {}, {}, 0
            return out

    def events(self) -> list[str]:
        with self._lock:
            events, self._events = self._events, []
            return events

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
