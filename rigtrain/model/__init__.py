"""The multimodal predictive-coding Perceiver. Plain PyTorch: no DeepSpeed here, so the model
runs, tests and exports without the trainer."""

from rigtrain.model.clips import ClipGeometry
from rigtrain.model.perceiver import PredictiveCodingPerceiver, build_model, count_parameters

__all__ = ["ClipGeometry", "PredictiveCodingPerceiver", "build_model", "count_parameters"]
