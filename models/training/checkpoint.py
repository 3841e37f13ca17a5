"""Checkpoints and the per-run reports of speckle-train, each written atomically.

    checkpoint.pt   model, optimizer, torch RNG states (tensors), epoch, history, config;
                    loadable with torch.load(weights_only=True)
    metrics.json / metrics.csv   the per-epoch history
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from speckle_models.atomic_write import atomic_file, atomic_write_text

from speckle_models.training.config import TrainConfig

CHECKPOINT_FORMAT = "speckle-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a speckle-train checkpoint; ValueError if it is corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, garbage...
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a speckle-train checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt.get('version')!r}; "
                         f"this tool reads version {CHECKPOINT_VERSION}")
    missing = {"config", "epoch", "model", "optimizer", "rng", "history"} - set(ckpt)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))}")
    return ckpt


def load_init_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Copy a checkpoint's weights into `model` (fine-tuning: --init); its config. ValueError
    naming the file and the first mismatch when the architectures differ."""
    ckpt = load_checkpoint(path)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        saved = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
        arch = {k: saved.get(k) for k in ("model", "width", "norm", "upsample")}
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--init {path}: its weights ({arch}) do not fit this network: {first}") from e
    return ckpt["config"]


def write_metrics(out: Path, config: TrainConfig, history: list[dict], extra: dict | None = None) -> None:
    doc = {"config": asdict(config), "history": history,
           "total_time_s": sum(h["epoch_time_s"] for h in history)}
    if extra:
        doc.update(extra)
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
    buf = io.StringIO()
    if history:
        # rows of a run resumed from an older version may lack the newer columns
        columns = list(dict.fromkeys(key for row in history for key in row))
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())
