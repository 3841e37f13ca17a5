"""Despeckling the tissue of frames, everything else bit-identical, and streaming a file through it.

For each frame of a batch (pixels P, gray or RGB integers at max_value M; gray level
v = P / M, or the BT.601 luminance of RGB / M):
    kept      = regions.overlay_mask(P, v): colour and white pixels (kept as they are)
    tissue_k  = plan.masks[k] & ~kept, in part k's box      (only these pixels change)
    crop_k    = part k's box grown by `pad` (the network's receptive radius) on every side that
                does not meet the frame's edge, every pixel outside tissue_k replaced by its
                reflection (regions.reflect_fill). The margin keeps the network's own border
                handling away from the tissue; at the frame's edge there is no image beyond, so
                there the network pads itself, as on a whole frame (a frame that is all tissue
                costs what --whole-frame does: the margin was 1.5x the pixels at 480x640)
    y_k       = the network on crop_k (tiling.denoise_frames: batched across the frames of the
                batch, tiled above max_pixels), cropped back to the box
    gray out  = P, with round(y * M) on tissue_k
    RGB out   = P, with round(P_c + (y - v) * M) per channel c on tissue_k (the luminance moves
                by y - v, the pixel's chroma stays: a tinted gray map stays tinted; a neutral
                gray R = G = B = p becomes round(y * M) in all three)
A "whole frame" plan is the old behaviour: the network on the whole frame (its own replicate
padding), every pixel replaced.

The network is speckle-denoise's Engine (engine.py: the run's fast path; tiling.denoise_frames
batches the crops into its reused buffer and pads a short batch for a compiled or captured
graph: the crops of a file have one shape per region), or any bare nn.Module.

Streaming (`stream_file`): frames come from a source lazily, are decoded in a background
thread up to one batch ahead (frame_io.prefetch), go through the network a batch at a time,
and are encoded and written by another thread as they come out (frame_io.WriteBehind, at most
one batch queued); a tqdm bar counts frames (frames/s). Memory: the prefetched frames, one
batch and the write queue, whatever the cine's length. pipeline=False runs the same batches
through the same calls one after another (the loop the pipeline is tested against: same bits).
StageTimes keeps the seconds each stage was busy: decode (the source's iteration), network
(crops, the engine, the merge), encode (the sink's writes), hooks (per-frame figure and
metrics); their shares of the wall time say which stage bounds a run (they add up to more than
1 when the stages overlap).
"""
from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from speckle_models.inference import regions
from speckle_models.inference.image_io import gray_level
from speckle_models.inference.tiling import denoise_frames, frame_windows


@dataclass
class FrameResult:
    """One frame through the network: the pixels written, and for the metrics the gray level
    before and after and the pixels that changed (frame coordinates)."""
    pixels: np.ndarray
    before: np.ndarray
    after: np.ndarray
    tissue: np.ndarray


class TissueDenoiser:
    """Calls the network (an Engine or a bare nn.Module) on the tissue of a batch of frames
    (module docstring); `tiling`: denoise_frames' keywords."""

    def __init__(self, network, plan: regions.TissuePlan, max_value: int, *, pad: int, **tiling):
        judged = getattr(getattr(network, "path", None), "levels", None)
        if judged is not None and judged < max_value:  # e.g. a bf16 path checked at 8 bits, 16-bit output
            raise ValueError(f"the engine's path is judged at {judged + 1} grey levels but this output has "
                             f"{max_value + 1}: choose_path(..., levels={max_value})")
        self.network, self.plan, self.max_value, self.pad, self.tiling = network, plan, max_value, pad, tiling
        self._static_fill: dict[int, np.ndarray] = {}  # part -> the fill's source indices

    def margins(self, box: regions.Box, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) margin of a box's crop in a height x width frame: `pad`,
        or 0 on a side that meets the frame's edge (module docstring)."""
        p = self.pad
        return (p if box.top > 0 else 0, p if box.top + box.height < height else 0,
                p if box.left > 0 else 0, p if box.left + box.width < width else 0)

    def _crop(self, v: np.ndarray, k: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the network's input for part k, the part's tissue mask in the box)."""
        box = self.plan.boxes[k]
        pt, pb, pl, pr = self.margins(box, *v.shape)
        tissue = self.plan.masks[k] & ~kept[box.slices]
        padded = np.zeros((box.height + pt + pb, box.width + pl + pr), bool)
        padded[pt:pt + box.height, pl:pl + box.width] = tissue
        rows = np.clip(np.arange(box.top - pt, box.top + box.height + pb), 0, v.shape[0] - 1)
        cols = np.clip(np.arange(box.left - pl, box.left + box.width + pr), 0, v.shape[1] - 1)
        crop = v[np.ix_(rows, cols)]
        if not tissue.any():
            return crop, tissue
        static = not kept[box.slices].any()
        if static and k in self._static_fill:
            return crop.ravel()[self._static_fill[k]].reshape(crop.shape), tissue
        index = regions.reflection_index(padded)
        if static:
            self._static_fill[k] = index
        return crop.ravel()[index].reshape(crop.shape), tissue

    def __call__(self, frames: list[np.ndarray], names: list[str] | None = None) -> list[FrameResult]:
        m = self.max_value
        levels = [gray_level(f, m) for f in frames]
        if self.plan.how == "whole frame":
            outs = denoise_frames(self.network, levels, names=names, **self.tiling)
            full = np.ones(levels[0].shape, bool)
            return [self._merge(f, v, y, full) for f, v, y in zip(frames, levels, outs)]
        kept = [regions.overlay_mask(f, v, m) for f, v in zip(frames, levels)]
        crops, tissues = [], []
        for v, kept_f in zip(levels, kept):
            for k in range(len(self.plan.boxes)):
                crop, tissue = self._crop(v, k, kept_f)
                crops.append(crop)
                tissues.append(tissue)
        ys = iter(denoise_frames(self.network, crops, names=None if names is None else
                                 [f"{n} (region {k + 1})" for n in names for k in range(len(self.plan.boxes))],
                                 **self.tiling))
        results, tissue_iter = [], iter(tissues)
        for f, v in zip(frames, levels):
            after = v.copy()
            changed = np.zeros(v.shape, bool)
            for box in self.plan.boxes:
                y, tissue = next(ys), next(tissue_iter)
                pt, _, pl, _ = self.margins(box, *v.shape)
                y = y[pt:pt + box.height, pl:pl + box.width]
                sub = after[box.slices]
                sub[tissue] = y[tissue]
                changed[box.slices] |= tissue
            results.append(self._merge(f, v, after, changed))
        return results

    def piece_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (h, w) of every piece the network sees for one height x width frame (a crop per
        region, or the frame; tiles above max_pixels). The overlap must be set if any tiles."""
        kw = self.tiling
        crops = [(height, width)] if self.plan.how == "whole frame" else []
        for b in [] if self.plan.how == "whole frame" else self.plan.boxes:
            pt, pb, pl, pr = self.margins(b, height, width)
            crops.append((b.height + pt + pb, b.width + pl + pr))
        from speckle_models.inference.tiling import DEFAULT_MAX_PIXELS, DEFAULT_TILE, size_multiple

        network = getattr(self.network, "source", self.network)
        return [(r[1] - r[0], c[1] - c[0]) for h, w in crops for r, c in frame_windows(
            h, w, max_pixels=kw.get("max_pixels", DEFAULT_MAX_PIXELS), tile=kw.get("tile", DEFAULT_TILE),
            overlap=kw.get("overlap"), multiple=size_multiple(network))]

    def _merge(self, pixels: np.ndarray, v: np.ndarray, y: np.ndarray, tissue: np.ndarray) -> FrameResult:
        """The written frame: `pixels` with the tissue replaced (module docstring)."""
        m = self.max_value
        out = pixels.copy()
        y = y.astype(np.float32, copy=False)
        if pixels.ndim == 2:
            out[tissue] = np.rint(np.clip(y[tissue], 0, 1) * m).astype(pixels.dtype)
        else:
            shift = ((y - v) * m)[tissue][:, None]
            out[tissue] = np.rint(np.clip(pixels[tissue] + shift, 0, m)).astype(pixels.dtype)
        after = gray_level(out, m)  # as written (quantized), for the metrics
        return FrameResult(out, v, after, tissue)


def source_plan(source, *, user_boxes=(), detect: bool = False) -> regions.TissuePlan:
    """A file's tissue plan from its first frame, by speckle-denoise's rule (regions.py): the
    user's boxes, else the DICOM file's 2D tissue ultrasound regions (unless `detect`; regions
    that do not fit the pixels fall back to detection, saying why), else the detected tissue
    area. Used by speckle-denoise and by self-supervised training on a folder of scans."""
    user_boxes = list(user_boxes)
    file_boxes, why_detected = [], ""
    if source.kind == "dicom" and not detect and not user_boxes:
        try:
            file_boxes = regions.ultrasound_regions(source.dataset, source.height, source.width,
                                                    str(source.path))
        except regions.RegionsDoNotFit as e:  # a resized or cropped export: find the tissue instead
            why_detected = f"the file's {e}"
    if user_boxes:
        regions.check_boxes(user_boxes, source.height, source.width, str(source.path))
    first = next(iter(source))
    colour = None if first.ndim == 2 else regions.chroma(first, source.max_value) > regions.CHROMA_MAX
    return regions.plan_tissue(gray_level(first, source.max_value), colour, user_boxes=user_boxes,
                               file_boxes=file_boxes, name=str(source.path), why_detected=why_detected)


def peek(source):
    """(the first frame, an iterator over every frame including it) of a lazy source."""
    frames = iter(source)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{source.path}: no frames")
    return first, itertools.chain([first], frames)


def frames_per_shape(files) -> int:
    """The most frames that share one network input shape, over (denoiser, frame count, height,
    width) per file: what one compilation of that shape serves (engine.compile_pays)."""
    counts: Counter = Counter()
    for denoiser, count, height, width in files:
        for size in denoiser.piece_sizes(height, width):
            counts[size] += count
    return max(counts.values(), default=0)


@dataclass
class StageTimes:
    """Seconds each stage was busy, and the run's frames, batches and wall seconds."""
    frames: int = 0
    batches: int = 0
    seconds: float = 0.0
    decode_s: float = 0.0
    network_s: float = 0.0
    encode_s: float = 0.0
    hooks_s: float = 0.0
    threaded: bool = True
    STAGES = ("decode", "network", "encode", "hooks")

    def adder(self, stage: str):
        """busy(seconds) for one stage (each stage's time is written by one thread only)."""
        key = f"{stage}_s"
        return lambda seconds: setattr(self, key, getattr(self, key) + seconds)

    def as_dict(self) -> dict:
        wall = max(self.seconds, 1e-12)
        out = {"threaded": self.threaded, "frames": self.frames, "batches": self.batches,
               "seconds": self.seconds, "frames_per_s": self.frames / wall}
        for stage in self.STAGES:
            out[f"{stage}_s"] = getattr(self, f"{stage}_s")
            out[f"{stage}_share"] = getattr(self, f"{stage}_s") / wall
        return out


def stream_file(frames, count: int, denoiser: TissueDenoiser, sink, *, batch_size: int, bar=None,
                name: str = "", on_frame=None, pipeline: bool = True, times: StageTimes | None = None) -> int:
    """Every frame of `frames` through the denoiser into the open sink, a batch at a time;
    on_frame(k, FrameResult) after each frame is handed to the sink. pipeline: decode ahead and
    write behind in threads (frame_io.prefetch, frame_io.WriteBehind); False runs all three in
    turn (the same batches: the same bits). times: a StageTimes the stages' seconds, the frames,
    batches and this call's wall seconds are added to. Returns the frames written."""
    from speckle_models.inference.frame_io import WriteBehind, prefetch, timed

    times = times if times is not None else StageTimes(threaded=pipeline)
    t_start = time.perf_counter()
    written = 0
    pending: list[np.ndarray] = []
    encode = times.adder("encode")
    writer = WriteBehind(sink, batch_size, busy=encode) if pipeline else sink

    def flush():
        nonlocal written
        names = [f"{name} (frame {written + i})" if count > 1 else name for i in range(len(pending))]
        t0 = time.perf_counter()
        results = denoiser(pending, names)
        times.network_s += time.perf_counter() - t0
        times.batches += 1
        for result in results:
            t0 = time.perf_counter()
            writer.write(result.pixels)
            if not pipeline:
                encode(time.perf_counter() - t0)
            if on_frame is not None:
                t0 = time.perf_counter()
                on_frame(written, result)
                times.hooks_s += time.perf_counter() - t0
            written += 1
            if bar is not None:
                bar.update(1)
        pending.clear()

    decode = times.adder("decode")
    try:
        for frame in (prefetch(frames, batch_size, busy=decode) if pipeline else timed(frames, decode)):
            pending.append(frame)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        if pipeline:
            writer.close()  # the writer's error, if any, is raised here
        times.frames += written
        times.seconds += time.perf_counter() - t_start
    return written
