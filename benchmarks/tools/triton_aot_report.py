"""After a Triton kernel change: registers, spills and int32 stride products of every kernel
variant, compiled ahead of time for sm_80 and sm_90 on this machine (no GPU needed).

    python -m benchmarks.tools.triton_aot_report --out benchmarks/results/<machine>-<date>

Compiles each specialization of speckle_kernels/testing/aot.py in a subprocess without
TRITON_INTERPRET (speckle_kernels/testing/aot_compile.py) and writes triton_aot_report.json
(one row a variant and architecture) and triton_aot_report.md (the range of registers, the
spills and the int32 stride products of each kernel, layout, dtype and architecture), both
atomically. What ptxas allocates bounds the programs a multiprocessor holds: 65536 registers an
SM, so a 4-warp program of R registers a thread leaves floor(65536 / (128 R)) programs an SM.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from speckle_models.atomic_write import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
REGISTERS_PER_SM = 65536


def compile_rows(op: str, tree: Path = ROOT) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "speckle_kernels.testing.aot_compile", op],
                          capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        raise SystemExit(f"triton_aot_report: compiling {op} failed:\n{proc.stderr[-3000:]}")
    return [dict(json.loads(line), op=op) for line in proc.stdout.splitlines() if line.startswith("{")]


def compile_rows_at(op: str, commit: str) -> list[dict]:
    """The same report for the package as it was at `commit` (its files in a temporary tree)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "archive", commit, "speckle_kernels"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "x", "-C", tree], input=archive.stdout, check=True)
        # today's compiler driver, the commit's kernels and variant lists
        shutil.copy(ROOT / "speckle_kernels" / "testing" / "aot_compile.py",
                    Path(tree) / "speckle_kernels" / "testing" / "aot_compile.py")
        return compile_rows(op, Path(tree))


PASSES = ("BACKWARD", "HAS_DY", "MODE", "TRAINING")  # what a kernel computes; the rest vary within a row


def _group(row: dict) -> tuple:
    cx = row["constexprs"]
    layout = ("channels_last" if cx.get("CHANNELS_LAST") else "contiguous") if "CHANNELS_LAST" in cx else "-"
    mode = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cx.items() if k in PASSES) or "-"
    return row["kernel"], mode, layout, row["x_dtype"], row["arch"]


def markdown(rows: list[dict], command: str, before: dict | None = None) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[_group(r)].append(r)
    lines = ["# Triton kernels compiled ahead of time: registers and spills\n",
             f"`{command}` (Triton AOT for sm_80 / sm_90, ptxas -v on the PTX; no GPU).\n",
             "A row: one kernel pass, layout, input dtype and architecture, over its variants "
             "(INDEX_64, dropout and quads, weights...). Registers are a thread's, the range over the "
             "variants; programs/SM = what 65536 registers an SM allow for the most of them at the "
             "kernel's warps. Spills: the most bytes of spill stores. int32 stride products: `arith.muli` "
             "of a stride in i32 in the TTIR of the INDEX_64 variants (must be 0). fp64 SASS: the static "
             "count of fp64 instructions (DADD, DMUL, DFMA, DSETP, DMNMX, conversions) in the machine code."
             + (" before: the same variants compiled from the commit named in the command." if before else "") + "\n",
             "| kernel | pass | layout | dtype | sm | variants | registers | fp64 SASS | "
             + ("registers before | fp64 SASS before | " if before else "")
             + "programs/SM | spill stores | int32 stride products |",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if before else "") + "---|---|---|"]
    for key, rs in sorted(groups.items()):
        regs = [r["regs"] for r in rs if r["regs"] is not None]
        warps = max(r["num_warps"] for r in rs)
        programs = REGISTERS_PER_SM // (32 * warps * max(regs)) if regs else "?"
        spills = max((r["spill_stores"] or 0) for r in rs)
        wide = sum(len(r["i32_stride_products"]) for r in rs if r["constexprs"].get("INDEX_64", True))
        fp64 = [r["fp64_sass"] for r in rs]
        old = ""
        if before:
            was = before.get(key)
            old = (f"{min(w[0] for w in was)}–{max(w[0] for w in was)} | "
                   f"{min(w[1] for w in was)}–{max(w[1] for w in was)} | ") if was else "– | – | "
        kernel, mode, layout, dtype, arch = key
        lines.append(f"| {kernel} | {mode} | {layout} | {dtype} | {arch} | {len(rs)} | {min(regs)}–{max(regs)} | "
                     f"{min(fp64)}–{max(fp64)} | {old}{programs} | {spills} | {wide} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for triton_aot_report.md/.json")
    p.add_argument("--ops", nargs="+", default=["batch_renorm", "batch_renorm_act", "noise"])
    p.add_argument("--before", help="a commit whose kernels to compile too, for a 'before' column")
    args = p.parse_args(argv)
    rows = [row for op in args.ops for row in compile_rows(op)]
    before = None
    if args.before:
        before = defaultdict(list)
        for op in args.ops:
            for row in compile_rows_at(op, args.before):
                before[_group(row)].append((row["regs"], row["fp64_sass"]))
    import triton

    command = "python -m benchmarks.tools.triton_aot_report --out " + str(args.out) + \
        (f" --before {args.before}" if args.before else "")
    report = {"command": command, "triton": triton.__version__, "rows": rows,
              "before": {" ".join(map(str, k)): v for k, v in (before or {}).items()}}
    text = markdown(rows, command, before) + f"\nTriton {triton.__version__}.\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "triton_aot_report.json", json.dumps(report, indent=1), overwrite=True)
    atomic_write_text(args.out / "triton_aot_report.md", text, overwrite=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
