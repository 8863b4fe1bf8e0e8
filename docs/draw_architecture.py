"""Draw docs/images/architecture.png, the picture in docs/design.md, section 2.

    python docs/draw_architecture.py [--out docs/images/architecture.png]

Left: the segmentor (encoder, optional neck, decode and auxiliary heads) with the feature shapes of the
seed's ViL-S at a 512x512 input. Right: one ViL block, step by step as section 3 writes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

ENCODER, NECK, HEAD, CELL, DATA = "#cfe3f7", "#e6e6e6", "#fde2c4", "#d7f0d2", "#ffffff"


def box(ax, x: float, y: float, w: float, h: float, text: str, color: str, size: float = 8.5) -> None:
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="#444444", linewidth=0.8))  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, x0: float, y0: float, x1: float, y1: float, text: str = "", dashed: bool = False) -> None:
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=9, linewidth=0.8,
                                 color="#333333", linestyle="--" if dashed else "-"))  # fmt: skip
    if text:
        ax.text((x0 + x1) / 2 + 0.08, (y0 + y1) / 2, text, ha="left", va="center", fontsize=7, color="#333333")


def segmentor(ax) -> None:
    ax.set_title("Seg-LSTM segmentor (shapes for ViL-S at 512x512)", fontsize=10)
    x = 2.0
    box(ax, x, 11.2, 3.0, 0.6, "image  B x 3 x 512 x 512", DATA)
    box(ax, x, 10.0, 3.4, 0.8, "patch embed: conv 16x16, stride 16\n+ learned 2D position table", ENCODER)
    arrow(ax, x, 10.9, x, 10.4)
    box(ax, x, 8.8, 3.0, 0.6, "tokens  B x 1024 x 384", DATA)
    arrow(ax, x, 9.6, x, 9.1)
    for n, y in enumerate((7.6, 6.6, 5.6, 4.6)):
        box(ax, x, y, 3.0, 0.7, f"stage {n + 1}: 6 ViL blocks\n(directions alternate)", ENCODER)
        arrow(ax, x, y + (0.85 if n == 0 else 0.65), x, y + 0.35)
        box(ax, 5.6, y, 2.4, 0.55, f"map {n}: B x 384 x 32 x 32", DATA, 7.5)
        arrow(ax, x + 1.5, y, 4.4, y)
    box(ax, 5.6, 3.2, 2.8, 0.8, "all four maps; optional neck\n(multilevel: 1/4 .. 1/32; seed: none)", NECK, 7.5)
    arrow(ax, 5.6, 4.3, 5.6, 3.6, dashed=True)
    box(ax, 3.6, 1.8, 3.0, 0.9, "decode head (512 ch)\nUPerNet | ANN | APCNet |\nDeepLabV3 | DeepLabV3+", HEAD, 7.5)
    box(ax, 7.2, 1.8, 2.4, 0.9, "auxiliary FCN head\n(256 ch, map 2,\nloss weight 0.4)", HEAD, 7.5)
    arrow(ax, 5.2, 2.8, 4.2, 2.25)
    arrow(ax, 6.0, 2.8, 7.0, 2.25)
    box(ax, 3.6, 0.45, 3.0, 0.6, "logits B x K x 32 x 32\n-> resized to 512 x 512", DATA, 7.5)
    arrow(ax, 3.6, 1.35, 3.6, 0.75)
    ax.set_xlim(0, 9)
    ax.set_ylim(0, 11.8)


def vil_block(ax) -> None:
    ax.set_title("one ViL block (d = 384, e = 768, 4 heads)", fontsize=10)
    x = 2.6
    steps = [
        (11.2, "x  (B x S x d)", DATA),
        (10.3, "LayerNorm (weight = 1 + stored, no bias)", CELL),
        (9.4, "flip the sequence (odd blocks)", NECK),
        (8.5, "proj_up: d -> 2e, split into x_m, z", CELL),
        (7.6, "a = SiLU(causal conv1d(x_m), kernel 4)", CELL),
        (6.7, "q, k = blockdiag(a);  v = blockdiag(x_m)", CELL),
        (5.8, "gates i, f = Linear(concat(q, k, v))", CELL),
        (4.9, "mLSTM cell per head (section 4)", ENCODER),
        (4.0, "per-head group norm", CELL),
        (3.1, "h = (norm + skip * a) * SiLU(z)", CELL),
        (2.2, "proj_down: e -> d;  flip back", CELL),
        (1.2, "x + drop_path(layer)", DATA),
    ]
    for (y, text, color), nxt in zip(steps, [*steps[1:], None]):
        box(ax, x, y, 4.4, 0.6, text, color, 8)
        if nxt is not None:
            arrow(ax, x, y - 0.3, x, nxt[0] + 0.3)
    ax.add_patch(FancyArrowPatch((x + 2.2, 11.2), (x + 2.2, 1.2), connectionstyle="arc3,rad=-0.25",
                                 arrowstyle="-|>", mutation_scale=9, linewidth=0.8, color="#777777"))  # fmt: skip
    ax.text(x + 3.1, 6.2, "residual", fontsize=7, color="#555555", rotation=90, va="center")
    ax.set_xlim(0, 6.2)
    ax.set_ylim(0, 11.8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "images" / "architecture.png"))
    args = parser.parse_args(argv)
    fig = Figure(figsize=(12, 7.2), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [9, 6.2]})
    segmentor(left)
    vil_block(right)
    for ax in (left, right):
        ax.axis("off")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
