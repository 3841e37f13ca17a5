"""GPU check, stages 1 and 2 of benchmarks/tools/run_gpu.sh: every kernel against its case kit,
then the headline timings. Each result is one JSON line, appended (and flushed) as it finishes,
so a run cut off at its deadline keeps every finished row; `summary` turns the lines into a table.

    python -m benchmarks.tools.gpu_check checks  --jsonl DIR/checks-0.jsonl [--shard 0/8] [--quick]
    python -m benchmarks.tools.gpu_check timings --jsonl DIR/timings.jsonl [--impls ...]
    python -m benchmarks.tools.gpu_check summary DIR        (DIR/gpu_check.md from DIR/*.jsonl)

checks: for the CUDA extension and Triton, the cases benchmarks/tools/gpu_plan.py lists for
stage 1: the BatchRenorm kit's cases, Br-U-Net's layer shapes and the headline in fp32, fp16 and
bf16, contiguous and channels_last (speckle_kernels/testing/batch_renorm.py: y, dx, dweight, dbias
and the running buffers over training steps then eval, against float64, bound 2x the fp32
reference's error + 1 ulp); the norm block's kit cases and headline; the noise kernels against
their Philox stream. A row: the verdict, the largest error/bound ratio and its quantity, the
seconds. --shard K/N takes every N-th case from the K-th, so N processes share the compiling
(one Triton specialization a distinct launch, ~1 s each) over the CPU's cores. A backend that is
missing counts as a failure here: on a GPU machine both should be built.
timings: at (32, 64, 128, 128), forward and forward+backward of each implementation in fp32 and
bf16, contiguous and channels_last, CUDA events over rotating inputs (colder than L2), beside a
device-to-device copy timed in the same run; then each loaded Triton kernel's registers and spills.
Uses only APIs present in torch 2.11 / Triton 3.6 (the GPU image).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from speckle_kernels.testing import batch_renorm as renorm_kit
from speckle_kernels.testing import batch_renorm_act as block_kit

from ..batch_renorm_act_cases import probe_block_backend
from ..batch_renorm_cases import (HEADLINE_CHANNELS, RENORM_IMPLS, RenormState, check_renorm,
                                  forward_backward, renorm_bytes, renorm_impl, renorm_input)
from ..common import DTYPE_NAMES, Unavailable, copy_bandwidth, device_name, rotation_count, tensor_bytes, time_calls
from ..noise_cases import check_noise, noise_impl
from .gpu_plan import item_label, stage1_items

HEADLINE = (32, HEADLINE_CHANNELS, 128, 128)
GPU_BACKENDS = ("cuda", "triton")


def append(path: Path, row: dict) -> None:
    """One JSON line, written and flushed at once: a killed run keeps every finished row."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _ratio(verdict) -> tuple[float, str]:
    """The largest error/bound over the kit's quantities, and which quantity."""
    q = max(verdict.errors, key=lambda k: verdict.errors[k] / verdict.bounds[k] if verdict.bounds[k] else 0.0)
    return (verdict.errors[q] / verdict.bounds[q] if verdict.bounds[q] else 0.0), q


def run_item(item: dict, backend: str, device) -> dict:
    """One stage-1 check: its verdict, error/bound ratio and seconds."""
    row = {"check": item_label(item, backend), "op": item["op"], "backend": backend}
    t0 = time.perf_counter()
    try:
        if item["op"] == "noise":
            fn = noise_impl(backend, item["noise_op"], device)
            g = torch.Generator(device=device).manual_seed(0)
            if item["noise_op"] == "batch":
                x = torch.randint(0, 256, item["shape"], generator=g, device=device, dtype=torch.uint8)
            else:
                x = torch.rand(item["shape"], generator=g, device=device)
            check_noise(backend, fn, item["noise_op"], x, item["out_dtype"])
            verdict = None
        elif item["op"] == "batch_renorm":
            case = item["case"]
            renorm_impl(backend, device, case.dtype)  # Unavailable when not built
            verdict = renorm_kit.judge(backend, renorm_kit.draw(case, seed=len(case.id), device=device))
        else:
            case = item["case"]
            probe_block_backend(backend, device, case.base.dtype)
            verdict = block_kit.judge(backend, case, block_kit.draw(case, seed=len(case.id), device=device))
        if verdict is not None:
            row["ratio"], row["worst"] = _ratio(verdict)
            row["errors"] = {q: float(v) for q, v in verdict.errors.items()}
            row["bounds"] = {q: float(v) for q, v in verdict.bounds.items()}
        failures = verdict.failures if verdict is not None else []
        row["status"], row["detail"] = ("FAILED", "; ".join(failures)[:2000]) if failures else ("passed", "")
    except Unavailable as e:
        row["status"], row["detail"] = "missing", str(e)[:500]
    except Exception as e:  # every failure is reported, then the next check runs
        row["status"], row["detail"] = "FAILED", f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def run_checks(device, quick: bool, shard: tuple[int, int], jsonl: Path) -> int:
    k, n = shard
    failed = 0
    for index, item in enumerate(stage1_items(quick)):
        if index % n != k:
            continue
        for backend in GPU_BACKENDS:
            row = run_item(item, backend, device)
            append(jsonl, row)
            failed += row["status"] != "passed"
            ratio = f" ratio {row['ratio']:.2f} ({row['worst']})" if "ratio" in row else ""
            print(f"[{row['status']:>7}] {row['check']}{ratio} {row['seconds']:.1f} s"
                  + (f": {row['detail'][:300]}" if row["detail"] else ""), flush=True)
    return failed


def run_timings(device, reps: int, warmup: int, copy_gbps: float, impls, jsonl: Path) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            layout = "channels_last" if channels_last else "contiguous"
            k = rotation_count(tensor_bytes(HEADLINE, dtype), device)
            xs = [renorm_input(HEADLINE, dtype, channels_last, device, seed=i) for i in range(k)]
            dys = [torch.randn_like(x, dtype=torch.float32).to(dtype) for x in xs]
            for backward in (False, True):
                mode = "forward+backward" if backward else "forward"
                for impl in impls:
                    row = {"impl": impl, "mode": mode, "dtype": DTYPE_NAMES[dtype], "layout": layout,
                           "shape": list(HEADLINE), "buffers": k}
                    try:
                        fn = renorm_impl(impl, device, dtype)
                        try:
                            check_renorm(impl, fn, xs[0], backward=backward, device=device)
                            row["check"] = "passed" if impl != "reference" else "is the reference"
                        except AssertionError as e:
                            if impl != "reference-compiled":
                                raise
                            row["check"] = f"FAILED: {e}"  # a baseline: timed and marked
                        state = RenormState(HEADLINE[1], device, grad=backward)
                        for x in xs:
                            x.requires_grad_(backward)
                        calls = iter(range(10**9))

                        def call():
                            i = next(calls) % k
                            if backward:
                                return forward_backward(fn, xs[i], state, dys[i])
                            with torch.no_grad():
                                return fn(xs[i], state)

                        times = time_calls(call, device, reps, warmup)
                        median = statistics.median(times)
                        gbps = renorm_bytes(HEADLINE, dtype, backward) / median / 1e9
                        row.update(median_s=median, min_s=min(times), gbps=gbps,
                                   fraction_of_copy=gbps / copy_gbps)
                    except Unavailable as e:
                        row.update(skipped=str(e))
                    except Exception as e:
                        row.update(error=f"{type(e).__name__}: {e}"[:1000])
                        traceback.print_exc()
                    append(jsonl, row)
                    print(_timing_line(row), flush=True)
            del xs, dys


def _timing_line(row) -> str:
    head = f"{row['mode']:>16} {row['dtype']} {row['layout']:>13} {row['impl']:>18}"
    if "median_s" in row:
        return (f"{head}: {row['median_s'] * 1e3:8.3f} ms  {row['gbps']:7.1f} GB/s "
                f"({100 * row['fraction_of_copy']:.0f}% of copy)  check {row['check'][:60]}")
    return f"{head}: {row.get('skipped') or row.get('error')}"



def triton_kernel_resources() -> list[dict]:
    """Registers and spills of every Triton kernel of the package compiled in this process, as
    the driver loaded it (CompiledKernel.n_regs / n_spills; Triton 3.6 to 3.9 keep the compiled
    kernels in JITFunction.device_caches)."""
    from speckle_kernels import batch_renorm_act_triton, batch_renorm_triton_kernels, noise_triton

    rows = []
    kernels = [batch_renorm_triton_kernels.channel_sums_kernel, batch_renorm_triton_kernels.per_channel_affine_kernel,
               batch_renorm_triton_kernels.forward_finalize_kernel, batch_renorm_triton_kernels.backward_finalize_kernel,
               batch_renorm_act_triton.batch_renorm_act_kernel, noise_triton.speckle_kernel]
    for fn in kernels:
        for caches in getattr(fn, "device_caches", {}).values():
            cache = caches[0] if isinstance(caches, tuple) else caches
            for key, compiled in dict(cache).items():
                try:
                    compiled._init_handles()
                    rows.append({"kernel": fn.__name__, "n_regs": compiled.n_regs, "n_spills": compiled.n_spills,
                                 "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
                                 "key": str(key)[:300]})
                except Exception as e:  # an API moved between versions: say so, keep going
                    rows.append({"kernel": fn.__name__, "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def _read(paths) -> list[dict]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def summary(folder: Path) -> str:
    """gpu_check.md from the stage's JSONL files (a cut-off run summarized the same way)."""
    checks = _read(sorted(folder.glob("checks*.jsonl")))
    timings = [r for r in _read(sorted(folder.glob("timings*.jsonl"))) if "mode" in r]
    env = (folder / "environment.txt").read_text() if (folder / "environment.txt").exists() else ""
    lines = [f"# GPU check ({folder.name})", "", "```", env.strip(), "```", ""]
    if checks:
        passed = sum(r["status"] == "passed" for r in checks)
        lines += [f"## Checks: {passed} of {len(checks)} passed", "",
                  "| op | backend | cases | passed | worst error/bound | at | seconds |",
                  "|---|---|---:|---:|---:|---|---:|"]
        groups = {}
        for r in checks:
            groups.setdefault((r["op"], r["backend"]), []).append(r)
        for (op, backend), rs in sorted(groups.items()):
            worst = max((r for r in rs if "ratio" in r), key=lambda r: r["ratio"], default=None)
            lines.append(f"| {op} | {backend} | {len(rs)} | {sum(r['status'] == 'passed' for r in rs)} | "
                         + (f"{worst['ratio']:.2f} ({worst['worst']}) | {worst['check'].split('] ', 1)[1]}"
                            if worst else "– | –") + f" | {sum(r['seconds'] for r in rs):.0f} |")
        bad = [r for r in checks if r["status"] != "passed"]
        if bad:
            lines += ["", "| check | status | detail |", "|---|---|---|"]
            lines += [f"| {r['check']} | **{r['status']}** | {r['detail'][:300]} |" for r in bad]
    if timings:
        lines += ["", f"## Timings at {'x'.join(map(str, HEADLINE))} (median, CUDA events, rotating inputs)",
                  "", "| mode | dtype | layout | implementation | median | GB/s | % copy | check |",
                  "|---|---|---|---|---:|---:|---:|---|"]
        for r in timings:
            if "median_s" in r:
                lines.append(f"| {r['mode']} | {r['dtype']} | {r['layout']} | {r['impl']} | {r['median_s'] * 1e3:.3f} ms"
                             f" | {r['gbps']:.0f} | {100 * r['fraction_of_copy']:.0f}% | {r['check']} |")
            else:
                lines.append(f"| {r['mode']} | {r['dtype']} | {r['layout']} | {r['impl']} | – | – | – | "
                             f"{(r.get('skipped') or r.get('error', ''))[:120]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check and time the kernels on a GPU (stages 1 and 2).")
    p.add_argument("what", choices=("checks", "timings", "summary"))
    p.add_argument("path", nargs="?", type=Path, help="summary: the folder of the JSONL files")
    p.add_argument("--jsonl", type=Path, help="the file rows are appended to")
    p.add_argument("--shard", default="0/1", help="K/N: every N-th check from the K-th")
    p.add_argument("--quick", action="store_true", help="Br-U-Net's top level only, no block headline")
    p.add_argument("--impls", nargs="+", default=list(RENORM_IMPLS))
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    args = p.parse_args(argv)
    if args.what == "summary":
        (args.path / "gpu_check.md").write_text(summary(args.path))
        print(summary(args.path))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    from speckle_kernels import _ext

    print(f"{device_name(device)}; torch {torch.__version__}; CUDA extension loaded: {_ext.HAS_CUDA_EXT}"
          + ("" if _ext.HAS_CUDA_EXT else f" ({_ext.cuda_status()['error']})"), flush=True)
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    if args.what == "checks":
        k, n = (int(v) for v in args.shard.split("/"))
        return 1 if run_checks(device, args.quick, (k, n), args.jsonl) else 0
    copy = copy_bandwidth(device)
    append(args.jsonl, {"copy_gbps": copy["gbps"], "device": device_name(device)})
    run_timings(device, args.reps, args.warmup, copy["gbps"], args.impls, args.jsonl)
    for row in triton_kernel_resources():
        append(args.jsonl, row)
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
