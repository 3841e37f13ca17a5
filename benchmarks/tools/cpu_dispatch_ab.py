"""A/B of two builds of the C++ CPU extension, in one run: interleaved worker processes (two
libraries register the same ops, so one process holds one), min of repetitions per worker; over
the rounds both the min and the median of those mins, as ratios to the first build, not absolute
times (the machine is shared: a min alone rewards whichever build met a quiet moment).

usage: python -m benchmarks.tools.cpu_dispatch_ab OUT_DIR NAME=LIB[:CAPABILITY] ... [--rounds 5]
       python -m benchmarks.tools.cpu_dispatch_ab --reference OUT_DIR   (the installed package's C++
       kernel against backend="reference": FusedBatchRenorm2d forward+backward, one process)
e.g.   old=/tmp/old_C.so  new=speckle_kernels/_C.so:avx2  new-default=speckle_kernels/_C.so:default
A CAPABILITY sets SPECKLE_CPU_CAPABILITY for that worker (the dispatched build's variant).
Writes dispatch_ab.json and dispatch_ab.md to OUT_DIR.

The ops are called directly (torch.ops.speckle_kernels.*), so an old library runs without the
Python package of its day. Shapes: BatchRenorm and the norm block (leaky_relu, dropout 0.1) at
(32, 64, 128, 128) fp32; noise on (32, 1, 256, 256) fp32 and the batch maker on uint8.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time

SHAPE = (32, 64, 128, 128)
RMAX = [0.0, 5000.0, 1.0, 3.0]  # slope, start, low, high: any valid schedule
DMAX = [0.0, 5000.0, 0.0, 5.0]


def _worker(lib: str, reps: int) -> dict:
    import torch

    torch.ops.load_library(lib)
    ops = torch.ops.speckle_kernels
    torch.manual_seed(0)
    c = SHAPE[1]
    x = torch.randn(SHAPE) * 2 + 0.5
    dy = torch.randn(SHAPE)
    w, b = torch.rand(c) + 0.5, torch.randn(c)

    def state():
        return torch.zeros(c), torch.ones(c), torch.tensor(100)

    def fwd():
        return ops.batch_renorm_forward(x, w, b, *state(), True, 0.01, 1e-3, RMAX, DMAX)

    def fwd_bwd():
        y, stats = fwd()
        return ops.batch_renorm_backward(dy, x, w, stats, True)

    rng = torch.tensor([1234, 0], dtype=torch.long)

    def block_fwd_bwd():
        y, stats = ops.batch_renorm_act_forward(x, w, b, *state(), True, 0.01, 1e-3, RMAX, DMAX, 2, 0.1, 0.1, rng)
        return ops.batch_renorm_act_backward(dy, x, w, stats, True, 2, 0.1, 0.1, rng)

    img = torch.rand(32, 1, 256, 256)
    u8 = (img * 255).to(torch.uint8)

    def noise():
        return ops.add_speckle_noise(img, 7, 0, 1.0, 0.1, 0.5, 0.02, False, True)

    def noisy_batch():
        return ops.make_noisy_batch(u8, 7, 0, 1.0, 0.1, 0.5, 0.02, True, True, torch.float32)

    cases = {"batch_renorm_fwd": fwd, "batch_renorm_fwd_bwd": fwd_bwd, "norm_block_fwd_bwd": block_fwd_bwd,
             "noise_fp32": noise, "noisy_batch_u8": noisy_batch}
    times = {}
    for name, fn in cases.items():
        fn()  # warm: the output cache, the pages
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    capability = ops.cpu_capability() if hasattr(ops, "cpu_capability") else "single-flag build"
    return {"times": times, "capability": str(capability), "threads": torch.get_num_threads()}


def _reference_ratio(out_dir: str) -> None:
    """FusedBatchRenorm2d forward+backward at SHAPE fp32 through the installed package: the C++
    kernel (a just-in-time build first if need be) against the plain-PyTorch reference."""
    import torch

    import speckle_kernels as sk

    x = torch.randn(SHAPE, requires_grad=True)
    dy = torch.randn(SHAPE)
    best = {}
    for backend, reps in (("cpu", 5), ("reference", 3), ("cpu", 5)):  # cpu twice: before and after
        m = sk.FusedBatchRenorm2d(SHAPE[1], backend=backend)
        m(x).backward(dy)  # warm
        for _ in range(reps):
            x.grad = None
            t0 = time.perf_counter()
            m(x).backward(dy)
            best[backend] = min(best.get(backend, float("inf")), time.perf_counter() - t0)
    record = {"date": datetime.date.today().isoformat(), "device": _cpu_model(), "shape": list(SHAPE),
              "threads": torch.get_num_threads(), "cpu_kernels": str(torch.ops.speckle_kernels.cpu_capability()),
              "obtained": sk._ext.cpu_status()["how"], "min_seconds": best,
              "reference_over_cpu": best["reference"] / best["cpu"]}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "reference_ratio.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--worker":
        print(json.dumps(_worker(argv[1], int(argv[2]))))
        return
    if argv and argv[0] == "--reference":
        _reference_ratio(argv[1])
        return
    rounds = 5
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    out_dir, builds = argv[0], []
    for spec in argv[1:]:
        name, rest = spec.split("=", 1)
        lib, _, capability = rest.partition(":")
        builds.append((name, os.path.abspath(lib), capability or None))
    per_round: dict = {name: {} for name, _, _ in builds}
    info: dict = {}
    for r in range(rounds):
        for name, lib, capability in builds:  # interleaved: each round runs every build once
            env = {k: v for k, v in os.environ.items() if k != "SPECKLE_CPU_CAPABILITY"}
            if capability:
                env["SPECKLE_CPU_CAPABILITY"] = capability
            out = subprocess.run([sys.executable, __file__, "--worker", lib, "5"], capture_output=True,
                                 text=True, env=env, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            info[name] = {"capability": result["capability"], "threads": result["threads"]}
            for op, t in result["times"].items():
                per_round[name].setdefault(op, []).append(t)
            print(f"round {r + 1}/{rounds} {name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms"
                                                            for k, v in result["times"].items()), flush=True)
    base = builds[0][0]
    best = {name: {op: min(ts) for op, ts in ops.items()} for name, ops in per_round.items()}
    median = {name: {op: statistics.median(ts) for op, ts in ops.items()} for name, ops in per_round.items()}
    ratios = {name: {op: best[name][op] / best[base][op] for op in best[base]} for name in best}
    median_ratios = {name: {op: median[name][op] / median[base][op] for op in best[base]} for name in best}
    record = {"date": datetime.date.today().isoformat(), "device": _cpu_model(), "shape": list(SHAPE),
              "rounds": rounds, "reps_per_round": 5, "builds": {n: {"library": lib, **info[n]} for n, lib, _ in builds},
              "min_seconds": best, "median_of_round_mins_seconds": median, "per_round_mins_seconds": per_round,
              "ratio_to_" + base: ratios, "median_ratio_to_" + base: median_ratios}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "dispatch_ab.json"), "w") as f:
        json.dump(record, f, indent=1)
    ops = list(best[base])
    lines = [f"# CPU dispatch A/B ({record['date']}, {record['device']}, {info[base]['threads']} threads)", "",
             f"Time of each build over `{base}`'s: each cell is min / median over {rounds} interleaved rounds "
             "of the min of 5 repetitions (below 1 is faster). BatchRenorm and the norm block at "
             "(32, 64, 128, 128) fp32.", "",
             "| build (variant) | " + " | ".join(ops) + " |", "|---|" + "---|" * len(ops)]
    for name in best:
        lines.append(f"| {name} ({info[name]['capability']}) | "
                     + " | ".join(f"{ratios[name][op]:.2f} / {median_ratios[name][op]:.2f}" for op in ops) + " |")
    with open(os.path.join(out_dir, "dispatch_ab.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
