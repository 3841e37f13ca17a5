"""The r_max / d_max schedules of batch renormalization and the two rules that use them.

Every implementation (reference, Triton, C++, CUDA, the synchronized layer) follows these, so
they live here rather than in the test oracle. Conventions of the third-party layer the paper
used (github.com/ludvb/batchrenorm): the running statistics are a mean and a std, and r and d
are taken from them *before* this step's update:

    r_max(t) = clamp(2/35000 t + 25/35, 1, 3),   d_max(t) = clamp(5/20000 t - 25/20, 0, 5)
    r = clamp(sigma / running_std, 1/r_max, r_max),  d = clamp((mu - running_mean) / running_std, -d_max, d_max)
    running_mean += momentum (mu - running_mean),  running_std += momentum (sigma - running_std)

with t = num_batches_tracked, a device tensor: nothing here reads it on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RenormSchedule:
    """A clamped linear schedule in t = num_batches_tracked: clamp(slope*t + start, low, high).

    The defaults of the third-party layer are `RMAX_SCHEDULE` and `DMAX_SCHEDULE`; a fixed
    limit is `RenormSchedule.constant(value)`.
    """

    slope: float
    start: float
    low: float
    high: float

    @staticmethod
    def constant(value: float) -> "RenormSchedule":
        return RenormSchedule(0.0, float(value), float(value), float(value))

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (t.to(torch.float32) * self.slope + self.start).clamp(self.low, self.high)

    def as_list(self) -> list[float]:
        """[slope, start, low, high]: how the kernels' ops take a schedule."""
        return [float(self.slope), float(self.start), float(self.low), float(self.high)]


RMAX_SCHEDULE = RenormSchedule(2 / 35000, 25 / 35, 1.0, 3.0)
DMAX_SCHEDULE = RenormSchedule(5 / 20000, -25 / 20, 0.0, 5.0)


def renorm_correction(mean, std, running_mean, running_std, num_batches_tracked,
                      r_max: RenormSchedule, d_max: RenormSchedule):
    """r = clamp(std/rs, 1/r_max, r_max), d = clamp((mean-rm)/rs, -d_max, d_max), on the device."""
    rmax = r_max(num_batches_tracked).to(mean.dtype)
    dmax = d_max(num_batches_tracked).to(mean.dtype)
    r = torch.minimum(torch.maximum(std / running_std, 1.0 / rmax), rmax)
    d = torch.minimum(torch.maximum((mean - running_mean) / running_std, -dmax), dmax)
    return r, d


@torch.no_grad()
def update_running_stats(mean, std, running_mean, running_std, num_batches_tracked, momentum: float):
    """Exponential moving averages of the batch mean and std (after r and d were taken)."""
    running_mean.add_(momentum * (mean.flatten() - running_mean))
    running_std.add_(momentum * (std.flatten() - running_std))
    num_batches_tracked.add_(1)
