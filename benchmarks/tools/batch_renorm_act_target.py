"""The norm block's CPU target, measured in one process:

    python -m benchmarks.tools.batch_renorm_act_target --out benchmarks/results/<cpu>-<date>

Forward+backward (training, LeakyReLU(0.1), dropout 0.05) at (32, 64, 128, 128) fp32 contiguous
on the CPU: FusedBatchRenormAct2d(backend="cpu") against nn.BatchNorm2d -> LeakyReLU -> Dropout
eager and under torch.compile; each the minimum of --reps calls after warm-up. Targets: the
block at <= 0.3x eager and <= 0.5x compiled. Where speckle_kernels/batch_renorm_act_ext.py has
the block's two compile designs (its batch_renorm_act(..., decomposed=)), each is a row too:
torch.compile(block, fullgraph=True) with (a) the fused forward op, (b) the statistics op and the
element pass as torch ops (benchmarks/tools/compile_designs.py compares them inside a U-Net step).
The block is first checked with the block kit (batch_renorm_act_cases.check_block).

Writes batch_renorm_act_target.md and .json in --out (atomically). Exit status: 0 when measured (met
or not: the report says), 2 when the block's CPU kernel is missing here.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from speckle_models.atomic_write import atomic_write_text

from ..batch_renorm_cases import renorm_input
from ..common import Unavailable, compile_fresh, device_name, time_calls
from ..batch_renorm_act_cases import block_impl, check_block, forward_backward

TARGETS = {"bn2d-act-drop-eager": 0.3, "bn2d-act-drop-compiled": 0.5}  # block time / baseline time


def designs() -> dict:
    """{row name: decomposed flag} of the block's compile designs; empty where this branch's
    batch_renorm_act_ext has no `decomposed` option."""
    from speckle_kernels import batch_renorm_act_ext

    if "decomposed" not in inspect.signature(batch_renorm_act_ext.batch_renorm_act).parameters:
        return {}
    return {"block-cpu-compiled(a: fused op)": False, "block-cpu-compiled(b: stats op + pointwise)": True}


def _compiled_block(impl: str, decomposed: bool, x, dy, reps: int, warmup: int, check: bool) -> dict:
    """A compile design of the block, timed with the ext's `decomposed` pinned for the whole run."""
    from speckle_kernels import batch_renorm_act_ext

    with mock.patch.object(batch_renorm_act_ext, "batch_renorm_act",
                           functools.partial(batch_renorm_act_ext.batch_renorm_act, decomposed=decomposed)):
        row = measure("block-cpu", x, dy, reps, warmup, check, fullgraph=True)
    return {**row, "impl": impl}


def measure(impl: str, x, dy, reps: int, warmup: int, check: bool, fullgraph: bool = False) -> dict:
    device = x.device
    row = {"impl": impl}
    try:
        module = block_impl(impl, x.shape[1], device, x.dtype)
    except Unavailable as e:
        return {**row, "skipped": str(e)}
    if fullgraph:  # a graph break would raise, not fall back to eager
        module = compile_fresh(module, fullgraph=True)
    if check:
        row["check"] = check_block(impl, module, x.detach(), dy, device)
    times = time_calls(lambda: forward_backward(module, x, dy), device, reps, warmup)
    return {**row, "min_s": min(times), "times_s": times}


def markdown(report: dict) -> str:
    lines = [f"# Norm block CPU target: {report['device']}", "",
             f"Forward+backward at {'x'.join(map(str, report['shape']))} fp32 contiguous, training, "
             f"LeakyReLU(0.1), dropout 0.05; min of {report['reps']} calls after {report['warmup']} "
             f"warm-up; torch {report['torch']}; {report['date']}.", "",
             "| implementation | min | check |", "|---|---:|---|"]
    for r in report["rows"]:
        time_ = f"{r['min_s'] * 1e3:.1f} ms" if "min_s" in r else "–"
        lines.append(f"| {r['impl']} | {time_} | {r.get('check') or r.get('skipped', '')} |")
    lines += ["", "| block | against | ratio | target | met |", "|---|---|---:|---:|---|"]
    for t in report["ratios"]:
        ratio = f"{t['ratio']:.3f}x" if t["ratio"] is not None else "–"
        lines.append(f"| {t['block']} | {t['against']} | {ratio} | <= {t['target']}x | {t['met']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The norm block's CPU target: block vs BN2d+LeakyReLU+Dropout.")
    p.add_argument("--out", type=Path, required=True, help="folder for batch_renorm_act_target.md/.json")
    p.add_argument("--shape", default="32,64,128,128", help="N,C,H,W (default: the target's)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per row (at least 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-check", action="store_true", help="skip the block kit check")
    args = p.parse_args(argv)
    if args.reps < 5:
        p.error("--reps must be at least 5")
    device = torch.device("cpu")
    shape = tuple(int(v) for v in args.shape.split(","))
    x = renorm_input(shape, torch.float32, False, device).requires_grad_()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    rows = []
    impls = ["block-cpu", "bn2d-act-drop-eager", "bn2d-act-drop-compiled"]
    for impl in impls:
        rows.append(measure(impl, x, dy, args.reps, args.warmup, not args.no_check))
        print(rows[-1]["impl"], f"{rows[-1]['min_s'] * 1e3:.1f} ms" if "min_s" in rows[-1]
              else rows[-1]["skipped"], flush=True)
    for impl, decomposed in designs().items():
        rows.append(_compiled_block(impl, decomposed, x, dy, args.reps, args.warmup, not args.no_check))
        print(impl, f"{rows[-1]['min_s'] * 1e3:.1f} ms" if "min_s" in rows[-1] else rows[-1]["skipped"])
    by_name = {r["impl"]: r for r in rows}
    ratios = []
    for block in [r["impl"] for r in rows if r["impl"].startswith("block-")]:
        for against, target in TARGETS.items():
            b, a = by_name[block], by_name[against]
            ratio = b["min_s"] / a["min_s"] if "min_s" in b and "min_s" in a else None
            ratios.append({"block": block, "against": against, "ratio": ratio, "target": target,
                           "met": "–" if ratio is None else ("yes" if ratio <= target else "no")})
            print(f"{block} / {against}: " + (f"{ratio:.3f}x" if ratio is not None else "not measured")
                  + f" (target <= {target}x)")
    report = {"device": device_name(device), "torch": torch.__version__, "shape": list(shape),
              "reps": args.reps, "warmup": args.warmup, "date": time.strftime("%Y-%m-%d %H:%M"),
              "rows": rows, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "batch_renorm_act_target.json", json.dumps(report, indent=1))
    atomic_write_text(args.out / "batch_renorm_act_target.md", markdown(report))
    print(f"wrote {args.out / 'batch_renorm_act_target.md'}")
    return 2 if "skipped" in by_name["block-cpu"] else 0


if __name__ == "__main__":
    sys.exit(main())
