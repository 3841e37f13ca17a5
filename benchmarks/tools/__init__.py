"""Scripts around the benchmark groups, each run by hand when its docstring says (python -m
benchmarks.tools.<name>); none is collected by pytest.

    run_gpu.sh          on a lent GPU, one stage a call: 1 kits and checkpoint tests, 2 timings,
                        3 training and inference benchmarks; --dry-run anywhere (CI)
    gpu_plan.py         before a GPU run (run_gpu.sh --dry-run): each stage's items and budget
    gpu_check.py        on a GPU (stages 1, 2): every kernel against its kit, the headline timings
    triton_aot_report.py  after a Triton kernel change: registers and spills for sm_80/sm_90
    tune_gpu.py         on a GPU: kernel configurations and op timings, to choose launch sizes
    accuracy_report.py  after a kernel change: each backend's error against float64, as a table
    cpu_paths.py        after a CPU kernel change: what each internal CPU path costs
    page_fault_floor.py when judging the CPU forward: what a fresh output buffer costs
    batch_renorm_act_target.py, compile_designs.py  the norm block's CPU target and compile designs
    results_report.py   after a benchmark run: pytest-benchmark JSON -> markdown table and chart
    make_noise_figure.py  after a noise-model change: docs/figures/noise_examples.png
"""
