"""speckle-denoise: run a trained denoiser on real images, at their native resolution.

    speckle-denoise runs/br5/checkpoint.pt scan.png cine.dcm frames/ --out denoised/ [--metrics]

Python: `load_denoiser(checkpoint, device)` gives the network (eval mode, on the device);
`denoise_images(model_or_checkpoint, arrays)` denoises (H, W) / (H, W, 3|4) uint8, uint16 or
[0, 1] float arrays and returns grayscale arrays of the same dtype. Files: image_io.py.

Intensity: v = stored / max_value (u8 / 255, u16 / 65535, DICOM / (2**BitsStored - 1)), the
network sees (v - 0.5) / 0.5 as in training (speckle_kernels.noise.make_noisy_batch), its
output is clamped to [-1, 1], mapped back to v and written at the input's scale and bit depth.

Native resolution: any H, W >= MIN_SIDE (16: below the U-Nets' 2**4 the bottleneck would see
mostly padding). The networks replicate-pad to their multiple themselves (16 for the U-Nets,
2 for Di-Conv-AE; unet.pad_to_multiple) and crop back, so a whole image goes in as it is.

Tiling, when H * W exceeds max_pixels: tiling.py (tiled output equals untiled output).

--metrics: speckle SNR and ENL on the most homogeneous window of the input (lowest local
coefficient of variation, homogeneous_windows(by="cv"); the same window before and after), and
CNR and gCNR between two given boxes (--roi-a/--roi-b), each before and after, on v in [0, 1]
(the output as written, after quantization). Non-finite values (a constant region) are null.
And the real-scan judge (metrics/real_scan.py: speckle suppression, local mean, edges, black,
checkerboard) of every frame, with its targets met or not, and, on the first frame of each
file, the same figures for the Lee, Frost, SRAD and median filters (calibration).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from speckle_models.atomic_write import atomic_write_text

from speckle_models import MODEL_NAMES, build_model
from speckle_models.inference.tiling import (DEFAULT_BATCH, DEFAULT_MAX_PIXELS, DEFAULT_TILE, MIN_SIDE, aligned_halo, check_tiling,
                     default_overlap,
                     denoise_frames, reaches, receptive_radius, size_multiple, tile_spans)
from speckle_models.inference.image_io import (IMAGE_SUFFIXES, OUTPUT_FORMATS, ImageFrames, frame_paths, quantize,
                       read_image, to_unit, write_figure, write_image)

METRICS_WINDOW = 32

__all__ = ["load_denoiser", "denoise_images", "denoise_frames", "receptive_radius",
           "size_multiple", "aligned_halo", "reaches", "default_overlap", "tile_spans", "main", "MIN_SIDE"]


# ----------------------------------------------------------------------------- the network

def _load(checkpoint, device="auto", *, fold: bool = False) -> tuple[nn.Module, dict]:
    from speckle_models.training.checkpoint import load_checkpoint
    from speckle_models.training.config import resolve_device

    path = Path(checkpoint)
    ckpt = load_checkpoint(path)  # format, version, keys: ValueError / FileNotFoundError
    config = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    name = config.get("model")
    if name not in MODEL_NAMES:
        raise ValueError(f"{path} holds a {name!r} network; speckle-denoise runs "
                         f"{', '.join(MODEL_NAMES)}")
    try:
        width = int(config["width"])
        model = build_model(name, norm=None if name == "di-conv-ae" else config.get("norm"),
                            width=width, dropout=config.get("dropout"), upsample=config.get("upsample"))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: its weights do not fit a {name} network "
                         f"(config width {config.get('width')!r}): {first}") from e
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    model = model.eval().to(device)
    if fold:
        from speckle_models.networks.fold import fold_norms
        model = fold_norms(model)
    info = {"checkpoint": str(path), "model": name, "width": width, "norm": config.get("norm"),
            "noise_factor": config.get("noise_factor"), "epoch": ckpt.get("epoch"),
            "folded": fold, "device": str(device)}
    return model, info


def load_denoiser(checkpoint: str | os.PathLike, device: str | torch.device = "auto", *,
                  fold: bool = False) -> nn.Module:
    """The network of a speckle-train checkpoint in eval mode on `device` (auto: CUDA if
    present); fold=True folds its norms into the convolutions (fold.py). ValueError when the
    checkpoint is foreign, of an unknown model or its weights do not fit."""
    return _load(checkpoint, device, fold=fold)[0]


def denoise_images(model_or_checkpoint, images, *, device: str | torch.device = "auto",
                   fold: bool = False, **kw) -> list[np.ndarray]:
    """Denoise arrays: (H, W) or (H, W, 3|4) uint8 (v = u8 / 255), uint16 (v = u16 / 65535)
    or float in [0, 1]; colour goes to BT.601 luminance. Returns (H, W) arrays of each input's
    dtype (integers rounded back to its scale, floats as float32). model_or_checkpoint: an
    nn.Module (used where it is) or a checkpoint path (loaded on `device`, folded if asked).
    Keyword arguments: those of denoise_frames (batch_size, max_pixels, tile, overlap, amp)."""
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
    else:
        model = load_denoiser(model_or_checkpoint, device, fold=fold)
    if isinstance(images, np.ndarray) and images.ndim == 2:
        raise TypeError("images must be a sequence of arrays; wrap a single image in a list")
    units = [to_unit(a, f"image {i}") for i, a in enumerate(images)]
    outs = denoise_frames(model, [v for v, _ in units], **kw)
    return [o if scale is None else quantize(o, scale) for o, (_, scale) in zip(outs, units)]


# ----------------------------------------------------------------------------- metrics

def frame_metrics(before: np.ndarray, after: np.ndarray, *, window: int = METRICS_WINDOW,
                  roi_a=None, roi_b=None) -> dict:
    """Speckle SNR and ENL on the input's most homogeneous window, CNR and gCNR between two
    boxes, before and after (v in [0, 1]); None where undefined."""
    from speckle_models.metrics.speckle_stats import cnr, enl, gcnr, homogeneous_windows, speckle_snr

    pair = torch.from_numpy(np.stack([before, after]).astype(np.float64))
    row: dict = {}

    def put(name, values):
        for when, v in zip(("before", "after"), values.tolist()):
            row[f"{name}_{when}"] = v if math.isfinite(v) else None

    size = min(window, *before.shape)
    try:
        _, boxes = homogeneous_windows(pair[:1], size, by="cv", return_boxes=True)
        box = tuple(int(v) for v in boxes[0, 0])
        row["window"] = list(box)
        put("snr", speckle_snr(pair, box))
        put("enl", enl(pair, box))
    except ValueError:  # no window with a positive mean (a black image)
        row["window"] = None
        row.update(snr_before=None, snr_after=None, enl_before=None, enl_after=None)
    if roi_a is not None and roi_b is not None:
        put("cnr", cnr(pair, tuple(roi_a), tuple(roi_b)))
        put("gcnr", gcnr(pair, tuple(roi_a), tuple(roi_b)))
    return row


def judge_metrics(before: np.ndarray, after: np.ndarray, *, calibrate: bool) -> dict:
    """The real-scan judge of one frame (and of the calibration filters on it if asked)."""
    from speckle_models.metrics.real_scan import calibration_outputs, judge, meets_targets

    row = judge(before, after)
    out = {"judge": row, "targets_met": meets_targets(row)}
    if calibrate:
        out["calibration"] = {name: judge(before, filtered)
                              for name, filtered in calibration_outputs(before).items()}
    return out


JUDGE_COLUMNS = ("enl_ratio", "edge_ratio", "mean_abs_delta", "mean_corr", "black_before", "black_after",
                 "checker_before", "checker_after")


def write_metrics(out: Path, rows: list[dict], meta: dict, *, overwrite: bool) -> None:
    atomic_write_text(out / "metrics.json", json.dumps({**meta, "images": rows}, indent=2) + "\n",
                      overwrite=overwrite)
    fields = ["file", "frame", "output", "height", "width", "window_top", "window_left",
              "window_height", "window_width", "snr_before", "snr_after", "enl_before", "enl_after",
              "cnr_before", "cnr_after", "gcnr_before", "gcnr_after", *(f"judge_{k}" for k in JUDGE_COLUMNS)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        box = row.get("window") or [None] * 4
        judged = {f"judge_{k}": row.get("judge", {}).get(k) for k in JUDGE_COLUMNS}
        writer.writerow({**row, **dict(zip(fields[5:9], box)), **judged})
    atomic_write_text(out / "metrics.csv", buf.getvalue(), overwrite=overwrite)


# ----------------------------------------------------------------------------- files

def collect_inputs(inputs: list[str], out: Path) -> list[tuple[Path, Path]]:
    """(input file, output stem) pairs. A file keeps its own name (any suffix: formats are
    sniffed); a folder is walked recursively for IMAGE_SUFFIXES (case-insensitive), sorted,
    hidden names and the output folder skipped, and its sub-folders are kept under out."""
    out_resolved = out.resolve()
    pairs = []
    for arg in inputs:
        p = Path(arg)
        if p.is_file():
            pairs.append((p, out / p.stem))
        elif p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                root_p = Path(root)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and (root_p / d).resolve() != out_resolved)
                found += [root_p / f for f in files
                          if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise ValueError(f"{p}: no {', '.join(IMAGE_SUFFIXES)} files in this folder")
            for f in sorted(found):
                rel = f.relative_to(p)
                pairs.append((f, out / rel.parent / rel.stem))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    seen: dict[Path, Path] = {}
    for src, stem in pairs:
        if stem in seen:
            raise ValueError(f"{seen[stem]} and {src} would both be written to {stem}.*; "
                             "denoise them into different --out folders")
        seen[stem] = src
    return pairs


def _existing_outputs(stem: Path, fmt: str, figure: bool) -> list[Path]:
    """Files a run could write for this stem that exist already (checked before any work)."""
    suffix = OUTPUT_FORMATS[fmt]
    names = [stem.name + suffix]
    patterns = [f"{stem.name}.f[0-9][0-9][0-9][0-9]{suffix}"]
    if figure:
        names.append(stem.name + ".figure.png")
        patterns.append(f"{stem.name}.f[0-9][0-9][0-9][0-9].figure.png")
    if not stem.parent.is_dir():
        return []
    found = [stem.parent / n for n in names if (stem.parent / n).exists()]
    for pattern in patterns:
        found += sorted(stem.parent.glob(pattern))
    return found


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or box[2] < 1 or box[3] < 1 or min(box) < 0:
        raise argparse.ArgumentTypeError(f"expected top,left,height,width (4 non-negative ints, "
                                         f"height and width >= 1), got {text!r}")
    return box


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speckle-denoise", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt of a speckle-train run")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="PNG/JPEG/TIFF/DICOM files, or folders (walked recursively)")
    p.add_argument("--out", required=True, help="output folder (created; sub-folders mirror input folders)")
    p.add_argument("--format", choices=tuple(OUTPUT_FORMATS), default="png",
                   help="output format, at the input's bit depth (default png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--figure", action="store_true", help="also write NAME.figure.png: input | output")
    p.add_argument("--metrics", action="store_true", help="write OUT/metrics.json and metrics.csv")
    p.add_argument("--roi-a", type=_box, metavar="T,L,H,W", help="first CNR/gCNR region (with --metrics)")
    p.add_argument("--roi-b", type=_box, metavar="T,L,H,W", help="second CNR/gCNR region")
    p.add_argument("--metrics-window", type=int, default=METRICS_WINDOW,
                   help=f"side of the homogeneous SNR/ENL window (default {METRICS_WINDOW})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"same-size images or tiles per forward pass (default {DEFAULT_BATCH})")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"tile images with more pixels than this (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side (default {DEFAULT_TILE})")
    p.add_argument("--overlap", type=int,
                   help="pixels shared by neighbouring tiles (default: what makes tiled output equal "
                        "untiled: 96 for the U-Nets, 44 for Di-Conv-AE)")
    p.add_argument("--fold", action="store_true", help="fold the norms into the convolutions first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args) -> None:
    if (args.roi_a is None) != (args.roi_b is None):
        raise ValueError("--roi-a and --roi-b go together")
    if args.roi_a is not None and not args.metrics:
        raise ValueError("--roi-a/--roi-b need --metrics")
    for name in ("batch_size", "max_pixels", "tile"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.metrics_window < 2:
        raise ValueError("--metrics-window must be >= 2")
    if args.bf16 and args.device == "cpu":
        raise ValueError("--bf16 is for CUDA; the CPU runs fp32")


def run(args) -> dict:
    """The CLI's work (main without the error handling); returns the summary."""
    _check_args(args)
    out = Path(args.out)
    pairs = collect_inputs(args.inputs, out)
    if not args.overwrite:  # refuse before any work; atomic_path re-checks at each write
        clash = [p for _, stem in pairs for p in _existing_outputs(stem, args.format, args.figure)]
        clash += [out / n for n in ("metrics.json", "metrics.csv") if args.metrics and (out / n).exists()]
        if clash:
            raise FileExistsError(f"{clash[0]} exists ({len(clash)} output file(s) in the way); "
                                  "pass --overwrite to replace them")
    model, info = _load(args.checkpoint, args.device, fold=args.fold)
    overlap = args.overlap
    if overlap is not None:
        check_tiling(args.tile, overlap, args.max_pixels, size_multiple(model))
    amp = args.bf16 and next(model.parameters()).is_cuda
    if args.bf16 and not amp:
        raise ValueError("--bf16 needs a CUDA device")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(pairs), unit="file", desc="speckle-denoise", leave=False,
               dynamic_ncols=True, file=sys.stderr, disable=args.no_progress)
    rows: list[dict] = []
    counts = {"files": 0, "frames": 0}
    t0 = time.perf_counter()

    def flush(pending: list[tuple[ImageFrames, Path]]) -> None:
        frames = [f for im, _ in pending for f in im.frames]
        names = [f"{im.path} (frame {k})" if len(im.frames) > 1 else str(im.path)
                 for im, _ in pending for k in range(len(im.frames))]
        nonlocal overlap
        if overlap is None and any(f.size > args.max_pixels for f in frames):
            overlap = default_overlap(model)
        outs = iter(denoise_frames(model, frames, batch_size=args.batch_size, max_pixels=args.max_pixels,
                                   tile=args.tile, overlap=overlap, amp=amp, names=names))
        for im, stem in pending:
            written = [quantize(next(outs), im.max_value) for _ in im.frames]
            paths = frame_paths(stem, len(written), args.format)
            if len(paths) == 1:
                write_image(paths[0], written, args.format, overwrite=args.overwrite)
            else:
                for path, frame in zip(paths, written):
                    write_image(path, [frame], args.format, overwrite=args.overwrite)
            for k, (before, after) in enumerate(zip(im.frames, written)):
                if args.figure:
                    name = stem.name if len(written) == 1 else f"{stem.name}.f{k:04d}"
                    write_figure(stem.with_name(name + ".figure.png"), quantize(before, im.max_value),
                                 after, im.max_value, overwrite=args.overwrite)
                if args.metrics:
                    row = {"file": str(im.path), "frame": k, "output": str(paths[min(k, len(paths) - 1)]),
                           "height": before.shape[0], "width": before.shape[1]}
                    try:
                        v_after = after.astype(np.float32) / im.max_value
                        row.update(frame_metrics(before, v_after, window=args.metrics_window,
                                                 roi_a=args.roi_a, roi_b=args.roi_b))
                        row.update(judge_metrics(before, v_after, calibrate=k == 0))
                    except ValueError as e:
                        raise ValueError(f"{im.path}: {e}") from e
                    rows.append(row)
            counts["files"] += 1
            counts["frames"] += len(written)
            bar.update(1)

    pending, queued = [], 0
    try:
        for src, stem in pairs:
            image = read_image(src)
            pending.append((image, stem))
            queued += len(image.frames)
            if queued >= args.batch_size:
                flush(pending)
                pending, queued = [], 0
        if pending:
            flush(pending)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    summary = {**info, "out": str(out), **counts, "seconds": seconds,
               "frames_per_s": counts["frames"] / max(seconds, 1e-9)}
    if args.metrics:
        meta = {k: summary[k] for k in ("checkpoint", "model", "epoch", "noise_factor")}
        meta.update(window_size=args.metrics_window, roi_a=args.roi_a, roi_b=args.roi_b,
                    intensity="v = stored value / max value, in [0, 1]")
        write_metrics(out, rows, meta, overwrite=args.overwrite)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        # user errors: one line, exit status 2 (argparse's), no traceback
        message = " ".join(str(e).split())
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
