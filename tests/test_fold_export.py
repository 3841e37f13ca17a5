"""fold_norms and export_model: the folded networks compute what the unfolded ones compute.

Tolerances, and where they come from (u = unit roundoff: 2^-53 for float64, 2^-24 for float32):
- Folding is exact algebra, so in float64 the folded and unfolded models differ only by
  rounding: at most ~ K * u per layer relative to the activations' scale (a length-K dot
  product's worst-case bound, K the largest fan-in), over L layers: L * K * u64 * scale.
- In float32 both models carry their own rounding, of the same order (folding trades the norm
  ops' roundings for one rounding of each folded weight). Both are measured against a float64
  copy of the unfolded model: folded error <= 2 * unfolded error + 4 * u32 * scale. The margin
  covers the case where the unfolded error happens to be small; a wrong fold is off by O(scale).
The same rule checks the exported files (ONNX Runtime and torch.export) against float64.
"""
import copy
import os

import pytest
import torch
from torch import nn

from speckle_models import build_model
from speckle_models.networks.fold import ChannelAffine, export_model, fold_norms, norm_affine, norm_modules, onnx_predict
from speckle_kernels import FusedBatchRenorm2d, FusedBatchRenorm3d, SyncFusedBatchRenorm

U64, U32 = 2.0 ** -53, 2.0 ** -24
NETWORKS = [("di-conv-ae", None), ("d-unet", "batchnorm"), ("br-unet", "fused"), ("br-unet", "reference")]
# Export once per architecture (after folding, D-U-Net and Br-U-Net differ only in weights and
# activation); Br-U-Net with the fused layer is the one that could not be exported unfolded.
EXPORTED = [("di-conv-ae", None), ("br-unet", "fused")]


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters (the defaults 1 and 0 would hide a wrong weight fold)."""
    with torch.no_grad():
        for _, norm in norm_modules(model):
            if norm.weight is not None:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.2)
    return model


def trained(name: str, norm: str | None) -> nn.Module:
    """A small network after a few training-mode forward passes, so running stats are real."""
    model = build_model(name, width=8, **({"norm": norm} if norm else {}))
    randomize_norms(model)
    for _, m in norm_modules(model):
        m.momentum = 0.5  # the layers' 0.01 would leave the running stats near their init
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, 32, 32) * 0.5 + 0.2)
    return model


def fold_bound64(model: nn.Module, scale: float) -> float:
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                           nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                           nn.ConvTranspose3d))]
    fan_in = max(m.weight[0].numel() * (m.weight.shape[0] if m.transposed else 1) for m in convs)
    return len(convs) * fan_in * U64 * scale


def check_against_float64(name, got32, unfolded32, ref64):
    scale = max(1.0, ref64.abs().max().item())
    err_unfolded = (unfolded32.double() - ref64).abs().max().item()
    err = (got32.double() - ref64).abs().max().item()
    bound = 2 * err_unfolded + 4 * U32 * scale
    assert err <= bound, f"{name}: error {err:.3g} vs float64 > bound {bound:.3g} (unfolded {err_unfolded:.3g})"


@pytest.mark.parametrize("name,norm", NETWORKS)
def test_folded_network_matches_unfolded(name, norm):
    model = trained(name, norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    folded = fold_norms(model)

    # The caller's model: same modules, same tensors, still in training mode.
    assert model.training and [type(m) for m in model.modules()] == types_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The copy: eval mode, no norm left (the U-Nets' post-activation norms are ChannelAffine).
    assert not folded.training and norm_modules(folded) == []
    affines = sum(isinstance(m, ChannelAffine) for m in folded.modules())
    assert affines == (0 if name == "di-conv-ae" else 4)

    x = torch.randn(3, 1, 32, 32) * 0.5 + 0.2
    ref64 = copy.deepcopy(model).double().eval()(x.double()).detach()
    with torch.no_grad():
        unfolded32 = copy.deepcopy(model).eval()(x)
        check_against_float64(name, folded(x), unfolded32, ref64)
        # In float64 the fold is exact up to float64 rounding.
        folded64 = fold_norms(copy.deepcopy(model).double())(x.double())
    scale = max(1.0, ref64.abs().max().item())
    assert (folded64 - ref64).abs().max().item() <= fold_bound64(model, scale)


def _random_stats(norm):
    with torch.no_grad():
        norm.running_mean.normal_(0, 0.5)
        if hasattr(norm, "running_std"):
            norm.running_std.uniform_(0.5, 2.0)
        else:
            norm.running_var.uniform_(0.25, 4.0)
    randomize_norms(nn.Sequential(norm))
    return norm


CASES = {
    "conv1d+bn1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), _random_stats(nn.BatchNorm1d(6))), (2, 3, 9)),
    "conv3d+renorm3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3, padding=1),
                                              _random_stats(FusedBatchRenorm3d(4))), (2, 2, 5, 5, 5)),
    "convT2d groups+bn2d": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                                                  _random_stats(nn.BatchNorm2d(6))), (2, 4, 5, 5)),
    "conv2d nobias groups+renorm2d": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False),
                                                            _random_stats(FusedBatchRenorm2d(6))),
                                      (2, 4, 7, 7)),
    "convT2d+sync renorm": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 5, 2, stride=2),
                                                  _random_stats(SyncFusedBatchRenorm(5))), (2, 3, 4, 4)),
    "dropout between, two norms": (lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Dropout(0.5), _random_stats(nn.BatchNorm2d(4)),
        _random_stats(FusedBatchRenorm2d(4))), (2, 3, 6, 6)),
    "nested sequential": (lambda: nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout()),
                                                _random_stats(nn.BatchNorm2d(4))), (2, 3, 4, 4)),
    "affine=False": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), _random_stats(FusedBatchRenorm2d(4, affine=False)),
                                           nn.Conv2d(4, 4, 1), _random_stats(nn.BatchNorm2d(4, affine=False))),
                     (2, 3, 4, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fold_rules_exact_in_float64(case):
    make, shape = CASES[case]
    model = make().double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    folded = fold_norms(model, unfoldable="error")  # every norm here has a conv to fold into
    assert norm_modules(folded) == [] and not any(isinstance(m, ChannelAffine) for m in folded.modules())
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert (got - ref).abs().max().item() <= fold_bound64(model, max(1.0, ref.abs().max().item()))


def test_norm_affine_matches_eval_output():
    for norm in (_random_stats(nn.BatchNorm2d(5)), _random_stats(FusedBatchRenorm2d(5))):
        norm = norm.double().eval()
        x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
        scale, shift = norm_affine(norm)
        with torch.no_grad():
            expected = norm(x)
        # a few roundings of O(|x| / std) terms on either side
        got = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        assert (got - expected).abs().max().item() <= 16 * U64 * max(1.0, expected.abs().max().item())


def test_unfoldable_policies():
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _random_stats(nn.BatchNorm2d(4))).eval()

    model = make()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    as_affine = fold_norms(model)
    assert isinstance(as_affine[2], ChannelAffine) and norm_modules(as_affine) == []
    kept = fold_norms(model, unfoldable="keep")
    assert isinstance(kept[2], nn.BatchNorm2d) and not kept[2].training
    with torch.no_grad():
        for m in (as_affine, kept):
            torch.testing.assert_close(m(x), ref, atol=8 * U32 * max(1.0, ref.abs().max().item()), rtol=0)
    with pytest.raises(ValueError, match=r"cannot fold 2 \(BatchNorm2d\)"):
        fold_norms(model, unfoldable="error")
    with pytest.raises(ValueError, match="unfoldable"):
        fold_norms(model, unfoldable="drop")
    with pytest.raises(TypeError):
        fold_norms(torch.zeros(3))


def test_shared_conv_is_not_folded():
    conv = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(conv, _random_stats(nn.BatchNorm2d(4)), conv).double().eval()
    folded = fold_norms(model)
    assert isinstance(folded[1], ChannelAffine)  # folding would also change the second use
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    with pytest.raises(ValueError, match="used twice"):
        fold_norms(model, unfoldable="error")


def test_unfoldable_norm_kinds():
    with pytest.raises(ValueError, match="track_running_stats"):
        fold_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)))
    with pytest.raises(ValueError, match="4 outputs"):
        fold_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5)))


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,norm", EXPORTED)
def test_onnx_export_matches_eager(tmp_path, name, norm):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the exported file")
    model = trained(name, norm)
    path = export_model(model, torch.randn(2, 1, 32, 32), tmp_path / f"{name}.onnx", dynamic_batch=True)
    assert sorted(os.listdir(tmp_path)) == [f"{name}.onnx"]  # no temporary file left behind
    onnx = pytest.importorskip("onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops, ops
    x = torch.randn(3, 1, 32, 32) * 0.5 + 0.2  # another batch size than the example
    (got,) = onnx_predict(path, x)
    ref64 = copy.deepcopy(model).double().eval()(x.double()).detach()
    with torch.no_grad():
        check_against_float64(f"{name} onnx", got, copy.deepcopy(model).eval()(x), ref64)


@pytest.mark.parametrize("name,norm", EXPORTED)
def test_torch_export_matches_eager(tmp_path, name, norm):
    model = trained(name, norm)
    path = export_model(model, torch.randn(2, 1, 32, 32), tmp_path / "net.pt2", format="torch_export",
                        dynamic_batch=True)
    program = torch.export.load(path)
    x = torch.randn(5, 1, 32, 32) * 0.5 + 0.2
    ref64 = copy.deepcopy(model).double().eval()(x.double()).detach()
    with torch.no_grad():
        check_against_float64(f"{name} torch.export", program.module()(x),
                              copy.deepcopy(model).eval()(x), ref64)
    names = {n.target.__name__ if callable(n.target) else str(n.target) for n in program.graph.nodes}
    assert not any("batch_norm" in n or "renorm" in n for n in names), names


def test_export_refuses_to_overwrite_and_writes_atomically(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), _random_stats(nn.BatchNorm2d(2)))
    x = torch.randn(1, 1, 8, 8)
    path = tmp_path / "m.pt2"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_model(model, x, path, format="torch_export")
    assert path.read_bytes() == b"keep me"
    export_model(model, x, path, format="torch_export", overwrite=True)
    assert path.read_bytes() != b"keep me"
    torch.testing.assert_close(torch.export.load(path).module()(x), fold_norms(model)(x))
    # A write that fails half-way leaves neither the file nor its temporary behind.
    def failing_save(program, f, **kw):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, x, tmp_path / "bad.pt2", format="torch_export")
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"]
    with pytest.raises(ValueError, match="format"):
        export_model(model, x, tmp_path / "m.bin", format="tflite")
    with pytest.raises(TypeError, match="example"):
        export_model(model, x.numpy(), tmp_path / "n.pt2", format="torch_export")
    with pytest.raises(FileNotFoundError):
        export_model(model, x, tmp_path / "no" / "such.pt2", format="torch_export")
