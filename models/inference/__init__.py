"""Inference on real scans: the `speckle-denoise` command, tiling at native resolution, image I/O."""
