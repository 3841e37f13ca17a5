"""Ahead-of-time compilation of the speckle-noise kernel for sm_80 and sm_90, without a GPU.

Triton compiles real GPU code only when TRITON_INTERPRET is unset (it is read when kernels are
decorated), so tests/aot_compile.py runs in a subprocess with the variable removed. It compiles
every variant listed by speckle_kernels.testing.aot.variants("noise") (float inputs of add_speckle_noise,
uint8 -> fp32/bf16 of make_noisy_batch, both distributions) for both architectures.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_aot_compile_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, os.path.join("tests", "aot_compile.py"),
                          "noise"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    sys.path.insert(0, root)
    from speckle_kernels.testing.aot import variants
    assert len(rows) == 2 * len(variants("noise"))   # one cubin per variant and architecture
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["kernel"] == "speckle_kernel"
        # no local-memory spills: Philox's state lives in registers
        assert r["stack"] in (0, None), r
