"""rigtrain: plan, train and profile a multimodal predictive-coding Perceiver on the GPUs you own."""

__version__ = "0.1.0"
