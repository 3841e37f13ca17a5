"""Training: the `speckle-train` command, its configuration and presets, the loop, checkpoints,
evaluation, the speckle-free target's pairs and torchrun support."""
