"""The domain-randomised phantom (data/realistic_phantom.py): seeded and recorded per image,
black where nothing is imaged or nothing scatters, a grain that follows its draw, and the
classic phantom left as it was."""
import math

import pytest
import torch

from speckle_models.data import phantom as P
from speckle_models.data import realistic_phantom as RP
from speckle_models.data.datasets import load_dataset
from speckle_models.training.self_supervised import measure_correlation

pytestmark = pytest.mark.usefixtures("one_thread")


def linear(**kw):
    d = {"geometry": "linear", "grain_axial": 2.0, "grain_lateral": 2.0, "density": 1.0,
         "dynamic_range_db": 60.0, "gain_db": 0.0, "tgc_db": [0.0] * RP.TGC_KNOTS, "gamma": 1.0,
         "standoff": 0.0, "side_margin": 0.0, "cysts": []}
    d.update(kw)
    return d


def test_each_image_is_seeded_and_recorded():
    images, maps, draws = RP.generate_realistic_phantom(6, image_size=48, seed=5, progress=False)
    assert images.shape == maps.shape == (6, 1, 48, 48) and images.dtype == torch.uint8
    assert [d["index"] for d in draws] == list(range(6)) and all(d["seed"] == 5 for d in draws)
    for i in (0, 4):                       # any image alone from (seed, index)
        g = RP._image_generator(5, i)
        d = RP.draw_scanner(g)
        assert d == {k: v for k, v in draws[i].items() if k not in ("index", "seed")}
        img, clean = RP.realistic_image(d, 48, g)
        assert torch.equal(img, images[i]) and torch.equal(clean, maps[i])
    again = RP.generate_realistic_phantom(6, image_size=48, seed=5, progress=False)
    assert torch.equal(again[0], images) and again[2] == draws
    assert not torch.equal(RP.generate_realistic_phantom(6, image_size=48, seed=6, progress=False)[0], images)


def test_sector_is_black_outside_the_fan():
    d = {**linear(), "geometry": "sector", "apex": 0.2, "half_angle_deg": 30.0, "top_gap": 0.0}
    for k in ("standoff", "side_margin"):
        d.pop(k)
    img, clean = RP.realistic_image(d, 64, torch.Generator().manual_seed(0))
    z, x = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    theta = torch.atan2(x - 32, z + 0.2 * 64).abs()
    outside = theta > math.radians(30) + 0.05
    assert outside.sum() > 200
    assert (img[0][outside] == 0).all() and (clean[0][outside] == 0).all()
    assert img[0][theta < math.radians(25)].float().mean() > 20          # tissue inside


def test_anechoic_cyst_is_truly_black():
    # beyond REACH = (6, 5) beam samples from the wall (6 px axially at grain 1, 5 px laterally
    # at grain 2: one display px a sample) the cyst is exactly 0; the map is 0 throughout
    d = linear(cysts=[[0.5, 0.5, 0.28]], grain_axial=1.0)
    img, clean = RP.realistic_image(d, 64, torch.Generator().manual_seed(1))
    z, x = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    core = torch.hypot(x - 32, z - 32) < 0.28 * 64 - 7
    assert core.sum() > 50 and (img[0][core] == 0).all() and (clean[0][core] == 0).all()


def test_grain_follows_the_draw():
    # the measured autocorrelation FWHM follows the drawn grain; the scan conversion's bilinear
    # interpolation widens it a little where a beam sample spans more than a display pixel
    for gz, gx in ((1.5, 4.0), (4.0, 2.0)):
        g = torch.Generator().manual_seed(2)
        imgs = torch.stack([RP.realistic_image(linear(grain_axial=gz, grain_lateral=gx), 96, g)[0]
                            for _ in range(4)])
        c = measure_correlation(imgs)
        assert c.axial_fwhm == pytest.approx(gz, rel=0.35) and c.lateral_fwhm == pytest.approx(gx, rel=0.35)
        assert (c.axial > c.lateral) == (gz > gx)


def test_classic_phantom_is_the_original_formula():
    # the keywords added for realistic_phantom.py leave the classic envelope bit for bit
    echo = torch.rand(2, 24, 20)
    got = P.speckle_envelope(echo, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    density = 0.1 + 0.9 * echo
    occupied = torch.rand(echo.shape, generator=g) < density
    amplitude = torch.randn(echo.shape, generator=g) * torch.sqrt(P.reflectivity(echo) / density)
    original = P.analytic_rf(torch.where(occupied, amplitude, torch.zeros(()))).abs().transpose(1, 2)
    assert torch.equal(got, original * (1.0 / math.sqrt(P.psf_energy())))
    assert torch.equal(P.mean_intensity(echo), P.mean_intensity(echo, reflectivity_scale=torch.ones(())))


def test_dataset_keeps_the_draws(tmp_path):
    data = load_dataset("phantom", image_size=32, count=10, test_count=4, cache_dir=tmp_path,
                        progress=False, phantom="realistic")
    draws = data.info["draws"]
    assert len(draws["train"]) == len(data.train) and len(draws["test"]) == 4
    assert data.train_clean is not None and data.source == "realistic phantom"
    cached = load_dataset("phantom", image_size=32, count=10, test_count=4, cache_dir=tmp_path,
                          progress=False, phantom="realistic")
    assert cached.info["cache_hit"] and cached.info["draws"] == draws
    assert torch.equal(cached.train, data.train)
    with pytest.raises(ValueError, match="unknown phantom"):
        load_dataset("phantom", image_size=32, count=4, test_count=4, cache_dir=tmp_path, phantom="lab")
