"""What checksumming a checkpoint costs against saving it: for each preset, state dicts the
size of its checkpoint (the weights in bf16 and the optimizer's fp32 master weights and two
moments, as DeepSpeed saves them) are written with torch.save, then listed with their sizes
and xxh3 checksums as complete.json does (rigtrain.train.checkpoints.describe_files), and
flushed to the disk as `mark_complete` does before it marks a checkpoint complete
(rigtrain.files.sync_tree: what surviving a power cut costs; it depends on the disk and on
how much of the save the kernel has written back already).

    python bench/checkpoint_hash.py [--presets demo small base] [--json]

The target (issue 11): hashing under 10% of the save. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def measure(preset: str, folder: Path) -> dict:
    import torch

    from rigtrain.config import load_config
    from rigtrain.files import sync_tree
    from rigtrain.train.checkpoints import describe_files
    from rigtrain.train.measured_step import parameter_count

    config = load_config(preset)
    n = parameter_count(config.model, config.data)
    model = {"module": {"weights": torch.randn(n).to(torch.bfloat16)}}
    optimizer = {"master": torch.randn(n), "exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}
    tag = folder / preset
    tag.mkdir()
    started = time.perf_counter()
    torch.save(model, tag / "mp_rank_00_model_states.pt")
    torch.save(optimizer, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    sync_tree(tag)
    sync_s = time.perf_counter() - started
    started = time.perf_counter()
    files = describe_files(tag)
    hash_s = time.perf_counter() - started
    size = sum(f["bytes"] for f in files.values())
    return {
        "preset": preset,
        "parameters": n,
        "bytes": size,
        "save_s": round(save_s, 3),
        "hash_s": round(hash_s, 3),
        "hash_vs_save": round(hash_s / save_s, 4),
        "sync_s": round(sync_s, 3),
        "sync_vs_save": round(sync_s / save_s, 4),
        "hash_gb_s": round(size / hash_s / 1e9, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["demo", "small", "base"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rigtrain-ckpt-bench-", dir=".") as tmp:
        rows = [measure(preset, Path(tmp)) for preset in args.presets]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        f"{'preset':<8}{'parameters':>12}{'checkpoint MB':>15}{'save s':>9}{'hash s':>9}"
        f"{'hash/save':>11}{'hash GB/s':>11}{'fsync s':>9}{'fsync/save':>12}"
    )
    for r in rows:
        print(
            f"{r['preset']:<8}{r['parameters']:>12,}{r['bytes'] / 1e6:>15.1f}{r['save_s']:>9.3f}{r['hash_s']:>9.3f}"
            f"{r['hash_vs_save']:>11.1%}{r['hash_gb_s']:>11.2f}"
            f"{r['sync_s']:>9.3f}{r['sync_vs_save']:>12.1%}"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
