"""pytest-benchmark setup: size option, device, the session's copy bandwidth, and `timed`.

    pytest benchmarks --benchmark-only                     # small on a CPU, full on a GPU
    SPECKLE_BENCH_SIZE=full pytest benchmarks --benchmark-only --benchmark-json=out.json
    python -m benchmarks.tools.results_report out.json --out DIR         # markdown table + PNG chart
    SPECKLE_BENCH_JSONL=rows.jsonl pytest benchmarks ...   # also one JSON line a row, as it finishes

Triton must not run under its interpreter here (that is a correctness tool, not a speed):
the Triton implementations are skipped on CPU tensors whatever TRITON_INTERPRET says.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest
import torch

from .common import bench_device, bench_size, copy_bandwidth, device_name, matmul_peak, rounds_for, synchronize


def pytest_addoption(parser):
    parser.addoption("--speckle-size", choices=("small", "full"), default=None,
                     help="benchmark sizes (default: SPECKLE_BENCH_SIZE, else full on a GPU, small on a CPU)")
    parser.addoption("--speckle-device", default=None,
                     help="device to benchmark on (default: SPECKLE_BENCH_DEVICE, else cuda if present)")


def pytest_configure(config):
    # Parametrization reads these at collection, so the options become the variables first.
    if config.getoption("--speckle-size", None):
        os.environ["SPECKLE_BENCH_SIZE"] = config.getoption("--speckle-size")
    if config.getoption("--speckle-device", None):
        os.environ["SPECKLE_BENCH_DEVICE"] = config.getoption("--speckle-device")


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """Default grouping: one terminal table per group and case, implementations side by side
    (the JSON keeps the plain group names). Other --benchmark-group-by values: the plugin's."""
    if group_by != "group":
        return None
    groups = defaultdict(list)
    for bench in benchmarks:
        case = (bench["extra_info"] or {}).get("case")
        groups[f"{bench['group']}: {case}" if case else bench["group"]].append(bench)
    for members in groups.values():
        members.sort(key=lambda b: b["name"])
    return sorted(groups.items(), key=lambda pair: pair[0] or "")


DEVICE = bench_device()
SIZE = bench_size(DEVICE)


@pytest.fixture(scope="session")
def copy_speed():
    """dst.copy_(src) far beyond the caches, measured once in this session: the ceiling."""
    return copy_bandwidth(DEVICE)


@pytest.fixture(scope="session")
def matmul_rates():
    """torch.matmul's FLOP/s here (fp32, bf16, int8), measured once in this session: the peaks
    the inference rows are a fraction of."""
    return matmul_peak(DEVICE)


@pytest.fixture
def timed(benchmark, copy_speed):
    """timed(group, impl, case_label, fn, nbytes, rounds_warmup=None, **extra): times fn() with
    pedantic rounds (synchronizing inside on a GPU, warm-up rounds first; rounds_warmup overrides
    the size's (rounds, warm-up rounds)) and records in extra_info the bytes
    the call must move, the achieved GB/s and its fraction of the session's copy bandwidth."""
    default = rounds_for(SIZE, DEVICE)

    def run(group, impl, case, fn, nbytes, *, rounds_warmup=None, **extra):
        rounds, warmup = rounds_warmup or default
        benchmark.group = group
        benchmark.extra_info.update(
            group=group, impl=impl, case=case, bytes=nbytes, device=device_name(DEVICE),
            device_type=DEVICE.type, size=SIZE, copy_gbps=copy_speed["gbps"],
            torch=torch.__version__, threads=torch.get_num_threads(),
            load_avg=os.getloadavg()[0], **extra)

        def target():
            out = fn()
            synchronize(DEVICE)
            return out

        synchronize(DEVICE)
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=warmup)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and nbytes:
            gbps = nbytes / stats.median / 1e9
            benchmark.extra_info.update(gbps=gbps, fraction_of_copy=gbps / copy_speed["gbps"])
        write_row(benchmark, stats)
        return stats

    return run


def write_row(benchmark, stats) -> None:
    """With SPECKLE_BENCH_JSONL set, append the row as one JSON line as soon as it is timed:
    pytest-benchmark writes its JSON only at exit, which a run cut off at a deadline never
    reaches (benchmarks/tools/run_gpu.sh)."""
    path = os.environ.get("SPECKLE_BENCH_JSONL")
    if not path or stats is None:
        return
    row = {"name": benchmark.name, "group": benchmark.group, "extra_info": dict(benchmark.extra_info),
           "stats": {k: getattr(stats, k) for k in ("median", "min", "mean", "stddev", "rounds")}}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def checked_or_skipped(check, *, compiled: bool) -> None:
    """Run a row's setup check (its first call also compiles under torch.compile). A wrong
    result always fails; a torch.compile that cannot build here skips the compiled row with
    the reason instead of failing the group."""
    try:
        check()
    except Exception as e:
        if not compiled or isinstance(e, AssertionError):
            raise
        pytest.skip(f"torch.compile failed here: {type(e).__name__}: {e}"[:500])
