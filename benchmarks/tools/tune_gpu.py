"""Tune and explain the BatchRenorm kernels on a GPU: one call, a table at the end.

    python -m benchmarks.tools.tune_gpu --out DIR

1. Each Triton kernel alone at (32, 64, 128, 128) (statistics sums, affine pass; forward and
   backward; contiguous and channels_last) over tile sizes, warps and reduction programs per SM,
   timed with triton.testing.do_bench (median), as GB/s against a copy timed in the same run.
2. Whole ops three ways: each call alone from an idle GPU (what gpu_check reports; host launch
   overhead included), calls back to back (the host runs ahead: what a training loop sees when
   the GPU is the bottleneck), and CUDA-graph replay (GPU time alone).
Writes tune_gpu.json in --out. Nothing here is a check: gpu_check and the benchmarks check.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from speckle_kernels.batch_renorm_contract import STAT_SCALE
from speckle_kernels.schedules import DMAX_SCHEDULE, RMAX_SCHEDULE

from ..common import copy_bandwidth, tensor_bytes, time_calls
from ..batch_renorm_cases import (HEADLINE_CHANNELS, RenormState, forward_backward, renorm_impl,
                                 renorm_input)

HEADLINE = (32, HEADLINE_CHANNELS, 128, 128)


def kernel_sweep(dtype, copy_gbps, quick):
    br = importlib.import_module("speckle_kernels.batch_renorm_triton")
    tc = importlib.import_module("speckle_kernels.triton_common")  # the launch constants, read at call time

    knobs = ("TILE_ELEMENTS", "SUMS_NUM_WARPS", "AFFINE_NUM_WARPS", "REDUCTION_PROGRAMS_PER_SM")
    shipped = {k: getattr(tc, k) for k in knobs}
    rows = []
    tiles = (1024, 2048, 4096, 8192)
    warps = (4, 8)
    per_sm = (2, 4, 8, 16) if not quick else (8,)
    for channels_last in (False, True):
        x = renorm_input(HEADLINE, dtype, channels_last, "cuda", seed=0)
        dy = torch.randn_like(x)
        state = RenormState(HEADLINE[1], "cuda")
        stats = br.batch_renorm_statistics(
            x, state.weight.detach(), state.bias.detach(), *(b.clone() for b in state.buffers()),
            training=True, momentum=0.01, eps=1e-5, r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE)
        nbytes = tensor_bytes(HEADLINE, dtype)
        layout_name = "channels_last" if channels_last else "contiguous"
        for tile, nw in itertools.product(tiles, warps):
            tc.TILE_ELEMENTS = tile
            layout = br.Layout(x)
            for backward in (False, True):
                for ppsm in per_sm:
                    tc.SUMS_NUM_WARPS, tc.REDUCTION_PROGRAMS_PER_SM = nw, ppsm
                    fn = (lambda: br.channel_sums(layout, dy, stats)) if backward else \
                        (lambda: br.channel_sums(layout, None, None))
                    rows.append(_bench(f"sums {'bwd' if backward else 'fwd'}", layout_name, dtype,
                                       dict(tile=tile, warps=nw, programs_per_sm=ppsm,
                                            block=(layout.block_c, layout.block_i)),
                                       fn, (2 if backward else 1) * nbytes, copy_gbps))
                tc.AFFINE_NUM_WARPS = nw
                coef = stats[STAT_SCALE]
                fn = (lambda: br.per_channel_affine(layout, x, dy, stats, coef, coef, coef)) if backward else \
                    (lambda: br.per_channel_affine(layout, x, None, stats, coef, None, coef))
                rows.append(_bench(f"affine {'bwd' if backward else 'fwd'}", layout_name, dtype,
                                   dict(tile=tile, warps=nw, block=(layout.block_c, layout.block_i)),
                                   fn, (3 if backward else 2) * nbytes, copy_gbps))
        del x, dy
    for k, v in shipped.items():  # back to the shipped configuration
        setattr(tc, k, v)
    return rows


def _bench(kernel, layout, dtype, config, fn, nbytes, copy_gbps):
    import triton.testing

    row = {"kernel": kernel, "layout": layout, "dtype": str(dtype).split(".")[-1], **config}
    try:
        ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        row.update(ms=ms, gbps=nbytes / ms / 1e6, fraction_of_copy=nbytes / ms / 1e6 / copy_gbps)
        print(f"{kernel:>10} {layout:>13} {row['dtype']:>8} tile {config['tile']:5d} warps {config['warps']} "
              f"ppsm {config.get('programs_per_sm', '-')!s:>2} block {config['block']}: {ms * 1e3:7.1f} us "
              f"{row['gbps']:6.0f} GB/s ({100 * row['fraction_of_copy']:.0f}%)", flush=True)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"{kernel} {layout} {config}: {row['error']}", flush=True)
    return row


def graph_seconds(fn, reps=20):
    """Median seconds of one replay of fn() captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def op_timings(dtype, copy_gbps):
    rows = []
    for channels_last, backward in itertools.product((False, True), (False, True)):
        x = renorm_input(HEADLINE, dtype, channels_last, "cuda", seed=0).requires_grad_(backward)
        dy = torch.randn_like(x)
        nbytes = (8 if backward else 3) * tensor_bytes(HEADLINE, dtype)
        for impl in ("batchnorm2d", "triton", "cuda", "reference-compiled"):
            row = {"impl": impl, "mode": "forward+backward" if backward else "forward",
                   "layout": "channels_last" if channels_last else "contiguous",
                   "dtype": str(dtype).split(".")[-1]}
            try:
                fn = renorm_impl(impl, torch.device("cuda"), dtype)
                state = RenormState(HEADLINE[1], "cuda", grad=backward)

                def call():
                    if backward:
                        return forward_backward(fn, x, state, dy)
                    with torch.no_grad():
                        return fn(x, state)

                alone = time_calls(call, torch.device("cuda"), reps=20, warmup=5)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                a.record()
                for _ in range(50):
                    call()
                b.record()
                host = (time.perf_counter() - t0) / 50
                b.synchronize()
                row.update(alone_s=statistics.median(alone), back_to_back_s=a.elapsed_time(b) / 1e3 / 50,
                           host_s=host)
                if impl != "reference-compiled":
                    row["graph_s"] = graph_seconds(call)
                for k in ("alone_s", "back_to_back_s", "graph_s"):
                    if k in row:
                        row[k.replace("_s", "_copy")] = nbytes / row[k] / 1e9 / copy_gbps
                print(f"{row['mode']:>16} {row['layout']:>13} {row['dtype']:>8} {impl:>18}: alone "
                      f"{row['alone_s'] * 1e6:7.1f} us, back-to-back {row['back_to_back_s'] * 1e6:7.1f} us "
                      f"(host {host * 1e6:6.1f} us/call), graph "
                      f"{row.get('graph_s', float('nan')) * 1e6:7.1f} us = "
                      f"{100 * row.get('graph_copy', row['back_to_back_copy']):.0f}% of copy", flush=True)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
            rows.append(row)
        del x, dy
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--quick", action="store_true", help="one reduction-programs setting")
    p.add_argument("--skip-sweep", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    copy = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy {copy['gbps']:.0f} GB/s", flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy": copy,
           "date": time.strftime("%Y-%m-%d"), "ops": [], "kernels": []}
    for dtype in (torch.float32, torch.bfloat16):
        doc["ops"] += op_timings(dtype, copy["gbps"])
    if not args.skip_sweep:
        doc["kernels"] = kernel_sweep(torch.float32, copy["gbps"], args.quick)
    (args.out / "tune_gpu.json").write_text(json.dumps(doc, indent=1))
    best = {}
    for r in doc["kernels"]:
        key = (r["kernel"], r["layout"])
        if "ms" in r and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    print("\nbest per kernel (fp32):")
    for (k, layout), r in sorted(best.items()):
        print(f"  {k:>10} {layout:>13}: tile {r['tile']} warps {r['warps']} ppsm "
              f"{r.get('programs_per_sm', '-')} -> {r['ms'] * 1e3:.1f} us, {100 * r['fraction_of_copy']:.0f}% of copy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
