"""The plan's choices that need no measurement: the precision a card's compute capability
allows, the loader threads the cores allow, and the processes a hostfile asks for
(docs/planner.md, "The decisions")."""

from __future__ import annotations


def choose_precision(capability: tuple[int, int]) -> tuple[str, str]:
    """bf16 needs compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() says yes
    on older cards through emulation that is slower than fp32. 7.x has fp16 tensor cores
    that need dynamic loss scaling; Pascal's consumer fp16 is crippled (1/64 of fp32), and
    the P100's gains nothing in matmuls without tensor cores, so fp32 there."""
    major, minor = capability
    if capability >= (8, 0):
        return "bf16", f"compute capability {major}.{minor} >= 8.0 has native bf16"
    if capability >= (7, 0):
        return (
            "fp16",
            f"compute capability {major}.{minor} has fp16 tensor cores but no bf16: fp16 with dynamic loss scaling",
        )
    if capability == (6, 0):  # P100: fast fp16 arithmetic, but torch's fp16 matmuls accumulate in fp32
        return (
            "fp32",
            "compute capability 6.0 has no tensor cores: fp16 matmuls, which torch accumulates in fp32, run at "
            "fp32's rate, so fp32, with no loss scale to watch",
        )
    return (
        "fp32",
        f"compute capability {major}.{minor} < 7.0: fp16 runs at a small fraction of fp32 speed on this card, so fp32",
    )


def loader_workers(configured: int, threads: int, processes: int) -> tuple[int, str]:
    """Loader threads per training process: shards need no decoding, so threads only copy
    clips out of the page cache; a few per process are plenty, and one thread per
    process is left for the process itself."""
    if configured >= 0:
        return configured, f"set by the config (data.workers={configured})"
    workers = max(1, min(8, threads // processes - 1))
    return workers, (
        f"{threads} hardware threads / {processes} training process(es), one kept for each "
        f"process's own work, at most 8: {workers} loader thread(s) per process"
    )


def machines_reason(hosts: tuple[int, ...], each: str) -> str:
    """Why the world size is what it is with --hostfile (hosts: each machine's slots)."""
    return (
        f"--hostfile: {len(hosts)} machine(s), {sum(hosts)} process(es) in all (the slots of each, "
        f"{'+'.join(map(str, hosts))}); every machine is planned like this one ({each})"
    )
