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

The command's fast path (engine.py), chosen once per run and named in the summary ("path"):
norms folded, channels_last, bf16 where the hardware has native bf16 (else fp32), torch.compile
when the run's frame count pays for the compilation; --precision, --no-fold and --compile
override. Each file streams through pipeline.py (decode k+1 and encode k-1 while the network
runs k; streams.py reads and writes frame by frame); the summary gives frames/s end to end and
the share of time in decode, network and encode.

--metrics: speckle SNR and ENL on the most homogeneous window of the input (lowest local
coefficient of variation, homogeneous_windows(by="cv"); the same window before and after), and
CNR and gCNR between two given boxes (--roi-a/--roi-b), each before and after, on v in [0, 1]
(the output as written, after quantization). Non-finite values (a constant region) are null.
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
from speckle_models.inference.image_io import (IMAGE_SUFFIXES, OUTPUT_FORMATS, quantize, to_unit,
                                               write_figure)
from speckle_models.inference.engine import PRECISIONS, Engine, choose_path
from speckle_models.inference.pipeline import PipelineStats, run_pipeline
from speckle_models.inference.streams import FrameSource, open_frames, open_writer

METRICS_WINDOW = 32
CPU_BATCH = 2

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
                            width=width, dropout=config.get("dropout"))
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


def write_metrics(out: Path, rows: list[dict], meta: dict, *, overwrite: bool) -> None:
    atomic_write_text(out / "metrics.json", json.dumps({**meta, "images": rows}, indent=2) + "\n",
                      overwrite=overwrite)
    fields = ["file", "frame", "output", "height", "width", "window_top", "window_left",
              "window_height", "window_width", "snr_before", "snr_after", "enl_before", "enl_after",
              "cnr_before", "cnr_after", "gcnr_before", "gcnr_after"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        box = row.get("window") or [None] * 4
        writer.writerow({**row, **dict(zip(fields[5:9], box))})
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
    p.add_argument("--batch-size", type=int,
                   help=f"same-size frames or tiles per forward pass (default {CPU_BATCH} on a CPU, "
                        f"{DEFAULT_BATCH} on a GPU)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"tile images with more pixels than this (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side (default {DEFAULT_TILE})")
    p.add_argument("--overlap", type=int,
                   help="pixels shared by neighbouring tiles (default: what makes tiled output equal "
                        "untiled: 96 for the U-Nets, 44 for Di-Conv-AE)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp32, bf16 (autocast) or int8 (PT2E, CPU, calibrated on the first batch); "
                        "default: bf16 where the hardware has native bf16, else fp32")
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    p.add_argument("--no-fold", action="store_true", help="keep the norms (default: folded into the convolutions)")
    p.add_argument("--fold", action="store_true", help=argparse.SUPPRESS)  # the default now; old scripts
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the network: auto compiles when the frame count pays for it")
    p.add_argument("--no-pipeline", action="store_true",
                   help="decode, run and encode one after another (no stage threads)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args) -> None:
    if (args.roi_a is None) != (args.roi_b is None):
        raise ValueError("--roi-a and --roi-b go together")
    if args.roi_a is not None and not args.metrics:
        raise ValueError("--roi-a/--roi-b need --metrics")
    for name in ("batch_size", "max_pixels", "tile"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.metrics_window < 2:
        raise ValueError("--metrics-window must be >= 2")
    if args.bf16 and args.precision not in (None, "bf16"):
        raise ValueError(f"--bf16 contradicts --precision {args.precision}")
    if args.fold and args.no_fold:
        raise ValueError("--fold and --no-fold contradict each other")


def default_batch(device: torch.device) -> int:
    """Frames a forward pass: CPU_BATCH on a CPU (benchmarks/results: more frames a batch
    did not raise 2-core frames/s at 480x640), DEFAULT_BATCH on a GPU (fills its SMs)."""
    return CPU_BATCH if device.type == "cpu" else DEFAULT_BATCH


def _denoise_file(args, engine: Engine, source: FrameSource, stem: Path, rows: list, bar,
                  batch_size: int, overlap: int | None) -> PipelineStats:
    """One file through the pipeline into its writer (committed when whole, else aborted)."""
    mv = source.max_value
    writer = open_writer(stem, source.count, args.format, overwrite=args.overwrite)
    output_paths = getattr(writer, "paths", [getattr(writer, "path", stem)])

    def sink(k: int, after: np.ndarray, before: np.ndarray) -> None:
        writer.write(after)
        before_v = before.astype(np.float32) / np.float32(mv) if before.dtype.kind in "ui" else before
        if args.figure:
            name = stem.name if source.count == 1 else f"{stem.name}.f{k:04d}"
            write_figure(stem.with_name(name + ".figure.png"), quantize(before_v, mv), after, mv,
                         overwrite=args.overwrite)
        if args.metrics:
            row = {"file": str(source.path), "frame": k, "output": str(output_paths[min(k, len(output_paths) - 1)]),
                   "height": before.shape[0], "width": before.shape[1]}
            try:
                row.update(frame_metrics(before_v, after.astype(np.float32) / mv, window=args.metrics_window,
                                         roi_a=args.roi_a, roi_b=args.roi_b))
            except ValueError as e:
                raise ValueError(f"{source.path}: {e}") from e
            rows.append(row)
        bar.update(1)

    try:
        stats = run_pipeline(source, engine, sink, max_value=mv, batch_size=batch_size,
                             max_pixels=args.max_pixels, tile=args.tile, overlap=overlap,
                             threaded=not args.no_pipeline,
                             label=(lambda k: str(source.path)) if source.count == 1
                             else (lambda k: f"{source.path} (frame {k})"))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return stats


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
    sources = [open_frames(src) for src, _ in pairs]  # headers only: bad inputs fail before any work
    model, info = _load(args.checkpoint, args.device)
    overlap = args.overlap
    if overlap is not None:
        check_tiling(args.tile, overlap, args.max_pixels, size_multiple(model))
    path = choose_path(info["device"], precision="bf16" if args.bf16 else args.precision,
                       fold=not args.no_fold, compile={"auto": None, "on": True, "off": False}[args.compile])
    total = sum(s.count for s in sources)
    engine = Engine(model, path, frames=total)
    batch_size = args.batch_size or default_batch(engine.device)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="frame", desc="speckle-denoise", leave=False,
               dynamic_ncols=True, file=sys.stderr, disable=args.no_progress)
    rows: list[dict] = []
    totals = PipelineStats(threaded=not args.no_pipeline)
    t0 = time.perf_counter()
    try:
        for (src, stem), source in zip(pairs, sources):
            stats = _denoise_file(args, engine, source, stem, rows, bar, batch_size, overlap)
            for key in ("frames", "batches", "decode_s", "network_s", "encode_s"):
                setattr(totals, key, getattr(totals, key) + getattr(stats, key))
    finally:
        bar.close()
    totals.seconds = time.perf_counter() - t0
    timing = totals.as_dict()
    summary = {**info, "folded": engine.path.fold, "out": str(out), "files": len(pairs),
               "frames": totals.frames, "seconds": totals.seconds, "frames_per_s": timing["frames_per_s"],
               "path": engine.path.as_dict(), "agreement_with_eager_fp32": engine.agreement,
               "setup_s": engine.setup_seconds, "batch_size": batch_size,
               "pipeline": {k: timing[k] for k in ("threaded", "batches", "decode_share",
                                                   "network_share", "encode_share")}}
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
