"""speckle-denoise's fast path: the engine's paths (engine.py), the pipeline (pipeline.py) and the
streaming readers and writers (streams.py).

Bounds:
- Pipeline against the loop (threaded=False): the same batches through the same buffers and
  the same engine, so the outputs are equal bit for bit (no tolerance).
- Pipeline against speckle-denoise's per-file path (tiling.denoise_frames + image_io.quantize):
  the same float32 arithmetic op for op, but the last batch is padded in the pipeline, and a
  convolution may sum in another order for another batch size: at most one code apart.
- A path against eager fp32 (the issue's bar): >= 99 % of 8-bit pixels within one grey level.
  Frames are phantom B-mode images (physical speckle), not zeros or uniform noise.
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from speckle_models.inference import denoise as D
from speckle_models.inference import engine as E
from speckle_models.inference.image_io import quantize
from speckle_models.inference.pipeline import run_pipeline
from speckle_models.inference.streams import open_frames, open_writer
from speckle_models.inference.tiling import denoise_frames

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_denoise import cli, random_model, save_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom():
    """Four 64x80 phantom frames (uint8)."""
    from speckle_models.data.phantom import generate_phantom

    images, _ = generate_phantom(4, image_size=80, seed=3, progress=False)
    return [a[0, :64].numpy() for a in images]


def collect(frames, engine, **kw):
    outs, seen = {}, []

    def sink(k, out, source):
        seen.append(k)
        outs[k] = out.copy()
    stats = run_pipeline(frames, engine, sink, **kw)
    assert seen == sorted(seen) and stats.frames == len(outs)
    return [outs[k] for k in range(len(outs))], stats


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_pipeline_equals_loop_and_the_per_file_path(dtype):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    # sizes change mid-stream (a new batch shape) and the runs are not multiples of the batch
    frames = [rng.integers(0, top + 1, (40, 56), dtype=dtype) for _ in range(5)]
    frames += [rng.integers(0, top + 1, (48, 32), dtype=dtype) for _ in range(3)]
    model = random_model("br-unet")
    piped, stats = collect(frames, model, max_value=top, batch_size=2)
    looped, _ = collect(frames, model, max_value=top, batch_size=2, threaded=False)
    assert all(a.dtype == dtype and (a == b).all() for a, b in zip(piped, looped))
    per_file = [quantize(o, top) for o in
                denoise_frames(model, [f.astype(np.float32) / top for f in frames], batch_size=2)]
    diff = max(int(np.abs(a.astype(np.int64) - b).max()) for a, b in zip(piped, per_file))
    assert diff <= 1
    assert stats.batches == 5 and stats.as_dict()["frames_per_s"] > 0


def test_pipeline_tiles_large_frames_like_the_per_file_path():
    rng = np.random.default_rng(1)
    frames = [rng.random((100, 120), dtype=np.float32) for _ in range(2)]
    model = random_model("d-unet")
    kw = dict(batch_size=3, max_pixels=5000, tile=64, overlap=32)
    piped, _ = collect(frames, model, **kw)  # float frames: v out, no quantization
    per_file = denoise_frames(model, frames, **kw)
    assert max(float(np.abs(a - b).max()) for a, b in zip(piped, per_file)) <= 1e-5
    assert all(a.shape == (100, 120) and a.std() > 0 for a in piped)


def test_pipeline_errors_stop_every_stage():
    model = random_model("br-unet")
    good = np.full((32, 32), 100, np.uint8) + np.arange(32, dtype=np.uint8)

    def source():
        yield good
        yield good
        raise ValueError("page 2 is damaged")
    with pytest.raises(ValueError, match="page 2 is damaged"):
        collect(source(), model, max_value=255, batch_size=1)

    def bad_sink(k, out, src):
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        run_pipeline([good] * 6, model, bad_sink, max_value=255, batch_size=1)
    with pytest.raises(ValueError, match="frame 1 is 8x32"):
        collect([good, good[:8]], model, max_value=255, batch_size=1)


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


@pytest.mark.parametrize("kw", [dict(precision="fp32"), dict(precision="bf16"),
                                dict(precision="fp32", fold=False), dict(precision="fp32", channels_last=False)])
def test_eager_paths_agree_with_eager_fp32(phantom, kw):
    model = random_model("br-unet")
    x = ((torch.from_numpy(np.stack(phantom)).float() / 255 - 0.5) / 0.5)[:, None]
    engine = E.Engine(model, E.choose_path("cpu", compile=False, **kw), check=True)
    first = engine.first_batch(x)
    assert engine.path.precision == kw["precision"]  # no fall-back needed
    reference = model(x).detach()
    assert torch.equal(first, engine(x)) and E.agreement(first, reference) >= E.AGREEMENT_BAR
    if kw["precision"] == "fp32":  # fp32 paths differ by rounding only: not checked at run time
        assert engine.agreement is None and (first - reference).abs().max() < 1e-4
    else:  # checked on the first frame at run time
        assert engine.agreement == E.agreement(first[:1], reference[:1]) >= E.AGREEMENT_BAR


def test_each_batch_runs_the_network_once(phantom):
    """No hidden forwards: the first batch (with the compile decision) and every later one."""
    calls = []
    model = random_model("br-unet")
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    x = ((torch.from_numpy(np.stack(phantom[:2])).float() / 255 - 0.5) / 0.5)[:, None]
    engine = E.Engine(model, E.choose_path("cpu"), frames=4)  # fold_norms copies the hook
    engine.first_batch(x)
    engine(x)
    engine(x[:1])  # a new shape
    assert calls == [2, 2, 1]


def test_a_path_below_the_bar_falls_back_to_fp32(phantom, monkeypatch):
    monkeypatch.setattr(E, "AGREEMENT_BAR", 1.01)  # nothing passes: bf16 must fall back
    model = random_model("br-unet")
    x = ((torch.from_numpy(np.stack(phantom[:2])).float() / 255 - 0.5) / 0.5)[:, None]
    engine = E.Engine(model, E.choose_path("cpu", precision="bf16", compile=False))
    engine.first_batch(x)
    assert engine.path.precision == "fp32" and "fell back to fp32" in engine.path.notes[-1]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_compiled_paths_agree_with_eager_fp32(phantom, precision):
    """torch.compile (Inductor, frozen weights) and PT2E int8: slow (a compile each)."""
    if precision == "int8":
        pytest.importorskip("torchao")
    model = random_model("br-unet")
    x = ((torch.from_numpy(np.stack(phantom[:2])[:, :32, :48]).float() / 255 - 0.5) / 0.5)[:, None]
    engine = E.Engine(model, E.choose_path("cpu", precision=precision, compile=True))
    first = engine.first_batch(x)
    assert engine.path.precision == precision and engine.path.compile
    assert E.agreement(first, model(x).detach()) >= E.AGREEMENT_BAR
    assert torch.equal(engine(x), first)  # the compiled graph is reused, deterministic


# ----------------------------------------------------------------------------- streams and the CLI

def write_tiff(path, frames):
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="TIFF", save_all=True, append_images=images[1:])
    return path


def test_streams_read_lazily_and_write_atomically(tmp_path):
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 65536, (20, 24), dtype=np.uint16) for _ in range(3)]
    source = open_frames(write_tiff(tmp_path / "cine.tif", frames))
    assert (source.count, source.max_value, source.kind) == (3, 65535, "tiff")
    got = list(source)
    assert all(g.dtype == np.uint16 and (g == f).all() for g, f in zip(got, frames))
    writer = open_writer(tmp_path / "out", 3, "tiff")
    for f in frames:
        writer.write(f)
    assert not (tmp_path / "out.tif").exists()  # published on commit only
    writer.commit()
    with Image.open(tmp_path / "out.tif") as im:
        assert im.n_frames == 3
        for k, f in enumerate(frames):
            im.seek(k)
            assert (np.asarray(im) == f).all()
    writer = open_writer(tmp_path / "gone", 2, "tiff")
    writer.write(frames[0])
    writer.abort()
    assert not list(tmp_path.glob("*gone*"))
    mixed = write_tiff(tmp_path / "mixed.tif", [frames[0], (frames[1] >> 8).astype(np.uint8)])
    with pytest.raises(ValueError, match="page 1 has max value 255"):
        list(open_frames(mixed))


def test_cli_cine_runs_the_fast_path_and_reports_it(tmp_path, capsys, phantom):
    ckpt = save_checkpoint(tmp_path / "ck.pt", "br-unet")
    cine = write_tiff(tmp_path / "cine.tif", phantom + phantom[:1])
    outs = {}
    runs = ([], ["--no-pipeline"], ["--no-fold", "--precision", "fp32", "--compile", "off"])
    for i, extra in enumerate(runs):
        out = tmp_path / f"out{i}"
        rc, _ = cli([ckpt, cine, "--out", out, "--format", "tiff", "--batch-size", "2", *extra])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rc == 0 and summary["frames"] == 5
        with Image.open(out / "cine.tif") as im:
            outs[i] = [np.asarray(im.seek(k) or im).copy() for k in range(im.n_frames)]
        checked = summary["agreement_with_eager_fp32"]  # fp32: by rounding only, not checked
        assert checked is None if summary["path"]["precision"] == "fp32" else checked >= E.AGREEMENT_BAR
        assert set(summary["pipeline"]) >= {"decode_share", "network_share", "encode_share"}
        assert summary["path"]["fold"] == ("--no-fold" not in extra)
    assert all((a == b).all() for a, b in zip(outs[0], outs[1]))  # pipeline == loop, bit for bit
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(outs[0], outs[2])) <= 1
    direct = D.denoise_images(D.load_denoiser(ckpt, "cpu"), phantom)  # uint8 in, uint8 out
    assert all(np.abs(a.astype(int) - b).max() <= 1 and a.std() > 0 for a, b in zip(outs[0], direct))
