"""Ahead-of-time compile of Triton kernels for sm_80/sm_90 without a GPU.

Triton only compiles kernels defined outside its interpreter, so the tests run this file in a
subprocess with TRITON_INTERPRET removed: `python tests/aot_compile.py OP` compiles every
variant that speckle_kernels.testing.aot.variants(OP) lists and prints one JSON line per variant
with the registers, spills and shared memory that ptxas reports. A failure exits non-zero.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile


def _resource_usage(cubin: bytes) -> dict:
    """Registers and spill stores read from the cubin with cuobjdump (shipped with Triton)."""
    import os
    import re

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None}


def main(op: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from speckle_kernels.testing.aot import variants

    for kernel, signature, constexprs in variants(op):
        for arch in (80, 90):
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            assert compiled.asm.get("cubin"), f"no cubin for {kernel.__name__} on sm_{arch}"
            usage = _resource_usage(compiled.asm["cubin"])
            print(json.dumps({"kernel": kernel.__name__, "arch": arch, **usage,
                              "shared": compiled.metadata.shared,
                              "constexprs": {k: str(v) for k, v in constexprs.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
