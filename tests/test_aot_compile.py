"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU, and no variant
launched for large tensors multiplies a stride in int32.

The interpreter accepts code the compiler refuses (and the reverse), so CI compiles every
specialization the launchers can make (speckle_kernels/testing/aot.py) in a subprocess without
TRITON_INTERPRET (speckle_kernels/testing/aot_compile.py). Register use and spills are printed
for the record (benchmarks/tools/triton_aot_report.py writes them as a table); a spill in a
streaming kernel is a performance bug worth a look, not a failure. An int32 product of an index
and a stride is one: past 2**31 elements it wraps, so the INDEX_64 variants (and the finalize
kernels, which read each channel's first element) must form every such product in int64. The
check reads the TTIR, so it catches the product wherever a kernel forms it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def compile_op(op: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "speckle_kernels.testing.aot_compile", op],
                          capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, f"AOT compile of {op} failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(rows: list[dict], kernels: set) -> None:
    assert {r["kernel"] for r in rows} == kernels
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["regs"] is not None and r["regs"] <= 255, r
        if r["constexprs"].get("INDEX_64", True):  # the finalize kernels have no 32-bit variant
            assert r["i32_stride_products"] == [], r
        print({k: r[k] for k in ("kernel", "arch", "regs", "spill_stores", "stack", "constexprs")})


def test_batch_renorm_kernels_compile_for_sm80_and_sm90():
    _check(compile_op("batch_renorm"), {"channel_sums_kernel", "per_channel_affine_kernel",
                                        "forward_finalize_kernel", "backward_finalize_kernel"})


def test_batch_renorm_act_kernels_compile_for_sm80_and_sm90():
    _check(compile_op("batch_renorm_act"), {"batch_renorm_act_kernel"})


def test_noise_kernels_compile_for_sm80_and_sm90():
    from speckle_kernels.testing.aot import variants

    rows = compile_op("noise")
    assert len(rows) == 2 * len(variants("noise"))  # one cubin per variant and architecture
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["kernel"] == "speckle_kernel"
        # no local-memory spills: Philox's state lives in registers
        assert r["stack"] in (0, None) and r["spill_stores"] in (0, None), r
