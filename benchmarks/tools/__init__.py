"""Scripts around the benchmark groups, each run by hand when its docstring says (python -m
benchmarks.tools.<name>); none is collected by pytest.

    run_gpu.sh          on a lent GPU: build, the kits on the GPU kernels, timings, trainings
    gpu_check.py        on a GPU: every kernel against its kit, then the headline timings
    tune_gpu.py         on a GPU: kernel configurations and op timings, to choose launch sizes
    accuracy_report.py  after a kernel change: each backend's error against float64, as a table
    cpu_paths.py        after a CPU kernel change: what each internal CPU path costs
    page_fault_floor.py when judging the CPU forward: what a fresh output buffer costs
    batch_renorm_act_target.py, compile_designs.py  the norm block's CPU target and compile designs
    results_report.py   after a benchmark run: pytest-benchmark JSON -> markdown table and chart
    make_noise_figure.py  after a noise-model change: docs/figures/noise_examples.png
"""
