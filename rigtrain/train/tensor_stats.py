"""Looking inside the model while it trains (the `[log]` keys; docs/training.md): each
part's gradient norm at every logged step, and every `log.histograms_every` steps
histograms of each part's weights and gradients and of the encoder's latent. A mixin of
the Trainer.

The gradient is the one the optimizer is about to apply (before clipping): averaged over
the ranks and the step's micro-batches, read between the last backward and the step with
DeepSpeed's `safe_get_full_grad`, at every ZeRO stage. Not a rank's own gradient: with
several ranks the contrastive terms' per-rank parts are tens of times larger than their
average and cancel in it (measured on the demo's model: 8,500 against 270 for the heads).

Cost: nothing on the steps in between. On a logged step, one collective per parameter (the
gradient's pieces, at ZeRO-1 to 3) and a square-sum each, on the device, read with the
loss; a histogram step copies a strided sample (at most 4096 values per tensor) to the host.
`python bench/tensor_stats.py` measures it against a run with both off."""

from __future__ import annotations

import torch

from rigtrain.model.parts import parameter_parts

SAMPLE = 4096  # values kept per tensor for a histogram


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE)
    return flat[::stride][:SAMPLE].float()


class TensorStatisticsLogging:
    def _setup_statistics(self) -> None:
        module = self.engine.module
        self.stat_parts = parameter_parts(module)
        self.stat_hooks: list = []
        self.grad_squares: dict[str, torch.Tensor] = {}
        self.grad_samples: dict[str, list[torch.Tensor]] = {}
        self.latent_sample: torch.Tensor | None = None
        blocks = getattr(module, "encoder_self", None)
        self.latent_block = blocks[-1] if blocks is not None and len(blocks) else getattr(module, "encoder_cross", None)

    def _logs(self, step: int) -> bool:
        """Whether `step` is a logging step. Checkpoint steps are logging steps, so the
        divergence rules look at a step before it is saved; the first one is a baseline."""
        t = self.config.train
        return (
            step % t.log_every == 0
            or step == t.steps
            or step in self.eval_steps
            or step % t.ckpt_every == 0
            or step == self.first_step + 1
        )

    def _histogram_step(self, step: int) -> bool:
        every = self.config.log.histograms_every
        return bool(every) and step % every == 0 and self._logs(step)

    def _arm_statistics(self) -> None:
        """Before the last micro-batch's forward on a histogram step: keep a sample of the
        encoder's latent."""
        if self.latent_block is not None:
            self.stat_hooks.append(self.latent_block.register_forward_hook(self._on_latent))

    def _on_latent(self, module, inputs, output) -> None:
        latent = output[0] if isinstance(output, tuple) else output
        self.latent_sample = _sample(latent)

    def _take_gradients(self, histograms: bool) -> None:
        """Between the last backward of a logged step and the optimizer step: each part's
        squared gradient norm (and samples on a histogram step), on the device."""
        from deepspeed.utils import safe_get_full_grad  # DeepSpeed: only in training processes

        for hook in self.stat_hooks:
            hook.remove()
        self.stat_hooks = []
        if not (self.config.log.grad_norms or histograms):
            return
        for part, parameters in self.stat_parts.items():
            grads = []
            for parameter in parameters:
                grad = safe_get_full_grad(parameter)  # a collective at ZeRO-1 to 3: every rank, same order
                if grad is not None:  # fp16's gradients in fp32: a norm can pass fp16's 65504
                    grads.append(grad.detach().float() if grad.dtype == torch.float16 else grad.detach())
            if histograms:
                self.grad_samples.setdefault(part, []).extend(_sample(g) for g in grads)
            if grads:
                # multi-tensor kernels, not three kernels per parameter: on an H200 the
                # per-parameter sums took 11-20 ms of `small`'s ~150 ms logged (profiled) step
                self.grad_squares[part] = torch.nn.utils.get_total_norm(grads, foreach=True).float().square()

    def _gradient_norms(self) -> dict[str, torch.Tensor]:
        """After the logged step: each part's gradient norm (on the device; the same on every rank)."""
        squares, self.grad_squares = self.grad_squares, {}
        return {f"grad_norm/{part}": s.sqrt() for part, s in squares.items()} if self.config.log.grad_norms else {}

    def _write_histograms(self) -> None:
        """Rank 0, on a histogram step: weights (whole below ZeRO-3, where each rank holds
        only its shard), gradients and the encoder's latent, per part."""
        samples, self.grad_samples = self.grad_samples, {}
        latent, self.latent_sample = self.latent_sample, None
        if not self.log:
            return
        values = {f"gradients/{part}": torch.cat(parts) for part, parts in samples.items()}
        if self.config.train.zero_stage < 3:
            for part, parameters in self.stat_parts.items():
                values[f"weights/{part}"] = torch.cat([_sample(p) for p in parameters])
        if latent is not None:
            values["latent/encoder"] = latent
        self.log.write_histograms({k: v.cpu() for k, v in values.items()}, self.step)
