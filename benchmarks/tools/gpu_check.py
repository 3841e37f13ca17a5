"""GPU check (issue 2): every kernel against the reference on the GPU, then the headline timings.

    python -m benchmarks.tools.gpu_check --out benchmarks/results/<gpu>-<date>

1. Checks, for each kernel backend (Triton, the CUDA extension), by the tests' kit
   (speckle_kernels/testing/batch_renorm.py): y, dx, dweight, dbias and the running buffers over training
   steps then eval, against the same function in float64 (at most 2x the fp32 reference's error
   + 1 ulp), on the tests' cases and on Br-U-Net's shapes in fp32/fp16/bf16, contiguous and
   channels_last; the norm block (BatchRenorm -> activation -> dropout) by its kit
   (speckle_kernels/testing/batch_renorm_act.py) over its CASES and the headline; and the noise kernels
   against their documented Philox stream. A backend that is missing counts as a failure here:
   on a GPU machine both should be built.
2. Timings at (32, 64, 128, 128): forward and forward+backward of every implementation
   (reference, torch.compile(reference), nn.BatchNorm2d, Triton, CUDA) in fp32 and bf16,
   contiguous and channels_last, with CUDA events over rotating input buffers (colder than L2),
   beside a device-to-device copy timed in the same run.

Writes gpu_check.json and gpu_check.md in --out and exits 1 if any check failed. Uses only
APIs present in torch 2.11 / Triton 3.6 (the GPU image). `--device cpu` runs the same script on
a CPU against the C++ CPU extension (a dry run of this script; slow at the headline size).
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

from ..common import (DTYPE_NAMES, Unavailable, assert_verdict, copy_bandwidth, device_name,
                     rotation_count, tensor_bytes, time_calls)
from ..batch_renorm_cases import (HEADLINE_CHANNELS, RENORM_IMPLS, RenormState, check_renorm,
                                 forward_backward, renorm_bytes, renorm_impl, renorm_input,
                                 unet_norm_shapes)
from ..noise_cases import check_noise, noise_impl
from ..batch_renorm_act_cases import probe_block_backend

HEADLINE = (32, HEADLINE_CHANNELS, 128, 128)
BACKENDS = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}  # checked on each device type


def kit_cases(quick: bool) -> list:
    """The tests' BatchRenorm cases, then Br-U-Net's norm shapes and the headline in
    fp32/fp16/bf16, contiguous and channels_last: every case judged against float64."""
    cases = list(renorm_kit.CASES)
    shapes = unet_norm_shapes(32, 128)[:1 if quick else None] + [HEADLINE]
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                cases.append(renorm_kit.Case(shape, dtype=dtype, channels_last=channels_last, t=20000))
    return cases


def run_checks(device, quick: bool) -> list[dict]:
    results = []

    def record(what, fn):
        t0 = time.perf_counter()
        try:
            fn()
            status, detail = "passed", ""
        except Unavailable as e:
            status, detail = "missing", str(e)
        except Exception as e:  # every failure is reported, then the next check runs
            status, detail = "FAILED", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        results.append({"check": what, "status": status, "detail": detail[:2000],
                        "seconds": round(time.perf_counter() - t0, 3)})
        print(f"[{status:>7}] {what}" + (f": {detail[:300]}" if detail else ""), flush=True)

    for backend in BACKENDS[device.type]:
        for case in kit_cases(quick):
            def judged(case=case):
                if backend == "triton" and device.type != "cuda":
                    raise Unavailable("Triton is checked on a GPU here (the tests run its interpreter)")
                renorm_impl(backend, device, case.dtype)  # Unavailable when not built
                assert_verdict(renorm_kit.judge(backend, renorm_kit.draw(case, seed=len(case.id), device=device)))

            record(f"batch_renorm[{backend}] {case.id}", judged)
        for case in block_kit.CASES + ([] if quick else [block_kit.HEADLINE]):
            def block_judged(case=case):
                probe_block_backend(backend, device, case.base.dtype)  # Unavailable when missing
                d = block_kit.draw(case, seed=len(case.id), device=device)
                assert_verdict(block_kit.judge(backend, case, d))

            record(f"batch_renorm_act[{backend}] {case.id}", block_judged)
        for op, out_dtype in (("batch", torch.float32), ("batch", torch.bfloat16), ("add", torch.float32)):
            for shape in ((32, 1, 128, 128), (3, 1, 7, 13)):
                label = f"noise[{backend}] {op} {'x'.join(map(str, shape))} -> {DTYPE_NAMES[out_dtype]}"

                def noise_check(op=op, out_dtype=out_dtype, shape=shape):
                    fn = noise_impl(backend, op, device)
                    g = torch.Generator(device=device).manual_seed(0)
                    if op == "batch":
                        x = torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8)
                    else:
                        x = torch.rand(shape, generator=g, device=device)
                    check_noise(backend, fn, op, x, out_dtype)

                record(label, noise_check)
    return results


def run_timings(device, reps: int, warmup: int, copy_gbps: float) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            layout = "channels_last" if channels_last else "contiguous"
            k = rotation_count(tensor_bytes(HEADLINE, dtype), device)
            xs = [renorm_input(HEADLINE, dtype, channels_last, device, seed=i) for i in range(k)]
            dys = [torch.randn_like(x, dtype=torch.float32).to(dtype) for x in xs]
            for backward in (False, True):
                mode = "forward+backward" if backward else "forward"
                for impl in RENORM_IMPLS:
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
                    rows.append(row)
                    print(_timing_line(row), flush=True)
            del xs, dys
    return rows


def _timing_line(row) -> str:
    head = f"{row['mode']:>16} {row['dtype']} {row['layout']:>13} {row['impl']:>18}"
    if "median_s" in row:
        return (f"{head}: {row['median_s'] * 1e3:8.3f} ms  {row['gbps']:7.1f} GB/s "
                f"({100 * row['fraction_of_copy']:.0f}% of copy)  check {row['check'][:60]}")
    return f"{head}: {row.get('skipped') or row.get('error')}"


def markdown(report) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, Triton {report['triton']}, CUDA extension built: "
             f"{report['has_cuda_ext']}; {report['date']}. Device-to-device copy: "
             f"{report['copy']['gbps']:.0f} GB/s (read + write).", "",
             f"## Checks: {report['summary']}", "", "| check | status | detail |", "|---|---|---|"]
    for r in report["checks"]:
        if r["status"] != "passed":
            lines.append(f"| {r['check']} | **{r['status']}** | {r['detail'][:300]} |")
    n_passed = sum(r["status"] == "passed" for r in report["checks"])
    lines.append(f"| ({n_passed} further checks) | passed | |")
    lines += ["", f"## Timings at {'x'.join(map(str, HEADLINE))} (median of {report['reps']} calls, "
              "CUDA events, rotating inputs)", "",
              "| mode | dtype | layout | implementation | median | vs reference | GB/s | % copy | check |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in report["timings"]:
        ref = next((q for q in report["timings"] if q["impl"] == "reference" and q["mode"] == r["mode"]
                    and q["dtype"] == r["dtype"] and q["layout"] == r["layout"] and "median_s" in q), None)
        if "median_s" not in r:
            lines.append(f"| {r['mode']} | {r['dtype']} | {r['layout']} | {r['impl']} | – | – | – | – | "
                         f"{(r.get('skipped') or r.get('error', ''))[:120]} |")
            continue
        speed = f"{ref['median_s'] / r['median_s']:.2f}×" if ref else "–"
        check = "**wrong gradients**" if r["check"].startswith("FAILED") else r["check"]
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['layout']} | {r['impl']} | "
                     f"{r['median_s'] * 1e3:.3f} ms | {speed} | {r['gbps']:.0f} | "
                     f"{100 * r['fraction_of_copy']:.0f}% | {check} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check and time the kernels on a GPU.")
    p.add_argument("--out", type=Path, default=Path("."), help="directory for gpu_check.json/.md")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="fewer Br-U-Net shapes in the checks, no block headline")
    p.add_argument("--skip-timings", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "missing"
    try:
        from speckle_kernels import _ext
        has_cuda_ext = bool(_ext.HAS_CUDA_EXT)
    except Exception as e:  # the module may be missing or fail to load: say why
        has_cuda_ext = f"no ({type(e).__name__}: {e})"
    args.out.mkdir(parents=True, exist_ok=True)
    copy = copy_bandwidth(device)
    print(f"{device_name(device)}: copy {copy['gbps']:.0f} GB/s; torch {torch.__version__}, "
          f"Triton {triton_version}, CUDA extension {has_cuda_ext}", flush=True)
    checks = run_checks(device, args.quick)
    failed = [c for c in checks if c["status"] != "passed"]
    timings = [] if args.skip_timings else run_timings(device, args.reps, args.warmup, copy["gbps"])
    report = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
              "has_cuda_ext": has_cuda_ext, "date": time.strftime("%Y-%m-%d"), "copy": copy,
              "reps": args.reps, "summary": f"{len(checks) - len(failed)} of {len(checks)} passed",
              "checks": checks, "timings": timings}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(f"checks: {report['summary']}; wrote {args.out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
