"""Image metrics: PSNR and SSIM against a reference image (psnr_ssim), and the no-reference
speckle statistics of a single image (speckle_stats: speckle SNR, ENL, CNR, gCNR)."""
from speckle_models.metrics.psnr_ssim import from_normalized, psnr, ssim
from speckle_models.metrics.speckle_stats import cnr, enl, gcnr, homogeneous_windows, speckle_snr

__all__ = ["from_normalized", "psnr", "ssim", "cnr", "enl", "gcnr", "homogeneous_windows", "speckle_snr"]
