"""Peak dense 16-bit tensor-core throughput per GPU, for MFU and step-time estimates.

The figure is for the precision the plan trains in on that card: bf16 where the card has
it (compute capability >= 8.0), fp16 on Volta and Turing. Always dense (datasheets often
quote 2x "with sparsity") and, for GeForce cards, with fp32 accumulation, which is what
training uses and which GeForce parts run at half the rate of fp16 accumulation.

Sources, per entry below:
- H100 / H200 / H20 / B200: NVIDIA's datasheets (H100 SXM 1,979 and PCIe 1,513 TFLOPS bf16
  with sparsity; H100 NVL and H200 NVL 1,671; H200 SXM 1,979; H20 296; HGX B200 4.5 PF per
  GPU with sparsity), halved.
- A100 (312), A30 (165), A10 (125): the A100, A30 and A10 datasheets (dense bf16).
- L40S (362), L40 (181), L4 (121): the L40S, L40 and L4 datasheets (733, 362, 242 with
  sparsity), halved.
- RTX 6000 Ada (364.2), RTX 4090 (165.2), RTX 4080 (97.5): the Ada Lovelace architecture
  whitepaper's appendix tables, "Peak BF16 Tensor TFLOPS with FP32 Accumulate", dense.
- RTX A6000 (154.8), RTX 3090 Ti (80), RTX 3090 (71), RTX 3080 (59.5): the Ampere GA102
  whitepaper, "Peak BF16 Tensor TFLOPS with FP32 Accumulate", dense.
- RTX 5090 (209.5): the RTX Blackwell GPU architecture whitepaper, "Peak FP16/BF16 Tensor
  TFLOPS with FP32 Accumulate", dense.
- V100 SXM2 (125), V100 PCIe (112), T4 (65): their datasheets (fp16 tensor, mixed precision).
- RTX 2080 Ti (53.8): the Turing architecture whitepaper, fp16 with fp32 accumulate.
"""

from __future__ import annotations

import re

# (name fragment, TFLOPS). A fragment matches whole words of the lower-cased name NVML or
# torch reports ("nvidia h100 80gb hbm3"), so "h20" does not match "h200" nor "a10"
# "a100"; the first match wins, so the more specific names come first.
PEAK_TENSOR_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200 nvl", 835.0),
    ("h200", 989.0),
    ("h100 nvl", 835.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h20", 148.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a30", 165.0),
    ("a10", 125.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("rtx 6000 ada", 364.2),
    ("rtx a6000", 154.8),
    ("rtx 5090", 209.5),
    ("rtx 4090", 165.2),
    ("rtx 4080", 97.5),
    ("rtx 3090 ti", 80.0),
    ("rtx 3090", 71.0),
    ("rtx 3080", 59.5),
    ("rtx 2080 ti", 53.8),
    ("v100 pcie", 112.0),
    ("v100", 125.0),
    ("t4", 65.0),
)

REFERENCE_GPU = "NVIDIA GeForce RTX 3090"


def peak_tflops(gpu_name: str) -> float | None:
    """The peak for a GPU as NVML or torch names it, or None when it is not in the table."""
    name = " ".join(gpu_name.lower().replace("-", " ").split())
    for fragment, tflops in PEAK_TENSOR_TFLOPS:
        if re.search(rf"(?<![a-z0-9]){re.escape(fragment)}(?![a-z0-9])", name):
            return tflops
    return None
