"""An independent restatement of the third-party BatchRenorm layer (github.com/ludvb/batchrenorm),
written from its documented behaviour for the drop-in tests (the package is not on the index).

Its observable contract: parameters weight/bias (always present, used only when affine),
buffers running_mean/running_std (fp32) and num_batches_tracked (int64); statistics over every
dim but 1 computed in the input's dtype; std biased plus eps; r and d detached and clamped with
the r_max/d_max schedules of num_batches_tracked; running statistics updated after use.
"""
import torch
from torch import nn


class ThirdPartyBatchRenorm(nn.Module):
    def __init__(self, num_features, eps=1e-3, momentum=0.01, affine=True):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.affine, self.eps, self.momentum = affine, eps, momentum

    def forward(self, x):
        channel_last = x.movedim(1, -1)
        if self.training:
            dims = list(range(channel_last.dim() - 1))
            mu = channel_last.mean(dims)
            sigma = channel_last.std(dims, unbiased=False) + self.eps
            t = self.num_batches_tracked
            rmax = (2 / 35000 * t + 25 / 35).clamp(1.0, 3.0)
            dmax = (5 / 20000 * t - 25 / 20).clamp(0.0, 5.0)
            r = (sigma.detach() / self.running_std).clamp(1 / rmax, rmax)
            d = ((mu.detach() - self.running_mean) / self.running_std).clamp(-dmax, dmax)
            out = (channel_last - mu) / sigma * r + d
            self.running_mean += self.momentum * (mu.detach() - self.running_mean)
            self.running_std += self.momentum * (sigma.detach() - self.running_std)
            self.num_batches_tracked += 1
        else:
            out = (channel_last - self.running_mean) / self.running_std
        if self.affine:
            out = self.weight * out + self.bias
        return out.movedim(-1, 1)
