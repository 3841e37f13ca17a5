"""The GPU run's four stages: what each runs, and whether it fits one device call. Run by
benchmarks/tools/run_gpu.sh --dry-run (and so by CI) on any machine, no GPU needed.

    python -m benchmarks.tools.gpu_plan --stage 1|2|3|4 [--budget 480] [--bench FILES --bench-k EXPR]

    stage 1  checks   the build; the case kits of BatchRenorm, the norm block and the noise on
                      the CUDA and Triton kernels (every dtype and layout the kits claim, Br-U-Net's
                      layer shapes and the headline), one verdict and error/bound ratio a case;
                      the checkpoint tests (tests/test_checkpoint.py) on the GPU
    stage 2  timings  BatchRenorm at the headline shape against copy bandwidth (reference,
                      nn.BatchNorm2d, Triton, CUDA), each Triton kernel's registers and spills;
                      the norm-block group and the host time and launches of a layer call
    stage 3  training the train-step and inference benchmark groups at full size
    stage 4  inference speckle-denoise's GPU paths (benchmarks/tools/gpu_inference.py)

The estimate. What dominates a fresh machine's stage 1 is compiling: the CUDA extension
(BUILD_S) and one Triton specialization per distinct launch (COMPILE_S each; 227 of them took
2-4 minutes on an H200 on 2026-11-25). The launches are counted here, not guessed: each case's
forward and backward (training and eval) runs through the Triton backends' own host code on meta
tensors with the kernels replaced by recorders, and a launch's specialization is Triton's key
(the kernel, its constexprs, the pointers' dtypes, and each integer argument's width and whether
it is 1 or a multiple of 16), with an H200's 132 multiprocessors. The rest is a per-case cost
(CASE_S plus ELEMENT_S a processed element), each process's start (START_S), and for stages 2
and 3 the benchmark rows that `pytest --collect-only` finds for the stage's files and -k (ROW_S a
row, COMPILED_ROW_S one that torch.compile builds first). These constants are leads from past
runs; every stage writes each item's seconds, so the next run can check them.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys

import torch

BUILD_S = 150.0       # pip install -e . with the CUDA extension, 16 cores
COMPILE_S = 1.0       # one Triton specialization (sm_90)
CASE_S = 0.6          # a kit case's fixed cost: draws, reference runs (pooled draws), the judge
ELEMENT_S = 2e-9      # a kit case's cost an element processed (every run and step of it)
START_S = 20.0        # a Python process: torch, CUDA context, imports
ROW_S = 4.0           # a benchmark row at full size: its setup check and 60 timed rounds
COMPILED_ROW_S = 60.0  # a row whose function torch.compile builds first (a U-Net: more)
INFERENCE_S = 240.0    # gpu_inference.py: 16 rows (4 of them compiled) and a 256-frame cine; a lead, never run
SHARD_IMBALANCE = 1.5  # the slowest of the parallel kit processes against their mean
STAGE_BUDGET_S = 480.0  # a 9-minute call with a minute to spare, less the machine's start
H200_SMS = 132


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's specialization key."""

    def __init__(self, kernel, seen: set):
        self.name, self.seen = kernel.__name__, seen
        names = list(kernel.arg_names)
        fixed = getattr(kernel, "do_not_specialize", None) or ()  # names or indices by version
        self.fixed = {names.index(f) if isinstance(f, str) else f for f in fixed}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            keys = []
            for k, v in enumerate(args):
                if isinstance(v, torch.Tensor):
                    keys.append(str(v.dtype))
                elif isinstance(v, bool) or isinstance(v, float):
                    keys.append(type(v).__name__)
                elif isinstance(v, int):
                    width = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                    keys.append(width if k in self.fixed else (width, v == 1, v % 16 == 0))
            consts = tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("num_warps", "num_stages")))
            self.seen.add((self.name, tuple(keys), consts))
        return launch


@contextlib.contextmanager
def recording(seen: set):
    """Replace every Triton kernel of the package by a recorder, for meta-tensor runs on an
    H200's multiprocessor count."""
    from speckle_kernels import triton_common as tc
    from speckle_kernels.testing.host_calls import wrapped_triton_kernels

    real_programs = tc.programs_for_reduction

    def programs_on_h200(n_tiles, c_blocks, device):
        target = tc.REDUCTION_PROGRAMS_PER_SM * H200_SMS
        per_block = max(1, min(n_tiles, tc.cdiv(target, c_blocks)))
        tiles = tc.cdiv(n_tiles, per_block)
        return tc.cdiv(n_tiles, tiles), tiles

    try:
        tc.programs_for_reduction = programs_on_h200
        with wrapped_triton_kernels(lambda kernel: _Recorder(kernel, seen)):
            yield
    finally:
        tc.programs_for_reduction = real_programs


def _renorm_launches(shape, dtype, channels_last, *, block=None):
    """The Triton launches of one kit case (training and eval, forward and backward)."""
    from speckle_kernels import batch_renorm_act_triton as bat
    from speckle_kernels import batch_renorm_triton as brt
    from speckle_kernels.schedules import DMAX_SCHEDULE, RMAX_SCHEDULE

    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    c = shape[1]
    w, rm, rs = (torch.empty(c, device="meta") for _ in range(3))
    t = torch.empty((), dtype=torch.int64, device="meta")
    rng = torch.empty(2, dtype=torch.int64, device="meta")
    for training in (True, False):
        stats = brt.batch_renorm_statistics(x, w, w, rm, rs, t, training=training, momentum=0.01,
                                            eps=1e-3, r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE)
        if block is None:
            layout = brt.Layout(x)
            brt.batch_renorm_normalize(layout, stats)
            brt.batch_renorm_backward(torch.empty_like(x), layout, w, stats, training=training)
        else:
            slope, p = block
            bat.block_forward(x, stats, rng, training=training, slope=slope, dropout=p)
            bat.block_backward(torch.empty_like(x), x, w, stats, rng, training=training, slope=slope, dropout=p)


def stage1_items(quick: bool = False) -> list[dict]:
    """The kit cases stage 1 checks on each GPU backend (benchmarks/tools/gpu_check.py's list)."""
    from speckle_kernels.testing import batch_renorm as renorm_kit
    from speckle_kernels.testing import batch_renorm_act as block_kit

    from ..batch_renorm_cases import unet_norm_shapes

    items = [dict(op="batch_renorm", case=c) for c in renorm_kit.CASES]
    shapes = unet_norm_shapes(32, 128)[:1 if quick else None] + [renorm_kit.HEADLINE.shape]
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                items.append(dict(op="batch_renorm", case=renorm_kit.Case(shape, dtype=dtype, channels_last=channels_last,
                                                                          t=20000)))
    items += [dict(op="batch_renorm_act", case=c) for c in block_kit.CASES + ([] if quick else [block_kit.HEADLINE])]
    for op, out_dtype in (("batch", torch.float32), ("batch", torch.bfloat16), ("add", torch.float32)):
        for shape in ((32, 1, 128, 128), (3, 1, 7, 13)):
            items.append(dict(op="noise", noise_op=op, shape=shape, out_dtype=out_dtype))
    return items


def item_label(item: dict, backend: str) -> str:
    if item["op"] == "noise":
        from ..common import DTYPE_NAMES

        return (f"noise[{backend}] {item['noise_op']} {'x'.join(map(str, item['shape']))} -> "
                f"{DTYPE_NAMES[item['out_dtype']]}")
    return f"{item['op']}[{backend}] {item['case'].id}"


def count_triton_specializations(items: list[dict]) -> int:
    from speckle_kernels._backend import HAS_TRITON
    from speckle_kernels import noise_triton

    if not HAS_TRITON:
        return 0
    seen: set = set()
    with recording(seen):
        for item in items:
            if item["op"] == "noise":
                x = torch.empty(item["shape"], dtype=torch.uint8 if item["noise_op"] == "batch" else torch.float32,
                                device="meta")
                noise = dict(factor=1.0, sigma_mult=(0.1, 0.3), sigma_add=0.02, distribution="gaussian",
                             clip=True, seed=1, offset=0)
                if item["noise_op"] == "batch":
                    noise_triton.make_noisy_batch(x, out_dtype=item["out_dtype"], **noise)
                else:
                    noise_triton.add_speckle_noise(x, **noise)
                continue
            case = item["case"]
            base = case.base if item["op"] == "batch_renorm_act" else case
            block = (case.slope, case.dropout) if item["op"] == "batch_renorm_act" else None
            _renorm_launches(base.shape, base.dtype, base.channels_last, block=block)
    return len(seen)


def _elements(item: dict) -> int:
    if item["op"] == "noise":
        return math.prod(item["shape"])
    case = item["case"].base if item["op"] == "batch_renorm_act" else item["case"]
    steps = case.train_steps + 1
    return math.prod(case.shape) * steps * 4  # fp32 and fp64 references, the backend, the judge


def bench_rows(files: list[str], keyword: str) -> list[str]:
    """The benchmark rows `pytest files -k keyword` runs on a GPU at full size (collected here)."""
    env = dict(os.environ, SPECKLE_BENCH_SIZE="full", SPECKLE_BENCH_DEVICE="cuda")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files]
    if keyword:
        cmd += ["-k", keyword]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [line for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode not in (0, 5) or not rows:
        raise SystemExit(f"gpu_plan: collecting {files} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return rows


def plan(stage: int, quick: bool = False, shards: int = 8, bench: tuple = ((), "")) -> tuple[list[str], float]:
    """(lines describing the stage, estimated seconds); bench: the stage's benchmark files and -k."""
    lines = [f"build: the CUDA extension ({BUILD_S:.0f} s; none when a built one is carried)"]
    seconds = BUILD_S + START_S
    if stage == 1:
        items = stage1_items(quick)
        spec = count_triton_specializations(items)
        work = sum(CASE_S + ELEMENT_S * _elements(i) for i in items) * 2  # cuda and triton
        parallel = (spec * COMPILE_S + work) / shards * SHARD_IMBALANCE
        lines += [f"kits: {len(items)} cases x 2 backends (cuda, triton): "
                  f"{sum(i['op'] == 'batch_renorm' for i in items)} BatchRenorm, "
                  f"{sum(i['op'] == 'batch_renorm_act' for i in items)} norm block, "
                  f"{sum(i['op'] == 'noise' for i in items)} noise; {work:.0f} s of work and "
                  f"{spec} Triton specializations counted ({spec * COMPILE_S:.0f} s), over {shards} "
                  f"processes: {START_S + parallel:.0f} s",
                  f"checkpoint tests: tests/test_checkpoint.py ({START_S + 60:.0f} s)"]
        seconds += START_S + parallel + START_S + 60
    if stage == 2:
        from ..batch_renorm_cases import headline_cases

        timing_rows = 2 * 2 * len(headline_cases("full", torch.device("cuda"))) * 4 // 2
        lines.append(f"timings: {timing_rows} BatchRenorm rows at the headline, 4 implementations "
                     f"({START_S + timing_rows * ROW_S / 2:.0f} s)")
        seconds += START_S + timing_rows * ROW_S / 2
    if stage in (2, 3):
        files, keyword = bench
        rows = bench_rows(list(files), keyword)
        compiled = sum("compiled" in r for r in rows)
        cost = (len(rows) - compiled) * ROW_S + compiled * COMPILED_ROW_S
        lines.append(f"benchmarks: {len(rows)} rows of {', '.join(files)} (-k {keyword!r}), {compiled} of "
                     f"them torch.compile'd: {cost:.0f} s")
        seconds += START_S + cost
    if stage == 4:
        lines.append(f"inference: gpu_inference.py, 2 widths x 2 batches x 4 paths (2 compiled) and a "
                     f"256-frame cine end to end ({START_S + INFERENCE_S:.0f} s; a lead, never run)")
        seconds += START_S + INFERENCE_S
    return lines, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plan and budget of the GPU run's stages.")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), required=True)
    p.add_argument("--budget", type=float, default=STAGE_BUDGET_S)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--bench", nargs="*", default=[], help="stages 2, 3: the benchmark files")
    p.add_argument("--bench-k", default="", help="stages 2, 3: their -k expression")
    args = p.parse_args(argv)
    lines, seconds = plan(args.stage, args.quick, args.shards, (tuple(args.bench), args.bench_k))
    fits = seconds <= args.budget
    print(f"estimate {seconds:.0f} s of {args.budget:.0f} s: {'fits' if fits else 'DOES NOT FIT'}")
    for line in lines:
        print(f"  - {line}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
