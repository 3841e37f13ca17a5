"""D-U-Net and Br-U-Net: one U-Net with a switchable normalization and activation.

Section 2.2 of the paper (after Karaoglu et al. 2022 and Ronneberger et al. 2015):

    contracting step : MaxPool 2 -> Dropout -> Conv 3x3 -> Norm -> Act
    bottleneck       : the same, then ConvTranspose (x2 upsampling)
    expanding step   : concat(skip, up) -> Dropout -> Conv 3x3 -> Norm -> Act -> Norm
                       (-> ConvTranspose to the next level, except at the top)
    head             : Conv 1x1 -> 1 channel; the channel count doubles at each level down.

    D-U-Net : Norm = BatchNorm2d,                 Act = ReLU,            dropout 0.1
    Br-U-Net: Norm = BatchRenorm (eps 1e-3, momentum 0.01), Act = LeakyReLU(0.1), dropout 0.05

Choices where the paper and its sources disagree (and why):
- Pooling only in the contracting path, four MaxPool layers. Karaoglu et al.'s figure puts
  max pooling in the expanding path too; the paper (section 5) calls that an error, and both
  Karaoglu's table ("4 max-pooling layers") and Ronneberger's U-Net agree with four. Table 1's
  "Max Pool stride None" for Br-U-Net is ignored: Br-U-Net is D-U-Net with another norm and
  activation (section 2.2), so it pools the same way, with stride 2.
- Upsampling by ConvTranspose2d(kernel 2, stride 2). Table 1 lists stride 1 and "dilation 2"
  for D-U-Net, which cannot restore the resolution halved by a pool; Br-U-Net's column
  (kernel 2, stride 2) is the one that makes the U close, and it is used for both (the paper
  presets' default, upsample="transpose"). Each output pixel of a kernel-2 stride-2 transposed
  convolution gets exactly one of the kernel's four taps, chosen by its position mod 2, so
  any mismatch between the taps prints a period-2 pattern (Odena et al., "Deconvolution and
  checkerboard artifacts", Distill 2016). upsample="resize" is their remedy, resize-
  convolution: bilinear x2 (align_corners=False) then a 3x3 convolution, whose every output
  pixel sees the same weights, so no period-2 pattern unless the input carries one.
- 3x3 convolutions with dilation 1, padding 1 (size preserving). Table 1 pairs "dilation 2"
  with padding 1 for D-U-Net (which would shrink every map by 2 pixels) and with padding 2
  for Br-U-Net; the text describes plain 3x3 convolutions, so both use dilation 1. `dilation`
  is a constructor argument (padding follows it) for anyone who wants Table 1's 2.
- ReLU, not sigmoid. Karaoglu's table gives D-U-Net a sigmoid activation; the paper's text and
  figures describe ReLU, and Table 1's "ReLU 0.1" row reads as ReLU. A sigmoid *output* could
  not produce the [-1, 1] normalized targets either, so the head is a linear 1x1 convolution
  (no output activation); the tools clamp predictions to [-1, 1] before the metrics.
- One convolution per step, as the text describes each cycle; with the stem that gives 9
  convolutions + 4 transposed convolutions (close to Karaoglu's 57 "layers" when Keras-style
  dropout, norm, activation, pool and concat layers are counted).
- The second Norm after the activation of each expanding step is kept as the text says.
- Norm -> Act is one pass in Br-U-Net (the norm block FusedBatchRenormAct2d). The block can
  fuse dropout too, but here dropout comes *before* each convolution, after a pool or a concat
  whose input also feeds another branch (the skip), so moving it into the block would change
  the network: the paper's nn.Dropout layers stay where the paper puts them.
- Width: the papers do not give one; `base_channels` defaults to 32 (32-64-128-256-512).
- Sizes that are not a multiple of 16 are padded (replicate) to one and the output cropped
  back, so any H, W >= 1 works; 128x128 (the paper's size) is not padded.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from speckle_kernels import FusedBatchRenorm2d, FusedBatchRenormAct2d

NORMS = ("fused", "reference", "batchnorm")
ACTIVATIONS = ("relu", "leaky_relu")
UPSAMPLES = ("transpose", "resize")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad H and W up to a multiple; returns the padded tensor and the original size."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def make_norm(kind: str, channels: int, backend: str = "auto") -> nn.Module:
    """BatchNorm2d, or the package's BatchRenorm: fused kernels (on `backend`) or the
    plain-torch reference."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind in ("fused", "reference"):
        return FusedBatchRenorm2d(channels, eps=1e-3, momentum=0.01,
                                  backend=backend if kind == "fused" else "reference")
    raise ValueError(f"unknown norm {kind!r}; expected one of {', '.join(NORMS)}")


def make_activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    raise ValueError(f"unknown activation {kind!r}; expected one of {', '.join(ACTIVATIONS)}")


def make_norm_act(kind: str, act: str, channels: int, backend: str = "auto") -> list[nn.Module]:
    """Norm -> Act as two modules. With the fused BatchRenorm they are one pass, the norm
    block FusedBatchRenormAct2d, followed by an nn.Identity in the activation's place, so that
    state_dict keys are those of the layer-by-layer network (checkpoints move both ways)."""
    if kind == "fused":
        block = FusedBatchRenormAct2d(channels, eps=1e-3, momentum=0.01, activation=act,
                                      negative_slope=0.1, backend=backend)
        return [block, nn.Identity()]
    return [make_norm(kind, channels, backend), make_activation(act)]


class _ConvUnit(nn.Sequential):
    """[Dropout] -> Conv 3x3 -> Norm -> Act [-> Norm]."""

    def __init__(self, cin, cout, *, norm, act, dropout, dilation, norm_backend="auto", post_norm=False):
        layers = [nn.Dropout(dropout)] if dropout > 0 else []
        layers += [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation),
                   *make_norm_act(norm, act, cout, norm_backend)]
        if post_norm:
            layers.append(make_norm(norm, cout, norm_backend))
        super().__init__(*layers)


def make_upsample(kind: str, cin: int, cout: int) -> nn.Module:
    """x2 upsampling from cin to cout channels: ConvTranspose2d(2, stride 2) ("transpose", the
    paper's) or bilinear x2 then Conv 3x3 ("resize"; the module docstring says why)."""
    if kind == "transpose":
        return nn.ConvTranspose2d(cin, cout, 2, stride=2)
    if kind == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                             nn.Conv2d(cin, cout, 3, padding=1))
    raise ValueError(f"unknown upsample {kind!r}; expected one of {', '.join(UPSAMPLES)}")


class UNet(nn.Module):
    """The paper's denoising U-Net; see the module docstring for the layout and the choices."""

    def __init__(self, *, norm: str = "batchnorm", activation: str = "relu", dropout: float = 0.1,
                 base_channels: int = 32, depth: int = 4, dilation: int = 1, in_channels: int = 1,
                 norm_backend: str = "auto", upsample: str = "transpose"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"unknown upsample {upsample!r}; expected one of {', '.join(UPSAMPLES)}")
        if depth < 1 or base_channels < 1 or not 0 <= dropout < 1:
            raise ValueError("depth and base_channels must be >= 1 and dropout in [0, 1)")
        kw = dict(norm=norm, act=activation, dilation=dilation, norm_backend=norm_backend)
        widths = [base_channels * 2 ** i for i in range(depth + 1)]  # the last is the bottleneck
        self.depth = depth
        self.upsample = upsample
        self.stem = _ConvUnit(in_channels, widths[0], dropout=0.0, **kw)
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _ConvUnit(widths[i], widths[i + 1], dropout=dropout, **kw))
            for i in range(depth))
        # up[i] brings level i+1 (widths[i+1] channels) to level i's resolution and width.
        self.up = nn.ModuleList(make_upsample(upsample, widths[i + 1], widths[i]) for i in range(depth))
        self.merge = nn.ModuleList(
            _ConvUnit(2 * widths[i], widths[i], dropout=dropout, post_norm=True, **kw)
            for i in range(depth))
        self.head = nn.Conv2d(widths[0], in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, 2 ** self.depth)
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()  # bottleneck output
        for i in reversed(range(self.depth)):
            y = self.merge[i](torch.cat([skips[i], self.up[i](y)], dim=1))
        return self.head(y)[..., :h, :w]


def d_unet(*, dropout: float = 0.1, norm: str = "batchnorm", **kw) -> UNet:
    """D-U-Net: BatchNorm2d and ReLU, dropout 0.1 (Table 1)."""
    return UNet(norm=norm, activation="relu", dropout=dropout, **kw)


def br_unet(*, dropout: float = 0.05, norm: str = "fused", **kw) -> UNet:
    """Br-U-Net: BatchRenorm (eps 1e-3, momentum 0.01) and LeakyReLU(0.1), dropout 0.05 (Table 1).

    norm="fused" uses the norm block FusedBatchRenormAct2d (BatchRenorm and LeakyReLU in one
    pass, backend="auto"), "reference" the paper's layer by layer network (the plain-PyTorch
    formula of the third-party layer the paper used, then nn.LeakyReLU), "batchnorm"
    nn.BatchNorm2d (an ablation).
    """
    return UNet(norm=norm, activation="leaky_relu", dropout=dropout, **kw)
