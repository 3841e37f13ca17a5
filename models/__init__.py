"""The paper's three denoising networks and their Table 1 hyper-parameters.

    build_model("di-conv-ae" | "d-unet" | "br-unet", norm=..., width=..., dropout=..., upsample=...)

Table 1 of the paper, read column by column (the lowest learning rate belongs to Br-U-Net,
even though section 2.2 credits batch renormalization with allowing *higher* rates; Karaoglu
et al. used 0.0001 for every model; we keep the paper's table):

    model        learning rate  dropout  batch  optimizer  loss  epochs  noise factors
    Di-Conv-AE   0.01           0.2      32     Adamax     MSE   10      1, 5, 10
    D-U-Net      0.005          0.1      32     Adamax     MSE   10      1, 5, 10
    Br-U-Net     0.0001         0.05     32     Adamax     MSE   10      1, 5, 10

(Adamax comes from Karaoglu et al.'s table; the paper's Table 1 has no optimizer row.)
"""
from __future__ import annotations

import torch.nn as nn

from speckle_models.networks.di_conv_ae import DiConvAE
from speckle_models.networks.unet import NORMS, UPSAMPLES, UNet, br_unet, d_unet

MODEL_NAMES = ("di-conv-ae", "d-unet", "br-unet")
DISPLAY_NAMES = {"di-conv-ae": "Di-Conv-AE-Net", "d-unet": "D-U-Net", "br-unet": "Br-U-Net"}
PAPER_HPARAMS = {
    "di-conv-ae": {"lr": 0.01, "dropout": 0.2},
    "d-unet": {"lr": 0.005, "dropout": 0.1},
    "br-unet": {"lr": 0.0001, "dropout": 0.05},
}
PAPER_BATCH_SIZE = 32
PAPER_EPOCHS = 10
PAPER_NOISE_FACTORS = (1, 5, 10)


def check_model_name(name: str) -> str:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return name


def build_model(name: str, *, norm: str | None = None, width: int = 32,
                dropout: float | None = None, norm_backend: str = "auto",
                upsample: str | None = None) -> nn.Module:
    """A fresh network. norm applies to the U-Nets only (default: batchnorm for D-U-Net,
    fused BatchRenorm for Br-U-Net); norm_backend picks the fused layers' kernels
    (speckle_kernels backends; norm="reference" always runs the reference); dropout defaults
    to Table 1's value; upsample ("transpose", the paper's and the default, or "resize":
    networks/unet.py) applies to the U-Nets only."""
    check_model_name(name)
    if dropout is None:
        dropout = PAPER_HPARAMS[name]["dropout"]
    if name == "di-conv-ae":
        if upsample not in (None, "transpose"):
            raise ValueError("upsample applies to the U-Nets only (di-conv-ae has its own decoder)")
        return DiConvAE(channels=width, dropout=dropout)
    kw = dict(base_channels=width, norm_backend=norm_backend, upsample=upsample or "transpose")
    if name == "d-unet":
        return d_unet(dropout=dropout, norm=norm or "batchnorm", **kw)
    return br_unet(dropout=dropout, norm=norm or "fused", **kw)


__all__ = ["DiConvAE", "UNet", "d_unet", "br_unet", "build_model", "check_model_name",
           "MODEL_NAMES", "DISPLAY_NAMES", "PAPER_HPARAMS", "NORMS", "UPSAMPLES", "PAPER_BATCH_SIZE",
           "PAPER_EPOCHS", "PAPER_NOISE_FACTORS"]
