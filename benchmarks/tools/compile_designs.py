"""The norm block under torch.compile: design (a) against design (b), in one process.

    python -m benchmarks.tools.compile_designs [--out DIR] [--batch 8] [--image 64] [--reps 5]

(a) the element pass stays inside the fused forward op (opaque to Inductor);
(b) only the statistics are an op (batch_renorm_stats) and the element pass is torch code,
    which Inductor may fuse with what surrounds it (pool, concat, the next dropout).
The Br-U-Net blocks have no dropout (the paper's dropout sits before each convolution); the
block alone is timed with dropout 0.05, where (b) must draw the mask in torch integer ops.
Both use the same fused backward op. Timed: a compiled Br-U-Net training step (forward, MSE,
backward, Adamax) and a compiled block alone (forward+backward at (N, 64, H, W)); the rows
are ratios to design (a) measured in the same run, and a compiled D-U-Net step (nn.BatchNorm2d,
Inductor's own fusion) is the yardstick of both; written atomically as markdown and JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from speckle_kernels import FusedBatchRenormAct2d, batch_renorm_act_ext
from speckle_models.atomic_write import atomic_write_text

from ..train_step_cases import train_batch


_ORIGINAL = batch_renorm_act_ext.batch_renorm_act
_DESIGNS = {"a": functools.partial(_ORIGINAL, decomposed=False), "b": functools.partial(_ORIGINAL, decomposed=True)}


def _time(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _unet_step(batch: int, image: int, name: str = "br-unet"):
    from speckle_models import br_unet, d_unet

    torch.manual_seed(0)
    model = br_unet(norm="fused", norm_backend="cpu") if name == "br-unet" else d_unet()
    opt = torch.optim.Adamax(model.parameters(), lr=1e-4)
    compiled = torch.compile(model, fullgraph=True)
    noisy, clean = train_batch(batch, image, "cpu")

    def step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(compiled(noisy), clean).backward()
        opt.step()
    return step


def _block_step(batch: int, image: int):
    torch.manual_seed(0)
    block = FusedBatchRenormAct2d(64, dropout=0.05, backend="cpu")
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(batch, 64, image, image, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        compiled(x).backward(dy)
        x.grad = None
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    for name, make in (("Br-U-Net train step", _unet_step), ("block fwd+bwd", _block_step)):
        times = {}
        for design in ("a", "b"):
            torch._dynamo.reset()
            with mock.patch.object(batch_renorm_act_ext, "batch_renorm_act", _DESIGNS[design]):
                times[design] = _time(make(args.batch, args.image), args.reps)
        rows.append({"case": name, "batch": args.batch, "image": args.image, "a_s": times["a"],
                     "b_s": times["b"], "b_over_a": times["b"] / times["a"]})
        print(f"{name}: (a) {times['a'] * 1e3:.1f} ms, (b) {times['b'] * 1e3:.1f} ms, b/a {times['b'] / times['a']:.3f}")
    torch._dynamo.reset()
    d_unet_s = _time(_unet_step(args.batch, args.image, "d-unet"), args.reps)
    step = rows[0]
    step.update(d_unet_s=d_unet_s, a_over_d_unet=step["a_s"] / d_unet_s, b_over_d_unet=step["b_s"] / d_unet_s)
    print(f"compiled D-U-Net train step: {d_unet_s * 1e3:.1f} ms; Br-U-Net / D-U-Net: (a) "
          f"{step['a_over_d_unet']:.3f}, (b) {step['b_over_d_unet']:.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "compile_designs.json", json.dumps(rows, indent=2) + "\n", overwrite=True)
        lines = ["| case | (a) fused op, ms | (b) stats op + Inductor pointwise, ms | (b)/(a) |", "|---|---|---|---|"]
        lines += [f"| {r['case']} ({r['batch']}x..x{r['image']}x{r['image']}) | {r['a_s'] * 1e3:.1f} | "
                  f"{r['b_s'] * 1e3:.1f} | {r['b_over_a']:.3f} |" for r in rows]
        lines += ["", f"Compiled D-U-Net (nn.BatchNorm2d) train step in the same run: {d_unet_s * 1e3:.1f} ms; "
                  f"compiled Br-U-Net / D-U-Net: (a) {step['a_over_d_unet']:.3f}, (b) {step['b_over_d_unet']:.3f}.",
                  f"Device: {torch.get_num_threads()} threads; torch {torch.__version__}; min of {args.reps} calls."]
        atomic_write_text(args.out / "compile_designs.md", "\n".join(lines) + "\n", overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
