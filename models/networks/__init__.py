"""The networks: the paper's U-Nets and Di-Conv-AE-Net, norm folding for inference, FLOP counts."""
from speckle_models.networks.di_conv_ae import DiConvAE
from speckle_models.networks.unet import NORMS, UNet, br_unet, d_unet

__all__ = ["DiConvAE", "UNet", "NORMS", "br_unet", "d_unet"]
