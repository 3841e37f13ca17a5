"""speckle-kernels: fused kernels for training speckle-denoising networks in PyTorch."""
from ._backend import HAS_TRITON
from ._ext import cpu_output_cache_idle_bytes, empty_cpu_output_cache
from .batch_renorm import batch_renorm
from .batch_renorm_act import batch_renorm_act
from .checkpoint_replay import checkpoint_context
from .layers import (FusedBatchRenorm1d, FusedBatchRenorm2d, FusedBatchRenorm3d, FusedBatchRenormAct1d,
                     FusedBatchRenormAct2d, FusedBatchRenormAct3d)
from .noise import add_speckle_noise, make_noisy_batch
from .reference import batch_renorm_reference
from .schedules import DMAX_SCHEDULE, RMAX_SCHEDULE, RenormSchedule
from .sync_batch_renorm import (SyncFusedBatchRenorm, SyncFusedBatchRenormAct, convert_batchrenorm,
                                convert_sync_batchrenorm)

try:  # the one version number lives in pyproject.toml
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("speckle-kernels")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
__all__ = [
    "HAS_TRITON", "batch_renorm", "batch_renorm_reference", "FusedBatchRenorm1d",
    "FusedBatchRenorm2d", "FusedBatchRenorm3d", "batch_renorm_act", "FusedBatchRenormAct1d",
    "FusedBatchRenormAct2d", "FusedBatchRenormAct3d", "RenormSchedule", "RMAX_SCHEDULE", "DMAX_SCHEDULE",
    "SyncFusedBatchRenorm", "SyncFusedBatchRenormAct", "convert_batchrenorm", "convert_sync_batchrenorm",
    "add_speckle_noise", "make_noisy_batch", "cpu_output_cache_idle_bytes", "empty_cpu_output_cache",
    "checkpoint_context",
]
