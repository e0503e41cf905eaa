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
- The other GeForce and RTX workstation cards below: the same whitepapers' per-SM rates,
  which the entries above follow exactly (GeForce Turing, Ampere, Ada and Blackwell: 512
  dense bf16/fp16 FLOPs per SM per clock with fp32 accumulate; the workstation cards
  RTX A-series, Ada Generation and PRO Blackwell, and Titan RTX: 1024), times each card's
  SM count and boost clock from NVIDIA's specification pages, e.g. RTX 3060: 28 SMs x
  1.777 GHz x 512 = 25.5; RTX 4070 Ti: 60 x 2.61 x 512 = 80.2; RTX A5000: 64 x 1.695 x
  1024 = 111.1 (its datasheet: 222.2 with sparsity). Each agrees with the card's own
  published tensor figure where NVIDIA gives one (Ada's and Blackwell's "AI TOPS" are fp8
  and fp4 with sparsity: 8x and 16x these). The RTX 4000 Ada is left out: its published
  figure implies a clock far below its boost clock. GH200's GPU is an H100's (989).
Laptop parts are left out on purpose: "RTX 4090 Laptop GPU" is another chip at other
clocks than the desktop card it is named after, so its peak is unknown, not the desktop's.
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
    ("gh200", 989.0),
    ("rtx pro 6000", 503.8),
    ("rtx 6000 ada", 364.2),
    ("rtx 5000 ada", 261.1),
    ("rtx 4500 ada", 158.5),
    ("rtx a6000", 154.8),
    ("a40", 149.7),
    ("rtx a5000", 111.1),
    ("rtx a4500", 94.6),
    ("rtx a4000", 76.7),
    ("titan rtx", 130.5),
    ("rtx 5090", 209.5),
    ("rtx 5080", 112.6),
    ("rtx 5070 ti", 87.9),
    ("rtx 5070", 61.7),
    ("rtx 5060 ti", 47.4),
    ("rtx 4090", 165.2),
    ("rtx 4080 super", 104.4),
    ("rtx 4080", 97.5),
    ("rtx 4070 ti super", 88.2),
    ("rtx 4070 ti", 80.2),
    ("rtx 4070 super", 71.0),
    ("rtx 4070", 58.3),
    ("rtx 4060 ti", 44.1),
    ("rtx 4060", 30.2),
    ("rtx 3090 ti", 80.0),
    ("rtx 3090", 71.0),
    ("rtx 3080 ti", 68.2),
    ("rtx 3080", 59.5),
    ("rtx 3070 ti", 43.5),
    ("rtx 3070", 40.6),
    ("rtx 3060 ti", 32.4),
    ("rtx 3060", 25.5),
    ("rtx 2080 ti", 53.8),
    ("rtx 2080 super", 44.6),
    ("rtx 2080", 40.3),
    ("rtx 2070 super", 36.2),
    ("rtx 2070", 29.9),
    ("v100 pcie", 112.0),
    ("v100", 125.0),
    ("t4", 65.0),
)

REFERENCE_GPU = "NVIDIA GeForce RTX 3090"


def peak_tflops(gpu_name: str) -> float | None:
    """The peak for a GPU as NVML or torch names it, or None when it is not in the table."""
    name = " ".join(gpu_name.lower().replace("-", " ").split())
    if re.search(r"\blaptop\b|\bmax q\b|\bmobile\b", name):
        return None  # another chip, other clocks (above)
    for fragment, tflops in PEAK_TENSOR_TFLOPS:
        if re.search(rf"(?<![a-z0-9]){re.escape(fragment)}(?![a-z0-9])", name):
            return tflops
    return None
