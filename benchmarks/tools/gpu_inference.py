"""GPU inference paths of speckle-denoise (issue 25, stage 3 of the GPU script): run when a GPU
is lent; nothing here runs on a CPU.

    python -m benchmarks.tools.gpu_inference --out benchmarks/results/<gpu>-<date>

Br-U-Net widths 8 and 32 at 480x640 (random seeded weights, non-trivial eval norms:
benchmarks.inference_cases.infer_network), batches 8 and 32, on the engine's CUDA paths
(models/inference/engine.py):
    eager_fp32        the judge: eval network, fp32, NCHW, TF32 off
    bf16              folded, channels_last, bf16 autocast
    bf16_graph        the same, captured in a CUDA graph (static buffers), speckle-denoise's default
    bf16_compiled     the same, torch.compile (Inductor)
Each row: frames/s (CUDA events, median of 20 after warm-up), GFLOP/s and fraction of the
measured bf16 torch.matmul peak, agreement with eager fp32 (fraction of 8-bit pixels within one
grey level, bar 0.99; a row below it is marked failed, not hidden). Then speckle-denoise end to
end on a 256-frame 480x640 TIFF cine (CPU decode/encode, GPU network), frames/s and the stage
shares. Issue 25's target: >= 500 frames/s for width 32 at 480x640 on an H200.
Writes gpu_inference.json and gpu_inference.md into --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from benchmarks.common import device_name, matmul_peak, time_calls
from benchmarks.inference_cases import infer_input, infer_network

PATHS = {"bf16": dict(cuda_graph=False), "bf16_graph": dict(cuda_graph=True),
         "bf16_compiled": dict(compile=True, cuda_graph=False)}


def run_rows(widths, batches, device) -> list[dict]:
    from speckle_models.inference.engine import Engine, agreement, choose_path
    from speckle_models.networks.flops import forward_flops

    peak = matmul_peak(device)["bf16"]
    rows = []
    for width in widths:
        model = infer_network("br-unet", width, device)
        for batch in batches:
            x = infer_input(batch, 480, 640, device)
            gflop = forward_flops(model, x[:1]) / 1e9
            torch.backends.cudnn.allow_tf32 = False
            with torch.no_grad():
                ref = model(x)
                times = time_calls(lambda: model(x), device, 20, 5)
            torch.backends.cudnn.allow_tf32 = True
            candidates = {"eager_fp32": (lambda: model(x), 1.0, statistics.median(times))}
            for name, kw in PATHS.items():
                try:
                    engine = Engine(model, choose_path(device, precision="bf16", compile=kw.get("compile", False),
                                                       cuda_graph=kw["cuda_graph"]), check=False)
                    engine.first_batch(x)
                    share = agreement(engine(x), ref)
                    median = statistics.median(time_calls(lambda: engine(x), device, 20, 5))
                    candidates[name] = (engine, share, median)
                except Exception as e:  # reported, not hidden
                    rows.append({"width": width, "batch": batch, "path": name,
                                 "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            for name, (_, share, median) in candidates.items():
                rate = gflop * batch / median
                rows.append({"width": width, "batch": batch, "path": name, "frames_per_s": batch / median,
                             "gflop_per_frame": gflop, "gflops": rate, "bf16_peak_fraction": rate * 1e9 / peak,
                             "agreement": share, "passed": share >= 0.99})
                print(rows[-1], flush=True)
    return rows


def end_to_end(width: int, frames: int, device) -> dict:
    import numpy as np
    import tifffile

    from benchmarks.tools.realtime_cpu import phantom_cine, save_checkpoint
    from speckle_models.inference.denoise import build_parser, run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = save_checkpoint(infer_network("br-unet", width, torch.device("cpu")), width, tmp / "w.pt")
        cine = tmp / "cine.tif"
        tifffile.imwrite(cine, np.asarray(phantom_cine(frames, 480, 640)), photometric="minisblack", metadata=None)
        args = build_parser().parse_args([str(ckpt), str(cine), "--out", str(tmp / "out"), "--format", "tiff",
                                          "--no-progress", "--device", "cuda"])
        return run(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[8, 32])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--frames", type=int, default=256, help="frames of the end-to-end cine")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_inference: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    report = {"device": device_name(device), "date": date.today().isoformat(), "torch": torch.__version__,
              "rows": run_rows(args.widths, args.batches, device),
              "end_to_end": {w: end_to_end(w, args.frames, device) for w in args.widths}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_inference.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# GPU inference, {report['device']}, {report['date']}", "",
             "| width | batch | path | frames/s | GFLOP/s | bf16 peak | agreement |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['width']} | {r['batch']} | {r['path']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['width']} | {r['batch']} | {r['path']} | {r['frames_per_s']:.0f} | "
                         f"{r['gflops']:.0f} | {r['bf16_peak_fraction']:.1%} | {r['agreement']:.4f} |")
    for w, s in report["end_to_end"].items():
        lines.append(f"\nEnd to end, width {w}: {s['frames_per_s']:.0f} frames/s ({s['path']['description']}; "
                     f"shares {s['pipeline']})")
    (args.out / "gpu_inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
