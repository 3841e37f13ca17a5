"""Data: the Kaggle-layout loader and its cache, the train/validation split, the phantom and
DeviceBatches."""
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speckle_models.data import datasets as D
from speckle_models.data import phantom as P
from speckle_kernels.noise import make_noisy_batch

H, W = D.KAGGLE_SHAPE


def write_tif(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="TIFF")


def kaggle_folder(root: Path, n_train=10, n_test=4) -> Path:
    """A small Kaggle-layout folder: train images with masks beside them, test images."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    yy, xx = np.mgrid[0:H, 0:W]
    for i in range(n_train):
        img = ((xx * (i + 1) + yy * 3) % 256).astype(np.uint8)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        write_tif(root / "train" / f"1_{i + 1}.tif", img)
        write_tif(root / "train" / f"1_{i + 1}_mask.tif", np.full((H, W), 255, np.uint8))
    for i in range(n_test):
        write_tif(root / "test" / f"{i + 1}.tif", np.full((H, W), 10 * (i + 1), np.uint8))
    return root


@pytest.fixture
def folder(tmp_path):
    return kaggle_folder(tmp_path / "kaggle")


def load(folder, cache, **kw):
    return D.load_dataset(folder, cache_dir=cache, progress=False, **kw)


def test_kaggle_loader_reads_resizes_and_skips_masks(folder, tmp_path):
    data = load(folder, tmp_path / "cache", image_size=32)
    assert data.train.shape == (8, 1, 32, 32) and data.val.shape == (2, 1, 32, 32)
    assert data.test.shape == (4, 1, 32, 32) and data.train.dtype == torch.uint8
    assert data.train_clean is None
    # masks (all 255) are not among the images; the pool is exactly the 10 train images
    pool = torch.cat([data.train, data.val])
    assert not (pool == 255).flatten(1).all(1).any()
    expected = []
    for i in range(10):
        with Image.open(folder / "train" / f"1_{i + 1}.tif") as im:
            expected.append(np.asarray(im.resize((32, 32), Image.Resampling.BILINEAR)))
    expected = torch.from_numpy(np.stack(expected))[:, None]
    # sorted file names: 1_1, 1_10, 1_2, ... ; the split keeps source order inside each part
    order = sorted(range(10), key=lambda i: f"1_{i + 1}.tif")
    tr, va = D.split_indices(10, 0.2, 0)
    assert torch.equal(data.train, expected[order][tr]) and torch.equal(data.val, expected[order][va])
    # test images: constant 10 (i + 1); a resize of a constant image is the constant
    assert data.test.flatten(1).float().mean(1).tolist() == [10.0, 20.0, 30.0, 40.0]


def test_cache_second_load_fast_equal_and_rebuilt_on_change(folder, tmp_path):
    cache = tmp_path / "cache"
    first = load(folder, cache, image_size=32)
    assert first.info["cache_hit"] is False
    t = time.perf_counter()
    second = load(folder, cache, image_size=32)
    assert time.perf_counter() - t < 1.0
    assert second.info["cache_hit"] is True
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    assert [p.name for p in cache.iterdir()] == [Path(first.info["cache"]).name]   # no temp files
    # the source changes: content and mtime of one test image -> rebuilt
    target = folder / "test" / "1.tif"
    write_tif(target, np.full((H, W), 200, np.uint8))
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    third = load(folder, cache, image_size=32)
    assert third.info["cache_hit"] is False and third.test[0].float().mean().item() == 200.0
    # a new image appears -> rebuilt with it
    write_tif(folder / "test" / "9.tif", np.full((H, W), 90, np.uint8))
    assert len(load(folder, cache, image_size=32).test) == 5
    assert len(list(cache.iterdir())) == 1


def test_cache_failure_mid_write_leaves_no_file(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def half_write(f, arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(D, "_write_npz", half_write)
    with pytest.raises(OSError, match="simulated"):
        load(folder, cache, image_size=32)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    data = load(folder, cache, image_size=32)
    assert data.info["cache_hit"] is False and len(data.train) == 8


def test_corrupt_cache_is_rebuilt(folder, tmp_path):
    cache = tmp_path / "cache"
    path = Path(load(folder, cache, image_size=32).info["cache"])
    path.write_bytes(b"not a zip at all")
    again = load(folder, cache, image_size=32)
    assert again.info["cache_hit"] is False and len(again.test) == 4


def test_loader_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(missing, tmp_path / "c")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.tif images in .*empty.*train"):
        load(empty, tmp_path / "c")
    only_masks = kaggle_folder(tmp_path / "masks", n_train=1)
    (only_masks / "train" / "1_1.tif").unlink()
    with pytest.raises(FileNotFoundError, match="train"):
        load(only_masks, tmp_path / "c")
    no_test = tmp_path / "notest"
    (no_test / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="test"):
        load(no_test, tmp_path / "c")


def test_wrongly_sized_and_unreadable_files(tmp_path):
    bad_size = kaggle_folder(tmp_path / "a")
    write_tif(bad_size / "train" / "1_3.tif", np.zeros((100, 120), np.uint8) + 7)
    with pytest.raises(ValueError, match=r"1_3\.tif.*100x120.*420x580"):
        load(bad_size, tmp_path / "c")
    unreadable = kaggle_folder(tmp_path / "b")
    (unreadable / "test" / "2.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(ValueError, match=r"cannot read image .*2\.tif"):
        load(unreadable, tmp_path / "c")
    rgb = kaggle_folder(tmp_path / "d")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(rgb / "test" / "3.tif")
    with pytest.raises(ValueError, match=r"3\.tif.*8-bit grayscale"):
        load(rgb, tmp_path / "c")


def test_split_sizes_and_determinism():
    tr, va = D.split_indices(5635, 0.2, seed=0)
    assert (len(tr), len(va)) == (4508, 1127)            # the paper's split
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(5635))
    tr2, va2 = D.split_indices(5635, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    _, va3 = D.split_indices(5635, 0.2, seed=1)
    assert not torch.equal(va, va3)


def test_bad_load_arguments(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        D.load_dataset("phantom", val_fraction=1.5, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="count"):
        D.load_dataset("phantom", count=0, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="source"):
        D.load_dataset(42, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- phantom

def test_phantom_dataset_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKLE_CACHE", str(tmp_path / "env-cache"))
    a = D.load_dataset("phantom", count=70, test_count=10, progress=False)
    assert Path(a.info["cache"]).parent == tmp_path / "env-cache"
    assert (len(a.train), len(a.val), len(a.test)) == (56, 14, 10)
    assert a.train_clean.shape == a.train.shape and a.test_clean.shape == a.test.shape
    assert a.train.dtype == a.train_clean.dtype == torch.uint8
    b = D.load_dataset("phantom", count=70, test_count=10, progress=False)
    assert b.info["cache_hit"] and torch.equal(a.train, b.train) and torch.equal(a.val_clean, b.val_clean)
    # regenerated from scratch: the same bits
    images, clean = P.generate_phantom(70, seed=0, progress=False)
    pool = torch.cat([a.train, a.val])
    tr, va = D.split_indices(70, 0.2, 0)
    assert torch.equal(images[tr], a.train) and torch.equal(clean[va], a.val_clean)
    other, _ = P.generate_phantom(70, seed=5, progress=False)
    assert (other != images).float().mean().item() > 0.5
    assert pool.float().std().item() > 20                 # not a blank image set


def test_phantom_statistics():
    images, clean = P.generate_phantom(32, image_size=96, seed=3, progress=False)
    img, cl = images.float(), clean.float()
    # hypoechoic sections (vessels, nerves) are darker than tissue, in the image too
    dark, tissue = cl < 50, (cl > 110) & (cl < 200)
    assert dark.any() and tissue.any()
    assert img[dark].mean().item() < img[tissue].mean().item() - 40
    # the speckle-free map tracks the image's local mean gray level
    blur = torch.nn.functional.avg_pool2d(img, 9, stride=1, padding=4, count_include_pad=False)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert torch.corrcoef(torch.stack([blur[inner].flatten(), cl[inner].flatten()]))[0, 1] > 0.8
    # speckle: the image is rough where the map is smooth (lateral neighbours: the map's
    # layers and striations run across, so it changes little from column to column)
    def roughness(t):
        return (t[..., :, 1:] - t[..., :, :-1]).abs().mean().item()
    assert roughness(img) > 4 * roughness(cl) and roughness(img) > 10


def test_phantom_envelope_is_rayleigh_in_homogeneous_tissue():
    """Fully developed speckle: for a homogeneous reflector the envelope A is Rayleigh, so
    E[A]^2 / E[A^2] = pi/4 and E[A^4] / E[A^2]^2 = 2 (intensity exponential), and E[A^2] = 1
    for a 0 dB reflector by construction. Neighbouring pixels are correlated (one speckle grain
    covers ~10 pixels), so the effective sample is ~N/10 = 60,000: the standard errors are
    ~0.002 (ratio pi/4), ~0.02 (A^4 ratio) and ~0.006 (E[A^2]); the tolerances are ~5 of them."""
    g = torch.Generator().manual_seed(0)
    echo = torch.ones(40, 136, 136)
    env = P.speckle_envelope(echo, g)[:, 8:-8, 8:-8].double()
    m1, m2, m4 = env.mean().item(), (env ** 2).mean().item(), (env ** 4).mean().item()
    assert abs(m1 * m1 / m2 - math.pi / 4) < 0.012
    assert abs(m4 / (m2 * m2) - 2.0) < 0.1
    assert abs(m2 - 1.0) < 0.03
    # the log-compressed speckle has the Rayleigh spread: 20 log10 A has the standard
    # deviation (10 / ln 10) * pi / sqrt(6) = 5.57 dB
    db = 20 * torch.log10(env)
    assert abs(db.std().item() - 10 / math.log(10) * math.pi / math.sqrt(6)) < 0.25
    # where scatterers are sparse (hypoechoic, density 0.28) the speckle is not fully developed:
    # heavier tails than Rayleigh, the same statistic falls clearly below pi/4
    sparse = P.speckle_envelope(torch.full((40, 136, 136), 0.2), g)[:, 8:-8, 8:-8].double()
    s1, s2 = sparse.mean().item(), (sparse ** 2).mean().item()
    assert s1 * s1 / s2 < math.pi / 4 - 0.03


def test_phantom_arguments():
    with pytest.raises(ValueError, match="count"):
        P.generate_phantom(-1)
    with pytest.raises(ValueError, match="image_size"):
        P.generate_phantom(2, image_size=4)
    images, clean = P.generate_phantom(0, progress=False)
    assert images.shape == (0, 1, 128, 128)


# ----------------------------------------------------------------------------- DeviceBatches

def small_set(n=10, size=8):
    return torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_device_batches_reproducible_and_distinct(backend):
    if backend == "triton":
        from speckle_kernels._backend import triton_interpreting
        if not triton_interpreting():
            pytest.skip("needs TRITON_INTERPRET=1")
    images = small_set()
    kw = dict(factor=5.0, sigma_mult=(0.1, 0.75), distribution="rayleigh", seed=7,
              backend=backend)
    db = D.DeviceBatches(images, 4, **kw)
    assert len(db) == 3 and len(D.DeviceBatches(images, 4, drop_last=True, **kw)) == 2
    run1 = list(db.batches(0))
    run2 = list(D.DeviceBatches(images, 4, **kw).batches(0))
    assert [n.shape[0] for n, _ in run1] == [4, 4, 2]
    for (n1, c1), (n2, c2) in zip(run1, run2):
        assert torch.equal(n1, n2) and torch.equal(c1, c2)
    # every image once per epoch, in the order of the seeded permutation
    order = torch.randperm(10, generator=torch.Generator().manual_seed(D.shuffle_seed(7, 0)))
    clean = torch.cat([c for _, c in run1])
    assert torch.equal(clean, images[order].float() / 127.5 - 1) or \
        torch.allclose(clean, images[order].float() / 127.5 - 1, atol=1e-6)
    # batch b of epoch e is make_noisy_batch at offset (e * len + b) * batch * pixels
    idx = order[4:8]
    again, _ = make_noisy_batch(images[idx], seed=7, offset=(0 * 3 + 1) * 4 * 64,
                                factor=5.0, sigma_mult=(0.1, 0.75), distribution="rayleigh",
                                backend=backend)
    assert torch.equal(again, run1[1][0])
    # another epoch: another order and other noise
    run3 = list(db.batches(1))
    assert not torch.equal(torch.cat([c for _, c in run3]), clean)
    noise0 = torch.cat([n - c for n, c in run1])
    noise1 = torch.cat([n - c for n, c in run3])
    assert not torch.equal(noise0, noise1)


def test_device_batches_no_shuffle_and_arguments():
    images = small_set(n=5)
    db = D.DeviceBatches(images, 2, shuffle=False, seed=1, out_dtype=torch.bfloat16)
    cleans = [c for _, c in db.batches(3)]
    assert cleans[0].dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(cleans).float(), images.float() / 127.5 - 1,
                               rtol=2 ** -8, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        D.DeviceBatches(images.float(), 2)
    with pytest.raises(ValueError, match="batch_size"):
        D.DeviceBatches(images, 0)
    with pytest.raises(ValueError, match="sigma_add"):
        D.DeviceBatches(images, 2, sigma_add=-1.0)
    with pytest.raises(ValueError, match="epoch"):
        next(db.batches(-1))


def test_device_batches_shards_add_up_to_one_process():
    from speckle_models.data.datasets import DeviceBatches

    images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8)
    kw = dict(factor=5.0, seed=3, drop_last=True, )
    whole = DeviceBatches(images, 6, **kw)
    shards = [DeviceBatches(images, 3, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 3
    for epoch in (0, 1):
        for (noisy, clean), *parts in zip(whole.batches(epoch), *(s.batches(epoch) for s in shards)):
            assert torch.equal(torch.cat([p[0] for p in parts]), noisy)
            assert torch.equal(torch.cat([p[1] for p in parts]), clean)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        DeviceBatches(images, 3, rank=2, world_size=2)
