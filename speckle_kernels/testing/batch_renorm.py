"""The BatchRenorm case kit: inputs, buffers, steps, the float64 judge and the error bound.

Every backend's tests (tests/test_batch_renorm.py), the benchmarks' setup checks
(benchmarks/batch_renorm_cases.py) and the GPU check (benchmarks/tools/gpu_check.py) use this, so no
backend can drift under tolerances of its own.

The judge. A run is a few training steps (fresh x and dy each step) and one eval step, from the
same buffers and parameters. The same function evaluated in float64 (the reference formula on
float64 copies of every input: x, dy, buffers, weight, bias) is the truth. For each quantity q
in (y, dx, dweight, dbias, running_mean, running_std) a backend's error is max |q - q64| over
the steps, and it passes when

    error(backend) <= 2 * error(reference in the same dtype) + ulp(max |q64|)

(flash-attention's rule for low precision, with one unit in the last place of the quantity's
magnitude in its storage dtype so that an exact reference does not demand exactness). y and dx
are stored in the input's dtype; dweight, dbias and the running statistics in fp32. The
reference in fp16/bf16 computes in fp32 and rounds once, as the kernels do, so its own error
sets the bound there too. num_batches_tracked must advance exactly.

The ulp of a computed quantity is that of its largest rounded term, not of its value alone.
dx's: in training dx = A*(dy - mean dy) + B*(x - mean) (A = w*r/sigma) is a difference of
terms that nearly cancel where a channel holds few values (two values: z = +-1), so dx can be
far smaller than what any fp32 evaluation rounds on the way; its "1 ulp" is that of its largest
term, max |A*(dy - mean dy)|, which the float64 run records. With a handful of values a channel
the reference's own error is a sample of a few numbers and may be far below its typical size.
Likewise the running mean moves by momentum * (a mean of values up to max |x|): its ulp is that
of momentum * max |x| when that exceeds |running_mean|; dbias and dweight are sums, whose
terms are S(|dy|) and S(|dy * xhat|). So the reference's error of a case is pooled over as many extra draws of the case as give each
channel at least POOL_VALUES values (at most POOL_MAX_DRAWS): the bound compares a backend with
the reference's error on that case, not with one lucky draw of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from speckle_kernels import batch_renorm
from speckle_kernels.schedules import DMAX_SCHEDULE, RMAX_SCHEDULE, renorm_correction

MOMENTUM, EPS = 0.01, 1e-3
POOL_VALUES, POOL_MAX_DRAWS = 256, 16
QUANTITIES = ("y", "dx", "dweight", "dbias", "running_mean", "running_std")
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    """One input family: shape, dtype and layout of x, its distribution, the step counter t."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    mean: float = 0.0          # 0: per-channel random means and spreads; else mean + std*randn
    std: float = 1.0
    t: int = 20000
    affine: bool = True
    train_steps: int = 2       # then one eval step
    momentum: float = MOMENTUM
    eps: float = EPS

    @property
    def id(self) -> str:
        dims = "x".join(map(str, self.shape))
        parts = [dims, DTYPE_NAMES[self.dtype], "cl" if self.channels_last else "contig", f"t{self.t}"]
        if self.mean:
            parts.append(f"mean{self.mean:g}-std{self.std:g}")
        if not self.affine:
            parts.append("plain")
        return "-".join(parts)


def _cases() -> list[Case]:
    cases = [
        Case((1, 6, 1, 1), t=20000),                 # N*H*W = 1: zero variance, dx exactly 0
        Case((2, 5, 1, 1), t=60000),                 # N*H*W = 2
        Case((1, 4, 3), t=0),                        # N*L = 3, 1d
        Case((3, 5, 7, 9), t=60000),                 # odd sizes
        Case((3, 5, 7, 9), channels_last=True, t=0),
        Case((5, 1, 7, 3), t=20000),                 # C = 1
        Case((100, 10), t=0),                        # the third-party layer's own test shape
        Case((2, 3, 4, 5, 3), channels_last=True, t=20000),   # 3d, channels_last_3d
        Case((3, 70, 2, 3), channels_last=True, t=60000),     # more channels than a block
        Case((4, 3, 5, 7), affine=False, t=20000),
        Case((8, 3, 6, 6), mean=1e4, std=1e-2, t=0),           # mean dwarfs spread
        Case((8, 3, 6, 6), mean=1e4, std=1e-2, channels_last=True, t=60000),
        Case((2, 3, 150, 61), t=20000),              # planes longer than one CPU chunk
    ]
    for dtype in (torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            cases.append(Case((4, 3, 5, 7), dtype=dtype, channels_last=channels_last, t=20000))
        # at 1e4 a half-precision value has no room for a 1e-2 spread: constant channels
        cases.append(Case((4, 3, 5, 7), dtype=dtype, mean=1e4, std=1e-2, t=60000))
    return cases


CASES = _cases()
# Br-U-Net's headline shape: at least one run in CI on the CPU backend.
HEADLINE = Case((32, 64, 128, 128), t=20000, train_steps=1)


# ----------------------------------------------------------------------------- inputs

def make_x(case: Case, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """x of the case: drawn in float64, rounded once to the case's dtype, in its layout."""
    shape, c = case.shape, case.shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    z = torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    if case.mean:
        x = case.mean + case.std * z
    else:  # per-channel spreads in [1.5, 4.5) and means ~ N(0, 1)
        spread = 3 * torch.rand(view, generator=generator, dtype=torch.float64, device=device) + 1.5
        x = z * spread + torch.randn(view, generator=generator, dtype=torch.float64, device=device)
    x = x.to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


@dataclass
class State:
    """Buffers and affine parameters of one layer, fp32 as the modules keep them."""

    running_mean: torch.Tensor
    running_std: torch.Tensor
    num_batches_tracked: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def to(self, dtype: torch.dtype) -> "State":
        """A copy with the float tensors in dtype (num_batches_tracked stays int64)."""
        cast = (lambda t: None if t is None else t.detach().to(dtype, copy=True))
        return State(cast(self.running_mean), cast(self.running_std), self.num_batches_tracked.clone(),
                     cast(self.weight), cast(self.bias))

    def buffers(self):
        return self.running_mean, self.running_std, self.num_batches_tracked


def make_state(case: Case, generator: torch.Generator, device="cpu") -> State:
    """Running statistics that make r and d clip for some channels once t lets them move."""
    c = case.shape[1]
    rand = dict(generator=generator, device=device)
    rm = torch.randn(c, **rand) * 0.7
    rs = torch.rand(c, **rand) * 2 + 0.3
    w = torch.randn(c, **rand) if case.affine else None
    b = torch.randn(c, **rand) if case.affine else None
    return State(rm, rs, torch.tensor(case.t, dtype=torch.long, device=device), w, b)


@dataclass
class Draw:
    """One draw of a case: the inputs of every step and the starting state."""

    case: Case
    xs: list[torch.Tensor]
    dys: list[torch.Tensor]
    state: State
    training: list[bool] = field(default_factory=list)


def draw(case: Case, seed: int, device="cpu") -> Draw:
    g = torch.Generator(device=device).manual_seed(seed)
    steps = case.train_steps + 1
    xs = [make_x(case, g, device) for _ in range(steps)]
    dys = [torch.randn(case.shape, generator=g, device=device).to(case.dtype) for _ in range(steps)]
    return Draw(case, xs, dys, make_state(case, g, device), [True] * case.train_steps + [False])


# ----------------------------------------------------------------------------- runs

def run(backend: str, d: Draw, *, dtype: torch.dtype | None = None) -> dict:
    """Every step of the draw on `backend`; returns each quantity's list over the steps (and the
    final buffers). dtype=torch.float64 evaluates the case in float64 (the judge)."""
    state = d.state.to(torch.float32 if dtype is None else dtype)
    out = {q: [] for q in QUANTITIES}
    for x, dy, training in zip(d.xs, d.dys, d.training):
        if dtype is not None:
            x, dy = x.to(dtype), dy.to(dtype)
        x = x.detach().clone().requires_grad_()
        params = [p.requires_grad_() if p is not None else None for p in (state.weight, state.bias)]
        if dtype == torch.float64:
            for q, term in gradient_terms(x, dy, state, training, d.case.eps).items():
                out.setdefault(f"{q}_terms", []).append(term)
            if training:  # the batch mean sums values of up to max |x|
                out.setdefault("mean_terms", []).append(d.case.momentum * x.abs().max().item())
        y = batch_renorm(x, *state.buffers(), *params, training=training, momentum=d.case.momentum,
                         eps=d.case.eps, r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE, backend=backend)
        record_step(out, y, torch.autograd.grad(y, [x] + [p for p in params if p is not None], dy), params)
    return finish_run(out, state, d)


def record_step(out: dict, y: torch.Tensor, grads, params) -> None:
    """Appends a step's y and gradients (x first, then weight and bias when present) to `out`
    and takes the parameters out of autograd again."""
    out["y"].append(y.detach())
    out["dx"].append(grads[0])
    if params[0] is not None:
        out["dweight"].append(grads[1])
        out["dbias"].append(grads[2])
    for p in params:
        if p is not None:
            p.requires_grad_(False)


def finish_run(out: dict, state: State, d: Draw) -> dict:
    """The final buffers and the layout check of a run."""
    out["running_mean"] = [state.running_mean.clone()]
    out["running_std"] = [state.running_std.clone()]
    out["num_batches_tracked"] = int(state.num_batches_tracked)
    out["layout_ok"] = all(y.stride() == x.stride() for y, x in zip(out["y"], d.xs))
    return out


@torch.no_grad()
def gradient_terms(x: torch.Tensor, g: torch.Tensor, state: State, training: bool, eps: float) -> dict:
    """The largest term each gradient rounds, for a step (g: the gradient reaching the
    normalized output): dx = A*(g - mean g) + B*(x - mean) with A = w*r/sigma, its term
    max |A*(g - mean g)| (eval: dx = w/rs*g); dbias = S(g), its term max_c S(|g|); dweight =
    S(g*xhat), its term max_c S(|g*xhat|)."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    w = state.weight.view(shape).abs() if state.weight is not None else 1.0
    rm, rs = state.running_mean.view(shape), state.running_std.view(shape)
    if training:
        mean = x.mean(dims, keepdim=True)
        std = (x - mean).square().mean(dims, keepdim=True).sqrt() + eps
        r, d = renorm_correction(mean, std, rm, rs, state.num_batches_tracked, RMAX_SCHEDULE, DMAX_SCHEDULE)
        xhat = (x - mean) / std * r + d
        dx = (w * r / std * (g - g.mean(dims, keepdim=True))).abs().max().item()
    else:
        xhat = (x - rm) / rs
        dx = (w * g / rs).abs().max().item()
    return {"dx": dx, "dbias": g.abs().sum(dims).max().item(),
            "dweight": (g * xhat).abs().sum(dims).max().item()}


def _ulp(magnitude: float, dtype: torch.dtype) -> float:
    if magnitude == 0.0 or not math.isfinite(magnitude):
        return 0.0
    return 2.0 ** (math.floor(math.log2(magnitude)) - MANTISSA_BITS[dtype])


def errors(result: dict, truth: dict) -> dict:
    """max |q - q64| over the steps, per quantity."""
    err = {}
    for q in QUANTITIES:
        pairs = list(zip(result[q], truth[q]))
        err[q] = max(((a.double() - b).abs().max().item() for a, b in pairs), default=0.0)
    return err


def bounds(reference_errors: dict, truth: dict, dtype: torch.dtype) -> dict:
    """2 * the reference's error + one ulp of the quantity's magnitude in its storage dtype."""
    out = {}
    for q in QUANTITIES:
        magnitude = max((t.abs().max().item() for t in truth[q]), default=0.0)
        terms = truth.get("mean_terms" if q == "running_mean" else f"{q}_terms")
        if terms:
            magnitude = max(magnitude, max(terms))
        storage = dtype if q in ("y", "dx") else torch.float32
        out[q] = 2 * reference_errors[q] + _ulp(magnitude, storage)
    return out


@dataclass
class Verdict:
    case: Case
    backend: str
    errors: dict
    reference_errors: dict
    bounds: dict
    failures: list[str]

    def report(self) -> str:
        rows = [f"{q}: {self.errors[q]:.3g} (reference {self.reference_errors[q]:.3g}, bound {self.bounds[q]:.3g})"
                for q in QUANTITIES]
        return f"{self.backend} on {self.case.id}:\n  " + "\n  ".join(rows)


def extra_draws(d: Draw) -> list[Draw]:
    """Further draws of d's case, enough for POOL_VALUES values a channel (none for big cases)."""
    shape = d.case.shape
    per_channel = max(1, math.prod(shape) // shape[1])
    count = min(POOL_MAX_DRAWS, -(-POOL_VALUES // per_channel)) - 1
    device = d.xs[0].device
    return [draw(d.case, 104729 * (k + 1), device) for k in range(count)]


def pooled_max(first: dict, more) -> dict:
    """Quantity-wise max of error dicts."""
    out = dict(first)
    for e in more:
        out = {q: max(out[q], e[q]) for q in QUANTITIES}
    return out


def judge(backend: str, d: Draw, *, reference: dict | None = None, truth: dict | None = None) -> Verdict:
    """The backend's run of the draw against the float64 truth and the bound; `reference` and
    `truth` may be passed in when several backends share them."""
    truth = truth if truth is not None else run("reference", d, dtype=torch.float64)
    reference = reference if reference is not None else run("reference", d)
    result = run(backend, d)
    err = errors(result, truth)
    ref_err = pooled_max(errors(reference, truth), (errors(run("reference", e), run("reference", e, dtype=torch.float64))
                                                    for e in extra_draws(d)))
    return verdict(backend, d, result, truth, err, ref_err)


def verdict(backend: str, d: Draw, result: dict, truth: dict, err: dict, ref_err: dict,
            extra_failures: list[str] = ()) -> Verdict:
    """The bound of every quantity, and every way the run fails: an error above its bound,
    num_batches_tracked, the output's layout and dtype."""
    bound = bounds(ref_err, truth, d.case.dtype)
    failures = [f"{q} error {err[q]:.3g} > bound {bound[q]:.3g} (reference {ref_err[q]:.3g})"
                for q in QUANTITIES if not err[q] <= bound[q]]
    failures += list(extra_failures)
    if result["num_batches_tracked"] != truth["num_batches_tracked"]:
        failures.append(f"num_batches_tracked {result['num_batches_tracked']} != {truth['num_batches_tracked']}")
    if not result["layout_ok"]:
        failures.append("the output does not keep the input's memory layout")
    if any(y.dtype != d.case.dtype for y in result["y"]):
        failures.append("the output dtype differs from the input's")
    return Verdict(d.case, backend, err, ref_err, bound, failures)


def draw_from(x: torch.Tensor, dy: torch.Tensor, state: State, *, training: bool = True,
              momentum: float = MOMENTUM, eps: float = EPS) -> Draw:
    """A one-step draw of given tensors (the benchmarks check their own inputs this way)."""
    case = Case(tuple(x.shape), dtype=x.dtype, channels_last=not x.is_contiguous(),
                t=int(state.num_batches_tracked), affine=state.weight is not None,
                train_steps=int(training), momentum=momentum, eps=eps)
    return Draw(case, [x], [dy], state, [training])
