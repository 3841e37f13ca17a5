"""The ultrasound images the noise is applied to, and batches made on the device.

Sources
- "phantom" (default): the synthetic B-mode set of speckle_models.data.phantom, the same count and
  size as the Kaggle set (5635 train+validation, 5508 test), with speckle-free maps.
- a folder in the Kaggle "Ultrasound Nerve Segmentation" layout (downloaded by the user):
  train/*.tif (images; *_mask.tif are masks and are skipped) and test/*.tif, 8-bit grayscale
  420 x 580. Each image is resized once to image_size x image_size by Pillow's antialiased
  bilinear filter (its support widens with the reduction, so a downscale averages).

Both are cached as one uncompressed .npz of uint8 arrays (loads in well under a second). A
cache is written to a temporary file in the same directory and moved into place with
os.replace, so a crash never leaves a half file under the final name. The Kaggle cache stores
a key made of the sorted source file list with sizes and mtimes and is rebuilt when the source
changes; the phantom cache is named by its parameters and the phantom version.

Split (paper, section 2.1): the train pool is split 80/20 into train and validation by a
permutation seeded with `seed` (5635 -> 4508 / 1127); the test set stays apart. The phantom's
content is drawn from `phantom_seed` (speckle-reproduce passes each training seed, so seeds
vary the data too) and `phantom_version` (phantom.PHYSICS); its cache also holds each image's
geometry row (*_geometry: what the structure metrics measure on).

Training order: epoch e of seed s visits the images in a permutation seeded by
shuffle_seed(s, e), a hash of the pair (numpy SeedSequence), so no two (seed, epoch) pairs share
an order (seeding with s + e would give seed s's epoch e + 1 the order of seed s + 1's epoch e).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from speckle_models.atomic_write import atomic_file
from speckle_kernels.noise import DEFAULT_SIGMA_ADD, DEFAULT_SIGMA_MULT, make_noisy_batch
from speckle_models.data.phantom import PHANTOM_VERSION, generate_phantom, physics_of

KAGGLE_TRAIN_COUNT = 5635
KAGGLE_TEST_COUNT = 5508
KAGGLE_SHAPE = (420, 580)            # (height, width) of every Kaggle image
_CACHE_FORMAT = 1


@dataclass
class UltrasoundData:
    """uint8 image sets of shape (N, 1, H, W); *_clean are the phantom's speckle-free maps."""
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_clean: torch.Tensor | None = None
    val_clean: torch.Tensor | None = None
    test_clean: torch.Tensor | None = None
    train_geometry: torch.Tensor | None = None
    val_geometry: torch.Tensor | None = None
    test_geometry: torch.Tensor | None = None
    source: str = ""
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        sizes = f"train={len(self.train)}, val={len(self.val)}, test={len(self.test)}"
        return (f"UltrasoundData({sizes}, size={tuple(self.train.shape[-2:])}, "
                f"clean={self.train_clean is not None}, source={self.source!r})")


# ----------------------------------------------------------------------------- cache files

def default_cache_dir() -> Path:
    env = os.environ.get("SPECKLE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "speckle_kernels"


def _write_npz(f, arrays: dict) -> None:
    """The one place a cache file's bytes are written (tests make it fail on purpose)."""
    np.savez(f, **arrays)


def save_cache(path: Path, arrays: dict, meta: dict) -> None:
    """Atomically write arrays and a JSON meta record to `path` (.npz)."""
    with atomic_file(path) as f:
        _write_npz(f, {**arrays, "meta": np.array(json.dumps(meta, sort_keys=True))})


def load_cache(path: Path, key: str | None = None):
    """(arrays, meta) from a cache file, or None when it is missing, unreadable or keyed for
    another source."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != _CACHE_FORMAT or (key is not None and meta.get("key") != key):
                return None
            return {k: z[k] for k in z.files if k != "meta"}, meta
    except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- Kaggle folder

def _tif_files(folder: Path, *, skip_masks: bool) -> list[Path]:
    files = sorted(p for p in folder.glob("*.tif") if p.is_file())
    if skip_masks:
        files = [p for p in files if not p.stem.endswith("_mask")]
    return files


def kaggle_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(train images, test images) of a Kaggle-layout folder; errors name the path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    found = []
    for part in ("train", "test"):
        sub = root / part
        if not sub.is_dir():
            raise FileNotFoundError(f"expected a folder {str(sub)!r} (Kaggle 'Ultrasound Nerve "
                                    f"Segmentation' layout: train/*.tif and test/*.tif)")
        files = _tif_files(sub, skip_masks=True)
        if not files:
            raise FileNotFoundError(f"no .tif images in {str(sub)!r}")
        found.append(files)
    return found[0], found[1]


def _source_key(files: list[Path], image_size: int) -> str:
    entries = []
    for p in files:
        st = p.stat()
        entries.append((p.parent.name + "/" + p.name, st.st_size, st.st_mtime_ns))
    blob = json.dumps({"files": entries, "size": image_size, "format": _CACHE_FORMAT})
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_resized(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I;8"):
                raise ValueError(f"{str(path)!r} is not an 8-bit grayscale image (mode {im.mode})")
            if (im.height, im.width) != KAGGLE_SHAPE:
                raise ValueError(f"{str(path)!r} is {im.height}x{im.width}, expected "
                                 f"{KAGGLE_SHAPE[0]}x{KAGGLE_SHAPE[1]} (height x width)")
            im = im.convert("L")
            small = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(small, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc


def _read_all(files: list[Path], image_size: int, progress: bool, desc: str) -> np.ndarray:
    out = np.empty((len(files), 1, image_size, image_size), dtype=np.uint8)
    it = files
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(files, desc=desc, unit="img")
    for i, p in enumerate(it):
        out[i, 0] = _read_resized(p, image_size)
    return out


def _kaggle_arrays(root: Path, image_size: int, cache_dir: Path, progress: bool):
    train_files, test_files = kaggle_files(root)
    key = _source_key(train_files + test_files, image_size)
    ident = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    path = cache_dir / f"kaggle-{ident}-{image_size}.npz"
    cached = load_cache(path, key)
    if cached is not None:
        return cached[0], path, True
    arrays = {"pool": _read_all(train_files, image_size, progress, "resize train"),
              "test": _read_all(test_files, image_size, progress, "resize test")}
    save_cache(path, arrays, {"format": _CACHE_FORMAT, "key": key, "source": str(root)})
    return arrays, path, False


# ----------------------------------------------------------------------------- phantom

def _phantom_arrays(count: int, test_count: int, image_size: int, phantom_seed: int,
                    version: int, cache_dir: Path, progress: bool, kind: str = "classic"):
    """(arrays, path, cache hit, per-image draws or None). kind "classic": phantom.py at physics
    `version`, with each image's geometry rows (the despeckling table's regions and edges);
    "realistic": the domain-randomised phantom (realistic_phantom.py, physics version 2 always),
    whose per-image scanner draws the cache keeps."""
    if kind == "realistic":
        from speckle_models.data.realistic_phantom import REALISTIC_VERSION, generate_realistic_phantom

        name = f"realistic-v{REALISTIC_VERSION}-p2-s{phantom_seed}-{count}-{test_count}-{image_size}.npz"
    elif kind == "classic":
        name = f"phantom-v{version}-s{phantom_seed}-{count}-{test_count}-{image_size}.npz"
    else:
        raise ValueError(f"unknown phantom {kind!r}; expected classic or realistic")
    path = cache_dir / name
    key = name
    cached = load_cache(path, key)
    if cached is not None and (kind == "realistic" or "pool_geometry" in cached[0]):
        return cached[0], path, True, cached[1].get("draws")
    meta = {"format": _CACHE_FORMAT, "key": key, "source": "phantom"}
    parts = {}
    for k, what in enumerate(("train", "test")):
        n = count if what == "train" else test_count
        desc = f"{kind} phantom {what} (seed {phantom_seed})"
        if kind == "realistic":
            parts[what] = generate_realistic_phantom(n, image_size=image_size, seed=2 * phantom_seed + k,
                                                     progress=progress, desc=desc)
        else:
            parts[what] = generate_phantom(n, image_size=image_size, seed=2 * phantom_seed + k, progress=progress,
                                           desc=desc, version=version, return_geometry=True)
    arrays = {"pool": parts["train"][0].numpy(), "pool_clean": parts["train"][1].numpy(),
              "test": parts["test"][0].numpy(), "test_clean": parts["test"][1].numpy()}
    draws = None
    if kind == "realistic":
        draws = meta["draws"] = {"pool": parts["train"][2], "test": parts["test"][2]}
    else:
        arrays.update(pool_geometry=parts["train"][2].numpy(), test_geometry=parts["test"][2].numpy())
    save_cache(path, arrays, meta)
    return arrays, path, False, draws


# ----------------------------------------------------------------------------- public API

def _check_count(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors, each sorted, from a permutation seeded with `seed`;
    the validation set has round(n * val_fraction) images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_dataset(source="phantom", *, image_size: int = 128, seed: int = 0,
                 val_fraction: float = 0.2, count: int | None = None,
                 test_count: int | None = None, cache_dir=None, progress: bool = True,
                 phantom_seed: int = 0, phantom_version: int = PHANTOM_VERSION,
                 phantom: str = "classic") -> UltrasoundData:
    """Load (or build once and cache) the ultrasound images.

    source: "phantom" or the path of a Kaggle-layout folder. count / test_count: how many
    train+validation / test images (None: the full set; for the phantom, fewer images are
    generated, for Kaggle the first ones of a seeded shuffle are kept). seed picks the
    train/validation split (and the Kaggle subset); phantom_seed and phantom_version the
    phantom's content; phantom its kind ("classic" or "realistic", whose per-image scanner
    draws come in info["draws"]: {"train": [...], "val": [...], "test": [...]}).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    count, test_count = _check_count("count", count), _check_count("test_count", test_count)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if isinstance(phantom_seed, bool) or not isinstance(phantom_seed, int) or phantom_seed < 0:
        raise ValueError(f"phantom_seed must be a non-negative int, got {phantom_seed!r}")

    if isinstance(source, str) and source == "phantom":
        arrays, path, hit, draws = _phantom_arrays(count or KAGGLE_TRAIN_COUNT,
                                                   test_count or KAGGLE_TEST_COUNT, image_size,
                                                   phantom_seed, physics_of(phantom_version).version,
                                                   cache, progress, phantom)
        name = "phantom" if phantom == "classic" else f"{phantom} phantom"
    elif isinstance(source, (str, os.PathLike)):
        arrays, path, hit = _kaggle_arrays(Path(source), image_size, cache, progress)
        name = str(source)
        g = torch.Generator().manual_seed(seed + 1)
        for part, n in (("pool", count), ("test", test_count)):
            if n is not None and n < len(arrays[part]):
                keep = torch.randperm(len(arrays[part]), generator=g)[:n].sort().values.numpy()
                arrays = {**arrays, part: arrays[part][keep]}
        draws = None
    else:
        raise TypeError(f"source must be 'phantom' or a folder path, got {source!r}")

    pool = torch.from_numpy(np.ascontiguousarray(arrays["pool"]))
    tr, va = split_indices(len(pool), val_fraction, seed)
    data = UltrasoundData(train=pool[tr], val=pool[va],
                          test=torch.from_numpy(np.ascontiguousarray(arrays["test"])),
                          source=name, info={"cache": str(path), "cache_hit": hit,
                                             "seed": seed, "val_fraction": val_fraction})
    if draws is not None:
        data.info["draws"] = {"train": [draws["pool"][i] for i in tr.tolist()],
                              "val": [draws["pool"][i] for i in va.tolist()], "test": draws["test"]}
    if "pool_clean" in arrays:
        pool_clean = torch.from_numpy(arrays["pool_clean"])
        data.train_clean, data.val_clean = pool_clean[tr], pool_clean[va]
        data.test_clean = torch.from_numpy(arrays["test_clean"])
        data.info.update(phantom_seed=phantom_seed, phantom_version=phantom_version if phantom == "classic" else 2)
    if "pool_geometry" in arrays:
        pool_geo = torch.from_numpy(arrays["pool_geometry"])
        data.train_geometry, data.val_geometry = pool_geo[tr], pool_geo[va]
        data.test_geometry = torch.from_numpy(arrays["test_geometry"])
    return data


def shuffle_seed(seed: int, epoch: int) -> int:
    """The generator seed of (seed, epoch)'s training order: a hash of the pair (module docstring)."""
    state = np.random.SeedSequence([int(seed), int(epoch), 0x5EED]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2 ** 63 - 1)


class DeviceBatches:
    """(noisy, clean) training batches made on the device from a uint8 image set.

    The whole uint8 set moves to `device` once. batches(epoch) visits it in a permutation drawn
    by a CPU torch.Generator seeded with seed + epoch (reproducible; the natural order when
    shuffle=False), and makes each batch with make_noisy_batch using the noise counter offset
    (epoch * len(self) + b) * batch_size * pixels_per_image: every (epoch, batch) pair draws
    numbers no other pair uses.

    Data-parallel training: with rank/world_size, each step's global batch holds
    world_size * batch_size images of the epoch's permutation and rank r takes the r-th
    batch_size of them, with the noise offsets of their places in that global batch; the ranks
    together see exactly what one process with batch world_size * batch_size would.
    """

    def __init__(self, images_u8: torch.Tensor, batch_size: int, *, factor: float = 1.0,
                 sigma_mult=DEFAULT_SIGMA_MULT, sigma_add: float = DEFAULT_SIGMA_ADD,
                 distribution: str = "gaussian", seed: int = 0, device=None,
                 out_dtype: torch.dtype = torch.float32, shuffle: bool = True,
                 drop_last: bool = False, clip: bool = True, backend: str = "auto",
                 rank: int = 0, world_size: int = 1):
        if not isinstance(images_u8, torch.Tensor) or images_u8.dtype != torch.uint8:
            raise TypeError("images_u8 must be a uint8 tensor, got "
                            f"{getattr(images_u8, 'dtype', type(images_u8).__name__)}")
        if images_u8.dim() != 4:
            raise ValueError(f"images_u8 must be (N, 1, H, W), got shape {tuple(images_u8.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
                and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else images_u8.device
        self.images = images_u8.to(self.device).contiguous()
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.noise = dict(factor=factor, sigma_mult=sigma_mult, sigma_add=sigma_add,
                          distribution=distribution, out_dtype=out_dtype, clip=clip,
                          backend=backend)
        # check the noise arguments now rather than at the first batch
        make_noisy_batch(self.images[:0], seed=seed, **self.noise)

    def __len__(self) -> int:
        n, b = len(self.images), self.batch_size * self.world_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed(self.seed, epoch)))

    def batches(self, epoch: int = 0):
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        order = self.order(epoch).to(self.device)
        per_image = self.images[0].numel() if len(self.images) else 0
        global_batch = self.batch_size * self.world_size
        for b in range(len(self)):
            start = b * global_batch + self.rank * self.batch_size
            idx = order[start:start + self.batch_size]
            offset = (epoch * len(self) * global_batch + start) * per_image
            yield self.make_batch(idx, offset)

    def make_batch(self, idx: torch.Tensor, offset: int):
        """(noisy, clean) of images idx with the noise counters from `offset` (a subclass may
        pair the noisy images with another target; the order and counters stay these)."""
        return make_noisy_batch(self.images.index_select(0, idx), seed=self.seed, offset=offset,
                                **self.noise)
