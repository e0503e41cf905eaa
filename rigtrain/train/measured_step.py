"""The train step that rig/ measures: the real model of a config, forward and backward on
a micro-batch of the real clip shape, in the training precision: fp32 weights under bf16
autocast for bf16, the module cast to fp16 for fp16 (as the trainer's DeepSpeed config)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rigtrain.config import DataConfig, ModelConfig
from rigtrain.model.perceiver import build_model
from rigtrain.rig.step_memory import StepBuilder
from rigtrain.train.flops import meta_batch

# The dtype the weights are stored in; bf16 keeps them fp32 and computes under autocast.
WEIGHT_DTYPES = {"bf16": torch.float32, "fp16": torch.float16, "fp32": torch.float32}


def _materialize(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give a meta-device module real-shaped tensors (fake ones, under FakeTensorMode) in
    the dtype they train in (DeepSpeed casts the module for fp16)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype),
                    requires_grad=p.requires_grad,
                )
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)
    return module


def train_step_builder(
    model: ModelConfig, data: DataConfig, *, micro_batch: int, checkpointing: bool, precision: str
) -> StepBuilder:
    def build():
        config = dataclasses.replace(model, activation_checkpointing=checkpointing)
        with torch.device("meta"):  # shapes only: initialisation would need real data
            network = build_model(config, data)
        network = _materialize(network, WEIGHT_DTYPES[precision])
        batch = {
            key: torch.empty(value.shape, dtype=value.dtype)
            if key != "text_len"
            else torch.full(value.shape, data.max_text_bytes)
            for key, value in meta_batch(data, micro_batch).items()
        }

        def step() -> None:
            # The CPU's autocast stands in for the GPU's: both run matmuls and attention in
            # bf16 and norms of fp32 inputs in fp32. (They differ on norms of bf16 inputs,
            # CUDA's upcasting them; the model feeds every norm fp32, which a test guards.)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = network(batch)["loss"]
            loss.backward()

        # The batch is resident too: it sits on the GPU for the whole step.
        return [*network.parameters(), *network.buffers(), *batch.values()], step

    return build


def parameter_count(model: ModelConfig, data: DataConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(model, data).parameters())
