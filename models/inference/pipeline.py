"""Frames through the network as a pipeline: decode k+1 and encode k-1 while the network runs k.

    stats = run_pipeline(frames, engine, sink, max_value=255, batch_size=2)

- frames: any iterable of (H, W) arrays (a lazy file reader: image_io.open_frames, or a DICOM
  reader). Integer frames are stored values, v = value / max_value; float frames are v in [0, 1].
  Iterating it (reading, decoding) runs on the decode thread.
- engine: a callable on normalized (B, 1, H, W) float32 batches, (v - 0.5) / 0.5 as in training,
  returning (B, 1, H, W) (engine.Engine, or a bare nn.Module). If it has `first_batch(x)`, that
  runs the first batch instead (the engine settles compile and checks its path there).
  `window_plan(h, w)` on it, if present, says how a frame is cut into tiles (the default: whole
  frames, tiling.frame_windows with the engine's own overlap).
- sink(index, output, source): called on the encode thread, in frame order: output is the
  (H, W) result, quantized to max_value (uint8 when max_value <= 255, else uint16) or v float32
  when max_value is None; source is the frame as the iterable gave it. `output` is a view into
  a recycled buffer, valid during the call only (copy it to keep it): no allocation per frame.

Stages and threads: a decode thread fills a bounded queue; the calling thread batches frames of
the same size (batch_size of them, the last batch of a run of one size padded by repeating its
last frame, so a compiled or captured graph sees one shape), normalizes them into a reused
input buffer, runs the engine (with torch's intra-op threads: the network keeps the cores) and
quantizes into one of a ring of reused output buffers; an encode thread hands the frames to the
sink. Frames over max_pixels run as tiles (tiling.py), batched the same way. threaded=False runs
the same stages one after another in the calling thread: the loop the pipeline is tested against
(same batches, same buffers, so the same bits). An exception in any stage stops the others and
is raised in the caller, naming the frame.

The arithmetic equals speckle-denoise's per-file path (tiling.denoise_frames + image_io.quantize)
op for op: v = float32(value) / max_value, x = (v - 0.5) / 0.5, y clamped to [-1, 1], v' =
y * 0.5 + 0.5, round(clip(v', 0, 1) * max_value) half to even; only the batch composition can
differ, which moves fp32 results by rounding.

PipelineStats: frames/s end to end and the seconds each stage was busy (decode, network, encode),
whose shares of the wall time say which stage bounds the run (shares add up to more than 1 when
stages overlap).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from speckle_models.inference.tiling import DEFAULT_BATCH, DEFAULT_MAX_PIXELS, DEFAULT_TILE, MIN_SIDE, frame_windows

_END = object()


@dataclass
class PipelineStats:
    frames: int = 0
    batches: int = 0
    seconds: float = 0.0
    decode_s: float = 0.0
    network_s: float = 0.0
    encode_s: float = 0.0
    threaded: bool = True

    def as_dict(self) -> dict:
        wall = max(self.seconds, 1e-12)
        return {"frames": self.frames, "batches": self.batches, "seconds": self.seconds,
                "frames_per_s": self.frames / wall, "threaded": self.threaded,
                "decode_s": self.decode_s, "network_s": self.network_s, "encode_s": self.encode_s,
                "decode_share": self.decode_s / wall, "network_share": self.network_s / wall,
                "encode_share": self.encode_s / wall}


class _Stop(Exception):
    """Another stage failed; this one stops quietly."""


class _Stage(threading.Thread):
    def __init__(self, name, target, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self._target_fn, self._stop_event, self.error = target, stop, None

    def run(self):
        try:
            self._target_fn()
        except _Stop:
            pass
        except BaseException as e:  # handed to the caller; the other stages stop
            self.error = e
            self._stop_event.set()


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            return q.put(item, timeout=0.05)
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stop
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue


class _Network:
    """The network stage: batches, reused buffers, the engine, quantization."""

    def __init__(self, engine, max_value, batch_size, max_pixels, tile, overlap):
        self.engine, self.max_value, self.batch_size = engine, max_value, batch_size
        self.max_pixels, self.tile, self.overlap = max_pixels, tile, overlap
        self.inputs: dict[tuple, torch.Tensor] = {}
        self.started = not hasattr(engine, "first_batch")
        self.out_dtype = (torch.float32 if max_value is None
                          else torch.uint8 if max_value <= 255 else torch.uint16)
        self.np_dtype = (np.float32 if max_value is None else np.uint8 if max_value <= 255 else np.uint16)

    def windows(self, h: int, w: int):
        plan = getattr(self.engine, "window_plan", None)
        if plan is not None:
            return plan(h, w, max_pixels=self.max_pixels, tile=self.tile, overlap=self.overlap)
        if h * w <= self.max_pixels:
            return frame_windows(h, w, max_pixels=self.max_pixels, tile=self.tile, overlap=None, multiple=1)
        from speckle_models.inference.tiling import default_overlap, size_multiple  # a bare nn.Module
        if self.overlap is None:
            self.overlap = default_overlap(self.engine)
        return frame_windows(h, w, max_pixels=self.max_pixels, tile=self.tile, overlap=self.overlap,
                             multiple=size_multiple(self.engine))

    def forward(self, pieces: list[np.ndarray]) -> torch.Tensor:
        """v' in [0, 1], (n, h, w) float32, of n same-size pieces (v or stored values)."""
        n, (h, w) = len(pieces), pieces[0].shape
        b = self.batch_size
        x = self.inputs.get((b, h, w))
        if x is None:
            x = self.inputs[(b, h, w)] = torch.empty(b, 1, h, w)
        xs = x.numpy()
        for k in range(b):
            p = pieces[min(k, n - 1)]  # a short batch repeats its last piece: one shape
            if np.issubdtype(p.dtype, np.integer):
                if self.max_value is None:
                    raise ValueError("integer frames need max_value (v = value / max_value)")
                np.divide(p, np.float32(self.max_value), out=xs[k, 0], dtype=np.float32)
            else:
                xs[k, 0] = p
        x.sub_(0.5).div_(0.5)
        with torch.no_grad():
            if self.started:
                y = self.engine(x)
            else:
                y = self.engine.first_batch(x)
                self.started = True
        return (y[:n, 0].to("cpu", torch.float32).clamp_(-1, 1) * 0.5 + 0.5)

    def quantize(self, v: torch.Tensor, out: torch.Tensor) -> None:
        if self.max_value is None:
            out.copy_(v)
        else:
            out.copy_(v.clamp_(0, 1).mul_(self.max_value).round_())

    def run_batch(self, frames: list[np.ndarray], out: torch.Tensor) -> None:
        """Frames of one size into out[:len(frames)], whole or tiled."""
        h, w = frames[0].shape
        spans = self.windows(h, w)
        if len(spans) == 1:
            self.quantize(self.forward(frames), out[:len(frames)])
            return
        for k, frame in enumerate(frames):  # tiles of one frame, batched by window size
            v = torch.empty(h, w)
            groups: dict[tuple, list] = {}
            for rows, cols in spans:
                groups.setdefault((rows[1] - rows[0], cols[1] - cols[0]), []).append((rows, cols))
            for members in groups.values():
                for s in range(0, len(members), self.batch_size):
                    chunk = members[s:s + self.batch_size]
                    y = self.forward([frame[r0:r1, c0:c1] for (r0, r1, _, _), (c0, c1, _, _) in chunk])
                    for y_k, ((r0, _, kr0, kr1), (c0, _, kc0, kc1)) in zip(y, chunk):
                        v[kr0:kr1, kc0:kc1] = y_k[kr0 - r0:kr1 - r0, kc0 - c0:kc1 - c0]
            self.quantize(v, out[k])


def run_pipeline(frames: Iterable[np.ndarray], engine: Callable, sink: Callable, *,
                 max_value: int | None = None, batch_size: int = DEFAULT_BATCH,
                 max_pixels: int = DEFAULT_MAX_PIXELS, tile: int = DEFAULT_TILE,
                 overlap: int | None = None, threaded: bool = True, depth: int = 2,
                 label: Callable[[int], str] | None = None) -> PipelineStats:
    """Run every frame through engine into sink (module docstring); returns the stage times.
    label(k) names frame k in errors (default "frame k")."""
    label = label or (lambda k: f"frame {k}")
    if batch_size < 1 or max_pixels < 1 or depth < 1:
        raise ValueError(f"batch_size, max_pixels and depth must be >= 1, got {batch_size}, "
                         f"{max_pixels}, {depth}")
    net = _Network(engine, max_value, batch_size, max_pixels, tile, overlap)
    stats = PipelineStats(threaded=threaded)
    stop = threading.Event()
    decoded: queue.Queue = queue.Queue(maxsize=depth * batch_size)
    encoded: queue.Queue = queue.Queue(maxsize=depth)
    free: dict[tuple, queue.Queue] = {}   # (h, w) -> ring of output buffers

    def decode():
        it = iter(frames)
        index = 0
        while True:
            t0 = time.perf_counter()
            try:
                frame = next(it)
            except StopIteration:
                stats.decode_s += time.perf_counter() - t0
                break
            frame = np.asarray(frame)
            stats.decode_s += time.perf_counter() - t0
            if frame.ndim != 2:
                raise ValueError(f"{label(index)}: expected an (H, W) frame, got shape {frame.shape}")
            if min(frame.shape) < MIN_SIDE:
                raise ValueError(f"{label(index)} is {frame.shape[0]}x{frame.shape[1]}; the networks "
                                 f"need at least {MIN_SIDE}x{MIN_SIDE} pixels")
            yield index, frame
            index += 1

    def encode(item):
        indices, out, sources, ring = item
        t0 = time.perf_counter()
        arr = out.numpy()
        for k, (index, source) in enumerate(zip(indices, sources)):
            sink(index, arr[k], source)
        stats.encode_s += time.perf_counter() - t0
        stats.frames += len(indices)
        ring.put(out)

    def network(batch):
        h, w = batch[0][1].shape
        ring = free.get((h, w))
        if ring is None:  # depth + 2 buffers: one being filled, depth queued, one being encoded
            ring = free[(h, w)] = queue.Queue()
            for _ in range(depth + 2):
                ring.put(torch.empty(batch_size, h, w, dtype=net.out_dtype))
        out = _get(ring, stop) if threaded else ring.get_nowait()
        t0 = time.perf_counter()
        try:
            net.run_batch([f for _, f in batch], out)
        except (ValueError, RuntimeError) as e:
            where = label(batch[0][0]) + (f" to {label(batch[-1][0])}" if len(batch) > 1 else "")
            raise type(e)(f"{where}: {e}") from e
        stats.network_s += time.perf_counter() - t0
        stats.batches += 1
        return [i for i, _ in batch], out, [f for _, f in batch], ring

    def batches(source):
        batch = []
        for index, frame in source:
            if batch and frame.shape != batch[0][1].shape:
                yield batch
                batch = []
            batch.append((index, frame))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    t_start = time.perf_counter()
    if not threaded:
        for batch in batches(decode()):
            encode(network(batch))
        stats.seconds = time.perf_counter() - t_start
        return stats

    def decode_stage():
        for item in decode():
            _put(decoded, item, stop)
        _put(decoded, _END, stop)

    def encode_stage():
        while (item := _get(encoded, stop)) is not _END:
            encode(item)

    def from_queue():
        while (item := _get(decoded, stop)) is not _END:
            yield item

    stages = [_Stage("speckle-decode", decode_stage, stop), _Stage("speckle-encode", encode_stage, stop)]
    for stage in stages:
        stage.start()
    try:
        for batch in batches(from_queue()):
            _put(encoded, network(batch), stop)
        _put(encoded, _END, stop)
        stages[1].join()
    except _Stop:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        if stop.is_set() or any(s.error for s in stages):
            stop.set()
        for stage in stages:
            stage.join()
    for stage in stages:
        if stage.error is not None:
            raise stage.error
    stats.seconds = time.perf_counter() - t_start
    return stats
