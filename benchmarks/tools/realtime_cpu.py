"""Real-time despeckling on this machine: every inference path against the bare eager fp32
forward, and speckle-denoise end to end on a cine file, in ONE run (issue 25's targets are
ratios measured together, since the machine is shared and noisy).

    python -m benchmarks.tools.realtime_cpu --widths 8 32 --out benchmarks/results/cpu-2026-12-03
    python -m benchmarks.tools.realtime_cpu --checkpoints runs/w8/checkpoint.pt ...   # trained nets

Per width (Br-U-Net at 480x640, phantom frames: a B-mode phantom with physical speckle,
data/phantom.py, cropped from 640x640 images, written as an 8-bit multi-page TIFF cine):
- bare: eager fp32, norms unfolded, NCHW, batch 1, the network alone (the judge and the
  denominator of every ratio): in each round, the wall time of the bare forward over all the
  cine's frames (a total, like the end-to-end run's, not a median: on a loaded machine the
  slow tail is part of what a run costs);
- each path (engine.py) alone, seconds a frame at batch 1 and at speckle-denoise's CPU batch,
  and its agreement with bare on the phantom frames (fraction of 8-bit pixels within one grey
  level; the bar is 0.99); torch.compile and int8 also report their setup seconds, which give
  the compile break-even in frames: setup / (t_eager_path - t_compiled);
- end to end: speckle-denoise (its main(), default path) from the cine file to a written
  multi-page TIFF, pipelined and with --no-pipeline, frames/s and the decode/network/encode shares;
  and with --whole-frame (the network on the whole frame with its own padding, no tissue crop:
  the default crops the detected tissue with a reflected margin of the receptive radius, 61 px
  on each side for the U-Nets, so the network sees more pixels than the frame has).
Rounds interleave bare and end-to-end runs; medians are reported with their ratio. Beside
them: GFLOP a frame (torch's flop counter), this CPU's fp32 matmul rate measured in the same run
(benchmarks.common.matmul_peak) and the fraction of it each frames/s figure is, with the rate
30 frames/s would need: the hardware's limit, read against the target.
Writes realtime.json and realtime.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import device_name, matmul_peak
from benchmarks.inference_cases import infer_network


def phantom_cine(frames: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(frames, h, w) uint8: distinct phantom images cycled (a cine of a few views)."""
    from speckle_models.data.phantom import generate_phantom

    views = min(frames, 4)
    images, _ = generate_phantom(views, image_size=max(h, w), seed=seed, progress=False)
    crops = images[:, 0, :h, :w].numpy()
    return np.stack([crops[k % views] for k in range(frames)])


def per_frame(fn, x: torch.Tensor, reps: int) -> float:
    fn(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / x.shape[0]


def to_input(frames: np.ndarray) -> torch.Tensor:
    v = torch.from_numpy(frames.astype(np.float32) / np.float32(255))
    return ((v - 0.5) / 0.5)[:, None]


def measure_paths(model, frames: np.ndarray, paths: list[str], batch: int, reps: int) -> dict:
    from speckle_models.inference.engine import Engine, agreement, choose_path

    x1, xb = to_input(frames[:1]), to_input(frames[:batch])
    check = to_input(frames[:4])
    with torch.no_grad():
        bare = lambda x: model(x)  # noqa: E731
        reference = torch.cat([bare(check[k:k + 1]) for k in range(len(check))])
        out = {"bare": {"s_per_frame_b1": per_frame(bare, x1, reps),
                        "s_per_frame_batch": per_frame(bare, xb, reps), "agreement": 1.0}}
    options = {"folded": dict(channels_last=False), "folded+channels_last": {},
               "bf16": dict(precision="bf16"), "compiled": dict(compile=True),
               "int8": dict(precision="int8", compile=True), "unfolded+channels_last": dict(fold=False)}
    for name in paths:
        kw = dict(precision="fp32", compile=False)
        kw.update(options[name])
        try:
            engine = Engine(model, choose_path("cpu", **kw), check=False)
            t0 = time.perf_counter()
            engine.first_batch(x1)
            engine(x1)
            setup_1 = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine(xb)
            setup_b = time.perf_counter() - t0
            row = {"s_per_frame_b1": per_frame(engine, x1, reps),
                   "s_per_frame_batch": per_frame(engine, xb, reps),
                   "setup_s_b1": setup_1, "setup_s_batch": setup_b,
                   "agreement": min(agreement(engine(check[k:k + 1]), reference[k:k + 1])
                                    for k in range(len(check))),
                   "path": engine.path.describe()}
        except Exception as e:  # a path that cannot run here is reported, not hidden
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        out[name] = row
        print(name, {k: v for k, v in row.items() if k != "path"}, flush=True)
    return out


def end_to_end(checkpoint: Path, cine: Path, out: Path, extra: list[str]) -> dict:
    from speckle_models.inference.denoise import build_parser, run

    args = build_parser().parse_args([str(checkpoint), str(cine), "--out", str(out), "--format", "tiff",
                                      "--overwrite", "--no-progress", "--device", "cpu", *extra])
    return run(args)


def save_checkpoint(model, width: int, path: Path) -> Path:
    from dataclasses import asdict

    from speckle_models.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
    from speckle_models.training.config import TrainConfig

    cfg = asdict(TrainConfig(model="br-unet", out="run", width=width).resolved())
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": cfg, "epoch": 0,
                "model": model.state_dict(), "optimizer": {}, "rng": {}, "history": []}, path)
    return path


def run_width(width: int, checkpoint: Path | None, args, tmp: Path) -> dict:
    from speckle_models.inference.denoise import load_denoiser

    if checkpoint is None:
        model = infer_network("br-unet", width, torch.device("cpu"))
        checkpoint = save_checkpoint(model, width, tmp / f"w{width}.pt")
    else:
        model = load_denoiser(checkpoint, "cpu")
    frames = phantom_cine(args.frames, 480, 640)
    cine = tmp / f"cine{width}.tif"
    import tifffile
    tifffile.imwrite(cine, frames, photometric="minisblack", metadata=None)
    result = {"width": width, "checkpoint": str(checkpoint) if args.checkpoints else "random weights, "
              "non-trivial eval norms (benchmarks.inference_cases.infer_network)", "frames": args.frames}
    from speckle_models.networks.flops import forward_flops

    result["gflop_per_frame"] = forward_flops(model.eval(), to_input(frames[:1])) / 1e9
    result["paths"] = measure_paths(model, frames, args.paths, 2, args.reps)  # batch 1 against 2
    rounds = []
    inputs = [to_input(frames[k:k + 1]) for k in range(len(frames))]
    for r in range(args.rounds):
        with torch.no_grad():  # the bare loop over the same frames, timed whole like a run
            model(inputs[0])
            t0 = time.perf_counter()
            for x in inputs:
                model(x)
            bare = (time.perf_counter() - t0) / len(inputs)
        e2e = end_to_end(checkpoint, cine, tmp / "out", [])
        loop = end_to_end(checkpoint, cine, tmp / "out", ["--no-pipeline"])
        whole = end_to_end(checkpoint, cine, tmp / "out", ["--whole-frame"])
        rounds.append({"bare_fps": 1 / bare, "e2e": e2e, "loop": loop, "whole_frame": whole})
        print(f"width {width} round {r}: bare {1 / bare:.2f} fps, end to end {e2e['frames_per_s']:.2f}, "
              f"loop {loop['frames_per_s']:.2f} ({e2e['path']['description']})", flush=True)
    bare_fps = statistics.median(r["bare_fps"] for r in rounds)
    e2e_fps = statistics.median(r["e2e"]["frames_per_s"] for r in rounds)
    loop_fps = statistics.median(r["loop"]["frames_per_s"] for r in rounds)
    whole_fps = statistics.median(r["whole_frame"]["frames_per_s"] for r in rounds)
    result.update(rounds=rounds, bare_fps=bare_fps, end_to_end_fps=e2e_fps, loop_fps=loop_fps,
                  whole_frame_fps=whole_fps, whole_frame_over_bare=whole_fps / bare_fps,
                  end_to_end_over_bare=e2e_fps / bare_fps, pipeline_over_loop=e2e_fps / loop_fps)
    return result


def markdown(report: dict) -> str:
    lines = [f"# Real-time despeckling, {report['device']}, {report['date']}", "",
             f"torch {report['torch']}, {report['threads']} threads, load average at start "
             f"{report['load_avg']:.1f}. Command: `{report['command']}`", "",
             f"fp32 matmul (512x512, same run): {report['matmul_fp32_gflops']:.1f} GFLOP/s. At "
             "GFLOP a frame g, 30 frames/s needs 30 g GFLOP/s.", "",
             "| width | GFLOP a frame | 30 frames/s needs | bare: share of the matmul rate | end to end: share |",
             "|---|---|---|---|---|"]
    peak = report["matmul_fp32_gflops"]
    for w in report["widths"]:
        g = w["gflop_per_frame"]
        lines.append(f"| {w['width']} | {g:.2f} | {30 * g:.0f} GFLOP/s ({30 * g / peak:.1f}x the matmul rate) | "
                     f"{w['bare_fps'] * g / peak:.2f} | {w['end_to_end_fps'] * g / peak:.2f} |")
    lines += ["",
             "| width | bare eager fp32 (frames/s) | end to end (frames/s) | ratio | loop (frames/s) | "
             "pipeline / loop | --whole-frame (frames/s, ratio) | path | decode / network / encode share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in report["widths"]:
        p = w["rounds"][-1]["e2e"]["pipeline"]
        lines.append(f"| {w['width']} | {w['bare_fps']:.2f} | {w['end_to_end_fps']:.2f} | "
                     f"{w['end_to_end_over_bare']:.2f}x | {w['loop_fps']:.2f} | {w['pipeline_over_loop']:.2f}x | "
                     f"{w['whole_frame_fps']:.2f}, {w['whole_frame_over_bare']:.2f}x | "
                     f"{w['rounds'][-1]['e2e']['path']['description']} | {p['decode_share']:.2f} / "
                     f"{p['network_share']:.2f} / {p['encode_share']:.2f} |")
    lines += ["", "Paths alone (seconds a frame; agreement = fraction of 8-bit pixels within one grey "
              "level of bare eager fp32, bar 0.99):", "",
              "| width | path | batch 1 (ms) | batch 2 (ms) | vs bare (b1) | agreement | setup (s) |",
              "|---|---|---|---|---|---|---|"]
    for w in report["widths"]:
        bare = w["paths"]["bare"]["s_per_frame_b1"]
        for name, row in w["paths"].items():
            if "error" in row:
                lines.append(f"| {w['width']} | {name} | - | - | - | - | {row['error']} |")
                continue
            lines.append(f"| {w['width']} | {name} | {row['s_per_frame_b1'] * 1e3:.1f} | "
                         f"{row['s_per_frame_batch'] * 1e3:.1f} | {bare / row['s_per_frame_b1']:.2f}x | "
                         f"{row['agreement']:.4f} | {row.get('setup_s_b1', 0):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[8, 32])
    p.add_argument("--checkpoints", nargs="+", type=Path, help="trained checkpoints (one a width, in order)")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--paths", nargs="+", default=["folded", "folded+channels_last", "bf16", "compiled", "int8"])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    report = {"device": device_name(torch.device("cpu")), "date": date.today().isoformat(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_avg": os.getloadavg()[0],
              "matmul_fp32_gflops": matmul_peak(torch.device("cpu"))["fp32"] / 1e9,
              "command": "python -m benchmarks.tools.realtime_cpu " +
              " ".join(sys.argv[1:] if argv is None else argv), "widths": []}
    from speckle_models.atomic_write import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, width in enumerate(args.widths):
            ckpt = args.checkpoints[i] if args.checkpoints else None
            report["widths"].append(run_width(width, ckpt, args, Path(tmp)))
            # written after each width: a long run that is stopped keeps what it measured
            atomic_write_text(args.out / "realtime.json", json.dumps(report, indent=2) + "\n")
            atomic_write_text(args.out / "realtime.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
