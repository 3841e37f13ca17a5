"""The files of a speckle-denoise run: inputs walked, outputs named and checked before any work,
and after each written frame its figure and its metrics row (metrics.json / metrics.csv).

Inputs: a file keeps its own name (formats are sniffed); a folder is walked recursively for
IMAGE_SUFFIXES, its sub-folders kept under the output folder. Outputs: frame_io.output_paths per
format, NAME.figure.png per frame with --figure; any that exists is refused before any work
unless --overwrite (atomic_path re-checks at each write).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from speckle_models.atomic_write import atomic_write_text
from speckle_models.inference import frame_io
from speckle_models.inference.image_io import IMAGE_SUFFIXES, quantize, write_figure

# metrics.csv: one row a frame, the real-scan judge's figures (metrics/real_scan.FIELDS), how
# many of its targets the frame meets, and the --roi-a/--roi-b contrast. metrics.json has the
# same rows with the window boxes, each target's verdict and the calibration filters' figures.
ROI_FIELDS = ("cnr_before", "cnr_after", "gcnr_before", "gcnr_after", "gcnr_bins")


def metric_fields() -> list[str]:
    from speckle_models.metrics.real_scan import FIELDS

    return ["file", "frame", "output", "tissue_pixels", *FIELDS, "targets_met", *ROI_FIELDS]


def write_metrics(out: Path, rows: list[dict], meta: dict, *, overwrite: bool) -> None:
    atomic_write_text(out / "metrics.json", json.dumps({**meta, "images": rows}, indent=2) + "\n",
                      overwrite=overwrite)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=metric_fields(), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        met = [v for v in (row.get("targets_met") or {}).values() if v is not None]
        writer.writerow({**row, "targets_met": f"{sum(met)}/{len(met)}" if met else None})
    atomic_write_text(out / "metrics.csv", buf.getvalue(), overwrite=overwrite)


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


def existing_outputs(stem: Path, fmt: str, count: int, figure: bool) -> list[Path]:
    """Files a run could write for this stem that exist already (checked before any work)."""
    paths = frame_io.output_paths(fmt, stem, count)
    if figure:
        paths += [p.with_name(p.name.rsplit(".", 1)[0] + ".figure.png") for p in frame_io.png_paths(stem, count)]
    return [p for p in paths if p.exists()]


def frame_hook(args, source, stem: Path, paths: list[Path], rows: list[dict]):
    """What happens after each written frame: its figure and its metrics row."""
    if not (args.figure or args.metrics):
        return None
    from speckle_models.metrics.real_scan import calibration_outputs, judge, meets_targets, roi_contrast

    figures = [p.with_name(p.name.rsplit(".", 1)[0] + ".figure.png") for p in frame_io.png_paths(stem, source.count)]

    def hook(k: int, result) -> None:
        if args.figure:
            write_figure(figures[k], quantize(result.before, 255), quantize(result.after, 255), 255,
                         overwrite=args.overwrite)
        if args.metrics:
            row = {"file": str(source.path), "frame": k, "output": str(paths[min(k, len(paths) - 1)]),
                   "tissue_pixels": int(result.tissue.sum())}
            try:
                if row["tissue_pixels"]:  # the judge in the tissue; on a file's first frame the same
                    # figures for the classical filters (calibration: what a known despeckler scores here)
                    row.update(judge(result.before, result.after, tissue=result.tissue, window=args.metrics_window))
                    row["targets_met"] = meets_targets(row)
                    if args.roi_a is not None:
                        row.update(roi_contrast(result.before, result.after, result.tissue, args.roi_a, args.roi_b))
                    if k == 0:
                        row["calibration"] = {name: judge(result.before, filtered, tissue=result.tissue,
                                                          window=args.metrics_window)
                                              for name, filtered in calibration_outputs(result.before).items()}
            except ValueError as e:
                raise ValueError(f"{source.path}: {e}") from e
            rows.append(row)
    return hook


