"""The network on its fastest exact-enough path, chosen once per run (speckle-denoise's engine).

    path = choose_path(device, precision=None, fold=True, compile=None)
    engine = Engine(model, path, frames=N)  # model: eval-mode network as load_denoiser gives it
    y = engine(x)                           # x: (B, 1, H, W) float32, normalized (v - 0.5) / 0.5

speckle-denoise runs it inside its one streaming path: tissue.TissueDenoiser hands it to
tiling.denoise_frames, which measures the network (engine.source: size multiple, receptive
radius, tile overlap), fills a reused input buffer (engine.staging) and, when the engine runs a
fixed-shape graph (engine.fixed_shape: compiled, int8 or CUDA graph), pads a short last batch to
the batch size by repeating its last piece, so one graph serves a file. The first call settles
the path (first_batch, below).

The path (InferencePath, printed in speckle-denoise's summary):
- fold: eval norms folded into the convolutions (networks/fold.py); same output up to rounding.
- channels_last: NHWC activations, the layout oneDNN's (and cuDNN's) fast convolutions want;
  the issue measured it 1.3-1.8x on an AVX-512 EPYC at 480x640.
- precision: "bf16" (autocast) where the hardware has native bf16: CUDA with bf16 support, or a
  CPU with AVX512-BF16 / AMX-BF16 (torch.cpu's capability probe, which reads CPUID, and
  oneDNN's own bf16 check must both say so). Elsewhere bf16 is emulated and slower than fp32
  (measured 2-4x slower on this AVX2 EPYC), so the default there is "fp32". "int8": PT2E
  quantization with the x86 Inductor quantizer (torchao), calibrated on the first batch of the
  user's own frames, lowered by Inductor; CPU only, only when asked (--precision int8).
- compile: torch.compile (Inductor, weights frozen) of the folded network when the run has
  enough frames to pay for the compilation: it pays after compile_s / (t_eager - t_compiled)
  frames. `compile_pays` estimates that from the first batch's eager time and the constants
  below (measured by benchmarks/tools/realtime_cpu.py; the run without a known frame
  count, a stream, is not compiled). int8 is always compiled (it has no fast eager kernels).
- cuda_graph (CUDA): the forward is captured once per input shape into a CUDA graph, with
  static input and output buffers (no launch overhead, no allocation per batch).

Judging a path: `agreement(a, b, levels)` is the fraction of pixels whose output at the file's
own depth (round(v * levels): 255 for 8-bit, 4095 for 12-bit, 65535 for 16-bit) differs by at most
one grey level; the issue's bar is >= 99 % against eager fp32. The engine checks a bf16 or int8
path on the run's first frame (check=True), at the path's `levels`: a path below the bar falls
back to fp32 (folded, channels_last, eager) and the summary says so and why. fp32 paths differ
from eager fp32 by rounding only (tested), so they skip the check and its extra unfolded forward.
bf16 keeps 8 significant bits (unit roundoff 2^-9, ~128 levels of a 16-bit output), so the
default takes bf16 for outputs of at most 8 bits only; on a 12-bit DICOM and a 16-bit PNG it
was 3.5 and 62 levels off (a random width-4 D-U-Net, CI on an AVX512-BF16 EPYC, 2026-12-04).
"""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "int8")
AGREEMENT_BAR = 0.99          # fraction of pixels within one grey level (at the output's depth) of eager fp32
BF16_MAX_LEVELS = 255         # the deepest output the default path runs in bf16 (8 bits)
# Compilation cost and gain on a CPU, from benchmarks/results/cpu-2026-12-04/ (2-core AMD EPYC,
# AVX2): a cold Inductor compile with frozen weights of Br-U-Net width 8 at 480x640 took 33 s at
# batch 1 (realtime-batch2.md; 2-13 s with warm on-disk caches). Against the folded channels_last
# forward the compiled one ran 1.22x (width 8) and 1.48x (width 32) in that run, with tests
# running beside it, and 1.02x and 1.00x on the quiet machine (realtime.md). COMPILE_SECONDS errs
# high and COMPILED_SPEEDUP is near the quiet gain, so the estimate leans towards not compiling:
# width 8 compiles for cines of ~12000 frames, width 32 from ~1000. The GPU's are guesses until
# a GPU run measures them.
COMPILE_SECONDS = {"cpu": 40.0, "cuda": 60.0}
COMPILED_SPEEDUP = {"cpu": 1.1, "cuda": 1.2}


@dataclass(frozen=True)
class InferencePath:
    """How the network runs; `notes` say why each choice was made."""
    device: str
    precision: str = "fp32"
    fold: bool = True
    channels_last: bool = True
    compile: bool | None = False     # None: decided on the first batch from the frame count
    cuda_graph: bool = False
    levels: int = 255                # the output's grey levels: the depth agreement is judged at
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        parts = [self.precision, "norms folded" if self.fold else "norms unfolded",
                 "channels_last" if self.channels_last else "NCHW",
                 {True: "torch.compile", False: "eager", None: "compile undecided"}[self.compile]]
        if self.cuda_graph:
            parts.append("CUDA graph")
        return f"{self.device}: " + ", ".join(parts)

    def as_dict(self) -> dict:
        return {"device": self.device, "precision": self.precision, "fold": self.fold,
                "channels_last": self.channels_last, "compile": self.compile,
                "cuda_graph": self.cuda_graph, "levels": self.levels, "description": self.describe(),
                "notes": list(self.notes)}


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(has native bf16 arithmetic, why): CUDA's bf16 support, or on a CPU AVX512-BF16 / AMX-BF16
    reported by torch's CPUID probe and by oneDNN's bf16 check."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA bf16 {'supported' if ok else 'not supported'} on {torch.cuda.get_device_name(device)}"
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = [name for name in ("avx512_bf16", "amx_bf16") if caps.get(name)]
    onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    isa = torch.backends.cpu.get_cpu_capability()
    if flags and onednn:
        return True, f"CPU has {'+'.join(flags)} (ATen {isa}, oneDNN bf16)"
    return False, (f"CPU has no native bf16 (ATen {isa}; avx512_bf16/amx_bf16 absent"
                   f"{'' if onednn else ', oneDNN bf16 unsupported'}): bf16 would be emulated")


def choose_path(device: torch.device | str, *, precision: str | None = None, fold: bool = True,
                channels_last: bool = True, compile: bool | None = None,
                cuda_graph: bool | None = None, levels: int = 255) -> InferencePath:
    """The path for this device, for outputs of `levels` grey levels (the deepest file's max
    value). precision None: bf16 where native (native_bf16) and levels <= BF16_MAX_LEVELS, else
    fp32. compile None: decided later from the frame count (Engine.first_batch); True/False
    force. cuda_graph None: on for CUDA."""
    device = torch.device(device)
    if int(levels) < 1:
        raise ValueError(f"levels must be >= 1 (the output's max value), got {levels}")
    notes = []
    if precision is None:
        native, why = native_bf16(device)
        deep = levels > BF16_MAX_LEVELS
        precision = "bf16" if native and not deep else "fp32"
        if native and deep:
            why = (f"bf16's 8 significant bits are too coarse for {levels + 1} grey levels "
                   f"(bf16 is the default for outputs of at most {BF16_MAX_LEVELS + 1})")
        notes.append(f"precision {precision}: {why}")
    elif precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    else:
        notes.append(f"precision {precision}: asked for")
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError("--precision int8 runs on the CPU only (the x86 Inductor quantizer)")
        if compile is False:
            raise ValueError("--precision int8 needs torch.compile (Inductor lowers the int8 graph)")
        compile = True
        notes.append("int8: PT2E, x86 Inductor quantizer, calibrated on the first batch; compiled")
    if not fold:
        notes.append("norms unfolded: asked for (--no-fold)")
    graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    if graph and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    return InferencePath(device=str(device), precision=precision, fold=fold,
                         channels_last=channels_last, compile=compile, cuda_graph=graph and not compile,
                         levels=int(levels), notes=tuple(notes))


def compile_pays(frames: int | None, eager_seconds_per_frame: float, device: torch.device | str) -> tuple[bool, str]:
    """(compile?, why): compiling pays when the frames to go save more than it costs."""
    kind = torch.device(device).type
    cost, speedup = COMPILE_SECONDS[kind], COMPILED_SPEEDUP[kind]
    saved = eager_seconds_per_frame * (1.0 - 1.0 / speedup)
    break_even = cost / saved if saved > 0 else float("inf")
    if frames is None:
        return False, "not compiled: the frame count is unknown (break-even ~%.0f frames)" % break_even
    verdict = frames > break_even
    return verdict, (f"{'compiled' if verdict else 'not compiled'}: {frames} frames "
                     f"{'>' if verdict else '<='} break-even {break_even:.0f} "
                     f"(~{cost:.0f} s compile / {saved * 1e3:.1f} ms saved a frame)")


def agreement(a: torch.Tensor, b: torch.Tensor, levels: int = 255) -> float:
    """Fraction of pixels whose outputs round(v * levels), v = clamp(y, -1, 1) / 2 + 1/2,
    differ by at most one grey level."""
    def grey(y):
        return torch.round((y.double().clamp(-1, 1) * 0.5 + 0.5) * levels)
    return (grey(a) - grey(b)).abs().le(1).float().mean().item()


def _freezing():
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


def _quantize_int8(net: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """PT2E int8: export, insert observers (x86 Inductor quantizer's default static config),
    calibrate on `calibration`, convert to quantize/dequantize pairs for Inductor to fuse."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise ModuleNotFoundError("--precision int8 needs torchao: pip install 'speckle-kernels[int8]' "
                                  "(or: pip install torchao)") from e
    exported = torch.export.export(net, (calibration,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    prepared(calibration)
    return convert_pt2e(prepared)


class Engine:
    """The network on one InferencePath; call it on normalized (B, 1, H, W) float32 batches
    (returns float32). The source model is kept untouched (fold and quantization copy it)."""

    def __init__(self, model: nn.Module, path: InferencePath, *, frames: int | None = None,
                 check: bool = True):
        self.source = model.eval()
        self.path = path
        self.device = torch.device(path.device)
        self.frames, self.check = frames, check
        self.agreement: float | None = None
        self.setup_seconds = 0.0
        self._net = self._prepare(path)
        self._compiled: dict[tuple, object] = {}   # shape -> compiled / int8 / graph runner
        self._staging: dict[tuple, torch.Tensor] = {}
        self.settled = False                          # first_batch has run

    @property
    def fixed_shape(self) -> bool:
        """Whether each new input shape costs a compile or a capture (pad to one shape)."""
        return bool(self.path.compile) or self.path.cuda_graph

    def staging(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused float32 CPU buffer of `shape` for the next input batch (pinned for CUDA, so
        the copy to the device can overlap). Valid until the next call with the same shape;
        the engine's call has finished reading it when it returns."""
        buf = self._staging.get(shape)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")
            self._staging[shape] = buf
        return buf

    def _prepare(self, path: InferencePath) -> nn.Module:
        net = self.source
        if path.fold:
            from speckle_models.networks.fold import fold_norms
            net = fold_norms(net)
        else:
            net = copy.deepcopy(net).eval()
        if path.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.path.channels_last else x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.path.precision == "bf16")

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The path's network without compilation or graphs."""
        with torch.no_grad(), self._autocast():
            return self._net(self._layout(x)).float()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Eager fp32, norms unfolded, NCHW: the judge of every path."""
        with torch.no_grad():
            return self.source(x.to(self.device, torch.float32)).float()

    def first_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The first batch's output, settling what needs a real batch on the way: compile or
        not (from this batch's own eager time, which includes oneDNN's one-off primitive
        creation and so errs towards compiling), int8 calibration (on this batch), and for
        bf16 and int8 the agreement check on its first frame, with a fall-back to fp32 below
        AGREEMENT_BAR. fp32 paths differ from eager fp32 by rounding only (tests/test_realtime.py)
        and are not checked at run time: the check costs an unfolded NCHW forward."""
        t0 = time.perf_counter()
        self.settled = True
        notes = list(self.path.notes)
        if self.path.compile is None:
            y = self.eager_forward(x)
            per_frame = (time.perf_counter() - t0) / x.shape[0]
            pays, why = compile_pays(self.frames, per_frame, self.device)
            notes.append(why)
            self.path = replace(self.path, compile=pays, cuda_graph=self.path.cuda_graph and not pays,
                                notes=tuple(notes))
        else:
            y = self(x)
        self.setup_seconds += time.perf_counter() - t0  # the batch's own forward included
        if self.check and self.path.precision != "fp32":
            t1 = time.perf_counter()
            self.agreement = agreement(y[:1], self.reference(x[:1]), self.path.levels)
            if self.agreement < AGREEMENT_BAR:
                notes.append(f"{self.path.precision} gave {self.agreement:.2%} of pixels within one of "
                             f"{self.path.levels + 1} grey levels of eager fp32 on the first frame "
                             f"(< {AGREEMENT_BAR:.0%}): fell back to fp32")
                self.path = replace(self.path, precision="fp32", compile=False, cuda_graph=False,
                                    notes=tuple(notes))
                self._net, self._compiled = self._prepare(self.path), {}
                y = self(x)
            self.setup_seconds += time.perf_counter() - t1
        return y

    def _runner(self, x: torch.Tensor) -> tuple[object, torch.Tensor | None]:
        """(the forward for x's shape, x's output when making that forward ran it): a new
        shape compiles, quantizes or captures on x, and that call's output is x's."""
        key = (tuple(x.shape), x.dtype)
        run = self._compiled.get(key)
        if run is not None:
            return run, None
        if self.path.precision == "int8":
            with torch.no_grad():
                quantized = _quantize_int8(self._net, self._layout(x))
            compiled = torch.compile(quantized, dynamic=False)
            run = functools.partial(self._call_compiled, compiled, autocast=False)
        elif self.path.compile is None:
            raise RuntimeError("the compile decision is made on the first batch: call first_batch() first")
        elif self.path.compile:
            compiled = torch.compile(self._net, dynamic=False)
            run = functools.partial(self._call_compiled, compiled, autocast=True)
        elif self.path.cuda_graph:
            run = self._capture(x)
        else:
            self._compiled[key] = self.eager_forward
            return self.eager_forward, None
        with _freezing():
            y = run(x)  # compiles / captures now, with frozen weights
        self._compiled[key] = run
        return run, y.clone() if self.path.cuda_graph else y

    def _call_compiled(self, compiled, x: torch.Tensor, *, autocast: bool) -> torch.Tensor:
        with torch.no_grad(), (self._autocast() if autocast else torch.autocast("cpu", enabled=False)):
            return compiled(self._layout(x)).float()

    def _capture(self, x: torch.Tensor):
        """A CUDA graph of the eager forward on static buffers (warmed up on a side stream)."""
        static_in = torch.empty_like(self._layout(x))
        static_in.copy_(self._layout(x))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.eager_forward(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.eager_forward(static_in)

        def replay(batch: torch.Tensor) -> torch.Tensor:
            static_in.copy_(batch, non_blocking=True)
            graph.replay()
            return static_out
        return replay

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.settled:
            return self.first_batch(x)
        run, y = self._runner(x)
        return run(x) if y is None else y
