"""Comparison helpers shared by the tests."""
from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str):
    """assert_close that names the tensor and prints the first mismatching indices."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        lines = [f"  at {tuple(i)}: got {actual[tuple(i)].item():.8g}, expected {expected[tuple(i)].item():.8g}"
                 for i in idx]
        worst = (actual - expected).abs().max().item()
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(atol={atol:.3g}, rtol={rtol:.3g}, max abs diff {worst:.3g}):\n" + "\n".join(lines))


def forbid_host_sync(monkeypatch) -> None:
    """Make .item(), .tolist() and bool() on a tensor raise: each would synchronize with the
    device, which a layer's forward and backward must not do."""
    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization in the layer")

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
