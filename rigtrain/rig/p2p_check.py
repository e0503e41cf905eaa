"""Does peer-to-peer between two GPUs really work? NVML only says whether the driver offers
it. On some machines it is offered and then copies wrong data, hangs, or runs slower than
going through host memory: PCIe Access Control Services (ACS) or an IOMMU in the path
(a PCIe switch, a virtual machine), a consumer driver's P2P. NCCL then hangs or crawls in
the first all-reduce, hours into a run on a bigger job. So for each pair of GPUs whose
NVML row says P2P, a short check (docs/planner.md, "P2P, checked"):

- copy COPY_MIB of a known pattern each way into a buffer filled with something else, and
  compare with the pattern made on the receiving card: "wrong_data" if it differs;
- time REPEATS copies each way, and the same bytes through pinned host memory (what NCCL
  does without P2P: device to host, host to device): "slow" if P2P is slower than the host
  path (below SLOW_AGAINST_HOST of it);
- all of it in a child process with a deadline: a P2P copy that never finishes is
  "hung", and costs the check its deadline, never the command;
- "unavailable" when CUDA refuses peer access NVML offered; "failed" when the check itself
  could not run (torch without CUDA, a card out of memory): nothing is concluded then.

The result is a row per GPU in the rig (`p2p_check`); the planner turns "slow",
"wrong_data" and "hung" into NCCL_P2P_DISABLE=1 with the figures. `rigtrain rig` checks
every time; training reuses the last check of the same cards under the same driver and
boot options (RIGTRAIN_CACHE/p2p/), since a check costs a few seconds of CUDA start-up.

Run as `python -m rigtrain.rig.p2p_check 0-1 ...` (the child); `--cpu` runs the same copies
between CPU buffers, the CPU stand-in its tests use."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from rigtrain.files import write_json
from rigtrain.rig.facts import P2P_CHECK_RESULTS as RESULTS
from rigtrain.rig.facts import Rig
from rigtrain.terminal import die_with_parent

COPY_MIB = 64  # large enough to time at tens of GB/s (a few ms a copy), small enough for a full card
REPEATS = 5
# P2P below this share of the host path's rate is "slow": a margin for the timing's noise,
# so that only a link that really loses to host memory is turned off
SLOW_AGAINST_HOST = 0.8
# the child's deadlines: importing torch and starting CUDA on each card (seconds on a cold
# driver without persistence mode), then each pair's copies (well under a second when sound)
START_DEADLINE_S = 60.0
PAIR_DEADLINE_S = 10.0
PARENT = "RIGTRAIN_P2P_CHECK_PARENT"  # the command's pid, which the child must not outlive
FAULT = "RIGTRAIN_FAULT_P2P"  # tests: "wrong_data", "hang" or "slow" in the child's copies


@dataclasses.dataclass(frozen=True)
class PairCheck:
    result: str
    gb_s: float | None = None  # P2P copy rate, the slower direction
    host_gb_s: float | None = None  # the same bytes through pinned host memory
    detail: str = ""

    def to_row_entry(self) -> dict:
        entry: dict = {"result": self.result}
        if self.gb_s is not None:
            entry["gb_s"] = round(self.gb_s, 2)
        if self.host_gb_s is not None:
            entry["host_gb_s"] = round(self.host_gb_s, 2)
        return entry


# -- the child: the copies ---------------------------------------------------------------


def _pattern(torch, count: int, device):
    """Values that differ from word to word and from a fill of -1, made on `device` itself
    (so a wrong copy cannot also be the reference)."""
    return torch.arange(count, dtype=torch.int32, device=device).bitwise_xor_(0x5A5A5A5A)


def _rate(torch, copy, nbytes: int, sync, fault_sleep: float = 0.0) -> float:
    copy()  # the first copy enables peer access and warms up; not timed
    sync()
    started = time.perf_counter()
    for _ in range(REPEATS):
        copy()
        time.sleep(fault_sleep)
    sync()
    return REPEATS * nbytes / max(time.perf_counter() - started, 1e-9) / 1e9


def measure_pair(torch, src, dst, *, cpu: bool) -> PairCheck:
    """Both directions between two devices (CUDA ordinals, or "cpu" twice on the CPU)."""
    if not cpu and not torch.cuda.can_device_access_peer(src, dst):
        return PairCheck("unavailable", detail="CUDA refuses peer access that NVML offers")

    def sync():
        if not cpu:
            torch.cuda.synchronize(src)
            torch.cuda.synchronize(dst)

    rates = []
    for a, b in ((src, dst), (dst, src)):
        one_way = _one_way(torch, a, b, sync, cpu=cpu)
        if isinstance(one_way, PairCheck):
            return one_way
        rates.append(one_way)
    p2p, host_path = min(r[0] for r in rates), min(r[1] for r in rates)
    return PairCheck("slow" if p2p < SLOW_AGAINST_HOST * host_path else "ok", p2p, host_path)


def _one_way(torch, a, b, sync, *, cpu: bool):
    """(P2P GB/s, host path GB/s) of copies a -> b, or the PairCheck of wrong data."""
    fault = os.environ.get(FAULT, "")
    count = COPY_MIB * 2**20 // 4
    nbytes = count * 4
    sent = _pattern(torch, count, a)
    received = torch.full((count,), -1, dtype=torch.int32, device=b)
    if fault == "hang":
        time.sleep(3600)  # as a P2P copy that never completes
    received.copy_(sent)
    sync()
    if fault == "wrong_data":
        received[count // 2] += 1
    expected = _pattern(torch, count, b)
    if not torch.equal(received, expected):
        wrong = int((received != expected).sum())
        return PairCheck("wrong_data", detail=f"{wrong} of {count} words differ after a copy")
    p2p = _rate(torch, lambda: received.copy_(sent), nbytes, sync, 0.2 if fault == "slow" else 0.0)
    host = torch.empty(count, dtype=torch.int32, pin_memory=not cpu)
    to_host = _rate(torch, lambda: host.copy_(sent), nbytes, sync)
    from_host = _rate(torch, lambda: received.copy_(host), nbytes, sync)
    # NCCL without P2P pipelines the two legs in chunks: the slower leg sets its pace
    return p2p, min(to_host, from_host)


def _child(argv: list[str]) -> int:
    die_with_parent(os.environ.get(PARENT))  # even `kill -9` of the command takes this check with it
    cpu = "--cpu" in argv
    pairs = [tuple(int(i) for i in arg.split("-")) for arg in argv if arg != "--cpu"]

    def say(**event):
        print(json.dumps(event), flush=True)

    try:
        import torch  # the child exists to run it

        if not cpu:
            if not torch.cuda.is_available():
                say(event="error", detail=f"torch {torch.__version__} sees no CUDA device")
                return 0
            for device in range(torch.cuda.device_count()):
                torch.empty(1, device=device)  # start CUDA on every card before any pair's clock
    except Exception as err:  # whatever stops the check stops it, said in one line
        say(event="error", detail=f"{type(err).__name__}: {err}".splitlines()[0][:300])
        return 0
    for a, b in pairs:
        say(event="start", pair=[a, b])
        try:
            check = measure_pair(torch, "cpu" if cpu else a, "cpu" if cpu else b, cpu=cpu)
        except Exception as err:  # out of memory, a driver error: no conclusion about P2P
            check = PairCheck("failed", detail=f"{type(err).__name__}: {err}".splitlines()[0][:300])
        say(event="done", pair=[a, b], **dataclasses.asdict(check))
    return 0


# -- the parent: running the child with a deadline ---------------------------------------


def run_checks(
    pairs: list[tuple[int, int]],
    devices: list[str],
    *,
    cpu: bool = False,
    start_deadline_s: float = START_DEADLINE_S,
    pair_deadline_s: float = PAIR_DEADLINE_S,
) -> dict:
    """{(a, b): PairCheck} for the rig's GPU pairs. `devices` are what CUDA_VISIBLE_DEVICES
    names for the rig's GPUs (UUIDs, or bus-order numbers); the child sees only the pairs'."""
    used = sorted({i for pair in pairs for i in pair})
    ordinal = {gpu: n for n, gpu in enumerate(used)}
    env = {
        **os.environ,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(devices[i] for i in used),
        PARENT: str(os.getpid()),
    }
    args = [f"{ordinal[a]}-{ordinal[b]}" for a, b in pairs] + (["--cpu"] if cpu else [])
    child = subprocess.Popen(
        [sys.executable, "-m", "rigtrain.rig.p2p_check", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # a Ctrl-C meant for the command is the command's to handle
    )
    events: list[dict] = []
    reader = threading.Thread(target=_read_events, args=(child.stdout, events), daemon=True)
    reader.start()
    timed_out = "stopped"
    try:
        timed_out = _wait(child, events, start_deadline_s, pair_deadline_s)
    finally:  # a deadline, or the command stopped (Ctrl-C): the child goes with it
        if timed_out:
            child.kill()
    if timed_out:
        try:  # a process stuck inside the driver may not die at once: not waited for long
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    reader.join(timeout=2)
    return _conclusions(pairs, ordinal, events, timed_out)


def _wait(child, events: list[dict], start_deadline_s: float, pair_deadline_s: float) -> str:
    """Until the child ends (""), or what it overran: "start" (importing torch and starting
    CUDA) or "pair" (a pair's copies, counted from that pair's start)."""
    started = time.monotonic()
    while child.poll() is None:
        last = events[-1] if events else None
        if last is None and time.monotonic() - started > start_deadline_s:
            return "start"
        if last is not None and last.get("event") == "start" and time.monotonic() - last["_at"] > pair_deadline_s:
            return "pair"
        time.sleep(0.05)
    return ""


def _read_events(stream, events: list[dict]) -> None:
    for line in stream:
        try:
            events.append({**json.loads(line), "_at": time.monotonic()})
        except (ValueError, TypeError):
            continue  # a library's own print, not ours


def _conclusions(pairs, ordinal, events: list[dict], timed_out: str) -> dict:
    out: dict = {}
    started = None
    for event in events:
        pair = tuple(event.get("pair") or ())
        if event.get("event") == "error":
            return {p: PairCheck("failed", detail=str(event.get("detail", ""))) for p in pairs}
        if event.get("event") == "start":
            started = pair
        elif event.get("event") == "done" and event.get("result") in RESULTS:
            fields = {k: event.get(k) for k in ("result", "gb_s", "host_gb_s", "detail")}
            out[pair] = PairCheck(**{k: v for k, v in fields.items() if v is not None})
    result = {}
    for a, b in pairs:
        key = (ordinal[a], ordinal[b])
        if key in out:
            result[(a, b)] = out[key]
        elif timed_out == "pair" and key == started:
            result[(a, b)] = PairCheck("hung", detail="a copy between them did not finish in time")
        elif timed_out == "start":
            result[(a, b)] = PairCheck("failed", detail="CUDA did not start on these cards in time")
        else:
            result[(a, b)] = PairCheck("failed", detail="the check stopped before this pair")
    return result


# -- the rig's rows, and the cache -------------------------------------------------------


def pairs_to_check(rig: Rig, indices: tuple[int, ...]) -> list[tuple[int, int]]:
    """Pairs of the given GPUs whose NVML rows both say P2P (the others already go through
    host memory, and the planner says so)."""
    gpus = rig.gpus
    return [
        (a, b)
        for n, a in enumerate(indices)
        for b in indices[n + 1 :]
        if gpus[a].p2p is not None and gpus[b].p2p is not None and gpus[a].p2p[b] and gpus[b].p2p[a]
    ]


def with_checks(rig: Rig, checks: dict) -> Rig:
    """The rig with each checked pair in both GPUs' `p2p_check` rows."""
    if not checks:
        return rig
    rows = [list(g.p2p_check or (None,) * len(rig.gpus)) for g in rig.gpus]
    for (a, b), check in checks.items():
        rows[a][b] = rows[b][a] = check.to_row_entry()
    return dataclasses.replace(
        rig,
        gpus=tuple(dataclasses.replace(g, p2p_check=tuple(row)) if any(row) else g for g, row in zip(rig.gpus, rows)),
    )


def _cache_path(rig: Rig, pair: tuple[int, int], cache_dir: Path) -> Path | None:
    """One file per pair of cards, driver, torch and boot options (the IOMMU's settings live
    on the kernel's command line); None for cards without UUIDs, whose identity is unknown."""
    uuids = [rig.gpus[i].uuid for i in pair]
    if not all(uuids):
        return None
    try:
        boot = Path("/proc/cmdline").read_text()
    except OSError:
        boot = ""
    software = rig.software or {}
    key = json.dumps([sorted(uuids), software.get("driver"), software.get("torch"), boot])
    return cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def _recalled(path: Path | None) -> PairCheck | None:
    """A kept check, or None when there is none or it is not one (damaged, edited)."""
    try:
        entry = json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("result") not in RESULTS or entry["result"] == "failed":
        return None
    rates = [entry.get(k) for k in ("gb_s", "host_gb_s")]
    if not all(r is None or (isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0) for r in rates):
        return None
    return PairCheck(entry["result"], *rates, detail=str(entry.get("detail", "")))


def checked(rig: Rig, indices: tuple[int, ...], *, cache_dir: Path, fresh: bool, log=None) -> Rig:
    """The rig with P2P checked between the given GPUs where NVML offers it: from the cache
    folder unless `fresh`, else measured (and kept; a "failed" check is not kept)."""
    pairs = pairs_to_check(rig, indices)
    if not pairs:
        return rig
    checks: dict = {}
    if not fresh:
        for pair in pairs:
            checks[pair] = _recalled(_cache_path(rig, pair, cache_dir))
    todo = [pair for pair in pairs if checks.get(pair) is None]
    if todo:
        if log:
            log(f"checking P2P between GPUs {', '.join(f'{a}-{b}' for a, b in todo)} (copies of {COPY_MIB} MiB)")
        devices = [g.uuid or str(i) for i, g in enumerate(rig.gpus)]
        for pair, check in run_checks(todo, devices).items():
            checks[pair] = check
            if check.result == "failed" and log:
                log(f"P2P between GPUs {pair[0]}-{pair[1]} could not be checked ({check.detail}); NVML's answer stands")
            path = _cache_path(rig, pair, cache_dir)
            if path and check.result != "failed":
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_json(path, dataclasses.asdict(check))
                except OSError:
                    pass  # the next command checks again
    return with_checks(rig, checks)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
