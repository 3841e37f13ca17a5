"""Compile Triton kernel variants ahead of time for a GPU that is not here, and read what the
compiler says about each: registers, spills, shared memory, and int32 products of strides.

    python -m speckle_kernels.testing.aot_compile OP [--arch 80 90]    one JSON line a variant

Triton compiles real GPU code only for kernels defined with TRITON_INTERPRET unset (it is read
when a kernel is decorated), so this runs in its own process (tests/test_aot_compile.py and
benchmarks/tools/triton_aot_report.py start it so). No GPU is needed: triton.compile with a
GPUTarget produces TTIR, PTX and a cubin.

- Registers and spills: ptxas -v on the kernel's PTX (the ptxas Triton ships), "Used N
  registers" and the spill stores and loads in bytes; the cubin's stack frame from cuobjdump;
  and the static count of fp64 instructions in its SASS (DADD, DMUL, DFMA, conversions).
- int32 stride products: in the TTIR, every `arith.muli` whose type is i32 and one of whose
  operands comes (through splat, broadcast, expand_dims) from a stride argument (s_o, s_i,
  s_c, s_n, s_l). Such a product overflows past 2**31 elements; a variant launched for large
  tensors (INDEX_64) must have none.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

STRIDE_ARGS = ("s_o", "s_i", "s_c", "s_n", "s_l")
_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_PASS_THROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes that ptxas -v reports for the PTX (its own .target)."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        for tool in ("ptxas-blackwell", "ptxas"):  # the newer one reads the newer PTX versions
            path = _tool(tool)
            if not os.path.exists(path):
                continue
            proc = subprocess.run([path, "-v", "--gpu-name", target, f.name, "-o", os.devnull],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                text = proc.stdout + proc.stderr
                regs = re.search(r"Used (\d+) registers", text)
                stores = re.search(r"(\d+) bytes spill stores", text)
                loads = re.search(r"(\d+) bytes spill loads", text)
                return {"regs": int(regs.group(1)) if regs else None,
                        "spill_stores": int(stores.group(1)) if stores else 0,
                        "spill_loads": int(loads.group(1)) if loads else 0}
    return {"regs": None, "spill_stores": None, "spill_loads": None}


_FP64_SASS = re.compile(r"^\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?(DADD|DMUL|DFMA|DSETP|DMNMX|F2F\.F64|F2F\.F32\.F64|I2F\.F64)",
                        re.M)


def fp64_instructions(cubin: bytes) -> int:
    """fp64 arithmetic and conversions in the machine code (static count, cuobjdump -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    return len(_FP64_SASS.findall(sass))


def cubin_stack(cubin: bytes) -> int | None:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
    stack = re.search(r"STACK:(\d+)", out)
    return int(stack.group(1)) if stack else None


def i32_stride_products(ttir: str) -> list[str]:
    """The TTIR lines that multiply a stride argument in int32 (see the module header)."""
    defs = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = (m.group(2), m.group(3))

    def from_stride(name: str) -> bool:
        for _ in range(16):  # splat(s) -> broadcast -> expand_dims: a short chain
            if name.lstrip("%") in STRIDE_ARGS:
                return True
            op = defs.get(name)
            if op is None or op[0] not in _PASS_THROUGH:
                return False
            name = re.match(r"(%[\w.]+)", op[1]).group(1)
        return False

    found = []
    for name, (op, rest) in defs.items():
        if op != "arith.muli":
            continue
        operands, _, type_ = rest.partition(" : ")
        element = re.search(r"(i\d+)>?\s*(?:loc|$)", type_.strip() + " ")
        if element is None or element.group(1) != "i32":
            continue
        if any(from_stride(o.strip()) for o in operands.split(",")):
            found.append(f"{name} = {op} {rest.split(' loc(')[0]}")
    return found


def compile_variant(kernel, signature: dict, constexprs: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"no cubin for {kernel.__name__} on sm_{arch}")
    first_pointer = next(v for v in signature.values() if v.startswith("*"))
    return {"kernel": kernel.__name__, "arch": arch, "x_dtype": first_pointer[1:],
            **ptxas_usage(compiled.asm["ptx"]), "stack": cubin_stack(compiled.asm["cubin"]),
            "fp64_sass": fp64_instructions(compiled.asm["cubin"]),
            "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "i32_stride_products": i32_stride_products(compiled.asm["ttir"]),
            "constexprs": {k: v for k, v in constexprs.items()}}


def main(argv=None) -> int:
    from speckle_kernels.testing.aot import OPS, variants

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("op", choices=OPS)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: interpreted kernels do not compile")
    for kernel, signature, constexprs in variants(args.op):
        for arch in args.arch:
            print(json.dumps(compile_variant(kernel, signature, constexprs, arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
