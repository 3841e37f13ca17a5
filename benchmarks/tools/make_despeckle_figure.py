"""Make docs/figures/despeckle_<example>.png/.json/.md: one real scanner frame from pydicom's
examples, its tissue before and after speckle-denoise, beside Lee, Frost and SRAD, with metrics.

    python -m benchmarks.tools.make_despeckle_figure CHECKPOINT [--example jpeg2k] [--out docs/figures]

The network's output is the tool's own: speckle-denoise writes the derived DICOM (automatic
tissue detection), and the figure reads it back. The classical filters
(speckle_models.reproduction.speckle_filters, their default parameters: Lee 7x7, Frost 5x5 with
damping 2, SRAD 30 steps of dt 0.25) run through the same tissue path (tissue.TissueDenoiser:
the tissue padded by reflection, colour and white pixels kept), on the displayed, log-compressed
gray level, as display-domain despeckling does. Metrics: the real-scan judge
(metrics/real_scan.judge), inside the tissue.
Runs on a CPU in about a minute.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from speckle_models.atomic_write import atomic_path, atomic_write_text  # noqa: E402
from speckle_models.inference import denoise as D  # noqa: E402
from speckle_models.inference import frame_io, regions  # noqa: E402
from speckle_models.inference.image_io import gray_level  # noqa: E402
from speckle_models.inference.tissue import TissueDenoiser  # noqa: E402
from speckle_models.metrics.real_scan import judge  # noqa: E402
from speckle_models.reproduction import speckle_filters as SF  # noqa: E402


class FilterNet(nn.Module):
    """A classical filter behind the networks' interface ((v - 0.5) / 0.5 in and out)."""
    size_multiple = 1

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        v = (x * 0.5 + 0.5).clamp(0, 1)
        return (self.fn(v[:, 0])[:, None] - 0.5) / 0.5


FILTERS = {"Lee 7x7": lambda v: SF.lee_filter(v, 7), "Frost 5x5, K=2": lambda v: SF.frost_filter(v, 5),
           "SRAD 30 steps": lambda v: SF.srad(v, 30)}


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def main() -> None:
    from pydicom import examples

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--example", default="jpeg2k", help="a pydicom.examples name (default jpeg2k)")
    p.add_argument("--out", default="docs/figures")
    args = p.parse_args()
    src = examples.get_path(args.example)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        rc = D.main([args.checkpoint, str(src), "--out", tmp, "--detect-tissue", "--no-progress"])
        assert rc == 0
        net_frame = next(iter(frame_io.open_source(Path(tmp) / (Path(src).stem + ".dcm"))))
    source = frame_io.open_source(src)
    frame = next(iter(source))
    m = source.max_value
    colour = regions.chroma(frame, m) > regions.CHROMA_MAX if frame.ndim == 3 else None
    plan = regions.plan_tissue(gray_level(frame, m), colour, user_boxes=[], file_boxes=[], name=str(src))
    model = D.load_denoiser(args.checkpoint, "cpu")
    pad = D.receptive_radius(model)
    results = {"speckle-denoise (network)": net_frame}
    for name, fn in FILTERS.items():
        results[name] = TissueDenoiser(FilterNet(fn), plan, m, pad=pad, max_pixels=1 << 30)([frame])[0].pixels
    before = gray_level(frame, m)
    kept = regions.overlay_mask(frame, before, m)
    tissue = np.zeros(before.shape, bool)
    for box, mask in zip(plan.boxes, plan.masks):
        tissue[box.slices] |= mask & ~kept[box.slices]
    rows = {"input": judge(before, before, tissue=tissue)}
    for name, pixels in results.items():
        rows[name] = judge(before, gray_level(pixels, m), tissue=tissue)
    box = plan.boxes[0]
    panels = {"input": frame, **results}
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)))
    for ax, (name, pixels) in zip(axes, panels.items()):
        ax.imshow(pixels[box.slices], cmap="gray", vmin=0, vmax=m, interpolation="nearest")
        r = rows[name]
        ax.set_title(f"{name}:  ENL {r['enl_after']:.1f}  speckle SNR {r['snr_after']:.2f}  edge kept "
                     f"{_num(r['edge_ratio'])}  |local mean change| {r['mean_abs_delta']:.1f}/255",
                     fontsize=9)
        ax.axis("off")
    fig.suptitle(f"pydicom example '{args.example}' (tissue T,L,H,W={box}, auto-detected), one frame",
                 fontsize=10)
    fig.tight_layout()
    stem = out / f"despeckle_{args.example}"
    with atomic_path(stem.with_suffix(".png")) as tmp_png:
        fig.savefig(tmp_png, dpi=110)
    plt.close(fig)
    # a closer look: a crop from the tissue's centre at 2x, input | network | Lee | SRAD
    ch, cw = min(140, box.height), min(260, box.width)
    top, left = box.top + (box.height - ch) // 2, box.left + (box.width - cw) // 2
    crop = (slice(top, top + ch), slice(left, left + cw))
    names = ["input", "speckle-denoise (network)", "Lee 7x7", "SRAD 30 steps"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4))
    for ax, name in zip(axes.flat, names):
        ax.imshow(panels[name][crop], cmap="gray", vmin=0, vmax=m, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"closer: rows {top}..{top + ch - 1}, columns {left}..{left + cw - 1}", fontsize=10)
    fig.tight_layout()
    with atomic_path(stem.with_name(stem.name + "_zoom.png")) as tmp_png:
        fig.savefig(tmp_png, dpi=110)
    plt.close(fig)
    info = {"example": args.example, "file": Path(src).name, "checkpoint_sha256": D._load(args.checkpoint, "cpu")[1][
        "checkpoint_sha256"], "tissue": plan.describe(), "metrics": rows,
        "command": f"python -m benchmarks.tools.make_despeckle_figure CHECKPOINT --example {args.example}"}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    lines = ["| method | ENL | speckle SNR | edge kept | local mean moved (/255) | black (/255) | checkerboard |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['enl_after']:.1f} | {r['snr_after']:.2f} | {_num(r['edge_ratio'])} | "
                     f"{r['mean_abs_delta']:.1f} | {_num(r['black_after'], 1)} | {_num(r['checker_after'], 3)} |")
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
