"""Benchmarks: every implementation side by side, each checked against the reference first.

    common.py               device and size, timing, copy bandwidth, bytes, the comparison helper
    batch_renorm_cases.py   BatchRenorm shapes, implementations and checks
    noise_cases.py          speckle-noise shapes, implementations and checks
    ssim_cases.py           SSIM against scikit-image
    train_step_cases.py     one training step of Br-U-Net and D-U-Net
    inference_cases.py      images/s of each network: eager, folded, compiled
    test_bench_*.py         the pytest-benchmark groups (python -m pytest benchmarks --benchmark-only)
    gpu_check.py, tune_gpu.py, cpu_paths.py, page_fault_floor.py, report.py, run_gpu.sh: tools
"""
