"""Peak dense bf16 tensor-core throughput per GPU, for MFU and step-time estimates.

Figures are the vendors' dense numbers (datasheets often quote 2x "with sparsity"); the
GeForce figures are for bf16 with fp32 accumulate. Sources: NVIDIA A100 datasheet (312),
H100 datasheet (SXM 989, PCIe 756), Ada Lovelace architecture whitepaper appendix
(RTX 4090 165.2), Ampere GA102 whitepaper (RTX 3090 71). As listed in ../shared/spec/RIG.md.
"""

from __future__ import annotations

# name fragment (lower case) -> TFLOPS; the first match wins, so longer names come first
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("rtx 4090", 165.2),
    ("rtx 3090", 71.0),
)

REFERENCE_GPU = "NVIDIA GeForce RTX 3090"


def peak_tflops(gpu_name: str) -> float | None:
    """The peak for a GPU as NVML or torch names it, or None when it is not in the table."""
    name = gpu_name.lower()
    return next((tflops for fragment, tflops in PEAK_BF16_TFLOPS if fragment in name), None)
