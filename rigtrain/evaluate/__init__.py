"""Evaluation of a frozen encoder: features of held-out and training clips, kNN and linear
probe per label, text<->video retrieval (docs/model.md, "Evaluation")."""

from rigtrain.evaluate.evaluation import Features, evaluate, extract_features, flat_metrics, format_result

__all__ = ["Features", "evaluate", "extract_features", "flat_metrics", "format_result"]
