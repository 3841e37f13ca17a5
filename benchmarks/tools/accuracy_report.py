"""Each BatchRenorm backend's error against float64, beside the fp32 reference's, as a table.

    python -m benchmarks.tools.accuracy_report --out benchmarks/results/<device>-<date>/accuracy.md

The tests' kit (speckle_kernels/testing/batch_renorm.py) runs two training steps and one eval step per draw
and measures max |q - q64| for y, dx, dweight, dbias and the running statistics; this prints the
worst over a few draws for every backend present on the device, at the third-party layer's own
test shape (100, 10) and at Br-U-Net's (32, 64, 128, 128) (one draw there: the float64 judge is
the slow part). The tests hold every backend to 2x the reference's error + 1 ulp; this shows the
numbers behind that.
"""
from __future__ import annotations

import argparse
import math
import zlib
from pathlib import Path

import torch

from speckle_models.atomic_write import atomic_write_text
from speckle_kernels.testing import batch_renorm as kit
from speckle_kernels.testing.backends import BACKENDS, device_for, unavailable

from ..common import device_name

SHAPES = ((kit.Case((100, 10), t=0), 5), (kit.Case((32, 64, 128, 128), t=20000, train_steps=1), 1))
# Triton on CPU tensors is its interpreter: a functional check, far too slow at 33M values
INTERPRETER_LIMIT = 1 << 20


def measure(device_type: str) -> list[dict]:
    rows = []
    for case, draws in SHAPES:
        worst: dict[str, dict[str, float]] = {}
        for k in range(draws):
            backends = [b for b in BACKENDS if not unavailable(b) and device_for(b).type == device_type
                        and not (b == "triton" and device_type == "cpu" and math.prod(case.shape) > INTERPRETER_LIMIT)]
            d = kit.draw(case, zlib.crc32(repr((case.id, k)).encode()), device_type)
            truth = kit.run("reference", d, dtype=torch.float64)
            reference = kit.run("reference", d)
            for backend in backends:
                v = kit.judge(backend, d, reference=reference, truth=truth)
                row = worst.setdefault(backend, {q: 0.0 for q in kit.QUANTITIES})
                for q in kit.QUANTITIES:
                    row[q] = max(row[q], v.errors[q])
        for backend, errs in worst.items():
            rows.append({"case": case.id, "draws": draws, "backend": backend, **errs})
    return rows


def render(rows: list[dict], device: str) -> str:
    lines = [f"# BatchRenorm error against float64 ({device})", "",
             "Max |q - q64| over the draws (two training steps and one eval step each), by the tests' kit.",
             "", "| case | backend | y | dx | dweight | dbias | running_mean | running_std |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = " | ".join(f"{r[q]:.2g}" for q in kit.QUANTITIES)
        lines.append(f"| {r['case']} ({r['draws']} draws) | {r['backend']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    text = render(measure(args.device), device_name(torch.device(args.device)))
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
