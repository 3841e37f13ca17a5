"""The norm-block case kit: BatchRenorm -> activation -> dropout, judged against float64.

It extends the BatchRenorm kit (speckle_kernels/testing/batch_renorm.py: inputs, buffers, the bound
2 * error(reference) + 1 ulp) with an activation and a dropout mask. The mask is a function of
integers (seed, offset, index): every backend must reproduce it exactly, and the float64 truth
uses the same one.

The activation's kink. relu and leaky_relu switch branch at z = 0, and a backend may see an
fp32 z of the other sign than the float64 z where |z| is within rounding of 0; the gradient of
that element then differs by (1 - slope) |g|, and through the channel sums every dx of the
channel moves. So each run is judged against the float64 evaluation *on its own branches*
(z > 0 read from its output: y > 0 exactly where the branch is the positive one), and a branch
may differ from the float64 one only where |z64| <= 2 * max |z_ref - z64| + 1 ulp: within the
fp32 reference's own error of z. A wrong branch anywhere else is a failure.

The reference's error is pooled over extra draws of small cases, as in the BatchRenorm kit.

The ulp of y. y = act(w*xhat + b) * keep_scale is rounded after an addition whose terms may
be larger than the sum; so y's "1 ulp" is that of its largest term (max |w*xhat|, |b|, times
the keep scale), not of |y| alone. With a handful of elements a channel (N*H*W = 1) the
reference's own error is a sample of six and can be far below its typical size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from speckle_kernels import batch_renorm_act
from speckle_kernels.reference import batch_renorm_reference, dropout_keep_mask
from speckle_kernels.schedules import DMAX_SCHEDULE, RMAX_SCHEDULE

from speckle_kernels.testing import batch_renorm as kit

QUANTITIES = kit.QUANTITIES
SEED = 2 ** 33 + 12345  # above 2**32: both key words matter


@dataclass(frozen=True)
class BlockCase:
    base: kit.Case
    activation: str = "leaky_relu"
    negative_slope: float = 0.1
    dropout: float = 0.05
    offset: int = 3          # not a multiple of 4: calls start inside a Philox call's words

    @property
    def id(self) -> str:
        return f"{self.base.id}-{self.activation}-p{self.dropout:g}"

    @property
    def slope(self) -> float:
        return {"identity": 1.0, "relu": 0.0, "leaky_relu": self.negative_slope}[self.activation]


def _cases() -> list[BlockCase]:
    # every BatchRenorm case once, activations and dropout rates in turn (with p = 0.3 many
    # elements drop, so a wrong mask cannot hide; with p = 0 the block is norm + activation)
    activations, rates = ("leaky_relu", "relu", "identity"), (0.3, 0.05, 0.0, 0.3)
    out = [BlockCase(base, activation=activations[i % 3], dropout=rates[i % 4])
           for i, base in enumerate(kit.CASES)]
    out.append(BlockCase(kit.Case((3, 5, 7, 9)), dropout=0.0))
    return out


CASES = _cases()
HEADLINE = BlockCase(kit.HEADLINE, dropout=0.05)


def draw(case: BlockCase, seed: int, device="cpu") -> kit.Draw:
    return kit.draw(case.base, seed, device)


def _offsets(case: BlockCase, d: kit.Draw) -> list[int]:
    """The mask offset of each step, as a module advances it (training steps only)."""
    out, offset = [], case.offset
    for x, training in zip(d.xs, d.training):
        out.append(offset)
        offset += x.numel() if training else 0
    return out


def run(backend: str, case: BlockCase, d: kit.Draw) -> dict:
    """Every step of the draw through batch_renorm_act on `backend` (fp32 buffers)."""
    state = d.state.to(torch.float32)
    out = {q: [] for q in QUANTITIES}
    for x, dy, training, offset in zip(d.xs, d.dys, d.training, _offsets(case, d)):
        x = x.detach().clone().requires_grad_()
        params = [p.requires_grad_() if p is not None else None for p in (state.weight, state.bias)]
        rng = torch.tensor([SEED, offset], dtype=torch.int64, device=x.device)
        y = batch_renorm_act(x, *state.buffers(), *params, training=training, momentum=d.case.momentum,
                             eps=d.case.eps, r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE,
                             activation=case.activation, negative_slope=case.negative_slope,
                             dropout=case.dropout, rng=rng, backend=backend)
        kit.record_step(out, y, torch.autograd.grad(y, [x] + [p for p in params if p is not None], dy), params)
    return kit.finish_run(out, state, d)


def truth(case: BlockCase, d: kit.Draw, positive: list[torch.Tensor] | None = None) -> dict:
    """The float64 evaluation; `positive` gives each step's branches (default: z64 > 0).
    Also returns each step's z64 under "z"."""
    state = d.state.to(torch.float64)
    out = {q: [] for q in QUANTITIES}
    out["z"] = []
    for k, (x, dy, training, offset) in enumerate(zip(d.xs, d.dys, d.training, _offsets(case, d))):
        x = x.double().detach().clone().requires_grad_()
        params = [p.requires_grad_() if p is not None else None for p in (state.weight, state.bias)]
        before = state.to(torch.float64)
        z = batch_renorm_reference(x, *state.buffers(), *params, training=training, momentum=d.case.momentum,
                                   eps=d.case.eps, r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE)
        branch = (z > 0) if positive is None else positive[k].to(z.device)
        a = torch.where(branch, z, z * case.slope)
        if training and case.dropout > 0:
            keep = dropout_keep_mask(tuple(x.shape), case.dropout, seed=SEED, offset=offset, device=x.device)
            a = torch.where(keep, a / (1.0 - case.dropout), torch.zeros_like(a))
        *grads, g = torch.autograd.grad(a, [x] + [p for p in params if p is not None] + [z], dy.double())
        for q, term in kit.gradient_terms(x.detach(), g, before, training, d.case.eps).items():
            out.setdefault(f"{q}_terms", []).append(term)
        if training:
            out.setdefault("mean_terms", []).append(d.case.momentum * x.detach().abs().max().item())
        out["z"].append(z.detach())
        terms = (z - (params[1].view(kit_view(z)) if params[1] is not None else 0)).abs().max()
        if params[1] is not None:
            terms = torch.maximum(terms, params[1].abs().max())
        scale = 1 / (1 - case.dropout) if training and case.dropout > 0 else 1.0
        out.setdefault("y_terms", []).append(terms.item() * scale)
        kit.record_step(out, a, grads, params)
    return kit.finish_run(out, state, d)


def kit_view(z: torch.Tensor) -> list[int]:
    return [1, z.shape[1]] + [1] * (z.dim() - 2)


def _branches(result: dict) -> list[torch.Tensor]:
    return [y > 0 for y in result["y"]]


def _reference_z(case: BlockCase, d: kit.Draw) -> list[torch.Tensor]:
    """The fp32 reference's pre-activation of each step."""
    plain = BlockCase(case.base, activation="identity", dropout=0.0, offset=case.offset)
    return run("reference", plain, d)["y"]


def branch_failures(case: BlockCase, d: kit.Draw, result: dict, natural: dict) -> list[str]:
    """A run's branches differ from float64's only where |z64| is within the reference's
    error of z (dropped elements have no branch)."""
    if case.activation == "identity":
        return []
    z_ref = _reference_z(case, d)
    slack = 2 * max((a.double() - b).abs().max().item() for a, b in zip(z_ref, natural["z"]))
    slack += kit._ulp(max(z.abs().max().item() for z in natural["z"]), torch.float32)
    failures = []
    for k, (y, z64) in enumerate(zip(result["y"], natural["z"])):
        dropped = y == 0
        differ = ((y > 0) != (z64 > 0)) & ~dropped
        worst = z64[differ].abs().max().item() if differ.any() else 0.0
        if worst > slack:
            failures.append(f"step {k}: activation branch differs from float64 at |z| = {worst:.3g} "
                            f"> {slack:.3g}")
    return failures


def _reference_errors(case: BlockCase, d: kit.Draw) -> dict:
    reference = run("reference", case, d)
    branches = _branches(reference) if case.activation != "identity" else None
    return kit.errors(reference, truth(case, d, branches))


def judge(backend: str, case: BlockCase, d: kit.Draw) -> kit.Verdict:
    natural = truth(case, d)
    reference = run("reference", case, d)
    result = run(backend, case, d)
    ref_truth = truth(case, d, _branches(reference)) if case.activation != "identity" else natural
    own_truth = truth(case, d, _branches(result)) if case.activation != "identity" else natural
    err = kit.errors(result, own_truth)
    ref_err = kit.pooled_max(kit.errors(reference, ref_truth),
                             (_reference_errors(case, e) for e in kit.extra_draws(d)))
    # own_truth's "y_terms" make the bound take y's ulp from its largest term (kit.bounds)
    return kit.verdict(backend, d, result, own_truth, err, ref_err, branch_failures(case, d, result, natural))


def backend_mask(backend: str, shape, p: float, *, seed: int, offset: int, device="cpu",
                 channels_last: bool = False) -> torch.Tensor:
    """The keep mask a backend applies in a training step, read from its output: identity
    activation and bias 10 on standardized data, so no kept value is 0."""
    c = shape[1]
    g = torch.Generator(device=device).manual_seed(seed % 1000)
    x = torch.rand(shape, generator=g, device=device) + 1.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    rm, rs = torch.zeros(c, device=device), torch.ones(c, device=device)
    nbt = torch.tensor(0, device=device)
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    y = batch_renorm_act(x, rm, rs, nbt, torch.ones(c, device=device), torch.full((c,), 10.0, device=device),
                         activation="identity", dropout=p, rng=rng, backend=backend)
    return y != 0


__all__ = ["BlockCase", "CASES", "HEADLINE", "draw", "run", "truth", "judge", "backend_mask"]
