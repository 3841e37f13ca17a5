"""The user's own scans as training data for speckle-train --target self-supervised --data DIR.

DIR is walked recursively for PNG/JPEG/TIFF/DICOM files (image_io.IMAGE_SUFFIXES; hidden
names and *_mask.* segmentation masks skipped); every frame of every file counts, so a DICOM
cine gives all its frames. Each frame is read by image_io.read_image (v = stored / max in
[0, 1], colour to BT.601 luminance, MONOCHROME1 inverted) and cut into its tissue regions by
`tissue_regions` -- today the whole frame, the one function to swap for the scanner's
ultrasound regions and the automatic tissue detection of the DICOM work.

From the regions at least image_size on each side, `count` crops of image_size x image_size
are drawn from a generator seeded with `seed`: a file uniformly (so a 300-frame cine does not
drown a single frame), then one of its regions, then a position, all uniformly; a crop with
less than MIN_SIGNAL of its pixels above black is drawn again in the same file (up to REDRAWS
times, then the best one is kept: scans have wide black borders, and a black crop teaches
nothing about speckle). Crops
are stored as
uint8 (round(255 v): ultrasound is displayed at 8 bits; a 12- or 16-bit frame loses its low
bits here), then split train / validation by split_indices like the other sources. There is
no speckle-free map, so no supervised target; the test set is the validation set (its
pixels are never scored against a truth). A frame is never resized: the speckle's grain, which
the self-supervised objectives measure, must stay that of the scanner.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from speckle_models.data.datasets import UltrasoundData, split_indices
from speckle_models.inference.image_io import IMAGE_SUFFIXES, read_image

DEFAULT_CROPS = 500
MIN_SIGNAL, BLACK, REDRAWS = 0.25, 2 / 255, 20


def scan_files(root: str | os.PathLike) -> list[Path]:
    """The image files under root (or root itself when it is a file), sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"--data {str(root)!r}: no such folder or file")
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(dirpath) / f for f in files if not f.startswith(".")
                  and Path(f).suffix.lower() in IMAGE_SUFFIXES and not Path(f).stem.endswith("_mask")]
    if not found:
        raise FileNotFoundError(f"--data {str(root)!r}: no {', '.join(IMAGE_SUFFIXES)} files in this folder")
    return sorted(found)


def tissue_regions(frame: np.ndarray) -> list[np.ndarray]:
    """The parts of one frame (v in [0, 1], (H, W)) that hold tissue. SWAP HERE: today the
    whole frame; with the DICOM work, the scanner's ultrasound regions cut to the tissue."""
    return [frame]


def read_regions(files: list[Path], image_size: int, progress: bool = False) -> list[list[np.ndarray]]:
    """Per file that has one, every tissue region at least image_size a side of its frames."""
    regions, small = [], 0
    it = files
    if progress and len(files) > 1:
        from tqdm.auto import tqdm
        it = tqdm(files, desc="read scans", unit="file")
    for path in it:
        image = read_image(path)          # ValueError / ModuleNotFoundError naming the file
        found = []
        for frame in image.frames:
            for region in tissue_regions(frame):
                if min(region.shape) >= image_size:
                    found.append(region)
                else:
                    small += 1
        if found:
            regions.append(found)
    if not regions:
        raise ValueError(f"no frame of the {len(files)} file(s) is at least {image_size}x{image_size} "
                         f"({small} smaller region(s)); lower --image-size")
    return regions


def random_crops(regions: list[list[np.ndarray]], image_size: int, count: int, seed: int) -> np.ndarray:
    """`count` uint8 crops (count, 1, S, S): file, region and position uniform, mostly-black
    crops drawn again (module docstring), seeded."""
    g = torch.Generator().manual_seed(seed)
    out = np.empty((count, 1, image_size, image_size), np.uint8)

    def pick(n):
        return int(torch.randint(n, (), generator=g))

    for i in range(count):
        file = regions[pick(len(regions))]
        best, best_signal = None, -1.0
        for _ in range(REDRAWS):               # redrawn within the file: files stay balanced
            r = file[pick(len(file))]
            top, left = pick(r.shape[0] - image_size + 1), pick(r.shape[1] - image_size + 1)
            crop = np.clip(r[top:top + image_size, left:left + image_size], 0, 1)
            signal = float((crop > BLACK).mean())
            if signal > best_signal:
                best, best_signal = crop, signal
            if signal >= MIN_SIGNAL:
                break
        out[i, 0] = np.rint(best * 255)
    return out


def load_scan_folder(root, *, image_size: int, seed: int = 0, val_fraction: float = 0.2,
                     count: int | None = None, progress: bool = False) -> UltrasoundData:
    """Crops of the user's scans as UltrasoundData (no speckle-free maps; test = validation)."""
    files = scan_files(root)
    regions = read_regions(files, image_size, progress)
    n = count or DEFAULT_CROPS
    crops = torch.from_numpy(random_crops(regions, image_size, n, seed))
    tr, va = split_indices(n, val_fraction, seed)
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"{n} crop(s) cannot be split into training and validation; raise --count")
    return UltrasoundData(train=crops[tr], val=crops[va], test=crops[va], source=str(root),
                          info={"files": len(files), "regions": sum(map(len, regions)), "crops": n, "seed": seed,
                                "val_fraction": val_fraction, "test_is_val": True})
