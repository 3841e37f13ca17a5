"""Benchmarks: every implementation side by side, each checked against the reference first.

    python -m pytest benchmarks --benchmark-only

    conftest.py                 pytest-benchmark setup: size, device, copy bandwidth, timed rows
    common.py                   device and size, timing, copy bandwidth, bytes, the comparison helper
    batch_renorm_cases.py       BatchRenorm shapes, implementations and checks
    batch_renorm_act_cases.py   the norm block against BN2d / renorm + LeakyReLU + Dropout
    noise_cases.py              speckle-noise shapes, implementations and checks
    ssim_cases.py               SSIM against scikit-image
    train_step_cases.py         one training step of Br-U-Net and D-U-Net
    inference_cases.py          images/s of each network: eager, folded, compiled
    test_bench_*.py             the pytest-benchmark groups, one per cases module
    tools/                      scripts run by hand (GPU run and check, tuning, studies, reports)
"""
