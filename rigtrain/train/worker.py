"""Entry point of one training process (`python -m rigtrain.train.worker --run-dir DIR`),
as torchrun or DeepSpeed's launcher start it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rigtrain.errors import UserError


def apply_plan_env(run_dir: Path) -> None:
    """The plan's environment (NCCL settings, device order, CPU threads), set here as well
    as by the launcher, because DeepSpeed's multi-node launcher forwards only some variables
    to other machines. Values already set (by the launcher or the user) win, and the GPU
    selection is left to the launcher."""
    plan_env = json.loads((run_dir / "config.json").read_text())["plan"]["env"]
    for key, value in plan_env.items():
        if key != "CUDA_VISIBLE_DEVICES":
            os.environ.setdefault(key, value)


def run(run_dir: str | Path) -> int:
    apply_plan_env(Path(run_dir))
    import torch

    from rigtrain.train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(run_dir)
        trainer.fit()
        return 0
    except UserError as err:
        print(f"rigtrain: error: {err}", file=sys.stderr, flush=True)
        return 2
    except FloatingPointError as err:
        print(f"rigtrain: {err}", file=sys.stderr, flush=True)
        return 1
    except torch.cuda.OutOfMemoryError as err:
        # On the first step the plan's micro-batch was too large: tell the launcher, which
        # backs off one size and starts again. Later, it is a real failure.
        if trainer is not None and trainer.step == 0:
            from rigtrain.train.launch import OOM_MARKER

            (Path(run_dir) / OOM_MARKER).write_text(json.dumps({"rank": trainer.rank, "error": str(err)[:500]}))
        print(f"rigtrain: out of GPU memory: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="set by DeepSpeed's launcher; LOCAL_RANK wins")
    args = parser.parse_args()
    return run(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
