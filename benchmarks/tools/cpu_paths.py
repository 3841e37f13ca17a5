"""The C++ CPU kernels' internal paths side by side, in one run: what each choice buys.

    python -m benchmarks.tools.cpu_paths [--out FILE.md]

1. BatchRenorm schedule x output cache at (32, 64, 128, 128) fp32 (SPECKLE_CPU_RENORM_SCHEDULE,
   SPECKLE_CPU_OUTPUT_CACHE_MB): medians of interleaved calls, forward and forward+backward.
2. The schedules at Br-U-Net's batch-32 norm shapes (min of repeats): where the auto rule of
   csrc/cpu/batch_renorm_cpu.cpp switches.
3. The noise kernel's lane paths (SPECKLE_CPU_NOISE_LANES) on one thread, make_noisy_batch at
   32x1x128x128 (best of 7 means of 50 calls).
The kernels read these variables on every call, so one process times every path. Correctness
of each path is the tests' job (tests/test_ext_cpu.py, tests/test_ext_noise.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from ..common import device_name
from ..batch_renorm_cases import RenormState, forward_backward, renorm_impl, renorm_input

CPU = torch.device("cpu")
SHAPES = [(32, 64, 128, 128), (32, 32, 128, 128), (32, 64, 64, 64), (32, 128, 32, 32),
          (32, 256, 16, 16), (32, 512, 8, 8)]


def _call(fn, x, state, dy, mode):
    if mode == "forward":
        with torch.no_grad():
            fn(x, state)
    else:
        forward_backward(fn, x, state, dy)


def _setenv(**values):
    for key, value in values.items():
        os.environ[key] = value


def schedule_and_cache(rounds: int = 10) -> list[str]:
    shape = (32, 64, 128, 128)
    x = renorm_input(shape, torch.float32, False, CPU).requires_grad_()
    dy = torch.randn_like(x)
    fn, state = renorm_impl("cpu", CPU, torch.float32), RenormState(shape[1], CPU, grad=True)
    configs = [(s, c) for c in ("0", "1024") for s in ("split", "per-channel")]
    times: dict = {}
    for _ in range(rounds):
        for sched, cache in configs:
            _setenv(SPECKLE_CPU_RENORM_SCHEDULE=sched, SPECKLE_CPU_OUTPUT_CACHE_MB=cache)
            for mode in ("forward", "forward+backward"):
                _call(fn, x, state, dy, mode)  # the cache's first output is fresh
                for _ in range(3):
                    t0 = time.perf_counter()
                    _call(fn, x, state, dy, mode)
                    times.setdefault((sched, cache, mode), []).append(time.perf_counter() - t0)
    lines = ["## Schedule x output cache, (32, 64, 128, 128) fp32 (medians)", "",
             "| schedule | output cache | forward | forward+backward |", "|---|---|---:|---:|"]
    for sched, cache in configs:
        row = [f"{statistics.median(times[(sched, cache, m)]) * 1e3:.2f} ms"
               for m in ("forward", "forward+backward")]
        lines.append(f"| {sched} | {'off' if cache == '0' else 'on'} | {row[0]} | {row[1]} |")
    return lines


def schedules_by_shape(repeats: int = 5) -> list[str]:
    _setenv(SPECKLE_CPU_OUTPUT_CACHE_MB="1024")
    fn = renorm_impl("cpu", CPU, torch.float32)
    lines = ["## Schedules at Br-U-Net's batch-32 shapes, fp32 (min of repeats; auto = the default)", "",
             "| shape | MB | split fwd / fwd+bwd | per-channel fwd / fwd+bwd | auto fwd / fwd+bwd |",
             "|---|---:|---:|---:|---:|"]
    for shape in SHAPES:
        x = renorm_input(shape, torch.float32, False, CPU).requires_grad_()
        dy = torch.randn_like(x)
        state = RenormState(shape[1], CPU, grad=True)
        calls = 4 if x.numel() > 2**22 else 20
        best: dict = {}
        for _ in range(repeats):
            for sched in ("split", "per-channel", "auto"):
                _setenv(SPECKLE_CPU_RENORM_SCHEDULE=sched)
                for mode in ("forward", "forward+backward"):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        _call(fn, x, state, dy, mode)
                    t = (time.perf_counter() - t0) / calls
                    best[(sched, mode)] = min(best.get((sched, mode), t), t)
        cells = [f"{best[(s, 'forward')] * 1e3:.2f} / {best[(s, 'forward+backward')] * 1e3:.2f} ms"
                 for s in ("split", "per-channel", "auto")]
        lines.append(f"| {'x'.join(map(str, shape))} | {x.nbytes / 2**20:.1f} | " + " | ".join(cells) + " |")
    return lines


def noise_lanes() -> list[str]:
    from speckle_kernels import noise_ext

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    u8 = torch.randint(0, 256, (32, 1, 128, 128), dtype=torch.uint8)
    lines = ["## Noise lane paths, make_noisy_batch 32x1x128x128 -> fp32, one thread "
             "(best of 7 means of 50 calls)", "", "| lanes | time |", "|---:|---:|"]
    try:
        for width in torch.ops.speckle_kernels.cpu_noise_lane_widths():
            _setenv(SPECKLE_CPU_NOISE_LANES=str(width))
            for _ in range(10):
                noise_ext.make_noisy_batch(u8, factor=5.0, seed=1)
            best = float("inf")
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(50):
                    noise_ext.make_noisy_batch(u8, factor=5.0, seed=1)
                best = min(best, (time.perf_counter() - t0) / 50)
            lines.append(f"| {width} | {best * 1e3:.3f} ms |")
    finally:
        torch.set_num_threads(threads)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    saved = {k: os.environ.get(k) for k in ("SPECKLE_CPU_RENORM_SCHEDULE", "SPECKLE_CPU_OUTPUT_CACHE_MB",
                                            "SPECKLE_CPU_NOISE_LANES")}
    try:
        sections = [schedule_and_cache(), schedules_by_shape(), noise_lanes()]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    head = [f"# C++ CPU kernel paths, {device_name(CPU)}, {time.strftime('%Y-%m-%d')}, "
            f"load average {os.getloadavg()[0]:.1f}", ""]
    text = "\n".join(head + [line for s in sections for line in s + [""]])
    print(text)
    if args.out:
        from speckle_models.atomic_write import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
