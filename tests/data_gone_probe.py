"""Run by tests/test_faults.py in a process of its own: open a run folder's Trainer (one rank,
gloo) whose run accumulates gradients, and make its data vanish in the middle of a step's
accumulation: the next step is read whole, then one micro-batch of the step after, then the
loader raises DataGone. Prints one JSON line: the one-line error and the data position
(micro-batches consumed) before the interrupted step.

    python tests/data_gone_probe.py RUN_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(run: Path) -> None:
    record = json.loads((run / "config.json").read_text())
    record["config"]["train"].update(steps=100, ckpt_every=1000)  # no save of its own in the way
    record["config"]["eval"]["during_training"] = False
    (run / "config.json").write_text(json.dumps(record))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.update(record["plan"]["env"])
    from rigtrain.errors import DataGone, UserError
    from rigtrain.train.trainer import Trainer

    trainer = Trainer(run)
    accum = trainer.config.train.grad_accum_steps
    real = trainer.batches

    def vanishing():
        for _ in range(accum + 1):  # a whole step, then the first micro-batch of the next
            yield next(real)
        raise DataGone("the data folder is gone (the test removed it)")

    trainer.batches = vanishing()
    position = trainer.micro_batches + accum  # where the whole step leaves the data
    try:
        trainer.fit()
        error = None
    except UserError as raised:
        error = str(raised)
    finally:
        trainer.close()
    print("PROBE " + json.dumps({"error": error, "step_end_position": position}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.exit(0)
