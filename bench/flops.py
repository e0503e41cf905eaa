"""FLOPs of a training step per clip for each preset, counted by the code (FlopCounterMode on
the meta device, as `rigtrain profile` and `rigtrain data bench` count them), and what a few
cards would consume at 40% of their peak. The README's table is this script's output:

    python bench/flops.py            # print the table and JSON
    python bench/flops.py --readme   # rewrite the table in README.md between its markers

tests/test_docs.py fails when the README's table differs from what this prints, so the
figures there are never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- flops-table: written by bench/flops.py --readme -->", "<!-- end of flops-table -->"
PRESETS = ("demo", "small", "base")
CARDS = ("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3")
MFU = 0.4


def measure() -> dict:
    from rigtrain.config import load_config
    from rigtrain.rig.peaks import peak_tflops
    from rigtrain.train.flops import step_clips_per_s, train_flops_per_clip

    out = {}
    for preset in PRESETS:
        config = load_config(preset)
        flops = train_flops_per_clip(config.model, config.data)
        out[preset] = {
            "gflops_per_clip": round(flops / 1e9, 2),
            "clips_per_s_at_40pct": {card: round(step_clips_per_s(flops, peak_tflops(card), MFU)) for card in CARDS},
        }
    return out


def table(figures: dict) -> str:
    short = [c.replace("NVIDIA ", "").replace("GeForce ", "").replace(" 80GB HBM3", "") for c in CARDS]
    lines = [
        "| preset | GFLOP per clip (forward + backward) | "
        + " | ".join(f"clips/s on {s} at 40% MFU" for s in short)
        + " |",
        "|---|---:|" + "---:|" * len(CARDS),
    ]
    for preset, f in figures.items():
        lines.append(
            f"| {preset} | {f['gflops_per_clip']:.2f} | "
            + " | ".join(f"{f['clips_per_s_at_40pct'][c]:,}" for c in CARDS)
            + " |"
        )
    return "\n".join(lines)


def readme_block(figures: dict) -> str:
    return f"{BEGIN}\n{table(figures)}\n{END}"


def current_readme_block(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    start = text.index(BEGIN)
    return text[start : text.index(END, start) + len(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args()
    figures = measure()
    if args.readme:
        text = README.read_text()
        old = current_readme_block(text)
        if old is None:
            print(f"{README}: no {BEGIN} ... {END} markers to write between", file=sys.stderr)
            return 2
        README.write_text(text.replace(old, readme_block(figures)))
    print(table(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
