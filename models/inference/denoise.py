"""speckle-denoise: run a trained denoiser on scanner images, changing the tissue only.

    speckle-denoise runs/br5/checkpoint.pt scan.dcm cine.dcm frames/ --out denoised/ [--metrics]

DICOM in gives a derived DICOM instance out (dicom_io.py); PNG/JPEG/TIFF in gives PNG out
(--format dicom|png|tiff). Only the tissue is despeckled: the file's 2D tissue ultrasound
regions, or --region T,L,H,W boxes, or the automatically detected tissue area (regions.py);
everything else stays bit-identical, colour and white pixels inside too (tissue.py). Which was
used is printed per file and kept in the summary. --whole-frame runs the network on the whole
frame as before (phantom images, crops that are all tissue).

Files are streamed: frames decoded one batch ahead in a thread, denoised a batch at a time,
written as they come (frame_io.py: the frame-source / frame-sink interface; tissue.stream_file);
--no-pipeline runs the same batches one stage after another (same bits). A progress bar counts
frames/s; the summary gives frames/s end to end and each stage's busy seconds and share of the
wall time (decode, network, encode, per-frame hooks). Every input is opened and checked
(header, regions, memory, disk) before any output is written; a failure is one line naming the
file and the problem, and leaves no file behind.

The network runs on the run's fast path (engine.py), chosen once and named in the summary
("path", with why): norms folded, channels_last, bf16 only where the hardware has native bf16
(CUDA; a CPU with AVX512-BF16 or AMX) and every output is 8-bit, else fp32; torch.compile when
the frames that share one input shape pay for the compilation; a CUDA graph on CUDA.
--precision fp32|bf16|int8, --no-fold and --compile auto|on|off override; a bf16 or int8 path
is checked against eager fp32 on the first frame ("agreement_with_eager_fp32") and falls back to
fp32 below 99 % of pixels within one grey level at the deepest output's depth. Batches:
CPU_BATCH frames on a CPU, DEFAULT_BATCH on a GPU.

Python: `load_denoiser(checkpoint, device)` gives the network (eval mode, on the device);
`denoise_images(model_or_checkpoint, arrays)` denoises whole (H, W) / (H, W, 3|4) uint8,
uint16 or [0, 1] float arrays and returns grayscale arrays of the same dtype.

Intensity: v = stored / max_value (u8 / 255, u16 / 65535, DICOM / (2**BitsStored - 1)), the
network sees (v - 0.5) / 0.5 as in training (speckle_kernels.noise.make_noisy_batch), its
output is clamped to [-1, 1], mapped back to v and written at the input's scale and bit depth.
Sizes: any H, W >= MIN_SIDE (16); larger than max_pixels: tiled (tiling.py, = untiled output).

--metrics: the real-scan judge inside the tissue only (metrics/real_scan.py): speckle
suppression (ENL, speckle SNR in the input's most homogeneous tissue windows by local std),
local mean kept, edges kept, black kept, checkerboard; the targets met; on each file's first
frame the same figures for Lee, Frost, SRAD and a median (calibration); CNR / gCNR (Rice-rule
bins) between two boxes (--roi-a/--roi-b) intersected with the tissue, before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from speckle_models import MODEL_NAMES, build_model
from speckle_models.inference import frame_io, regions
from speckle_models.inference.tissue import source_plan
from speckle_models.inference.engine import PRECISIONS, Engine, choose_path
from speckle_models.inference.image_io import quantize, to_unit
from speckle_models.inference.run_files import collect_inputs, existing_outputs, frame_hook, write_metrics
from speckle_models.inference.tiling import (DEFAULT_BATCH, DEFAULT_MAX_PIXELS, DEFAULT_TILE, MIN_SIDE,
                                             aligned_halo, check_tiling, default_overlap, denoise_frames,
                                             reaches, receptive_radius, size_multiple, tile_spans)

METRICS_WINDOW = 16   # the judge's window side (metrics/real_scan.WINDOW)
# frames a forward on a CPU: one, for the least latency (a frame is shown as soon as it is done).
# Batch 2 bought no throughput here: at 480x640 on 2 cores a width-8 Br-U-Net frame (folded,
# channels_last) took 37 ms at batch 1 against 57 ms at batch 2 in one run and 35 ms in another
# (benchmarks/results/cpu-2026-12-04/realtime-margins.md, realtime.md).
CPU_BATCH = 1

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
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    info = {"checkpoint": str(path), "checkpoint_sha256": digest.hexdigest(), "model": name, "width": width, "norm": config.get("norm"),
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


# ----------------------------------------------------------------------------- the command

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
                   help="DICOM/PNG/JPEG/TIFF files, or folders (walked recursively)")
    p.add_argument("--out", required=True, help="output folder (created; sub-folders mirror input folders)")
    p.add_argument("--format", choices=tuple(frame_io.OUTPUT_FORMATS),
                   help="output format (default: dicom for DICOM input, png otherwise), at the input's "
                        "bit depth and colour kind")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--region", type=_box, action="append", metavar="T,L,H,W",
                       help="a tissue box (top, left, height, width; repeatable): despeckle these only, "
                            "instead of the file's ultrasound regions or automatic detection")
    where.add_argument("--detect-tissue", action="store_true",
                       help="ignore the file's ultrasound regions and detect the tissue area")
    where.add_argument("--whole-frame", action="store_true",
                       help="run the network on the whole frame (every pixel changes)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--figure", action="store_true", help="also write NAME.figure.png: input | output (gray)")
    p.add_argument("--metrics", action="store_true", help="write OUT/metrics.json and metrics.csv")
    p.add_argument("--roi-a", type=_box, metavar="T,L,H,W", help="first CNR/gCNR region (with --metrics)")
    p.add_argument("--roi-b", type=_box, metavar="T,L,H,W", help="second CNR/gCNR region")
    p.add_argument("--metrics-window", type=int, default=METRICS_WINDOW,
                   help=f"side of the judge's homogeneous ENL/SNR windows (default {METRICS_WINDOW})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int,
                   help=f"frames per forward pass (default {CPU_BATCH} on a CPU, {DEFAULT_BATCH} on a "
                        "GPU); memory is bounded by it")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"tile images with more pixels than this (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side (default {DEFAULT_TILE})")
    p.add_argument("--overlap", type=int,
                   help="pixels shared by neighbouring tiles (default: what makes tiled output equal "
                        "untiled: 96 for the U-Nets, 44 for Di-Conv-AE)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp32, bf16 (autocast) or int8 (PT2E, CPU, calibrated on the first batch; the "
                        "int8 extra); default: bf16 where the hardware has native bf16, else fp32")
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    p.add_argument("--no-fold", action="store_true", help="keep the norms (default: folded into the convolutions)")
    p.add_argument("--fold", action="store_true", help=argparse.SUPPRESS)  # the default now; old scripts
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the network: auto compiles when the frame count pays for it")
    p.add_argument("--no-pipeline", action="store_true",
                   help="decode, run and encode one after another (no stage threads; same output)")
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


def plan_file(source, args) -> regions.TissuePlan:
    """Where the network may change this file's frames (regions.py), from its first frame."""
    if args.whole_frame:
        return regions.whole_frame_plan(source.height, source.width)
    return source_plan(source, user_boxes=[regions.Box(*b) for b in args.region or []],
                       detect=args.detect_tissue)


def _describe(info: dict, plan: regions.TissuePlan) -> str:
    return (f"Despeckled by speckle-denoise: {info['model']} network (width {info['width']}, norm "
            f"{info['norm']}, epoch {info['epoch']}), checkpoint SHA-256 {info['checkpoint_sha256']}; "
            f"tissue: {plan.describe()}; pixels outside the tissue, colour and white pixels unchanged")


def run(args) -> dict:
    """The CLI's work (main without the error handling); returns the summary."""
    _check_args(args)
    out = Path(args.out)
    pairs = collect_inputs(args.inputs, out)
    model, info = _load(args.checkpoint, args.device)
    if args.overlap is not None:
        check_tiling(args.tile, args.overlap, args.max_pixels, size_multiple(model))
    batch_size = args.batch_size or (CPU_BATCH if torch.device(info["device"]).type == "cpu" else DEFAULT_BATCH)

    # every input opened, planned and checked before anything is written
    jobs = []
    for src, stem in pairs:
        source = frame_io.open_source(src)
        fmt = args.format or ("dicom" if source.kind == "dicom" else "png")
        frame_io.check_output(fmt, source)
        if min(source.height, source.width) < MIN_SIDE:
            raise ValueError(f"{src} is {source.height}x{source.width}; the networks need at least "
                             f"{MIN_SIDE}x{MIN_SIDE} pixels")
        plan = plan_file(source, args)
        frame_io.check_resources(source, batch=batch_size, prefetch=batch_size, out_dir=out,
                                 output_bytes=sum(j[0].count * j[0].frame_bytes for j in jobs)
                                 + source.count * source.frame_bytes)
        jobs.append((source, stem, fmt, plan))
    if not args.overwrite:  # refuse before any work; atomic_path re-checks at each write
        clash = [p for source, stem, fmt, _ in jobs
                 for p in existing_outputs(stem, fmt, source.count, args.figure)]
        clash += [out / n for n in ("metrics.json", "metrics.csv") if args.metrics and (out / n).exists()]
        if clash:
            raise FileExistsError(f"{clash[0]} exists ({len(clash)} output file(s) in the way); "
                                  "pass --overwrite to replace them")

    # the path is judged at the deepest output's grey levels (bf16 by default for 8-bit only)
    path = choose_path(info["device"], precision="bf16" if args.bf16 else args.precision,
                       fold=not args.no_fold, compile={"auto": None, "on": True, "off": False}[args.compile],
                       levels=max(source.max_value for source, *_ in jobs))
    engine = Engine(model, path)

    from tqdm.auto import tqdm

    from speckle_models.inference.tissue import StageTimes, TissueDenoiser, frames_per_shape, stream_file

    pad = receptive_radius(model)
    overlap = args.overlap
    if overlap is None and any((s.height + 2 * pad) * (s.width + 2 * pad) > args.max_pixels for s, *_ in jobs):
        overlap = default_overlap(model)  # a piece (a region's crop, padded) may be tiled
    denoisers = [TissueDenoiser(engine, plan, source.max_value, pad=pad, batch_size=batch_size,
                                max_pixels=args.max_pixels, tile=args.tile, overlap=overlap)
                 for source, _, _, plan in jobs]
    engine.frames = frames_per_shape([(d, s.count, s.height, s.width) for d, (s, *_) in zip(denoisers, jobs)])
    times = StageTimes(threaded=not args.no_pipeline)
    bar = tqdm(total=sum(s.count for s, *_ in jobs), unit="frame", desc="speckle-denoise", leave=False,
               dynamic_ncols=True, file=sys.stderr, disable=args.no_progress)
    rows: list[dict] = []
    files: list[dict] = []
    t0 = time.perf_counter()
    try:
        for (source, stem, fmt, plan), denoiser in zip(jobs, denoisers):
            sink = frame_io.make_sink(fmt, stem, source, _describe(info, plan), overwrite=args.overwrite)
            paths = frame_io.output_paths(fmt, stem, source.count)
            on_frame = frame_hook(args, source, stem, paths, rows)
            with sink:
                frames = stream_file(source, source.count, denoiser, sink, batch_size=batch_size, bar=bar,
                                     name=str(source.path), on_frame=on_frame, pipeline=not args.no_pipeline,
                                     times=times)
            files.append({"input": str(source.path), "output": [str(p) for p in paths], "format": fmt,
                          "frames": frames, "tissue": plan.describe()})
            bar.write(f"speckle-denoise: {source.path} -> {paths[0]}"
                      f"{f' (+{len(paths) - 1})' if len(paths) > 1 else ''}: {frames} frame(s); "
                      f"tissue: {plan.describe()}", file=sys.stderr)
    finally:
        bar.close()
    times.seconds = time.perf_counter() - t0  # the whole run: sinks opened and committed too
    timing = times.as_dict()
    summary = {**info, "folded": engine.path.fold, "out": str(out), "files": len(files), "frames": times.frames,
               "seconds": times.seconds, "frames_per_s": timing["frames_per_s"], "batch_size": batch_size,
               "path": engine.path.as_dict(), "agreement_with_eager_fp32": engine.agreement,
               "setup_s": engine.setup_seconds, "pipeline": {k: v for k, v in timing.items() if k not in
                                                              ("frames", "seconds", "frames_per_s")},
               "outputs": files}
    if args.metrics:
        meta = {k: summary[k] for k in ("checkpoint", "checkpoint_sha256", "model", "epoch", "noise_factor")}
        meta.update(window_size=args.metrics_window, roi_a=args.roi_a, roi_b=args.roi_b,
                    intensity="v = stored value / max value, in [0, 1]; inside the tissue only")
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
