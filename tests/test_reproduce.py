"""The speckle-free target (pairs.py, evaluate.eval_pair) and speckle-reproduce at tiny sizes:
Gaussian and Rayleigh tables from one call, seeds, the bootstrap, the grid figure, resume."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from speckle_kernels.data import DeviceBatches, UltrasoundData, load_dataset
from speckle_models import loop as L
from speckle_models import train as T
from speckle_models.config import VAL_NOISE_SEED, TrainConfig
from speckle_models.evaluate import eval_pair, image_scores, noisy_eval_set, predict
from speckle_models.pairs import PairBatches, normalize_u8


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors on a shared 2-core machine: two intra-op threads spin against each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny_data(cache_dir):
    return load_dataset("phantom", image_size=16, count=24, test_count=8, cache_dir=cache_dir,
                        progress=False)


def tiny_config(out, **kw):
    base = dict(model="d-unet", out=str(out), noise_factor=1.0, epochs=1, batch_size=4, width=4,
                image_size=16, count=24, test_count=8, device="cpu", progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- speckle-free

def test_pair_batches_match_device_batches(tiny_data):
    kw = dict(factor=5.0, sigma_mult=0.1, sigma_add=0.02, distribution="rayleigh", seed=7)
    plain = DeviceBatches(tiny_data.train, 5, **kw)
    pairs = PairBatches(tiny_data.train, tiny_data.train_clean, 5, **kw)
    assert len(plain) == len(pairs) == 4                     # 19 images, a partial last batch
    for epoch in (0, 2):
        order = plain.order(epoch)
        for b, ((x0, c0), (x1, t1)) in enumerate(zip(plain.batches(epoch), pairs.batches(epoch))):
            assert torch.equal(x0, x1)                        # the same input, bit for bit
            idx = order[b * 5:(b + 1) * 5]
            assert torch.equal(t1, normalize_u8(tiny_data.train_clean[idx]))
            assert not torch.equal(t1, c0)
    # with the images as their own targets PairBatches is DeviceBatches
    same = PairBatches(tiny_data.train, tiny_data.train, 5, **kw)
    for (x0, c0), (x1, c1) in zip(plain.batches(1), same.batches(1)):
        assert torch.equal(x0, x1) and torch.equal(c0, c1)
    with pytest.raises(ValueError, match="differ in shape"):
        PairBatches(tiny_data.train, tiny_data.train_clean[:3], 5, **kw)


def test_speckle_free_target_trains_against_the_maps(tmp_path, tiny_data):
    # physical speckle only: no added noise at all
    config = tiny_config(tmp_path, target="speckle-free", noise_factor=0.0, sigma_add=0.0)
    result = L.train(config, data=tiny_data, plots=False)
    noisy, target = eval_pair(tiny_data, "val", result.config, VAL_NOISE_SEED, torch.device("cpu"))
    speckled, own = noisy_eval_set(tiny_data.val, result.config, VAL_NOISE_SEED, torch.device("cpu"))
    assert torch.equal(noisy, speckled) and torch.equal(noisy, own)   # zero noise: the input is the image
    assert torch.equal(target, normalize_u8(tiny_data.val_clean))
    scores = image_scores(predict(result.model, noisy), target)
    assert result.history[-1]["val_psnr"] == pytest.approx(scores["psnr"], abs=1e-9)
    assert result.history[-1]["val_psnr"] != pytest.approx(
        image_scores(predict(result.model, noisy), own)["psnr"], abs=1e-3)
    saved = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert saved["target"] == "speckle-free" and saved["noise_factor"] == 0.0
    # resuming with the other target is refused: target is a resume key
    with pytest.raises(ValueError, match="other settings.*target"):
        L.train(replace(config, target="clean"), data=tiny_data, resume=True)


def test_speckle_free_refused_without_maps(tmp_path, tiny_data, capsys, cache_dir):
    bare = UltrasoundData(train=tiny_data.train, val=tiny_data.val, test=tiny_data.test,
                          source="/data/kaggle")
    with pytest.raises(ValueError, match="speckle-free maps.*'/data/kaggle'"):
        L.train(tiny_config(tmp_path / "run", target="speckle-free"), data=bare)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="speckle-free maps"):
        eval_pair(bare, "test", tiny_config(tmp_path, target="speckle-free").resolved(), 1,
                  torch.device("cpu"))
    # end to end: a Kaggle-layout folder (8-bit 420x580 TIFFs) has no maps
    from PIL import Image
    folder = tmp_path / "kaggle"
    for part, n in (("train", 3), ("test", 1)):
        (folder / part).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((420, 580), 40 * i + 20, np.uint8)).save(folder / part / f"{i}.tif")
    with pytest.raises(SystemExit) as e:
        T.main(["--model", "d-unet", "--target", "speckle-free", "--data", str(folder),
                "--out", str(tmp_path / "k"), "--image-size", "16", "--device", "cpu",
                "--no-progress", "--cache-dir", cache_dir])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "speckle-free maps" in err and str(folder) in err
    assert not (tmp_path / "k").exists()
