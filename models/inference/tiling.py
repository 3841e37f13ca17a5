"""Denoising whole frames, in tiles when they are large, with the same output as untiled.

Tiling, when H * W exceeds max_pixels: windows of tile x tile pixels whose origins step by
tile - overlap, every origin a multiple of the network's size multiple m (so pooling sees the
grid of the whole image), the last window of a row or column running to the image edge; each
output pixel is taken from one window (centre-crop stitching: the seam lies in the middle of
each overlap, overlap / 2 from either window's edge). A window differs from the whole image
only by the zero padding at its inner edges, and that reaches an output pixel only from as far
as the pixel's inputs do. `reaches` measures this per residue mod m (impulses through a
positive-weight float64 copy of the network): the receptive radius R is 61 for the U-Nets
(depth 4) and 22 for Di-Conv-AE, but next to an edge at a multiple of m a pixel needs less
context, because the longest reaches belong to residues that sit farther from such an edge:
`aligned_halo` h = 47 for the U-Nets, 22 for Di-Conv-AE. The default overlap is 2 h rounded up
to m: 96 and 44. Every kept pixel then sees the same inputs and padding as untiled, and an
edge window pads (replicate) to the same multiple as the whole image, its origin being one.
So tiled output equals untiled output up to the convolutions' summation order: float64 runs
agree exactly (and differ with m less overlap: h is tight), fp32 ones within 1 ulp (6e-8
measured on the CPU); tests allow 1e-5. A smaller --overlap is allowed, and its seams differ
from untiled output by what the cut-off context carries.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from speckle_models.inference.engine import Engine

MIN_SIDE = 16
DEFAULT_TILE = 512
DEFAULT_MAX_PIXELS = 1 << 20
DEFAULT_BATCH = 8


def _bare(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def size_multiple(model: nn.Module) -> int:
    """The multiple the network pads H and W to (its pooling period): 2**depth for the U-Nets,
    2 for Di-Conv-AE, else the model's `size_multiple` attribute, or 16."""
    from speckle_models.networks.di_conv_ae import DiConvAE
    from speckle_models.networks.unet import UNet

    model = _bare(model)
    if isinstance(model, UNet):
        return 2 ** model.depth
    if isinstance(model, DiConvAE):
        return 2
    return int(getattr(model, "size_multiple", 16))


def _positive_copy(model: nn.Module) -> nn.Module:
    """A float64 CPU copy in which every path carries a positive signal: convolution weights
    1 / fan, biases and means 0, norm scales 1. With a zero input everything is 0, and an
    impulse changes exactly the outputs that depend on it (no cancellation, no dead ReLU)."""
    probe = copy.deepcopy(_bare(model)).cpu().double().eval()
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    ones, zeros = {"weight", "scale", "running_var", "running_std"}, {"bias", "shift", "running_mean"}
    with torch.no_grad():
        for module in probe.modules():
            tensors = dict(module.named_parameters(recurse=False))
            tensors.update((k, v) for k, v in module.named_buffers(recurse=False)
                           if v is not None and v.is_floating_point())
            for key, t in tensors.items():
                if t is None:
                    continue
                if isinstance(module, convs) and key == "weight":
                    t.fill_(1.0 / t[0].numel())
                elif key in ones:
                    t.fill_(1.0)
                elif key in zeros:
                    t.zero_()
                else:
                    raise ValueError(f"cannot measure the receptive field through {type(module).__name__}"
                                     f".{key}; pass the tile overlap explicitly")
    return probe


def reaches(model: nn.Module, multiple: int | None = None, *,
            limit: int = 8192) -> tuple[list[int], list[int]]:
    """(left, right): left[r] is how far left of an output pixel in column c (c % m == r) the
    input pixels it depends on reach, right[r] how far right (the same along H: square
    kernels). Measured with one impulse per residue through `_positive_copy`."""
    m = multiple or size_multiple(model)
    probe = _positive_copy(model)
    width = 256
    while width <= limit:
        origin = (width // 2) // m * m
        x = torch.zeros(m, 1, m, width, dtype=torch.float64)
        for r in range(m):  # one image per residue: an impulse at column origin + r
            x[r, 0, m // 2, origin + r] = 1.0
        with torch.no_grad():
            hit = (probe(x)[:, 0] != 0).any(dim=1)  # (m, width): the outputs each impulse reaches
        if hit[:, 0].any() or hit[:, -1].any():
            width *= 2  # the footprint ran into the probe's edges
            continue
        left, right = [0] * m, [0] * m
        for r in range(m):  # output o depends on input i exactly when the impulse at i hits o
            i = origin + r
            for o in hit[r].nonzero().flatten().tolist():
                if o > i:
                    left[o % m] = max(left[o % m], o - i)
                else:
                    right[o % m] = max(right[o % m], i - o)
        return left, right
    raise ValueError(f"the receptive field is wider than {limit} pixels; pass the tile overlap explicitly")


def receptive_radius(model: nn.Module) -> int:
    """R: the farthest distance (pixels, along H or W) between an output pixel and an input
    pixel it depends on."""
    left, right = reaches(model)
    return max(left + right)


def aligned_halo(model: nn.Module) -> int:
    """The least context h (pixels) a kept pixel needs between it and a window edge placed at
    a multiple of m: for every distance d >= h the pixel's residue must reach no farther than
    d, on both sides (a pixel d from a left edge has residue d % m, from a right edge
    (-1 - d) % m). Below R where the longest reaches belong to residues that sit farther
    from an aligned edge (the U-Nets: 47 against R = 61)."""
    m = size_multiple(model)
    left, right = reaches(model, m)
    h = 0
    while not all(left[d % m] <= d and right[(-1 - d) % m] <= d for d in range(h, h + m)):
        h += 1
    return h


def default_overlap(model: nn.Module) -> int:
    """2 * aligned_halo rounded up to the size multiple (so strides stay multiples)."""
    m = size_multiple(model)
    return -(-2 * aligned_halo(model) // m) * m


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, keep_start, keep_stop) of each window along one axis: starts step by
    tile - overlap, the last window runs to `length`; the kept parts partition [0, length)."""
    if length <= tile:
        return [(0, length, 0, length)]
    stride, half = tile - overlap, overlap // 2
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + stride)
    spans = []
    for k, s in enumerate(starts):
        last = k == len(starts) - 1
        stop = length if last else s + tile
        spans.append((s, stop, 0 if k == 0 else s + half, length if last else stop - half))
    return spans


def check_tiling(tile: int, overlap: int, max_pixels: int, multiple: int) -> None:
    if tile < MIN_SIDE or tile % multiple:
        raise ValueError(f"tile {tile} must be a multiple of {multiple} (the network's) and >= {MIN_SIDE}")
    if overlap < 0 or overlap % multiple or overlap >= tile:
        raise ValueError(f"overlap {overlap} must be a multiple of {multiple} in [0, tile={tile})")
    if tile * tile > max_pixels:
        raise ValueError(f"tile {tile} makes {tile * tile}-pixel windows, more than max_pixels "
                         f"{max_pixels}: lower the tile or raise max_pixels")


def frame_windows(h: int, w: int, *, max_pixels: int, tile: int, overlap: int | None,
                  multiple: int) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """(rows, cols) spans (start, stop, keep_start, keep_stop) of the windows an (h, w) frame
    runs in: the whole frame when h * w <= max_pixels, else tile x tile windows (overlap
    must then be given: default_overlap(model))."""
    if h * w <= max_pixels:
        return [((0, h, 0, h), (0, w, 0, w))]
    if overlap is None:
        raise ValueError("a frame over max_pixels is tiled: pass the overlap (default_overlap(model))")
    check_tiling(tile, overlap, max_pixels, multiple)
    return [(rows, cols) for rows in tile_spans(h, tile, overlap) for cols in tile_spans(w, tile, overlap)]


def _network(model) -> tuple[nn.Module, torch.device, torch.dtype]:
    """(the network to measure, the device and dtype its inputs go in as) of a bare module or
    an Engine (engine.py: fp32 inputs; it casts, folds and lays out itself)."""
    if isinstance(model, Engine):
        return model.source, model.device, torch.float32
    p = next(_bare(model).parameters(), None)
    return model, *((p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32))


@torch.no_grad()
def denoise_frames(model, frames: list[np.ndarray], *, batch_size: int = DEFAULT_BATCH,
                   max_pixels: int = DEFAULT_MAX_PIXELS, tile: int = DEFAULT_TILE,
                   overlap: int | None = None, amp: bool = False,
                   names: list[str] | None = None) -> list[np.ndarray]:
    """Denoise (H, W) frames of v in [0, 1]; returns v in [0, 1], same sizes, float32 (float64
    for a float64 model).

    model: an Engine (engine.py: speckle-denoise's path; amp must stay False, the engine's path
    says the precision) or a bare nn.Module (eval mode for the call; amp: bf16 autocast).
    Frames (or tiles of frames over max_pixels) of the same size run together in batches of
    batch_size; overlap None is default_overlap(model). names label the frames in errors.
    An Engine gets its batches in its reused staging buffer, and a fixed-shape engine (compiled,
    int8, CUDA graph) a short batch padded to batch_size with copies of its last piece (the
    padding's outputs are dropped), so each piece size is compiled or captured once."""
    if batch_size < 1 or max_pixels < 1:
        raise ValueError(f"batch_size and max_pixels must be >= 1, got {batch_size}, {max_pixels}")
    engine = model if isinstance(model, Engine) else None
    if engine is not None and amp:
        raise ValueError("amp is for a bare module; an Engine runs its own path's precision")
    names = names or [f"image {i}" for i in range(len(frames))]
    network, device, dtype = _network(model)
    m = size_multiple(network)
    pieces: dict[tuple[int, int], list] = {}  # window size -> [(frame, rows, cols)]
    for i, f in enumerate(frames):
        if f.ndim != 2:
            raise ValueError(f"{names[i]}: expected an (H, W) frame, got shape {f.shape}")
        h, w = f.shape
        if min(h, w) < MIN_SIDE:
            raise ValueError(f"{names[i]} is {h}x{w}; the networks need at least "
                             f"{MIN_SIDE}x{MIN_SIDE} pixels")
        if h * w > max_pixels and overlap is None:
            overlap = default_overlap(network)
        for rows, cols in frame_windows(h, w, max_pixels=max_pixels, tile=tile, overlap=overlap, multiple=m):
            pieces.setdefault((rows[1] - rows[0], cols[1] - cols[0]), []).append((i, rows, cols))

    wide = dtype == torch.float64  # a float64 model keeps its precision (tests use it)
    outs = [np.empty(f.shape, np.float64 if wide else np.float32) for f in frames]
    was_training = network.training
    network.eval()
    try:
        for (ph, pw), members in pieces.items():
            for b in range(0, len(members), batch_size):
                chunk = members[b:b + batch_size]
                crops = [frames[i][r0:r1, c0:c1] for i, (r0, r1, _, _), (c0, c1, _, _) in chunk]
                if engine is None:
                    x = torch.stack([torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)) for c in crops])
                    x = (x[:, None].to(device, dtype) - 0.5) / 0.5
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        y = model(x)
                else:  # the same float32 arithmetic, in the engine's reused buffer
                    x = engine.staging((batch_size if engine.fixed_shape else len(crops), 1, ph, pw))
                    xs = x.numpy()
                    for k in range(x.shape[0]):
                        xs[k, 0] = crops[min(k, len(crops) - 1)]
                    y = engine(x.sub_(0.5).div_(0.5))[:len(crops)]
                y = (y.to(torch.float64 if wide else torch.float32).clamp_(-1, 1) * 0.5 + 0.5)[:, 0].cpu().numpy()
                for y_k, (i, (r0, _, kr0, kr1), (c0, _, kc0, kc1)) in zip(y, chunk):
                    outs[i][kr0:kr1, kc0:kc1] = y_k[kr0 - r0:kr1 - r0, kc0 - c0:kc1 - c0]
    finally:
        network.train(was_training)
    return outs
