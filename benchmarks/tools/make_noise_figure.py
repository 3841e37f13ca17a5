"""Make docs/figures/noise_examples.png: phantom images, their speckle-free maps and the noisy
versions at multiplication factors 1, 5 and 10 (the paper's) for both noise distributions.

    python -m benchmarks.tools.make_noise_figure [--out docs/figures/noise_examples.png] [--seed 0]

Runs on a CPU: the noise comes from the Triton kernel under its interpreter (the same
counter-based bits a GPU gives), so the figure does not depend on the machine.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"   # must precede the import of speckle_kernels

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from speckle_kernels.noise import DEFAULT_SIGMA_ADD, DEFAULT_SIGMA_MULT, add_speckle_noise  # noqa: E402
from speckle_models.data.phantom import generate_phantom  # noqa: E402

FACTORS = (1, 5, 10)
DISTRIBUTIONS = ("gaussian", "rayleigh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures/noise_examples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=3)
    args = parser.parse_args()

    images, clean = generate_phantom(args.rows, seed=args.seed, progress=False)
    x = images.float() / 255
    backend = "triton" if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else "auto"
    device = "cuda" if torch.cuda.is_available() and backend == "triton" and \
        os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    columns = [("speckle-free map", clean.float() / 255), ("phantom (clean input)", x)]
    for distribution in DISTRIBUTIONS:
        for factor in FACTORS:
            y = add_speckle_noise(x.to(device), factor=factor, distribution=distribution,
                                  seed=args.seed, backend=backend).cpu()
            columns.append((f"{distribution} x{factor}", y))

    n_cols = len(columns)
    fig, axes = plt.subplots(args.rows, n_cols, figsize=(1.9 * n_cols, 2.0 * args.rows + 0.7),
                             squeeze=False)
    for c, (title, t) in enumerate(columns):
        for r in range(args.rows):
            ax = axes[r, c]
            ax.imshow(t[r, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"Speckle noise y = x(1 + f·{DEFAULT_SIGMA_MULT}·n1) + {DEFAULT_SIGMA_ADD}·n2, "
                 f"clipped to [0, 1]; synthetic B-mode phantom, 128×128", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
