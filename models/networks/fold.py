"""Inference folding of the normalization layers into the convolutions, and export.

In eval mode every normalization layer of the networks is a fixed per-channel affine map:

    BatchRenorm (FusedBatchRenorm1d/2d/3d, SyncFusedBatchRenorm; speckle_kernels/reference.py)
        y = weight * (x - running_mean) / running_std + bias        (eps is not used in eval)
    nn.BatchNorm1d/2d/3d (and nn.SyncBatchNorm)
        y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

i.e. y = s * x + t per channel. Where the norm reads the output of a convolution, s and t go
into that convolution (w' = s * w per output channel, b' = s * b + t) and the norm becomes
nn.Identity: one kernel less per layer at inference, and no custom operator left for an
exporter (the fused BatchRenorm kernels are not ONNX operators).

Rules, and why:
- Work on a deep copy, put in eval mode (forced, not required: folding is only defined for
  the eval formula, and the caller's model keeps its weights, buffers and mode). The copy is
  returned in eval mode; training it again would train the folded weights without norms.
- A norm folds only into the convolution that *provably* feeds it alone: its predecessor in an
  nn.Sequential (whose forward is nn.Sequential's own, so order is dataflow), looking through
  eval-time identities (nn.Identity, dropout) and into the last module of a nested Sequential.
  Across any other module (a custom forward, a ModuleList) the dataflow is unknown, so no fold.
  A convolution or norm instance used at two places in the model is never folded (the fold
  would change the other use).
- Norms without such a predecessor: the U-Nets' expanding steps end Conv -> Norm -> Act -> Norm,
  and the second norm follows an activation, which no affine passes through exactly. By default
  (unfoldable="affine") such a norm becomes a `ChannelAffine` with its eval s and t: the same
  output, no statistics, exportable. unfoldable="error" raises ValueError naming the module;
  "keep" leaves the norm (in eval mode) where it is.
- The arithmetic is done in float64 and rounded once to the convolution's dtype, so the folded
  weights carry one rounding instead of the unfolded model's per-layer roundings.

Export (`export_model`): the folded copy through torch.export (.pt2, torch.export.save) or the
dynamo-based ONNX exporter (needs onnx and onnxscript; onnxruntime only to run the file).
Files are written to a temporary name in the destination folder and moved into place, so a
reader never sees a partial file; an existing file is kept unless overwrite=True.
"""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from speckle_models.atomic_write import atomic_path
from speckle_kernels import (FusedBatchRenorm1d, FusedBatchRenorm2d, FusedBatchRenorm3d, FusedBatchRenormAct1d,
                             FusedBatchRenormAct2d, FusedBatchRenormAct3d, SyncFusedBatchRenorm)

__all__ = ["ChannelAffine", "fold_norms", "norm_affine", "norm_modules", "export_model",
           "onnx_predict", "UNFOLDABLE_POLICIES", "EXPORT_FORMATS"]

UNFOLDABLE_POLICIES = ("affine", "error", "keep")
EXPORT_FORMATS = ("onnx", "torch_export")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Identities in eval mode: a norm after conv -> dropout still reads the conv's output.
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_BLOCKS = (FusedBatchRenormAct1d, FusedBatchRenormAct2d, FusedBatchRenormAct3d)  # norm -> act (-> dropout)
_RENORMS = (FusedBatchRenorm1d, FusedBatchRenorm2d, FusedBatchRenorm3d, SyncFusedBatchRenorm) + _BLOCKS
_NORMS = _RENORMS + (_BatchNorm,)  # _BatchNorm: BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones


class ChannelAffine(nn.Module):
    """y = scale * x + shift per channel (dim 1): a norm's eval map where no conv can absorb it."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        if scale.dim() != 1 or scale.shape != shift.shape:
            raise ValueError(f"scale and shift must be 1-D of equal length, got {tuple(scale.shape)} "
                             f"and {tuple(shift.shape)}")
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every BatchRenorm / BatchNorm layer in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _NORMS)]


def norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float64 of shape (C,), with norm.eval()(x) == scale * x + shift per channel."""
    with torch.no_grad():
        if isinstance(norm, _RENORMS):
            rm = norm.running_mean.double()
            inv_std = 1.0 / norm.running_std.double()
            weight = norm.weight.double() if norm.weight is not None else torch.ones_like(rm)
            bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(rm)
            scale = weight * inv_std
            return scale, bias - rm * scale
        if isinstance(norm, _BatchNorm):
            if isinstance(norm, nn.modules.lazy.LazyModuleMixin) and norm.has_uninitialized_params():
                raise ValueError(f"{type(norm).__name__} is uninitialized (run one forward first)")
            if not norm.track_running_stats or norm.running_mean is None:
                # eval mode then normalizes with the batch's own statistics: not an affine map
                raise ValueError(f"{type(norm).__name__} has track_running_stats=False: its eval "
                                 "output depends on the batch and cannot be folded")
            rm = norm.running_mean.double()
            scale = 1.0 / (norm.running_var.double() + norm.eps).sqrt()
            if norm.weight is not None:
                scale = scale * norm.weight.double()
            shift = -rm * scale
            if norm.bias is not None:
                shift = shift + norm.bias.double()
            return scale, shift
    raise TypeError(f"not a BatchRenorm or BatchNorm layer: {type(norm).__name__}")


def _fold_into_conv(conv: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """conv := scale * conv + shift on its output channels (in place, float64 arithmetic)."""
    w = conv.weight.detach().double()
    s = scale.to(w.device)
    groups = conv.groups
    if conv.transposed:
        # ConvTranspose weight is (in, out / groups, *k): output channel g * (out/groups) + j
        # sits at [group g's input rows, j]; scale by that channel's s.
        cin, cout_g = w.shape[0], w.shape[1]
        w = (w.view(groups, cin // groups, cout_g, *w.shape[2:])
             * s.view(groups, 1, cout_g, *([1] * (w.dim() - 2)))).view_as(conv.weight)
    else:  # Conv weight is (out, in / groups, *k)
        w = w * s.view(-1, *([1] * (w.dim() - 1)))
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(s)
    b = b * s + shift.to(w.device)
    like = conv.weight
    conv.weight = nn.Parameter(w.to(like.dtype), requires_grad=like.requires_grad)
    conv.bias = nn.Parameter(b.to(like.dtype), requires_grad=like.requires_grad)


def _last_leaf(module: nn.Module) -> nn.Module:
    # The module whose output leaves a plain Sequential: its last child that is not an
    # eval-time identity (an all-identity Sequential counts as itself: no conv to fold into).
    while _plain_sequential(module):
        kids = [m for m in module if not isinstance(m, _TRANSPARENT)]
        if not kids:
            break
        module = kids[-1]
    return module


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


class _Folder:
    def __init__(self, model: nn.Module, unfoldable: str):
        self.unfoldable = unfoldable
        # A module object reachable from two places is shared: folding it would change both.
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def walk(self, module: nn.Module, prefix: str, feeder: nn.Module | None) -> None:
        """Fold the norms below `module`; `feeder` is the conv whose output is module's input
        and nothing else's (None when that is not known)."""
        if _plain_sequential(module):
            prev = feeder
            for name, child in list(module.named_children()):
                path = f"{prefix}.{name}" if prefix else name
                if isinstance(child, _NORMS):
                    replacement = self.norm(child, path, prev)
                    if replacement is not None:
                        setattr(module, name, replacement)
                    if isinstance(replacement, nn.Identity):
                        continue  # folded: its input (prev's output) flows on unchanged
                elif isinstance(child, _TRANSPARENT):
                    continue
                else:
                    self.walk(child, path, prev)
                leaf = _last_leaf(child)
                prev = leaf if isinstance(leaf, _CONVS) else None
            return
        for name, child in list(module.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, _NORMS):  # not in a Sequential: no provable predecessor
                replacement = self.norm(child, path, None)
                if replacement is not None:
                    setattr(module, name, replacement)
            else:
                self.walk(child, path, None)

    def norm(self, norm: nn.Module, path: str, conv: nn.Module | None) -> nn.Module | None:
        """The module that replaces `norm` (None: keep it). A norm block's activation stays
        behind it (its dropout is off in eval)."""
        replacement = self._affine(norm, path, conv)
        activation = getattr(norm, "activation", None)
        if activation is None or replacement is None or activation == "identity":
            return replacement
        act = nn.ReLU() if activation == "relu" else nn.LeakyReLU(norm.negative_slope)
        return act if isinstance(replacement, nn.Identity) else nn.Sequential(replacement, act)

    def _affine(self, norm: nn.Module, path: str, conv: nn.Module | None) -> nn.Module | None:
        scale, shift = norm_affine(norm)
        shared = conv is not None and (self.uses[id(conv)] > 1 or self.uses[id(norm)] > 1)
        if conv is not None and not shared:
            if conv.out_channels != scale.numel():
                raise ValueError(f"{path}: {type(norm).__name__} has {scale.numel()} channels but the "
                                 f"preceding {type(conv).__name__} has {conv.out_channels} outputs")
            _fold_into_conv(conv, scale, shift)
            return nn.Identity()
        why = ("it or its convolution is used twice" if shared or self.uses[id(norm)] > 1
               else "no convolution feeds it directly")
        if self.unfoldable == "error":
            raise ValueError(f"cannot fold {path} ({type(norm).__name__}): {why}")
        if self.unfoldable == "keep" or self.uses[id(norm)] > 1:
            return None
        ref = norm.running_mean
        return ChannelAffine(scale.to(ref.dtype), shift.to(ref.dtype)).to(ref.device)


def fold_norms(model: nn.Module, *, unfoldable: str = "affine") -> nn.Module:
    """A folded, eval-mode deep copy of `model` (see the module docstring for the rules).

    unfoldable: what becomes of a norm with no convolution to fold into: "affine" (a
    ChannelAffine with the same eval output), "error" (ValueError), or "keep" (left as is).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if unfoldable not in UNFOLDABLE_POLICIES:
        raise ValueError(f"unfoldable must be one of {UNFOLDABLE_POLICIES}, got {unfoldable!r}")
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        if isinstance(folded, _NORMS):  # a bare norm: nothing to fold into
            replacement = _Folder(folded, unfoldable).norm(folded, type(folded).__name__, None)
            return (replacement if replacement is not None else folded).eval()
        _Folder(folded, unfoldable).walk(folded, "", None)
    return folded.eval()


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def export_model(model: nn.Module, example, path, *, format: str = "onnx", fold: bool = True,
                 dynamic_batch: bool = False, overwrite: bool = False,
                 opset_version: int | None = None) -> Path:
    """Export `model` (folded first unless fold=False; always an eval-mode copy) to `path`.

    format: "onnx" (torch.onnx.export with dynamo=True, weights inside the file, so models over
    2 GB are refused by ONNX) or "torch_export" (torch.export.export, saved with
    torch.export.save; load with torch.export.load(path).module()). `example` is a tensor or a
    tuple of tensors; dynamic_batch=True leaves dim 0 of every input free. Returns the path.
    Raises FileExistsError if the file exists and overwrite is False.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such folder: {path.parent}")
    if path.exists() and not overwrite:  # fail before the (slow) export
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    args = example if isinstance(example, tuple) else (example,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example must be a tensor or a non-empty tuple of tensors")
    net = fold_norms(model) if fold else copy.deepcopy(model).eval()
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
    if format == "torch_export":
        program = torch.export.export(net, args, dynamic_shapes=dynamic)
        with atomic_path(path, overwrite=overwrite) as tmp:
            torch.export.save(program, tmp)
        return path
    onnx_program = torch.onnx.export(
        net, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset_version, verbose=False,
        input_names=[f"input{i}" if len(args) > 1 else "input" for i in range(len(args))],
        output_names=["output"])
    with atomic_path(path, overwrite=overwrite) as tmp:
        onnx_program.save(tmp, external_data=False)
    return path


def onnx_predict(path, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported ONNX file with onnxruntime on CPU; returns the outputs as CPU tensors."""
    import onnxruntime as ort  # optional dependency: only needed to run the exported file

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"{path} takes {len(names)} inputs, got {len(inputs)}")
    feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]
