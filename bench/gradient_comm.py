"""What averaging gradients in bf16 between processes costs, against bf16's own error: one
step's averaged gradient on N gloo processes (as N GPUs would average it), from the same
weights and batches, in fp32, in bf16 with DeepSpeed's bf16 averaging of Linear layers'
gradients (what rigtrain runs on several GPUs), and in bf16 with that averaging in fp32.

    python bench/gradient_comm.py                          # the demo's weights after 300 fp32 steps, ZeRO 1 and 3
    python bench/gradient_comm.py --init-from RUN --stages 1 2 3 --nproc 2

It prints the relative error (the norm of the difference over the norm of the reference,
over all weights together) of each bf16 gradient against fp32's, and of bf16 averaging
against fp32 averaging, with the step's loss; --json for one JSON document. From trained
weights, not the initial ones: at initialisation every bias is zero, which hides rounding
that comes after a bias (README, "Precision and the GPU path")."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rigtrain.train.rendezvous import port_file_env

COMMS = ("bf16", "fp32")  # how the bf16 runs average Linear layers' gradients


def rigtrain_train(out: Path, *args: str) -> None:
    command = [sys.executable, "-m", "rigtrain", "train", "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")


def run_folder(root: Path, precision: str, stage: int, nproc: int, init_from: Path) -> Path:
    """A run folder planned for these settings, starting from `init_from`'s weights: a
    one-step run whose checkpoint and metrics are then removed, so that a Trainer opened on
    it starts again from those weights."""
    out = root / f"{precision}-zero{stage}"
    if not (out / "config.json").exists():
        rigtrain_train(
            out, "--steps", "1", "--init-from", str(init_from), "--set", f"train.precision={precision}",
            f"train.zero_stage={stage}", f"train.nproc={nproc}", "eval.during_training=false",
        )  # fmt: skip
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "metrics.jsonl").write_text("")
    return out


def gradients(run: Path, comm: str, nproc: int, out: Path) -> dict:
    """One step's averaged gradient on nproc processes (this script with --rank), saved by rank 0."""
    meeting = Path(tempfile.mkdtemp(prefix="gradient-comm-"))  # rank 0 leaves its store's port here (rendezvous.py)
    shared = {**os.environ, **port_file_env(meeting), "WORLD_SIZE": str(nproc)}
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(r), "--run", str(run), "--comm", comm, "--save", str(out)],
            env={**shared, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(nproc)
    ]
    outputs = [p.communicate() for p in ranks]
    shutil.rmtree(meeting, ignore_errors=True)
    for p, (_, err) in zip(ranks, outputs):
        if p.returncode != 0:
            raise SystemExit(f"a rank of {run} ({comm} averaging) failed:\n{err[-2000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def rank_main(run: Path, comm: str, save: Path) -> None:
    """One rank: the run's Trainer with the chosen averaging, one forward and backward, the
    averaged gradient of every weight."""
    record = json.loads((run / "config.json").read_text())
    os.environ.update(record["plan"]["env"], MASTER_ADDR="127.0.0.1")
    import torch  # after the plan's environment (threads)
    from deepspeed.utils import safe_get_full_grad

    import rigtrain.train.saving as saving  # where the Trainer's engine set-up reads deepspeed_config
    import rigtrain.train.trainer as trainer

    planned = saving.deepspeed_config

    def with_averaging(*args, **kwargs):
        config = planned(*args, **kwargs)
        if "torch_autocast" in config:
            # [] : every gradient averaged in fp32; absent: DeepSpeed's default, Linear in bf16
            config["torch_autocast"].pop("lower_precision_safe_modules", None)
            if comm == "fp32":
                config["torch_autocast"]["lower_precision_safe_modules"] = []
        return config

    saving.deepspeed_config = with_averaging
    t = trainer.Trainer(run)
    batch, _ = t._next_batch()
    terms = t.engine(batch)
    t.engine.backward(terms["loss"])
    grads = {}
    for name, p in t.engine.module.named_parameters():
        g = safe_get_full_grad(p)  # a collective at ZeRO-3: every rank asks
        if g is not None:
            grads[name] = g.detach().float().clone()
    if t.rank == 0:
        torch.save(grads, save)
    print(json.dumps({"loss": float(terms["loss"])}))
    t.close()


def relative_error(path: Path, reference: Path) -> float:
    import torch  # only to compare

    a, b = torch.load(path), torch.load(reference)
    difference = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    norm = sum(float(b[k].pow(2).sum()) for k in b)
    return (difference / norm) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--init-from", type=Path, help="a run whose weights to start from (default: 300 fp32 steps)")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--comm", choices=COMMS, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.run, args.comm, args.save)
        return 0
    if args.nproc < 2:
        parser.error("--nproc: at least 2 (one process averages nothing)")
    root = args.out or Path(tempfile.mkdtemp(prefix="rigtrain-gradient-comm-"))
    root.mkdir(parents=True, exist_ok=True)
    init_from = args.init_from
    if init_from is None:
        init_from = root / "weights"
        if not (init_from / "checkpoints").is_dir():
            rigtrain_train(init_from, "--steps", "300", "--set", "eval.during_training=false", "train.ckpt_every=300")
    rows = []
    for stage in args.stages:
        reference = root / f"fp32-zero{stage}.pt"
        fp32 = gradients(run_folder(root, "fp32", stage, args.nproc, init_from), "fp32", args.nproc, reference)
        bf16_run = run_folder(root, "bf16", stage, args.nproc, init_from)
        losses, paths = {}, {}
        for comm in COMMS:
            paths[comm] = root / f"bf16-zero{stage}-{comm}-averaging.pt"
            losses[comm] = gradients(bf16_run, comm, args.nproc, paths[comm])["loss"]
        rows.append(
            {
                "zero_stage": stage,
                "loss_fp32": fp32["loss"],
                "loss_bf16": losses["bf16"],
                "bf16_vs_fp32": relative_error(paths["bf16"], reference),
                "bf16_fp32_averaging_vs_fp32": relative_error(paths["fp32"], reference),
                "bf16_averaging_vs_fp32_averaging": relative_error(paths["bf16"], paths["fp32"]),
            }
        )
    report = {"nproc": args.nproc, "init_from": str(init_from), "rows": rows, "folder": str(root)}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"one step's averaged gradient on {args.nproc} processes, from {init_from}")
    print(
        f"{'ZeRO':>4} {'loss fp32':>10} {'loss bf16':>10} {'bf16 vs fp32':>13} {'(fp32 avg)':>11} "
        + f"{'bf16 avg vs fp32 avg':>21}"
    )
    for r in rows:
        print(
            f"{r['zero_stage']:>4} {r['loss_fp32']:>10.6f} {r['loss_bf16']:>10.6f} {r['bf16_vs_fp32']:>13.3%} "
            f"{r['bf16_fp32_averaging_vs_fp32']:>11.3%} {r['bf16_averaging_vs_fp32_averaging']:>21.3%}"
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
