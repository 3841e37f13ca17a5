"""The user's own scans as training data for speckle-train --target self-supervised --data DIR.

DIR is walked recursively for PNG/JPEG/TIFF/DICOM files (image_io.IMAGE_SUFFIXES; hidden
names and *_mask.* segmentation masks skipped); every frame of every file counts, so a DICOM
cine gives all its frames. Each file is read through speckle-denoise's frame sources
(frame_io.open_source: every photometric kind and compression; v = stored / max in [0, 1],
colour to BT.601 luminance) and cut into its tissue regions as speckle-denoise cuts it
(tissue.source_plan, from the file's first frame: the DICOM file's 2D tissue ultrasound
regions, else the detected tissue area), so training sees what the network will be run on:
not the patient text, the scale bars, the ECG trace or the black around the fan. Inside a
region, colour and white overlay pixels (colour Doppler, burned-in text and markers:
regions.overlay_mask) are kept out: a crop with more than MAX_OVERLAY of them is drawn again.
`whole_frame=True` takes every frame whole (phantom images, crops that are all tissue).

From the regions at least image_size on each side, `count` crops of image_size x image_size
are drawn from a generator seeded with `seed`: a file uniformly (so a 300-frame cine does not
drown a single frame), then one of its regions, then a position, all uniformly; a crop with
less than MIN_SIGNAL of its pixels above black, or with overlay pixels, is drawn again in the
same file (up to REDRAWS times, then the best one is kept: a black crop teaches nothing about
speckle). Crops
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
from speckle_models.inference.image_io import IMAGE_SUFFIXES, gray_level

DEFAULT_CROPS = 500
MIN_SIGNAL, BLACK, REDRAWS = 0.25, 2 / 255, 20
MAX_OVERLAY = 0.005   # share of a crop's pixels that may be colour or white overlay


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


def file_regions(path: Path, image_size: int, whole_frame: bool = False) -> tuple[list, int]:
    """([(v, overlay) per tissue region at least image_size a side, of every frame], the number
    of smaller ones): v the region's gray levels in [0, 1], overlay its colour/white pixels.
    ValueError / ModuleNotFoundError naming the file (frame_io, regions)."""
    from speckle_models.inference import regions
    from speckle_models.inference.frame_io import open_source
    from speckle_models.inference.tissue import source_plan

    source = open_source(path)
    plan = (regions.whole_frame_plan(source.height, source.width) if whole_frame
            else source_plan(source))
    found, small = [], 0
    for frame in source:
        v = gray_level(frame, source.max_value)
        overlay = (np.zeros(v.shape, bool) if whole_frame
                   else regions.overlay_mask(frame, v, source.max_value))
        for box in plan.boxes:
            if min(box.height, box.width) >= image_size:
                found.append((v[box.slices], overlay[box.slices]))
            else:
                small += 1
    return found, small


def read_regions(files: list[Path], image_size: int, progress: bool = False,
                 whole_frame: bool = False) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per file that has one, every tissue region at least image_size a side of its frames."""
    out, small = [], 0
    it = files
    if progress and len(files) > 1:
        from tqdm.auto import tqdm
        it = tqdm(files, desc="read scans", unit="file")
    for path in it:
        found, n_small = file_regions(path, image_size, whole_frame)
        small += n_small
        if found:
            out.append(found)
    if not out:
        raise ValueError(f"no tissue region of the {len(files)} file(s) is at least {image_size}x{image_size} "
                         f"({small} smaller region(s)); lower --image-size")
    return out


def random_crops(regions: list[list[tuple[np.ndarray, np.ndarray]]], image_size: int, count: int,
                 seed: int) -> np.ndarray:
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
            r, overlay = file[pick(len(file))]
            top, left = pick(r.shape[0] - image_size + 1), pick(r.shape[1] - image_size + 1)
            window = (slice(top, top + image_size), slice(left, left + image_size))
            crop = np.clip(r[window], 0, 1)
            signal = float((crop > BLACK).mean())
            if float(overlay[window].mean()) > MAX_OVERLAY:
                signal -= 1.0                  # below any overlay-free crop
            if signal > best_signal:
                best, best_signal = crop, signal
            if signal >= MIN_SIGNAL:
                break
        out[i, 0] = np.rint(best * 255)
    return out


def load_scan_folder(root, *, image_size: int, seed: int = 0, val_fraction: float = 0.2,
                     count: int | None = None, progress: bool = False,
                     whole_frame: bool = False) -> UltrasoundData:
    """Crops of the user's scans as UltrasoundData (no speckle-free maps; test = validation)."""
    files = scan_files(root)
    regions = read_regions(files, image_size, progress, whole_frame)
    n = count or DEFAULT_CROPS
    crops = torch.from_numpy(random_crops(regions, image_size, n, seed))
    tr, va = split_indices(n, val_fraction, seed)
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"{n} crop(s) cannot be split into training and validation; raise --count")
    return UltrasoundData(train=crops[tr], val=crops[va], test=crops[va], source=str(root),
                          info={"files": len(files), "regions": sum(map(len, regions)), "crops": n, "seed": seed,
                                "val_fraction": val_fraction, "test_is_val": True})
