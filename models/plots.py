"""The paper's figures: loss per epoch (fig. 6) and clean / noisy / denoised images (fig. 7),
and speckle-reproduce's: validation loss of every run, one test image under every method.

PNG files are rendered in memory and written atomically (temp file + os.replace), with the
non-interactive Agg backend so that no display is needed.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from speckle_models.atomic_write import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def loss_curves(history: list[dict], path: Path, *, title: str = "") -> None:
    """Train and validation loss against the epoch (fig. 6)."""
    plt = _figure()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE loss (images in [-1, 1])")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def sample_grid(clean: torch.Tensor | None, noisy: torch.Tensor, denoised: torch.Tensor, path: Path,
                *, title: str = "") -> None:
    """Rows: clean, noisy, denoised; one column per image (normalized [-1, 1] inputs; fig. 7).
    clean None (a self-supervised run: no truth): rows input, denoised."""
    rows = ({"input": noisy} if clean is None else {"clean": clean, "noisy": noisy}) | {"denoised": denoised}
    method_grid([(name, [("", img * 0.5 + 0.5) for img in images]) for name, images in rows.items()],
                path, title=title)


def table2_curves(histories: dict[str, list[dict]], path: Path, *, title: str = "") -> None:
    """Validation loss per epoch of every run of a reproduction, one line per run."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        ax.plot([h["epoch"] for h in history], [h["val_loss"] for h in history], "o-", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    _save(fig, path)


def method_grid(rows: list[tuple[str, list[tuple[str, torch.Tensor]]]], path: Path, *,
                title: str = "") -> None:
    """One image under every method at every noise level: rows (level label, [(method,
    image)]), images (H, W) or (1, H, W) with values in [0, 1]; every row has the same methods."""
    plt = _figure()
    n_rows, n_cols = len(rows), max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.75 * n_rows + 0.4),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images):
                ax.axis("off")
                continue
            name, img = images[j]
            img = torch.as_tensor(img).detach().float().cpu().reshape(img.shape[-2:]).clamp(0, 1)
            ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
            if r == 0:
                ax.set_title(name, fontsize=7)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def comparison_intervals(summary: dict, levels, models, path: Path, *, title: str = "") -> None:
    """Network minus best filter per compared metric: the mean difference and its interval,
    one panel per metric, one row per network and level; filled where Holm-significant."""
    from speckle_models import DISPLAY_NAMES
    from speckle_models.reproduction.scoring import METRIC_NAMES

    plt = _figure()
    metrics = summary[levels[0].slug]["compared"]
    rows = [(m, lv) for m in models for lv in levels]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics) + 1.5, 0.35 * len(rows) + 1.3),
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        for y, (m, lv) in enumerate(rows):
            c = summary[lv.slug]["comparisons"][m].get(metric)
            if c is None:
                continue
            filled = c.get("significant", False)
            ax.errorbar(c["mean"], y, xerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]],
                        fmt="o", ms=4, capsize=2, color="C0" if filled else "C7",
                        mfc="C0" if filled else "white")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"Δ {METRIC_NAMES[metric]}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_yticks(range(len(rows)))
    axes[0][0].set_yticklabels([f"{DISPLAY_NAMES[m]} {lv.label}" for m, lv in rows], fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title + "\nfilled: Holm-adjusted p < 0.05", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
