"""speckle-denoise's fast path inside its one streaming path: the engine's paths (engine.py)
against eager fp32, the engine inside tissue.TissueDenoiser and tiling.denoise_frames, and
tissue.stream_file's pipeline against its loop.

Bounds:
- A path against eager fp32 (issue 25's bar): >= 99 % of 8-bit pixels within one grey level,
  on phantom B-mode frames (physical speckle) and on a pydicom example scanner frame, through
  the same tissue path (crops padded by reflection) the command runs. fp32 paths differ from
  eager fp32 by summation order only: their raw outputs (y in [-1, 1]) within 1e-4, two orders
  of magnitude under one grey level (2 / 255 in y).
- Pipeline against loop (stream_file pipeline=False): the same batches through the same calls,
  so the written frames are equal bit for bit (no tolerance).
- The merged path against the bare network run directly (tiling.denoise_frames on the model +
  quantize): the same float32 arithmetic around a folded channels_last network: at most one
  code apart.
- Tiled against untiled through the engine, with the default overlap: every kept pixel sees the
  same inputs (tiling.py), so only the summation order differs: 1e-5 on v, as tests/test_denoise.py.
- A padded short batch against the same frames unpadded: another batch size may sum in another
  order: 1e-5 on v.
The compiled paths cost a compile each (minutes on a loaded 2-core CPU): CI runs the compiled
fp32 path through the tissue path; int8 runs with SPECKLE_SLOW_TESTS=1.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from speckle_models.inference import denoise as D
from speckle_models.inference import engine as E
from speckle_models.inference import frame_io, regions
from speckle_models.inference.image_io import gray_level, quantize
from speckle_models.inference.tiling import default_overlap, denoise_frames
from speckle_models.inference.tissue import StageTimes, TissueDenoiser, stream_file
from tests.denoise_helpers import cli, random_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
slow = pytest.mark.skipif(not os.environ.get("SPECKLE_SLOW_TESTS"),
                          reason="a second compiled path (minutes); set SPECKLE_SLOW_TESTS=1")


@pytest.fixture(scope="module")
def phantom():
    """Four 64x80 phantom frames (uint8)."""
    from speckle_models.data.phantom import generate_phantom

    images, _ = generate_phantom(4, image_size=80, seed=3, progress=False)
    return [a[0, :64].numpy() for a in images]


@pytest.fixture(scope="module")
def scan():
    """A 160x240 crop of pydicom's GE lymph-node frame (jpeg2k: RGB with power Doppler)."""
    pytest.importorskip("pydicom", reason="DICOM needs pydicom (pip install 'speckle-kernels[dicom]')")
    from pydicom import examples

    from speckle_models.inference import dicom_io

    path = examples.get_path("jpeg2k")
    source = frame_io.open_source(path)
    if not dicom_io.decoder_available(source.dataset.file_meta.TransferSyntaxUID):
        pytest.skip("no JPEG 2000 decoder installed (the dicom extra brings pylibjpeg-openjpeg)")
    return next(iter(source))[150:310, 200:440]


def normalized(frames) -> torch.Tensor:
    return ((torch.from_numpy(np.stack(frames)).float() / 255 - 0.5) / 0.5)[:, None]


def through_tissue(network, frames, *, batch_size=2):
    """The written pixels of `frames` (uint8, gray or RGB) through the command's tissue path
    (automatic detection on the first frame, crops padded by reflection)."""
    m, first = 255, frames[0]
    colour = None if first.ndim == 2 else regions.chroma(first, m) > regions.CHROMA_MAX
    plan = regions.plan_tissue(gray_level(first, m), colour, user_boxes=[], file_boxes=[], name="test")
    pad = D.receptive_radius(getattr(network, "source", network))
    denoiser = TissueDenoiser(network, plan, m, pad=pad, batch_size=batch_size)
    return [r.pixels for r in denoiser(list(frames))]


def grey_agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    diff = np.concatenate([np.abs(x.astype(int) - y).ravel() for x, y in zip(a, b)])
    return float((diff <= 1).mean())


# ----------------------------------------------------------------------------- choosing a path

def test_choose_path_takes_bf16_only_where_native():
    native, why = E.native_bf16("cpu")
    caps = torch.cpu.get_capabilities()
    assert native == bool((caps.get("avx512_bf16") or caps.get("amx_bf16"))
                          and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    path = E.choose_path("cpu")
    assert path.precision == ("bf16" if native else "fp32") and path.fold and path.channels_last
    assert path.compile is None and why in path.notes[0]
    assert E.choose_path("cpu", precision="int8").compile is True
    with pytest.raises(ValueError, match="unknown precision"):
        E.choose_path("cpu", precision="fp8")
    with pytest.raises(ValueError, match="needs torch.compile"):
        E.choose_path("cpu", precision="int8", compile=False)


def test_compile_pays_after_the_break_even():
    cost, speedup = E.COMPILE_SECONDS["cpu"], E.COMPILED_SPEEDUP["cpu"]
    per_frame = 0.1
    break_even = cost / (per_frame * (1 - 1 / speedup))
    assert E.compile_pays(int(break_even) + 1, per_frame, "cpu")[0]
    assert not E.compile_pays(int(break_even) - 1, per_frame, "cpu")[0]
    assert not E.compile_pays(None, per_frame, "cpu")[0]


def test_agreement_counts_grey_levels():
    y = torch.linspace(-1, 1, 1000).view(1, 1, 10, 100)
    assert E.agreement(y, y) == 1.0
    # y in [-1, 1] is v = y / 2 + 1/2: a shift of 2 d / 255 in y moves v by d grey levels
    assert E.agreement(y, y + 2 * 2.5 / 255) < 0.02  # 2-3 levels off, but where both clamp
    assert E.agreement(y, y + 2 * 0.5 / 255) == 1.0  # 0-1 level off
    # at a 12-bit output's depth the same half 8-bit level is 8 levels
    assert E.agreement(y, y + 2 * 0.5 / 255, levels=4095) < 0.02
    assert E.agreement(y, y + 2 * 0.5 / 4095, levels=4095) == 1.0


@pytest.mark.parametrize("levels", [255, 4095, 65535])
def test_bf16_serves_8_bit_outputs_only(phantom, levels):
    """The default takes bf16 (where native) for outputs of at most 8 bits; asked for on a deeper
    output, bf16 is judged at that depth and falls back: its unit roundoff 2^-9 of the output's
    range is ~8 levels at 12 bits and ~128 at 16, so 99 % within one level cannot hold."""
    native, _ = E.native_bf16("cpu")
    auto = E.choose_path("cpu", compile=False, levels=levels)
    assert auto.levels == levels and auto.precision == ("bf16" if native and levels <= 255 else "fp32")
    if native and levels > 255:
        assert "too coarse" in auto.notes[0]
    engine = E.Engine(random_model("br-unet"), E.choose_path("cpu", precision="bf16", compile=False, levels=levels))
    engine(normalized(phantom[:1]))
    if levels > 255:
        assert engine.path.precision == "fp32" and engine.agreement < E.AGREEMENT_BAR
        assert f"one of {levels + 1} grey levels" in engine.path.notes[-1]
    else:
        assert engine.path.precision == "bf16" and engine.agreement >= E.AGREEMENT_BAR
    with pytest.raises(ValueError, match="levels must be >= 1"):
        E.choose_path("cpu", levels=0)


def test_a_path_judged_at_8_bits_refuses_a_16_bit_output():
    engine = E.Engine(random_model("br-unet"), E.choose_path("cpu", compile=False))
    with pytest.raises(ValueError, match="judged at 256 grey levels but this output has 65536"):
        TissueDenoiser(engine, regions.whole_frame_plan(32, 32), 65535, pad=0, batch_size=1)


# ----------------------------------------------------------------------------- each path against eager fp32

EAGER_PATHS = [dict(precision="fp32"), dict(precision="bf16"), dict(precision="fp32", fold=False),
               dict(precision="fp32", channels_last=False)]


@pytest.mark.parametrize("kw", EAGER_PATHS, ids=["fp32", "bf16", "unfolded", "nchw"])
def test_eager_paths_agree_with_eager_fp32(phantom, kw):
    model = random_model("br-unet")
    x = normalized(phantom)
    engine = E.Engine(model, E.choose_path("cpu", compile=False, **kw), check=True)
    first = engine(x)  # the first call settles the path (first_batch)
    assert engine.settled and engine.path.precision == kw["precision"]  # no fall-back needed
    reference = model(x).detach()
    assert torch.equal(first, engine(x)) and E.agreement(first, reference) >= E.AGREEMENT_BAR
    if kw["precision"] == "fp32":  # fp32 paths differ by rounding only: not checked at run time
        assert engine.agreement is None and (first - reference).abs().max() < 1e-4
    else:  # checked on the first frame at run time
        assert engine.agreement == E.agreement(first[:1], reference[:1]) >= E.AGREEMENT_BAR


@pytest.mark.parametrize("kw", EAGER_PATHS, ids=["fp32", "bf16", "unfolded", "nchw"])
@pytest.mark.parametrize("frames", ["phantom", "scan"])
def test_the_tissue_path_on_each_engine_path_agrees_with_eager_fp32(request, frames, kw):
    """The written 8-bit pixels, through the command's tissue path, on phantom and scanner frames."""
    frames = request.getfixturevalue(frames)
    frames = frames if isinstance(frames, list) else [frames, np.roll(frames, 7, axis=1)]
    model = random_model("br-unet")
    reference = through_tissue(model, frames)
    got = through_tissue(E.Engine(model, E.choose_path("cpu", compile=False, **kw)), frames)
    assert grey_agreement(got, reference) >= E.AGREEMENT_BAR
    if kw["precision"] == "fp32":
        assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(got, reference)) <= 1
    assert all(a.std() > 0 for a in got)


def test_each_batch_runs_the_network_once(phantom):
    """No hidden forwards: the first batch (with the compile decision) and every later one."""
    calls = []
    model = random_model("br-unet")
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    x = normalized(phantom[:2])
    engine = E.Engine(model, E.choose_path("cpu"), frames=4)  # fold_norms copies the hook
    engine.first_batch(x)
    engine(x)
    engine(x[:1])  # a new shape
    checked = [1] if engine.agreement is not None else []  # bf16's check: one unfolded frame
    assert (engine.path.precision != "fp32") == bool(checked)
    assert calls == [2, *checked, 2, 1]


def test_a_path_below_the_bar_falls_back_to_fp32(phantom, monkeypatch):
    monkeypatch.setattr(E, "AGREEMENT_BAR", 1.01)  # nothing passes: bf16 must fall back
    model = random_model("br-unet")
    engine = E.Engine(model, E.choose_path("cpu", precision="bf16", compile=False))
    engine(normalized(phantom[:2]))
    assert engine.path.precision == "fp32" and "fell back to fp32" in engine.path.notes[-1]


def test_a_fixed_shape_engine_sees_one_batch_shape(phantom, monkeypatch):
    """A compiled or captured engine gets the short last batch padded to the batch size."""
    calls = []
    model = random_model("br-unet")
    model.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    frames = [f.astype(np.float32) / 255 for f in phantom] + [phantom[0].astype(np.float32) / 254]
    engine = E.Engine(model, E.choose_path("cpu", precision="fp32", compile=False))  # no check forward
    plain = denoise_frames(engine, frames, batch_size=2)
    assert [c[0] for c in calls] == [2, 2, 1]
    calls.clear()
    monkeypatch.setattr(E.Engine, "fixed_shape", property(lambda self: True))
    padded = denoise_frames(engine, frames, batch_size=2)
    assert calls == [(2, 1, 64, 80)] * 3
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, padded)) <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", pytest.param("int8", marks=slow)])
def test_compiled_paths_agree_with_eager_fp32(phantom, precision):
    """torch.compile (Inductor, frozen weights) and PT2E int8 inside the tissue path: five
    frames in batches of 2 (the last padded), one compile for the file's one crop shape."""
    if precision == "int8":
        pytest.importorskip("torchao")
    model = random_model("br-unet")
    frames = [f[:32, :48] for f in phantom] + [phantom[0][16:48, 8:56]]
    engine = E.Engine(model, E.choose_path("cpu", precision=precision, compile=True))
    got = through_tissue(engine, frames)
    assert engine.path.precision == precision and engine.path.compile and len(engine._compiled) == 1
    assert grey_agreement(got, through_tissue(model, frames)) >= E.AGREEMENT_BAR
    assert all(np.array_equal(a, b) for a, b in zip(got, through_tissue(engine, frames)))  # reused


# ----------------------------------------------------------------------------- the streaming path

class ListSource(list):
    path = "frames"


class MemorySink:
    def __init__(self, fail_at=None):
        self.frames, self.fail_at = [], fail_at

    def write(self, frame):
        if len(self.frames) == self.fail_at:
            raise OSError("disk full")
        self.frames.append(frame.copy())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("plan", ["whole frame", "region"])
def test_pipeline_equals_loop_and_the_bare_network(dtype, plan):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    frames = [rng.integers(0, top + 1, (40, 56), dtype=dtype) for _ in range(5)]  # not a multiple of 2
    model = random_model("br-unet")
    pad = D.receptive_radius(model)
    tissue_plan = (regions.whole_frame_plan(40, 56) if plan == "whole frame" else
                   regions.TissuePlan("--region", [regions.Box(4, 6, 30, 40)], [np.ones((30, 40), bool)]))
    outs, times = {}, {}
    for pipeline in (True, False):
        engine = E.Engine(model, E.choose_path("cpu", compile=False, levels=top))
        sink, times[pipeline] = MemorySink(), StageTimes(threaded=pipeline)
        denoiser = TissueDenoiser(engine, tissue_plan, top, pad=pad, batch_size=2)
        assert stream_file(ListSource(frames), 5, denoiser, sink, batch_size=2, pipeline=pipeline,
                           times=times[pipeline]) == 5
        outs[pipeline] = sink.frames
    assert all(a.dtype == dtype and np.array_equal(a, b) for a, b in zip(outs[True], outs[False]))
    bare = [r.pixels for r in TissueDenoiser(model, tissue_plan, top, pad=pad, batch_size=2)(frames)]
    assert max(int(np.abs(a.astype(np.int64) - b).max()) for a, b in zip(outs[True], bare)) <= 1
    if plan == "whole frame":  # the network's own path: denoise_frames on the bare model, quantized
        direct = [quantize(o, top) for o in denoise_frames(model, [f.astype(np.float32) / top for f in frames])]
        assert max(int(np.abs(a.astype(np.int64) - b).max()) for a, b in zip(outs[True], direct)) <= 1
    t = times[True].as_dict()
    assert (t["frames"], t["batches"], t["threaded"]) == (5, 3, True) and t["frames_per_s"] > 0
    assert t["network_s"] > 0 and 0 < t["network_share"] <= 1 and t["decode_s"] > 0 and t["encode_s"] > 0


def test_the_engine_tiles_like_untiled():
    rng = np.random.default_rng(1)
    frames = [rng.random((150, 170), dtype=np.float32) for _ in range(2)]
    model = random_model("d-unet")
    engine = E.Engine(model, E.choose_path("cpu", compile=False))
    overlap = default_overlap(model)
    tile = overlap + 32  # 128: 150x170 frames need 2x2 tiles
    tiled = denoise_frames(engine, frames, batch_size=3, max_pixels=tile * tile, tile=tile, overlap=overlap)
    whole = denoise_frames(engine, frames, batch_size=3)
    assert max(float(np.abs(a - b).max()) for a, b in zip(tiled, whole)) <= 1e-5
    assert all(a.shape == (150, 170) and a.std() > 0 for a in tiled)
    with pytest.raises(ValueError, match="amp is for a bare module"):
        denoise_frames(engine, frames, amp=True)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_failing_stage_stops_the_stream(pipeline):
    model = random_model("br-unet")
    good = np.full((32, 32), 100, np.uint8) + np.arange(32, dtype=np.uint8)
    denoiser = TissueDenoiser(E.Engine(model, E.choose_path("cpu", compile=False)),
                              regions.whole_frame_plan(32, 32), 255, pad=0, batch_size=1)

    def damaged():
        yield good
        yield good
        raise ValueError("page 2 is damaged")
    with pytest.raises(ValueError, match="page 2 is damaged"):
        stream_file(damaged(), 3, denoiser, MemorySink(), batch_size=1, pipeline=pipeline)
    sink = MemorySink(fail_at=2)
    with pytest.raises(OSError, match="disk full"):
        stream_file(ListSource([good] * 6), 6, denoiser, sink, batch_size=1, pipeline=pipeline)
    assert len(sink.frames) == 2


def test_tiff_streams_page_by_page_and_publishes_on_commit(tmp_path):
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 65536, (256, 256), dtype=np.uint16) for _ in range(3)]
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "cine.tif", format="TIFF", save_all=True, append_images=images[1:])
    source = frame_io.open_source(tmp_path / "cine.tif")
    assert (source.count, source.max_value, source.kind) == (3, 65535, "tiff")
    assert all(g.dtype == np.uint16 and np.array_equal(g, f) for g, f in zip(source, frames))
    sink = frame_io.make_sink("tiff", tmp_path / "out", source, "test")
    sizes = []
    with sink:
        for f in frames:  # each page reaches the temp file when written, not at the end
            sink.write(f)
            (tmp,) = tmp_path.glob(".out.*.tmp.tif")
            sizes.append(tmp.stat().st_size)
            assert not (tmp_path / "out.tif").exists()  # published on commit only
    assert sizes[0] >= frames[0].nbytes and sizes[1] >= sizes[0] + frames[1].nbytes
    with Image.open(tmp_path / "out.tif") as im:
        assert im.n_frames == 3
        for k, f in enumerate(frames):
            im.seek(k)
            assert np.array_equal(np.asarray(im), f)
    sink = frame_io.make_sink("tiff", tmp_path / "gone", source, "test").open()
    sink.write(frames[0])
    sink.abort()
    assert not list(tmp_path.glob("*gone*"))
    mixed = [images[0], Image.fromarray((frames[1] >> 8).astype(np.uint8))]
    mixed[0].save(tmp_path / "mixed.tif", format="TIFF", save_all=True, append_images=mixed[1:])
    with pytest.raises(ValueError, match="page 1 differs from the first"):
        list(frame_io.open_source(tmp_path / "mixed.tif"))


def test_cli_cine_runs_the_fast_path_and_reports_it(tmp_path, capsys, phantom):
    ckpt = save_checkpoint(tmp_path / "ck.pt", "br-unet")
    cine = tmp_path / "cine.tif"
    images = [Image.fromarray(f) for f in phantom + phantom[:1]]
    images[0].save(cine, format="TIFF", save_all=True, append_images=images[1:])
    outs = {}
    runs = ([], ["--no-pipeline"], ["--no-fold", "--precision", "fp32", "--compile", "off"])
    for i, extra in enumerate(runs):
        out = tmp_path / f"out{i}"
        rc, _ = cli([ckpt, cine, "--out", out, "--format", "tiff", "--whole-frame", *extra])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        summary = json.loads(captured.out.strip().splitlines()[-1])
        assert summary["frames"] == 5 and summary["batch_size"] == D.CPU_BATCH
        with Image.open(out / "cine.tif") as im:
            outs[i] = [np.asarray(im.seek(k) or im).copy() for k in range(im.n_frames)]
        if i == 0:
            default_precision = summary["path"]["precision"]
        checked = summary["agreement_with_eager_fp32"]  # fp32: by rounding only, not checked
        assert checked is None if summary["path"]["precision"] == "fp32" else checked >= E.AGREEMENT_BAR
        shares = summary["pipeline"]
        assert shares["threaded"] == ("--no-pipeline" not in extra) and shares["batches"] == -(-5 // D.CPU_BATCH)
        assert 0 < shares["network_share"] <= 1 and shares["decode_share"] >= 0 and shares["encode_share"] >= 0
        assert summary["path"]["fold"] == summary["folded"] == ("--no-fold" not in extra)
        assert summary["setup_s"] > 0 and summary["frames_per_s"] > 0
    assert all(np.array_equal(a, b) for a, b in zip(outs[0], outs[1]))  # pipeline == loop, bit for bit
    direct = D.denoise_images(D.load_denoiser(ckpt, "cpu"), phantom)  # uint8 in, uint8 out
    assert all(a.std() > 0 for a in outs[0])
    if default_precision == "fp32":  # within one code of unfolded fp32 and of the bare network
        assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(outs[0], outs[2])) <= 1
        assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(outs[0], direct))
    else:  # the default bf16 path (native bf16): the engine's bar
        assert grey_agreement(outs[0], outs[2]) >= E.AGREEMENT_BAR
        assert grey_agreement(outs[0], direct) >= E.AGREEMENT_BAR
