"""The three networks: shapes (odd sizes, batch 1), norm switch, channels_last, bf16, overfit."""
import pytest
import torch
import torch.nn as nn

from speckle_models import MODEL_NAMES, PAPER_HPARAMS, build_model
from speckle_models.networks.unet import UNet, pad_to_multiple

CASES = [("di-conv-ae", None), ("d-unet", "batchnorm"), ("br-unet", "fused"), ("br-unet", "reference")]


def make(name, norm, width=4):
    torch.manual_seed(0)
    return build_model(name, norm=norm, width=width)


@pytest.mark.parametrize("name,norm", CASES)
@pytest.mark.parametrize("shape", [(1, 1, 13, 7), (2, 1, 16, 16), (3, 1, 33, 50), (1, 1, 1, 1)])
def test_output_shape_eval(name, norm, shape):
    model = make(name, norm).eval()
    with torch.no_grad():
        y = model(torch.randn(shape))
    assert y.shape == shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name,norm", CASES)
def test_output_shape_train_odd(name, norm):
    # Training mode needs > 1 value per channel in the 1/16-scale bottleneck: batch 2, 31x45.
    model = make(name, norm).train()
    x = torch.randn(2, 1, 31, 45, requires_grad=True)
    y = model(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_norm_and_activation_switch():
    br = build_model("br-unet", norm="reference", width=4)
    d = build_model("d-unet", width=4)
    from speckle_kernels import FusedBatchRenorm2d

    assert any(isinstance(m, FusedBatchRenorm2d) for m in br.modules())
    assert any(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in br.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in br.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    assert any(type(m) is nn.ReLU for m in d.modules())
    renorms = [m for m in br.modules() if isinstance(m, FusedBatchRenorm2d)]
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in renorms)
    assert {m.backend for m in renorms} == {"reference"}
    from speckle_kernels import FusedBatchRenormAct2d

    fused = build_model("br-unet", width=4)
    blocks = [m for m in fused.modules() if isinstance(m, FusedBatchRenormAct2d)]
    assert len(blocks) == 9 and {(m.backend, m.activation, m.negative_slope) for m in blocks} == {
        ("auto", "leaky_relu", 0.1)}
    assert not any(isinstance(m, nn.LeakyReLU) for m in fused.modules())  # fused into the blocks
    # the same state_dict keys as the layer-by-layer network: checkpoints move both ways
    assert br.state_dict().keys() == fused.state_dict().keys()
    bn = build_model("br-unet", norm="batchnorm", width=4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())


def test_norm_backend_reaches_every_fused_layer():
    from speckle_kernels import FusedBatchRenorm2d

    from speckle_kernels import FusedBatchRenormAct2d

    def backends(model):
        return {m.backend for m in model.modules() if isinstance(m, (FusedBatchRenorm2d, FusedBatchRenormAct2d))}

    assert backends(build_model("br-unet", width=4, norm_backend="cpu")) == {"cpu"}
    # the reference network stays the reference whatever kernels the fused layers would use
    assert backends(build_model("br-unet", norm="reference", width=4, norm_backend="cpu")) == {"reference"}
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        build_model("br-unet", width=4, norm_backend="gpu")


def test_table1_defaults():
    assert [PAPER_HPARAMS[m]["lr"] for m in MODEL_NAMES] == [0.01, 0.005, 0.0001]
    for name in MODEL_NAMES:
        drops = {m.p for m in build_model(name, width=4).modules() if isinstance(m, nn.Dropout)}
        assert drops == {PAPER_HPARAMS[name]["dropout"]}
    pools = [m for m in build_model("d-unet", width=4).modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4
    pools = [m for m in build_model("di-conv-ae", width=4).modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 1


def test_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet")
    with pytest.raises(ValueError, match="unknown norm"):
        build_model("br-unet", norm="layernorm")
    with pytest.raises(ValueError, match="activation"):
        UNet(activation="gelu")


def test_pad_to_multiple():
    x = torch.arange(15.0).view(1, 1, 3, 5)
    y, size = pad_to_multiple(x, 4)
    assert y.shape == (1, 1, 4, 8) and size == (3, 5)
    assert torch.equal(y[..., :3, :5], x)
    assert pad_to_multiple(torch.zeros(1, 1, 8, 8), 4)[0].shape == (1, 1, 8, 8)


@pytest.mark.parametrize("name,norm", CASES)
def test_channels_last_matches_contiguous(name, norm):
    model = make(name, norm).eval()
    x = torch.randn(2, 1, 32, 24)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,norm", CASES)
def test_bf16_autocast(name, norm):
    model = make(name, norm).train()
    x = torch.randn(2, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    loss = y.float().square().mean()
    loss.backward()
    assert y.shape == x.shape and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name,norm,lr", [("di-conv-ae", None, 0.003), ("d-unet", "batchnorm", 0.005),
                                          ("br-unet", "fused", 0.005)])
def test_one_batch_overfit(name, norm, lr):
    """Each network drives its loss on one fixed batch down by well over half in 60 steps."""
    torch.manual_seed(0)
    model = build_model(name, norm=norm, width=8, dropout=0.0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    clean = torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy) * 0.8 for k in range(4)])[:, None]
    noisy = clean + 0.2 * torch.randn_like(clean)
    opt = torch.optim.Adamax(model.parameters(), lr=lr)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.3 * losses[0], losses[::10]


def test_di_conv_ae_dilations():
    from speckle_models.networks.di_conv_ae import DiConvAE

    def dilations(model):
        return [m.dilation[0] for m in model.modules() if type(m) is nn.Conv2d]

    # Hybrid (default): neighbour-mixing convolutions at full resolution, dilation 2 elsewhere.
    assert dilations(DiConvAE(channels=4)) == [1, 2, 2, 2, 2, 2, 1, 1, 1]
    # Table 1 literally: dilation 2 everywhere but the 3x3 head.
    assert dilations(DiConvAE(channels=4, hybrid_dilation=False)) == [2] * 8 + [1]
    assert all(m.padding[0] == m.dilation[0] for m in DiConvAE(channels=4).modules() if type(m) is nn.Conv2d)


def _float32_ulp(value: float) -> float:
    v = torch.tensor(abs(value), dtype=torch.float32)
    return (torch.nextafter(v, torch.tensor(float("inf"))) - v).item()


def _one_step(model, noisy, clean):
    """Forward, loss and backward of one step: (y, every gradient, the norm buffers after)."""
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    y = model(noisy)
    F.mse_loss(y, clean).backward()
    grads = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    return y.detach().double(), grads, buffers


def test_block_network_trains_like_the_layer_by_layer_one():
    # Br-U-Net with the norm blocks (C++ kernels) against the paper's layer-by-layer network
    # (reference BatchRenorm, then nn.LeakyReLU), judged step by step rather than after a
    # trajectory: 20 Adamax steps of the layer-by-layer network in float64 give the states; at
    # each one both fp32 networks start from that same state, make one forward and backward on
    # the same batch, and are compared with float64. Rounding is then never amplified by
    # earlier steps, so the house rule applies as it does to one layer: the blocks' error is at
    # most 2x the fp32 reference network's + 1 ulp of the largest value (errors as 2-norms,
    # pooled over the steps: y, all gradients as one vector, the running buffers; the counters
    # equal). Dropout is 0 so that the three networks see the same function.
    g = torch.Generator().manual_seed(11)
    batches = [(torch.rand(4, 1, 32, 32, generator=g) * 2 - 1) for _ in range(5)]
    torch.manual_seed(0)
    fused = build_model("br-unet", norm="fused", width=4, dropout=0.0)
    reference = build_model("br-unet", norm="reference", width=4, dropout=0.0)
    exact = build_model("br-unet", norm="reference", width=4, dropout=0.0).double()
    exact.load_state_dict(fused.state_dict())
    opt = torch.optim.Adamax(exact.parameters(), lr=PAPER_HPARAMS["br-unet"]["lr"])
    err = {"fused": {}, "reference": {}}
    largest = {}
    losses = []
    for step in range(20):
        clean = batches[step % len(batches)]
        noisy = clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(step))
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in exact.state_dict().items()}
        runs = {}
        for name, model in (("fused", fused), ("reference", reference)):
            model.load_state_dict(state)
            runs[name] = _one_step(model, noisy, clean)
        y64, g64, b64 = _one_step(exact, noisy.double(), clean.double())
        losses.append(torch.nn.functional.mse_loss(y64, clean.double()).item())
        opt.step()
        truth = {"y": y64, "grads": g64,
                 "buffers": torch.cat([v.reshape(-1).double() for k, v in b64.items() if "running" in k])}
        for name, (y, grads, buffers) in runs.items():
            for k, v in b64.items():
                if "num_batches" in k:
                    assert torch.equal(buffers[k], v), f"{name} step {step}: {k}"
            got = {"y": y, "grads": grads,
                   "buffers": torch.cat([v.reshape(-1).double() for k, v in buffers.items() if "running" in k])}
            for q, value in got.items():
                err[name][q] = err[name].get(q, 0.0) + (value - truth[q]).square().sum().item()
                largest[q] = max(largest.get(q, 0.0), truth[q].abs().max().item())
    assert losses[-1] < losses[0]  # it trains
    for q in err["fused"]:
        fused_err, ref_err = err["fused"][q] ** 0.5, err["reference"][q] ** 0.5
        bound = 2 * ref_err + _float32_ulp(largest[q])
        assert fused_err <= bound, f"{q}: fused error {fused_err:.3g} > bound {bound:.3g} (reference {ref_err:.3g})"
