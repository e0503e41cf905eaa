"""Run by tests/test_gpu_path.py in a process of its own (forked from the tests' preloaded
one, tests/preloaded_cli.py; a new interpreter with RIGTRAIN_TEST_FRESH=1): open a run
folder's Trainer in this process (one rank, gloo), take two steps to warm up, then measure
the next step and print one JSON line:

- syncs: the ops in that step that make the host wait for the device (`.item()`,
  `nonzero`, ...), split into those inside DeepSpeed's optimizer step and the rest;
- the dtypes the optimizer keeps: its master weights and where gradients accumulate;
- the output dtypes of the step's matmuls (bf16 under autocast) and of a contrastive head;
- the ops that step dispatches besides the model's forward and autograd's backward (the
  trainer's bookkeeping, gradient reduction, clipping, the optimizer), with the parameters;
- then one logged step: the ops its gradient statistics dispatch, against the parts and
  parameters they cover.

    python tests/step_probe.py RUN_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must wait for: a value read back (`_local_scalar_dense` is what
# `.item()`, `float(t)`, `if t:` and `.tolist()` run) or an output shape that depends on values.
SYNC_OPS = (
    "_local_scalar_dense",
    "nonzero",
    "is_nonzero",
    "equal",
    "masked_select",
    "_unique",
    "unique_",
    "repeat_interleave",
)


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where = "step"
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if any(name.startswith(op) for op in SYNC_OPS):
            key = f"{self.where}:{name}"
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


# The matmul-like ops whose output dtype says whether autocast ran them in bf16.
MATMUL_OPS = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_efficient_attention_forward",
)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view  # a view (detach, reshape) launches no kernel
        return func(*args, **(kwargs or {}))


class OutsideModelCounter(OpCounter):
    """Ops outside the model's forward and autograd's backward: what the host adds per step
    around the model (on a GPU nearly each one a kernel launch)."""

    def __init__(self):
        super().__init__()
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def around(self, function):
        def counted(*args, **kwargs):
            self.inside += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.inside -= 1

        return counted


class MatmulDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name.split("::")[-1] in MATMUL_OPS:
            first = out[0] if isinstance(out, tuple) else out
            self.counts[str(first.dtype)] = self.counts.get(str(first.dtype), 0) + 1
        return out


def main(run: Path) -> None:
    record = json.loads((run / "config.json").read_text())
    record["config"]["train"].update(steps=10, log_every=100)  # the measured step is not a logging step
    record["config"]["eval"]["during_training"] = False
    record["config"]["profile"]["enabled"] = False  # a run that was profiled: the probe measures a plain step
    (run / "config.json").write_text(json.dumps(record))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.update(record["plan"]["env"])
    from rigtrain.train.trainer import Trainer

    trainer = Trainer(run)
    try:
        # Two steps to warm up: ZeRO-3 records the order its parameters are used in during
        # the first step and checks that record across ranks (a read-back per entry) at the
        # start of the second; from the third on a step is what every later one is.
        trainer.train_step()
        trainer.train_step()
        counter = SyncCounter()
        engine_step = trainer.engine.step

        def counted_step(*args, **kwargs):
            counter.where = "optimizer"
            try:
                return engine_step(*args, **kwargs)
            finally:
                counter.where = "step"

        trainer.engine.step = counted_step
        matmuls = MatmulDtypes()
        head_dtypes = []
        hook = trainer.engine.module.video_to_va.register_forward_hook(lambda m, i, o: head_dtypes.append(str(o.dtype)))
        outside = OutsideModelCounter()
        forward, autograd_backward = trainer.engine.forward, torch.autograd.backward
        trainer.engine.forward, torch.autograd.backward = outside.around(forward), outside.around(autograd_backward)
        with counter, matmuls, outside:
            trainer.train_step()
        trainer.engine.forward, torch.autograd.backward = forward, autograd_backward
        hook.remove()
        # a logged step: the ops its gradient statistics dispatch that launch kernels (between
        # backward and the optimizer, where the host's time delays the step)
        statistics = OpCounter()
        take_gradients = trainer._take_gradients

        def counted_statistics(*args, **kwargs):
            with statistics:
                return take_gradients(*args, **kwargs)

        trainer._take_gradients, trainer._logs = counted_statistics, lambda step: True
        trainer.train_step()
        optimizer = trainer.engine.optimizer
        masters = (
            getattr(optimizer, "fp32_partitioned_groups_flat", None)
            or getattr(optimizer, "single_partition_of_fp32_groups", None)
            or [p for g in optimizer.param_groups for p in g["params"]]
        )
        if hasattr(optimizer, "gradient_accumulation_dtype"):  # ZeRO-3
            accumulation = optimizer.gradient_accumulation_dtype
        else:  # the gradients live in the parameters' .grad
            accumulation = next(trainer.engine.module.parameters()).dtype
        out = {
            "syncs": counter.counts,
            "optimizer": type(optimizer).__name__,
            "module_dtype": str(next(trainer.engine.module.parameters()).dtype),
            "master_dtypes": sorted({str(m.dtype) for m in masters}),
            "grad_accumulation_dtype": str(accumulation),
            # the dtypes DeepSpeed's gradient buckets copy gradients into (none at ZeRO-0)
            "gradient_bucket_dtypes": sorted(str(d) for d in getattr(optimizer, "ipg_buckets", {})),
            "running_mean_dtype": str(trainer.engine.module.mean_video_va.dtype),
            "matmul_output_dtypes": matmuls.counts,
            "head_output_dtype": head_dtypes[0],
            # ZeRO-3 may have replaced torch's linear for the whole process
            "functional_linear": torch.nn.functional.linear.__name__,
            "outside_model_ops": outside.ops,
            "statistics_ops": statistics.ops,
            "statistics_parts": len(trainer.stat_parts),
            "parameters": sum(len(p) for p in trainer.stat_parts.values()),
        }
        print("PROBE " + json.dumps(out), flush=True)
    finally:
        trainer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.exit(0)
